"""Distillation into an RWKV-7 hybrid (training/distill*.py) with no downloads: a tiny random Qwen2 made with
transformers from a config (grouped key/value heads) and a tiny GPT baseline (rwkvc.reference.gpt) as
teachers. The student starts from its teacher; each stage lowers its own loss; the command line writes a
hybrid that reloads and compiles."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rwkvc.errors import RwkvcError

V = 96


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one torch thread is ~10x faster than two on a shared 2-core machine (no contention)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rwkvc.reference.gpt import GPT, GPTConfig
    d = tmp_path_factory.mktemp("distill")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    Qwen2ForCausalLM(cfg).save_pretrained(d / "qwen")
    gpt = GPT(GPTConfig(n_layer=2, n_embd=64, n_head=4, vocab_size=V, block_size=64)).init_weights(0)
    torch.save(gpt.state_dict(), d / "gpt.pth")
    from rwkvc.binidx import write_binidx
    rng = np.random.default_rng(0)
    docs = [np.tile(rng.integers(1, V, 5), 24).astype(np.uint16) for _ in range(12)]
    write_binidx(d / "data", docs)
    from rwkvc.training.distill_teacher import load_teacher
    return dict(dir=d, qwen=load_teacher(str(d / "qwen")), gpt=load_teacher(str(d / "gpt.pth")))


def test_student_starts_from_its_teacher(teachers):
    from rwkvc.training.distill_teacher import repeat_heads
    q = teachers["qwen"]
    s = q.student(seed=0)
    t = q.module.model.layers[1]
    tm = s.model.layers[1].self_attn.time_mixer
    assert torch.equal(tm.receptance.weight, t.self_attn.q_proj.weight)
    assert torch.equal(tm.key.weight, repeat_heads(t.self_attn.k_proj.weight, 2, 2, 16))   # 2 kv heads -> 4
    assert torch.equal(tm.key.weight[16:32], t.self_attn.k_proj.weight[:16])
    assert torch.equal(s.model.layers[1].mlp.gate_proj.weight, t.mlp.gate_proj.weight)
    assert torch.equal(s.lm_head.weight, q.module.lm_head.weight)
    g = teachers["gpt"]
    s = g.student(seed=0)
    blk = g.module.transformer.h[0]
    assert torch.equal(s.model.layers[0].self_attn.time_mixer.value.weight, blk.attn.c_attn.weight[128:])
    assert torch.equal(s.model.layers[0].mlp.up_proj.bias, blk.mlp.c_fc.bias)
    assert s.cfg.norm == "layer_norm" and s.cfg.act == "gelu"


def _descend(wrapper, idx, tgt, steps=6, lr=3e-3):
    opt = torch.optim.Adam([p for p in wrapper.model.parameters() if p.requires_grad], lr=lr)
    wrapper.train()
    losses = []
    for _ in range(steps):
        loss = wrapper(idx, tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", ["qwen", "gpt"])
def test_each_stage_lowers_its_loss(teachers, name):
    from rwkvc.reference.v7 import wkv7_chunked
    from rwkvc.training.distill import set_trainable
    from rwkvc.training.distill_loss import AlignLoss, KDLoss, SFTLoss
    from rwkvc.training.distill_sft import SFTData
    t = teachers[name]
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(1, V, (2, 17), generator=g)
    x, y = idx[:, :-1], idx[:, 1:]
    s = t.student(seed=0)
    n1 = set_trainable(s, 1, False)
    assert n1 == sum(p.numel() for tm in s.time_mixers() for p in tm.parameters())
    before = {k: v.clone() for k, v in s.state_dict().items() if ".time_mixer." not in k}
    l1 = _descend(AlignLoss(s, t, wkv7_chunked), x, y)
    assert l1[-1] < 0.7 * l1[0], l1                                   # stage 1: per-layer alignment MSE
    assert all(torch.equal(v, s.state_dict()[k]) for k, v in before.items())   # only time-mixes moved
    set_trainable(s, 2, False)
    l2 = _descend(KDLoss(s, t, wkv7_chunked, temperature=2.0, top_k=8, ce_weight=0.5), x, y)
    assert l2[-1] < 0.9 * l2[0], l2                                   # stage 2: T^2 KL (top 8) + CE
    set_trainable(s, 3, False)
    convs = [(np.arange(1, 13) * (i + 1) % V, np.arange(12) >= 6) for i in range(4)]
    sx, sy = SFTData(convs, 16, 0).batch(0, 0, 1, 4)
    assert (sy[:, :5] == -100).all() and (sy[:, 5:11] != -100).all() and (sy[:, 11:] == -100).all()
    l3 = _descend(SFTLoss(s, None, wkv7_chunked), sx, sy)
    assert l3[-1] < 0.7 * l3[0], l3                                   # stage 3: CE on answer tokens only


def test_cli_writes_a_hybrid_that_reloads_and_compiles(teachers, capsys):
    import rwkvc
    from rwkvc.reference.hybrid import load
    from rwkvc.training.distill import main
    d = teachers["dir"]
    common = ["--data_file", str(d / "data"), "--ctx_len", "16", "--micro_bsz", "2", "--epoch_steps", "2",
              "--epoch_count", "1", "--lr_init", "1e-3", "--lr_final", "1e-3", "--enable_progress_bar", "0",
              "--random_seed", "1", "--wkv", "chunked", "--chunk_len", "16", "--threads", "1"]
    s1 = d / "s1"
    assert main(["--teacher", str(d / "qwen"), "--stage", "1", "--proj_dir", str(s1)] + common) == 0
    rows = [json.loads(line) for line in (s1 / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "align_mse" in r] == [1, 2] and rows[-1]["val_loss"] > 0
    assert main(["--teacher", str(d / "qwen"), "--stage", "1", "--proj_dir", str(s1)] + common) == 0
    assert "already finished at step 2" in capsys.readouterr().out                       # resumed, nothing redone
    m = load(s1 / "hybrid")
    assert torch.equal(m.state_dict()["lm_head.weight"], teachers["qwen"].module.lm_head.weight)
    art = rwkvc.compile(str(s1 / "rwkv-final.pth"), d / "art", target="cpu")   # config.json beside the .pth
    idx = torch.arange(1, 11).unsqueeze(0)
    with torch.no_grad():
        ref = m(idx)[0][0, -1].numpy()
    got, _ = rwkvc.load(art).forward(idx[0].numpy())
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))
    assert main(["--stage", "2", "--proj_dir", str(d / "s2")] + common) == 2
    assert "--teacher" in capsys.readouterr().err


def test_bad_teacher_is_one_line(tmp_path):
    from rwkvc.training.distill_teacher import load_teacher
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(RwkvcError, match="model_type 'bert'"):
        load_teacher(str(tmp_path))
    with pytest.raises(RwkvcError, match="give a transformers model directory"):
        load_teacher(str(tmp_path / "nothing"))
