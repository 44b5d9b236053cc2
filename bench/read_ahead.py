"""The embedding's rows read ahead (Runtime.read_rows, rwkvc.mapped.read_ahead_rows) against the Gather's page
faults reading them one after another, on an artifact whose embedding stays on disk (`--preset int4`,
`lazy-emb`): both ways interleaved in one process, in both orders, tokens never read before (rows from
the file).

    python bench/read_ahead.py ARTIFACT [--batch 8] [--steps 64] [--reps 12] [--prompts 8] [--threads 2]

Batched decode: B sequences step greedily (each step's B tokens new rows of a random model's table);
milliseconds a step, median over --reps blocks of --steps steps each way. Prefill: a 512-token prompt
of random tokens from a fixed state, seconds, median over --prompts each way.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    import rwkvc
    from rwkvc.runtimes.ort_batch import BatchPool, has_batch_step
    m = rwkvc.load(a.artifact, threads=a.threads)
    tables = m.runtime._token_tables
    if not tables:
        raise SystemExit(f"{a.artifact}: no embedding table read by rows (compile with --preset int4 or lazy-emb)")

    def way(on: bool):
        m.runtime._token_tables = tables if on else []

    if has_batch_step(m.manifest):
        pool = BatchPool(m.runtime, a.batch)
        for i in range(a.batch):
            pool.add(m.forward(m.encode(f"Sequence {i} begins here:"))[1])
        tok = np.full(a.batch, 11, np.int64)
        for _ in range(20):
            tok = pool.step(tok).argmax(axis=1)
        steps = {False: [], True: []}
        for rep in range(a.reps):
            for on in ((False, True) if rep % 2 else (True, False)):
                way(on)
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    tok = pool.step(tok).argmax(axis=1)
                steps[on].append((time.perf_counter() - t0) / a.steps * 1e3)
        off, on = np.median(steps[False]), np.median(steps[True])
        print(f"batched step, B = {a.batch}: {off:.3f} ms faulting, {on:.3f} ms read ahead ({on / off:.3f}x)")
    rng = np.random.default_rng(0)
    st = m.forward(np.array([11]))[1]
    pre = {False: [], True: []}
    for rep in range(a.prompts):
        for on in ((False, True) if rep % 2 else (True, False)):
            way(on)
            toks = rng.integers(0, m.manifest["model"]["vocab_size"], 512)
            t0 = time.perf_counter()
            m.forward(toks, st)
            pre[on].append(time.perf_counter() - t0)
    off, on = np.median(pre[False]), np.median(pre[True])
    print(f"512-token prefill: {off:.3f} s faulting, {on:.3f} s read ahead ({on / off:.3f}x)")
    way(True)


if __name__ == "__main__":
    main()
