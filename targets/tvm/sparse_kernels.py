"""The TIR kernels that read only the rows they need: the sparse FFN's (the quantised-key predictor's
mask, the used units' rows of key and value.T) and the clustered head's (the cluster choice, the chosen
clusters' rows, the logits in token order). Loop-level kernels written in TVMScript, opaque to fusion."""
from __future__ import annotations

from .kernels import finish


def quantile_mask_kernel(F: int, m: int, frac: float):
    """The quantised-key predictor's mask (T, F) float32 1/0: est = raw + zt (raw (T, F) the code product,
    zt (T, 1) the zero-point term), and est > torch.quantile(est[t], q) per row, with pos = q (F-1) =
    lo + frac given as m = F - lo: the m-th largest value, interpolated towards the (m-1)-th (the
    cpu artifact's TopK threshold). A descending top-m list per row (insertion; a value enters only if
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

    return finish(quantile_mask, f"quantile_mask_f{F}_m{m}_{int(round(fr * 1e6))}")


def sparse_rows_kernel(F: int, C: int, lanes: int, quant: str):
    """The sparse FFN's key: k (T, F) = x (T, C) . K[f] for the units f any token uses (mask (T, F) 1/0),
    0 for the others, whose rows are never read. Units in parallel, a vector dot product per row.

        quant "float32"/"float16": (x f32, K (F, C) in that dtype, mask) -> k
        quant "int8": (x codes int16 (T, C), xs (1,), K int8 (F, C), scale (F,), mask) -> k, with
                      k = float(int32 dot) * (xs * scale[f])   (the cpu artifact's int8 row product)
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

    return finish(rows, f"sparse_rows_{quant}_f{F}_c{C}")


def sparse_cols_kernel(F: int, C: int, lanes: int, quant: str):
    """The sparse FFN's value: y (T, C) = h (T, F) @ Vt (F, C) adding only the rows of Vt (= value.T) whose
    h is not zero (units the predictors left out, or whose relu was 0, are never read). Column blocks in
    parallel, each sweeping the used rows' slice with a vector accumulator.

        quant "float32"/"float16": (h f32, Vt in that dtype) -> y
        quant "int8": (h codes int16 (T, F), hs (1,), Vt int8 (F, C), scale (C,)) -> y, with
                      y = float(int32 sum) * (hs * scale[c])   (the cpu artifact's int8 column product; h = 0 has code 0)
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

    return finish(cols, f"sparse_cols_{quant}_f{F}_c{C}")


def select_clusters_kernel(K: int, top_p: float, min_k: int, max_k: int):
    """chosen (K,) 1/0 from the cluster probabilities p (K,): the clusters in descending order of p (ties:
    lower index first, as ONNX Runtime's TopK) up to and including the first whose cumulative sum reaches
    top_p, at least min_k and at most max_k of them (the cpu artifact's rule, same float sums).
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

    return finish(select, f"select_clusters_k{K}_{int(round(top_p * 1e6))}_{min_k}_{max_k}")


def rows_kernel(K: int, V: int, C: int, lanes: int, quant: str):
    """exact (V,) = rows (V, C) . x for the rows of the chosen clusters only (the others are not written):
    clusters in parallel; a cluster not chosen costs nothing and its rows are never read.

        quant "float32"/"float16": (x (1, C) f32, rows (V, C) in that dtype, widened in registers, chosen, bounds)
        quant "int8": (x codes (1, C) int16, xs (1,), rows int8 (V, C), scale (V,), chosen, bounds):
                      exact = float(int32 dot) * (xs * scale[r])  (the cpu artifact's int8 row product)
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

    return finish(rows, f"rows_{quant}_k{K}_v{V}_c{C}")


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

    return finish(combine, f"combine_k{K}_v{V}{'_prior' if prior else ''}")
