"""GRPO's objective (Shao et al. 2024, arXiv 2402.03300, eq. 3), as plain functions.

    advantages      A_i = (r_i - mean(r_group)) / (std(r_group) + eps)      the sample std (n - 1), as TRL
    per token       ratio = exp(logp - logp_old)
                    L_t = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + beta * KL_t
                    KL_t = exp(logp_ref - logp) - (logp_ref - logp) - 1     k3: unbiased, always >= 0
    aggregation     seq:   mean over each completion's tokens, then over completions (the paper)
                    token: mean over every token of the batch (DAPO's choice; long answers weigh more)

`grpo_loss` takes the normaliser (completions or tokens of the whole batch) so that micro-batches'
losses sum to the batch's loss exactly under gradient accumulation.
"""
from __future__ import annotations

import torch

ADV_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, eps: float = ADV_EPS) -> torch.Tensor:
    """rewards (P, G) -> advantages (P, G): each group centred and scaled by its sample std."""
    mean = rewards.mean(1, keepdim=True)
    std = rewards.std(1, keepdim=True)                               # unbiased (n - 1)
    return (rewards - mean) / (std + eps)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, adv: torch.Tensor,
              mask: torch.Tensor, *, clip_eps: float, kl_beta: float, agg: str = "seq",
              norm: float | None = None) -> tuple[torch.Tensor, dict]:
    """logp, old_logp, ref_logp, mask: (R, T); adv: (R,) -> (loss, stats of this micro-batch).

    norm: what the summed loss is divided by: completions (agg seq) or tokens (agg token) of the whole
    batch; default this micro-batch's."""
    ratio = torch.exp(logp - old_logp)
    a = adv.unsqueeze(1)
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps)
    per_tok = -torch.minimum(ratio * a, clipped * a)
    if ref_logp is not None and kl_beta > 0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_tok = per_tok + kl_beta * kl
    else:
        kl = torch.zeros_like(logp)
    n_tok = mask.sum(1)
    if agg == "seq":
        total = ((per_tok * mask).sum(1) / n_tok.clamp(min=1)).sum()
        loss = total / (norm if norm is not None else len(logp))
    else:
        total = (per_tok * mask).sum()
        loss = total / (norm if norm is not None else mask.sum().clamp(min=1))
    with torch.no_grad():
        m = mask.bool()
        was_clipped = ((ratio * a) != torch.minimum(ratio * a, clipped * a)) & m
        stats = {"kl_sum": float((kl * mask).sum()), "tokens": float(mask.sum()),
                 "clipped": float(was_clipped.sum())}
    return loss, stats
