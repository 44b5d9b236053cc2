"""Helpers the compression passes share: which matrices a pass touches (selectors) and byte accounting.

Selectors. A pass that works on "some projections" takes a `targets` argument: `+`-separated words,
each naming matrices by their place in the model (commas separate pass arguments, so they cannot):

    att            the time-mix's main projections (receptance, key, value, gate, output)
    ffn            the channel-mix's matrices (key, value, and receptance before v7)
    att.r  att.k  att.v  att.g  att.o   one time-mix projection (or its full name: att.receptance, ...)
    ffn.k  ffn.v  ffn.r                 one channel-mix matrix
    lora           the small low-rank (LoRA) matrices of v6/v7 (w1, w2, a1, ..., maa1, ...)
    head           the output head
    all            everything above

A `layers` argument ("0-3", "5", "2-" or "all") restricts the blocks.
"""
from __future__ import annotations

import re
from typing import Iterator

import numpy as np

from rwkvc import ir
from rwkvc.errors import RwkvcError

ATT_MAIN = {"r": "receptance", "k": "key", "v": "value", "g": "gate", "o": "output"}
FFN_MAIN = {"k": "key", "v": "value", "r": "receptance"}
WORDS = ("all", "att", "ffn", "lora", "head")


def check_selector(text: str) -> bool:
    try:
        parse_selector(text)
        return True
    except RwkvcError:
        return False


def parse_selector(text: str) -> set[tuple[str, str]]:
    """'att+ffn.k+head' -> {(place, name)}: place in {att, ffn, lora, head}, name a matrix key or '*'."""
    out: set[tuple[str, str]] = set()
    for word in filter(None, (w.strip() for w in str(text).split("+"))):
        if word == "all":
            out |= {("att", "*"), ("ffn", "*"), ("lora", "*"), ("head", "*")}
        elif word in ("att", "ffn", "lora", "head"):
            out.add((word, "*"))
        elif "." in word:
            place, name = word.split(".", 1)
            table = ATT_MAIN if place == "att" else FFN_MAIN if place == "ffn" else None
            if table is None:
                raise RwkvcError(f"selector '{word}': the part before the dot must be att or ffn")
            name = table.get(name, name)
            if name not in table.values():
                raise RwkvcError(f"selector '{word}': {place} has {', '.join(sorted(set(table) | set(table.values())))}")
            out.add((place, name))
        else:
            raise RwkvcError(f"selector '{word}': use {', '.join(WORDS)}, att.X or ffn.X, joined by '+'")
    if not out:
        raise RwkvcError("empty selector; name some matrices (e.g. att+ffn)")
    return out


def check_layers(text: str) -> bool:
    return bool(re.fullmatch(r"\s*(all|\d+(-\d*)?(\+\d+(-\d*)?)*)\s*", str(text)))


def parse_layers(text: str, n_layer: int) -> set[int]:
    text = str(text).strip()
    if text == "all":
        return set(range(n_layer))
    out = set()
    for part in text.split("+"):
        if "-" in part:
            lo, hi = part.split("-")
            out |= set(range(int(lo), (int(hi) + 1) if hi else n_layer))
        else:
            out.add(int(part))
    bad = sorted(i for i in out if i >= n_layer)
    if bad:
        raise RwkvcError(f"layers: block {bad[0]} does not exist (the model has {n_layer})")
    return out


def selected(model: ir.Model, targets: str, layers: str = "all") -> Iterator[tuple[str, dict, str, ir.Linear]]:
    """(place, container dict, key, Linear) for every matrix the selector names (the head: container None)."""
    sel = parse_selector(targets)
    keep = parse_layers(layers, model.config.n_layer)

    def want(place, key):
        return (place, "*") in sel or (place, key) in sel

    for i, blk in enumerate(model.blocks):
        if i not in keep:
            continue
        for key, lin in blk.att.lin.items():
            place = "att" if key in ATT_MAIN.values() else "lora"
            if want(place, key):
                yield place, blk.att.lin, key, lin
        for key, lin in blk.ffn.lin.items():
            if want("ffn", key):
                yield "ffn", blk.ffn.lin, key, lin
    if ("head", "*") in sel:
        yield "head", None, "head", model.head


def nbytes(rep) -> int:
    """Bytes a weight representation holds (as the IR stores it)."""
    return int(sum(a.nbytes if hasattr(a, "nbytes") else np.asarray(a).nbytes for a in rep.arrays().values()))


def n_params(rep) -> int:
    s = rep.shape
    return int(s[0]) * int(s[1])


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def dense_f32(rep) -> np.ndarray:
    """The float32 matrix of any representation that has one (Dense without a copy when possible)."""
    if rep.kind == "dense":
        return np.asarray(rep.w, np.float32)
    return rep.to_dense()


def emb_bytes(model: ir.Model) -> int:
    return nbytes(model.emb.weight)
