"""IR -> ONNX. Two graphs over one external weight file:

    step.onnx     tokens (1,)  + state -> logits (V,) + state      one decode step, no loops
    prefill.onnx  tokens (T,)  + state -> logits of the last token + state, WKV as an ONNX Scan over T

    state: shift (L, 2, C) float32, wkv (L, H, N, N) float32 (the same layout as rwkvc.ir.State)

Per layer (x is (T, C), T = 1 in the step graph):

    x ─ln1─► time-mix ─(+)─► x ─ln2─► channel-mix ─(+)─► x
              │ token shift: prev row from shift[l, 0]          │ shift[l, 1]
              │ r,k,v,w,a,g projections (MatMul per Linear)     │ relu(x_k-mixed @ K)^2 @ V
              │ WKV recurrence on wkv[l] (Scan over T)
              └ group norm, bonus r·k·r_k·v, gate, output

Weights are written once to `weights.bin` (page-aligned tensors) and both graphs point into it, so
models over 2 GB work and the runtime can share the bytes. The mixers are lowered per RWKV generation
(TIME_MIX_EMITTERS, CHANNEL_MIX_EMITTERS), the matrices and the embedding per weight kind
(rwkvc.targets.onnx.kinds), every choice read from the LoweringPolicy.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper

from rwkvc import ir

from .deepembed import emit_channel_mix_v7a
from .graph import F32, Graph, WeightStore, f32, finish_model, layer_norm, to_compute
from .hybrid import GRAPH_BUILDERS
from .kinds import EMBEDDERS, linear, rows_coupled
from .policy import RESCALE_EVERY, LoweringPolicy
from .rwkv456 import emit_channel_mix_rwkv, emit_time_mix_v4, emit_time_mix_v5, emit_time_mix_v6
from .v7 import emit_channel_mix_v7, emit_time_mix_v7
from .v7_fused import emit_block_v7_fused, fused_supported

TIME_MIX_EMITTERS = {"7": emit_time_mix_v7, "7a": emit_time_mix_v7, "6": emit_time_mix_v6, "5.2": emit_time_mix_v5,
                     "5.1": emit_time_mix_v5,
                     "5.0": emit_time_mix_v5, "4": emit_time_mix_v4}
CHANNEL_MIX_EMITTERS = {"7": emit_channel_mix_v7, "7a": emit_channel_mix_v7a, "6": emit_channel_mix_rwkv,
                        "5.2": emit_channel_mix_rwkv,
                        "5.1": emit_channel_mix_rwkv, "5.0": emit_channel_mix_rwkv, "4": emit_channel_mix_rwkv}


RESCALE_VERSIONS = frozenset({"4", "5.0", "5.1", "5.2", "6", "7", "7a"})


def rescale_plan(cfg: ir.ModelConfig, dtype, every: int = RESCALE_EVERY) -> dict[str, float]:
    """fp16 layer rescaling: att.output and ffn.value of layer i divided by 2^(i // 6), and the residual
    halved after every 6th layer, so the residual stream stays within fp16's range. Every later use of the
    residual goes through a LayerNorm (scale-invariant), so the logits and the state do not change.
    every=0 turns it off."""
    if np.dtype(dtype) != np.float16 or cfg.version not in RESCALE_VERSIONS or not every:
        return {}
    plan = {}
    for i in range(cfg.n_layer):
        s = float(2 ** (i // every))
        if s != 1:
            plan[f"blocks.{i}.att.output"] = plan[f"blocks.{i}.ffn.value"] = s
    return plan


def build_graph(model: ir.Model, store: WeightStore, prefill: bool, policy: LoweringPolicy) -> onnx.ModelProto:
    """The step (prefill=False) or prefill graph under `policy`. policy.fused: rwkvc's own kernels
    (FUSED_DOMAIN) for the step's element-wise work (emit_block_v7_fused) and the prefill's WKV, where
    fused_supported."""
    if model.config.version in GRAPH_BUILDERS:   # a family with its own layer layout (the RWKV-7 hybrids)
        return GRAPH_BUILDERS[model.config.version](model, store, prefill, policy)
    cfg = model.config
    L, C, H, N, V = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size, cfg.vocab_size
    g = Graph(store, store.dtype, policy)
    rescale_every = policy.rescale_every
    g.rescale = rescale_plan(cfg, store.dtype, rescale_every)
    halve = bool(rescale_every) and store.dtype == np.float16 and cfg.version in RESCALE_VERSIONS
    x = EMBEDDERS[model.emb.weight.kind](g, model, "tokens")                         # (T, C)
    # shift (L, 2, C) -> 2L rows (1, C): [att of layer 0, ffn of layer 0, att of layer 1, ...]
    prev_rows = g.op("Split", g.op("Reshape", to_compute(g, "shift_in"), g.const([2 * L, C])), axis=0,
                     num_outputs=2 * L, n_out=2 * L)
    new_rows, new_wkv = [], []
    v_first = None
    g.fused = fused = policy.fused and fused_supported(model, store.dtype)
    g.step = not prefill
    res = g.const(np.zeros((1, C)), F32) if fused else None   # the fused layers' pending residual
    last = (lambda t: g.op("Slice", t, g.const([-1]), g.const([2 ** 62]), g.const([0]))) if prefill else (lambda t: t)
    for i, blk in enumerate(model.blocks):
        prev_att, prev_ffn = prev_rows[2 * i], prev_rows[2 * i + 1]                  # (1, C)
        S = f"wkv_in.{i}"                                                             # one input per layer
        if fused:
            trim = prefill and i == L - 1 and not rows_coupled(blk.ffn)
            x, res, xf, xa, S2, v_first = emit_block_v7_fused(g, blk, x, res, prev_att, prev_ffn, S, v_first, cfg, i,
                                                              prefill, trim)
            new_rows += [last(xa), last(xf)]
            new_wkv.append(S2)
            continue

        xa = layer_norm(g, x, blk.ln1, f"blocks.{i}.ln1")
        dx, S2, v_first = TIME_MIX_EMITTERS[blk.att.version](g, blk.att, xa, prev_att, S, v_first, cfg, i, prefill)
        x = g.op("Add", x, dx)
        if prefill and i == L - 1 and not rows_coupled(blk.ffn):
            # a prefill returns the last token's logits only: the last channel-mix needs that token and the
            # one before it (its token shift), not all T (the widest product of the layer, done for 2 rows)
            x = g.op("Slice", x, g.const([-2]), g.const([2 ** 62]), g.const([0]))
        xf = layer_norm(g, x, blk.ln2, f"blocks.{i}.ln2")
        x = g.op("Add", x, CHANNEL_MIX_EMITTERS[blk.ffn.version](g, blk.ffn, xf, prev_ffn, i, prefill))
        if halve and (i + 1) % rescale_every == 0:
            x = g.op("Mul", x, g.const(0.5))

        new_rows += [last(xa), last(xf)]
        new_wkv.append(S2)

    if fused:
        x = g.op("Add", x, res)
    xl = g.op("Slice", x, g.const([-1]), g.const([2 ** 62]), g.const([0])) if prefill else x
    xl = layer_norm(g, xl, model.ln_out, "ln_out")
    # the head on x (C,): every head's ops keep x's rank, so its last node writes the (V,) logits output
    # itself (a Reshape to (V,) there would copy the logits into the caller's buffer, ~7 us at V = 65536)
    logits = linear(g, model.head, g.op("Reshape", xl, g.const([C])))
    if g.dtype == np.float32:
        g.rename(logits, "logits")                       # no copy of the V logits (a Cast to float32 is one)
    else:
        g.nodes.append(helper.make_node("Cast", [logits], ["logits"], to=TensorProto.FLOAT))
    g.nodes.append(helper.make_node("Reshape", [f32(g, g.op("Concat", *new_rows, axis=0)), g.const([L, 2, C])],
                                    ["shift_out"]))
    for i, S2 in enumerate(new_wkv):   # the node that makes layer i's new state writes wkv_out.i itself
        if S2 == f"wkv_in.{i}":
            g.nodes.append(helper.make_node("Identity", [S2], [f"wkv_out.{i}"]))
        else:
            g.rename(S2, f"wkv_out.{i}")

    f = TensorProto.FLOAT
    T = "T" if prefill else 1
    shp = cfg.state_shapes()
    layer_wkv = list(shp["wkv"][1:])
    inputs = [helper.make_tensor_value_info("tokens", TensorProto.INT64, [T]),
              helper.make_tensor_value_info("shift_in", f, list(shp["shift"]))]
    inputs += [helper.make_tensor_value_info(f"wkv_in.{i}", f, layer_wkv) for i in range(L)]
    outputs = [helper.make_tensor_value_info("logits", f, [V]),
               helper.make_tensor_value_info("shift_out", f, list(shp["shift"]))]
    outputs += [helper.make_tensor_value_info(f"wkv_out.{i}", f, layer_wkv) for i in range(L)]
    return finish_model(g, "rwkv_prefill" if prefill else "rwkv_step", inputs, outputs, f, fused)


FP16_VERSIONS = RESCALE_VERSIONS


def emit(model: ir.Model, out_dir: str, dtype=np.float32, policy: LoweringPolicy | None = None,
         progress=None) -> dict[str, str]:
    """Write step.onnx, prefill.onnx and weights.bin into out_dir under `policy` (default: LoweringPolicy(),
    plain ONNX operators). Returns {entry point: file name}.

    dtype float16: weights and activations in fp16 (the recurrences, their state, the group norms and the
    decays in float32, through Cast nodes; the graphs' inputs and outputs stay float32), with the layer
    rescaling of `rescale_plan` (policy.rescale_every=0: none)."""
    policy = policy if policy is not None else LoweringPolicy()
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float16):
        raise ValueError(f"emit: compute dtype must be float32 or float16, got {dtype}")
    if dtype == np.float16 and model.config.version not in FP16_VERSIONS:
        raise ValueError(f"float16 lowering of RWKV-v{model.config.version} is not implemented; use float32")
    store = WeightStore(os.path.join(out_dir, "weights.bin"), dtype)
    try:
        files = {}
        for entry, prefill in (("step", False), ("prefill", True)):
            m = build_graph(model, store, prefill, policy)
            fn = f"{entry}.onnx"
            with open(os.path.join(out_dir, fn), "wb") as f:
                f.write(m.SerializeToString())
            files[entry] = fn
            if progress:
                progress(entry)
        from .batch import emit_batch   # B sequences a step (a server's batched decode), where it lowers
        files.update(emit_batch(model, store, policy, out_dir))
    finally:
        store.close()
    return files
