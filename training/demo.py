"""The demo recipe: a small World-vocabulary RWKV-7 trained on the King James Bible, on 2 CPU cores.

    python training/demo.py                 # or: from rwkvc.training.demo import demo; path = demo()

The text comes from Debian's bible-kjv package (`apt-get install bible-kjv`; the `bible` command), so
nothing is downloaded. Every chapter is one document. The books in HELD_OUT never reach training;
they are the validation set. The result is cached in ~/.cache/rwkvc/demo/ ($RWKV_CACHE/demo/ when
RWKV_CACHE is set, or the cache_dir argument) and reused while the recipe (RECIPE and RECIPE_VERSION)
is unchanged.

The report (demo/report.json) compares the validation loss with a unigram baseline: the training
tokens' unigram distribution evaluated on the held-out tokens (add-alpha smoothed, alpha chosen on
the held-out tokens themselves, which favours the baseline).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rwkvc.binidx import MMapIndexedDataset
from rwkvc.cache import cache_root
from rwkvc.errors import RwkvcError
from rwkvc.training.config import TrainArgs
from rwkvc.training.data import TokenData, unigram_loss
from rwkvc.training.engine import cpu_bf16_native
from rwkvc.training.files import ArgumentParser, atomic_write_text, script_main
from rwkvc.training.make_data import make_data
from rwkvc.training.trainer import train

BIBLE_RANGE = "gen1:1-rev22:21"
# four books of different kinds (narrative, wisdom, prophecy, epistle) with no close parallels elsewhere
HELD_OUT = ("Ruth", "Ecclesiastes", "Jonah", "Philippians")

REQUIRED_MARGIN = 1.0  # nats/token the demo must beat the unigram baseline by (docs/TRAINING.md)

# Raised whenever the same RECIPE trains a different model (the trainer's sampling changes), so a
# cached demo made by another trainer is retrained instead of reused.
RECIPE_VERSION = 2

RECIPE = dict(
    n_layer=4, n_embd=128, head_size_a=64, ctx_len=128, micro_bsz=8, vocab_size=65536,
    lr_init=2e-3, lr_final=2e-4, warmup_steps=20, weight_decay=0.001, beta1=0.9, beta2=0.99, adam_eps=1e-8,
    epoch_steps=100, epoch_count=5, epoch_save=0, accelerator="cpu",
    # bf16 autocast where the CPU multiplies bf16 in hardware; elsewhere torch emulates it, ~15x slower
    # than fp32 (26 s against 1.5 s a step on an AVX2-only EPYC), so fp32 (the recipe, with it, is in the
    # cache's report: a cache trained at the other precision is retrained)
    precision="bf16" if cpu_bf16_native() else "fp32",
    wkv="chunked", chunk_len=32, random_seed=0, grad_clip=1.0,
    # one thread: on a shared machine two OpenMP threads lose far more to waiting for each other than
    # they gain (4.4 s/step against 1 s/step measured here); it also keeps the run reproducible
    threads=1,
)


def bible_text() -> str:
    exe = shutil.which("bible")
    if exe is None:
        raise RwkvcError("the demo needs the offline King James Bible: apt-get install bible-kjv")
    r = subprocess.run([exe, BIBLE_RANGE], capture_output=True, text=True)
    if r.returncode != 0:
        raise RwkvcError(f"`bible {BIBLE_RANGE}` failed (exit status {r.returncode}): "
                         f"{(r.stderr.strip().splitlines() or [''])[-1][:200]}")
    out = r.stdout
    if len(out) < 1_000_000:
        raise RwkvcError(f"`bible {BIBLE_RANGE}` printed only {len(out)} characters; is bible-kjv complete?")
    return out


def chapters(text: str) -> list[tuple[str, int, str]]:
    """(book, chapter, text) for each chapter of `bible`'s output; verses joined onto one line each."""
    out, book, num, verses = [], None, 0, []

    def flush():
        if book is not None:
            out.append((book, num, f"{book} {num}\n\n" + "\n".join(verses) + "\n"))

    for line in text.splitlines():
        m = re.fullmatch(r"((?:[1-3] )?[A-Z][A-Za-z ]*?) (\d+)", line.strip())
        if m and not line.startswith(" "):
            flush()
            book, num, verses = m.group(1), int(m.group(2)), []
        elif re.match(r"\s+\d+ ", line):
            verses.append(line.strip())
        elif line.strip() and verses:
            verses[-1] += " " + line.strip()
    flush()
    return out


