"""Calibration-based quantisation for the int8 / int4 passes: GPTQ and AWQ-style scaling.

Both need, for every matrix W (N, K) to quantise, statistics of its inputs x (K,) on calibration text,
collected by running the (current) IR over the tokens (rwkvc.calib.IRRunner):

    gptq   H = sum x x^T (K, K). Columns are quantised one at a time and the rounding error of each is
           spread over the columns not yet quantised, weighted by H^-1 (Frantar et al., 2022), so the
           layer's output error ||W X - Q X|| rather than the weight error is minimised. Same group
           scales / zero points as RTN (computed on the error-corrected weights), same artifact kinds.
    awq    mean |x| per input channel. Channels that carry large activations are scaled up before
           rounding (W diag(s), s = mean|x|^alpha) and the input is divided by s; for int4 the scale
           is folded back into the dequantisation so the kernel and the representation do not change:
           W ~ Q(W diag(s)) diag(1/s) (the `Scaled` kind: one multiply of the input by 1/s, then the same
           MatMulNBits; rwkvc.weights.scaled). alpha is chosen per matrix on the calibration inputs from a
           grid; int4 only.

Weight math, testable alone:  gptq_int4(w, H, group) -> (codes, scales, zeros);
gptq_int8(w, H) -> (q, scale);  awq_int4(w, x_samples, group) -> (codes, scales, zeros, 1/s, alpha).
"""
from __future__ import annotations

import numpy as np
import torch

from rwkvc import ir
from rwkvc.errors import RwkvcError
from rwkvc.weights import Int4, Int8, Scaled
from rwkvc.weights.int4 import effective_group, quantize_int4
from rwkvc.weights.int8 import quantize_int8

from .common import selected


# ----------------------------------------------------------------------------------------------
# GPTQ


def _hinv_chol(H: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """Upper Cholesky factor of (H + damp * mean(diag) I)^-1, and the dead-column mask."""
    H = np.array(H, np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    H += damp * np.mean(np.diag(H)) * np.eye(H.shape[0])
    Ht = torch.from_numpy(H)
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(Ht))
    return torch.linalg.cholesky(Hinv, upper=True).numpy(), dead


def _gptq(w: np.ndarray, H: np.ndarray, quant_col, start_group=None, group: int = 0, block: int = 128,
          damp: float = 0.01) -> np.ndarray:
    """The GPTQ loop. quant_col(j, col) -> dequantised column j; start_group(j, W) is called at the first
    column of each group (to fix that group's scale from the error-corrected weights)."""
    W = np.array(w, np.float64)
    N, K = W.shape
    U, dead = _hinv_chol(H, damp)
    W[:, dead] = 0
    block = max(block, group or 0)
    Q = np.zeros_like(W)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, i1:i2].copy()
        E1 = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if start_group is not None and group and j % group == 0:
                W[:, i1 + i:i2] = W1[:, i:]          # the group's (corrected) columns so far
                start_group(j, W)
            col = W1[:, i]
            q = quant_col(j, col)
            Q[:, j] = q
            err = (col - q) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return Q


