"""Fine-tune a low-rank factorised RWKV-7 (RWKV-Lite's recipe): factors initialised from the SVD, then
trained, so the loss lost to truncation is won back.

    from rwkvc.training.svd_finetune import finetune
    out = finetune("base.pth", "data/kjv-train", "out/svd", rank=0.25, targets="att+ffn", steps=300)
    # out/svd/rwkv-svd.pth: an ordinary RWKV-7 checkpoint whose selected matrices have rank r exactly;
    # `rwkvc compile out/svd/rwkv-svd.pth --passes "svd(rank=0.25,targets=att+ffn)"` recovers the trained
    # factors with no truncation error (the SVD of a rank-r matrix at rank r is exact).

The selected nn.Linear modules of the reference model (rwkvc.reference.v7) are replaced by two-factor
modules B(A x) initialised from rwkvc.weights.lowrank.svd_factor; everything else trains too (at the same
learning rate), with the training module's loss, engine, data order and learning-rate schedule.
Saving merges each pair back into B @ A, so the checkpoint format does not change.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from rwkvc.errors import RwkvcError
from rwkvc.reference.v7 import RWKV7, V7Config
from rwkvc.training.config import TrainArgs
from rwkvc.training.data import TokenData
from rwkvc.training.engine import Dist, SingleEngine
from rwkvc.training.files import atomic_save, atomic_write_text
from rwkvc.training.model import LMLoss, lr_at, select_wkv

MODULES = {"att": ("receptance", "key", "value", "output"), "ffn": ("key", "value")}


class LowRankLinear(nn.Module):
    """y = B (A x); `a` (r, in), `b` (out, r) as two bias-free Linear layers."""

    def __init__(self, a: np.ndarray, b: np.ndarray):
        super().__init__()
        self.a = nn.Linear(a.shape[1], a.shape[0], bias=False)
        self.b = nn.Linear(b.shape[1], b.shape[0], bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.from_numpy(a))
            self.b.weight.copy_(torch.from_numpy(b))

    def forward(self, x):
        return self.b(self.a(x))

    def merged(self) -> torch.Tensor:
        return self.b.weight.detach() @ self.a.weight.detach()


def config_from_state_dict(sd: dict) -> V7Config:
    V, C = sd["emb.weight"].shape
    H, N = sd["blocks.0.att.r_k"].shape
    L = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    return V7Config(n_layer=L, n_embd=C, head_size=N, vocab_size=V, ffn_dim=sd["blocks.0.ffn.key.weight"].shape[0],
                    dim_w=sd["blocks.0.att.w1"].shape[1], dim_a=sd["blocks.0.att.a1"].shape[1],
                    dim_v=sd["blocks.0.att.v1"].shape[1] if "blocks.0.att.v1" in sd else sd["blocks.1.att.v1"].shape[1],
                    dim_g=sd["blocks.0.att.g1"].shape[1])


def factorise(model: RWKV7, rank: float, energy: float, targets: str) -> dict[str, int]:
    """Replace the selected Linear modules by LowRankLinear from their SVD; returns {name: rank}."""
    from rwkvc.passes.common import parse_selector
    from rwkvc.passes.svd import choose_rank
    from rwkvc.weights.lowrank import singular_values, svd_factor
    sel = parse_selector(targets)
    ranks = {}
    for i, blk in enumerate(model.blocks):
        for place, names in MODULES.items():
            parent = getattr(blk, place)
            for nm in names:
                if (place, "*") not in sel and (place, nm) not in sel:
                    continue
                w = getattr(parent, nm).weight.detach().float().numpy()
                r = choose_rank(w.shape, singular_values(w) if energy > 0 else None, rank, energy)
                if r > min(w.shape):
                    continue
                a, b = svd_factor(w, r)
                setattr(parent, nm, LowRankLinear(a, b))
                ranks[f"blocks.{i}.{place}.{nm}"] = r
    if not ranks:
        raise RwkvcError(f"--svd: nothing to factorise with targets={targets!r}")
    return ranks


def merged_state_dict(model: RWKV7) -> dict:
    """The official-format state dict, each LowRankLinear merged back into its `.weight`."""
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith(".a.weight") or k.endswith(".b.weight"):
            continue
        sd[k] = v.detach().float().clone()
    for name, m in model.named_modules():
        if isinstance(m, LowRankLinear):
            sd[name + ".weight"] = m.merged().float().clone()
    return sd


def _val_loss(engine, data: TokenData, micro_bsz: int) -> float | None:
    windows = data.val_windows()
    if not windows:
        return None
    total = count = 0.0
    for s, n in windows[:64]:
        x = torch.from_numpy(data.val_tokens(s, n).astype("int64"))[None]
        total += engine.eval_loss_sum(x[:, :-1], x[:, 1:])
        count += n - 1
    return total / count


def finetune(load_model: str, data_file: str, proj_dir: str, rank: float = 0.25, energy: float = 0.0,
             targets: str = "att+ffn", steps: int = 300, lr_init: float = 1e-3, lr_final: float = 1e-4,
             ctx_len: int = 128, micro_bsz: int = 8, val_file: str = "", precision: str = "fp32",
             threads: int = 0, log=print, seed: int = 0, sample_offset: int = 0) -> Path:
    """Factorise `load_model` (rank / energy / targets as the svd pass), train `steps` steps on
    `data_file` (binidx prefix), save PROJ_DIR/rwkv-svd.pth (merged) and PROJ_DIR/svd-report.json.
    sample_offset: where in the data's sample order to start (e.g. after the samples the base model saw)."""
    if not Path(load_model).is_file():
        raise RwkvcError(f"--load_model {load_model} not found")
    out = Path(proj_dir)
    out.mkdir(parents=True, exist_ok=True)                # before the work: an unwritable PROJ_DIR fails now
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    sd = torch.load(load_model, map_location="cpu", weights_only=True)
    cfg = config_from_state_dict(sd)
    model = RWKV7(cfg)
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    args = TrainArgs(data_file=data_file, val_file=val_file, proj_dir=proj_dir, n_layer=cfg.n_layer,
                     n_embd=cfg.n_embd, head_size_a=cfg.head_size, vocab_size=cfg.vocab_size, ctx_len=ctx_len,
                     micro_bsz=micro_bsz, lr_init=lr_init, lr_final=lr_final, warmup_steps=min(10, steps // 10),
                     epoch_steps=steps, epoch_count=1, precision=precision, accelerator="cpu",
                     wkv="chunked", random_seed=seed)
    data = TokenData(data_file, ctx_len, cfg.vocab_size, 0, val_file, -1)
    device = torch.device("cpu")
    _, wkv_fn = select_wkv("chunked", device, 32, torch.float32)
    dense_engine = SingleEngine(LMLoss(model, wkv_fn), args, device, Dist.from_env(-1))
    base_loss = _val_loss(dense_engine, data, micro_bsz)
    ranks = factorise(model, rank, energy, targets)
    engine = SingleEngine(LMLoss(model, wkv_fn), args, device, Dist.from_env(-1))
    trunc_loss = _val_loss(engine, data, micro_bsz)
    log(f"svd fine-tune: {len(ranks)} matrices factorised (ranks {min(ranks.values())}..{max(ranks.values())}); "
        f"val loss dense {base_loss:.4f} -> truncated {trunc_loss:.4f}")
    t0 = time.time()
    losses = []
    for step in range(steps):
        engine.set_lr(lr_at(step, args, steps, micro_bsz))
        batch = data.batch(step, 0, 1, micro_bsz, offset=sample_offset)
        losses.append(engine.train_step(batch[:, :-1], batch[:, 1:]))
    final_loss = _val_loss(engine, data, micro_bsz)
    log(f"svd fine-tune: {steps} steps in {time.time() - t0:.0f} s; val loss {trunc_loss:.4f} -> {final_loss:.4f} "
        f"(dense {base_loss:.4f})")
    path = out / "rwkv-svd.pth"
    atomic_save(merged_state_dict(engine.model), path)
    atomic_write_text(out / "svd-report.json", json.dumps({
        "load_model": str(load_model), "rank": rank, "energy": energy, "targets": targets, "ranks": ranks,
        "steps": steps, "val_loss_dense": base_loss, "val_loss_truncated": trunc_loss, "val_loss_finetuned": final_loss,
        "train_loss_last": float(np.mean(losses[-10:])) if losses else None}, indent=1))
    return path


def parse_svd_flag(text: str) -> dict:
    """'rank=0.25,targets=att+ffn' (the svd pass's arguments) -> kwargs of finetune."""
    out = {}
    for kv in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in kv:
            raise RwkvcError(f"--svd: '{kv}' must be key=value (rank, energy, targets)")
        k, v = (s.strip() for s in kv.split("=", 1))
        if k in ("rank", "energy"):
            out[k] = float(v)
        elif k == "targets":
            out[k] = v
        else:
            raise RwkvcError(f"--svd: unknown key '{k}' (rank, energy, targets)")
    return out


def finetune_from_args(args, log=print) -> Path:
    """`python training/train.py --svd "rank=0.25,targets=att+ffn" --load_model base.pth ...`: the factorised
    fine-tuning with the run's data, context, batch, learning rates and steps (epoch_steps x epoch_count)."""
    spec = parse_svd_flag(getattr(args, "svd", "") or "")
    if not args.load_model:
        raise RwkvcError("--svd needs --load_model (the dense checkpoint to factorise)")
    steps = max(1, args.epoch_steps * max(1, args.epoch_count))
    return finetune(args.load_model, args.data_file, args.proj_dir, steps=steps, lr_init=args.lr_init,
                    lr_final=args.lr_final, ctx_len=args.ctx_len, micro_bsz=args.micro_bsz, val_file=args.val_file,
                    precision=args.precision or "fp32", threads=args.threads, log=log,
                    seed=max(0, args.random_seed), **spec)
