"""`lazy-emb`: the embedding table stays on disk, memory-mapped; a token reads only its own row.

The IR side is a representation of the (V, C) table, rwkvc.weights.lazy.LazyEmbedding(w, storage); the cpu
lowering (rwkvc.targets.onnx.embedding) writes the table, with ln0 folded in, in its own page-aligned region
of the weight file in the chosen row format and reads it with a Gather, so:

* ONNX Runtime memory-maps external initializers that no kernel pre-packs, and a Gather touches only
  the pages of the rows it reads: the table is never copied into the process, and a decoded token
  reads C x (1, 2 or 4) bytes (plus the page around it) instead of being charged for the table.
* storage=float16 halves and storage=int8 (symmetric per row, rwkvc.weights.int8.quantize_int8) quarters
  the bytes each row costs, on disk and in the page cache.

RWKV-7a's DeepEmbed tables (one (V, D*D) table per layer's channel-mix, rwkvc.weights.deepembed) are
embedding-like: a token reads one row of each. The pass makes them LazyDeepEmbedTable in the same storage
(tables=all, the default; tables=emb: the embedding only, tables=deep: the DeepEmbed tables only), so a
0.1B RWKV-7a keeps its ~0.8 billion table parameters on disk and reads 12 rows a token.
"""
from __future__ import annotations

from rwkvc import ir
from rwkvc.errors import RwkvcError
from rwkvc.weights.deepembed import LazyDeepEmbedTable
from rwkvc.weights.lazy import STORAGES, LazyEmbedding

from . import Param, register
from .common import fmt_bytes

TABLES = ("all", "emb", "deep")   # which tables the pass keeps on disk: the embedding and RWKV-7a's DeepEmbed tables


class LazyEmbPass:
    name = "lazy-emb"
    requires = ()
    forbids_after = ()
    params = {"storage": Param(str, "float16", lambda v: v in STORAGES, "one of " + ", ".join(STORAGES)),
              "tables": Param(str, "all", lambda v: v in TABLES, "one of " + ", ".join(TABLES))}

    def run(self, model: ir.Model, args: dict, ctx) -> tuple[ir.Model, dict]:
        deep = [blk.ffn.deep for blk in model.blocks if blk.ffn.deep is not None]
        if args.get("tables", "all") == "deep":
            if not deep:
                raise RwkvcError("lazy-emb(tables=deep): this model has no DeepEmbed tables (RWKV-7a); "
                                 "drop tables=deep")
            return model, self.deep_tables(deep, args["storage"], {"storage": args["storage"]}, [])
        w = model.emb.weight
        table = w.w if hasattr(w, "w") else w.to_dense()
        V, C = table.shape
        new = LazyEmbedding(table, args["storage"])
        before = V * C * 4
        model.emb = ir.Embedding(new, model.emb.name)
        summary = (f"embedding {V}x{C} memory-mapped, rows in {args['storage']}: resident "
                   f"{fmt_bytes(before)} -> rows touched only ({new.row_bytes()} B per token read)")
        report = {"storage": args["storage"], "table_bytes_dense_f32": before,
                  "table_bytes_on_disk": V * new.row_bytes(), "bytes_resident": 0,
                  "bytes_read_per_token": new.row_bytes(), "summary": summary}
        if deep and args.get("tables", "all") == "all":
            report = self.deep_tables(deep, args["storage"], report, [summary])
        return model, report

    @staticmethod
    def deep_tables(deep: list, storage: str, report: dict, summary: list[str]) -> dict:
        """Every DeepEmbed table memory-mapped in `storage`; the report's deep_* fields."""
        before = on_disk = per_token = 0
        for de in deep:
            t = de.table
            de.table = LazyDeepEmbedTable(t.s_emb, t.s_emb_x, t.emb, t.ln0, storage)
            V, D2 = t.shape
            before += V * D2 * 4
            on_disk += V * de.table.row_bytes()
            per_token += de.table.row_bytes()
        V, D2 = deep[0].table.shape
        summary.append(f"{len(deep)} DeepEmbed tables {V}x{D2} memory-mapped, rows in {storage}: resident "
                       f"{fmt_bytes(before)} -> rows touched only ({per_token} B per token read)")
        return {**report, "deep_tables": len(deep), "deep_bytes_dense_f32": before, "deep_bytes_on_disk": on_disk,
                "deep_bytes_read_per_token": per_token, "summary": "; ".join(summary)}


LAZY = register(LazyEmbPass())
