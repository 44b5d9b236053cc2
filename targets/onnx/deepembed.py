"""RWKV-7a's DeepEmbed channel-mix in ONNX (rwkvc.weights.deepembed): the tables and the per-token multiplier.

    xk ─ K ─ relu² ─────────(×)─ V ─► y
    x ─ s1 ─► (T, 1, D) ─┐   │
    tokens ─ Gather ─► (T, D, D) ─ MatMul ─► (T, D) ─ s2, + s0 ─► (T, F)

The tables are stored merged (s_emb + ln0(emb) @ s_emb_x^T, computed at compile time) and read with a Gather of
the tokens' rows (one row of D*D values a token and layer):

    DEEP_TABLES   table kind -> fn(g, table, i, tokens) -> the rows (n, D*D) in the compute dtype
        deepembed       the merged table in the compute dtype (the runtime holds it in memory, rwkvc.abi.resident)
        deepembed-lazy  the merged table in its own page-aligned region of the weight file, rows in float32,
                        float16 or int8 with a scale per row: ONNX Runtime memory-maps it and a Gather touches
                        only the pages of the rows it reads

The multiplier is plain operators in every graph; the fused float32 step keeps rwkvc's kernels for the rest
of the layer (Rwkv7Mix1, the key and value products, ReluSquare)."""
from __future__ import annotations

from typing import Callable

import numpy as np
from onnx import helper

from rwkvc import ir
from rwkvc.abi import DEEP_EMBED_DENSE
from rwkvc.errors import RwkvcError
from rwkvc.weights.int8 import quantize_int8

from .graph import Graph, shifted


def table_dense(g: Graph, table, i: int, tokens: str) -> str:
    """Rows (n, D*D) of the merged table, stored once in the compute dtype."""
    return g.op("Gather", g.weight(f"blocks.{i}{DEEP_EMBED_DENSE}", table.merged), tokens, axis=0)


def table_lazy(g: Graph, table, i: int, tokens: str) -> str:
    """Rows (n, D*D) of the merged table in its storage, read row by row from the memory-mapped weight file."""
    p = f"blocks.{i}.ffn.s_emb."
    if table.storage == "int8":
        store = g.store
        if p + "q8" not in store.entries:
            q, s = quantize_int8(table.merged())
            store.add(p + "q8", q, np.int8)
            store.add(p + "q8scale", s[:, None], np.float32)
        for n in ("q8", "q8scale"):
            g.inits[p + n] = store.entries[p + n]
        rows = g.op("Cast", g.op("Gather", p + "q8", tokens, axis=0), to=1)
        x = g.op("Mul", rows, g.op("Gather", p + "q8scale", tokens, axis=0))        # (n, D*D) float32
        return x if g.dtype == np.float32 else g.op("Cast", x, to=helper.np_dtype_to_tensor_dtype(g.dtype))
    dt = np.dtype(table.storage)
    x = g.op("Gather", g.weight(p + table.storage, table.merged, dt), tokens, axis=0)
    return x if dt == g.dtype else g.op("Cast", x, to=helper.np_dtype_to_tensor_dtype(g.dtype))


DEEP_TABLES: dict[str, Callable[[Graph, object, int, str], str]] = {
    "deepembed": table_dense, "deepembed-lazy": table_lazy}


def row_tokens(g: Graph, x: str, prefill: bool) -> str:
    """The tokens of x's rows: the step's token; in a prefill the last n tokens, n = x's row count (the last
    layer's channel-mix runs on the last two rows only)."""
    if not prefill:
        return "tokens"
    n = g.op("Shape", x, start=0, end=1)                                             # (1,)
    return g.op("Slice", "tokens", g.op("Neg", n), g.const([2 ** 62]), g.const([0]))


def deep_multiplier(g: Graph, ffn: ir.ChannelMix, x: str, i: int, prefill: bool) -> str:
    """(x @ s1) @ table[token].view(D, D) @ s2 + s0 for each row of x (T, C), the channel-mix's input (ln2's
    output): the (T, F) factor of its hidden units."""
    de, p = ffn.deep, f"blocks.{i}.ffn."
    if ffn.sparse is not None:   # the sparse FFN's lowering has no place for the multiplier: refuse, never drop it
        raise RwkvcError(f"blocks.{i}: a sparse FFN on an RWKV-7a DeepEmbed channel-mix is not lowered; "
                         "drop sparse-ffn from the recipe")
    D = de.rank
    rows = DEEP_TABLES[de.table.kind](g, de.table, i, row_tokens(g, x, prefill))   # (T, D*D)
    rows = g.op("Reshape", rows, g.const([-1, D, D]))                               # (T, D, D)
    a = g.op("Unsqueeze", g.op("MatMul", x, g.weight(p + "s1", de.s1)), g.const([1]))  # (T, 1, D)
    ss = g.op("Reshape", g.op("MatMul", a, rows), g.const([-1, D]))                 # (T, D)
    return g.op("Add", g.op("MatMul", ss, g.weight(p + "s2", de.s2)), g.weight(p + "s0", de.s0))   # (T, F)


def emit_channel_mix_v7a(g: Graph, ffn: ir.ChannelMix, x: str, prev: str, i: int, prefill: bool) -> str:
    """The plain graph's RWKV-7a channel-mix: relu(K xk)^2 scaled by the DeepEmbed multiplier, then V."""
    from .kinds import linear
    p = f"blocks.{i}.ffn."
    xk = g.op("Add", x, g.op("Mul", g.op("Sub", shifted(g, x, prev, prefill), x), g.weight(p + "x_k", ffn.mix["x_k"])))
    k = g.op("Relu", linear(g, ffn.lin["key"], xk))
    h = g.op("Mul", g.op("Mul", k, k), deep_multiplier(g, ffn, x, i, prefill))
    return linear(g, ffn.lin["value"], h)


def emit_channel_mix_v7a_fused(g: Graph, ffn: ir.ChannelMix, xf: str, xk: str, i: int, prefill: bool) -> str:
    """The fused graphs' RWKV-7a FFN after Rwkv7Mix1 (xf = ln2's output, xk its token-shift mix): the key and
    value products on rwkvc's matrix-vector kernels where they join, ReluSquare, the multiplier between."""
    from rwkvc.abi import FUSED_DOMAIN

    from .kinds import linear
    from .matvec import matvec_product
    key, value = ffn.lin["key"], ffn.lin["value"]
    k = (None if prefill else matvec_product(g, key, xk)) or linear(g, key, xk)
    h = g.op("Mul", g.op("ReluSquare", k, domain=FUSED_DOMAIN), deep_multiplier(g, ffn, xf, i, prefill))
    return (None if prefill else matvec_product(g, value, h)) or linear(g, value, h)
