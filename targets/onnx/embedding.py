"""The embedding's ONNX lowering: the folded table (ln0 applied, rwkvc.weights.embedding.folded_embedding)
and a Gather of the tokens' rows.

    dense  the table in the compute dtype under rwkvc.abi.DENSE_EMBEDDING (the runtime holds it in memory)
    lazy   the table in its own page-aligned region of the weight file in the chosen row format (float32,
           float16, or int8 with a scale per row: a Gather of the codes and of the scales, one multiply).
           ONNX Runtime memory-maps external initializers that no kernel pre-packs, and a Gather touches only
           the pages of the rows it reads: the table is never copied into the process
"""
from __future__ import annotations

import numpy as np
from onnx import helper

from rwkvc import ir
from rwkvc.abi import DENSE_EMBEDDING
from rwkvc.weights.embedding import folded_lazy   # read and written by blocks of rows
from rwkvc.weights.int8 import quantize_int8

from .graph import Graph


def embed_dense(g: Graph, model: ir.Model, tokens: str) -> str:
    """The embedding rows of `tokens`: a Gather from the folded table (ln0 applied), stored once."""
    if DENSE_EMBEDDING not in g.store.entries:
        g.store.add(DENSE_EMBEDDING, folded_lazy(model))
    g.inits[DENSE_EMBEDDING] = g.store.entries[DENSE_EMBEDDING]
    return g.op("Gather", DENSE_EMBEDDING, tokens, axis=0)


def embed_lazy(g: Graph, model: ir.Model, tokens: str) -> str:
    """x (T, C) in the compute dtype = folded table[tokens], reading only those rows."""
    e = model.emb.weight
    store = g.store
    if e.storage == "int8":
        if "emb.q8" not in store.entries:
            q, s = quantize_int8(folded_lazy(model))
            store.add("emb.q8", q, np.int8)
            store.add("emb.q8scale", s[:, None], np.float32)
        for n in ("emb.q8", "emb.q8scale"):
            g.inits[n] = store.entries[n]
        rows = g.op("Cast", g.op("Gather", "emb.q8", tokens, axis=0), to=1)
        x = g.op("Mul", rows, g.op("Gather", "emb.q8scale", tokens, axis=0))        # (T, C) float32
        return x if g.dtype == np.float32 else g.op("Cast", x, to=helper.np_dtype_to_tensor_dtype(g.dtype))
    dt = np.dtype(e.storage)
    name = f"emb.{e.storage}"
    if name not in store.entries:
        store.add(name, folded_lazy(model), dt)
    g.inits[name] = store.entries[name]
    x = g.op("Gather", name, tokens, axis=0)
    return x if dt == g.dtype else g.op("Cast", x, to=helper.np_dtype_to_tensor_dtype(g.dtype))
