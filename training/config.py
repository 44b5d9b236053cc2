"""Training configuration: one frozen dataclass, its command line (RWKV-LM's flag names), config files.

`TrainArgs` holds every setting; `parse_args(argv)` builds it from flags and an optional
`--config FILE` (JSON or TOML with the same keys; flags given on the command line win).
Validation happens in `__post_init__` and names the field, so a bad value fails before any work.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from rwkvc.errors import RwkvcError
from rwkvc.training.files import ArgumentParser

STRATEGIES = ("auto", "single", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3")
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
WKV_IMPLS = ("auto", "recurrent", "chunked", "fla")
MODELS = ("rwkv7", "gpt")   # the trainer's builders: training/trainer.py MODELS


# TrainArgs settings that only state tuning reads (plus train_type, which selects it)
STATE_TUNING_ONLY = ("quant", "quant_type", "quant_group", "orpo", "orpo_alpha", "rlhf_max_corpus_len",
                     "rlhf_train_file", "sample", "load_state")


def _f(default, help: str, **kw):  # noqa: A002
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class TrainArgs:
    # --- data
    data_file: str = _f("", "binidx prefix (PREFIX.bin + PREFIX.idx), as made by make_data.py")
    data_type: str = _f("binidx", "only binidx is supported")
    vocab_size: int = _f(65536, "model vocabulary; must exceed the largest token in the data")
    ctx_len: int = _f(512, "tokens per training sample")
    magic_prime: int = _f(0, "sample-order modulus: largest 3n+2 prime <= datalen/ctx_len-1 (0 = compute)")
    val_file: str = _f("", "binidx prefix of held-out validation data (default: hold out the data's tail)")
    val_tokens: int = _f(-1, "tokens held out from the end of data_file when no val_file (-1 auto, 0 none)")
    # --- model
    model: str = _f("rwkv7", "rwkv7 | gpt (a nanoGPT-style GPT-2 baseline: C / head_size_a heads, block_size "
                             "ctx_len; see docs/COMPARISON.md)", choices=MODELS)
    load_model: str = _f("", "initial weights (.pth) for a fresh run; ignored when resuming")
    n_layer: int = _f(6, "layers")
    n_embd: int = _f(512, "channels C")
    head_size_a: int = _f(64, "head size N (C must be a multiple)")
    dim_ffn: int = _f(0, "FFN width (0 = 4 * n_embd)")
    # --- optimisation
    micro_bsz: int = _f(8, "samples per step per process")
    lr_init: float = _f(6e-4, "learning rate after warmup")
    lr_final: float = _f(6e-5, "learning rate at the end (exponential decay; cosine with my_exit_tokens)")
    warmup_steps: int = _f(10, "steps of linear warmup from 1% of lr_init (-1 = none)")
    beta1: float = _f(0.9, "Adam beta1")
    beta2: float = _f(0.99, "Adam beta2")
    adam_eps: float = _f(1e-8, "Adam epsilon")
    weight_decay: float = _f(0.001, "decoupled weight decay on the 2-D projection weights only")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 = off)")
    grad_cp: int = _f(0, "1 = gradient checkpointing per time-mix / channel-mix (less memory, slower)")
    precision: str = _f("", "fp32 | tf32 | bf16 | fp16 (default: bf16 on gpu, fp32 on cpu)", choices=PRECISIONS + ("",))
    # --- schedule and checkpoints
    epoch_steps: int = _f(1000, "steps per mini-epoch (validation and checkpoints happen per epoch)")
    epoch_count: int = _f(0, "mini-epochs to train (0 = one pass over the data: magic_prime samples)")
    epoch_save: int = _f(1, "save rwkv-N.pth every N mini-epochs (0 = only rwkv-final.pth)")
    my_exit_tokens: int = _f(0, "stop after this many tokens, with cosine lr decay to it (0 = off)")
    my_pile_stage: int = _f(0, "RWKV-LM compatibility: >0 sets epoch_steps = 40320 // real_bsz, "
                               "epoch_count = magic_prime // 40320")
    random_seed: int = _f(-1, "seed for the initial weights (-1 = pick one; it is logged)")
    proj_dir: str = _f("out", "where checkpoints, training state and metrics.jsonl go")
    restart: int = _f(0, "1 = start again from step 0 although --proj_dir holds checkpoints (their training "
                         "states are deleted, their .pth files overwritten as this run saves); 0 = resume",
                      choices=(0, 1))
    # --- engine
    accelerator: str = _f("", "cpu | gpu (default: gpu when CUDA is available)", choices=("", "cpu", "gpu"))
    devices: int = _f(1, "processes per node you launched (torchrun/deepspeed set WORLD_SIZE)")
    num_nodes: int = _f(1, "nodes (informational; WORLD_SIZE decides)")
    strategy: str = _f("auto", "auto (one process) | deepspeed_stage_1 | deepspeed_stage_2 | deepspeed_stage_3",
                       choices=STRATEGIES)
    ds_bucket_mb: int = _f(200, "DeepSpeed allgather/reduce bucket size in MB")
    wkv: str = _f("auto", "WKV kernel: auto (fla on CUDA if importable, else chunked) | recurrent | chunked | fla",
                  choices=WKV_IMPLS)
    chunk_len: int = _f(32, "chunk length of the chunked WKV")
    enable_progress_bar: int = _f(1, "1 = tqdm progress bar on rank 0")
    threads: int = _f(0, "CPU threads for torch (0 = torch's default)")
    # --- RWKV-LM flags accepted for copy-pasted commands; only the value shown is supported
    wandb: str = _f("", "RWKV-LM compatibility (ignored: metrics go to proj_dir/metrics.jsonl)")
    epoch_begin: int = _f(0, "RWKV-LM compatibility (ignored: resuming is automatic)")
    pre_ffn: int = _f(0, "RWKV-LM compatibility (must be 0)")
    head_qk: int = _f(0, "RWKV-LM compatibility (must be 0)")
    my_pile_edecay: int = _f(0, "RWKV-LM compatibility (must be 0)")
    head_size_divisor: int = _f(8, "RWKV-LM compatibility (must be 8 for RWKV-7)")
    local_rank: int = _f(-1, "set by the deepspeed launcher (LOCAL_RANK is read from the environment)")
    # --- state tuning (docs/STATE_TUNING.md; training/state_tune.py), RWKV-LM-State-4bit's names
    train_type: str = _f("", "states = train only the initial states of --load_model, every weight frozen "
                             "('' = ordinary training)", choices=("", "states"))
    quant: int = _f(0, "states: 1 = hold the frozen base in 4 bits during training", choices=(0, 1))
    quant_type: str = _f("nf4", "states: nf4 | int4 (rwkvc's group-wise int4)", choices=("nf4", "int4"))
    quant_group: int = _f(64, "states: inputs per 4-bit block / group", choices=(16, 32, 64, 128, 256))
    orpo: int = _f(0, "states: 1 = ORPO preference training on --rlhf_train_file", choices=(0, 1))
    orpo_alpha: float = _f(0.2, "states: weight of the odds-ratio loss against the SFT loss on the chosen answer")
    rlhf_max_corpus_len: int = _f(1024, "states, ORPO: at most this many tokens of each prompt, chosen and reject")
    rlhf_train_file: str = _f("", "states, ORPO: pairs as training/prepare_orpo.py writes (JSON lines of token ids)")
    sample: str = _f("docs", "states: docs = each sample is one document from its start | windows = RWKV-LM's "
                             "magic-prime ctx_len windows", choices=("docs", "windows"))
    load_state: str = _f("", "states: start from this state file instead of zeros (e.g. an SFT state before ORPO)")

    def __post_init__(self):
        def need(ok, name, what):
            if not ok:
                raise RwkvcError(f"--{name} {getattr(self, name)!r}: {what}")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices is not None:
                need(getattr(self, f.name) in choices, f.name,
                     f"must be one of {', '.join(str(c) for c in choices if c != '')}")
        need(self.data_type == "binidx", "data_type", "only binidx is supported (make it with make_data.py)")
        for name in ("vocab_size", "ctx_len", "n_layer", "n_embd", "head_size_a", "micro_bsz", "epoch_steps",
                     "chunk_len", "devices", "num_nodes"):
            need(getattr(self, name) > 0, name, "must be > 0")
        for name in ("dim_ffn", "epoch_count", "epoch_save", "my_exit_tokens", "magic_prime", "grad_cp",
                     "threads", "weight_decay", "grad_clip", "ds_bucket_mb"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        need(self.n_embd % self.head_size_a == 0, "n_embd", f"must be a multiple of --head_size_a {self.head_size_a}")
        need(self.lr_init >= 0 and self.lr_final >= 0, "lr_init", "learning rates must be >= 0")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1", "betas must be in [0, 1)")
        need(self.adam_eps > 0, "adam_eps", "must be > 0")
        need(self.pre_ffn == 0, "pre_ffn", "is not part of RWKV-7; use 0")
        need(self.head_qk == 0, "head_qk", "is not part of RWKV-7; use 0")
        need(self.my_pile_edecay == 0, "my_pile_edecay", "is not supported; use 0")
        need(self.head_size_divisor == 8, "head_size_divisor", "RWKV-7 checkpoints assume 8")
        need(self.orpo_alpha >= 0, "orpo_alpha", "must be >= 0")
        need(self.rlhf_max_corpus_len >= 1, "rlhf_max_corpus_len", "must be >= 1")
        need(self.model == "rwkv7" or not self.train_type, "model",
             "state tuning (--train_type states) applies to RWKV-7 only")
        if not self.train_type:  # the state-tuning settings mean nothing to ordinary training: say so
            for name in STATE_TUNING_ONLY:
                need(getattr(self, name) == TrainArgs.__dataclass_fields__[name].default, name,
                     "applies only to state tuning (add --train_type states)")

    @property
    def ffn_dim(self) -> int:
        return self.dim_ffn or 4 * self.n_embd

    def replace(self, **kw) -> "TrainArgs":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config_file(path: str | Path, schema=None, table: str = "train") -> dict:
    """Read a JSON or TOML file of `schema`'s keys (TrainArgs by default; a TOML [`table`] table is accepted
    too), each value checked against its field's type."""
    schema = TrainArgs if schema is None else schema
    path = Path(path)
    if not path.is_file():
        raise RwkvcError(f"config file {path} not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            cfg = json.loads(text)
        else:
            try:
                import tomllib
            except ImportError:  # Python 3.10
                try:
                    import tomli as tomllib
                except ImportError:
                    raise RwkvcError(f"{path}: reading TOML on Python < 3.11 needs `pip install tomli`; "
                                     "or use a .json config") from None
            cfg = tomllib.loads(text)
    except (ValueError, json.JSONDecodeError) as e:
        raise RwkvcError(f"config file {path} does not parse: {e}") from None
    if isinstance(cfg, dict) and isinstance(cfg.get(table), dict) and len(cfg) == 1:
        cfg = cfg[table]
    if not isinstance(cfg, dict):
        raise RwkvcError(f"config file {path} must hold a table/object of settings")
    known = {f.name: f for f in fields(schema)}
    out = {}
    for k, v in cfg.items():
        k = k.lstrip("-").replace("-", "_")
        if k not in known or k == "local_rank":
            raise RwkvcError(f"config file {path}: unknown setting {k!r}")
        want = type(known[k].default)
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, want) or isinstance(v, bool):
            raise RwkvcError(f"config file {path}: {k} must be {want.__name__}, got {v!r}")
        out[k] = v
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(
        prog="train.py", description="Train an RWKV-7 language model (RWKV-LM's flags; see docs/TRAINING.md).")
    ap.add_argument("--config", default="", help="JSON or TOML file of the settings below; flags override it")
    for f in fields(TrainArgs):
        kind = type(f.default)
        text = f"{f.metadata['help']} (default {f.default!r})".replace("%", "%%")  # argparse %-formats help
        kw = dict(default=argparse.SUPPRESS, help=text)
        if f.name == "local_rank":
            ap.add_argument("--local_rank", "--local-rank", type=int, **kw)
            continue
        ap.add_argument(f"--{f.name}", type=kind, metavar=kind.__name__.upper(), **kw)
    return ap


def parse_args(argv=None) -> TrainArgs:
    """Flags > --config file > TrainArgs defaults."""
    ns = vars(build_parser().parse_args(argv))
    cfg = load_config_file(ns.pop("config")) if ns.get("config") else {}
    ns.pop("config", None)
    return TrainArgs(**{**cfg, **ns})


def as_train_args(args) -> TrainArgs:
    """TrainArgs from a TrainArgs, a dict or an argparse.Namespace (unknown keys are an error)."""
    if isinstance(args, TrainArgs):
        return args
    d = dict(args) if isinstance(args, dict) else dict(vars(args))
    known = {f.name for f in fields(TrainArgs)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise RwkvcError(f"unknown training settings: {', '.join(unknown)}")
    return TrainArgs(**d)
