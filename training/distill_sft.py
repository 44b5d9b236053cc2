"""Stage 3's data: conversations in JSON lines, the loss on the answers only.

One conversation a line, either layout:

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}
    {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}, ...]}

A text turn becomes "User: ...\\n\\n" / "Assistant: ...\\n\\n" / "System: ...\\n\\n" (RWKV's chat format) in
the tokenizer given (the World tokenizer, or a transformers tokenizer directory such as the teacher's); a
turn whose content is a list of token ids is used as it is. Targets are the next tokens inside assistant
turns and -100 (ignored) elsewhere. Conversations are cut to ctx_len + 1 tokens and padded with token 0.
The last 5 % (at least one, when there are 20 or more) are held out for validation.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from rwkvc.errors import RwkvcError

ROLES = {"user": "User", "human": "User", "assistant": "Assistant", "gpt": "Assistant", "system": "System"}


def make_tokenizer(spec: str, teacher: str = ""):
    """'world' -> rwkvc's World tokenizer; a directory -> transformers' AutoTokenizer (local files only);
    '' -> the teacher directory's tokenizer where it has one, else World. Returns text -> ids."""
    if not spec and teacher and Path(teacher).is_dir() and any(
            (Path(teacher) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        spec = teacher
    if spec in ("", "world"):
        from rwkvc.tokenizer import WorldTokenizer
        return WorldTokenizer().encode
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except Exception as e:
        raise RwkvcError(f"--tokenizer {spec}: cannot load it ({str(e).strip().splitlines()[0][:200]})") from None
    return lambda text: tok.encode(text, add_special_tokens=False)


def _turns(obj, where: str):
    turns = obj.get("messages") if isinstance(obj, dict) else None
    if turns is None and isinstance(obj, dict):
        turns = [{"role": t.get("from"), "content": t.get("value")} for t in obj.get("conversations") or []
                 if isinstance(t, dict)]
    if not turns:
        raise RwkvcError(f"{where}: a conversation needs 'messages' (role, content) or 'conversations' (from, value)")
    for t in turns:
        if not isinstance(t, dict) or t.get("role") not in ROLES:
            raise RwkvcError(f"{where}: a turn's role must be one of {', '.join(ROLES)} (found {t!r:.80})")
        c = t.get("content")
        if not (isinstance(c, str) or (isinstance(c, list) and all(isinstance(x, int) and x >= 0 for x in c))):
            raise RwkvcError(f"{where}: a turn's content must be text or a list of token ids")
    return turns


def read_conversations(path: str, encode, vocab_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(ids, answer mask)] per conversation, every line checked."""
    p = Path(path)
    if not p.is_file():
        raise RwkvcError(f"--sft_file {path}: no such file (JSON lines of conversations)")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise RwkvcError(f"{where}: not JSON ({e})") from None
        ids, mask = [], []
        for t in _turns(obj, where):
            c = t["content"]
            toks = list(c) if isinstance(c, list) else encode(f"{ROLES[t['role']]}: {c}\n\n")
            ids += toks
            mask += [ROLES[t["role"]] == "Assistant"] * len(toks)
        if ids and max(ids) >= vocab_size:
            raise RwkvcError(f"{where}: token {max(ids)} is outside the teacher's vocabulary ({vocab_size})")
        if sum(mask[1:]) == 0:
            raise RwkvcError(f"{where}: no assistant tokens to learn from")
        out.append((np.asarray(ids, np.int64), np.asarray(mask, bool)))
    if not out:
        raise RwkvcError(f"--sft_file {path}: no conversations in it")
    return out


class SFTData:
    """Batches of (idx, targets) (B, ctx_len) from conversations, shuffled once with the seed."""

    def __init__(self, convs, ctx_len: int, seed: int):
        n_val = max(1, len(convs) // 20) if len(convs) >= 20 else 0
        self.train, self.val = convs[:len(convs) - n_val], convs[len(convs) - n_val:]
        self.order = list(range(len(self.train)))
        random.Random(seed).shuffle(self.order)
        self.ctx_len = ctx_len

    def rows(self, convs) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.ctx_len
        idx = np.zeros((len(convs), T), np.int64)
        tgt = np.full((len(convs), T), -100, np.int64)
        for r, (ids, mask) in enumerate(convs):
            ids, mask = ids[:T + 1], mask[:T + 1]
            n = len(ids) - 1
            idx[r, :n] = ids[:-1]
            tgt[r, :n] = np.where(mask[1:], ids[1:], -100)
        return torch.from_numpy(idx), torch.from_numpy(tgt)

    def batch(self, step: int, rank: int, world: int, micro_bsz: int):
        n = len(self.order)
        picks = [self.train[self.order[(step * world * micro_bsz + j * world + rank) % n]] for j in range(micro_bsz)]
        return self.rows(picks)

    def val_batches(self, micro_bsz: int):
        for i in range(0, len(self.val), micro_bsz):
            yield self.rows(self.val[i:i + micro_bsz])
