"""`lazy-emb`: the embedding table stays on disk, memory-mapped; a token reads only its own row.

The IR side is a representation of the (V, C) table, rwkvc.weights.lazy.LazyEmbedding(w, storage); the cpu
lowering (rwkvc.targets.onnx.embedding) writes the table, with ln0 folded in, in its own page-aligned region
of the weight file in the chosen row format and reads it with a Gather, so:

* ONNX Runtime memory-maps external initializers that no kernel pre-packs, and a Gather touches only
  the pages of the rows it reads: the table is never copied into the process, and a decoded token
  reads C x (1, 2 or 4) bytes (plus the page around it) instead of being charged for the table.
* storage=float16 halves and storage=int8 (symmetric per row, rwkvc.weights.int8.quantize_int8) quarters
  the bytes each row costs, on disk and in the page cache.
"""
from __future__ import annotations

from rwkvc import ir
from rwkvc.weights.lazy import STORAGES, LazyEmbedding

from . import Param, register
from .common import fmt_bytes


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
