"""RWKV-7 in plain ONNX operators: the WKV recurrence (one token; T tokens in chunks, the WY form), the
time-mix and the channel-mix. Projections run in the compute dtype; decay, normalisation, WKV, group norm
and bonus in float32."""
from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto, helper

from rwkvc import ir
from rwkvc.abi import FUSED_DOMAIN

from .graph import F32, Graph, f32, shifted, to_compute
from .kinds import linear
from .matvec import MatVecSet
from .sparse_ffn import emit_sparse_ffn

DECAY_SCALE = math.exp(-0.5)


def wkv_step(g: Graph, S: str, w: str, a: str, b: str, v: str, k: str, r: str):
    """S (H,N,N); w,b,k (H,1,N); a,v,r (H,N,1) -> S', y (H,N,1).  S' = S*w + (S@a)@b + v@k, y = S'@r.

    The two outer products are one rank-2 product [S@a, v] @ [b; k], so the state is swept three times
    (Mul, MatMul, Add) instead of five."""
    sa = g.op("MatMul", S, a)
    upd = g.op("MatMul", g.op("Concat", sa, v, axis=2), g.op("Concat", b, k, axis=1))    # (H, N, N)
    S2 = g.op("Add", g.op("Mul", S, w), upd)
    return S2, g.op("MatMul", S2, r)


def emit_wkv_one(g: Graph, S: str, H: int, N: int, r, logw, k, v, a, b):
    """One token: r, logw, k, v, a, b (1, C) -> y (H, N, 1), the new state, and the per-head shaped
    inputs {name: (H, N, 1) column or (H, 1, N) row} for a caller that keeps working per head."""
    col, row = g.const([H, N, 1]), g.const([H, 1, N])
    w = g.op("Exp", logw)
    shaped = {n: g.op("Reshape", x, row if n in ("w", "b", "k") else col)
              for n, x in (("w", w), ("a", a), ("b", b), ("v", v), ("k", k), ("r", r))}
    S2, y = wkv_step(g, S, *(shaped[n] for n in ("w", "a", "b", "v", "k", "r")))
    return y, S2, shaped


CHUNK = 16  # prefill WKV chunk length (a power of two)


def emit_wkv_chunked(g: Graph, S: str, H: int, N: int, Tc: int, r, logw, k, v, a, b):
    """The WKV recurrence over T tokens in chunks of Tc (the WY form of the generalised delta rule).

    Inside the chunks it works on Z = Sᵀ (keys by values), so every per-chunk product comes out in the
    (Tc, N) layout of the inputs. Per chunk, with gamma_t = prod_{i<=t} w_i (inclusive), g_x its
    exclusive version and gamma_end = gamma_Tc, rescale
        A~ = a * g_x,  B~ = b / gamma,  K~ = k / gamma,  R~ = r * gamma          (Tc, N) per head
    and with masks strict (s < t) and incl (s <= t):
        L = (A~ B~ᵀ) strict,  Inv = (I - L)^-1 = prod_i (I + L^(2^i))         (Tc, Tc)
        W1 = Inv A~,  W2 = Inv ((A~ K~ᵀ) strict) V
        Q = R~ + (R~ B~ᵀ)incl W1,   Y0 = (R~ B~ᵀ)incl W2 + (R~ K~ᵀ)incl V
    then only this is sequential over chunks (an ONNX Scan), everything above is batched:
        [Y; U1] = [Q; W1] Z + [Y0; W2]                                            (2Tc, N)
        Z <- gamma_end ⊙ Z + [B~ gamma_end; K~ gamma_end]ᵀ [U1; V]               a rank-2Tc update
    (B~ gamma_end = b * gamma_end / gamma is at most |b|: no large intermediate values.) The per-chunk
    matrices are (Tc, N) or (2Tc, N); no (N, N) matrix per chunk is ever materialised.
    Padding tokens have w = 1 and a = b = k = v = r = 0, so they leave the state alone.
    """
    C = H * N
    T = g.op("Slice", g.op("Shape", r), g.const([0]), g.const([1]))                   # (1,)
    pad = g.op("Mod", g.op("Sub", g.const([Tc]), g.op("Mod", T, g.const([Tc]))), g.const([Tc]))
    pads = g.op("Concat", g.const([0, 0]), pad, g.const([0]), axis=0)                  # [0, 0, pad, 0]

    def chunked(x):  # (T, C) -> (nC, H, Tc, N)
        x = g.op("Pad", x, pads)
        return g.op("Transpose", g.op("Reshape", x, g.const([-1, Tc, H, N])), perm=[0, 2, 1, 3])

    ys, Z_final = wkv_chunks(g, g.op("Transpose", S, perm=[0, 2, 1]), Tc, H, N,
                             *(chunked(x) for x in (r, logw, k, v, a, b)))
    y = g.op("Reshape", g.op("Transpose", ys, perm=[0, 2, 1, 3]), g.const([-1, C]))      # (nC*Tc, C)
    return g.op("Slice", y, g.const([0]), T, g.const([0])), g.op("Transpose", Z_final, perm=[0, 2, 1])


