"""ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model") for state
tuning: the loss as a plain function, the pair file reader and the task the state-tuning loop runs.

    loss = NLL(chosen | prompt) + alpha * -log sigmoid(log odds(chosen) - log odds(reject))
    odds(y) = P(y) / (1 - P(y)),   log P(y) = mean log p of y's tokens given the prompt (length-normalised)

No reference model is needed (the SFT term keeps the chosen answer likely; the odds-ratio term pushes
the rejected one below it). RWKV-LM-State-4bit's flags: --orpo 1 --orpo_alpha A --rlhf_train_file F
--rlhf_max_corpus_len N. Its alpha (0.0006) weighs a summed, not a length-normalised, log odds ratio;
with the paper's normalisation used here, alpha ~ 0.1..1 balances the two terms.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rwkvc.errors import RwkvcError
from rwkvc.training.tasks import pad_rows, sample_order


def orpo_loss(logp: torch.Tensor, mask: torch.Tensor, alpha: float):
    """logp, mask: (2B, T), the chosen sequences first, then the rejected ones (same order); mask marks
    the answer tokens. -> (loss, nll_chosen, l_or (B,), log odds ratio (B,), mean log p (2B,))."""
    B = logp.shape[0] // 2
    avg = (logp * mask).sum(1) / mask.sum(1).clamp_min(1)                       # (2B,) mean log p
    log_odds = avg - torch.log(-torch.expm1(avg.clamp(max=-1e-6)))              # log(P / (1 - P))
    ratio = log_odds[:B] - log_odds[B:]
    l_or = -F.logsigmoid(ratio)
    nll_c = -(logp[:B] * mask[:B]).sum() / mask[:B].sum().clamp_min(1)
    return nll_c + alpha * l_or.mean(), nll_c, l_or, ratio, avg


def read_orpo_file(path: str) -> list[dict]:
    """Pairs from training/prepare_orpo.py: JSON lines {"prompt": [ids], "chosen": [ids], "reject": [ids]}."""
    p = Path(path)
    if not p.is_file():
        raise RwkvcError(f"ORPO file {p} not found (make it with training/prepare_orpo.py)")
    pairs = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            o = json.loads(line)
            pair = {k: [int(t) for t in o[k]] for k in ("prompt", "chosen", "reject")}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise RwkvcError(f"{p}:{n}: not an ORPO pair of token id lists prompt/chosen/reject "
                             f"({type(e).__name__}: {e}); make the file with training/prepare_orpo.py") from None
        if not pair["chosen"] or not pair["reject"]:
            raise RwkvcError(f"{p}:{n}: empty chosen or reject answer")
        pairs.append(pair)
    if not pairs:
        raise RwkvcError(f"{p}: no ORPO pairs")
    return pairs


class OrpoTask:
    """The pairs of --rlhf_train_file, each part cut to --rlhf_max_corpus_len tokens (the prompt keeps its
    end, the answers their start), in a seeded order (one pass = every pair once). Held out: --val_file's
    pairs (an ORPO file too), else the last 10% of the pairs (when there are 10 or more and
    --val_tokens != 0). Validation reports the chosen answers' NLL (val_loss), the odds-ratio loss, the
    mean log odds ratio and the preference accuracy (mean log p of chosen > of reject)."""

    def __init__(self, args, sargs, vocab_size: int, seed: int):
        self.seed, self.cache, self.max_len, self.alpha = seed, {}, sargs.rlhf_max_corpus_len, sargs.orpo_alpha
        pairs = read_orpo_file(sargs.rlhf_train_file)
        if args.val_file:
            val = read_orpo_file(args.val_file)
        elif args.val_tokens != 0 and len(pairs) >= 10:
            k = max(1, len(pairs) // 10)
            pairs, val = pairs[:-k], pairs[-k:]
        else:
            val = []
        for pr in pairs + val:
            top = max(max(v) if v else 0 for v in pr.values())
            if top >= vocab_size:
                raise RwkvcError(f"{sargs.rlhf_train_file}: token {top} is outside the model's vocabulary "
                                 f"0..{vocab_size - 1} (tokenized for another model?)")
        self.pairs, self.val = pairs, val
        self.n_items = len(pairs)
        self.note = f"{len(pairs)} ORPO pairs, {len(val)} held out, alpha {self.alpha}"

    def rows(self, prs):
        """-> inputs, targets, answer mask (2B, T): the chosen sequences, then the rejected ones."""
        rows, masks = [], []
        for part in ("chosen", "reject"):
            for pr in prs:
                p = pr["prompt"][-self.max_len:] or [0]      # an empty prompt starts a new document
                y = pr[part][:self.max_len]
                seq = np.asarray(p + y, np.int64)
                mk = np.zeros(len(seq) - 1, np.float32)
                mk[len(p) - 1:] = 1.0                          # targets that are answer tokens
                rows.append(seq)
                masks.append(mk)
        return pad_rows(rows, masks)

    def batch(self, ii: int, B: int):
        return self.rows([self.pairs[sample_order(self.n_items, ii + j, self.seed, self.cache)] for j in range(B)])

    def loss(self, sm, batch):
        x, y, m = batch
        loss, nll_c, l_or, ratio, avg = orpo_loss(sm.logprobs(x, y), m, self.alpha)
        B = avg.shape[0] // 2
        return loss, {"sft": nll_c.item(), "or": l_or.mean().item(), "log_odds_ratio": ratio.mean().item(),
                      "pref_acc": (avg[:B] > avg[B:]).float().mean().item()}, float(m.sum())

    @torch.no_grad()
    def evaluate(self, sm, B: int) -> dict | None:
        if not self.val:
            return None
        nll = cnt = orl = acc = lor = 0.0
        for i in range(0, len(self.val), B):
            prs = self.val[i:i + B]
            x, y, m = self.rows(prs)
            _, nll_c, l_or, ratio, avg = orpo_loss(sm.logprobs(x, y), m, self.alpha)
            k = len(prs)
            nc = float(m[:k].sum())
            nll, cnt = nll + float(nll_c) * nc, cnt + nc
            orl += float(l_or.sum())
            lor += float(ratio.sum())
            acc += float((avg[:k] > avg[k:]).float().sum())
        n = len(self.val)
        return {"val_loss": nll / cnt, "val_or_loss": orl / n, "val_log_odds_ratio": lor / n, "val_pref_acc": acc / n}
