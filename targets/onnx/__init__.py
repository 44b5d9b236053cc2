"""The ONNX lowering (IR -> step.onnx, prefill.onnx, weights.bin) that the cpu and cuda targets use.

    graph.py       WeightStore (the external weight file) and Graph (the builder, carrying the policy)
    policy.py      LoweringPolicy: the lowering's choices as one frozen value
    kinds.py       the closed tables weight kind -> lowering (matrices, row gathers, embeddings)
    quant.py       int8 / int4 products (MatMulNBits, MatMulInteger, rwkvc's matrix-vector kernels)
    matvec.py      Rwkv7MatVecSet: a layer's quantised products as one fused node
    v7.py          RWKV-7 in plain ONNX operators (WKV one token / chunked, time-mix, channel-mix)
    v7_fused.py    RWKV-7 on rwkvc's fused kernels
    rwkv456.py     RWKV-4, -5, -6
    sparse_ffn.py  the sparse channel-mix (RWKV-Lite)
    head.py        the clustered head (RWKV-Lite)
    embedding.py   the embedding table (dense, lazy)
    build.py       the two graphs and the artifact's files (emit)
    batch.py       the batched step (B sequences a step, each with its own state) for serving
"""
from __future__ import annotations

from .build import CHANNEL_MIX_EMITTERS, FP16_VERSIONS, TIME_MIX_EMITTERS, emit, rescale_plan
from .hybrid import GRAPH_BUILDERS
from .kinds import LOWERED
from .policy import LoweringPolicy
from .v7_fused import FUSED_MAX_HEAD, fused_supported

VERSIONS = frozenset(TIME_MIX_EMITTERS) & frozenset(CHANNEL_MIX_EMITTERS) | frozenset(GRAPH_BUILDERS)   # lowered

__all__ = ["FP16_VERSIONS", "FUSED_MAX_HEAD", "LOWERED", "VERSIONS", "LoweringPolicy", "emit", "fused_supported",
           "rescale_plan"]
