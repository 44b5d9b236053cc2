"""Decode with the weights in 2 MiB pages (the runtime's default: hugepages.anonymous_copy) against the weight
file's own mapping (rwkvc.load(..., huge_pages=False)): both loads of one artifact in one process, taking
turns in both orders, the same tokens.

    python bench/huge_pages.py ARTIFACT [--batch 1] [--steps 24] [--reps 12] [--threads 2]

--batch 1: Model.greedy_step chains (what `rwkvc run` decodes); --batch B > 1: BatchPool steps of B
sequences (what `rwkvc serve` runs). Prints milliseconds a step, the median of --reps blocks of --steps
steps each way, and the ratio.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    import rwkvc
    models = [rwkvc.load(a.artifact, threads=a.threads, huge_pages=False), rwkvc.load(a.artifact, threads=a.threads)]
    if models[1].runtime._anonymous is None:
        raise SystemExit("no huge-page copy on this machine (transparent huge pages off, or nothing to copy)")
    copy = np.frombuffer(models[1].runtime._anonymous, np.uint8)
    huge = models[1].runtime.huge_page_bytes()
    if a.batch > 1:
        from rwkvc.runtimes.ort_batch import BatchPool
        pools = []
        for m in models:
            pool = BatchPool(m.runtime, a.batch)
            for i in range(a.batch):
                pool.add(m.forward(m.encode(f"Sequence {i} begins here:"))[1])
            pools.append(pool)
        toks = [np.full(a.batch, 11, np.int64) for _ in models]

        def block(k):
            for _ in range(a.steps):
                toks[k] = pools[k].step(toks[k]).argmax(axis=1)
    else:
        chains = [[11, m.init_state()] for m in models]

        def block(k):
            tok, st = chains[k]
            for _ in range(a.steps):
                tok, st = models[k].greedy_step(tok, st, in_place=True)
            chains[k] = [tok, st]
    times = {0: [], 1: []}
    for rep in range(a.reps):
        for k in ((0, 1) if rep % 2 else (1, 0)):
            t0 = time.perf_counter()
            block(k)
            times[k].append((time.perf_counter() - t0) / a.steps * 1e3)
    same = (np.array_equal(toks[0], toks[1]) if a.batch > 1 else chains[0][0] == chains[1][0])
    f, h = np.median(times[0]), np.median(times[1])
    print(f"{a.artifact}, B = {a.batch}: file mapping {f:.2f} ms a step, huge pages {h:.2f} ms ({h / f:.3f}x); "
          f"the same tokens: {same}; {huge / 2**20:.0f} of the copy's {copy.nbytes / 2**20:.0f} MiB in 2 MiB pages")



if __name__ == "__main__":
    main()
