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



# ----------------------------------------------------------------------------------------------
# GPTQ

ROW_BLOCK = 1 << 22    # GPTQ treats rows independently: a big matrix goes through it this many weights at a time


def _cholesky_lower_(A: torch.Tensor, nb: int = 256) -> bool:
    """A (K, K) symmetric -> its lower Cholesky factor L (zeros above), in place, nb columns at a time
    (right-looking: factor the diagonal block, solve the panel below it, take the panel's product off the
    lower half of the trailing matrix, block column by block column); False where A is not positive
    definite. Scratch of K x nb floats: torch's cholesky(out=A) factors a copy of A, a second K x K buffer."""
    K = A.shape[0]
    for j in range(0, K, nb):
        e = min(j + nb, K)
        L11, info = torch.linalg.cholesky_ex(A[j:e, j:e])
        if int(info):
            return False
        A[j:e, j:e] = L11
        A[j:e, e:] = 0.0
        if e < K:
            P = torch.linalg.solve_triangular(L11.T, A[e:, j:e], upper=True, left=False)   # P L11^T = A21
            A[e:, j:e] = P
            for c in range(e, K, nb):            # A22 -= P P^T on and below the diagonal blocks
                d = min(c + nb, K)
                A[c:, c:d].addmm_(P[c - e:], P[c - e:d - e].T, alpha=-1.0)
    return True


