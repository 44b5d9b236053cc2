"""`clustered`: the hierarchical (clustered) head of RWKV-Lite, its rows grouped into clusters of the
vocabulary, only the most probable clusters' rows read per token."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np


@dataclass
class ClusteredHead:
    """The hierarchical (clustered) head of RWKV-Lite: W (V, C) with its rows grouped into K clusters.

    order (V,) int64    token ids sorted by cluster (a permutation of 0..V-1)
    bounds (K+1,) int64 cluster k owns rows order[bounds[k]:bounds[k+1]]
    rows (V, C)         W[order]: the head's rows, cluster by cluster (an array, or a weight representation
                        such as a quantised one: only the chosen clusters' rows are read)
    cluster             a weight representation (K, C) giving cluster logits (Dense, or LowRank with
                        act "relu" for RWKV-Lite's MLP variant head_l1fc2(relu(head_l1fc1 x)))
    top_p, min_k, max_k which clusters get exact logits, per token: the most probable ones until their
                        cumulative probability reaches top_p, at least min_k and at most max_k of them

    Inference (one token, x (C,)):  p = softmax(cluster x); S = the chosen clusters;
        logit_t = rows_t . x                                           for t in a cluster of S
        logit_t = logsumexp_{s in S} logit_s + log p_c - log sum_{S} p + log q_t     for t in cluster c not in S
    so the non-chosen clusters share the mass the cluster head gives them, spread over their tokens by
    q_t = exp(log_prior_t), a fixed distribution within each cluster (rwkvc's hhead pass: the tokens' mean
    probability on calibration text), or evenly (q_t = 1/|c|, RWKV-Lite) when log_prior is None.
    With top_p >= 1 or min_k >= K every logit is exact (`to_dense` is that exact matrix).
    """
    order: np.ndarray
    bounds: np.ndarray
    rows: np.ndarray
    cluster: object
    top_p: float = 0.95
    min_k: int = 3
    max_k: int = 100
    log_prior: np.ndarray | None = None   # (V,) float32 in row order, sums to 1 (as exp) within each cluster
    kind: ClassVar[str] = "clustered"

    def __post_init__(self):
        V = self.rows.shape[0]
        if self.order.shape != (V,) or self.bounds.ndim != 1 or int(self.bounds[0]) != 0 or int(self.bounds[-1]) != V:
            raise ValueError(f"ClusteredHead: order {self.order.shape} / bounds {self.bounds.shape} do not describe {V} rows")
        if np.any(np.diff(self.bounds) < 0):
            raise ValueError("ClusteredHead.bounds must be non-decreasing")
        if tuple(self.cluster.shape) != (self.n_clusters, self.rows.shape[1]):
            raise ValueError(f"ClusteredHead: cluster head shape {tuple(self.cluster.shape)} != (K, C) = "
                             f"{(self.n_clusters, self.rows.shape[1])}")
        if self.log_prior is not None and self.log_prior.shape != (V,):
            raise ValueError(f"ClusteredHead.log_prior {self.log_prior.shape} != ({V},)")
        if not (0 < self.top_p <= 1) or self.min_k < 1 or self.max_k < self.min_k:
            raise ValueError(f"ClusteredHead: need 0 < top_p <= 1 and 1 <= min_k <= max_k, got "
                             f"top_p={self.top_p} min_k={self.min_k} max_k={self.max_k}")

    @property
    def n_clusters(self) -> int:
        return len(self.bounds) - 1

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.rows.shape)

    def row_cluster(self) -> np.ndarray:
        """(V,) int64: the cluster of each row of `rows`."""
        return np.repeat(np.arange(self.n_clusters, dtype=np.int64), np.diff(self.bounds))

    def arrays(self) -> dict[str, np.ndarray]:
        d = {"order": self.order, "bounds": self.bounds}
        if isinstance(self.rows, np.ndarray):
            d["rows"] = self.rows
        else:
            d.update({"rows." + k: v for k, v in self.rows.arrays().items()})
        d.update({"cluster." + k: v for k, v in self.cluster.arrays().items()})
        if self.log_prior is not None:
            d["log_prior"] = self.log_prior
        return d

    def row_log_prior(self) -> np.ndarray:
        """(V,) log q_t in row order: log_prior, or -log |c| (uniform within each cluster)."""
        if self.log_prior is not None:
            return np.asarray(self.log_prior, np.float32)
        return -np.log(np.maximum(np.diff(self.bounds), 1)).astype(np.float32)[self.row_cluster()]

    def rows_dense(self) -> np.ndarray:
        return self.rows if isinstance(self.rows, np.ndarray) else self.rows.to_dense()

    def to_dense(self) -> np.ndarray:
        w = np.empty(tuple(self.rows.shape), np.float32)
        w[self.order] = self.rows_dense()
        return w

    def describe(self) -> str:
        rows = self.rows.dtype if isinstance(self.rows, np.ndarray) else self.rows.describe()
        return (f"clustered {self.shape[0]}x{self.shape[1]} K={self.n_clusters} (cluster head "
                f"{self.cluster.describe()}) top_p={self.top_p} k={self.min_k}..{self.max_k} rows {rows}")

    def quantized(self, q, name: str, rows=None):
        """The cluster head quantised like any matrix by q(name, w), the rows (read row by row) by
        `rows` (default q)."""
        cluster, c1 = self.cluster.quantized(q, name + ".cluster")
        r, c2 = self.rows, False
        if isinstance(r, np.ndarray):
            r, c2 = (rows or q)(name + ".rows", np.asarray(r, np.float32)), True
        if not (c1 or c2):
            return self, False
        return ClusteredHead(self.order, self.bounds, r, cluster, self.top_p, self.min_k, self.max_k, self.log_prior), True
