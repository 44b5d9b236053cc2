"""RWKV-4, -5.x and -6 in Relax (the same functions as targets/onnx/rwkv456.py, the cpu artifact's):

    v4    r, k, v from token-shift mixes -> wkv4 kernel (aa, bb, pp per channel) -> sigmoid(r) * y -> output
    v5.x  r, k, v (, g) -> wkv5 kernel (constant decay) + bonus u.k.r v -> group norm -> (* silu(g)) -> output
    v6    data-dependent token shift (maa LoRA) and decay (w1, w2) -> wkv5 kernel (decay per token) -> ... as v5
    channel-mix (every one): sigmoid(receptance xr) * value(relu(key xk)^2), the FFN dense or RWKV-Lite's sparse

Every matrix goes through kinds.linear (any weight kind: factorised projections with diagonals, int8, int4,
...). The mixes are x + (prev - x) * mix (the importers converted time_mix). Per-layer constants the cpu
artifact derives at compile time (v4's -exp(time_decay), v5's exp(-exp(time_decay)), in float64) are
parameters here too (ATT_VECTORS), so one Relax function serves every layer of a shape.
"""
from __future__ import annotations

import numpy as np

from rwkvc import ir
from rwkvc.arch.v6 import MAA   # the order of the five data-dependent mixes

from .base import relax
from .context import Ctx
from .kinds import linear
from .v7 import relu2_ffn, shifted


def _mixed(ctx: Ctx, x, xx, name: str, extra=None):
    """x + xx * (mix (+ extra)), xx = prev - x; (T, C)."""
    op = relax.op
    m = ctx.W[name] if extra is None else ctx.emit(op.add(ctx.W[name], extra))
    return ctx.emit(op.add(x, op.multiply(xx, m)))


def _lin(ctx: Ctx, att_or_ffn, part: str, m: str, x):
    return linear(ctx, f"{part}.{m}", att_or_ffn.lin[m], x)


def time_mix_v4(ctx: Ctx, att: ir.TimeMix, x, prev, S, v_first, first: bool, prefill: bool):
    op, em = relax.op, ctx.emit
    xx = em(op.subtract(shifted(ctx, x, prev, prefill), x))
    r = em(op.sigmoid(_lin(ctx, att, "att", "receptance", _mixed(ctx, x, xx, "att.x_r"))))
    k = _lin(ctx, att, "att", "key", _mixed(ctx, x, xx, "att.x_k"))
    v = _lin(ctx, att, "att", "value", _mixed(ctx, x, xx, "att.x_v"))
    y, S2 = ctx.wkv4(S, k, v, ctx.W["att.log_decay"], ctx.W["att.u"])
    return _lin(ctx, att, "att", "output", em(op.multiply(r, y))), S2, v_first


def _wkv5_out(ctx: Ctx, att: ir.TimeMix, y, r, k, v):
    """y + v * (u . k . r per head), then the group norm (ln_x per head) and ln_x's affine; (T, C)."""
    H, N, C = ctx.cfg.n_head, ctx.cfg.head_size, ctx.cfg.n_embd
    op, em, W = relax.op, ctx.emit, ctx.W
    T = ctx.rows_of(y)
    ukr = em(op.sum(op.reshape(op.multiply(op.multiply(W["att.u"], k), r), [T, H, N]), axis=[-1], keepdims=True))
    y = em(op.add(y, op.reshape(op.multiply(ukr, op.reshape(v, [T, H, N])), [T, C])))
    yh = em(op.nn.layer_norm(em(op.reshape(y, [T, H, N])), relax.const(np.ones(N, np.float32)),
                             relax.const(np.zeros(N, np.float32)), axes=[-1], epsilon=float(att.ln_x.eps)))
    return em(op.add(op.multiply(op.reshape(yh, [T, C]), W["att.ln_x.weight"]), W["att.ln_x.bias"]))


def _silu(ctx: Ctx, x):
    return ctx.emit(relax.op.multiply(x, relax.op.sigmoid(x)))


