"""The GPT baseline: it trains (loss falls), resumes to the same weights as an uninterrupted run, exports
to ONNX with a KV cache whose prefill and step match the PyTorch module, runs through rwkvc.load and the
CLI, and a bad checkpoint or setting is one error line."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import one_error_line
from rwkvc import binidx
from rwkvc.errors import RwkvcError
from rwkvc.reference.gpt import GPT, GPTConfig, config_from_state_dict, gpt_from_state_dict
from rwkvc.training.config import TrainArgs
from rwkvc.training.trainer import train

V = 64
ARGS = dict(model="gpt", n_layer=2, n_embd=32, head_size_a=16, ctx_len=16, vocab_size=V, micro_bsz=4,
            epoch_steps=15, epoch_count=2, lr_init=3e-3, lr_final=3e-3, warmup_steps=3, random_seed=1,
            accelerator="cpu", precision="fp32", threads=1, enable_progress_bar=0, val_tokens=400)


def _data(prefix: Path):
    """Documents of a few repeated short phrases: easy to learn, so the loss falls within a few steps."""
    rng = np.random.default_rng(0)
    phrases = [list(rng.integers(1, V, rng.integers(3, 7))) for _ in range(6)]
    docs = [sum((phrases[j] for j in rng.integers(0, 6, 12)), []) + [0] for _ in range(80)]
    binidx.write_binidx(prefix, docs)
    return str(prefix)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt")
    data = _data(d / "data")
    final = train(TrainArgs(data_file=data, proj_dir=str(d / "run"), **ARGS), log=lambda *a: None)
    return d, data, final


def test_the_gpt_trains_and_its_loss_falls(trained):
    d, _, final = trained
    rows = [json.loads(x) for x in (d / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(losses) == 30 and len(vals) == 2
    assert np.mean(losses[:3]) > math.log(V) - 0.3          # starts near uniform
    assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 1.0  # and learns the phrases
    assert vals[-1] < math.log(V) - 1.0
    sd = torch.load(final, weights_only=True)
    cfg = config_from_state_dict(sd)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.block_size) == (2, 32, 2, V, 16)


def test_resuming_gives_the_uninterrupted_run(trained):
    """Two epochs, then a third resumed from the checkpoint, end on the weights of three epochs in one go
    (a constant learning rate, so that the schedule does not depend on the planned length)."""
    d, data, _ = trained
    lines = []
    resumed = train(TrainArgs(data_file=data, proj_dir=str(d / "run"), **{**ARGS, "epoch_count": 3}),
                    log=lines.append)
    assert any("resumed from" in str(x) and "step 30" in str(x) for x in lines), lines
    whole = train(TrainArgs(data_file=data, proj_dir=str(d / "whole"), **{**ARGS, "epoch_count": 3}),
                  log=lambda *a: None)
    a, b = torch.load(resumed, weights_only=True), torch.load(whole, weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def artifact(trained):
    from rwkvc.targets.gpt_onnx import export_gpt
    d, _, final = trained
    return export_gpt(final, d / "art"), gpt_from_state_dict(torch.load(final, weights_only=True)).eval()


def _close(got, ref, what):
    ref = np.asarray(ref, np.float64)
    tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(np.asarray(got, np.float64) - ref).max())
    assert err <= tol, f"{what}: max |diff| {err:.3g} > {tol:.3g}"


@pytest.fixture(scope="module")
def loaded(artifact):
    import rwkvc
    return rwkvc.load(artifact[0])


def test_onnx_prefill_and_step_match_the_module(artifact, loaded):
    """Prefill a prompt, prefill more on top of the cache, then steps: the logits and the cache match
    forward_cached and the full-sequence forward; the cache grows by one token per step."""
    _, model = artifact
    m = loaded
    toks = np.random.default_rng(1).integers(0, V, 14)
    with torch.no_grad():
        full = model(torch.from_numpy(toks)[None])[0].numpy()                 # (T, V)
        _, ref_cache = model.forward_cached(torch.from_numpy(toks[:9])[None])
    logits, cache = m.forward(toks[:6].tolist())
    _close(logits, full[5], "prefill")
    logits, cache = m.forward(toks[6:9].tolist(), cache)
    _close(logits, full[8], "prefill after a cache")
    for i, (k, v) in enumerate(ref_cache):
        _close(cache.keys[i], k[0].numpy(), f"key {i}")
        _close(cache.values[i], v[0].numpy(), f"value {i}")
    for t in range(9, 14):
        before = cache.nbytes
        logits, cache = m.forward([int(toks[t])], cache)
        _close(logits, full[t], f"step {t}")
        assert cache.length == t + 1 and cache.nbytes > before
    # past block_size (16) the cache restarts from the recent half and still decodes
    restarts = m.runtime.restarts
    for t in range(5):
        logits, cache = m.forward([1], cache)
    assert cache.length <= 16 and m.runtime.restarts == restarts + 1 and np.isfinite(logits).all()


def test_the_artifact_runs_through_the_cli(artifact, loaded, capsys):
    art, _ = artifact
    r = _cli(["run", str(art), "-n", "8", "--temperature", "0", "--stop-token", "63"], capsys)
    assert r.returncode == 0, r.stderr
    m = loaded
    assert m.generate("", n=8, temperature=0, token_stop=(63,)) == r.stdout[:-1]
    r = _cli(["run", str(art), "-n", "2", "--state-out", str(art.parent / "kv.npz")], capsys)
    assert r.stdout == ""   # refused before generating anything
    one_error_line(r, "GPT's KV cache is not supported")
    assert not (art.parent / "kv.npz").exists()
    assert m.manifest["model"]["kind"] == "gpt" and m.manifest["runtime"] == "onnxruntime-gpt"


def _cli(argv, capsys):
    """`rwkvc ARGV` in this process (the CLI's own main: its error lines and exit status)."""
    from types import SimpleNamespace

    from rwkvc.cli import main
    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def test_compile_exports_a_gpt_checkpoint_and_refuses_bad_ones(trained, tmp_path, capsys):
    d, _, final = trained
    r = _cli(["compile", str(final), "-o", str(tmp_path / "a"), "-q"], capsys)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a" / "step.onnx").is_file() and (tmp_path / "a" / "prefill.onnx").is_file()
    r = _cli(["inspect", str(tmp_path / "a")], capsys)
    assert r.returncode == 0 and "GPT: layers 2, n_embd 32, heads 2" in r.stdout, r.stdout + r.stderr
    sd = torch.load(final, weights_only=True)
    del sd["transformer.h.1.mlp.c_fc.weight"]
    torch.save(sd, tmp_path / "bad.pth")
    r = _cli(["compile", str(tmp_path / "bad.pth"), "-o", str(tmp_path / "b")], capsys)
    one_error_line(r, "bad.pth", "transformer.h.1.mlp.c_fc.weight is missing")
    assert not (tmp_path / "b").exists()
    r = _cli(["compile", str(final), "--passes", "int8", "-o", str(tmp_path / "c")], capsys)
    one_error_line(r, "GPT checkpoint", "--passes")


def test_compare_matches_sizes_and_writes_the_table_and_plot(tmp_path):
    """training/compare.py on a tiny corpus: both models train on the same tokens, their parameter counts are
    within 5 %, and the table, CSV and PNG are written."""
    from rwkvc.training.compare import compare
    data = _data(tmp_path / "d")
    r = compare(data_file=data, out_dir=str(tmp_path / "cmp"), budget_tokens=128, n_layer=1, n_embd=32, evals=1,
                log=lambda *a: None, head_size_a=16, ctx_len=16, micro_bsz=4, warmup_steps=2, val_tokens=200)
    rwkv, gpt = r["results"]
    assert abs(gpt["params"] / rwkv["params"] - 1) <= 0.05
    assert rwkv["tokens"] == gpt["tokens"] == 128 and rwkv["val_loss"] and gpt["val_loss"]
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| RWKV-7 |" in md and "| GPT |" in md
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "cmp" / "compare.csv").read_text().count("\n") == 3


def test_gpt_settings_are_checked():
    with pytest.raises(RwkvcError, match="--model 'llama'"):
        TrainArgs(model="llama")
    with pytest.raises(RwkvcError, match="RWKV-7 only"):
        TrainArgs(model="gpt", train_type="states")
    with pytest.raises(ValueError, match="n_head"):
        GPTConfig(n_layer=1, n_embd=30, n_head=4, vocab_size=8, block_size=4)
    sd = GPT(GPTConfig(n_layer=1, n_embd=8, n_head=2, vocab_size=8, block_size=4)).state_dict()
    sd["transformer.wpe.weight"] = torch.zeros(4, 9)
    with pytest.raises(ValueError, match="transformer.wpe.weight has shape"):
        gpt_from_state_dict(sd)
