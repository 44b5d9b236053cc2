"""RWKV-6 ("Finch", x060) in plain PyTorch, recurrent and parallel forms: the readable truth for v6.

Parameter names are the official checkpoints' own, so `RWKV6.from_state_dict(torch.load(ckpt))` loads one
as is (a state-tuned file's `time_state` becomes the initial state).

Dimensions: B batch, T time, C channels, H heads, N head size, F FFN width, V vocabulary,
D the token-shift LoRA width (time_maa_w1 is (C, 5D)), Dw the decay LoRA width.

What RWKV-6 adds to RWKV-5.2:
    data-dependent token shift  x_m = x + (prev - x) * (maa_m + W2_m tanh(W1 (x + (prev - x) * maa_x)))
                                for m in w, k, v, r, g
    data-dependent decay        w_t = exp(-exp(time_decay + W2_w tanh(W1_w x_w)))   per token and channel
State layout as RWKV-5: shift (2, B, C), wkv (B, H, N, N) [value, key]. The WKV forms are RWKV-5's
(`rwkvc.reference.v5.wkv5_recurrent` and the parallel `wkv5_chunked`), which take a per-token decay.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import Block, token_shift
from .v5 import LN_X_EPS, State, group_norm, load_with_time_state, wkv5_chunked, wkv5_recurrent  # noqa: F401

MAA = ("w", "k", "v", "r", "g")


@dataclass(frozen=True)
class V6Config:
    n_layer: int
    n_embd: int
    head_size: int
    vocab_size: int
    ffn_dim: int
    dim_maa: int = 32
    dim_decay: int = 64

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    @staticmethod
    def from_state_dict(sd) -> "V6Config":
        V, C = sd["emb.weight"].shape
        L = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        H, N = sd["blocks.0.att.time_faaaa"].shape
        return V6Config(L, C, N, V, sd["blocks.0.ffn.key.weight"].shape[0],
                        sd["blocks.0.att.time_maa_w1"].shape[1] // 5, sd["blocks.0.att.time_decay_w1"].shape[1])


class TimeMix(nn.Module):
    def __init__(self, cfg: V6Config):
        super().__init__()
        C, H, N, D = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.dim_maa
        self.cfg = cfg
        for m in ("x",) + MAA:
            setattr(self, f"time_maa_{m}", nn.Parameter(torch.zeros(1, 1, C)))
        self.time_maa_w1 = nn.Parameter(torch.zeros(C, 5 * D))
        self.time_maa_w2 = nn.Parameter(torch.zeros(5, D, C))
        self.time_decay = nn.Parameter(torch.zeros(1, 1, C))
        self.time_decay_w1 = nn.Parameter(torch.zeros(C, cfg.dim_decay))
        self.time_decay_w2 = nn.Parameter(torch.zeros(cfg.dim_decay, C))
        self.time_faaaa = nn.Parameter(torch.zeros(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.gate = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=LN_X_EPS)

    def forward(self, x, shift, wkv, wkv_fn=None):
        """x: (B, T, C), shift: (B, C), wkv: (B, H, N, N) -> (B, T, C), new shift, new wkv.

        wkv_fn: the WKV form (same signature as `wkv5_recurrent`, the default; or `wkv5_chunked`).
        """
        B, T, C = x.shape
        H, N = self.cfg.n_head, self.cfg.head_size
        xx = token_shift(x, shift) - x                                           # prev - x
        xxx = torch.tanh((x + xx * self.time_maa_x) @ self.time_maa_w1)         # (B, T, 5D)
        xxx = xxx.view(B, T, 5, -1).transpose(1, 2)                              # (B, 5, T, D)
        mw, mk, mv, mr, mg = (xxx @ self.time_maa_w2.unsqueeze(0)).unbind(1)    # each (B, T, C)
        xw = x + xx * (self.time_maa_w + mw)
        xk = x + xx * (self.time_maa_k + mk)
        xv = x + xx * (self.time_maa_v + mv)
        xr = x + xx * (self.time_maa_r + mr)
        xg = x + xx * (self.time_maa_g + mg)

        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        g = F.silu(self.gate(xg))
        w = self.time_decay + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2   # (B, T, C)
        w = torch.exp(-torch.exp(w))
        hv = lambda z: z.view(B, T, H, N)  # noqa: E731
        y, wkv = (wkv_fn or wkv5_recurrent)(hv(r), hv(k), hv(v), hv(w), self.time_faaaa, wkv)
        y = group_norm(y.reshape(B, T, C), self.ln_x) * g
        return self.output(y), x[:, -1], wkv


class ChannelMix(nn.Module):
    """y = sigmoid(R xr) * V relu(K xk)^2 with x_m = x + (prev - x) * maa_m."""

    def __init__(self, cfg: V6Config):
        super().__init__()
        C = cfg.n_embd
        self.time_maa_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_maa_r = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, cfg.ffn_dim, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(cfg.ffn_dim, C, bias=False)

    def forward(self, x, shift):
        xx = token_shift(x, shift) - x
        k = torch.relu(self.key(x + xx * self.time_maa_k)) ** 2                 # (B, T, F)
        r = torch.sigmoid(self.receptance(x + xx * self.time_maa_r))
        return r * self.value(k), x[:, -1]


class RWKV6(nn.Module):
    time_state: torch.Tensor | None = None   # (L, H, N, N): a state-tuned initial wkv

    def __init__(self, cfg: V6Config):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg.n_embd, i, TimeMix(cfg), ChannelMix(cfg)) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    @staticmethod
    def from_state_dict(sd) -> "RWKV6":
        return load_with_time_state(RWKV6(V6Config.from_state_dict(sd)), sd)

    def zero_state(self, batch=1) -> State:
        c = self.cfg
        st = State.zeros(c.n_layer, c.n_embd, c.n_head, c.head_size, batch)
        if self.time_state is not None:
            st.wkv[:] = self.time_state.unsqueeze(1)
        return st

    @torch.no_grad()
    def forward(self, idx, state: State | None = None, wkv_fn=None):
        """idx: (B, T) int64 -> logits (B, T, V), new State.

        wkv_fn: the WKV form, `wkv5_recurrent` (default) or `wkv5_chunked` (parallel, for the
        data-dependent decay too); see `TimeMix.forward`."""
        state = state or self.zero_state(idx.shape[0])
        x = self.blocks[0].ln0(self.emb(idx))
        shifts, wkvs = [], []
        for i, blk in enumerate(self.blocks):
            dx, s_att, wkv = blk.att(blk.ln1(x), state.shift[i, 0], state.wkv[i], wkv_fn)
            x = x + dx
            dx, s_ffn = blk.ffn(blk.ln2(x), state.shift[i, 1])
            x = x + dx
            shifts.append(torch.stack([s_att, s_ffn]))
            wkvs.append(wkv)
        return self.head(self.ln_out(x)), State(torch.stack(shifts), torch.stack(wkvs))
