"""The sparse FFN of RWKV-Lite in the TVM lowering: the activation predictors' mask, and the channel-mix
that reads only the used units' rows of key and value.T (where both are kinds of ROW_LOWERINGS; other
kinds take the full product times the mask, in the v7 block)."""
from __future__ import annotations

import math

import numpy as np

from rwkvc import ir

from .base import F32, KernelShape, relax
from .context import Ctx
from .kinds import ROW_LOWERINGS
from .params import code_bits, pack_codes, pack_panels
from .sparse_kernels import quantile_mask_kernel, sparse_cols_kernel, sparse_rows_kernel


def predictor_params(sp: ir.SparseFFN, ks: KernelShape) -> list[tuple[str, np.ndarray]]:
    """The predictors' arrays (names under ffn.sparse.): the MLP's packed panels, the key's packed codes."""
    out = []
    if sp.fc1 is not None:
        out += [("fc1p", pack_panels(sp.fc1, ks.panel, ks.weights)), ("fc2p", pack_panels(sp.fc2, ks.panel, ks.weights))]
    if sp.q_codes is not None:
        out.append(("codes", pack_codes(sp.q_codes, code_bits(sp.q_bits), ks.panel)))
    return out


def selective_sparse(ffn: ir.ChannelMix) -> bool:
    """Whether the layer reads only its used units' rows (a sparse FFN whose key and value are row kinds)."""
    return ffn.sparse is not None and all(ffn.lin[m].kind in ROW_LOWERINGS for m in ("key", "value"))


def rows_params(ffn: ir.ChannelMix, ks: KernelShape) -> list[tuple[str, np.ndarray]]:
    """A sparse layer's key (F, C) and value.T (F, C) row-major, one row per unit, so a token reads only
    its units' rows (float in ks.weights; int8 codes with the per-channel scales of W)."""
    out = []
    for m, transpose in (("key", False), ("value", True)):
        w = ffn.lin[m].weight
        rl = ROW_LOWERINGS[w.kind]
        out += [(f"ffn.{m}.{n}", a) for n, a in zip(rl.ffn_names, rl.arrays(w, transpose, ks))]
    return out


def _row_operands(ctx: Ctx, ffn: ir.ChannelMix, m: str, x) -> tuple:
    rl = ROW_LOWERINGS[ffn.lin[m].kind]
    return rl.operands(ctx, x, [ctx.W[f"ffn.{m}.{n}"] for n in rl.ffn_names])


def sparse_ffn_selective(ctx: Ctx, ffn: ir.ChannelMix, xk, mask):
    """relu(key xk)^2 * mask -> value, reading only the used units' rows of key and of value.T:

        xk (T,C) ─► sparse_rows(key rows, mask) ─► k (T,F), 0 where unused ─► relu² ─► * mask ─► h (T,F)
        h ─► sparse_cols(value.T rows where h != 0) ─► (T,C)

    int8 key / value quantise xk and the whole masked h as the cpu artifact's gathered products do (the
    zeros of h change neither its scale nor its codes)."""
    op, em = relax.op, ctx.emit
    T = ctx.rows_of(xk)
    F, C = ffn.lin["key"].out_features, ffn.lin["key"].in_features
    lanes = ctx.ks.lanes
    variant, args = _row_operands(ctx, ffn, "key", xk)
    gv = ctx.kernel(("sparse_rows", F, C, variant), lambda: sparse_rows_kernel(F, C, lanes, variant))
    k = em(relax.call_tir(gv, args + [mask], relax.TensorType([T, F], F32)))
    k = em(op.nn.relu(k))
    h = em(op.multiply(op.multiply(k, k), mask))
    variant, args = _row_operands(ctx, ffn, "value", h)
    gv = ctx.kernel(("sparse_cols", F, C, variant), lambda: sparse_cols_kernel(F, C, lanes, variant))
    return em(relax.call_tir(gv, args, relax.TensorType([T, C], F32)))


def sparse_ffn_mask(ctx: Ctx, sp: ir.SparseFFN, xk, F: int):
    """(T, F) float32 1/0: the MLP predictor or the quantised-key predictor (the cpu artifact's mask:
    sigmoid(MLP) > threshold, or the key estimate above its per-token quantile)."""
    W, op, em = ctx.W, relax.op, ctx.emit
    masks = []
    if sp.fc1 is not None:
        h = em(op.nn.relu(ctx.dense(xk, W["ffn.sparse.fc1p"], sp.fc1.shape[0])))
        logit = ctx.dense(h, W["ffn.sparse.fc2p"], F)
        masks.append(em(op.greater(op.sigmoid(logit), relax.const(sp.mlp_threshold, F32))))
    if sp.q_codes is not None:
        # est ~ key(xk) = q_scale * (xk @ codes^T) + q_zero * sum(xk); the codes stay packed (bits per code)
        raw = ctx.nbit(xk, W["ffn.sparse.codes"], F, code_bits(sp.q_bits), const_scale=float(sp.q_scale))
        zt = em(op.multiply(op.sum(xk, axis=[-1], keepdims=True), relax.const(float(sp.q_zero), F32)))
        pos = sp.q_quantile * (F - 1)
        lo = int(math.floor(pos))
        frac = pos - lo if lo + 1 < F else 0.0
        gv = ctx.kernel(("quantile", F, F - lo, frac), lambda: quantile_mask_kernel(F, F - lo, frac))
        masks.append(em(relax.call_tir(gv, [raw, zt], relax.TensorType([ctx.rows_of(xk), F], F32))))
    if len(masks) == 1:
        return masks[0] if sp.fc1 is None else em(op.astype(masks[0], F32))
    return em(op.maximum(em(op.astype(masks[0], F32)), masks[1]))             # or, on 1/0 floats
