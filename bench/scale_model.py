"""Random RWKV-7 checkpoints at the published sizes, written tensor by tensor (bf16 .pth, official keys).

    python bench/scale_model.py 1.5b /tmp/rwkv7-1.5b.pth          # L24 D2048 V65536, 3.1 GB
    python bench/scale_model.py 7.2b /tmp/rwkv7-7.2b.pth          # L32 D4096 V65536, 14.4 GB

A 2-layer reference model (rwkvc.reference.v7) is re-initialised with a new seed for every layer: its
layer 0 gives blocks.0 (which has ln0 and no v LoRA), its layer 1 every later block. Each tensor goes into a
raw scratch file next to the output (memory-mapped) as soon as it is made, then torch.save writes the .pth
from those mapped tensors, so the process holds about two layers in memory, never the model (a 7.2B
checkpoint does not fit in RAM twice). The scratch file is deleted afterwards; the disk briefly holds the
checkpoint twice. Low-rank widths: RWKV-LM x070's rule (V7Config.default_dims), which gives the published
G1 models' w/a/v/g widths (7.2B: 128/128/96/480; 2.9B: 96/96/64/320; 1.5B: 96/96/64/256).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

SHAPES = {  # name: (n_layer, n_embd)
    "0.1b": (12, 768),
    "0.4b": (24, 1024),
    "1.5b": (24, 2048),
    "2.9b": (32, 2560),
    "7.2b": (32, 4096),
}


def layer_tensors(cfg_kw: dict, seed: int, vocab: int):
    """{key: bf16 tensor} of a 2-layer reference model initialised with `seed` (vocab rows: emb/head)."""
    from rwkvc.reference.v7 import RWKV7, V7Config
    model = RWKV7(V7Config(n_layer=2, vocab_size=vocab, **cfg_kw)).init_weights(seed=seed, scale=1.0)
    return {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}


def plan(n_layer: int, n_embd: int, vocab: int, head_size: int = 64):
    """The keys in checkpoint order and where each comes from: (key, template layer or None, template key)."""
    from rwkvc.reference.v7 import V7Config
    cfg_kw = dict(n_embd=n_embd, head_size=head_size, **V7Config.default_dims(n_embd))
    return cfg_kw


def write(name: str, out: str, vocab: int = 65536, seed: int = 0, reuse: bool = False) -> None:
    """reuse: blocks 2.. repeat block 1's values (minutes instead of half an hour for 7.2B; the speed and
    memory of a compile or a run do not depend on the values)."""
    from tqdm import tqdm
    L, C = SHAPES[name]
    cfg_kw = plan(L, C, vocab)
    scratch = out + ".raw"
    entries = []             # (key, shape, byte offset) in the scratch file
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    with open(scratch, "wb") as f:
        def put(key, t):
            pad = (-f.tell()) % 64
            f.write(b"\0" * pad)
            entries.append((key, tuple(t.shape), f.tell()))
            f.write(t.view(torch.int16).numpy().tobytes())

        sd = None
        for i in tqdm(range(L), desc=f"random {name}", unit="layer", file=sys.stderr):
            if not (reuse and i > 1):
                sd = layer_tensors(cfg_kw, seed + i, vocab if i == 0 else 16)
            if i == 0:
                put("emb.weight", sd["emb.weight"])
            src = "blocks.0." if i == 0 else "blocks.1."
            for k, t in sd.items():
                if k.startswith(src):
                    put(f"blocks.{i}." + k[len(src):], t)
            if i == 0:
                tail = {k: sd[k] for k in ("ln_out.weight", "ln_out.bias", "head.weight")}
        for k, t in tail.items():
            put(k, t)
    raw = np.memmap(scratch, dtype=np.int16, mode="c")   # copy-on-write: writable for torch, nothing copied
    sd = {}
    for key, shape, off in entries:
        n = int(np.prod(shape))
        sd[key] = torch.from_numpy(np.asarray(raw[off // 2: off // 2 + n])).view(torch.bfloat16).view(shape)
    tmp = out + ".tmp"
    torch.save(sd, tmp)
    os.replace(tmp, out)
    del sd, raw
    os.remove(scratch)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out")
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse-layers", action="store_true", help="blocks 2.. repeat block 1 (fast for big shapes)")
    a = ap.parse_args(argv)
    write(a.shape, a.out, a.vocab, a.seed, a.reuse_layers)
    print(f"{a.out}: {os.path.getsize(a.out) / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
