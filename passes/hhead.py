"""`hhead`: the hierarchical (clustered) head of RWKV-Lite, computing exact logits only for the most
probable clusters of the vocabulary; only those clusters' head rows are read.

Result: ir.ClusteredHead (the representation RWKV-Lite checkpoints with a `*-cls.npy` load into), lowered
by rwkvc.targets.onnx.head. Per token, x the head's input:

    p = softmax(Wc x) over K clusters; S = the most probable clusters until their mass reaches `p`
        (at least min_k, at most max_k);
    logit_t = W_t . x                                  for t in a cluster of S (exact)
    logit_t = lse_S + log p_c - log p(S) + log q_t     for t in a cluster c outside S

with q_t a fixed distribution within each cluster (prior=calib: the token's share of its cluster's mean
probability on calibration text; prior=uniform: 1/|c| as RWKV-Lite), so every token has a logit (sampling
with temperature / top-p works unchanged) and the chosen clusters' tokens keep their exact relative odds. With p=1 every
cluster is chosen and the logits are the dense ones.

Weight math (plain functions, each tested):
    cluster_vocab(W, K, X=X)             -> labels (V,): k-means of the head rows compared by their logit
                                            profiles on calibration hidden states X (W S^1/2, S = X^T X / T;
                                            random-row seeding, Lloyd steps, empty clusters re-seeded)
    distill_cluster_head(W, labels, X)   -> Wc (K, C): minimises KL(P_c || softmax(Wc x)) on calibration
                                            hidden states X, P_c = the full head's probability mass per cluster
"""
from __future__ import annotations

import numpy as np
import torch

from rwkvc import ir
from rwkvc.arch.lite import cluster_head_from_labels
from rwkvc.errors import RwkvcError

from . import Param, register
from .common import fmt_bytes


def logit_geometry(W: np.ndarray, X: np.ndarray | None) -> np.ndarray:
    """Features whose Euclidean distances are those of the tokens' logit profiles over the hidden states X:
    |(W_t - W_s) . x|^2 averaged over x = (W_t - W_s) S (W_t - W_s)^T with S = X^T X / T, so W S^(1/2)."""
    W = np.asarray(W, np.float32)
    if X is None:
        return W
    Xt = torch.as_tensor(np.asarray(X, np.float64))
    S = Xt.T @ Xt / Xt.shape[0]
    ev, evec = torch.linalg.eigh(S)
    half = (evec * ev.clamp_min(0).sqrt()) @ evec.T
    return (torch.as_tensor(W, dtype=torch.float64) @ half).float().numpy()


def cluster_vocab(W: np.ndarray, K: int, iters: int = 40, seed: int = 0, X: np.ndarray | None = None,
                  chunk: int = 16384) -> np.ndarray:
    """k-means of the head rows W (V, C) into K clusters -> labels (V,) int64 in 0..K-1, every cluster
    non-empty. With hidden states X (T, C) the rows are compared by their logit profiles on X
    (logit_geometry): tokens that are likely in the same contexts end up together, and frequent tokens
    (large rows) get clusters of their own, which is what makes the top-p cluster choice sharp."""
    g = torch.Generator().manual_seed(seed)
    F = torch.as_tensor(logit_geometry(W, X))
    V = F.shape[0]
    if K > V:
        raise RwkvcError(f"pass hhead: k={K} clusters for a vocabulary of {V}")

    def assign(C):
        lab = torch.empty(V, dtype=torch.long)
        cc = (C * C).sum(1)
        for s in range(0, V, chunk):
            lab[s:s + chunk] = (cc[None] - 2 * F[s:s + chunk] @ C.T).argmin(1)
        return lab

    # seeds: random rows (Forgy), so centroids follow the density of the rows; k-means++ would spend
    # them on outlying rare tokens (measured: +3.8 % vs +2.0 % perplexity on the demo model)
    C = F[torch.randperm(V, generator=g)[:K]].clone()
    for _ in range(iters):
        lab = assign(C)
        sums = torch.zeros_like(C).index_add_(0, lab, F)
        counts = torch.bincount(lab, minlength=K).float()
        C = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], C)
        for j in (counts == 0).nonzero().flatten().tolist():   # re-seed an empty cluster at the worst-fit row
            far = ((F - C[lab]) ** 2).sum(1).argmax()
            C[j] = F[far]
    lab = assign(C).numpy().astype(np.int64)
    counts = np.bincount(lab, minlength=K)
    big = np.argsort(-counts)
    for j, e in enumerate(np.flatnonzero(counts == 0)):   # still empty: take a token from a big cluster
        lab[np.flatnonzero(lab == big[j % len(big)])[0]] = e
    return lab


