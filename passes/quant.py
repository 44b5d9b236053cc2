"""`int8` and `int4`: weight-only quantisation of every matrix (the head and low-rank factors included).

Weight math (plain functions, NumPy references next to them):

    quantize_int8(w)          -> q int8 (N, K), scale (N,)           w ~ q * scale[:, None]   (per output channel)
    quantize_int4(w, group)   -> codes uint8 (N, Kp) in 0..15, scales (N, nb), zeros (N, nb)
                                 w[n, k] ~ (codes[n, k] - zeros[n, k // g]) * scales[n, k // g]   (group-wise)
    pack_int4 / unpack_int4      two codes per byte, low nibble first: ONNX Runtime's MatMulNBits layout

IR representations (registered weight kinds) and their ONNX lowering on `cpu`:

    Int8      "int8"      accuracy_level 4 (default): com.microsoft MatMulNBits (bits 8, blocks of 128 along K,
                          codes q + 128, the row's scale per block); ONNX Runtime quantises the activation to
                          int8 per block inside the kernel (faster decode than the level-0 form here: docs/BENCHMARKS.md).
                          accuracy_level 0: DynamicQuantizeLinear(x) -> MatMulInteger(x_u8, q_i8) -> * (x_scale
                          * scale) (fused into DynamicQuantizeMatMul), integer math any runtime reproduces exactly
    Int4      "int4"      com.microsoft MatMulNBits (bits 4, block = group; accuracy_level 4 quantises the
                          activation to int8 per block and runs integer dot products on the 4-bit weights)
    Factored  "factored"  W ~ B act(A x) (+ diag x) with A and B any representation: a quantised ir.LowRank

The weights stay packed in the artifact and in memory; nothing is expanded to float at load time.
Calibration-based variants (method=awq / gptq) live in passes/calib_quant.py and produce the same kinds.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from onnx import TensorProto

from rwkvc import emit_onnx, ir
from rwkvc.errors import RwkvcError

from . import Param, register
from .common import check_layers, check_selector, fmt_bytes, nbytes, selected

# ----------------------------------------------------------------------------------------------
# weight math


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8: w (N, K) ~ q * scale[:, None], q in [-127, 127]."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * np.asarray(scale, np.float32)[:, None]


def effective_group(group: int, K: int) -> int:
    """The block size used for a matrix with K inputs: `group`, or the smallest power of two >= 16 that
    covers K when K is smaller (a 32-wide low-rank factor is not padded to 128)."""
    g = 16
    while g < K and g < group:
        g *= 2
    return min(group, g)


def quantize_int4(w: np.ndarray, group: int, scales: np.ndarray | None = None,
                  zeros: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric group-wise 4-bit (round to nearest). w (N, K) -> codes (N, Kp) uint8 in 0..15,
    scales (N, nb) float32, zeros (N, nb) uint8, with nb = ceil(K / group) and Kp = nb * group (the
    padding columns hold the zero point, i.e. dequantise to 0). Given scales/zeros are used as they are."""
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


F16_MAX = 65504.0


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


