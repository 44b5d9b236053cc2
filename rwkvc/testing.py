"""Random RWKV checkpoints in the official format, for tests and benchmarks (no downloads)."""
from __future__ import annotations

import os

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def random_v7_state_dict(n_layer=2, n_embd=128, head_size=64, vocab_size=1000, ffn_dim=None,
                         dims=None, dtype="fp32", seed=0, scale=1.0, deep_embed=0) -> dict:
    """deep_embed = D > 0: an RWKV-7a (DeepEmbed) checkpoint, tables (V, D*D)."""
    from rwkvc.reference.v7 import RWKV7, V7Config
    d = V7Config.default_dims(n_embd)
    d["deep_embed"] = deep_embed
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


# ----------------------------------------------------------------------------------------------
# RWKV-4, -5 (incl. RWKV-Lite) and -6: random checkpoints with realistic scales, so every term of the
# maths matters (decays from ~1 to ~0 across channels, non-zero LoRAs and bonuses, mixing in (0, 1)).


def _fill_random(model, seed: int, n_layer: int) -> None:
    """Give every parameter of a reference model (official names) a value on a realistic scale."""
    import math
    g = torch.Generator().manual_seed(seed)

    def rnd(shape, std):
        return torch.randn(*shape, generator=g) * std

    with torch.no_grad():
        for name, p in model.named_parameters():
            shp = tuple(p.shape)
            parts = name.split(".")
            i = int(parts[1]) if parts[0] == "blocks" else 0
            r0 = i / max(1, n_layer - 1)          # 0 -> 1 over the layers
            r1 = 1.0 - i / n_layer                 # 1 -> ~0
            leaf = parts[-1] if parts[-1] not in ("weight", "bias") else parts[-2] + "." + parts[-1]
            n = p.numel()
            ramp = torch.arange(n, dtype=torch.float32) / max(1, n - 1)
            if name == "emb.weight":
                v = rnd(shp, 1.0)
            elif name == "head.weight":
                v = rnd(shp, 0.5 / math.sqrt(shp[1]))
            elif leaf.startswith(("ln0.", "ln1.", "ln2.", "ln_out.", "ln_x.")) or parts[0] == "ln_out":
                v = (1 + rnd(shp, 0.1)) if name.endswith("weight") else rnd(shp, 0.1)
            elif leaf.startswith("time_mix_"):      # x * m + prev * (1 - m)
                v = (ramp ** (0.3 + r1) + rnd((n,), 0.05)).clamp(0, 1).view(shp)
            elif leaf in ("time_maa_w1",):
                v = rnd(shp, 1.0 / math.sqrt(shp[0]))
            elif leaf in ("time_maa_w2",):
                v = rnd(shp, 0.3 / math.sqrt(shp[1]))
            elif leaf.startswith("time_maa_"):      # x + (prev - x) * m
                v = (1 - ramp ** (0.3 + r1) + rnd((n,), 0.05)).clamp(0, 1).view(shp)
            elif leaf == "time_decay_w1":
                v = rnd(shp, 1.0 / math.sqrt(shp[0]))
            elif leaf == "time_decay_w2":
                v = rnd(shp, 0.5 / math.sqrt(shp[0]))
            elif leaf == "time_decay":              # log-log decay: per-step decay exp(-exp(v)) from ~1 to ~0
                v = (-6 + 8 * ramp ** (0.7 + 1.3 * r0) + rnd((n,), 0.3)).view(shp)
            elif leaf == "time_first":              # v4: bonus exponent; v5.0/5.1: log of the bonus
                v = (math.log(0.3) + ((torch.arange(n) + 1) % 3 - 1) * 0.5 + rnd((n,), 0.3)).view(shp)
            elif leaf == "time_faaaa":
                v = (r0 * (1 - ramp) + ((torch.arange(n) + 1) % 3 - 1) * 0.1 + rnd((n,), 0.2)).view(shp)
            elif leaf == "time_state":
                v = rnd(shp, 0.3)
            elif leaf.endswith("_diag"):
                v = 0.5 + rnd(shp, 0.2)
            elif leaf == "output.weight" or (parts[-3:-1] == ["ffn", "value"] and leaf == "value.weight"):
                v = rnd(shp, 0.5 / math.sqrt(shp[1]))
            elif len(shp) == 2:                     # every other matrix: unit-variance outputs
                v = rnd(shp, 1.0 / math.sqrt(shp[1]))
            else:
                raise ValueError(f"no random rule for parameter {name} {shp}")
            p.copy_(v)


def _finish(model, dtype) -> dict:
    sd = model.state_dict()
    ts = getattr(model, "time_state", None)
    if ts is not None:
        for i in range(ts.shape[0]):
            sd[f"blocks.{i}.att.time_state"] = ts[i]
    return {k: v.to(DTYPES[dtype]).contiguous() for k, v in sd.items()}


def random_v4_state_dict(n_layer=2, n_embd=64, vocab_size=1000, ffn_dim=None, dtype="fp32", seed=0) -> dict:
    from rwkvc.reference.v4 import RWKV4, V4Config
    m = RWKV4(V4Config(n_layer, n_embd, vocab_size, ffn_dim or 4 * n_embd))
    _fill_random(m, seed, n_layer)
    return _finish(m, dtype)


