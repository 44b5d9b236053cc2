"""Verifiable tasks for GRPO (docs/GRPO.md): their prompts files and rewards.

    python training/grpo_tasks.py sums --out data/sums    # -> sft.jsonl, train.jsonl, heldout.jsonl
    python training/grpo_tasks.py kjv --out data/kjv      # -> train.jsonl, heldout.jsonl

sums: `a+b=` -> `a+b` for a, b in 0..19. sft.jsonl is a noisy corpus for train.py (documents of 16
lines `a+b=c`, where c is the sum or, half of the time, the sum plus one), so a model trained on it samples
the right sum about half of the time; train.jsonl / heldout.jsonl are disjoint sets of the 400 problems (320 / 80)
for GRPO with `--reward exact --stop '\n'`, which must learn to prefer the right sum.

kjv, the next verse number: each prompt is two consecutive verse lines in the demo's format (`N text`;
the chapter heading before verse 1), ending in a newline; the answer is the next verse's number, N + 1,
which the model must read off the previous line and increment. The held-out prompts come from the
demo's held-out books (training/demo.py's HELD_OUT: Ruth, Ecclesiastes, Jonah, Philippians), which
neither the demo model nor GRPO saw.
`--reward number` checks it exactly (the completion's first number; with `--stop ' '` the completion is the
number). The demo model rarely hits it (5% held out), so exact match alone gives a sparse signal; the
shaped `verse_number` below (`--reward rwkvc.training.grpo_tasks:verse_number`) adds partial credit for a
number near the answer, and `--eval_reward number` still reports exact match (neither taught the demo
model the task in a short run: docs/GRPO.md).
"""
from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

from rwkvc.training.demo import HELD_OUT, bible_text, chapters
from rwkvc.training.files import ArgumentParser, atomic_write_text, script_main

MAX_PROMPT_CHARS = 240   # short prompts: the task is the number, not the text
NEAR = 5                 # partial credit for a number within this distance of the answer


def verse_number(prompt: str, completion: str, answer) -> float:
    """1 for the right number; 0.5 * (1 - distance / NEAR) for one within NEAR of it; else 0."""
    m = re.match(r"\d+", completion.strip())
    if m is None or answer is None:
        return 0.0
    d = abs(int(m.group()) - int(answer))
    return 1.0 if d == 0 else 0.5 * max(0.0, 1 - d / NEAR)


def verse_prompts(chs) -> dict[str, list[dict]]:
    """(book, chapter, text) chapters -> {"train": [...], "heldout": [...]} of {prompt, answer, book}."""
    out = {"train": [], "heldout": []}
    for book, num, text in chs:
        head, _, body = text.partition("\n\n")
        lines = body.strip("\n").split("\n")
        for i in range(1, len(lines)):                 # the prompt ends with verse i; the answer is i + 1
            first = lines[i - 2] if i >= 2 else head + "\n"
            prompt = f"{first}\n{lines[i - 1]}\n"
            if len(prompt) > MAX_PROMPT_CHARS:
                continue
            out["heldout" if book in HELD_OUT else "train"].append({"prompt": prompt, "answer": str(i + 1),
                                                                   "book": book})
    return out


SUMS_MAX = 19


def make_kjv(out_dir: str, n_train: int = 4000, n_heldout: int = 200, seed: int = 0) -> list[Path]:
    sets = verse_prompts(chapters(bible_text()))
    rng = random.Random(seed)
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n in (("train", n_train), ("heldout", n_heldout)):
        items = rng.sample(sets[name], min(n, len(sets[name])))
        path = d / f"{name}.jsonl"
        atomic_write_text(path, "".join(json.dumps({"prompt": x["prompt"], "answer": x["answer"]}) + "\n"
                                        for x in items))
        paths.append(path)
    return paths


def make_sums(out_dir: str, docs: int = 4000, lines: int = 16, noise: float = 0.5, seed: int = 0) -> list[Path]:
    rng = random.Random(seed)
    problems = [(a, b) for a in range(SUMS_MAX + 1) for b in range(SUMS_MAX + 1)]
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    sft = []
    for _ in range(docs):
        rows = []
        for _ in range(lines):
            a, b = rng.choice(problems)
            rows.append(f"{a}+{b}={a + b + (rng.random() < noise)}")
        sft.append(json.dumps({"text": "\n".join(rows) + "\n"}))
    rng.shuffle(problems)
    held = len(problems) // 5
    paths = [d / "sft.jsonl", d / "train.jsonl", d / "heldout.jsonl"]
    atomic_write_text(paths[0], "\n".join(sft) + "\n")
    for path, part in ((paths[1], problems[held:]), (paths[2], problems[:held])):
        atomic_write_text(path, "".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                                        for a, b in part))
    return paths


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", choices=("sums", "kjv"))
    ap.add_argument("--out", required=True, help="directory for the files")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    make = {"sums": make_sums, "kjv": make_kjv}[a.task]
    return script_main(lambda: print(*make(a.out, seed=a.seed)))


if __name__ == "__main__":
    sys.exit(main())
