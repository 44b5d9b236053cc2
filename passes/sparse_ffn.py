"""`sparse-ffn`: activation sparsity of the channel-mix with learned predictors (RWKV-Lite), realised:
in the artifact only the predicted neurons' rows of the key matrix and of the transposed value matrix
are read (rwkvc.targets.onnx.sparse_ffn: NonZero -> Gather of rows -> Gemm / MatMul).

Per layer, on calibration text (rwkvc.calib.IRRunner, dense activations):

    xk (T, C)   the channel-mix's token-shifted input;   pre = key @ xk (T, F);   h = relu(pre)^2
    a neuron fires when pre > 0; its contribution to the output is h_j * ||value[:, j]||

Predictors (ir.SparseFFN, the representation RWKV-Lite checkpoints load into):

    mlp   sigmoid(fc2 relu(fc1 xk)) > mlp_threshold      fc1 (D, C), fc2 (F, D), trained with BCE on "fires"
    quant q = key quantised to 1 bit (one scale and zero for the matrix, RWKV-Lite's quantiser), and the
          neurons whose estimate q @ xk is above the q_quantile quantile of this token's estimates
    mask  mlp | quant

Thresholds: per layer, the pair (q_quantile from a grid, mlp_threshold by bisection) that reaches the
target `recall` and reads the fewest bytes a token (`select=bytes`): the predicted rows, plus the key
copy's codes where it takes part (q_quantile < 1); `select=rows` takes the fewest predicted neurons
(RWKV-Lite). The 1-bit key copy is F C / 8 bytes, as much as F / 16 int8 row pairs: in the deep layers
of a trained 0.1B it found fewer than that many rows the MLP missed, so those layers drop it. Recall is
contribution-weighted: sum of the predicted neurons' contributions / sum of all contributions (a missed
neuron with a tiny activation costs little). Lossless check: threshold=0 predicts every neuron (sigmoid > 0).

The MLP predictor is stored in int8 (one scale per output row, `predictor=int8`, the default) and the
thresholds are chosen on it as stored; `predictor=fp32` keeps it in float32.

Weight math, testable alone:  train_mlp_predictor(xk, fires, hidden) -> (fc1, fc2);
choose_thresholds(p_mlp, est, contrib, recall) -> (mlp_threshold, q_quantile, stats).
"""
from __future__ import annotations

import numpy as np
import torch

from rwkvc import ir
from rwkvc.arch import lite
from rwkvc.errors import RwkvcError
from rwkvc.weights.int8 import dequantize_int8, quantize_int8

from . import Param, register
from .common import check_layers, fmt_bytes, nbytes, parse_layers

Q_GRID = (1.0, 0.99, 0.98, 0.97, 0.95, 0.93, 0.9, 0.85, 0.8, 0.7)


