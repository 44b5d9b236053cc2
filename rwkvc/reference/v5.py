"""RWKV-5 ("Eagle": 5.0, 5.1, 5.2) and RWKV-Lite's compressed 5.2 in plain PyTorch, recurrent and parallel.

The readable truth for rwkvc's v5 lowering, and the only reference for RWKV-Lite's variants, which the
official `rwkv` package cannot run. Parameter names are the checkpoints' own, so
`RWKV5.from_state_dict(torch.load(ckpt))` loads an official or RWKV-Lite file as is.

Dimensions: B batch, T time, C channels, H heads, N head size (C = H*N), F FFN width, V vocabulary,
R the rank of a factorised projection, D the FFN predictor's hidden width, K vocabulary clusters.

State per layer:
    shift: (2, B, C)     the previous token's normalised input to time-mix [0] and channel-mix [1]
    wkv:   (B, H, N, N)  the matrix memory, wkv[b, h, i, j] with i the value and j the key index
                         (the layout of RWKV-7 and of RWKV-6's time_state; the official package keeps its
                         transpose)

The WKV comes in two forms with one signature, shared with RWKV-6: `wkv5_recurrent` (token by token, the
RNN) and `wkv5_chunked` (whole chunks of tokens at once, the parallel / training form); `RWKV5.forward(...,
wkv_fn=...)` picks one, and both give the same logits and state to float tolerance.

RWKV-Lite adds (see rwkvc.arch.lite for the keys):
    factorised projections   y = W2 act(W1 x) (+ diag * x): act = relu^2 where a diag exists, else none
    FFN sparsity             per token, only hidden units predicted active contribute (`ffn_active`)
    hierarchical head        exact logits only for the likeliest vocabulary clusters (`clustered_logits`)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import Block, token_shift
from .v4 import lerp_mix

LN_X_EPS = 64e-5          # group-norm eps on the wkv output (RWKV-LM: 1e-5 * head_size_divisor^2)
PROJ = ("receptance", "key", "value", "gate")


@dataclass(frozen=True)
class V5Config:
    n_layer: int
    n_embd: int
    head_size: int
    vocab_size: int
    ffn_dim: int
    version: str = "5.2"                 # "5.0" (no gate), "5.1" (per-head decay), "5.2"
    bonus: str = "time_faaaa"            # or "time_first" (5.0/5.1: the bonus is exp(time_first))
    # RWKV-Lite: factorised projections, e.g. {"att.key": (R, True)} = key1 (R,C), key2 (C,R), key_diag (C,)
    factorised: tuple[tuple[str, int, bool], ...] = ()
    mlp_dim: int = 0                     # FFN predictor width D (0: none)
    head_clusters: int = 0               # K rows of head_l1 (0: none)

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    def fact(self, name):
        return next(((r, d) for n, r, d in self.factorised if n == name), None)

    @staticmethod
    def from_state_dict(sd) -> "V5Config":
        V, C = sd["emb.weight"].shape
        L = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        td = sd["blocks.0.att.time_decay"]
        H = td.shape[0]
        gated = any(k.startswith("blocks.0.att.gate") for k in sd)
        version = "5.2" if td.dim() > 1 and td.shape[1] > 1 else ("5.1" if gated else "5.0")
        fact = []
        for part, names in (("att", PROJ), ("ffn", ("receptance", "key", "value"))):
            for n in names:
                k1 = f"blocks.0.{part}.{n}1.weight"
                if k1 in sd:
                    fact.append((f"{part}.{n}", int(sd[k1].shape[0]), f"blocks.0.{part}.{n}_diag" in sd))
        F_ = sd["blocks.0.ffn.key.weight" if "blocks.0.ffn.key.weight" in sd else "blocks.0.ffn.key2.weight"].shape[0]
        return V5Config(L, C, C // H, V, F_, version,
                        "time_faaaa" if "blocks.0.att.time_faaaa" in sd else "time_first", tuple(fact),
                        int(sd["blocks.0.mlp.fc1.weight"].shape[0]) if "blocks.0.mlp.fc1.weight" in sd else 0,
                        int(sd["head_l1.weight"].shape[0]) if "head_l1.weight" in sd else 0)


def add_projection(mod: nn.Module, name: str, in_f: int, out_f: int, fact):
    """Give `mod` the parameters of projection `name`: a Linear, or RWKV-Lite's name1/name2(/name_diag)."""
    if fact is None:
        setattr(mod, name, nn.Linear(in_f, out_f, bias=False))
        return
    rank, diag = fact
    setattr(mod, name + "1", nn.Linear(in_f, rank, bias=False))
    setattr(mod, name + "2", nn.Linear(rank, out_f, bias=False))
    if diag:
        setattr(mod, name + "_diag", nn.Parameter(torch.ones(in_f)))


