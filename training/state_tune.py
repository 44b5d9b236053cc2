"""State tuning: train only the per-layer initial wkv state of a frozen RWKV v5 / v6 / v7 model.

RWKV's state is its whole memory of the past, so a task can be taught by training only the state the
model starts from, every weight frozen (RWKV-LM-State-4bit, RWKV-PEFT). The result is a tiny file of
one (H, N, N) tensor per layer that any deployment of the unchanged model can start from.

    python training/train.py --train_type states --load_model base.pth --data_file data/task \\
        --proj_dir out/task --ctx_len 256 --micro_bsz 8 --lr_init 0.1 --lr_final 0.01 --epoch_steps 100
        [--quant 1 --quant_type nf4|int4]                       # frozen base held in 4 bits
        [--orpo 1 --orpo_alpha 0.2 --rlhf_train_file pairs.jsonl --rlhf_max_corpus_len 512]
    python training/state_tune.py ...                           # the same (train.py dispatches here)
    from rwkvc.training.state_tune import train_states; path = train_states(args)

Pieces (a straight line; each a plain function or a small module):

    load_base        checkpoint -> the reference model (rwkvc.reference.v5/v6/v7) with every matrix
                     (Linear layers, embedding, head) replaced by a frozen FrozenMatrix held as fp32,
                     bf16 or 4 bits (nf4 / int4); vectors, norms and LoRA factors stay fp32, frozen.
                     Built on the meta device, so no full-precision copy of the model is ever made.
    StateModel       the forward pass with a trainable initial wkv state (L, H, N, N); the head's loss
                     is computed vocabulary-chunk by chunk (no (B, T, V) logits, no dequantised head).
    LMTask           the data and the loss: next-token loss on whole documents (or RWKV-LM's windows);
                     training/orpo.py's OrpoTask: ORPO on prompt/chosen/reject pairs
    train_states     the loop: helper pieces of the training module (lr schedule, progress bar,
                     metrics.jsonl, rwkv-N.pth naming, resume); the checkpoints hold only the states

Quantised frozen base (the memory saving of RWKV-LM-State-4bit, without bitsandbytes):

    nf4   per row, blocks of `quant_group` (default 64) inputs: w ~ NF4[code] * absmax(block)
          (the 16 NormalFloat levels of QLoRA / bitsandbytes), 4.5 bits per weight
    int4  rwkvc's own weight math (passes/quant.py quantize_int4): asymmetric group-wise,
          w ~ (code - zero) * scale, 4 + 40/group bits per weight
    Matrices are dequantised a few rows (~4 MB) at a time, per use, in the backward pass too (nothing
    but the packed codes is kept for backward), so the resident base is the 4-bit storage.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "training"  # noqa: A001  (so the relative imports below resolve)
    import training  # noqa: F401

from rwkvc.errors import RwkvcError, exit_status

from . import checkpoint as ckpt
from .config import TrainArgs, as_train_args, build_parser, load_config_file
from .model import lr_at, select_wkv

STORAGE = ("fp32", "bf16", "fp16", "nf4", "int4")
DENSE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# NormalFloat-4 levels (QLoRA, Dettmers et al. 2023; the table bitsandbytes uses)
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


def _like(name: str, default=None):
    """A StateArgs field with TrainArgs' default, help and choices: config.py defines each setting once."""
    f = TrainArgs.__dataclass_fields__[name]
    return field(default=f.default if default is None else default, metadata=f.metadata)


@dataclass(frozen=True)
class StateArgs:
    """The state-tuning settings (flag names as RWKV-LM-State-4bit). They are TrainArgs fields too, so flags
    and --config files hold them; split_args takes them out of a TrainArgs / dict into this."""
    train_type: str = _like("train_type", "states")
    quant: int = _like("quant")
    quant_type: str = _like("quant_type")
    quant_group: int = _like("quant_group")
    orpo: int = _like("orpo")
    orpo_alpha: float = _like("orpo_alpha")
    rlhf_max_corpus_len: int = _like("rlhf_max_corpus_len")
    rlhf_train_file: str = _like("rlhf_train_file")
    sample: str = _like("sample")
    load_state: str = _like("load_state")

    def __post_init__(self):
        for f in fields(self):
            ch = f.metadata.get("choices")
            if ch is not None and getattr(self, f.name) not in ch:
                raise RwkvcError(f"--{f.name} {getattr(self, f.name)!r}: must be one of "
                                 f"{', '.join(str(c) for c in ch if c != '')}")
        if not self.orpo_alpha >= 0:
            raise RwkvcError(f"--orpo_alpha {self.orpo_alpha}: must be >= 0")
        if self.rlhf_max_corpus_len < 1:
            raise RwkvcError(f"--rlhf_max_corpus_len {self.rlhf_max_corpus_len}: must be >= 1")
        if self.orpo and not self.rlhf_train_file:
            raise RwkvcError("--orpo 1 needs --rlhf_train_file (make it with training/prepare_orpo.py)")

    @property
    def storage_note(self) -> str:
        return f"{self.quant_type} (group {self.quant_group})" if self.quant else "unquantised"