def cluster_mass(W: torch.Tensor, labels: torch.Tensor, X: torch.Tensor, K: int, chunk: int = 256) -> torch.Tensor:
    """P (T, K): the full head's probability mass of each cluster for each hidden state in X (T, C)."""
    out = []
    for s in range(0, X.shape[0], chunk):
        p = torch.softmax(X[s:s + chunk] @ W.T, -1)
        out.append(torch.zeros(p.shape[0], K).index_add_(1, labels, p))
    return torch.cat(out)


def within_cluster_log_prior(W: np.ndarray, labels: np.ndarray, X: np.ndarray, K: int, floor: float = 1e-3,
                             chunk: int = 256) -> np.ndarray:
    """log q_t (V,) in token order: each token's share of its cluster's mean probability on the hidden
    states X (T, C), mixed with a uniform floor so that no token is impossible; exp sums to 1 per cluster."""
    Wt = torch.as_tensor(np.asarray(W, np.float32))
    Xt = torch.as_tensor(np.asarray(X, np.float32))
    mean = torch.zeros(Wt.shape[0], dtype=torch.float64)
    for s in range(0, Xt.shape[0], chunk):
        mean += torch.softmax(Xt[s:s + chunk] @ Wt.T, -1).sum(0).double()
    lab = torch.as_tensor(labels)
    counts = torch.bincount(lab, minlength=K).double().clamp_min(1)
    mass = torch.zeros(K, dtype=torch.float64).index_add_(0, lab, mean)
    share = mean / mass[lab].clamp_min(1e-300)
    q = (1 - floor) * share + floor / counts[lab]
    return torch.log(q).float().numpy()


