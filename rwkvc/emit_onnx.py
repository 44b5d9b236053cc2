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


def emit_wkv(g: Graph, S: str, H: int, N: int, prefill: bool, **vecs):
    """vecs r,w,k,v,a,b: (T, C). Returns y (T, C) and the new state (H, N, N)."""
    col = g.const([-1, H, N, 1]) if prefill else g.const([H, N, 1])
    row = g.const([-1, H, 1, N]) if prefill else g.const([H, 1, N])
    shaped = {n: g.op("Reshape", vecs[n], row if n in ("w", "b", "k") else col) for n in ("w", "a", "b", "v", "k", "r")}
    if not prefill:
        S2, y = wkv_step(g, S, *(shaped[n] for n in ("w", "a", "b", "v", "k", "r")))
        return g.op("Reshape", y, g.const([1, H * N])), S2
    body = g.subgraph()
    f = TensorProto.FLOAT
    names = ["S_in", "w_t", "a_t", "b_t", "v_t", "k_t", "r_t"]
    S2, y = wkv_step(body, *names)
    body.nodes.append(helper.make_node("Identity", [S2], ["S_out"]))
    body.nodes.append(helper.make_node("Identity", [y], ["y_t"]))
    vi = lambda n, shp: helper.make_tensor_value_info(n, f, shp)  # noqa: E731
    gp = body.make("wkv_body",
                   [vi("S_in", [H, N, N])] + [vi(n, [H, 1, N] if n[0] in "wbk" else [H, N, 1]) for n in names[1:]],
                   [vi("S_out", [H, N, N]), vi("y_t", [H, N, 1])])
    S_final, ys = g.op("Scan", S, *(shaped[n] for n in ("w", "a", "b", "v", "k", "r")), n_out=2,
                       body=gp, num_scan_inputs=6)
    return g.op("Reshape", ys, g.const([-1, H * N])), S_final


def emit_time_mix_v7(g: Graph, att: ir.TimeMix, x: str, prev: str, S: str, v_first: str | None,
                     cfg: ir.ModelConfig, i: int, prefill: bool):
    H, N, C = cfg.n_head, cfg.head_size, cfg.n_embd
    p = f"blocks.{i}.att."
    xx = g.op("Sub", shifted(g, x, prev, prefill), x)
    xm = {m: g.op("Add", x, g.op("Mul", xx, g.weight(p + m, att.mix[m]))) for m in att.mix}
    L = att.lin
    r = linear(g, L["receptance"], xm["x_r"])
    w = linear(g, L["w2"], g.op("Tanh", linear(g, L["w1"], xm["x_w"])))
    w = g.op("Exp", g.op("Mul", g.op("Sigmoid", g.op("Add", w, g.weight(p + "w0", att.vec["w0"]))),
                         g.const(-DECAY_SCALE)))
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

    y, S2 = emit_wkv(g, S, H, N, prefill, r=r, w=w, k=k, v=v,
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