STATE_FIELDS = {f.name for f in fields(StateArgs)}
# TrainArgs settings state tuning does not read: the model's shape comes from --load_model, and it runs in
# one process (the state is tiny); a value other than the default is named in one note line
IGNORED = ("n_layer", "n_embd", "head_size_a", "dim_ffn", "vocab_size", "devices", "num_nodes", "ds_bucket_mb",
           "my_pile_stage", "weight_decay")


def ignored_settings(args: TrainArgs) -> list[str]:
    """'--flag value' for each setting given a non-default value that state tuning does not use."""
    out = [] if args.strategy in ("auto", "single") else [f"--strategy {args.strategy}"]
    for name in IGNORED:
        v = getattr(args, name)
        if v != TrainArgs.__dataclass_fields__[name].default:
            out.append(f"--{name} {v}")
    return out


def split_args(args) -> tuple[TrainArgs, StateArgs]:
    """(TrainArgs, StateArgs) from a TrainArgs (with or without the state fields wired in), a dict or an
    argparse.Namespace holding both kinds of keys."""
    if isinstance(args, tuple) and len(args) == 2 and isinstance(args[1], StateArgs):
        return as_train_args(args[0]), args[1]
    if isinstance(args, TrainArgs):
        d = args.to_dict()
    else:
        d = dict(args) if isinstance(args, dict) else dict(vars(args))
    st = {k: d.pop(k) for k in list(d) if k in STATE_FIELDS}
    return as_train_args(d), StateArgs(**st)


# ------------------------------------------------------------------------------------------------
# 4-bit weight math (plain functions; tests compare them with NumPy / passes.quant)

def _pack(codes: torch.Tensor) -> torch.Tensor:
    """(R, 2m) codes 0..15 -> (R, m) uint8, element 2i in the low nibble (as passes.quant.pack_int4)."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def quantize_nf4(w: torch.Tensor, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """w (R, K) -> packed codes (R, Kp/2) uint8 and absmax (R, Kp/block) float32, Kp = K padded to block.
    Each block of `block` inputs of a row: w ~ NF4[code] * absmax (nearest level)."""
    R, K = w.shape
    nb = -(-K // block)
    wp = torch.zeros(R, nb * block, dtype=torch.float32)
    wp[:, :K] = w.float()
    wb = wp.view(R, nb, block)
    absmax = wb.abs().amax(-1)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    mids = (NF4[1:] + NF4[:-1]) / 2
    codes = torch.bucketize(wb / absmax[..., None], mids).view(R, nb * block)
    return _pack(codes), absmax


def _byte_lut(levels: torch.Tensor) -> torch.Tensor:
    """(16,) levels -> (256, 2): the two levels a packed byte holds (low nibble first)."""
    b = torch.arange(256)
    return torch.stack([levels[b & 0x0F], levels[b >> 4]], 1)


_NF4_LUT = _byte_lut(NF4)
_INT4_LUT = _byte_lut(torch.arange(16, dtype=torch.float32))


def _lookup(packed: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """packed (R, m) uint8 -> (R, 2m) float32 levels (int32 indices: no int64 copy of the codes)."""
    return F.embedding(packed.to(torch.int32), lut.to(packed.device)).view(packed.shape[0], -1)


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, K: int, dtype=torch.float32) -> torch.Tensor:
    R, nb = absmax.shape
    lv = _lookup(packed, _NF4_LUT).view(R, nb, -1)                             # (R, nb, block)
    return (lv * absmax[..., None]).view(R, -1)[:, :K].to(dtype)


def quantize_int4_torch(w: torch.Tensor, group: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rwkvc's int4 weight math (passes.quant.quantize_int4) -> packed codes (R, Kp/2), scales (R, nb),
    zeros (R, nb) uint8: w ~ (code - zero) * scale per group of `group` inputs."""
    from rwkvc.passes.quant import quantize_int4
    codes, scales, zeros = quantize_int4(w.float().numpy(), group)
    return _pack(torch.from_numpy(codes)), torch.from_numpy(scales), torch.from_numpy(zeros)


def dequantize_int4_torch(packed, scales, zeros, K: int, dtype=torch.float32) -> torch.Tensor:
    R, nb = scales.shape
    c = _lookup(packed, _INT4_LUT).view(R, nb, -1)
    return ((c - zeros[..., None].float()) * scales[..., None]).view(R, -1)[:, :K].to(dtype)


