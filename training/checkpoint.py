"""Checkpoints in proj_dir, and the training state beside each one.

    rwkv-N.pth                official RWKV-7 state_dict (fp32 or bf16 as --precision says); the `rwkv`
                              package and the compiler load it; torch.load(weights_only=True) works
    rwkv-N.train-state.pt     step, learning rate, data position (samples drawn), RNG states, optimizer
                              state (and fp32 master weights when the .pth is 16-bit); DeepSpeed keeps
                              its per-rank optimizer partitions in rwkv-N.ds/ and names it here
    rwkv-final.pth (+ state)  the end of training

Every file is written whole or not at all (training/files.py: a temporary file in proj_dir, fsynced, then
renamed); a .pth and its state are both written before either is renamed, the .pth first, so a state
always has its .pth. A run resumes from the newest
checkpoint. It never writes over work it could not read: a training state that cannot be read (truncated,
damaged, its .pth missing) and is newer than every readable one stops the run with the file's name, and
checkpoints without any training state stop a fresh start; --restart 1 starts again from step 0 instead.
"""
from __future__ import annotations

import random
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rwkvc.errors import RwkvcError
from rwkvc.training import files

STATE_FORMAT = "rwkvc-train-state/1"
STATE_SUFFIX = ".train-state.pt"
KEEP_STATES = 2  # optimizer states older than the newest KEEP_STATES checkpoints are deleted
TAG = r"rwkv-(\d+|final)"
RESTART_HINT = "pass --restart 1 to start again from step 0 (overwriting them), or give another --proj_dir"


def weights_path(proj_dir, tag) -> Path:
    return Path(proj_dir) / f"rwkv-{tag}.pth"


def state_path(proj_dir, tag) -> Path:
    return Path(proj_dir) / f"rwkv-{tag}{STATE_SUFFIX}"


def _order(tag: str) -> float:
    return float("inf") if tag == "final" else int(tag)


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
    return files.atomic_save(weights, weights_path(proj_dir, tag))


def save_state(state: dict, proj_dir, tag) -> Path:
    return files.atomic_save({"format": STATE_FORMAT, "tag": str(tag), **state}, state_path(proj_dir, tag))


def save_checkpoint(weights: dict, state: dict, proj_dir, tag) -> Path:
    """rwkv-TAG.pth and its training state: both written in full first, then renamed one right after the
    other (.pth first), so a kill or a full disk while saving leaves neither half-written nor a new .pth
    without its state (but for the moment between the two renames)."""
    full = {"format": STATE_FORMAT, "tag": str(tag), **state}
    files.atomic_write_all([(weights_path(proj_dir, tag), lambda f: torch.save(weights, f)),
                            (state_path(proj_dir, tag), lambda f: torch.save(full, f))])
    return weights_path(proj_dir, tag)


