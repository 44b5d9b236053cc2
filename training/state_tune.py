"""State tuning: train only the per-layer initial wkv state of a frozen RWKV v5 / v6 / v7 model.

RWKV's state is its whole memory of the past, so a task can be taught by training only the state the
model starts from, every weight frozen (RWKV-LM-State-4bit, RWKV-PEFT). The result is a tiny file of
one (H, N, N) tensor per layer that any deployment of the unchanged model can start from.

    python training/train.py --train_type states --load_model base.pth --data_file data/task \\
        --proj_dir out/task --ctx_len 256 --micro_bsz 8 --lr_init 0.1 --lr_final 0.01 --epoch_steps 100
        [--quant 1 --quant_type nf4|int4]                       # frozen base held in 4 bits
        [--orpo 1 --orpo_alpha 0.2 --rlhf_train_file pairs.jsonl --rlhf_max_corpus_len 512]
    python training/state_tune.py ...                           # the same (train.py dispatches here)
    from rwkvc.training.state_tune import train_states; path = train_states(args)

Pieces (a straight line; each a plain function or a small module):

    state_args.py    StateArgs: the state-tuning settings, split out of TrainArgs; the command line
    frozen.py        FrozenMatrix: a frozen matrix held as fp32, bf16, fp16 or 4 bits (nf4 / int4),
                     dequantised a few rows at a time per use; the frozen Linear / Embedding / head loss
    state_model.py   load_base: checkpoint -> the reference model (rwkvc.reference.v5/v6/v7) with every
                     matrix frozen; StateModel: its forward pass with a trainable initial wkv state
    tasks.py         LMTask: next-token loss on whole documents (or RWKV-LM's windows);
                     orpo.py's OrpoTask: ORPO on prompt/chosen/reject pairs
    state_tune.py    train_states, the loop: helper pieces of the training module (lr schedule, progress
                     bar, metrics.jsonl, rwkv-N.pth naming, resume); the checkpoints hold only the states
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from rwkvc.errors import RwkvcError
from rwkvc.training import checkpoint as ckpt
from rwkvc.training import files
from rwkvc.training.config import TrainArgs
from rwkvc.training.engine import AUTOCAST, Dist
from rwkvc.training.model import lr_at, select_wkv
from rwkvc.training.orpo import OrpoTask
from rwkvc.training.state_args import StateArgs, ignored_settings, parse_state_args, split_args
from rwkvc.training.state_model import StateModel, base_digest, load_base
from rwkvc.training.tasks import LMTask
from rwkvc.training.trainer import resolve_devices


def _storage(args: TrainArgs, sargs: StateArgs) -> str:
    if sargs.quant:
        return sargs.quant_type
    return {"bf16": "bf16", "fp16": "fp16"}.get(args.precision, "fp32")


def train_states(args, log=None) -> Path:
    """State-tune as `args` say (TrainArgs + StateArgs fields; see split_args); returns rwkv-final.pth,
    a state file: {blocks.N.att.time_state: (H, N, N) float32}."""
    args, sargs = split_args(args)
    args = resolve_devices(args)
    say = log or print
    if Dist.from_env().world > 1:
        raise RwkvcError("state tuning runs in one process (the state is tiny); launch it without torchrun/deepspeed")
    ignored = ignored_settings(args)
    if ignored:
        say(f"note: state tuning runs in one process and takes the model's shape from --load_model; ignoring "
            f"{', '.join(ignored)}")
    if not args.load_model:
        raise RwkvcError("--load_model is required: state tuning trains the initial state of a given model")
    if not Path(args.load_model).is_file():
        raise RwkvcError(f"--load_model {args.load_model} not found")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    seed = args.random_seed if args.random_seed >= 0 else int.from_bytes(os.urandom(3), "little")

    # ---- inputs: every check before any work
    storage = _storage(args, sargs)
    t_load = time.time()
    base = load_base(args.load_model, storage, sargs.quant_group)
    init = base.time_state
    if sargs.load_state:
        from rwkvc import ir
        from rwkvc.states import state_for_model
        cfg = ir.ModelConfig(version=base.version, n_layer=base.n_layer, n_embd=base.n_embd,
                             head_size=base.head_size, vocab_size=base.vocab_size, ffn_dim=1)
        init = torch.from_numpy(state_for_model(sargs.load_state, cfg).wkv)
    if sargs.orpo:
        task = OrpoTask(args, sargs, base.vocab_size, seed)
    else:
        task = LMTask(args, sargs, base.vocab_size, seed)
    proj = Path(args.proj_dir)
    files.check_output_dir(proj, "--proj_dir")
    resume = ckpt.check_resumable(proj, bool(args.restart))
    compute = AUTOCAST.get(args.precision, torch.float32)
    wkv_name, wkv_fn = select_wkv(args.wkv, device, args.chunk_len, compute) if base.version == "7" else ("recurrent", None)
    base.model.to(device)
    sm = StateModel(base, init, wkv_fn, grad_cp=bool(args.grad_cp)).to(device)
    opt = torch.optim.Adam([sm.state], lr=args.lr_init, betas=(args.beta1, args.beta2), eps=args.adam_eps)
    B = args.micro_bsz
    total = args.epoch_count * args.epoch_steps if args.epoch_count else math.ceil(task.n_items / B)
    if args.my_exit_tokens > 0:
        total = min(total, math.ceil(args.my_exit_tokens / (args.ctx_len * B)))
    total = max(1, total)
    epoch_steps = min(args.epoch_steps, total)
    digest0 = base_digest(base.model)

    def autocast():
        if compute is torch.float32:
            return torch.autocast(device_type=device.type, enabled=False)
        return torch.autocast(device_type=device.type, dtype=compute)

    def evaluate():
        sm.eval()
        with autocast():
            return task.evaluate(sm, B)

    # ---- resume
    step = samples = 0
    resumed: dict = {}

    def restore(tag, weights, state):
        if state.get("kind") != "states":
            raise RwkvcError(f"{proj} holds checkpoints of a full training run ({ckpt.weights_path(proj, tag).name}); "
                             "give state tuning its own --proj_dir")
        st = torch.stack([weights[f"blocks.{i}.att.time_state"] for i in range(base.n_layer)]).float()
        if st.shape != sm.state.shape:
            raise RwkvcError(f"{ckpt.weights_path(proj, tag)} holds states of shape {tuple(st.shape)}, "
                             f"this model needs {tuple(sm.state.shape)}; give another --proj_dir")
        with torch.no_grad():
            sm.state.copy_(st)
        opt.load_state_dict(state["optimizer"])

    # ---- from here on files are written (an OSError stops with one line saying what was kept)
    with ckpt.stop_on_os_error(proj, "state tuning"):
        found = ckpt.resume_latest(proj, resume, restore, say)
        if found:
            tag, resumed = found
            step, samples, seed = resumed["step"], resumed["samples"], resumed.get("seed", seed)
            task.seed = seed
            say(f"resumed from {ckpt.weights_path(proj, tag)}: step {step}, {samples} samples")
        else:
            torch.manual_seed(seed)

        proj.mkdir(parents=True, exist_ok=True)
        files.remove_dead_temps(proj)                      # what a killed run was writing
        if args.restart and ckpt.clear_states(proj):
            say(f"note: --restart 1: starting again from step 0; the training states in {proj} are deleted "
                "and its checkpoints are overwritten as this run saves")
        rep = base.report
        say(f"state tuning RWKV-{base.version} L{base.n_layer} C{base.n_embd} H{base.n_head} N{base.head_size} "
            f"V{base.vocab_size}: {sm.state.numel()} trainable state values; base frozen, {rep['matrices']} matrices "
            f"as {storage} ({rep['frozen_matrix_bytes'] / 1e6:.1f} MB; bf16 would be {rep['bf16_matrix_bytes'] / 1e6:.1f} MB) "
            f"loaded in {time.time() - t_load:.1f} s\n"
            f"{'ORPO' if sargs.orpo else 'SFT'}: {task.note}; {total} steps x {B}, ctx {args.ctx_len}, "
            f"{args.precision} on {device.type}, wkv {wkv_name}, lr {args.lr_init:g} -> {args.lr_final:g}, seed {seed}")
        files.atomic_write_text(proj / "train-args.json",
                                json.dumps({**args.to_dict(), **dataclasses.asdict(sargs), "seed": seed}, indent=1))
        final = ckpt.weights_path(proj, "final")
        if step >= total:
            say(f"state tuning already finished at step {step}: {final}")
            return final

        metrics = files.JsonLines(proj / "metrics.jsonl")
        if step == 0:
            base_val = evaluate()
            metrics.write({"event": "baseline", "step": 0, **(base_val or {}), "base_digest": digest0,
                           "storage": storage, **rep})
            if base_val:
                say(f"baseline (initial state): {', '.join(f'{k} {v:.4f}' for k, v in base_val.items())}")
        else:
            metrics.write({"event": "resume", "step": step, "samples": samples})
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr,
                   disable=not args.enable_progress_bar, mininterval=1.0)
        t0 = t_last = time.time()
        ema, val = None, None
        tokens_seen = int(resumed.get("tokens", 0))
        try:
            while step < total:
                lr = lr_at(step, args, total, B)
                for g in opt.param_groups:
                    g["lr"] = lr
                sm.train()
                batch = [t.to(device) for t in task.batch(samples, B)]
                with autocast():
                    loss, info, ntok = task.loss(sm, batch)
                loss.backward()
                if args.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_([sm.state], args.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                loss = loss.item()
                if not math.isfinite(loss):
                    raise RwkvcError(f"the loss became {loss} at step {step + 1}; lower --lr_init (states often "
                                     "want 1e-3..1e-1)")
                step, samples, tokens_seen = step + 1, samples + B, tokens_seen + int(ntok)
                now = time.time()
                tok_s = ntok / max(1e-9, now - t_last)
                t_last = now
                ema = loss if ema is None else 0.95 * ema + 0.05 * loss
                bar.update(1)
                bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}", refresh=False)
                metrics.write({"step": step, "loss": loss, "lr": lr, "tokens": tokens_seen,
                               "tok_s": round(tok_s, 1), "time": round(now - t0, 3), **info})
                end_of_epoch = step % epoch_steps == 0
                if not (end_of_epoch or step == total):
                    continue
                epoch = (step - 1) // epoch_steps
                val = evaluate()
                tags = []
                if end_of_epoch and args.epoch_save > 0 and epoch % args.epoch_save == 0 and step != total:
                    tags.append(str(epoch))
                if step == total:
                    tags.append("final")
                for tag in tags:
                    ckpt.save_checkpoint(_state_dict(sm), {
                        "kind": "states", "step": step, "epoch": epoch, "samples": samples, "lr": lr,
                        "tokens": tokens_seen, "seed": seed, "total_steps": total, "val": val,
                        "rng": ckpt.rng_state(), "optimizer": opt.state_dict(), "args": args.to_dict(),
                        "state_args": dataclasses.asdict(sargs)}, proj, tag)
                ckpt.prune_states(proj)
                line = {"step": step, "epoch": epoch, **(val or {"val_loss": None}), "lr": lr,
                        "tokens": tokens_seen, "time": round(time.time() - t0, 3),
                        "checkpoints": [ckpt.weights_path(proj, t).name for t in tags]}
                metrics.write(line)
                metrics.sync()
                vtxt = ", ".join(f"{k} {v:.4f}" for k, v in (val or {}).items()) or "no validation data"
                text = (f"epoch {epoch} (step {step}): train_loss {ema:.4f} {vtxt}"
                        + (f", saved {', '.join(line['checkpoints'])}" if tags else ""))
                if args.enable_progress_bar:
                    bar.write(text, file=sys.stderr)          # above the bar
                else:
                    say(text)
                t_last = time.time()
            digest1 = base_digest(base.model)
            if digest1 != digest0:  # cannot happen: nothing but the state has a gradient or an optimizer
                raise RuntimeError("the frozen base changed during state tuning")
            metrics.write({"event": "done", "step": step, **(val or {}), "base_digest": digest1,
                           "base_unchanged": digest1 == digest0})
        finally:
            bar.close()
            metrics.close()
    say(f"done: {final} ({sm.state.numel() * 4 / 1024:.1f} KiB of states; base weights bit-identical, "
        f"sha256 {digest0[:16]}...)")
    return final


def _state_dict(sm: StateModel) -> dict:
    from rwkvc.states import time_state_dict
    return time_state_dict(sm.state.detach())


def main(argv=None) -> int:
    return files.script_main(lambda: train_states(parse_state_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
