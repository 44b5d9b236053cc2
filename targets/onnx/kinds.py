"""The ONNX lowering of every weight kind, as closed tables (rwkvc.weights.WEIGHT_KINDS -> lowering):

    LINEAR        kind -> emitter(g, lin, x) -> y, x (..., in), y (..., out)   (`linear` dispatches)
    RESCALERS     kind -> fn(weight, s) -> the representation of W / s (exactly), for the fp16 layer rescale;
                  kinds without one are rescaled through their input instead (x / s), exact for any linear map
    ROWS_MATMUL   kind -> fn(g, lin, x, idx): x @ W[idx]ᵀ reading only rows idx (sparse FFN, clustered head)
    COLS_MATMUL   kind -> fn(g, lin, h, idx): h @ W[:, idx]ᵀ reading only rows idx of Wᵀ (sparse FFN)
    NBITS         kind -> (spec(weight) -> (bits, block) or None, inputs(g, lin), layout16(g, weight),
                  inputs16(g, lin)): the matrices stored in MatMulNBits' layout (inputs) or op set 7's
                  interleaved one (inputs16, where layout16 says so), which rwkvc's matrix-vector kernels read
    ROWS_COUPLED  kind -> fn(weight, in a sparse FFN) -> whether its lowering quantises a product's input with
                  one scale for all rows (DynamicQuantizeLinear): the rows of a prefill then depend on each
                  other, so the last channel-mix keeps all T rows, to compute what every other target computes
    EMBEDDERS     embedding kind -> fn(g, model, tokens) -> x (T, C)
    DEEP_TABLES   RWKV-7a DeepEmbed table kind -> fn(g, table, layer, tokens) -> rows (T, D*D)  (deepembed.py)

LOWERED is every kind the tables lower: the cpu and cuda targets' capabilities.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from rwkvc import ir

from . import quant
from .deepembed import DEEP_TABLES
from .embedding import embed_dense, embed_lazy
from .graph import Graph
from .head import emit_clustered


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


def emit_factored(g: Graph, lin: ir.Linear, x: str) -> str:
    f = lin.weight
    h = linear(g, ir.Linear(lin.name + ".a", f.a), x)
    if f.act in ("relu", "relu2"):
        h = g.op("Relu", h)
        if f.act == "relu2":
            h = g.op("Mul", h, h)
    y = linear(g, ir.Linear(lin.name + ".b", f.b), h)
    if f.diag is not None:
        y = g.op("Add", y, g.op("Mul", x, g.weight(lin.name + ".diag", f.diag)))
    return y


def emit_scaled(g: Graph, lin: ir.Linear, x: str) -> str:
    xs = g.op("Mul", x, g.weight(lin.name + ".in_scale", lin.weight.in_scale))
    return linear(g, ir.Linear(lin.name + ".q", lin.weight.inner), xs)


def rows_matmul_dense(g: Graph, lin: ir.Linear, x: str, idx: str) -> str:
    """x (T, in) @ W[idx]ᵀ -> (T, n), reading only the rows idx of W (out, in)."""
    return g.op("Gemm", x, g.op("Gather", g.weight(lin.name + ".w", lin.weight.w), idx, axis=0), transB=1)


def cols_matmul_dense(g: Graph, lin: ir.Linear, h: str, idx: str) -> str:
    """h (T, n) @ W[:, idx]ᵀ -> (T, out), reading only the rows idx of Wᵀ (in, out)."""
    wt = g.weight(lin.name + ".wT_rows", np.ascontiguousarray(np.asarray(lin.weight.w).T))
    return g.op("MatMul", h, g.op("Gather", wt, idx, axis=0))


LINEAR: dict[str, Callable[[Graph, ir.Linear, str], str]] = {
    "dense": emit_dense, "lowrank": emit_lowrank, "int8": quant.emit_int8, "int4": quant.emit_int4,
    "factored": emit_factored, "scaled": emit_scaled, "clustered": emit_clustered}

RESCALERS: dict[str, Callable[[object, float], object]] = {
    "dense": lambda w, s: ir.Dense(np.asarray(w.w, np.float32) / s),
    "lowrank": lambda w, s: ir.LowRank(w.a, np.asarray(w.b, np.float32) / s, w.act,
                                       None if w.diag is None else np.asarray(w.diag, np.float32) / s),
}

ROWS_MATMUL: dict[str, Callable] = {"dense": rows_matmul_dense, "int8": quant.rows_matmul_int8}
COLS_MATMUL: dict[str, Callable] = {"dense": cols_matmul_dense, "int8": quant.cols_matmul_int8}

# int8 joins a set only interleaved (quant.matvec_fusable: 8-bit products need policy.matvec_i16)
NBITS: dict[str, tuple] = {
    "int4": (quant.int4_spec, quant.int4_inputs, quant.int4_layout16, quant.int4_inputs16),
    "int8": (quant.int8_spec, None, quant.int8_layout16, quant.int8_inputs16),
}

# int8 at level 0 and the gathered-row products (sparse FFN, clustered head) quantise x per tensor
ROWS_COUPLED: dict[str, Callable[[object, bool], bool]] = {
    "int8": lambda w, in_sparse_ffn: in_sparse_ffn or w.accuracy_level == 0,
}

EMBEDDERS: dict[str, Callable[[Graph, ir.Model, str], str]] = {"dense": embed_dense, "lazy": embed_lazy}

LOWERED = frozenset(LINEAR) | frozenset(EMBEDDERS) | frozenset(DEEP_TABLES)


def linear(g: Graph, lin: ir.Linear, x: str) -> str:
    """y = W x for the Linear `lin`, whatever its kind, with the graph's fp16 rescale of its output."""
    s = g.rescale.get(lin.name)
    if s is not None and s != 1:
        if lin.kind in RESCALERS:
            lin = ir.Linear(lin.name, RESCALERS[lin.kind](lin.weight, s))
        else:
            x = g.op("Mul", x, g.const(1.0 / s))
    return LINEAR[lin.kind](g, lin, x)


def rows_coupled(ffn: ir.ChannelMix) -> bool:
    """Whether a channel-mix's lowering makes the rows of a prefill depend on each other (ROWS_COUPLED)."""
    sparse = ffn.sparse is not None

    def walk(w) -> bool:   # the weight, then the representations nested in it (factored, scaled...)
        f = ROWS_COUPLED.get(w.kind)
        return (f is not None and f(w, sparse)) or any(walk(v) for v in vars(w).values() if hasattr(v, "kind"))
    return any(walk(lin.weight) for lin in ffn.lin.values())