def interleave16(packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, group: int):
    """An Int4 matrix (MatMulNBits' packed (N, nb, group/2), scales (N, nb), packed zero points (N,
    ceil(nb/2)) or None) in the interleaved layout of rwkvc's Rwkv7MatVecQ16 (op set 7, native/ort_ops.cc):
    rows in groups of 16 (the last padded with zero rows), and for group g, block b, step j of 8 weights, 64
    bytes holding row r's 4 bytes at 4 r, byte i = code(b G + 8 j + i) | code(b G + 8 j + 4 + i) << 4.
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


# ----------------------------------------------------------------------------------------------
# representations


@ir.register_weight_kind
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

    def describe(self) -> str:
        return f"int8 {self.q.shape[0]}x{self.q.shape[1]} per-channel (accuracy level {self.accuracy_level})"


@ir.register_weight_kind
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

    def describe(self) -> str:
        return f"int4 {self.shape[0]}x{self.shape[1]} group {self.group}"


@ir.register_weight_kind
@dataclass
class Factored(ir.TwoFactors):
    """W ~ B act(A x) (+ diag * x), A (rank, in) and B (out, rank) any weight representations
    (a low-rank matrix whose factors were quantised)."""
    a: object
    b: object
    act: str | None = None
    diag: np.ndarray | None = None
    kind: ClassVar[str] = "factored"

    def __post_init__(self):
        self.check_factors()

    def arrays(self) -> dict[str, np.ndarray]:
        d = {"a." + k: v for k, v in self.a.arrays().items()}
        d.update({"b." + k: v for k, v in self.b.arrays().items()})
        if self.diag is not None:
            d["diag"] = self.diag
        return d

    def to_dense(self) -> np.ndarray:
        if self.act is not None:
            raise ValueError("a Factored matrix with an activation has no dense equivalent")
        w = self.b.to_dense() @ self.a.to_dense()
        if self.diag is not None:
            w = w + np.diag(np.asarray(self.diag, np.float32))
        return w

    def describe(self) -> str:
        extra = (f" act={self.act}" if self.act else "") + (" +diag" if self.diag is not None else "")
        return f"factored {self.shape[0]}x{self.shape[1]} rank {self.rank}{extra} (a: {self.a.describe()}, b: {self.b.describe()})"


def apply(rep, x: np.ndarray) -> np.ndarray:
    """NumPy reference of y = W x for any representation this module knows (x (..., in) -> (..., out))."""
    if rep.kind in ("lowrank", "factored"):
        a = rep.a if rep.kind == "factored" else ir.Dense(rep.a)
        b = rep.b if rep.kind == "factored" else ir.Dense(rep.b)
        h = apply(a, x)
        if rep.act in ("relu", "relu2"):
            h = np.maximum(h, 0)
            if rep.act == "relu2":
                h = h * h
        y = apply(b, h)
        return y + x * rep.diag if rep.diag is not None else y
    return x @ rep.to_dense().T


# ----------------------------------------------------------------------------------------------
# ONNX lowering (cpu target)


def _to_f32(g, x):
    return x if g.dtype == np.float32 else g.op("Cast", x, to=TensorProto.FLOAT)


def _from_f32(g, y):
    return y if g.dtype == np.float32 else g.op("Cast", y, to=emit_onnx.helper.np_dtype_to_tensor_dtype(g.dtype))


INT8_BLOCK = 128  # MatMulNBits block for int8 matrices: ONNX Runtime's 8-bit kernel is fastest at 128 here


# MatMulInteger takes the int8 weights as uint8 codes q + 128 with zero point 128 (uint8 x uint8): ONNX Runtime's
# uint8 x int8 kernel on x86 CPUs without VNNI sums pairs of products with vpmaddubsw, which saturates at
# 16 bits (255 * 127 * 2 > 32767) and gave logits 10-100 % off on an AVX2-only EPYC; uint8 x uint8 is exact
U8_ZERO = 128   # also MatMulNBits' default zero point for 8-bit codes


def u8_codes(q: np.ndarray) -> np.ndarray:
    """int8 codes as uint8 codes q + 128 (C-contiguous)."""
    return np.ascontiguousarray(q.astype(np.int16) + U8_ZERO, np.uint8)


def u8_zero(g) -> str:
    return g.const(U8_ZERO, np.uint8)


def as_u8(g, q: str) -> str:
    """int8 codes (gathered rows) as MatMulInteger's uint8 codes q + 128 (exact through int16)."""
    return g.op("Cast", g.op("Add", g.op("Cast", q, to=TensorProto.INT16), g.const(U8_ZERO, np.int16)),
                to=TensorProto.UINT8)


