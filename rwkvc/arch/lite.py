"""RWKV-Lite (compressed RWKV-5.2, wonkyoc/RWKV-Lite): its checkpoint extensions -> IR representations.

What a RWKV-Lite checkpoint may hold besides the RWKV-5.2 keys, and what rwkvc makes of it:

    att.{receptance,key,value,gate}1/2.weight (R,C)/(C,R)   factorised projection: ir.LowRank
    att.*_diag (C,)                     present: B relu(A x)^2 + diag*x ("x059"); absent: B A x ("x058")
    ffn.receptance1/2 (+ _diag)          the same for the channel-mix receptance
    ffn.key1/key2, ffn.value1/value2     factorised FFN ("x0594"): B relu(A x)^2 (ffn.*_diag variants of
                                         x0595/x0596 are refused: they add a diagonal to a non-square matrix)
    blocks.N.mlp.fc1/fc2.weight (D,C)/(F,D)   FFN sparsity predictor: ir.SparseFFN on that layer's channel-mix,
                                         together with the 1-bit quantised key predictor RWKV-Lite derives from
                                         ffn.key at load time (thresholds: RWKV-Lite's README defaults)
    head_l1.weight (K,C) (+ head_l1fc1/fc2)   cluster head of the hierarchical head: with the vocabulary
                                         cluster file (`*-cls.npy`, one cluster id per token) the head becomes
                                         ir.ClusteredHead; without it the dense head is used
    head_l2.N.weight                     per-cluster copies of head rows: ignored (the rows come from head.weight)
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .. import ir
from ..errors import RwkvcError
from . import common as cm

# RWKV-Lite's inference defaults (README: quant_bit 1, quant_map 0.95, mlp_map 0.7; select_logits 0.95/3/100)
MLP_THRESHOLD = 0.7
QUANT_BITS = 1
QUANT_QUANTILE = 0.95
HEAD_TOP_P, HEAD_MIN_K, HEAD_MAX_K = 0.95, 3, 100


def is_factorised(sd, prefix: str) -> bool:
    """`prefix` is e.g. 'blocks.0.att.key'."""
    return prefix + "1.weight" in sd or prefix + "2.weight" in sd


def projection_shapes(sd, chk: cm.ShapeCheck, prefix: str, out_dim: int, in_dim: int) -> None:
    """Expect a dense `prefix.weight` (out, in) or a factorised `prefix1/2.weight` (+ `prefix_diag`)."""
    if not is_factorised(sd, prefix):
        chk.add(prefix + ".weight", (out_dim, in_dim))
        return
    k1, k2, kd = prefix + "1.weight", prefix + "2.weight", prefix + "_diag"
    for k in (k1, k2):
        if k not in sd:
            raise RwkvcError(f"RWKV-Lite checkpoint has '{k1 if k == k2 else k2}' but not '{k}'; the file is incomplete")
    R = int(sd[k1].shape[0]) if sd[k1].dim() == 2 else 0
    chk.add(k1, (R, in_dim))
    chk.add(k2, (out_dim, R))
    if kd in sd:
        if out_dim != in_dim:
            raise RwkvcError(f"'{kd}': a diagonal term on the non-square {out_dim}x{in_dim} projection "
                             f"'{prefix}' (RWKV-Lite x0595/x0596) is not supported")
        chk.add(kd, (in_dim,))


def read_projection(sd, prefix: str, relu_without_diag=False) -> ir.Linear:
    """After `projection_shapes` passed: the projection as ir.Linear (Dense or LowRank)."""
    if not is_factorised(sd, prefix):
        return cm.dense(sd, prefix + ".weight")
    a, b = cm.to_np(sd[prefix + "1.weight"]), cm.to_np(sd[prefix + "2.weight"])
    diag = cm.vec(sd, prefix + "_diag") if prefix + "_diag" in sd else None
    act = "relu2" if (diag is not None or relu_without_diag) else None
    return ir.Linear(prefix, ir.LowRank(a, b, act=act, diag=diag))


def mlp_shapes(sd, chk: cm.ShapeCheck, i: int, C: int, F: int) -> bool:
    f1, f2 = f"blocks.{i}.mlp.fc1.weight", f"blocks.{i}.mlp.fc2.weight"
    if f1 not in sd and f2 not in sd:
        return False
    if f1 not in sd or f2 not in sd:
        have, missing = (f1, f2) if f1 in sd else (f2, f1)
        raise RwkvcError(f"RWKV-Lite checkpoint has '{have}' but not '{missing}'; the file is incomplete")
    D = int(sd[f1].shape[0])
    chk.add(f1, (D, C))
    chk.add(f2, (F, D))
    return True


def quantise(w: np.ndarray, bits: int):
    """RWKV-Lite's per-tensor n-bit quantiser: codes in [0, 2^bits), w ~ codes * scale + zero."""
    w = np.asarray(w, np.float32)
    factor = 2 ** bits - 1
    lo, hi = float(w.min()), float(w.max())
    scale = (hi - lo) / factor if hi > lo else 1.0
    codes = np.clip(np.round((w - lo) / scale), 0, factor).astype(np.uint8)
    return codes, scale, lo