def _invert_lower_(L: torch.Tensor, nb: int = 256) -> None:
    """L (K, K) lower triangular with zeros above -> L^-1, in place, nb columns at a time from the last (LAPACK
    trtri's order for a lower matrix): with L = [[A, 0], [B, C]] and C^-1 already in place,
    L^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]], so scratch of K x nb floats, not a second K x K buffer.
    torch has no in-place triangular inverse (solve_triangular needs the identity as a second K x K)."""
    K = L.shape[0]
    for j in range((K - 1) // nb * nb, -1, -nb):
        e = min(j + nb, K)
        A = L[j:e, j:e]
        Ainv = torch.linalg.solve_triangular(A, torch.eye(e - j, dtype=L.dtype), upper=False)
        if e < K:
            B = L[e:, j:e].clone()
            T = torch.empty_like(B)
            for r in range(e, K, nb):            # C^-1 B a block of rows at a time, C^-1's nonzero columns only
                q = min(r + nb, K)
                torch.mm(L[r:q, e:q], B[:q - e], out=T[r - e:q - e])
            L[e:, j:e] = -(T @ Ainv)
        A.copy_(Ainv)


def _hinv_chol_reversed(box: list, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """(U, dead) from box = [Hr], Hr = J H J (H (K, K) with its columns and rows in reversed order; float32
    torch, taken out of the box and factored in place): U upper triangular with U^T U =
    (H + damp * mean(diag) I)^-1 (a view with negative strides), and H's dead-column mask.

    Why reversed: if J H J = L L^T (lower Cholesky), then H = V V^T with V = J L J upper and
    H^-1 = V^-T V^-1, so U = V^-1 = J L^-1 J: one Cholesky and one triangular inverse, both in place in the
    one K x K buffer (_invert_lower_), where inverting H and factoring the inverse needs several. float32 as
    in the reference implementation (Frantar et al.); the damping keeps it well conditioned. (A box, not an
    argument: the caller then holds no reference to free.)"""
    Hr = box.pop()
    d = Hr.diagonal()
    dead = (d == 0)
    d[dead] = 1.0
    d += damp * float(d.mean())
    del d
    if not _cholesky_lower_(Hr):
        raise RwkvcError("gptq: the calibration statistics are not positive definite; give more calibration "
                         "tokens (--calib-tokens) or use method=rtn")
    _invert_lower_(Hr)
    return Hr.numpy()[::-1, ::-1], dead.numpy()[::-1].copy()


def _hinv_chol(H, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """_hinv_chol_reversed of a Hessian H (K, K) in natural order (left as it is)."""
    return _hinv_chol_reversed([torch.as_tensor(np.asarray(H)).flip((0, 1)).to(torch.float32)], damp)


def _gptq(w: np.ndarray, U: np.ndarray, dead: np.ndarray, quant_col, start_group=None, group: int = 0,
          block: int = 128) -> np.ndarray:
    """The GPTQ loop over rows w (n, K) with U from _hinv_chol. quant_col(j, col) -> dequantised column j;
    start_group(j, W) is called at the first column of each group (to fix that group's scale from the
    error-corrected weights). -> the dequantised result (n, K) float32."""
    W = np.array(w, np.float32)
    N, K = W.shape
    W[:, dead] = 0
    block = max(block, group or 0)
    Q = np.zeros_like(W)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        Ub = np.ascontiguousarray(U[i1:i2, i1:])      # (block, K - i1): U's rows for these columns
        W1 = W[:, i1:i2].copy()
        E1 = np.zeros_like(W1)
        U1 = Ub[:, :i2 - i1]
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
        W[:, i2:] -= E1 @ Ub[:, i2 - i1:]
    return Q


def _row_blocks(w, K: int):
    """(start, rows float32) of w a block of whole rows at a time (a LazyArray reads only those rows)."""
    step = max(1, ROW_BLOCK // max(1, K))
    for a in range(0, w.shape[0], step):
        yield a, np.asarray(w[a:a + step], np.float32)


def _factor(H, damp: float):
    """(U, dead) of H: a Hessian (K, K) in natural order (left as it is), or a Gram (Gram.factor)."""
    return H.factor(damp) if isinstance(H, Gram) else _hinv_chol(H, damp)


def gptq_int4(w: np.ndarray, H, group: int, damp: float = 0.01):
    """-> (codes (N, Kp), scales (N, nb), zeros (N, nb)) like quantize_int4, with GPTQ error feedback.
    H: the inputs' Hessian (K, K), or their Gram. w may be a LazyArray: it is read a block of rows at a time."""
    N, K = w.shape
    U, dead = _factor(H, damp)
    nb = -(-K // group)
    codes = np.empty((N, nb * group), np.uint8)
    scales = np.ones((N, nb), np.float32)
    zeros = np.zeros((N, nb), np.uint8)
    for a, wb in _row_blocks(w, K):
        sc, zr = scales[a:a + len(wb)], zeros[a:a + len(wb)]

        def start_group(j, W, sc=sc, zr=zr):
            b = j // group
            _, s, z = quantize_int4(W[:, j:j + group], group)
            sc[:, b], zr[:, b] = s[:, 0], z[:, 0]

        def quant_col(j, col, sc=sc, zr=zr):
            b = j // group
            s, z = sc[:, b], zr[:, b].astype(np.float32)
            c = np.clip(np.rint(col / s) + z, 0, 15)
            return (c - z) * s

        Q = _gptq(wb, U, dead, quant_col, start_group, group)
        codes[a:a + len(wb)] = quantize_int4(Q, group, sc, zr)[0]
    return codes, scales, zeros


def gptq_int8(w: np.ndarray, H, damp: float = 0.01):
    """-> (q (N, K) int8, scale (N,)) like quantize_int8, with GPTQ error feedback (H as gptq_int4's)."""
    N, K = w.shape
    U, dead = _factor(H, damp)
    q = np.empty((N, K), np.int8)
    scale = np.empty(N, np.float32)
    for a, wb in _row_blocks(w, K):
        _, sc = quantize_int8(wb)

        def quant_col(j, col, s=sc):
            return np.clip(np.rint(col / s), -127, 127) * s

        Q = _gptq(wb, U, dead, quant_col)
        q[a:a + len(wb)] = np.clip(np.rint(Q / sc[:, None]), -127, 127)
        scale[a:a + len(wb)] = sc
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


class Gram:
    """The Gram matrix X^T X (K, K) of a matrix's calibration inputs X (n, K), in reversed order (J X^T X J,
    what _hinv_chol_reversed factors), float32 (as the reference implementation; sums of at most a few
    thousand products). While n < K it keeps the inputs themselves (n x K floats, fewer than K x K) and
    forms the product when asked; from n = K on it accumulates the product."""

    def __init__(self, K: int):
        self.K, self.n = K, 0
        self.rows: list[torch.Tensor] | None = []
        self.H: torch.Tensor | None = None
        self._factor: tuple | None = None          # (U, dead, damp) once the accumulated product is factored

    def add(self, x: torch.Tensor) -> None:
        xr = x.reshape(-1, self.K).to(torch.float32).flip(-1)       # (n, K) reversed: a copy
        self.n += xr.shape[0]
        if self.rows is not None and self.n < self.K:
            self.rows.append(xr)
            return
        if self.H is None:
            self.H = self.matrix()
            self.rows = None
        self.H.addmm_(xr.T, xr)

    def matrix(self) -> torch.Tensor:
        """A new (K, K) float32 tensor J X^T X J from the kept inputs (its owner may factor it in place)."""
        H = torch.zeros(self.K, self.K)
        for r in self.rows:
            H.addmm_(r.T, r)
        return H

    def factor(self, damp: float) -> tuple[np.ndarray, np.ndarray]:
        """_hinv_chol_reversed of this Gram. While it keeps its inputs, the product is formed anew for each use
        (one K x K at a time); once accumulated, the product is factored in place, without a copy, and the
        factor kept for a later use (one statistic can serve two matrices: a clustered head's rows and its
        cluster matrix both read the head's input)."""
        if self.H is None and self.rows is not None:
            return _hinv_chol_reversed([self.matrix()], damp)
        if self._factor is None or self._factor[2] != damp:
            H, self.H = self.H, None
            if H is None:               # factored before with another damping: from the factor, not possible
                raise RwkvcError("internal error: a Gram matrix factored twice with different damping")
            self._factor = (*_hinv_chol_reversed([H], damp), damp)
        return self._factor[0], self._factor[1]

    @property
    def nbytes(self) -> int:
        return (self.H.numel() * 4 if self.H is not None else 0) + sum(r.numel() * 4 for r in self.rows or ()) + \
            (self._factor[0].nbytes if self._factor is not None else 0)


class CalibStats:
    """The statistics of the matrices being calibrated (one block's at a time: rwkvc.calib_layers)."""

    def __init__(self, method: str, n_tokens: int):
        self.method, self.n_tokens = method, n_tokens
        self.grams: dict[str, Gram] = {}
        self.samples: dict[str, list] = {}
        self.counts: dict[str, int] = {}
        self.matrices = 0             # matrices calibrated so far (statistics dropped once used)
        self.peak_bytes = 0           # the most statistics held at once

    def lookup(self, table: dict, name: str):
        while name:
            if name in table:
                return table[name]
            if "." not in name:
                break
            name = name.rsplit(".", 1)[0]
        return None

    def held_bytes(self) -> int:
        return sum(g.nbytes for g in self.grams.values()) + \
            sum(int(sum(b.nbytes for b in v)) for v in self.samples.values())

    def clear(self) -> None:
        """Drop the statistics collected so far (a block's, once it is quantised)."""
        self.peak_bytes = max(self.peak_bytes, self.held_bytes())
        self.matrices += len(self.grams) or len(self.samples)
        self.grams.clear()
        self.samples.clear()

    def summary(self) -> dict:
        return {"method": self.method, "tokens": self.n_tokens,
                "matrices": self.matrices + (len(self.grams) or len(self.samples)),
                "statistics_peak_bytes": max(self.peak_bytes, self.held_bytes())}


class _Collector:
    """IRRunner hooks: the inputs of the matrices named in `wanted` (and of their low-rank factors)."""

    def __init__(self, stats: CalibStats, wanted: set[str], keep_samples: int):
        self.stats, self.wanted, self.keep = stats, wanted, keep_samples

    def _want(self, name):
        return name in self.wanted or name.rsplit(".", 1)[0] in self.wanted

    def linear(self, name, x):
        if not self._want(name):
            return
        st = self.stats
        x = x.reshape(-1, x.shape[-1])
        if self.keep:
            buf = st.samples.setdefault(name, [])
            have = sum(len(b) for b in buf)
            if have < self.keep:
                buf.append(x[: self.keep - have].float().numpy().copy())
        else:
            g = st.grams.get(name)
            if g is None:
                g = st.grams[name] = Gram(x.shape[-1])
            g.add(x)
        st.counts[name] = st.counts.get(name, 0) + x.shape[0]

    def final(self, x):
        self.linear("head", x)


def by_block(model: ir.Model, items) -> dict[int, list]:
    """passes.common.selected's items grouped by block (n_layer: the head), in model order."""
    index = {id(b.att.lin): i for i, b in enumerate(model.blocks)} | \
        {id(b.ffn.lin): i for i, b in enumerate(model.blocks)}
    out: dict[int, list] = {}
    for it in items:
        out.setdefault(model.config.n_layer if it[1] is None else index[id(it[1])], []).append(it)
    return out


def calibrate(model: ir.Model, names: dict[int, set[str]], args: dict, ctx, quantise_block) -> CalibStats:
    """Run the model block by block over the calibration tokens (rwkvc.calib_layers): for each block i in
    `names` (n_layer: the head), collect the statistics of the inputs of its matrices names[i], call
    quantise_block(i, stats) to quantise them in the model, then drop the statistics. Each block's inputs
    come from the blocks before it already quantised (GPTQ's sequential order)."""
    from rwkvc.calib import calib_tokens
    from rwkvc.calib_layers import LayerRunner
    method = args.get("method", "rtn")
    tokens = calib_tokens(ctx, 4096)
    stats = CalibStats(method, len(tokens))
    keep = 512 if method == "awq" else 0

    class Visit:
        def hooks(self, i):
            return _Collector(stats, names[i], keep) if i in names else None

        def done(self, i, hooks):
            quantise_block(i, stats)
            stats.clear()
            return True

    LayerRunner(model, tokens, simulate=True, progress=getattr(ctx, "progress", False),
                desc=f"calibrating ({method})").run(Visit())
    return stats


def make_quantizer(bits: int, args: dict, stats: CalibStats):
    method = args["method"]
    if method == "gptq":
        def q(name, w):
            g = stats.lookup(stats.grams, name)
            if g is None or g.K != w.shape[1]:
                return Int8.from_dense(w) if bits == 8 else Int4.from_dense(w, args["group"], args["accuracy_level"])
            if bits == 8:
                return Int8(*gptq_int8(w, g))
            gs = effective_group(args["group"], w.shape[1])
            codes, scales, zeros = gptq_int4(w, g, gs)
            return Int4.from_codes(codes, scales, zeros, w.shape[1], gs, args["accuracy_level"])
        return q
    if method == "awq":
        if bits == 8:
            raise RwkvcError("pass int8: method=awq is for int4; int8 per-channel takes method=rtn or gptq")

        def q(name, w):
            xs = stats.lookup(stats.samples, name)
            g = effective_group(args["group"], w.shape[1])
            if xs is None or xs[0].shape[1] != w.shape[1]:
                return Int4.from_dense(w, args["group"], args["accuracy_level"])
            codes, scales, zeros, inv_s, _ = awq_int4(np.asarray(w, np.float32), np.concatenate(xs, 0), g)
            inner = Int4.from_codes(codes, scales, zeros, w.shape[1], g, args["accuracy_level"])
            return inner if inv_s is None else Scaled(inner, inv_s)
        return q
    raise RwkvcError(f"unknown quantisation method {method!r}")
