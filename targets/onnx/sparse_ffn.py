"""A channel-mix with activation-sparsity predictors (RWKV-Lite's SparseFFN) in ONNX: the predictors' mask,
then only the fired units' rows of the key matrix and of the transposed value matrix (a row gather), or,
with rwkvc's fused kernels, one Rwkv7SparseFfn(Q) node that reads them from the mapped weights."""
from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto, helper

from rwkvc import ir
from rwkvc.abi import FUSED_DOMAIN
from rwkvc.weights.sparse import pack_codes, pack_codes16

from . import kinds
from .graph import F32, Graph, f32, to_compute
from .quant import FUSED_ROWS, fused_rows


def mlp_predictor(g: Graph, sp: ir.SparseFFN, p: str, plain: bool):
    """The MLP predictor's inputs. plain: [fc1T (C, D), fc2T (D, F)] in the compute dtype (an int8 predictor
    dequantised by DequantizeLinear: the same values); else the fused kernel's, float32 fc1T and fc2T, or
    for an int8 predictor (fc1_scale / fc2_scale) [fc1T codes, fc1 scale, fc2T codes, fc2 scale]. Stored once
    for both graphs."""
    if sp.fc1_scale is None:
        dt = None if plain else F32
        return [g.weight(p + "mlp.fc1T", sp.fc1.T, dt), g.weight(p + "mlp.fc2T", sp.fc2.T, dt)]
    q1, q2 = sp.fc_codes()
    ins = [g.weight(p + "mlp.fc1T.q8", q1.T, np.int8), g.weight(p + "mlp.fc1.scale", sp.fc1_scale, F32),
           g.weight(p + "mlp.fc2T.q8", q2.T, np.int8), g.weight(p + "mlp.fc2.scale", sp.fc2_scale, F32)]
    if not plain:
        return ins
    return [to_compute(g, g.op("DequantizeLinear", q, s, axis=1)) for q, s in (ins[:2], ins[2:])]


def sparse_ffn_fusable(g: Graph, ffn: ir.ChannelMix) -> bool:
    K, Vl = ffn.lin["key"], ffn.lin["value"]
    return g.fused and not g.rescale and K.kind == Vl.kind and K.kind in FUSED_ROWS


def emit_sparse_ffn_fused(g: Graph, ffn: ir.ChannelMix, xk: str, p: str) -> str:
    """The step's sparse FFN as one Rwkv7SparseFfn node: the predictors, then only the fired units' rows of
    the key matrix and of the transposed value matrix, read from the mapped weights (no gathers, no index
    bookkeeping: ~20 ONNX Runtime kernels become one). The same units fire as in emit_sparse_ffn, and int8
    rows meet 8-bit activations made as its DynamicQuantizeLinear makes them (the TVM targets' numbers)."""
    sp, K, Vl = ffn.sparse, ffn.lin["key"], ffn.lin["value"]
    F = K.out_features
    v6 = sp.fc1 is None or sp.fc1_scale is not None   # op set 6's Rwkv7SparseFfnQ, else a float32 MLP (v2)
    if sp.fc1 is not None:
        pred = mlp_predictor(g, sp, p, plain=False)
    else:
        pred = [g.const(np.zeros(0, np.int8), np.int8), g.const(np.zeros(0, np.float32), F32)] * 2
    attrs = {"mlp_threshold": float(sp.mlp_threshold)} if sp.fc1 is not None else {}
    if sp.q_codes is not None:
        bits = next(b for b in (1, 2, 4, 8) if b >= sp.q_bits)
        if v6 and bits == 1:
            codes = g.weight(p + "key.q1bit16", pack_codes16(sp.q_codes), np.uint8)
        else:
            codes = g.weight(p + f"key.q{bits}bit", pack_codes(sp.q_codes, bits), np.uint8)
        attrs.update(q_scale=float(sp.q_scale), q_lo=int(math.floor(sp.q_quantile * (F - 1))), q_bits=bits)
    else:
        codes = g.const(np.zeros(0, np.uint8), np.uint8)
    kr, ks = fused_rows(g, K)
    vr, vs = fused_rows(g, Vl, transposed=True)
    op = ("Rwkv7SparseFfnQ" if v6 else "Rwkv7SparseFfn") + ("" if K.kind == "int8" else "F32")
    return g.op(op, f32(g, xk), *pred, codes, kr, ks, vr, vs, domain=FUSED_DOMAIN, **attrs)


def code_storage_bits(bits: int) -> int:
    """Bits per code in code_matmul's packing: 4 for codes of up to 4 bits (ONNX Runtime's float32 MatMulNBits
    kernel is fast only for 4-bit weights: its 2-bit accuracy_level-0 path took ~0.13 ms for a 512x128
    predictor against ~5 us for 4-bit), 8 above."""
    return 4 if bits <= 4 else 8


