"""The state-tuning settings (StateArgs) and the state_tune.py command line.

The settings are TrainArgs fields too (training/config.py defines each once), so train.py's flags and
--config files hold them; split_args takes them out of a TrainArgs / dict into a StateArgs.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

from rwkvc.errors import RwkvcError
from rwkvc.training.config import TrainArgs, as_train_args, build_parser, load_config_file


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
