"""Time of one Sampler.sample over an artifact's logits (the serving engine samples every live sequence's
next token this way, one call each, after each batched step), for several sampling settings.

    python bench/sampler_time.py ART [--prompt TEXT] [--steps 16] [--reps 10]

The logits are --steps greedy steps' of the artifact after the prompt (a trained model's are peaked, a
random model's nearly flat, and the top-p cutoff costs more the flatter they are), each sampled --reps
times per setting; prints milliseconds a sample.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

SETTINGS = [dict(temperature=0.0), dict(temperature=1.0, top_p=1.0), dict(temperature=1.0, top_p=0.85), dict(temperature=0.8, top_p=0.7),
            dict(temperature=1.0, top_p=0.3, top_k=40),
            dict(temperature=1.2, top_p=1.0, alpha_presence=0.3, alpha_frequency=0.2)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--prompt", default="And God said, Let there be light: and")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args(argv)
    import rwkvc
    from rwkvc.sampling import Sampler, SamplingConfig
    m = rwkvc.load(a.artifact)
    logits, st = m.forward(m.encode(a.prompt))
    rows = []
    for _ in range(a.steps):
        logits, st = m.forward([int(np.argmax(logits))], st)
        rows.append(logits.copy())
    for kw in SETTINGS:
        s = Sampler(SamplingConfig(seed=1, **kw))
        t = time.perf_counter()
        for _ in range(a.reps):
            for x in rows:
                s.observe(s.sample(x))
        print(f"{kw}: {(time.perf_counter() - t) / (a.reps * len(rows)) * 1e3:.3f} ms a sample")


if __name__ == "__main__":
    main()
