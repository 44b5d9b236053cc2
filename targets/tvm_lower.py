"""IR -> TVM Relax -> a compiled VM executable; shared by the `rpi5` and `tvm-host` targets.

Why from the IR and not from the ONNX artifact: the ONNX graphs use a Scan for the WKV recurrence and
(after the compression passes) ONNX Runtime's own ops (MatMulNBits), which TVM's ONNX importer does
not know; and a quantised weight must stay packed in memory and be dequantised inside the matmul
kernel, which an importer that sees only standard ONNX ops cannot arrange. So the lowering walks the
IR, builds Relax functions with `relax.BlockBuilder`, and calls hand-scheduled TIR kernels for the
two things that dominate the time (matrices, the WKV recurrence); everything else is Relax ops that
TVM legalises and fuses.

The VM module has two entry points (the same contract as the ONNX graphs):

    step(tokens (1,) int64, shift (L,2,C), wkv (L,H,N,N), params) -> (logits (V,), shift, wkv)
    prefill(tokens (T,) int64, shift, wkv, params)                -> (logits of the last token, shift, wkv)

`params` is one tuple of tensors in `Params.names` order, written to `weights.bin` (page-aligned, raw
little-endian) with an index `params.json`; the runner memory-maps it, so weights are not baked into
the .so (compile time and library size stay small, and a model over 2 GB works).

Per layer, one private Relax function per distinct signature (`block_first` for layer 0 which makes
v_first, `block` for the rest; shared by every layer with the same weight shapes, so kernels are
generated once, not L times):

    x (T,C) ─ln1─► time-mix ─(+)─► ─ln2─► channel-mix ─(+)─► x'
                    │ r,k,v,w,a,g: LINEAR_LOWERINGS[kind] (packed-panel GEMM / GEMV kernels)
                    │ wkv7 kernel: S (H,N,N), sequential over T, parallel over heads
                    └ group norm, bonus, gate, output

Matrices are lowered through `LINEAR_LOWERINGS` (IR weight kind -> its packed layout + its kernel), the
embedding through `EMBED_LOWERINGS`; the targets declare `weight_kinds()` as their capabilities.
Compressed kinds stay packed in weights.bin and are dequantised in registers inside their kernels:

    int8       int8 panels; activation quantised per tensor (ONNX DynamicQuantizeLinear), int32 sums
    int4       4-bit code pairs in panels + group scales / zero points; (code - zero) * scale, fp32 FMA
    factored, scaled   their parts through their own kinds
    clustered  selection kernel -> rows of the chosen clusters only -> combine (the hierarchical head)
    sparse FFN predictors (MLP, 1-bit key codes 8 per byte, quantile kernel) -> mask; the used units'
               rows of key and value.T only (dense / int8), else the full product times the mask
    lazy       the embedding rows in their storage format (fp32 / fp16 / int8 + row scales), gathered
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from rwkvc import ir
from rwkvc.errors import RwkvcError

DECAY_SCALE = math.exp(-0.5)
ALIGN = 4096
F32 = "float32"
WEIGHT_DTYPES = ("float32", "float16")

# bound by _import_tvm() on first use, so that rwkvc imports (and the cpu target works) without TVM
tvm = relax = te = tirx = s_tir = None


def _import_tvm():
    global tvm, relax, te, tirx, s_tir
    if tvm is None:
        try:
            import tvm as _tvm
            from tvm import relax as _relax, s_tir as _s_tir, te as _te, tirx as _tirx
        except ImportError:
            raise RwkvcError("the TVM targets need Apache TVM: pip install apache-tvm "
                             "(or run scripts/setup_tvm.sh)") from None
        tvm, relax, te, tirx, s_tir = _tvm, _relax, _te, _tirx, _s_tir
    return tvm


@dataclass(frozen=True)
class KernelShape:
    """Register tiling of the kernels; a target declares it (capabilities.extras['kernel'])."""
    panel: int = 16     # output columns per packed weight panel (a multiple of the vector width)
    rows: int = 4       # prefill rows per register tile (panel x rows accumulators)
    lanes: int = 4      # float32 lanes of one vector register (the WKV reductions' width)
    weights: str = "float32"   # storage of matrices and the embedding; float16 halves bytes, math stays fp32

    def __post_init__(self):
        for f in ("panel", "rows", "lanes"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"KernelShape.{f} must be a positive int, got {v!r}")
        if self.weights not in WEIGHT_DTYPES:
            raise ValueError(f"KernelShape.weights must be one of {', '.join(WEIGHT_DTYPES)}, got {self.weights!r}")


# ----------------------------------------------------------------------------------------------
# Parameters: the order of the VM functions' `params` tuple and of weights.bin


class Params:
    """Ordered name -> array (float32, or float16 for stored matrices); `names` is the VM's params order."""

    def __init__(self):
        self.names: list[str] = []
        self.arrays: dict[str, np.ndarray] = {}
        self._pos: dict[str, int] = {}

    def add(self, name: str, arr: np.ndarray, dtype=np.float32) -> None:
        if name in self._pos:
            raise ValueError(f"parameter {name} added twice")
        self._pos[name] = len(self.names)
        self.names.append(name)
        self.arrays[name] = np.ascontiguousarray(arr, dtype=dtype)

    def index(self, name: str) -> int:
        return self._pos[name]

    def group(self, prefix: str) -> list[tuple[str, np.ndarray]]:
        """(name relative to prefix, array) of every parameter under prefix, in order."""
        return [(n[len(prefix):], self.arrays[n]) for n in self.names if n.startswith(prefix)]

    def write(self, out_dir: str, weights="weights.bin", index="params.json") -> dict:
        """weights.bin (each tensor 64-byte aligned, large ones page-aligned) + params.json."""
        entries = []
        with open(os.path.join(out_dir, weights), "wb") as f:
            for name in self.names:
                a = self.arrays[name]
                pad = (-f.tell()) % (ALIGN if a.nbytes >= ALIGN else 64)
                f.write(b"\0" * pad)
                entries.append({"name": name, "dtype": str(a.dtype), "shape": list(a.shape),
                                "offset": f.tell(), "nbytes": int(a.nbytes)})
                f.write(a.tobytes())
        with open(os.path.join(out_dir, index), "w") as f:
            json.dump({"file": weights, "params": entries}, f, indent=1)
        return {"weights": weights, "params": index, "n_params": len(entries)}


def read_params(path: str, index: dict | None = None) -> list[np.ndarray]:
    """The params of an artifact directory, in VM order, as read-only memory maps."""
    if index is None:
        with open(os.path.join(path, "params.json")) as f:
            index = json.load(f)
    mm = np.memmap(os.path.join(path, index["file"]), dtype=np.uint8, mode="r")
    return [mm[e["offset"]:e["offset"] + e["nbytes"]].view(e["dtype"]).reshape(e["shape"]) for e in index["params"]]


