"""RWKV-4 ("Dove") in plain PyTorch, recurrent form: the readable truth for rwkvc's v4 lowering.

Parameter names and shapes are those of official RWKV-LM v4 checkpoints, so
`RWKV4.from_state_dict(torch.load(ckpt))` loads one as is.

Dimensions: B batch, T time, C channels, F FFN width, V vocabulary, L layers.

State per layer:
    shift: (2, B, C)  the previous token's normalised input to time-mix [0] and channel-mix [1]
    wkv:   (B, 3, C)  the running numerator aa, denominator bb and their common exponent pp: the
                      weighted average sum_i e^{w (t-1-i) + k_i} v_i / sum_i e^{w (t-1-i) + k_i} is kept
                      as aa / bb with both scaled by e^-pp, so nothing overflows (pp starts at -1e38)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import Block, token_shift


@dataclass(frozen=True)
class V4Config:
    n_layer: int
    n_embd: int
    vocab_size: int
    ffn_dim: int


def lerp_mix(x, xx, m):
    """The official v4/v5 mixing: x * m + prev * (1 - m)."""
    return x * m + xx * (1 - m)


def wkv4_recurrent(w, u, k, v, state):
    """The numerically stable RWKV-4 WKV, one step at a time.

    w: (C,) = -exp(time_decay) (log of the per-step decay), u: (C,) bonus of the current token,
    k, v: (B, T, C); state (B, 3, C) = (aa, bb, pp) -> y (B, T, C), new state (B, 3, C)
    """
    aa, bb, pp = state.unbind(1)
    ys = []
    for t in range(k.shape[1]):
        kt, vt = k[:, t], v[:, t]
        ww = u + kt                        # the current token counts with bonus u
        p = torch.maximum(pp, ww)
        e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
        ys.append((e1 * aa + e2 * vt) / (e1 * bb + e2))
        ww = w + pp                        # decay the past by e^w, then add the current token
        p = torch.maximum(ww, kt)
        e1, e2 = torch.exp(ww - p), torch.exp(kt - p)
        aa, bb, pp = e1 * aa + e2 * vt, e1 * bb + e2, p
    return torch.stack(ys, 1), torch.stack([aa, bb, pp], 1)


class TimeMix(nn.Module):
    def __init__(self, cfg: V4Config):
        super().__init__()
        C = cfg.n_embd
        self.time_mix_k, self.time_mix_v, self.time_mix_r = (nn.Parameter(torch.zeros(1, 1, C)) for _ in range(3))
        self.time_decay = nn.Parameter(torch.zeros(C))
        self.time_first = nn.Parameter(torch.zeros(C))
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)

    def forward(self, x, shift, wkv):
        """x: (B, T, C), shift: (B, C), wkv: (B, 3, C) -> (B, T, C), new shift, new wkv."""
        xx = token_shift(x, shift)
        k = self.key(lerp_mix(x, xx, self.time_mix_k))
        v = self.value(lerp_mix(x, xx, self.time_mix_v))
        r = torch.sigmoid(self.receptance(lerp_mix(x, xx, self.time_mix_r)))
        y, wkv = wkv4_recurrent(-torch.exp(self.time_decay), self.time_first, k, v, wkv)
        return self.output(r * y), x[:, -1], wkv


class ChannelMix(nn.Module):
    """v4/v5: y = sigmoid(R xr) * V relu(K xk)^2."""

    def __init__(self, C: int, F_: int):
        super().__init__()
        self.time_mix_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, F_, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(F_, C, bias=False)

    def forward(self, x, shift):
        """x: (B, T, C), shift: (B, C) -> (B, T, C), new shift (B, C)."""
        xx = token_shift(x, shift)
        k = torch.relu(self.key(lerp_mix(x, xx, self.time_mix_k))) ** 2       # (B, T, F)
        r = torch.sigmoid(self.receptance(lerp_mix(x, xx, self.time_mix_r)))
        return r * self.value(k), x[:, -1]


@dataclass
class State:
    """shift (L, 2, B, C), wkv (L, B, 3, C)."""
    shift: torch.Tensor
    wkv: torch.Tensor

    @staticmethod
    def zeros(cfg: V4Config, batch: int = 1) -> "State":
        L, C = cfg.n_layer, cfg.n_embd
        wkv = torch.zeros(L, batch, 3, C)
        wkv[:, :, 2] = -1e38
        return State(torch.zeros(L, 2, batch, C), wkv)


class RWKV4(nn.Module):
    def __init__(self, cfg: V4Config):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg.n_embd, i, TimeMix(cfg), ChannelMix(cfg.n_embd, cfg.ffn_dim))
                                    for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    @staticmethod
    def from_state_dict(sd) -> "RWKV4":
        V, C = sd["emb.weight"].shape
        L = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        m = RWKV4(V4Config(L, C, V, sd["blocks.0.ffn.key.weight"].shape[0]))
        m.load_state_dict({k: v.float() for k, v in sd.items()})
        return m

    @torch.no_grad()
    def forward(self, idx, state: State | None = None):
        """idx: (B, T) int64 -> logits (B, T, V), new State."""
        state = state or State.zeros(self.cfg, idx.shape[0])
        x = self.blocks[0].ln0(self.emb(idx))                                   # (B, T, C)
        shifts, wkvs = [], []
        for i, blk in enumerate(self.blocks):
            dx, s_att, wkv = blk.att(blk.ln1(x), state.shift[i, 0], state.wkv[i])
            x = x + dx
            dx, s_ffn = blk.ffn(blk.ln2(x), state.shift[i, 1])
            x = x + dx
            shifts.append(torch.stack([s_att, s_ffn]))
            wkvs.append(wkv)
        return self.head(self.ln_out(x)), State(torch.stack(shifts), torch.stack(wkvs))
