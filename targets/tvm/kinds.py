"""The closed table of the TVM lowering: IR weight kind -> how it is stored in weights.bin and multiplied.

    LINEAR_LOWERINGS   a matrix of each kind: its packed arrays and its kernel call; composite kinds
                       (factored, scaled, clustered) lower their parts through the parts' own kinds
    ROW_LOWERINGS      the kinds a kernel can read one row at a time (the sparse FFN's units, the
                       clustered head's tokens): their row-major arrays and the rows kernels' operands
    EMBED_LOWERINGS    the embedding's kinds: its arrays and the gather of the tokens' rows

Quantised kinds keep their codes packed in weights.bin (int8: 1 byte, int4: half a byte per weight, in
panels) and their kernels dequantise in registers inside the k loop. The targets declare
`weight_kinds()` as their capabilities.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from rwkvc import ir
from rwkvc.errors import RwkvcError
from rwkvc.weights.embedding import folded_lazy

from .base import F32, KernelShape, relax
from .context import Ctx
from .params import Streamed, int8_rows, pad_rows, panels
from .sparse_kernels import combine_kernel, rows_kernel, select_clusters_kernel


def _no_parts(rep) -> dict:
    return {}


def _no_signature(rep) -> tuple:
    return ()


@dataclass(frozen=True)
class LinearLowering:
    """How one weight representation is stored in weights.bin and multiplied."""
    params: Callable[[ir.Linear, KernelShape], dict[str, np.ndarray]]   # suffix -> array
    emit: Callable[[Ctx, str, ir.Linear, object], object]               # (ctx, rel name, lin, x) -> y
    parts: Callable[[object], dict] = _no_parts             # the nested representations (name -> rep)
    signature: Callable[[object], tuple] = _no_signature    # what besides the arrays' shapes decides the code
    head_only: bool = False                                 # lowered only as the model's head


# ----------------------------------------------------------------------------------------------
# Matrices


def _dense_params(lin: ir.Linear, ks: KernelShape) -> dict:
    return {"wp": panels(lin.weight.w, ks.panel, ks.weights, np.float32)}


def _dense_emit(ctx: Ctx, rel: str, lin: ir.Linear, x):
    return ctx.dense(x, ctx.W[rel + ".wp"], lin.out_features)


def _lowrank_params(lin: ir.Linear, ks: KernelShape) -> dict:
    lr = lin.weight
    d = {"ap": panels(lr.a, ks.panel, ks.weights, np.float32), "bp": panels(lr.b, ks.panel, ks.weights, np.float32)}
    if lr.diag is not None:
        d["diag"] = np.asarray(lr.diag, np.float32)
    return d


def _activation(ctx: Ctx, h, act):
    if act in ("relu", "relu2"):
        h = ctx.emit(relax.op.nn.relu(h))
        if act == "relu2":
            h = ctx.emit(relax.op.multiply(h, h))
    return h


def _lowrank_emit(ctx: Ctx, rel: str, lin: ir.Linear, x):
    lr = lin.weight
    h = _activation(ctx, ctx.dense(x, ctx.W[rel + ".ap"], lr.rank), lr.act)    # (T, rank)
    y = ctx.dense(h, ctx.W[rel + ".bp"], lr.b.shape[0])                    # (T, out)
    if lr.diag is not None:
        y = ctx.emit(relax.op.add(y, relax.op.multiply(x, ctx.W[rel + ".diag"])))
    return y


def _int8_params(lin: ir.Linear, ks: KernelShape) -> dict:
    """int8 codes in panels (NB, K, P) as stored (1 byte per weight), the scales padded to NB*P."""
    w = lin.weight
    return {"q8p": panels(w.q, ks.panel, np.int8),
            "q8scale": pad_rows(np.asarray(w.scale, np.float32), ks.panel)}


def _int8_emit(ctx: Ctx, rel: str, lin: ir.Linear, x):
    return ctx.int8(x, ctx.W[rel + ".q8p"], ctx.W[rel + ".q8scale"], lin.out_features)


def _int4_params(lin: ir.Linear, ks: KernelShape) -> dict:
    """The MatMulNBits bytes re-laid as panels: codes (NB, Kp/2, P) uint8 (two codes per byte along K,
    low nibble first, as stored), scales (NB, nb, P) f32 and zero points (NB, nb, P) uint8 per group."""
    w = lin.weight
    return {"q4p": panels(w.packed, ks.panel, np.uint8),          # (N, nb, half) read as (N, nb * half)
            "q4scales": panels(w.scales, ks.panel, np.float32),
            "q4zeros": panels(w.zero_points(), ks.panel, np.uint8)}


def _int4_emit(ctx: Ctx, rel: str, lin: ir.Linear, x):
    w = lin.weight
    return ctx.nbit(x, ctx.W[rel + ".q4p"], lin.out_features, 4, w.group, ctx.W[rel + ".q4scales"],
                    ctx.W[rel + ".q4zeros"])


def _sub(lin: ir.Linear, suffix: str, rep) -> ir.Linear:
    return ir.Linear(f"{lin.name}.{suffix}", rep)


def _nested_params(lin: ir.Linear, ks: KernelShape, parts: dict) -> dict:
    d = {}
    for suffix, rep in parts.items():
        sub = _sub(lin, suffix, rep)
        d.update({f"{suffix}.{k}": v for k, v in LINEAR_LOWERINGS[sub.kind].params(sub, ks).items()})
    return d


def _factored_parts(f) -> dict:
    return {"a": f.a, "b": f.b}


def _factored_params(lin: ir.Linear, ks: KernelShape) -> dict:
    f = lin.weight
    d = _nested_params(lin, ks, _factored_parts(f))
    if f.diag is not None:
        d["diag"] = np.asarray(f.diag, np.float32)
    return d


def _factored_emit(ctx: Ctx, rel: str, lin: ir.Linear, x):
    f = lin.weight
    h = _activation(ctx, linear(ctx, rel + ".a", _sub(lin, "a", f.a), x), f.act)
    y = linear(ctx, rel + ".b", _sub(lin, "b", f.b), h)
    if f.diag is not None:
        y = ctx.emit(relax.op.add(y, relax.op.multiply(x, ctx.W[rel + ".diag"])))
    return y


def _scaled_parts(s) -> dict:
    return {"inner": s.inner}


def _scaled_params(lin: ir.Linear, ks: KernelShape) -> dict:
    return {**_nested_params(lin, ks, _scaled_parts(lin.weight)),
            "in_scale": np.asarray(lin.weight.in_scale, np.float32)}


def _scaled_emit(ctx: Ctx, rel: str, lin: ir.Linear, x):
    xs = ctx.emit(relax.op.multiply(x, ctx.W[rel + ".in_scale"]))
    return linear(ctx, rel + ".inner", _sub(lin, "inner", lin.weight.inner), xs)


def _head_rows(ch):
    """The clustered head's rows as a representation (a plain array is dense)."""
    return ch.rows if hasattr(ch.rows, "kind") else ir.Dense(ch.rows)


