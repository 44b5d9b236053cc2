"""Per-operator time of an artifact's ONNX graph under ONNX Runtime's profiler.

    python bench/profile_ort.py ARTIFACT [--entry step|prefill] [--tokens 128] [--threads 1] [--runs 10]

Prints milliseconds per run by operator type (and output shape), largest first: where a step or a
prefill spends its time.
"""
from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--entry", default="step", choices=("step", "prefill"))
    ap.add_argument("--tokens", type=int, default=128, help="prefill length")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--head-mode", type=int, default=1, choices=(0, 1),
                    help="a clustered head's mode: 1 the top token only (greedy decode), 0 the logits too")
    a = ap.parse_args()
    d = Path(a.artifact)
    man = json.loads((d / "manifest.json").read_text())
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "prof")
    if man.get("custom_ops"):
        from rwkvc.runtimes import ortops
        ortops.register(so)
    sess = ort.InferenceSession(str(d / man["entry_points"][a.entry]), so, providers=["CPUExecutionProvider"])
    T = 1 if a.entry == "step" else a.tokens
    feed = {"tokens": np.random.default_rng(0).integers(1, man["model"]["vocab_size"], T),
            "shift_in": np.zeros(man["state"]["shift"], np.float32),
            **{f"wkv_in.{i}": np.zeros(man["state"]["wkv"][1:], np.float32) for i in range(man["state"]["wkv"][0])}}
    if any(i.name == "head_mode" for i in sess.get_inputs()):   # a top-token head: the greedy step's mode
        feed["head_mode"] = np.array([a.head_mode], np.int64)
    sess.run(None, feed)
    times = []
    for _ in range(a.runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    events = json.loads(Path(sess.end_profiling()).read_text())
    agg = collections.defaultdict(float)
    count = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            shp = e["args"].get("output_type_shape")
            key = (e["args"].get("op_name"), json.dumps(shp[0]) if shp else "")
            agg[key] += e["dur"]
            count[key] += 1
    n = a.runs + 1
    print(f"{a.entry} T={T} threads={a.threads}: best {min(times) * 1e3:.2f} ms, median {np.median(times) * 1e3:.2f} ms")
    for (op, shp), us in sorted(agg.items(), key=lambda kv: -kv[1])[:a.top]:
        print(f"  {op:<22} {shp[:44]:<44} {us / n / 1e3:8.2f} ms/run  x{count[(op, shp)] // n}")
    print(f"  kernels total {sum(agg.values()) / n / 1e3:.2f} ms/run")


if __name__ == "__main__":
    main()
