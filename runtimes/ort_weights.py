"""What the ONNX Runtime runtime reads of an artifact's graphs at load, and the weights its sessions share.

    index_graphs(path, entry_points)   one pass over each graph in turn -> GraphIndex: every external
                                       initializer once (Weight), the tables read only by rows, the entry
                                       points whose states may be updated in place (wkv_in_place)
    dense_embedding(path, index)       the tables the runtime holds in memory (the dense embedding)
    shared_weights(path, index, skip)  every other weight over ONE read-only mapping of the weight file
    prepack_fits(index, held)          whether ONNX Runtime's pre-packed copies of the float matrices fit

A graph is parsed (rwkvc.onnx_index, ~30-70 ms and a few MB of Python objects for a 1.5B's) and dropped before
the next is read; what is kept is a Weight a name. So one graph's objects exist at a time (the batched
prefill's ~4,400 nodes, ~5 MB) instead of all four graphs' (~10 MB), and no parsed initializer outlives the
load.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rwkvc.abi import resident, row_read, token_read
from rwkvc.errors import RwkvcError

# entry point -> rwkvc's ops whose state output may be their state input (wkv_in_place)
WKV_WRITERS = {"step": ("Rwkv7WkvStep",), "prefill": ("Rwkv7WkvPrefill", "Rwkv7WkvSeq"),
               "batch_step": ("Rwkv7WkvStepB",)}


def wkv_in_place(g, op_types: tuple) -> bool:
    """Whether every wkv_out.i of a graph (rwkvc.onnx_index.Graph) is written by one of rwkvc's `op_types` from
    wkv_in.i, which nothing else reads: then the graph may update the states in place (input and output bound
    to one buffer). Rwkv7WkvStep and Rwkv7WkvStepB read each state row before writing it; Rwkv7WkvPrefill and
    Rwkv7WkvSeq read a head's state whole before they write the head."""
    from rwkvc.abi import FUSED_DOMAIN
    writers = {o: n for n in g.node for o in n.output}
    readers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    n_layer = sum(o.startswith("wkv_out.") for o in writers)
    return n_layer > 0 and all(
        (n := writers.get(f"wkv_out.{i}")) is not None and n.domain == FUSED_DOMAIN and n.op_type in op_types
        and f"wkv_in.{i}" in n.input and readers.get(f"wkv_in.{i}") == 1 for i in range(n_layer))


@dataclass(slots=True)
class Weight:
    """An external initializer: where its bytes are in the artifact."""
    name: str
    dtype: np.dtype
    dims: tuple
    location: str
    offset: int
    length: int      # as the graph states it (0: not stated)


@dataclass
class GraphIndex:
    weights: dict[str, Weight] = field(default_factory=dict)   # every graph's external initializers, once
    rows: set[str] = field(default_factory=set)       # names read only by rows in every graph that reads them
    by_token: set[str] = field(default_factory=set)   # names some graph gathers by its tokens (the embedding)
    step_resident: list[str] = field(default_factory=list)    # the step's tables to hold (rwkvc.abi.resident)
    wkv_in_place: dict[str, bool] = field(default_factory=dict)


def index_graphs(path: Path, entry_points: dict) -> GraphIndex:
    """GraphIndex of the artifact's ONNX graphs, each parsed and dropped in turn (the module's docstring)."""
    from rwkvc.onnx_index import EXTERNAL, read_graph
    idx = GraphIndex()
    whole: set[str] = set()   # read whole by some graph (a sparse FFN's rows are one dense product in the prefill)
    for entry, fn in entry_points.items():
        if not str(fn).endswith(".onnx"):
            continue
        g = read_graph(path / fn)
        if entry in WKV_WRITERS:
            idx.wkv_in_place[entry] = wkv_in_place(g, WKV_WRITERS[entry])
        rows = row_read(g)
        idx.rows |= rows
        idx.by_token |= token_read(g)
        whole |= {t.name for t in g.initializer} - rows
        for t in g.initializer:
            if t.data_location != EXTERNAL:
                continue
            if entry == "step" and resident(t.name):
                idx.step_resident.append(t.name)
            if t.name not in idx.weights:
                ext = t.external()
                idx.weights[t.name] = Weight(t.name, t.dtype, tuple(t.dims), ext["location"],
                                             int(ext.get("offset", 0)), int(ext.get("length", 0)))
        del g
    idx.rows -= whole
    return idx


