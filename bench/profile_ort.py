"""Per-operator time of an artifact's ONNX graph under ONNX Runtime's profiler.

    python bench/profile_ort.py ARTIFACT [--entry step|prefill] [--tokens 128] [--threads 1] [--runs 10]
                                [--warm 64]

Prints milliseconds per run by operator type (and output shape), largest first: where a step or a
prefill spends its time. The step is profiled as a greedy decode: --warm tokens of text (the KJV) through
the step first, then --runs steps each feeding its top token and state to the next. Data-dependent
kernels (sparse FFN, clustered head) do what they do in a real decode; a zero state and one random
token repeated (--warm 0) can pick far more clusters than text does.
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


def _options(threads: int, man: dict) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    if man.get("custom_ops"):
        from rwkvc.runtimes import ortops
        ortops.register(so)
    return so


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--entry", default="step", choices=("step", "prefill"))
    ap.add_argument("--tokens", type=int, default=128, help="prefill length")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--warm", type=int, default=64, help="step: tokens of text run before the profiled steps")
    ap.add_argument("--head-mode", type=int, default=1, choices=(0, 1),
                    help="a clustered head's mode: 1 the top token only (greedy decode), 0 the logits too")
    a = ap.parse_args()
    d = Path(a.artifact)
    man = json.loads((d / "manifest.json").read_text())
    so = _options(a.threads, man)
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "prof")
    path = str(d / man["entry_points"][a.entry])
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    T = 1 if a.entry == "step" else a.tokens
    feed = {"tokens": np.random.default_rng(0).integers(1, man["model"]["vocab_size"], T),
            "shift_in": np.zeros(man["state"]["shift"], np.float32),
            **{f"wkv_in.{i}": np.zeros(man["state"]["wkv"][1:], np.float32) for i in range(man["state"]["wkv"][0])}}
    if any(i.name == "head_mode" for i in sess.get_inputs()):   # a top-token head: the greedy step's mode
        feed["head_mode"] = np.array([a.head_mode], np.int64)
    outs = [o.name for o in sess.get_outputs()]
    greedy = a.entry == "step" and "top" in outs and a.head_mode == 1

    def advance(feed, res):   # the next step's feed: its state, and the top token when the step gives one
        r = dict(zip(outs, res))
        nxt = dict(feed, shift_in=r["shift_out"])
        for k in feed:
            if k.startswith("wkv_in."):
                nxt[k] = r[k.replace("wkv_in.", "wkv_out.")]
        if greedy:
            nxt["tokens"] = r["top"].astype(np.int64).reshape(1)
        return nxt

    if a.entry == "step" and a.warm:   # a text's state, from an unprofiled session
        from rwkvc.calib import default_calib_tokens
        warm = ort.InferenceSession(path, _options(a.threads, man), providers=["CPUExecutionProvider"])
        for t in default_calib_tokens(a.warm)[:a.warm] % man["model"]["vocab_size"]:
            feed = advance(dict(feed, tokens=np.array([t], np.int64)), warm.run(None, feed))
        del warm
    res = sess.run(None, feed)
    times = []
    for _ in range(a.runs):
        if greedy:
            feed = advance(feed, res)
        t0 = time.perf_counter()
        res = sess.run(None, feed)
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