def project(mod: nn.Module, name: str, x, relu_without_diag=False):
    """x @ W^T, or W2 act(W1 x) (+ diag * x) for a factorised projection."""
    if hasattr(mod, name):
        return getattr(mod, name)(x)
    h = getattr(mod, name + "1")(x)                                              # (..., R)
    diag = getattr(mod, name + "_diag", None)
    if diag is not None or relu_without_diag:
        h = torch.relu(h) ** 2
    y = getattr(mod, name + "2")(h)
    return y + x * diag if diag is not None else y


def wkv5_recurrent(r, k, v, w, u, wkv):
    """The RWKV-5/6 state recurrence, one step at a time.

    r, k, v: (B, T, H, N); w: decay in (0, 1), (H, N) or per token (B, T, H, N); u: bonus (H, N);
    wkv: (B, H, N, N), [value, key] -> y (B, T, H, N), wkv
        y_t   = wkv_{t-1} r_t + v_t (u . k_t . r_t)      (the current token enters with weight u)
        wkv_t = wkv_{t-1} diag(w_t) + v_t k_t^T
    """
    ys = []
    for t in range(r.shape[1]):
        rt, kt, vt = r[:, t], k[:, t], v[:, t]                                   # (B, H, N)
        wt = w[:, t] if w.dim() == 4 else w
        y = (wkv @ rt.unsqueeze(-1)).squeeze(-1) + vt * (u * kt * rt).sum(-1, keepdim=True)
        wkv = wkv * wt.unsqueeze(-2) + vt.unsqueeze(-1) @ kt.unsqueeze(-2)
        ys.append(y)
    return torch.stack(ys, 1), wkv


def wkv5_chunked(r, k, v, w, u, wkv, chunk_len: int = 32):
    """`wkv5_recurrent` computed a chunk of L tokens at a time (same maths, same signature).

    Within a chunk of tokens t = 0 .. L-1 that starts from the state S0, write G(a, b) = w_{a+1} * ... * w_b
    (per key channel n; 1 for a >= b). Unrolling the recurrence,
        S_t = S0 diag(G(-1, t)) + sum_{j<=t} v_j (k_j * G(j, t))^T
        y_t = S0 (r_t * G(-1, t-1)) + sum_{j<t} v_j A[t, j] + v_t (u . k_t . r_t)
        A[t, j] = sum_n r_t[n] k_j[n] G(j, t-1)[n]                                   (j < t)
    so Y = (R * G(-1, t-1)) S0^T + A V for the whole chunk (A: L x L, one "attention" matrix per head),
    and the state handed on is S_{L-1} = S0 diag(G(-1, L-1)) + V^T (K * G(j, L-1)). Only that hand-over
    is sequential. Each decay product is exp of a sum of log w over its own span (a cumulative sum over a
    masked (L, L, N) tensor), never a ratio of two cumulative products: RWKV-5/6 decays reach ~1e-4 per
    step, so w_0...w_{L-1} leaves the float range within a chunk and G_t / G_j would overflow. The cost
    is B T C L multiply-adds for the decays; a decay of exactly 0 (underflow) is an exp(-inf) = 0 factor.

    r, k, v: (B, T, H, N); w: decay in (0, 1), (H, N) or per token (B, T, H, N); u: bonus (H, N);
    wkv: (B, H, N, N), [value, key] -> y (B, T, H, N), wkv (B, H, N, N)
    """
    B, T, H, N = r.shape
    lw = torch.log(w).expand(B, T, H, N) if w.dim() == 2 else torch.log(w)  # log decay, <= 0
    uh = u.unsqueeze(-2)                                                     # (H, 1, N)
    ys = []
    for c0 in range(0, T, chunk_len):
        rc, kc, vc, lc = (z[:, c0:c0 + chunk_len].transpose(1, 2) for z in (r, k, v, lw))  # (B, H, L, N)
        L = rc.shape[-2]
        t = torch.arange(L, device=r.device)
        after = (t[:, None] > t[None, :]).unsqueeze(-1)                      # (L, L, 1): [s, j] = s > j
        span = torch.where(after, lc.unsqueeze(-2), 0.0).cumsum(-3)          # [t, j] = log G(j, t), (B, H, L, L, N)
        prev = torch.cat([torch.zeros_like(span[..., :1, :, :]), span[..., :-1, :, :]], -3)  # [t, j] = log G(j, t-1)
        decay = torch.where(after, prev, -torch.inf).exp()                   # 0 for j >= t
        A = torch.einsum("bhtn,bhjn,bhtjn->bhtj", rc, kc, decay)             # (B, H, L, L)
        A = A + torch.diag_embed((uh * kc * rc).sum(-1))                     # the current token, with the bonus
        g_in = torch.cat([torch.zeros_like(lc[..., :1, :]), lc[..., :-1, :]], -2).cumsum(-2).exp()  # G(-1, t-1)
        ys.append((rc * g_in) @ wkv.transpose(-1, -2) + A @ vc)              # (B, H, L, N)
        g_out = span[..., -1, :, :].exp()                                    # G(j, L-1), (B, H, L, N)
        wkv = wkv * lc.sum(-2, keepdim=True).exp() + vc.transpose(-1, -2) @ (kc * g_out)
    return torch.cat(ys, 2).transpose(1, 2), wkv


