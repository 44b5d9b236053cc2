"""A lone sequence in the serving engine's state pool, stepped two ways, interleaved 10 steps at a time: the
batched graph at B = 1 (BatchPool.step, what the engine does) against the artifact's own step with the state
moved out of the pool and back (Model.forward on BatchPool.state, then set_state). Greedy; prints the
median time a step of each and their ratio, and whether both chose the same tokens.

    python bench/lone_step.py ART [--blocks 60] [--threads 2] [--first own|b1]
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--blocks", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--first", choices=("own", "b1"), default="own", help="which runs first in each block")
    a = ap.parse_args(argv)
    import rwkvc
    from rwkvc.runtimes.ort_batch import BatchPool
    m = rwkvc.load(a.artifact, threads=a.threads)
    pools = {k: BatchPool(m.runtime, 8) for k in ("own", "b1")}
    for p in pools.values():
        p.add(m.forward(m.encode("Sequence 0 begins here:"))[1])

    def own(tok):
        lg, st = m.forward([tok], pools["own"].state(0))
        pools["own"].set_state(0, st)
        return int(lg.argmax())

    def b1(tok):
        return int(pools["b1"].step([tok])[0].argmax())

    fns = {"own": own, "b1": b1}
    order = [a.first, "b1" if a.first == "own" else "own"]
    toks, times = {k: 11 for k in fns}, {k: [] for k in fns}
    for blk in range(a.blocks):
        for k in order:
            t = time.perf_counter()
            for _ in range(10):
                toks[k] = fns[k](toks[k])
            if blk >= 3:
                times[k].append((time.perf_counter() - t) / 10)
    o, b = np.array(times["own"]) * 1e3, np.array(times["b1"]) * 1e3
    print(f"own step via the pool {np.median(o):.3f} ms, batched B = 1 {np.median(b):.3f} ms a step; "
          f"own / B = 1: {np.median(o / b):.3f}; the same tokens: {toks['own'] == toks['b1']}")


if __name__ == "__main__":
    main()
