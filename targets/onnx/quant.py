"""The ONNX lowering of the quantised kinds (int8, int4): MatMulNBits, DynamicQuantizeLinear + MatMulInteger,
and, in the fused step, rwkvc's matrix-vector kernels over the interleaved layouts; the products with a
subset of an int8 matrix's rows (sparse FFN, clustered head); the row inputs of the fused kernels.

The weights stay packed in the artifact and in memory; nothing is expanded to float at load time.
"""
from __future__ import annotations

import functools

import numpy as np
from onnx import TensorProto

from rwkvc import ir
from rwkvc.abi import FUSED_DOMAIN
from rwkvc.weights.int4 import Int4, effective_group, interleave16, is_half_exact
from rwkvc.weights.int8 import INT8_BLOCK, U8_ZERO, Int8, interleave16_int8, nbits_codes, u8_codes

from .graph import F32, Graph, f32, to_compute

# ---- which products run on rwkvc's kernels (Rwkv7MatVecQ / Q16 / Q16x8 / Set, op sets 3 and 7)

MATVEC_Q_BLOCKS = (16, 32, 64, 128, 256)


def matvec_fusable(g: Graph, bits: int, block: int, accuracy_level: int, K: int, N: int, step: bool = True) -> bool:
    """Whether a MatMulNBits product of the graph runs on rwkvc's kernels: the fused step with the policy's
    matvec_q, accuracy level 4 (the kernels compute what MatMulNBits computes at that level), blocks they
    read, and matrices of at least policy.matvec_min_k columns or policy.matvec_small weights, where they
    measure faster than ONNX Runtime's (docs/BENCHMARKS.md). 8-bit matrices only in op set 7's interleaved
    layout (policy.matvec_i16): over MatMulNBits' layout ONNX Runtime's 8-bit kernel is as fast or faster,
    over the interleaved one rwkvc's is faster.
    step=False: whether it would in this graph's step (the prefill graph's answer for the matrices the two
    share, which both then read interleaved)."""
    p = g.policy
    return (g.fused and (g.step or not step) and not g.rescale and accuracy_level == 4
            and (bits == 4 or (bits == 8 and p.matvec_i16))
            and block in MATVEC_Q_BLOCKS and (K >= p.matvec_min_k or N * K <= p.matvec_small)
            and p.matvec_q)


def matvec_q(g: Graph, x: str, codes: str, scales: str, zeros: str, bits: int, block: int) -> str:
    """y = W x as one Rwkv7MatVecQ node over MatMulNBits' inputs (the same initializers, stored once for
    the step and the prefill)."""
    return g.op("Rwkv7MatVecQ", f32(g, x), codes, scales, zeros, domain=FUSED_DOMAIN, bits=bits, block=block)


# ---- int8 and int4 matrices


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
    xq, xs, xz = g.op("DynamicQuantizeLinear", f32(g, x), n_out=3)
    acc = g.op("MatMulInteger", xq, g.weight(lin.name + ".q8Tu", u8_codes(w.q.T), np.uint8), xz, u8_zero(g))
    scale = g.op("Mul", xs, g.weight(lin.name + ".q8scale", w.scale, np.float32))
    return to_compute(g, g.op("Mul", g.op("Cast", acc, to=TensorProto.FLOAT), scale))


def int8_spec(w: Int8):
    return (8, effective_group(INT8_BLOCK, w.shape[1])) if w.accuracy_level == 4 else None