def group_norm(y, ln_x: nn.GroupNorm):
    """y: (B, T, C) -> GroupNorm over the heads, (B, T, C)."""
    B, T, C = y.shape
    return ln_x(y.reshape(B * T, C)).view(B, T, C)


class TimeMix(nn.Module):
    def __init__(self, cfg: V5Config):
        super().__init__()
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        self.cfg = cfg
        self.gated = cfg.version != "5.0"
        for m in "kvr" + ("g" if self.gated else ""):
            setattr(self, f"time_mix_{m}", nn.Parameter(torch.zeros(1, 1, C)))
        per = (H, N) if cfg.version == "5.2" else (H,)
        self.time_decay = nn.Parameter(torch.zeros(*per))
        setattr(self, cfg.bonus, nn.Parameter(torch.zeros(*per)))
        for n in PROJ if self.gated else PROJ[:3]:
            add_projection(self, n, C, C, cfg.fact("att." + n))
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=LN_X_EPS)

    def decay_and_bonus(self):
        """w (H, N) in (0, 1) and u (H, N), per-head values repeated over their channels."""
        H, N = self.cfg.n_head, self.cfg.head_size
        w = torch.exp(-torch.exp(self.time_decay)).reshape(H, -1).expand(H, N)
        u = getattr(self, self.cfg.bonus)
        u = torch.exp(u) if self.cfg.bonus == "time_first" else u
        return w, u.reshape(H, -1).expand(H, N)

    def forward(self, x, shift, wkv, wkv_fn=None):
        """x: (B, T, C), shift: (B, C), wkv: (B, H, N, N) -> (B, T, C), new shift, new wkv.

        wkv_fn: the WKV form (same signature as `wkv5_recurrent`, the default; or `wkv5_chunked`).
        """
        B, T, C = x.shape
        H, N = self.cfg.n_head, self.cfg.head_size
        xx = token_shift(x, shift)
        hv = lambda z: z.view(B, T, H, N)  # noqa: E731
        r = project(self, "receptance", lerp_mix(x, xx, self.time_mix_r))
        k = project(self, "key", lerp_mix(x, xx, self.time_mix_k))
        v = project(self, "value", lerp_mix(x, xx, self.time_mix_v))
        w, u = self.decay_and_bonus()
        y, wkv = (wkv_fn or wkv5_recurrent)(hv(r), hv(k), hv(v), w, u, wkv)
        y = group_norm(y.reshape(B, T, C), self.ln_x)
        if self.gated:
            y = y * F.silu(project(self, "gate", lerp_mix(x, xx, self.time_mix_g)))
        return self.output(y), x[:, -1], wkv


# ----------------------------------------------------------------------------------------------
# RWKV-Lite: FFN sparsity and the hierarchical head

@dataclass
class LiteOptions:
    """RWKV-Lite's inference knobs (its README's defaults)."""
    sparse_ffn: bool = True
    mlp_threshold: float = 0.7
    quant_bits: int = 1            # 0: no quantised-key predictor
    quant_quantile: float = 0.95
    clusters: np.ndarray | None = None   # (V,) cluster id per token: enables the hierarchical head
    head_top_p: float = 0.95
    head_min_k: int = 3
    head_max_k: int = 100
    extra: dict = field(default_factory=dict)


