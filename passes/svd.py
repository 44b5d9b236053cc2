"""`svd`: low-rank factorisation W ~ B (A x) of chosen projections (ir.LowRank).

Weight math (rwkvc.weights.lowrank):  svd_factor(w, rank) -> (a (rank, in), b (out, rank)) with b @ a the
best rank-`rank` approximation of w, the singular values split evenly between the two factors.
Rank choice, per matrix:  rank=f (0 < f <= 1) keeps a fraction f of min(out, in); rank=n (> 1) keeps n;
energy=e keeps the fewest singular values whose squares sum to at least e of the total, and leaves a
matrix dense when its factors would not be smaller than it.

The accuracy lost to truncation is won back by fine-tuning the factors (RWKV-Lite's recipe):
rwkvc.training.svd_finetune (python training/train.py --svd ...).
"""
from __future__ import annotations

import numpy as np

from rwkvc import ir
from rwkvc.errors import RwkvcError
from rwkvc.weights.lowrank import singular_values, svd_factor

from . import Param, register
from .common import check_layers, check_selector, fmt_bytes, nbytes, selected


def rank_for_energy(S: np.ndarray, energy: float) -> int:
    e = np.cumsum(S.astype(np.float64) ** 2)
    return int(np.searchsorted(e, energy * e[-1] - 1e-12 * e[-1]) + 1)


def choose_rank(shape, S: np.ndarray | None, rank: float, energy: float) -> int:
    out, inp = shape
    full = min(out, inp)
    if energy > 0:
        r = rank_for_energy(S, energy)
        breakeven = (out * inp) // (out + inp)   # factors smaller than the matrix below this rank
        return min(r, breakeven) if r < breakeven else full + 1   # full + 1: keep it dense
    if rank <= 1:
        return max(1, int(round(rank * full)))
    return int(min(rank, full))


class SvdPass:
    name = "svd"
    requires = ()
    forbids_after = ("int8", "int4", "sparse-ffn")
    params = {
        "rank": Param(float, 0.25, lambda v: v > 0, "a fraction in (0, 1] of min(out, in), or a rank > 1"),
        "energy": Param(float, 0.0, lambda v: 0 <= v <= 1, "a fraction in (0, 1] of the spectral energy to keep (0: use rank)"),
        "targets": Param(str, "att+ffn", check_selector, "a selector such as att+ffn, att.k+att.v, ffn"),
        "layers": Param(str, "all", check_layers, "all, or block numbers/ranges joined by '+', e.g. 0-3+7"),
    }

    def run(self, model: ir.Model, args: dict, ctx) -> tuple[ir.Model, dict]:
        rank, energy = args["rank"], args["energy"]
        if rank > 1 and rank != int(rank):
            raise RwkvcError(f"pass svd: rank={rank} is neither a fraction in (0, 1] nor a whole rank")
        before = after = 0
        ranks, kept_dense, errs = {}, [], []
        for place, container, key, lin in list(selected(model, args["targets"], args["layers"])):
            if lin.kind != "dense" or place == "head":
                continue
            w = np.asarray(lin.weight.w, np.float32)
            S = singular_values(w) if energy > 0 else None
            r = choose_rank(w.shape, S, rank, energy)
            if r > min(w.shape):
                kept_dense.append(lin.name)
                continue
            a, b = svd_factor(w, r)
            new = ir.LowRank(a, b)
            errs.append(float(np.linalg.norm(w - b @ a) / max(np.linalg.norm(w), 1e-30)))
            before += nbytes(lin.weight)
            after += nbytes(new)
            ranks[lin.name] = r
            container[key] = ir.Linear(lin.name, new)
        if not ranks:
            raise RwkvcError(f"pass svd: nothing to factorise (targets={args['targets']!r}); the selected "
                             "matrices are not dense or would not shrink")
        rs = sorted(ranks.values())
        how = f"energy {energy:g}" if energy > 0 else f"rank {rank:g}"
        summary = (f"{len(ranks)} matrices factorised ({how}; ranks {rs[0]}..{rs[-1]}): {fmt_bytes(before)} -> "
                   f"{fmt_bytes(after)} ({before / max(after, 1):.2f}x), mean relative error {np.mean(errs):.3f}")
        return model, {"matrices": len(ranks), "ranks": ranks, "kept_dense": kept_dense,
                       "bytes_before": before, "bytes_after": after,
                       "mean_relative_error": float(np.mean(errs)), "summary": summary}


SVD = register(SvdPass())
