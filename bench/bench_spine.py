"""The spine's speed goal, in one run: the fp32 `cpu` artifact against the official `rwkv` package
(`cpu fp32`) on the same 0.1B-shaped random RWKV-7, same thread count, interleaved trials.

    python bench/bench_spine.py [--threads 2] [--prefill 512] [--decode 64] [--json out.json]

Reports decode tokens/s, prefill tokens/s, their ratios, peak RSS of each engine (in its own process),
and the fraction of the memory-bandwidth limit reached: weight bytes read per decoded token over the
machine's read bandwidth, measured here with bench/bandwidth.c.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPE = dict(n_layer=12, n_embd=768, head_size=64, vocab_size=65536, dims={"w": 64, "a": 64, "v": 32, "g": 128})


def bandwidth_gbps(threads: int) -> float:
    exe = Path(tempfile.gettempdir()) / "rwkvc-bandwidth-v3"
    if not exe.exists():
        subprocess.run(["cc", "-O3", "-march=native", "-fopenmp", str(HERE / "bandwidth.c"), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


WORKER = r'''
import json, os, resource, sys, time
import numpy as np
engine, path, threads, n_pre, n_dec, trials = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
rng = np.random.default_rng(0)
prompt = rng.integers(1, 65530, n_pre).tolist()
if engine == "official":
    os.environ["RWKV_V7_ON"] = "1"
    import torch
    torch.set_num_threads(threads)
    import contextlib, io
    with contextlib.redirect_stdout(io.StringIO()):
        from rwkv.model import RWKV
        m = RWKV(path[:-4], "cpu fp32")
    def fwd(toks, st):
        out, st = m.forward(toks, st)
        return out.numpy(), st
else:
    import rwkvc
    m = rwkvc.load(path, threads=threads)
    fwd = lambda toks, st: m.forward(toks, st)
# warm up with the measured shapes (first runs allocate arenas / pick kernels in both engines)
_, st = fwd(prompt, None)
for _ in range(4): _, st = fwd(prompt[:1], st)
pre, dec = [], []
for _ in range(trials):
    t0 = time.perf_counter(); logits, st = fwd(prompt, None); pre.append(time.perf_counter() - t0)
    tok = int(np.argmax(logits)); t0 = time.perf_counter()
    for _ in range(n_dec):
        logits, st = fwd([tok], st); tok = int(np.argmax(logits))
    dec.append(time.perf_counter() - t0)
print(json.dumps({"prefill_s": min(pre), "decode_s": min(dec), "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
'''


def run_engine(engine, path, threads, n_pre, n_dec, trials):
    r = subprocess.run([sys.executable, "-c", WORKER, engine, str(path), str(threads), str(n_pre), str(n_dec), str(trials)],
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{engine} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def weight_bytes_per_token(model) -> int:
    """Bytes of weights a decode step reads: every matrix and vector of the blocks, the head, one embedding row."""
    total = 0
    for blk in model.blocks:
        for part in (blk.att, blk.ffn):
            total += sum(4 * lin.weight.shape[0] * lin.weight.shape[1] for lin in part.lin.values())
            total += sum(4 * v.size for v in part.mix.values())
        total += sum(4 * v.size for v in blk.att.vec.values())
    return total + 4 * model.head.weight.shape[0] * model.head.weight.shape[1] + 4 * model.config.n_embd


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of each engine is kept")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "rwkvc-bench"))
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import rwkvc
    from rwkvc.frontend import load_model
    from rwkvc.testing import save_random_v7
    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    ckpt = wd / "rwkv7-0.1b-shape.pth"
    if not ckpt.exists():
        save_random_v7(ckpt, dtype="bf16", seed=0, **SHAPE)
    art = wd / "rwkv7-0.1b-shape-cpu"
    rwkvc.compile(ckpt, art, target="cpu", force=True)   # always: an artifact left by an older rwkvc measures that
    wbytes = weight_bytes_per_token(load_model(ckpt))
    load_before = os.getloadavg()[0]
    bw = bandwidth_gbps(a.threads)
    best = {}
    for _ in range(a.rounds):
        for eng, path in (("official", ckpt), ("rwkvc", art)):
            r = run_engine(eng, path, a.threads, a.prefill, a.decode, 3)
            b = best.setdefault(eng, r)
            for k in ("prefill_s", "decode_s"):
                b[k] = min(b[k], r[k])
            b["rss"] = max(b["rss"], r["rss"])
    res = {"machine": {"cpus": os.cpu_count(), "threads": a.threads, "read_bandwidth_GBps": bw,
                       "load_average_1min": [load_before, os.getloadavg()[0]]},   # other jobs skew both engines
           "model": {**SHAPE, "file_dtype": "bf16", "weight_bytes_per_token_fp32": wbytes},
           "prefill_tokens": a.prefill, "decode_tokens": a.decode}
    for eng, b in best.items():
        res[eng] = {"decode_tok_s": a.decode / b["decode_s"], "prefill_tok_s": a.prefill / b["prefill_s"],
                    "peak_rss_MB": b["rss"] / 1e6}
        res[eng]["bandwidth_fraction"] = res[eng]["decode_tok_s"] * wbytes / (bw * 1e9)
    res["ratio_decode"] = res["rwkvc"]["decode_tok_s"] / res["official"]["decode_tok_s"]
    res["ratio_prefill"] = res["rwkvc"]["prefill_tok_s"] / res["official"]["prefill_tok_s"]
    print(json.dumps(res, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