def quantise(w, bits):
    """RWKV-Lite's per-tensor quantiser: round((w - min) / scale) in [0, 2^bits - 1], w ~ q * scale + min."""
    factor = 2 ** bits - 1
    lo, hi = w.min(), w.max()
    scale = (hi - lo) / factor
    return ((w - lo) / scale).round().clamp(0, factor), scale, lo


def ffn_active(xk, key_w, fc1, fc2, opt: LiteOptions):
    """Which hidden units a token uses. xk: (B, T, C) -> bool (B, T, F) = mlp-predicted | quant-predicted."""
    active = torch.zeros(*xk.shape[:-1], key_w.shape[0] if key_w is not None else fc2.shape[0], dtype=torch.bool)
    if fc1 is not None:
        active |= torch.sigmoid(torch.relu(xk @ fc1.T) @ fc2.T) > opt.mlp_threshold
    if opt.quant_bits and key_w is not None:
        q, scale, zero = quantise(key_w.float(), opt.quant_bits)
        est = xk @ (q * scale + zero).T                                          # (B, T, F) ~ key(xk)
        thr = torch.quantile(est, opt.quant_quantile, dim=-1, keepdim=True)      # per token
        active |= est > thr
    return active


def clustered_logits(x, head_w, cluster_logits, clusters, top_p, min_k, max_k):
    """RWKV-Lite's hierarchical head for one token. x: (C,), head_w: (V, C), cluster_logits: (K,),
    clusters: (V,) cluster id per token -> logits (V,).

    The clusters are taken by probability, most likely first, until the cumulative probability reaches
    top_p (at least min_k, at most max_k). Their tokens get exact logits; every other cluster c spreads
    the mass the cluster head predicts for it evenly over its tokens:
        logit_t = log(sum_{exact} e^logit) + log p_c - log sum_{chosen} p - log |c|
    """
    K = cluster_logits.shape[0]
    logp = torch.log_softmax(cluster_logits.double(), -1)
    order = torch.argsort(logp, descending=True, stable=True)
    cum = torch.cumsum(logp[order].exp(), 0)
    n = int((cum < top_p).sum()) + 1
    n = max(min(n, max_k, K), min(min_k, K))
    chosen = torch.zeros(K, dtype=torch.bool)
    chosen[order[:n]] = True
    cl = torch.as_tensor(clusters, dtype=torch.long)
    exact = chosen[cl]                                                           # (V,) tokens with exact logits
    logits = torch.empty(head_w.shape[0], dtype=torch.float64)
    logits[exact] = (head_w[exact].double() @ x.double())
    lse = torch.logsumexp(logits[exact], 0)
    counts = torch.bincount(cl, minlength=K).double()
    approx = lse + logp - torch.logsumexp(logp[chosen], 0) - torch.log(counts)  # (K,)
    logits[~exact] = approx[cl[~exact]]
    return logits.to(x.dtype)                                                    # fp32 for an fp32 model


class ChannelMix(nn.Module):
    """y = sigmoid(R xr) * V relu(K xk)^2, with RWKV-Lite's factorised matrices and sparsity."""

    def __init__(self, cfg: V5Config):
        super().__init__()
        C, F_ = cfg.n_embd, cfg.ffn_dim
        self.time_mix_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.zeros(1, 1, C))
        add_projection(self, "key", C, F_, cfg.fact("ffn.key"))
        add_projection(self, "receptance", C, C, cfg.fact("ffn.receptance"))
        add_projection(self, "value", F_, C, cfg.fact("ffn.value"))

    def forward(self, x, shift, mlp=None, opt: LiteOptions | None = None):
        """x: (B, T, C), shift: (B, C); mlp: the block's predictor (or None) -> (B, T, C), new shift."""
        xx = token_shift(x, shift)
        xk = lerp_mix(x, xx, self.time_mix_k)
        k = torch.relu(project(self, "key", xk, relu_without_diag=True)) ** 2  # (B, T, F)
        if mlp is not None and opt is not None and opt.sparse_ffn:
            key_w = self.key.weight if hasattr(self, "key") else None
            k = k * ffn_active(xk, key_w, mlp.fc1.weight, mlp.fc2.weight, opt)
        r = torch.sigmoid(project(self, "receptance", lerp_mix(x, xx, self.time_mix_r)))
        return r * project(self, "value", k, relu_without_diag=True), x[:, -1]