def distill_cluster_head(W: np.ndarray, labels: np.ndarray, X: np.ndarray, K: int, steps: int = 300,
                         lr: float = 1e-2, seed: int = 0) -> tuple[np.ndarray, float]:
    """Wc (K, C) trained on hidden states X (T, C) to give each cluster the full head's mass; also the
    final mean KL(P || Q) in nats."""
    Wt = torch.as_tensor(np.asarray(W, np.float32))
    lab = torch.as_tensor(labels)
    Xt = torch.as_tensor(np.asarray(X, np.float32))
    P = cluster_mass(Wt, lab, Xt, K)
    counts = torch.bincount(lab, minlength=K).float().clamp_min(1)
    init = torch.zeros(K, Wt.shape[1]).index_add_(0, lab, Wt) / counts[:, None]   # mean row of each cluster
    Wc = torch.nn.Parameter(init.clone())
    opt = torch.optim.Adam([Wc], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    logP = torch.log(P.clamp_min(1e-12))
    kl = None
    for _ in range(steps):
        logQ = torch.log_softmax(Xt @ Wc.T, -1)
        kl = (P * (logP - logQ)).sum(-1).mean()
        opt.zero_grad()
        kl.backward()
        opt.step()
        sched.step()
    return Wc.detach().numpy().copy(), float(kl.detach())


def selected_fraction(ch: ir.ClusteredHead, X: np.ndarray) -> tuple[float, float]:
    """On hidden states X: (mean fraction of head rows read, mean clusters chosen) per token."""
    cl = ch.cluster.to_dense() if ch.cluster.kind != "lowrank" or ch.cluster.act is None else None
    if cl is None:
        return float("nan"), float("nan")
    p = torch.softmax(torch.as_tensor(np.asarray(X, np.float32)) @ torch.as_tensor(cl).T, -1)
    ps, ids = torch.sort(p, -1, descending=True)
    K = ch.n_clusters
    n = ((torch.cumsum(ps, -1) < ch.top_p).sum(-1) + 1).clamp(min(ch.min_k, K), min(ch.max_k, K))
    sizes = torch.as_tensor(np.diff(ch.bounds)).float()[ids]                      # (T, K) sorted
    rows = (torch.cumsum(sizes, -1).gather(1, (n - 1)[:, None])).squeeze(1)
    return float(rows.mean()) / ch.rows.shape[0], float(n.float().mean())


class _NoHooks:
    """A rwkvc.calib_layers visit that collects nothing (the run's result is the head's input)."""

    def hooks(self, i):
        return None


class HheadPass:
    name = "hhead"
    requires = ()
    forbids_after = ("int8", "int4")
    needs_calibration = True
    params = {
        "k": Param(int, 200, lambda v: 2 <= v <= 65536, "a number of clusters >= 2"),
        "p": Param(float, 0.95, lambda v: 0 < v <= 1, "a cumulative probability in (0, 1] (1: exact logits)"),
        "min_k": Param(int, 12, lambda v: v >= 1, "at least 1"),
        "max_k": Param(int, 100, lambda v: v >= 1, "at least 1 (and >= min_k)"),
        "steps": Param(int, 300, lambda v: 1 <= v <= 100000, "distillation steps"),
        "iters": Param(int, 40, lambda v: 1 <= v <= 1000, "k-means iterations"),
        "tokens": Param(int, 4096, lambda v: v >= 64, "calibration tokens to use (>= 64)"),
        "prior": Param(str, "calib", lambda v: v in ("calib", "uniform"),
                       "calib (the tokens' calibration probability within their cluster) or uniform (RWKV-Lite)"),
    }

    def run(self, model: ir.Model, args: dict, ctx) -> tuple[ir.Model, dict]:
        from rwkvc.calib import calib_tokens
        from rwkvc.calib_layers import LayerRunner
        if model.head.kind != "dense":
            raise RwkvcError(f"pass hhead: the head is already {model.head.kind}; hhead clusters a dense head")
        K = args["k"]
        if args["max_k"] < args["min_k"]:
            raise RwkvcError(f"pass hhead: max_k={args['max_k']} < min_k={args['min_k']}")
        W = np.asarray(model.head.weight.w, np.float32)
        V, C = W.shape
        if K > V:
            raise RwkvcError(f"pass hhead: k={K} clusters for a vocabulary of {V}")
        tokens = calib_tokens(ctx, args["tokens"])
        # block by block (rwkvc.calib_layers): one block's float weights at a time
        X = LayerRunner(model, tokens, simulate=False, progress=getattr(ctx, "progress", False),
                        desc="hhead").run(_NoHooks()).numpy()
        labels = cluster_vocab(W, K, iters=args["iters"], X=X)
        Wc, kl = distill_cluster_head(W, labels, X, K, steps=args["steps"])
        exact = args["p"] >= 1.0
        ch = cluster_head_from_labels(W, labels, ir.Dense(Wc), top_p=min(args["p"], 1.0),
                                      min_k=K if exact else min(args["min_k"], K),
                                      max_k=K if exact else max(min(args["max_k"], K), min(args["min_k"], K)))
        if args["prior"] == "calib":
            ch.log_prior = within_cluster_log_prior(W, labels, X, K)[ch.order]
        model.head = ir.Linear(model.head.name, ch)
        frac, n_chosen = selected_fraction(ch, X)
        sizes = np.diff(ch.bounds)
        read = Wc.nbytes + frac * W.nbytes
        summary = (f"head clustered into {K} (sizes {sizes.min()}..{sizes.max()}), cluster head KL {kl:.4f}; "
                   f"{n_chosen:.1f} clusters = {frac:.1%} of head rows read per token on calibration text; "
                   f"head bytes read {fmt_bytes(W.nbytes)} -> {fmt_bytes(read)}")
        return model, {"clusters": K, "cluster_sizes": [int(sizes.min()), int(np.median(sizes)), int(sizes.max())],
                       "distill_kl": kl, "rows_fraction_read": frac, "clusters_chosen": n_chosen,
                       "head_bytes": int(W.nbytes), "head_bytes_read_per_token": int(read),
                       "top_p": ch.top_p, "min_k": ch.min_k, "max_k": ch.max_k, "summary": summary}


HHEAD = register(HheadPass())
