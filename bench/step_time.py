"""Decode-step time of artifacts: Model.greedy_step over --steps-token chains, best and median of --reps,
the artifacts (and thread counts) alternated in one process so they share the machine's moments.

    python bench/step_time.py ART [ART ...] [--threads 1,2] [--reps 30] [--steps 64] [--native DIR,DIR]

--native A/B's rwkvc's fused kernels: each DIR holds the kernels' C++ (a checkout's runtimes/ortops/, or a copy
of it), built as its own library; every artifact runs once on each library, all alternated in one process (separate
processes on this VM differ by 20 % from minute to minute, more than a kernel change).

The step-time tables in docs/BENCHMARKS.md are this measurement.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--threads", default="1", help="comma-separated intra-op thread counts")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--native", default=None, help="comma-separated kernel source directories to A/B")
    a = ap.parse_args(argv)
    import rwkvc
    from rwkvc.runtimes import ortops
    runs = []
    for src in a.native.split(",") if a.native else [None]:
        if src:   # the kernels built from this source (its own library, so both load into this process)
            ortops.use_library(ortops.build(src=src))
        for art in a.artifacts:
            for t in a.threads.split(","):
                runs.append((f"{art}{' [' + src + ']' if src else ''}", int(t), rwkvc.load(art, threads=int(t))))
    times = {(art, t): [] for art, t, _ in runs}
    for _ in range(a.reps):
        for art, t, m in runs:
            st, tok = m.init_state(), 11
            for _ in range(8):   # warm: a state from a step (the runtime's reused buffers)
                tok, st = m.greedy_step(tok, st)
            t0 = time.perf_counter()
            for _ in range(a.steps):
                tok, st = m.greedy_step(tok, st)
            times[(art, t)].append((time.perf_counter() - t0) / a.steps * 1e6)
    for (art, t), v in times.items():
        print(f"{art} threads={t}: best {min(v):.0f} us, median {np.median(v):.0f} us a step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
