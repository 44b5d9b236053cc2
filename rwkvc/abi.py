"""The contract between the ONNX lowering (rwkvc.targets.onnx) and the runtime (rwkvc.runtimes): names and
numbers both sides read, so neither imports the other."""
from __future__ import annotations

ALIGN = 4096                # weights.bin: tensors of at least this many bytes start on a page boundary

FUSED_DOMAIN = "ai.rwkvc"   # rwkvc's own CPU kernels (rwkvc.runtimes.ortops builds and registers them)
FUSED_VERSION = 10          # the op set's version: 1 the RWKV-7 step / prefill kernels, 2 adds the sparse FFN
                            # and clustered head kernels, 3 the quantised matrix-vector product (Rwkv7MatVecQ),
                            # 4 the clustered head's top token without its logits (Rwkv7ClusteredHeadTop),
                            # 5 tanh and sigmoid between a set's products (a LoRA in Rwkv7MatVecSet),
                            # 6 the sparse FFN with an int8 MLP predictor and 1-bit codes 16 rows together
                            # (Rwkv7SparseFfnQ), 7 the interleaved 4-bit and int8 layouts (Rwkv7MatVecQ16 / Q16x8,
                            # Rwkv7MatVecSet's layouts), 8 the batched step's kernels (Rwkv7Mix1B / Mix6B,
                            # Rwkv7WkvStepB, Rwkv7MatMulQ16 / Q16x8, Rwkv7MatMulSet), 9 the prefill's time-mix as one
                            # kernel (Rwkv7WkvPrefill), 10 the batched mixes' shift rows read from the whole
                            # shift state (Rwkv7Mix1B / Mix6B's attribute row); a library of version n runs
                            # artifacts of 1..n

HEAD_MODE = "head_mode"     # the step's input with a top-token head (Rwkv7ClusteredHeadTop): 1 = the top token only

# (op, input index) of the fused kernels that read only some rows of that input (rwkvc.bench.weight_traffic)
FUSED_ROW_INPUTS = {("Rwkv7ClusteredHeadTop", 2), ("Rwkv7ClusteredHeadTop", 3), ("Rwkv7ClusteredHeadTop", 5),
                    ("Rwkv7ClusteredHeadTopF32", 2), ("Rwkv7ClusteredHeadTopF32", 5),
                    ("Rwkv7SparseFfn", 4), ("Rwkv7SparseFfn", 5), ("Rwkv7SparseFfn", 6),
                    ("Rwkv7SparseFfnF32", 4), ("Rwkv7SparseFfnF32", 6),
                    ("Rwkv7SparseFfnQ", 6), ("Rwkv7SparseFfnQ", 7), ("Rwkv7SparseFfnQ", 8),
                    ("Rwkv7SparseFfnQF32", 6), ("Rwkv7SparseFfnQF32", 8),
                    ("Rwkv7ClusteredHead", 2), ("Rwkv7ClusteredHead", 3), ("Rwkv7ClusteredHead", 5),
                    ("Rwkv7ClusteredHeadF32", 2), ("Rwkv7ClusteredHeadF32", 5)}

DENSE_EMBEDDING = "emb.folded"   # the dense table's initializer (the runtime holds it in memory)
DEEP_EMBED_DENSE = ".ffn.s_emb.merged"   # suffix of a layer's dense RWKV-7a DeepEmbed table (held in memory too)


def resident(name: str) -> bool:
    """Whether the runtime reads this gathered table into memory: the dense embedding and dense DeepEmbed
    tables (a memory-mapped table costs a page fault per new row)."""
    return name == DENSE_EMBEDDING or name.endswith(DEEP_EMBED_DENSE)


def row_read(graph) -> set[str]:
    """Names of an ONNX graph's initializers that are read only by rows: the data of Gather / GatherElements
    nodes, or inputs of rwkvc's fused kernels in FUSED_ROW_INPUTS (the lazy embedding table, a sparse FFN's
    key / value rows, a clustered head's rows). A token reads a few of their rows, never all of them."""
    users: dict[str, list] = {}
    for node in graph.node:
        for j, name in enumerate(node.input):
            users.setdefault(name, []).append((node.op_type, j))
    return {t.name for t in graph.initializer
            if users.get(t.name) and all((op in ("Gather", "GatherElements") and j == 0) or (op, j) in FUSED_ROW_INPUTS
                                         for op, j in users[t.name])}


def token_read(graph) -> set[str]:
    """Names of an ONNX graph's initializers that a Gather indexes by the graph's input `tokens` (directly or
    through shape-only operators): the embedding tables, whose rows a call's tokens name before it runs."""
    shape_only = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast"}
    from_tokens = {"tokens"}
    for node in graph.node:   # (a graph's nodes come in topological order)
        if node.op_type in shape_only and node.input and node.input[0] in from_tokens:
            from_tokens.update(node.output)
    inits = {t.name for t in graph.initializer}
    return {n.input[0] for n in graph.node
            if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] in from_tokens and n.input[0] in inits}