def train_mlp_predictor(xk: np.ndarray, fires: np.ndarray, hidden: int, steps: int = 400, lr: float = 3e-3,
                        batch: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """fc1 (hidden, C), fc2 (F, hidden) with sigmoid(fc2 relu(fc1 x)) ~ P(neuron fires); no biases (as
    RWKV-Lite's checkpoints store them)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.as_tensor(np.asarray(xk, np.float32))
    Y = torch.as_tensor(np.asarray(fires, np.float32))
    T, C = X.shape
    F = Y.shape[1]
    fc1 = torch.nn.Parameter(torch.randn(hidden, C, generator=g) / C ** 0.5)
    fc2 = torch.nn.Parameter(torch.randn(F, hidden, generator=g) / hidden ** 0.5)
    opt = torch.optim.Adam([fc1, fc2], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        idx = torch.randint(0, T, (min(batch, T),), generator=g)
        logit = torch.relu(X[idx] @ fc1.T) @ fc2.T
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, Y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return fc1.detach().numpy().copy(), fc2.detach().numpy().copy()


def mlp_prob(fc1, fc2, xk: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(torch.relu(xk @ torch.as_tensor(fc1).T) @ torch.as_tensor(fc2).T)


def key_estimate(codes, scale, zero, xk: torch.Tensor) -> torch.Tensor:
    return scale * (xk @ torch.as_tensor(codes, dtype=torch.float32).T) + zero * xk.sum(-1, keepdim=True)


def _recall(mask: torch.Tensor, contrib: torch.Tensor, total: float) -> float:
    return float((contrib * mask).sum()) / total


def choose_thresholds(p: torch.Tensor | None, est: torch.Tensor | None, contrib: torch.Tensor, recall: float,
                      row_bytes: float = 1.0, q_bytes: float = 0.0):
    """The cheapest (mlp_threshold, q_quantile) whose mask reaches `recall` (contribution-weighted) on
    the calibration tokens. p: (T, F) MLP probabilities or None; est: (T, F) 1-bit estimates or None.
    Cost: the predicted rows' bytes, fraction * F * row_bytes, plus q_bytes (the key copy's codes, read
    every token) where the key copy takes part (q < 1); the defaults count rows only (RWKV-Lite's choice,
    the fewest predicted rows)."""
    total = float(contrib.sum()) or 1.0
    F = contrib.shape[-1]
    cost = lambda frac, q: frac * F * row_bytes + (q_bytes if q < 1.0 else 0.0)  # noqa: E731
    best = None
    grid = Q_GRID if est is not None else (1.0,)
    for q in grid:
        qmask = (est > torch.quantile(est, q, dim=-1, keepdim=True)) if (est is not None and q < 1.0) else \
            torch.zeros_like(contrib, dtype=torch.bool)
        if p is None:
            if q == 1.0:
                continue
            r = _recall(qmask, contrib, total)
            if r >= recall:
                frac = float(qmask.float().mean())
                if best is None or cost(frac, q) < cost(best[0], best[2]):
                    best = (frac, 1.0, q, r)
            continue
        if _recall(qmask | (p > 0.0), contrib, total) < recall:
            continue
        lo, hi = 0.0, 1.0          # threshold lo reaches the recall; hi may not
        for _ in range(20):
            mid = (lo + hi) / 2
            if _recall(qmask | (p > mid), contrib, total) >= recall:
                lo = mid
            else:
                hi = mid
        mask = qmask | (p > lo)
        frac = float(mask.float().mean())
        if best is None or cost(frac, q) < cost(best[0], best[2]):
            best = (frac, lo, q, _recall(mask, contrib, total))
    if best is None:
        return 0.0, 1.0, {"fraction": 1.0, "recall": 1.0}
    frac, thr, q, r = best
    return thr, q, {"fraction": frac, "recall": r}


class _FfnCollector:
    def __init__(self, layers: set[int], max_tokens: int):
        self.layers, self.max = layers, max_tokens
        self.xk: dict[int, list] = {}
        self.pre: dict[int, list] = {}

    def ffn(self, i, xk, pre):
        if i in self.layers:
            self.xk.setdefault(i, []).append(xk.clone())
            self.pre.setdefault(i, []).append(pre.to(torch.float16))


class SparseFfnPass:
    name = "sparse-ffn"
    requires = ()
    forbids_after = ("int8", "int4")
    needs_calibration = True
    params = {
        "recall": Param(float, 0.99, lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
        "threshold": Param(float, -1.0, lambda v: v == -1.0 or 0 <= v < 1,
                           "-1 (choose from recall) or a fixed MLP threshold in [0, 1) (0: every neuron, lossless)"),
        "hidden": Param(int, 32, lambda v: 1 <= v <= 4096, "the MLP predictor's width, 1..4096"),
        "quant": Param(int, 1, lambda v: v in (0, 1, 2), "bits of the key copy predictor: 1 (RWKV-Lite), 2, or 0 (none)"),
        "steps": Param(int, 400, lambda v: 1 <= v <= 100000, "training steps of each MLP predictor"),
        "layers": Param(str, "all", check_layers, "all, or block numbers/ranges joined by '+', e.g. 0-3+7"),
        "tokens": Param(int, 4096, lambda v: v >= 64, "calibration tokens to use (>= 64)"),
        "max_fraction": Param(float, 0.5, lambda v: 0 < v <= 1,
                              "a fraction in (0, 1]: a layer whose predicted rows exceed it stays dense"),
        "predictor": Param(str, "int8", lambda v: v in ("int8", "fp32"),
                           "the MLP predictor's weights: int8 (one scale per output, a quarter of the bytes) or fp32"),
        "select": Param(str, "bytes", lambda v: v in ("bytes", "rows"),
                        "bytes (the thresholds that read the fewest bytes a token: rows plus the key copy) or "
                        "rows (the fewest predicted rows, RWKV-Lite's choice)"),
    }

    def run(self, model: ir.Model, args: dict, ctx) -> tuple[ir.Model, dict]:
        from rwkvc.calib import calib_tokens
        layers = parse_layers(args["layers"], model.config.n_layer)
        for i in layers:
            ffn = model.blocks[i].ffn
            if getattr(ffn, "deep", None) is not None:
                raise RwkvcError(f"pass sparse-ffn: blocks.{i} is an RWKV-7a DeepEmbed channel-mix, whose per-token "
                                 "factor the sparse FFN's lowerings do not apply; drop sparse-ffn for this model")
            if ffn.lin["key"].kind != "dense" or ffn.lin["value"].kind != "dense":
                raise RwkvcError(f"pass sparse-ffn: blocks.{i} key/value are {ffn.lin['key'].kind}/"
                                 f"{ffn.lin['value'].kind}; run sparse-ffn before svd/quantisation of the FFN")
        thr_fixed = args["threshold"]
        report_layers = {}
        before = after_read = pred_bytes = 0

        def fit(i):
            nonlocal before, after_read, pred_bytes
            ffn = model.blocks[i].ffn
            K = np.asarray(ffn.lin["key"].weight.w, np.float32)
            Vt = np.asarray(ffn.lin["value"].weight.w, np.float32)
            F, C = K.shape
            kv_bytes = nbytes(ffn.lin["key"].weight) + nbytes(ffn.lin["value"].weight)
            before += kv_bytes
            if col is None:   # fixed threshold: untrained (zero) MLP, sigmoid(0) = 0.5 > threshold iff threshold < 0.5
                sp = ir.SparseFFN(fc1=np.zeros((1, C), np.float32), fc2=np.zeros((F, 1), np.float32),
                                  mlp_threshold=thr_fixed)
                frac = 1.0 if thr_fixed < 0.5 else 0.0
                stats = {"fraction": frac, "recall": frac}
            else:
                xk = torch.cat(col.xk.pop(i), 0)
                pre = torch.cat(col.pre.pop(i), 0).float()
                fires = (pre > 0)
                contrib = torch.relu(pre) ** 2 * torch.as_tensor(np.linalg.norm(Vt, axis=0))[None, :]
                fc1, fc2 = train_mlp_predictor(xk.numpy(), fires.numpy(), args["hidden"], steps=args["steps"], seed=i)
                fc1_scale = fc2_scale = None
                if args["predictor"] == "int8":   # thresholds are chosen on the predictor as stored
                    (q1, fc1_scale), (q2, fc2_scale) = quantize_int8(fc1), quantize_int8(fc2)
                    fc1, fc2 = dequantize_int8(q1, fc1_scale), dequantize_int8(q2, fc2_scale)
                p = mlp_prob(fc1, fc2, xk)
                codes = scale = zero = None
                est = None
                if args["quant"]:
                    codes, scale, zero = lite.quantise(K, args["quant"])
                    est = key_estimate(codes, scale, zero, xk)
                cost = {}
                if args["select"] == "bytes" and codes is not None:
                    # a neuron's key row and value column as the cpu target reads them: int8 (and the key
                    # row's scale) where a quantisation pass follows, else float32
                    quantised = any(n in ("int8", "int4") for n in getattr(ctx, "later", ()))
                    cost = {"row_bytes": 2 * C + 4 if quantised else 8 * C,
                            "q_bytes": ir.SparseFFN.code_bytes(F, C, args["quant"])}
                thr, q, stats = choose_thresholds(p, est, contrib, args["recall"], **cost)
                if q >= 1.0:
                    codes = None
                sp = ir.SparseFFN(fc1=fc1, fc2=fc2, fc1_scale=fc1_scale, fc2_scale=fc2_scale,
                                  mlp_threshold=float(thr), q_codes=codes,
                                  q_scale=float(scale) if codes is not None else 1.0,
                                  q_zero=float(zero) if codes is not None else 0.0,
                                  q_bits=args["quant"] or 1, q_quantile=float(q))
                stats = {**stats, "fires": float(fires.float().mean()), "mlp_threshold": float(thr),
                         "q_quantile": float(q)}
            if col is not None and stats["fraction"] > args["max_fraction"]:
                # the gathered rows plus the predictors would cost more than the dense (quantised) FFN
                report_layers[i] = {"dense": True, "fraction": round(stats["fraction"], 4)}
                after_read += kv_bytes
                return
            ffn.sparse = sp
            pb = sp.stored_bytes()   # what the cpu target's fused step reads of the predictors
            pred_bytes += pb
            after_read += kv_bytes * stats["fraction"] + pb
            report_layers[i] = {k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()}

        if thr_fixed >= 0:
            col = None
            for i in sorted(layers):
                fit(i)
        else:
            # block by block (rwkvc.calib_layers): one block's float weights and one layer's activations at a
            # time. The run stays dense (simulate=False), so a layer made sparse changes no later input.
            from rwkvc.calib_layers import LayerRunner
            tokens = calib_tokens(ctx, args["tokens"])
            col = _FfnCollector(layers, len(tokens))

            class Visit:
                def hooks(self, i):
                    return col if i in layers else None

                def done(self, i, hooks):
                    fit(i)
                    return False
            LayerRunner(model, tokens, simulate=False, progress=getattr(ctx, "progress", False),
                        desc="sparse-ffn").run(Visit())
        kept = [i for i, v in report_layers.items() if v.get("dense")]
        fr = [1.0 if v.get("dense") else v["fraction"] for v in report_layers.values()]
        summary = (f"{len(report_layers) - len(kept)} channel-mixes sparse"
                   f"{f' ({len(kept)} left dense)' if kept else ''} (recall {args['recall']:g}): "
                   f"{np.mean(fr):.1%} of FFN rows read on average; FFN bytes read per token "
                   f"{fmt_bytes(before)} -> {fmt_bytes(after_read)} (predictors {fmt_bytes(pred_bytes)})")
        return model, {"layers": report_layers, "mean_fraction": float(np.mean(fr)), "dense_layers": kept,
                       "ffn_bytes": before, "ffn_bytes_read_per_token": int(after_read),
                       "predictor_bytes": int(pred_bytes), "summary": summary}


SPARSE_FFN = register(SparseFfnPass())
