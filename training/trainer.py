"""The training loop, as one importable function: `train(args) -> path of the final checkpoint`.

Low-rank fine-tuning (svd_finetune.py) and state tuning (state_tune.py) run their own loops on the
same pieces (TrainArgs, the lr schedule, the data and, for state tuning, checkpoint.py). Everything
that can be wrong with the inputs is checked before the model is built.

    steps:  warmup + decay (RWKV-LM), batch b of step s = magic-prime samples [s*real_bsz, (s+1)*real_bsz)
    epochs: every epoch_steps steps -> validation loss, and rwkv-<epoch>.pth every epoch_save epochs
    end:    validation loss, rwkv-final.pth
    resume: automatic, from the newest checkpoint in proj_dir that has its training state; unreadable newer
            states, or checkpoints without states, stop the run before any work (--restart 1 starts over)
    faults: every file is written atomically (training/files.py); an OSError (a full disk) stops the run
            with one line naming the file and the last complete checkpoint
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rwkvc.errors import RwkvcError
from rwkvc.reference.v7 import RWKV7
from rwkvc.training import checkpoint as ckpt
from rwkvc.training import files
from rwkvc.training.config import TrainArgs, as_train_args
from rwkvc.training.data import TokenData
from rwkvc.training.engine import DeepSpeedEngine, Dist, SingleEngine, cpu_bf16_native
from rwkvc.training.gpt import GptLoss, build_gpt, enable_gpt_grad_checkpointing, init_gpt
from rwkvc.training.model import LMLoss, enable_grad_checkpointing, init_rwkv_lm, lr_at, model_config, select_wkv

ENGINES = {"auto": SingleEngine, "single": SingleEngine, "deepspeed_stage_1": DeepSpeedEngine,
           "deepspeed_stage_2": DeepSpeedEngine, "deepspeed_stage_3": DeepSpeedEngine}


@dataclass(frozen=True)
class ModelKind:
    """What --model chooses: the module from the args, its initialisation (model, seed), the loss wrapper
    (model, wkv_fn) the engines train, and gradient checkpointing (--grad_cp 1)."""
    label: str
    build: Callable
    init: Callable
    wrap: Callable
    grad_cp: Callable


MODELS = {"rwkv7": ModelKind("RWKV-7", lambda a: RWKV7(model_config(a)), init_rwkv_lm, LMLoss,
                             enable_grad_checkpointing),
          "gpt": ModelKind("GPT", build_gpt, init_gpt, GptLoss, enable_gpt_grad_checkpointing)}


class Plan:
    """Steps, epochs and batch sizes of a run (pure arithmetic on the args and the data)."""

    def __init__(self, args: TrainArgs, world: int, magic_prime: int):
        self.real_bsz = world * args.micro_bsz
        self.epoch_steps = args.epoch_steps
        epoch_count = args.epoch_count
        if args.my_pile_stage > 0:  # RWKV-LM: 40320 samples per mini-epoch, magic_prime samples in all
            if 40320 % self.real_bsz:
                raise RwkvcError(f"--my_pile_stage needs 40320 divisible by the real batch size {self.real_bsz}")
            self.epoch_steps = 40320 // self.real_bsz
            epoch_count = max(1, magic_prime // 40320)
        per_epoch = self.epoch_steps * self.real_bsz
        if args.my_exit_tokens > 0:
            total = math.ceil(args.my_exit_tokens / (args.ctx_len * self.real_bsz))
            if epoch_count > 0:
                total = min(total, epoch_count * self.epoch_steps)
        else:
            if epoch_count == 0:  # one pass: every window of the magic-prime permutation once
                epoch_count = math.ceil(magic_prime / per_epoch)
            total = epoch_count * self.epoch_steps
        self.total_steps = total
        self.epoch_count = math.ceil(total / self.epoch_steps)


def resolve_devices(args: TrainArgs) -> TrainArgs:
    """args with --accelerator and --precision filled in from the machine (gpu + bf16 where CUDA is, else
    cpu + fp32) and checked against it."""
    accelerator = args.accelerator or ("gpu" if torch.cuda.is_available() else "cpu")
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise RwkvcError("--accelerator gpu: no CUDA device is available (use --accelerator cpu)")
    precision = args.precision or ("bf16" if accelerator == "gpu" else "fp32")
    if precision == "fp16" and accelerator == "cpu":
        raise RwkvcError("--precision fp16 needs --accelerator gpu; use bf16 or fp32 on CPU")
    return args.replace(accelerator=accelerator, precision=precision)


def _evaluate(engine, data: TokenData, micro_bsz: int, dist_info: Dist) -> float | None:
    """Mean next-token loss over the held-out tokens (all processes take part; same count of calls)."""
    windows = data.val_windows()
    if not windows:
        return None
    full = [w for w in windows if w[1] == data.ctx_len + 1]
    batches = [full[i:i + micro_bsz] for i in range(0, len(full), micro_bsz)]
    batches += [[w] for w in windows if w[1] != data.ctx_len + 1]
    mine = batches[dist_info.rank::dist_info.world]
    rounds = math.ceil(len(batches) / dist_info.world)
    total, count = 0.0, 0
    for r in range(rounds):
        b = mine[r] if r < len(mine) else batches[0][:1]  # an idle rank still joins ZeRO-3's gathers
        x = torch.stack([torch.from_numpy(data.val_tokens(s, n).astype("int64")) for s, n in b])
        loss = engine.eval_loss_sum(x[:, :-1], x[:, 1:])
        if r < len(mine):
            total, count = total + loss, count + x[:, 1:].numel()
    total, count = engine.all_reduce_sum([total, float(count)])
    return total / count


def train(args, log=None) -> Path:
    """Train (or resume) as `args` (TrainArgs, dict or argparse.Namespace) say; returns rwkv-final.pth."""
    args = resolve_devices(as_train_args(args))
    dist_info = Dist.from_env(args.local_rank)
    rank0 = dist_info.rank == 0
    say = (log or print) if rank0 else (lambda *a, **k: None)
    if dist_info.world > 1 and not args.strategy.startswith("deepspeed"):
        raise RwkvcError(f"{dist_info.world} processes were launched but --strategy is {args.strategy}; "
                         "use --strategy deepspeed_stage_1|2|3")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precision == "bf16" and args.accelerator == "cpu" and not cpu_bf16_native():
        say("warning: this CPU has no bf16 arithmetic, so torch emulates it (~15x slower than fp32 here); "
            "--precision fp32 trains faster")

    # ---- inputs: every check before any work
    if not args.data_file:
        raise RwkvcError("--data_file is required: a binidx prefix (PREFIX.bin + PREFIX.idx) from make_data.py")
    data = TokenData(args.data_file, args.ctx_len, args.vocab_size, args.magic_prime, args.val_file, args.val_tokens)
    plan = Plan(args, dist_info.world, data.magic_prime)
    proj = Path(args.proj_dir)
    if args.load_model and not Path(args.load_model).is_file():
        raise RwkvcError(f"--load_model {args.load_model} not found")
    device = torch.device(f"cuda:{dist_info.local_rank}" if args.accelerator == "gpu" else "cpu")
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision, torch.float32)
    wkv_name, wkv_fn = select_wkv(args.wkv, device, args.chunk_len, compute)
    files.check_output_dir(proj, "--proj_dir")
    resume = ckpt.check_resumable(proj, bool(args.restart))
    kind = MODELS[args.model]
    model = kind.build(args)
    seed = args.random_seed if args.random_seed >= 0 else int.from_bytes(os.urandom(3), "little")
    if not resume and args.load_model:
        try:
            sd = torch.load(args.load_model, map_location="cpu", weights_only=True)
            model.load_state_dict({k: v.float() for k, v in sd.items()})
        except Exception as e:
            raise RwkvcError(f"--load_model {args.load_model} does not fit the model (L{args.n_layer} "
                             f"D{args.n_embd} V{args.vocab_size}): {str(e).strip().splitlines()[0][:300]}") from None
    else:
        kind.init(model, seed)
    if args.grad_cp:
        kind.grad_cp(model)

    # ---- everything checked: from here on files are written (an OSError stops with what was kept)
    with ckpt.stop_on_os_error(proj):
        proj.mkdir(parents=True, exist_ok=True)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.backends.cuda.matmul.allow_tf32 = args.precision != "fp32"
            torch.backends.cudnn.allow_tf32 = args.precision != "fp32"
        engine = ENGINES[args.strategy](kind.wrap(model, wkv_fn), args, device, dist_info)
        if rank0:
            files.remove_dead_temps(proj)                  # what a killed run was writing
            if args.restart and ckpt.clear_states(proj):
                say(f"note: --restart 1: starting again from step 0; the training states in {proj} are deleted "
                    "and its checkpoints are overwritten as this run saves")
        engine.barrier()

        # ---- resume
        step, samples, epoch_val = 0, 0, None

        def restore(tag, weights, state):
            if state.get("world") != dist_info.world and args.strategy.startswith("deepspeed"):
                raise RwkvcError(f"{tag} was written by {state.get('world')} processes; resume with as many")
            engine.load_state(str(proj), state, weights)

        found = ckpt.resume_latest(proj, resume, restore, say)
        if found:
            tag, state = found
            step, samples, seed = state["step"], state["samples"], state.get("seed", seed)
            say(f"resumed from {ckpt.weights_path(proj, tag)}: step {step}, {samples} samples, lr {state['lr']:.3g}")
        else:
            torch.manual_seed(seed)

        n_params = sum(p.numel() for p in model.parameters())
        say(f"{kind.label} L{args.n_layer} D{args.n_embd} V{args.vocab_size} ({n_params / 1e6:.2f}M params), "
            f"ctx {args.ctx_len}, {args.precision} on {device.type} x{dist_info.world} ({engine.name} "
            f"{args.strategy}){', wkv ' + wkv_name if args.model == 'rwkv7' else ''}, seed {seed}\n"
            f"data {data.data.prefix}: {data.plan.train_len} training tokens, magic_prime {data.magic_prime}, "
            f"{data.num_val_targets} validation tokens"
            f"{' from ' + args.val_file if args.val_file else ' (held-out tail)'}\n"
            f"{plan.total_steps} steps x {plan.real_bsz} x {args.ctx_len} tokens = "
            f"{plan.total_steps * plan.real_bsz * args.ctx_len} tokens, {plan.epoch_count} epochs of "
            f"{plan.epoch_steps} steps; lr {args.lr_init:g} -> {args.lr_final:g}, warmup {args.warmup_steps}")
        if data.plan.note:
            say(f"note: {data.plan.note}")
        if args.devices * args.num_nodes > dist_info.world:
            say(f"note: --devices {args.devices} x --num_nodes {args.num_nodes} but {dist_info.world} process(es) "
                "are running; start one per device with torchrun or the deepspeed launcher")
        if rank0:
            files.atomic_write_text(proj / "train-args.json", json.dumps({**args.to_dict(), "seed": seed}, indent=1))
        final = ckpt.weights_path(proj, "final")
        if step >= plan.total_steps:
            say(f"training already finished at step {step}: {final}")
            engine.close()
            return final

        # ---- loop
        metrics = files.JsonLines(proj / "metrics.jsonl") if rank0 else None
        if metrics and step:
            metrics.write({"event": "resume", "step": step, "samples": samples})
        from tqdm import tqdm
        bar = tqdm(total=plan.total_steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr,
                   disable=not (rank0 and args.enable_progress_bar), mininterval=1.0)
        tokens_per_step = plan.real_bsz * args.ctx_len
        t0, t_last, ema = time.time(), time.time(), None
        lr = lr_at(step, args, plan.total_steps, plan.real_bsz)
        try:
            while step < plan.total_steps:
                lr = lr_at(step, args, plan.total_steps, plan.real_bsz)
                engine.set_lr(lr)
                batch = data.batch(step, dist_info.rank, dist_info.world, args.micro_bsz)  # a step, not a sample count
                loss = engine.train_step(batch[:, :-1], batch[:, 1:])
                step, samples = step + 1, samples + plan.real_bsz
                now = time.time()
                tok_s = tokens_per_step / max(1e-9, now - t_last)
                t_last = now
                ema = loss if ema is None else 0.95 * ema + 0.05 * loss
                bar.update(1)
                bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}", refresh=False)
                if metrics:
                    metrics.write({"step": step, "loss": loss, "lr": lr, "tokens": samples * args.ctx_len,
                                   "tok_s": round(tok_s, 1), "time": round(now - t0, 3)})
                end_of_epoch = step % plan.epoch_steps == 0
                if not (end_of_epoch or step == plan.total_steps):
                    continue
                epoch = (step - 1) // plan.epoch_steps
                epoch_val = _evaluate(engine, data, args.micro_bsz, dist_info)
                tags = []
                if end_of_epoch and args.epoch_save > 0 and epoch % args.epoch_save == 0:
                    tags.append(str(epoch))
                if step == plan.total_steps:
                    tags.append("final")
                state = {"step": step, "epoch": epoch, "samples": samples, "lr": lr, "seed": seed,
                         "world": dist_info.world, "micro_bsz": args.micro_bsz, "ctx_len": args.ctx_len,
                         "total_steps": plan.total_steps, "magic_prime": data.magic_prime, "val_loss": epoch_val,
                         "rng": ckpt.rng_state(), "args": args.to_dict()}
                for tag in tags:
                    weights = engine.weights()
                    extra = engine.save_state(str(proj), tag)
                    if rank0:
                        ckpt.save_checkpoint(weights, {**state, **extra}, proj, tag)
                    engine.barrier()
                if rank0:
                    ckpt.prune_states(proj)
                line = {"step": step, "epoch": epoch, "val_loss": epoch_val, "lr": lr,
                        "tokens": samples * args.ctx_len, "time": round(time.time() - t0, 3),
                        "checkpoints": [ckpt.weights_path(proj, t).name for t in tags]}
                if metrics:
                    metrics.write(line)
                    metrics.sync()
                val_txt = f"val_loss {epoch_val:.4f}" if epoch_val is not None else "no validation data"
                text = (f"epoch {epoch} (step {step}): train_loss {ema:.4f} {val_txt}"
                        + (f", saved {', '.join(line['checkpoints'])}" if tags else ""))
                if rank0 and args.enable_progress_bar:
                    bar.write(text, file=sys.stderr)          # above the bar
                else:
                    say(text)
                t_last = time.time()  # validation and saving are not training throughput
        finally:
            bar.close()
            if metrics:
                metrics.close()
    engine.close()
    say(f"done: {final} (val_loss {epoch_val})")
    return final
