"""The RWKV-7 hybrid (rwkvc.reference.hybrid, IR version "7-hybrid") in ONNX: RWKV-7 time-mixes between a
transformer's norms and MLPs. Same inputs and outputs as every other model (rwkvc.targets.onnx.build):

    tokens + shift_in (L, 2, C) + wkv_in.i (H, N, N) -> logits (V,) + shift_out + wkv_out.i

Per layer (x is (T, C); T = 1 in the step graph):

    x ─norm1─► time-mix (RWKV-7's: emit_time_mix_v7) ─(+)─► x ─norm2─► MLP ─(+)─► x
      │ RMSNorm: x / sqrt(mean(x²) + eps) * w;            │ SwiGLU: down(silu(gate x) * up x)
      │ LayerNorm: ONNX LayerNormalization                │ GELU:   down(gelu(up x + b) ) + b
      └ shift_out[l, 0] = norm1(x)'s last row; shift_out[l, 1] = 0 (an MLP has no token shift)

With policy.fused (rwkvc's kernels, float32): the step's time-mix between the projections and the output
projection is one Rwkv7WkvStep node and its quantised projections one Rwkv7MatVecSet; the prefill's WKV
is Rwkv7WkvSeq. The norms and MLPs are plain operators (the fused Mix kernels are LayerNorm + token shift,
which these layers do not have).
"""
from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto, helper

from rwkvc import ir
from rwkvc.abi import FUSED_DOMAIN

from .graph import F32, Graph, WeightStore, f32, finish_model, layer_norm
from .kinds import EMBEDDERS, linear, rows_coupled
from .matvec import matvec_product
from .policy import LoweringPolicy
from .v7 import emit_time_mix_v7, v7_projections
from .v7_fused import fused_supported

VERSION = "7-hybrid"


def norm(g: Graph, x: str, n: ir.Norm, name: str) -> str:
    """RMSNorm (n.rms) or LayerNorm over the last axis, in float32."""
    if not n.rms:
        return layer_norm(g, x, n, name)
    ms = g.op("ReduceMean", g.op("Mul", x, x), g.const([-1]), keepdims=1)                # (T, 1)
    return g.op("Mul", g.op("Div", x, g.op("Sqrt", g.op("Add", ms, g.const(float(n.eps), F32)))),
                g.weight(name + ".weight", n.weight))


def _biased(g: Graph, ffn: ir.ChannelMix, key: str, x: str) -> str:
    y = linear(g, ffn.lin[key], x)
    b = ffn.bias.get(key)
    return y if b is None else g.op("Add", y, g.weight(ffn.lin[key].name + ".bias", b))


def emit_mlp(g: Graph, ffn: ir.ChannelMix, x: str) -> str:
    """The teacher's MLP: SwiGLU (version silu) or up -> GELU -> down (gelu, gelu_tanh). x (T, C) -> (T, C)."""
    up = _biased(g, ffn, "key", x)                                                     # (T, F)
    if ffn.version == "silu":
        gate = _biased(g, ffn, "gate", x)
        h = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
    elif ffn.version == "gelu":
        h = g.op("Mul", g.op("Mul", up, g.const(0.5, F32)),
                 g.op("Add", g.const(1.0, F32), g.op("Erf", g.op("Mul", up, g.const(1 / math.sqrt(2), F32)))))
    else:   # gelu_tanh: 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3)))
        inner = g.op("Add", up, g.op("Mul", g.op("Mul", g.op("Mul", up, up), up), g.const(0.044715, F32)))
        t = g.op("Tanh", g.op("Mul", inner, g.const(math.sqrt(2 / math.pi), F32)))
        h = g.op("Mul", g.op("Mul", up, g.const(0.5, F32)), g.op("Add", g.const(1.0, F32), t))
    return _biased(g, ffn, "value", h)


