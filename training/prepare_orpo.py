"""Preference pairs (UTF-8 CSV: prompt, chosen, reject) -> the tokenized ORPO training file.

    python training/prepare_orpo.py --input_csv pairs.csv --output_save pairs.orpo.jsonl
    python training/prepare_orpo.py --input_csv pairs.csv --output_save pairs.orpo.jsonl \\
        --target_pair_count 1000 --load_model base.pth              # repeat to 1000 pairs; check the vocabulary

Input: a CSV with a header holding the columns `prompt`, `chosen` and `reject` (RWKV-LM-State-4bit's
names; `rejected` is accepted for `reject`, as DPO datasets spell it); other columns are ignored. The
text is used as it is (write the prompt in your chat format, e.g. "User: ...\\n\\nAssistant:").

Output: JSON lines {"prompt": [ids], "chosen": [ids], "reject": [ids]} with the World tokenizer; the
chosen and reject answers end with token 0 (end of document), so the model also learns where an
answer stops (--no_eod leaves it out). `--target_pair_count N` repeats the pairs in a seeded shuffled
order until there are N (0 = each pair once). Training cuts each part to --rlhf_max_corpus_len.
"""
from __future__ import annotations

import csv
import io
import json
import os
import random
import sys
from pathlib import Path

from rwkvc.errors import RwkvcError
from rwkvc.training.files import ArgumentParser, atomic_write_text, script_main

ALIASES = {"prompt": ("prompt",), "chosen": ("chosen",), "reject": ("reject", "rejected")}
EOD = 0


def read_pairs(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a UTF-8 CSV as {"prompt", "chosen", "reject"} strings; errors name the line."""
    p = Path(path)
    if not p.is_file():
        raise RwkvcError(f"--input_csv {p} not found")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[:e.start].count(b"\n") + 1
        raise RwkvcError(f"{p}:{line}: not UTF-8 ({e.reason}); save the CSV as UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    cols = {c.strip().lower(): c for c in (reader.fieldnames or [])}
    pick = {}
    for want, names in ALIASES.items():
        hit = next((cols[n] for n in names if n in cols), None)
        if hit is None:
            raise RwkvcError(f"{p}: no '{want}' column (the header has {', '.join(cols) or 'nothing'}); "
                             "an ORPO CSV needs prompt, chosen and reject")
        pick[want] = hit
    rows = []
    try:
        for n, r in enumerate(reader, 2):
            if None in r:
                raise RwkvcError(f"{p}:{n}: more fields than the header has (unquoted comma?)")
            vals = {k: r.get(c) for k, c in pick.items()}
            if any(v is None for v in vals.values()):
                raise RwkvcError(f"{p}:{n}: fewer fields than the header has")
            if not vals["chosen"].strip() or not vals["reject"].strip():
                raise RwkvcError(f"{p}:{n}: empty chosen or reject answer")
            rows.append(vals)
    except csv.Error as e:
        raise RwkvcError(f"{p}: CSV error: {e}") from None
    if not rows:
        raise RwkvcError(f"{p}: no pairs below the header")
    return rows


def tokenize_pairs(rows, tokenizer=None, eod: bool = True) -> list[dict[str, list[int]]]:
    if tokenizer is None:
        from rwkvc.tokenizer import WorldTokenizer
        tokenizer = WorldTokenizer()
    end = [EOD] if eod else []
    return [{"prompt": tokenizer.encode(r["prompt"]), "chosen": tokenizer.encode(r["chosen"]) + end,
             "reject": tokenizer.encode(r["reject"]) + end} for r in rows]


def prepare(input_csv, output_save, target_pair_count: int = 0, seed: int = 0, eod: bool = True,
            vocab_size: int | None = None, tokenizer=None, log=print) -> Path:
    """CSV -> JSON-lines ORPO file (atomically); returns its path."""
    if target_pair_count < 0:
        raise RwkvcError("--target_pair_count must be >= 0")
    pairs = tokenize_pairs(read_pairs(input_csv), tokenizer, eod)
    if vocab_size is not None:
        top = max(max(v) if v else 0 for pr in pairs for v in pr.values())
        if top >= vocab_size:
            raise RwkvcError(f"token {top} does not fit the model's vocabulary 0..{vocab_size - 1}")
    out = list(pairs)
    if target_pair_count:
        rng = random.Random(seed)
        out = []
        while len(out) < target_pair_count:
            batch = list(pairs)
            rng.shuffle(batch)
            out += batch[:target_pair_count - len(out)]
    dst = Path(output_save)
    if dst.parent and not dst.parent.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_dir():
        raise RwkvcError(f"--output_save {dst} is a directory; give the file to write")
    atomic_write_text(dst, "".join(json.dumps(pr) + "\n" for pr in out))
    n_tok = [sum(len(v) for v in pr.values()) for pr in pairs]
    log(f"{input_csv}: {len(pairs)} pairs -> {dst}: {len(out)} pairs, {min(n_tok)}..{max(n_tok)} tokens per pair "
        "(prompt + chosen + reject)")
    return dst


def main(argv=None) -> int:
    ap = ArgumentParser(description="Tokenize a prompt/chosen/reject CSV for ORPO state tuning.")
    ap.add_argument("--input_csv", required=True)
    ap.add_argument("--output_save", required=True, help="the JSON-lines file for --rlhf_train_file")
    ap.add_argument("--target_pair_count", type=int, default=0, help="repeat pairs until there are this many (0 = once)")
    ap.add_argument("--load_model", default="", help="a checkpoint whose vocabulary every token must fit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no_eod", action="store_true", help="do not end chosen/reject with token 0")
    a = ap.parse_args(argv)

    def run():
        vocab = None
        if a.load_model:
            from rwkvc.frontend import load_state_dict
            sd = load_state_dict(a.load_model)
            if "emb.weight" not in sd:
                raise RwkvcError(f"{a.load_model}: no emb.weight; not an RWKV checkpoint")
            vocab = int(sd["emb.weight"].shape[0])
        prepare(a.input_csv, a.output_save, a.target_pair_count, a.seed, not a.no_eod, vocab)
    return script_main(run)


if __name__ == "__main__":
    sys.exit(main())
