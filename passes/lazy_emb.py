"""`lazy-emb`: the embedding table stays on disk, memory-mapped; a token reads only its own row.

The IR side is a representation of the (V, C) table, `LazyEmbedding(w, storage)`; the cpu lowering
(`emit_onnx.EMBEDDERS["lazy"]`) writes the table, with ln0 folded in, in its own page-aligned region of
the weight file in the chosen row format and reads it with a Gather (int8: Gather of the codes and of
the per-row scales, then one multiply), so:

* ONNX Runtime memory-maps external initializers that no kernel pre-packs, and a Gather touches only
  the pages of the rows it reads: the table is never copied into the process, and a decoded token
  reads C x (1, 2 or 4) bytes (plus the page around it) instead of being charged for the table.
* storage=float16 halves and storage=int8 (symmetric per row) quarters the bytes each row costs, on
  disk and in the page cache.

Weight math: rows_int8(table) -> (q int8 (V, C), scale (V,)), the per-row case of quantize_int8.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from onnx import helper

from rwkvc import emit_onnx, ir

from . import Param, register
from .common import fmt_bytes
from .quant import quantize_int8

STORAGES = ("float32", "float16", "int8")


@ir.register_weight_kind
@dataclass
class LazyEmbedding(ir.Dense):
    """The (V, C) embedding table (as loaded, ln0 not folded), read row by row from disk at run time:
    a dense table (shape, arrays, to_dense as ir.Dense) with its own storage type and lowering."""
    storage: str = "float16"
    kind: ClassVar[str] = "lazy"

    def rows(self, tokens) -> np.ndarray:
        """The rows of `tokens` as the artifact will give them (before ln0)."""
        r = np.asarray(self.w[np.asarray(tokens)], np.float32)
        return r.astype(np.float16).astype(np.float32) if self.storage == "float16" else r

    def row_bytes(self) -> int:
        C = self.w.shape[1]
        return {"float32": 4 * C, "float16": 2 * C, "int8": C + 4}[self.storage]

    def describe(self) -> str:
        return f"lazy (memory-mapped) {self.w.shape[0]}x{self.w.shape[1]} rows in {self.storage}"


def embed_lazy(g, model: ir.Model, tokens: str) -> str:
    """x (T, C) in the compute dtype = folded table[tokens], reading only those rows."""
    e = model.emb.weight
    store = g.store
    if e.storage == "int8":
        if "emb.q8" not in store.entries:
            q, s = quantize_int8(emit_onnx.folded_embedding(model))
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
        store.add(name, emit_onnx.folded_embedding(model), dt)
    g.inits[name] = store.entries[name]
    x = g.op("Gather", name, tokens, axis=0)
    return x if dt == g.dtype else g.op("Cast", x, to=helper.np_dtype_to_tensor_dtype(g.dtype))


def _not_a_matrix(g, lin, x):
    raise ValueError(f"{lin.name}: a lazy embedding table is not a matrix of the blocks")


emit_onnx.LINEAR_EMITTERS["lazy"] = _not_a_matrix      # lets targets see the kind as lowerable
emit_onnx.EMBEDDERS["lazy"] = embed_lazy


class LazyEmbPass:
    name = "lazy-emb"
    requires = ()
    forbids_after = ()
    params = {"storage": Param(str, "float16", lambda v: v in STORAGES, "one of " + ", ".join(STORAGES))}

    def run(self, model: ir.Model, args: dict, ctx) -> tuple[ir.Model, dict]:
        w = model.emb.weight
        table = w.w if hasattr(w, "w") else w.to_dense()
        V, C = table.shape
        new = LazyEmbedding(table, args["storage"])
        before = V * C * 4
        model.emb = ir.Embedding(new, model.emb.name)
        summary = (f"embedding {V}x{C} memory-mapped, rows in {args['storage']}: resident "
                   f"{fmt_bytes(before)} -> rows touched only ({new.row_bytes()} B per token read)")
        return model, {"storage": args["storage"], "table_bytes_dense_f32": before,
                       "table_bytes_on_disk": V * new.row_bytes(), "bytes_resident": 0,
                       "bytes_read_per_token": new.row_bytes(), "summary": summary}


LAZY = register(LazyEmbPass())
