"""IR -> ONNX. Two graphs over one external weight file:

    step.onnx     tokens (1,)  + state -> logits (V,) + state      one decode step, no loops
    prefill.onnx  tokens (T,)  + state -> logits of the last token + state, WKV as an ONNX Scan over T

    state: shift (L, 2, C) float32, wkv (L, H, N, N) float32 (the same layout as rwkvc.ir.State)

Per layer (x is (T, C), T = 1 in the step graph):

    x ─ln1─► time-mix ─(+)─► x ─ln2─► channel-mix ─(+)─► x
              │ token shift: prev row from shift[l, 0]          │ shift[l, 1]
              │ r,k,v,w,a,g projections (MatMul per Linear)     │ relu(x_k-mixed @ K)^2 @ V
              │ WKV recurrence on wkv[l] (Scan over T)
              └ group norm, bonus r·k·r_k·v, gate, output

Weights are written once to `weights.bin` (page-aligned tensors) and both graphs point into it, so
models over 2 GB work and the runtime can share the bytes. Matrices are emitted through the
representation registry `LINEAR_EMITTERS` (kind -> function), so compression passes add their own
lowering next to their weight math.
"""
from __future__ import annotations

import math
import os
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import ir

OPSET = 18
DECAY_SCALE = math.exp(-0.5)
ALIGN = 4096


