"""RWKV-4 ("Dove") in plain PyTorch, recurrent and parallel forms: the readable truth for rwkvc's v4 lowering.

Parameter names and shapes are those of official RWKV-LM v4 checkpoints, so
`RWKV4.from_state_dict(torch.load(ckpt))` loads one as is.

Dimensions: B batch, T time, C channels, F FFN width, V vocabulary, L layers.

State per layer:
    shift: (2, B, C)  the previous token's normalised input to time-mix [0] and channel-mix [1]
    wkv:   (B, 3, C)  the running numerator aa, denominator bb and their common exponent pp: the
                      weighted average sum_i e^{w (t-1-i) + k_i} v_i / sum_i e^{w (t-1-i) + k_i} is kept
                      as aa / bb with both scaled by e^-pp, so nothing overflows (pp starts at -1e38)

The WKV comes in two forms with one signature: `wkv4_recurrent` (token by token, the RNN) and
`wkv4_chunked` (whole chunks of tokens at once, the parallel / training form); `RWKV4.forward(...,
wkv_fn=...)` picks one, and both give the same logits and state to float tolerance.
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


def wkv4_chunked(w, u, k, v, state, chunk_len: int = 64):
    """`wkv4_recurrent` computed a chunk of L tokens at a time (same maths, same signature).

    Unrolled, the output at step t of a chunk that starts from the state (aa, bb, pp) is a softmax-like
    weighted average over the incoming state and the chunk's tokens i <= t, with log-weights
        e_state(t) = pp + w t                       (the state, decayed t times; it adds aa, bb)
        e(t, i)    = k_i + w (t - 1 - i)   i < t    (earlier tokens, decayed t - 1 - i times)
        e(t, t)    = u + k_t                        (the current token, with the bonus)
    so every y_t is one (L x L) masked "attention" row. Subtracting each row's maximum m_t before exp
    (the max trick the recurrent form applies step by step) keeps every exp in (0, 1]. The state the
    chunk hands on is the same sum over all L tokens seen from step L, with its own maximum as pp:
        pp' = max(pp + w L, max_i k_i + w (L - 1 - i))
        aa' = e^{pp + w L - pp'} aa + sum_i e^{k_i + w (L - 1 - i) - pp'} v_i   (bb' alike, with 1 for v_i)
    Max distributes over the additions, so pp' equals the recurrent form's pp. Only this hand-over is
    sequential; memory is B C L^2 per chunk (chunk_len >= T: the whole sequence in one chunk).

    w: (C,) = -exp(time_decay), u: (C,), k, v: (B, T, C); state (B, 3, C) -> y (B, T, C), state (B, 3, C)
    """
    B, T, C = k.shape
    aa, bb, pp = state.unbind(1)                                             # (B, C) each
    w_, u_ = w.view(1, C, 1), u.view(1, C, 1)
    ys = []
    for c0 in range(0, T, chunk_len):
        kc, vc = k[:, c0:c0 + chunk_len].transpose(1, 2), v[:, c0:c0 + chunk_len].transpose(1, 2)  # (B, C, L)
        L = kc.shape[-1]
        t = torch.arange(L, device=k.device)
        dt = (t[:, None] - 1 - t[None, :]).to(k.dtype)                       # (L, L): t - 1 - i
        e = torch.where(t[:, None] > t[None, :], w_.unsqueeze(-1) * dt + kc.unsqueeze(-2),
                        torch.where(t[:, None] == t[None, :], (u_ + kc).unsqueeze(-2), -torch.inf))  # (B, C, L, L)
        e_state = pp.unsqueeze(-1) + w_ * t.to(k.dtype)                      # (B, C, L)
        m = torch.maximum(e.amax(-1), e_state)                               # (B, C, L), finite (the diagonal)
        p, p_state = torch.exp(e - m.unsqueeze(-1)), torch.exp(e_state - m)
        num = (p @ vc.unsqueeze(-1)).squeeze(-1) + p_state * aa.unsqueeze(-1)
        y = num / (p.sum(-1) + p_state * bb.unsqueeze(-1))                   # (B, C, L)
        ys.append(y.transpose(1, 2))                                         # (B, L, C)
        e_end = kc + w_ * (L - 1 - t).to(k.dtype)                            # (B, C, L): token i seen from step L
        pp_new = torch.maximum(pp + w * L, e_end.amax(-1))                   # (B, C)
        q, q_state = torch.exp(e_end - pp_new.unsqueeze(-1)), torch.exp(pp + w * L - pp_new)
        aa, bb, pp = q_state * aa + (q * vc).sum(-1), q_state * bb + q.sum(-1), pp_new
    return torch.cat(ys, 1), torch.stack([aa, bb, pp], 1)


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

    def forward(self, x, shift, wkv, wkv_fn=None):
        """x: (B, T, C), shift: (B, C), wkv: (B, 3, C) -> (B, T, C), new shift, new wkv.

        wkv_fn: the WKV form (same signature as `wkv4_recurrent`, the default; or `wkv4_chunked`).
        """
        xx = token_shift(x, shift)
        k = self.key(lerp_mix(x, xx, self.time_mix_k))
        v = self.value(lerp_mix(x, xx, self.time_mix_v))
        r = torch.sigmoid(self.receptance(lerp_mix(x, xx, self.time_mix_r)))
        y, wkv = (wkv_fn or wkv4_recurrent)(-torch.exp(self.time_decay), self.time_first, k, v, wkv)
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
    def forward(self, idx, state: State | None = None, wkv_fn=None):
        """idx: (B, T) int64 -> logits (B, T, V), new State. wkv_fn: see `TimeMix.forward`."""
        state = state or State.zeros(self.cfg, idx.shape[0])
        x = self.blocks[0].ln0(self.emb(idx))                                   # (B, T, C)
        shifts, wkvs = [], []
        for i, blk in enumerate(self.blocks):
            dx, s_att, wkv = blk.att(blk.ln1(x), state.shift[i, 0], state.wkv[i], wkv_fn)
            x = x + dx
            dx, s_ffn = blk.ffn(blk.ln2(x), state.shift[i, 1])
            x = x + dx
            shifts.append(torch.stack([s_att, s_ffn]))
            wkvs.append(wkv)
        return self.head(self.ln_out(x)), State(torch.stack(shifts), torch.stack(wkvs))
