"""GRPO: reinforcement learning with verifiable rewards for RWKV-7 policies. See docs/GRPO.md.

    python training/grpo.py --load_model base.pth --prompts train.jsonl --eval_prompts heldout.jsonl \\
        --reward exact --proj_dir out/grpo --group_size 8 --prompts_per_step 4 --max_new_tokens 16 \\
        --stop '\\n' --lr_init 1e-5 --kl_beta 0.04 --steps 200 [--grpo_iterations 2 --micro_bsz 2]
    from rwkvc.training.grpo import train_grpo; path = train_grpo(args)

One step (Shao et al. 2024, arXiv 2402.03300, algorithm 1):

    prompts_per_step prompts, in a seeded order (a fresh permutation per pass)
      -> sample:   G completions each from the current policy (grpo_policy.sample_groups: the
                   prompt's state computed once, copied G times)
      -> score:    reward(prompt, completion, answer) (training/rewards.py), advantages within each group
      -> learn:    grpo_iterations times: for each micro-batch of micro_bsz prompts, the clipped-ratio
                   loss with the k3 KL to the frozen reference (grpo_objective.grpo_loss), gradients
                   accumulated over the micro-batches, then one optimiser step

Checkpoints are the official format (`rwkvc compile` deploys rwkv-final.pth); training/checkpoint.py
writes them with a training state (step, RNG states, optimiser); the prompt order and each step's sampling
seed follow from (seed, step, rank) alone, so a re-run of the same command resumes from the newest one to
the same result as an uninterrupted run. Under DeepSpeed each process samples and learns from its share of
a step's prompts (prompts_per_step / processes) and the gradients are averaged.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn

from rwkvc.errors import RwkvcError
from rwkvc.training import checkpoint as ckpt
from rwkvc.training import files
from rwkvc.training.engine import DeepSpeedEngine, Dist, SingleEngine
from rwkvc.training.grpo_args import GrpoArgs, as_grpo_args, parse_grpo_args
from rwkvc.training.grpo_objective import group_advantages, grpo_loss
from rwkvc.training.grpo_policy import (Policy, completion_logprobs, load_module, make_policy, pad_completions,
                                        sample_groups, vocab_size)
from rwkvc.training.model import lr_at, select_wkv
from rwkvc.training.rewards import Reward, parse_reward
from rwkvc.training.state_model import base_digest
from rwkvc.training.tasks import sample_order
from rwkvc.training.trainer import resolve_devices

ENGINES = {"auto": SingleEngine, "single": SingleEngine, "deepspeed_stage_1": DeepSpeedEngine,
           "deepspeed_stage_2": DeepSpeedEngine}   # ZeRO-3 refused by GrpoArgs
EVAL_BATCH = 64  # held-out prompts decoded together


# ------------------------------------------------------------------------------------------------
# inputs

def read_prompts(path: str, flag: str, need_answer: bool = False) -> list[dict]:
    """A JSON-lines prompts file -> [{prompt, answer}]; one-line errors naming the line."""
    p = Path(path)
    if not p.is_file():
        raise RwkvcError(f"{flag} {path} not found")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise RwkvcError(f"{flag} {path}: not UTF-8 text (a JSON-lines file of "
                         "{\"prompt\": ..., \"answer\": ...})") from None
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise RwkvcError(f"{flag} {path} line {n}: not JSON ({e.msg}); each line is "
                             "{\"prompt\": ..., \"answer\": ...}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise RwkvcError(f"{flag} {path} line {n}: needs a \"prompt\" string (each line is "
                             "{\"prompt\": ..., \"answer\": ...})")
        if not obj["prompt"]:
            raise RwkvcError(f"{flag} {path} line {n}: the prompt is empty")
        answer = obj.get("answer")
        if need_answer and answer is None:
            raise RwkvcError(f"{flag} {path} line {n}: no \"answer\", which the reward compares against")
        if answer is not None and not isinstance(answer, (str, int, float)):
            raise RwkvcError(f"{flag} {path} line {n}: \"answer\" must be a string or a number")
        items.append({"prompt": obj["prompt"], "answer": answer})
    if not items:
        raise RwkvcError(f"{flag} {path} holds no prompts")
    return items


def tokenize(items: list[dict], flag: str, tokenizer, vocab_size: int | None) -> list[dict]:
    """Adds each item's "tokens"; a token outside the model's vocabulary is one error line."""
    for it in items:
        it["tokens"] = toks = tokenizer.encode(it["prompt"])
        if vocab_size is not None and toks and max(toks) >= vocab_size:
            raise RwkvcError(f"{flag}: prompt {it['prompt'][:40]!r} has token {max(toks)}, outside the model's "
                             f"vocabulary 0..{vocab_size - 1} (give the model's --vocab)")
    return items


def load_tokenizer(vocab: str):
    from rwkvc.tokenizer import WorldTokenizer
    if vocab and not Path(vocab).is_file():
        raise RwkvcError(f"--vocab {vocab} not found")
    return WorldTokenizer(vocab or None)


def banned_ids(tokenizer, vocab_size: int) -> torch.Tensor:
    """Token ids the tokenizer cannot decode (never sampled)."""
    ids = [i for i in getattr(tokenizer, "unused_ids", ()) if i < vocab_size]
    top = getattr(tokenizer, "vocab_size", vocab_size)
    ids += list(range(top, vocab_size))
    return torch.tensor(sorted(set(ids)), dtype=torch.long)


# ------------------------------------------------------------------------------------------------
# the learner: the GRPO loss as one module, so an engine (plain or DeepSpeed) runs forward and backward

class GrpoLearner(nn.Module):
    """forward(micro-batch) -> the micro-batch's share of the step's loss. The model is the only child, as
    `model`, so `learner.model.state_dict()` is the official checkpoint."""

    def __init__(self, model: nn.Module, wkv_fn, args: GrpoArgs):
        super().__init__()
        self.model = model
        self.wkv_fn = wkv_fn
        self.args = args
        self.stats: dict = {}

    def policy(self) -> Policy:
        return make_policy(self.model, self.wkv_fn)

    def forward(self, mb: dict) -> torch.Tensor:
        a = self.args
        logp = completion_logprobs(self.policy(), mb["prompts"], a.group_size, mb["tokens"], a.temperature)
        old = mb["old"] if mb["old"] is not None else logp.detach()
        loss, self.stats = grpo_loss(logp, old, mb["ref"], mb["adv"], mb["mask"], clip_eps=a.clip_eps,
                                     kl_beta=a.kl_beta, agg=a.loss_agg, norm=mb["norm"])
        return loss


def micro_step(engine, mb: dict, boundary: bool, accumulation: int) -> dict:
    """Forward and backward one micro-batch; the optimiser steps at the boundary."""
    if isinstance(engine, DeepSpeedEngine):
        engine.engine.train()
        with engine.autocast():
            loss = engine.engine(mb)
        engine.engine.backward(loss * accumulation)   # DeepSpeed divides by its accumulation steps
        engine.engine.step()
        return engine.wrapper.stats
    engine.wrapper.train()
    with engine.autocast():
        loss = engine.wrapper(mb)
    if engine.scaler is not None:
        engine.scaler.scale(loss).backward()
    else:
        loss.backward()
    if boundary:
        if engine.scaler is not None:
            engine.scaler.unscale_(engine.optimizer)
        if engine.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(engine.wrapper.parameters(), engine.grad_clip)
        if engine.scaler is not None:
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            engine.optimizer.step()
        engine.optimizer.zero_grad(set_to_none=True)
    return engine.wrapper.stats


# ------------------------------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate(policy: Policy, items: list[dict], tokenizer, reward: Reward, args: GrpoArgs, ban=None,
             autocast=None) -> tuple[float, list[dict]]:
    """Greedy completions of `items` -> (mean reward, [{prompt, completion, answer, reward}])."""
    out = []
    for i in range(0, len(items), EVAL_BATCH):
        chunk = items[i:i + EVAL_BATCH]
        with (autocast() if autocast else torch.autocast("cpu", enabled=False)):
            comps = sample_groups(policy, [it["tokens"] for it in chunk], 1, tokenizer, temperature=0.0, top_p=1.0,
                                  max_new_tokens=args.max_new_tokens, stops=args.stop_strings, gen=None,
                                  eod=getattr(tokenizer, "eod_id", 0), ban=ban)
        for it, c in zip(chunk, comps):
            out.append({"prompt": it["prompt"], "completion": c.text, "answer": it["answer"],
                        "reward": reward(it["prompt"], c.text, it["answer"])})
    return sum(o["reward"] for o in out) / len(out), out


# ------------------------------------------------------------------------------------------------
# the loop

def train_grpo(args, log=None, tokenizer=None) -> Path:
    """GRPO as `args` (GrpoArgs, dict or Namespace) say; returns rwkv-final.pth. `tokenizer` (encode, decode,
    eod_id) replaces the one --vocab names (tests use tiny ones)."""
    args = resolve_devices(as_grpo_args(args))
    dist_info = Dist.from_env(args.local_rank)
    rank0 = dist_info.rank == 0
    say = (log or print) if rank0 else (lambda *a, **k: None)
    if dist_info.world > 1 and not args.strategy.startswith("deepspeed"):
        raise RwkvcError(f"{dist_info.world} processes were launched but --strategy is {args.strategy}; "
                         "use --strategy deepspeed_stage_1|2|3")
    if args.prompts_per_step % dist_info.world:
        raise RwkvcError(f"--prompts_per_step {args.prompts_per_step} must be a multiple of the {dist_info.world} "
                         "processes (each samples and learns from its share of a step's prompts)")
    if args.threads:
        torch.set_num_threads(args.threads)

    # ---- inputs: every check before any work
    reward = parse_reward(args.reward)
    eval_reward = parse_reward(args.eval_reward) if args.eval_reward else reward
    if not args.prompts:
        raise RwkvcError("--prompts is required: a JSON-lines file of {\"prompt\": ..., \"answer\": ...}")
    train_items = read_prompts(args.prompts, "--prompts", need_answer=reward.needs_answer)
    eval_items = (read_prompts(args.eval_prompts, "--eval_prompts", need_answer=eval_reward.needs_answer)
                  if args.eval_prompts else [])
    if not args.load_model:
        raise RwkvcError("--load_model is required: the starting policy (and the KL reference)")
    family, model, sidecars = load_module(args.load_model)
    V = vocab_size(model)
    tok = tokenizer if tokenizer is not None else load_tokenizer(args.vocab)
    tokenize(train_items, "--prompts", tok, V)
    tokenize(eval_items, "--eval_prompts", tok, V)
    proj = Path(args.proj_dir)
    files.check_output_dir(proj, "--proj_dir")
    resume = ckpt.check_resumable(proj, bool(args.restart))
    device = torch.device(f"cuda:{dist_info.local_rank}" if args.accelerator == "gpu" else "cpu")
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision, torch.float32)
    wkv_name, wkv_fn = select_wkv(args.wkv, device, args.chunk_len, compute)
    ref_digest = base_digest(model)                 # the reference's weights, however they were stored
    ref_policy = None
    if args.kl_beta > 0:
        _, ref_model, _ = load_module(args.load_model)
        ref_model.to(device).eval().requires_grad_(False)
        ref_policy = make_policy(ref_model, wkv_fn)
    seed = args.random_seed if args.random_seed >= 0 else int.from_bytes(os.urandom(3), "little")
    ban = banned_ids(tok, V) if V is not None else None
    eod = getattr(tok, "eod_id", 0)

    # ---- everything checked: from here on files are written
    with ckpt.stop_on_os_error(proj, "GRPO"):
        proj.mkdir(parents=True, exist_ok=True)
        learner = GrpoLearner(model, wkv_fn, args)
        P_local = args.prompts_per_step // dist_info.world          # this process's prompts per step
        n_micro = -(-P_local // args.micro_bsz)
        engine = ENGINES[args.strategy](learner, SimpleNamespace(**args.to_dict(), accumulation=n_micro), device,
                                        dist_info)
        if ban is not None:
            ban = ban.to(device)
        if rank0:
            files.remove_dead_temps(proj)
            for name, text in sidecars.items():           # a hybrid's config.json beside its checkpoints
                files.atomic_write_text(proj / name, text)
            if args.restart and ckpt.clear_states(proj):
                say(f"note: --restart 1: starting again from step 0; the training states in {proj} are deleted")
        engine.barrier()
        gen = torch.Generator(device=device)   # reseeded every step from (seed, rank, step): resumes exactly

        step = 0

        def restore(tag, weights, state):
            if state.get("kind") != "grpo":
                raise RwkvcError(f"{proj} holds checkpoints of another kind of run; give GRPO its own --proj_dir")
            if state.get("ref_sha256") != ref_digest:
                raise RwkvcError(f"--load_model {args.load_model} is not the model this run started from (its "
                                 "weights' sha256 differs), and it is the KL reference; give the original, or "
                                 "--restart 1")
            engine.load_state(str(proj), state, weights)

        found = ckpt.resume_latest(proj, resume, restore, say)
        if found:
            tag, state = found
            step, seed = state["step"], state["seed"]
            say(f"resumed from {ckpt.weights_path(proj, tag)}: step {step}")
        else:
            torch.manual_seed(seed)

        n_params = sum(p.numel() for p in model.parameters())
        say(f"GRPO on {family} ({n_params / 1e6:.2f}M params), {args.precision} on {device.type} x{dist_info.world} "
            f"({engine.name} {args.strategy}), wkv {wkv_name}, seed {seed}\n"
            f"{len(train_items)} prompts ({len(eval_items)} held out); {args.steps} steps x {args.prompts_per_step} "
            f"prompts x G {args.group_size}, {args.grpo_iterations} update(s) per batch in {n_micro} "
            f"micro-batch(es); reward {args.reward}{'; held out: ' + args.eval_reward if args.eval_reward else ''}; "
            f"clip {args.clip_eps}, KL beta {args.kl_beta}, "
            f"lr {args.lr_init:g} -> {args.lr_final:g}")
        if rank0:
            files.atomic_write_text(proj / "grpo-args.json", json.dumps({**args.to_dict(), "seed": seed}, indent=1))
        final = ckpt.weights_path(proj, "final")
        if step >= args.steps:
            say(f"GRPO already finished at step {step}: {final}")
            engine.close()
            return final

        policy = learner.policy()
        metrics = files.JsonLines(proj / "metrics.jsonl") if rank0 else None

        def held_out(at_step: int) -> float | None:
            if not eval_items:
                return None
            model.eval()
            r, samples = evaluate(policy, eval_items, tok, eval_reward, args, ban, engine.autocast)
            if metrics:
                metrics.write({"event": "eval", "step": at_step, "eval_reward": r,
                               "samples": [{k: s[k] for k in ("prompt", "completion", "reward")} for s in samples[:4]]})
            return r

        if step == 0:
            base = held_out(0)
            if base is not None:
                say(f"held-out reward at the start: {base:.4f} ({len(eval_items)} prompts, greedy)")
        elif metrics:
            metrics.write({"event": "resume", "step": step})
        from tqdm import tqdm
        bar = tqdm(total=args.steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr,
                   disable=not (rank0 and args.enable_progress_bar), mininterval=1.0)
        order_cache: dict = {}
        P, G = P_local, args.group_size
        t0 = time.time()
        last_eval = None
        try:
            while step < args.steps:
                lr = lr_at(step, _Sched(args), args.steps, 1)
                engine.set_lr(lr)
                # ---- sample: the step's prompts in a seeded order, this process's share of them
                first = step * args.prompts_per_step + dist_info.rank * P
                idx = [sample_order(len(train_items), first + j, seed, order_cache) for j in range(P)]
                gen.manual_seed(int(np.random.SeedSequence([seed, dist_info.rank, step]).generate_state(1)[0]))
                items = [train_items[i] for i in idx]
                prompts = [it["tokens"] for it in items]
                t_s = time.time()
                model.eval()
                with engine.autocast():
                    comps = sample_groups(policy, prompts, G, tok, temperature=args.temperature, top_p=args.top_p,
                                          max_new_tokens=args.max_new_tokens, stops=args.stop_strings, gen=gen,
                                          eod=eod, ban=ban)
                t_sample = time.time() - t_s
                # ---- score
                rewards = torch.tensor([[reward(it["prompt"], comps[p * G + g].text, it["answer"]) for g in range(G)]
                                        for p, it in enumerate(items)], dtype=torch.float32)
                adv = group_advantages(rewards).flatten()
                # ---- learn
                mbs = []
                for s in range(0, P, args.micro_bsz):
                    rows = slice(s * G, min(P, s + args.micro_bsz) * G)
                    toks, mask = pad_completions([c.tokens for c in comps[rows]], device)
                    mbs.append({"prompts": prompts[s:s + args.micro_bsz], "tokens": toks, "mask": mask,
                                "adv": adv[rows].to(device), "old": None, "ref": None})
                n_tok = sum(float(mb["mask"].sum()) for mb in mbs)
                norm = float(P * G) if args.loss_agg == "seq" else n_tok
                with torch.no_grad(), engine.autocast():
                    for mb in mbs:
                        mb["norm"] = norm
                        if ref_policy is not None:
                            mb["ref"] = completion_logprobs(ref_policy, mb["prompts"], G, mb["tokens"],
                                                            args.temperature)
                        if args.grpo_iterations > 1:
                            mb["old"] = completion_logprobs(policy, mb["prompts"], G, mb["tokens"], args.temperature)
                kl_sum = clipped = 0.0
                for it_ in range(args.grpo_iterations):
                    for k, mb in enumerate(mbs):
                        st = micro_step(engine, mb, k == len(mbs) - 1, len(mbs))
                        if it_ == 0:
                            kl_sum += st["kl_sum"]
                        clipped += st["clipped"]
                step += 1
                t_step = time.time() - t_s
                n, r_sum, std_sum, sig, n_tok, kl_sum, clipped, len_sum, stopped = engine.all_reduce_sum([
                    float(rewards.numel()), float(rewards.sum()), float(rewards.std(1).sum()),
                    float((rewards.std(1) > 0).sum()), n_tok, kl_sum, clipped,
                    float(sum(len(c.tokens) for c in comps)), float(sum(c.stopped for c in comps))])
                line = {"step": step, "lr": lr, "reward": r_sum / n, "reward_std": std_sum / (n / G),
                        "groups_with_signal": int(sig), "kl": kl_sum / max(1.0, n_tok),
                        "clip_frac": clipped / max(1.0, n_tok * args.grpo_iterations), "len": len_sum / n,
                        "stopped": stopped / n, "samples_s": round(n / max(1e-9, t_sample), 2),
                        "sample_s": round(t_sample, 3), "step_s": round(t_step, 3), "time": round(time.time() - t0, 3)}
                bar.update(1)
                bar.set_postfix(reward=f"{line['reward']:.3f}", kl=f"{line['kl']:.4f}", len=f"{line['len']:.1f}",
                                smp_s=f"{line['samples_s']:.1f}", refresh=False)
                if metrics:
                    metrics.write(line)
                if args.eval_every and step % args.eval_every == 0 and step != args.steps:
                    last_eval = held_out(step)
                    if last_eval is not None:
                        bar.write(f"step {step}: held-out reward {last_eval:.4f}", file=sys.stderr)
                tags = []
                if args.save_every and step % args.save_every == 0 and step != args.steps:
                    tags.append(str(step))
                if step == args.steps:
                    tags.append("final")
                for tag in tags:
                    weights = engine.weights()
                    extra = engine.save_state(str(proj), tag)
                    state = {"kind": "grpo", "step": step, "seed": seed, "lr": lr,
                             "rng": ckpt.rng_state(), "ref_sha256": ref_digest,
                             "world": dist_info.world, "args": args.to_dict()}
                    if rank0:
                        ckpt.save_checkpoint(weights, {**state, **extra}, proj, tag)
                    engine.barrier()
                if tags and rank0:
                    ckpt.prune_states(proj)
                    if metrics:
                        metrics.sync()
        finally:
            bar.close()
        end = held_out(step)
        if end is not None:
            say(f"held-out reward at the end: {end:.4f}")
        if metrics:
            metrics.close()
    engine.close()
    say(f"done: {final}")
    return final


class _Sched:
    """What lr_at reads (the RWKV-LM schedule without the token-count cosine)."""

    def __init__(self, args: GrpoArgs):
        self.lr_init, self.lr_final, self.warmup_steps = args.lr_init, args.lr_final, args.warmup_steps
        self.my_exit_tokens, self.ctx_len = 0, 1


def main(argv=None) -> int:
    return files.script_main(lambda: train_grpo(parse_grpo_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
