"""Run memory of a cpu artifact: load it, prefill a prompt twice, decode, and print the peak RSS stage by
stage with its anonymous and file-backed parts (docs/benchmarks/big-models.md's runtime comparisons).

    python bench/scale_runtime.py ARTIFACT [--prefill 512] [--decode 16] [--chunk N] [--prepack auto|on|off]
                                           [--threads 2]

The decode writes each state over the last (greedy_step(in_place=True)), as `rwkvc bench` and `rwkvc run`
decode. --chunk: tokens a prefill call (OrtRuntime.prefill_chunk; default the runtime's); --prepack: ONNX
Runtime's packed copies of float matrices (auto: the runtime's choice, ort_weights.prepack_fits).
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def status_mib() -> dict:
    """VmHWM, VmRSS, RssAnon and RssFile of this process in MiB."""
    keys = ("VmHWM", "VmRSS", "RssAnon", "RssFile")
    with open("/proc/self/status") as f:
        return {ln.split(":")[0]: int(ln.split()[1]) // 1024 for ln in f if ln.startswith(keys)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=None)
    ap.add_argument("--prepack", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    print("interpreter and numpy", status_mib())
    import rwkvc
    from rwkvc.bench import weight_traffic
    t0 = time.perf_counter()
    m = rwkvc.load(a.artifact, threads=a.threads, prefill_chunk=a.chunk,
                   prepack={"auto": None, "on": True, "off": False}[a.prepack])
    t_load = time.perf_counter() - t0
    print("loaded", status_mib())
    prompt = np.random.default_rng(0).integers(1, 65530, a.prefill).tolist()
    logits = st = None
    logits, st = m.forward(prompt)
    logits = st = None     # one prompt's state at a time
    t0 = time.perf_counter()
    logits, st = m.forward(prompt)
    t_pre = time.perf_counter() - t0
    print(f"after two {a.prefill}-token prompts", status_mib())
    tok, logits = int(np.argmax(logits)), None
    t0 = time.perf_counter()
    for _ in range(a.decode):
        tok, st = m.greedy_step(tok, st, in_place=True)
    t_dec = time.perf_counter() - t0
    end = status_mib()
    print(f"after {a.decode} decode steps", end)
    w = weight_traffic(a.artifact)
    held = w["weight_bytes_resident"] + st.shift.nbytes + st.wkv.nbytes
    print(f"{a.artifact}: chunk {m.runtime.prefill_chunk}, prepack {m.runtime.prepack}: load {t_load:.1f} s, "
          f"peak {end['VmHWM']} MiB = {end['VmHWM'] * 2 ** 20 / held:.3f} x the resident weights and state "
          f"({held / 2 ** 20:.1f} MiB), prefill {a.prefill / t_pre:.1f} tok/s, decode {a.decode / t_dec:.2f} tok/s")


if __name__ == "__main__":
    main()