def dense_embedding(path: Path, idx: GraphIndex) -> dict[str, np.ndarray]:
    """{name: array} of the tables the runtime holds in memory (rwkvc.abi.resident: the dense embedding, RWKV-7a's
    dense DeepEmbed tables) of the step graph, read into memory from the artifact at `path`."""
    from rwkvc.artifact import inside
    held = {}
    for name in idx.step_resident:
        w = idx.weights[name]
        count = int(np.prod(w.dims))
        arr = np.fromfile(inside(path, w.location, "a weight file"), dtype=w.dtype, count=count, offset=w.offset)
        if arr.size != count:
            raise RwkvcError(f"{path / w.location}: truncated (the table {name} ends past the end of the file); "
                             "recompile the artifact")
        held[name] = arr.reshape(w.dims)
    return held


def shared_weights(path: Path, idx: GraphIndex, skip) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """{name: array} over ONE read-only mapping of the weight file, for every external initializer of the
    artifact's graphs (except `skip`), and the arrays among them that every graph reads only by rows (the lazy
    embedding table, a sparse FFN's or a clustered head's rows). Given to every session
    (SessionOptions.add_initializer), they read the same pages: each session mapping the file by itself would
    count every page it touches twice in the process's resident set (the step's and the prefill's copies of one
    page-cache page)."""
    from rwkvc.artifact import inside
    from rwkvc.mapped import advise_random, drop_cached
    maps: dict[str, np.memmap] = {}
    out: dict[str, np.ndarray] = {}
    where: dict[str, tuple] = {}
    for name, w in idx.weights.items():
        if name in skip:
            continue
        loc = str(inside(path, w.location, "a weight file"))
        if loc not in maps:
            maps[loc] = np.memmap(loc, dtype=np.uint8, mode="r")
        mm = maps[loc]
        nbytes = int(np.prod(w.dims, dtype=np.int64)) * w.dtype.itemsize
        if w.offset + nbytes > mm.size or (w.length and w.length != nbytes) or w.offset % w.dtype.alignment:
            raise RwkvcError(f"{loc}: the weight {name} does not fit the file (truncated?); recompile the artifact")
        out[name] = mm[w.offset:w.offset + nbytes].view(w.dtype).reshape(w.dims)
        where[name] = (loc, w.offset, nbytes)
    tables = sorted(idx.rows & set(out))
    for name in tables:   # a row read maps that row's page only: no read-ahead, no large folios
        advise_random(out[name])
        drop_cached(*where[name])
    return out, [out[name] for name in tables]


def float_matrix_bytes(idx: GraphIndex, held) -> tuple[int, int]:
    """(bytes of every external weight, bytes of the float32 matrices among them that ONNX Runtime's kernels
    pre-pack: 2-D and larger ones, not the tables held or read by rows)."""
    total = floats = 0
    for name, w in idx.weights.items():
        n = int(np.prod(w.dims, dtype=np.int64)) * w.dtype.itemsize
        total += n
        if prepackable(w.dtype, w.dims) and name not in held and name not in idx.rows:
            floats += n
    return total, floats


def prepackable(dtype, dims) -> bool:
    """Whether ONNX Runtime's kernels pre-pack a weight of this type and shape (its float32 matrices of 256 KB
    and more, which MatMul packs)."""
    return np.dtype(dtype) == np.float32 and len(dims) == 2 and int(np.prod(dims, dtype=np.int64)) * 4 >= 1 << 18


def mem_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes, None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def prepack_fits(idx: GraphIndex, held) -> bool:
    """Pre-pack (ONNX Runtime's packed copy of each float matrix, one a session: faster float products) where
    the weights and two packed copies (the step's and the prefill's sessions) take at most half the memory
    available now; else every kernel reads the weights in place."""
    total, floats = float_matrix_bytes(idx, held)
    avail = mem_available()
    return not floats or avail is None or total + 2 * floats <= avail // 2
