"""GRPO's settings: one frozen dataclass, its command line and --config files (training/config.py's style).

The optimiser, precision and engine settings keep TrainArgs' names (and help), so training/engine.py's
engines and training/model.py's schedule read a GrpoArgs as they read a TrainArgs.
"""
from __future__ import annotations

import argparse
import codecs
import dataclasses
from dataclasses import dataclass, field, fields

from rwkvc.errors import RwkvcError
from rwkvc.training.config import PRECISIONS, STRATEGIES, WKV_IMPLS, TrainArgs, load_config_file
from rwkvc.training.files import ArgumentParser


def _f(default, help: str, **kw):  # noqa: A002
    return field(default=default, metadata={"help": help, **kw})


def _like(name: str, default=None):
    """A field with TrainArgs' help and choices (and its default unless one is given)."""
    f = TrainArgs.__dataclass_fields__[name]
    return field(default=f.default if default is None else default, metadata=f.metadata)


LOSS_AGG = ("seq", "token")


@dataclass(frozen=True)
class GrpoArgs:
    # --- inputs
    load_model: str = _f("", "the starting policy (.pth, official format); also the frozen KL reference")
    prompts: str = _f("", "training prompts: JSON lines {\"prompt\": ..., \"answer\": ...}")
    eval_prompts: str = _f("", "held-out prompts (same format), scored with greedy decoding ('' = none)")
    reward: str = _f("exact", "exact | number | contains | format | format=REGEX | MODULE:FUNC | FILE.py:FUNC, "
                              "terms joined by '+', each optionally weighted (0.1*format)")
    eval_reward: str = _f("", "the reward --eval_prompts are scored with ('' = --reward); e.g. train on a shaped "
                              "reward, report exact match")
    vocab: str = _f("", "vocabulary file of the tokenizer ('' = the RWKV World vocabulary)")
    proj_dir: str = _f("out/grpo", "where checkpoints, training state and metrics.jsonl go")
    # --- sampling
    group_size: int = _f(8, "completions sampled per prompt (G); the prompt's state is computed once and copied")
    prompts_per_step: int = _f(4, "prompts per GRPO step (each with its group of G completions), over all "
                                  "processes (each takes its share)")
    temperature: float = _f(1.0, "sampling temperature (> 0; the log-probabilities are of the tempered policy)")
    top_p: float = _f(1.0, "nucleus sampling: keep the smallest set of tokens with this much probability")
    max_new_tokens: int = _f(32, "completion length limit in tokens")
    stop: str = _f("", "stop strings, '|'-separated, backslash escapes allowed ('\\n'); the end-of-text token "
                       "always stops")
    # --- objective
    grpo_iterations: int = _f(1, "policy updates per sampled batch (mu in the GRPO paper)")
    clip_eps: float = _f(0.2, "PPO clipping of the probability ratio to [1 - eps, 1 + eps]")
    kl_beta: float = _f(0.04, "weight of the KL penalty to the reference (k3 estimator; 0 = no reference kept)")
    loss_agg: str = _f("seq", "seq = mean over each completion's tokens, then over completions (the GRPO "
                              "paper) | token = mean over all tokens of the batch", choices=LOSS_AGG)
    # --- optimisation
    micro_bsz: int = _f(4, "prompts (with their groups) per forward/backward; gradients accumulate over "
                           "a process's share of prompts_per_step / micro_bsz of them")
    lr_init: float = _f(1e-5, "learning rate after warmup")
    lr_final: float = _f(1e-5, "learning rate at the end (exponential decay from lr_init)")
    warmup_steps: int = _f(0, "steps of linear warmup from 1% of lr_init")
    beta1: float = _like("beta1")
    beta2: float = _like("beta2")
    adam_eps: float = _like("adam_eps")
    weight_decay: float = _f(0.0, "decoupled weight decay on the 2-D projection weights only")
    grad_clip: float = _like("grad_clip")
    precision: str = _like("precision")
    # --- schedule and checkpoints
    steps: int = _f(100, "GRPO steps (sampled batches) in all")
    save_every: int = _f(0, "save rwkv-STEP.pth every N steps (0 = only rwkv-final.pth)")
    eval_every: int = _f(0, "score --eval_prompts every N steps (0 = at the start and the end only)")
    random_seed: int = _f(-1, "seed of the prompt order and the sampling (-1 = pick one; it is logged)")
    restart: int = _like("restart")
    # --- engine
    accelerator: str = _like("accelerator")
    strategy: str = field(default="auto", metadata={"help": "auto (one process) | deepspeed_stage_1 | deepspeed_stage_2 "
                                                           "(ZeRO-3 is refused: GRPO's processes run different "
                                                           "numbers of forwards)"})
    ds_bucket_mb: int = _like("ds_bucket_mb")
    wkv: str = _like("wkv")
    chunk_len: int = _like("chunk_len")
    threads: int = _like("threads")
    enable_progress_bar: int = _like("enable_progress_bar")
    local_rank: int = _like("local_rank")

    def __post_init__(self):
        def need(ok, name, what):
            if not ok:
                raise RwkvcError(f"--{name} {getattr(self, name)!r}: {what}")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices is not None:
                need(getattr(self, f.name) in choices, f.name,
                     f"must be one of {', '.join(str(c) for c in choices if c != '')}")
        need(self.group_size >= 2, "group_size", "must be >= 2 (advantages compare completions within a group)")
        for name in ("prompts_per_step", "max_new_tokens", "grpo_iterations", "micro_bsz", "steps", "chunk_len"):
            need(getattr(self, name) > 0, name, "must be > 0")
        for name in ("save_every", "eval_every", "threads", "weight_decay", "grad_clip", "ds_bucket_mb",
                     "kl_beta", "warmup_steps"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        need(self.temperature > 0, "temperature", "must be > 0")
        need(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(0 < self.clip_eps < 1, "clip_eps", "must be in (0, 1)")
        need(self.lr_init >= 0 and self.lr_final >= 0, "lr_init", "learning rates must be >= 0")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1", "betas must be in [0, 1)")
        need(self.adam_eps > 0, "adam_eps", "must be > 0")
        need(self.precision in PRECISIONS + ("",), "precision", f"must be one of {', '.join(PRECISIONS)}")
        need(self.strategy in STRATEGIES, "strategy", f"must be one of {', '.join(STRATEGIES)}")
        # ZeRO-3 gathers parameters collectively in every forward; processes sampling completions of different
        # lengths (and prompts of different lengths) run different numbers of forwards and would wait forever
        need(self.strategy != "deepspeed_stage_3", "strategy", "ZeRO-3 is not supported by GRPO (its processes "
             "run different numbers of forwards); use deepspeed_stage_1 or deepspeed_stage_2")
        need(self.wkv in WKV_IMPLS, "wkv", f"must be one of {', '.join(WKV_IMPLS)}")
        try:
            self.stop_strings
        except UnicodeDecodeError as e:
            raise RwkvcError(f"--stop {self.stop!r}: bad backslash escape ({e.reason})") from None

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if not self.stop:
            return ()
        return tuple(s for s in (codecs.decode(p, "unicode_escape") for p in self.stop.split("|")) if s)

    def replace(self, **kw) -> "GrpoArgs":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="grpo.py", description="GRPO for RWKV-7 policies (see docs/GRPO.md).")
    ap.add_argument("--config", default="", help="JSON or TOML file of the settings below; flags override it")
    for f in fields(GrpoArgs):
        kind = type(f.default)
        text = f"{f.metadata['help']} (default {f.default!r})".replace("%", "%%")
        kw = dict(default=argparse.SUPPRESS, help=text)
        if f.name == "local_rank":
            ap.add_argument("--local_rank", "--local-rank", type=int, **kw)
            continue
        ap.add_argument(f"--{f.name}", type=kind, metavar=kind.__name__.upper(), **kw)
    return ap


def load_config(path: str) -> dict:
    """A JSON / TOML file of GrpoArgs keys (a [grpo] table is accepted too)."""
    return load_config_file(path, GrpoArgs, table="grpo")


def parse_grpo_args(argv=None) -> GrpoArgs:
    """Flags > --config file > GrpoArgs defaults."""
    ns = vars(build_parser().parse_args(argv))
    cfg = load_config(ns.pop("config")) if ns.get("config") else {}
    ns.pop("config", None)
    return GrpoArgs(**{**cfg, **ns})


def as_grpo_args(args) -> GrpoArgs:
    if isinstance(args, GrpoArgs):
        return args
    d = dict(args) if isinstance(args, dict) else dict(vars(args))
    unknown = sorted(set(d) - {f.name for f in fields(GrpoArgs)})
    if unknown:
        raise RwkvcError(f"unknown GRPO settings: {', '.join(unknown)}")
    return GrpoArgs(**d)