class FrozenMatrix(nn.Module):
    """A frozen (out, in) matrix in one storage format (STORAGE); hands out dense rows on demand.
    Its tensors are buffers, so no optimizer ever sees them."""

    ROW_CHUNK = 4096   # rows quantised at a time (bounds the temporary float copy)

    def __init__(self, w: torch.Tensor, fmt: str, group: int = 64):
        super().__init__()
        if fmt not in STORAGE:
            raise ValueError(f"storage {fmt!r} is not one of {STORAGE}")
        self.fmt, self.group = fmt, group
        self.out_features, self.in_features = (int(s) for s in w.shape)
        if fmt in DENSE_DTYPES:
            self.register_buffer("w", w.detach().to(DENSE_DTYPES[fmt]).contiguous())
            return
        parts = []
        for s in range(0, self.out_features, self.ROW_CHUNK):
            rows = w[s:s + self.ROW_CHUNK].detach()
            parts.append(quantize_nf4(rows, group) if fmt == "nf4" else quantize_int4_torch(rows, group))
        names = ("packed", "absmax") if fmt == "nf4" else ("packed", "scales", "zeros")
        for j, name in enumerate(names):
            self.register_buffer(name, torch.cat([p[j] for p in parts]).contiguous())

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def _dequant(self, sel, dtype) -> torch.Tensor:
        K = self.in_features
        if self.fmt in DENSE_DTYPES:
            return self.w[sel].to(dtype)
        if self.fmt == "nf4":
            return dequantize_nf4(self.packed[sel], self.absmax[sel], K, dtype)
        return dequantize_int4_torch(self.packed[sel], self.scales[sel], self.zeros[sel], K, dtype)

    def rows(self, a: int, b: int, dtype=torch.float32) -> torch.Tensor:
        return self._dequant(slice(a, b), dtype)

    def take(self, idx: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        return self._dequant(idx.reshape(-1), dtype)

    def dense(self, dtype=torch.float32) -> torch.Tensor:
        return self._dequant(slice(None), dtype)

    def _chunks(self, dtype):
        """Row ranges small enough that a dense copy stays ~4 MB; one range when no copy is needed."""
        if self.fmt in DENSE_DTYPES and DENSE_DTYPES[self.fmt] == dtype:
            return [(0, self.out_features)]
        n = max(1, (1 << 20) // self.in_features)
        return [(a, min(self.out_features, a + n)) for a in range(0, self.out_features, n)]

    def matmul_t(self, x: torch.Tensor, dtype) -> torch.Tensor:
        """x (..., in) @ W^T -> (..., out), W made dense a few rows at a time."""
        parts = [x @ self.rows(a, b, dtype).t() for a, b in self._chunks(dtype)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, -1)

    def matmul(self, g: torch.Tensor, dtype) -> torch.Tensor:
        """g (..., out) @ W -> (..., in), W made dense a few rows at a time."""
        out = None
        for a, b in self._chunks(dtype):
            y = g[..., a:b] @ self.rows(a, b, dtype)
            out = y if out is None else out.add_(y)
        return out

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype if x.dtype.is_floating_point else torch.float32


class _FrozenMatmul(torch.autograd.Function):
    """y = x W^T with W frozen: W is made dense a few rows at a time, in the forward and again in the
    backward, instead of a dense copy being kept alive between them (what keeps a 4-bit base 4-bit
    during training)."""

    @staticmethod
    def forward(ctx, x, mat: FrozenMatrix, dtype):
        ctx.mat, ctx.dtype, ctx.in_dtype = mat, dtype, x.dtype
        return mat.matmul_t(x.to(dtype), dtype)

    @staticmethod
    def backward(ctx, g):
        return ctx.mat.matmul(g.to(ctx.dtype), ctx.dtype).to(ctx.in_dtype), None, None


class FrozenLinear(nn.Module):
    def __init__(self, mat: FrozenMatrix):
        super().__init__()
        self.mat = mat

    def forward(self, x):
        dt = _compute_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return _FrozenMatmul.apply(x, self.mat, dt)


class FrozenEmbedding(nn.Module):
    def __init__(self, mat: FrozenMatrix):
        super().__init__()
        self.mat = mat

    def forward(self, idx):
        return self.mat.take(idx, torch.float32).view(*idx.shape, self.mat.in_features)


class _HeadLogProb(torch.autograd.Function):
    """log softmax(x W^T)[target] per row, W frozen (V, C), computed vocabulary-chunk by chunk with an
    online logsumexp: never more than (token chunk x vocabulary chunk) logits nor one chunk of W alive.
    The gradient is known in the forward pass (d logp_t / d x_t = W[t] - sum_v p_v W_v), so only that
    (n, C) matrix is saved. x: (n, C), targets: (n,) -> (n,) float32."""

    @staticmethod
    def forward(ctx, x, mat: FrozenMatrix, targets, dtype, tok_chunk, voc_chunk):
        n, C = x.shape
        V = mat.out_features
        need = ctx.needs_input_grad[0]
        xm = x.detach().to(dtype)
        f32 = dict(dtype=torch.float32, device=x.device)
        m = torch.full((n,), -math.inf, **f32)
        se = torch.zeros(n, **f32)
        zt = torch.zeros(n, **f32)
        acc = torch.zeros(n, C, **f32) if need else None
        for v0 in range(0, V, voc_chunk):
            v1 = min(V, v0 + voc_chunk)
            W = mat.rows(v0, v1, dtype)                                           # (vc, C)
            for s in range(0, n, tok_chunk):
                e = min(n, s + tok_chunk)
                z = (xm[s:e] @ W.t()).float()                                     # (nc, vc)
                m_new = torch.maximum(m[s:e], z.max(-1).values)
                scale = torch.exp(m[s:e] - m_new)
                p = torch.exp(z - m_new[:, None])
                se[s:e] = se[s:e] * scale + p.sum(-1)
                if need:
                    acc[s:e] = acc[s:e] * scale[:, None] + (p.to(dtype) @ W).float()
                t = targets[s:e]
                hit = (t >= v0) & (t < v1)
                if bool(hit.any()):
                    zt[s:e] = torch.where(hit, z.gather(1, (t - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(1),
                                          zt[s:e])
                m[s:e] = m_new
        logp = zt - (m + se.log())
        if need:
            J = mat.take(targets, dtype).float() - acc / se[:, None]
            ctx.save_for_backward(J)
            ctx.in_dtype = x.dtype
        return logp

    @staticmethod
    def backward(ctx, g):
        (J,) = ctx.saved_tensors
        return (g[:, None] * J).to(ctx.in_dtype), None, None, None, None, None


def head_logprobs(x: torch.Tensor, head: FrozenLinear, targets: torch.Tensor, tok_chunk: int = 256,
                  voc_chunk: int = 0) -> torch.Tensor:
    """x (B, T, C), targets (B, T) -> log p(target) (B, T) float32, through the frozen head."""
    B, T, C = x.shape
    dt = _compute_dtype(x)
    vc = voc_chunk or max(256, (1 << 20) // C)   # ~4 MB of fp32 head rows per chunk
    with torch.autocast(device_type=x.device.type, enabled=False):
        lp = _HeadLogProb.apply(x.reshape(B * T, C), head.mat, targets.reshape(-1), dt, tok_chunk, vc)
    return lp.view(B, T)


# ------------------------------------------------------------------------------------------------
# the frozen base

@dataclass
class Base:
    version: str                      # "7", "6", "5"
    model: nn.Module                  # reference module; matrices FrozenLinear / FrozenEmbedding
    n_layer: int
    n_embd: int
    n_head: int
    head_size: int
    vocab_size: int
    time_state: torch.Tensor | None   # (L, H, N, N) if the checkpoint had one
    storage: str
    report: dict = field(default_factory=dict)


def _read_checkpoint(path: str) -> dict:
    from rwkvc.frontend import load_state_dict
    return load_state_dict(path)


def load_base(path: str, storage: str = "fp32", group: int = 64) -> Base:
    """Checkpoint -> the frozen base model in `storage` (STORAGE). RWKV v5 (not RWKV-Lite), v6, v7."""
    from rwkvc.frontend import detect_version
    sd = _read_checkpoint(path)
    arch = detect_version(sd)
    ver = arch.name
    ts = {int(k.split(".")[1]): v for k, v in sd.items() if k.endswith(".att.time_state")}
    sd = {k: v for k, v in sd.items() if not k.endswith(".att.time_state")}
    if ver == "7":
        from rwkvc.reference.v7 import RWKV7, config_from_state_dict
        cfg = config_from_state_dict(sd)
        make = lambda: RWKV7(cfg)  # noqa: E731
        L, C, H, N, V = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size, cfg.vocab_size
    elif ver == "6":
        from rwkvc.reference.v6 import RWKV6, V6Config
        cfg = V6Config.from_state_dict(sd)
        make = lambda: RWKV6(cfg)  # noqa: E731
        L, C, H, N, V = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size, cfg.vocab_size
    elif ver == "5":
        from rwkvc.reference.v5 import RWKV5, V5Config
        cfg = V5Config.from_state_dict(sd)
        if cfg.factorised or cfg.mlp_dim or cfg.head_clusters or any(k.startswith("head_l") for k in sd):
            raise RwkvcError(f"{path}: RWKV-Lite checkpoints are not supported by state tuning (plain RWKV-5 is)")
        make = lambda: RWKV5(cfg)  # noqa: E731
        L, C, H, N, V = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size, cfg.vocab_size
    else:
        raise RwkvcError(f"{path}: RWKV-{ver} has no matrix-valued state to tune (state tuning needs v5, v6 or v7)")
    with torch.device("meta"):
        model = make()
    n_frozen = bytes_frozen = bytes_src = 0
    w = mat = new = None
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, (nn.Linear, nn.Embedding)):
            continue
        key = name + ".weight"
        if key not in sd:
            raise RwkvcError(f"{path}: missing '{key}' for RWKV-{ver} L={L} C={C}")
        w = sd[key]
        want = (mod.num_embeddings, mod.embedding_dim) if isinstance(mod, nn.Embedding) else (mod.out_features, mod.in_features)
        if tuple(w.shape) != want:
            raise RwkvcError(f"{path}: '{key}' has shape {tuple(w.shape)}, expected {want}")
        mat = FrozenMatrix(w, storage, group)
        new = FrozenEmbedding(mat) if isinstance(mod, nn.Embedding) else FrozenLinear(mat)
        model.set_submodule(name, new)
        n_frozen += 1
        bytes_frozen += mat.nbytes()
        bytes_src += w.numel() * 2   # against bf16
    own = {k for k, _ in model.named_parameters()}
    rest = {k: v.float() for k, v in sd.items() if k in own}
    matrices = {n + ".weight" for n, mod in model.named_modules() if isinstance(mod, (FrozenLinear, FrozenEmbedding))}
    unknown = sorted(k for k in sd if k not in own and k not in matrices)
    if unknown:
        raise RwkvcError(f"{path}: unexpected key '{unknown[0]}' for RWKV-{ver}; is it a plain RWKV checkpoint?")
    model.load_state_dict(rest, strict=False, assign=True)
    for k, p in list(model.named_parameters()):
        if p.is_meta:   # RWKV-7's unused layer-0 v0/v1/v2 may be absent from a checkpoint
            if ver == "7" and k.startswith("blocks.0.att.v"):
                model.get_submodule(k.rsplit(".", 1)[0]).register_parameter(
                    k.rsplit(".", 1)[1], nn.Parameter(torch.zeros(p.shape), requires_grad=False))
            else:
                raise RwkvcError(f"{path}: checkpoint is missing '{k}' {tuple(p.shape)}")
    model.requires_grad_(False)
    model.eval()
    del sd, rest, w, mat, new          # `w` would keep a memory-mapped checkpoint mapped
    release_freed_memory()
    time_state = None
    if ts:
        if sorted(ts) != list(range(L)) or any(tuple(v.shape) != (H, N, N) for v in ts.values()):
            raise RwkvcError(f"{path}: its time_state tensors do not make one (H, N, N) = {(H, N, N)} per layer")
        time_state = torch.stack([ts[i].float() for i in range(L)])
    rep = {"matrices": n_frozen, "frozen_matrix_bytes": bytes_frozen, "bf16_matrix_bytes": bytes_src,
           "other_param_bytes": sum(p.numel() * 4 for p in model.parameters())}
    return Base(ver, model, L, C, H, N, V, time_state, storage, rep)


def release_freed_memory() -> None:
    """Give the heap memory freed while loading/quantising back to the OS (glibc malloc_trim), so the
    training peak is not the loading peak's leftovers. A no-op elsewhere."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def base_digest(model: nn.Module) -> str:
    """sha256 over every frozen tensor (name, dtype, shape, bytes): equal digests = bit-identical base."""
    h = hashlib.sha256()
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# the forward pass with a trainable initial state

class StateModel(nn.Module):
    """The frozen base + `state` (L, H, N, N), the trainable initial wkv of every layer ([value, key],
    rwkvc's layout = time_state's). The token-shift state starts at zero and is not trained."""

    def __init__(self, base: Base, init: torch.Tensor | None = None, wkv_fn=None, grad_cp: bool = False):
        super().__init__()
        self.base = base
        self.net = base.model
        shape = (base.n_layer, base.n_head, base.head_size, base.head_size)
        s = torch.zeros(shape) if init is None else init.detach().float().clone()
        if tuple(s.shape) != shape:
            raise RwkvcError(f"initial state has shape {tuple(s.shape)}, the model needs {shape}")
        self.state = nn.Parameter(s)
        self.wkv_fn = wkv_fn
        self.grad_cp = grad_cp

    def _block(self, i: int, x, wkv, v_first):
        blk = self.net.blocks[i]
        zero = x.new_zeros(x.shape[0], x.shape[2])                                # (B, C) token shift
        if self.base.version == "7":
            dx, _, _, v_first = blk.att(blk.ln1(x), zero, wkv, v_first, wkv_fn=self.wkv_fn)
        else:
            dx, _, _ = blk.att(blk.ln1(x), zero, wkv)
        x = x + dx
        dx, _ = blk.ffn(blk.ln2(x), zero)
        return x + dx, v_first

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) -> ln_out(x) (B, T, C)."""
        from torch.utils.checkpoint import checkpoint
        B = idx.shape[0]
        x = self.net.blocks[0].ln0(self.net.emb(idx))
        v_first = None
        for i in range(self.base.n_layer):
            wkv = self.state[i].unsqueeze(0).expand(B, -1, -1, -1)                # (B, H, N, N)
            if self.grad_cp and torch.is_grad_enabled():
                x, v_first = checkpoint(self._block, i, x, wkv, v_first, use_reentrant=False)
            else:
                x, v_first = self._block(i, x, wkv, v_first)
        return self.net.ln_out(x)

    def logprobs(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B, T) inputs and targets -> log p(target) (B, T) float32."""
        return head_logprobs(self.hidden(idx), self.net.head, targets)

    @torch.no_grad()
    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T, V) float32 (small models / tests)."""
        h = self.hidden(idx).float()
        return h @ self.net.head.mat.dense(torch.float32).t()


# ------------------------------------------------------------------------------------------------
# tasks: data + loss

def _doc_spans(ds) -> list[tuple[int, int]]:
    """(first token, length) of each sequence of a binidx dataset (make_data.py: one per document)."""
    itemsize = ds.dtype.itemsize
    return [(int(p) // itemsize, int(n)) for p, n in zip(ds._index.pointers, ds._index.sizes) if n >= 2]


def _order(n: int, ii: int, seed: int, cache: dict) -> int:
    """Item for sample number ii: a fresh seeded permutation of the n items per pass (no state but ii)."""
    epoch, j = divmod(ii, n)
    if cache.get("epoch") != epoch:
        cache["epoch"], cache["perm"] = epoch, np.random.default_rng([seed, epoch]).permutation(n)
    return int(cache["perm"][j])


def _pad(rows: list[np.ndarray], masks: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """token rows (len >= 2) -> inputs (B, T), targets (B, T) int64, mask (B, T) float32 (0 on padding)."""
    T = max(len(r) for r in rows) - 1
    x = np.zeros((len(rows), T), np.int64)
    y = np.zeros((len(rows), T), np.int64)
    m = np.zeros((len(rows), T), np.float32)
    for b, (r, mk) in enumerate(zip(rows, masks)):
        n = len(r) - 1
        x[b, :n], y[b, :n], m[b, :n] = r[:-1], r[1:], mk
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(m)


class LMTask:
    """Next-token loss. sample='docs': every sample is one document of --data_file from its first token
    (truncated to ctx_len + 1 tokens, loss on its real tokens only), in a seeded order, one pass = every
    document once; the held-out documents are --val_file's, else the data's last ones (--val_tokens:
    -1 = 5%, at most 64 documents; 0 = none; N = documents from the end until N tokens).
    sample='windows': RWKV-LM's magic-prime ctx_len windows (training/data.py TokenData)."""

    def __init__(self, args: TrainArgs, sargs: StateArgs, vocab_size: int, seed: int):
        from .binidx import MMapIndexedDataset
        from .data import TokenData
        self.T, self.seed, self.cache = args.ctx_len, seed, {}
        self.windows = sargs.sample == "windows"
        if not args.data_file:
            raise RwkvcError("--data_file is required (a binidx prefix made by make_data.py)")
        if self.windows:
            self.data = TokenData(args.data_file, args.ctx_len, vocab_size, args.magic_prime, args.val_file,
                                  args.val_tokens)
            self.n_items = self.data.magic_prime
            self.note = f"{self.data.plan.train_len} tokens in magic-prime windows of {args.ctx_len}"
            return
        ds = MMapIndexedDataset(args.data_file)
        self.ds = ds
        spans = _doc_spans(ds)
        if not spans:
            raise RwkvcError(f"{ds.prefix}: no document of 2 or more tokens")
        for d in [ds] + ([MMapIndexedDataset(args.val_file)] if args.val_file else []):
            top = d.max_token()
            if top >= vocab_size:
                raise RwkvcError(f"{d.prefix} contains token {top}, but the model's vocabulary is 0..{vocab_size - 1}")
        if args.val_file:
            self.val_ds = MMapIndexedDataset(args.val_file)
            self.val_spans = _doc_spans(self.val_ds)
        else:
            self.val_ds = ds
            k = 0
            if args.val_tokens < 0 and len(spans) >= 4:
                k = min(64, max(1, len(spans) // 20))
            elif args.val_tokens > 0:
                tot = 0
                while k < len(spans) - 1 and tot < args.val_tokens:
                    tot += spans[-1 - k][1]
                    k += 1
            self.val_spans = spans[len(spans) - k:] if k else []
            spans = spans[:len(spans) - k]
        self.spans = spans
        self.n_items = len(spans)
        long = sum(1 for _, n in spans if n > self.T + 1)
        self.note = (f"{len(spans)} documents ({sum(n for _, n in spans)} tokens"
                     + (f"; {long} longer than ctx_len + 1 = {self.T + 1} are truncated" if long else "") + ")")

    def _doc(self, ds, span) -> np.ndarray:
        s, n = span
        return np.asarray(ds.tokens[s:s + min(n, self.T + 1)], np.int64)

    def batch(self, ii: int, B: int):
        if self.windows:
            t = self.data.batch(ii // B, 0, 1, B)   # TokenData.batch counts steps, not samples
            return t[:, :-1], t[:, 1:], torch.ones(B, self.T)
        rows = [self._doc(self.ds, self.spans[_order(self.n_items, ii + j, self.seed, self.cache)]) for j in range(B)]
        return _pad(rows, [np.ones(len(r) - 1, np.float32) for r in rows])

    @staticmethod
    def loss(sm: StateModel, batch):
        x, y, m = batch
        lp = sm.logprobs(x, y)
        n = m.sum()
        loss = -(lp * m).sum() / n
        return loss, {}, float(n)

    def val_batches(self, B: int):
        if self.windows:
            ws = self.data.val_windows()
            for s, n in ws:
                t = torch.from_numpy(self.data.val_tokens(s, n).astype(np.int64))[None]
                yield t[:, :-1], t[:, 1:], torch.ones(1, n - 1)
            return
        for i in range(0, len(self.val_spans), B):
            rows = [self._doc(self.val_ds, sp) for sp in self.val_spans[i:i + B]]
            yield _pad(rows, [np.ones(len(r) - 1, np.float32) for r in rows])

    @torch.no_grad()
    def evaluate(self, sm: StateModel, B: int) -> dict | None:
        tot = cnt = 0.0
        for x, y, m in self.val_batches(B):
            lp = sm.logprobs(x, y)
            tot += float(-(lp * m).sum())
            cnt += float(m.sum())
        return {"val_loss": tot / cnt} if cnt else None


# ------------------------------------------------------------------------------------------------
# the loop

def _storage(args: TrainArgs, sargs: StateArgs) -> str:
    if sargs.quant:
        return sargs.quant_type
    return {"bf16": "bf16", "fp16": "fp16"}.get(args.precision, "fp32")


def train_states(args, log=None) -> Path:
    """State-tune as `args` say (TrainArgs + StateArgs fields; see split_args); returns rwkv-final.pth,
    a state file: {blocks.N.att.time_state: (H, N, N) float32}."""
    from .engine import AUTOCAST
    from .trainer import _resolve
    args, sargs = split_args(args)
    args = _resolve(args)
    say = log or print
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RwkvcError("state tuning runs in one process (the state is tiny); launch it without torchrun/deepspeed")
    ignored = ignored_settings(args)
    if ignored:
        say(f"note: state tuning runs in one process and takes the model's shape from --load_model; ignoring "
            f"{', '.join(ignored)}")
    if not args.load_model:
        raise RwkvcError("--load_model is required: state tuning trains the initial state of a given model")
    if not Path(args.load_model).is_file():
        raise RwkvcError(f"--load_model {args.load_model} not found")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    seed = args.random_seed if args.random_seed >= 0 else int.from_bytes(os.urandom(3), "little")

    # ---- inputs: every check before any work
    storage = _storage(args, sargs)
    t_load = time.time()
    base = load_base(args.load_model, storage, sargs.quant_group)
    init = base.time_state
    if sargs.load_state:
        from rwkvc import ir
        from rwkvc.states import state_for_model
        cfg = ir.ModelConfig(version=base.version, n_layer=base.n_layer, n_embd=base.n_embd,
                             head_size=base.head_size, vocab_size=base.vocab_size, ffn_dim=1)
        init = torch.from_numpy(state_for_model(sargs.load_state, cfg).wkv)
    if sargs.orpo:
        from .orpo import OrpoTask
        task = OrpoTask(args, sargs, base.vocab_size, seed)
    else:
        task = LMTask(args, sargs, base.vocab_size, seed)
    proj = Path(args.proj_dir)
    resume = ckpt.list_checkpoints(proj)
    compute = AUTOCAST.get(args.precision, torch.float32)
    wkv_name, wkv_fn = select_wkv(args.wkv, device, args.chunk_len, compute) if base.version == "7" else ("recurrent", None)
    base.model.to(device)
    sm = StateModel(base, init, wkv_fn, grad_cp=bool(args.grad_cp)).to(device)
    opt = torch.optim.Adam([sm.state], lr=args.lr_init, betas=(args.beta1, args.beta2), eps=args.adam_eps)
    B = args.micro_bsz
    total = args.epoch_count * args.epoch_steps if args.epoch_count else math.ceil(task.n_items / B)
    if args.my_exit_tokens > 0:
        total = min(total, math.ceil(args.my_exit_tokens / (args.ctx_len * B)))
    total = max(1, total)
    epoch_steps = min(args.epoch_steps, total)
    digest0 = base_digest(base.model)

    def autocast():
        if compute is torch.float32:
            return torch.autocast(device_type=device.type, enabled=False)
        return torch.autocast(device_type=device.type, dtype=compute)

    def evaluate():
        sm.eval()
        with autocast():
            return task.evaluate(sm, B)

    # ---- resume
    step = samples = 0
    resumed: dict = {}

    def restore(tag, weights, state):
        if state.get("kind") != "states":
            raise RwkvcError(f"{proj} holds checkpoints of a full training run ({ckpt.weights_path(proj, tag).name}); "
                             "give state tuning its own --proj_dir")
        st = torch.stack([weights[f"blocks.{i}.att.time_state"] for i in range(base.n_layer)]).float()
        if st.shape != sm.state.shape:
            raise RwkvcError(f"{ckpt.weights_path(proj, tag)} holds states of shape {tuple(st.shape)}, "
                             f"this model needs {tuple(sm.state.shape)}; give another --proj_dir")
        with torch.no_grad():
            sm.state.copy_(st)
        opt.load_state_dict(state["optimizer"])

    found = ckpt.resume_latest(proj, resume, restore, say)
    if found:
        tag, resumed = found
        step, samples, seed = resumed["step"], resumed["samples"], resumed.get("seed", seed)
        task.seed = seed
        say(f"resumed from {ckpt.weights_path(proj, tag)}: step {step}, {samples} samples")
    else:
        torch.manual_seed(seed)

    proj.mkdir(parents=True, exist_ok=True)
    rep = base.report
    say(f"state tuning RWKV-{base.version} L{base.n_layer} C{base.n_embd} H{base.n_head} N{base.head_size} "
        f"V{base.vocab_size}: {sm.state.numel()} trainable state values; base frozen, {rep['matrices']} matrices "
        f"as {storage} ({rep['frozen_matrix_bytes'] / 1e6:.1f} MB; bf16 would be {rep['bf16_matrix_bytes'] / 1e6:.1f} MB) "
        f"loaded in {time.time() - t_load:.1f} s\n"
        f"{'ORPO' if sargs.orpo else 'SFT'}: {task.note}; {total} steps x {B}, ctx {args.ctx_len}, "
        f"{args.precision} on {device.type}, wkv {wkv_name}, lr {args.lr_init:g} -> {args.lr_final:g}, seed {seed}")
    (proj / "train-args.json").write_text(json.dumps({**args.to_dict(), **dataclasses.asdict(sargs), "seed": seed},
                                                     indent=1))
    final = ckpt.weights_path(proj, "final")
    if step >= total:
        say(f"state tuning already finished at step {step}: {final}")
        return final

    metrics = open(proj / "metrics.jsonl", "a")
    if step == 0:
        base_val = evaluate()
        metrics.write(json.dumps({"event": "baseline", "step": 0, **(base_val or {}),
                                  "base_digest": digest0, "storage": storage, **rep}) + "\n")
        if base_val:
            say(f"baseline (initial state): {', '.join(f'{k} {v:.4f}' for k, v in base_val.items())}")
    else:
        metrics.write(json.dumps({"event": "resume", "step": step, "samples": samples}) + "\n")
    from tqdm import tqdm
    bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr,
               disable=not args.enable_progress_bar, mininterval=1.0)
    t0 = t_last = time.time()
    ema, val = None, None
    tokens_seen = int(resumed.get("tokens", 0))
    try:
        while step < total:
            lr = lr_at(step, args, total, B)
            for g in opt.param_groups:
                g["lr"] = lr
            sm.train()
            batch = [t.to(device) for t in task.batch(samples, B)]
            with autocast():
                loss, info, ntok = task.loss(sm, batch)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([sm.state], args.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss = loss.item()
            if not math.isfinite(loss):
                raise RwkvcError(f"the loss became {loss} at step {step + 1}; lower --lr_init (states often "
                                 "want 1e-3..1e-1)")
            step, samples, tokens_seen = step + 1, samples + B, tokens_seen + int(ntok)
            now = time.time()
            tok_s = ntok / max(1e-9, now - t_last)
            t_last = now
            ema = loss if ema is None else 0.95 * ema + 0.05 * loss
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}", refresh=False)
            metrics.write(json.dumps({"step": step, "loss": loss, "lr": lr, "tokens": tokens_seen,
                                      "tok_s": round(tok_s, 1), "time": round(now - t0, 3), **info}) + "\n")
            end_of_epoch = step % epoch_steps == 0
            if not (end_of_epoch or step == total):
                continue
            epoch = (step - 1) // epoch_steps
            val = evaluate()
            tags = []
            if end_of_epoch and args.epoch_save > 0 and epoch % args.epoch_save == 0 and step != total:
                tags.append(str(epoch))
            if step == total:
                tags.append("final")
            for tag in tags:
                ckpt.save_weights(_state_dict(sm), proj, tag)
                ckpt.save_state({"kind": "states", "step": step, "epoch": epoch, "samples": samples, "lr": lr,
                                 "tokens": tokens_seen,
                                 "seed": seed, "total_steps": total, "val": val, "rng": ckpt.rng_state(),
                                 "optimizer": opt.state_dict(), "args": args.to_dict(),
                                 "state_args": dataclasses.asdict(sargs)}, proj, tag)
            ckpt.prune_states(proj)
            line = {"step": step, "epoch": epoch, **(val or {"val_loss": None}), "lr": lr,
                    "tokens": tokens_seen, "time": round(time.time() - t0, 3),
                    "checkpoints": [ckpt.weights_path(proj, t).name for t in tags]}
            metrics.write(json.dumps(line) + "\n")
            metrics.flush()
            vtxt = ", ".join(f"{k} {v:.4f}" for k, v in (val or {}).items()) or "no validation data"
            bar.write(f"epoch {epoch} (step {step}): train_loss {ema:.4f} {vtxt}"
                      + (f", saved {', '.join(line['checkpoints'])}" if tags else ""), file=sys.stderr)
            t_last = time.time()
        digest1 = base_digest(base.model)
        if digest1 != digest0:  # cannot happen: nothing but the state has a gradient or an optimizer
            raise RuntimeError("the frozen base changed during state tuning")
        metrics.write(json.dumps({"event": "done", "step": step, **(val or {}), "base_digest": digest1,
                                  "base_unchanged": digest1 == digest0}) + "\n")
    finally:
        bar.close()
        metrics.close()
    say(f"done: {final} ({sm.state.numel() * 4 / 1024:.1f} KiB of states; base weights bit-identical, "
        f"sha256 {digest0[:16]}...)")
    return final


def _state_dict(sm: StateModel) -> dict:
    from rwkvc.states import time_state_dict
    return time_state_dict(sm.state.detach())


# ------------------------------------------------------------------------------------------------
# command line (train.py --train_type states dispatches to train_states; this runs it directly)

def build_state_parser() -> argparse.ArgumentParser:
    """train.py's flags plus the state-tuning ones (those TrainArgs does not hold already)."""
    ap = build_parser()
    ap.prog, ap.description = "state_tune.py", "State-tune an RWKV v5/v6/v7 model (see docs/STATE_TUNING.md)."
    have = set(ap._option_string_actions)
    for f in fields(StateArgs):
        if f"--{f.name}" in have:
            continue
        kind = type(f.default)
        ap.add_argument(f"--{f.name}", type=kind, metavar=kind.__name__.upper(), default=argparse.SUPPRESS,
                        help=f"{f.metadata['help']} (default {f.default!r})")
    return ap


def parse_state_args(argv=None) -> tuple[TrainArgs, StateArgs]:
    ns = vars(build_state_parser().parse_args(argv))
    cfg = load_config_file(ns.pop("config")) if ns.get("config") else {}
    ns.pop("config", None)
    return split_args({**cfg, **ns})


def main(argv=None) -> int:
    return exit_status(lambda: train_states(parse_state_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
