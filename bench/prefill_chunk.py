"""Prefill speed against the tokens a prefill call takes (OrtRuntime.prefill_chunk), interleaved in one
process: one loaded model per chunk size (the weights' pages shared), each round prefilling the same prompt
with every size in turn.

    python bench/prefill_chunk.py ARTIFACT [--chunks 32,48,64] [--prefill 512] [--rounds 5] [--threads 2]

Prints the median and best tokens/s of each size over the rounds.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--chunks", default="32,48,64")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    import rwkvc
    chunks = [int(c) for c in a.chunks.split(",")]
    models = {c: rwkvc.load(a.artifact, threads=a.threads, prefill_chunk=c) for c in chunks}
    prompt = np.random.default_rng(0).integers(1, 65530, a.prefill).tolist()
    for m in models.values():   # warm up: every session made, the weights' pages read
        m.forward(prompt[:max(chunks) + 1])
    times: dict[int, list[float]] = {c: [] for c in chunks}
    for _ in range(a.rounds):
        for c, m in models.items():
            t0 = time.perf_counter()
            m.forward(prompt)
            times[c].append(time.perf_counter() - t0)
    for c in chunks:
        print(f"chunk {c}: prefill {a.prefill / np.median(times[c]):.1f} tok/s median, "
              f"{a.prefill / min(times[c]):.1f} best of {a.rounds}")


if __name__ == "__main__":
    main()