def _clustered_parts(ch) -> dict:
    return {"cluster": ch.cluster, **({"rows": ch.rows} if hasattr(ch.rows, "kind") else {})}


def _clustered_params(lin: ir.Linear, ks: KernelShape) -> dict:
    """cluster.*: the cluster head as its own kind; rows: (V, C) row-major, one row per token in cluster
    order (ROW_LOWERINGS: float in ks.weights, or int8 codes + per-row scales) so the kernel reads only
    chosen clusters, any other kind through its own lowering; bounds (K+1,) int64; lq: log |c| (K,) or
    the prior log q (V,); order (V,) int32: row -> token id."""
    ch = lin.weight
    d = _nested_params(lin, ks, {"cluster": ch.cluster})
    rows = _head_rows(ch)
    if rows.kind in ROW_LOWERINGS:
        rl = ROW_LOWERINGS[rows.kind]
        d.update(zip(rl.head_names, rl.arrays(rows, False, ks)))
    else:
        d.update(_nested_params(lin, ks, {"rows": rows}))
    d["bounds"] = np.asarray(ch.bounds, np.int64)
    d["lq"] = (ch.row_log_prior() if ch.log_prior is not None
               else np.log(np.maximum(np.diff(ch.bounds), 1)).astype(np.float32))
    d["order"] = np.asarray(ch.order, np.int32)
    return d


