"""The ONNX graph builder: the external weight file (WeightStore) and a small graph (Graph) whose `op`
returns the output name; the dtype helpers every lowering module shares."""
from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rwkvc import ir
from rwkvc.abi import ALIGN, FUSED_DOMAIN, HEAD_MODE

from .policy import LoweringPolicy

OPSET = 18
F32 = np.float32


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
        src = arr() if callable(arr) else arr
        dt = np.dtype(dtype or self.dtype)
        # a LazyArray (rwkvc.mapped: a checkpoint's or a compile's scratch matrix) is written a block of rows at a
        # time, never held whole; anything else as one contiguous array, without a bytes copy
        blocks = src.row_blocks() if hasattr(src, "row_blocks") else None
        a = src if blocks is not None else np.ascontiguousarray(src, dtype=dt)
        size = int(np.prod(a.shape, dtype=np.int64)) * dt.itemsize
        pad = (-self.f.tell()) % ALIGN if size >= ALIGN else (-self.f.tell()) % 64
        self.f.write(b"\0" * pad)
        offset = self.f.tell()
        for part in (blocks if blocks is not None else [a]):
            part = np.ascontiguousarray(part, dtype=dt)
            self.f.write(memoryview(part.reshape(-1)).cast("B") if part.size else b"")
        if self.f.tell() != offset + size:
            raise RuntimeError(f"{name}: wrote {self.f.tell() - offset} bytes, expected {size}")
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(dt), dims=list(a.shape))
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.location), ("offset", str(offset)), ("length", str(size))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.entries[name] = t
        self.nbytes += size
        return t

    def close(self):
        self.f.close()


class Graph:
    """A small ONNX graph builder: `g.op("MatMul", a, b)` returns the output name."""

    def __init__(self, store: WeightStore, dtype=np.float32, policy: LoweringPolicy | None = None):
        self.store, self.dtype = store, np.dtype(dtype)
        self.policy = policy if policy is not None else LoweringPolicy()   # the lowering's choices
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, TensorProto] = {}
        self.n = 0
        self.rescale: dict[str, float] = {}   # Linear name -> divisor of its output (the fp16 layer rescale)
        self.prefix = ""                      # subgraphs name their values apart (ONNX wants one SSA scope)
        self.fused = False                    # rwkvc's own kernels (FUSED_DOMAIN) are used (policy.fused, where
                                              # the model is one they cover)
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
        sub = Graph(self.store, self.dtype if dtype is None else dtype, self.policy)
        sub.prefix = self.fresh("body") + "/"
        return sub

    def make(self, name, inputs, outputs) -> onnx.GraphProto:
        return helper.make_graph(self.nodes, name, inputs, outputs, initializer=list(self.inits.values()))


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


def finish_model(g: Graph, name: str, inputs: list, outputs: list, f, fused: bool) -> onnx.ModelProto:
    """The step/prefill graph's model: with a head that gives its top token, head_mode in and top out
    (head_mode 0 logits and top, 1 top only: logits (0,)); rwkvc's kernel domain when `fused`."""
    if g.top is not None:
        g.rename(g.top, "top")
        inputs.append(helper.make_tensor_value_info(HEAD_MODE, TensorProto.INT64, [1]))
        outputs[0] = helper.make_tensor_value_info("logits", f, ["n_logits"])
        outputs.append(helper.make_tensor_value_info("top", TensorProto.INT64, [1]))
    graph = g.make(name, inputs, outputs)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
    if fused:
        opsets.append(helper.make_opsetid(FUSED_DOMAIN, 1))
    m = helper.make_model(graph, opset_imports=opsets, producer_name="rwkvc")
    m.ir_version = 9
    return m
