"""The three stages' losses, each an nn.Module an engine (training/engine.py) trains as it trains LMLoss:
`forward(idx (B, T), targets (B, T), reduction)` -> a scalar, with the student as the only `model` whose
state_dict is saved, and the frozen teacher beside it (moved to the device with it, never saved).

    AlignLoss  stage 1: per layer, MSE between the student's time-mix and the teacher's attention, both on
               the teacher's normed hidden state of that layer (v_first of the student's layer 0 shared)
    KDLoss     stage 2: T^2 * KL(teacher_T || student_T) on the logits (all V, or the teacher's top k
               renormalised) * kl_weight + cross-entropy * ce_weight
    SFTLoss    stage 3: cross-entropy on the answer tokens (targets -100 elsewhere)

In eval mode (validation) every one returns the student's next-token cross-entropy, so val_loss means the
same in all stages and in train.py.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from rwkvc.reference.hybrid import Hybrid
from rwkvc.reference.v7 import State


def cross_entropy(logits, targets, reduction="mean"):
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction, ignore_index=-100)


class _StageLoss(nn.Module):
    def __init__(self, student: Hybrid, teacher=None, wkv_fn=None):
        super().__init__()
        self.model = student
        self._teacher = teacher
        # a child, so the engine moves it to the device; frozen, outside the optimiser (which takes
        # self.model's parameters) and outside the checkpoint (self.model.state_dict())
        self.teacher_module = teacher.module if teacher is not None else None
        self.wkv_fn = wkv_fn
        self.parts: dict[str, float] = {}            # the last training step's loss terms, for metrics

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher_module is not None:
            self.teacher_module.eval()               # the teacher never runs dropout
        return self

    def ce(self, idx, targets, reduction):
        logits, _ = self.model(idx, wkv_fn=self.wkv_fn)
        return cross_entropy(logits, targets, reduction)

    def forward(self, idx, targets, reduction: str = "mean"):
        if not self.training or reduction != "mean":
            return self.ce(idx, targets, reduction)
        return self.stage_loss(idx, targets)


class AlignLoss(_StageLoss):
    def stage_loss(self, idx, targets):
        xs, ys, _ = self._teacher.attention_io(idx)
        B, T = idx.shape
        st = State.zeros(self.model.cfg.v7(), B, dtype=xs[0].dtype, device=idx.device)
        v_first, losses = None, []
        for i, tm in enumerate(self.model.time_mixers()):
            out, _, _, v_first = tm(xs[i].detach(), st.shift[i, 0], st.wkv[i], v_first, wkv_fn=self.wkv_fn)
            losses.append(F.mse_loss(out.float(), ys[i].float()))
        loss = torch.stack(losses).mean()
        self.parts = {"align_mse": loss.item()}
        return loss


class KDLoss(_StageLoss):
    def __init__(self, student, teacher, wkv_fn=None, temperature=1.0, top_k=0, kl_weight=1.0, ce_weight=0.0):
        super().__init__(student, teacher, wkv_fn)
        self.T, self.top_k, self.kl_weight, self.ce_weight = temperature, top_k, kl_weight, ce_weight

    def stage_loss(self, idx, targets):
        with torch.no_grad():
            t = self._teacher.logits(idx).float()                                      # (B, T, V)
        s, _ = self.model(idx, wkv_fn=self.wkv_fn)
        s = s.float()
        logq = F.log_softmax(s / self.T, dim=-1)
        if self.top_k:
            tv, ti = t.topk(self.top_k, dim=-1)                                        # (B, T, k)
            logp = F.log_softmax(tv / self.T, dim=-1)
            kl = (logp.exp() * (logp - logq.gather(-1, ti))).sum(-1).mean()
        else:
            logp = F.log_softmax(t / self.T, dim=-1)
            kl = (logp.exp() * (logp - logq)).sum(-1).mean()
        kl = kl * self.T ** 2
        ce = cross_entropy(s, targets)
        self.parts = {"kl": kl.item(), "ce": ce.item()}
        return self.kl_weight * kl + self.ce_weight * ce


class SFTLoss(_StageLoss):
    def stage_loss(self, idx, targets):
        loss = self.ce(idx, targets, "mean")
        self.parts = {"ce": loss.item()}
        return loss
