"""What state tuning learns from: the data and the loss of a task, and the batching every task shares.

    LMTask        next-token loss on whole documents of a binidx file (or RWKV-LM's magic-prime windows)
    OrpoTask      (training/orpo.py) ORPO on prompt/chosen/reject pairs

A task has n_items, note, seed, batch(ii, B) -> tensors, loss(sm, batch) -> (loss, info, tokens) and
evaluate(sm, B) -> {name: value} | None; sample_order and pad_rows are the shared batching helpers.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from rwkvc.binidx import MMapIndexedDataset
from rwkvc.errors import RwkvcError
from rwkvc.training.config import TrainArgs
from rwkvc.training.data import TokenData
from rwkvc.training.state_args import StateArgs

if TYPE_CHECKING:
    from rwkvc.training.state_model import StateModel


def _doc_spans(ds) -> list[tuple[int, int]]:
    """(first token, length) of each sequence of a binidx dataset (make_data.py: one per document)."""
    itemsize = ds.dtype.itemsize
    return [(int(p) // itemsize, int(n)) for p, n in zip(ds.pointers, ds.sizes) if n >= 2]


def sample_order(n: int, ii: int, seed: int, cache: dict) -> int:
    """Item for sample number ii: a fresh seeded permutation of the n items per pass (no state but ii)."""
    epoch, j = divmod(ii, n)
    if cache.get("epoch") != epoch:
        cache["epoch"], cache["perm"] = epoch, np.random.default_rng([seed, epoch]).permutation(n)
    return int(cache["perm"][j])


def pad_rows(rows: list[np.ndarray], masks: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """token rows (len >= 2) -> inputs (B, T), targets (B, T) int64, mask (B, T) float32 (0 on padding)."""
    T = max(len(r) for r in rows) - 1
    x = np.zeros((len(rows), T), np.int64)
    y = np.zeros((len(rows), T), np.int64)
    m = np.zeros((len(rows), T), np.float32)
    for b, (r, mk) in enumerate(zip(rows, masks)):
        n = len(r) - 1
        x[b, :n], y[b, :n], m[b, :n] = r[:-1], r[1:], mk
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(m)


class LMTask:
    """Next-token loss. sample='docs': every sample is one document of --data_file from its first token
    (truncated to ctx_len + 1 tokens, loss on its real tokens only), in a seeded order, one pass = every
    document once; the held-out documents are --val_file's, else the data's last ones (--val_tokens:
    -1 = 5%, at most 64 documents; 0 = none; N = documents from the end until N tokens).
    sample='windows': RWKV-LM's magic-prime ctx_len windows (training/data.py TokenData)."""

    def __init__(self, args: TrainArgs, sargs: StateArgs, vocab_size: int, seed: int):
        self.T, self.seed, self.cache = args.ctx_len, seed, {}
        self.windows = sargs.sample == "windows"
        if not args.data_file:
            raise RwkvcError("--data_file is required (a binidx prefix made by make_data.py)")
        if self.windows:
            self.data = TokenData(args.data_file, args.ctx_len, vocab_size, args.magic_prime, args.val_file,
                                  args.val_tokens)
            self.n_items = self.data.magic_prime
            self.note = f"{self.data.plan.train_len} tokens in magic-prime windows of {args.ctx_len}"
            return
        ds = MMapIndexedDataset(args.data_file)
        self.ds = ds
        spans = _doc_spans(ds)
        if not spans:
            raise RwkvcError(f"{ds.prefix}: no document of 2 or more tokens")
        for d in [ds] + ([MMapIndexedDataset(args.val_file)] if args.val_file else []):
            top = d.max_token()
            if top >= vocab_size:
                raise RwkvcError(f"{d.prefix} contains token {top}, but the model's vocabulary is 0..{vocab_size - 1}")
        if args.val_file:
            self.val_ds = MMapIndexedDataset(args.val_file)
            self.val_spans = _doc_spans(self.val_ds)
        else:
            self.val_ds = ds
            k = 0
            if args.val_tokens < 0 and len(spans) >= 4:
                k = min(64, max(1, len(spans) // 20))
            elif args.val_tokens > 0:
                tot = 0
                while k < len(spans) - 1 and tot < args.val_tokens:
                    tot += spans[-1 - k][1]
                    k += 1
            self.val_spans = spans[len(spans) - k:] if k else []
            spans = spans[:len(spans) - k]
        self.spans = spans
        self.n_items = len(spans)
        long = sum(1 for _, n in spans if n > self.T + 1)
        self.note = (f"{len(spans)} documents ({sum(n for _, n in spans)} tokens"
                     + (f"; {long} longer than ctx_len + 1 = {self.T + 1} are truncated" if long else "") + ")")

    def _doc(self, ds, span) -> np.ndarray:
        s, n = span
        return np.asarray(ds.tokens[s:s + min(n, self.T + 1)], np.int64)

    def batch(self, ii: int, B: int):
        if self.windows:
            t = self.data.batch(ii // B, 0, 1, B)   # TokenData.batch counts steps, not samples
            return t[:, :-1], t[:, 1:], torch.ones(B, self.T)
        rows = [self._doc(self.ds, self.spans[sample_order(self.n_items, ii + j, self.seed, self.cache)]) for j in range(B)]
        return pad_rows(rows, [np.ones(len(r) - 1, np.float32) for r in rows])

    @staticmethod
    def loss(sm: StateModel, batch):
        x, y, m = batch
        lp = sm.logprobs(x, y)
        n = m.sum()
        loss = -(lp * m).sum() / n
        return loss, {}, float(n)

    def val_batches(self, B: int):
        if self.windows:
            ws = self.data.val_windows()
            for s, n in ws:
                t = torch.from_numpy(self.data.val_tokens(s, n).astype(np.int64))[None]
                yield t[:, :-1], t[:, 1:], torch.ones(1, n - 1)
            return
        for i in range(0, len(self.val_spans), B):
            rows = [self._doc(self.val_ds, sp) for sp in self.val_spans[i:i + B]]
            yield pad_rows(rows, [np.ones(len(r) - 1, np.float32) for r in rows])

    @torch.no_grad()
    def evaluate(self, sm: StateModel, B: int) -> dict | None:
        tot = cnt = 0.0
        for x, y, m in self.val_batches(B):
            lp = sm.logprobs(x, y)
            tot += float(-(lp * m).sum())
            cnt += float(m.sum())
        return {"val_loss": tot / cnt} if cnt else None