def _reason(e: BaseException) -> str:
    """The first sentence of an exception's message (torch's zip reader goes on for a paragraph)."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text.split(". ")[0].rstrip(".")[:160] or type(e).__name__


@dataclass
class Scan:
    """What proj_dir holds: readable checkpoints (step, tag), newest first; unreadable ones (tag, file,
    reason), newest first; the names of every rwkv-N.pth / rwkv-final.pth."""
    readable: list = field(default_factory=list)
    unreadable: list = field(default_factory=list)
    weights: list = field(default_factory=list)

    def blocking(self) -> list:
        """Unreadable checkpoints newer than every readable one: resuming would write over them."""
        top = _order(self.readable[0][1]) if self.readable else -1
        return [u for u in self.unreadable if _order(u[0]) > top]


def scan(proj_dir) -> Scan:
    out = Scan()
    d = Path(proj_dir)
    if not d.is_dir():
        return out
    for p in sorted(d.iterdir()):
        if re.fullmatch(TAG + r"\.pth", p.name) and p.is_file():
            out.weights.append(p.name)
        m = re.fullmatch(TAG + re.escape(STATE_SUFFIX), p.name)
        if not m:
            continue
        tag = m.group(1)
        if not weights_path(d, tag).is_file():
            out.unreadable.append((tag, str(weights_path(d, tag)), "missing beside its training state"))
            continue
        try:
            step = int(torch.load(p, map_location="cpu", weights_only=True)["step"])
        except Exception as e:  # truncated (a full disk, a copy cut short), damaged, not a state
            out.unreadable.append((tag, str(p), f"truncated or damaged: {_reason(e)}"))
            continue
        out.readable.append((step, tag))
    out.readable.sort(key=lambda x: (x[0], x[1] == "final"), reverse=True)
    out.unreadable.sort(key=lambda u: _order(u[0]), reverse=True)
    return out


def list_checkpoints(proj_dir) -> list[tuple[int, str]]:
    """(step, tag) of every checkpoint with a readable training state, newest first."""
    return scan(proj_dir).readable


def check_resumable(proj_dir, restart: bool) -> list[tuple[int, str]]:
    """The checkpoints to resume from (newest first), or [] for a fresh start. RwkvcError, before any work,
    where resuming or starting afresh would write over checkpoints this run could not read, unless
    `restart` (then [] : start again from step 0)."""
    s = scan(proj_dir)
    if restart:
        return []
    bad = s.blocking()
    if bad:
        names = ", ".join(f for _, f, _ in bad)
        raise RwkvcError(f"cannot resume: {names} cannot be read ({bad[0][2]}); training on would overwrite "
                         f"checkpoints in {proj_dir}: move {'it' if len(bad) == 1 else 'them'} away to resume "
                         f"from an older checkpoint, or {RESTART_HINT}")
    if not s.readable and s.weights:
        raise RwkvcError(f"{proj_dir} holds checkpoints ({', '.join(s.weights[:4])}"
                         f"{', ...' if len(s.weights) > 4 else ''}) but no training state to resume from; "
                         f"{RESTART_HINT}")
    return s.readable


def clear_states(proj_dir) -> int:
    """--restart 1: delete every training state (and DeepSpeed dir) of an earlier run, so that none of them
    is resumed later; the .pth files stay until this run writes over them. Returns how many went."""
    d = Path(proj_dir)
    n = 0
    for p in list(d.iterdir()) if d.is_dir() else []:
        if re.fullmatch(TAG + re.escape(STATE_SUFFIX), p.name):
            p.unlink(missing_ok=True)
            n += 1
        elif re.fullmatch(TAG + r"\.ds", p.name) and p.is_dir():
            shutil.rmtree(p)
    return n


def load_checkpoint(proj_dir, tag) -> tuple[dict, dict]:
    weights = torch.load(weights_path(proj_dir, tag), map_location="cpu", weights_only=True)
    state = torch.load(state_path(proj_dir, tag), map_location="cpu", weights_only=True)
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"unknown training-state format {state.get('format')!r}")
    return weights, state


def resume_latest(proj_dir, candidates, restore, say=None) -> tuple[str, dict] | None:
    """Resume from the newest of `candidates` ((step, tag), newest first, as check_resumable gives them):
    restore(tag, weights, state) puts it into the run. A checkpoint that does not load or fit stops with
    one line naming it (going back to an older one would write over it). Restores the RNG state and
    returns (tag, state), or None when there are no candidates."""
    if not candidates:
        return None
    tag = candidates[0][1]
    try:
        weights, state = load_checkpoint(proj_dir, tag)
        restore(tag, weights, state)
    except RwkvcError:
        raise
    except Exception as e:
        raise RwkvcError(f"cannot resume from {weights_path(proj_dir, tag)} ({_reason(e)}); move it and its "
                         f"{STATE_SUFFIX} away to resume from an older checkpoint, or {RESTART_HINT}") from None
    set_rng_state(state["rng"])
    return tag, state


def prune_states(proj_dir, keep: int = KEEP_STATES):
    """Delete training states (and DeepSpeed dirs) beyond the newest `keep`; the .pth files stay."""
    for _, tag in list_checkpoints(proj_dir)[keep:]:
        state_path(proj_dir, tag).unlink(missing_ok=True)
        shutil.rmtree(Path(proj_dir) / f"rwkv-{tag}.ds", ignore_errors=True)


def kept(proj_dir) -> str:
    """What a run that stops now leaves to resume from, for its error line."""
    try:
        done = list_checkpoints(proj_dir)
    except OSError as e:
        return f"{proj_dir} cannot be listed ({e.strerror})"
    if not done:
        return f"no checkpoint was complete yet in {proj_dir}"
    step, tag = done[0]
    return f"kept {weights_path(proj_dir, tag)} (step {step}), the last complete checkpoint"


@contextmanager
def stop_on_os_error(proj_dir, what: str = "training"):
    """An OSError (a full disk, permissions) in the block -> one RwkvcError line naming the file and what
    was kept; the atomic writes have left nothing half-written."""
    try:
        yield
    except OSError as e:
        raise RwkvcError(f"{files.os_error_text(e)}: {what} stopped; {kept(proj_dir)}; nothing half-written "
                         "was left") from None
