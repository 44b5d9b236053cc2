"""What a runtime needs of an ONNX file's graph, read from the protobuf wire format directly: its initializers'
names, types, shapes and external-data locations, and its nodes' op types, domains, inputs and outputs.

The onnx package reads the same with onnx.load, but importing it (its C++ extension, ml_dtypes, its Python
modules) costs a process ~19 MB of resident memory that a runtime never gives back: 2.5 % of a 1.5B int4
model's weights, an eighth of what the goal of 1.15 x the weights leaves for everything that is not weights.
The compiler keeps using onnx; a process that only runs an artifact reads its graphs with this. Field numbers
are onnx.proto3's (ModelProto.graph 7; GraphProto.node 1, initializer 5; NodeProto input 1, output 2, op_type 4,
domain 7; TensorProto dims 1, data_type 2, name 8, external_data 13, data_location 14; StringStringEntryProto
key 1, value 2); tests/test_onnx_index.py holds the result against onnx.load's on the artifacts' graphs."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import RwkvcError

EXTERNAL = 1   # TensorProto.DataLocation.EXTERNAL

# TensorProto.DataType -> numpy (the types an artifact's initializers have)
DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
          9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}


@dataclass(slots=True)
class Entry:
    key: str
    value: str


@dataclass(slots=True)
class Initializer:
    name: str = ""
    dims: list[int] = field(default_factory=list)
    data_type: int = 0
    data_location: int = 0
    external_data: list[Entry] = field(default_factory=list)

    @property
    def dtype(self) -> np.dtype:
        if self.data_type not in DTYPES:
            raise RwkvcError(f"the initializer {self.name} has ONNX data type {self.data_type}, which the runtime "
                             "does not read; recompile the artifact")
        return np.dtype(DTYPES[self.data_type])

    def external(self) -> dict[str, str]:
        return {e.key: e.value for e in self.external_data}


@dataclass(slots=True)
class Node:
    op_type: str = ""
    domain: str = ""
    input: list[str] = field(default_factory=list)
    output: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Graph:
    node: list[Node]
    initializer: list[Initializer]


def _varint(b: memoryview, i: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        c = b[i]
        i += 1
        v |= (c & 0x7F) << shift
        if c < 0x80:
            return v, i
        shift += 7


def _fields(b: memoryview):
    """(field number, wire type, value: an int, or the memoryview of a length-delimited field) of a message."""
    i, n = 0, len(b)
    while i < n:
        key, i = _varint(b, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(b, i)
        elif wt == 2:
            ln, i = _varint(b, i)
            v, i = b[i:i + ln], i + ln
            if i > n:
                raise ValueError("a field runs past the end of its message")
        elif wt == 1:
            v, i = b[i:i + 8], i + 8
        elif wt == 5:
            v, i = b[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wt}")
        yield num, wt, v


def _str(v) -> str:
    return bytes(v).decode("utf-8")


def _tensor(b) -> Initializer:
    t = Initializer()
    for num, wt, v in _fields(b):
        if num == 1:
            if wt == 2:      # packed dims
                j = 0
                while j < len(v):
                    d, j = _varint(v, j)
                    t.dims.append(d)
            else:
                t.dims.append(v)
        elif num == 2:
            t.data_type = v
        elif num == 8:
            t.name = _str(v)
        elif num == 14:
            t.data_location = v
        elif num == 13:
            e = Entry("", "")
            for n2, _, v2 in _fields(v):
                if n2 == 1:
                    e.key = _str(v2)
                elif n2 == 2:
                    e.value = _str(v2)
            t.external_data.append(e)
    return t


def _node(b) -> Node:
    nd = Node()
    for num, _, v in _fields(b):
        if num == 1:
            nd.input.append(_str(v))
        elif num == 2:
            nd.output.append(_str(v))
        elif num == 4:
            nd.op_type = _str(v)
        elif num == 7:
            nd.domain = _str(v)
    return nd


def read_graph(path: str | Path) -> Graph:
    """The main graph of the ONNX model file at `path` (its weights external: read into memory whole)."""
    p = Path(path)
    try:
        data = memoryview(p.read_bytes())
    except OSError as e:
        raise RwkvcError(f"{p}: cannot read the graph ({e.strerror}); recompile the artifact") from None
    nodes, inits = [], []
    try:
        for num, _, v in _fields(data):
            if num == 7:
                for n2, _, v2 in _fields(v):
                    if n2 == 1:
                        nodes.append(_node(v2))
                    elif n2 == 5:
                        inits.append(_tensor(v2))
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise RwkvcError(f"{p}: not a readable ONNX graph ({e}); recompile the artifact") from None
    return Graph(nodes, inits)
