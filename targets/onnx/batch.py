"""The batched decode step and prefill: B independent sequences, each with its own state, advance by one
token (the step) or by T tokens each (the prefill) in one graph call.

    batch_step.onnx  tokens (B,) + shift (B, 2L, C) + wkv.i (B, H, N, N) -> logits (B, V) + the new states
                     (shift: the state's (L, 2, C) as 2L rows; earlier artifacts declare (B, L, 2, C), and
                     BatchPool binds whichever the graph declares)

    batch_prefill.onnx  tokens (B, T) + shift (B, L, 2, C) + wkv.i -> logits of each sequence's last token (B, V)
                        + the new states

B and T are free dimensions: the caller (a server's continuous batching) runs whichever sequences are live at
each step, and prefills equal-length chunks of joining prompts together (no padding: every token of the
(B, T) block is a real one of its sequence). Every matrix is the prefill's (the same initializers in
weights.bin, no second copy), and each product takes all B (B*T) rows at once, so the B rows read each
weight once per step. What is per sequence (token shift, the WKV recurrence, group norm, bonus) is batched
over a leading B axis:

    x (B, C) ─ln1─► mixes with prev = shift[:, l, 0] ─► r k v w a g (B, C) each, one product per Linear
       WKV: S (B,H,N,N) <- S*w + [S@a, v] @ [b; k],  y = S@r          (w,b,k rows (B,H,1,N); a,v,r columns)
       group norm per head, bonus, gate, output ─(+)─► x ─ln2─► relu² FFN with prev = shift[:, l, 1] ─(+)─► x

Where the graph's policy uses rwkvc's fused kernels (fused_supported), the step does its element-wise work on
their batched forms (op set 8, runtimes/ortops/batch.h), a layer as

    Rwkv7Mix6B (residual add, ln1, the six mixes, each row shifted against its own sequence's row)
      ─► the projections ─► Rwkv7WkvStepB (decay, WKV, group norm, bonus, gate for B states) ─► output
      ─► Rwkv7Mix1B (residual add, ln2, the FFN's mix) ─► key ─► ReluSquare ─► value

the two mixes reading their sequences' shift rows straight from shift_in (attribute row, op set 10) and giving
the new ones as (B, 1, C), which one Concat makes shift_out (no Split of the state, no Reshape a row: each
node costs the executor a few us, ~50 of the ~130 nodes a step were those);

and its 4-bit and int8 products gathered as the one-sequence step gathers them (a layer's projections and
LoRAs one node a level, the FFN's key and value one node) into Rwkv7MatMulSet, which computes each row as
Rwkv7MatVecSet does while reading each group of codes once for up to 8 rows, and the other products over rows
(the head) as Rwkv7MatMulQ16 / Q16x8 (the prefill's Rwkv7MatVecQ16 / Q16x8 over the same initializers,
the same numbers). Without the fused kernels (--no-fused) the element-wise work is plain ONNX operators
(emit_time_mix_v7_batched). The prefill runs its products over all B*T rows at once
(sequence-major), shifts each sequence's rows against its own state row, and runs the prefill's chunked
WKV with the B sequences' heads side by side (wkv_chunked_batched); its logits are each sequence's last
token's. Covered: RWKV-7 in float32 with a dense FFN and a dense or
quantised head (no sparse FFN, no clustered head); `batch_supported` says.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from rwkvc import ir
from rwkvc.abi import FUSED_DOMAIN

from .graph import F32, OPSET, Graph, WeightStore, f32, layer_norm, to_compute
from .kinds import EMBEDDERS, linear
from .matvec import matvec_product
from .policy import LoweringPolicy
from .v7 import CHUNK, DECAY_SCALE, emit_channel_mix_v7, v7_projections, wkv_chunks
from .v7_fused import fused_supported

# the prefill's products over many rows -> the batched graphs' (the same inputs, attributes and numbers)
ROWS_OPS = {"Rwkv7MatVecQ16": "Rwkv7MatMulQ16", "Rwkv7MatVecQ16x8": "Rwkv7MatMulQ16x8",
            "Rwkv7MatVecSet": "Rwkv7MatMulSet"}

BATCH_ENTRY = "batch_step"
BATCH_PREFILL_ENTRY = "batch_prefill"


def batch_supported(model: ir.Model, dtype) -> bool:
    """Whether the batched step lowers this model: RWKV-7 in float32, dense FFNs, a head that is no
    clustered one (those choose rows per token)."""
    cfg = model.config
    return (cfg.version == "7" and np.dtype(dtype) == np.float32 and model.head.kind != "clustered"
            and all(b.ffn.sparse is None and b.ffn.version == "7" for b in model.blocks))


def wkv_step_batched(g: Graph, S: str, B_H_N: tuple[int, int], r, logw, k, v, a, b):
    """S (B,H,N,N); r, logw, k, v, a, b (B, C) -> y (B, C), S'. S' = S*w + (S@a)@b + v@k, y = S'@r per
    sequence and head (the two outer products as one rank-2 product, as the one-sequence step)."""
    H, N = B_H_N
    col, row = g.const([-1, H, N, 1]), g.const([-1, H, 1, N])
    w = g.op("Reshape", g.op("Exp", logw), row)
    b, k = g.op("Reshape", b, row), g.op("Reshape", k, row)                             # (B, H, 1, N)
    a, v, r = g.op("Reshape", a, col), g.op("Reshape", v, col), g.op("Reshape", r, col)  # (B, H, N, 1)
    sa = g.op("MatMul", S, a)
    upd = g.op("MatMul", g.op("Concat", sa, v, axis=3), g.op("Concat", b, k, axis=2))   # (B, H, N, N)
    S2 = g.op("Add", g.op("Mul", S, w), upd)
    y = g.op("MatMul", S2, r)                                                           # (B, H, N, 1)
    return g.op("Reshape", y, g.const([-1, H * N])), S2


def wkv_chunked_batched(g: Graph, S: str, B_H_N: tuple[int, int], r, logw, k, v, a, b):
    """S (B,H,N,N); r, logw, k, v, a, b (B*T, C), sequence-major -> y (B*T, C), S'. The prefill's chunked
    WKV (rwkvc.targets.onnx.v7.wkv_chunks, chunks of CHUNK tokens) with the B sequences' heads side by side
    as B*H heads; a sequence's T is padded to whole chunks inside the recurrence only (padding tokens have
    w = 1 and a = b = k = v = r = 0, so they leave each state alone)."""
    H, N = B_H_N
    C, Tc = H * N, CHUNK
    T = g.op("Slice", g.op("Shape", "tokens"), g.const([1]), g.const([2]))             # (1,)
    pad = g.op("Mod", g.op("Sub", g.const([Tc]), g.op("Mod", T, g.const([Tc]))), g.const([Tc]))
    pads = g.op("Concat", g.const([0, 0, 0, 0]), pad, g.const([0]), axis=0)            # [0, 0, 0, 0, pad, 0]
    bt_c = g.op("Concat", g.op("Shape", "tokens"), g.const([C]), axis=0)                # [B, T, C]

    def chunked(x):  # (B*T, C) -> (nC, B*H, Tc, N)
        x = g.op("Pad", g.op("Reshape", x, bt_c), pads)                                 # (B, nC*Tc, C)
        x = g.op("Transpose", g.op("Reshape", x, g.const([0, -1, Tc, H, N])), perm=[1, 0, 3, 2, 4])
        return g.op("Reshape", x, g.const([0, -1, Tc, N]))

    Z = g.op("Transpose", g.op("Reshape", S, g.const([-1, N, N])), perm=[0, 2, 1])     # (B*H, N, N)
    ys, Z2 = wkv_chunks(g, Z, Tc, "BH", N, *(chunked(x) for x in (r, logw, k, v, a, b)))
    y = g.op("Transpose", g.op("Reshape", ys, g.const([0, -1, H, Tc, N])), perm=[1, 0, 3, 2, 4])  # (B, nC, Tc, H, N)
    y = g.op("Slice", g.op("Reshape", y, g.const([0, -1, C])), g.const([0]), T, g.const([1]))    # (B, T, C)
    S2 = g.op("Reshape", g.op("Transpose", Z2, perm=[0, 2, 1]), g.const([-1, H, N, N]))
    return g.op("Reshape", y, g.const([-1, C])), S2


def emit_time_mix_v7_batched(g: Graph, att: ir.TimeMix, x: str, prev: str, S: str, v_first: str | None,
                             cfg: ir.ModelConfig, i: int, wkv=wkv_step_batched):
    """RWKV-7's time-mix for B sequences of one token each (x, prev (B, C)), or with wkv=wkv_chunked_batched
    of T tokens each (x, prev (B*T, C), sequence-major, prev the previous token's rows); S (B, H, N, N)."""
    H, N, C = cfg.n_head, cfg.head_size, cfg.n_embd
    p = f"blocks.{i}.att."
    vec = att.vec
    w32 = lambda name, arr: g.weight(p + name, arr, F32)  # noqa: E731
    xx = g.op("Sub", prev, x)
    xm = {m: g.op("Add", x, g.op("Mul", xx, g.weight(p + m, att.mix[m]))) for m in att.mix}   # the prefill's names
    pr = v7_projections(g, att, xm, i)
    r, k, v = (f32(g, pr[n]) for n in "rkv")
    logw = g.op("Mul", g.op("Sigmoid", g.op("Add", f32(g, pr["w"]), w32("w0", vec["w0"]))), g.const(-DECAY_SCALE, F32))
    iclr = g.op("Sigmoid", g.op("Add", w32("a0", vec["a0"]), f32(g, pr["a"])))
    heads = g.const([-1, H, N])
    kk = g.op("Reshape", g.op("Mul", k, w32("k_k", vec["k_k"])), heads)
    kk = g.op("Div", kk, g.op("Max", g.op("ReduceL2", kk, g.const([-1]), keepdims=1), g.const(1e-12, F32)))
    kk = g.op("Reshape", kk, g.const([-1, C]))
    k = g.op("Mul", k, g.op("Add", w32("k_a_c", 1.0 - vec["k_a"]), g.op("Mul", iclr, w32("k_a", vec["k_a"]))))
    if i == 0:
        v_first = v
    else:
        vg = g.op("Sigmoid", g.op("Add", w32("v0", vec["v0"]), f32(g, pr["vg"])))
        v = g.op("Add", v, g.op("Mul", g.op("Sub", v_first, v), vg))
    y, S2 = wkv(g, S, (H, N), r=r, logw=logw, k=k, v=v, a=g.op("Neg", kk), b=g.op("Mul", kk, iclr))
    yh = g.op("LayerNormalization", g.op("Reshape", y, heads), g.const(np.ones(N), F32), g.const(np.zeros(N), F32),
              axis=-1, epsilon=float(att.ln_x.eps))                                     # group norm (B, H, N)
    y = g.op("Add", g.op("Mul", g.op("Reshape", yh, g.const([-1, C])), w32("ln_x.weight", att.ln_x.weight)),
             w32("ln_x.bias", att.ln_x.bias))
    rk = g.op("Reshape", g.op("Mul", g.op("Mul", r, k), w32("r_k", vec["r_k"])), heads)
    bonus = g.op("Mul", g.op("ReduceSum", rk, g.const([-1]), keepdims=1), g.op("Reshape", v, heads))
    y = to_compute(g, g.op("Add", y, g.op("Reshape", bonus, g.const([-1, C]))))
    return linear(g, att.lin["output"], g.op("Mul", y, pr["g"])), S2, v_first


def emit_block_batched_fused(g: Graph, blk, x: str, dx: str, S: str, v_first: str | None, cfg: ir.ModelConfig,
                             i: int):
    """One RWKV-7 layer of the batched step on rwkvc's batched fused kernels (module docstring): x, dx (B, C)
    the residual stream and its pending addition (added inside Rwkv7Mix6B), S (B, H, N, N); the mixes read the
    sequences' shift rows 2i and 2i + 1 from shift_in (B, L, 2, C) themselves (attribute row). Returns x, dx
    (this layer's FFN output, still to be added), ln1(x) and ln2(x) as (B, 1, C) (the new shift rows), S',
    v_first."""
    att, ffn = blk.att, blk.ffn
    p, pf = f"blocks.{i}.att.", f"blocks.{i}.ffn."
    vec = att.vec
    w32 = lambda name, arr: g.weight(p + name, arr, F32)  # noqa: E731
    names = list(att.mix)
    outs = g.op("Rwkv7Mix6B", x, dx, g.weight(f"blocks.{i}.ln1.weight", blk.ln1.weight),
                g.weight(f"blocks.{i}.ln1.bias", blk.ln1.bias), "shift_in",
                g.weight(p + "x_mix6", np.stack([att.mix[m] for m in names])),
                domain=FUSED_DOMAIN, n_out=2 + len(names), eps=float(blk.ln1.eps), row=2 * i)
    x, xa, xm = outs[0], outs[1], dict(zip(names, outs[2:]))
    # the quantised products gathered as the one-sequence step gathers them (Rwkv7MatVecSet, one node a level
    # of the layer's projections and LoRAs, one for the FFN), which ROWS_OPS turns into Rwkv7MatMulSet
    g.step = True
    pr = v7_projections(g, att, xm, i, fuse=True)
    if i == 0:   # layer 0 has no value residual: placeholders, as the one-sequence step (attribute first=1)
        v_first, vg, v0 = pr["v"], pr["v"], w32("w0", vec["w0"])
    else:
        vg, v0 = pr["vg"], w32("v0", vec["v0"])
    y, S2 = g.op("Rwkv7WkvStepB", pr["r"], pr["w"], pr["k"], pr["v"], pr["a"], vg, v_first, pr["g"], S,
                 w32("w0", vec["w0"]), w32("a0", vec["a0"]), v0, w32("k_k", vec["k_k"]), w32("k_a", vec["k_a"]),
                 w32("r_k", vec["r_k"]), w32("ln_x.weight", att.ln_x.weight), w32("ln_x.bias", att.ln_x.bias),
                 domain=FUSED_DOMAIN, n_out=2, eps=float(att.ln_x.eps), first=int(i == 0))
    dx = matvec_product(g, att.lin["output"], y) or linear(g, att.lin["output"], y)
    x, xf, xk = g.op("Rwkv7Mix1B", x, dx, g.weight(f"blocks.{i}.ln2.weight", blk.ln2.weight),
                     g.weight(f"blocks.{i}.ln2.bias", blk.ln2.bias), "shift_in", g.weight(pf + "x_k", ffn.mix["x_k"]),
                     domain=FUSED_DOMAIN, n_out=3, eps=float(blk.ln2.eps), row=2 * i + 1)
    dx = matvec_product(g, (ffn.lin["key"], ffn.lin["value"]), xk, "relu2")
    if dx is None:
        dx = linear(g, ffn.lin["value"], g.op("ReluSquare", linear(g, ffn.lin["key"], xk), domain=FUSED_DOMAIN))
    g.step = False
    return x, dx, xa, xf, S2, v_first


def build_batch_step(model: ir.Model, store: WeightStore, policy: LoweringPolicy) -> onnx.ModelProto:
    """The batched step graph (module docstring) over `store`, whose weights the prefill graph wrote."""
    return build_batched(model, store, policy, prefill=False)


def build_batch_prefill(model: ir.Model, store: WeightStore, policy: LoweringPolicy) -> onnx.ModelProto:
    """The batched prefill graph (module docstring) over `store`, whose weights the prefill graph wrote."""
    return build_batched(model, store, policy, prefill=True)


def build_batched(model: ir.Model, store: WeightStore, policy: LoweringPolicy, prefill: bool) -> onnx.ModelProto:
    cfg = model.config
    L, C, H, N, V = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size, cfg.vocab_size
    g = Graph(store, store.dtype, policy)
    # the prefill's choices for the products (so its initializers are shared, none is added)
    g.fused, g.step = policy.fused and fused_supported(model, store.dtype), False
    toks = g.op("Reshape", "tokens", g.const([-1])) if prefill else "tokens"
    x = EMBEDDERS[model.emb.weight.kind](g, model, toks)                              # (B*T, C) / (B, C)
    if prefill:
        bt_c = g.op("Concat", g.op("Shape", "tokens"), g.const([C]), axis=0)            # [B, T, C]
        rows_bc = g.const([-1, C])
        seq = lambda t: g.op("Reshape", t, bt_c)  # noqa: E731   (B*T, C) -> (B, T, C)
        last = lambda t: g.op("Reshape", g.op("Slice", seq(t), g.const([-1]), g.const([2 ** 62]), g.const([1])),  # noqa: E731
                              rows_bc)                                                  # (B, C): each one's last row

        def prev_of(t, r):   # the previous token's row for each of B*T: concat(state row, t[:, :-1]) per sequence
            head = g.op("Slice", seq(t), g.const([0]), g.const([-1]), g.const([1]))
            return g.op("Reshape", g.op("Concat", r, head, axis=1), rows_bc)
        wkv = wkv_chunked_batched
    else:
        last = lambda t: t  # noqa: E731
        prev_of = lambda t, r: g.op("Reshape", r, g.const([-1, C]))  # noqa: E731
        wkv = wkv_step_batched
    new_rows, v_first = [], None
    if g.fused and not prefill:   # the step on the batched fused kernels: the new shift rows come as (B, 1, C)
        res = g.const(np.zeros((1, C)), F32)                                          # the pending residual
        for i, blk in enumerate(model.blocks):
            x, res, xa, xf, S2, v_first = emit_block_batched_fused(g, blk, x, res, f"wkv_in.{i}", v_first, cfg, i)
            g.rename(S2, f"wkv_out.{i}")
            new_rows += [xa, xf]
        x = g.op("Add", x, res)
    else:
        # shift (B, L, 2, C) -> 2L values (B, C): [att of layer 0, ffn of layer 0, att of layer 1, ...]
        rows = g.op("Split", g.op("Reshape", "shift_in", g.const([-1, 2 * L, C])), axis=1, num_outputs=2 * L,
                    n_out=2 * L)
    for i, blk in enumerate(model.blocks if not new_rows else ()):
        xa = layer_norm(g, x, blk.ln1, f"blocks.{i}.ln1")
        dx, S2, v_first = emit_time_mix_v7_batched(g, blk.att, xa, prev_of(xa, rows[2 * i]), f"wkv_in.{i}", v_first,
                                                   cfg, i, wkv=wkv)
        g.rename(S2, f"wkv_out.{i}")
        x = g.op("Add", x, dx)
        xf = layer_norm(g, x, blk.ln2, f"blocks.{i}.ln2")
        x = g.op("Add", x, emit_channel_mix_v7(g, blk.ffn, xf, prev_of(xf, rows[2 * i + 1]), i, prefill=False))
        new_rows += [g.op("Reshape", r, g.const([-1, 1, C])) for r in (last(xa), last(xf))]
    logits = linear(g, model.head, layer_norm(g, last(x), model.ln_out, "ln_out"))    # (B, V)
    g.rename(logits, "logits")
    # the step's shift state is (B, 2L, C) (the same memory as (B, L, 2, C)), so the Concat writes shift_out
    # itself (a Reshape into (B, L, 2, C) copied the 2L rows once more: ~60 us a step at 8 x 0.1B)
    shift = ["B", L, 2, C] if prefill else ["B", 2 * L, C]
    if prefill:
        g.nodes.append(helper.make_node("Reshape", [g.op("Concat", *new_rows, axis=1), g.const([-1, L, 2, C])],
                                        ["shift_out"]))
    else:
        g.nodes.append(helper.make_node("Concat", new_rows, ["shift_out"], axis=1))
    f = TensorProto.FLOAT
    layer = ["B", H, N, N]
    inputs = [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["B", "T"] if prefill else ["B"]),
              helper.make_tensor_value_info("shift_in", f, shift)]
    inputs += [helper.make_tensor_value_info(f"wkv_in.{i}", f, layer) for i in range(L)]
    outputs = [helper.make_tensor_value_info("logits", f, ["B", V]),
               helper.make_tensor_value_info("shift_out", f, shift)]
    outputs += [helper.make_tensor_value_info(f"wkv_out.{i}", f, layer) for i in range(L)]
    for node in g.nodes:   # the products over rows: the batched kernels (ROWS_OPS)
        if node.domain == FUSED_DOMAIN and node.op_type in ROWS_OPS:
            node.op_type = ROWS_OPS[node.op_type]
    graph = g.make("rwkv_batch_prefill" if prefill else "rwkv_batch_step", inputs, outputs)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
    if g.fused:
        opsets.append(helper.make_opsetid(FUSED_DOMAIN, 1))
    m = helper.make_model(graph, opset_imports=opsets, producer_name="rwkvc")
    m.ir_version = 9
    return m


def emit_batch(model: ir.Model, store: WeightStore, policy: LoweringPolicy, out_dir: str) -> dict[str, str]:
    """Write batch_step.onnx and batch_prefill.onnx beside the other graphs where batch_supported; {entry
    point: file name}."""
    import os
    if not batch_supported(model, store.dtype):
        return {}
    files = {}
    for entry, build in ((BATCH_ENTRY, build_batch_step), (BATCH_PREFILL_ENTRY, build_batch_prefill)):
        fn = f"{entry}.onnx"
        with open(os.path.join(out_dir, fn), "wb") as f:
            f.write(build(model, store, policy).SerializeToString())
        files[entry] = fn
    return files
