"""Training samples: RWKV-LM's magic-prime order over a binidx token stream, plus a held-out slice.

The .bin is read as one flat token stream (documents already end in token 0). Sample number ii
(1, 2, 3, ... over the whole run, all processes together) starts at

    i = ((c * ii^3) mod p) * ctx_len,   c = int(p * (sqrt(5) - 1) / 2)

and covers tokens [i, i + ctx_len + 1) (inputs and next-token targets). p = magic_prime is a
3n+2 prime, so ii -> ii^3 mod p is a bijection: the first p samples visit every one of the p
windows exactly once, in a scattered (golden-ratio) order, with no shuffle buffer and no state
but the sample counter. That is RWKV-LM's dataset.py for my_pile_stage > 0; for step s, process
`rank` of `world`, micro-batch row j it gives ii = 1 + s * world * micro_bsz + j * world + rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from rwkvc.errors import RwkvcError

from rwkvc.binidx import MMapIndexedDataset, is_prime, magic_prime


@dataclass(frozen=True)
class DataPlan:
    """Where training and validation tokens come from (decided once, before training)."""
    train_len: int          # training samples read tokens [0, train_len)
    val_range: tuple        # (start, end) of held-out tokens in the val stream
    magic_prime: int
    note: str = ""


class TokenData:
    """The training stream, the validation stream and the sample order."""

    def __init__(self, data_file: str, ctx_len: int, vocab_size: int, magic_prime_arg: int = 0,
                 val_file: str = "", val_tokens: int = -1):
        self.ctx_len = ctx_len
        self.data = MMapIndexedDataset(data_file)
        self.tokens = self.data.tokens
        D = len(self.tokens)
        if D < 3 * ctx_len:
            raise RwkvcError(f"--ctx_len {ctx_len} is too long for {self.data.prefix}: it has {D} tokens, and "
                             f"training needs at least 3 * ctx_len = {3 * ctx_len} (use a shorter --ctx_len "
                             "or more data)")
        self.val = MMapIndexedDataset(val_file) if val_file else None
        for ds in (self.data, self.val):
            if ds is None:
                continue
            if ds.dtype.kind == "u" and ds.dtype.itemsize <= 2 and vocab_size >= 1 << (8 * ds.dtype.itemsize):
                continue  # every representable token fits; no need to scan a huge file
            top = ds.max_token()
            if top >= vocab_size:
                raise RwkvcError(f"--vocab_size {vocab_size} is too small for {ds.prefix}: it contains token "
                                 f"{top} (use --vocab_size {top + 1} or more; World models use 65536)")
        self.plan = self._plan(D, ctx_len, magic_prime_arg, val_tokens)
        p = self.plan.magic_prime
        self.factor = int(p * (math.sqrt(5) - 1) / 2)

    def _plan(self, D: int, T: int, p_arg: int, val_tokens: int) -> DataPlan:
        note = ""
        if self.val is not None:
            train_len, val_range = D, (0, len(self.val.tokens))
            if val_range[1] < 2:
                raise RwkvcError(f"validation data {self.val.prefix} has fewer than 2 tokens")
        else:
            if val_tokens < 0:  # auto: 1% of the data, at most 64 windows, at least one if the data allows
                val_tokens = min(D // 100, 64 * T)
                if val_tokens < T + 1:
                    val_tokens = T + 1 if D - (T + 1) >= 3 * T else 0
                    if not val_tokens:
                        note = "no validation: the data is too small to hold out a ctx_len window"
            if val_tokens and D - val_tokens < 3 * T:
                raise RwkvcError(f"--val_tokens {val_tokens} leaves {D - val_tokens} training tokens, fewer than "
                                 f"3 * ctx_len = {3 * T}")
            train_len, val_range = D - val_tokens, (D - val_tokens, D)
        best = magic_prime(train_len, T)
        if p_arg == 0:
            p = best
        else:
            if p_arg % 3 != 2 or not is_prime(p_arg):
                raise RwkvcError(f"--magic_prime {p_arg} must be a prime of the form 3n+2 "
                                 f"(for this data and ctx_len: {best})")
            if p_arg * T + 1 > train_len:
                note = (f"--magic_prime {p_arg} would read past the {train_len} training tokens"
                        + (f" (the last {D - train_len} are held out for validation)" if D > train_len else "")
                        + f"; using {best}")
                p = best
            else:
                p = p_arg
        return DataPlan(train_len=train_len, val_range=val_range, magic_prime=p, note=note)

    # ---------------------------------------------------------------------------- training samples
    @property
    def magic_prime(self) -> int:
        return self.plan.magic_prime

    def sample_start(self, ii: int) -> int:
        """First token of sample number ii (1-based, counted over the whole run)."""
        return ((self.factor * ii * ii * ii) % self.plan.magic_prime) * self.ctx_len

    def batch(self, step: int, rank: int, world: int, micro_bsz: int, offset: int = 0) -> torch.Tensor:
        """(micro_bsz, ctx_len + 1) int64 tokens for this process at this (0-based) step.

        `step` counts steps, not samples: step s reads samples offset + s * world * micro_bsz + 1 onwards.
        `offset` is a number of samples already drawn before step 0 (e.g. by the run that made the model)."""
        T = self.ctx_len
        rows = []
        for j in range(micro_bsz):
            ii = 1 + offset + step * world * micro_bsz + j * world + rank
            i = self.sample_start(ii)
            rows.append(self.tokens[i:i + T + 1])
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    # ---------------------------------------------------------------------------- validation
    def val_windows(self) -> list[tuple[int, int]]:
        """(start, length) windows tiling the held-out tokens; each predicts length - 1 targets."""
        a, b = self.plan.val_range
        T = self.ctx_len
        out = []
        s = a
        while b - s >= 2:
            n = min(T + 1, b - s)
            out.append((s, n))
            s += n - 1
        return out

    def val_tokens(self, start: int, length: int) -> np.ndarray:
        src = self.val.tokens if self.val is not None else self.tokens
        return src[start:start + length]

    @property
    def num_val_targets(self) -> int:
        return sum(n - 1 for _, n in self.val_windows())

    def train_token_counts(self, vocab_size: int) -> np.ndarray:
        """Occurrences of each token in the training region (for the unigram baseline)."""
        counts = np.zeros(vocab_size, np.int64)
        chunk = 1 << 24
        for s in range(0, self.plan.train_len, chunk):
            counts += np.bincount(self.tokens[s:min(s + chunk, self.plan.train_len)], minlength=vocab_size)[:vocab_size]
        return counts

    def val_token_array(self) -> np.ndarray:
        """Every validation target token, in order."""
        parts = [self.val_tokens(s, n)[1:] for s, n in self.val_windows()]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def unigram_loss(train_counts: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """Cross-entropy (nats/token) of the training unigram distribution on `targets`.

    Add-alpha smoothing keeps unseen tokens finite; alpha is chosen on the targets themselves
    (from 1e-4 to 1), which favours the baseline. Returns (loss, alpha).
    """
    V = len(train_counts)
    N = train_counts.sum()
    tc = np.bincount(targets, minlength=V)[:V].astype(np.float64)
    best = (math.inf, 0.0)
    for alpha in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0):
        logp = np.log(train_counts + alpha) - math.log(N + alpha * V)
        loss = float(-(tc * logp).sum() / max(1, tc.sum()))
        best = min(best, (loss, alpha))
    return best
