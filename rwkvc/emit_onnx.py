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

import functools
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

    def add(self, name: str, arr, dtype=None) -> TensorProto:
        """arr: the array, or a function making it, called only when `name` is new (a layout derived from
        the IR, which the step and prefill graphs share, is then computed once)."""
        if name in self.entries:
            return self.entries[name]
        a = np.ascontiguousarray(arr() if callable(arr) else arr, dtype=np.dtype(dtype or self.dtype))
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
        self.rescale: dict[str, float] = {}   # Linear name -> divisor of its output (the fp16 layer rescale)
        self.prefix = ""                      # subgraphs name their values apart (ONNX wants one SSA scope)
        self.fused = False                    # rwkvc's own kernels (FUSED_DOMAIN) may be used
        self.step = False                     # the one-token step graph (else the prefill)
        self.top = None                       # a value holding the head's top token (the step's "top" output)

    def fresh(self, hint="t") -> str:
        self.n += 1
        return f"{self.prefix}{hint}_{self.n}"

    def op(self, op_type: str, *inputs: str, n_out: int = 1, domain: str = "", name: str | None = None, **attrs):
        outs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        if name is not None and n_out == 1:
            outs = [name]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def rename(self, old: str, new: str) -> None:
        """Give value `old` the name `new` (a graph output) wherever this graph makes or uses it."""
        for n in self.nodes:
            for io in (n.input, n.output):
                for j, v in enumerate(io):
                    if v == old:
                        io[j] = new

    def weight(self, name: str, arr, dtype=None) -> str:
        """A model parameter, stored once in the external weight file (arr: as WeightStore.add)."""
        self.inits[name] = self.store.add(name, arr, dtype)
        return name

    def const(self, value, dtype=None) -> str:
        """A small inline constant (shapes, scalars)."""
        a = np.asarray(value, dtype=dtype or (np.int64 if np.asarray(value).dtype.kind in "iu" else self.dtype))
        name = self.fresh("c")
        self.inits[name] = numpy_helper.from_array(a, name)
        return name

    def subgraph(self, dtype=None) -> "Graph":
        sub = Graph(self.store, self.dtype if dtype is None else dtype)
        sub.prefix = self.fresh("body") + "/"
        return sub

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

# kind -> fn(weight, s) -> the representation of W / s (exactly), for the fp16 layer rescale; kinds without
# one are rescaled through their input instead (x / s), which is exact for any linear map
RESCALERS: dict[str, Callable[[object, float], object]] = {
    "dense": lambda w, s: ir.Dense(np.asarray(w.w, np.float32) / s),
    "lowrank": lambda w, s: ir.LowRank(w.a, np.asarray(w.b, np.float32) / s, w.act,
                                       None if w.diag is None else np.asarray(w.diag, np.float32) / s),
}


def linear(g: Graph, lin: ir.Linear, x: str) -> str:
    s = g.rescale.get(lin.name)
    if s is not None and s != 1:
        if lin.kind in RESCALERS:
            lin = ir.Linear(lin.name, RESCALERS[lin.kind](lin.weight, s))
        else:
            x = g.op("Mul", x, g.const(1.0 / s))
    return LINEAR_EMITTERS[lin.kind](g, lin, x)


def cast(g: Graph, x: str, dtype) -> str:
    """x in `dtype` (a no-op in the graph when the compute dtype already is it)."""
    if np.dtype(dtype) == g.dtype:
        return x
    return g.op("Cast", x, to=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))


def f32(g: Graph, x: str) -> str:
    """A compute-dtype tensor as float32 (for the recurrences, which always run in float32)."""
    return cast(g, x, np.float32)


def to_compute(g: Graph, x: str) -> str:
    """A float32 tensor back in the compute dtype."""
    if g.dtype == np.float32:
        return x
    return g.op("Cast", x, to=helper.np_dtype_to_tensor_dtype(g.dtype))


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

    r, logw, k, v, a, b = (chunked(x) for x in (r, logw, k, v, a, b))
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
    Z = g.op("Transpose", S, perm=[0, 2, 1])
    Z_final, ys = g.op("Scan", Z, QW, Y0W, v, BKe, decay_end, n_out=2, body=gp, num_scan_inputs=5)
    y = g.op("Reshape", g.op("Transpose", ys, perm=[0, 2, 1, 3]), g.const([-1, C]))      # (nC*Tc, C)
    return g.op("Slice", y, g.const([0]), T, g.const([0])), g.op("Transpose", Z_final, perm=[0, 2, 1])


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


# ---- Rwkv7MatVecQ / Rwkv7MatVecSet: 4-bit products of the fused step (op set version 3)
# weight kind -> (spec(weight) -> (bits, block) or None, inputs(g, lin) -> (codes, scales, zeros),
# layout16(g, weight) -> bool, inputs16(g, lin) -> (codes, scales, zeros)): the matrices stored in
# MatMulNBits' layout, or op set 7's interleaved one where layout16 says so, registered by passes.quant
NBITS: dict[str, tuple] = {}
MATVEC_Q: bool | None = None   # rwkvc's kernels for them in the step graph (False: ONNX Runtime's MatMulNBits;
                               # None: where the compiling CPU has AVX-512 VNNI, matvec_q_host)
MATVEC_Q_BLOCKS = (16, 32, 64, 128, 256)
MATVEC_MIN_K = 256
MATVEC_SMALL = 1 << 18     # products of at most this many weights join whatever their width (a 0.1B svd factor, 192 x 768)
MATVEC_ACTS = {None: 0, "tanh": 1, "sigmoid": 2, "relu": 3, "relu2": 4}   # Rwkv7MatVecSet's acts attribute
MATVEC_I16 = True          # those matrices in op set 7's interleaved layout (passes.quant.interleave16; False:
                           # MatMulNBits' layout, read by Rwkv7MatVecQ in the step and MatMulNBits in the prefill)


@functools.cache
def matvec_q_host() -> bool:
    """Whether this CPU runs rwkvc's 4-bit kernels faster than MatMulNBits: with AVX-512 VNNI (measured ~1.2x
    on the 0.1B step, docs/BENCHMARKS.md session 6). On an AVX2-only EPYC their AVX2 path took 1.75x
    MatMulNBits' time on the 0.1B step (session 8), so a step compiled there keeps MatMulNBits."""
    from rwkvc.runtimes.ortops import _cpu_flags
    return "avx512_vnni" in _cpu_flags().split()