class WeightStore:
    """Writes initializers once to an external-data file; returns TensorProtos that point into it."""

    def __init__(self, path: str, dtype=np.float32):
        self.path, self.location = path, os.path.basename(path)
        self.dtype = np.dtype(dtype)
        self.f = open(path, "wb")
        self.entries: dict[str, TensorProto] = {}
        self.nbytes = 0

    def add(self, name: str, arr: np.ndarray, dtype=None) -> TensorProto:
        if name in self.entries:
            return self.entries[name]
        a = np.ascontiguousarray(arr, dtype=np.dtype(dtype or self.dtype))
        pad = (-self.f.tell()) % ALIGN if a.nbytes >= ALIGN else (-self.f.tell()) % 64
        self.f.write(b"\0" * pad)
        offset = self.f.tell()
        self.f.write(a.tobytes())
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(a.dtype), dims=list(a.shape))
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.location), ("offset", str(offset)), ("length", str(a.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.entries[name] = t
        self.nbytes += a.nbytes
        return t

    def close(self):
        self.f.close()


class Graph:
    """A small ONNX graph builder: `g.op("MatMul", a, b)` returns the output name."""

    def __init__(self, store: WeightStore, dtype=np.float32):
        self.store, self.dtype = store, np.dtype(dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, TensorProto] = {}
        self.n = 0

    def fresh(self, hint="t") -> str:
        self.n += 1
        return f"{hint}_{self.n}"

    def op(self, op_type: str, *inputs: str, n_out: int = 1, domain: str = "", name: str | None = None, **attrs):
        outs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        if name is not None and n_out == 1:
            outs = [name]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def weight(self, name: str, arr: np.ndarray, dtype=None) -> str:
        """A model parameter, stored once in the external weight file."""
        self.inits[name] = self.store.add(name, arr, dtype)
        return name

    def const(self, value, dtype=None) -> str:
        """A small inline constant (shapes, scalars)."""
        a = np.asarray(value, dtype=dtype or (np.int64 if np.asarray(value).dtype.kind in "iu" else self.dtype))
        name = self.fresh("c")
        self.inits[name] = numpy_helper.from_array(a, name)
        return name

    def subgraph(self) -> "Graph":
        return Graph(self.store, self.dtype)

    def make(self, name, inputs, outputs) -> onnx.GraphProto:
        return helper.make_graph(self.nodes, name, inputs, outputs, initializer=list(self.inits.values()))


# ----------------------------------------------------------------------------------------------
# Matrices: kind -> emitter(g, linear, x) -> y  with x (..., in) and y (..., out)

def emit_dense(g: Graph, lin: ir.Linear, x: str) -> str:
    return g.op("MatMul", x, g.weight(lin.name + ".wT", lin.weight.w.T))


def emit_lowrank(g: Graph, lin: ir.Linear, x: str) -> str:
    lr = lin.weight
    h = g.op("MatMul", x, g.weight(lin.name + ".aT", lr.a.T))                  # (T, rank)
    if lr.act in ("relu", "relu2"):
        h = g.op("Relu", h)
        if lr.act == "relu2":
            h = g.op("Mul", h, h)
    y = g.op("MatMul", h, g.weight(lin.name + ".bT", lr.b.T))                  # (T, out)
    if lr.diag is not None:
        y = g.op("Add", y, g.op("Mul", x, g.weight(lin.name + ".diag", lr.diag)))
    return y


LINEAR_EMITTERS: dict[str, Callable[[Graph, ir.Linear, str], str]] = {"dense": emit_dense, "lowrank": emit_lowrank}


def linear(g: Graph, lin: ir.Linear, x: str) -> str:
    return LINEAR_EMITTERS[lin.kind](g, lin, x)


# ----------------------------------------------------------------------------------------------

def layer_norm(g: Graph, x: str, n: ir.Norm, name: str) -> str:
    return g.op("LayerNormalization", x, g.weight(name + ".weight", n.weight), g.weight(name + ".bias", n.bias),
                axis=-1, epsilon=float(n.eps))


def shifted(g: Graph, x: str, prev: str, prefill: bool) -> str:
    """The previous token's row for each t: concat(prev, x[:-1]); (T, C)."""
    if not prefill:
        return prev
    head = g.op("Slice", x, g.const([0]), g.const([-1]), g.const([0]))
    return g.op("Concat", prev, head, axis=0)


def wkv_step(g: Graph, S: str, w: str, a: str, b: str, v: str, k: str, r: str):
    """S (H,N,N); w,b,k (H,1,N); a,v,r (H,N,1) -> S', y (H,N,1).  S' = S*w + (S@a)@b + v@k, y = S'@r."""
    sa = g.op("MatMul", S, a)
    S2 = g.op("Add", g.op("Add", g.op("Mul", S, w), g.op("MatMul", sa, b)), g.op("MatMul", v, k))
    return S2, g.op("MatMul", S2, r)


def emit_wkv(g: Graph, S: str, H: int, N: int, prefill: bool, r, logw, k, v, a, b):
    """r, logw, k, v, a, b: (T, C) with w = exp(logw). Returns y (T, C) and the new state (H, N, N)."""
    if prefill:
        return emit_wkv_chunked(g, S, H, N, CHUNK, r=r, logw=logw, k=k, v=v, a=a, b=b)
    col, row = g.const([H, N, 1]), g.const([H, 1, N])
    w = g.op("Exp", logw)
    shaped = {n: g.op("Reshape", x, row if n in ("w", "b", "k") else col)
              for n, x in (("w", w), ("a", a), ("b", b), ("v", v), ("k", k), ("r", r))}
    S2, y = wkv_step(g, S, *(shaped[n] for n in ("w", "a", "b", "v", "k", "r")))
    return g.op("Reshape", y, g.const([1, H * N])), S2


CHUNK = 16  # prefill WKV chunk length (a power of two)


def emit_wkv_chunked(g: Graph, S: str, H: int, N: int, Tc: int, r, logw, k, v, a, b):
    """The WKV recurrence over T tokens in chunks of Tc (the WY form of the generalised delta rule).

    Per chunk, with gamma_t = prod_{i<=t} w_i (inclusive) and g_x its exclusive version, rescale
        A~ = a * g_x,  B~ = b / gamma,  K~ = k / gamma,  R~ = r * gamma          (Tc, N) per head
    and with masks strict (s < t) and incl (s <= t):
        L = (A~ B~^T) strict,  Inv = (I - L)^-1 = prod_i (I + L^(2^i))         (Tc, Tc)
        W1 = Inv A~,  W2 = Inv ((A~ K~^T) strict) V
        Q = R~ + (R~ B~^T)incl W1,   Y0 = (R~ B~^T)incl W2 + (R~ K~^T)incl V
        G = (I + W1^T B~) diag(gamma_Tc),   D = (W2^T B~ + V^T K~) diag(gamma_Tc)
    then only this is sequential over chunks (an ONNX Scan), everything above is batched:
        Y^T = S Q^T + Y0^T,   S <- S G + D
    Padding tokens have w = 1 and a = b = k = v = r = 0, so they leave the state alone.
    """
    C = H * N
    T = g.op("Slice", g.op("Shape", r), g.const([0]), g.const([1]))                   # (1,)
    pad = g.op("Mod", g.op("Sub", g.const([Tc]), g.op("Mod", T, g.const([Tc]))), g.const([Tc]))
    pads = g.op("Concat", g.const([0, 0]), pad, g.const([0]), axis=0)                  # [0, 0, pad, 0]

    def chunked(x):  # (T, C) -> (nC, H, Tc, N)
        x = g.op("Pad", x, pads)
        return g.op("Transpose", g.op("Reshape", x, g.const([-1, Tc, H, N])), perm=[0, 2, 1, 3])

    r, logw, k, v, a, b = (chunked(x) for x in (r, logw, k, v, a, b))
    cum = g.op("CumSum", logw, g.const(2))
    cumx = g.op("CumSum", logw, g.const(2), exclusive=1)
    gam, inv_gam = g.op("Exp", cum), g.op("Exp", g.op("Neg", cum))
    At = g.op("Mul", a, g.op("Exp", cumx))
    Bt, Kt, Rt = g.op("Mul", b, inv_gam), g.op("Mul", k, inv_gam), g.op("Mul", r, gam)
    gam_end = g.op("Exp", g.op("Slice", cum, g.const([-1]), g.const([Tc]), g.const([2])))  # (nC, H, 1, N)

    tr = lambda x: g.op("Transpose", x, perm=[0, 1, 3, 2])  # noqa: E731
    strict = g.const(np.tril(np.ones((Tc, Tc)), -1))
    incl = g.const(np.tril(np.ones((Tc, Tc))))
    eye_t, eye_n = g.const(np.eye(Tc)), g.const(np.eye(N))
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
    Qt = tr(g.op("Add", Rt, g.op("MatMul", Mrb, W1)))                                   # (nC, H, N, Tc)
    Y0t = tr(g.op("Add", g.op("MatMul", Mrb, W2), g.op("MatMul", Mrk, v)))              # (nC, H, N, Tc)
    G = g.op("Mul", g.op("Add", eye_n, g.op("MatMul", tr(W1), Bt)), gam_end)            # (nC, H, N, N)
    D = g.op("Mul", g.op("Add", g.op("MatMul", tr(W2), Bt), g.op("MatMul", tr(v), Kt)), gam_end)

    body = g.subgraph()
    yt = body.op("Add", body.op("MatMul", "S_in", "q_c"), "y0_c")
    body.nodes.append(helper.make_node("Identity", [yt], ["y_c"]))
    body.nodes.append(helper.make_node("Add", [body.op("MatMul", "S_in", "g_c"), "d_c"], ["S_out"]))
    f = TensorProto.FLOAT
    vi = lambda n, shp: helper.make_tensor_value_info(n, f, shp)  # noqa: E731
    gp = body.make("wkv_chunk", [vi("S_in", [H, N, N]), vi("q_c", [H, N, Tc]), vi("y0_c", [H, N, Tc]),
                                 vi("g_c", [H, N, N]), vi("d_c", [H, N, N])],
                   [vi("S_out", [H, N, N]), vi("y_c", [H, N, Tc])])
    S_final, ys = g.op("Scan", S, Qt, Y0t, G, D, n_out=2, body=gp, num_scan_inputs=4)  # ys (nC, H, N, Tc)
    y = g.op("Reshape", g.op("Transpose", ys, perm=[0, 3, 1, 2]), g.const([-1, C]))      # (nC*Tc, C)
    return g.op("Slice", y, g.const([0]), T, g.const([0])), S_final


def emit_time_mix_v7(g: Graph, att: ir.TimeMix, x: str, prev: str, S: str, v_first: str | None,
                     cfg: ir.ModelConfig, i: int, prefill: bool):
    H, N, C = cfg.n_head, cfg.head_size, cfg.n_embd
    p = f"blocks.{i}.att."
    xx = g.op("Sub", shifted(g, x, prev, prefill), x)
    xm = {m: g.op("Add", x, g.op("Mul", xx, g.weight(p + m, att.mix[m]))) for m in att.mix}
    L = att.lin
    r = linear(g, L["receptance"], xm["x_r"])
    w = linear(g, L["w2"], g.op("Tanh", linear(g, L["w1"], xm["x_w"])))
    logw = g.op("Mul", g.op("Sigmoid", g.op("Add", w, g.weight(p + "w0", att.vec["w0"]))), g.const(-DECAY_SCALE))
    k = linear(g, L["key"], xm["x_k"])
    v = linear(g, L["value"], xm["x_v"])
    iclr = g.op("Sigmoid", g.op("Add", g.weight(p + "a0", att.vec["a0"]), linear(g, L["a2"], linear(g, L["a1"], xm["x_a"]))))
    gate = linear(g, L["g2"], g.op("Sigmoid", linear(g, L["g1"], xm["x_g"])))

    heads = g.const([-1, H, N])
    kk = g.op("Reshape", g.op("Mul", k, g.weight(p + "k_k", att.vec["k_k"])), heads)
    kk = g.op("Div", kk, g.op("Max", g.op("ReduceL2", kk, g.const([-1]), keepdims=1), g.const(1e-12)))
    kk = g.op("Reshape", kk, g.const([-1, C]))
    one = g.const(1.0)
    k = g.op("Mul", k, g.op("Add", one, g.op("Mul", g.op("Sub", iclr, one), g.weight(p + "k_a", att.vec["k_a"]))))
    if i == 0:
        v_first = v
    else:
        vg = g.op("Sigmoid", g.op("Add", g.weight(p + "v0", att.vec["v0"]), linear(g, L["v2"], linear(g, L["v1"], xm["x_v"]))))
        v = g.op("Add", v, g.op("Mul", g.op("Sub", v_first, v), vg))

    y, S2 = emit_wkv(g, S, H, N, prefill, r=r, logw=logw, k=k, v=v,
                     a=g.op("Neg", kk), b=g.op("Mul", kk, iclr))

    # group norm over each head's N channels, then the per-channel affine of ln_x
    yh = g.op("Reshape", y, heads)
    yh = g.op("LayerNormalization", yh, g.const(np.ones(N)), g.const(np.zeros(N)), axis=-1, epsilon=float(att.ln_x.eps))
    y = g.op("Add", g.op("Mul", g.op("Reshape", yh, g.const([-1, C])), g.weight(p + "ln_x.weight", att.ln_x.weight)),
             g.weight(p + "ln_x.bias", att.ln_x.bias))
    rk = g.op("Reshape", g.op("Mul", g.op("Mul", r, k), g.weight(p + "r_k", att.vec["r_k"])), heads)
    bonus = g.op("Mul", g.op("ReduceSum", rk, g.const([-1]), keepdims=1), g.op("Reshape", v, heads))
    y = g.op("Add", y, g.op("Reshape", bonus, g.const([-1, C])))
    return linear(g, L["output"], g.op("Mul", y, gate)), S2, v_first


def emit_channel_mix_v7(g: Graph, ffn: ir.ChannelMix, x: str, prev: str, i: int, prefill: bool) -> str:
    p = f"blocks.{i}.ffn."
    xk = g.op("Add", x, g.op("Mul", g.op("Sub", shifted(g, x, prev, prefill), x), g.weight(p + "x_k", ffn.mix["x_k"])))
    k = g.op("Relu", linear(g, ffn.lin["key"], xk))
    return linear(g, ffn.lin["value"], g.op("Mul", k, k))


TIME_MIX_EMITTERS = {"7": emit_time_mix_v7}
CHANNEL_MIX_EMITTERS = {"7": emit_channel_mix_v7}


def folded_embedding(model: ir.Model, chunk: int = 8192) -> np.ndarray:
    """emb rows with ln0 applied (as the official package does at load time); (V, C) float32."""
    E = model.emb.weight.w
    if model.ln0 is None:
        return np.asarray(E, np.float32)
    out = np.empty(E.shape, np.float32)
    n = model.ln0
    for s in range(0, E.shape[0], chunk):
        e = np.asarray(E[s:s + chunk], np.float64)
        mu = e.mean(-1, keepdims=True)
        var = ((e - mu) ** 2).mean(-1, keepdims=True)
        out[s:s + chunk] = (e - mu) / np.sqrt(var + n.eps) * n.weight + n.bias
    return out


def build_graph(model: ir.Model, store: WeightStore, prefill: bool, emb_name: str) -> onnx.ModelProto:
    cfg = model.config
    L, C, H, N, V = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size, cfg.vocab_size
    g = Graph(store)
    g.inits[emb_name] = store.entries[emb_name]
    x = g.op("Gather", emb_name, "tokens", axis=0)                                   # (T, C)
    shifts = g.op("Split", "shift_in", axis=0, num_outputs=L, n_out=L) if L > 1 else "shift_in"
    wkvs = g.op("Split", "wkv_in", axis=0, num_outputs=L, n_out=L) if L > 1 else "wkv_in"
    shifts, wkvs = ([shifts], [wkvs]) if L == 1 else (shifts, wkvs)
    new_shift, new_wkv = [], []
    v_first = None
    for i, blk in enumerate(model.blocks):
        sh = g.op("Squeeze", shifts[i], g.const([0]))                                 # (2, C)
        prev_att = g.op("Slice", sh, g.const([0]), g.const([1]), g.const([0]))       # (1, C)
        prev_ffn = g.op("Slice", sh, g.const([1]), g.const([2]), g.const([0]))
        S = g.op("Squeeze", wkvs[i], g.const([0]))                                    # (H, N, N)

        xa = layer_norm(g, x, blk.ln1, f"blocks.{i}.ln1")
        dx, S2, v_first = TIME_MIX_EMITTERS[blk.att.version](g, blk.att, xa, prev_att, S, v_first, cfg, i, prefill)
        x = g.op("Add", x, dx)
        xf = layer_norm(g, x, blk.ln2, f"blocks.{i}.ln2")
        x = g.op("Add", x, CHANNEL_MIX_EMITTERS[blk.ffn.version](g, blk.ffn, xf, prev_ffn, i, prefill))

        last = lambda t: g.op("Slice", t, g.const([-1]), g.const([2 ** 62]), g.const([0]))  # noqa: E731
        new_shift.append(g.op("Unsqueeze", g.op("Concat", last(xa), last(xf), axis=0), g.const([0])))
        new_wkv.append(g.op("Unsqueeze", S2, g.const([0])))

    xl = g.op("Slice", x, g.const([-1]), g.const([2 ** 62]), g.const([0])) if prefill else x
    xl = layer_norm(g, xl, model.ln_out, "ln_out")
    logits = g.op("Reshape", linear(g, model.head, xl), g.const([V]))
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
    g.nodes.append(helper.make_node("Concat", new_shift, ["shift_out"], axis=0) if L > 1
                   else helper.make_node("Identity", new_shift, ["shift_out"]))
    g.nodes.append(helper.make_node("Concat", new_wkv, ["wkv_out"], axis=0) if L > 1
                   else helper.make_node("Identity", new_wkv, ["wkv_out"]))

    f = TensorProto.FLOAT
    T = "T" if prefill else 1
    shp = cfg.state_shapes()
    inputs = [helper.make_tensor_value_info("tokens", TensorProto.INT64, [T]),
              helper.make_tensor_value_info("shift_in", f, list(shp["shift"])),
              helper.make_tensor_value_info("wkv_in", f, list(shp["wkv"]))]
    outputs = [helper.make_tensor_value_info("logits", f, [V]),
               helper.make_tensor_value_info("shift_out", f, list(shp["shift"])),
               helper.make_tensor_value_info("wkv_out", f, list(shp["wkv"]))]
    graph = g.make("rwkv_prefill" if prefill else "rwkv_step", inputs, outputs)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
                          producer_name="rwkvc")
    m.ir_version = 9
    return m


def emit(model: ir.Model, out_dir: str, dtype=np.float32, progress=None) -> dict[str, str]:
    """Write step.onnx, prefill.onnx and weights.bin into out_dir. Returns {entry point: file name}."""
    store = WeightStore(os.path.join(out_dir, "weights.bin"), dtype)
    try:
        store.add("emb.folded", folded_embedding(model))
        files = {}
        for entry, prefill in (("step", False), ("prefill", True)):
            m = build_graph(model, store, prefill, "emb.folded")
            fn = f"{entry}.onnx"
            with open(os.path.join(out_dir, fn), "wb") as f:
                f.write(m.SerializeToString())
            files[entry] = fn
            if progress:
                progress(entry)
    finally:
        store.close()
    return files
