"""The RWKV-7 hybrids (IR version "7-hybrid", rwkvc.reference.hybrid) in Relax: the time-mix is RWKV-7's
(v7.time_mix_v7); this module holds what the transformer brings, the norms and the MLP.

    x (T,C) ─norm1─► time-mix ─(+)─► ─norm2─► MLP ─(+)─► x'
      norm: RMSNorm x / sqrt(mean(x²) + eps) * w (ir.Norm.rms), else LayerNorm
      MLP:  silu       down(silu(gate x) * up x)
            gelu       down(gelu(up x + b)) + b          (erf form)
            gelu_tanh  down(gelu_tanh(up x + b)) + b
    An MLP has no token shift: its shift row is not read.
"""
from __future__ import annotations

import numpy as np

from rwkvc import ir

from .base import F32, relax
from .context import Ctx
from .kinds import linear
from .v7 import layer_norm

VERSIONS = frozenset({"7-hybrid"})


def norm(ctx: Ctx, x, w, b, n: ir.Norm):
    """ir.Norm n over the last axis: RMSNorm where n.rms, else LayerNorm."""
    if not n.rms:
        return layer_norm(ctx, x, w, b, n.eps)
    op, em = relax.op, ctx.emit
    ms = em(op.mean(op.multiply(x, x), axis=[-1], keepdims=True))                       # (T, 1)
    return em(op.multiply(op.multiply(x, op.rsqrt(op.add(ms, relax.const(float(n.eps), F32)))), w))


def bias_arrays(ffn: ir.ChannelMix) -> list[tuple[str, np.ndarray]]:
    """The MLP's biases, names relative to `blocks.{i}.`."""
    return [(f"ffn.{k}.bias", np.asarray(b, np.float32)) for k, b in ffn.bias.items()]


def _biased(ctx: Ctx, ffn: ir.ChannelMix, key: str, x):
    y = linear(ctx, f"ffn.{key}", ffn.lin[key], x)
    if key in ffn.bias:
        y = ctx.emit(relax.op.add(y, ctx.W[f"ffn.{key}.bias"]))
    return y


def mlp(ctx: Ctx, ffn: ir.ChannelMix, x, prev, prefill: bool):
    op, em = relax.op, ctx.emit
    up = _biased(ctx, ffn, "key", x)                                                     # (T, F)
    if ffn.version == "silu":
        gate = _biased(ctx, ffn, "gate", x)
        h = em(op.multiply(em(op.multiply(gate, op.sigmoid(gate))), up))
    elif ffn.version == "gelu":
        h = em(op.nn.gelu(up))
    else:
        h = em(op.nn.gelu_tanh(up))
    return _biased(ctx, ffn, "value", h)


MLP_LOWERINGS = {"silu": mlp, "gelu": mlp, "gelu_tanh": mlp}
