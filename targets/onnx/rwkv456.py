"""RWKV-4, -5, -6 in ONNX. Shared conventions: every token-shift mix is x + (prev - x) * mix (the importers
converted v4/v5's time_mix); the recurrences run in float32 whatever the compute dtype, with the state in
float32 (the graph casts r, k, v, w in and the result out); prefills run them as an ONNX Scan over T."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from rwkvc import ir
from rwkvc.arch.v6 import MAA   # the order of the five data-dependent mixes

from .graph import F32, Graph, f32, shifted, to_compute
from .kinds import linear
from .sparse_ffn import emit_sparse_ffn


def mixed(g: Graph, x: str, xx: str, mix: np.ndarray, name: str, extra: str | None = None) -> str:
    """x + xx * (mix (+ extra)), xx = prev - x; (T, C)."""
    m = g.weight(name, mix)
    if extra is not None:
        m = g.op("Add", m, extra)
    return g.op("Add", x, g.op("Mul", xx, m))


def scan(g: Graph, name: str, state: list[tuple[str, list]], seqs: list[tuple[str, list]], body_fn, outs: list[list]):
    """An ONNX Scan over axis 0 of `seqs`, carrying `state`, built in float32.

    state: [(outer name, per-step shape)], seqs: [(outer name (T, ...), per-step shape)];
    body_fn(body, *state_names, *seq_names) -> ([new state names], [per-step output names]);
    outs: per-step output shapes. Returns (final states..., stacked outputs...)."""
    body = g.subgraph(F32)
    s_in = [f"s{j}_in" for j in range(len(state))]
    x_in = [f"x{j}_t" for j in range(len(seqs))]
    new_state, ys = body_fn(body, *s_in, *x_in)
    for j, t in enumerate(new_state):
        body.nodes.append(helper.make_node("Identity", [t], [f"s{j}_out"]))
    for j, t in enumerate(ys):
        body.nodes.append(helper.make_node("Identity", [t], [f"y{j}_t"]))
    vi = lambda n, shp: helper.make_tensor_value_info(n, TensorProto.FLOAT, shp)  # noqa: E731
    gp = body.make(name, [vi(n, shp) for n, (_, shp) in zip(s_in, state)] + [vi(n, shp) for n, (_, shp) in zip(x_in, seqs)],
                   [vi(f"s{j}_out", shp) for j, (_, shp) in enumerate(state)] + [vi(f"y{j}_t", shp) for j, shp in enumerate(outs)])
    return g.op("Scan", *(t for t, _ in state), *(t for t, _ in seqs), n_out=len(state) + len(outs),
                body=gp, num_scan_inputs=len(seqs))


def wkv4_step(g: Graph, S: str, k: str, v: str, w: str, u: str):
    """RWKV-4's numerically stable WKV. S (3, C) = (aa, bb, pp) float32; k, v (C,) or (1, C); w = log decay
    (-exp(time_decay)), u = bonus, (C,). aa/bb: the running weighted sums of v and of 1, both scaled by e^-pp.
    Returns y (1, C) and S' (3, C)."""
    aa, bb, pp = g.op("Split", S, axis=0, num_outputs=3, n_out=3)                    # (1, C) each
    ww = g.op("Add", u, k)                                                           # the current token, with bonus
    p = g.op("Max", pp, ww)
    e1, e2 = g.op("Exp", g.op("Sub", pp, p)), g.op("Exp", g.op("Sub", ww, p))
    y = g.op("Div", g.op("Add", g.op("Mul", e1, aa), g.op("Mul", e2, v)), g.op("Add", g.op("Mul", e1, bb), e2))
    ww = g.op("Add", w, pp)                                                          # decay the past, add the token
    p = g.op("Max", ww, k)
    e1, e2 = g.op("Exp", g.op("Sub", ww, p)), g.op("Exp", g.op("Sub", k, p))
    aa2 = g.op("Add", g.op("Mul", e1, aa), g.op("Mul", e2, v))
    bb2 = g.op("Add", g.op("Mul", e1, bb), e2)
    return y, g.op("Concat", aa2, bb2, p, axis=0)


