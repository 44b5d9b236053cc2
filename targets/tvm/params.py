"""The parameters of a TVM artifact: their order (the VM functions' `params` tuple), the file that holds
them (weights.bin, page-aligned raw little-endian, indexed by params.json; the runner memory-maps it), and
the packed layouts the kernels read (panels of output columns, sub-byte codes)."""
from __future__ import annotations

import json
import os

import numpy as np

ALIGN = 4096


class Params:
    """Ordered name -> array (float32, or float16 for stored matrices); `names` is the VM's params order."""

    def __init__(self):
        self.names: list[str] = []
        self.arrays: dict[str, np.ndarray] = {}
        self._pos: dict[str, int] = {}

    def add(self, name: str, arr: np.ndarray, dtype=np.float32) -> None:
        if name in self._pos:
            raise ValueError(f"parameter {name} added twice")
        self._pos[name] = len(self.names)
        self.names.append(name)
        self.arrays[name] = np.ascontiguousarray(arr, dtype=dtype)

    def index(self, name: str) -> int:
        return self._pos[name]

    def group(self, prefix: str) -> list[tuple[str, np.ndarray]]:
        """(name relative to prefix, array) of every parameter under prefix, in order."""
        return [(n[len(prefix):], self.arrays[n]) for n in self.names if n.startswith(prefix)]

    def write(self, out_dir: str, weights="weights.bin", index="params.json") -> dict:
        """weights.bin (each tensor 64-byte aligned, large ones page-aligned) + params.json."""
        entries = []
        with open(os.path.join(out_dir, weights), "wb") as f:
            for name in self.names:
                a = self.arrays[name]
                pad = (-f.tell()) % (ALIGN if a.nbytes >= ALIGN else 64)
                f.write(b"\0" * pad)
                entries.append({"name": name, "dtype": str(a.dtype), "shape": list(a.shape),
                                "offset": f.tell(), "nbytes": int(a.nbytes)})
                f.write(a.tobytes())
        with open(os.path.join(out_dir, index), "w") as f:
            json.dump({"file": weights, "params": entries}, f, indent=1)
        return {"weights": weights, "params": index, "n_params": len(entries)}


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
