"""State tuning (issue 7): a tuned initial state on a frozen (optionally 4-bit) base, ORPO, merging, and
the state compiled into artifacts. CPU only; about 2.5 minutes on 2 cores (70 s of it the demo-model test).

The fixture trains a small RWKV-7 (L2 C64, vocabulary 512) with the training module on a synthetic
language: Markov-chain "words", and question/answer documents `M_k Q words A <answer> 0` whose answer is
one of six fixed 4-word formats, picked at random and announced by the mark M_k before the question.
The narrow task is "always answer in format 1" on questions with no mark: the base never saw one and
cannot know which format they want (6.5 nats on the first answer word); a tuned state, playing the
mark's part, can. (Without marks, questions in random formats, the base has no use for what precedes a
question, and a state cannot steer it much: trained on every window, such a base took the first answer
word only from 2.1 to 0.5 nats.) What is checked:

- the tuned state raises the held-out task likelihood (whole documents by >= 0.3 nats/token; the first
  answer word to > 0.8 probability), with the base weights bit-identical (file and memory);
- the same with the base held in nf4 and in rwkvc's int4, whose matrices take < 35% of bf16's bytes;
- on the cached KJV demo model (skipped when it is not there): a state tuned to answer verses with a fixed
  sentence lowers held-out verses' NLL by >= 0.2 nats/token, the base file bit-identical;
- state-tuning settings in --config files, and the settings it ignores named in one line;
- 4-bit weight math and the chunked head loss against plain references (values and gradients);
- one tuned state, the same logits (<= 1e-4 * max(1, max |logit|)) from: the merged checkpoint in the
  official `rwkv` package (v6: its own time_state support; v7: it has none, the state is passed in),
  the `cpu` artifact compiled with --state, the `rpi5` artifact (Python API and the native runner on
  its own), rwkvc's reference model, and Model.use_state swapping it into a plain artifact;
- ORPO: a CSV prepared into pairs, preference accuracy on held-out pairs from <= 0.8 to >= 0.9;
- state files whose shapes do not fit are refused, naming the layer and both shapes.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import rwkvc
from rwkvc import ir
from rwkvc.errors import RwkvcError
from rwkvc.states import KEY, state_for_model

ROOT = Path(__file__).resolve().parents[1]
from rwkvc import binidx
from rwkvc.training import frozen, state_args, state_model, state_tune
from rwkvc.training.config import TrainArgs
from rwkvc.training.merge_state import merge_state
from rwkvc.training.orpo import orpo_loss
from rwkvc.training.prepare_orpo import prepare
from rwkvc.training.trainer import train

from helpers import official_rwkv

V, Q, A = 512, 300, 301
STYLES = [[20 + 10 * k + j for j in range(4)] for k in range(6)]   # six fixed answer formats of 4 words
MARK = 400   # MARK + k before a question: "answer in format k" (the base's general documents all have one)
TASK_STYLE = 1
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def bound(ref):
    return 1e-4 * max(1.0, float(np.abs(ref).max()))


# ------------------------------------------------------------------------------------------------
# the synthetic language

def _succ():
    return np.random.default_rng(0).integers(10, 210, (210, 4))


def _words(rng, succ, n):
    w = [int(rng.integers(10, 210))]
    for _ in range(n - 1):
        w.append(int(succ[w[-1], rng.choice(4, p=[.5, .25, .15, .1])]))
    return w


def _qa(rng, succ, style, marked=False):
    return [MARK + style] * marked + [Q] + _words(rng, succ, int(rng.integers(5, 12))) + [A] + STYLES[style] + [0]


def general_docs(n, seed):
    """What the base learns from: Markov text, and questions marked with the format their answer takes."""
    rng, succ = np.random.default_rng(seed), _succ()
    return [_words(rng, succ, int(rng.integers(20, 60))) + [0] if rng.random() < 0.5
            else _qa(rng, succ, int(rng.integers(0, len(STYLES))), marked=True) for _ in range(n)]


def task_docs(n, seed, style=TASK_STYLE):
    """The narrow task: unmarked questions, always answered in `style` (the tuned state plays the mark)."""
    rng, succ = np.random.default_rng(seed), _succ()
    return [_qa(rng, succ, style) for _ in range(n)]


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tune_args(d: Path, base: str, name: str, steps: int, **kw) -> dict:
    return dict(load_model=base, data_file=str(d / "task"), val_file=str(d / "task-val"), proj_dir=str(d / name),
                ctx_len=64, micro_bsz=16, lr_init=0.3, lr_final=0.03, warmup_steps=5, epoch_steps=steps,
                epoch_count=1, accelerator="cpu", random_seed=0, enable_progress_bar=0, **kw)


def metrics(proj) -> dict:
    lines = [json.loads(x) for x in (Path(proj) / "metrics.jsonl").read_text().splitlines()]
    return {"baseline": next(x for x in lines if x.get("event") == "baseline"),
            "done": next(x for x in lines if x.get("event") == "done"), "lines": lines}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is as fast, and immune to a busy machine's descheduled OpenMP workers."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def task(tmp_path_factory, one_thread):
    d = tmp_path_factory.mktemp("state")
    binidx.write_binidx(d / "gen", general_docs(1500, 1))
    binidx.write_binidx(d / "task", task_docs(400, 2))
    binidx.write_binidx(d / "task-val", task_docs(50, 3))
    base = train(TrainArgs(data_file=str(d / "gen"), proj_dir=str(d / "base"), n_layer=2, n_embd=64, head_size_a=32,
                           vocab_size=V, ctx_len=64, micro_bsz=16, lr_init=3e-3, lr_final=1e-3, warmup_steps=5,
                           epoch_steps=200, epoch_count=1, epoch_save=0, accelerator="cpu", random_seed=0,
                           enable_progress_bar=0, wkv="chunked", chunk_len=16), log=lambda *a: None)
    base_sha = sha256(base)
    state = state_tune.train_states(tune_args(d, str(base), "tuned", 150), log=lambda *a: None)
    return dict(d=d, base=str(base), base_sha=base_sha, state=str(state))


def first_answer_nll(base_path, state_file, storage="fp32") -> tuple[float, float]:
    """Mean NLL of the first answer word on held-out task documents: (base, tuned)."""
    base = state_model.load_base(base_path, storage)
    sd = torch.load(state_file, weights_only=True)
    S = torch.stack([sd[KEY.format(i)] for i in range(base.n_layer)])
    docs = task_docs(50, 3)
    out = []
    for init in (None, S):
        sm = state_model.StateModel(base, init)
        nll = []
        for doc in docs:
            x, y = torch.tensor(doc[:-1])[None], torch.tensor(doc[1:])[None]
            with torch.no_grad():
                nll.append(-float(sm.logprobs(x, y)[0, doc.index(A)]))   # the target after A
        out.append(float(np.mean(nll)))
    return out[0], out[1]


# ------------------------------------------------------------------------------------------------
# what state tuning must show

def test_tuned_state_raises_task_likelihood_base_bit_identical(task):
    m = metrics(Path(task["d"]) / "tuned")
    before, after = m["baseline"]["val_loss"], m["done"]["val_loss"]
    assert before - after >= 0.3, f"held-out task loss {before:.3f} -> {after:.3f} nats/token"
    nll0, nll1 = first_answer_nll(task["base"], task["state"])
    assert nll0 > 1.5 and nll1 < 0.2, f"first answer word NLL {nll0:.3f} -> {nll1:.3f}"
    # base weights: the file is never written, the frozen tensors in memory hash the same after training
    assert sha256(task["base"]) == task["base_sha"]
    assert m["done"]["base_unchanged"] and m["done"]["base_digest"] == m["baseline"]["base_digest"]
    # the checkpoint holds only the states
    sd = torch.load(task["state"], weights_only=True)
    assert sorted(sd) == [KEY.format(i) for i in range(2)]
    assert all(v.shape == (2, 32, 32) and v.dtype == torch.float32 for v in sd.values())


@pytest.mark.parametrize("qtype", ["nf4", "int4"])
def test_state_tuning_on_4bit_base(task, qtype):
    d = Path(task["d"])
    state = state_tune.train_states(tune_args(d, task["base"], f"tuned-{qtype}", 50, quant=1, quant_type=qtype),
                            log=lambda *a: None)
    m = metrics(d / f"tuned-{qtype}")
    rep = m["baseline"]
    assert rep["storage"] == qtype and rep["frozen_matrix_bytes"] < 0.35 * rep["bf16_matrix_bytes"]
    assert m["baseline"]["val_loss"] - m["done"]["val_loss"] >= 0.3
    assert m["done"]["base_unchanged"] and sha256(task["base"]) == task["base_sha"]
    # a state tuned on the 4-bit base carries over to the full-precision base it will be deployed on
    nll0, nll1 = first_answer_nll(task["base"], state, "fp32")
    assert nll0 > 1.5 and nll1 < 0.25, f"on the fp32 base: first answer word NLL {nll0:.3f} -> {nll1:.3f}"


def test_resume_equals_uninterrupted(task, tmp_path):
    d = Path(task["d"])
    kw = dict(epoch_steps=3, epoch_count=2, micro_bsz=4)
    a = state_tune.train_states({**tune_args(d, task["base"], "x", 3), **kw, "proj_dir": str(tmp_path / "a")},
                        log=lambda *a: None)
    b_dir = tmp_path / "b"
    state_tune.train_states({**tune_args(d, task["base"], "x", 3), **kw, "proj_dir": str(b_dir)}, log=lambda *a: None)
    for f in b_dir.glob("rwkv-final*"):      # as if killed after epoch 0's checkpoint
        f.unlink()
    out = []
    b = state_tune.train_states({**tune_args(d, task["base"], "x", 3), **kw, "proj_dir": str(b_dir)}, log=out.append)
    assert any("resumed from" in line and "step 3" in line for line in out)
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


DEMO_ANSWER = "And he answered, Amen."
DEMO_MARGIN = 0.2   # nats/token the tuned state must take off the held-out documents' NLL on the demo model


@pytest.mark.slow
def test_demo_model_tuned_state_raises_held_out_likelihood(tmp_path):
    """The KJV demo model (python training/demo.py; skipped when it is not cached), taught to answer every
    verse with a newline and DEMO_ANSWER: on 50 verses of the held-out books (which neither the base nor the
    state saw), the whole documents' NLL falls by >= DEMO_MARGIN nats/token and the answer's by >= 1;
    the base file is bit-identical before and after. ~2 minutes on one core."""
    import re
    import shutil
    from rwkvc.tokenizer import WorldTokenizer
    from rwkvc.cache import cache_root
    from rwkvc.training.demo import HELD_OUT, bible_text, chapters
    base = cache_root() / "demo" / "model" / "rwkv-final.pth"
    if not (base.is_file() and (cache_root() / "demo" / "report.json").is_file()) or shutil.which("bible") is None:
        pytest.skip("needs the cached demo model (python training/demo.py) and bible-kjv")
    tok = WorldTokenizer()
    train_v, val_v = [], []
    for book, _, text in chapters(bible_text()):
        for line in text.splitlines()[2:]:
            m = re.match(r"\d+ (.+)", line)
            if m:
                (val_v if book in HELD_OUT else train_v).append(m.group(1))
    rng = np.random.default_rng(0)
    answer = tok.encode(DEMO_ANSWER)

    def docs(verses, n):
        return [tok.encode(verses[i] + "\n") + answer + [0] for i in rng.permutation(len(verses))[:n]]
    binidx.write_binidx(tmp_path / "task", docs(train_v, 800))
    val = docs(val_v, 50)
    binidx.write_binidx(tmp_path / "task-val", val)
    sha0 = sha256(base)
    state = state_tune.train_states(dict(load_model=str(base), data_file=str(tmp_path / "task"),
                                 val_file=str(tmp_path / "task-val"), proj_dir=str(tmp_path / "st"), ctx_len=128,
                                 micro_bsz=8, lr_init=0.3, lr_final=0.03, warmup_steps=10, epoch_steps=100,
                                 epoch_count=1, accelerator="cpu", random_seed=0, enable_progress_bar=0),
                            log=lambda *a: None)
    m = metrics(tmp_path / "st")
    before, after = m["baseline"]["val_loss"], m["done"]["val_loss"]
    # the answer's tokens alone, zero state against the tuned one
    b = state_model.load_base(str(base))
    sd = torch.load(state, weights_only=True)
    S = torch.stack([sd[KEY.format(i)] for i in range(b.n_layer)])
    ans = []
    for init in (None, S):
        sm, nll = state_model.StateModel(b, init), []
        with torch.no_grad():
            for doc in val:
                lp = sm.logprobs(torch.tensor(doc[:-1])[None], torch.tensor(doc[1:])[None])[0]
                nll.append(-float(lp[len(doc) - 2 - len(answer):len(doc) - 2].mean()))
        ans.append(float(np.mean(nll)))
    print(f"\ndemo model, 50 held-out verses: NLL/token {before:.3f} -> {after:.3f}, "
          f"answer tokens {ans[0]:.3f} -> {ans[1]:.3f}")
    assert before - after >= DEMO_MARGIN, f"held-out NLL {before:.3f} -> {after:.3f} nats/token"
    assert ans[0] - ans[1] >= 1.0, f"answer NLL {ans[0]:.3f} -> {ans[1]:.3f} nats/token"
    assert sha256(base) == sha0 and m["done"]["base_unchanged"]


# ------------------------------------------------------------------------------------------------
# pieces

def test_4bit_weight_math():
    from rwkvc.weights.int4 import dequantize_int4, pack_int4, quantize_int4
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 100, generator=g) * torch.linspace(0.1, 2, 100)     # odd shapes: padding exercised
    packed, absmax = frozen.quantize_nf4(w, 32)
    # NumPy reference: nearest NF4 level per 32-input block of each row, times the block's absmax
    wn = np.zeros((37, 128), np.float32)
    wn[:, :100] = w.numpy()
    blocks = wn.reshape(37, 4, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    lv = frozen.NF4.numpy()
    ref = lv[np.abs(blocks[..., None] / amax[..., None] - lv).argmin(-1)] * amax
    deq = frozen.dequantize_nf4(packed, absmax, 100)
    np.testing.assert_allclose(deq.numpy(), ref.reshape(37, 128)[:, :100], rtol=1e-6, atol=1e-6)
    assert packed.shape == (37, 64) and packed.dtype == torch.uint8
    # int4: rwkvc's own weight math, the same numbers as rwkvc/weights/int4.py
    pk, sc, zr = frozen.quantize_int4_torch(w, 32)
    codes, scales, zeros = quantize_int4(w.numpy(), 32)
    np.testing.assert_array_equal(pk.numpy(), pack_int4(codes))
    np.testing.assert_allclose(frozen.dequantize_int4_torch(pk, sc, zr, 100).numpy(),
                               dequantize_int4(codes, scales, zeros, 32, 100), rtol=0, atol=1e-6)
    for fmt, tol in (("nf4", 0.12), ("int4", 0.1)):
        m = frozen.FrozenMatrix(w, fmt, 32)
        err = (m.dense() - w).abs().max() / w.abs().max()
        assert err < tol, f"{fmt}: max error {err:.3f} of max |w|"
        np.testing.assert_array_equal(m.rows(5, 9).numpy(), m.dense()[5:9].numpy())
        np.testing.assert_array_equal(m.take(torch.tensor([3, 0, 36])).numpy(), m.dense()[[3, 0, 36]].numpy())


def test_frozen_head_and_matmul_gradients():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(300, 16, generator=g)
    head = frozen.FrozenLinear(frozen.FrozenMatrix(W, "fp32"))
    x = torch.randn(2, 5, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 300, (2, 5), generator=g)
    lp = frozen.head_logprobs(x, head, t, tok_chunk=3, voc_chunk=64)        # several token and vocabulary chunks
    ref = torch.log_softmax(x @ W.t(), -1).gather(-1, t[..., None]).squeeze(-1)
    torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-5)
    w8 = torch.randn(2, 5, generator=g)
    torch.testing.assert_close(torch.autograd.grad((lp * w8).sum(), x)[0], torch.autograd.grad((ref * w8).sum(), x)[0],
                               rtol=1e-5, atol=1e-5)
    y = head(x)
    torch.testing.assert_close(torch.autograd.grad(y.square().sum(), x)[0],
                               torch.autograd.grad((x @ W.t()).square().sum(), x)[0], rtol=1e-5, atol=1e-5)


def test_orpo_loss_math():
    logp = torch.tensor([[-0.5, -0.7, -9.0], [-2.0, -3.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    loss, nll_c, l_or, ratio, avg = orpo_loss(logp, mask, alpha=0.5)
    pc, pr = np.exp(-0.6), np.exp(-2.5)
    want_ratio = np.log(pc / (1 - pc)) - np.log(pr / (1 - pr))
    assert abs(float(ratio) - want_ratio) < 1e-5 and abs(float(nll_c) - 0.6) < 1e-6
    assert abs(float(loss) - (0.6 + 0.5 * np.log1p(np.exp(-want_ratio)))) < 1e-5


# ------------------------------------------------------------------------------------------------
# one state, the same logits everywhere

def test_v7_state_same_logits_official_cpu_rpi5(task, tmp_path):
    d = tmp_path
    merged = merge_state(task["base"], task["state"], d / "merged.pth", log=lambda *a: None)
    base_sd, m_sd = torch.load(task["base"], weights_only=True), torch.load(merged, weights_only=True)
    assert all(torch.equal(base_sd[k], m_sd[k]) for k in base_sd), "merging changed a base tensor"
    S = torch.stack([m_sd[KEY.format(i)] for i in range(2)])
    tokens = task_docs(1, 9)[0][:-1] + [A] + list(range(10, 30))
    # the official package's RWKV-7 has no time_state support: start its state from the merged tensors
    ref = official_rwkv(str(merged))
    state = ref.generate_zero_state()
    for i in range(2):
        state[3 * i + 1] = m_sd[KEY.format(i)].float().clone()
    official = []
    for t in tokens:
        out, state = ref.forward([t], state)
        official.append(out.float().numpy().copy())
    official = np.stack(official)
    # rwkvc's reference model (training's forward) with the same state
    sm = state_model.StateModel(state_model.load_base(task["base"]), S)
    own = sm.logits(torch.tensor(tokens)[None])[0].numpy()
    np.testing.assert_allclose(own, official, rtol=0, atol=bound(official))
    # cpu artifact compiled from the base with --state; step by step and as one prefill
    cpu = rwkvc.load(rwkvc.compile(task["base"], d / "cpu", target="cpu", state_path=task["state"]))
    s = None
    for i, t in enumerate(tokens):
        lg, s = cpu.forward([t], s)
        assert np.abs(lg - official[i]).max() <= bound(official[i]), f"cpu artifact, token {i}"
    lg, _ = cpu.forward(tokens)
    assert np.abs(lg - official[-1]).max() <= bound(official[-1])
    # a plain artifact: swap the state in and out at run time
    plain = rwkvc.load(rwkvc.compile(task["base"], d / "plain", target="cpu"))
    zero_logits = plain.forward(tokens)[0]
    plain.use_state(task["state"])
    assert np.abs(plain.forward(tokens)[0] - official[-1]).max() <= bound(official[-1])
    plain.use_state(str(merged))                         # a merged checkpoint is a state file too
    assert np.abs(plain.forward(tokens)[0] - official[-1]).max() <= bound(official[-1])
    plain.use_state(None)
    np.testing.assert_array_equal(plain.forward(tokens)[0], zero_logits)
    assert np.abs(zero_logits - official[-1]).max() > 100 * bound(official[-1])   # the state matters
    # rpi5 artifact: through the Python API (qemu) and its native runner on its own (no --state-in)
    from helpers import MISSING
    if MISSING:
        pytest.skip(f"rpi5 part: {MISSING}")
    pi_dir = rwkvc.compile(task["base"], d / "pi", target="rpi5", state_path=task["state"])
    lg, _ = rwkvc.load(pi_dir).forward(tokens)
    assert np.abs(lg - official[-1]).max() <= bound(official[-1]), "rpi5 artifact via the Python API"
    from rwkvc.runtimes.tvm_native import runner_command
    man = json.loads((Path(pi_dir) / "manifest.json").read_text())
    assert man["init_state_raw"] == "init_state.bin"
    cmd = runner_command(Path(pi_dir), man) + ["--artifact", str(pi_dir), "--tokens", ",".join(map(str, tokens)),
                                               "--dump-logits", str(d / "pi.bin"), "--step"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    native = np.fromfile(d / "pi.bin", np.float32).reshape(len(tokens), V)
    for i in range(len(tokens)):
        assert np.abs(native[i] - official[i]).max() <= bound(official[i]), f"native runner, token {i}"


def test_merged_v7_checkpoint_compiles(task, tmp_path):
    merged = merge_state(task["base"], task["state"], tmp_path / "merged.pth", log=lambda *a: None)
    art = rwkvc.compile(merged, tmp_path / "art", target="cpu")
    ref = rwkvc.load(rwkvc.compile(task["base"], tmp_path / "ref", target="cpu", state_path=task["state"]))
    toks = list(range(10, 40))
    np.testing.assert_array_equal(rwkvc.load(art).forward(toks)[0], ref.forward(toks)[0])


def test_v6_state_tuning_official_package_and_cpu(task, tmp_path):
    from rwkvc.testing import random_v6_state_dict, run_official_many, save_state_dict
    d = tmp_path
    base = save_state_dict(random_v6_state_dict(n_layer=2, n_embd=64, head_size=32, vocab_size=V, seed=4),
                           d / "v6.pth")
    binidx.write_binidx(d / "task", task_docs(40, 5))
    binidx.write_binidx(d / "task-val", task_docs(8, 6))
    state = state_tune.train_states(dict(tune_args(d, base, "tuned", 8), ctx_len=32, micro_bsz=4), log=lambda *a: None)
    m = metrics(d / "tuned")
    assert m["done"]["val_loss"] < m["baseline"]["val_loss"] and m["done"]["base_unchanged"]
    merged = merge_state(base, state, d / "merged.pth", log=lambda *a: None)
    tokens = list(range(10, 40))
    # the package loads time_state itself (and the base alone starts from zeros)
    official, zero = (r["steps"] for r in run_official_many([(str(merged), tokens, []), (base, tokens[:4], [])]))
    arts = {"cpu --state": rwkvc.compile(base, d / "cpu", target="cpu", state_path=str(state)),
            "merged": rwkvc.compile(merged, d / "merged", target="cpu")}
    for name, art in arts.items():
        m_ = rwkvc.load(art)
        s = None
        for i, t in enumerate(tokens):
            lg, s = m_.forward([t], s)
            assert np.abs(lg - official[i]).max() <= bound(official[i]), f"{name}: token {i}"
    assert np.abs(zero[-1] - official[3]).max() > 100 * bound(official[3])   # the state matters


# ------------------------------------------------------------------------------------------------
# ORPO

def test_prepare_orpo_csv(tmp_path):
    src = tmp_path / "pairs.csv"
    with open(src, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "chosen", "rejected", "note"])
        w.writerow(["User: hi, «quoted»\n\nAssistant:", " ANSWER: hello.", " hey", "x"])
        w.writerow(["User: 中文?\n\nAssistant:", " ANSWER: 是.", " 不", ""])
    out = prepare(src, tmp_path / "p.jsonl", target_pair_count=5, log=lambda *a: None)
    from rwkvc.tokenizer import WorldTokenizer
    tok = WorldTokenizer()
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 5
    texts = {tok.decode(r["prompt"]) for r in rows}
    assert texts == {"User: hi, «quoted»\n\nAssistant:", "User: 中文?\n\nAssistant:"}
    assert all(r["chosen"][-1] == 0 and r["reject"][-1] == 0 for r in rows)
    assert any(tok.decode(r["chosen"][:-1]) == " ANSWER: 是." for r in rows)
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,chosen\na,b\n", encoding="utf-8")
    with pytest.raises(RwkvcError, match="no 'reject' column"):
        prepare(bad, tmp_path / "x.jsonl", log=lambda *a: None)
    bad.write_bytes("prompt,chosen,reject\n\xff\xfe,a,b\n".encode("latin-1"))
    with pytest.raises(RwkvcError, match=r"bad.csv:2: not UTF-8"):
        prepare(bad, tmp_path / "x.jsonl", log=lambda *a: None)


def test_orpo_state_tuning(task, tmp_path):
    rng, succ = np.random.default_rng(7), _succ()
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for _ in range(200):
            p = [Q] + _words(rng, succ, int(rng.integers(5, 12))) + [A]
            f.write(json.dumps({"prompt": p, "chosen": STYLES[3] + [0], "reject": STYLES[4] + [0]}) + "\n")
    args = dict(load_model=task["base"], proj_dir=str(tmp_path / "orpo"), ctx_len=64, micro_bsz=8, lr_init=0.3,
                lr_final=0.03, warmup_steps=3, epoch_steps=30, epoch_count=1, accelerator="cpu", random_seed=0,
                enable_progress_bar=0, orpo=1, orpo_alpha=1.0, rlhf_train_file=str(tmp_path / "pairs.jsonl"),
                rlhf_max_corpus_len=12)
    state_tune.train_states(args, log=lambda *a: None)
    m = metrics(tmp_path / "orpo")
    b, a = m["baseline"], m["done"]
    assert b["val_pref_acc"] <= 0.8 and a["val_pref_acc"] >= 0.9, (b, a)
    assert a["val_log_odds_ratio"] > b["val_log_odds_ratio"] + 1.0 and a["val_loss"] < b["val_loss"]
    assert a["base_unchanged"]


# ------------------------------------------------------------------------------------------------
# bad input, the command line

def test_state_file_shapes_refused(task, tmp_path):
    cfg = ir.ModelConfig(version="7", n_layer=2, n_embd=64, head_size=32, vocab_size=V, ffn_dim=256)
    good = torch.load(task["state"], weights_only=True)
    cases = {
        "wrong-head-size": ({**good, KEY.format(1): torch.zeros(4, 16, 16)},
                            r"blocks\.1\.att\.time_state \(layer 1\) has shape \(4, 16, 16\), but this model "
                            r"\(L=2 H=2 N=32\) needs \(2, 32, 32\)"),
        "missing-layer": ({KEY.format(0): good[KEY.format(0)]}, r"has no blocks\.1\.att\.time_state \(layer 1 of 2\)"),
        "extra-layer": ({**good, KEY.format(2): good[KEY.format(0)]},
                        r"has blocks\.2\.att\.time_state but this model has 2 layers"),
        "nan": ({**good, KEY.format(0): good[KEY.format(0)] * float("nan")}, r"layer 0\) holds NaN"),
        "not-a-state": ({"emb.weight": torch.zeros(3, 3)}, r"no 'blocks\.N\.att\.time_state' tensors"),
    }
    for name, (sd, msg) in cases.items():
        p = tmp_path / f"{name}.pth"
        torch.save(sd, p)
        with pytest.raises(RwkvcError, match=msg):
            state_for_model(p, cfg)
    bad = tmp_path / "wrong-head-size.pth"
    with pytest.raises(RwkvcError, match=r"layer 1\) has shape \(4, 16, 16\)"):
        rwkvc.compile(task["base"], tmp_path / "never", target="cpu", state_path=str(bad))
    assert not (tmp_path / "never").exists()
    with pytest.raises(RwkvcError, match=r"layer 1\) has shape \(4, 16, 16\)"):
        merge_state(task["base"], bad, tmp_path / "m.pth", log=lambda *a: None)
    plain = rwkvc.load(rwkvc.compile(task["base"], tmp_path / "plain", target="cpu"))
    with pytest.raises(RwkvcError, match=r"layer 1\) has shape \(4, 16, 16\)"):
        plain.use_state(bad)
    with pytest.raises(RwkvcError, match="RWKV-4 has no matrix"):
        state_for_model(task["state"], ir.ModelConfig(version="4", n_layer=2, n_embd=64, head_size=64,
                                                             vocab_size=V, ffn_dim=256))


def test_state_tuning_settings_in_config_files(tmp_path):
    """Every state-tuning flag is a TrainArgs field: a --config file holds them, flags override them."""
    from rwkvc.training.config import load_config_file, parse_args
    (tmp_path / "st.toml").write_text(
        'train_type = "states"\nquant = 1\nquant_type = "int4"\nquant_group = 32\norpo = 1\norpo_alpha = 0.5\n'
        'rlhf_max_corpus_len = 12\nrlhf_train_file = "pairs.jsonl"\nsample = "windows"\nload_state = "s.pth"\n'
        'lr_init = 0.1\n', encoding="utf-8")
    a = parse_args(["--config", str(tmp_path / "st.toml"), "--quant_type", "nf4"])
    targs, sargs = state_args.split_args(a)
    assert sargs == state_args.StateArgs(train_type="states", quant=1, quant_type="nf4", quant_group=32, orpo=1,
                                 orpo_alpha=0.5, rlhf_max_corpus_len=12, rlhf_train_file="pairs.jsonl",
                                 sample="windows", load_state="s.pth")
    assert targs.lr_init == 0.1 and targs.train_type == "" and targs.quant == 0
    # StateArgs takes its defaults from TrainArgs (one definition); only train_type differs
    assert {f: getattr(state_args.StateArgs(), f) for f in state_args.STATE_FIELDS - {"train_type"}} == \
           {f: getattr(TrainArgs(), f) for f in state_args.STATE_FIELDS - {"train_type"}}
    # validation names the field, for int choices too; a state-tuning setting alone is refused
    for body, msg in (("quant = 2", r"--quant 2: must be one of 0, 1"),
                      ("quant_group = 48", r"--quant_group 48: must be one of 16, 32, 64, 128, 256"),
                      ('sample = "x"', r"--sample 'x': must be one of docs, windows"),
                      ("orpo_alpha = -1.0", r"--orpo_alpha -1.0: must be >= 0"),
                      ("quant = 1", r"--quant 1: applies only to state tuning \(add --train_type states\)")):
        (tmp_path / "bad.toml").write_text(('train_type = "states"\n' if "applies" not in msg else "") + body + "\n")
        with pytest.raises(RwkvcError, match=msg):
            parse_args(["--config", str(tmp_path / "bad.toml")])
    (tmp_path / "bad.json").write_text(json.dumps({"train_type": "states", "quant": "1"}))
    with pytest.raises(RwkvcError, match="quant must be int"):
        load_config_file(tmp_path / "bad.json")


def test_train_py_state_tuning_from_config_file(task, tmp_path, capsys):
    """train.py --config FILE with train_type = "states" in the file runs state tuning; the flags it does not
    use (DeepSpeed, several processes, the model's shape) are named in one note line, not dropped silently."""
    from rwkvc.training.train import main as train_main
    cfg = {"train_type": "states", "quant": 1, "quant_type": "int4", "load_model": task["base"],
           "data_file": str(Path(task["d"]) / "task"), "proj_dir": str(tmp_path / "cfg"), "ctx_len": 64,
           "micro_bsz": 4, "epoch_steps": 2, "epoch_count": 1, "lr_init": 0.1, "lr_final": 0.01,
           "accelerator": "cpu", "enable_progress_bar": 0, "random_seed": 0}
    (tmp_path / "st.json").write_text(json.dumps(cfg))
    assert train_main(["--config", str(tmp_path / "st.json"), "--strategy", "deepspeed_stage_2", "--devices", "2",
                       "--n_layer", "12"]) == 0
    out = capsys.readouterr().out
    assert "as int4" in out and (tmp_path / "cfg" / "rwkv-final.pth").is_file()
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert notes == ["note: state tuning runs in one process and takes the model's shape from --load_model; "
                     "ignoring --strategy deepspeed_stage_2, --n_layer 12, --devices 2"]
    saved = json.loads((tmp_path / "cfg" / "train-args.json").read_text())
    assert (saved["quant"], saved["quant_type"], saved["train_type"]) == (1, "int4", "states")


def test_command_line(task, tmp_path, capsys):
    args = ["--train_type", "states", "--load_model", task["base"], "--data_file", str(Path(task["d"]) / "task"),
            "--proj_dir", str(tmp_path / "cli"), "--ctx_len", "64", "--micro_bsz", "4", "--epoch_steps", "3",
            "--epoch_count", "1", "--lr_init", "0.1", "--lr_final", "0.01", "--accelerator", "cpu",
            "--enable_progress_bar", "0", "--random_seed", "0", "--quant", "1", "--quant_type", "int4"]
    r = subprocess.run([sys.executable, str(ROOT / "training" / "train.py")] + args, capture_output=True,
                       text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    state = tmp_path / "cli" / "rwkv-final.pth"
    assert state.is_file() and "as int4" in r.stdout
    assert state_tune.main(args) == 0 and "already finished" in capsys.readouterr().out       # rerun: nothing to do
    assert state_tune.main(args[:-1] + ["fp8"]) == 2
    assert capsys.readouterr().err.strip() == "error: --quant_type 'fp8': must be one of nf4, int4"
    assert state_tune.main(args[:-4] + ["--orpo", "1"]) == 2
    assert "--orpo 1 needs --rlhf_train_file" in capsys.readouterr().err
    from rwkvc.training.merge_state import main as merge_main
    assert merge_main([task["base"], str(state), str(tmp_path / "m.pth")]) == 0
    assert merge_main([task["base"], str(state), str(tmp_path / "m.pth")]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    # rwkvc compile --state / rwkvc run --state: the same greedy text from the baked-in and the swapped state
    cli = [sys.executable, "-m", "rwkvc.cli"]
    r = subprocess.run(cli + ["compile", task["base"], "--state", str(state), "-o", str(tmp_path / "baked"), "-q"],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    gen = ["--prompt", "a b c\nq", "-n", "8", "--temperature", "0"]
    baked = subprocess.run(cli + ["run", str(tmp_path / "baked")] + gen, capture_output=True, text=True, env=ENV)
    plain = rwkvc.compile(task["base"], tmp_path / "plain", target="cpu")
    swapped = subprocess.run(cli + ["run", str(plain), "--state", str(state)] + gen, capture_output=True, text=True,
                             env=ENV)
    assert baked.returncode == 0 and swapped.returncode == 0 and baked.stdout == swapped.stdout, (baked, swapped)
    torch.save({KEY.format(0): torch.zeros(2, 32, 32)}, tmp_path / "short.pth")
    bad = subprocess.run(cli + ["run", str(plain), "--state", str(tmp_path / "short.pth")] + gen,
                         capture_output=True, text=True, env=ENV)
    assert bad.returncode == 2 and "has no blocks.1.att.time_state (layer 1 of 2)" in bad.stderr
