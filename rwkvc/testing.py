"""Random RWKV checkpoints in the official format, for tests and benchmarks (no downloads)."""
from __future__ import annotations

import os

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def random_v7_state_dict(n_layer=2, n_embd=128, head_size=64, vocab_size=1000, ffn_dim=None,
                         dims=None, dtype="fp32", seed=0, scale=1.0) -> dict:
    from rwkvc.reference.v7 import RWKV7, V7Config
    d = V7Config.default_dims(n_embd)
    if ffn_dim:
        d["ffn_dim"] = ffn_dim
    for k, v in (dims or {}).items():
        d["dim_" + k if not k.startswith("dim_") else k] = v
    cfg = V7Config(n_layer=n_layer, n_embd=n_embd, head_size=head_size, vocab_size=vocab_size, **d)
    model = RWKV7(cfg).init_weights(seed=seed, scale=scale)
    return {k: v.to(DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()}


def save_random_v7(path: str | os.PathLike, **kw) -> str:
    sd = random_v7_state_dict(**kw)
    tmp = f"{path}.tmp"
    torch.save(sd, tmp)
    os.replace(tmp, path)
    return str(path)