def wkv_chunks(g: Graph, Z: str, Tc: int, H: int | str, N: int, r, logw, k, v, a, b):
    """emit_wkv_chunked's work on inputs already in chunks: r, logw, k, v, a, b (nC, H, Tc, N), Z = Sᵀ
    (H, N, N) -> ys (nC, H, Tc, N), Z'. H: the head count, or a name for it where it is not fixed (a
    batched graph's B*H; only the Scan body's declared shapes use it)."""
    cum = g.op("CumSum", logw, g.const(2))
    cumx = g.op("Sub", cum, logw)                                                       # exclusive cumsum
    cum_end = g.op("Slice", cum, g.const([-1]), g.const([Tc]), g.const([2]))            # (nC, H, 1, N)
    gam, inv_gam = g.op("Exp", cum), g.op("Exp", g.op("Neg", cum))
    At = g.op("Mul", a, g.op("Exp", cumx))
    Bt, Kt, Rt = g.op("Mul", b, inv_gam), g.op("Mul", k, inv_gam), g.op("Mul", r, gam)
    to_end = g.op("Exp", g.op("Sub", cum_end, cum))                                    # gamma_end / gamma <= 1
    BKe = g.op("Concat", g.op("Mul", b, to_end), g.op("Mul", k, to_end), axis=2)        # (nC, H, 2Tc, N)

    tr = lambda x: g.op("Transpose", x, perm=[0, 1, 3, 2])  # noqa: E731
    strict = g.const(np.tril(np.ones((Tc, Tc)), -1), np.float32)
    incl = g.const(np.tril(np.ones((Tc, Tc))), np.float32)
    eye_t = g.const(np.eye(Tc), np.float32)
    BtT, KtT = tr(Bt), tr(Kt)
    L = g.op("Mul", g.op("MatMul", At, BtT), strict)
    Lak = g.op("Mul", g.op("MatMul", At, KtT), strict)
    Mrb = g.op("Mul", g.op("MatMul", Rt, BtT), incl)
    Mrk = g.op("Mul", g.op("MatMul", Rt, KtT), incl)
    inv, Lp = g.op("Add", eye_t, L), L
    for _ in range(int(math.log2(Tc)) - 1):
        Lp = g.op("MatMul", Lp, Lp)
        inv = g.op("MatMul", inv, g.op("Add", eye_t, Lp))
    W1 = g.op("MatMul", inv, At)
    W2 = g.op("MatMul", inv, g.op("MatMul", Lak, v))
    QW = g.op("Concat", g.op("Add", Rt, g.op("MatMul", Mrb, W1)), W1, axis=2)          # (nC, H, 2Tc, N)
    Y0W = g.op("Concat", g.op("Add", g.op("MatMul", Mrb, W2), g.op("MatMul", Mrk, v)), W2, axis=2)
    decay_end = tr(g.op("Exp", cum_end))                                                # (nC, H, N, 1)

    body = g.subgraph()
    P = body.op("Add", body.op("MatMul", "qw_c", "Z_in"), "y0w_c")                     # (H, 2Tc, N)
    y_c, u1 = body.op("Split", P, body.const([Tc, Tc]), axis=1, n_out=2)
    body.nodes.append(helper.make_node("Identity", [y_c], ["y_c"]))
    U = body.op("Concat", u1, "v_c", axis=1)                                            # (H, 2Tc, N)
    bkT = body.op("Transpose", "bk_c", perm=[0, 2, 1])   # folded into the MatMul (transA) by ORT
    body.nodes.append(helper.make_node("Add", [body.op("Mul", "Z_in", "e_c"), body.op("MatMul", bkT, U)],
                                       ["Z_out"]))
    f = TensorProto.FLOAT
    vi = lambda n, shp: helper.make_tensor_value_info(n, f, shp)  # noqa: E731
    gp = body.make("wkv_chunk", [vi("Z_in", [H, N, N]), vi("qw_c", [H, 2 * Tc, N]), vi("y0w_c", [H, 2 * Tc, N]),
                                 vi("v_c", [H, Tc, N]), vi("bk_c", [H, 2 * Tc, N]), vi("e_c", [H, N, 1])],
                   [vi("Z_out", [H, N, N]), vi("y_c", [H, Tc, N])])
    Z_final, ys = g.op("Scan", Z, QW, Y0W, v, BKe, decay_end, n_out=2, body=gp, num_scan_inputs=5)
    return ys, Z_final