def random_v5_state_dict(n_layer=2, n_embd=64, head_size=32, vocab_size=1000, ffn_dim=None, version="5.2",
                         factorised=(), mlp_dim=0, head_clusters=0, dtype="fp32", seed=0) -> dict:
    """version "5.0" / "5.1" / "5.2". RWKV-Lite: factorised = (("att.key", rank, diag), ...) for any of
    att.{receptance,key,value,gate}, ffn.{receptance,key,value}; mlp_dim > 0 adds FFN predictors;
    head_clusters > 0 adds head_l1 (K, C)."""
    from rwkvc.reference.v5 import RWKV5, V5Config
    cfg = V5Config(n_layer, n_embd, head_size, vocab_size, ffn_dim or int(3.5 * n_embd) // 32 * 32, version,
                   "time_faaaa" if version == "5.2" else "time_first", tuple(factorised), mlp_dim, head_clusters)
    m = RWKV5(cfg)
    _fill_random(m, seed, n_layer)
    return _finish(m, dtype)


def random_v6_state_dict(n_layer=2, n_embd=64, head_size=32, vocab_size=1000, ffn_dim=None, dim_maa=32,
                         dim_decay=64, time_state=False, dtype="fp32", seed=0) -> dict:
    import math
    from rwkvc.reference.v6 import RWKV6, V6Config
    m = RWKV6(V6Config(n_layer, n_embd, head_size, vocab_size, ffn_dim or int(3.5 * n_embd) // 32 * 32,
                       dim_maa, dim_decay))
    _fill_random(m, seed, n_layer)
    if time_state:
        g = torch.Generator().manual_seed(seed + 1)
        m.time_state = torch.randn(n_layer, n_embd // head_size, head_size, head_size, generator=g) / math.sqrt(head_size)
    return _finish(m, dtype)


def save_state_dict(sd: dict, path: str | os.PathLike) -> str:
    tmp = f"{path}.tmp"
    torch.save(sd, tmp)
    os.replace(tmp, path)
    return str(path)


_OFFICIAL_SCRIPT = r'''
import sys, contextlib, io, json
import numpy as np, torch
jobs = json.loads(open(sys.argv[1]).read())
with contextlib.redirect_stdout(io.StringIO()):
    from rwkv.model import RWKV
for path, tokens, chunks, out in jobs:
    with contextlib.redirect_stdout(io.StringIO()):
        m = RWKV(path[:-4], "cpu fp32")
    res, st = {}, None
    steps = []
    for t in tokens:
        o, st = m.forward([t], st)
        steps.append(o.float().numpy().copy())
    res["steps"] = np.stack(steps)
    res["state"] = np.concatenate([s.float().reshape(-1).numpy() for s in st])
    for ci, ch in enumerate(chunks):
        st, pos, outs = None, 0, []
        for c in ch:
            o, st = m.forward(tokens[pos:pos + c], st)
            pos += c
            outs.append(o.float().numpy().copy())
        res[f"chunks{ci}"] = np.stack(outs)
    np.savez(out, **res)
'''


def run_official(path: str, tokens: list[int], chunks: list[list[int]] = ()) -> dict:
    """Logits of the official `rwkv` package ('cpu fp32') for a v4/v5/v6 .pth file, in a subprocess
    without RWKV_V7_ON (with it the package's RWKV class only loads RWKV-7):
        steps (T, V)       token by token
        state (...)        its final state after the steps, flattened in its own order (per layer: v4
                           att_x, aa, bb, pp, ffn_x; v5/v6 att_x, wkv[key, value], ffn_x)
        chunksI (n, V)     the logits after each chunk of chunks[I]
    """
    return run_official_many([(path, tokens, chunks)])[0]


def run_official_many(jobs, env_extra: dict | None = None) -> list[dict]:
    """`run_official` for several (path, tokens, chunks) jobs in one subprocess (one torch import).
    env_extra: variables the package reads at import, e.g. {"RWKV_V7_ON": "1", "RWKV_DE_VERSION": "1"} for
    RWKV-7a (DeepEmbed) checkpoints."""
    import json
    import subprocess
    import sys
    import tempfile

    import numpy as np
    env = {k: v for k, v in os.environ.items() if k != "RWKV_V7_ON"}
    env.pop("RWKV_DE_VERSION", None)
    env.update(RWKV_JIT_ON="0", RWKV_CUDA_ON="0", **(env_extra or {}))
    with tempfile.TemporaryDirectory() as d:
        spec = [[str(p), list(map(int, t)), [list(c) for c in ch], os.path.join(d, f"out{j}.npz")]
                for j, (p, t, ch) in enumerate(jobs)]
        with open(os.path.join(d, "jobs.json"), "w") as f:
            json.dump(spec, f)
        proc = subprocess.run([sys.executable, "-c", _OFFICIAL_SCRIPT, os.path.join(d, "jobs.json")], env=env,
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"official rwkv package failed:\n{proc.stderr[-3000:]}")
        out = []
        for *_, o in spec:
            with np.load(o) as z:
                out.append({k: z[k] for k in z.files})
        return out
