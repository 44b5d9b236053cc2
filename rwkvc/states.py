"""Tuned-state files: read, validate against a model, write. Shared by `rwkvc compile --state`,
`rwkvc run --state`, training/merge_state.py and training/state_tune.py.

A state file is what state tuning produces (RWKV-LM-State-4bit / RWKV-PEFT's format): a state dict with
one tensor per layer

    blocks.{i}.att.time_state   (H, N, N)  float32, [value, key] -- rwkvc's wkv layout

for i in 0..L-1 (.pth via torch.load(weights_only=True), or .safetensors). A full checkpoint that holds
time_state keys (a merged one) is accepted too: only the time_state keys are read. rwkvc's own saved
states (`Model.save_state`, `rwkvc run --state-out`: .npz with shift (L, 2, C) and wkv) load as well.

Layout: rwkvc's wkv[h, i, j] has i the value and j the key index (see rwkvc/reference/v7.py), and so has
time_state. The official `rwkv` package keeps v5/v6 states as the transpose and loads time_state with
`.transpose(1, 2)`; its RWKV-7 state is [value, key] like ours (it has no time_state support: pass
`state[3*i+1] = time_state[i]`). The token-shift part of the state is not tuned: it starts at zero.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from . import ir
from .errors import RwkvcError

KEY = "blocks.{}.att.time_state"
_KEY_RE = re.compile(r"blocks\.(\d+)\.att\.time_state")


def read_state_file(path: str | os.PathLike) -> tuple[dict[int, np.ndarray], np.ndarray | None]:
    """-> ({layer: wkv (H, N, N) float32}, shift (L, 2, C) or None), no model needed; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise RwkvcError(f"{p}: no such state file" + ("" if not p.exists() else " (it is a directory)"))
    if p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                wkv, shift = np.asarray(z["wkv"], np.float32), np.asarray(z["shift"], np.float32)
        except Exception as e:
            raise RwkvcError(f"{p}: not a state file (.npz with shift and wkv, as `rwkvc run --state-out` "
                             f"writes): {type(e).__name__}: {e}") from None
        if wkv.ndim != 4:
            raise RwkvcError(f"{p}: wkv has shape {wkv.shape}; a state-tunable model needs (L, H, N, N) "
                             "(RWKV-4 has no matrix state)")
        return {i: wkv[i] for i in range(wkv.shape[0])}, shift
    from .frontend import load_state_dict, to_numpy
    sd = load_state_dict(p)
    layers = {}
    for k, v in sd.items():
        m = _KEY_RE.fullmatch(k)
        if m:
            layers[int(m.group(1))] = np.asarray(to_numpy(v), np.float32)
    if not layers:
        sample = ", ".join(list(sd)[:3])
        raise RwkvcError(f"{p}: no 'blocks.N.att.time_state' tensors (found e.g. {sample}); give the state "
                         "checkpoint written by state tuning, or a checkpoint merged with one")
    return layers, None


def state_for_model(path: str | os.PathLike, cfg: ir.ModelConfig) -> ir.State:
    """Read a state file and check it against `cfg`: every layer present, each (H, N, N), finite.
    Every mismatch is one RwkvcError that names the layer and both shapes."""
    p = Path(path)
    if cfg.version == "4":
        raise RwkvcError(f"{p}: RWKV-4 has no matrix-valued state to load a tuned state into "
                         "(state tuning needs RWKV v5, v6 or v7)")
    L, H, N = cfg.n_layer, cfg.n_head, cfg.head_size
    want = (H, N, N)
    dims = f"L={L} H={H} N={N}"
    layers, shift = read_state_file(p)
    extra = sorted(i for i in layers if i >= L)
    if extra:
        raise RwkvcError(f"{p}: has {KEY.format(extra[0])} but this model has {L} layers (0..{L - 1}); "
                         "the state was tuned for a different model")
    missing = [i for i in range(L) if i not in layers]
    if missing:
        raise RwkvcError(f"{p}: has no {KEY.format(missing[0])} (layer {missing[0]} of {L}); "
                         f"a state file needs one (H, N, N) = {want} tensor per layer")
    for i in range(L):
        got = tuple(layers[i].shape)
        if got != want:
            raise RwkvcError(f"{p}: {KEY.format(i)} (layer {i}) has shape {got}, but this model ({dims}) "
                             f"needs {want}; the state was tuned for a different model")
        if not np.isfinite(layers[i]).all():
            raise RwkvcError(f"{p}: {KEY.format(i)} (layer {i}) holds NaN or Inf values; the state is damaged")
    wkv = np.stack([layers[i] for i in range(L)]).astype(np.float32)
    sshape = (L, 2, cfg.n_embd)
    if shift is None:
        shift = np.zeros(sshape, np.float32)
    elif tuple(shift.shape) != sshape:
        raise RwkvcError(f"{p}: shift has shape {tuple(shift.shape)}, but this model ({dims}) needs {sshape}")
    return ir.State(np.ascontiguousarray(shift, np.float32), np.ascontiguousarray(wkv))


def apply_state(model: ir.Model, path: str | os.PathLike) -> ir.Model:
    """Set `model.init_state` from a state file (validated); replaces a time_state the checkpoint held."""
    model.init_state = state_for_model(path, model.config)
    return model


def time_state_dict(wkv) -> dict:
    """(L, H, N, N) array or tensor -> {blocks.i.att.time_state: float32 tensor (H, N, N)}."""
    import torch
    t = torch.as_tensor(np.asarray(wkv, np.float32) if not isinstance(wkv, torch.Tensor) else wkv)
    t = t.detach().to("cpu", torch.float32)
    if t.dim() != 4:
        raise ValueError(f"time_state_dict needs (L, H, N, N), got {tuple(t.shape)}")
    return {KEY.format(i): t[i].clone().contiguous() for i in range(t.shape[0])}


def save_state_file(wkv, path: str | os.PathLike) -> Path:
    """Write a state file (torch .pth of time_state tensors), atomically."""
    import torch
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    torch.save(time_state_dict(wkv), tmp)
    os.replace(tmp, p)
    return p
