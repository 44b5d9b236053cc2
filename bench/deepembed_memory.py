"""RWKV-7a DeepEmbed: resident memory and decode speed, the official package against rwkvc's artifacts
(docs/BENCHMARKS.md, "RWKV-7a DeepEmbed: the tables on disk").

    python bench/deepembed_memory.py [--work DIR] [--tokens 64] [--rounds 2] [--threads N] [--rpi5]

The model: a random RWKV-7a of the 0.1B's shape (L12, C768, head 64, V65536, FFN 3072, DeepEmbed tables
(V, 1024) per layer: 0.81 billion table parameters), saved in bf16 (~2.0 GB; memory and speed do not depend
on the weights' values). Each system runs in its own process, which loads the model, prefills a 16-token
prompt, then decodes --tokens tokens greedily one at a time (timed); the process reports its peak resident
memory (VmHWM) and, at the end, its resident memory split into anonymous and file-backed pages:

    official     the `rwkv` package 0.8.32, RWKV_V7_ON=1 RWKV_DE_VERSION=1, strategy 'cpu fp32'
    dense        rwkvc's cpu artifact: the merged tables in float32, held in memory by the runtime
    lazy-f16     lazy-emb (the embedding and the tables memory-mapped, rows in float16)
    lazy-int8    lazy-emb(storage=int8)
    lazy-int8-step  the same artifact fed the prompt one token at a time: only the step session exists, so
                 ONNX Runtime holds one pre-packed copy of the float32 matrices instead of two

The systems run interleaved (--rounds rounds of each, in turn); decode tokens/s is the median over the rounds,
peak RSS the maximum. --threads N gives every system N threads (torch.set_num_threads, RWKVC_THREADS); by
default each picks its own. --rpi5 also compiles the rpi5 artifact with lazy-emb(storage=int8) and reports the
peak RSS of its native runner under qemu-aarch64 (qemu's own process: the guest's memory plus qemu's
translation buffers) after a 16-token prefill and 8 decoded tokens. Writes deepembed_memory.json and
deepembed_memory.png (peak RSS and tokens/s per system) into --work.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(n_layer=12, n_embd=768, head_size=64, vocab_size=65536, deep_embed=32)
SYSTEMS = {"official": None, "dense": None, "lazy-f16": "lazy-emb(storage=float16)",
           "lazy-int8": "lazy-emb(storage=int8)", "lazy-int8-step": None}
STEP_ONLY = {"lazy-int8-step": "lazy-int8"}   # the same artifact, the prompt fed token by token (no prefill session)
PROMPT_LEN = 16


def status() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
    return out


def child(system: str, work: Path, tokens: int) -> dict:
    """One system in this process: load, prefill, decode `tokens` greedy tokens; its memory and speed."""
    import numpy as np
    prompt = np.random.default_rng(0).integers(0, SHAPE["vocab_size"], PROMPT_LEN).tolist()
    t0 = time.time()
    if system == "official":
        import contextlib
        import io

        import torch
        if os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        with contextlib.redirect_stdout(io.StringIO()):
            from rwkv.model import RWKV
            m = RWKV(str(work / "model"), "cpu fp32")
        load_s = time.time() - t0
        out, st = m.forward(prompt, None)
        tok = int(torch.argmax(out))
        t1 = time.time()
        for _ in range(tokens):
            out, st = m.forward([tok], st)
            tok = int(torch.argmax(out))
    else:
        import rwkvc
        m = rwkvc.load(work / STEP_ONLY.get(system, system))
        load_s = time.time() - t0
        if system in STEP_ONLY:
            st = None
            for t in prompt:
                out, st = m.forward([t], st)
        else:
            out, st = m.forward(prompt, None)
        tok = int(np.argmax(out))
        t1 = time.time()
        for _ in range(tokens):
            out, st = m.forward([tok], st)
            tok = int(np.argmax(out))
    return {"system": system, "load_s": load_s, "tok_s": tokens / (time.time() - t1), **status()}


def run_child(system: str, work: Path, tokens: int, threads: int | None = None) -> dict:
    env = dict(os.environ, RWKV_V7_ON="1", RWKV_DE_VERSION="1", RWKV_JIT_ON="0", RWKV_CUDA_ON="0")
    if threads:
        env.update(RWKVC_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    r = subprocess.run([sys.executable, __file__, "--child", system, "--work", str(work), "--tokens", str(tokens)],
                       capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"{system} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def prepare(work: Path, rpi5: bool) -> None:
    """The bf16 checkpoint and the artifacts (kept in `work`; delete it to rebuild)."""
    import rwkvc
    from rwkvc.testing import random_v7_state_dict, save_state_dict
    ckpt = work / "model.pth"
    if not ckpt.exists():
        t = time.time()
        save_state_dict(random_v7_state_dict(**SHAPE, dtype="bf16", seed=0), ckpt)
        print(f"checkpoint {ckpt.stat().st_size / 1e9:.2f} GB in {time.time() - t:.0f} s", flush=True)
    for name, passes in SYSTEMS.items():
        if name != "official" and name not in STEP_ONLY and not (work / name).exists():
            t = time.time()
            rwkvc.compile(ckpt, work / name, target="cpu", passes=passes)
            print(f"compiled {name} in {time.time() - t:.0f} s", flush=True)
    if rpi5 and not (work / "rpi5").exists():
        t = time.time()
        rwkvc.compile(ckpt, work / "rpi5", target="rpi5", passes="lazy-emb(storage=int8)")
        print(f"compiled rpi5 in {time.time() - t:.0f} s", flush=True)


def rpi5_rss(work: Path) -> dict:
    """Peak RSS of the rpi5 runner (qemu-aarch64's process) after a prefill and 8 decoded tokens."""
    import numpy as np

    import rwkvc
    m = rwkvc.load(work / "rpi5")
    prompt = np.random.default_rng(0).integers(0, SHAPE["vocab_size"], PROMPT_LEN).tolist()
    out, st = m.forward(prompt, None)
    t = time.time()
    for _ in range(8):
        out, st = m.forward([int(np.argmax(out))], st)
    tok_s = 8 / (time.time() - t)
    pid = m.runtime.proc.pid
    st_ = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            st_[k] = int(v.split()[0]) * 1024
    m.runtime.close()
    return {"system": "rpi5 (qemu)", "tok_s": tok_s, **st_}


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(results)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.bar(names, [results[n]["peak_rss"] / 1e9 for n in names], color="#4477aa")
    a.set_ylabel("peak RSS (GB)")
    a.set_title("resident memory")
    sp = [n for n in names if results[n].get("tok_s")]
    b.bar(sp, [results[n]["tok_s"] for n in sp], color="#cc6677")
    b.set_ylabel("decode tokens/s")
    b.set_title("decode speed")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle("RWKV-7a 0.1B-shaped (L12 C768 V65536, tables 12 x 65536 x 1024), bf16 file")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "rwkvc-deepembed-bench"))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rpi5", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    work = Path(a.work)
    if a.child:
        print(json.dumps(child(a.child, work, a.tokens)))
        return
    work.mkdir(parents=True, exist_ok=True)
    prepare(work, a.rpi5)
    runs: dict[str, list] = {n: [] for n in SYSTEMS}
    for r in range(a.rounds):
        for n in SYSTEMS:
            res = run_child(n, work, a.tokens, a.threads)
            runs[n].append(res)
            print(f"round {r}: {n:<10} peak RSS {res['VmHWM'] / 1e9:6.2f} GB (at the end: anon "
                  f"{res['RssAnon'] / 1e9:.2f} GB, file {res['RssFile'] / 1e9:.2f} GB), load {res['load_s']:.1f} s, "
                  f"decode {res['tok_s']:.1f} tok/s", flush=True)
    results = {n: {"peak_rss": max(x["VmHWM"] for x in rs), "rss_anon": max(x["RssAnon"] for x in rs),
                   "rss_file": max(x["RssFile"] for x in rs), "tok_s": statistics.median(x["tok_s"] for x in rs),
                   "load_s": statistics.median(x["load_s"] for x in rs)} for n, rs in runs.items()}
    if a.rpi5:
        res = rpi5_rss(work)
        print(f"rpi5 runner under qemu: peak RSS {res['VmHWM'] / 1e9:.2f} GB (anon {res['RssAnon'] / 1e9:.2f} GB, "
              f"file {res['RssFile'] / 1e9:.2f} GB), {res['tok_s']:.2f} tok/s emulated", flush=True)
        results["rpi5 (qemu)"] = {"peak_rss": res["VmHWM"], "rss_anon": res["RssAnon"], "rss_file": res["RssFile"],
                                  "tok_s": None, "emulated_tok_s": res["tok_s"]}
    off = results["official"]
    for n, r in results.items():
        r["rss_vs_official"] = r["peak_rss"] / off["peak_rss"]
        if r.get("tok_s"):
            r["speed_vs_official"] = r["tok_s"] / off["tok_s"]
        print(f"{n:<12} peak RSS {r['peak_rss'] / 1e9:6.2f} GB = {r['rss_vs_official']:.3f} x official"
              + (f", decode {r['tok_s']:.1f} tok/s = {r['speed_vs_official']:.2f} x official"
                 if r.get("tok_s") else ""))
    tmp = work / "deepembed_memory.json.tmp"
    tmp.write_text(json.dumps({"shape": SHAPE, "tokens": a.tokens, "rounds": a.rounds, "threads": a.threads,
                               "results": results}, indent=1))
    os.replace(tmp, work / "deepembed_memory.json")
    plot(results, work / "deepembed_memory.png")
    print(f"wrote {work / 'deepembed_memory.json'} and {work / 'deepembed_memory.png'}")


if __name__ == "__main__":
    main()
