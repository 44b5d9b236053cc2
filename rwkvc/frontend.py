"""Checkpoint frontend: read an official RWKV-LM checkpoint safely and lower it to the IR.

    load_state_dict(path) -> {key: torch.Tensor}      (.pth via torch.load(weights_only=True), or .safetensors)
    detect_version(sd)    -> an Arch from rwkvc.arch.ARCHS, told apart by keys
    load_model(path)      -> ir.Model, every hyper-parameter inferred from shapes and validated

Every problem a user can cause raises RwkvcError with one line naming the file/key and what to do.
"""
from __future__ import annotations

import contextvars
import os
import zipfile
from pathlib import Path

import torch

from . import ir, mapped
from .arch import ARCHS, Arch
from .errors import RwkvcError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _mapped_file(path) -> bool:
    """Whether load_state_dict(path, lazy=True) memory-maps the file (a zip .pth or a .safetensors)."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return True
    with open(p, "rb") as f:
        return f.read(2) == b"PK"


def load_state_dict(path: str | os.PathLike, lazy: bool = False) -> dict[str, torch.Tensor]:
    """lazy: a .safetensors file is memory-mapped (rwkvc.mapped.safetensors_mapped), not read; a zip .pth
    always is (torch.load(mmap=True))."""
    p = Path(path)
    if not p.exists():
        raise RwkvcError(f"{p}: no such file; give the path of an RWKV checkpoint (.pth or .safetensors)")
    if p.is_dir():
        raise RwkvcError(f"{p}: is a directory, not a checkpoint file; give the .pth or .safetensors file")
    if p.stat().st_size == 0:
        raise RwkvcError(f"{p}: file is empty; re-download or re-export the checkpoint")
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
            sd = mapped.safetensors_mapped(str(p)) if lazy else load_file(str(p))
        except Exception as e:  # safetensors raises its own error types for bad headers / truncation
            raise RwkvcError(f"{p}: not a readable safetensors file ({_first_line(e)}); it may be truncated") from None
    else:
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic[:2] != b"PK" and magic[:1] != b"\x80":
            raise RwkvcError(f"{p}: not a PyTorch checkpoint (it looks like a text or other file); "
                             "give an RWKV .pth or .safetensors file")
        try:
            sd = torch.load(str(p), map_location="cpu", weights_only=True, mmap=magic[:2] == b"PK")
        except (RuntimeError, zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
            raise RwkvcError(f"{p}: cannot read the checkpoint ({_first_line(e)}); the file may be truncated "
                             "or corrupt: re-download or re-export it") from None
        except Exception as e:  # weights_only refuses pickled code: say so instead of running it
            raise RwkvcError(f"{p}: refused to load: the file holds more than tensors ({_first_line(e)}); "
                             "rwkvc only loads plain state dicts") from None
    for wrap in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and wrap in sd and isinstance(sd[wrap], dict):
            sd = sd[wrap]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise RwkvcError(f"{p}: not a state dict of tensors; give an RWKV-LM checkpoint")
    return sd


def _first_line(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:200]


def detect_version(sd: dict) -> Arch:
    """Pick the architecture from the keys present; refuse mixtures and foreign models."""
    if "emb.weight" not in sd or not any(k.startswith("blocks.0.") for k in sd):
        if "model.layers.0.self_attn.time_mixer.r_k" in sd:   # an RWKV-7 hybrid's weights without their config
            raise RwkvcError("these are an RWKV-7 hybrid's weights (RwkvHybridForCausalLM); give its directory, or "
                             "put its config.json beside the file")
        sample = ", ".join(list(sd)[:3])
        raise RwkvcError(f"not an RWKV checkpoint: no 'emb.weight' / 'blocks.0.*' keys (found e.g. {sample}); "
                         "rwkvc compiles RWKV-LM checkpoints")
    hits = [a for a in ARCHS.values() if a.detect(sd)]
    if not hits:
        raise RwkvcError("RWKV checkpoint of an unsupported generation: none of "
                         f"{', '.join('v' + a.name for a in ARCHS.values())} matches its keys")
    if len(hits) > 1:
        raise RwkvcError(f"checkpoint mixes keys of RWKV {' and '.join('v' + a.name for a in hits)} "
                         f"({hits[0].marker(sd)} and {hits[1].marker(sd)}); it is not a valid checkpoint")
    return hits[0]


def check_finite(sd: dict, release: bool = False) -> None:
    """Every tensor is floating point (RWKV-LM writes fp32 / fp16 / bf16) and finite. release: the tensors
    are memory-mapped; hand each one's pages back after its check (rwkvc.mapped.release)."""
    for k, t in sd.items():
        if not t.is_floating_point():
            raise RwkvcError(f"tensor '{k}' holds {str(t.dtype).replace('torch.', '')} values, not floating point; "
                             "rwkvc compiles float checkpoints (fp32, fp16, bf16): export the trained weights, "
                             "not a quantised copy")
        if t.dtype in FLOAT_DTYPES and not mapped.all_finite(t, drop_pages=release):
            raise RwkvcError(f"tensor '{k}' holds NaN or Inf values; the checkpoint is damaged "
                             "(re-export it from a healthy training step)")
        if release:
            mapped.release(t)


def load_model(path: str | os.PathLike, cluster_file: str | os.PathLike | None = None,
               lazy: bool = False) -> ir.Model:
    """cluster_file: RWKV-Lite's vocabulary clusters (`*-cls.npy`) for a checkpoint with a hierarchical head.
    lazy: the big matrices stay in the memory-mapped file and are read when used (rwkvc.mapped.LazyArray),
    so a compile holds one at a time; .pth files written by torch.save and .safetensors files."""
    from .arch import hybrid
    if hybrid.is_hybrid(path):   # a config.json names an RWKV-7 hybrid: the directory, or the file beside it
        model = hybrid.load_model(path)
        ir.verify(model)
        return model
    sd = load_state_dict(path, lazy=lazy)
    return model_from_state_dict(sd, cluster_file=cluster_file, lazy=lazy and _mapped_file(path))


def model_from_state_dict(sd: dict, cluster_file: str | os.PathLike | None = None, lazy: bool = False) -> ir.Model:
    arch = detect_version(sd)
    check_finite(sd, release=lazy)
    token = _LAZY.set(lazy)
    try:
        model = arch.to_ir(sd)
    finally:
        _LAZY.reset(token)
    if cluster_file is not None:
        from .arch import lite
        model.head = lite.clustered_head(sd, model, cluster_file)
    try:
        ir.verify(model)
    except ValueError as e:
        raise RwkvcError(f"inconsistent checkpoint: {e}") from None
    return model


_LAZY: contextvars.ContextVar[bool] = contextvars.ContextVar("rwkvc_lazy_load", default=False)


def to_numpy(t: torch.Tensor):
    """float32 / float16 arrays (bf16 and fp64 become float32); shares memory where it can. Under
    load_model(lazy=True), tensors of at least rwkvc.mapped.MIN_ELEMENTS values become LazyArrays."""
    if _LAZY.get() and t.numel() >= mapped.MIN_ELEMENTS:
        return mapped.from_torch(t, mapped=True)
    if t.dtype in (torch.bfloat16, torch.float64):
        return mapped.to_float32(t)
    return t.detach().numpy()