def time_mix_v5(ctx: Ctx, att: ir.TimeMix, x, prev, S, v_first, first: bool, prefill: bool):
    op, em = relax.op, ctx.emit
    T, C = ctx.rows_of(x), ctx.cfg.n_embd
    xx = em(op.subtract(shifted(ctx, x, prev, prefill), x))
    r, k, v = (_lin(ctx, att, "att", m, _mixed(ctx, x, xx, f"att.x_{m[0]}")) for m in ("receptance", "key", "value"))
    w = em(op.broadcast_to(ctx.W["att.decay"], [T, C]))                                  # (C,) -> (T, C)
    y, S2 = ctx.wkv5(S, r, w, k, v)
    y = _wkv5_out(ctx, att, y, r, k, v)
    if "gate" in att.lin:   # 5.1 / 5.2
        y = em(op.multiply(y, _silu(ctx, _lin(ctx, att, "att", "gate", _mixed(ctx, x, xx, "att.x_g")))))
    return _lin(ctx, att, "att", "output", y), S2, v_first


def time_mix_v6(ctx: Ctx, att: ir.TimeMix, x, prev, S, v_first, first: bool, prefill: bool):
    op, em = relax.op, ctx.emit
    xx = em(op.subtract(shifted(ctx, x, prev, prefill), x))
    # data-dependent token shift: one LoRA down-projection for all five targets, one up-projection each
    h = em(op.tanh(_lin(ctx, att, "att", "maa1", _mixed(ctx, x, xx, "att.x_x"))))          # (T, 5D)
    parts = em(op.split(h, len(MAA), axis=-1))                                             # 5 x (T, D)
    xm = {m: _mixed(ctx, x, xx, f"att.x_{m}", _lin(ctx, att, "att", f"maa2_{m}", em(relax.TupleGetItem(parts, j))))
          for j, m in enumerate(MAA)}
    r = _lin(ctx, att, "att", "receptance", xm["r"])
    k = _lin(ctx, att, "att", "key", xm["k"])
    v = _lin(ctx, att, "att", "value", xm["v"])
    gate = _silu(ctx, _lin(ctx, att, "att", "gate", xm["g"]))
    # data-dependent decay, per token and channel: exp(-exp(w0 + W2 tanh(W1 x_w)))
    wl = _lin(ctx, att, "att", "w2", em(op.tanh(_lin(ctx, att, "att", "w1", xm["w"]))))
    w = em(op.exp(op.negative(op.exp(op.add(wl, ctx.W["att.w0"])))))
    y, S2 = ctx.wkv5(S, r, w, k, v)
    y = em(op.multiply(_wkv5_out(ctx, att, y, r, k, v), gate))
    return _lin(ctx, att, "att", "output", y), S2, v_first


def channel_mix_rwkv(ctx: Ctx, ffn: ir.ChannelMix, x, prev, prefill: bool):
    """sigmoid(R xr) * V relu(K xk)^2, the FFN dense or sparse (RWKV-Lite's predictors)."""
    op, em = relax.op, ctx.emit
    xx = em(op.subtract(shifted(ctx, x, prev, prefill), x))
    r = em(op.sigmoid(_lin(ctx, ffn, "ffn", "receptance", _mixed(ctx, x, xx, "ffn.x_r"))))
    return em(op.multiply(r, relu2_ffn(ctx, ffn, _mixed(ctx, x, xx, "ffn.x_k"))))


def _f32(a) -> np.ndarray:
    return np.asarray(a, np.float32)


def vectors_v4(att: ir.TimeMix) -> dict[str, np.ndarray]:
    """log_decay = -exp(time_decay) (the per-step log decay, computed in float64 as the cpu artifact), u."""
    return {"log_decay": _f32(-np.exp(np.asarray(att.vec["w0"], np.float64))), "u": _f32(att.vec["u"])}


def vectors_v5(att: ir.TimeMix) -> dict[str, np.ndarray]:
    """decay = exp(-exp(time_decay)) (constant per channel, float64 then float32 as the cpu artifact), u."""
    return {"decay": _f32(np.exp(-np.exp(np.asarray(att.vec["w0"], np.float64)))), "u": _f32(att.vec["u"])}
