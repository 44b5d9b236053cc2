"""`int4`: asymmetric group-wise 4-bit weights, stored as ONNX Runtime's MatMulNBits reads them.

    quantize_int4(w, group)   -> codes uint8 (N, Kp) in 0..15, scales (N, nb), zeros (N, nb)
                                 w[n, k] ~ (codes[n, k] - zeros[n, k // g]) * scales[n, k // g]   (group-wise)
    effective_group(group, K) -> the block size a matrix with K inputs uses
    pack_int4 / unpack_int4      two codes per byte, low nibble first: MatMulNBits' layout
    half_exact(scales)        -> scales rounded up to float16 values (the interleaved layout stores float16)
    interleave16(...)            the interleaved layout of rwkvc's Rwkv7MatVecQ16 kernel
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

F16_MAX = 65504.0


def effective_group(group: int, K: int) -> int:
    """The block size used for a matrix with K inputs: `group`, or the smallest power of two >= 16 that
    covers K when K is smaller (a 32-wide low-rank factor is not padded to 128)."""
    g = 16
    while g < K and g < group:
        g *= 2
    return min(group, g)


BLOCK_ELEMENTS = 1 << 22   # a big matrix is quantised this many weights (whole rows) at a time


def quantize_int4(w: np.ndarray, group: int, scales: np.ndarray | None = None,
                  zeros: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric group-wise 4-bit (round to nearest). w (N, K) -> codes (N, Kp) uint8 in 0..15,
    scales (N, nb) float32, zeros (N, nb) uint8, with nb = ceil(K / group) and Kp = nb * group (the
    padding columns hold the zero point, i.e. dequantise to 0). Given scales/zeros are used as they are.
    A big w (an array, or a lazily read one: rwkvc.mapped.LazyArray) is read and quantised by blocks of
    rows, so the temporaries stay small; the result is the same."""
    N, K = w.shape
    step = max(1, BLOCK_ELEMENTS // max(1, K))
    if N <= step:
        return _quantize_int4(w, group, scales, zeros)
    nb = -(-K // group)
    if scales is None:   # the ranges block by block, then the scales as _quantize_int4 makes them
        lo, hi = np.empty((N, nb), np.float32), np.empty((N, nb), np.float32)
        for a in range(0, N, step):
            wb = np.zeros((min(step, N - a), nb * group), np.float32)
            wb[:, :K] = np.asarray(w[a:a + step], np.float32)
            wb = wb.reshape(-1, nb, group)
            lo[a:a + step], hi[a:a + step] = np.minimum(wb.min(-1), 0.0), np.maximum(wb.max(-1), 0.0)
        scales = ((hi - lo) / 15.0).astype(np.float32)
        scales[scales == 0] = 1.0
        scales = half_exact(scales)
        zeros = np.clip(np.rint(-lo / scales), 0, 15).astype(np.uint8)
    codes = np.empty((N, nb * group), np.uint8)
    for a in range(0, N, step):
        codes[a:a + step] = _quantize_int4(w[a:a + step], group, scales[a:a + step], zeros[a:a + step])[0]
    return codes, np.asarray(scales, np.float32), np.asarray(zeros, np.uint8)


def _quantize_int4(w, group: int, scales=None, zeros=None):
    w = np.asarray(w, np.float32)
    N, K = w.shape
    nb = -(-K // group)
    wp = np.zeros((N, nb * group), np.float32)
    wp[:, :K] = w
    wb = wp.reshape(N, nb, group)
    if scales is None:
        lo = np.minimum(wb.min(-1), 0.0)
        hi = np.maximum(wb.max(-1), 0.0)
        scales = ((hi - lo) / 15.0).astype(np.float32)
        scales[scales == 0] = 1.0
        scales = half_exact(scales)
        zeros = np.clip(np.rint(-lo / scales), 0, 15).astype(np.uint8)
    codes = np.clip(np.rint(wb / scales[..., None]) + zeros[..., None], 0, 15).astype(np.uint8)
    codes = codes.reshape(N, nb * group)
    if K % group:
        codes[:, K:] = np.repeat(zeros[:, -1:], nb * group - K, axis=1)
    return codes, np.asarray(scales, np.float32), np.asarray(zeros, np.uint8)


def half_exact(scales: np.ndarray) -> np.ndarray:
    """Positive scales rounded up to a float16 value, when they all fit in it: the cpu target's interleaved
    4-bit layout (interleave16) stores them as float16, and MatMulNBits, reading them as float32, then
    computes with the same numbers. Up, so a group's range still fits its 16 codes (round to nearest stays
    within half a step); a scale grows by less than 2^-10 of itself (or, below float16's normal range, by
    less than 2^-24)."""
    s = np.asarray(scales, np.float32)
    if not np.isfinite(s).all() or float(s.min(initial=1.0)) <= 0 or float(s.max(initial=0.0)) > F16_MAX:
        return s
    h = s.astype(np.float16)
    low = h.astype(np.float32) < s
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    return h.astype(np.float32)


def is_half_exact(scales: np.ndarray) -> bool:
    s = np.asarray(scales, np.float32)
    return bool(np.isfinite(s).all()) and np.array_equal(s.astype(np.float16).astype(np.float32), s)


def dequantize_int4(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group: int, K: int) -> np.ndarray:
    N = codes.shape[0]
    nb = scales.shape[1]
    c = codes.reshape(N, nb, group).astype(np.float32)
    w = (c - zeros[..., None].astype(np.float32)) * scales[..., None]
    return w.reshape(N, nb * group)[:, :K]


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """(..., 2m) codes in 0..15 -> (..., m) bytes, element 2i in the low nibble, 2i+1 in the high one."""
    c = np.asarray(codes, np.uint8)
    if c.shape[-1] % 2:
        c = np.concatenate([c, np.zeros(c.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, n: int | None = None) -> np.ndarray:
    p = np.asarray(packed, np.uint8)
    out = np.empty(p.shape[:-1] + (2 * p.shape[-1],), np.uint8)
    out[..., 0::2] = p & 0x0F
    out[..., 1::2] = p >> 4
    return out if n is None else out[..., :n]


def interleave16(packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, group: int):
    """An Int4 matrix (MatMulNBits' packed (N, nb, group/2), scales (N, nb), packed zero points (N,
    ceil(nb/2)) or None) in the interleaved layout of rwkvc's Rwkv7MatVecQ16 (op set 7): rows in groups of
    16 (the last padded with zero rows), and for group g, block b, step j of 8 weights, 64 bytes holding
    row r's 4 bytes at 4 r, byte i = code(b G + 8 j + i) | code(b G + 8 j + 4 + i) << 4.
    -> codes (N16, nb, 8 G) uint8, scales (N16, nb, 16) float16, zeros (N16, nb, 8) uint8 (rows 2i in the
    low nibble, 2i + 1 in the high) or an empty array."""
    N, nb, half = packed.shape
    assert half * 2 == group and group % 8 == 0
    N16 = -(-N // 16)
    c = np.zeros((N16 * 16, nb, group), np.uint8)
    c[:N] = unpack_int4(packed)
    c = c.reshape(N16, 16, nb, group // 8, 8)
    b = (c[..., :4] | (c[..., 4:] << 4)).transpose(0, 2, 3, 1, 4)          # (N16, nb, G/8, 16, 4)
    codes = np.ascontiguousarray(b).reshape(N16, nb, 8 * group)
    s = np.zeros((N16 * 16, nb), np.float32)
    s[:N] = scales
    s16 = np.ascontiguousarray(s.reshape(N16, 16, nb).transpose(0, 2, 1)).astype(np.float16)
    if zeros is None:
        return codes, s16, np.zeros(0, np.uint8)
    z = np.zeros((N16 * 16, nb), np.uint8)
    z[:N] = unpack_int4(zeros, nb)
    z = z.reshape(N16, 16, nb).transpose(0, 2, 1)
    return codes, s16, np.ascontiguousarray(z[..., 0::2] | (z[..., 1::2] << 4))


@dataclass
class Int4:
    """W (N, K) in 4-bit groups along K, stored exactly as MatMulNBits reads it:
    packed (N, nb, group/2) uint8, scales (N, nb) float32, zeros (N, ceil(nb/2)) uint8 (4-bit, packed)."""
    packed: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    in_features: int
    group: int
    accuracy_level: int = 4
    kind: ClassVar[str] = "int4"

    def __post_init__(self):
        N, nb = self.scales.shape
        if self.packed.shape != (N, nb, self.group // 2) or nb != -(-self.in_features // self.group):
            raise ValueError(f"Int4: packed {self.packed.shape} / scales {self.scales.shape} do not fit "
                             f"K={self.in_features}, group {self.group}")

    @staticmethod
    def from_codes(codes, scales, zeros, K: int, group: int, accuracy_level: int = 4) -> "Int4":
        N = codes.shape[0]
        nb = scales.shape[1]
        return Int4(pack_int4(codes.reshape(N, nb, group)), np.asarray(scales, np.float32), pack_int4(zeros),
                    K, group, accuracy_level)

    @staticmethod
    def from_dense(w: np.ndarray, group: int, accuracy_level: int = 4) -> "Int4":
        g = effective_group(group, w.shape[1])
        return Int4.from_codes(*quantize_int4(w, g), K=w.shape[1], group=g, accuracy_level=accuracy_level)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.scales.shape[0], self.in_features)

    def codes(self) -> np.ndarray:
        N, nb, _ = self.packed.shape
        return unpack_int4(self.packed).reshape(N, nb * self.group)

    def zero_points(self) -> np.ndarray:
        return unpack_int4(self.zeros, self.scales.shape[1])

    def arrays(self) -> dict[str, np.ndarray]:
        return {"packed": self.packed, "scales": self.scales, "zeros": self.zeros}

    def to_dense(self) -> np.ndarray:
        return dequantize_int4(self.codes(), self.scales, self.zero_points(), self.group, self.in_features)

    def quantized(self, q, name: str):
        return self, False

    def describe(self) -> str:
        return f"int4 {self.shape[0]}x{self.shape[1]} group {self.group}"