def matvec_fusable(g: Graph, bits: int, block: int, accuracy_level: int, K: int, N: int, step: bool = True) -> bool:
    """Whether a MatMulNBits product of the graph runs on rwkvc's kernels: the fused step, accuracy level 4
    (the kernels compute what MatMulNBits computes at that level), blocks they read, and matrices of at least
    MATVEC_MIN_K columns or MATVEC_SMALL weights, where they measured faster than ONNX Runtime's
    (docs/BENCHMARKS.md, session 6); large narrow 4-bit ones (a 128-wide head) stay ONNX Runtime's. 8-bit
    matrices only in op set 7's interleaved layout (MATVEC_I16): over MatMulNBits' layout ONNX Runtime's
    8-bit kernel was as fast or faster, over the interleaved one rwkvc's is faster (session 13).
    step=False: whether it would in this graph's step (the prefill graph's answer for the matrices the two
    share, which both then read interleaved)."""
    return (g.fused and (g.step or not step) and not g.rescale and accuracy_level == 4
            and (bits == 4 or (bits == 8 and MATVEC_I16))
            and block in MATVEC_Q_BLOCKS and (K >= MATVEC_MIN_K or N * K <= MATVEC_SMALL)
            and (matvec_q_host() if MATVEC_Q is None else MATVEC_Q))


def matvec_q(g: Graph, x: str, codes: str, scales: str, zeros: str, bits: int, block: int) -> str:
    """y = W x as one Rwkv7MatVecQ node over MatMulNBits' inputs (the same initializers, stored once for
    the step and the prefill)."""
    return g.op("Rwkv7MatVecQ", f32(g, x), codes, scales, zeros, domain=FUSED_DOMAIN, bits=bits, block=block)


class MatVecSet:
    """Products of one layer gathered into one Rwkv7MatVecSet node, each computed as Rwkv7MatVecQ computes
    it: 4-bit matrices (matvec_fusable), and pairs of them with nothing, tanh, sigmoid, relu or relu squared
    between (the dense FFN; svd-factored projections; the LoRAs). The set's tanh and sigmoid are libm's, an
    ulp or two from ONNX Runtime's approximations: rarely, that flips one of the next product's 8-bit
    activation codes (the flips the fused step's tests allow).

        ms = MatVecSet(g); h = ms.add(lin, x) or ms.add((first, second), x, "relu2"); ...; ms.resolve({...})

    add() returns a handle, or None when the matrix cannot join (the caller emits it as usual)."""

    class Handle(int):
        pass

    def __init__(self, g: Graph):
        self.g, self.xs, self.ins, self.prog, self.outs = g, [], [], [], None
        self.layouts, self.ns = [], []

    def _spec(self, lin: ir.Linear):
        f = NBITS.get(lin.kind)
        spec = f[0](lin.weight) if f is not None else None
        ok = spec is not None and matvec_fusable(self.g, spec[0], spec[1], 4, lin.weight.shape[1], lin.weight.shape[0])
        return spec if ok else None

    def _product(self, lin: ir.Linear, src: int, act: str | None, emit: bool) -> int:
        bits, block = self._spec(lin)
        _, inputs, layout16, inputs16 = NBITS[lin.kind]
        i16 = layout16(self.g, lin.weight)
        self.ins += (inputs16 if i16 else inputs)(self.g, lin)
        self.layouts.append(int(i16))
        self.ns.append(int(lin.weight.shape[0]))
        self.prog.append((src, MATVEC_ACTS[act], bits, block, int(emit)))
        return len(self.prog) - 1

    def add(self, lin, x: str, act: str | None = None) -> "MatVecSet.Handle | None":
        """lin: a Linear, or a (first, second) pair with `act` between them; else `act` on the result. An
        svd-factored Linear (no diagonal) is the pair of its factors with its own activation between."""
        if not isinstance(lin, tuple) and lin.kind == "factored" and lin.weight.diag is None:
            if act is not None:
                return None
            w = lin.weight
            lin, act = (ir.Linear(lin.name + ".a", w.a), ir.Linear(lin.name + ".b", w.b)), w.act
        pair = lin if isinstance(lin, tuple) else (lin,)
        if act not in MATVEC_ACTS or any(self._spec(m) is None for m in pair):
            return None
        if x not in self.xs:
            self.xs.append(x)
        src = self.xs.index(x)
        if len(pair) == 2:
            src = -self._product(pair[0], src, act, False) - 1
            act = None
        self._product(pair[-1], src, act, True)
        return MatVecSet.Handle(sum(p[4] for p in self.prog) - 1)

    def resolve(self, values: dict) -> dict:
        """Emit the node (once) and replace the handles among `values` by its outputs."""
        if self.outs is None:
            self.outs = []
            if self.prog:
                src, acts, bits, blocks, emits = (list(c) for c in zip(*self.prog))
                n = sum(emits)
                # op set 7's interleaved products (absent when there are none: the op set 3-6 form)
                extra = {"layouts": self.layouts, "ns": self.ns} if any(self.layouts) else {}
                # inputs are indexed by position: the x's first (their indices fixed before the weights)
                outs = self.g.op("Rwkv7MatVecSet", *(f32(self.g, x) for x in self.xs), *self.ins,
                                 domain=FUSED_DOMAIN, n_out=n, n_x=len(self.xs), src=src, acts=acts,
                                 bitss=bits, blocks=blocks, emits=emits, **extra)
                self.outs = [outs] if n == 1 else list(outs)
        return {k: self.outs[v] if isinstance(v, MatVecSet.Handle) else v for k, v in values.items()}


def matvec_product(g: Graph, lin, x: str, act: str | None = None) -> str | None:
    """One matrix (an svd-factored one: its two factors), or a (first, second) pair with `act` between, as a
    one-entry Rwkv7MatVecSet; None when it cannot join (MatVecSet.add)."""
    ms = MatVecSet(g)
    h = ms.add(lin, x, act)
    return ms.resolve({"y": h})["y"] if h is not None else None


def emit_time_mix_v7(g: Graph, att: ir.TimeMix, x: str, prev: str, S: str, v_first: str | None,
                     cfg: ir.ModelConfig, i: int, prefill: bool, xm: dict[str, str] | None = None):
    """Projections in the compute dtype; decay, normalisation, WKV, group norm and bonus in float32.
    xm: the six token-shift mixes, where the caller made them (the fused prefill's Rwkv7Mix6)."""
    H, N, C = cfg.n_head, cfg.head_size, cfg.n_embd
    p = f"blocks.{i}.att."
    L, vec = att.lin, att.vec
    w32 = lambda name, arr: g.weight(p + name, arr, F32)  # noqa: E731
    names = list(att.mix)
    if xm is None:
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


FUSED_DOMAIN = "ai.rwkvc"   # rwkvc's own CPU kernels (native/ort_ops.cc, registered by runtimes/ortops.py)
FUSED_VERSION = 7           # the op set's version: 1 the RWKV-7 step / prefill kernels, 2 adds the sparse FFN
                            # and clustered head kernels, 3 the quantised matrix-vector product (Rwkv7MatVecQ),
                            # 4 the clustered head's top token without its logits (Rwkv7ClusteredHeadTop),
                            # 5 tanh and sigmoid between a set's products (a LoRA in Rwkv7MatVecSet),
                            # 6 the sparse FFN with an int8 MLP predictor and 1-bit codes 16 rows together
                            # (Rwkv7SparseFfnQ), 7 the interleaved 4-bit and int8 layouts (Rwkv7MatVecQ16 / Q16x8,
                            # Rwkv7MatVecSet's layouts); a library of version n runs artifacts of 1..n
