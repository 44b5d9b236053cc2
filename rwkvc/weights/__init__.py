"""The IR's weight representations ("kinds"): one module per kind, each holding the kind's dataclass and
its NumPy math (quantisers, packings, the layouts targets store it in).

    dense      Dense            W (out, in)
    lowrank    LowRank          W ~ B act(A x) (+ diag x), float factors (svd_factor)
    int8       Int8             per-output-channel int8 (quantize_int8, u8_codes, interleave16_int8)
    int4       Int4             group-wise 4-bit, MatMulNBits' layout (quantize_int4, pack_int4, interleave16)
    factored   Factored         a low-rank matrix whose factors are any representation (quantised factors)
    scaled     Scaled           W = Q diag(in_scale) (AWQ)
    clustered  ClusteredHead    the hierarchical head of RWKV-Lite
    lazy       LazyEmbedding    the embedding table read row by row from disk
    sparse     SparseFFN        a channel-mix's activation-sparsity predictors (not a matrix: ChannelMix.sparse)
    embedding  folded_embedding the embedding rows with ln0 folded in
    deepembed  DeepEmbedTable   RWKV-7a's per-token channel-mix tables (resident, or memory-mapped: lazy)

Every kind a `Linear` or the `Embedding` can hold is in WEIGHT_KINDS (closed: passes make these kinds, they
do not add any); each lowering (rwkvc.targets.onnx.kinds, rwkvc.targets.tvm) has its own table of how it
lowers them.
"""
from __future__ import annotations

from .clustered import ClusteredHead
from .deepembed import DeepEmbed, DeepEmbedTable, LazyDeepEmbedTable
from .dense import Dense
from .factored import Factored
from .int4 import Int4
from .int8 import Int8
from .lazy import LazyEmbedding
from .lowrank import LowRank, TwoFactors
from .scaled import Scaled
from .sparse import SparseFFN

WEIGHT_KINDS: dict[str, type] = {cls.kind: cls for cls in (
    Dense, LowRank, Int8, Int4, Factored, Scaled, ClusteredHead, LazyEmbedding, DeepEmbedTable, LazyDeepEmbedTable)}

__all__ = ["WEIGHT_KINDS", "ClusteredHead", "DeepEmbed", "DeepEmbedTable", "Dense", "Factored", "Int4", "Int8",
           "LazyDeepEmbedTable", "LazyEmbedding", "LowRank", "Scaled", "SparseFFN", "TwoFactors"]
