"""Distil a transformer into an RWKV-7 hybrid (RWKVInside / ARWKV), in three stages. See docs/DISTILLATION.md.

    python training/distill.py --teacher qwen-dir --stage 1 --data_file data/demo --proj_dir out/s1 --ctx_len 256
    python training/distill.py --teacher qwen-dir --stage 2 --load_model out/s1/rwkv-final.pth \\
        --data_file data/demo --proj_dir out/s2 [--temperature 2 --top_k 64 --ce_weight 0.5 --freeze_mlp 1]
    python training/distill.py --stage 3 --load_model out/s2/rwkv-final.pth --sft_file chats.jsonl --proj_dir out/s3

    stage 1  every time-mix learns its layer's attention output (MSE, teacher's inputs); only time-mixes train
    stage 2  the whole student learns the teacher's logits (KL at a temperature, optionally on the teacher's
             top k) plus cross-entropy; --freeze_mlp 1 keeps the MLPs as the teacher's
    stage 3  supervised fine-tuning on conversations (JSON lines), the loss on the answers (no teacher)

--teacher: a transformers causal LM directory (Qwen2, Llama, Mistral; local files only) or a GPT checkpoint
of rwkvc (train.py --model gpt). Every other flag is train.py's (data, schedule, output, resume, --strategy
deepspeed_stage_N, --precision, --wkv); the model's dimensions come from the teacher. The student starts
from the teacher (stage 1) or from --load_model (a hybrid checkpoint: a .pth with config.json beside it, or
a directory of config.json + model.safetensors). Outputs in --proj_dir: rwkv-N.pth / rwkv-final.pth (the
published hybrid layout's keys) with config.json beside them, metrics.jsonl, and hybrid/ (config.json +
model.safetensors) at the end, which `rwkvc compile` reads. Re-running the same command resumes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from rwkvc.errors import RwkvcError

STAGES = (1, 2, 3)


def _f(default, help: str):  # noqa: A002
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class DistillArgs:
    stage: int = _f(1, "1 align time-mixes with attention | 2 logit distillation | 3 SFT on conversations")
    teacher: str = _f("", "transformers model directory (Qwen2, Llama, Mistral) or an rwkvc GPT checkpoint")
    head_size: int = _f(0, "student head size (0 = the teacher's)")
    temperature: float = _f(1.0, "stage 2: softmax temperature of the KL term (scaled by T^2)")
    top_k: int = _f(0, "stage 2: KL on the teacher's top k logits only, renormalised (0 = all V)")
    kl_weight: float = _f(1.0, "stage 2: weight of the KL term")
    ce_weight: float = _f(0.0, "stage 2: weight of the next-token cross-entropy")
    freeze_mlp: int = _f(0, "stage 2: 1 = keep the MLPs (and norms, embeddings, head) as the teacher's")
    sft_file: str = _f("", "stage 3: conversations, JSON lines (training/distill_sft.py)")
    tokenizer: str = _f("", "stage 3: 'world' or a transformers tokenizer directory (default: the teacher's, else world)")

    def __post_init__(self):
        def need(ok, name, what):
            if not ok:
                raise RwkvcError(f"--{name} {getattr(self, name)!r}: {what}")
        need(self.stage in STAGES, "stage", "must be 1, 2 or 3")
        need(self.temperature > 0, "temperature", "must be > 0")
        need(self.top_k >= 0 and self.head_size >= 0, "top_k", "--top_k and --head_size must be >= 0")
        need(self.kl_weight >= 0 and self.ce_weight >= 0, "kl_weight", "loss weights must be >= 0")
        need(self.kl_weight + self.ce_weight > 0, "kl_weight", "--kl_weight and --ce_weight cannot both be 0")
        need(self.freeze_mlp in (0, 1), "freeze_mlp", "must be 0 or 1")
        need(self.stage == 3 or bool(self.teacher), "teacher", "stages 1 and 2 need --teacher")
        need(self.stage != 3 or bool(self.sft_file), "sft_file", "stage 3 needs --sft_file (JSON lines of conversations)")


def split_argv(argv: list[str]) -> tuple[DistillArgs, list[str]]:
    """Take distill.py's own flags out of argv; the rest are train.py's."""
    from rwkvc.training.files import ArgumentParser
    ap = ArgumentParser(prog="distill.py", add_help=False)
    for f in fields(DistillArgs):
        ap.add_argument(f"--{f.name}", type=type(f.default), default=f.default, help=f.metadata["help"])
    ns, rest = ap.parse_known_args(argv)
    return DistillArgs(**vars(ns)), rest


def build_student(dargs: DistillArgs, args, teacher, say):
    from rwkvc.reference.hybrid import load
    if args.load_model:
        from rwkvc.arch.hybrid import is_hybrid
        if not is_hybrid(args.load_model):
            raise RwkvcError(f"--load_model {args.load_model}: not a hybrid checkpoint (a .pth or .safetensors "
                             "with config.json beside it, or such a directory)")
        student = load(args.load_model)
        if teacher is not None and student.cfg.vocab_size != teacher.config().vocab_size:
            raise RwkvcError(f"--load_model {args.load_model} has vocabulary {student.cfg.vocab_size}, the teacher "
                             f"{teacher.config().vocab_size}")
        say(f"student: {args.load_model}")
        return student
    if teacher is None:
        raise RwkvcError("stage 3 needs the student: give --load_model (a hybrid checkpoint)")
    seed = args.random_seed if args.random_seed >= 0 else 0
    say(f"student: initialised from the teacher (seed {seed})")
    return teacher.student(seed=seed, head_size=dargs.head_size)


def set_trainable(student, stage: int, freeze_mlp: bool) -> int:
    """Stage 1: only the time-mixes; stage 2 with freeze_mlp: only the time-mixes too; else everything.
    Returns the number of trainable parameters."""
    only_tm = stage == 1 or (stage == 2 and freeze_mlp)
    for name, p in student.named_parameters():
        p.requires_grad_(not only_tm or ".time_mixer." in name)
    return sum(p.numel() for p in student.parameters() if p.requires_grad)


def distill(dargs: DistillArgs, args, log=None) -> Path:
    import torch

    from rwkvc.training import checkpoint as ckpt
    from rwkvc.training import files
    from rwkvc.training.data import TokenData
    from rwkvc.training.distill_loss import AlignLoss, KDLoss, SFTLoss
    from rwkvc.training.distill_teacher import load_teacher
    from rwkvc.training.engine import Dist
    from rwkvc.training.model import select_wkv
    from rwkvc.training.trainer import ENGINES, Plan, _evaluate, resolve_devices

    args = resolve_devices(args)
    dist_info = Dist.from_env(args.local_rank)
    rank0 = dist_info.rank == 0
    say = (log or print) if rank0 else (lambda *a, **k: None)
    if dist_info.world > 1 and not args.strategy.startswith("deepspeed"):
        raise RwkvcError(f"{dist_info.world} processes were launched but --strategy is {args.strategy}; "
                         "use --strategy deepspeed_stage_1|2|3")
    if args.threads:
        torch.set_num_threads(args.threads)

    # ---- inputs: every check before any work
    teacher = load_teacher(dargs.teacher) if dargs.stage in (1, 2) else None
    if args.load_model and not Path(args.load_model).exists():
        raise RwkvcError(f"--load_model {args.load_model} not found")
    student = build_student(dargs, args, teacher, say)
    cfg = student.cfg
    args = args.replace(vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_embd=cfg.n_embd, head_size_a=cfg.head_size)
    if dargs.stage == 3:
        from rwkvc.training.distill_sft import SFTData, make_tokenizer, read_conversations
        encode = make_tokenizer(dargs.tokenizer, dargs.teacher)
        convs = read_conversations(dargs.sft_file, encode, cfg.vocab_size)
        seed0 = args.random_seed if args.random_seed >= 0 else 0
        data = SFTData(convs, args.ctx_len, seed0)
        n_samples = len(data.train)
    else:
        if not args.data_file:
            raise RwkvcError("--data_file is required: a binidx prefix (PREFIX.bin + PREFIX.idx) from make_data.py")
        data = TokenData(args.data_file, args.ctx_len, cfg.vocab_size, args.magic_prime, args.val_file, args.val_tokens)
        n_samples = data.magic_prime
    plan = Plan(args, dist_info.world, n_samples)
    proj = Path(args.proj_dir)
    device = torch.device(f"cuda:{dist_info.local_rank}" if args.accelerator == "gpu" else "cpu")
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision, torch.float32)
    wkv_name, wkv_fn = select_wkv(args.wkv, device, args.chunk_len, compute)
    files.check_output_dir(proj, "--proj_dir")
    resume = ckpt.check_resumable(proj, bool(args.restart))
    n_train = set_trainable(student, dargs.stage, bool(dargs.freeze_mlp))
    if dargs.stage == 1:
        wrapper = AlignLoss(student, teacher, wkv_fn)
    elif dargs.stage == 2:
        wrapper = KDLoss(student, teacher, wkv_fn, dargs.temperature, dargs.top_k, dargs.kl_weight, dargs.ce_weight)
    else:
        wrapper = SFTLoss(student, None, wkv_fn)
    seed = args.random_seed if args.random_seed >= 0 else int.from_bytes(os.urandom(3), "little")

    with ckpt.stop_on_os_error(proj):
        proj.mkdir(parents=True, exist_ok=True)
        engine = ENGINES[args.strategy](wrapper, args, device, dist_info)
        if rank0:
            files.remove_dead_temps(proj)
            if args.restart and ckpt.clear_states(proj):
                say(f"note: --restart 1: starting again from step 0 in {proj}")
            files.atomic_write_text(proj / "config.json", json.dumps(cfg.to_json(), indent=1))
        engine.barrier()
        step, samples, epoch_val = 0, 0, None

        def restore(tag, weights, state):
            if state.get("world") != dist_info.world and args.strategy.startswith("deepspeed"):
                raise RwkvcError(f"{tag} was written by {state.get('world')} processes; resume with as many")
            engine.load_state(str(proj), state, weights)

        found = ckpt.resume_latest(proj, resume, restore, say)
        if found:
            tag, state = found
            step, samples, seed = state["step"], state["samples"], state.get("seed", seed)
            say(f"resumed from {ckpt.weights_path(proj, tag)}: step {step}")
        else:
            torch.manual_seed(seed)
        say(f"distillation stage {dargs.stage}: teacher {teacher.name if teacher else '-'}; student hybrid "
            f"L{cfg.n_layer} C{cfg.n_embd} N{cfg.head_size} V{cfg.vocab_size} {cfg.norm} {cfg.act} "
            f"({sum(p.numel() for p in student.parameters()) / 1e6:.2f}M params, {n_train / 1e6:.2f}M trained), "
            f"ctx {args.ctx_len}, {args.precision} on {device.type} x{dist_info.world} ({args.strategy}), "
            f"wkv {wkv_name}, seed {seed}\n{plan.total_steps} steps x {plan.real_bsz} x {args.ctx_len} tokens; "
            f"lr {args.lr_init:g} -> {args.lr_final:g}")
        if rank0:
            files.atomic_write_text(proj / "distill-args.json",
                                    json.dumps({**args.to_dict(), **dataclasses.asdict(dargs), "seed": seed}, indent=1))
        final = ckpt.weights_path(proj, "final")
        if step < plan.total_steps:
            epoch_val = _loop(engine, wrapper, data, args, dargs, plan, proj, step, samples, seed, dist_info, say)
        else:
            say(f"training already finished at step {step}: {final}")
        if rank0:
            from rwkvc.reference.hybrid import load
            load(final).save(proj / "hybrid")
            if save_teacher_tokenizer(dargs, args, proj / "hybrid"):
                say(f"tokenizer: the teacher's tokenizer.json saved in {proj / 'hybrid'} (the artifact carries it)")
    engine.close()
    say(f"done: {final} and {proj / 'hybrid'} (val_loss {epoch_val})")
    return final


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def save_teacher_tokenizer(dargs: DistillArgs, args, out: Path) -> bool:
    """The teacher's Hugging Face tokenizer saved into the hybrid directory `out` (tokenizer.json and its
    config; transformers' save_pretrained where the teacher has only a slow tokenizer's files), so
    `rwkvc compile` gives an artifact that encodes text with the teacher's vocabulary. The source: --tokenizer
    (a directory), else the teacher directory, else --load_model's directory. False where there is none (the
    artifact then uses the World tokenizer)."""
    if dargs.tokenizer == "world":
        return False
    lm = Path(args.load_model) if args.load_model else None
    cands = [dargs.tokenizer, dargs.teacher, str(lm if lm.is_dir() else lm.parent) if lm else ""]
    src = next((Path(c) for c in cands if c and Path(c).is_dir() and any((Path(c) / f).is_file()
                                                                          for f in TOKENIZER_FILES)), None)
    if src is None:
        return False
    try:
        if (src / "tokenizer.json").is_file():   # a fast tokenizer: its files as they are
            import shutil
            for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if (src / f).is_file():
                    shutil.copyfile(src / f, out / f)
        else:                                    # only the slow files: transformers writes the tokenizer.json
            from transformers import AutoTokenizer
            AutoTokenizer.from_pretrained(str(src), local_files_only=True).save_pretrained(str(out))
    except Exception as e:
        raise RwkvcError(f"{src}: cannot save its tokenizer beside the hybrid "
                         f"({(str(e).strip().splitlines() or [type(e).__name__])[0][:200]})") from None
    return (out / "tokenizer.json").is_file()


def _sft_val(engine, data, micro_bsz):
    total, count = 0.0, 0
    for idx, tgt in data.val_batches(micro_bsz):
        total += engine.eval_loss_sum(idx, tgt)
        count += int((tgt != -100).sum())
    return total / count if count else None


def _loop(engine, wrapper, data, args, dargs, plan, proj, step, samples, seed, dist_info, say):
    import torch
    from tqdm import tqdm

    from rwkvc.training import checkpoint as ckpt
    from rwkvc.training import files
    from rwkvc.training.model import lr_at
    from rwkvc.training.trainer import _evaluate
    rank0 = dist_info.rank == 0
    metrics = files.JsonLines(proj / "metrics.jsonl") if rank0 else None
    bar = tqdm(total=plan.total_steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr,
               disable=not (rank0 and args.enable_progress_bar), mininterval=1.0)
    tokens_per_step = plan.real_bsz * args.ctx_len
    t0 = t_last = time.time()
    ema, epoch_val = None, None
    try:
        while step < plan.total_steps:
            lr = lr_at(step, args, plan.total_steps, plan.real_bsz)
            engine.set_lr(lr)
            if dargs.stage == 3:
                idx, tgt = data.batch(step, dist_info.rank, dist_info.world, args.micro_bsz)
            else:
                batch = data.batch(step, dist_info.rank, dist_info.world, args.micro_bsz)
                idx, tgt = batch[:, :-1], batch[:, 1:]
            loss = engine.train_step(idx, tgt)
            if not math.isfinite(loss):
                raise RwkvcError(f"stage {dargs.stage} loss is {loss} at step {step + 1}; lower --lr_init")
            step, samples = step + 1, samples + plan.real_bsz
            now = time.time()
            tok_s = tokens_per_step / max(1e-9, now - t_last)
            t_last = now
            ema = loss if ema is None else 0.95 * ema + 0.05 * loss
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}", refresh=False)
            if metrics:
                metrics.write({"step": step, "stage": dargs.stage, "loss": loss, **wrapper.parts, "lr": lr,
                               "tokens": samples * args.ctx_len, "tok_s": round(tok_s, 1), "time": round(now - t0, 3)})
            end_of_epoch = step % plan.epoch_steps == 0
            if not (end_of_epoch or step == plan.total_steps):
                continue
            epoch = (step - 1) // plan.epoch_steps
            epoch_val = (_sft_val(engine, data, args.micro_bsz) if dargs.stage == 3
                         else _evaluate(engine, data, args.micro_bsz, dist_info))
            tags = ([str(epoch)] if end_of_epoch and args.epoch_save > 0 and epoch % args.epoch_save == 0 else [])
            tags += ["final"] if step == plan.total_steps else []
            state = {"step": step, "epoch": epoch, "samples": samples, "lr": lr, "seed": seed,
                     "world": dist_info.world, "micro_bsz": args.micro_bsz, "ctx_len": args.ctx_len,
                     "total_steps": plan.total_steps, "val_loss": epoch_val, "rng": ckpt.rng_state(),
                     "args": args.to_dict(), "stage": dargs.stage}
            for tag in tags:
                weights = engine.weights()
                extra = engine.save_state(str(proj), tag)
                if rank0:
                    ckpt.save_checkpoint(weights, {**state, **extra}, proj, tag)
                engine.barrier()
            if rank0:
                ckpt.prune_states(proj)
            line = {"step": step, "epoch": epoch, "val_loss": epoch_val, "lr": lr, "tokens": samples * args.ctx_len,
                    "time": round(time.time() - t0, 3), "checkpoints": [ckpt.weights_path(proj, t).name for t in tags]}
            if metrics:
                metrics.write(line)
                metrics.sync()
            val_txt = f"val_loss {epoch_val:.4f}" if epoch_val is not None else "no validation data"
            text = f"epoch {epoch} (step {step}): train_loss {ema:.4f} {val_txt}"
            if rank0 and args.enable_progress_bar:
                bar.write(text, file=sys.stderr)
            else:
                say(text)
            t_last = time.time()
    finally:
        bar.close()
        if metrics:
            metrics.close()
    return epoch_val


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from rwkvc.training.config import parse_args
        dargs, rest = split_argv(argv)
        distill(dargs, parse_args(rest))
    except (RwkvcError, OSError) as e:
        from rwkvc.training.files import os_error_text
        rank = os.environ.get("RANK", "0").strip()
        if not (rank.isdigit() and int(rank) > 0):
            print(f"error: {os_error_text(e) if isinstance(e, OSError) else e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