# (op, input index) of the fused kernels that read only some rows of that input (rwkvc.bench.weight_traffic)
HEAD_MODE = "head_mode"   # the step's input with a top-token head (Rwkv7ClusteredHeadTop): 1 = the top token only
FUSED_ROW_INPUTS = {("Rwkv7ClusteredHeadTop", 2), ("Rwkv7ClusteredHeadTop", 3), ("Rwkv7ClusteredHeadTop", 5),
                    ("Rwkv7ClusteredHeadTopF32", 2), ("Rwkv7ClusteredHeadTopF32", 5),
                    ("Rwkv7SparseFfn", 4), ("Rwkv7SparseFfn", 5), ("Rwkv7SparseFfn", 6),
                    ("Rwkv7SparseFfnF32", 4), ("Rwkv7SparseFfnF32", 6),
                    ("Rwkv7SparseFfnQ", 6), ("Rwkv7SparseFfnQ", 7), ("Rwkv7SparseFfnQ", 8),
                    ("Rwkv7SparseFfnQF32", 6), ("Rwkv7SparseFfnQF32", 8),
                    ("Rwkv7ClusteredHead", 2), ("Rwkv7ClusteredHead", 3), ("Rwkv7ClusteredHead", 5),
                    ("Rwkv7ClusteredHeadF32", 2), ("Rwkv7ClusteredHeadF32", 5)}


FUSED_MAX_HEAD = 256          # the kernels keep a head's vectors in fixed buffers of this size


def fused_supported(model: ir.Model, dtype) -> bool:
    """rwkvc's fused kernels (the step's element-wise work, the prefill's WKV and mixes): RWKV-7 in float32,
    heads of at most FUSED_MAX_HEAD channels."""
    cfg = model.config
    return cfg.version == "7" and np.dtype(dtype) == np.float32 and cfg.head_size <= FUSED_MAX_HEAD


def emit_block_v7_fused(g: Graph, blk, x: str, dx: str, prev_att: str, prev_ffn: str, S: str, v_first: str | None,
                        cfg: ir.ModelConfig, i: int, prefill: bool = False, trim: bool = False):
    """One RWKV-7 layer on rwkvc's fused kernels: the residual add, layer norm and token-shift mixes are one
    Rwkv7Mix node; in the step, everything between the projections and the output projection is one
    Rwkv7WkvStep node (a prefill does that part as emit_time_mix_v7, with the Rwkv7WkvSeq recurrence).
    The residual stream enters as x + dx (the add happens in the Mix kernel). trim: the channel-mix on the
    last two rows only (the last layer of a prefill). Returns x, dx (the layer's channel-mix output, still
    to be added), the layer's LayerNorm outputs (their last rows are the shift state), S', v_first."""
    att, ffn = blk.att, blk.ffn
    p = f"blocks.{i}.att."
    L, vec = att.lin, att.vec
    w32 = lambda name, arr: g.weight(p + name, arr, F32)  # noqa: E731
    names = list(att.mix)
    outs = g.op("Rwkv7Mix6", x, dx, g.weight(f"blocks.{i}.ln1.weight", blk.ln1.weight),
                g.weight(f"blocks.{i}.ln1.bias", blk.ln1.bias), prev_att,
                g.weight(p + "x_mix6", np.stack([att.mix[m] for m in names])),
                domain=FUSED_DOMAIN, n_out=2 + len(names), eps=float(blk.ln1.eps))
    x, xa, xm = outs[0], outs[1], dict(zip(names, outs[2:]))
    if prefill:
        dx_att, S2, v_first = emit_time_mix_v7(g, att, xa, prev_att, S, v_first, cfg, i, True, xm=xm)
        if trim:
            x, dx_att = (g.op("Slice", t, g.const([-2]), g.const([2 ** 62]), g.const([0])) for t in (x, dx_att))
        return (*emit_channel_mix_v7_fused(g, blk, x, dx_att, prev_ffn, i, True), xa, S2, v_first)
    pr = v7_projections(g, att, xm, i, fuse=True)
    if i == 0:   # layer 0 has no value residual: vg, v_first and v0 are placeholders (attribute first=1)
        v_first, vg, v0 = pr["v"], pr["v"], w32("w0", vec["w0"])
    else:
        vg, v0 = pr["vg"], w32("v0", vec["v0"])
    y, S2 = g.op("Rwkv7WkvStep", pr["r"], pr["w"], pr["k"], pr["v"], pr["a"], vg, v_first, pr["g"], S,
                 w32("w0", vec["w0"]), w32("a0", vec["a0"]),
                 v0, w32("k_k", vec["k_k"]), w32("k_a", vec["k_a"]), w32("r_k", vec["r_k"]),
                 w32("ln_x.weight", att.ln_x.weight), w32("ln_x.bias", att.ln_x.bias),
                 domain=FUSED_DOMAIN, n_out=2, eps=float(att.ln_x.eps), first=int(i == 0))
    dx_att = matvec_product(g, L["output"], y) or linear(g, L["output"], y)
    x, dx, xf = emit_channel_mix_v7_fused(g, blk, x, dx_att, prev_ffn, i, False)
    return x, dx, xf, xa, S2, v_first


def emit_channel_mix_v7_fused(g: Graph, blk, x: str, dx: str, prev: str, i: int, prefill: bool):
    """x + dx, ln2 and the token shift in one Rwkv7Mix1, then the FFN. Returns x, the FFN's output, ln2(x)."""
    ffn, pf = blk.ffn, f"blocks.{i}.ffn."
    x, xf, xk = g.op("Rwkv7Mix1", x, dx, g.weight(f"blocks.{i}.ln2.weight", blk.ln2.weight),
                     g.weight(f"blocks.{i}.ln2.bias", blk.ln2.bias), prev, g.weight(pf + "x_k", ffn.mix["x_k"]),
                     domain=FUSED_DOMAIN, n_out=3, eps=float(blk.ln2.eps))
    if ffn.sparse is not None:
        if not prefill and sparse_ffn_fusable(g, ffn):
            return x, emit_sparse_ffn_fused(g, ffn, xk, pf), xf
        return x, emit_sparse_ffn(g, ffn, xk, pf, prefill), xf
    # the step: key, relu squared, value as one Rwkv7MatVecSet where both matrices can join
    y = None if prefill else matvec_product(g, (ffn.lin["key"], ffn.lin["value"]), xk, "relu2")
    return x, y or linear(g, ffn.lin["value"], g.op("ReluSquare", linear(g, ffn.lin["key"], xk), domain=FUSED_DOMAIN)), xf


