"""`rwkvc bench`: decode and prefill speed, peak RSS and size of an artifact, measured in-process."""
from __future__ import annotations

import resource
import time
from pathlib import Path

import numpy as np


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def bench_artifact(path, n_decode=64, n_prefill=512, threads=None, repeat=3, seed=0) -> dict:
    from .api import load
    m = load(path, threads=threads)
    V = m.config.vocab_size
    rng = np.random.default_rng(seed)
    prompt = rng.integers(1, min(V, 65530), n_prefill).tolist()

    m.forward(prompt[:8])                                   # warm up both sessions
    m.forward(prompt[:1])
    t_pre = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        logits, state = m.forward(prompt)
        t_pre.append(time.perf_counter() - t0)
    t_dec = []
    for _ in range(repeat):
        st, tok = state, int(np.argmax(logits))
        t0 = time.perf_counter()
        for _ in range(n_decode):
            lg, st = m.forward([tok], st)
            tok = int(np.argmax(lg))
        t_dec.append(time.perf_counter() - t0)
    files = m.manifest.get("files", {})
    d, p = min(t_dec), min(t_pre)
    return {
        "artifact": str(Path(path)),
        "target": m.manifest["target"],
        "model": m.manifest["model"],
        "passes": [x.get("name") for x in m.manifest.get("passes", [])],
        "threads": threads or "default",
        "decode_tokens": n_decode,
        "decode_tokens_per_s": n_decode / d,
        "decode_ms_per_token": 1000 * d / n_decode,
        "prefill_tokens": n_prefill,
        "prefill_tokens_per_s": n_prefill / p,
        "peak_rss_bytes": peak_rss_bytes(),
        "artifact_bytes": sum(f["bytes"] for f in files.values()),
    }
