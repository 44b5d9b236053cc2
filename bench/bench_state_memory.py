"""State tuning measurements for docs/BENCHMARKS.md and docs/STATE_TUNING.md (CPU).

    python bench/bench_state_memory.py memory [--model demo|0.1b|PATH] [--modes bf16,nf4,int4] [--steps 3]
    python bench/bench_state_memory.py task --base DEMO.pth [--steps 150] [--quant_type nf4]

memory: peak resident memory of state-tuning steps with the frozen base held in bf16 against 4 bits
(nf4, rwkvc's int4), on the same model and the same batch. Each mode runs in its own process: load the
base (matrices as the mode says), one warm-up step, then the peak-RSS counter is reset
(/proc/self/clear_refs 5) and `--steps` training steps run (forward, backward, Adam on the state; bf16
autocast in every mode, so only the base's storage differs). Reported per mode: bytes of the frozen
matrices, RSS after setup, peak RSS while training (VmHWM after the reset), peak RSS of the setup
(loading and quantising the checkpoint, the warm-up step), seconds per step. Models: `demo` (the KJV
demo's shape, L4 C128 V65536, random weights), `0.1b` (L12 C768 V65536, RWKV-7 0.1B's shape, random
weights) or a checkpoint path. Memory does not depend on the weights' values.

task: the demo model taught a fixed answer format by a tuned state. Documents are KJV verses followed
by a newline and a fixed answer (--answer, default "And he answered, Amen."). Training verses come from
the training books, held-out ones from the demo's held-out books (Ruth, Ecclesiastes, Jonah,
Philippians), which neither the base nor the state saw. Reported, for the base and the tuned state (and
the state tuned on a 4-bit base, evaluated on the unquantised base): held-out NLL per token of whole
documents and of the answer's fixed tokens, how often greedy decoding after a held-out verse and its
newline writes exactly those tokens, and the base file's sha256 before and after.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {"demo": dict(n_layer=4, n_embd=128, head_size=64, vocab_size=65536),
          "0.1b": dict(n_layer=12, n_embd=768, head_size=64, vocab_size=65536)}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(args) -> dict:
    """One mode, in this process: setup, a warm-up step, reset the peak, `steps` timed steps."""
    import torch
    from rwkvc.training.model import select_wkv
    from rwkvc.training.state_model import StateModel, load_base
    torch.manual_seed(0)
    rss0 = _status("VmRSS")
    t0 = time.time()
    base = load_base(args.ckpt, args.mode, 64)
    sm = StateModel(base, None, *select_wkv("chunked", torch.device("cpu"), 32, torch.bfloat16)[1:],
                    grad_cp=bool(args.grad_cp))
    opt = torch.optim.Adam([sm.state], lr=1e-2)
    setup_s = time.time() - t0
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, base.vocab_size, (args.bsz, args.ctx + 1), generator=g)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = -sm.logprobs(x[:, :-1], x[:, 1:]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    step()                                                      # warm-up: allocator pools, kernels
    import gc
    gc.collect()
    rss_setup = _status("VmRSS")
    peak_setup = _status("VmHWM")                               # loading, quantising, the warm-up step
    Path("/proc/self/clear_refs").write_text("5")               # reset VmHWM (and ru_maxrss) to the current RSS
    t1 = time.time()
    for _ in range(args.steps):
        step()
    step_s = (time.time() - t1) / args.steps
    return {"mode": args.mode, "frozen_matrix_bytes": base.report["frozen_matrix_bytes"],
            "peak_rss_setup": peak_setup,
            "other_param_bytes": base.report["other_param_bytes"], "rss_before_load": rss0,
            "rss_after_setup": rss_setup, "peak_rss_training": _status("VmHWM"), "s_per_step": round(step_s, 2),
            "setup_s": round(setup_s, 1), "threads": torch.get_num_threads()}


def make_random(model: str, workdir: Path) -> str:
    from rwkvc.testing import random_v7_state_dict
    import torch
    p = workdir / f"random-{model}.pth"
    if not p.exists():
        torch.save(random_v7_state_dict(**MODELS[model], dtype="bf16", seed=0), p)
    return str(p)


def memory(a) -> list[dict]:
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="bench-state-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = make_random(a.model, workdir) if a.model in MODELS else a.model
    rows = []
    for mode in a.modes.split(","):
        cmd = [sys.executable, __file__, "_child", "--ckpt", ckpt, "--mode", mode, "--steps", str(a.steps),
               "--ctx", str(a.ctx), "--bsz", str(a.bsz), "--grad_cp", str(a.grad_cp)]
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)} if a.threads else None
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode:
            raise RuntimeError(f"{mode}: {r.stderr[-3000:]}")
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    mb = lambda b: f"{b / 2**20:8.1f}"  # noqa: E731
    print(f"model {a.model} ({ckpt}), ctx {a.ctx} x batch {a.bsz}, bf16 autocast, {a.steps} steps, "
          f"grad_cp {a.grad_cp}")
    print(f"{'base':<6} {'matrices MiB':>12} {'RSS setup MiB':>14} {'peak train MiB':>15} "
          f"{'peak setup MiB':>15} {'s/step':>7}")
    for r in rows:
        print(f"{r['mode']:<6} {mb(r['frozen_matrix_bytes']):>12} {mb(r['rss_after_setup']):>14} "
              f"{mb(r['peak_rss_training']):>15} {mb(r['peak_rss_setup']):>15} {r['s_per_step']:>7}")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "ctx": a.ctx, "bsz": a.bsz, "rows": rows}, indent=1))
    return rows


# ------------------------------------------------------------------------------------------------
# task: a fixed answer format on the demo model

def verse_docs():
    from rwkvc.training.demo import HELD_OUT, bible_text, chapters
    train, val = [], []
    for book, num, text in chapters(bible_text()):
        for line in text.splitlines()[2:]:
            m = re.match(r"(\d+) (.+)", line)
            if m:
                (val if book in HELD_OUT else train).append((m.group(2), f"{book} {num}:{m.group(1)}"))
    return train, val


def task(a) -> dict:
    import numpy as np
    import torch
    from rwkvc.tokenizer import WorldTokenizer
    from rwkvc.binidx import write_binidx
    from rwkvc.training.state_model import StateModel, load_base
    from rwkvc.training.state_tune import train_states
    tok = WorldTokenizer()
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="bench-state-task-"))
    workdir.mkdir(parents=True, exist_ok=True)
    train, val = verse_docs()
    rng = np.random.default_rng(0)
    train = [train[i] for i in rng.permutation(len(train))[:a.n_train]]
    val = [val[i] for i in rng.permutation(len(val))[:a.n_val]]

    fixed = a.answer.split("{ref}")[0]                          # the part every answer starts with
    fixed_ids = tok.encode(fixed)

    def doc(v):
        head = tok.encode(v[0] + "\n")
        return head, head + tok.encode(a.answer.format(ref=v[1])) + [0]
    n_fmt = len(fixed_ids)
    write_binidx(workdir / "task", [doc(v)[1] for v in train])
    write_binidx(workdir / "task-val", [doc(v)[1] for v in val])
    sha0 = hashlib.sha256(Path(a.base).read_bytes()).hexdigest()
    common = dict(load_model=a.base, data_file=str(workdir / "task"), val_file=str(workdir / "task-val"),
                  ctx_len=128, micro_bsz=8, lr_init=a.lr, lr_final=a.lr / 10, warmup_steps=10,
                  epoch_steps=a.steps, epoch_count=1, accelerator="cpu", random_seed=0, threads=a.threads,
                  enable_progress_bar=0)
    runs = {"fp32": train_states({**common, "proj_dir": str(workdir / "st-fp32")})}
    if a.quant_type:
        runs[a.quant_type] = train_states({**common, "proj_dir": str(workdir / f"st-{a.quant_type}"),
                                           "quant": 1, "quant_type": a.quant_type, "precision": "bf16"})
    base = load_base(a.base, "fp32")
    res = {"base": a.base, "steps": a.steps, "lr": a.lr, "train_docs": len(train), "val_docs": len(val),
           "answer": a.answer}
    states = {"base (zero state)": None}
    for name, p in runs.items():
        sd = torch.load(p, weights_only=True)
        states[f"state tuned on {name} base"] = torch.stack([sd[f"blocks.{i}.att.time_state"]
                                                             for i in range(base.n_layer)])
    for name, S in states.items():
        sm = StateModel(base, S)
        nll = cnt = fnll = fcnt = hits = 0.0
        with torch.no_grad():
            for v in val:
                head, full = doc(v)
                x, y = torch.tensor(full[:-1])[None], torch.tensor(full[1:])[None]
                lp = sm.logprobs(x, y)[0]
                nll, cnt = nll - float(lp.sum()), cnt + len(lp)
                f = lp[len(head) - 1:len(head) - 1 + n_fmt]     # the "Reference:" tokens
                fnll, fcnt = fnll - float(f.sum()), fcnt + len(f)
                ids = list(head)
                for _ in range(n_fmt):                             # greedy continuation after verse + "\n"
                    ids.append(int(sm.logits(torch.tensor(ids)[None])[0, -1].argmax()))
                hits += ids[len(head):] == fixed_ids
        res[name] = {"val_nll_per_token": nll / cnt, "format_nll_per_token": fnll / fcnt,
                     "greedy_writes_format": hits / len(val)}
        print(f"{name:<32} held-out NLL/token {nll / cnt:.3f}  answer-format NLL/token {fnll / fcnt:.3f}  "
              f"greedy writes the format {hits / len(val):.0%}")
    res["base_sha256_before"] = sha0
    res["base_sha256_after"] = hashlib.sha256(Path(a.base).read_bytes()).hexdigest()
    print(f"base file sha256 {sha0[:16]}... before, {res['base_sha256_after'][:16]}... after")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("memory", help="peak training memory, bf16 vs 4-bit frozen base")
    m.add_argument("--model", default="demo", help="demo | 0.1b | a checkpoint path")
    m.add_argument("--modes", default="bf16,nf4,int4")
    m.add_argument("--steps", type=int, default=3)
    m.add_argument("--ctx", type=int, default=256)
    m.add_argument("--bsz", type=int, default=2)
    m.add_argument("--grad_cp", type=int, default=0)
    m.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the children (0 = default)")
    m.add_argument("--workdir", default=None)
    m.add_argument("--json", default=None)
    c = sub.add_parser("_child")
    for k, t in (("--ckpt", str), ("--mode", str), ("--steps", int), ("--ctx", int), ("--bsz", int), ("--grad_cp", int)):
        c.add_argument(k, type=t, required=True)
    t = sub.add_parser("task", help="a fixed answer format taught to the demo model by a tuned state")
    t.add_argument("--base", required=True, help="the demo checkpoint (python training/demo.py prints its path)")
    t.add_argument("--steps", type=int, default=150)
    t.add_argument("--lr", type=float, default=0.05)
    t.add_argument("--n_train", type=int, default=2000)
    t.add_argument("--n_val", type=int, default=100)
    t.add_argument("--answer", default="And he answered, Amen.",
                   help="what follows every verse and a newline ({ref} = its reference, e.g. 'Reference: {ref}')")
    t.add_argument("--quant_type", default="nf4", help="also tune on a 4-bit base ('' = skip)")
    t.add_argument("--threads", type=int, default=0)
    t.add_argument("--workdir", default=None)
    t.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.cmd == "_child":
        print(json.dumps(child(a)))
    elif a.cmd == "memory":
        memory(a)
    else:
        task(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