def emit_time_mix_step_fused(g: Graph, att: ir.TimeMix, x: str, prev: str, S: str, v_first: str | None,
                             cfg: ir.ModelConfig, i: int):
    """One token's time-mix on rwkvc's kernels: the six mixes (one broadcast), the projections
    (Rwkv7MatVecSet where quantised), Rwkv7WkvStep, the output projection. Returns dx, S', v_first."""
    p = f"blocks.{i}.att."
    vec = att.vec
    w32 = lambda name, arr: g.weight(p + name, arr, F32)  # noqa: E731
    names = list(att.mix)
    xx = g.op("Sub", prev, x)
    rows = g.op("Add", x, g.op("Mul", xx, g.weight(p + "x_mix6", np.stack([att.mix[m] for m in names]))))
    xm = dict(zip(names, g.op("Split", rows, axis=0, num_outputs=len(names), n_out=len(names))))
    pr = v7_projections(g, att, xm, i, fuse=True)
    if i == 0:   # layer 0 has no value residual: vg, v_first and v0 are placeholders (attribute first=1)
        v_first, vg, v0 = pr["v"], pr["v"], w32("w0", vec["w0"])
    else:
        vg, v0 = pr["vg"], w32("v0", vec["v0"])
    y, S2 = g.op("Rwkv7WkvStep", pr["r"], pr["w"], pr["k"], pr["v"], pr["a"], vg, v_first, pr["g"], S,
                 w32("w0", vec["w0"]), w32("a0", vec["a0"]), v0, w32("k_k", vec["k_k"]), w32("k_a", vec["k_a"]),
                 w32("r_k", vec["r_k"]), w32("ln_x.weight", att.ln_x.weight), w32("ln_x.bias", att.ln_x.bias),
                 domain=FUSED_DOMAIN, n_out=2, eps=float(att.ln_x.eps), first=int(i == 0))
    return matvec_product(g, att.lin["output"], y) or linear(g, att.lin["output"], y), S2, v_first


def build_hybrid_graph(model: ir.Model, store: WeightStore, prefill: bool, policy: LoweringPolicy):
    """The step (prefill=False) or prefill graph of a hybrid under `policy` (float32; rwkvc's kernels
    where v7_fused.fused_supported: float32, heads of at most FUSED_MAX_HEAD channels)."""
    cfg = model.config
    L, C, V = cfg.n_layer, cfg.n_embd, cfg.vocab_size
    g = Graph(store, store.dtype, policy)
    g.fused = fused = policy.fused and fused_supported(model, store.dtype)
    g.step = not prefill
    x = EMBEDDERS[model.emb.weight.kind](g, model, "tokens")                          # (T, C)
    prev_rows = g.op("Split", g.op("Reshape", "shift_in", g.const([2 * L, C])), axis=0, num_outputs=2 * L,
                     n_out=2 * L)
    zero_row = g.const(np.zeros((1, C)), F32)
    last = (lambda t: g.op("Slice", t, g.const([-1]), g.const([2 ** 62]), g.const([0]))) if prefill else (lambda t: t)
    new_rows, new_wkv, v_first = [], [], None
    for i, blk in enumerate(model.blocks):
        S = f"wkv_in.{i}"
        xa = norm(g, x, blk.ln1, f"blocks.{i}.ln1")
        if fused and not prefill:
            dx, S2, v_first = emit_time_mix_step_fused(g, blk.att, xa, prev_rows[2 * i], S, v_first, cfg, i)
        else:
            dx, S2, v_first = emit_time_mix_v7(g, blk.att, xa, prev_rows[2 * i], S, v_first, cfg, i, prefill)
        x = g.op("Add", x, f32(g, dx))
        if prefill and i == L - 1 and not rows_coupled(blk.ffn):   # the logits need the last token's row only
            x = g.op("Slice", x, g.const([-1]), g.const([2 ** 62]), g.const([0]))
        x = g.op("Add", x, emit_mlp(g, blk.ffn, norm(g, x, blk.ln2, f"blocks.{i}.ln2")))
        new_rows += [last(xa), zero_row]
        new_wkv.append(S2)

    xl = g.op("Slice", x, g.const([-1]), g.const([2 ** 62]), g.const([0])) if prefill else x
    xl = norm(g, xl, model.ln_out, "ln_out")
    logits = linear(g, model.head, g.op("Reshape", xl, g.const([C])))
    g.rename(logits, "logits")
    g.nodes.append(helper.make_node("Reshape", [g.op("Concat", *new_rows, axis=0), g.const([L, 2, C])],
                                    ["shift_out"]))
    for i, S2 in enumerate(new_wkv):
        if S2 == f"wkv_in.{i}":
            g.nodes.append(helper.make_node("Identity", [S2], [f"wkv_out.{i}"]))
        else:
            g.rename(S2, f"wkv_out.{i}")

    f = TensorProto.FLOAT
    shp = cfg.state_shapes()
    layer_wkv = list(shp["wkv"][1:])
    inputs = [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["T" if prefill else 1]),
              helper.make_tensor_value_info("shift_in", f, list(shp["shift"]))]
    inputs += [helper.make_tensor_value_info(f"wkv_in.{i}", f, layer_wkv) for i in range(L)]
    outputs = [helper.make_tensor_value_info("logits", f, [V]),
               helper.make_tensor_value_info("shift_out", f, list(shp["shift"]))]
    outputs += [helper.make_tensor_value_info(f"wkv_out.{i}", f, layer_wkv) for i in range(L)]
    return finish_model(g, "hybrid_prefill" if prefill else "hybrid_step", inputs, outputs, f, fused)


GRAPH_BUILDERS = {VERSION: build_hybrid_graph}
