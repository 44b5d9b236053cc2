"""Checkpoints in proj_dir, and the training state beside each one.

    rwkv-N.pth                official RWKV-7 state_dict (fp32 or bf16 as --precision says); the `rwkv`
                              package and the compiler load it; torch.load(weights_only=True) works
    rwkv-N.train-state.pt     step, learning rate, data position (samples drawn), RNG states, optimizer
                              state (and fp32 master weights when the .pth is 16-bit); DeepSpeed keeps
                              its per-rank optimizer partitions in rwkv-N.ds/ and names it here
    rwkv-final.pth (+ state)  the end of training

Files are written to a temporary name and renamed, the .pth before its state, so a run killed while
saving leaves at worst an unfinished temporary file. A checkpoint counts for resuming only when both
files exist and load; resuming takes the newest such one (by step), falling back to older ones.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from rwkvc.errors import RwkvcError

STATE_FORMAT = "rwkvc-train-state/1"
STATE_SUFFIX = ".train-state.pt"
KEEP_STATES = 2  # optimizer states older than the newest KEEP_STATES checkpoints are deleted


def weights_path(proj_dir, tag) -> Path:
    return Path(proj_dir) / f"rwkv-{tag}.pth"


def state_path(proj_dir, tag) -> Path:
    return Path(proj_dir) / f"rwkv-{tag}{STATE_SUFFIX}"


def _atomic_save(obj, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    np.random.set_state((s["numpy"][0], np.array(s["numpy"][1], dtype=np.uint32), *s["numpy"][2:]))
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_weights(weights: dict, proj_dir, tag) -> Path:
    path = weights_path(proj_dir, tag)
    _atomic_save(weights, path)
    return path


def save_state(state: dict, proj_dir, tag) -> Path:
    path = state_path(proj_dir, tag)
    _atomic_save({"format": STATE_FORMAT, "tag": str(tag), **state}, path)
    return path


def list_checkpoints(proj_dir) -> list[tuple[int, str]]:
    """(step, tag) of every checkpoint with a training state, newest first."""
    out = []
    d = Path(proj_dir)
    if not d.is_dir():
        return out
    for p in d.iterdir():
        m = re.fullmatch(r"rwkv-(\d+|final)" + re.escape(STATE_SUFFIX), p.name)
        if not m or not weights_path(d, m.group(1)).is_file():
            continue
        try:
            step = int(torch.load(p, map_location="cpu", weights_only=True)["step"])
        except Exception:  # unreadable (killed mid-write by an older version, disk trouble): skip
            continue
        out.append((step, m.group(1)))
    out.sort(key=lambda x: (x[0], x[1] == "final"), reverse=True)
    return out


def load_checkpoint(proj_dir, tag) -> tuple[dict, dict]:
    weights = torch.load(weights_path(proj_dir, tag), map_location="cpu", weights_only=True)
    state = torch.load(state_path(proj_dir, tag), map_location="cpu", weights_only=True)
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"unknown training-state format {state.get('format')!r}")
    return weights, state


def resume_latest(proj_dir, candidates, restore, say) -> tuple[str, dict] | None:
    """Resume from the newest loadable checkpoint of `candidates` ((step, tag), newest first, as
    list_checkpoints gives them): restore(tag, weights, state) puts it into the run. A checkpoint that fails
    to load is skipped with a warning and the one before is tried, as RWKV-LM does; a RwkvcError (a
    checkpoint of another kind of run) stops. Restores the RNG state and returns (tag, state), or None when
    there are no candidates."""
    for _, tag in candidates:
        try:
            weights, state = load_checkpoint(proj_dir, tag)
            restore(tag, weights, state)
        except RwkvcError:
            raise
        except Exception as e:
            say(f"warning: cannot resume from rwkv-{tag}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            continue
        set_rng_state(state["rng"])
        return tag, state
    if candidates:
        raise RwkvcError(f"no checkpoint in {proj_dir} could be loaded; move them away to start afresh")
    return None


def prune_states(proj_dir, keep: int = KEEP_STATES):
    """Delete training states (and DeepSpeed dirs) beyond the newest `keep`; the .pth files stay."""
    for _, tag in list_checkpoints(proj_dir)[keep:]:
        state_path(proj_dir, tag).unlink(missing_ok=True)
        shutil.rmtree(Path(proj_dir) / f"rwkv-{tag}.ds", ignore_errors=True)