def code_matmul(g: Graph, name: str, codes: np.ndarray, bits: int, scale: float, x: str) -> str:
    """x (T, C) float32 @ (scale * codes)ᵀ with codes (F, C) small unsigned integers, kept packed: one
    MatMulNBits with code_storage_bits(bits) per code, zero point 0, `scale` in every block. A 1-bit key
    copy costs C/2 bytes per row instead of 4C."""
    F, C = codes.shape
    nbits = code_storage_bits(bits)
    block = 16
    while block < min(C, 128):
        block *= 2
    nb, per = -(-C // block), 8 // nbits
    c = np.zeros((F, nb * block), np.uint8)
    c[:, :C] = codes
    packed = pack_codes(c, nbits).reshape(F, nb, block // per)
    return g.op("MatMulNBits", x, g.weight(name + "codes", packed, np.uint8),
                g.weight(name + "scales", np.full((F, nb), scale, np.float32), F32),
                g.weight(name + "zeros", np.zeros((F, -(-nb * nbits // 8)), np.uint8), np.uint8),
                # accuracy_level 0: float32 activations. Level 4 quantises x to int8, which moves est enough to
                # flip units across the quantile threshold (RWKV-Lite parity: 0.09 logit error vs 1e-6)
                domain="com.microsoft", K=int(C), N=int(F), bits=nbits, block_size=block, accuracy_level=0)


def sparse_ffn_mask(g: Graph, sp: ir.SparseFFN, xk: str, F: int, p: str) -> str:
    """Which hidden units each token uses: (T, F) bool = mlp predictor | quantised-key predictor."""
    masks = []
    if sp.fc1 is not None:
        fc1T, fc2T = mlp_predictor(g, sp, p, plain=True)
        h = g.op("Relu", g.op("Gemm", xk, fc1T))                                          # one FusedGemm in ORT
        # ONNX Runtime rewrites DequantizeLinear -> MatMul into an 8-bit MatMulNBits, of accuracy level 0
        # (float32 activations, the IR's numbers) under rwkvc's session options (runtimes.onnxruntime)
        logit = f32(g, g.op("MatMul", h, fc2T))
        masks.append(g.op("Greater", g.op("Sigmoid", logit), g.const(sp.mlp_threshold, F32)))
    if sp.q_codes is not None:
        # est = q_scale * (xk @ codes^T) + q_zero * sum(xk) > quantile(est, q) per row, with torch.quantile's
        # linear interpolation between the sorted values s[lo] <= thr <= s[lo + 1]. No est lies strictly
        # between two neighbours of the sorted order, so est > thr <=> est > s[lo] (up to thr rounding onto
        # s[lo + 1] when the two are an ulp apart), and s[lo] is the (F - lo)-th largest, found by a partial
        # TopK. The q_zero * sum(xk) term shifts every est of a token alike, so it cannot change the order and
        # is left out; the codes stay packed (code_matmul).
        est = code_matmul(g, p + "key.q", sp.q_codes, sp.q_bits, sp.q_scale, f32(g, xk))   # (T, F)
        lo = int(math.floor(sp.q_quantile * (F - 1)))
        top, _ = g.op("TopK", est, g.const([F - lo]), axis=-1, largest=1, sorted=1, n_out=2)   # (T, F - lo) desc
        masks.append(g.op("Greater", est, g.op("Gather", top, g.const([F - lo - 1]), axis=-1)))   # est > s[lo]
    return masks[0] if len(masks) == 1 else g.op("Or", masks[0], masks[1])


def emit_sparse_ffn(g: Graph, ffn: ir.ChannelMix, xk: str, p: str, prefill: bool = True) -> str:
    """The FFN computed only where the predictors say a unit fires.

        xk (T,C) ─┬─ predictors ─► mask (T,F) ──────────────┬─ any over T ─► NonZero ─► idx (n,)
                  │                                          └─ Gather(idx) ─► m (T,n)
                  └─ Gemm(xk, Gather(K, idx)ᵀ) ─► relu² ─► * m ─► MatMul(·, Gather(Vᵀ, idx)) ─► (T,C)

    Only the n used rows of K (F, C) and of Vᵀ (F, C) are read. In the step graph (T = 1, prefill False)
    the one token uses every unit of idx, so neither the any over T nor m is needed. Non-dense key/value
    fall back to the dense product times the mask (same result, no saving)."""
    sp, K, Vl = ffn.sparse, ffn.lin["key"], ffn.lin["value"]
    F = K.out_features
    mask = sparse_ffn_mask(g, sp, xk, F, p)
    if K.kind not in kinds.ROWS_MATMUL or Vl.kind not in kinds.COLS_MATMUL:
        maskf = g.op("Cast", mask, to=helper.np_dtype_to_tensor_dtype(g.dtype))          # (T, F)
        k = g.op("Relu", kinds.linear(g, K, xk))
        return kinds.linear(g, Vl, g.op("Mul", g.op("Mul", k, k), maskf))
    if prefill:
        used = g.op("ReduceMax", g.op("Cast", mask, to=TensorProto.INT32), g.const([0]), keepdims=0)   # (F,)
    else:
        used = g.op("Reshape", mask, g.const([-1]))                                       # (F,) bool
    idx = g.op("Reshape", g.op("NonZero", used), g.const([-1]))                           # (n,)
    k = g.op("Relu", kinds.ROWS_MATMUL[K.kind](g, K, xk, idx))                                  # (T, n)
    h = g.op("Mul", k, k)
    if prefill:
        maskf = g.op("Cast", mask, to=helper.np_dtype_to_tensor_dtype(g.dtype))          # (T, F)
        h = g.op("Mul", h, g.op("Gather", maskf, idx, axis=1))
    s = g.rescale.get(Vl.name, 1.0)
    if s != 1.0:
        h = g.op("Mul", h, g.const(1.0 / s))
    return kinds.COLS_MATMUL[Vl.kind](g, Vl, h, idx)                                            # (T, C)
