"""Merge a tuned state into its base checkpoint: BASE + STATE -> OUT with `blocks.N.att.time_state`.

    python training/merge_state.py base.pth out/task/rwkv-final.pth merged.pth [--force]

OUT holds every tensor of BASE unchanged (same dtype, bit for bit) plus one float32 (H, N, N)
`blocks.N.att.time_state` per layer ([value, key], see rwkvc/states.py), replacing any BASE had. The
state stays float32 whatever BASE's dtype, so the merged checkpoint and `rwkvc compile BASE --state
STATE` start from exactly the same state.

Who reads it: `rwkvc compile merged.pth` (v5/v6/v7; the state becomes the artifact's initial state), the
official `rwkv` package for v5/v6 (it starts every new state from time_state, transposed to its
[key, value] layout). The package's RWKV-7 path has no time_state support: there, start from
`state[3*i+1] = time_state[i]` yourself (docs/STATE_TUNING.md).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from rwkvc.errors import RwkvcError
from rwkvc.training.files import ArgumentParser, atomic_save, script_main


def merge_state(base: str | os.PathLike, state: str | os.PathLike, out: str | os.PathLike,
                force: bool = False, log=print) -> Path:
    from rwkvc.frontend import detect_version, load_state_dict
    from rwkvc.states import KEY, state_for_model, time_state_dict
    out = Path(out)
    if out.is_dir():                                      # --force replaces a file, never a directory
        raise RwkvcError(f"{out} is a directory; give the merged checkpoint's file name (e.g. {out / 'merged.pth'})")
    if out.exists() and not force:
        raise RwkvcError(f"{out} exists; pass --force to replace it")
    if out.resolve() in (Path(base).resolve(), Path(state).resolve()):
        raise RwkvcError(f"{out}: write the merged checkpoint to a new file, not over an input")
    if not out.parent.is_dir():
        raise RwkvcError(f"{out.parent}: directory does not exist")
    for name, p in (("BASE", base), ("STATE", state)):
        if not Path(p).is_file():
            raise RwkvcError(f"{name} {p} not found")
    sd = load_state_dict(base)
    old = [k for k in sd if k.endswith(".att.time_state")]
    plain = {k: v for k, v in sd.items() if k not in old}
    cfg = detect_version(plain).config(plain)
    st = state_for_model(state, cfg)                      # every layer and shape checked, errors name them
    merged = dict(plain)
    merged.update(time_state_dict(st.wkv))
    atomic_save(merged, out)                              # whole or not at all
    log(f"{out}: RWKV-{cfg.version} L{cfg.n_layer} C{cfg.n_embd} + {cfg.n_layer} x {KEY.format('N')} "
        f"{(cfg.n_head, cfg.head_size, cfg.head_size)} float32"
        + (f" (replaced the {len(old)} time_state tensors {Path(base).name} had)" if old else ""))
    return out


def main(argv=None) -> int:
    ap = ArgumentParser(description="Write BASE with a tuned STATE as blocks.N.att.time_state.")
    ap.add_argument("base", help="the base checkpoint the state was tuned on (.pth / .safetensors)")
    ap.add_argument("state", help="the state file (rwkv-final.pth of state tuning) or a merged checkpoint")
    ap.add_argument("out", help="the merged checkpoint to write (.pth)")
    ap.add_argument("--force", action="store_true", help="replace OUT if it is a file")
    a = ap.parse_args(argv)
    return script_main(lambda: merge_state(a.base, a.state, a.out, force=a.force))


if __name__ == "__main__":
    sys.exit(main())
