"""RWKV-7 ("Goose", x070) in plain PyTorch: the readable truth.

Every emitter is tested against this module and the training module trains it, so there is one
definition of the math. Parameter names and shapes are exactly those of official RWKV-LM checkpoints,
so `model.load_state_dict(torch.load(ckpt))` and `model.state_dict()` round-trip the official format.

Dimensions (named once, used everywhere):
    B batch, T time, C channels (n_embd), H heads, N head size (C = H*N), F FFN width, V vocabulary,
    L layers, Dw/Da/Dv/Dg the low-rank widths of the decay / in-context-lr / value-residual / gate LoRAs,
    D the side of RWKV-7a's DeepEmbed matrices (a table row holds a D x D matrix; 32 in released models).

RWKV-7a ("DeepEmbed", V7Config.deep_embed = D > 0): every channel-mix also scales its hidden units per token
by a D x D matrix read from a per-token table (ChannelMix's docstring); the official package runs these
checkpoints with RWKV_DE_VERSION=1.

State per layer (the RNN's whole memory):
    shift: (2, B, C)    the previous token's normalised input to time-mix [0] and channel-mix [1]
    wkv:   (B, H, N, N) the matrix-valued memory, wkv[b, h, i, j] with i the value and j the key index
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import Block, token_shift

# exp(-0.5): the decay is exp(-e^-0.5 * sigmoid(.)), i.e. in (e^-0.607, 1)
DECAY_SCALE = math.exp(-0.5)
LN_X_EPS = 64e-5  # group-norm eps on the wkv output, as in RWKV-LM (head_size_divisor 8)


@dataclass(frozen=True)
class V7Config:
    n_layer: int
    n_embd: int
    head_size: int
    vocab_size: int
    ffn_dim: int
    dim_w: int
    dim_a: int
    dim_v: int
    dim_g: int
    deep_embed: int = 0      # RWKV-7a: D, the side of the DeepEmbed matrices (0: plain RWKV-7)

    def __post_init__(self):
        for f in ("n_layer", "n_embd", "head_size", "vocab_size", "ffn_dim", "dim_w", "dim_a", "dim_v", "dim_g"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"V7Config.{f} must be a positive int, got {v!r}")
        if not isinstance(self.deep_embed, int) or self.deep_embed < 0:
            raise ValueError(f"V7Config.deep_embed must be an int >= 0, got {self.deep_embed!r}")
        if self.n_embd % self.head_size:
            raise ValueError(f"V7Config.n_embd ({self.n_embd}) must be a multiple of head_size ({self.head_size})")

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    @staticmethod
    def default_dims(n_embd: int) -> dict:
        """Low-rank widths RWKV-LM x070 chooses for a given n_embd (and FFN width 4C)."""
        def r32(x):
            return max(32, int(round(x / 32) * 32))
        return dict(
            ffn_dim=4 * n_embd,
            dim_w=r32(1.8 * n_embd ** 0.5),
            dim_a=r32(1.8 * n_embd ** 0.5),
            dim_v=r32(1.3 * n_embd ** 0.5),
            dim_g=r32(0.6 * n_embd ** 0.8),
        )


def wkv7_recurrent(r, w, k, v, a, b, wkv):
    """The RWKV-7 state recurrence, one step at a time (the generalised delta rule).

    r, w, k, v, a, b: (B, T, H, N); wkv: (B, H, N, N) -> y (B, T, H, N), wkv (B, H, N, N)
        wkv_t = wkv_{t-1} * w_t[None, :] + (wkv_{t-1} @ a_t) b_t^T + v_t k_t^T
        y_t   = wkv_t @ r_t
    (in RWKV-7, a = -kk and b = kk * iclr)
    """
    T = r.shape[1]
    ys = []
    for t in range(T):
        r_, w_, k_, v_, a_, b_ = (z[:, t] for z in (r, w, k, v, a, b))  # (B, H, N)
        sa = wkv @ a_.unsqueeze(-1)                                      # (B, H, N, 1)
        wkv = wkv * w_.unsqueeze(-2) + sa @ b_.unsqueeze(-2) + v_.unsqueeze(-1) @ k_.unsqueeze(-2)
        ys.append((wkv @ r_.unsqueeze(-1)).squeeze(-1))                  # (B, H, N)
    return torch.stack(ys, dim=1), wkv


def wkv7_chunked(r, w, k, v, a, b, wkv, chunk_len: int = 32):
    """`wkv7_recurrent`, computed chunk by chunk (same maths, same signature; for fast training).

    Within a chunk of L steps starting from state S0 (V x K), write z_t = S_{t-1} a_t. Then
        S_t = S0 G_t + sum_{j<=t} (z_j b_j^T + v_j k_j^T) G_t / G_j,   G_t = diag(w_1 * ... * w_t)
    is a plain decaying linear recurrence, and the z_t solve a unit lower-triangular L x L system
    (the "UT transform" of the WY representation):
        (I - A_ab) Z = A~ S0^T + A_ak V,   A_xy[t, j] = (x_t * g_{t-1}) . (y_j / g_j), j < t
    so every chunk is a few batched matmuls and one unit-triangular inverse, and only the chunk-to-chunk
    state hand-over (S <- S M + E, Y = Q S^T + P) is sequential. Exact in exact arithmetic; the
    split g_{t-1} / g_j needs prod(w) over a chunk to stay well inside the dtype's range, which holds
    for RWKV-7 (w >= exp(-e^-0.5) = 0.545, so 0.545^64 ~ 1e-17 even for chunk_len 64).

    r, w, k, v, a, b: (B, T, H, N); wkv: (B, H, N, N) -> y (B, T, H, N), wkv (B, H, N, N)
    """
    B, T, H, N = r.shape
    L = max(1, min(chunk_len, T))
    pad = (-T) % L
    if pad:  # identity steps (w = 1, everything else 0) leave the state unchanged
        zeros = r.new_zeros(B, pad, H, N)
        r, k, v, a, b = (torch.cat([z, zeros], 1) for z in (r, k, v, a, b))
        w = torch.cat([w, torch.ones_like(zeros)], 1)
    nC = (T + pad) // L
    ch = lambda z: z.view(B, nC, L, H, N).permute(0, 3, 1, 2, 4)  # noqa: E731  -> (B, H, nC, L, N)
    r, w, k, v, a, b = (ch(z) for z in (r, w, k, v, a, b))

    lw = torch.log(w)
    cum = torch.cumsum(lw, dim=-2)                   # log g_t (inclusive),     (B, H, nC, L, N)
    a_ = a * torch.exp(cum - lw)                      # a_t * g_{t-1}
    r_ = r * torch.exp(cum)                           # r_t * g_t
    inv = torch.exp(-cum)
    b_, k_ = b * inv, k * inv                         # b_j / g_j, k_j / g_j
    tail = torch.exp(cum[..., -1:, :] - cum)          # g_L / g_j
    bL, kL = b * tail, k * tail

    ones = torch.ones(L, L, dtype=torch.bool, device=r.device)
    strict, incl = torch.tril(ones, -1), torch.tril(ones)
    mT = lambda x, y, m: (x @ y.transpose(-1, -2)).masked_fill(~m, 0)  # noqa: E731  (.., L, L)
    A_ab, A_ak = mT(a_, b_, strict), mT(a_, k_, strict)
    A_rb, A_rk = mT(r_, b_, incl), mT(r_, k_, incl)

    # (I - A_ab)^-1 = (I + A)(I + A^2)(I + A^4)... since A_ab is nilpotent (A^L = 0); batched
    # matmuls are much faster than a batched triangular solve on CPU
    inv_ab, Ap, n = A_ab + torch.eye(L, dtype=r.dtype, device=r.device), A_ab, 2
    while n < L:
        Ap = Ap @ Ap
        inv_ab = inv_ab + inv_ab @ Ap
        n *= 2
    X = inv_ab @ torch.cat([a_, A_ak @ v], -1)
    Xw, Xu = X[..., :N], X[..., N:]                   # Z = Xw S0^T + Xu,        (.., L, N) each
    Q = r_ + A_rb @ Xw                                # Y = Q S0^T + P
    P = A_rb @ Xu + A_rk @ v
    M = torch.diag_embed(torch.exp(cum[..., -1, :])) + Xw.transpose(-1, -2) @ bL   # S_L = S0 M + E
    E = Xu.transpose(-1, -2) @ bL + v.transpose(-1, -2) @ kL                       # (.., N, N)

    ys = []
    for c in range(nC):
        ys.append(Q[:, :, c] @ wkv.transpose(-1, -2) + P[:, :, c])                 # (B, H, L, N)
        wkv = wkv @ M[:, :, c] + E[:, :, c]
    y = torch.stack(ys, dim=2).permute(0, 2, 3, 1, 4).reshape(B, nC * L, H, N)
    return y[:, :T], wkv


class TimeMix(nn.Module):
    def __init__(self, cfg: V7Config, layer_id: int):
        super().__init__()
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        self.cfg, self.layer_id = cfg, layer_id
        p = lambda *shape: nn.Parameter(torch.zeros(*shape))  # noqa: E731  (initialised by init_weights)
        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = (p(1, 1, C) for _ in range(6))
        self.w0, self.w1, self.w2 = p(1, 1, C), p(C, cfg.dim_w), p(cfg.dim_w, C)
        self.a0, self.a1, self.a2 = p(1, 1, C), p(C, cfg.dim_a), p(cfg.dim_a, C)
        # layer 0's value is the "first value" the others mix towards; RWKV-LM still gives it (unused) v0..v2
        self.v0, self.v1, self.v2 = p(1, 1, C), p(C, cfg.dim_v), p(cfg.dim_v, C)
        self.g1, self.g2 = p(C, cfg.dim_g), p(cfg.dim_g, C)
        self.k_k, self.k_a, self.r_k = p(1, 1, C), p(1, 1, C), p(H, N)
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=LN_X_EPS)

    def forward(self, x, shift, wkv, v_first, wkv_fn=None):
        """x: (B, T, C), shift: (B, C), wkv: (B, H, N, N), v_first: (B, T, C) or None.

        wkv_fn: the state recurrence to use (same signature as `wkv7_recurrent`, the default).
        """
        B, T, C = x.shape
        H, N = self.cfg.n_head, self.cfg.head_size
        xx = token_shift(x, shift) - x
        xr, xw, xk, xv, xa, xg = (x + xx * m for m in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))

        r = self.receptance(xr)
        w = -F.softplus(-(self.w0 + torch.tanh(xw @ self.w1) @ self.w2)) - 0.5  # log-log decay, <= -0.5
        k = self.key(xk)
        v = self.value(xv)
        iclr = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)                 # in-context learning rate
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0).view(B, T, C)
        k = k * (1 + (iclr - 1) * self.k_a)
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)

        decay = torch.exp(-torch.exp(w))                                          # (B, T, C) in (0, 1)
        hv = lambda z: z.view(B, T, H, N)  # noqa: E731
        y, wkv = (wkv_fn or wkv7_recurrent)(hv(r), hv(decay), hv(k), hv(v), hv(-kk), hv(kk * iclr), wkv)

        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        bonus = (hv(r) * hv(k) * self.r_k).sum(dim=-1, keepdim=True) * hv(v)      # (B, T, H, N)
        y = y + bonus.reshape(B, T, C)
        return self.output(y * g), x[:, -1], wkv, v_first


class ChannelMix(nn.Module):
    """relu(K xk)^2 -> V. RWKV-7a (cfg.deep_embed = D > 0) scales the hidden units per token:

        row = s_emb[token] + x0 @ s_emb_x^T       (D*D,)   x0 = ln0(emb[token]), the first layer's input
        h   = h * ((x @ s1) @ row.view(D, D) @ s2 + s0)    x = this channel-mix's input (ln2's output)
    """

    def __init__(self, cfg: V7Config):
        super().__init__()
        C, F, D = cfg.n_embd, cfg.ffn_dim, cfg.deep_embed
        self.x_k = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, F, bias=False)
        self.value = nn.Linear(F, C, bias=False)
        if D:
            self.s_emb = nn.Embedding(cfg.vocab_size, D * D)
            self.s_emb_x = nn.Linear(C, D * D, bias=False)
            self.s0 = nn.Parameter(torch.zeros(1, 1, F))
            self.s1 = nn.Parameter(torch.zeros(C, D))
            self.s2 = nn.Parameter(torch.zeros(D, F))

    def forward(self, x, shift, idx=None, x0=None):
        """x: (B, T, C), shift: (B, C) -> (B, T, C), new shift (B, C).
        RWKV-7a also takes the tokens idx (B, T) and x0 (B, T, C), their ln0-normalised embeddings."""
        k = x + (token_shift(x, shift) - x) * self.x_k
        k = torch.relu(self.key(k)) ** 2                                          # (B, T, F)
        if hasattr(self, "s_emb"):
            B, T, C = x.shape
            D = self.s1.shape[1]
            row = (self.s_emb(idx) + self.s_emb_x(x0)).view(B, T, D, D)           # (B, T, D, D)
            ss = ((x @ self.s1).unsqueeze(-2) @ row).squeeze(-2)                  # (B, T, D)
            k = k * (ss @ self.s2 + self.s0)                                      # (B, T, F)
        return self.value(k), x[:, -1]


@dataclass
class State:
    """The recurrent state of the whole model: shift (L, 2, B, C), wkv (L, B, H, N, N)."""
    shift: torch.Tensor
    wkv: torch.Tensor

    @staticmethod
    def zeros(cfg: V7Config, batch: int = 1, dtype=torch.float32, device=None) -> "State":
        L, C, H, N = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size
        return State(torch.zeros(L, 2, batch, C, dtype=dtype, device=device),
                     torch.zeros(L, batch, H, N, N, dtype=dtype, device=device))


class RWKV7(nn.Module):
    def __init__(self, cfg: V7Config):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg.n_embd, i, TimeMix(cfg, i), ChannelMix(cfg)) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, idx, state: State | None = None, last_only: bool = False, wkv_fn=None):
        """idx: (B, T) int64 -> logits (B, T, V) (or (B, V) with last_only), new State.

        wkv_fn: opt-in replacement for `wkv7_recurrent` (e.g. `wkv7_chunked` for training).
        """
        B, T = idx.shape
        if state is None:
            state = State.zeros(self.cfg, B, dtype=self.emb.weight.dtype, device=idx.device)
        shifts, wkvs = [], []
        x = x0 = self.blocks[0].ln0(self.emb(idx))                                # (B, T, C)
        v_first = None
        for i, blk in enumerate(self.blocks):
            dx, s_att, wkv, v_first = blk.att(blk.ln1(x), state.shift[i, 0], state.wkv[i], v_first, wkv_fn=wkv_fn)
            x = x + dx
            dx, s_ffn = blk.ffn(blk.ln2(x), state.shift[i, 1], idx, x0)
            x = x + dx
            shifts.append(torch.stack([s_att, s_ffn]))
            wkvs.append(wkv)
        if last_only:
            x = x[:, -1]
        logits = self.head(self.ln_out(x))
        return logits, State(torch.stack(shifts), torch.stack(wkvs))

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, scale: float = 1.0):
        """RWKV-LM-like initialisation (sane activations; also used to make random test models).

        `scale` > 0 perturbs the usually-zero parameters so random models exercise every term.
        """
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        cfg = self.cfg
        C, L = cfg.n_embd, cfg.n_layer

        def rnd(*shape, std=1.0):
            return torch.randn(*shape, generator=g) * std

        def uni(*shape, lo=0.0, hi=1.0):
            return torch.rand(*shape, generator=g) * (hi - lo) + lo

        self.emb.weight.copy_(uni(cfg.vocab_size, C, lo=-1e-4, hi=1e-4) + rnd(cfg.vocab_size, C, std=0.02 * scale))
        self.head.weight.copy_(rnd(cfg.vocab_size, C, std=0.5 / math.sqrt(C)))
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + rnd(C, std=0.1 * scale))
                m.bias.copy_(rnd(C, std=0.1 * scale))
        ddd = torch.arange(C, dtype=torch.float32) / C
        for i, blk in enumerate(self.blocks):
            r0 = i / max(1, L - 1)            # 0 -> 1
            r1 = 1.0 - i / L                  # 1 -> ~0
            att, ffn = blk.att, blk.ffn
            att.x_r.copy_((1 - ddd ** (0.2 * r1)).view(1, 1, C))
            att.x_w.copy_((1 - ddd ** (0.9 * r1)).view(1, 1, C))
            att.x_k.copy_((1 - ddd ** (0.7 * r1)).view(1, 1, C))
            att.x_v.copy_((1 - ddd ** (0.7 * r1)).view(1, 1, C))
            att.x_a.copy_((1 - ddd ** (0.9 * r1)).view(1, 1, C))
            att.x_g.copy_((1 - ddd ** (0.2 * r1)).view(1, 1, C))
            n = torch.arange(C, dtype=torch.float32)
            att.w0.copy_((-6 + 5 * (n / (C - 1)) ** (1 + r0 ** 0.3) + 0.5).view(1, 1, C))
            att.w1.copy_(rnd(C, cfg.dim_w, std=0.1 * scale))
            att.w2.copy_(rnd(cfg.dim_w, C, std=0.1 * scale / math.sqrt(cfg.dim_w)))
            att.a0.copy_(rnd(1, 1, C, std=0.5 * scale))
            att.a1.copy_(rnd(C, cfg.dim_a, std=0.1 * scale))
            att.a2.copy_(rnd(cfg.dim_a, C, std=0.1 * scale / math.sqrt(cfg.dim_a)))
            att.v0.copy_(1 + rnd(1, 1, C, std=0.5 * scale))
            att.v1.copy_(rnd(C, cfg.dim_v, std=0.1 * scale))
            att.v2.copy_(rnd(cfg.dim_v, C, std=0.1 * scale / math.sqrt(cfg.dim_v)))
            att.g1.copy_(rnd(C, cfg.dim_g, std=0.1 * scale))
            att.g2.copy_(rnd(cfg.dim_g, C, std=1.0 / math.sqrt(cfg.dim_g)))
            att.k_k.copy_(0.85 + rnd(1, 1, C, std=0.1 * scale))
            att.k_a.copy_(1 + rnd(1, 1, C, std=0.1 * scale))
            att.r_k.copy_(-0.04 + rnd(cfg.n_head, cfg.head_size, std=0.1 * scale))
            for lin in (att.receptance, att.key, att.value):
                lin.weight.copy_(rnd(C, C, std=1.0 / math.sqrt(C)))
            att.output.weight.copy_(rnd(C, C, std=0.5 * scale / math.sqrt(C)))
            att.ln_x.weight.copy_(1 + rnd(C, std=0.1 * scale))
            att.ln_x.bias.copy_(rnd(C, std=0.1 * scale))
            ffn.x_k.copy_((1 - ddd ** (r1 ** 4)).view(1, 1, C))
            ffn.key.weight.copy_(rnd(cfg.ffn_dim, C, std=1.0 / math.sqrt(C)))
            ffn.value.weight.copy_(rnd(C, cfg.ffn_dim, std=0.5 * scale / math.sqrt(cfg.ffn_dim)))
            if cfg.deep_embed:     # RWKV-7a: multipliers ss @ s2 + s0 around 1, varying by token
                D = cfg.deep_embed
                ffn.s_emb.weight.copy_(rnd(cfg.vocab_size, D * D, std=1.0 / math.sqrt(D)))
                ffn.s_emb_x.weight.copy_(rnd(D * D, C, std=0.3 * scale / math.sqrt(C * D)))
                ffn.s0.copy_(1 + rnd(1, 1, cfg.ffn_dim, std=0.1 * scale))
                ffn.s1.copy_(rnd(C, D, std=1.0 / math.sqrt(C)))
                ffn.s2.copy_(rnd(D, cfg.ffn_dim, std=0.3 * scale / math.sqrt(D)))
        return self


def config_from_state_dict(sd) -> V7Config:
    """Infer every hyper-parameter of an RWKV-7 checkpoint from its tensor shapes."""
    V, C = sd["emb.weight"].shape
    H, N = sd["blocks.0.att.r_k"].shape
    L = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    return V7Config(n_layer=L, n_embd=C, head_size=N, vocab_size=V,
                    ffn_dim=sd["blocks.0.ffn.key.weight"].shape[0],
                    dim_w=sd["blocks.0.att.w1"].shape[1], dim_a=sd["blocks.0.att.a1"].shape[1],
                    dim_v=sd["blocks.1.att.v1"].shape[1] if L > 1 else sd["blocks.0.att.v1"].shape[1],
                    dim_g=sd["blocks.0.att.g1"].shape[1],
                    deep_embed=sd["blocks.0.ffn.s1"].shape[1] if "blocks.0.ffn.s1" in sd else 0)
