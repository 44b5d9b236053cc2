"""Run memory of a cpu artifact: load it, prefill a prompt, decode, and print the peak RSS with its anonymous
and file-backed parts (docs/benchmarks/big-models.md's runtime comparisons).

    python bench/scale_runtime.py ARTIFACT [--prefill 512] [--chunk 128] [--no-prepack] [--threads 2]

--chunk: tokens a prefill call (OrtRuntime.prefill_chunk); --no-prepack: rwkvc.load(..., prepack=False).
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--no-prepack", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    import rwkvc
    from rwkvc.bench import rss_bytes
    t0 = time.perf_counter()
    m = rwkvc.load(a.artifact, threads=a.threads, prefill_chunk=a.chunk, prepack=not a.no_prepack)
    t_load = time.perf_counter() - t0
    prompt = list(np.random.default_rng(0).integers(1, 65530, a.prefill))
    logits, st = m.forward(prompt)
    t0 = time.perf_counter()
    logits, st = m.forward(prompt)
    t_pre = time.perf_counter() - t0
    tok = int(np.argmax(logits))
    t0 = time.perf_counter()
    for _ in range(a.decode):
        tok, st = m.greedy_step(tok, st)
    t_dec = time.perf_counter() - t0
    r = rss_bytes()
    print(f"{a.artifact}: chunk {a.chunk}, prepack {not a.no_prepack}: load {t_load:.1f} s, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:.0f} MB (now anonymous "
          f"{r.get('RssAnon', 0) / 1e6:.0f} MB, file-backed {r.get('RssFile', 0) / 1e6:.0f} MB), prefill "
          f"{a.prefill / t_pre:.1f} tok/s, decode {a.decode / t_dec:.2f} tok/s")


if __name__ == "__main__":
    main()
