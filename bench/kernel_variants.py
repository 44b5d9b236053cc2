"""One artifact under several builds of rwkvc's fused kernels, interleaved in one process: one stream's decode,
B streams' batched decode, a 512-token prefill and a batched 8 x 64 prefill, best of --reps for each build.

    python bench/kernel_variants.py ART --variant=-DRWKVC_PREFETCH_AHEAD=0 [--variant=...] [--batch 8]
        [--steps 16] [--reps 5] [--threads 2]

Each --variant is a build with these extra compiler flags (rwkvc.runtimes.ortops.build), beside the default
build; each build's library is registered into its own sessions of the same artifact, so the builds share
the machine's moments (docs/benchmarks/serving.md: the prefetch A/B).
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def best_rate(fn, tokens: int, store: dict, key) -> None:
    t = time.perf_counter()
    fn()
    store[key] = max(store.get(key, 0.0), tokens / (time.perf_counter() - t))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--variant", action="append", default=[], help="extra compiler flags of a build (repeatable)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    import rwkvc
    from rwkvc.runtimes import ortops
    from rwkvc.runtimes.ort_batch import BatchPool, prefill_batch
    libs = {"default": ortops.build(), **{v: ortops.build(ortops.FLAGS + v.split()) for v in a.variant}}
    runs = {}
    for name, lib in libs.items():
        ortops.use_library(lib)                       # the sessions made next register this build
        m = rwkvc.load(a.artifact, threads=a.threads)
        states = [m.forward(m.encode(f"Sequence {i} begins here:"))[1] for i in range(a.batch)]
        pool = BatchPool(m.runtime, a.batch)
        for s in states:
            pool.add(s)
        runs[name] = (m, pool, states)
    rng = np.random.default_rng(0)
    prompt = rng.integers(1, 65000, 512)
    chunks = rng.integers(1, 65000, (8, 64))
    best: dict = {}
    for _ in range(a.reps):
        for name, (m, pool, states) in runs.items():
            def one():
                st, tok = states[0], 11
                for _ in range(a.steps):
                    lg, st = m.forward([tok], st)
                    tok = int(np.argmax(lg))

            def batched():
                toks = np.full(a.batch, 11, np.int64)
                for _ in range(a.steps):
                    toks = pool.step(toks).argmax(axis=1)
            best_rate(one, a.steps, best, (name, "one"))
            best_rate(batched, a.steps * a.batch, best, (name, "batch"))
            best_rate(lambda: m.forward(prompt), len(prompt), best, (name, "prefill"))
            best_rate(lambda: prefill_batch(m.runtime, chunks, [states[i % len(states)] for i in range(len(chunks))]),
                      chunks.size, best, (name, "bprefill"))
    print(f"| build | one stream tok/s | {a.batch} streams tok/s | x one stream | prefill 512 tok/s | batched prefill 8 x 64 tok/s |")
    print("|---|---|---|---|---|---|")
    for name in runs:
        one, b = best[(name, "one")], best[(name, "batch")]
        print(f"| {name} | {one:.1f} | {b:.1f} | {b / one:.2f} | {best[(name, 'prefill')]:.0f} | {best[(name, 'bprefill')]:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
