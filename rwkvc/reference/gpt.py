"""GPT-2 in plain PyTorch (nanoGPT's model.py, trimmed): the transformer baseline rwkvc compares RWKV with.

Learned positions, pre-LayerNorm blocks, causal self-attention through
torch.nn.functional.scaled_dot_product_attention, a GELU MLP, an untied head by default (RWKV's head is
untied too, so a GPT and an RWKV of the same L and C have nearly the same parameter count; tie_head=True
gives GPT-2's tied head). Parameter names are nanoGPT's, so its checkpoints' `transformer.*` / `lm_head`
keys load as they are.

Dimensions (as in the RWKV references):
    B batch, T time (new tokens), P past tokens held in the KV cache, S = P + T keys attended to,
    C channels (n_embd), H heads, N head size (C = H*N), F MLP width, V vocabulary, L layers,
    block_size the longest context the learned positions cover.

KV cache per layer (what a transformer carries between tokens, growing with the context):
    k, v: (B, H, P, N)   every past token's key and value

The checkpoint is the state dict; `config_from_state_dict` reads every hyper-parameter back from its shapes
and from the one non-weight entry, `n_head` (a 0-d tensor, since heads cannot be read from shapes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

KVCache = list  # [(k, v)] per layer, each (B, H, P, N)


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    block_size: int
    ffn_dim: int = 0          # 0 = 4 * n_embd
    bias: bool = True         # biases in the Linear layers and LayerNorms, as GPT-2
    tie_head: bool = False    # lm_head shares the token embedding's weight

    def __post_init__(self):
        for f in ("n_layer", "n_embd", "n_head", "vocab_size", "block_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"GPTConfig.{f} must be a positive int, got {v!r}")
        if not isinstance(self.ffn_dim, int) or self.ffn_dim < 0:
            raise ValueError(f"GPTConfig.ffn_dim must be an int >= 0 (0 = 4 * n_embd), got {self.ffn_dim!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.ffn_dim == 0:
            object.__setattr__(self, "ffn_dim", 4 * self.n_embd)

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)   # q, k, v in one matrix
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x, past=None):
        """x: (B, T, C); past: (k, v) each (B, H, P, N), or None -> y (B, T, C), (k, v) each (B, H, P+T, N).

        Without a past the mask is the plain causal one (training). With one, query t sits at position P+t
        and sees keys 0..P+t: the mask is the causal one shifted right by P (a one-token step sees them all).
        """
        B, T, C = x.shape
        H = self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (z.view(B, T, H, C // H).transpose(1, 2) for z in (q, k, v))  # (B, H, T, N)
        if past is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k = torch.cat([past[0], k], dim=2)                                  # (B, H, S, N)
            v = torch.cat([past[1], v], dim=2)
            S = k.shape[2]
            t = torch.arange(T, device=x.device).unsqueeze(1) + (S - T)         # (T, 1): each query's position
            mask = torch.arange(S, device=x.device).unsqueeze(0) <= t            # (T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, C)                                  # heads side by side again
        return self.c_proj(y), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.ffn_dim, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.ffn_dim, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        """x: (B, T, C) -> (B, T, C), through (B, T, F)."""
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, past=None):
        """x: (B, T, C) -> (B, T, C), this layer's (k, v)."""
        a, kv = self.attn(self.ln_1(x), past)
        x = x + a
        return x + self.mlp(self.ln_2(x)), kv


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_head:
            self.lm_head.weight = self.transformer.wte.weight
        # the head count, kept in the checkpoint (shapes do not tell it); not a parameter
        self.register_buffer("n_head", torch.tensor(cfg.n_head, dtype=torch.int64))

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.h

    def attention(self, i: int) -> CausalSelfAttention:
        """Layer i's attention module."""
        return self.transformer.h[i].attn

    def hidden_states(self, idx, past: KVCache | None = None) -> list:
        """idx: (B, T) -> [the embedding's output, then each block's], each (B, T, C) (before ln_f)."""
        return self._run(idx, past)[0]

    def _run(self, idx, past):
        B, T = idx.shape
        P = past[0][0].shape[2] if past is not None else 0
        if P + T > self.cfg.block_size:
            raise ValueError(f"{P + T} tokens of context exceed this GPT's block_size {self.cfg.block_size}")
        pos = torch.arange(P, P + T, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)               # (B, T, C)
        hs, cache = [x], []
        for i, blk in enumerate(self.transformer.h):
            x, kv = blk(x, None if past is None else past[i])
            hs.append(x)
            cache.append(kv)
        return hs, cache

    def forward(self, idx, last_only: bool = False):
        """idx: (B, T) int64 -> logits (B, T, V) (or (B, V) with last_only). Training and evaluation."""
        x = self.hidden_states(idx)[-1]
        if last_only:
            x = x[:, -1]
        return self.lm_head(self.transformer.ln_f(x))

    def forward_cached(self, idx, past: KVCache | None = None, last_only: bool = True):
        """Inference with a KV cache: idx (B, T) after the P tokens in `past` (None or P = 0: a prefill;
        T = 1: one decode step) -> logits (B, V) (or (B, T, V)), the cache with P + T tokens."""
        if past is None:
            past = self.empty_cache(idx.shape[0], device=idx.device, dtype=self.transformer.wte.weight.dtype)
        hs, cache = self._run(idx, past)
        x = hs[-1][:, -1] if last_only else hs[-1]
        return self.lm_head(self.transformer.ln_f(x)), cache

    def empty_cache(self, batch: int = 1, device=None, dtype=torch.float32) -> KVCache:
        H, N = self.cfg.n_head, self.cfg.head_size
        z = torch.zeros(batch, H, 0, N, device=device, dtype=dtype)
        return [(z, z) for _ in range(self.cfg.n_layer)]

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        """GPT-2's initialisation (nanoGPT): N(0, 0.02) for matrices and embeddings, zero biases, and the
        residual projections (attn.c_proj, mlp.c_proj) scaled down by sqrt(2 L)."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".ln_" in name or "ln_f" in name:
                p.fill_(1.0)
            else:
                std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if name.endswith("c_proj.weight") else 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std)
        return self


def is_gpt_state_dict(sd) -> bool:
    return "transformer.wte.weight" in sd and "transformer.wpe.weight" in sd


def config_from_state_dict(sd) -> GPTConfig:
    """Every hyper-parameter of a GPT checkpoint, from its shapes and its `n_head` entry."""
    V, C = sd["transformer.wte.weight"].shape
    if "n_head" not in sd:
        raise ValueError("the checkpoint has no `n_head` entry (rwkvc's GPT checkpoints keep one); "
                         "give the head count by adding sd['n_head'] = torch.tensor(H)")
    L = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.h."))
    return GPTConfig(n_layer=L, n_embd=C, n_head=int(sd["n_head"]), vocab_size=V,
                     block_size=sd["transformer.wpe.weight"].shape[0],
                     ffn_dim=sd["transformer.h.0.mlp.c_fc.weight"].shape[0],
                     bias="transformer.h.0.attn.c_attn.bias" in sd, tie_head="lm_head.weight" not in sd)


def gpt_from_state_dict(sd) -> GPT:
    """A float32 GPT holding the checkpoint's weights. ValueError naming the first key that is missing, extra
    or of the wrong shape."""
    cfg = config_from_state_dict(sd)
    model = GPT(cfg)
    sd = dict(sd)
    if cfg.tie_head:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    want = model.state_dict()
    for k, v in want.items():
        if k not in sd:
            raise ValueError(f"{k} is missing")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(f"{k} has shape {tuple(sd[k].shape)}, the model needs {tuple(v.shape)}")
    extra = sorted(set(sd) - set(want))
    if extra:
        raise ValueError(f"{extra[0]} is not a GPT weight")
    model.load_state_dict({k: (v.float() if k != "n_head" else v.long()) for k, v in sd.items()})
    return model
