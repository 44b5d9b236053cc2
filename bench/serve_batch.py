"""Serving benchmarks: aggregate decode tokens/s against the batch size, and time to first token with and
without a prefix-cache hit.

    python bench/serve_batch.py ART [ART ...] [--batches 1,2,4,8,16] [--steps 16] [--reps 3] [--threads 2] [--cpu-time]
    python bench/serve_batch.py ART --ttft --prefix 2000
    python bench/serve_batch.py ART --http 1,8 [--requests 2] [--max-tokens 32]
    python bench/serve_batch.py ART --prefill 4 [--chunk 128] [--reps 3]
    python bench/serve_batch.py ART [ART ...] --profile [--batches 1,8] [--steps 16]

Decode: B sequences (each prefilled with its own short prompt) advance by --steps tokens with one
batch_step call a step (rwkvc.runtimes.ort_batch.BatchPool); tokens/s = B * steps / seconds, best of
--reps (--cpu-time: per CPU second of the process instead). "1 stream" is one sequence on the artifact's
own step graph (Model.forward: the fused kernels where the artifact has them), which is what `rwkvc run`
does; B = 1 is what a lone request gets from `rwkvc serve`. Every batch size
of every artifact is measured in turn within each repetition, so they share the machine's moments.
Greedy sampling (argmax) is included in the time, as the server does it.

Prefill: B sequences (each with its own incoming state) advance by --chunk tokens each, either as B
separate calls of the artifact's own prefill graph (Model.forward, what the engine does one prompt at a
time) or as one batch_prefill call (rwkvc.runtimes.ort_batch.prefill_batch); the two alternate within
each repetition, best of --reps; the ratio is separate time / batched time.

Profile: where a batched step's time goes, by operator type (ONNX Runtime's profiler), for each batch size:
milliseconds a step (each node's fastest of the --steps runs, so that moments when other processes took
the cores count less) and the share of the kernels' total, the artifacts and batch sizes interleaved step by
step (so a moment of the shared machine falls on all of them).

HTTP: end to end through `rwkvc serve` (a server in this process, the openai package's async client), K
concurrent clients each sending --requests greedy completions of --max-tokens tokens (token 0 banned so
every request runs to its length); aggregate generated tokens/s and the engine's mean batch.

TTFT: the serving engine (rwkvc.serve.Engine) receives a chat request whose system message is a --prefix
token text, then a second request with the same system message and another question: the first prefills
everything (cold), the second resumes from the cached state after the system message (hit). Time from
submit to the first generated token; best of --reps, each rep with a fresh cache.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import numpy as np


def decode_rates(arts, batches, steps, reps, threads, clock=time.perf_counter):
    import rwkvc
    from rwkvc.runtimes.ort_batch import BatchPool
    runs = []
    for art in arts:
        m = rwkvc.load(art, threads=threads)
        pools = {b: BatchPool(m.runtime, b) for b in batches}
        prompts = [m.encode(f"Sequence {i} begins here:") for i in range(max(batches))]
        states = [m.forward(p)[1] for p in prompts]
        for b, pool in pools.items():
            for s in states[:b]:
                pool.add(s)
        runs.append((art, m, pools, states))
    best: dict = {}
    for _ in range(reps):
        for art, m, pools, states in runs:
            # one stream on the artifact's own step
            st, tok = states[0], 11
            t0 = clock()
            for _ in range(steps):
                logits, st = m.forward([tok], st)
                tok = int(np.argmax(logits))
            r = steps / (clock() - t0)
            best[(art, "step")] = max(best.get((art, "step"), 0), r)
            for b, pool in pools.items():
                toks = np.full(b, 11, np.int64)
                t0 = clock()
                for _ in range(steps):
                    logits = pool.step(toks)
                    toks = logits.argmax(axis=1)
                r = b * steps / (clock() - t0)
                best[(art, b)] = max(best.get((art, b), 0), r)
    out = []
    for art, *_ in runs:
        one = best[(art, "step")]
        row = {"artifact": art, "one_stream_tokens_per_s": round(one, 1),
               "batched": {b: {"tokens_per_s": round(best[(art, b)], 1), "x_one_stream": round(best[(art, b)] / one, 2)}
                           for b in batches}}
        out.append(row)
    return out


def prefill_rates(art, B, T, reps, threads):
    """Prompt tokens/s of B separate prefills of T tokens against one batched prefill of (B, T)."""
    import rwkvc
    from rwkvc.runtimes.ort_batch import prefill_batch
    m = rwkvc.load(art, threads=threads)
    states = [m.forward(m.encode(f"Sequence {i} begins here:"))[1] for i in range(B)]
    toks = np.random.default_rng(0).integers(1, m.config.vocab_size, size=(B, T))
    prefill_batch(m.runtime, toks[:, :8], states)               # load both sessions before timing
    m.forward(toks[0, :8], states[0])
    sep, bat = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        for b in range(B):
            m.forward(toks[b], states[b])
        sep.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        prefill_batch(m.runtime, toks, states)
        bat.append(time.perf_counter() - t0)
    s, b = min(sep), min(bat)
    return {"artifact": art, "B": B, "T": T, "separate_s": round(s, 3), "batched_s": round(b, 3),
            "separate_tokens_per_s": round(B * T / s, 1), "batched_tokens_per_s": round(B * T / b, 1),
            "speedup": round(s / b, 2)}


def profile_steps(arts, batches, steps, threads):
    """{artifact: {B: {"step_ms": best step, "ops": {op type: ms a step}}}} of batch_step under ONNX Runtime's
    profiler, every (artifact, B) session stepping in turn."""
    import collections
    import tempfile
    from pathlib import Path

    import onnxruntime as ort

    import rwkvc
    from rwkvc.runtimes.ort_batch import BATCH_ENTRY, BatchPool
    runs = []
    for art in arts:
        m = rwkvc.load(art, threads=threads)
        states = [m.forward(m.encode(f"Sequence {i} begins here:"))[1] for i in range(max(batches))]
        so = m.runtime.so
        so.enable_profiling = True
        path = str(m.runtime.path / m.runtime.manifest["entry_points"][BATCH_ENTRY])
        for b in batches:
            so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "prof")
            pool = BatchPool(m.runtime, b)
            pool.sess = ort.InferenceSession(path, so, providers=m.runtime.providers)
            for s in states[:b]:
                pool.add(s)
            pool.step(np.full(b, 11, np.int64))   # (the first run allocates; it is left out below)
            runs.append((art, b, pool, [], m))   # (m: its runtime owns the weights the session reads)
        so.enable_profiling = False
    toks = {(art, b): np.full(b, 11, np.int64) for art, b, *_ in runs}
    for _ in range(steps):
        for art, b, pool, times, _ in runs:
            t0 = time.perf_counter()
            logits = pool.step(toks[(art, b)])
            toks[(art, b)] = logits.argmax(axis=1)
            times.append(time.perf_counter() - t0)
    out: dict = {}
    for art, b, pool, times, _ in runs:
        events = json.loads(Path(pool.sess.end_profiling()).read_text())
        # each node's fastest run (a node that another process preempted is slow in that run only), summed by op type
        fastest: dict = {}
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                key = (e["args"].get("op_name"), e["args"].get("node_index"))
                fastest[key] = min(fastest.get(key, float("inf")), e["dur"])
        agg: dict = collections.defaultdict(float)
        for (op, _), us in fastest.items():
            agg[op] += us
        out.setdefault(art, {})[b] = {"step_ms": round(min(times) * 1e3, 2),
                                      "median_ms": round(float(np.median(times)) * 1e3, 2),
                                      "ops": {k: round(v / 1e3, 3)
                                              for k, v in sorted(agg.items(), key=lambda kv: -kv[1])}}
    return out


def plot(rows, path) -> None:
    """Aggregate tokens/s against the batch size, one line per artifact, its one-stream rate dashed; written
    atomically (PNG)."""
    import io
    import os

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in rows:
        rates = {int(b): v["tokens_per_s"] for b, v in r["batched"].items()}   # keys are strings once in JSON
        bs = sorted(rates)
        line, = ax.plot(bs, [rates[b] for b in bs], marker="o",
                        label=f"{os.path.basename(str(r['artifact']).rstrip('/'))}: batched step")
        ax.axhline(r["one_stream_tokens_per_s"], ls="--", color=line.get_color(), alpha=0.6,
                   label=f"{os.path.basename(str(r['artifact']).rstrip('/'))}: one stream (own step)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(bs, [str(b) for b in bs])
    ax.set_xlabel("sequences decoded together (B)")
    ax.set_ylabel("aggregate decode tokens/s")
    ax.set_title("batched decode, 0.1B-shaped RWKV-7 (bench/serve_batch.py)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)


def ttft(art, prefix_tokens, reps, threads):
    import rwkvc
    from rwkvc.sampling import SamplingConfig
    from rwkvc.serve import Engine, Job
    from rwkvc.serve.chat import chat_segments
    m = rwkvc.load(art, threads=threads)
    words = ("and the light of the morning came upon the land where the people had gathered in the valley "
             "to hear the words of the elders ").split()
    text, i = "", 0
    while len(m.encode(text)) < prefix_tokens:
        text += words[i % len(words)] + " "
        i += 1
    cfg = SamplingConfig(temperature=0, token_stop=(0,))

    def one(eng, question):
        segs = tuple(tuple(m.encode(s)) for s in chat_segments([{"role": "system", "content": text},
                                                                {"role": "user", "content": question}]))
        done = threading.Event()
        h = eng.submit(Job(segs, 1, cfg), lambda kind, d: done.set() if kind in ("done", "error") else None)
        done.wait()
        return h.t_first - h.t_submit, sum(map(len, segs)), h.cached_tokens

    cold, hit = [], []
    for _ in range(reps):
        eng = Engine(m, max_batch=2, cache_bytes=512 << 20)
        c = one(eng, "What came upon the land?")
        h = one(eng, "Who had gathered in the valley?")
        eng.close()
        cold.append(c)
        hit.append(h)
    c, h = min(cold), min(hit)
    return {"artifact": art, "prefix_tokens": len(m.encode(text)), "prompt_tokens": [c[1], h[1]],
            "ttft_cold_s": round(c[0], 3), "ttft_hit_s": round(h[0], 3), "cached_tokens_on_hit": h[2],
            "speedup": round(c[0] / h[0], 1)}


def http_rates(art, clients, requests, max_tokens, threads):
    """Aggregate generated tokens/s through `rwkvc serve` (a server in this process, the openai package's
    async client): for each count of concurrent clients, each sends `requests` greedy completions."""
    import asyncio

    import openai

    from rwkvc.serve.server import BackgroundServer, load_engine
    eng = load_engine(art, max_batch=max(clients), cache_mb=64, threads=threads)
    out = {}
    with BackgroundServer(eng, "bench") as url:
        async def client(c, i):
            n = 0
            for j in range(requests):
                r = await c.completions.create(model="bench", prompt=f"Client {i} request {j}:", temperature=0,
                                               max_tokens=max_tokens, extra_body={"ban_token_ids": [0]})
                n += r.usage.completion_tokens
            return n

        async def run(k):
            async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600) as c:
                t0 = time.perf_counter()
                n = sum(await asyncio.gather(*(client(c, i) for i in range(k))))
                return n / (time.perf_counter() - t0)

        for k in clients:
            before = eng.stats()
            rate = asyncio.run(run(k))
            st = eng.stats()
            steps = st["steps"] - before["steps"]
            out[k] = {"tokens_per_s": round(rate, 1),
                      "mean_batch": round((st["step_sequences"] - before["step_sequences"]) / max(1, steps), 2)}
    eng.close()
    one = out[clients[0]]["tokens_per_s"]
    for v in out.values():
        v["x_first"] = round(v["tokens_per_s"] / one, 2)
    return {"artifact": art, "http": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ttft", action="store_true", help="time to first token with and without a prefix-cache hit")
    ap.add_argument("--prefix", type=int, default=2000, help="shared prefix length in tokens (--ttft)")
    ap.add_argument("--http", default=None, help="comma-separated concurrent client counts: end-to-end through the "
                                                  "server (e.g. 1,8)")
    ap.add_argument("--prefill", type=int, default=None, help="B: B separate prefills against one batched prefill")
    ap.add_argument("--chunk", type=int, default=128, help="tokens per sequence (--prefill)")
    ap.add_argument("--plot", default=None, help="write the decode rates as a PNG plot here")
    ap.add_argument("--cpu-time", action="store_true",
                    help="decode: tokens per CPU second of this process (time.process_time) instead of per wall "
                         "second; with --threads 1, what one core would give were it not shared")
    ap.add_argument("--profile", action="store_true", help="batch_step's time by operator type at each of --batches")
    ap.add_argument("--requests", type=int, default=2, help="requests per client (--http)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per request (--http)")
    a = ap.parse_args(argv)
    if a.profile:
        res = profile_steps(a.artifacts, [int(b) for b in a.batches.split(",")], a.steps, a.threads)
        for art, per_b in res.items():
            for b, r in per_b.items():
                tot = sum(r["ops"].values())
                print(f"{art}: B={b}: best step {r['step_ms']:.1f} ms (median {r['median_ms']:.1f}), kernels "
                      f"{tot:.1f} ms", file=sys.stderr)
                for op, ms in list(r["ops"].items())[:12]:
                    print(f"    {op:<24} {ms:8.2f} ms  {100 * ms / tot:5.1f} %", file=sys.stderr)
    elif a.prefill:
        res = [prefill_rates(art, a.prefill, a.chunk, a.reps, a.threads) for art in a.artifacts]
        for r in res:
            print(f"{r['artifact']}: B={r['B']} T={r['T']}: separate {r['separate_s'] * 1e3:.0f} ms "
                  f"({r['separate_tokens_per_s']} tokens/s), batched {r['batched_s'] * 1e3:.0f} ms "
                  f"({r['batched_tokens_per_s']} tokens/s): {r['speedup']}x", file=sys.stderr)
    elif a.http:
        res = [http_rates(art, [int(k) for k in a.http.split(",")], a.requests, a.max_tokens, a.threads)
               for art in a.artifacts]
        for r in res:
            for k, v in r["http"].items():
                print(f"{r['artifact']}: {k:3d} clients: {v['tokens_per_s']:8.1f} tokens/s ({v['x_first']}x; mean "
                      f"batch {v['mean_batch']})", file=sys.stderr)
    elif a.ttft:
        res = [ttft(art, a.prefix, a.reps, a.threads) for art in a.artifacts]
        for r in res:
            print(f"{r['artifact']}: {r['prefix_tokens']}-token shared prefix: TTFT cold {r['ttft_cold_s'] * 1e3:.0f} ms, "
                  f"prefix-cache hit {r['ttft_hit_s'] * 1e3:.0f} ms ({r['speedup']}x; {r['cached_tokens_on_hit']} "
                  f"tokens from the cache)", file=sys.stderr)
    else:
        res = decode_rates(a.artifacts, [int(b) for b in a.batches.split(",")], a.steps, a.reps, a.threads,
                           time.process_time if a.cpu_time else time.perf_counter)
        if a.plot:
            plot(res, a.plot)
        for r in res:
            print(f"{r['artifact']}: 1 stream (own step) {r['one_stream_tokens_per_s']:.1f} tokens/s", file=sys.stderr)
            for b, v in r["batched"].items():
                print(f"  batch {b:3d}: {v['tokens_per_s']:8.1f} tokens/s  ({v['x_one_stream']:.2f}x one stream)",
                      file=sys.stderr)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
