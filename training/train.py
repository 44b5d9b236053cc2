"""Train RWKV-7 with RWKV-LM's flags. See docs/TRAINING.md.

    python training/train.py --data_file data/demo --proj_dir out/demo --n_layer 4 --n_embd 256 --ctx_len 256
    python training/train.py --config train.toml --lr_init 3e-4            # flags override the file
    torchrun --nproc_per_node 8 training/train.py ... --strategy deepspeed_stage_2
    deepspeed training/train.py ... --strategy deepspeed_stage_3

Re-running the same command resumes from the newest checkpoint in --proj_dir.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from training.config import parse_args
    from training.trainer import train
else:
    from .config import parse_args
    from .trainer import train
from rwkvc.errors import RwkvcError


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        train(args)
    except RwkvcError as e:
        import os
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