def gptq_int4(w: np.ndarray, H: np.ndarray, group: int, damp: float = 0.01):
    """-> (codes (N, Kp), scales (N, nb), zeros (N, nb)) like quantize_int4, with GPTQ error feedback."""
    w = np.asarray(w, np.float32)
    N, K = w.shape
    nb = -(-K // group)
    scales = np.ones((N, nb), np.float32)
    zeros = np.zeros((N, nb), np.uint8)

    def start_group(j, W):
        b = j // group
        _, s, z = quantize_int4(W[:, j:j + group].astype(np.float32), group)
        scales[:, b], zeros[:, b] = s[:, 0], z[:, 0]

    def quant_col(j, col):
        b = j // group
        s, z = scales[:, b].astype(np.float64), zeros[:, b].astype(np.float64)
        c = np.clip(np.rint(col / s) + z, 0, 15)
        return (c - z) * s

    Q = _gptq(w, H, quant_col, start_group, group, damp=damp)
    codes, _, _ = quantize_int4(Q.astype(np.float32), group, scales, zeros)
    return codes, scales, zeros


def gptq_int8(w: np.ndarray, H: np.ndarray, damp: float = 0.01):
    w = np.asarray(w, np.float32)
    _, scale = quantize_int8(w)
    s = scale.astype(np.float64)

    def quant_col(j, col):
        return np.clip(np.rint(col / s), -127, 127) * s

    Q = _gptq(w, H, quant_col, damp=damp)
    q = np.clip(np.rint(Q / s[:, None]), -127, 127).astype(np.int8)
    return q, scale


# ----------------------------------------------------------------------------------------------
# AWQ-style scaling (int4)

ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def awq_int4(w: np.ndarray, x: np.ndarray, group: int):
    """Search s = mean|x|^alpha (per input channel, normalised) minimising the output error on the
    calibration inputs x (n, K) of W ~ Q(W diag(s)) diag(1/s). Returns (codes, scales, zeros) of
    Q(W diag(s)), the input scale 1/s (None when alpha = 0 wins: plain RTN) and alpha."""
    w = np.asarray(w, np.float32)
    x = np.asarray(x, np.float32)
    ref = x @ w.T
    mag = np.abs(x).mean(0) + 1e-8
    N, K = w.shape
    best = None
    for alpha in ALPHAS:
        s = (mag ** alpha).astype(np.float32)
        s = s / np.sqrt(s.max() * s.min())
        codes, sc, z = quantize_int4(w * s[None, :], group)
        wq = (codes.reshape(N, -1, group).astype(np.float32) - z[..., None]) * sc[..., None]
        wq = wq.reshape(N, -1)[:, :K] / s[None, :]
        err = float(np.mean((x @ wq.T - ref) ** 2))
        if best is None or err < best[0]:
            best = (err, alpha, s, codes, sc, z)
    _, alpha, s, codes, sc, z = best
    return codes, sc, z, (None if alpha == 0.0 else (1.0 / s).astype(np.float32)), alpha


# ----------------------------------------------------------------------------------------------
# statistics collection and the quantiser the int passes use


class CalibStats:
    def __init__(self, method: str, n_tokens: int):
        self.method, self.n_tokens = method, n_tokens
        self.hessians: dict[str, torch.Tensor] = {}
        self.samples: dict[str, list] = {}
        self.counts: dict[str, int] = {}

    def lookup(self, table: dict, name: str):
        while name:
            if name in table:
                return table[name]
            if "." not in name:
                break
            name = name.rsplit(".", 1)[0]
        return None

    def summary(self) -> dict:
        return {"method": self.method, "tokens": self.n_tokens,
                "matrices": len(self.hessians) or len(self.samples)}


class _Collector:
    def __init__(self, stats: CalibStats, wanted: set[str], keep_samples: int):
        self.stats, self.wanted, self.keep = stats, wanted, keep_samples

    def _want(self, name):
        return name in self.wanted or name.rsplit(".", 1)[0] in self.wanted

    def linear(self, name, x):
        if not self._want(name):
            return
        st = self.stats
        x = x.reshape(-1, x.shape[-1]).double()
        if self.keep:
            buf = st.samples.setdefault(name, [])
            have = sum(len(b) for b in buf)
            if have < self.keep:
                buf.append(x[: self.keep - have].float().numpy())
        else:
            H = st.hessians.get(name)
            st.hessians[name] = x.T @ x if H is None else H + x.T @ x
        st.counts[name] = st.counts.get(name, 0) + x.shape[0]

    def final(self, x):
        self.linear("head", x)


def collect(model: ir.Model, args: dict, ctx) -> CalibStats:
    from rwkvc.calib import IRRunner, calib_tokens
    method = args.get("method", "rtn")
    tokens = calib_tokens(ctx, 4096)
    wanted = {lin.name for _, _, _, lin in selected(model, args["targets"], args["layers"])}
    stats = CalibStats(method, len(tokens))
    col = _Collector(stats, wanted, keep_samples=512 if method == "awq" else 0)
    run = IRRunner(model, simulate=True)
    for _ in run.forward(tokens, hooks=col, want_logits=False):
        pass
    return stats


def make_quantizer(bits: int, args: dict, stats: CalibStats):
    method = args["method"]
    if method == "gptq":
        def q(name, w):
            H = stats.lookup(stats.hessians, name)
            if H is None or H.shape[0] != w.shape[1]:
                return Int8.from_dense(w) if bits == 8 else Int4.from_dense(w, args["group"], args["accuracy_level"])
            H = H.numpy()
            if bits == 8:
                return Int8(*gptq_int8(w, H))
            g = effective_group(args["group"], w.shape[1])
            codes, scales, zeros = gptq_int4(w, H, g)
            return Int4.from_codes(codes, scales, zeros, w.shape[1], g, args["accuracy_level"])
        return q
    if method == "awq":
        if bits == 8:
            raise RwkvcError("pass int8: method=awq is for int4; int8 per-channel takes method=rtn or gptq")

        def q(name, w):
            xs = stats.lookup(stats.samples, name)
            g = effective_group(args["group"], w.shape[1])
            if xs is None or xs[0].shape[1] != w.shape[1]:
                return Int4.from_dense(w, args["group"], args["accuracy_level"])
            codes, scales, zeros, inv_s, _ = awq_int4(w, np.concatenate(xs, 0), g)
            inner = Int4.from_codes(codes, scales, zeros, w.shape[1], g, args["accuracy_level"])
            return inner if inv_s is None else Scaled(inner, inv_s)
        return q
    raise RwkvcError(f"unknown quantisation method {method!r}")
