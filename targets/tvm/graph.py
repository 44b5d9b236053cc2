"""The VM module's functions: the parameters in the VM's order, one private Relax function per distinct
layer signature, and the two entry points.

    step(tokens (1,) int64, shift (L,2,C), wkv (L,H,N,N), params) -> (logits (V,), shift, wkv)
    prefill(tokens (T,) int64, shift, wkv, params)                -> (logits of the last token, shift, wkv)

Per layer, one private Relax function per distinct signature (`block_first` for layer 0 which makes
v_first, `block` for the rest; shared by every layer with the same weight shapes, so kernels are
generated once, not L times).
"""
from __future__ import annotations

import numpy as np

from rwkvc import ir

from .base import F32, KernelShape, relax, tirx
from .context import Ctx
from .kinds import EMBED_LOWERINGS, LINEAR_LOWERINGS, embed, linear, rep_signature
from .params import Params
from .mixers import CHANNEL_MIX_LOWERINGS, TIME_MIX_LOWERINGS, att_vectors, uses_v_first
from .deepembed import deep_params, deep_signature
from .sparse_ffn import predictor_params, rows_params, selective_sparse
from .hybrid import bias_arrays, norm
from .v7 import last_row


def collect_params(model: ir.Model, ks: KernelShape, P: Params | None = None) -> Params:
    """The model's parameters in the VM's order: embedding, blocks, ln_out, head (added to P: a Params over
    the weights file writes each as it comes; a new one holds them)."""
    P = Params() if P is None else P
    for name, arr in EMBED_LOWERINGS[model.emb.weight.kind].params(model, ks).items():
        P.add(name, arr, arr.dtype)
    for i, blk in enumerate(model.blocks):
        for rel, arr in block_arrays(blk, ks):
            P.add(f"blocks.{i}.{rel}", arr, arr.dtype)
    P.add("ln_out.weight", model.ln_out.weight)
    P.add("ln_out.bias", model.ln_out.bias)
    for suffix, arr in LINEAR_LOWERINGS[model.head.kind].params(model.head, ks).items():
        P.add(f"head.{suffix}", arr, arr.dtype)
    return P


def block_arrays(blk: ir.Block, ks: KernelShape) -> list[tuple[str, np.ndarray]]:
    """One block's parameters, names relative to `blocks.{i}.`: vectors float32, matrices as their
    lowering packs them (ks.weights for float matrices; quantised kinds in their own formats)."""
    f32 = lambda n, a: (n, np.asarray(a, np.float32))  # noqa: E731
    out = [f32("ln1.weight", blk.ln1.weight), f32("ln1.bias", blk.ln1.bias)]
    out += [f32(f"att.{m}", v) for m, v in blk.att.mix.items()]
    out += [f32(f"att.{m}", v) for m, v in att_vectors(blk.att).items()]
    for m, lin in blk.att.lin.items():
        out += [(f"att.{m}.{s}", a) for s, a in LINEAR_LOWERINGS[lin.kind].params(lin, ks).items()]
    if blk.att.ln_x is not None:
        out += [f32("att.ln_x.weight", blk.att.ln_x.weight), f32("att.ln_x.bias", blk.att.ln_x.bias)]
    out += [f32("ln2.weight", blk.ln2.weight), f32("ln2.bias", blk.ln2.bias)]
    out += [f32(f"ffn.{m}", v) for m, v in blk.ffn.mix.items()]
    row_read = selective_sparse(blk.ffn)
    if row_read:
        out += rows_params(blk.ffn, ks)           # key and value.T one row per unit
    for m, lin in blk.ffn.lin.items():
        if not (row_read and m in ("key", "value")):
            out += [(f"ffn.{m}.{s}", a) for s, a in LINEAR_LOWERINGS[lin.kind].params(lin, ks).items()]
    if blk.ffn.sparse is not None:
        out += [(f"ffn.sparse.{s}", a) for s, a in predictor_params(blk.ffn.sparse, ks)]
    if blk.ffn.deep is not None:
        out += deep_params(blk.ffn, ks)
    return out + bias_arrays(blk.ffn)


def block_signature(blk: ir.Block) -> tuple:
    """What, besides the arrays' shapes, decides a layer's code: its representations and sparse FFN."""
    sig = tuple((n, rep_signature(lin.weight)) for n, lin in list(blk.att.lin.items()) + list(blk.ffn.lin.items()))
    sp = blk.ffn.sparse
    if sp is not None:
        sig += (("sparse", sp.fc1 is not None, float(sp.mlp_threshold), sp.q_codes is not None, sp.q_bits,
                 float(sp.q_scale), float(sp.q_zero), float(sp.q_quantile)),)
    return sig + deep_signature(blk.ffn)