def v7_projections(g: Graph, att: ir.TimeMix, xm: dict[str, str], i: int, fuse: bool = False) -> dict[str, str]:
    """The time-mix's products of its six mixes, in the compute dtype: r, k, v, the gate g, the LoRA outputs
    w (before w0 and the decay's squashing) and a (before a0), and after layer 0 vg (before v0).
    fuse: the quantised ones as one Rwkv7MatVecSet node (the fused step)."""
    L = att.lin
    items = {"r": (L["receptance"], None, "x_r"), "k": (L["key"], None, "x_k"), "v": (L["value"], None, "x_v"),
             "w": ((L["w1"], L["w2"]), "tanh", "x_w"), "a": ((L["a1"], L["a2"]), None, "x_a"),
             "g": ((L["g1"], L["g2"]), "sigmoid", "x_g")}
    if i:
        items["vg"] = ((L["v1"], L["v2"]), None, "x_v")
    ms = MatVecSet(g) if fuse else None
    out = {}
    for name, (lin, act, xn) in items.items():
        h = ms.add(lin, xm[xn], act) if ms is not None else None
        if h is None:
            h = lora(g, *lin, act, xm[xn]) if isinstance(lin, tuple) else linear(g, lin, xm[xn])
        out[name] = h
    return ms.resolve(out) if ms is not None else out


ACT_OPS = {"tanh": "Tanh", "sigmoid": "Sigmoid"}


def lora(g: Graph, first: ir.Linear, second: ir.Linear, act: str | None, x: str) -> str:
    """second(act(first(x))): a RWKV-7 LoRA."""
    h = linear(g, first, x)
    return linear(g, second, g.op(ACT_OPS[act], h) if act else h)


