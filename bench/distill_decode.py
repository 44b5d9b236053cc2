"""Decode speed and state memory of a transformer's cpu artifact against its distilled RWKV-7 hybrid's
(docs/DISTILLATION.md), interleaved in one run so the two see the same machine load.

    python bench/distill_decode.py --teacher gpt-art --hybrid hybrid-art [--contexts 16,112 --tokens 16 --rounds 5]

For each context length P: a prefill of P tokens, then --tokens greedy one-token steps, timed per step; the
state after the steps is measured in bytes (the transformer's KV cache grows with P; the hybrid's state does
not). Reports the median ms per decoded token per round, their ratio, and the state bytes.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def state_bytes(state) -> int:
    if hasattr(state, "nbytes") and not isinstance(state, np.ndarray):
        return int(state.nbytes)
    return int(state.shift.nbytes + state.wkv.nbytes)


def decode(model, prompt: np.ndarray, n: int) -> tuple[float, int]:
    """ms per decoded token after a prefill of `prompt`, and the state's bytes after it."""
    logits, st = model.forward(prompt)
    tok = int(np.argmax(logits))
    t0 = time.perf_counter()
    for _ in range(n):
        logits, st = model.forward([tok], st)
        tok = int(np.argmax(logits))
    return (time.perf_counter() - t0) * 1e3 / n, state_bytes(st)


def main(argv=None) -> int:
    import rwkvc
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True, help="the transformer's cpu artifact")
    ap.add_argument("--hybrid", required=True, help="the hybrid's cpu artifact")
    ap.add_argument("--contexts", default="16,112", help="prefill lengths before decoding, comma-separated")
    ap.add_argument("--tokens", type=int, default=16, help="decoded tokens per measurement")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    ap.add_argument("--vocab", type=int, default=0, help="prompt ids below this (0 = the smaller vocabulary)")
    a = ap.parse_args(argv)
    models = {"teacher": rwkvc.load(a.teacher), "hybrid": rwkvc.load(a.hybrid)}
    V = a.vocab or min(m.config.vocab_size for m in models.values())
    rng = np.random.default_rng(0)
    print(f"{'context':>8} {'model':>8} {'ms/token':>9} {'state bytes':>12}")
    for P in (int(p) for p in a.contexts.split(",")):
        prompt = rng.integers(1, V, P)
        times = {k: [] for k in models}
        nbytes = {}
        for _ in range(a.rounds):
            for k, m in models.items():
                ms, nbytes[k] = decode(m, prompt, a.tokens)
                times[k].append(ms)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k in models:
            print(f"{P:>8} {k:>8} {med[k]:>9.3f} {nbytes[k]:>12,}")
        print(f"{P:>8} {'ratio':>8} {med['teacher'] / med['hybrid']:>9.2f}x {nbytes['teacher'] / nbytes['hybrid']:>11.2f}x"
              "   (teacher / hybrid)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