def emit_time_mix_v4(g: Graph, att: ir.TimeMix, x: str, prev: str, S: str, v_first, cfg: ir.ModelConfig,
                     i: int, prefill: bool):
    p = f"blocks.{i}.att."
    C = cfg.n_embd
    xx = g.op("Sub", shifted(g, x, prev, prefill), x)
    L = att.lin
    r = g.op("Sigmoid", linear(g, L["receptance"], mixed(g, x, xx, att.mix["x_r"], p + "x_r")))
    k = f32(g, linear(g, L["key"], mixed(g, x, xx, att.mix["x_k"], p + "x_k")))            # (T, C) float32
    v = f32(g, linear(g, L["value"], mixed(g, x, xx, att.mix["x_v"], p + "x_v")))
    w = g.weight(p + "log_decay", -np.exp(np.asarray(att.vec["w0"], np.float64)).astype(F32), F32)
    u = g.weight(p + "time_first", att.vec["u"], F32)
    if not prefill:
        y, S2 = wkv4_step(g, S, k, v, w, u)
    else:
        S2, _, _, ys = scan(g, "wkv4_body", [(S, [3, C]), (w, [C]), (u, [C])], [(k, [C]), (v, [C])],
                            lambda b, s, w_, u_, k_, v_: ((lambda y, s2: ([s2, w_, u_], [y]))(*wkv4_step(b, s, k_, v_, w_, u_))),
                            [[1, C]])
        y = g.op("Reshape", ys, g.const([-1, C]))
    return linear(g, L["output"], g.op("Mul", r, to_compute(g, y))), S2, v_first


def wkv5_step(g: Graph, S: str, r: str, k: str, v: str, w: str):
    """S (H, N, N) [value, key]; r, v (H, N, 1); k, w (H, 1, N) -> y = S r (H, N, 1), S' = S * w + v k^T."""
    y = g.op("MatMul", S, r)
    return y, g.op("Add", g.op("Mul", S, w), g.op("MatMul", v, k))


def emit_wkv5(g: Graph, S: str, cfg: ir.ModelConfig, prefill: bool, r: str, k: str, v: str, w: str,
              w_per_token: bool) -> tuple[str, str]:
    """RWKV-5/6 matrix-state recurrence without the bonus. r, k, v: (T, C) float32; w: decay (C,) or (T, C)
    float32. Returns y (T, C) = S_{t-1} r_t and the final state."""
    H, N, C = cfg.n_head, cfg.head_size, cfg.n_embd
    col = g.const([-1, H, N, 1]) if prefill else g.const([H, N, 1])
    row = g.const([-1, H, 1, N]) if prefill else g.const([H, 1, N])
    rc, kr, vc = g.op("Reshape", r, col), g.op("Reshape", k, row), g.op("Reshape", v, col)
    if not prefill:
        y, S2 = wkv5_step(g, S, rc, kr, vc, g.op("Reshape", w, g.const([H, 1, N])))
        return g.op("Reshape", y, g.const([1, C])), S2
    if w_per_token:
        S2, ys = scan(g, "wkv6_body", [(S, [H, N, N])],
                      [(rc, [H, N, 1]), (kr, [H, 1, N]), (vc, [H, N, 1]), (g.op("Reshape", w, row), [H, 1, N])],
                      lambda b, s, r_, k_, v_, w_: ((lambda y, s2: ([s2], [y]))(*wkv5_step(b, s, r_, k_, v_, w_))),
                      [[H, N, 1]])
    else:
        S2, _, ys = scan(g, "wkv5_body", [(S, [H, N, N]), (g.op("Reshape", w, g.const([H, 1, N])), [H, 1, N])],
                         [(rc, [H, N, 1]), (kr, [H, 1, N]), (vc, [H, N, 1])],
                         lambda b, s, w_, r_, k_, v_: ((lambda y, s2: ([s2, w_], [y]))(*wkv5_step(b, s, r_, k_, v_, w_))),
                         [[H, N, 1]])
    return g.op("Reshape", ys, g.const([-1, C])), S2


def wkv5_out(g: Graph, att: ir.TimeMix, y: str, r: str, k: str, v: str, cfg: ir.ModelConfig, p: str) -> str:
    """y + v * (u . k . r per head), then the group norm ln_x; all float32, (T, C) -> compute dtype."""
    H, N, C = cfg.n_head, cfg.head_size, cfg.n_embd
    heads = g.const([-1, H, N])
    u = g.weight(p + "time_faaaa", att.vec["u"], F32)
    ukr = g.op("ReduceSum", g.op("Reshape", g.op("Mul", g.op("Mul", u, k), r), heads), g.const([-1]), keepdims=1)
    y = g.op("Add", y, g.op("Reshape", g.op("Mul", ukr, g.op("Reshape", v, heads)), g.const([-1, C])))
    yh = g.op("LayerNormalization", g.op("Reshape", y, heads), g.const(np.ones(N), F32), g.const(np.zeros(N), F32),
              axis=-1, epsilon=float(att.ln_x.eps))
    y = g.op("Add", g.op("Mul", g.op("Reshape", yh, g.const([-1, C])), g.weight(p + "ln_x.weight", att.ln_x.weight, F32)),
             g.weight(p + "ln_x.bias", att.ln_x.bias, F32))
    return to_compute(g, y)