def pack_panels(w: np.ndarray, panel: int, dtype=np.float32) -> np.ndarray:
    """W (out, in) -> (ceil(out/panel), in, panel): panel p, row i holds W[p*panel : (p+1)*panel, i].

    One weight load per k then feeds `panel` output lanes (no horizontal sums); the last panel is
    zero-padded and the kernel's extra columns are sliced off.
    """
    w = np.asarray(w, np.float32)
    out, k = w.shape
    nb = -(-out // panel)
    if nb * panel != out:
        w = np.concatenate([w, np.zeros((nb * panel - out, k), np.float32)])
    return np.ascontiguousarray(w.reshape(nb, panel, k).transpose(0, 2, 1), dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Kernels (TIR), built once per shape and pre-scheduled; marked opaque so fusion leaves them alone

OPAQUE = 8  # relax OpPatternKind.kOpaque


def _finish(func, name: str):
    return func.with_attr("op_pattern", OPAQUE).with_attr("tirx.is_scheduled", True).with_attr("global_symbol", name)


def _panel_kernel(name: str, decode: bool, rows: int, P: int, NB: int, K: int, xdt: str, ins: list,
                  red_extents: list[int], term: Callable, out: Callable):
    """The packed-panel GEMM/GEMV skeleton every matrix kind shares:

        acc (T, NB*P) = sum over the reduce axes of term(x, t, o, *k)     (in term's dtype: f32 or i32)
        y   (T, NB*P) = out(acc[t, o], o)                                  (float32: the kind's epilogue)

    x (T, K) has dtype xdt; `ins` are the kind's packed weights (placeholders). Schedule: panels in
    parallel; per panel a (rows x P) register tile accumulates over the reduce axes, each step one vector
    load of the panel row and `rows` broadcasts of x; T is padded up to a multiple of `rows` inside the
    kernel (zero rows) so the tile has a static shape and stays in registers. With several reduce axes
    (sub-byte codes: byte, code within the byte) the innermost one is unrolled, so its shift is a constant.
    """
    T = 1 if decode else tirx.Var("T", "int64")
    rows = 1 if decode else rows
    x = te.placeholder((T, K), xdt, name="x")
    # unit reduce axes are passed as the constant 0 (TIR would elide their loops)
    args = [te.reduce_axis((0, e), name=f"k{i}") if e > 1 else tirx.const(0, "int32") for i, e in enumerate(red_extents)]
    red = [a for a, e in zip(args, red_extents) if e > 1]
    if decode:
        xv, Tp = x, T
    else:
        Tp = (T + rows - 1) // rows * rows
        xv = te.compute((Tp, K), lambda t, kk: tirx.if_then_else(
            t < T, x[tirx.min(t, T - 1), kk], tirx.const(0, xdt)), name="xpad")
    acc = te.compute((Tp, NB * P), lambda t, o: te.sum(term(xv, t, o, *args), axis=red), name="acc")
    y = te.compute((T, NB * P), lambda t, o: out(acc[t, o], o), name="y")
    sch = s_tir.Schedule(te.create_prim_func([x, *ins, y]))
    if not decode:
        sch.compute_inline(sch.get_sblock("xpad"))
    by, ba = sch.get_sblock("y"), sch.get_sblock("acc")
    t, o = sch.get_loops(by)
    oo, oi = sch.split(o, [None, P])
    to, ti = sch.split(t, [None, rows])
    sch.reorder(oo, to, ti, oi)
    sch.set_scope(ba, 0, "local")
    sch.compute_at(ba, to)
    inner = sch.get_loops(ba)[2:]          # under (oo, to): [t,] o, k... (a unit t loop may be elided)
    nr = len(red)
    spatial, rloops = inner[:-nr], inner[-nr:]
    sch.reorder(*rloops, *spatial)
    sch.parallel(oo)
    if nr > 1 and red_extents[-1] > 1:
        sch.unroll(rloops[-1])
    if len(spatial) == 2:
        sch.unroll(spatial[0])
    sch.vectorize(spatial[-1])
    sch.vectorize(oi)
    init = sch.decompose_reduction(ba, rloops[0])
    sch.vectorize(sch.get_loops(init)[-1])
    return _finish(sch.mod["main"], name)


def _tag(decode: bool) -> str:
    return "t1" if decode else "tn"


def dense_kernel(K: int, NB: int, P: int, rows: int, decode: bool, wdtype: str = F32):
    """y (T, NB*P) = x (T, K) @ unpacked(wp (NB, K, P)).T; T = 1 for decode, symbolic for prefill.
    fp16 panels are widened in registers."""
    wp = te.placeholder((NB, K, P), wdtype, name="wp")
    wv = (lambda *i: wp[i]) if wdtype == F32 else (lambda *i: wp[i].astype(F32))
    return _panel_kernel(f"dense_{_tag(decode)}_k{K}_n{NB * P}{'' if wdtype == F32 else '_' + wdtype}", decode, rows,
                         P, NB, K, F32, [wp], [K], lambda x, t, o, k: x[t, k] * wv(o // P, k, o % P),
                         lambda a, o: a)


def int8_kernel(K: int, NB: int, P: int, rows: int, decode: bool):
    """y (T, NB*P) = float(xc (T, K) @ q) * (xs * scale): the integer math of ONNX's
    DynamicQuantizeLinear -> MatMulInteger -> Mul, on int8 panels q (NB, K, P) (never widened to float).

    xc int16 are the activation codes minus their zero point (in -255..255, so the zero point needs no
    separate term); xs (1,) is the activation scale, scale (NB*P,) the per-output-channel weight scale.
    Products and sums are int32 (exact), so the result is ONNX Runtime's up to the final float multiply.
    """
    q = te.placeholder((NB, K, P), "int8", name="q")
    xs = te.placeholder((1,), F32, name="xs")
    sc = te.placeholder((NB * P,), F32, name="scale")
    return _panel_kernel(f"int8_{_tag(decode)}_k{K}_n{NB * P}", decode, rows, P, NB, K, "int16", [q, xs, sc], [K],
                         # |code| <= 255 and |q| <= 128: the product is exact in int16 (one 16-bit multiply),
                         # widened for the int32 sum
                         lambda x, t, o, k: (x[t, k] * q[o // P, k, o % P].astype("int16")).astype("int32"),
                         lambda a, o: a.astype(F32) * (xs[0] * sc[o]))


def nbit_kernel(K: int, NB: int, P: int, rows: int, decode: bool, bits: int, group: int | None,
                const_scale: float = 1.0):
    """y (T, NB*P) = x (T, K) @ dequant(codes).T with `bits`-bit codes packed 8/bits per byte along K
    (low bits first), panels (NB, K*bits/8, P) uint8; each code is dequantised in registers:

        group given (int4):  w = (code - zero[g]) * scale[g]     scale (NB, K/group, P) f32, zero (.., P) uint8
        group None:          w = code * const_scale              (the sparse FFN's 1-bit key predictor)

    K is a multiple of `group` (or of 8/bits); the caller pads x with zero columns."""
    per = 8 // bits
    mask = (1 << bits) - 1
    wq = te.placeholder((NB, K // per, P), "uint8", name="codes")

    def code(o, byte_idx, kb):
        return (wq[o // P, byte_idx, o % P].astype("int32") >> (bits * kb)) & mask

    if group is not None:
        nb, gb = K // group, group // per
        sc = te.placeholder((NB, nb, P), F32, name="scales")
        zp = te.placeholder((NB, nb, P), "uint8", name="zeros")

        def term(x, t, o, kg, kh, kb):
            w = (code(o, kg * gb + kh, kb) - zp[o // P, kg, o % P].astype("int32")).astype(F32) * sc[o // P, kg, o % P]
            return x[t, kg * group + kh * per + kb] * w
        return _panel_kernel(f"int{bits}_{_tag(decode)}_k{K}_n{NB * P}_g{group}", decode, rows, P, NB, K, F32,
                             [wq, sc, zp], [nb, gb, per], term, lambda a, o: a)

    cs = tirx.const(const_scale, F32)
    tag = np.float32(const_scale).tobytes().hex()        # one kernel per distinct scale (a constant in it)
    return _panel_kernel(f"codes{bits}_{_tag(decode)}_k{K}_n{NB * P}_s{tag}", decode, rows, P, NB, K, F32, [wq], [K // per, per],
                         lambda x, t, o, kq, kb: x[t, kq * per + kb] * (code(o, kq, kb).astype(F32) * cs),
                         lambda a, o: a)


def quantize_act_te(x):
    """ONNX DynamicQuantizeLinear on x (T, K), over the whole tensor (as the cpu artifact does, prefill
    included): scale = (max(x, 0) - min(x, 0)) / 255, zero = round(-min / scale), codes =
    clamp(round(x / scale) + zero, 0, 255), rounding half to even (nearbyint). Returns the codes minus the
    zero point as int16 (T, K) and the scale (1,)."""
    T, K = x.shape
    i, j = te.reduce_axis((0, T), name="i"), te.reduce_axis((0, K), name="j")
    mn = te.compute((1,), lambda _: te.min(x[i, j], axis=[i, j]), name="xmin")
    i2, j2 = te.reduce_axis((0, T), name="i2"), te.reduce_axis((0, K), name="j2")
    mx = te.compute((1,), lambda _: te.max(x[i2, j2], axis=[i2, j2]), name="xmax")
    zero, q255 = tirx.const(0.0, F32), tirx.const(255.0, F32)
    lo = lambda: tirx.min(mn[0], zero)  # noqa: E731
    xs = te.compute((1,), lambda _: tirx.Select(tirx.max(mx[0], zero) == lo(), tirx.const(1.0, F32),
                                                (tirx.max(mx[0], zero) - lo()) / q255), name="xscale")
    zp = te.compute((1,), lambda _: tirx.nearbyint(tirx.max(zero, tirx.min(q255, zero - lo() / xs[0]))), name="xzero")
    xc = te.compute((T, K), lambda t, k: tirx.max(tirx.min(tirx.nearbyint(x[t, k] / xs[0]), q255 - zp[0]),
                                                  zero - zp[0]).astype("int16"), name="xcodes")
    return [xc, xs]


def wkv7_kernel(H: int, N: int, lanes: int):
    """The RWKV-7 recurrence over T tokens, heads in parallel (i: value index, j: key index):

        sa_i = S[i,:] . a_t          S[i,j] = S[i,j] w_t[j] + sa_i b_t[j] + v_t[i] k_t[j]
        y_t[i] = S[i,:] . r_t

    r,w,k,v,a,b: (T, H, N); S_in (H, N, N) -> S_out (H, N, N), y (T, H, N). Row-wise: one pass over
    S[i,:] per token does both dot products and the update, `lanes`-wide partial sums.
    """
    from tvm.script import tirx as T
    VL = lanes if N % lanes == 0 else 1
    NJ = N // VL

    @T.prim_func(private=True)
    def wkv7(r_h: T.handle, w_h: T.handle, k_h: T.handle, v_h: T.handle, a_h: T.handle, b_h: T.handle,
             s_h: T.handle, so_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        n = T.int64()
        r = T.match_buffer(r_h, (n, H, N), "float32")
        w = T.match_buffer(w_h, (n, H, N), "float32")
        k = T.match_buffer(k_h, (n, H, N), "float32")
        v = T.match_buffer(v_h, (n, H, N), "float32")
        a = T.match_buffer(a_h, (n, H, N), "float32")
        b = T.match_buffer(b_h, (n, H, N), "float32")
        S0 = T.match_buffer(s_h, (H, N, N), "float32")
        S = T.match_buffer(so_h, (H, N, N), "float32")
        y = T.match_buffer(y_h, (n, H, N), "float32")
        for h in T.parallel(H):
            acc = T.decl_buffer((VL,), "float32", scope="local")
            dot = T.decl_buffer((1,), "float32", scope="local")
            for i in range(N):
                for j in T.vectorized(N):
                    S[h, i, j] = S0[h, i, j]
            for t in range(n):
                for i in range(N):
                    for l in T.vectorized(VL):
                        acc[l] = T.float32(0)
                    for jo in range(NJ):
                        for l in T.vectorized(VL):
                            acc[l] = acc[l] + S[h, i, jo * VL + l] * a[t, h, jo * VL + l]
                    dot[0] = T.float32(0)
                    for l in range(VL):
                        dot[0] = dot[0] + acc[l]
                    for j in T.vectorized(N):
                        S[h, i, j] = S[h, i, j] * w[t, h, j] + dot[0] * b[t, h, j] + v[t, h, i] * k[t, h, j]
                    for l in T.vectorized(VL):
                        acc[l] = T.float32(0)
                    for jo in range(NJ):
                        for l in T.vectorized(VL):
                            acc[l] = acc[l] + S[h, i, jo * VL + l] * r[t, h, jo * VL + l]
                    dot[0] = T.float32(0)
                    for l in range(VL):
                        dot[0] = dot[0] + acc[l]
                    y[t, h, i] = dot[0]

    return _finish(wkv7, f"wkv7_h{H}_n{N}")


def quantile_mask_kernel(F: int, m: int, frac: float):
    """The quantised-key predictor's mask (T, F) float32 1/0: est = raw + zt (raw (T, F) the code product,
    zt (T, 1) the zero-point term), and est > torch.quantile(est[t], q) per row, with pos = q (F-1) =
    lo + frac given as m = F - lo: the m-th largest value, interpolated towards the (m-1)-th (as
    emit_onnx.sparse_ffn_mask's TopK). A descending top-m list per row (insertion; a value enters only if
    it beats the current m-th), rows in parallel: no sort, which the TVM runtime would need a packed
    function for."""
    from tvm.script import tirx as T
    M = max(m, 2)
    fr = float(frac) if (frac > 0 and m >= 2) else 0.0

    @T.prim_func(private=True)
    def quantile_mask(r_h: T.handle, z_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        n = T.int64()
        raw = T.match_buffer(r_h, (n, F), "float32")
        zt = T.match_buffer(z_h, (n, 1), "float32")
        mask = T.match_buffer(o_h, (n, F), "float32")
        for t in T.parallel(n):
            top = T.decl_buffer((M,), "float32", scope="local")
            p = T.decl_buffer((1,), "int32", scope="local")
            thr = T.decl_buffer((1,), "float32", scope="local")
            for j in range(M):
                top[j] = T.float32(-3.0e38)
            for f in range(F):
                v = raw[t, f] + zt[t, 0]
                if v > top[m - 1]:
                    p[0] = 0
                    for j in range(m):
                        if top[j] >= v:
                            p[0] = p[0] + 1
                    for jj in range(m - 1 - p[0]):
                        top[m - 1 - jj] = top[m - 2 - jj]
                    top[p[0]] = v
            if fr > 0:
                thr[0] = top[m - 1] + (top[m - 2] - top[m - 1]) * T.float32(fr)
            else:
                thr[0] = top[m - 1]
            for f in range(F):
                mask[t, f] = T.Select(raw[t, f] + zt[t, 0] > thr[0], T.float32(1), T.float32(0))

    return _finish(quantile_mask, f"quantile_mask_f{F}_m{m}_{int(round(fr * 1e6))}")


def sparse_rows_kernel(F: int, C: int, lanes: int, quant: str):
    """The sparse FFN's key: k (T, F) = x (T, C) . K[f] for the units f any token uses (mask (T, F) 1/0),
    0 for the others, whose rows are never read. Units in parallel, a vector dot product per row.

        quant "float32"/"float16": (x f32, K (F, C) in that dtype, mask) -> k
        quant "int8": (x codes int16 (T, C), xs (1,), K int8 (F, C), scale (F,), mask) -> k, with
                      k = float(int32 dot) * (xs * scale[f])   (ONNX's rows_matmul_int8)
    """
    from tvm.script import tirx as T
    VL = lanes if C % lanes == 0 else 1
    NJ = C // VL

    if quant == "int8":
        @T.prim_func(private=True)
        def rows(x_h: T.handle, xs_h: T.handle, w_h: T.handle, s_h: T.handle, m_h: T.handle, o_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            n = T.int64()
            x = T.match_buffer(x_h, (n, C), "int16")
            xs = T.match_buffer(xs_h, (1,), "float32")
            w = T.match_buffer(w_h, (F, C), "int8")
            sc = T.match_buffer(s_h, (F,), "float32")
            mask = T.match_buffer(m_h, (n, F), "float32")
            out = T.match_buffer(o_h, (n, F), "float32")
            for f in T.parallel(F):
                used = T.decl_buffer((1,), "float32", scope="local")
                acc = T.decl_buffer((VL,), "int32", scope="local")
                dot = T.decl_buffer((1,), "int32", scope="local")
                used[0] = T.float32(0)
                for t in range(n):
                    used[0] = T.max(used[0], mask[t, f])
                for t in range(n):
                    if used[0] > T.float32(0.5):
                        for l in T.vectorized(VL):
                            acc[l] = 0
                        for jo in range(NJ):
                            for l in T.vectorized(VL):
                                acc[l] = acc[l] + T.Cast("int32", x[t, jo * VL + l]) * T.Cast("int32", w[f, jo * VL + l])
                        dot[0] = 0
                        for l in range(VL):
                            dot[0] = dot[0] + acc[l]
                        out[t, f] = T.Cast("float32", dot[0]) * (xs[0] * sc[f])
                    else:
                        out[t, f] = T.float32(0)
    else:
        @T.prim_func(private=True)
        def rows(x_h: T.handle, w_h: T.handle, m_h: T.handle, o_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            n = T.int64()
            x = T.match_buffer(x_h, (n, C), "float32")
            w = T.match_buffer(w_h, (F, C), quant)
            mask = T.match_buffer(m_h, (n, F), "float32")
            out = T.match_buffer(o_h, (n, F), "float32")
            for f in T.parallel(F):
                used = T.decl_buffer((1,), "float32", scope="local")
                acc = T.decl_buffer((VL,), "float32", scope="local")
                dot = T.decl_buffer((1,), "float32", scope="local")
                used[0] = T.float32(0)
                for t in range(n):
                    used[0] = T.max(used[0], mask[t, f])
                for t in range(n):
                    if used[0] > T.float32(0.5):
                        for l in T.vectorized(VL):
                            acc[l] = T.float32(0)
                        for jo in range(NJ):
                            for l in T.vectorized(VL):
                                acc[l] = acc[l] + x[t, jo * VL + l] * T.Cast("float32", w[f, jo * VL + l])
                        dot[0] = T.float32(0)
                        for l in range(VL):
                            dot[0] = dot[0] + acc[l]
                        out[t, f] = dot[0]
                    else:
                        out[t, f] = T.float32(0)

    return _finish(rows, f"sparse_rows_{quant}_f{F}_c{C}")


def sparse_cols_kernel(F: int, C: int, lanes: int, quant: str):
    """The sparse FFN's value: y (T, C) = h (T, F) @ Vt (F, C) adding only the rows of Vt (= value.T) whose
    h is not zero (units the predictors left out, or whose relu was 0, are never read). Column blocks in
    parallel, each sweeping the used rows' slice with a vector accumulator.

        quant "float32"/"float16": (h f32, Vt in that dtype) -> y
        quant "int8": (h codes int16 (T, F), hs (1,), Vt int8 (F, C), scale (C,)) -> y, with
                      y = float(int32 sum) * (hs * scale[c])   (ONNX's cols_matmul_int8; a zero h has code 0)
    """
    from tvm.script import tirx as T
    CB = next((b for b in (4 * lanes, 2 * lanes, lanes) if C % b == 0), C)
    NB = C // CB

    if quant == "int8":
        @T.prim_func(private=True)
        def cols(h_h: T.handle, hs_h: T.handle, w_h: T.handle, s_h: T.handle, o_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            n = T.int64()
            h = T.match_buffer(h_h, (n, F), "int16")
            hs = T.match_buffer(hs_h, (1,), "float32")
            w = T.match_buffer(w_h, (F, C), "int8")
            sc = T.match_buffer(s_h, (C,), "float32")
            out = T.match_buffer(o_h, (n, C), "float32")
            for cb in T.parallel(NB):
                acc = T.decl_buffer((CB,), "int32", scope="local")
                for t in range(n):
                    for l in T.vectorized(CB):
                        acc[l] = 0
                    for f in range(F):
                        if h[t, f] != T.int16(0):
                            for l in T.vectorized(CB):
                                acc[l] = acc[l] + T.Cast("int32", h[t, f]) * T.Cast("int32", w[f, cb * CB + l])
                    for l in T.vectorized(CB):
                        out[t, cb * CB + l] = T.Cast("float32", acc[l]) * (hs[0] * sc[cb * CB + l])
    else:
        @T.prim_func(private=True)
        def cols(h_h: T.handle, w_h: T.handle, o_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            n = T.int64()
            h = T.match_buffer(h_h, (n, F), "float32")
            w = T.match_buffer(w_h, (F, C), quant)
            out = T.match_buffer(o_h, (n, C), "float32")
            for cb in T.parallel(NB):
                acc = T.decl_buffer((CB,), "float32", scope="local")
                for t in range(n):
                    for l in T.vectorized(CB):
                        acc[l] = T.float32(0)
                    for f in range(F):
                        if h[t, f] != T.float32(0):
                            for l in T.vectorized(CB):
                                acc[l] = acc[l] + h[t, f] * T.Cast("float32", w[f, cb * CB + l])
                    for l in T.vectorized(CB):
                        out[t, cb * CB + l] = acc[l]

    return _finish(cols, f"sparse_cols_{quant}_f{F}_c{C}")


def select_clusters_kernel(K: int, top_p: float, min_k: int, max_k: int):
    """chosen (K,) 1/0 from the cluster probabilities p (K,): the clusters in descending order of p (ties:
    lower index first, as ONNX Runtime's TopK) up to and including the first whose cumulative sum reaches
    top_p, at least min_k and at most max_k of them (emit_onnx.emit_clustered's rule, same float sums).
    Outputs chosen (K,) and the number of head rows they hold (1,) int64 (the rows read for this token).
    (bounds is an input for that count; a kernel with a single tensor input would also be asked by Relax
    whether it is a reshape, an analysis that needs a root block these loop-level kernels do not have.)"""
    from tvm.script import tirx as T
    lo_n, hi_n = min(min_k, K), min(max_k, K)

    @T.prim_func(private=True)
    def select(p_h: T.handle, b_h: T.handle, c_h: T.handle, n_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        p = T.match_buffer(p_h, (K,), "float32")
        bounds = T.match_buffer(b_h, (K + 1,), "int64")
        chosen = T.match_buffer(c_h, (K,), "float32")
        nrows = T.match_buffer(n_h, (1,), "int64")
        cnt = T.decl_buffer((1,), "int32", scope="local")
        rank = T.decl_buffer((K,), "int32")
        srt = T.decl_buffer((K,), "float32")
        acc = T.decl_buffer((1,), "float32", scope="local")
        for c in T.parallel(K):
            cnt2 = T.decl_buffer((1,), "int32", scope="local")
            cnt2[0] = 0
            for j in range(K):
                if p[j] > p[c] or (p[j] == p[c] and j < c):
                    cnt2[0] = cnt2[0] + 1
            rank[c] = cnt2[0]
        for c in range(K):
            srt[rank[c]] = p[c]
        acc[0] = T.float32(0)
        cnt[0] = 1
        for r in range(K):
            acc[0] = acc[0] + srt[r]
            if acc[0] < T.float32(top_p):
                cnt[0] = cnt[0] + 1
        cnt[0] = T.max(T.min(cnt[0], hi_n), lo_n)
        nrows[0] = T.int64(0)
        for c in range(K):
            chosen[c] = T.Select(rank[c] < cnt[0], T.float32(1), T.float32(0))
            if rank[c] < cnt[0]:
                nrows[0] = nrows[0] + bounds[c + 1] - bounds[c]

    return _finish(select, f"select_clusters_k{K}_{int(round(top_p * 1e6))}_{min_k}_{max_k}")


def rows_kernel(K: int, V: int, C: int, lanes: int, quant: str):
    """exact (V,) = rows (V, C) . x for the rows of the chosen clusters only (the others are not written):
    clusters in parallel; a cluster not chosen costs nothing and its rows are never read.

        quant "float32"/"float16": (x (1, C) f32, rows (V, C) in that dtype, widened in registers, chosen, bounds)
        quant "int8": (x codes (1, C) int16, xs (1,), rows int8 (V, C), scale (V,), chosen, bounds):
                      exact = float(int32 dot) * (xs * scale[r])  (ONNX's rows_matmul_int8)
    """
    from tvm.script import tirx as T
    VL = lanes if C % lanes == 0 else 1
    NJ = C // VL
    wdt = "int8" if quant == "int8" else quant

    if quant == "int8":
        @T.prim_func(private=True)
        def rows(x_h: T.handle, xs_h: T.handle, w_h: T.handle, s_h: T.handle, c_h: T.handle, b_h: T.handle,
                 o_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            x = T.match_buffer(x_h, (1, C), "int16")
            xs = T.match_buffer(xs_h, (1,), "float32")
            w = T.match_buffer(w_h, (V, C), "int8")
            sc = T.match_buffer(s_h, (V,), "float32")
            chosen = T.match_buffer(c_h, (K,), "float32")
            bounds = T.match_buffer(b_h, (K + 1,), "int64")
            out = T.match_buffer(o_h, (V,), "float32")
            for c in T.parallel(K):
                acc = T.decl_buffer((VL,), "int32", scope="local")
                dot = T.decl_buffer((1,), "int32", scope="local")
                if chosen[c] > T.float32(0.5):
                    for r in range(bounds[c + 1] - bounds[c]):
                        for l in T.vectorized(VL):
                            acc[l] = 0
                        for jo in range(NJ):
                            for l in T.vectorized(VL):
                                acc[l] = acc[l] + (T.Cast("int32", x[0, jo * VL + l])
                                                   * T.Cast("int32", w[bounds[c] + r, jo * VL + l]))
                        dot[0] = 0
                        for l in range(VL):
                            dot[0] = dot[0] + acc[l]
                        out[bounds[c] + r] = T.Cast("float32", dot[0]) * (xs[0] * sc[bounds[c] + r])
    else:
        @T.prim_func(private=True)
        def rows(x_h: T.handle, w_h: T.handle, c_h: T.handle, b_h: T.handle, o_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            x = T.match_buffer(x_h, (1, C), "float32")
            w = T.match_buffer(w_h, (V, C), wdt)
            chosen = T.match_buffer(c_h, (K,), "float32")
            bounds = T.match_buffer(b_h, (K + 1,), "int64")
            out = T.match_buffer(o_h, (V,), "float32")
            for c in T.parallel(K):
                acc = T.decl_buffer((VL,), "float32", scope="local")
                dot = T.decl_buffer((1,), "float32", scope="local")
                if chosen[c] > T.float32(0.5):
                    for r in range(bounds[c + 1] - bounds[c]):
                        for l in T.vectorized(VL):
                            acc[l] = T.float32(0)
                        for jo in range(NJ):
                            for l in T.vectorized(VL):
                                acc[l] = acc[l] + x[0, jo * VL + l] * T.Cast("float32", w[bounds[c] + r, jo * VL + l])
                        dot[0] = T.float32(0)
                        for l in range(VL):
                            dot[0] = dot[0] + acc[l]
                        out[bounds[c] + r] = dot[0]

    return _finish(rows, f"rows_{quant}_k{K}_v{V}_c{C}")


def combine_kernel(K: int, V: int, prior: bool):
    """The clustered head's logits in token order from the exact rows of the chosen clusters:

        lse = logsumexp(exact rows of chosen clusters);  lc = log sum_chosen p
        row r of cluster c:  chosen c: exact[r];   else (logp[c] + (lse - lc)) + log q_r
        out[order[r]] = that                      (log q_r: -log |c| as `lq` (K,), or the prior (V,))
    """
    from tvm.script import tirx as T
    NQ = V if prior else K

    @T.prim_func(private=True)
    def combine(e_h: T.handle, lp_h: T.handle, p_h: T.handle, c_h: T.handle, b_h: T.handle, q_h: T.handle,
                od_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        exact = T.match_buffer(e_h, (V,), "float32")
        logp = T.match_buffer(lp_h, (K,), "float32")
        prob = T.match_buffer(p_h, (K,), "float32")
        chosen = T.match_buffer(c_h, (K,), "float32")
        bounds = T.match_buffer(b_h, (K + 1,), "int64")
        lq = T.match_buffer(q_h, (NQ,), "float32")
        order = T.match_buffer(od_h, (V,), "int32")
        out = T.match_buffer(o_h, (V,), "float32")
        mx = T.decl_buffer((1,), "float32", scope="local")
        sm = T.decl_buffer((1,), "float32", scope="local")
        pc = T.decl_buffer((1,), "float32", scope="local")
        mx[0] = T.float32(-3.0e38)
        for c in range(K):
            if chosen[c] > T.float32(0.5):
                for r in range(bounds[c + 1] - bounds[c]):
                    mx[0] = T.max(mx[0], exact[bounds[c] + r])
        sm[0] = T.float32(0)
        pc[0] = T.float32(0)
        for c in range(K):
            pc[0] = pc[0] + prob[c] * chosen[c]
            if chosen[c] > T.float32(0.5):
                for r in range(bounds[c + 1] - bounds[c]):
                    sm[0] = sm[0] + T.exp(exact[bounds[c] + r] - mx[0])
        for c in T.parallel(K):
            for r in range(bounds[c + 1] - bounds[c]):
                if chosen[c] > T.float32(0.5):
                    out[order[bounds[c] + r]] = exact[bounds[c] + r]
                elif prior:
                    out[order[bounds[c] + r]] = (logp[c] + ((mx[0] + T.log(sm[0])) - T.log(pc[0]))) + lq[bounds[c] + r]
                else:
                    out[order[bounds[c] + r]] = (logp[c] + ((mx[0] + T.log(sm[0])) - T.log(pc[0]))) - lq[c]

    return _finish(combine, f"combine_k{K}_v{V}{'_prior' if prior else ''}")


# ----------------------------------------------------------------------------------------------
# Emission context


class Ctx:
    """One BlockBuilder, the kernel cache, and the arguments of the function being built."""

    def __init__(self, bb, ks: KernelShape, cfg: ir.ModelConfig):
        self.bb, self.ks, self.cfg = bb, ks, cfg
        self.kernels: dict[tuple, object] = {}
        self.W: dict[str, object] = {}     # relative parameter name -> relax expr, for the current function
        self.quantized: list = []          # (x, (codes, scale)): activations already quantised in this function

    def emit(self, expr):
        return self.bb.emit(expr)

    def kernel(self, key: tuple, make: Callable):
        if key not in self.kernels:
            func = make()
            self.kernels[key] = self.bb.add_func(func, func.attrs["global_symbol"])
        return self.kernels[key]

    def rows_of(self, x):
        return x.ty.shape[0]

    def is_decode(self, x) -> bool:
        T = self.rows_of(x)
        return isinstance(T, tirx.IntImm) and int(T) == 1

    def _slice(self, y, n: int, out: int):
        return y if n == out else self.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[out]))

    def dense(self, x, wp, out: int):
        """x (T, K) @ packed wp (NB, K, P) -> (T, out)."""
        K = int(x.ty.shape[1])
        NB, K2, P = (int(d) for d in wp.ty.shape)
        assert K == K2, (K, K2)
        decode = self.is_decode(x)
        wd = str(wp.ty.dtype)
        gv = self.kernel(("dense", K, NB, P, decode, wd), lambda: dense_kernel(K, NB, P, self.ks.rows, decode, wd))
        y = self.emit(relax.call_tir(gv, [x, wp], relax.TensorType([self.rows_of(x), NB * P], F32)))
        return self._slice(y, NB * P, out)

    def quantize(self, x):
        """(codes - zero int16 (T, K), scale (1,)) of x: one DynamicQuantizeLinear per distinct input."""
        for v, q in self.quantized:
            if v.same_as(x):
                return q
        out = self.bb.emit_te(quantize_act_te, x, primfunc_name_hint="quantize_act")
        q = (self.emit(relax.TupleGetItem(out, 0)), self.emit(relax.TupleGetItem(out, 1)))
        self.quantized.append((x, q))
        return q

    def int8(self, x, q, scale, out: int):
        """x (T, K) float32 @ int8 panels q (NB, K, P) with per-channel scale (NB*P,) -> (T, out)."""
        xc, xs = self.quantize(x)
        K = int(x.ty.shape[1])
        NB, _, P = (int(d) for d in q.ty.shape)
        decode = self.is_decode(x)
        gv = self.kernel(("int8", K, NB, P, decode), lambda: int8_kernel(K, NB, P, self.ks.rows, decode))
        y = self.emit(relax.call_tir(gv, [xc, q, xs, scale], relax.TensorType([self.rows_of(x), NB * P], F32)))
        return self._slice(y, NB * P, out)

    def pad_cols(self, x, K: int):
        """x (T, k) -> (T, K) with zero columns appended (for kernels that read K in whole groups)."""
        k = int(x.ty.shape[1])
        if k == K:
            return x
        return self.bb.emit_te(lambda x: te.compute((x.shape[0], K), lambda t, j: tirx.if_then_else(
            j < k, x[t, tirx.min(j, k - 1)], tirx.const(0, F32)), name="pad_cols"), x, primfunc_name_hint="pad_cols")

    def nbit(self, x, codes, out: int, bits: int, group: int | None = None, scales=None, zeros=None,
             const_scale: float = 1.0):
        """x (T, k) @ dequant(`bits`-bit code panels (NB, K*bits/8, P)).T -> (T, out); see nbit_kernel."""
        NB, KB, P = (int(d) for d in codes.ty.shape)
        K = KB * (8 // bits)
        x = self.pad_cols(x, K)
        decode = self.is_decode(x)
        key = ("nbit", K, NB, P, decode, bits, group, None if group else const_scale)
        gv = self.kernel(key, lambda: nbit_kernel(K, NB, P, self.ks.rows, decode, bits, group, const_scale))
        args = [x, codes] + ([scales, zeros] if group is not None else [])
        y = self.emit(relax.call_tir(gv, args, relax.TensorType([self.rows_of(x), NB * P], F32)))
        return self._slice(y, NB * P, out)

    def wkv7(self, S, **v):
        H, N = self.cfg.n_head, self.cfg.head_size
        T = self.rows_of(v["r"])
        gv = self.kernel(("wkv7", H, N), lambda: wkv7_kernel(H, N, self.ks.lanes))
        args = [self.emit(relax.op.reshape(v[n], [T, H, N])) for n in ("r", "w", "k", "v", "a", "b")]
        out = self.emit(relax.call_tir(gv, args + [S], [relax.TensorType([H, N, N], F32),
                                                         relax.TensorType([T, H, N], F32)]))
        S2 = self.emit(relax.TupleGetItem(out, 0))
        y = self.emit(relax.op.reshape(self.emit(relax.TupleGetItem(out, 1)), [T, H * N]))
        return y, S2


# ----------------------------------------------------------------------------------------------
# Matrices: IR weight kind -> (packed arrays, kernel call)


@dataclass(frozen=True)
class LinearLowering:
    """How one weight representation is stored in weights.bin and multiplied."""
    params: Callable[[ir.Linear, KernelShape], dict[str, np.ndarray]]   # suffix -> array
    emit: Callable[[Ctx, str, ir.Linear, object], object]               # (ctx, rel name, lin, x) -> y


def pack_panels_raw(w: np.ndarray, panel: int) -> np.ndarray:
    """pack_panels keeping the dtype (int8 weights, uint8 code bytes): (out, k) -> (ceil(out/panel), k, panel)."""
    w = np.asarray(w)
    out, k = w.shape
    nb = -(-out // panel)
    if nb * panel != out:
        w = np.concatenate([w, np.zeros((nb * panel - out, k), w.dtype)])
    return np.ascontiguousarray(w.reshape(nb, panel, k).transpose(0, 2, 1))


def _pad_rows(v: np.ndarray, panel: int) -> np.ndarray:
    n = -(-v.shape[0] // panel) * panel
    return np.concatenate([v, np.zeros((n - v.shape[0],) + v.shape[1:], v.dtype)]) if n != v.shape[0] else v


def _dense_params(lin: ir.Linear, ks: KernelShape) -> dict:
    return {"wp": pack_panels(lin.weight.w, ks.panel, ks.weights)}


def _dense_emit(ctx: Ctx, rel: str, lin: ir.Linear, x):
    return ctx.dense(x, ctx.W[rel + ".wp"], lin.out_features)


def _lowrank_params(lin: ir.Linear, ks: KernelShape) -> dict:
    lr = lin.weight
    d = {"ap": pack_panels(lr.a, ks.panel, ks.weights), "bp": pack_panels(lr.b, ks.panel, ks.weights)}
    if lr.diag is not None:
        d["diag"] = np.asarray(lr.diag, np.float32)
    return d


def _activation(ctx: Ctx, h, act):
    if act in ("relu", "relu2"):
        h = ctx.emit(relax.op.nn.relu(h))
        if act == "relu2":
            h = ctx.emit(relax.op.multiply(h, h))
    return h


def _lowrank_emit(ctx: Ctx, rel: str, lin: ir.Linear, x):
    lr = lin.weight
    h = _activation(ctx, ctx.dense(x, ctx.W[rel + ".ap"], lr.rank), lr.act)    # (T, rank)
    y = ctx.dense(h, ctx.W[rel + ".bp"], lr.b.shape[0])                    # (T, out)
    if lr.diag is not None:
        y = ctx.emit(relax.op.add(y, relax.op.multiply(x, ctx.W[rel + ".diag"])))
    return y


def _int8_params(lin: ir.Linear, ks: KernelShape) -> dict:
    """int8 codes in panels (NB, K, P) as stored (1 byte per weight), the scales padded to NB*P."""
    w = lin.weight
    return {"q8p": pack_panels_raw(np.asarray(w.q, np.int8), ks.panel),
            "q8scale": _pad_rows(np.asarray(w.scale, np.float32), ks.panel)}


def _int8_emit(ctx: Ctx, rel: str, lin: ir.Linear, x):
    return ctx.int8(x, ctx.W[rel + ".q8p"], ctx.W[rel + ".q8scale"], lin.out_features)


def _int4_params(lin: ir.Linear, ks: KernelShape) -> dict:
    """The MatMulNBits bytes re-laid as panels: codes (NB, Kp/2, P) uint8 (two codes per byte along K,
    low nibble first, as stored), scales (NB, nb, P) f32 and zero points (NB, nb, P) uint8 per group."""
    w = lin.weight
    N, nb, half = w.packed.shape
    return {"q4p": pack_panels_raw(np.asarray(w.packed, np.uint8).reshape(N, nb * half), ks.panel),
            "q4scales": pack_panels_raw(np.asarray(w.scales, np.float32), ks.panel),
            "q4zeros": pack_panels_raw(w.zero_points().astype(np.uint8), ks.panel)}


def _int4_emit(ctx: Ctx, rel: str, lin: ir.Linear, x):
    w = lin.weight
    return ctx.nbit(x, ctx.W[rel + ".q4p"], lin.out_features, 4, w.group, ctx.W[rel + ".q4scales"],
                    ctx.W[rel + ".q4zeros"])


def _sub(lin: ir.Linear, suffix: str, rep) -> ir.Linear:
    return ir.Linear(f"{lin.name}.{suffix}", rep)


def _nested_params(lin: ir.Linear, ks: KernelShape, parts: dict) -> dict:
    d = {}
    for suffix, rep in parts.items():
        sub = _sub(lin, suffix, rep)
        d.update({f"{suffix}.{k}": v for k, v in LINEAR_LOWERINGS[sub.kind].params(sub, ks).items()})
    return d


def _factored_params(lin: ir.Linear, ks: KernelShape) -> dict:
    f = lin.weight
    d = _nested_params(lin, ks, {"a": f.a, "b": f.b})
    if f.diag is not None:
        d["diag"] = np.asarray(f.diag, np.float32)
    return d


def _factored_emit(ctx: Ctx, rel: str, lin: ir.Linear, x):
    f = lin.weight
    h = _activation(ctx, linear(ctx, rel + ".a", _sub(lin, "a", f.a), x), f.act)
    y = linear(ctx, rel + ".b", _sub(lin, "b", f.b), h)
    if f.diag is not None:
        y = ctx.emit(relax.op.add(y, relax.op.multiply(x, ctx.W[rel + ".diag"])))
    return y


def _scaled_params(lin: ir.Linear, ks: KernelShape) -> dict:
    return {**_nested_params(lin, ks, {"inner": lin.weight.inner}),
            "in_scale": np.asarray(lin.weight.in_scale, np.float32)}


def _scaled_emit(ctx: Ctx, rel: str, lin: ir.Linear, x):
    xs = ctx.emit(relax.op.multiply(x, ctx.W[rel + ".in_scale"]))
    return linear(ctx, rel + ".inner", _sub(lin, "inner", lin.weight.inner), xs)


def _clustered_params(lin: ir.Linear, ks: KernelShape) -> dict:
    """cluster.*: the cluster head as its own kind; rows: (V, C) row-major, one row per token in cluster
    order (float in ks.weights, or int8 codes + per-row scales) so the kernel reads only chosen clusters;
    bounds (K+1,) int64; lq: log |c| (K,) or the prior log q (V,); order (V,) int32: row -> token id."""
    ch = lin.weight
    d = _nested_params(lin, ks, {"cluster": ch.cluster})
    rows = ch.rows if hasattr(ch.rows, "kind") else ir.Dense(ch.rows)
    if rows.kind == "dense":
        d["rows"] = np.ascontiguousarray(rows.w, ks.weights)
    elif rows.kind == "int8":
        d["rows.q8"] = np.ascontiguousarray(rows.q, np.int8)
        d["rows.q8scale"] = np.asarray(rows.scale, np.float32)
    else:                                        # any other kind: every row through its own lowering
        d.update(_nested_params(lin, ks, {"rows": rows}))
    d["bounds"] = np.asarray(ch.bounds, np.int64)
    d["lq"] = (ch.row_log_prior() if ch.log_prior is not None
               else np.log(np.maximum(np.diff(ch.bounds), 1)).astype(np.float32))
    d["order"] = np.asarray(ch.order, np.int32)
    return d


def _clustered_emit(ctx: Ctx, rel: str, lin: ir.Linear, x):
    """The hierarchical head of one token, x (1, C) -> (1, V) (emit_onnx.emit_clustered's function):

        x ─► cluster head ─► log_softmax, exp ─► select_clusters ─► chosen (K,) 0/1
        x ─► rows kernel (only the chosen clusters' rows are read) ─► exact (V,) in row order
        combine: exact where chosen, else logsumexp(exact) + log p_c - log sum_chosen p + log q_r,
                 scattered to token order
    """
    ch = lin.weight
    V, C = ch.shape
    K = ch.n_clusters
    W, op, em = ctx.W, relax.op, ctx.emit
    z = em(op.reshape(linear(ctx, rel + ".cluster", _sub(lin, "cluster", ch.cluster), x), [K]))
    logp = em(op.nn.log_softmax(z, axis=0))
    prob = em(op.exp(logp))
    vec = lambda n, dt=F32: relax.TensorType([n], dt)  # noqa: E731
    sel = ctx.kernel(("select", K, ch.top_p, ch.min_k, ch.max_k),
                     lambda: select_clusters_kernel(K, ch.top_p, ch.min_k, ch.max_k))
    bounds = W[rel + ".bounds"]
    chosen = em(relax.TupleGetItem(em(relax.call_tir(sel, [prob, bounds], [vec(K), vec(1, "int64")])), 0))
    if rel + ".rows" in W:
        wd = str(W[rel + ".rows"].ty.dtype)
        gv = ctx.kernel(("rows", K, V, C, wd), lambda: rows_kernel(K, V, C, ctx.ks.lanes, wd))
        exact = em(relax.call_tir(gv, [x, W[rel + ".rows"], chosen, bounds], vec(V)))
    elif rel + ".rows.q8" in W:
        xc, xs = ctx.quantize(x)
        gv = ctx.kernel(("rows", K, V, C, "int8"), lambda: rows_kernel(K, V, C, ctx.ks.lanes, "int8"))
        exact = em(relax.call_tir(gv, [xc, xs, W[rel + ".rows.q8"], W[rel + ".rows.q8scale"], chosen, bounds], vec(V)))
    else:
        rows = ch.rows
        exact = em(op.reshape(linear(ctx, rel + ".rows", _sub(lin, "rows", rows), x), [V]))
    prior = ch.log_prior is not None
    gv = ctx.kernel(("combine", K, V, prior), lambda: combine_kernel(K, V, prior))
    out = em(relax.call_tir(gv, [exact, logp, prob, chosen, bounds, W[rel + ".lq"], W[rel + ".order"]], vec(V)))
    return em(op.reshape(out, [1, V]))


# IR weight kind -> lowering. Quantised kinds keep their codes packed in weights.bin (int8: 1 byte,
# int4: half a byte per weight, in panels) and their kernels dequantise in registers inside the k loop.
LINEAR_LOWERINGS: dict[str, LinearLowering] = {
    "dense": LinearLowering(_dense_params, _dense_emit),
    "lowrank": LinearLowering(_lowrank_params, _lowrank_emit),
    "int8": LinearLowering(_int8_params, _int8_emit),
    "int4": LinearLowering(_int4_params, _int4_emit),
    "factored": LinearLowering(_factored_params, _factored_emit),
    "scaled": LinearLowering(_scaled_params, _scaled_emit),
    "clustered": LinearLowering(_clustered_params, _clustered_emit),
}


def linear(ctx: Ctx, rel: str, lin: ir.Linear, x):
    return LINEAR_LOWERINGS[lin.kind].emit(ctx, rel, lin, x)


# ----------------------------------------------------------------------------------------------
# The embedding: kind -> (its parameters, the rows of the tokens as float32 (T, C))


def _dense_emb_params(model: ir.Model, ks: KernelShape) -> dict:
    from rwkvc.emit_onnx import folded_embedding
    return {"emb.folded": np.ascontiguousarray(folded_embedding(model), ks.weights)}      # (V, C), ln0 folded in


def _lazy_emb_params(model: ir.Model, ks: KernelShape) -> dict:
    """lazy-emb: the folded table in its storage format; the runner memory-maps weights.bin, so a token
    touches only its row's pages (int8: codes (V, C) and a scale per row (V, 1), as the cpu artifact)."""
    from rwkvc.emit_onnx import folded_embedding
    e = model.emb.weight
    if e.storage == "int8":
        from rwkvc.passes.quant import quantize_int8
        q, sc = quantize_int8(folded_embedding(model))
        return {"emb.q8": q, "emb.q8scale": sc[:, None].astype(np.float32)}
    return {"emb.folded": np.ascontiguousarray(folded_embedding(model), e.storage)}


def embed(ctx: Ctx, P: Params, get, tokens):
    """x (T, C) float32: the tokens' rows of the embedding, as its parameters store them."""
    op, em = relax.op, ctx.emit
    if "emb.q8" in P.arrays:
        rows = em(op.astype(em(op.take(get("emb.q8"), tokens, axis=0, mode="clip")), F32))
        return em(op.multiply(rows, em(op.take(get("emb.q8scale"), tokens, axis=0, mode="clip"))))
    x = em(op.take(get("emb.folded"), tokens, axis=0, mode="clip"))
    return x if P.arrays["emb.folded"].dtype == np.float32 else em(op.astype(x, F32))


EMBED_LOWERINGS: dict[str, Callable[[ir.Model, KernelShape], dict]] = {"dense": _dense_emb_params,
                                                                      "lazy": _lazy_emb_params}


def weight_kinds() -> frozenset[str]:
    """Every representation kind the TVM lowering handles (the targets' capabilities)."""
    return frozenset(LINEAR_LOWERINGS) | frozenset(EMBED_LOWERINGS)


# ----------------------------------------------------------------------------------------------
# The sparse FFN (RWKV-Lite's activation predictors)


def pack_codes(codes: np.ndarray, bits: int, panel: int) -> np.ndarray:
    """codes (F, C) in 0..2^bits-1 -> panels (NB, ceil(C*bits/8), P) uint8, 8/bits codes per byte along C,
    low bits first (C padded with zero codes)."""
    c = np.asarray(codes, np.uint8)
    per = 8 // bits
    F, C = c.shape
    Kp = -(-C // per) * per
    if Kp != C:
        c = np.concatenate([c, np.zeros((F, Kp - C), np.uint8)], axis=1)
    c = c.reshape(F, Kp // per, per)
    b = np.zeros((F, Kp // per), np.uint8)
    for i in range(per):
        b |= (c[..., i] << (bits * i)).astype(np.uint8)
    return pack_panels_raw(b, panel)


def code_bits(q_bits: int) -> int:
    return 1 if q_bits <= 1 else 2 if q_bits <= 2 else 4 if q_bits <= 4 else 8


def _sparse_params(sp: ir.SparseFFN, ks: KernelShape) -> list[tuple[str, np.ndarray]]:
    out = []
    if sp.fc1 is not None:
        out += [("fc1p", pack_panels(sp.fc1, ks.panel, ks.weights)), ("fc2p", pack_panels(sp.fc2, ks.panel, ks.weights))]
    if sp.q_codes is not None:
        out.append(("codes", pack_codes(sp.q_codes, code_bits(sp.q_bits), ks.panel)))
    return out


ROW_KINDS = ("dense", "int8")   # kinds the sparse FFN reads row by row (others: masked full product)


def selective_sparse(ffn: ir.ChannelMix) -> bool:
    return ffn.sparse is not None and all(ffn.lin[m].kind in ROW_KINDS for m in ("key", "value"))


def _sparse_rows_params(ffn: ir.ChannelMix, ks: KernelShape) -> list[tuple[str, np.ndarray]]:
    """A sparse layer's key (F, C) and value.T (F, C) row-major, one row per unit, so a token reads only
    its units' rows (float in ks.weights; int8 codes with the per-channel scales of W)."""
    out = []
    for m, transpose in (("key", False), ("value", True)):
        w = ffn.lin[m].weight
        if w.kind == "int8":
            q = np.asarray(w.q, np.int8)
            out += [(f"ffn.{m}.q8rows", np.ascontiguousarray(q.T if transpose else q)),
                    (f"ffn.{m}.q8scale", np.asarray(w.scale, np.float32))]
        else:
            a = np.asarray(w.w, np.float32)
            out.append((f"ffn.{m}.rows", np.ascontiguousarray(a.T if transpose else a, ks.weights)))
    return out


def sparse_ffn_selective(ctx: Ctx, ffn: ir.ChannelMix, xk, mask):
    """relu(key xk)^2 * mask -> value, reading only the used units' rows of key and of value.T:

        xk (T,C) ─► sparse_rows(key rows, mask) ─► k (T,F), 0 where unused ─► relu² ─► * mask ─► h (T,F)
        h ─► sparse_cols(value.T rows where h != 0) ─► (T,C)

    int8 key / value quantise xk and the whole masked h as the cpu artifact's gathered products do (the
    zeros of h change neither its scale nor its codes)."""
    W, op, em = ctx.W, relax.op, ctx.emit
    T = ctx.rows_of(xk)
    F, C = ffn.lin["key"].out_features, ffn.lin["key"].in_features
    lanes = ctx.ks.lanes
    if ffn.lin["key"].kind == "int8":
        xc, xs = ctx.quantize(xk)
        gv = ctx.kernel(("sparse_rows", F, C, "int8"), lambda: sparse_rows_kernel(F, C, lanes, "int8"))
        k = em(relax.call_tir(gv, [xc, xs, W["ffn.key.q8rows"], W["ffn.key.q8scale"], mask], relax.TensorType([T, F], F32)))
    else:
        wd = str(W["ffn.key.rows"].ty.dtype)
        gv = ctx.kernel(("sparse_rows", F, C, wd), lambda: sparse_rows_kernel(F, C, lanes, wd))
        k = em(relax.call_tir(gv, [xk, W["ffn.key.rows"], mask], relax.TensorType([T, F], F32)))
    k = em(op.nn.relu(k))
    h = em(op.multiply(op.multiply(k, k), mask))
    if ffn.lin["value"].kind == "int8":
        hc, hs = ctx.quantize(h)
        gv = ctx.kernel(("sparse_cols", F, C, "int8"), lambda: sparse_cols_kernel(F, C, lanes, "int8"))
        return em(relax.call_tir(gv, [hc, hs, W["ffn.value.q8rows"], W["ffn.value.q8scale"]], relax.TensorType([T, C], F32)))
    wd = str(W["ffn.value.rows"].ty.dtype)
    gv = ctx.kernel(("sparse_cols", F, C, wd), lambda: sparse_cols_kernel(F, C, lanes, wd))
    return em(relax.call_tir(gv, [h, W["ffn.value.rows"]], relax.TensorType([T, C], F32)))


def sparse_ffn_mask(ctx: Ctx, sp: ir.SparseFFN, xk, F: int):
    """(T, F) float32 1/0: mlp predictor | quantised-key predictor (emit_onnx.sparse_ffn_mask)."""
    W, op, em = ctx.W, relax.op, ctx.emit
    masks = []
    if sp.fc1 is not None:
        h = em(op.nn.relu(ctx.dense(xk, W["ffn.sparse.fc1p"], sp.fc1.shape[0])))
        logit = ctx.dense(h, W["ffn.sparse.fc2p"], F)
        masks.append(em(op.greater(op.sigmoid(logit), relax.const(sp.mlp_threshold, F32))))
    if sp.q_codes is not None:
        # est ~ key(xk) = q_scale * (xk @ codes^T) + q_zero * sum(xk); the codes stay packed (bits per code)
        raw = ctx.nbit(xk, W["ffn.sparse.codes"], F, code_bits(sp.q_bits), const_scale=float(sp.q_scale))
        zt = em(op.multiply(op.sum(xk, axis=[-1], keepdims=True), relax.const(float(sp.q_zero), F32)))
        pos = sp.q_quantile * (F - 1)
        lo = int(math.floor(pos))
        frac = pos - lo if lo + 1 < F else 0.0
        gv = ctx.kernel(("quantile", F, F - lo, frac), lambda: quantile_mask_kernel(F, F - lo, frac))
        masks.append(em(relax.call_tir(gv, [raw, zt], relax.TensorType([ctx.rows_of(xk), F], F32))))
    if len(masks) == 1:
        return masks[0] if sp.fc1 is None else em(op.astype(masks[0], F32))
    return em(op.maximum(em(op.astype(masks[0], F32)), masks[1]))             # or, on 1/0 floats


# ----------------------------------------------------------------------------------------------
# Parameters of the model, in order


def collect_params(model: ir.Model, ks: KernelShape) -> Params:
    P = Params()
    for name, arr in EMBED_LOWERINGS[model.emb.weight.kind](model, ks).items():
        P.add(name, arr, arr.dtype)
    for i, blk in enumerate(model.blocks):
        for rel, arr in block_arrays(blk, ks):
            P.add(f"blocks.{i}.{rel}", arr, arr.dtype)
    P.add("ln_out.weight", model.ln_out.weight)
    P.add("ln_out.bias", model.ln_out.bias)
    for suffix, arr in LINEAR_LOWERINGS[model.head.kind].params(model.head, ks).items():
        P.add(f"head.{suffix}", arr, arr.dtype)
    return P


def block_arrays(blk: ir.Block, ks: KernelShape) -> list[tuple[str, np.ndarray]]:
    """One block's parameters, names relative to `blocks.{i}.`: vectors float32, matrices as their
    lowering packs them (ks.weights for float matrices; quantised kinds in their own formats)."""
    f32 = lambda n, a: (n, np.asarray(a, np.float32))  # noqa: E731
    out = [f32("ln1.weight", blk.ln1.weight), f32("ln1.bias", blk.ln1.bias)]
    out += [f32(f"att.{m}", v) for m, v in blk.att.mix.items()]
    out += [f32(f"att.{m}", v) for m, v in blk.att.vec.items()]
    for m, lin in blk.att.lin.items():
        out += [(f"att.{m}.{s}", a) for s, a in LINEAR_LOWERINGS[lin.kind].params(lin, ks).items()]
    out += [f32("att.ln_x.weight", blk.att.ln_x.weight), f32("att.ln_x.bias", blk.att.ln_x.bias)]
    out += [f32("ln2.weight", blk.ln2.weight), f32("ln2.bias", blk.ln2.bias)]
    out += [f32(f"ffn.{m}", v) for m, v in blk.ffn.mix.items()]
    if selective_sparse(blk.ffn):
        out += _sparse_rows_params(blk.ffn, ks)
    else:
        for m, lin in blk.ffn.lin.items():
            out += [(f"ffn.{m}.{s}", a) for s, a in LINEAR_LOWERINGS[lin.kind].params(lin, ks).items()]
    if blk.ffn.sparse is not None:
        out += [(f"ffn.sparse.{s}", a) for s, a in _sparse_params(blk.ffn.sparse, ks)]
    return out


def _children(rep) -> dict:
    """The nested representations of a composite one (name -> rep)."""
    kind = getattr(rep, "kind", None)
    if kind == "factored":
        return {"a": rep.a, "b": rep.b}
    if kind == "scaled":
        return {"inner": rep.inner}
    if kind == "clustered":
        return {"cluster": rep.cluster, **({"rows": rep.rows} if hasattr(rep.rows, "kind") else {})}
    return {}


def rep_signature(rep) -> tuple:
    """What, besides the parameters' shapes, decides the code a representation lowers to."""
    extra = {"lowrank": lambda r: (r.act,), "factored": lambda r: (r.act,), "int4": lambda r: (r.in_features, r.group),
             "clustered": lambda r: (r.top_p, r.min_k, r.max_k, r.log_prior is not None)}
    kind = rep.kind
    return (kind, *extra.get(kind, lambda r: ())(rep), *(rep_signature(c) for c in _children(rep).values()))


def block_signature(blk: ir.Block) -> tuple:
    sig = tuple((n, rep_signature(lin.weight)) for n, lin in list(blk.att.lin.items()) + list(blk.ffn.lin.items()))
    sp = blk.ffn.sparse
    if sp is not None:
        sig += (("sparse", sp.fc1 is not None, float(sp.mlp_threshold), sp.q_codes is not None, sp.q_bits,
                 float(sp.q_scale), float(sp.q_zero), float(sp.q_quantile)),)
    return sig


# ----------------------------------------------------------------------------------------------
# The v7 block


def layer_norm(ctx: Ctx, x, w, b, eps: float):
    return ctx.emit(relax.op.nn.layer_norm(x, w, b, axes=[-1], epsilon=float(eps)))


def shifted(ctx: Ctx, x, prev, prefill: bool):
    """The previous token's row for each t: concat(prev, x[:-1]); (T, C). prev (1, C)."""
    if not prefill:
        return prev

    def f(x, prev):
        T = x.shape[0]
        return te.compute(x.shape, lambda t, c: tirx.if_then_else(
            t == 0, prev[0, c], x[tirx.max(t - 1, 0), c]), name="token_shift")
    return ctx.bb.emit_te(f, x, prev, primfunc_name_hint="token_shift")


def last_row(ctx: Ctx, x, prefill: bool):
    """x[T-1:T]; (1, C)."""
    if not prefill:
        return x
    return ctx.bb.emit_te(lambda x: te.compute((1, x.shape[1]), lambda _, c: x[x.shape[0] - 1, c], name="last_row"),
                          x, primfunc_name_hint="last_row")


def time_mix_v7(ctx: Ctx, att: ir.TimeMix, x, prev, S, v_first, first: bool, prefill: bool):
    H, N, C = ctx.cfg.n_head, ctx.cfg.head_size, ctx.cfg.n_embd
    W, op, em = ctx.W, relax.op, ctx.emit
    T = ctx.rows_of(x)
    L = att.lin
    lin = lambda m, z: linear(ctx, f"att.{m}", L[m], z)  # noqa: E731
    xx = em(op.subtract(shifted(ctx, x, prev, prefill), x))
    xm = {m: em(op.add(x, op.multiply(xx, W[f"att.{m}"]))) for m in att.mix}
    r = lin("receptance", xm["x_r"])
    w = lin("w2", em(op.tanh(lin("w1", xm["x_w"]))))
    w = em(op.exp(op.multiply(op.sigmoid(op.add(w, W["att.w0"])), relax.const(-DECAY_SCALE, F32))))
    k = lin("key", xm["x_k"])
    v = lin("value", xm["x_v"])
    iclr = em(op.sigmoid(op.add(W["att.a0"], lin("a2", lin("a1", xm["x_a"])))))
    gate = lin("g2", em(op.sigmoid(lin("g1", xm["x_g"]))))

    kk = em(op.reshape(op.multiply(k, W["att.k_k"]), [T, H, N]))
    norm = em(op.sqrt(op.sum(op.multiply(kk, kk), axis=[-1], keepdims=True)))
    kk = em(op.reshape(op.divide(kk, op.maximum(norm, relax.const(1e-12, F32))), [T, C]))
    one = relax.const(1.0, F32)
    k = em(op.multiply(k, op.add(one, op.multiply(op.subtract(iclr, one), W["att.k_a"]))))
    if first:
        v_first = v
    else:
        vg = em(op.sigmoid(op.add(W["att.v0"], lin("v2", lin("v1", xm["x_v"])))))
        v = em(op.add(v, op.multiply(op.subtract(v_first, v), vg)))

    y, S2 = ctx.wkv7(S, r=r, w=w, k=k, v=v, a=em(op.negative(kk)), b=em(op.multiply(kk, iclr)))

    # group norm over each head's N channels, then ln_x's per-channel affine
    yh = em(op.reshape(y, [T, H, N]))
    yh = em(op.nn.layer_norm(yh, relax.const(np.ones(N, np.float32)), relax.const(np.zeros(N, np.float32)),
                             axes=[-1], epsilon=float(att.ln_x.eps)))
    y = em(op.add(op.multiply(op.reshape(yh, [T, C]), W["att.ln_x.weight"]), W["att.ln_x.bias"]))
    rk = em(op.reshape(op.multiply(op.multiply(r, k), W["att.r_k"]), [T, H, N]))
    bonus = em(op.multiply(op.sum(rk, axis=[-1], keepdims=True), op.reshape(v, [T, H, N])))
    y = em(op.add(y, op.reshape(bonus, [T, C])))
    return lin("output", em(op.multiply(y, gate))), S2, v_first


def channel_mix_v7(ctx: Ctx, ffn: ir.ChannelMix, x, prev, prefill: bool):
    W, op, em = ctx.W, relax.op, ctx.emit
    xk = em(op.add(x, op.multiply(op.subtract(shifted(ctx, x, prev, prefill), x), W["ffn.x_k"])))
    if selective_sparse(ffn):
        return sparse_ffn_selective(ctx, ffn, xk, sparse_ffn_mask(ctx, ffn.sparse, xk, ffn.lin["key"].out_features))
    k = em(op.nn.relu(linear(ctx, "ffn.key", ffn.lin["key"], xk)))
    h = em(op.multiply(k, k))
    if ffn.sparse is not None:
        # key / value of kinds not read row by row: the full product with the unused units zeroed, the same
        # function as the cpu artifact's
        h = em(op.multiply(h, sparse_ffn_mask(ctx, ffn.sparse, xk, ffn.lin["key"].out_features)))
    return linear(ctx, "ffn.value", ffn.lin["value"], h)


TIME_MIX_LOWERINGS = {"7": time_mix_v7}
CHANNEL_MIX_LOWERINGS = {"7": channel_mix_v7}


def emit_block(ctx: Ctx, blk: ir.Block, arrays: list[tuple[str, np.ndarray]], first: bool, prefill: bool, name: str):
    """A private Relax function for one layer:
        (x (T,C), prev (2,C), S (H,N,N), [v_first (T,C)], *weights) -> (x', prev', S', [v_first])"""
    cfg = ctx.cfg
    C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
    T = 1 if not prefill else tirx.Var("T", "int64")
    x = relax.Var("x", relax.TensorType([T, C], F32))
    prev = relax.Var("prev", relax.TensorType([2, C], F32))
    S = relax.Var("S", relax.TensorType([H, N, N], F32))
    vf = None if first else relax.Var("v_first", relax.TensorType([T, C], F32))
    wvars = [relax.Var(rel.replace(".", "_"), relax.TensorType(list(a.shape), str(a.dtype))) for rel, a in arrays]
    args = [x, prev, S] + ([] if first else [vf]) + wvars
    bb, op = ctx.bb, relax.op
    with bb.function(name, args, private=True):
        ctx.W = {rel: v for (rel, _), v in zip(arrays, wvars)}
        ctx.quantized = []
        with bb.dataflow():
            p_att = ctx.emit(op.strided_slice(prev, axes=[0], begin=[0], end=[1]))
            p_ffn = ctx.emit(op.strided_slice(prev, axes=[0], begin=[1], end=[2]))
            W = ctx.W
            xa = layer_norm(ctx, x, W["ln1.weight"], W["ln1.bias"], blk.ln1.eps)
            dx, S2, vf2 = TIME_MIX_LOWERINGS[blk.att.version](ctx, blk.att, xa, p_att, S, vf, first, prefill)
            x2 = ctx.emit(op.add(x, dx))
            xf = layer_norm(ctx, x2, W["ln2.weight"], W["ln2.bias"], blk.ln2.eps)
            x3 = ctx.emit(op.add(x2, CHANNEL_MIX_LOWERINGS[blk.ffn.version](ctx, blk.ffn, xf, p_ffn, prefill)))
            prev2 = ctx.emit(op.concat([last_row(ctx, xa, prefill), last_row(ctx, xf, prefill)], axis=0))
            outs = [x3, prev2, S2] + ([vf2] if first else [])
            res = bb.emit_output(relax.Tuple(outs))
        gv = bb.emit_func_output(res)
    ctx.W = {}
    return gv


def emit_entry(ctx: Ctx, model: ir.Model, P: Params, prefill: bool):
    cfg = ctx.cfg
    L, C, H, N, V = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size, cfg.vocab_size
    T = 1 if not prefill else tirx.Var("T", "int64")
    tokens = relax.Var("tokens", relax.TensorType([T], "int64"))
    shift = relax.Var("shift", relax.TensorType([L, 2, C], F32))
    wkv = relax.Var("wkv", relax.TensorType([L, H, N, N], F32))
    params = relax.Var("params", relax.TupleType([relax.TensorType(list(P.arrays[n].shape), str(P.arrays[n].dtype))
                                                   for n in P.names]))

    # one Relax function per distinct layer signature (weight shapes + first/other)
    block_fns: dict[tuple, object] = {}
    per_layer = []
    for i, blk in enumerate(model.blocks):
        arrays = P.group(f"blocks.{i}.")
        sig = (i == 0, tuple((rel, a.shape, str(a.dtype)) for rel, a in arrays), block_signature(blk))
        if sig not in block_fns:
            nm = f"{'prefill' if prefill else 'step'}_block{'_first' if i == 0 else ''}_{len(block_fns)}"
            block_fns[sig] = emit_block(ctx, blk, arrays, i == 0, prefill, nm)
        per_layer.append((block_fns[sig], [P.index(f"blocks.{i}.{rel}") for rel, _ in arrays]))

    bb, op = ctx.bb, relax.op
    name = "prefill" if prefill else "step"
    with bb.function(name, [tokens, shift, wkv, params]):
        ctx.W, ctx.quantized = {}, []
        with bb.dataflow():
            get = lambda n: ctx.emit(relax.TupleGetItem(params, P.index(n)))  # noqa: E731
            x = embed(ctx, P, get, tokens)                                                              # (T, C)
            v_first, shifts, wkvs = None, [], []
            for i, (gv, idx) in enumerate(per_layer):
                prev = ctx.emit(op.reshape(op.strided_slice(shift, axes=[0], begin=[i], end=[i + 1]), [2, C]))
                S = ctx.emit(op.reshape(op.strided_slice(wkv, axes=[0], begin=[i], end=[i + 1]), [H, N, N]))
                ws = [ctx.emit(relax.TupleGetItem(params, j)) for j in idx]
                out = ctx.emit(relax.Call(gv, [x, prev, S] + ([] if i == 0 else [v_first]) + ws))
                x = ctx.emit(relax.TupleGetItem(out, 0))
                shifts.append(ctx.emit(op.reshape(relax.TupleGetItem(out, 1), [1, 2, C])))
                wkvs.append(ctx.emit(op.reshape(relax.TupleGetItem(out, 2), [1, H, N, N])))
                if i == 0:
                    v_first = ctx.emit(relax.TupleGetItem(out, 3))
            xl = last_row(ctx, x, prefill)
            xl = layer_norm(ctx, xl, get("ln_out.weight"), get("ln_out.bias"), model.ln_out.eps)
            ctx.W = {n: get(n) for n in P.names if n.startswith("head.")}
            logits = ctx.emit(op.reshape(linear(ctx, "head", model.head, xl), [V]))
            shift_out = ctx.emit(op.concat(shifts, axis=0)) if L > 1 else shifts[0]
            wkv_out = ctx.emit(op.concat(wkvs, axis=0)) if L > 1 else wkvs[0]
            res = bb.emit_output(relax.Tuple([logits, shift_out, wkv_out]))
        bb.emit_func_output(res)
    ctx.W = {}


def check_lowerable(model: ir.Model) -> None:
    """What the kinds check of targets.base.unsupported cannot see (representations nested in others,
    the embedding, the sparse FFN's codes) is refused here, before any work, rather than silently dropped."""
    if model.emb.weight.kind not in EMBED_LOWERINGS:
        raise RwkvcError(f"the TVM targets have no lowering for a {model.emb.weight.kind} embedding "
                         f"(they lower {', '.join(sorted(EMBED_LOWERINGS))})")

    def walk(name, rep):
        if rep.kind not in LINEAR_LOWERINGS:
            raise RwkvcError(f"the TVM targets have no kernel for weight representation {rep.kind} ({name}; they "
                             f"lower {', '.join(sorted(LINEAR_LOWERINGS))}); drop the pass that made it or use --target cpu")
        if rep.kind == "clustered" and name != "head":
            raise RwkvcError(f"the TVM targets lower a clustered matrix only as the head, not {name}")
        for sub, r in _children(rep).items():
            walk(f"{name}.{sub}", r)

    for i, blk in enumerate(model.blocks):
        for part, mix in (("att", blk.att), ("ffn", blk.ffn)):
            for m, lin in mix.lin.items():
                walk(f"blocks.{i}.{part}.{m}", lin.weight)
        sp = blk.ffn.sparse
        if sp is not None and sp.q_codes is not None and not 1 <= sp.q_bits <= 8:
            raise RwkvcError(f"the TVM targets read sparse-FFN key codes of 1..8 bits, not {sp.q_bits} (blocks.{i})")
    walk("head", model.head.weight)


def build_module(model: ir.Model, ks: KernelShape, P: Params | None = None):
    """The Relax IRModule (step + prefill) and its Params."""
    _import_tvm()
    check_lowerable(model)
    P = P or collect_params(model, ks)
    bb = relax.BlockBuilder()
    ctx = Ctx(bb, ks, model.config)
    emit_entry(ctx, model, P, prefill=False)
    emit_entry(ctx, model, P, prefill=True)
    return bb.get(), P


def compile_model(model: ir.Model, out_dir: str, target: dict, ks: KernelShape, lib_name: str = "model.so",
                  fcompile=None, progress=None) -> dict:
    """Lower, build and export: writes lib_name, weights.bin, params.json into out_dir; returns manifest fields."""
    _import_tvm()
    mod, P = build_module(model, ks)
    if progress:
        progress("relax")
    tgt = tvm.target.Target(target)
    with tgt:
        ex = tvm.compile(mod, target=tgt)
    if progress:
        progress("build")
    kw = {"fcompile": fcompile} if fcompile is not None else {}
    ex.export_library(os.path.join(out_dir, lib_name), **kw)
    fields = P.write(out_dir)
    P.arrays.clear()   # the packed copies can be large (a 0.1B model: 0.8 GB)
    return {"library": lib_name, **fields, "entry_points": {"step": "step", "prefill": "prefill"},
            "tvm_target": target, "kernel": {"panel": ks.panel, "rows": ks.rows, "lanes": ks.lanes},
            "tvm_version": tvm.__version__, "dtype": "float32", "weight_dtype": ks.weights}
