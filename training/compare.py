"""RWKV-7 against a GPT of the same parameter count, on the same tokens with the same budget.

    python training/compare.py                                   # the KJV demo corpus (training/demo.py)
    python training/compare.py --data_file data/mine --val_file data/mine-val --budget_tokens 2000000
    python training/compare.py --vocab full                      # the World ids as they are (V 65536)

Both models train through training/trainer.py with the same flags (data, ctx_len, batch, schedule, seed),
one after the other, so they see the same windows in the same order. The RWKV-7 is --n_layer x --n_embd;
the GPT has the same L and C, as a GPT block (attention 4C^2 + MLP 8C^2) and an RWKV-7 block (time-mix
4C^2 + low-rank terms, channel-mix 8C^2) are nearly the same size; where that is not within 5 % of the
RWKV-7's parameter count (small C, where the low-rank terms weigh more), its MLP width is set to match
(both counts are printed). Writes to --out_dir:

    data/                     the corpus with its token ids renumbered (--vocab compact, the default)
    compare.md, compare.csv   train loss (mean of the last tenth of steps), validation loss, parameters,
                              tokens, wall time, for each model
    compare.png               both training-loss curves (smoothed) and validation points against tokens
    rwkv7/, gpt/              each run's proj_dir (checkpoints, metrics.jsonl); a rerun resumes / reuses them
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from rwkvc.errors import RwkvcError
from rwkvc.training.config import TrainArgs
from rwkvc.training.files import ArgumentParser, atomic_write, atomic_write_text, script_main

# the demo recipe's optimisation (training/demo.py RECIPE), shared by both models
BASE = dict(head_size_a=32, ctx_len=128, micro_bsz=8, vocab_size=65536, lr_init=2e-3, lr_final=2e-4,
            warmup_steps=20, weight_decay=0.001, beta1=0.9, beta2=0.99, adam_eps=1e-8, accelerator="cpu",
            precision="fp32", wkv="chunked", chunk_len=32, random_seed=0, grad_clip=1.0, threads=1,
            epoch_save=0)
TOLERANCE = 0.05


def compact_vocab(data_file: str, val_file: str, out: Path) -> tuple[str, str, int]:
    """The same token streams with their ids renumbered 0..K-1 in order (0, the end of a document, stays 0),
    K the distinct ids of both: (train prefix, validation prefix, vocabulary size rounded up to 64). A World-
    tokenized corpus uses a few thousand of 65536 ids; renumbered, the head stops being most of the model
    and of the compute, and the loss still scores the same next tokens."""
    from rwkvc.binidx import MMapIndexedDataset, write_binidx
    streams = [np.asarray(MMapIndexedDataset(p).tokens) for p in (data_file, val_file) if p]
    ids = np.unique(np.concatenate(streams))
    out.mkdir(parents=True, exist_ok=True)
    prefixes = []
    for name, s in zip(("train", "val"), streams):
        tmp = out / f".{name}-compact.{os.getpid()}"
        write_binidx(tmp, [np.searchsorted(ids, s).astype(np.uint16)])
        for ext in ("bin", "idx"):          # whole files or none: renamed once written
            os.replace(f"{tmp}.{ext}", out / f"{name}-compact.{ext}")
        prefixes.append(str(out / f"{name}-compact"))
    return prefixes[0], (prefixes[1] if val_file else ""), int(math.ceil(len(ids) / 64) * 64)


def count_params(model: str, args: TrainArgs) -> int:
    """Parameters of the model `args` describe (built on the meta device: no memory, no init)."""
    import torch

    from rwkvc.training.trainer import MODELS
    with torch.device("meta"):
        m = MODELS[model].build(args.replace(model=model))
    return sum(p.numel() for p in m.parameters())


def match_gpt(args: TrainArgs, target: int) -> tuple[int, int, int, int]:
    """(n_layer, n_embd, dim_ffn, params) of the GPT to train against `target` parameters: the RWKV-7's L and
    C with the standard MLP (dim_ffn 0 = 4C) when that is within TOLERANCE (a GPT block, attention 4C^2 + MLP
    8C^2, is about an RWKV-7 block's size), else the same L and C with the MLP width (a multiple of 16) that
    comes nearest: the parameter count is linear in it, L (2C + 1) per unit."""
    L, C = args.n_layer, args.n_embd
    gpt = args.replace(model="gpt", dim_ffn=0)
    same = count_params("gpt", gpt)
    if abs(same - target) <= TOLERANCE * target:
        return L, C, 0, same
    F = max(16, int(round((4 * C + (target - same) / (L * (2 * C + 1))) / 16)) * 16)
    return L, C, F, count_params("gpt", gpt.replace(dim_ffn=F))


def _metrics(proj: Path) -> tuple[list, list]:
    rows = [json.loads(x) for x in (proj / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in rows if "loss" in r]
    vals = [r for r in rows if r.get("val_loss") is not None]
    return steps, vals


def _smooth(x, k: int):
    x = np.asarray(x, float)
    if len(x) < k or k < 2:
        return x
    c = np.cumsum(np.insert(x, 0, 0.0))
    return np.concatenate([np.cumsum(x[:k - 1]) / np.arange(1, k), (c[k:] - c[:-k]) / k])


def plot(results: list[dict], path: Path) -> Path:
    """Training loss (smoothed) and validation loss of each model against tokens, written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    lo = math.inf
    for r, color in zip(results, ("tab:blue", "tab:orange")):
        steps, vals = r["curve"], r["val_curve"]
        k = max(1, len(steps) // 25)
        smooth = _smooth([s["loss"] for s in steps], k)
        lo = min([lo, *smooth, *(v["val_loss"] for v in vals)])
        ax.plot([s["tokens"] for s in steps], smooth, color=color, lw=1.2,
                label=f"{r['name']} train ({r['params'] / 1e6:.2f}M params)")
        ax.plot([v["tokens"] for v in vals], [v["val_loss"] for v in vals], "o--", color=color, ms=4,
                label=f"{r['name']} validation")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("RWKV-7 vs GPT, same parameters, same tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_ylim(lo - 0.2, lo + 4.0)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def table(results: list[dict]) -> tuple[str, str]:
    """(markdown, csv) of the comparison."""
    cols = ["model", "shape", "params", "tokens", "train_loss", "val_loss", "wall_s"]
    rows = [[r["name"], r["shape"], r["params"], r["tokens"], f"{r['train_loss']:.4f}",
             f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "", f"{r['wall_s']:.0f}"] for r in results]
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    w.writerows(rows)
    return "\n".join(md) + "\n", buf.getvalue()


def run_one(name: str, model: str, args: TrainArgs, log) -> dict:
    import torch

    from rwkvc.training.trainer import train
    proj = Path(args.proj_dir)
    t0 = time.time()
    final = train(args, log=log)
    wall = time.time() - t0
    steps, vals = _metrics(proj)
    tail = steps[-max(1, len(steps) // 10):]
    sd = torch.load(final, map_location="cpu", weights_only=True)
    params = sum(v.numel() for k, v in sd.items() if k != "n_head")
    shape = f"L{args.n_layer} D{args.n_embd}" + (f" F{args.dim_ffn}" if args.dim_ffn else "")
    return {"name": name, "model": model, "shape": shape, "params": params,
            "tokens": steps[-1]["tokens"] if steps else 0, "train_loss": float(np.mean([s["loss"] for s in tail])),
            "val_loss": vals[-1]["val_loss"] if vals else None,
            # the training time the run logged (a rerun that reused a finished run adds nothing)
            "wall_s": steps[-1]["time"] if steps else wall, "curve": steps, "val_curve": vals,
            "checkpoint": str(final)}


def compare(data_file: str = "", val_file: str = "", out_dir: str = "out/compare", budget_tokens: int = 262144,
            n_layer: int = 4, n_embd: int = 128, evals: int = 4, vocab: str = "compact", log=print,
            **overrides) -> dict:
    """Train both models and write the table and the plot; returns {"results": [...], "files": [...]}."""
    out = Path(out_dir)
    base = {**BASE, **overrides}
    if not data_file:
        from rwkvc.cache import cache_root
        from rwkvc.training.demo import build_data
        data_file, val_file = build_data(cache_root() / "demo" / "data", base["ctx_len"], log)
    if vocab == "compact":
        data_file, val_file, base["vocab_size"] = compact_vocab(data_file, val_file, out / "data")
        log(f"compact vocabulary: the corpus's {base['vocab_size']} (rounded up) distinct ids, renumbered")
    real_bsz = base["micro_bsz"]
    steps = max(evals, budget_tokens // (real_bsz * base["ctx_len"]))
    epoch_steps = math.ceil(steps / evals)
    common = dict(base, data_file=data_file, val_file=val_file, epoch_steps=epoch_steps, epoch_count=evals,
                  n_layer=n_layer, n_embd=n_embd)
    rwkv = TrainArgs(model="rwkv7", proj_dir=str(out / "rwkv7"), **common)
    target = count_params("rwkv7", rwkv)
    gL, gC, gF, gp = match_gpt(rwkv, target)
    if abs(gp - target) > TOLERANCE * target:
        raise RwkvcError(f"no GPT within {TOLERANCE:.0%} of the RWKV-7's {target} parameters (nearest: L{gL} "
                         f"D{gC} F{gF}, {gp}); choose another --n_embd / --n_layer")
    gpt = TrainArgs(**{**common, "model": "gpt", "proj_dir": str(out / "gpt"), "n_layer": gL, "n_embd": gC,
                       "dim_ffn": gF})
    log(f"RWKV-7 L{n_layer} D{n_embd}: {target:,} parameters; GPT L{gL} D{gC} F{gpt.ffn_dim}: {gp:,} parameters "
        f"({100 * (gp / target - 1):+.2f} %); each trains {epoch_steps * evals} steps x {real_bsz} x "
        f"{base['ctx_len']} = {epoch_steps * evals * real_bsz * base['ctx_len']:,} tokens")
    results = [run_one("RWKV-7", "rwkv7", rwkv, log), run_one("GPT", "gpt", gpt, log)]
    md, csv_text = table(results)
    out.mkdir(parents=True, exist_ok=True)
    files = [atomic_write_text(out / "compare.md", md), atomic_write_text(out / "compare.csv", csv_text),
             plot(results, out / "compare.png")]
    slim = [{k: v for k, v in r.items() if k not in ("curve", "val_curve")} for r in results]
    files.append(atomic_write_text(out / "compare.json", json.dumps(
        {"results": slim, "data_file": data_file, "val_file": val_file, "settings": common}, indent=1)))
    log(md)
    log("wrote " + ", ".join(str(f) for f in files))
    return {"results": slim, "files": [str(f) for f in files]}


def main(argv=None) -> int:
    ap = ArgumentParser(description="Train an RWKV-7 and a GPT of the same size on the same tokens; "
                                    "write a loss table and plot (docs/COMPARISON.md).")
    ap.add_argument("--data_file", default="", help="binidx prefix (default: the KJV demo corpus)")
    ap.add_argument("--val_file", default="", help="binidx prefix of validation data (default: the data's tail, "
                                                   "or the demo's held-out books)")
    ap.add_argument("--out_dir", default="out/compare")
    ap.add_argument("--budget_tokens", type=int, default=262144, help="training tokens for each model")
    ap.add_argument("--vocab", default="compact", choices=("compact", "full"),
                    help="compact: renumber the corpus's distinct token ids 0..K-1 (the head then costs what the "
                         "corpus needs); full: the ids as they are, with --vocab_size")
    ap.add_argument("--n_layer", type=int, default=4, help="the RWKV-7's layers")
    ap.add_argument("--n_embd", type=int, default=128, help="the RWKV-7's width")
    ap.add_argument("--evals", type=int, default=4, help="validation points along the run")
    for k in ("ctx_len", "micro_bsz", "vocab_size", "head_size_a", "threads", "random_seed"):
        ap.add_argument(f"--{k}", type=int, default=BASE[k])
    for k in ("lr_init", "lr_final"):
        ap.add_argument(f"--{k}", type=float, default=BASE[k])
    a = vars(ap.parse_args(argv))
    if a["budget_tokens"] < 1 or a["evals"] < 1:
        print("error: --budget_tokens and --evals must be >= 1", file=sys.stderr)
        return 2
    return script_main(lambda: compare(**a))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
