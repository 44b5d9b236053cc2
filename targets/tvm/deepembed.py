"""RWKV-7a's DeepEmbed channel-mix in Relax (rwkvc.weights.deepembed), for rpi5 and tvm-host.

    xk ─ key ─ relu² ──────────────(×)─ value ─► dx
    x ─ s1 ─► (T, 1, D) ─┐          │
    tokens ─ take ─► (T, D, D) ─ matmul ─► (T, D) ─ s2, + s0 ─► (T, F)

The layer's function takes the tokens (its extra `tokens` argument, Ctx.tokens) and its table, stored merged
(s_emb + ln0(emb) @ s_emb_x^T, computed at compile time) in weights.bin; the runner memory-maps that file, so
a token touches only the pages of its rows.

    DEEP_LOWERINGS   table kind -> (its arrays, the gather of the tokens' rows as float32 (T, D*D))
        deepembed       the merged table in the weight dtype (float32, or float16 with --dtype float16)
        deepembed-lazy  the merged table in its storage: float32, float16, or int8 codes + a scale per row
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from rwkvc import ir
from rwkvc.errors import RwkvcError
from rwkvc.weights.int8 import quantize_int8

from .base import F32, KernelShape, relax
from .context import Ctx


@dataclass(frozen=True)
class DeepLowering:
    params: Callable[[object, KernelShape], dict]     # (table, ks) -> suffix (under ffn.s_emb.) -> array
    gather: Callable[[Ctx, object, object], object]   # (ctx, table, tokens) -> rows (T, D*D) float32


def _take(ctx: Ctx, name: str, tokens):
    """The tokens' rows of ctx.W[name], widened to float32 where stored narrower."""
    table = ctx.W[name]
    x = ctx.emit(relax.op.take(table, tokens, axis=0, mode="clip"))
    return x if str(table.ty.dtype) == F32 else ctx.emit(relax.op.astype(x, F32))


def _dense_params(table, ks: KernelShape) -> dict:
    return {"table": np.ascontiguousarray(table.merged(), ks.weights)}


def _lazy_params(table, ks: KernelShape) -> dict:
    if table.storage == "int8":
        q, s = quantize_int8(table.merged())
        return {"q8": q, "q8scale": s[:, None].astype(np.float32)}
    return {"table": np.ascontiguousarray(table.merged(), table.storage)}


def _gather(ctx: Ctx, table, tokens):
    if getattr(table, "storage", None) != "int8":
        return _take(ctx, "ffn.s_emb.table", tokens)
    op, em = relax.op, ctx.emit
    rows = em(op.astype(em(op.take(ctx.W["ffn.s_emb.q8"], tokens, axis=0, mode="clip")), F32))
    return em(op.multiply(rows, em(op.take(ctx.W["ffn.s_emb.q8scale"], tokens, axis=0, mode="clip"))))


DEEP_LOWERINGS: dict[str, DeepLowering] = {
    "deepembed": DeepLowering(_dense_params, _gather),
    "deepembed-lazy": DeepLowering(_lazy_params, _gather),
}


def deep_params(ffn: ir.ChannelMix, ks: KernelShape) -> list[tuple[str, np.ndarray]]:
    """A DeepEmbed channel-mix's parameters (names relative to blocks.{i}.): the table, s0, s1, s2."""
    de = ffn.deep
    out = [(f"ffn.s_emb.{s}", a) for s, a in DEEP_LOWERINGS[de.table.kind].params(de.table, ks).items()]
    return out + [(f"ffn.{n}", np.asarray(a, np.float32)) for n, a in de.arrays().items()]


def deep_signature(ffn: ir.ChannelMix) -> tuple:
    de = ffn.deep
    return () if de is None else (("deep", de.table.kind, getattr(de.table, "storage", None)),)


def channel_mix_v7a(ctx: Ctx, ffn: ir.ChannelMix, x, prev, prefill: bool):
    """relu(key xk)^2 scaled by (x @ s1) @ table[token].view(D, D) @ s2 + s0, then value; x (T, C) is ln2's
    output."""
    from .kinds import linear
    from .v7 import shifted
    W, op, em = ctx.W, relax.op, ctx.emit
    de = ffn.deep
    if ffn.sparse is not None:   # the sparse FFN's lowering has no place for the multiplier: refuse, never drop it
        raise RwkvcError("a sparse FFN on an RWKV-7a DeepEmbed channel-mix is not lowered; drop sparse-ffn from "
                         "the recipe")
    D, T = de.rank, ctx.rows_of(x)
    xk = em(op.add(x, op.multiply(op.subtract(shifted(ctx, x, prev, prefill), x), W["ffn.x_k"])))
    k = em(op.nn.relu(linear(ctx, "ffn.key", ffn.lin["key"], xk)))
    rows = em(op.reshape(DEEP_LOWERINGS[de.table.kind].gather(ctx, de.table, ctx.tokens), [T, D, D]))
    a = em(op.reshape(op.matmul(x, W["ffn.s1"]), [T, 1, D]))                          # (T, 1, D)
    ss = em(op.reshape(op.matmul(a, rows), [T, D]))                                   # (T, D)
    m = em(op.add(op.matmul(ss, W["ffn.s2"]), W["ffn.s0"]))                           # (T, F)
    return linear(ctx, "ffn.value", ffn.lin["value"], em(op.multiply(op.multiply(k, k), m)))