def emit_block(ctx: Ctx, blk: ir.Block, arrays: list[tuple[str, np.ndarray]], first: bool, prefill: bool, name: str):
    """A private Relax function for one layer:
        (x (T,C), prev (2,C), S (the layer's wkv state), [v_first (T,C)], *weights) -> (x', prev', S', [v_first])
    v_first (RWKV-7): made by layer 0 (an output), taken by the others (an input)."""
    cfg = ctx.cfg
    C = cfg.n_embd
    T = 1 if not prefill else tirx.Var("T", "int64")
    x = relax.Var("x", relax.TensorType([T, C], F32))
    prev = relax.Var("prev", relax.TensorType([2, C], F32))
    S = relax.Var("S", relax.TensorType(list(cfg.state_shapes()["wkv"][1:]), F32))
    vfirst = uses_v_first(blk.att.version)
    vf = relax.Var("v_first", relax.TensorType([T, C], F32)) if vfirst and not first else None
    wvars = [relax.Var(rel.replace(".", "_"), relax.TensorType(list(a.shape), str(a.dtype))) for rel, a in arrays]
    tok = relax.Var("tokens", relax.TensorType([T], "int64")) if blk.ffn.deep is not None else None   # RWKV-7a
    args = [x, prev, S] + ([vf] if vf is not None else []) + ([tok] if tok is not None else []) + wvars
    bb, op = ctx.bb, relax.op
    with bb.function(name, args, private=True):
        ctx.W = {rel: v for (rel, _), v in zip(arrays, wvars)}
        ctx.quantized, ctx.tokens = [], tok
        with bb.dataflow():
            p_att = ctx.emit(op.strided_slice(prev, axes=[0], begin=[0], end=[1]))
            p_ffn = ctx.emit(op.strided_slice(prev, axes=[0], begin=[1], end=[2]))
            W = ctx.W
            xa = norm(ctx, x, W["ln1.weight"], W["ln1.bias"], blk.ln1)
            dx, S2, vf2 = TIME_MIX_LOWERINGS[blk.att.version](ctx, blk.att, xa, p_att, S, vf, first, prefill)
            x2 = ctx.emit(op.add(x, dx))
            xf = norm(ctx, x2, W["ln2.weight"], W["ln2.bias"], blk.ln2)
            x3 = ctx.emit(op.add(x2, CHANNEL_MIX_LOWERINGS[blk.ffn.version](ctx, blk.ffn, xf, p_ffn, prefill)))
            prev2 = ctx.emit(op.concat([last_row(ctx, xa, prefill), last_row(ctx, xf, prefill)], axis=0))
            outs = [x3, prev2, S2] + ([vf2] if vfirst and first else [])
            res = bb.emit_output(relax.Tuple(outs))
        gv = bb.emit_func_output(res)
    ctx.W = {}
    return gv


def emit_entry(ctx: Ctx, model: ir.Model, P: Params, prefill: bool):
    """The `step` (prefill False) or `prefill` entry point: embedding, the layers' functions, ln_out, head."""
    cfg = ctx.cfg
    L, C, V = cfg.n_layer, cfg.n_embd, cfg.vocab_size
    S_shape = list(cfg.state_shapes()["wkv"][1:])                   # one layer's: (H, N, N), v4 (3, C)
    T = 1 if not prefill else tirx.Var("T", "int64")
    tokens = relax.Var("tokens", relax.TensorType([T], "int64"))
    shift = relax.Var("shift", relax.TensorType([L, 2, C], F32))
    wkv = relax.Var("wkv", relax.TensorType([L] + S_shape, F32))
    params = relax.Var("params", relax.TupleType([relax.TensorType(list(P.spec(n).shape), str(P.spec(n).dtype))
                                                   for n in P.names]))

    # one Relax function per distinct layer signature (weight shapes + first/other)
    block_fns: dict[tuple, object] = {}
    per_layer = []
    for i, blk in enumerate(model.blocks):
        arrays = P.group(f"blocks.{i}.")
        first = i == 0 and uses_v_first(blk.att.version)    # layer 0 differs only where it makes v_first
        sig = (first, tuple((rel, a.shape, str(a.dtype)) for rel, a in arrays), block_signature(blk))
        if sig not in block_fns:
            nm = f"{'prefill' if prefill else 'step'}_block{'_first' if first else ''}_{len(block_fns)}"
            block_fns[sig] = emit_block(ctx, blk, arrays, first, prefill, nm)
        per_layer.append((block_fns[sig], [P.index(f"blocks.{i}.{rel}") for rel, _ in arrays]))

    bb, op = ctx.bb, relax.op
    name = "prefill" if prefill else "step"
    with bb.function(name, [tokens, shift, wkv, params]):
        ctx.W, ctx.quantized = {}, []
        with bb.dataflow():
            get = lambda n: ctx.emit(relax.TupleGetItem(params, P.index(n)))  # noqa: E731
            x = embed(ctx, model, get, tokens)                                                              # (T, C)
            v_first, shifts, wkvs = None, [], []
            for i, (gv, idx) in enumerate(per_layer):
                prev = ctx.emit(op.reshape(op.strided_slice(shift, axes=[0], begin=[i], end=[i + 1]), [2, C]))
                S = ctx.emit(op.reshape(op.strided_slice(wkv, axes=[0], begin=[i], end=[i + 1]), S_shape))
                ws = [ctx.emit(relax.TupleGetItem(params, j)) for j in idx]
                tok = [tokens] if model.blocks[i].ffn.deep is not None else []    # RWKV-7a's tables read by token
                out = ctx.emit(relax.Call(gv, [x, prev, S] + ([] if v_first is None else [v_first]) + tok + ws))
                x = ctx.emit(relax.TupleGetItem(out, 0))
                shifts.append(ctx.emit(op.reshape(relax.TupleGetItem(out, 1), [1, 2, C])))
                wkvs.append(ctx.emit(op.reshape(relax.TupleGetItem(out, 2), [1] + S_shape)))
                if i == 0 and uses_v_first(model.blocks[0].att.version):
                    v_first = ctx.emit(relax.TupleGetItem(out, 3))
            xl = last_row(ctx, x, prefill)
            xl = norm(ctx, xl, get("ln_out.weight"), get("ln_out.bias"), model.ln_out)
            ctx.W = {n: get(n) for n in P.names if n.startswith("head.")}
            logits = ctx.emit(op.reshape(linear(ctx, "head", model.head, xl), [V]))
            shift_out = ctx.emit(op.concat(shifts, axis=0)) if L > 1 else shifts[0]
            wkv_out = ctx.emit(op.concat(wkvs, axis=0)) if L > 1 else wkvs[0]
            res = bb.emit_output(relax.Tuple([logits, shift_out, wkv_out]))
        bb.emit_func_output(res)
    ctx.W = {}
