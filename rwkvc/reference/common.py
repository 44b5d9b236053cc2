"""Pieces every RWKV generation shares in the reference models: the token shift and the block layout."""
from __future__ import annotations

import torch
import torch.nn as nn


def token_shift(x, prev):
    """x: (B, T, C), prev: (B, C) -> the previous token's x for each t, (B, T, C)."""
    return torch.cat([prev.unsqueeze(1), x[:, :-1]], dim=1)


class Block(nn.Module):
    """One layer with RWKV-LM's parameter names: ln0 (first layer only), ln1 -> att, ln2 -> ffn, and any
    extra modules a generation keeps per layer (RWKV-Lite's FFN predictor `mlp`)."""

    def __init__(self, n_embd: int, layer_id: int, att: nn.Module, ffn: nn.Module, **extra: nn.Module):
        super().__init__()
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(n_embd)
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.att, self.ffn = att, ffn
        for name, mod in extra.items():
            setattr(self, name, mod)
