"""Two versions of rwkvc's fused kernels on a batched decode, interleaved in one process, in both orders.

    git worktree add /tmp/before <commit>
    python bench/kernel_ab.py ART /tmp/before/runtimes/ortops runtimes/ortops [--art-b ART_B] [--batch 8]
        [--steps 500] [--threads 2]

Each source directory is built into its own library (rwkvc.runtimes.ortops.build(src=...)), and each library
serves its own load of the artifact (ART_B for the second, where its graphs differ: an artifact compiled by
the other checkout), both on one ONNX Runtime thread pool (a global one, so that no second pool's threads
spin beside the first's). The two take turns, 10 steps at a time, and each block's time is divided by the
other's; the process runs twice, the two loads made in either order, since the load made second runs a few
per cent faster on the Zen 4 whichever it is. Prints each order's median block ratio B/A and their geometric
mean, which cancels that order effect. The tokens of the two must agree (greedy, the same prompts): the
versions must compute the same numbers. (A version whose op set is older than this rwkvc's is loaded
anyway: the version check is skipped here.)
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

import numpy as np


def run(art_a, src_a, art_b, src_b, batch, steps, threads) -> dict:
    import onnxruntime as ort
    from onnxruntime.capi import _pybind_state as C
    C.set_global_thread_pool_sizes(threads, 1)

    class Options(ort.SessionOptions):   # every session on the global pool
        def __init__(self):
            super().__init__()
            self.use_per_session_threads = False
    ort.SessionOptions = Options
    import rwkvc
    from rwkvc.runtimes import ortops
    from rwkvc.runtimes.ort_batch import BatchPool
    ortops.require = lambda spec: None
    pools = []
    for art, src in ((art_a, src_a), (art_b, src_b)):
        ortops.use_library(ortops.build(src=src))    # the sessions made next register this build
        m = rwkvc.load(art, threads=threads)
        pool = BatchPool(m.runtime, batch)
        for i in range(batch):
            pool.add(m.forward(m.encode(f"Sequence {i} begins here:"))[1])
        pools.append(pool)
    toks = [np.full(batch, 11, np.int64) for _ in pools]
    times = [[], []]
    for blk in range(steps // 10 + 2):
        for i, pool in enumerate(pools):
            t = time.perf_counter()
            for _ in range(10):
                toks[i] = pool.step(toks[i]).argmax(axis=1)
            if blk >= 2:
                times[i].append((time.perf_counter() - t) / 10)
    a, b = np.array(times[0]), np.array(times[1])
    return {"a_ms": float(np.median(a) * 1e3), "b_ms": float(np.median(b) * 1e3),
            "ratio": float(np.median(b / a)), "same_tokens": bool(np.array_equal(*toks))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("src_a")
    ap.add_argument("src_b")
    ap.add_argument("--art-b", help="the artifact for B (default: the same)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)     # one order, in a child process: "ab" or "ba"
    a = ap.parse_args(argv)
    art_b = a.art_b or a.artifact
    if a.one:
        args = (a.artifact, a.src_a, art_b, a.src_b) if a.one == "ab" else (art_b, a.src_b, a.artifact, a.src_a)
        print(json.dumps(run(*args, a.batch, a.steps, a.threads)))
        return
    res = {}
    for order in ("ab", "ba"):
        out = subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--one", order],
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"kernel_ab: the {order} run failed: {out.stderr.strip().splitlines()[-1:]}")
        res[order] = json.loads(out.stdout.strip().splitlines()[-1])
    ab, ba = res["ab"], res["ba"]
    print(f"A first: A {ab['a_ms']:.2f} ms, B {ab['b_ms']:.2f} ms a step, B/A {ab['ratio']:.4f}")
    print(f"B first: B {ba['a_ms']:.2f} ms, A {ba['b_ms']:.2f} ms a step, A/B {ba['ratio']:.4f}")
    print(f"B/A, the order cancelled: {math.sqrt(ab['ratio'] / ba['ratio']):.4f}"
          f"  (the same tokens: {ab['same_tokens'] and ba['same_tokens']})")


if __name__ == "__main__":
    main()