def _clustered_emit(ctx: Ctx, rel: str, lin: ir.Linear, x):
    """The hierarchical head of one token, x (1, C) -> (1, V) (the same function as the cpu artifact's):

        x ─► cluster head ─► log_softmax, exp ─► select_clusters ─► chosen (K,) 0/1
        x ─► rows kernel (only the chosen clusters' rows are read) ─► exact (V,) in row order
        combine: exact where chosen, else logsumexp(exact) + log p_c - log sum_chosen p + log q_r,
                 scattered to token order
    """
    ch = lin.weight
    V, C = ch.shape
    K = ch.n_clusters
    W, op, em = ctx.W, relax.op, ctx.emit
    z = em(op.reshape(linear(ctx, rel + ".cluster", _sub(lin, "cluster", ch.cluster), x), [K]))
    logp = em(op.nn.log_softmax(z, axis=0))
    prob = em(op.exp(logp))
    vec = lambda n, dt=F32: relax.TensorType([n], dt)  # noqa: E731
    sel = ctx.kernel(("select", K, ch.top_p, ch.min_k, ch.max_k),
                     lambda: select_clusters_kernel(K, ch.top_p, ch.min_k, ch.max_k))
    bounds = W[rel + ".bounds"]
    chosen = em(relax.TupleGetItem(em(relax.call_tir(sel, [prob, bounds], [vec(K), vec(1, "int64")])), 0))
    rows = _head_rows(ch)
    if rows.kind in ROW_LOWERINGS:
        rl = ROW_LOWERINGS[rows.kind]
        variant, args = rl.operands(ctx, x, [W[f"{rel}.{n}"] for n in rl.head_names])
        gv = ctx.kernel(("rows", K, V, C, variant), lambda: rows_kernel(K, V, C, ctx.ks.lanes, variant))
        exact = em(relax.call_tir(gv, args + [chosen, bounds], vec(V)))
    else:
        exact = em(op.reshape(linear(ctx, rel + ".rows", _sub(lin, "rows", ch.rows), x), [V]))
    prior = ch.log_prior is not None
    gv = ctx.kernel(("combine", K, V, prior), lambda: combine_kernel(K, V, prior))
    out = em(relax.call_tir(gv, [exact, logp, prob, chosen, bounds, W[rel + ".lq"], W[rel + ".order"]], vec(V)))
    return em(op.reshape(out, [1, V]))


LINEAR_LOWERINGS: dict[str, LinearLowering] = {
    "dense": LinearLowering(_dense_params, _dense_emit),
    "lowrank": LinearLowering(_lowrank_params, _lowrank_emit, signature=lambda r: (r.act,)),
    "int8": LinearLowering(_int8_params, _int8_emit),
    "int4": LinearLowering(_int4_params, _int4_emit, signature=lambda r: (r.in_features, r.group)),
    "factored": LinearLowering(_factored_params, _factored_emit, _factored_parts, lambda r: (r.act,)),
    "scaled": LinearLowering(_scaled_params, _scaled_emit, _scaled_parts),
    "clustered": LinearLowering(_clustered_params, _clustered_emit, _clustered_parts,
                                lambda r: (r.top_p, r.min_k, r.max_k, r.log_prior is not None), head_only=True),
}


def linear(ctx: Ctx, rel: str, lin: ir.Linear, x):
    return LINEAR_LOWERINGS[lin.kind].emit(ctx, rel, lin, x)


def rep_signature(rep) -> tuple:
    """What, besides the parameters' shapes, decides the code a representation lowers to."""
    low = LINEAR_LOWERINGS[rep.kind]
    return (rep.kind, *low.signature(rep), *(rep_signature(c) for c in low.parts(rep).values()))


def check_rep(name: str, rep) -> None:
    """Refuse a representation (or a part of one) that the table cannot lower where it stands."""
    if rep.kind not in LINEAR_LOWERINGS:
        raise RwkvcError(f"the TVM targets have no kernel for weight representation {rep.kind} ({name}; they "
                         f"lower {', '.join(sorted(LINEAR_LOWERINGS))}); drop the pass that made it or use --target cpu")
    low = LINEAR_LOWERINGS[rep.kind]
    if low.head_only and name != "head":
        raise RwkvcError(f"the TVM targets lower a {rep.kind} matrix only as the head, not {name}")
    for sub, r in low.parts(rep).items():
        check_rep(f"{name}.{sub}", r)


# ----------------------------------------------------------------------------------------------
# Matrices read one row at a time


@dataclass(frozen=True)
class RowLowering:
    """A matrix stored one row per output (a sparse FFN unit, a head token), so a kernel reads only the
    rows it needs; the rows kernels (sparse_kernels) take its operands first."""
    arrays: Callable[[object, bool, KernelShape], tuple]    # (rep, transposed, ks) -> its arrays, row-major
    operands: Callable[[Ctx, object, list], tuple]          # (ctx, x, the arrays) -> (kernel variant, args)
    ffn_names: tuple[str, ...]                              # the arrays' names in a sparse FFN layer (ffn.{m}.*)
    head_names: tuple[str, ...]                             # and in the clustered head (head.*)


