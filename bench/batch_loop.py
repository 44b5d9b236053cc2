"""A plain batched decode loop for profilers: B sequences (each prefilled with its own short prompt) advance
by one BatchPool.step a token, greedy, for --steps steps after 20 warm-up steps; prints the mean step time.

    python bench/batch_loop.py ARTIFACT [--batch 8] [--steps 800] [--threads 2] [--no-spin]
    perf record -F 1999 -D 5000 -o perf.data -- python bench/batch_loop.py ARTIFACT --steps 800
    perf report -i perf.data --no-children --sort pid,dso -g none    # each thread's share, by library

(-D 5000 leaves out the start-up; docs/benchmarks/serving.md reads the two threads' shares this way.)
--no-spin: the batched session's intra-op threads wait without spinning (session.intra_op.allow_spinning 0).
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-spin", action="store_true")
    a = ap.parse_args(argv)
    import rwkvc
    from rwkvc.runtimes.ort_batch import BatchPool
    m = rwkvc.load(a.artifact, threads=a.threads)
    if a.no_spin:   # (the batched session is made by BatchPool, with the runtime's options)
        m.runtime.so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    pool = BatchPool(m.runtime, a.batch)
    for i in range(a.batch):
        pool.add(m.forward(m.encode(f"Sequence {i} begins here:"))[1])
    tok = np.full(a.batch, 11, np.int64)
    for _ in range(20):
        tok = pool.step(tok).argmax(axis=1)
    t0 = time.perf_counter()
    for _ in range(a.steps):
        tok = pool.step(tok).argmax(axis=1)
    dt = time.perf_counter() - t0
    print(f"B = {a.batch}: {dt / a.steps * 1e3:.2f} ms a step, {a.batch * a.steps / dt:.0f} tokens/s")


if __name__ == "__main__":
    main()
