"""The clustered (hierarchical) head of RWKV-Lite in ONNX: only the chosen clusters' rows are read, by a row
gather (emit_clustered) or, with rwkvc's fused kernels, one Rwkv7ClusteredHead(Top) node."""
from __future__ import annotations

import numpy as np

from rwkvc import ir
from rwkvc.abi import FUSED_DOMAIN, HEAD_MODE

from .graph import F32, Graph, f32
from .quant import FUSED_ROWS, fused_rows


HEAD_BLOCK = 16   # rows per block of the clustered head's row gather (blocks never straddle two clusters)


def head_blocks(bounds: np.ndarray, B: int = HEAD_BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cluster c's rows bounds[c]:bounds[c+1] cut into ceil(|c| / B) blocks of B row slots; a cluster's last
    block is padded with copies of its last row. -> block_cluster (Nb,) int32, slot_row (Nb, B) int32 and
    slot_pad (Nb, B) float32: 0, or -inf for a padding slot (a copy must not count twice in a logsumexp)."""
    bounds = np.asarray(bounds, np.int64)
    sizes = np.diff(bounds)
    nblk = -(-sizes // B)
    block_cluster = np.repeat(np.arange(len(sizes)), nblk)                                # (Nb,)
    first = np.repeat(np.cumsum(nblk) - nblk, nblk)
    off = (np.arange(len(block_cluster)) - first)[:, None] * B + np.arange(B)             # (Nb, B) within cluster
    size = sizes[block_cluster][:, None]
    slot_row = bounds[block_cluster][:, None] + np.minimum(off, size - 1)
    slot_pad = np.where(off < size, 0.0, -np.inf)
    return block_cluster.astype(np.int32), slot_row.astype(np.int32), slot_pad.astype(np.float32)


def head_rows(ch) -> object:
    """A clustered head's rows as a weight representation (an imported head may hold a bare array)."""
    return ch.rows if hasattr(ch.rows, "kind") else ir.Dense(ch.rows)


def clustered_fusable(g: Graph, ch) -> bool:
    return g.fused and not g.rescale and head_rows(ch).kind in FUSED_ROWS and ch.n_clusters < 2 ** 16


def emit_clustered_fused(g: Graph, lin: ir.Linear, x: str) -> str:
    """The clustered head as one Rwkv7ClusteredHead node after the cluster head's product: the same clusters
    are chosen and the same logits made as in emit_clustered, the chosen clusters' rows read straight from
    the mapped weights (cluster by cluster: no block tables), every other token's logit written in token
    order from a (V,) uint16 cluster table."""
    from . import kinds   # its LINEAR table holds this emitter; the cluster head and rows are any kind
    ch = lin.weight
    V, C = ch.shape
    K = ch.n_clusters
    z = f32(g, g.op("Reshape", kinds.linear(g, ir.Linear(lin.name + ".cluster", ch.cluster), x), g.const([K])))
    rows = head_rows(ch)
    rr, rs = fused_rows(g, ir.Linear(lin.name + ".rows", rows))
    order = np.asarray(ch.order, np.int64)
    token_cluster = np.empty(V, np.uint16)
    token_cluster[order] = ch.row_cluster()
    if ch.log_prior is None:
        lq = g.const(np.zeros(0, np.float32), F32)
    else:
        q = np.empty(V, np.float32)
        q[order] = ch.row_log_prior()
        lq = g.weight(lin.name + ".token_log_prior", q, F32)
    ins = [f32(g, x), z, rr, rs, g.weight(lin.name + ".bounds", np.asarray(ch.bounds, np.int32), np.int32),
           g.weight(lin.name + ".row_token", order.astype(np.int32), np.int32),
           g.weight(lin.name + ".token_cluster16", token_cluster, np.uint16), lq]
    attrs = dict(domain=FUSED_DOMAIN, top_p=float(ch.top_p), min_k=int(min(ch.min_k, K)), max_k=int(min(ch.max_k, K)))
    op = "Rwkv7ClusteredHead" if rows.kind == "int8" else "Rwkv7ClusteredHeadF32"
    if not g.step:
        return g.op(op, *ins, **attrs)
    # the step also gives the top token, and writes no logits when its "head_mode" input is 1 (a greedy step)
    if ch.log_prior is None:
        mlq = g.const(np.zeros(0, np.float32), F32)
    else:
        prior = np.asarray(ch.row_log_prior(), np.float32)
        mlq = g.weight(lin.name + ".cluster_max_log_prior",
                       np.array([prior[a:b].max() if b > a else 0.0 for a, b in zip(ch.bounds[:-1], ch.bounds[1:])],
                                np.float32), F32)
    logits, g.top = g.op(op.replace("Head", "HeadTop"), *ins, mlq, HEAD_MODE, n_out=2, **attrs)
    return logits


def emit_clustered(g: Graph, lin: ir.Linear, x: str) -> str:
    """RWKV-Lite's hierarchical head for one token, x (C,) or (1, C) -> logits (V,) float32.

        x ─► cluster head ─► log p (K,) ─► TopK ─► mass before each rank < top_p ─► chosen (K,) bool
        chosen[block_cluster] ─► NonZero ─► chosen blocks (nb,) ─► their row slots (nb·B,), token ids
        Gemm(x, rows[slots]ᵀ) ─► exact logits of the chosen clusters' rows (padding slots repeat a row)
        approx (K,) = log p + logsumexp(exact) - log Σ_chosen p           (padding slots masked out)
        logits = approx[token_cluster] + log q      (V,) in token order, every token
        ScatterElements(exact at the slots' token ids) ─► logits

    Only the rows of the chosen clusters are read and multiplied. Per token the work over the whole
    vocabulary is one GatherElements from the (K,) table (ONNX Runtime's Gather is ~10x slower per
    element), an Add of log q and the copy inside ScatterElements; the rest is over K clusters,
    Nb ~ V / B + K blocks or the ~n_rows chosen rows. With rwkvc's fused kernels: emit_clustered_fused."""
    if clustered_fusable(g, lin.weight):
        return emit_clustered_fused(g, lin, x)
    from . import kinds   # its LINEAR table holds this emitter; the cluster head and rows are any kind
    ch = lin.weight
    V, C = ch.shape
    K = ch.n_clusters
    z = f32(g, g.op("Reshape", kinds.linear(g, ir.Linear(lin.name + ".cluster", ch.cluster), x), g.const([K])))
    logp = g.op("LogSoftmax", z, axis=0)                                                  # (K,)
    prob = g.op("Exp", logp)
    ps, ids = g.op("TopK", prob, g.const([K]), axis=0, largest=1, sorted=1, n_out=2)     # descending
    # the j-th most probable cluster is chosen iff the clusters before it hold < top_p (n = 1 + #{cumsum < top_p}
    # takes exactly those), forced for j < min_k, excluded for j >= max_k: one compare with a per-rank bound
    lo_n, hi_n = min(ch.min_k, K), min(ch.max_k, K)
    bound = np.where(np.arange(K) < lo_n, np.inf, np.where(np.arange(K) < hi_n, ch.top_p, -np.inf))
    before = g.op("CumSum", ps, g.const(0), exclusive=1)                                  # (K,) mass before rank j
    chosen = g.op("ScatterElements", g.const(np.zeros(K, bool), bool), ids, g.op("Less", before, g.const(bound, F32)),
                  axis=0)                                                                 # (K,) bool

    block_cluster, slot_row, slot_pad = head_blocks(ch.bounds)
    order = np.asarray(ch.order, np.int64)
    in_chosen = g.op("GatherElements", chosen, g.weight(lin.name + ".block_cluster", block_cluster, np.int32), axis=0)
    blocks = g.op("Reshape", g.op("NonZero", in_chosen), g.const([-1]))                  # (nb,)
    slots = g.op("Reshape", g.op("Gather", g.weight(lin.name + ".slot_row", slot_row, np.int32), blocks, axis=0),
                 g.const([-1]))                                                           # (nb·B,) row of each slot
    rows = head_rows(ch)
    exact = kinds.ROWS_MATMUL[rows.kind](g, ir.Linear(lin.name + ".rows", rows), g.op("Reshape", x, g.const([1, C])), slots)
    exact = f32(g, g.op("Reshape", exact, g.const([-1])))                                 # (nb·B,)
    pad = g.op("Reshape", g.op("Gather", g.weight(lin.name + ".slot_pad", slot_pad, F32), blocks, axis=0),
               g.const([-1]))
    lse = g.op("ReduceLogSumExp", g.op("Add", exact, pad), g.const([0]), keepdims=0)
    log_chosen = g.op("Log", g.op("ReduceSum", g.op("Where", chosen, prob, g.const(0.0, F32)), keepdims=0))
    approx = g.op("Add", logp, g.op("Sub", lse, log_chosen))                              # (K,)

    token_cluster = np.empty(V, np.int32)
    token_cluster[order] = ch.row_cluster()
    tc = g.weight(lin.name + ".token_cluster", token_cluster, np.int32)
    if ch.log_prior is None:                                                              # q_t = 1 / |c|
        log_count = g.const(np.log(np.maximum(np.diff(ch.bounds), 1)), F32)
        base = g.op("GatherElements", g.op("Sub", approx, log_count), tc, axis=0)         # (V,) token order
    else:
        lq = np.empty(V, np.float32)
        lq[order] = ch.row_log_prior()
        base = g.op("Add", g.op("GatherElements", approx, tc, axis=0),
                    g.weight(lin.name + ".token_log_prior", lq, F32))                    # + log q_t
    # a padding slot writes its row's logit again (ScatterElements keeps the later write; the same dot product)
    tokens = g.op("Reshape", g.op("Gather", g.weight(lin.name + ".slot_token", order[slot_row].astype(np.int32),
                                                     np.int32), blocks, axis=0), g.const([-1]))
    return g.op("ScatterElements", base, tokens, exact, axis=0)
