"""The TIR kernels of the dense path: the packed-panel matrix products (float, int8, n-bit codes), the
activation quantiser (ONNX's DynamicQuantizeLinear), and the WKV recurrences (RWKV-7's, RWKV-5/6's, RWKV-4's).
Each is built once
per shape, scheduled here, and marked opaque so that Relax's fusion leaves it alone."""
from __future__ import annotations

from typing import Callable

import numpy as np

from .base import F32, s_tir, te, tirx

OPAQUE = 8  # relax OpPatternKind.kOpaque


def finish(func, name: str):
    """func marked as an opaque, already scheduled kernel named `name`."""
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
    return finish(sch.mod["main"], name)


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

    return finish(wkv7, f"wkv7_h{H}_n{N}")


def wkv5_kernel(H: int, N: int, lanes: int):
    """The RWKV-5/6 recurrence over T tokens without the bonus, heads in parallel (i: value, j: key index):

        y_t[i] = S[i,:] . r_t            S[i,j] = S[i,j] w_t[j] + v_t[i] k_t[j]

    r, k, v, w: (T, H, N) (RWKV-5's constant decay broadcast over T by the caller); S_in (H, N, N) ->
    S_out (H, N, N), y (T, H, N). One pass over S[i,:] per token does the dot product, then the update.
    """
    from tvm.script import tirx as T
    VL = lanes if N % lanes == 0 else 1
    NJ = N // VL

    @T.prim_func(private=True)
    def wkv5(r_h: T.handle, w_h: T.handle, k_h: T.handle, v_h: T.handle, s_h: T.handle, so_h: T.handle,
             y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        n = T.int64()
        r = T.match_buffer(r_h, (n, H, N), "float32")
        w = T.match_buffer(w_h, (n, H, N), "float32")
        k = T.match_buffer(k_h, (n, H, N), "float32")
        v = T.match_buffer(v_h, (n, H, N), "float32")
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
                            acc[l] = acc[l] + S[h, i, jo * VL + l] * r[t, h, jo * VL + l]
                    dot[0] = T.float32(0)
                    for l in range(VL):
                        dot[0] = dot[0] + acc[l]
                    y[t, h, i] = dot[0]
                    for j in T.vectorized(N):
                        S[h, i, j] = S[h, i, j] * w[t, h, j] + v[t, h, i] * k[t, h, j]

    return finish(wkv5, f"wkv5_h{H}_n{N}")


def wkv4_kernel(C: int):
    """RWKV-4's numerically stable recurrence over T tokens, channels in parallel. S = (aa, bb, pp) (3, C):
    the running sums of e^k v and of e^k, both scaled by e^-pp. w = -exp(time_decay), u = time_first (C,):

        q = max(pp, u + k);  y = (e^(pp-q) aa + e^(u+k-q) v) / (e^(pp-q) bb + e^(u+k-q))
        q = max(pp + w, k);  aa = e^(pp+w-q) aa + e^(k-q) v;  bb = e^(pp+w-q) bb + e^(k-q);  pp = q

    k, v (T, C), w, u (C,), S_in (3, C) -> S_out (3, C), y (T, C)."""
    from tvm.script import tirx as T

    @T.prim_func(private=True)
    def wkv4(k_h: T.handle, v_h: T.handle, w_h: T.handle, u_h: T.handle, s_h: T.handle, so_h: T.handle,
             y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        n = T.int64()
        k = T.match_buffer(k_h, (n, C), "float32")
        v = T.match_buffer(v_h, (n, C), "float32")
        w = T.match_buffer(w_h, (C,), "float32")
        u = T.match_buffer(u_h, (C,), "float32")
        S0 = T.match_buffer(s_h, (3, C), "float32")
        S = T.match_buffer(so_h, (3, C), "float32")
        y = T.match_buffer(y_h, (n, C), "float32")
        for c in T.parallel(C):
            st = T.decl_buffer((3,), "float32", scope="local")     # aa, bb, pp
            e = T.decl_buffer((3,), "float32", scope="local")      # q, e1, e2
            st[0] = S0[0, c]
            st[1] = S0[1, c]
            st[2] = S0[2, c]
            for t in range(n):
                e[0] = T.max(st[2], u[c] + k[t, c])
                e[1] = T.exp(st[2] - e[0])
                e[2] = T.exp(u[c] + k[t, c] - e[0])
                y[t, c] = (e[1] * st[0] + e[2] * v[t, c]) / (e[1] * st[1] + e[2])
                e[0] = T.max(st[2] + w[c], k[t, c])
                e[1] = T.exp(st[2] + w[c] - e[0])
                e[2] = T.exp(k[t, c] - e[0])
                st[0] = e[1] * st[0] + e[2] * v[t, c]
                st[1] = e[1] * st[1] + e[2]
                st[2] = e[0]
            S[0, c] = st[0]
            S[1, c] = st[1]
            S[2, c] = st[2]

    return finish(wkv4, f"wkv4_c{C}")