def emit_int8(g, lin: ir.Linear, x: str) -> str:
    w = lin.weight
    if w.accuracy_level:
        return emit_int8_nbits(g, lin, x)
    xq, xs, xz = g.op("DynamicQuantizeLinear", _to_f32(g, x), n_out=3)
    acc = g.op("MatMulInteger", xq, g.weight(lin.name + ".q8Tu", u8_codes(w.q.T), np.uint8), xz, u8_zero(g))
    scale = g.op("Mul", xs, g.weight(lin.name + ".q8scale", w.scale, np.float32))
    return _from_f32(g, g.op("Mul", g.op("Cast", acc, to=TensorProto.FLOAT), scale))


def int8_spec(w: "Int8"):
    return (8, effective_group(INT8_BLOCK, w.shape[1])) if w.accuracy_level == 4 else None


def int8_layout16(g, w: "Int8") -> bool:
    """Whether the int8 matrix (accuracy level 4) is stored interleaved for rwkvc's Rwkv7MatVecQ16x8: where
    the step reads it with rwkvc's kernels (emit_onnx.matvec_fusable, step or prefill alike, as int4_layout16)."""
    spec = int8_spec(w)
    N, K = w.shape   # (matvec_fusable takes 8-bit products only with emit_onnx.MATVEC_I16)
    return spec is not None and emit_onnx.matvec_fusable(g, 8, spec[1], w.accuracy_level, K, N, step=False)


def int8_inputs16(g, lin: ir.Linear) -> tuple[str, str, str]:
    """Rwkv7MatVecQ16x8's inputs for an int8 matrix (also Rwkv7MatVecSet's, layout 1, bits 8)."""
    w = lin.weight
    lay = functools.cache(lambda: interleave16_int8(w.q, w.scale, int8_spec(w)[1]))   # once for both graphs
    return (g.weight(lin.name + ".q8i", lambda: lay()[0], np.uint8),
            g.weight(lin.name + ".q8iscale", lambda: lay()[1], np.float32),
            g.weight(lin.name + ".q8izeros", lambda: lay()[2], np.uint8))