def build_data(data_dir: Path, ctx_len: int, log=print) -> tuple[str, str]:
    """-> (train prefix, validation prefix) of binidx files under data_dir."""
    data_dir.mkdir(parents=True, exist_ok=True)
    train_p, val_p = data_dir / "kjv-train", data_dir / "kjv-val"
    if all(Path(f"{p}.{e}").is_file() for p in (train_p, val_p) for e in ("bin", "idx")):
        return str(train_p), str(val_p)
    chs = chapters(bible_text())
    if len(chs) != 1189:
        raise RwkvcError(f"expected the 1189 chapters of the KJV, parsed {len(chs)}")
    for name, keep in (("kjv-train", lambda b: b not in HELD_OUT), ("kjv-val", lambda b: b in HELD_OUT)):
        jl = data_dir / f"{name}.jsonl"
        with open(jl, "w", encoding="utf-8") as f:
            for book, _, text in chs:
                if keep(book):
                    f.write(json.dumps({"text": text}) + "\n")
        make_data(jl, 1, ctx_len, out=str(data_dir / name), seed=0, log=lambda *a: None)
        jl.unlink()
    log(f"demo data: {len(MMapIndexedDataset(train_p).tokens)} training tokens, "
        f"{len(MMapIndexedDataset(val_p).tokens)} held-out tokens ({', '.join(HELD_OUT)})")
    return str(train_p), str(val_p)


def demo(cache_dir: str | os.PathLike | None = None, force: bool = False, log=print, **overrides) -> Path:
    """Train (or reuse) the demo model; returns the path of its rwkv-final.pth."""
    root = Path(cache_dir) if cache_dir else cache_root() / "demo"
    recipe = {**RECIPE, **overrides}
    proj = root / "model"
    final, report_path = proj / "rwkv-final.pth", root / "report.json"
    if final.is_file() and report_path.is_file() and not force:
        report = json.loads(report_path.read_text())
        if report.get("recipe") == recipe and report.get("recipe_version", 1) == RECIPE_VERSION:
            log(f"demo: reusing {final} (val_loss {report['val_loss']:.4f}, unigram {report['unigram_loss']:.4f})")
            return final
    if proj.exists():
        shutil.rmtree(proj)  # a different recipe (or --force): start afresh
    t0 = time.time()
    train_p, val_p = build_data(root / "data", recipe["ctx_len"], log)
    args = TrainArgs(data_file=train_p, val_file=val_p, proj_dir=str(proj), **recipe)
    path = train(args, log=log)
    wall = time.time() - t0

    data = TokenData(train_p, args.ctx_len, args.vocab_size, val_file=val_p)
    uni, alpha = unigram_loss(data.train_token_counts(args.vocab_size), data.val_token_array())
    last = [json.loads(x) for x in (proj / "metrics.jsonl").read_text().splitlines()]
    val = [x for x in last if "val_loss" in x][-1]
    report = {"val_loss": val["val_loss"], "unigram_loss": uni, "unigram_alpha": alpha,
              "margin_nats": uni - val["val_loss"], "train_tokens_seen": val["tokens"],
              "steps": val["step"], "wall_s": round(wall, 1), "train_s": val["time"],
              "params": sum(v.numel() for v in __import__("torch").load(path, weights_only=True).values()),
              "held_out_books": list(HELD_OUT), "val_tokens": int(data.num_val_targets),
              "train_data_tokens": int(data.plan.train_len), "recipe": recipe, "recipe_version": RECIPE_VERSION}
    report["required_margin_nats"] = REQUIRED_MARGIN
    atomic_write_text(report_path, json.dumps(report, indent=1))
    if report["margin_nats"] < REQUIRED_MARGIN:
        log(f"warning: the demo beats the unigram baseline by only {report['margin_nats']:.3f} nats/token "
            f"(expected at least {REQUIRED_MARGIN})")
    log(f"demo: val_loss {report['val_loss']:.4f} nats/token vs unigram baseline {uni:.4f} "
        f"(margin {report['margin_nats']:.3f}); {report['train_tokens_seen']} tokens in {wall:.0f} s -> {path}")
    return path


def main(argv=None) -> int:
    ap = ArgumentParser(description="Train (or reuse) the KJV demo model; prints its checkpoint path.")
    ap.add_argument("--cache_dir", default=None, help="default: $RWKV_CACHE/demo or ~/.cache/rwkvc/demo")
    ap.add_argument("--force", action="store_true", help="retrain even if a cached model exists")
    a = ap.parse_args(argv)
    return script_main(lambda: print(demo(a.cache_dir, force=a.force)))


if __name__ == "__main__":
    sys.exit(main())
