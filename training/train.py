"""Train RWKV-7 with RWKV-LM's flags. See docs/TRAINING.md.

    python training/train.py --data_file data/demo --proj_dir out/demo --n_layer 4 --n_embd 256 --ctx_len 256
    python training/train.py --config train.toml --lr_init 3e-4            # flags override the file
    torchrun --nproc_per_node 8 training/train.py ... --strategy deepspeed_stage_2
    deepspeed training/train.py ... --strategy deepspeed_stage_3
    python training/train.py --train_type states --load_model base.pth ... [--quant 1 --quant_type nf4|int4]
                                                        # state tuning (docs/STATE_TUNING.md), ORPO with --orpo 1
    python training/train.py --model gpt ...            # the GPT-2 baseline, same data/flags (docs/COMPARISON.md)
    python training/train.py --svd "rank=0.25,targets=att+ffn" --load_model base.pth ...
                                                        # low-rank factorisation + fine-tuning (docs/COMPRESSION.md)

Re-running the same command resumes from the newest checkpoint in --proj_dir. A --proj_dir whose newest
training state cannot be read, or that holds checkpoints but no training state, is refused with one line
(nothing is overwritten); --restart 1 starts again from step 0 there.
"""
from __future__ import annotations

import sys

from rwkvc.errors import RwkvcError
from rwkvc.training.config import parse_args
from rwkvc.training.trainer import train


def _take(argv: list[str], flag: str) -> str | None:
    """Remove `flag VALUE` / `flag=VALUE` from argv; return VALUE (None if absent)."""
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
            del argv[i:i + 2]
            return value
        if a.startswith(flag + "="):
            del argv[i]
            return a.split("=", 1)[1]
    return None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        svd = _take(argv, "--svd")
        args = parse_args(argv)                      # flags > --config file > defaults, state tuning's included
        if args.train_type == "states":              # only the initial states train; the base stays frozen
            if svd is not None:
                raise RwkvcError("--svd and --train_type states are different runs; give one of them")
            from rwkvc.training.state_tune import train_states
            train_states(args)
        elif svd is not None:
            if args.model != "rwkv7":
                raise RwkvcError(f"--svd applies to RWKV-7 checkpoints, not --model {args.model}")
            import types
            from rwkvc.training.svd_finetune import finetune_from_args
            finetune_from_args(types.SimpleNamespace(**args.to_dict(), svd=svd))
        else:
            train(args)
    except (RwkvcError, OSError) as e:
        import os
        from rwkvc.training.files import os_error_text
        rank = os.environ.get("RANK", "0").strip()
        if not (rank.isdigit() and int(rank) > 0):      # one process says it (any that cannot tell its rank too)
            print(f"error: {os_error_text(e) if isinstance(e, OSError) else e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
