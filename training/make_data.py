"""Text -> binidx training data, as RWKV-LM's make_data.py (same command line, same output).

    python training/make_data.py demo.jsonl 3 4096            # writes ./demo.bin + ./demo.idx
    python training/make_data.py book.txt 1 512 --out data/book --doc_sep '\\n\\n\\n'

Input: jsonl with one {"text": ...} document per line, or plain text (one document, or several split
on --doc_sep). The documents are shuffled and repeated N_EPOCH times (a fresh shuffle each time),
tokenized with the World tokenizer (each document checked to decode back to its exact text), ended
with token 0, and written as uint16 binidx. The written files are read back and compared with what
was meant to be written, and `magic_prime` for CTX_LEN is printed for train.py.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

import numpy as np

from rwkvc.binidx import MMapIndexedDataset, MMapIndexedDatasetBuilder, magic_prime
from rwkvc.errors import RwkvcError
from rwkvc.training.files import ArgumentParser, script_main, temp_path

EOD = 0  # end-of-document token of the World tokenizer


def read_documents(path: str | os.PathLike, doc_sep: str | None = None) -> list[str]:
    """Documents of a .jsonl ({"text": ...} per non-empty line) or plain-text file."""
    path = Path(path)
    if not path.is_file():
        raise RwkvcError(f"input file {path} not found")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RwkvcError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix.lower() == ".jsonl":
        docs = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise RwkvcError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise RwkvcError(f'{path}:{n}: expected an object with a string "text" field')
            docs.append(obj["text"])
        return docs
    if doc_sep:
        return [d for d in raw.split(doc_sep) if d.strip()]
    return [raw] if raw.strip() else []


def make_data(input_path: str | os.PathLike, n_epoch: int, ctx_len: int, out: str | None = None,
              seed: int | None = 0, doc_sep: str | None = None, tokenizer=None,
              log=print) -> tuple[str, int | None]:
    """Build PREFIX.bin/.idx; returns (prefix, magic_prime for ctx_len or None if the data is too small)."""
    if not Path(input_path).is_file():
        raise RwkvcError(f"input file {input_path} not found")
    if n_epoch < 1:
        raise RwkvcError(f"N_EPOCH must be >= 1, got {n_epoch}")
    if ctx_len < 1:
        raise RwkvcError(f"CTX_LEN must be >= 1, got {ctx_len}")
    if tokenizer is None:
        from rwkvc.tokenizer import WorldTokenizer
        tokenizer = WorldTokenizer()
    prefix = out if out else os.path.splitext(os.path.basename(str(input_path)))[0]
    prefix = prefix[:-4] if prefix.endswith((".bin", ".idx")) else prefix
    if os.path.dirname(prefix):
        os.makedirs(os.path.dirname(prefix), exist_ok=True)

    docs = read_documents(input_path, doc_sep)
    log(f"### Convert {input_path} to {prefix}.bin/idx: {len(docs)} documents x {n_epoch} epochs")
    if not docs:
        raise RwkvcError(f"{input_path} contains no documents")

    # tokenize each document once; every epoch writes them again in a new order
    encoded = []
    for n, text in enumerate(docs):
        ids = tokenizer.encode(text)
        if tokenizer.decode_bytes(ids) != text.encode("utf-8"):
            raise RwkvcError(f"document {n} of {input_path} does not survive tokenize -> detokenize")
        if ids and max(ids) > np.iinfo(np.uint16).max:
            raise RwkvcError(f"document {n}: token id {max(ids)} does not fit uint16")
        encoded.append(np.array(ids + [EOD], dtype=np.uint16))

    rng = random.Random(seed)
    order = []
    for _ in range(n_epoch):
        perm = list(range(len(encoded)))
        rng.shuffle(perm)
        order += perm

    # written beside the output under temporary names, fsynced, renamed: whole files or none (and no
    # temporary file left after a failure such as a full disk)
    tmp_bin, tmp_idx = temp_path(Path(prefix + ".bin")), temp_path(Path(prefix + ".idx"))
    try:
        builder = MMapIndexedDatasetBuilder(str(tmp_bin), np.uint16)
        for i in order:
            builder.add_item(encoded[i])
            builder.end_document()
        builder.finalize(str(tmp_idx))
        for t in (tmp_bin, tmp_idx):
            with open(t, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp_bin, prefix + ".bin")  # .bin first: a .idx always has its .bin
        os.replace(tmp_idx, prefix + ".idx")
    except BaseException:
        for t in (tmp_bin, tmp_idx):
            t.unlink(missing_ok=True)
        raise

    # verify: read back and compare every sequence with what was meant to be written
    data = MMapIndexedDataset(prefix)
    if len(data) != len(order) or not np.array_equal(data.doc_idx, np.arange(len(order) + 1)):
        raise RwkvcError(f"{prefix}.idx does not read back as written")
    for j, i in enumerate(order):
        if not np.array_equal(data[j], encoded[i]):
            raise RwkvcError(f"{prefix}.bin sequence {j} does not read back as written")
    n_tok = len(data.tokens)
    for j in sorted({0, len(data) - 1}):
        preview = tokenizer.decode_bytes([int(t) for t in data[j][:-1][:100]]).decode("utf-8", "replace")
        log(f"{'-' * 70}[{prefix} idx {j} sz {len(data[j])}]\n{preview}")
    log(f"{'-' * 80}\n### Final {prefix}.bin/idx has {n_tok} tokens, {len(data)} items. Dtype {data.dtype}")

    p = magic_prime(n_tok, ctx_len)
    if p is None:
        log(f"### no magic_prime: {n_tok} tokens are fewer than 3 * ctxlen {ctx_len}")
    else:
        log(f"\n### magic_prime = {p} (for ctxlen {ctx_len})\n")
    return prefix, p


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("input", help=".jsonl ({\"text\": ...} per line) or plain-text file")
    ap.add_argument("n_epoch", type=int, help="how many shuffled copies of the data to write")
    ap.add_argument("ctx_len", type=int, help="context length to compute magic_prime for")
    ap.add_argument("--out", default=None, help="output prefix (default: input's name in the current dir)")
    ap.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0; -1 = unseeded)")
    ap.add_argument("--doc_sep", default=None,
                    help="plain text only: split documents on this string (escapes like \\n allowed)")
    a = ap.parse_args(argv)
    sep = a.doc_sep.encode().decode("unicode_escape") if a.doc_sep else None
    return script_main(lambda: make_data(a.input, a.n_epoch, a.ctx_len, out=a.out,
                                         seed=None if a.seed < 0 else a.seed, doc_sep=sep))


if __name__ == "__main__":
    sys.exit(main())
