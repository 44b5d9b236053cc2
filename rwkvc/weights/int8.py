"""`int8`: symmetric per-output-channel 8-bit weights, and the layouts targets store them in.

    quantize_int8(w)          -> q int8 (N, K), scale (N,)      w ~ q * scale[:, None], q in [-127, 127]
    u8_codes(q)               -> uint8 codes q + 128 (MatMulNBits' 8-bit codes, MatMulInteger's uint8 x uint8)
    interleave16_int8(q, s, G) the interleaved layout of rwkvc's Rwkv7MatVecQ16x8 kernel
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

INT8_BLOCK = 128  # MatMulNBits block for int8 matrices: ONNX Runtime's 8-bit kernel is fastest at 128 here

# MatMulInteger takes the int8 weights as uint8 codes q + 128 with zero point 128 (uint8 x uint8): ONNX Runtime's
# uint8 x int8 kernel on x86 CPUs without VNNI sums pairs of products with vpmaddubsw, which saturates at
# 16 bits (255 * 127 * 2 > 32767) and gives logits 10-100 % off on an AVX2-only EPYC; uint8 x uint8 is exact
U8_ZERO = 128   # also MatMulNBits' default zero point for 8-bit codes


BLOCK_ELEMENTS = 1 << 22   # a big matrix is quantised this many weights (whole rows) at a time


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8: w (N, K) ~ q * scale[:, None], q in [-127, 127]. A big w (an array
    or a lazily read one: rwkvc.mapped.LazyArray) is read and quantised by blocks of rows (rows are
    independent: the same result with small temporaries)."""
    N, K = w.shape
    step = max(1, BLOCK_ELEMENTS // max(1, K))
    if N <= step:
        return _quantize_int8(w)
    q, scale = np.empty((N, K), np.int8), np.empty(N, np.float32)
    for a in range(0, N, step):
        q[a:a + step], scale[a:a + step] = _quantize_int8(w[a:a + step])
    return q, scale


def _quantize_int8(w) -> tuple[np.ndarray, np.ndarray]:
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * np.asarray(scale, np.float32)[:, None]


def u8_codes(q: np.ndarray) -> np.ndarray:
    """int8 codes as uint8 codes q + 128 (C-contiguous): the sign bit flipped (two's complement), with no
    16-bit temporaries (a big head's codes are hundreds of MB)."""
    return np.bitwise_xor(np.ascontiguousarray(q, np.int8).view(np.uint8), np.uint8(0x80))


def interleave16_int8(q: np.ndarray, scale: np.ndarray, group: int):
    """An Int8 matrix (q int8 (N, K), scale (N,)) in the interleaved layout of rwkvc's Rwkv7MatVecQ16x8 (op set
    7): uint8 codes q + 128 (MatMulNBits' 8-bit codes) with K padded to whole blocks of `group`, rows in
    groups of 16 (the last padded), and for group g, block b, step j of 4 weights, 64 bytes holding row r's
    codes b G + 4 j .. + 3 at 4 r. -> codes (N16, nb, 16 G) uint8, scales (N16, 16) float32 (one a row),
    an empty zero-point array (the zero point is 128)."""
    N, K = q.shape
    nb = -(-K // group)
    N16 = -(-N // 16)
    c = np.full((N16 * 16, nb * group), U8_ZERO, np.uint8)
    c[:N, :K] = u8_codes(q)
    codes = np.ascontiguousarray(c.reshape(N16, 16, nb, group // 4, 4).transpose(0, 2, 3, 1, 4)).reshape(N16, nb, 16 * group)
    s = np.zeros(N16 * 16, np.float32)
    s[:N] = scale
    return codes, s.reshape(N16, 16), np.zeros(0, np.uint8)


def nbits_codes(q: np.ndarray, block: int) -> np.ndarray:
    """MatMulNBits(bits=8)'s codes: q + 128 (the operator's default zero point) in blocks of `block` along K,
    the tail padded with the zero point -> (N, nb, block) uint8."""
    N, K = q.shape
    nb = -(-K // block)
    c = np.full((N, nb * block), U8_ZERO, np.uint8)
    c[:, :K] = u8_codes(q)
    return c.reshape(N, nb, block)


@dataclass
class Int8:
    """W (N, K) ~ q * scale[:, None]; q int8 (N, K), scale float32 (N,).

    accuracy_level (how the cpu target computes with it): 4 = com.microsoft MatMulNBits with 8-bit
    blocks (the per-channel scale repeated per block; ONNX Runtime quantises the activations to int8 per
    block inside the kernel: the fastest on x86); 0 = DynamicQuantizeLinear + MatMulInteger (per-tensor
    uint8 activations, int32 accumulation: plain ONNX integer math that other runtimes reproduce exactly)."""
    q: np.ndarray
    scale: np.ndarray
    accuracy_level: int = 4
    kind: ClassVar[str] = "int8"

    @staticmethod
    def from_dense(w: np.ndarray, accuracy_level: int = 4) -> "Int8":
        return Int8(*quantize_int8(w), accuracy_level=accuracy_level)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"q": self.q, "scale": self.scale}

    def to_dense(self) -> np.ndarray:
        return dequantize_int8(self.q, self.scale)

    def quantized(self, q, name: str):
        return self, False

    def describe(self) -> str:
        return f"int8 {self.q.shape[0]}x{self.q.shape[1]} per-channel (accuracy level {self.accuracy_level})"