def int8_nbits_inputs(g, lin: ir.Linear, B: int) -> tuple[str, str]:
    """MatMulNBits(bits=8)'s inputs: codes q + 128 (the operator's default zero point) in blocks of B along
    K (the tail padded with the zero point), each row's scale repeated per block."""
    w = lin.weight
    N, K = w.shape
    nb = -(-K // B)

    def codes():   # (made once: the prefill graph finds the step's)
        c = np.full((N, nb * B), U8_ZERO, np.uint8)
        c[:, :K] = u8_codes(w.q)
        return c.reshape(N, nb, B)
    return (g.weight(lin.name + ".q8b", codes, np.uint8),
            g.weight(lin.name + ".q8bscales", lambda: np.repeat(np.asarray(w.scale, np.float32)[:, None], nb, axis=1),
                     g.dtype))


def emit_int8_nbits(g, lin: ir.Linear, x: str) -> str:
    """The int8 matrix as MatMulNBits(bits=8) (int8_nbits_inputs), or, where rwkvc's kernels read it
    (int8_layout16), as Rwkv7MatVecQ16x8 over the interleaved layout. The same numbers re-laid out, never
    expanded to float."""
    w = lin.weight
    N, K = w.shape
    B = effective_group(INT8_BLOCK, K)
    if int8_layout16(g, w):
        return g.op("Rwkv7MatVecQ16x8", emit_onnx.f32(g, x), *int8_inputs16(g, lin), domain=emit_onnx.FUSED_DOMAIN,
                    n=int(N), block=int(B), bits=8)
    return g.op("MatMulNBits", x, *int8_nbits_inputs(g, lin, B),
                domain="com.microsoft", K=int(K), N=int(N), bits=8, block_size=int(B),
                accuracy_level=int(w.accuracy_level))


def int4_inputs(g, lin: ir.Linear) -> tuple[str, str, str]:
    """MatMulNBits' inputs for an int4 matrix (also Rwkv7MatVecQ's / Rwkv7MatVecSet's)."""
    w = lin.weight
    return (g.weight(lin.name + ".q4", w.packed, np.uint8), g.weight(lin.name + ".q4scales", w.scales, g.dtype),
            g.weight(lin.name + ".q4zeros", w.zeros, np.uint8))


def int4_spec(w: "Int4"):
    return (4, int(w.group)) if w.accuracy_level == 4 else None


def int4_layout16(g, w: "Int4") -> bool:
    """Whether the matrix is stored interleaved (interleave16) for rwkvc's Rwkv7MatVecQ16: where the step reads
    it with rwkvc's kernels (emit_onnx.matvec_fusable, step or prefill alike: both graphs then read the one
    copy, the prefill through the same op) and its scales are exact in float16 (half_exact)."""
    N, K = w.shape
    return (emit_onnx.MATVEC_I16 and emit_onnx.matvec_fusable(g, 4, w.group, w.accuracy_level, K, N, step=False)
            and is_half_exact(w.scales))


def int4_inputs16(g, lin: ir.Linear) -> tuple[str, str, str]:
    """Rwkv7MatVecQ16's inputs for an int4 matrix (also Rwkv7MatVecSet's, layout 1)."""
    w = lin.weight
    lay = functools.cache(lambda: interleave16(w.packed, w.scales, w.zeros, w.group))   # once for both graphs
    return (g.weight(lin.name + ".q4i", lambda: lay()[0], np.uint8),
            g.weight(lin.name + ".q4iscales", lambda: lay()[1], np.float16),
            g.weight(lin.name + ".q4izeros", lambda: lay()[2], np.uint8))


def emit_int4(g, lin: ir.Linear, x: str) -> str:
    w = lin.weight
    N, K = w.shape
    if int4_layout16(g, w):
        return g.op("Rwkv7MatVecQ16", emit_onnx.f32(g, x), *int4_inputs16(g, lin), domain=emit_onnx.FUSED_DOMAIN,
                    n=int(N), block=int(w.group))
    ins = int4_inputs(g, lin)
    if emit_onnx.matvec_fusable(g, 4, w.group, w.accuracy_level, K, N):
        return emit_onnx.matvec_q(g, x, *ins, 4, w.group)
    return g.op("MatMulNBits", x, *ins, domain="com.microsoft", K=int(K), N=int(N), bits=4, block_size=int(w.group),
                accuracy_level=int(w.accuracy_level))


def emit_factored(g, lin: ir.Linear, x: str) -> str:
    f = lin.weight
    h = emit_onnx.linear(g, ir.Linear(lin.name + ".a", f.a), x)
    if f.act in ("relu", "relu2"):
        h = g.op("Relu", h)
        if f.act == "relu2":
            h = g.op("Mul", h, h)
    y = emit_onnx.linear(g, ir.Linear(lin.name + ".b", f.b), h)
    if f.diag is not None:
        y = g.op("Add", y, g.op("Mul", x, g.weight(lin.name + ".diag", f.diag)))
    return y


def rows_matmul_int8(g, lin: ir.Linear, x: str, idx: str) -> str:
    """x (T, in) @ W[idx]ᵀ -> (T, n) reading only rows idx of q: Gather of int8 rows, MatMulInteger."""
    w = lin.weight
    xq, xs, xz = g.op("DynamicQuantizeLinear", _to_f32(g, x), n_out=3)
    rows = g.op("Gather", g.weight(lin.name + ".q8rows", w.q, np.int8), idx, axis=0)          # (n, in)
    acc = g.op("MatMulInteger", xq, as_u8(g, g.op("Transpose", rows, perm=[1, 0])), xz, u8_zero(g))  # (T, n)
    # GatherElements, not Gather: ONNX Runtime's Gather of single floats costs ~9 ns each (~35 us for the ~4k
    # rows of a clustered head), GatherElements ~1 ns
    scale = g.op("Mul", xs, g.op("GatherElements", g.weight(lin.name + ".q8scale", w.scale, np.float32), idx, axis=0))
    return _from_f32(g, g.op("Mul", g.op("Cast", acc, to=TensorProto.FLOAT), scale))


def cols_matmul_int8(g, lin: ir.Linear, h: str, idx: str) -> str:
    """h (T, n) @ W[:, idx]ᵀ -> (T, out) reading only rows idx of qᵀ; the per-output-channel scale of W
    applies after the integer product."""
    w = lin.weight
    hq, hs, hz = g.op("DynamicQuantizeLinear", _to_f32(g, h), n_out=3)
    rows = g.op("Gather", g.weight(lin.name + ".q8T_rows", np.ascontiguousarray(w.q.T), np.int8), idx, axis=0)  # (n, out)
    acc = g.op("MatMulInteger", hq, as_u8(g, rows), hz, u8_zero(g))                             # (T, out)
    scale = g.op("Mul", hs, g.weight(lin.name + ".q8scale", w.scale, np.float32))
    return _from_f32(g, g.op("Mul", g.op("Cast", acc, to=TensorProto.FLOAT), scale))


emit_onnx.LINEAR_EMITTERS["int8"] = emit_int8
# level 0 and the gathered-row products (sparse FFN, clustered head) quantise x per tensor
emit_onnx.ROWS_COUPLED["int8"] = lambda w, in_sparse_ffn: in_sparse_ffn or w.accuracy_level == 0
emit_onnx.LINEAR_EMITTERS["int4"] = emit_int4
emit_onnx.NBITS["int4"] = (int4_spec, int4_inputs, int4_layout16, int4_inputs16)
# int8 joins a set only interleaved (emit_onnx.matvec_fusable: 8-bit products need MATVEC_I16)
emit_onnx.NBITS["int8"] = (int8_spec, None, int8_layout16, int8_inputs16)
emit_onnx.LINEAR_EMITTERS["factored"] = emit_factored
emit_onnx.ROWS_MATMUL["int8"] = rows_matmul_int8
emit_onnx.COLS_MATMUL["int8"] = cols_matmul_int8


# ----------------------------------------------------------------------------------------------
# the passes


METHODS = ("rtn", "awq", "gptq")


def quantizer(bits: int, args: dict, calib=None):
    """-> fn(name, w (N, K) float32, x_stats) -> representation. calib: passes.calib_quant statistics."""
    method = args.get("method", "rtn")
    acc = args.get("accuracy_level", 4)
    if bits == 8:
        acc = 4 if acc == 4 else 0   # int8 has levels 0 and 4; an int4 pass's rows quantiser passes 0/1/4
        if method == "rtn":
            return lambda name, w: Int8.from_dense(w, acc)
    else:
        group = args["group"]
        if method == "rtn":
            return lambda name, w: Int4.from_dense(w, group, acc)
    from . import calib_quant
    make = calib_quant.make_quantizer(bits, args, calib)
    if bits == 4:
        return make

    def with_level(*a):
        rep = make(*a)
        return dataclasses.replace(rep, accuracy_level=acc) if rep.kind == "int8" else rep
    return with_level


def quantize_rep(rep, q, name: str):
    """Quantise one representation with q(name, w); returns (new rep, changed?)."""
    if rep.kind == "dense":
        return q(name, np.asarray(rep.w, np.float32)), True
    if rep.kind == "lowrank":
        a = q(name + ".a", np.asarray(rep.a, np.float32))
        b = q(name + ".b", np.asarray(rep.b, np.float32))
        return Factored(a, b, rep.act, rep.diag), True
    if rep.kind == "factored":
        a, ca = quantize_rep(rep.a, q, name + ".a")
        b, cb = quantize_rep(rep.b, q, name + ".b")
        return (Factored(a, b, rep.act, rep.diag), True) if (ca or cb) else (rep, False)
    if rep.kind == "clustered":
        from .hhead import quantize_clustered
        return quantize_clustered(rep, q, name)
    if rep.kind.startswith("int"):
        return rep, False
    return rep, False


class QuantPass:
    """Matrices already quantised are left alone, so int8 and int4 combine: "int8(targets=head),int4"."""
    requires = ()
    forbids_after: tuple[str, ...] = ()

    def __init__(self, bits: int):
        self.bits = bits
        self.name = f"int{bits}"
        self.params = {
            "targets": Param(str, "all", check_selector, "a selector such as all, att+ffn, head (see docs/COMPRESSION.md)"),
            "layers": Param(str, "all", check_layers, "all, or block numbers/ranges joined by '+', e.g. 0-3+7"),
            "method": Param(str, "rtn", lambda v: v in METHODS, "one of " + ", ".join(METHODS)),
        }
        if bits == 4:
            # 128 by default: ONNX Runtime's MatMulNBits decoded faster at 128 than at 32 in two of the three
            # 0.1B runs in docs/BENCHMARKS.md, at +0.15 % vs +0.08 % perplexity on the demo (docs/COMPRESSION.md)
            self.params["group"] = Param(int, 128, lambda v: v in (16, 32, 64, 128, 256), "16, 32, 64, 128 or 256")
            self.params["accuracy_level"] = Param(int, 4, lambda v: v in (0, 1, 4),
                                                  "0 (float activations) or 4 (int8 activations, fastest)")
        else:
            self.params["accuracy_level"] = Param(int, 4, lambda v: v in (0, 4),
                                                  "4 (MatMulNBits, int8 activations per block, fastest) or 0 "
                                                  "(DynamicQuantizeLinear + MatMulInteger, plain ONNX)")

    @staticmethod
    def needs_calibration(args: dict) -> bool:
        return args.get("method", "rtn") != "rtn"

    def run(self, model: ir.Model, args: dict, ctx) -> tuple[ir.Model, dict]:
        calib = None
        if args.get("method", "rtn") != "rtn":
            from . import calib_quant
            calib = calib_quant.collect(model, args, ctx)
        q = quantizer(self.bits, args, calib)
        # matrices read row by row (sparse FFNs, clustered heads' rows) are int8: ONNX Runtime has no fast
        # kernel for gathered int4 rows (GatherBlockQuantized measured ~10x slower than MatMulNBits)
        q_rows = q if self.bits == 8 else quantizer(8, {**args, "method": "gptq" if args["method"] == "gptq" else "rtn"}, calib)
        sparse = {id(blk.ffn.lin) for blk in model.blocks if blk.ffn.sparse is not None}
        changed, before, after = [], 0, 0
        for place, container, key, lin in list(selected(model, args["targets"], args["layers"])):
            qq = q_rows if (container is not None and id(container) in sparse) else q
            new, did = quantize_rep(lin.weight, qq, lin.name) if lin.kind != "clustered" else \
                quantize_rep(lin.weight, (q, q_rows), lin.name)
            if not did:
                continue
            before += nbytes(lin.weight)
            after += nbytes(new)
            changed.append(lin.name)
            if container is None:
                model.head = ir.Linear(lin.name, new)
            else:
                container[key] = ir.Linear(lin.name, new)
        if not changed:
            raise RwkvcError(f"pass {self.name}: no matrix to quantise (targets={args['targets']!r}, "
                             f"layers={args['layers']!r}); they may already be quantised")
        what = f"group {args['group']}, " if self.bits == 4 else "per-channel, "
        summary = (f"{len(changed)} matrices to int{self.bits} ({what}{args['method']}): "
                   f"{fmt_bytes(before)} -> {fmt_bytes(after)} ({before / max(after, 1):.2f}x)")
        return model, {"matrices": len(changed), "bytes_before": before, "bytes_after": after,
                       "names": changed if len(changed) <= 64 else changed[:64] + ["..."],
                       **({"calibration": calib.summary()} if calib is not None else {}), "summary": summary}


INT8 = register(QuantPass(8))
INT4 = register(QuantPass(4))
