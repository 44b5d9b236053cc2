"""GRPO (training/grpo.py): the objective by hand, a tiny RWKV-7 and a tiny RWKV-7 hybrid learning a
verifiable task, resume, and one-line errors. CPU, one thread; ~35 s on 2 cores.

The tiny policies (L2 C64, a 25-character vocabulary; RWKV-7 with RWKV-LM's initialisation, the hybrid
with Hybrid.init_weights) are taught "after `xD=` answer the digit D": 50 training prompts (prefixes
a..e), 50 held-out ones (prefixes f..j, never trained on), a reward from a user file (`rw.py:first`: the
completion's first character is the answer).
"""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from rwkvc.errors import RwkvcError
from rwkvc.reference import hybrid
from rwkvc.reference.v7 import RWKV7, V7Config, config_from_state_dict
from rwkvc.training import grpo
from rwkvc.training.grpo import train_grpo
from rwkvc.training.grpo_args import GrpoArgs
from rwkvc.training.grpo_objective import group_advantages, grpo_loss
from rwkvc.training.grpo_policy import make_policy, prompt_states, sample_groups
from rwkvc.training.model import init_rwkv_lm
from rwkvc.training.rewards import parse_reward


class CharTok:
    """A character tokenizer: id 0 is end-of-text."""
    chars = "\0" + "0123456789=+ \nabcdefghij"
    eod_id = 0
    vocab_size = len(chars)

    def encode(self, text):
        return [self.chars.index(c) for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids if i)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo")
    cfg = V7Config(n_layer=2, n_embd=64, head_size=32, vocab_size=CharTok.vocab_size, **V7Config.default_dims(64))
    torch.save(init_rwkv_lm(RWKV7(cfg), 0).state_dict(), d / "base.pth")
    hcfg = hybrid.HybridConfig(n_layer=2, n_embd=64, head_size=32, vocab_size=CharTok.vocab_size, ffn_dim=128,
                               dim_w=32, dim_a=32, dim_v=32, dim_g=32)
    hybrid.Hybrid(hcfg).init_weights(0).save(d / "hybrid")          # config.json + model.safetensors
    for name, prefixes in (("train.jsonl", "abcde"), ("heldout.jsonl", "fghij")):
        (d / name).write_text("".join(json.dumps({"prompt": f"{p}{a}=", "answer": a}) + "\n"
                                      for a in "0123456789" for p in prefixes))
    (d / "rw.py").write_text("def first(prompt, completion, answer):\n    return float(completion[:1] == str(answer))\n")
    return d


def args_for(d, out, **kw) -> GrpoArgs:
    base = dict(load_model=str(d / "base.pth"), prompts=str(d / "train.jsonl"), reward=f"{d}/rw.py:first",
                proj_dir=str(out), group_size=8, prompts_per_step=8, micro_bsz=8, max_new_tokens=3, stop="\\n",
                lr_init=1e-2, lr_final=1e-2, kl_beta=0.04, grpo_iterations=2, random_seed=0, threads=1,
                enable_progress_bar=0)
    return GrpoArgs(**{**base, **kw})


