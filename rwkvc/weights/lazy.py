"""`lazy`: the (V, C) embedding table read row by row from disk at run time (memory-mapped), each row stored
in float32, float16 or int8 (symmetric per row: rwkvc.weights.int8.quantize_int8 over the rows)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .dense import Dense

STORAGES = ("float32", "float16", "int8")


@dataclass
class LazyEmbedding(Dense):
    """The (V, C) embedding table (as loaded, ln0 not folded), read row by row from disk at run time:
    a dense table (shape, arrays, to_dense as Dense) with its own storage type and lowering."""
    storage: str = "float16"
    kind: ClassVar[str] = "lazy"

    def rows(self, tokens) -> np.ndarray:
        """The rows of `tokens` as the artifact will give them (before ln0)."""
        r = np.asarray(self.w[np.asarray(tokens)], np.float32)
        return r.astype(np.float16).astype(np.float32) if self.storage == "float16" else r

    def row_bytes(self) -> int:
        C = self.w.shape[1]
        return {"float32": 4 * C, "float16": 2 * C, "int8": C + 4}[self.storage]

    def describe(self) -> str:
        return f"lazy (memory-mapped) {self.w.shape[0]}x{self.w.shape[1]} rows in {self.storage}"
