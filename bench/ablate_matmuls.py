"""How much of a decode step is the large matrix products and how much everything else.

    python bench/ablate_matmuls.py ARTIFACT [--threads 2] [--runs 300]

Times the artifact's step graph as it is, then a copy in which every large matrix product (MatMul / Gemm /
MatMulNBits / MatMulInteger with a weight of more than 200k elements) is replaced by ReduceSum + Expand (two
cheap kernels of the same output shape), so the second time is what the ~1000 other kernels cost a token.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

BIG = 200_000
MATMULS = ("MatMul", "Gemm", "MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul")


def out_width(node, w) -> int:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMulNBits":
        return int(attrs["N"])
    if node.op_type == "Gemm" and attrs.get("transB"):
        return int(w.dims[0])
    return int(w.dims[-1])


def ablate(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    nodes, replaced = [], 0
    for n in g.node:
        big = [x for x in n.input[1:] if x in inits and int(np.prod(inits[x].dims)) > BIG]
        if n.op_type not in MATMULS or not big:
            nodes.append(n)
            continue
        x = n.input[0]
        if n.op_type == "MatMulInteger":   # its input is the quantised activation: sum the float one instead
            x = next(m.input[0] for m in g.node if n.input[0] in m.output)
        r, shp = n.output[0] + "/sum", n.output[0] + "/shape"
        g.initializer.append(numpy_helper.from_array(np.array([1, out_width(n, inits[big[0]])], np.int64), shp))
        nodes += [helper.make_node("ReduceSum", [x], [r], keepdims=1), helper.make_node("Expand", [r, shp], [n.output[0]])]
        replaced += 1
    del g.node[:]
    g.node.extend(nodes)
    return model, replaced


def time_step(path: str, threads: int, runs: int) -> tuple[float, float]:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = threads, 3
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feeds = {i.name: (np.ones if "int64" in i.type else np.zeros)([d if isinstance(d, int) else 1 for d in i.shape],
                                                                 np.int64 if "int64" in i.type else np.float32)
             for i in s.get_inputs()}
    for _ in range(10):
        s.run(None, feeds)
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        s.run(None, feeds)
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[0] * 1e3, ts[len(ts) // 2] * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=300)
    a = ap.parse_args()
    d = Path(a.artifact)
    step = d / json.loads((d / "manifest.json").read_text())["entry_points"]["step"]
    full = time_step(str(step), a.threads, a.runs)
    model, n = ablate(onnx.load(str(step)))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ablated.onnx"
        onnx.save(model, str(out), save_as_external_data=True, location="ablated.bin", size_threshold=1024)
        rest = time_step(str(out), a.threads, a.runs)
    print(f"step graph: {len(model.graph.node)} kernels after ablation, {n} large products replaced")
    print(f"full step:               best {full[0]:.2f} ms, median {full[1]:.2f} ms")
    print(f"without large products:  best {rest[0]:.2f} ms, median {rest[1]:.2f} ms")


if __name__ == "__main__":
    main()
