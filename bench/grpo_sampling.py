"""GRPO's sampling: the PyTorch policy against the compiled artifact, per GRPO step, one thread each.

    python bench/grpo_sampling.py --load_model CKPT --prompts train.jsonl [--prompts_per_step 8]
        [--group_size 8] [--max_new_tokens 3,32] [--reps 3] [--out docs/grpo_sampling.png]

One GRPO step samples G completions of P prompts from the policy's current weights, which change every
step. Three ways, alternated within each repetition so that they share the machine's moments:

    torch, groups batched   grpo_policy.sample_groups: each prompt read once, its state copied to the group,
                            all P*G rows stepping together (what training/grpo.py does)
    torch, one row a time   the same model, each completion on its own (prompt read once per completion)
    artifact                the weights saved, `rwkvc compile` (cpu target), loaded, then each prompt read
                            once and each completion stepped from a copy of its state (the artifact's
                            step takes one row); its compile + load cost is paid again every step

Sampling is tempered multinomial at temperature 1 (numpy for the artifact, torch for the model); the
stop is the end-of-text token or max_new_tokens. Prints a table and writes a PNG.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def torch_batched(policy, prompts, G, n, tok, gen):
    from rwkvc.training.grpo_policy import sample_groups
    return sample_groups(policy, prompts, G, tok, temperature=1.0, top_p=1.0, max_new_tokens=n, stops=(), gen=gen,
                         eod=0, ban=None)


@torch.no_grad()
def torch_rows(model, prompts, G, n, gen):
    for p in prompts:
        for _ in range(G):
            lg, st = model(torch.tensor([p]))
            lg = lg[:, -1]
            for _ in range(n):
                t = torch.multinomial(torch.softmax(lg, -1), 1, generator=gen)
                if int(t) == 0:
                    break
                lg, st = model(t, st)
                lg = lg[:, -1]


def artifact_compile(model, work: Path):
    import rwkvc
    from rwkvc.pipeline import compile_checkpoint
    t = time.perf_counter()
    ck = work / "policy.pth"
    torch.save(model.state_dict(), ck)
    compile_checkpoint(str(ck), str(work / "art"), target="cpu", force=True)
    m = rwkvc.load(str(work / "art"), threads=1)
    return m, time.perf_counter() - t


def artifact_sample(m, prompts, G, n, rng):
    for p in prompts:
        lg0, st0 = m.forward(p)
        for _ in range(G):
            lg, st = lg0, st0
            for _ in range(n):
                z = lg.astype(np.float64).ravel()
                pr = np.exp(z - z.max())
                t = int(rng.choice(len(pr), p=pr / pr.sum()))
                if t == 0:
                    break
                lg, st = m.forward([t], st)


def plot(rows, path: Path, model: str = ""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rwkvc.training.files import atomic_write
    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = [f"{r['max_new_tokens']} new tokens" for r in rows]
    x = np.arange(len(rows))
    w = 0.26
    ax.bar(x - w, [r["torch_batched_s"] for r in rows], w, label="torch, groups batched (grpo.py)")
    ax.bar(x, [r["torch_rows_s"] for r in rows], w, label="torch, one row at a time")
    ax.bar(x + w, [r["artifact_sample_s"] for r in rows], w, label="artifact: sampling")
    ax.bar(x + w, [r["artifact_compile_s"] for r in rows], w, bottom=[r["artifact_sample_s"] for r in rows],
           label="artifact: save + compile + load")
    ax.set_xticks(x, labels)
    ax.set_ylabel("seconds per GRPO step (median)")
    ax.set_title(f"sampling {rows[0]['prompts']} prompts x G {rows[0]['group']} from the current weights{model}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load_model", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--prompts_per_step", type=int, default=8)
    ap.add_argument("--group_size", type=int, default=8)
    ap.add_argument("--max_new_tokens", default="3,32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from rwkvc.tokenizer import WorldTokenizer
    from rwkvc.training.grpo_policy import load_module, make_policy
    tok = WorldTokenizer()
    _, model, _ = load_module(a.load_model)
    model.eval()
    policy = make_policy(model)
    lines = Path(a.prompts).read_text().splitlines()[:a.prompts_per_step]
    prompts = [tok.encode(json.loads(x)["prompt"]) for x in lines]
    P, G = len(prompts), a.group_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in a.max_new_tokens.split(",")):
            t = {"torch_batched": [], "torch_rows": [], "artifact_compile": [], "artifact_sample": []}
            for r in range(a.reps):
                gen = torch.Generator().manual_seed(r)
                s = time.perf_counter()
                torch_batched(policy, prompts, G, n, tok, gen)
                t["torch_batched"].append(time.perf_counter() - s)
                s = time.perf_counter()
                torch_rows(model, prompts, G, n, gen)
                t["torch_rows"].append(time.perf_counter() - s)
                m, c = artifact_compile(model, Path(tmp))
                t["artifact_compile"].append(c)
                s = time.perf_counter()
                artifact_sample(m, prompts, G, n, np.random.default_rng(r))
                t["artifact_sample"].append(time.perf_counter() - s)
                del m
            row = {"max_new_tokens": n, "prompts": P, "group": G,
                   **{f"{k}_s": statistics.median(v) for k, v in t.items()}}
            row["artifact_total_s"] = row["artifact_compile_s"] + row["artifact_sample_s"]
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    print("| new tokens | torch, groups batched | torch, one row at a time | artifact sampling | "
          "artifact save+compile+load | artifact total |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['max_new_tokens']} | {r['torch_batched_s']:.2f} s | {r['torch_rows_s']:.2f} s | "
              f"{r['artifact_sample_s']:.2f} s | {r['artifact_compile_s']:.2f} s | {r['artifact_total_s']:.2f} s |")
    if a.out:
        n = sum(p.numel() for p in model.parameters())
        plot(rows, Path(a.out), f" ({n / 1e6:.1f}M params, V {model.cfg.vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
