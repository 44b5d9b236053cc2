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

Matrices are lowered through `LINEAR_LOWERINGS` (IR weight kind -> its packed layout + its kernel),
the extension point for int8/int4: a quantised kind adds its packing (e.g. int4 panels + scales) and a
kernel that dequantises inside the GEMV loop, and the targets pick it up through their capabilities.
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


def dense_kernel(K: int, NB: int, P: int, rows: int, decode: bool, wdtype: str = F32):
    """y (T, NB*P) = x (T, K) @ unpacked(wp (NB, K, P)).T; T = 1 for decode, symbolic for prefill.

    Schedule: panels in parallel; per panel a (rows x P) register tile accumulates over k, each k one
    vector load of the panel row and `rows` broadcasts of x; T is padded up to a multiple of `rows`
    inside the kernel (zero rows) so the tile has a static shape and stays in registers.
    """
    T = 1 if decode else tirx.Var("T", "int64")
    rows = 1 if decode else rows
    x = te.placeholder((T, K), F32, name="x")
    wp = te.placeholder((NB, K, P), wdtype, name="wp")
    k = te.reduce_axis((0, K), name="k")
    wv = (lambda *i: wp[i]) if wdtype == F32 else (lambda *i: wp[i].astype(F32))  # fp16 panels widen in registers
    if decode:
        acc = te.compute((T, NB * P), lambda t, o: te.sum(x[t, k] * wv(o // P, k, o % P), axis=k), name="acc")
    else:
        Tp = (T + rows - 1) // rows * rows
        xp = te.compute((Tp, K), lambda t, kk: tirx.if_then_else(
            t < T, x[tirx.min(t, T - 1), kk], tirx.const(0, F32)), name="xpad")
        acc = te.compute((Tp, NB * P), lambda t, o: te.sum(xp[t, k] * wv(o // P, k, o % P), axis=k), name="acc")
    y = te.compute((T, NB * P), lambda t, o: acc[t, o], name="y")
    sch = s_tir.Schedule(te.create_prim_func([x, wp, y]))
    if not decode:
        sch.compute_inline(sch.get_sblock("xpad"))
    by, ba = sch.get_sblock("y"), sch.get_sblock("acc")
    t, o = sch.get_loops(by)
    oo, oi = sch.split(o, [None, P])
    to, ti = sch.split(t, [None, rows])
    sch.reorder(oo, to, ti, oi)
    sch.set_scope(ba, 0, "local")
    sch.compute_at(ba, to)
    inner = sch.get_loops(ba)[2:]          # under (oo, to): [t,] o, k (a unit t loop may be elided)
    ao, ak = inner[-2:]
    sch.reorder(ak, *inner[:-1])
    sch.parallel(oo)
    if len(inner) == 3:
        sch.unroll(inner[0])
    sch.vectorize(ao)
    sch.vectorize(oi)
    init = sch.decompose_reduction(ba, ak)
    sch.vectorize(sch.get_loops(init)[-1])
    return _finish(sch.mod["main"], f"dense_{'t1' if decode else 'tn'}_k{K}_n{NB * P}{'' if wdtype == F32 else '_' + wdtype}")


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


# ----------------------------------------------------------------------------------------------
# Emission context


class Ctx:
    """One BlockBuilder, the kernel cache, and the arguments of the function being built."""

    def __init__(self, bb, ks: KernelShape, cfg: ir.ModelConfig):
        self.bb, self.ks, self.cfg = bb, ks, cfg
        self.kernels: dict[tuple, object] = {}
        self.W: dict[str, object] = {}     # relative parameter name -> relax expr, for the current function

    def emit(self, expr):
        return self.bb.emit(expr)

    def kernel(self, key: tuple, make: Callable):
        if key not in self.kernels:
            func = make()
            self.kernels[key] = self.bb.add_func(func, func.attrs["global_symbol"])
        return self.kernels[key]

    def rows_of(self, x):
        return x.ty.shape[0]

    def dense(self, x, wp, out: int):
        """x (T, K) @ packed wp (NB, K, P) -> (T, out)."""
        K = int(x.ty.shape[1])
        NB, K2, P = (int(d) for d in wp.ty.shape)
        assert K == K2, (K, K2)
        T = self.rows_of(x)
        decode = isinstance(T, tirx.IntImm) and int(T) == 1
        wd = str(wp.ty.dtype)
        gv = self.kernel(("dense", K, NB, P, decode, wd), lambda: dense_kernel(K, NB, P, self.ks.rows, decode, wd))
        y = self.emit(relax.call_tir(gv, [x, wp], relax.TensorType([T, NB * P], F32)))
        if NB * P != out:
            y = self.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[out]))
        return y

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


def _lowrank_emit(ctx: Ctx, rel: str, lin: ir.Linear, x):
    lr = lin.weight
    h = ctx.dense(x, ctx.W[rel + ".ap"], lr.rank)                          # (T, rank)
    if lr.act in ("relu", "relu2"):
        h = ctx.emit(relax.op.nn.relu(h))
        if lr.act == "relu2":
            h = ctx.emit(relax.op.multiply(h, h))
    y = ctx.dense(h, ctx.W[rel + ".bp"], lr.b.shape[0])                    # (T, out)
    if lr.diag is not None:
        y = ctx.emit(relax.op.add(y, relax.op.multiply(x, ctx.W[rel + ".diag"])))
    return y


# int8 / int4 (the passes issue) plug in here: params() packs the codes into panels with their
# scales, emit() calls a GEMV/GEMM kernel that dequantises each panel row inside the k loop.
LINEAR_LOWERINGS: dict[str, LinearLowering] = {
    "dense": LinearLowering(_dense_params, _dense_emit),
    "lowrank": LinearLowering(_lowrank_params, _lowrank_emit),
}


def linear(ctx: Ctx, rel: str, lin: ir.Linear, x):
    return LINEAR_LOWERINGS[lin.kind].emit(ctx, rel, lin, x)


# ----------------------------------------------------------------------------------------------
# Parameters of the model, in order


def collect_params(model: ir.Model, ks: KernelShape) -> Params:
    from rwkvc.emit_onnx import folded_embedding
    P = Params()
    P.add("emb.folded", folded_embedding(model), ks.weights)              # (V, C), ln0 folded in
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
    lowering packs them (ks.weights)."""
    f32 = lambda n, a: (n, np.asarray(a, np.float32))  # noqa: E731
    out = [f32("ln1.weight", blk.ln1.weight), f32("ln1.bias", blk.ln1.bias)]
    out += [f32(f"att.{m}", v) for m, v in blk.att.mix.items()]
    out += [f32(f"att.{m}", v) for m, v in blk.att.vec.items()]
    for m, lin in blk.att.lin.items():
        out += [(f"att.{m}.{s}", a) for s, a in LINEAR_LOWERINGS[lin.kind].params(lin, ks).items()]
    out += [f32("att.ln_x.weight", blk.att.ln_x.weight), f32("att.ln_x.bias", blk.att.ln_x.bias)]
    out += [f32("ln2.weight", blk.ln2.weight), f32("ln2.bias", blk.ln2.bias)]
    out += [f32(f"ffn.{m}", v) for m, v in blk.ffn.mix.items()]
    for m, lin in blk.ffn.lin.items():
        out += [(f"ffn.{m}.{s}", a) for s, a in LINEAR_LOWERINGS[lin.kind].params(lin, ks).items()]
    return out


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
    k = em(op.nn.relu(linear(ctx, "ffn.key", ffn.lin["key"], xk)))
    return linear(ctx, "ffn.value", ffn.lin["value"], em(op.multiply(k, k)))


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
    ks = ctx.ks

    # one Relax function per distinct layer signature (weight shapes + first/other)
    block_fns: dict[tuple, object] = {}
    per_layer = []
    for i, blk in enumerate(model.blocks):
        arrays = P.group(f"blocks.{i}.")
        sig = (i == 0, tuple((rel, a.shape) for rel, a in arrays))
        if sig not in block_fns:
            nm = f"{'prefill' if prefill else 'step'}_block{'_first' if i == 0 else ''}_{len(block_fns)}"
            block_fns[sig] = emit_block(ctx, blk, arrays, i == 0, prefill, nm)
        per_layer.append((block_fns[sig], [P.index(f"blocks.{i}.{rel}") for rel, _ in arrays]))

    bb, op = ctx.bb, relax.op
    name = "prefill" if prefill else "step"
    with bb.function(name, [tokens, shift, wkv, params]):
        ctx.W = {}
        with bb.dataflow():
            get = lambda n: ctx.emit(relax.TupleGetItem(params, P.index(n)))  # noqa: E731
            x = ctx.emit(op.take(get("emb.folded"), tokens, axis=0, mode="clip"))                       # (T, C)
            if ks.weights != F32:
                x = ctx.emit(op.astype(x, F32))
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
    """What the kinds check of targets.base.unsupported cannot see: parts of the IR this lowering has
    no kernel for are refused here, before any work, rather than silently dropped."""
    if model.emb.weight.kind != "dense":
        raise RwkvcError(f"the TVM targets need a dense embedding, not {model.emb.weight.kind}")
    for i, blk in enumerate(model.blocks):
        if getattr(blk.ffn, "sparse", None) is not None:
            raise RwkvcError(f"the TVM targets have no kernel for the sparse FFN predictors (blocks.{i}.ffn.sparse); "
                             "drop the sparse_ffn pass or use --target cpu")


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
