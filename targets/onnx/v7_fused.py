"""RWKV-7 on rwkvc's fused CPU kernels (rwkvc.abi.FUSED_DOMAIN, built by rwkvc.runtimes.ortops): per layer a
Rwkv7Mix6 (residual add, ln1, the six token-shift mixes), the projections (Rwkv7MatVecSet where they are
quantised), one Rwkv7WkvStep in the step (Rwkv7WkvPrefill in a prefill), and Rwkv7Mix1 + the FFN."""
from __future__ import annotations

import numpy as np
from onnx import helper

from rwkvc import ir
from rwkvc.abi import FUSED_DOMAIN

from .deepembed import emit_channel_mix_v7a_fused
from .graph import F32, Graph
from .kinds import linear
from .matvec import matvec_product
from .sparse_ffn import emit_sparse_ffn, emit_sparse_ffn_fused, sparse_ffn_fusable
from .v7 import v7_projections

FUSED_MAX_HEAD = 256          # the kernels keep a head's vectors in fixed buffers of this size


def fused_supported(model: ir.Model, dtype) -> bool:
    """rwkvc's fused kernels (the step's element-wise work, the prefill's WKV and mixes): RWKV-7 in float32,
    heads of at most FUSED_MAX_HEAD channels."""
    cfg = model.config
    return cfg.version in ("7", "7-hybrid", "7a") and np.dtype(dtype) == np.float32 and cfg.head_size <= FUSED_MAX_HEAD


def emit_block_v7_fused(g: Graph, blk, x: str, dx: str, prev_att: str, prev_ffn: str, S: str, v_first: str | None,
                        cfg: ir.ModelConfig, i: int, prefill: bool = False, trim: bool = False):
    """One RWKV-7 layer on rwkvc's fused kernels: the residual add, layer norm and token-shift mixes are one
    Rwkv7Mix node; everything between the projections and the output projection is one Rwkv7WkvStep node
    (Rwkv7WkvPrefill in a prefill: the same, token by token).
    The residual stream enters as x + dx (the add happens in the Mix kernel). trim: the channel-mix on the
    last two rows only (the last layer of a prefill). Returns x, dx (the layer's channel-mix output, still
    to be added), the layer's LayerNorm outputs (their last rows are the shift state), S', v_first."""
    att, ffn = blk.att, blk.ffn
    p = f"blocks.{i}.att."
    L, vec = att.lin, att.vec
    w32 = lambda name, arr: g.weight(p + name, arr, F32)  # noqa: E731
    names = list(att.mix)
    outs = g.op("Rwkv7Mix6", x, dx, g.weight(f"blocks.{i}.ln1.weight", blk.ln1.weight),
                g.weight(f"blocks.{i}.ln1.bias", blk.ln1.bias), prev_att,
                g.weight(p + "x_mix6", np.stack([att.mix[m] for m in names])),
                domain=FUSED_DOMAIN, n_out=2 + len(names), eps=float(blk.ln1.eps))
    x, xa, xm = outs[0], outs[1], dict(zip(names, outs[2:]))
    pr = v7_projections(g, att, xm, i, fuse=not prefill)
    if i == 0:   # layer 0 has no value residual: vg, v_first and v0 are placeholders (attribute first=1)
        v_first, vg, v0 = pr["v"], pr["v"], w32("w0", vec["w0"])
    else:
        vg, v0 = pr["vg"], w32("v0", vec["v0"])
    y, S2 = g.op("Rwkv7WkvPrefill" if prefill else "Rwkv7WkvStep", pr["r"], pr["w"], pr["k"], pr["v"], pr["a"],
                 vg, v_first, pr["g"], S,
                 w32("w0", vec["w0"]), w32("a0", vec["a0"]),
                 v0, w32("k_k", vec["k_k"]), w32("k_a", vec["k_a"]), w32("r_k", vec["r_k"]),
                 w32("ln_x.weight", att.ln_x.weight), w32("ln_x.bias", att.ln_x.bias),
                 domain=FUSED_DOMAIN, n_out=2, eps=float(att.ln_x.eps), first=int(i == 0))
    dx_att = (None if prefill else matvec_product(g, L["output"], y)) or linear(g, L["output"], y)
    if trim:
        x, dx_att = (g.op("Slice", t, g.const([-2]), g.const([2 ** 62]), g.const([0])) for t in (x, dx_att))
    x, dx, xf = emit_channel_mix_v7_fused(g, blk, x, dx_att, prev_ffn, i, prefill)
    return x, dx, xf, xa, S2, v_first


def emit_channel_mix_v7_fused(g: Graph, blk, x: str, dx: str, prev: str, i: int, prefill: bool):
    """x + dx, ln2 and the token shift in one Rwkv7Mix1, then the FFN. Returns x, the FFN's output, ln2(x)."""
    ffn, pf = blk.ffn, f"blocks.{i}.ffn."
    x, xf, xk = g.op("Rwkv7Mix1", x, dx, g.weight(f"blocks.{i}.ln2.weight", blk.ln2.weight),
                     g.weight(f"blocks.{i}.ln2.bias", blk.ln2.bias), prev, g.weight(pf + "x_k", ffn.mix["x_k"]),
                     domain=FUSED_DOMAIN, n_out=3, eps=float(blk.ln2.eps))
    if ffn.deep is not None:   # RWKV-7a: the DeepEmbed multiplier between key and value
        return x, emit_channel_mix_v7a_fused(g, ffn, xf, xk, i, prefill), xf
    if ffn.sparse is not None:
        if not prefill and sparse_ffn_fusable(g, ffn):
            return x, emit_sparse_ffn_fused(g, ffn, xk, pf), xf
        return x, emit_sparse_ffn(g, ffn, xk, pf, prefill), xf
    # the step: key, relu squared, value as one Rwkv7MatVecSet where both matrices can join
    y = None if prefill else matvec_product(g, (ffn.lin["key"], ffn.lin["value"]), xk, "relu2")
    return x, y or linear(g, ffn.lin["value"], relu_square(g, linear(g, ffn.lin["key"], xk))), xf


RELU2 = 4     # Rwkv7MatVecQ16's act attribute: relu squared (apply_act, op set 9)


def relu_square(g: Graph, h: str) -> str:
    """max(h, 0)^2: in the product that made h where that is rwkvc's 4-bit or int8 product (its act
    attribute: no second (T, F) tensor in a prefill), else a ReluSquare node."""
    last = g.nodes[-1] if g.nodes else None
    if last is not None and list(last.output) == [h] and last.domain == FUSED_DOMAIN and \
            last.op_type in ("Rwkv7MatVecQ16", "Rwkv7MatVecQ16x8") and not any(a.name == "act" for a in last.attribute):
        last.attribute.append(helper.make_attribute("act", RELU2))
        return h
    return g.op("ReluSquare", h, domain=FUSED_DOMAIN)