def emit_time_mix_v7(g: Graph, att: ir.TimeMix, x: str, prev: str, S: str, v_first: str | None,
                     cfg: ir.ModelConfig, i: int, prefill: bool):
    """Projections in the compute dtype; decay, normalisation, WKV, group norm and bonus in float32."""
    H, N, C = cfg.n_head, cfg.head_size, cfg.n_embd
    p = f"blocks.{i}.att."
    L, vec = att.lin, att.vec
    w32 = lambda name, arr: g.weight(p + name, arr, F32)  # noqa: E731
    names = list(att.mix)
    xx = g.op("Sub", shifted(g, x, prev, prefill), x)
    if prefill:
        xm = {m: g.op("Add", x, g.op("Mul", xx, g.weight(p + m, att.mix[m]))) for m in names}
    else:  # one token: the six mixes as one (6, C) broadcast, then a Split into rows (fewer, larger ops)
        rows = g.op("Add", x, g.op("Mul", xx, g.weight(p + "x_mix6", np.stack([att.mix[m] for m in names]))))
        xm = dict(zip(names, g.op("Split", rows, axis=0, num_outputs=len(names), n_out=len(names))))
    pr = v7_projections(g, att, xm, i)
    r, k, v = (f32(g, pr[n]) for n in "rkv")
    logw = g.op("Mul", g.op("Sigmoid", g.op("Add", f32(g, pr["w"]), w32("w0", vec["w0"]))), g.const(-DECAY_SCALE, F32))
    iclr = g.op("Sigmoid", g.op("Add", w32("a0", vec["a0"]), f32(g, pr["a"])))
    gate = pr["g"]

    heads = g.const([-1, H, N])
    kk = g.op("Reshape", g.op("Mul", k, w32("k_k", vec["k_k"])), heads)
    kk = g.op("Div", kk, g.op("Max", g.op("ReduceL2", kk, g.const([-1]), keepdims=1), g.const(1e-12, F32)))
    kk = g.op("Reshape", kk, g.const([-1, C]))
    # k * (1 + (iclr - 1) * k_a) = k * ((1 - k_a) + iclr * k_a)
    k = g.op("Mul", k, g.op("Add", w32("k_a_c", 1.0 - vec["k_a"]), g.op("Mul", iclr, w32("k_a", vec["k_a"]))))
    if i == 0:
        v_first = v
    else:
        vg = g.op("Sigmoid", g.op("Add", w32("v0", vec["v0"]), f32(g, pr["vg"])))
        v = g.op("Add", v, g.op("Mul", g.op("Sub", v_first, v), vg))

    if not prefill:   # one token: group norm and bonus on the per-head columns, no reshapes between
        y, S2, sh = emit_wkv_one(g, S, H, N, r=r, logw=logw, k=k, v=v, a=g.op("Neg", kk), b=g.op("Mul", kk, iclr))
        percol = lambda name, arr: g.weight(p + name + ".col", np.asarray(arr, np.float32).reshape(H, N, 1), F32)  # noqa: E731
        yn = g.op("LayerNormalization", y, g.const(np.ones((N, 1)), F32), g.const(np.zeros((N, 1)), F32),
                  axis=1, epsilon=float(att.ln_x.eps))                                  # over each head's N
        yn = g.op("Add", g.op("Mul", yn, percol("ln_x.weight", att.ln_x.weight)), percol("ln_x.bias", att.ln_x.bias))
        # bonus: v * sum_n(r k r_k) per head = v_col * (k_row @ (r_col * r_k))
        rk = g.op("MatMul", sh["k"], g.op("Mul", sh["r"], percol("r_k", vec["r_k"])))   # (H, 1, 1)
        y = g.op("Reshape", g.op("Add", yn, g.op("Mul", sh["v"], rk)), g.const([1, C]))
        return linear(g, L["output"], g.op("Mul", to_compute(g, y), gate)), S2, v_first

    if g.fused:   # rwkvc's kernel: the exact recurrence token by token, heads over threads
        y, S2 = g.op("Rwkv7WkvSeq", r, logw, k, v, g.op("Neg", kk), g.op("Mul", kk, iclr), S, domain=FUSED_DOMAIN,
                     n_out=2)
    else:
        y, S2 = emit_wkv_chunked(g, S, H, N, CHUNK, r=r, logw=logw, k=k, v=v, a=g.op("Neg", kk),
                                 b=g.op("Mul", kk, iclr))

    # group norm over each head's N channels, then the per-channel affine of ln_x
    yh = g.op("Reshape", y, heads)
    yh = g.op("LayerNormalization", yh, g.const(np.ones(N), F32), g.const(np.zeros(N), F32), axis=-1,
              epsilon=float(att.ln_x.eps))
    y = g.op("Add", g.op("Mul", g.op("Reshape", yh, g.const([-1, C])), w32("ln_x.weight", att.ln_x.weight)),
             w32("ln_x.bias", att.ln_x.bias))
    rk = g.op("Reshape", g.op("Mul", g.op("Mul", r, k), w32("r_k", vec["r_k"])), heads)
    bonus = g.op("Mul", g.op("ReduceSum", rk, g.const([-1]), keepdims=1), g.op("Reshape", v, heads))
    y = to_compute(g, g.op("Add", y, g.op("Reshape", bonus, g.const([-1, C]))))
    return linear(g, L["output"], g.op("Mul", y, gate)), S2, v_first


def emit_channel_mix_v7(g: Graph, ffn: ir.ChannelMix, x: str, prev: str, i: int, prefill: bool) -> str:
    p = f"blocks.{i}.ffn."
    xk = g.op("Add", x, g.op("Mul", g.op("Sub", shifted(g, x, prev, prefill), x), g.weight(p + "x_k", ffn.mix["x_k"])))
    if ffn.sparse is not None:
        return emit_sparse_ffn(g, ffn, xk, p, prefill)
    k = g.op("Relu", linear(g, ffn.lin["key"], xk))
    return linear(g, ffn.lin["value"], g.op("Mul", k, k))
