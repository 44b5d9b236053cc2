"""The training view of the reference GPT (rwkvc.reference.gpt): its config from the flags, nanoGPT's
initialisation, the loss wrapper and gradient checkpointing. The trainer picks it with --model gpt
(training/trainer.py's MODELS); everything else (data, schedule, engines, checkpoints, resume) is shared
with RWKV.

    --n_layer L --n_embd C --head_size_a N   ->  L blocks of C channels, C / N heads of size N
    --ctx_len T                               ->  block_size T (the learned positions cover the training window)
    --dim_ffn F                               ->  MLP width (0 = 4 C)

The loss is plain next-token cross-entropy (nanoGPT's), computed chunk by chunk through the head as for
RWKV (training.model.LinearCrossEntropy), without RWKV-LM's L2Wrap.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from rwkvc.reference.gpt import GPT, Block, GPTConfig
from rwkvc.training.model import _Checkpointed, _LossHead


def gpt_config(args) -> GPTConfig:
    return GPTConfig(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_embd // args.head_size_a,
                     vocab_size=args.vocab_size, block_size=args.ctx_len, ffn_dim=args.ffn_dim)


def build_gpt(args) -> GPT:
    return GPT(gpt_config(args))


def init_gpt(model: GPT, seed: int) -> GPT:
    return model.init_weights(seed)


class CheckpointedBlock(_Checkpointed, Block):
    pass


def enable_gpt_grad_checkpointing(model: GPT):
    """Recompute every block in the backward pass (--grad_cp 1); parameter names do not change."""
    for blk in model.transformer.h:
        if type(blk) is Block:
            blk.__class__ = CheckpointedBlock


class GptLoss(nn.Module):
    """forward(idx (B, T), targets (B, T), reduction) -> cross-entropy (fp32), as training.model.LMLoss
    does for RWKV; the GPT is the only child, as `model`, so `wrapper.model.state_dict()` is the
    checkpoint. wkv_fn is accepted for the same call and ignored (a GPT has no recurrence)."""

    def __init__(self, model: GPT, wkv_fn=None, fused_head: bool = True):
        super().__init__()
        self.model = model
        self.fused_head = fused_head
        if fused_head and type(model.lm_head) is nn.Linear:
            model.lm_head.__class__ = _LossHead

    def forward(self, idx, targets, reduction: str = "mean"):
        head = self.model.lm_head
        if self.fused_head and isinstance(head, _LossHead):
            head.targets, head.reduction, head.l2wrap = targets, reduction, False
            try:
                return self.model(idx)
            finally:
                head.targets = None
        logits = self.model(idx)                                                 # (B, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)