def metrics(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------
# the objective by hand

def test_objective_by_hand():
    # one group of four: rewards 1, 0, 0, 1 -> mean 0.5, sample std sqrt(1/3)
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    s = math.sqrt(1 / 3) + 1e-4
    assert torch.allclose(adv, torch.tensor([[0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s]]), atol=1e-6)
    assert torch.equal(group_advantages(torch.tensor([[2.0, 2.0]])), torch.zeros(1, 2))   # no signal, no push

    # two completions: A = +1 (two tokens, the second padding) and A = -1 (two tokens)
    old = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    logp = torch.log(torch.tensor([[0.8, 0.9], [0.3, 0.5]]))     # ratios 1.6 (clipped to 1.2), -, 0.6 (to 0.8), 1.0
    ref = torch.log(torch.tensor([[0.4, 0.9], [0.3, 0.25]]))
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    A = torch.tensor([1.0, -1.0])
    beta = 0.1
    k3 = lambda p, r: r / p - math.log(r / p) - 1                # noqa: E731  exp(ref - logp) - (ref - logp) - 1
    # token losses: -min(r A, clip(r) A) + beta k3
    t00 = -min(1.6, 1.2) + beta * k3(0.8, 0.4)                   # A > 0: the clipped ratio counts
    t10 = -min(-0.6, -0.8) + beta * k3(0.3, 0.3)                 # A < 0: min(-0.6, -0.8) = -0.8; k3 = 0
    t11 = -min(-1.0, -1.0) + beta * k3(0.5, 0.25)
    loss, st = grpo_loss(logp, old, ref, A, mask, clip_eps=0.2, kl_beta=beta, agg="seq")
    assert loss.item() == pytest.approx((t00 + (t10 + t11) / 2) / 2, abs=1e-6)
    loss, _ = grpo_loss(logp, old, ref, A, mask, clip_eps=0.2, kl_beta=beta, agg="token")
    assert loss.item() == pytest.approx((t00 + t10 + t11) / 3, abs=1e-6)
    assert st["tokens"] == 3 and st["clipped"] == 2               # tokens 00 and 10 hit the clip
    assert st["kl_sum"] == pytest.approx(k3(0.8, 0.4) + k3(0.5, 0.25), abs=1e-6)
    # the clipped tokens carry no gradient; the others do
    lp = logp.clone().requires_grad_(True)
    grpo_loss(lp, old, None, A, mask, clip_eps=0.2, kl_beta=0.0)[0].backward()
    assert lp.grad[0, 0] == 0 and lp.grad[1, 0] == 0 and lp.grad[0, 1] == 0
    assert lp.grad[1, 1].item() == pytest.approx(1.0 * 1.0 / 2 / 2)   # -d(r A)/dlogp = r = 1, / 2 tokens / 2 rows
    # micro-batches with the batch's normaliser sum to the batch loss (gradient accumulation)
    whole, _ = grpo_loss(logp, old, ref, A, mask, clip_eps=0.2, kl_beta=beta, agg="token")
    parts = sum(grpo_loss(logp[i:i + 1], old[i:i + 1], ref[i:i + 1], A[i:i + 1], mask[i:i + 1], clip_eps=0.2,
                          kl_beta=beta, agg="token", norm=3.0)[0] for i in range(2))
    assert parts.item() == pytest.approx(whole.item(), abs=1e-6)


def test_group_shares_one_prompt_state(task):
    """Sampling reads each prompt once and copies its state: the copies' first logits equal a prompt read
    on its own, and greedy completions of a group are identical."""
    sd = torch.load(task / "base.pth", weights_only=True)
    model = RWKV7(config_from_state_dict(sd))
    model.load_state_dict(sd)
    pol = make_policy(model)
    prompts = [[11, 1, 11], [12, 2, 11], [13, 3, 4, 11]]          # two lengths: read as two batches
    with torch.no_grad():
        last, _ = prompt_states(pol, prompts, 3)
        for i, p in enumerate(prompts):
            alone, _ = model(torch.tensor([p]))
            for g in range(3):
                assert torch.allclose(last[3 * i + g], alone[0, -1], atol=1e-5, rtol=1e-5)
    comps = sample_groups(pol, prompts, 4, CharTok(), temperature=0.0, top_p=1.0, max_new_tokens=4, stops=("\n",),
                          gen=None)
    assert len(comps) == 12 and all(comps[4 * i].tokens == comps[4 * i + g].tokens for i in range(3) for g in range(4))


# ------------------------------------------------------------------------------------------------
# learning, resume

@pytest.mark.parametrize("family", ["rwkv7", "hybrid"])
def test_tiny_policy_learns(task, tmp_path, family):
    out = tmp_path / "run"
    base = task / ("base.pth" if family == "rwkv7" else "hybrid")
    final = train_grpo(args_for(task, out, load_model=str(base), steps=20, eval_prompts=str(task / "heldout.jsonl")),
                       log=lambda *a: None, tokenizer=CharTok())
    rows = metrics(out)
    steps = [r for r in rows if "reward" in r]
    evals = [r for r in rows if r.get("event") == "eval"]
    first, last = (sum(r["reward"] for r in steps[s]) / 5 for s in (slice(0, 5), slice(-5, None)))
    # seeds 0..3 measured, rwkv7: first 0.05..0.08, last 0.29..0.36, held out 0.0 -> 0.40..0.68;
    # seeds 0..2, hybrid: first 0.06, last 0.25..0.27, held out 0.06 -> 0.44..0.50
    assert first < 0.15 and last > first + 0.15, (first, last)
    assert evals[0]["eval_reward"] < 0.15 and evals[-1]["eval_reward"] >= 0.3, evals   # held-out prefixes
    assert all(r["kl"] >= 0 for r in steps) and steps[-1]["kl"] > 0
    # the checkpoint is the family's official format, read back by the reader `rwkvc compile` uses
    if family == "rwkv7":
        sd = torch.load(final, weights_only=True)
        assert set(sd) == set(torch.load(base, weights_only=True))
    else:
        assert (out / "config.json").is_file()
        tuned = hybrid.load(final)                                   # rwkv-final.pth + config.json beside it
        assert set(tuned.state_dict()) == set(hybrid.load(base).state_dict())


def test_resume_matches_an_uninterrupted_run(task, tmp_path):
    kw = dict(steps=4, save_every=2, micro_bsz=4, top_p=0.9, temperature=0.8)   # two micro-batches per update
    full, part = tmp_path / "full", tmp_path / "part"
    train_grpo(args_for(task, full, **kw), log=lambda *a: None, tokenizer=CharTok())
    part.mkdir()
    for name in ("rwkv-2.pth", "rwkv-2.train-state.pt"):   # the run as it was when stopped after step 2
        shutil.copy(full / name, part / name)
    notes = []
    train_grpo(args_for(task, part, **kw), log=notes.append, tokenizer=CharTok())
    assert any("resumed from" in n and "step 2" in n for n in notes)
    a = torch.load(full / "rwkv-final.pth", weights_only=True)
    b = torch.load(part / "rwkv-final.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["reward"] for r in metrics(full) if r.get("step", 0) > 2 and "reward" in r] == \
        [r["reward"] for r in metrics(part) if "reward" in r]


# ------------------------------------------------------------------------------------------------
# errors: one line, before any work

@pytest.mark.parametrize("content,words", [
    (None, ["not found"]),
    ("", ["holds no prompts"]),
    ('{"prompt": "a1=", "answer": "1"}\n{"prompt": "b2=", \n', ["line 2", "not JSON"]),
    ('{"question": "a1="}\n', ["line 1", '"prompt"']),
    ('{"prompt": "a1="}\n', ["line 1", "answer"]),
])
def test_bad_prompts_file(task, tmp_path, capsys, content, words):
    p = tmp_path / "p.jsonl"
    if content is not None:
        p.write_text(content)
    rc = grpo.main(["--load_model", str(task / "base.pth"), "--prompts", str(p), "--reward", "exact",
                    "--proj_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: --prompts"), err
    assert all(w in err for w in words), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spec,words", [
    ("exactly", ["exactly", "built-in"]),
    ("no_such_module_xyz:f", ["no_such_module_xyz", "not found"]),
    ("json:no_such_fn", ["json has no no_such_fn"]),
    ("missing_file.py:f", ["missing_file.py not found"]),
    ("format=[", ["not a regular expression"]),
    ("exact+", ["empty term"]),
])
def test_bad_reward_spec(task, tmp_path, capsys, spec, words):
    rc = grpo.main(["--load_model", str(task / "base.pth"), "--prompts", str(task / "train.jsonl"),
                    "--reward", spec, "--proj_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: --reward"), err
    assert all(w in err for w in words), err


def test_settings_refused():
    for kw, words in ((dict(group_size=1), "--group_size 1: must be >= 2"),
                      (dict(strategy="deepspeed_stage_3"), "ZeRO-3 is not supported"),
                      (dict(stop="\\x"), "bad backslash escape")):
        with pytest.raises(RwkvcError, match=words):
            GrpoArgs(**kw)
    assert GrpoArgs(stop="\\n|END").stop_strings == ("\n", "END")


def test_builtin_rewards(tmp_path):
    r = parse_reward("exact+0.5*format+number")
    assert r("q", " 12 ", "12") == 1 + 0.5 + 1
    assert r("q", "12\nmore", 12) == 0 + 0 + 1
    assert parse_reward(r"format=\d{1,}")("q", "123", None) == 1.0
    (tmp_path / "bad.py").write_text("def nan(p, c, a):\n    return float('nan')\ndef two(p, c):\n    return 1\n")
    with pytest.raises(RwkvcError, match="must return a finite number"):
        parse_reward(f"{tmp_path}/bad.py:nan")("q", "1", None)
    with pytest.raises(RwkvcError, match=r"must take \(prompt, completion, answer\)"):
        parse_reward(f"{tmp_path}/bad.py:two")