class Predictor(nn.Module):
    """RWKV-Lite's per-layer FFN predictor: sigmoid(fc2 relu(fc1 xk)) (D hidden units)."""

    def __init__(self, C, D, F_):
        super().__init__()
        self.fc1 = nn.Linear(C, D, bias=False)
        self.fc2 = nn.Linear(D, F_, bias=False)


def block(cfg: V5Config, layer_id: int) -> Block:
    extra = {"mlp": Predictor(cfg.n_embd, cfg.mlp_dim, cfg.ffn_dim)} if cfg.mlp_dim else {}
    return Block(cfg.n_embd, layer_id, TimeMix(cfg), ChannelMix(cfg), **extra)


@dataclass
class State:
    """shift (L, 2, B, C), wkv (L, B, H, N, N) [value, key]."""
    shift: torch.Tensor
    wkv: torch.Tensor

    @staticmethod
    def zeros(L, C, H, N, batch=1) -> "State":
        return State(torch.zeros(L, 2, batch, C), torch.zeros(L, batch, H, N, N))


class RWKV5(nn.Module):
    def __init__(self, cfg: V5Config, lite: LiteOptions | None = None):
        super().__init__()
        self.cfg, self.lite = cfg, lite or LiteOptions()
        C = cfg.n_embd
        self.emb = nn.Embedding(cfg.vocab_size, C)
        self.blocks = nn.ModuleList(block(cfg, i) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(C)
        self.head = nn.Linear(C, cfg.vocab_size, bias=False)
        if cfg.head_clusters:
            self.head_l1 = nn.Linear(C, cfg.head_clusters, bias=False)

    time_state: torch.Tensor | None = None   # (L, H, N, N): a state-tuned initial wkv

    @staticmethod
    def from_state_dict(sd, lite: LiteOptions | None = None) -> "RWKV5":
        m = RWKV5(V5Config.from_state_dict(sd), lite)
        return load_with_time_state(m, sd)

    def zero_state(self, batch=1) -> State:
        """The initial state: zeros, or the checkpoint's time_state."""
        c = self.cfg
        st = State.zeros(c.n_layer, c.n_embd, c.n_head, c.head_size, batch)
        if self.time_state is not None:
            st.wkv[:] = self.time_state.unsqueeze(1)
        return st

    @torch.no_grad()
    def forward(self, idx, state: State | None = None, wkv_fn=None):
        """idx: (B, T) int64 -> logits (B, T, V) (hierarchical head: every position), new State.

        wkv_fn: the WKV form, `wkv5_recurrent` (default) or `wkv5_chunked`; see `TimeMix.forward`."""
        state = state or self.zero_state(idx.shape[0])
        x = self.blocks[0].ln0(self.emb(idx))                                   # (B, T, C)
        shifts, wkvs = [], []
        for i, blk in enumerate(self.blocks):
            dx, s_att, wkv = blk.att(blk.ln1(x), state.shift[i, 0], state.wkv[i], wkv_fn)
            x = x + dx
            dx, s_ffn = blk.ffn(blk.ln2(x), state.shift[i, 1], getattr(blk, "mlp", None), self.lite)
            x = x + dx
            shifts.append(torch.stack([s_att, s_ffn]))
            wkvs.append(wkv)
        x = self.ln_out(x)
        if self.lite.clusters is not None and hasattr(self, "head_l1"):
            o = self.lite
            logits = torch.stack([torch.stack([
                clustered_logits(x[b, t], self.head.weight, self.head_l1(x[b, t]), o.clusters,
                                 o.head_top_p, o.head_min_k, o.head_max_k)
                for t in range(x.shape[1])]) for b in range(x.shape[0])])
        else:
            logits = self.head(x)
        return logits, State(torch.stack(shifts), torch.stack(wkvs))


def load_with_time_state(m: nn.Module, sd) -> nn.Module:
    """Load `sd` into `m` (strict), taking `blocks.N.att.time_state` as the initial state and leaving out
    the keys inference does not use (RWKV-Lite's head_l2.* copies and the unused MLP cluster head)."""
    skip = ("head_l2.", "head_l1fc1.", "head_l1fc2.")
    own = m.state_dict()
    ts = sorted((int(k.split(".")[1]), v) for k, v in sd.items() if k.endswith(".att.time_state"))
    if ts:
        m.time_state = torch.stack([v.float() for _, v in ts])
    m.load_state_dict({k: v.float() for k, v in sd.items()
                       if not k.startswith(skip) and not k.endswith(".att.time_state")
                       and not (k.startswith("head_l1") and k not in own)})
    return m