def silu(g: Graph, x: str) -> str:
    return g.op("Mul", x, g.op("Sigmoid", x))


def emit_time_mix_v5(g: Graph, att: ir.TimeMix, x: str, prev: str, S: str, v_first, cfg: ir.ModelConfig,
                     i: int, prefill: bool):
    p = f"blocks.{i}.att."
    xx = g.op("Sub", shifted(g, x, prev, prefill), x)
    L = att.lin
    r = f32(g, linear(g, L["receptance"], mixed(g, x, xx, att.mix["x_r"], p + "x_r")))
    k = f32(g, linear(g, L["key"], mixed(g, x, xx, att.mix["x_k"], p + "x_k")))
    v = f32(g, linear(g, L["value"], mixed(g, x, xx, att.mix["x_v"], p + "x_v")))
    w = g.weight(p + "decay", np.exp(-np.exp(np.asarray(att.vec["w0"], np.float64))).astype(F32), F32)
    y, S2 = emit_wkv5(g, S, cfg, prefill, r, k, v, w, w_per_token=False)
    y = wkv5_out(g, att, y, r, k, v, cfg, p)
    if "gate" in L:   # 5.1 / 5.2
        y = g.op("Mul", y, silu(g, linear(g, L["gate"], mixed(g, x, xx, att.mix["x_g"], p + "x_g"))))
    return linear(g, L["output"], y), S2, v_first


def emit_time_mix_v6(g: Graph, att: ir.TimeMix, x: str, prev: str, S: str, v_first, cfg: ir.ModelConfig,
                     i: int, prefill: bool):
    p = f"blocks.{i}.att."
    L = att.lin
    D = L["maa1"].out_features // 5
    xx = g.op("Sub", shifted(g, x, prev, prefill), x)                                       # prev - x
    # data-dependent token shift: one LoRA down-projection for all five targets, one up-projection each
    h = g.op("Tanh", linear(g, L["maa1"], mixed(g, x, xx, att.mix["x_x"], p + "x_x")))        # (T, 5D)
    parts = g.op("Split", h, g.const([D] * 5), axis=-1, n_out=5)
    xm = {m: mixed(g, x, xx, att.mix["x_" + m], p + "x_" + m, linear(g, L["maa2_" + m], part))
          for m, part in zip(MAA, parts)}
    r = f32(g, linear(g, L["receptance"], xm["r"]))
    k = f32(g, linear(g, L["key"], xm["k"]))
    v = f32(g, linear(g, L["value"], xm["v"]))
    gate = silu(g, linear(g, L["gate"], xm["g"]))
    # data-dependent decay, per token and channel: exp(-exp(w0 + W2 tanh(W1 x_w)))
    wl = f32(g, linear(g, L["w2"], g.op("Tanh", linear(g, L["w1"], xm["w"]))))
    w = g.op("Exp", g.op("Neg", g.op("Exp", g.op("Add", wl, g.weight(p + "time_decay", att.vec["w0"], F32)))))
    y, S2 = emit_wkv5(g, S, cfg, prefill, r, k, v, w, w_per_token=True)
    y = g.op("Mul", wkv5_out(g, att, y, r, k, v, cfg, p), gate)
    return linear(g, L["output"], y), S2, v_first


# ----------------------------------------------------------------------------------------------
# Channel-mix of v4-v6 (with receptance), dense or sparse (RWKV-Lite)

def emit_channel_mix_rwkv(g: Graph, ffn: ir.ChannelMix, x: str, prev: str, i: int, prefill: bool) -> str:
    """y = sigmoid(R xr) * V relu(K xk)^2, the mixes in the IR's x + (prev - x) * mix form."""
    p = f"blocks.{i}.ffn."
    xx = g.op("Sub", shifted(g, x, prev, prefill), x)
    xk = mixed(g, x, xx, ffn.mix["x_k"], p + "x_k")
    r = g.op("Sigmoid", linear(g, ffn.lin["receptance"], mixed(g, x, xx, ffn.mix["x_r"], p + "x_r")))
    if ffn.sparse is not None:
        kv = emit_sparse_ffn(g, ffn, xk, p, prefill)
    else:
        k = g.op("Relu", linear(g, ffn.lin["key"], xk))
        kv = linear(g, ffn.lin["value"], g.op("Mul", k, k))
    return g.op("Mul", r, kv)
