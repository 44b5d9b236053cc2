"""The RWKV-7 block in Relax: layer norm, token shift, the time-mix (the six projections, the WKV
kernel, group norm, bonus, gate, output) and the channel-mix (squared-relu FFN, or the sparse FFN).

    x (T,C) ─ln1─► time-mix ─(+)─► ─ln2─► channel-mix ─(+)─► x'
                    │ r,k,v,w,a,g: LINEAR_LOWERINGS[kind] (packed-panel GEMM / GEMV kernels)
                    │ wkv7 kernel: S (H,N,N), sequential over T, parallel over heads
                    └ group norm, bonus, gate, output
"""
from __future__ import annotations

import math

import numpy as np

from rwkvc import ir

from .base import F32, relax, te, tirx
from .context import Ctx
from .kinds import linear
from .sparse_ffn import selective_sparse, sparse_ffn_mask, sparse_ffn_selective

DECAY_SCALE = math.exp(-0.5)


def layer_norm(ctx: Ctx, x, w, b, eps: float):
    return ctx.emit(relax.op.nn.layer_norm(x, w, b, axes=[-1], epsilon=float(eps)))


def shifted(ctx: Ctx, x, prev, prefill: bool):
    """The previous token's row for each t: concat(prev, x[:-1]); (T, C). prev (1, C)."""
    if not prefill:
        return prev

    def f(x, prev):
        return te.compute(x.shape, lambda t, c: tirx.if_then_else(
            t == 0, prev[0, c], x[tirx.max(t - 1, 0), c]), name="token_shift")
    return ctx.bb.emit_te(f, x, prev, primfunc_name_hint="token_shift")


def last_row(ctx: Ctx, x, prefill: bool):
    """x[T-1:T]; (1, C)."""
    if not prefill:
        return x
    return ctx.bb.emit_te(lambda x: te.compute((1, x.shape[1]), lambda _, c: x[x.shape[0] - 1, c], name="last_row"),
                          x, primfunc_name_hint="last_row")


def time_mix_v7(ctx: Ctx, att: ir.TimeMix, x, prev, S, v_first, first: bool, prefill: bool):
    H, N, C = ctx.cfg.n_head, ctx.cfg.head_size, ctx.cfg.n_embd
    W, op, em = ctx.W, relax.op, ctx.emit
    T = ctx.rows_of(x)
    L = att.lin
    lin = lambda m, z: linear(ctx, f"att.{m}", L[m], z)  # noqa: E731
    xx = em(op.subtract(shifted(ctx, x, prev, prefill), x))
    xm = {m: em(op.add(x, op.multiply(xx, W[f"att.{m}"]))) for m in att.mix}
    r = lin("receptance", xm["x_r"])
    w = lin("w2", em(op.tanh(lin("w1", xm["x_w"]))))
    w = em(op.exp(op.multiply(op.sigmoid(op.add(w, W["att.w0"])), relax.const(-DECAY_SCALE, F32))))
    k = lin("key", xm["x_k"])
    v = lin("value", xm["x_v"])
    iclr = em(op.sigmoid(op.add(W["att.a0"], lin("a2", lin("a1", xm["x_a"])))))
    gate = lin("g2", em(op.sigmoid(lin("g1", xm["x_g"]))))

    kk = em(op.reshape(op.multiply(k, W["att.k_k"]), [T, H, N]))
    norm = em(op.sqrt(op.sum(op.multiply(kk, kk), axis=[-1], keepdims=True)))
    kk = em(op.reshape(op.divide(kk, op.maximum(norm, relax.const(1e-12, F32))), [T, C]))
    one = relax.const(1.0, F32)
    k = em(op.multiply(k, op.add(one, op.multiply(op.subtract(iclr, one), W["att.k_a"]))))
    if first:
        v_first = v
    else:
        vg = em(op.sigmoid(op.add(W["att.v0"], lin("v2", lin("v1", xm["x_v"])))))
        v = em(op.add(v, op.multiply(op.subtract(v_first, v), vg)))

    y, S2 = ctx.wkv7(S, r=r, w=w, k=k, v=v, a=em(op.negative(kk)), b=em(op.multiply(kk, iclr)))

    # group norm over each head's N channels, then ln_x's per-channel affine
    yh = em(op.reshape(y, [T, H, N]))
    yh = em(op.nn.layer_norm(yh, relax.const(np.ones(N, np.float32)), relax.const(np.zeros(N, np.float32)),
                             axes=[-1], epsilon=float(att.ln_x.eps)))
    y = em(op.add(op.multiply(op.reshape(yh, [T, C]), W["att.ln_x.weight"]), W["att.ln_x.bias"]))
    rk = em(op.reshape(op.multiply(op.multiply(r, k), W["att.r_k"]), [T, H, N]))
    bonus = em(op.multiply(op.sum(rk, axis=[-1], keepdims=True), op.reshape(v, [T, H, N])))
    y = em(op.add(y, op.reshape(bonus, [T, C])))
    return lin("output", em(op.multiply(y, gate))), S2, v_first


def channel_mix_v7(ctx: Ctx, ffn: ir.ChannelMix, x, prev, prefill: bool):
    W, op, em = ctx.W, relax.op, ctx.emit
    xk = em(op.add(x, op.multiply(op.subtract(shifted(ctx, x, prev, prefill), x), W["ffn.x_k"])))
    return relu2_ffn(ctx, ffn, xk)


def relu2_ffn(ctx: Ctx, ffn: ir.ChannelMix, xk):
    """value(relu(key xk)^2), (T, C): dense, or RWKV-Lite's sparse FFN (every version's channel-mix core)."""
    op, em = relax.op, ctx.emit
    if selective_sparse(ffn):
        return sparse_ffn_selective(ctx, ffn, xk, sparse_ffn_mask(ctx, ffn.sparse, xk, ffn.lin["key"].out_features))
    k = em(op.nn.relu(linear(ctx, "ffn.key", ffn.lin["key"], xk)))
    h = em(op.multiply(k, k))
    if ffn.sparse is not None:
        # key / value of kinds not read row by row: the full product with the unused units zeroed, the same
        # function as the cpu artifact's
        h = em(op.multiply(h, sparse_ffn_mask(ctx, ffn.sparse, xk, ffn.lin["key"].out_features)))
    return linear(ctx, "ffn.value", ffn.lin["value"], h)