def sparse_ffn(sd, i: int, key: ir.Linear) -> ir.SparseFFN:
    fc1 = cm.to_np(sd[f"blocks.{i}.mlp.fc1.weight"])
    fc2 = cm.to_np(sd[f"blocks.{i}.mlp.fc2.weight"])
    codes = scale = zero = None
    if key.kind == "dense":  # the quantised-key predictor needs the key matrix itself
        codes, scale, zero = quantise(key.weight.w, QUANT_BITS)
    return ir.SparseFFN(fc1=fc1, fc2=fc2, mlp_threshold=MLP_THRESHOLD,
                        q_codes=codes, q_scale=scale if scale is not None else 1.0, q_zero=zero or 0.0,
                        q_bits=QUANT_BITS, q_quantile=QUANT_QUANTILE)


def head_shapes(sd, chk: cm.ShapeCheck, C: int) -> None:
    K = int(sd["head_l1.weight"].shape[0]) if "head_l1.weight" in sd else None
    if K is not None:
        chk.add("head_l1.weight", (K, C))
    if "head_l1fc1.weight" in sd or "head_l1fc2.weight" in sd:
        D = int(sd["head_l1fc1.weight"].shape[0]) if "head_l1fc1.weight" in sd else 0
        chk.add("head_l1fc1.weight", (D, C))
        chk.add("head_l1fc2.weight", (K if K is not None else int(sd["head_l1fc2.weight"].shape[0]), D))
    chk.ignore("head_l2.")


def has_cluster_head(sd) -> bool:
    return "head_l1.weight" in sd or "head_l1fc2.weight" in sd


def load_labels(cluster_file, V: int) -> np.ndarray:
    p = Path(cluster_file)
    if not p.exists():
        raise RwkvcError(f"{p}: no such cluster file; give the vocabulary-cluster .npy RWKV-Lite wrote (e.g. MODEL-cls.npy)")
    try:
        labels = np.load(p, allow_pickle=False)
    except Exception as e:
        raise RwkvcError(f"{p}: not a readable .npy file ({type(e).__name__}); give the RWKV-Lite *-cls.npy file") from None
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise RwkvcError(f"{p}: expected a 1-D integer array of cluster ids, got {labels.dtype} {labels.shape}")
    if labels.shape[0] != V:
        raise RwkvcError(f"{p}: has {labels.shape[0]} cluster labels but the model's vocabulary has {V} tokens")
    return labels.astype(np.int64)


def clustered_head(sd, model: ir.Model, cluster_file: str | os.PathLike) -> ir.Linear:
    """head.weight + cluster head + labels -> ir.Linear('head', ClusteredHead)."""
    if not has_cluster_head(sd):
        raise RwkvcError("a cluster file was given but the checkpoint has no hierarchical head "
                         "('head_l1.weight'); drop the cluster file or use a RWKV-Lite checkpoint with one")
    V, C = model.config.vocab_size, model.config.n_embd
    labels = load_labels(cluster_file, V)
    if "head_l1.weight" in sd:   # what RWKV-Lite's inference uses (the MLP variant only when it is alone)
        cluster = ir.Dense(cm.to_np(sd["head_l1.weight"]))
    else:
        cluster = ir.LowRank(cm.to_np(sd["head_l1fc1.weight"]), cm.to_np(sd["head_l1fc2.weight"]), act="relu")
    K = cluster.shape[0]
    if labels.min() < 0 or labels.max() >= K:
        bad = int(labels.min() if labels.min() < 0 else labels.max())
        raise RwkvcError(f"{cluster_file}: cluster id {bad} is outside 0..{K - 1} (the cluster head has K={K} rows)")
    return ir.Linear("head", cluster_head_from_labels(model.head.weight.to_dense() if model.head.kind != "dense"
                                                      else model.head.weight.w, labels, cluster))


def cluster_head_from_labels(W: np.ndarray, labels: np.ndarray, cluster, top_p=HEAD_TOP_P, min_k=HEAD_MIN_K,
                             max_k=HEAD_MAX_K) -> ir.ClusteredHead:
    """The weight math of the hierarchical head: group the rows of W (V, C) by label (stable order)."""
    K = cluster.shape[0]
    order = np.argsort(labels, kind="stable").astype(np.int64)
    counts = np.bincount(labels, minlength=K)
    bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return ir.ClusteredHead(order, bounds, np.ascontiguousarray(W[order]), cluster, top_p, min_k, max_k)


def compressions(sd) -> dict:
    """Which RWKV-Lite compressions a state dict holds (for `rwkvc inspect`)."""
    import re
    out = {}
    firsts = [(k, m) for k in sd for m in [re.fullmatch(r"blocks\.\d+\.(att|ffn)\.(\w+)1\.weight", k)]
              if m and k[:-len("1.weight")] + "2.weight" in sd]
    fact = sorted({f"{m.group(1)}.{m.group(2)}" for _, m in firsts})
    if fact:
        ranks = sorted({int(sd[k].shape[0]) for k, _ in firsts})
        diag = any(k.endswith("_diag") for k in sd)
        out["low_rank"] = {"projections": fact, "ranks": ranks,
                           "variant": "B relu(A x)^2 + diag x" if diag else "B A x"}
    mlp = sorted(int(k.split(".")[1]) for k in sd if k.endswith(".mlp.fc1.weight"))
    if mlp:
        out["sparse_ffn"] = {"layers": len(mlp), "predictor_width": int(sd[f"blocks.{mlp[0]}.mlp.fc1.weight"].shape[0])}
    if has_cluster_head(sd):
        k = "head_l1.weight" if "head_l1.weight" in sd else "head_l1fc2.weight"
        out["hierarchical_head"] = {"clusters": int(sd[k].shape[0]),
                                    "mlp_variant": "head_l1fc1.weight" in sd}
    return out