def _dense_rows(w, transposed: bool, ks: KernelShape) -> tuple:
    return (Streamed.of(w.w.T if transposed else w.w, ks.weights, np.float32),)


def _dense_row_operands(ctx: Ctx, x, ws: list) -> tuple:
    return str(ws[0].ty.dtype), [x, ws[0]]


def _int8_rows(w, transposed: bool, ks: KernelShape) -> tuple:
    return Streamed.of(w.q.T if transposed else w.q, np.int8), np.asarray(w.scale, np.float32)


def _int8_row_operands(ctx: Ctx, x, ws: list) -> tuple:
    """x quantised as ONNX's DynamicQuantizeLinear (once per distinct input), int32 dot products."""
    xc, xs = ctx.quantize(x)
    return "int8", [xc, xs, *ws]


ROW_LOWERINGS: dict[str, RowLowering] = {
    "dense": RowLowering(_dense_rows, _dense_row_operands, ("rows",), ("rows",)),
    "int8": RowLowering(_int8_rows, _int8_row_operands, ("q8rows", "q8scale"), ("rows.q8", "rows.q8scale")),
}


# ----------------------------------------------------------------------------------------------
# The embedding: kind -> (its parameters, the rows of the tokens as float32 (T, C))


@dataclass(frozen=True)
class EmbedLowering:
    params: Callable[[ir.Model, KernelShape], dict]         # name -> array
    gather: Callable[[Ctx, object, Callable, object], object]   # (ctx, rep, get(name), tokens) -> x (T, C)


def _dense_emb_params(model: ir.Model, ks: KernelShape) -> dict:
    return {"emb.folded": Streamed.of(folded_lazy(model), ks.weights)}      # (V, C), ln0 folded in


def _gather_folded(ctx: Ctx, get, tokens):
    """The tokens' rows of emb.folded, widened to float32 where it is stored narrower."""
    table = get("emb.folded")
    x = ctx.emit(relax.op.take(table, tokens, axis=0, mode="clip"))
    return x if str(table.ty.dtype) == F32 else ctx.emit(relax.op.astype(x, F32))


def _dense_emb_gather(ctx: Ctx, rep, get, tokens):
    return _gather_folded(ctx, get, tokens)


def _lazy_emb_params(model: ir.Model, ks: KernelShape) -> dict:
    """lazy-emb: the folded table in its storage format; the runner memory-maps weights.bin, so a token
    touches only its row's pages (int8: codes (V, C) and a scale per row (V, 1), as the cpu artifact)."""
    e = model.emb.weight
    if e.storage == "int8":
        q, sc = int8_rows(folded_lazy(model))
        return {"emb.q8": q, "emb.q8scale": sc}
    return {"emb.folded": Streamed.of(folded_lazy(model), e.storage)}


def _lazy_emb_gather(ctx: Ctx, rep, get, tokens):
    if rep.storage != "int8":
        return _gather_folded(ctx, get, tokens)
    op, em = relax.op, ctx.emit
    rows = em(op.astype(em(op.take(get("emb.q8"), tokens, axis=0, mode="clip")), F32))
    return em(op.multiply(rows, em(op.take(get("emb.q8scale"), tokens, axis=0, mode="clip"))))


EMBED_LOWERINGS: dict[str, EmbedLowering] = {
    "dense": EmbedLowering(_dense_emb_params, _dense_emb_gather),
    "lazy": EmbedLowering(_lazy_emb_params, _lazy_emb_gather),
}


def embed(ctx: Ctx, model: ir.Model, get, tokens):
    """x (T, C) float32: the tokens' rows of the embedding, as its parameters store them."""
    return EMBED_LOWERINGS[model.emb.weight.kind].gather(ctx, model.emb.weight, get, tokens)


def weight_kinds() -> frozenset[str]:
    """Every representation kind the TVM lowering handles (the targets' capabilities)."""
    from .deepembed import DEEP_LOWERINGS   # RWKV-7a's tables (deepembed.py imports this module)
    return frozenset(LINEAR_LOWERINGS) | frozenset(EMBED_LOWERINGS) | frozenset(DEEP_LOWERINGS)
