"""`deepembed` / `deepembed-lazy`: RWKV-7a's DeepEmbed tables, one per layer's channel-mix, and their math.

A DeepEmbed channel-mix (the official package's RWKV_DE_VERSION=1) scales its hidden units per token by a
(D, D) matrix read from a per-token table (D = 32, so the table is (V, 1024)):

    h    = relu(K xk)^2                                   (F,)
    ss   = (x @ s1) @ table[token].view(D, D)             (D,)    x = ln2's output, s1 (C, D)
    h    = h * (ss @ s2 + s0)                             (F,)    s2 (D, F), s0 (F,)
    y    = V h

where table = s_emb + ln0(emb) @ s_emb_x^T: the checkpoint's s_emb (V, D^2) plus the ln0-normalised token
embedding projected by s_emb_x (D^2, C). The official package merges the two at load time; rwkvc keeps both
in the IR (`DeepEmbedTable`, with the model's embedding and ln0 it merges with) and every lowering stores the
merged table (`DeepEmbedTable.merged`), computed at compile time. A decoded token reads one row (D^2 values)
of each layer's table.

    DeepEmbedTable       kind "deepembed":       the table held in memory, in the compute dtype
    LazyDeepEmbedTable   kind "deepembed-lazy":  the table memory-mapped on disk, rows in float32, float16 or
                         int8 (symmetric per row, rwkvc.weights.int8.quantize_int8); only the tokens' rows read
    DeepEmbed            a channel-mix's table with s0, s1, s2 (ChannelMix.deep; not a matrix, like SparseFFN)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .int8 import dequantize_int8, quantize_int8

STORAGES = ("float32", "float16", "int8")


@dataclass(eq=False)
class DeepEmbedTable:
    """A layer's DeepEmbed table as loaded: s_emb (V, D^2) and s_emb_x (D^2, C), and what the merge reads: the
    model's embedding as loaded, emb (V, C) (the same array as Model.emb; not this table's bytes), and its ln0
    (an rwkvc.ir.Norm, or None)."""
    s_emb: np.ndarray
    s_emb_x: np.ndarray
    emb: np.ndarray
    ln0: object
    kind: ClassVar[str] = "deepembed"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.s_emb.shape)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"s_emb": self.s_emb, "s_emb_x": self.s_emb_x}

    def row_bytes(self, itemsize: int = 4) -> int:
        """Bytes of one merged row as the artifact stores it (itemsize: the compute dtype's)."""
        return self.shape[1] * itemsize

    def merged(self, chunk: int = 8192) -> np.ndarray:
        """The whole merged table (V, D^2) float32, s_emb + ln0(emb) @ s_emb_x^T: what every lowering stores
        (the official load-time merge, done at compile time)."""
        V, D2 = self.shape
        out = np.empty((V, D2), np.float32)
        sx = np.asarray(self.s_emb_x, np.float32).T                               # (C, D^2)
        for s in range(0, V, chunk):
            out[s:s + chunk] = np.asarray(self.s_emb[s:s + chunk], np.float32) + fold_ln0(self.emb[s:s + chunk],
                                                                                          self.ln0) @ sx
        return out

    def merged_rows(self, tokens) -> np.ndarray:
        """The merged rows of `tokens`, (n, D^2) float32, as the artifact gives them back (its storage's rounding)."""
        t = np.asarray(tokens, np.int64).reshape(-1)
        rows = np.asarray(self.s_emb[t], np.float32) + fold_ln0(np.asarray(self.emb)[t], self.ln0) @ \
            np.asarray(self.s_emb_x, np.float32).T
        return self.stored(rows)

    def stored(self, rows: np.ndarray) -> np.ndarray:
        """Merged rows rounded as this table stores them (float32: unchanged)."""
        return np.asarray(rows, np.float32)

    def describe(self) -> str:
        V, D2 = self.shape
        return f"deepembed {V}x{D2} (resident; s_emb_x {self.s_emb_x.shape[0]}x{self.s_emb_x.shape[1]})"


@dataclass(eq=False)
class LazyDeepEmbedTable(DeepEmbedTable):
    """The table memory-mapped on disk, its merged rows stored in `storage`; a token reads only its own row."""
    storage: str = "float16"
    kind: ClassVar[str] = "deepembed-lazy"

    def __post_init__(self):
        if self.storage not in STORAGES:
            raise ValueError(f"LazyDeepEmbedTable.storage must be one of {', '.join(STORAGES)}, got {self.storage!r}")

    def row_bytes(self, itemsize: int = 4) -> int:
        D2 = self.shape[1]
        return {"float32": 4 * D2, "float16": 2 * D2, "int8": D2 + 4}[self.storage]

    def stored(self, rows: np.ndarray) -> np.ndarray:
        if self.storage == "float16":
            return np.asarray(rows, np.float16).astype(np.float32)
        if self.storage == "int8":
            return dequantize_int8(*quantize_int8(rows))
        return np.asarray(rows, np.float32)

    def describe(self) -> str:
        return f"deepembed-lazy (memory-mapped) {self.shape[0]}x{self.shape[1]} rows in {self.storage}"


@dataclass
class DeepEmbed:
    """A channel-mix's DeepEmbed: the per-token table and the small parameters around it (official shapes,
    applied as x @ s1, ss @ s2):  s0 (F,), s1 (C, D), s2 (D, F), table (V, D^2) with D^2 = D * D."""
    table: DeepEmbedTable
    s0: np.ndarray
    s1: np.ndarray
    s2: np.ndarray

    @property
    def rank(self) -> int:
        return int(self.s1.shape[1])

    def arrays(self) -> dict[str, np.ndarray]:
        """The small parameters (the table's arrays are the table's)."""
        return {"s0": self.s0, "s1": self.s1, "s2": self.s2}

    def describe(self) -> str:
        return f"{self.table.describe()}, rank {self.rank}"


def fold_ln0(e: np.ndarray, ln0) -> np.ndarray:
    """Rows of the embedding with ln0 applied (as the official package does at load time); float32.
    ln0: an rwkvc.ir.Norm, or None."""
    if ln0 is None:
        return np.asarray(e, np.float32)
    e = np.asarray(e, np.float64)
    mu = e.mean(-1, keepdims=True)
    var = ((e - mu) ** 2).mean(-1, keepdims=True)
    return ((e - mu) / np.sqrt(var + ln0.eps) * ln0.weight + ln0.bias).astype(np.float32)