def int8_layout16(g: Graph, w: Int8) -> bool:
    """Whether the int8 matrix (accuracy level 4) is stored interleaved for rwkvc's Rwkv7MatVecQ16x8: where
    the step reads it with rwkvc's kernels (matvec_fusable, step or prefill alike, as int4_layout16)."""
    spec = int8_spec(w)
    N, K = w.shape   # (matvec_fusable takes 8-bit products only with policy.matvec_i16)
    return spec is not None and matvec_fusable(g, 8, spec[1], w.accuracy_level, K, N, step=False)


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
    nb = -(-w.shape[1] // B)
    return (g.weight(lin.name + ".q8b", lambda: nbits_codes(w.q, B), np.uint8),   # made once for both graphs
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
        return g.op("Rwkv7MatVecQ16x8", f32(g, x), *int8_inputs16(g, lin), domain=FUSED_DOMAIN,
                    n=int(N), block=int(B), bits=8)
    return g.op("MatMulNBits", x, *int8_nbits_inputs(g, lin, B),
                domain="com.microsoft", K=int(K), N=int(N), bits=8, block_size=int(B),
                accuracy_level=int(w.accuracy_level))


def int4_inputs(g, lin: ir.Linear) -> tuple[str, str, str]:
    """MatMulNBits' inputs for an int4 matrix (also Rwkv7MatVecQ's / Rwkv7MatVecSet's)."""
    w = lin.weight
    return (g.weight(lin.name + ".q4", w.packed, np.uint8), g.weight(lin.name + ".q4scales", w.scales, g.dtype),
            g.weight(lin.name + ".q4zeros", w.zeros, np.uint8))


def int4_spec(w: Int4):
    return (4, int(w.group)) if w.accuracy_level == 4 else None


def int4_layout16(g: Graph, w: Int4) -> bool:
    """Whether the matrix is stored interleaved (interleave16) for rwkvc's Rwkv7MatVecQ16: where the step reads
    it with rwkvc's kernels (matvec_fusable, step or prefill alike: both graphs then read the one
    copy, the prefill through the same op) and its scales are exact in float16 (half_exact)."""
    N, K = w.shape
    return (g.policy.matvec_i16 and matvec_fusable(g, 4, w.group, w.accuracy_level, K, N, step=False)
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
        return g.op("Rwkv7MatVecQ16", f32(g, x), *int4_inputs16(g, lin), domain=FUSED_DOMAIN,
                    n=int(N), block=int(w.group))
    ins = int4_inputs(g, lin)
    if matvec_fusable(g, 4, w.group, w.accuracy_level, K, N):
        return matvec_q(g, x, *ins, 4, w.group)
    return g.op("MatMulNBits", x, *ins, domain="com.microsoft", K=int(K), N=int(N), bits=4, block_size=int(w.group),
                accuracy_level=int(w.accuracy_level))


def rows_matmul_int8(g, lin: ir.Linear, x: str, idx: str) -> str:
    """x (T, in) @ W[idx]ᵀ -> (T, n) reading only rows idx of q: Gather of int8 rows, MatMulInteger."""
    w = lin.weight
    xq, xs, xz = g.op("DynamicQuantizeLinear", f32(g, x), n_out=3)
    rows = g.op("Gather", g.weight(lin.name + ".q8rows", w.q, np.int8), idx, axis=0)          # (n, in)
    acc = g.op("MatMulInteger", xq, as_u8(g, g.op("Transpose", rows, perm=[1, 0])), xz, u8_zero(g))  # (T, n)
    # GatherElements, not Gather: ONNX Runtime's Gather of single floats costs ~9 ns each (~35 us for the ~4k
    # rows of a clustered head), GatherElements ~1 ns
    scale = g.op("Mul", xs, g.op("GatherElements", g.weight(lin.name + ".q8scale", w.scale, np.float32), idx, axis=0))
    return to_compute(g, g.op("Mul", g.op("Cast", acc, to=TensorProto.FLOAT), scale))


def cols_matmul_int8(g, lin: ir.Linear, h: str, idx: str) -> str:
    """h (T, n) @ W[:, idx]ᵀ -> (T, out) reading only rows idx of qᵀ; the per-output-channel scale of W
    applies after the integer product."""
    w = lin.weight
    hq, hs, hz = g.op("DynamicQuantizeLinear", f32(g, h), n_out=3)
    rows = g.op("Gather", g.weight(lin.name + ".q8T_rows", np.ascontiguousarray(w.q.T), np.int8), idx, axis=0)  # (n, out)
    acc = g.op("MatMulInteger", hq, as_u8(g, rows), hz, u8_zero(g))                             # (T, out)
    scale = g.op("Mul", hs, g.weight(lin.name + ".q8scale", w.scale, np.float32))
    return to_compute(g, g.op("Mul", g.op("Cast", acc, to=TensorProto.FLOAT), scale))


# the fused sparse FFN and clustered head read int8 rows (with their scales) or float32 rows
FUSED_ROWS = ("int8", "dense")


def fused_rows(g: Graph, lin: ir.Linear, transposed: bool = False) -> tuple[str, str]:
    """(rows, scale) inputs of a fused op for a dense or int8 matrix W (out, in): the rows of W, or of Wᵀ
    (transposed), under the names the plain graph's row gathers use (stored once for both graphs); an int8
    matrix's per-output-channel scale, or an empty tensor for a float one."""
    w = lin.weight
    if w.kind == "int8":
        q = np.ascontiguousarray(w.q.T) if transposed else w.q
        rows = g.weight(lin.name + (".q8T_rows" if transposed else ".q8rows"), q, np.int8)
        return rows, g.weight(lin.name + ".q8scale", w.scale, F32)
    wt = np.ascontiguousarray(np.asarray(w.w).T) if transposed else w.w
    return g.weight(lin.name + (".wT_rows" if transposed else ".w"), wt, F32), g.const(np.zeros(0, np.float32), F32)