# the fused sparse FFN and clustered head read int8 rows (with their scales) or float32 rows
FUSED_ROWS = ("int8", "dense")


def _rows(g: Graph, lin: ir.Linear, transposed: bool = False) -> tuple[str, str]:
    """(rows, scale) inputs of a fused op for a dense or int8 matrix W (out, in): the rows of W, or of Wᵀ
    (transposed), under the names the plain graph's row gathers use (stored once for both graphs); an int8
    matrix's per-output-channel scale, or an empty tensor for a float one."""
    w = lin.weight
    if w.kind == "int8":
        q = np.ascontiguousarray(w.q.T) if transposed else w.q
        rows = g.weight(lin.name + (".q8T_rows" if transposed else ".q8rows"), q, np.int8)
        return rows, g.weight(lin.name + ".q8scale", w.scale, F32)
    wt = np.ascontiguousarray(np.asarray(w.w).T) if transposed else w.w
    return g.weight(lin.name + (".wT_rows" if transposed else ".w"), wt, F32), g.const(np.zeros(0, np.float32), F32)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """(F, C) codes of up to `bits` bits -> (F, ceil(C bits / 8)) uint8, `bits` (1, 2, 4 or 8) a code,
    little-endian within each byte: the Rwkv7SparseFfn kernel's layout."""
    F, C = codes.shape
    per = 8 // bits
    c = np.zeros((F, -(-C // per) * per), np.uint8)
    c[:, :C] = codes
    c = c.reshape(F, -1, per)
    out = np.zeros(c.shape[:2], np.uint8)
    for j in range(per):
        out |= (c[..., j] << (bits * j)).astype(np.uint8)
    return out


def pack_codes16(codes: np.ndarray) -> np.ndarray:
    """(F, C) 1-bit codes -> (ceil(F / 16), ceil(C / 8), 16) uint8: pack_codes' bytes of 16 rows together,
    byte position by byte position (the rows padded to whole 16s with zeros): Rwkv7SparseFfnQ's layout,
    where one vector load holds 16 rows' codes of 8 channels."""
    b = pack_codes(codes, 1)
    F, rb = b.shape
    G = -(-F // 16)
    out = np.zeros((G * 16, rb), np.uint8)
    out[:F] = b
    return np.ascontiguousarray(out.reshape(G, 16, rb).transpose(0, 2, 1))


def mlp_predictor(g: Graph, sp: ir.SparseFFN, p: str, plain: bool):
    """The MLP predictor's inputs. plain: [fc1T (C, D), fc2T (D, F)] in the compute dtype (an int8 predictor
    dequantised by DequantizeLinear: the same values); else the fused kernel's, float32 fc1T and fc2T, or
    for an int8 predictor (fc1_scale / fc2_scale) [fc1T codes, fc1 scale, fc2T codes, fc2 scale]. Stored once
    for both graphs."""
    if sp.fc1_scale is None:
        dt = None if plain else F32
        return [g.weight(p + "mlp.fc1T", sp.fc1.T, dt), g.weight(p + "mlp.fc2T", sp.fc2.T, dt)]
    q1, q2 = sp.fc_codes()
    ins = [g.weight(p + "mlp.fc1T.q8", q1.T, np.int8), g.weight(p + "mlp.fc1.scale", sp.fc1_scale, F32),
           g.weight(p + "mlp.fc2T.q8", q2.T, np.int8), g.weight(p + "mlp.fc2.scale", sp.fc2_scale, F32)]
    if not plain:
        return ins
    return [to_compute(g, g.op("DequantizeLinear", q, s, axis=1)) for q, s in (ins[:2], ins[2:])]


def sparse_ffn_fusable(g: Graph, ffn: ir.ChannelMix) -> bool:
    K, Vl = ffn.lin["key"], ffn.lin["value"]
    return g.fused and not g.rescale and K.kind == Vl.kind and K.kind in FUSED_ROWS


def emit_sparse_ffn_fused(g: Graph, ffn: ir.ChannelMix, xk: str, p: str) -> str:
    """The step's sparse FFN as one Rwkv7SparseFfn node: the predictors, then only the fired units' rows of
    the key matrix and of the transposed value matrix, read from the mapped weights (no gathers, no index
    bookkeeping: ~20 ONNX Runtime kernels become one). The same units fire as in emit_sparse_ffn, and int8
    rows meet 8-bit activations made as its DynamicQuantizeLinear makes them (the TVM targets' numbers)."""
    sp, K, Vl = ffn.sparse, ffn.lin["key"], ffn.lin["value"]
    F = K.out_features
    v6 = sp.fc1 is None or sp.fc1_scale is not None   # op set 6's Rwkv7SparseFfnQ, else a float32 MLP (v2)
    if sp.fc1 is not None:
        pred = mlp_predictor(g, sp, p, plain=False)
    else:
        pred = [g.const(np.zeros(0, np.int8), np.int8), g.const(np.zeros(0, np.float32), F32)] * 2
    attrs = {"mlp_threshold": float(sp.mlp_threshold)} if sp.fc1 is not None else {}
    if sp.q_codes is not None:
        bits = next(b for b in (1, 2, 4, 8) if b >= sp.q_bits)
        if v6 and bits == 1:
            codes = g.weight(p + "key.q1bit16", pack_codes16(sp.q_codes), np.uint8)
        else:
            codes = g.weight(p + f"key.q{bits}bit", pack_codes(sp.q_codes, bits), np.uint8)
        attrs.update(q_scale=float(sp.q_scale), q_lo=int(math.floor(sp.q_quantile * (F - 1))), q_bits=bits)
    else:
        codes = g.const(np.zeros(0, np.uint8), np.uint8)
    kr, ks = _rows(g, K)
    vr, vs = _rows(g, Vl, transposed=True)
    op = ("Rwkv7SparseFfnQ" if v6 else "Rwkv7SparseFfn") + ("" if K.kind == "int8" else "F32")
    return g.op(op, f32(g, xk), *pred, codes, kr, ks, vr, vs, domain=FUSED_DOMAIN, **attrs)


# ----------------------------------------------------------------------------------------------
# RWKV-4, -5, -6. Shared conventions: every token-shift mix is x + (prev - x) * mix (the importers
# converted v4/v5's time_mix); the recurrences run in float32 whatever the compute dtype, with the
# state in float32 (the graph casts r, k, v, w in and the result out).

F32 = np.float32


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


MAA = ("w", "k", "v", "r", "g")


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


def code_storage_bits(bits: int) -> int:
    """Bits per code in code_matmul's packing: 4 for codes of up to 4 bits (ONNX Runtime's float32 MatMulNBits
    kernel is fast only for 4-bit weights: its 2-bit accuracy_level-0 path took ~0.13 ms for a 512x128
    predictor against ~5 us for 4-bit), 8 above."""
    return 4 if bits <= 4 else 8


def code_matmul(g: Graph, name: str, codes: np.ndarray, bits: int, scale: float, x: str) -> str:
    """x (T, C) float32 @ (scale * codes)ᵀ with codes (F, C) small unsigned integers, kept packed: one
    MatMulNBits with code_storage_bits(bits) per code, zero point 0, `scale` in every block. A 1-bit key
    copy costs C/2 bytes per row instead of 4C."""
    F, C = codes.shape
    nbits = code_storage_bits(bits)
    block = 16
    while block < min(C, 128):
        block *= 2
    nb, per = -(-C // block), 8 // nbits
    c = np.zeros((F, nb * block), np.uint8)
    c[:, :C] = codes
    packed = pack_codes(c, nbits).reshape(F, nb, block // per)
    return g.op("MatMulNBits", x, g.weight(name + "codes", packed, np.uint8),
                g.weight(name + "scales", np.full((F, nb), scale, np.float32), F32),
                g.weight(name + "zeros", np.zeros((F, -(-nb * nbits // 8)), np.uint8), np.uint8),
                # accuracy_level 0: float32 activations. Level 4 quantises x to int8, which moves est enough to
                # flip units across the quantile threshold (RWKV-Lite parity: 0.09 logit error vs 1e-6)
                domain="com.microsoft", K=int(C), N=int(F), bits=nbits, block_size=block, accuracy_level=0)


def sparse_ffn_mask(g: Graph, sp: ir.SparseFFN, xk: str, F: int, p: str) -> str:
    """Which hidden units each token uses: (T, F) bool = mlp predictor | quantised-key predictor."""
    masks = []
    if sp.fc1 is not None:
        fc1T, fc2T = mlp_predictor(g, sp, p, plain=True)
        h = g.op("Relu", g.op("Gemm", xk, fc1T))                                          # one FusedGemm in ORT
        # ONNX Runtime rewrites DequantizeLinear -> MatMul into an 8-bit MatMulNBits, of accuracy level 0
        # (float32 activations, the IR's numbers) under rwkvc's session options (runtimes.onnxruntime)
        logit = f32(g, g.op("MatMul", h, fc2T))
        masks.append(g.op("Greater", g.op("Sigmoid", logit), g.const(sp.mlp_threshold, F32)))
    if sp.q_codes is not None:
        # est = q_scale * (xk @ codes^T) + q_zero * sum(xk) > quantile(est, q) per row, with torch.quantile's
        # linear interpolation between the sorted values s[lo] <= thr <= s[lo + 1]. No est lies strictly
        # between two neighbours of the sorted order, so est > thr <=> est > s[lo] (up to thr rounding onto
        # s[lo + 1] when the two are an ulp apart), and s[lo] is the (F - lo)-th largest, found by a partial
        # TopK. The q_zero * sum(xk) term shifts every est of a token alike, so it cannot change the order and
        # is left out; the codes stay packed (code_matmul).
        est = code_matmul(g, p + "key.q", sp.q_codes, sp.q_bits, sp.q_scale, f32(g, xk))   # (T, F)
        lo = int(math.floor(sp.q_quantile * (F - 1)))
        top, _ = g.op("TopK", est, g.const([F - lo]), axis=-1, largest=1, sorted=1, n_out=2)   # (T, F - lo) desc
        masks.append(g.op("Greater", est, g.op("Gather", top, g.const([F - lo - 1]), axis=-1)))   # est > s[lo]
    return masks[0] if len(masks) == 1 else g.op("Or", masks[0], masks[1])


def emit_sparse_ffn(g: Graph, ffn: ir.ChannelMix, xk: str, p: str, prefill: bool = True) -> str:
    """The FFN computed only where the predictors say a unit fires.

        xk (T,C) ─┬─ predictors ─► mask (T,F) ──────────────┬─ any over T ─► NonZero ─► idx (n,)
                  │                                          └─ Gather(idx) ─► m (T,n)
                  └─ Gemm(xk, Gather(K, idx)ᵀ) ─► relu² ─► * m ─► MatMul(·, Gather(Vᵀ, idx)) ─► (T,C)

    Only the n used rows of K (F, C) and of Vᵀ (F, C) are read. In the step graph (T = 1, prefill False)
    the one token uses every unit of idx, so neither the any over T nor m is needed. Non-dense key/value
    fall back to the dense product times the mask (same result, no saving)."""
    sp, K, Vl = ffn.sparse, ffn.lin["key"], ffn.lin["value"]
    F = K.out_features
    mask = sparse_ffn_mask(g, sp, xk, F, p)
    if K.kind not in ROWS_MATMUL or Vl.kind not in COLS_MATMUL:
        maskf = g.op("Cast", mask, to=helper.np_dtype_to_tensor_dtype(g.dtype))          # (T, F)
        k = g.op("Relu", linear(g, K, xk))
        return linear(g, Vl, g.op("Mul", g.op("Mul", k, k), maskf))
    if prefill:
        used = g.op("ReduceMax", g.op("Cast", mask, to=TensorProto.INT32), g.const([0]), keepdims=0)   # (F,)
    else:
        used = g.op("Reshape", mask, g.const([-1]))                                       # (F,) bool
    idx = g.op("Reshape", g.op("NonZero", used), g.const([-1]))                           # (n,)
    k = g.op("Relu", ROWS_MATMUL[K.kind](g, K, xk, idx))                                  # (T, n)
    h = g.op("Mul", k, k)
    if prefill:
        maskf = g.op("Cast", mask, to=helper.np_dtype_to_tensor_dtype(g.dtype))          # (T, F)
        h = g.op("Mul", h, g.op("Gather", maskf, idx, axis=1))
    s = g.rescale.get(Vl.name, 1.0)
    if s != 1.0:
        h = g.op("Mul", h, g.const(1.0 / s))
    return COLS_MATMUL[Vl.kind](g, Vl, h, idx)                                            # (T, C)


def rows_matmul_dense(g: Graph, lin: ir.Linear, x: str, idx: str) -> str:
    """x (T, in) @ W[idx]ᵀ -> (T, n), reading only the rows idx of W (out, in)."""
    return g.op("Gemm", x, g.op("Gather", g.weight(lin.name + ".w", lin.weight.w), idx, axis=0), transB=1)


def cols_matmul_dense(g: Graph, lin: ir.Linear, h: str, idx: str) -> str:
    """h (T, n) @ W[:, idx]ᵀ -> (T, out), reading only the rows idx of Wᵀ (in, out)."""
    wt = g.weight(lin.name + ".wT_rows", np.ascontiguousarray(np.asarray(lin.weight.w).T))
    return g.op("MatMul", h, g.op("Gather", wt, idx, axis=0))


# weight kind -> the products with a subset of a matrix's rows / columns that sparse FFNs and clustered
# heads need, reading only that subset; compression passes add theirs next to their weight math
ROWS_MATMUL: dict[str, Callable] = {"dense": rows_matmul_dense}
COLS_MATMUL: dict[str, Callable] = {"dense": cols_matmul_dense}


# ----------------------------------------------------------------------------------------------
# The clustered (hierarchical) head

HEAD_BLOCK = 16   # rows per block of the clustered head's row gather (blocks never straddle two clusters)


def head_blocks(bounds: np.ndarray, B: int = HEAD_BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cluster c's rows bounds[c]:bounds[c+1] cut into ceil(|c| / B) blocks of B row slots; a cluster's last
    block is padded with copies of its last row. -> block_cluster (Nb,) int32, slot_row (Nb, B) int32 and
    slot_pad (Nb, B) float32: 0, or -inf for a padding slot (a copy must not count twice in a logsumexp)."""
    bounds = np.asarray(bounds, np.int64)
    sizes = np.diff(bounds)
    nblk = -(-sizes // B)
    block_cluster = np.repeat(np.arange(len(sizes)), nblk)                                # (Nb,)
    first = np.repeat(np.cumsum(nblk) - nblk, nblk)
    off = (np.arange(len(block_cluster)) - first)[:, None] * B + np.arange(B)             # (Nb, B) within cluster
    size = sizes[block_cluster][:, None]
    slot_row = bounds[block_cluster][:, None] + np.minimum(off, size - 1)
    slot_pad = np.where(off < size, 0.0, -np.inf)
    return block_cluster.astype(np.int32), slot_row.astype(np.int32), slot_pad.astype(np.float32)


def head_rows(ch) -> object:
    """A clustered head's rows as a weight representation (an imported head may hold a bare array)."""
    return ch.rows if hasattr(ch.rows, "kind") else ir.Dense(ch.rows)


def clustered_fusable(g: Graph, ch) -> bool:
    return g.fused and not g.rescale and head_rows(ch).kind in FUSED_ROWS and ch.n_clusters < 2 ** 16


def emit_clustered_fused(g: Graph, lin: ir.Linear, x: str) -> str:
    """The clustered head as one Rwkv7ClusteredHead node after the cluster head's product: the same clusters
    are chosen and the same logits made as in emit_clustered, the chosen clusters' rows read straight from
    the mapped weights (cluster by cluster: no block tables), every other token's logit written in token
    order from a (V,) uint16 cluster table."""
    ch = lin.weight
    V, C = ch.shape
    K = ch.n_clusters
    z = f32(g, g.op("Reshape", linear(g, ir.Linear(lin.name + ".cluster", ch.cluster), x), g.const([K])))
    rows = head_rows(ch)
    rr, rs = _rows(g, ir.Linear(lin.name + ".rows", rows))
    order = np.asarray(ch.order, np.int64)
    token_cluster = np.empty(V, np.uint16)
    token_cluster[order] = ch.row_cluster()
    if ch.log_prior is None:
        lq = g.const(np.zeros(0, np.float32), F32)
    else:
        q = np.empty(V, np.float32)
        q[order] = ch.row_log_prior()
        lq = g.weight(lin.name + ".token_log_prior", q, F32)
    ins = [f32(g, x), z, rr, rs, g.weight(lin.name + ".bounds", np.asarray(ch.bounds, np.int32), np.int32),
           g.weight(lin.name + ".row_token", order.astype(np.int32), np.int32),
           g.weight(lin.name + ".token_cluster16", token_cluster, np.uint16), lq]
    attrs = dict(domain=FUSED_DOMAIN, top_p=float(ch.top_p), min_k=int(min(ch.min_k, K)), max_k=int(min(ch.max_k, K)))
    op = "Rwkv7ClusteredHead" if rows.kind == "int8" else "Rwkv7ClusteredHeadF32"
    if not g.step:
        return g.op(op, *ins, **attrs)
    # the step also gives the top token, and writes no logits when its "head_mode" input is 1 (a greedy step)
    if ch.log_prior is None:
        mlq = g.const(np.zeros(0, np.float32), F32)
    else:
        prior = np.asarray(ch.row_log_prior(), np.float32)
        mlq = g.weight(lin.name + ".cluster_max_log_prior",
                       np.array([prior[a:b].max() if b > a else 0.0 for a, b in zip(ch.bounds[:-1], ch.bounds[1:])],
                                np.float32), F32)
    logits, g.top = g.op(op.replace("Head", "HeadTop"), *ins, mlq, HEAD_MODE, n_out=2, **attrs)
    return logits


def emit_clustered(g: Graph, lin: ir.Linear, x: str) -> str:
    """RWKV-Lite's hierarchical head for one token, x (C,) or (1, C) -> logits (V,) float32.

        x ─► cluster head ─► log p (K,) ─► TopK ─► mass before each rank < top_p ─► chosen (K,) bool
        chosen[block_cluster] ─► NonZero ─► chosen blocks (nb,) ─► their row slots (nb·B,), token ids
        Gemm(x, rows[slots]ᵀ) ─► exact logits of the chosen clusters' rows (padding slots repeat a row)
        approx (K,) = log p + logsumexp(exact) - log Σ_chosen p           (padding slots masked out)
        logits = approx[token_cluster] + log q      (V,) in token order, every token
        ScatterElements(exact at the slots' token ids) ─► logits

    Only the rows of the chosen clusters are read and multiplied. Per token the work over the whole
    vocabulary is one GatherElements from the (K,) table (ONNX Runtime's Gather is ~10x slower per
    element), an Add of log q and the copy inside ScatterElements; the rest is over K clusters,
    Nb ~ V / B + K blocks or the ~n_rows chosen rows. With rwkvc's fused kernels: emit_clustered_fused."""
    if clustered_fusable(g, lin.weight):
        return emit_clustered_fused(g, lin, x)
    ch = lin.weight
    V, C = ch.shape
    K = ch.n_clusters
    z = f32(g, g.op("Reshape", linear(g, ir.Linear(lin.name + ".cluster", ch.cluster), x), g.const([K])))
    logp = g.op("LogSoftmax", z, axis=0)                                                  # (K,)
    prob = g.op("Exp", logp)
    ps, ids = g.op("TopK", prob, g.const([K]), axis=0, largest=1, sorted=1, n_out=2)     # descending
    # the j-th most probable cluster is chosen iff the clusters before it hold < top_p (n = 1 + #{cumsum < top_p}
    # takes exactly those), forced for j < min_k, excluded for j >= max_k: one compare with a per-rank bound
    lo_n, hi_n = min(ch.min_k, K), min(ch.max_k, K)
    bound = np.where(np.arange(K) < lo_n, np.inf, np.where(np.arange(K) < hi_n, ch.top_p, -np.inf))
    before = g.op("CumSum", ps, g.const(0), exclusive=1)                                  # (K,) mass before rank j
    chosen = g.op("ScatterElements", g.const(np.zeros(K, bool), bool), ids, g.op("Less", before, g.const(bound, F32)),
                  axis=0)                                                                 # (K,) bool

    block_cluster, slot_row, slot_pad = head_blocks(ch.bounds)
    order = np.asarray(ch.order, np.int64)
    in_chosen = g.op("GatherElements", chosen, g.weight(lin.name + ".block_cluster", block_cluster, np.int32), axis=0)
    blocks = g.op("Reshape", g.op("NonZero", in_chosen), g.const([-1]))                  # (nb,)
    slots = g.op("Reshape", g.op("Gather", g.weight(lin.name + ".slot_row", slot_row, np.int32), blocks, axis=0),
                 g.const([-1]))                                                           # (nb·B,) row of each slot
    rows = head_rows(ch)
    exact = ROWS_MATMUL[rows.kind](g, ir.Linear(lin.name + ".rows", rows), g.op("Reshape", x, g.const([1, C])), slots)
    exact = f32(g, g.op("Reshape", exact, g.const([-1])))                                 # (nb·B,)
    pad = g.op("Reshape", g.op("Gather", g.weight(lin.name + ".slot_pad", slot_pad, F32), blocks, axis=0),
               g.const([-1]))
    lse = g.op("ReduceLogSumExp", g.op("Add", exact, pad), g.const([0]), keepdims=0)
    log_chosen = g.op("Log", g.op("ReduceSum", g.op("Where", chosen, prob, g.const(0.0, F32)), keepdims=0))
    approx = g.op("Add", logp, g.op("Sub", lse, log_chosen))                              # (K,)

    token_cluster = np.empty(V, np.int32)
    token_cluster[order] = ch.row_cluster()
    tc = g.weight(lin.name + ".token_cluster", token_cluster, np.int32)
    if ch.log_prior is None:                                                              # q_t = 1 / |c|
        log_count = g.const(np.log(np.maximum(np.diff(ch.bounds), 1)), F32)
        base = g.op("GatherElements", g.op("Sub", approx, log_count), tc, axis=0)         # (V,) token order
    else:
        lq = np.empty(V, np.float32)
        lq[order] = ch.row_log_prior()
        base = g.op("Add", g.op("GatherElements", approx, tc, axis=0),
                    g.weight(lin.name + ".token_log_prior", lq, F32))                    # + log q_t
    # a padding slot writes its row's logit again (ScatterElements keeps the later write; the same dot product)
    tokens = g.op("Reshape", g.op("Gather", g.weight(lin.name + ".slot_token", order[slot_row].astype(np.int32),
                                                     np.int32), blocks, axis=0), g.const([-1]))
    return g.op("ScatterElements", base, tokens, exact, axis=0)


LINEAR_EMITTERS["clustered"] = emit_clustered


TIME_MIX_EMITTERS = {"7": emit_time_mix_v7, "6": emit_time_mix_v6, "5.2": emit_time_mix_v5, "5.1": emit_time_mix_v5,
                     "5.0": emit_time_mix_v5, "4": emit_time_mix_v4}
CHANNEL_MIX_EMITTERS = {"7": emit_channel_mix_v7, "6": emit_channel_mix_rwkv, "5.2": emit_channel_mix_rwkv,
                        "5.1": emit_channel_mix_rwkv, "5.0": emit_channel_mix_rwkv, "4": emit_channel_mix_rwkv}


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


RESCALE_EVERY = 6                             # the official package's RESCALE_LAYER for fp16
RESCALE_VERSIONS = frozenset({"4", "5.0", "5.1", "5.2", "6", "7"})


def rescale_plan(cfg: ir.ModelConfig, dtype, every: int = RESCALE_EVERY) -> dict[str, float]:
    """fp16 layer rescaling: att.output and ffn.value of layer i divided by 2^(i // 6), and the residual
    halved after every 6th layer, so the residual stream stays within fp16's range. Every later use of the
    residual goes through a LayerNorm (scale-invariant), so the logits and the state do not change.
    every=0 turns it off."""
    if np.dtype(dtype) != np.float16 or cfg.version not in RESCALE_VERSIONS or not every:
        return {}
    plan = {}
    for i in range(cfg.n_layer):
        s = float(2 ** (i // every))
        if s != 1:
            plan[f"blocks.{i}.att.output"] = plan[f"blocks.{i}.ffn.value"] = s
    return plan


DENSE_EMBEDDING = "emb.folded"   # the dense table's initializer (runtimes/onnxruntime.py holds it in memory)


def embed_dense(g: Graph, model: ir.Model, tokens: str) -> str:
    """The embedding rows of `tokens`: a Gather from the folded table (ln0 applied), stored once."""
    if DENSE_EMBEDDING not in g.store.entries:
        g.store.add(DENSE_EMBEDDING, folded_embedding(model))
    g.inits[DENSE_EMBEDDING] = g.store.entries[DENSE_EMBEDDING]
    return g.op("Gather", DENSE_EMBEDDING, tokens, axis=0)


# embedding representation kind -> fn(g, model, tokens) -> x (T, C); passes add theirs (lazy-emb)
EMBEDDERS: dict[str, Callable[[Graph, ir.Model, str], str]] = {"dense": embed_dense}


# weight kind -> fn(weight, in a sparse FFN) -> whether its lowering quantises a product's input with one
# scale for all rows (DynamicQuantizeLinear): the rows of a prefill then depend on each other, so the last
# channel-mix keeps all T rows, to compute what every other target computes; passes register theirs
ROWS_COUPLED: dict[str, Callable[[object, bool], bool]] = {}


def rows_coupled(ffn: ir.ChannelMix) -> bool:
    sparse = ffn.sparse is not None

    def walk(w) -> bool:   # the weight, then the representations nested in it (factored, scaled...)
        f = ROWS_COUPLED.get(w.kind)
        return (f is not None and f(w, sparse)) or any(walk(v) for v in vars(w).values() if hasattr(v, "kind"))
    return any(walk(lin.weight) for lin in ffn.lin.values())


def build_graph(model: ir.Model, store: WeightStore, prefill: bool, rescale_every: int = RESCALE_EVERY,
                fused: bool = False) -> onnx.ModelProto:
    """The step (prefill=False) or prefill graph. fused: rwkvc's own kernels (FUSED_DOMAIN) for the step's
    element-wise work (emit_block_v7_fused) and the prefill's WKV, where fused_supported."""
    cfg = model.config
    L, C, H, N, V = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size, cfg.vocab_size
    g = Graph(store, store.dtype)
    g.rescale = rescale_plan(cfg, store.dtype, rescale_every)
    halve = bool(rescale_every) and store.dtype == np.float16 and cfg.version in RESCALE_VERSIONS
    x = EMBEDDERS[model.emb.weight.kind](g, model, "tokens")                         # (T, C)
    # shift (L, 2, C) -> 2L rows (1, C): [att of layer 0, ffn of layer 0, att of layer 1, ...]
    prev_rows = g.op("Split", g.op("Reshape", to_compute(g, "shift_in"), g.const([2 * L, C])), axis=0,
                     num_outputs=2 * L, n_out=2 * L)
    new_rows, new_wkv = [], []
    v_first = None
    g.fused = fused = fused and fused_supported(model, store.dtype)
    g.step = not prefill
    res = g.const(np.zeros((1, C)), F32) if fused else None   # the fused layers' pending residual
    last = (lambda t: g.op("Slice", t, g.const([-1]), g.const([2 ** 62]), g.const([0]))) if prefill else (lambda t: t)
    for i, blk in enumerate(model.blocks):
        prev_att, prev_ffn = prev_rows[2 * i], prev_rows[2 * i + 1]                  # (1, C)
        S = f"wkv_in.{i}"                                                             # one input per layer
        if fused:
            trim = prefill and i == L - 1 and not rows_coupled(blk.ffn)
            x, res, xf, xa, S2, v_first = emit_block_v7_fused(g, blk, x, res, prev_att, prev_ffn, S, v_first, cfg, i,
                                                              prefill, trim)
            new_rows += [last(xa), last(xf)]
            new_wkv.append(S2)
            continue

        xa = layer_norm(g, x, blk.ln1, f"blocks.{i}.ln1")
        dx, S2, v_first = TIME_MIX_EMITTERS[blk.att.version](g, blk.att, xa, prev_att, S, v_first, cfg, i, prefill)
        x = g.op("Add", x, dx)
        if prefill and i == L - 1 and not rows_coupled(blk.ffn):
            # a prefill returns the last token's logits only: the last channel-mix needs that token and the
            # one before it (its token shift), not all T (the widest product of the layer, done for 2 rows)
            x = g.op("Slice", x, g.const([-2]), g.const([2 ** 62]), g.const([0]))
        xf = layer_norm(g, x, blk.ln2, f"blocks.{i}.ln2")
        x = g.op("Add", x, CHANNEL_MIX_EMITTERS[blk.ffn.version](g, blk.ffn, xf, prev_ffn, i, prefill))
        if halve and (i + 1) % rescale_every == 0:
            x = g.op("Mul", x, g.const(0.5))

        new_rows += [last(xa), last(xf)]
        new_wkv.append(S2)

    if fused:
        x = g.op("Add", x, res)
    xl = g.op("Slice", x, g.const([-1]), g.const([2 ** 62]), g.const([0])) if prefill else x
    xl = layer_norm(g, xl, model.ln_out, "ln_out")
    # the head on x (C,): every head's ops keep x's rank, so its last node writes the (V,) logits output
    # itself (a Reshape to (V,) there would copy the logits into the caller's buffer, ~7 us at V = 65536)
    logits = linear(g, model.head, g.op("Reshape", xl, g.const([C])))
    if g.dtype == np.float32:
        g.rename(logits, "logits")                       # no copy of the V logits (a Cast to float32 is one)
    else:
        g.nodes.append(helper.make_node("Cast", [logits], ["logits"], to=TensorProto.FLOAT))
    g.nodes.append(helper.make_node("Reshape", [f32(g, g.op("Concat", *new_rows, axis=0)), g.const([L, 2, C])],
                                    ["shift_out"]))
    for i, S2 in enumerate(new_wkv):   # the node that makes layer i's new state writes wkv_out.i itself
        if S2 == f"wkv_in.{i}":
            g.nodes.append(helper.make_node("Identity", [S2], [f"wkv_out.{i}"]))
        else:
            g.rename(S2, f"wkv_out.{i}")

    f = TensorProto.FLOAT
    T = "T" if prefill else 1
    shp = cfg.state_shapes()
    layer_wkv = list(shp["wkv"][1:])
    inputs = [helper.make_tensor_value_info("tokens", TensorProto.INT64, [T]),
              helper.make_tensor_value_info("shift_in", f, list(shp["shift"]))]
    inputs += [helper.make_tensor_value_info(f"wkv_in.{i}", f, layer_wkv) for i in range(L)]
    outputs = [helper.make_tensor_value_info("logits", f, [V]),
               helper.make_tensor_value_info("shift_out", f, list(shp["shift"]))]
    outputs += [helper.make_tensor_value_info(f"wkv_out.{i}", f, layer_wkv) for i in range(L)]
    if g.top is not None:   # a head that gives its top token: head_mode 0 logits and top, 1 top only (logits (0,))
        g.rename(g.top, "top")
        inputs.append(helper.make_tensor_value_info(HEAD_MODE, TensorProto.INT64, [1]))
        outputs[0] = helper.make_tensor_value_info("logits", f, ["n_logits"])
        outputs.append(helper.make_tensor_value_info("top", TensorProto.INT64, [1]))
    graph = g.make("rwkv_prefill" if prefill else "rwkv_step", inputs, outputs)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
    if fused:
        opsets.append(helper.make_opsetid(FUSED_DOMAIN, 1))
    m = helper.make_model(graph, opset_imports=opsets, producer_name="rwkvc")
    m.ir_version = 9
    return m


FP16_VERSIONS = RESCALE_VERSIONS


def emit(model: ir.Model, out_dir: str, dtype=np.float32, progress=None,
         rescale_every: int = RESCALE_EVERY, fused: bool = False) -> dict[str, str]:
    """Write step.onnx, prefill.onnx and weights.bin into out_dir. Returns {entry point: file name}.

    dtype float16: weights and activations in fp16 (the recurrences, their state, the group norms and the
    decays in float32, through Cast nodes; the graphs' inputs and outputs stay float32), with the layer
    rescaling of `rescale_plan` (rescale_every=0: none)."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float16):
        raise ValueError(f"emit: compute dtype must be float32 or float16, got {dtype}")
    if dtype == np.float16 and model.config.version not in FP16_VERSIONS:
        raise ValueError(f"float16 lowering of RWKV-v{model.config.version} is not implemented; use float32")
    store = WeightStore(os.path.join(out_dir, "weights.bin"), dtype)
    try:
        files = {}
        for entry, prefill in (("step", False), ("prefill", True)):
            m = build_graph(model, store, prefill, rescale_every, fused)
            fn = f"{entry}.onnx"
            with open(os.path.join(out_dir, fn), "wb") as f:
                f.write(m.SerializeToString())
            files[entry] = fn
            if progress:
                progress(entry)
    finally:
        store.close()
    return files
