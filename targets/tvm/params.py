"""The parameters of a TVM artifact: their order (the VM functions' `params` tuple), the file that holds
them (weights.bin, page-aligned raw little-endian, indexed by params.json; the runner memory-maps it), and
the packed layouts the kernels read (panels of output columns, sub-byte codes).

A compile streams its weights: Params(file) writes each parameter as it is added and keeps only its name,
shape and dtype (the Relax functions need no more), and a big parameter is a Streamed, made and written a
block of rows at a time from the IR's lazily read arrays (rwkvc.mapped.LazyArray), so a compile holds about
one block, not the model. The blocks give the same bytes as the whole array: panels are packed from whole
panels of rows, and every conversion (float32 -> float16, int8 per row) treats rows independently.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import numpy as np

ALIGN = 4096
BLOCK_BYTES = 1 << 24   # a Streamed parameter is made this many source bytes (whole rows) at a time


class Spec(NamedTuple):
    """What the lowering needs of a parameter: its shape and dtype."""
    shape: tuple
    dtype: np.dtype


@dataclass(frozen=True)
class Streamed:
    """A parameter made block by block: blocks() yields consecutive parts along axis 0 (C order), each already
    in `dtype`, which together are the (shape) array."""
    shape: tuple
    dtype: np.dtype
    blocks: Callable[[], Iterator[np.ndarray]]

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))

    def load(self) -> np.ndarray:
        """The whole array (held in memory: for a Params without a file)."""
        parts = [np.asarray(b, self.dtype) for b in self.blocks()]
        return np.concatenate(parts).reshape(self.shape) if parts else np.zeros(self.shape, self.dtype)

    @staticmethod
    def of(src, dtype, via=None) -> "Streamed":
        """src (an array, or a LazyArray read by blocks of rows) converted to dtype (through `via` first, as
        np.asarray(src, via).astype(dtype) would), a block of rows at a time."""
        dtype = np.dtype(dtype)
        shape = tuple(src.shape)

        def blocks():
            for part in row_chunks(src, _rows_per_block(src)):
                yield np.ascontiguousarray(part if via is None else np.asarray(part, via), dtype)
        return Streamed(shape, dtype, blocks)


def _rows_per_block(src, multiple: int = 1) -> int:
    n = max(1, int(src.shape[0])) if len(src.shape) else 1
    row = max(1, int(np.prod(src.shape, dtype=np.int64)) * np.dtype(src.dtype).itemsize // n)
    return max(multiple, BLOCK_BYTES // row // multiple * multiple)


def row_chunks(src, n: int) -> Iterator[np.ndarray]:
    """src's rows in consecutive chunks of exactly n rows (the last may be shorter): an array by views, a
    LazyArray by reading n rows at a time (or whole, where it cannot read rows)."""
    if not len(src.shape) or src.shape[0] == 0:
        yield np.asarray(src)
        return
    if not hasattr(src, "row_blocks"):
        a = np.asarray(src)
        for s in range(0, a.shape[0], n):
            yield a[s:s + n]
        return
    row = src.nbytes // src.shape[0]
    buf = None
    for part in src.row_blocks(max_bytes=n * row):
        part = np.asarray(part)
        buf = part if buf is None or not len(buf) else np.concatenate([buf, part])
        while len(buf) >= n:
            yield buf[:n]
            buf = buf[n:]
    if buf is not None and len(buf):
        yield buf


def _write(f, name: str, src, dtype) -> dict:
    """Append one parameter to the open weights file (64-byte aligned, page-aligned from 4 KiB); its entry."""
    dt = np.dtype(dtype)
    if isinstance(src, Streamed):
        if src.dtype != dt:
            raise ValueError(f"parameter {name}: streamed as {src.dtype}, added as {dt}")
        shape, parts = src.shape, src.blocks()
    else:
        a = np.ascontiguousarray(src, dtype=dt)
        shape, parts = a.shape, (a,)
    size = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    f.write(b"\0" * ((-f.tell()) % (ALIGN if size >= ALIGN else 64)))
    offset = f.tell()
    for part in parts:
        part = np.ascontiguousarray(part, dt)
        f.write(memoryview(part.reshape(-1)).cast("B") if part.size else b"")
    if f.tell() != offset + size:
        raise RuntimeError(f"parameter {name}: wrote {f.tell() - offset} bytes, expected {size}")
    return {"name": name, "dtype": str(dt), "shape": list(shape), "offset": offset, "nbytes": size}


class Params:
    """Ordered name -> parameter (float32, or float16 for stored matrices; quantised kinds in their own
    dtypes); `names` is the VM's params order.

    Params(f): each add() appends the parameter to the open weights file f at once, and only its Spec is
    kept (write_index then writes params.json). Params(): the arrays are held (`arrays`) until write()."""

    def __init__(self, f=None):
        self.names: list[str] = []
        self.specs: dict[str, Spec] = {}
        self.arrays: dict[str, np.ndarray] = {}
        self.entries: list[dict] = []
        self._pos: dict[str, int] = {}
        self._f = f

    def add(self, name: str, arr, dtype=np.float32) -> None:
        """arr: an array, or a Streamed (written block by block, never held where the Params has a file)."""
        if name in self._pos:
            raise ValueError(f"parameter {name} added twice")
        self._pos[name] = len(self.names)
        self.names.append(name)
        if self._f is not None:
            e = _write(self._f, name, arr, dtype)
            self.entries.append(e)
            self.specs[name] = Spec(tuple(e["shape"]), np.dtype(e["dtype"]))
            return
        a = arr.load() if isinstance(arr, Streamed) else arr
        a = self.arrays[name] = np.ascontiguousarray(a, dtype=dtype)
        self.specs[name] = Spec(a.shape, a.dtype)

    def index(self, name: str) -> int:
        return self._pos[name]

    def spec(self, name: str) -> Spec:
        return self.specs[name]

    def group(self, prefix: str) -> list[tuple[str, Spec]]:
        """(name relative to prefix, Spec) of every parameter under prefix, in order."""
        return [(n[len(prefix):], self.specs[n]) for n in self.names if n.startswith(prefix)]

    def write(self, out_dir: str, weights="weights.bin", index="params.json") -> dict:
        """The held arrays as weights.bin (each tensor 64-byte aligned, large ones page-aligned) + params.json."""
        if self._f is not None:
            raise RuntimeError("this Params wrote its weights as they were added; write_index writes the index")
        with open(os.path.join(out_dir, weights), "wb") as f:
            self.entries = [_write(f, n, self.arrays[n], self.arrays[n].dtype) for n in self.names]
        return self.write_index(out_dir, weights, index)

    def write_index(self, out_dir: str, weights="weights.bin", index="params.json") -> dict:
        with open(os.path.join(out_dir, index), "w") as f:
            json.dump({"file": weights, "params": self.entries}, f, indent=1)
        return {"weights": weights, "params": index, "n_params": len(self.entries)}


def pack_panels(w: np.ndarray, panel: int, dtype=np.float32) -> np.ndarray:
    """W (out, in) -> (ceil(out/panel), in, panel): panel p, row i holds W[p*panel : (p+1)*panel, i].

    One weight load per k then feeds `panel` output lanes (no horizontal sums); the last panel is
    zero-padded and the kernel's extra columns are sliced off.
    """
    w = np.asarray(w, np.float32)
    out, k = w.shape
    nb = -(-out // panel)
    if nb * panel != out:
        w = np.concatenate([w, np.zeros((nb * panel - out, k), np.float32)])
    return np.ascontiguousarray(w.reshape(nb, panel, k).transpose(0, 2, 1), dtype=dtype)


def pack_panels_raw(w: np.ndarray, panel: int) -> np.ndarray:
    """pack_panels keeping the dtype (int8 weights, uint8 code bytes): (out, k) -> (ceil(out/panel), k, panel)."""
    w = np.asarray(w)
    out, k = w.shape
    nb = -(-out // panel)
    if nb * panel != out:
        w = np.concatenate([w, np.zeros((nb * panel - out, k), w.dtype)])
    return np.ascontiguousarray(w.reshape(nb, panel, k).transpose(0, 2, 1))


def panels(w, panel: int, dtype=np.float32, src_dtype=None) -> Streamed:
    """pack_panels (src_dtype float32, stored as dtype) or pack_panels_raw (src_dtype = dtype) of w (out, ...)
    with its trailing axes flattened (out, k), made a whole number of panels at a time: the same bytes,
    holding one block of rows of w (a LazyArray is read by blocks)."""
    dtype = np.dtype(dtype)
    sdt = np.dtype(src_dtype or dtype)
    out = int(w.shape[0])
    k = int(np.prod(w.shape[1:], dtype=np.int64))
    nb = -(-out // panel)
    rows = _rows_per_block(w, panel)

    def blocks():
        for part in row_chunks(w, rows):
            part = np.asarray(part, sdt).reshape(len(part), k)
            n = -(-len(part) // panel)
            if n * panel != len(part):
                part = np.concatenate([part, np.zeros((n * panel - len(part), k), sdt)])
            yield np.ascontiguousarray(part.reshape(n, panel, k).transpose(0, 2, 1), dtype=dtype)
    return Streamed((nb, k, panel), dtype, blocks)


def int8_rows(src) -> tuple[Streamed, Streamed]:
    """quantize_int8(src) as two parameters, codes (N, K) int8 and scales (N, 1) float32, made a block of rows
    at a time (int8 is per row). The scales are filled while the codes are made (added first); read alone,
    they make the codes once more."""
    from rwkvc.weights.int8 import quantize_int8
    N, K = (int(d) for d in src.shape)
    scale = np.empty(N, np.float32)
    filled = [False]

    def codes():
        a = 0
        for part in row_chunks(src, _rows_per_block(src)):
            q, scale[a:a + len(part)] = quantize_int8(part)
            a += len(part)
            yield q
        filled[0] = True

    def scales():
        if not filled[0]:
            for _ in codes():
                pass
        yield scale[:, None].copy()
    return Streamed((N, K), np.int8, codes), Streamed((N, 1), np.float32, scales)


def pad_rows(v: np.ndarray, panel: int) -> np.ndarray:
    """v (n, ...) with zero rows appended up to a multiple of panel."""
    n = -(-v.shape[0] // panel) * panel
    return np.concatenate([v, np.zeros((n - v.shape[0],) + v.shape[1:], v.dtype)]) if n != v.shape[0] else v


def pack_codes(codes: np.ndarray, bits: int, panel: int) -> np.ndarray:
    """codes (F, C) in 0..2^bits-1 -> panels (NB, ceil(C*bits/8), P) uint8, 8/bits codes per byte along C,
    low bits first (C padded with zero codes)."""
    c = np.asarray(codes, np.uint8)
    per = 8 // bits
    F, C = c.shape
    Kp = -(-C // per) * per
    if Kp != C:
        c = np.concatenate([c, np.zeros((F, Kp - C), np.uint8)], axis=1)
    c = c.reshape(F, Kp // per, per)
    b = np.zeros((F, Kp // per), np.uint8)
    for i in range(per):
        b |= (c[..., i] << (bits * i)).astype(np.uint8)
    return pack_panels_raw(b, panel)


def code_bits(q_bits: int) -> int:
    """The stored width of q_bits-bit codes: 1, 2, 4 or 8 (a whole number of codes per byte)."""
    return 1 if q_bits <= 1 else 2 if q_bits <= 2 else 4 if q_bits <= 4 else 8
