"""RNN mode against a transformer: decode latency, memory and whole-context time as the context grows.

    python bench/rnn_mode.py                              # demo shape, 16..16384 tokens, and the 0.1B shape
    python bench/rnn_mode.py --shapes demo --max_ctx 4096 --out_dir /tmp/rnn_mode
    python bench/rnn_mode.py --rwkv ART_DIR --gpt ART_DIR # artifacts of your own (the GPT's block_size bounds
                                                          # its context)

For each shape an RWKV-7 (compiled for the cpu target, rwkvc's default lowering) and a GPT of nearly the
same parameter count (exported by targets/gpt_onnx.py, ONNX Runtime too) are built from random weights
(time and memory do not depend on the weights' values) with the GPT's block_size = --max_ctx:

    demo   RWKV-7 L4 C128 V65536 (the KJV demo's shape)    GPT L4 C128, 4 heads
    0.1b   RWKV-7 L12 C768 V65536 (RWKV-7 0.1B)            GPT L12 C768, 12 heads (GPT-2 124M's blocks)

Each model runs in its own child process (so its RSS is its own), and the parent drives both in turn,
one context length at a time (the two models' runs interleave, so both sample the same moments of a
shared machine). At each length n (16, 32, ... --max_ctx) a child:

    grows its context from the previous length to n with random tokens (the prefill graph; 512- or
        1024-token chunks), timed; the sum over lengths so far is the time to process a whole n-token
        context from scratch
    decodes --steps tokens on a branch of that context through the step graph, each timed (the fastest is
        reported, as `rwkvc bench` does: on a shared machine the others measure the neighbours; the median
        is in the JSON)
    reports its resident memory (VmRSS) and its state bytes: RWKV's recurrent state (constant) or the GPT's
        KV cache (2 L C n floats)

Writes rnn_mode.json, rnn_mode.md (tables) and rnn_mode.png (per-token latency, memory, whole-context time
against context length, log x) to --out_dir. Timings on a shared machine are noisy; the ratios and the
shapes of the curves are what to read.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {"demo": dict(n_layer=4, n_embd=128, head_size=32, vocab_size=65536),
          "0.1b": dict(n_layer=12, n_embd=768, head_size=64, vocab_size=65536)}


def rss_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _built(out: Path, block_size: int | None = None) -> bool:
    """An artifact from an earlier run is in `out` (for a GPT: with at least `block_size` positions)."""
    try:
        m = json.loads((out / "manifest.json").read_text())["model"]
    except (OSError, ValueError, KeyError):
        return False
    return block_size is None or m.get("block_size", 0) >= block_size


def build_rwkv(shape: dict, out: Path) -> Path:
    import torch

    import rwkvc
    from rwkvc.reference.v7 import RWKV7, V7Config
    cfg = V7Config(n_layer=shape["n_layer"], n_embd=shape["n_embd"], head_size=shape["head_size"],
                   vocab_size=shape["vocab_size"], **V7Config.default_dims(shape["n_embd"]))
    with torch.device("meta"):
        n = sum(p.numel() for p in RWKV7(cfg).parameters())
    if _built(out):
        return out, n
    m = RWKV7(cfg).init_weights(seed=0)
    ckpt = out.with_suffix(".pth")
    torch.save(m.state_dict(), ckpt)
    path = rwkvc.compile(str(ckpt), str(out), target="cpu", force=True, progress=False)
    ckpt.unlink()
    return Path(path), sum(p.numel() for p in m.parameters())


def build_gpt(shape: dict, block_size: int, out: Path) -> Path:
    from rwkvc.reference.gpt import GPT, GPTConfig
    from rwkvc.targets.gpt_onnx import export_gpt
    cfg = GPTConfig(n_layer=shape["n_layer"], n_embd=shape["n_embd"], n_head=shape["n_embd"] // shape["head_size"],
                    vocab_size=shape["vocab_size"], block_size=block_size)
    import torch
    with torch.device("meta"):
        n = sum(p.numel() for p in GPT(cfg).parameters())
    if _built(out, block_size):
        return out, n
    return export_gpt(GPT(cfg).init_weights(seed=0), out, force=True), n


def _build_both(shape: dict, block_size: int, work: Path) -> dict:
    """{name: (artifact, parameters)}, built in this (child) process, or reused from `work`."""
    return {"RWKV-7": build_rwkv(shape, work / f"rwkv7-{shape['n_layer']}x{shape['n_embd']}"),
            "GPT": build_gpt(shape, block_size, work / f"gpt-{shape['n_layer']}x{shape['n_embd']}")}


def params_of(path: Path) -> int:
    """About the parameters of an artifact: its weight file's float32 elements (layouts a lowering adds
    count too)."""
    return sum(info["bytes"] for rel, info in json.loads((path / "manifest.json").read_text())["files"].items()
               if rel.startswith("weights")) // 4


def _child(conn, path: str, threads: int, steps: int, seed: int):
    """Load one artifact; for each context length the parent sends, grow to it and time decode steps."""
    import numpy as np

    import rwkvc
    m = rwkvc.load(path, threads=threads)
    rng = np.random.default_rng(seed)
    V = m.config.vocab_size
    m.forward([1, 2])                   # both sessions made (ONNX Runtime loads a graph on first use)
    m.forward([1])
    state, n = None, 0
    conn.send({"rss_loaded": rss_bytes()})
    while True:
        target = conn.recv()
        if target is None:
            break
        toks = rng.integers(1, min(V, 65530), target - n).tolist()
        t0 = time.perf_counter()
        logits, state = m.forward(toks, state)
        grow = time.perf_counter() - t0
        n = target
        st, tok, times = state, int(np.argmax(logits)), []
        for _ in range(steps):
            t0 = time.perf_counter()
            lg, st = m.forward([tok], st)
            times.append(time.perf_counter() - t0)
            tok = int(np.argmax(lg))
        state_bytes = state.nbytes if hasattr(state, "nbytes") and not hasattr(state, "shift") else \
            int(state.shift.nbytes + state.wkv.nbytes)
        conn.send({"ctx": target, "grow_s": grow, "step_ms": 1000 * statistics.median(times),
                   "step_ms_min": 1000 * min(times), "rss": rss_bytes(), "state_bytes": int(state_bytes)})
        del st
    conn.close()


def flat_check(path: Path, long: int, steps: int = 24, threads: int = 1) -> dict:
    """One artifact, one process: decode steps alternate between the state after 16 tokens and the state after
    `long` tokens, so both sample the same moments; the ratio of their median step times is the context's
    effect alone (1.0 for an RNN)."""
    import numpy as np

    import rwkvc
    m = rwkvc.load(path, threads=threads)
    toks = np.random.default_rng(0).integers(1, min(m.config.vocab_size, 65530), long).tolist()
    states = {16: m.forward(toks[:16])[1], long: m.forward(toks)[1]}
    times = {n: [] for n in states}
    for i in range(steps):
        for n, st in states.items():
            t0 = time.perf_counter()
            m.forward([int(toks[i])], st)
            times[n].append(time.perf_counter() - t0)
    med = {n: 1000 * statistics.median(v) for n, v in times.items()}
    return {"artifact": str(path), "steps": steps, "median_ms": med, "ratio": med[long] / med[16]}


def run_pair(arts: dict, contexts: list[int], threads: int, steps: int, log=print, on_row=None) -> dict:
    """Drive one child per model through `contexts`, alternating between them at each length."""
    ctx = mp.get_context("spawn")
    kids = {}
    for name, path in arts.items():
        a, b = ctx.Pipe()
        p = ctx.Process(target=_child, args=(b, str(path), threads, steps, 0), daemon=True)
        p.start()
        kids[name] = (p, a)
    rows = {name: [] for name in arts}
    loaded = {name: a.recv()["rss_loaded"] for name, (p, a) in kids.items()}
    try:
        from tqdm import tqdm
        for n in tqdm(contexts, desc="contexts", file=sys.stderr):
            for name, (p, a) in kids.items():
                a.send(n)
                rows[name].append(a.recv())
            log("  " + "  ".join(f"{k}: ctx {r[-1]['ctx']} step {r[-1]['step_ms_min']:.2f} ms, rss "
                                 f"{r[-1]['rss'] / 2**20:.0f} MiB, state {r[-1]['state_bytes'] / 2**20:.2f} MiB"
                                 for k, r in rows.items()))
            if on_row is not None:
                on_row(rows)
    finally:
        for p, a in kids.values():
            try:
                a.send(None)
            except OSError:
                pass
            p.join(timeout=30)
    for name, rs in rows.items():
        total = 0.0
        for r in rs:
            total += r["grow_s"]
            r["whole_s"] = total
    return {"rows": rows, "rss_loaded": loaded}


def markdown(shape: str, res: dict) -> str:
    names = list(res["rows"])
    head = ["context"] + [f"{n} {c}" for n in names for c in ("ms/token", "RSS MiB", "state/KV MiB", "whole s")]
    head += [f"{names[-1]}/{names[0]} ms/token"] if len(names) == 2 else []
    sizes = ", ".join(f"{n}: {res['params'][n] / 1e6:.1f}M params" for n in names)
    lines = [f"**{shape}** ({sizes})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r0 in enumerate(res["rows"][names[0]]):
        cells = [str(r0["ctx"])]
        for n in names:
            r = res["rows"][n][i]
            cells += [f"{r['step_ms_min']:.2f}", f"{r['rss'] / 2**20:.0f}", f"{r['state_bytes'] / 2**20:.3f}",
                      f"{r['whole_s']:.2f}"]
        if len(names) == 2:
            cells.append(f"{res['rows'][names[1]][i]['step_ms_min'] / r0['step_ms_min']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = list(results)
    fig, axes = plt.subplots(len(shapes), 3, figsize=(13, 3.6 * len(shapes)), dpi=90, squeeze=False)
    colors = {"RWKV-7": "tab:blue", "GPT": "tab:orange"}
    for row, shape in zip(axes, shapes):
        res = results[shape]
        for name, rs in res["rows"].items():
            x = [r["ctx"] for r in rs]
            c = colors.get(name)
            row[0].plot(x, [r["step_ms_min"] for r in rs], "o-", color=c, ms=3, label=name)
            row[1].plot(x, [r["rss"] / 2**20 for r in rs], "o-", color=c, ms=3, label=f"{name} RSS")
            row[1].plot(x, [r["state_bytes"] / 2**20 for r in rs], "s--", color=c, ms=3,
                        label=f"{name} {'KV cache' if name == 'GPT' else 'state'}")
            row[2].plot(x, [r["whole_s"] for r in rs], "o-", color=c, ms=3, label=name)
        for ax, title, ylab in zip(row, ("decode: time per token", "memory", "processing the whole context"),
                                   ("ms / token", "MiB", "seconds")):
            ax.set_xscale("log", base=2)
            ax.set_title(f"{shape}: {title}", fontsize=10)
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel(ylab)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        row[0].set_yscale("log")
        row[1].set_yscale("log")
        row[2].set_yscale("log")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return path


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="demo,0.1b", help=f"comma-separated: {', '.join(SHAPES)}")
    ap.add_argument("--max_ctx", type=int, default=16384, help="longest context (16, 32, ... up to it)")
    ap.add_argument("--max_ctx_0.1b", dest="max_ctx_big", type=int, default=0,
                    help="longest context at the 0.1b shape (0 = --max_ctx)")
    ap.add_argument("--steps", type=int, default=8, help="decode steps timed at each length (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="threads of each model's ONNX Runtime sessions")
    ap.add_argument("--rwkv", default=None, help="an RWKV artifact to use instead of a random one (one shape)")
    ap.add_argument("--gpt", default=None, help="a GPT artifact to use instead of a random one (one shape)")
    ap.add_argument("--work_dir", default=None, help="where the random models' artifacts go (default: a temp dir)")
    ap.add_argument("--out_dir", default="out/rnn_mode")
    ap.add_argument("--flat_check", default=None, metavar="ART",
                    help="no sweep: alternate decode steps of ART from a 16-token and a --max_ctx-token state "
                         "in one process and print their median times and ratio")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="no measuring: the tables and plot of these rnn_mode.json files' shapes together")
    a = ap.parse_args(argv)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    if a.flat_check:
        r = flat_check(Path(a.flat_check), a.max_ctx, max(a.steps, 2), a.threads)
        print(json.dumps(r, indent=1))
        return 0
    if a.merge:
        for f in a.merge:
            results.update(json.loads(Path(f).read_text())["results"])
        return _report(results, out)
    with tempfile.TemporaryDirectory(prefix="rnn-mode-") as tmp:
        work = Path(a.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        shapes = ["custom"] if a.rwkv and a.gpt else [s.strip() for s in a.shapes.split(",") if s.strip()]
        for shape in shapes:
            max_ctx = a.max_ctx_big if shape == "0.1b" and a.max_ctx_big else a.max_ctx
            contexts = [n for n in (2 ** k for k in range(4, 31)) if n <= max_ctx]
            if shape == "custom":
                arts = {"RWKV-7": Path(a.rwkv), "GPT": Path(a.gpt)}
                params = {k: params_of(p) for k, p in arts.items()}
            else:
                block = max(max_ctx + a.steps, 16)
                print(f"{shape}: building the RWKV-7 and the GPT (block_size {block}) ...", file=sys.stderr)
                t0 = time.time()
                from concurrent.futures import ProcessPoolExecutor
                with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:   # the parent stays small
                    built = pool.submit(_build_both, SHAPES[shape], block, work).result()
                arts = {k: v[0] for k, v in built.items()}
                params = {k: v[1] for k, v in built.items()}
                print(f"  built in {time.time() - t0:.0f} s", file=sys.stderr)
            def partial(rows, shape=shape):   # what a run stopped part way keeps
                _write(out / "rnn_mode.partial.json", json.dumps({shape: rows}, indent=1))
            res = run_pair(arts, contexts, a.threads, a.steps, log=lambda t: print(t, file=sys.stderr),
                           on_row=partial)
            res["params"] = params
            results[shape] = res
            _write(out / "rnn_mode.json", json.dumps({"results": results, "args": vars(a),
                                                      "date": time.strftime("%Y-%m-%d")}, indent=1))
    return _report(results, out)


def _report(results: dict, out: Path) -> int:
    md = "\n".join(markdown(s, r) for s, r in results.items())
    _write(out / "rnn_mode.md", md)
    plot(results, out / "rnn_mode.png")
    print(md)
    print(f"wrote {out / 'rnn_mode.md'}, {out / 'rnn_mode.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
