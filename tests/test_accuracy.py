"""Accuracy-diff tests of the compression passes on a trained model (issue 5).

The model: the cached KJV demo (rwkvc.training.demo, ~/.cache/rwkvc/demo) when it exists, otherwise a
smaller RWKV-7 (2 layers, n_embd 128, World vocabulary) trained here once on the same text and cached in
$RWKV_CACHE/test-accuracy (~/.cache/rwkvc/test-accuracy): about 2-3 minutes on 2 cores the first time.
Every compressed artifact is evaluated with `rwkvc.eval.evaluate` against the dense cpu artifact on
held-out books (Ruth, Ecclesiastes, Jonah, Philippians), calibrating on the training text.

Bounds (issue 5): int8 perplexity within 1 % and top-1 agreement >= 98 %; int4 within 5 %; svd(energy=0.9)
within 2 % and top-1 >= 90 % (measured +0.43 % / 93.8 % on the demo, +0.45 % / 95.2 % on the 2-layer model);
hhead within 2 % and top-1 >= 98 %; sparse-ffn within 3 %; all passes together within 10 %. What each
reached is printed (pytest -s) and recorded in docs/COMPRESSION.md.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

N_EVAL = int(os.environ.get("RWKVC_ACC_TOKENS", "1000"))
N_CALIB = 4096
SMALL = dict(n_layer=2, n_embd=128, ctx_len=128, micro_bsz=8, epoch_steps=200, epoch_count=1, warmup_steps=10,
             lr_init=3e-3, lr_final=3e-4, epoch_save=0, enable_progress_bar=0)

# name: (recipe, max perplexity increase in %, min top-1 agreement or None)
CASES = {
    "int8": ("int8", 1.0, 0.98),
    "int8-gptq": ("int8(method=gptq)", 1.0, 0.98),
    "int4": ("int4(group=32)", 5.0, None),
    "int4-g128": ("int4(group=128)", 5.0, None),
    "int4-gptq": ("int4(group=32,method=gptq)", 5.0, None),
    "int4-awq": ("int4(group=32,method=awq)", 5.0, None),
    "svd-energy": ("svd(energy=0.9)", 2.0, 0.90),
    "hhead": ("hhead(k=200,p=0.95)", 2.0, 0.98),
    "sparse-ffn": ("sparse-ffn(recall=0.99,tokens=2048)", 3.0, None),
    "lazy-emb": ("lazy-emb(storage=int8)", 1.0, 0.98),
    "all": ("svd(rank=0.5,targets=att.r+att.k+att.v+att.o),sparse-ffn(recall=0.99),hhead(k=200,p=0.95,min_k=6),"
            "int4(group=32,method=gptq),lazy-emb(storage=int8)", 10.0, None),
}
RESULTS: dict[str, dict] = {}


def _cache() -> Path:
    from rwkvc.cache import cache_root
    return cache_root()


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    if shutil.which("bible") is None:
        pytest.skip("needs the offline KJV (apt-get install bible-kjv)")
    from rwkvc.training.demo import RECIPE, build_data
    root = _cache()
    demo = root / "demo" / "model" / "rwkv-final.pth"
    if demo.is_file() and (root / "demo" / "report.json").is_file():
        train_p, val_p = build_data(root / "demo" / "data", RECIPE["ctx_len"], log=lambda *a: None)
        ckpt = demo
    else:
        from rwkvc.training.config import TrainArgs
        from rwkvc.training.trainer import train
        small = root / "test-accuracy"
        train_p, val_p = build_data(small / "data", SMALL["ctx_len"], log=lambda *a: None)
        ckpt = small / "model" / "rwkv-final.pth"
        recipe = {**RECIPE, **SMALL}
        stamp = small / "recipe.json"
        if not (ckpt.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == recipe):
            if (small / "model").exists():
                shutil.rmtree(small / "model")
            train(TrainArgs(data_file=train_p, val_file=val_p, proj_dir=str(small / "model"), **recipe),
                  log=lambda *a: None)
            stamp.write_text(json.dumps(recipe))
    from rwkvc.calib import load_tokens
    from rwkvc.pipeline import compile_checkpoint
    work = tmp_path_factory.mktemp("accuracy")
    dense = compile_checkpoint(str(ckpt), work / "dense", target="cpu", force=True)
    return dict(ckpt=ckpt, work=work, dense=dense, calib=load_tokens(train_p, limit=N_CALIB),
                val=load_tokens(val_p, limit=N_EVAL + 1))


def _eval(trained, name, recipe):
    from rwkvc.eval import evaluate
    from rwkvc.passes import PassContext
    from rwkvc.pipeline import compile_checkpoint, parse_recipe
    out = trained["work"] / name
    ctx = PassContext(calib_tokens=trained["calib"], progress=False)
    compile_checkpoint(str(trained["ckpt"]), out, target="cpu", passes=parse_recipe(recipe), force=True, ctx=ctx)
    r = evaluate(out, trained["val"], ref=str(trained["dense"]), n_tokens=N_EVAL)
    from rwkvc.bench import weight_traffic
    r.update(weight_traffic(out))
    RESULTS[name] = r
    print(f"\n{name:12s} ppl {r['ppl']:.3f} (ref {r['ref_ppl']:.3f}, {r['ppl_delta_pct']:+.2f} %) "
          f"top-1 {100 * r['top1_agreement']:.2f} %  KL {r['mean_kl']:.5f}  "
          f"resident {r['weight_bytes_resident'] / 1e6:.2f} MB  read/token {r['weight_bytes_read_per_token'] / 1e6:.2f} MB")
    return r


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_accuracy_bound(trained, name):
    recipe, max_delta, min_top1 = CASES[name]
    r = _eval(trained, name, recipe)
    assert np.isfinite(r["ppl"]) and r["mean_kl"] >= 0
    if max_delta is not None:
        assert r["ppl_delta_pct"] <= max_delta, f"{name}: perplexity +{r['ppl_delta_pct']:.2f} % > {max_delta} %"
    if min_top1 is not None:
        assert r["top1_agreement"] >= min_top1, f"{name}: top-1 agreement {r['top1_agreement']:.4f} < {min_top1}"


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["svd(rank=1.0)", "hhead(k=200,p=1.0,steps=50)", "sparse-ffn(threshold=0)"])
def test_lossless_on_trained_model(trained, recipe):
    """The lossless settings give the dense logits to float tolerance on the trained model too."""
    import rwkvc
    from rwkvc.passes import PassContext
    from rwkvc.pipeline import compile_checkpoint, parse_recipe
    out = trained["work"] / ("lossless-" + recipe.split("(")[0])
    compile_checkpoint(str(trained["ckpt"]), out, target="cpu", passes=parse_recipe(recipe), force=True,
                       ctx=PassContext(calib_tokens=trained["calib"][:512], progress=False))
    a, d = rwkvc.load(out), rwkvc.load(trained["dense"])
    sa = sd = None
    for t in trained["val"][:48]:
        la, sa = a.forward([int(t)], sa)
        ld, sd = d.forward([int(t)], sd)
        assert np.abs(la - ld).max() <= 1e-4 * max(1.0, float(np.abs(ld).max()))


def teardown_module(module):
    if RESULTS:
        path = Path(os.environ.get("RWKVC_ACC_JSON", "")) if os.environ.get("RWKVC_ACC_JSON") else None
        if path:
            path.write_text(json.dumps(RESULTS, indent=1))


@pytest.mark.slow
def test_svd_finetune_wins_back_loss(trained, tmp_path):
    """RWKV-Lite's recipe: factors from the SVD, then trained; the saved checkpoint has rank r exactly, so
    the svd pass at the same rank recovers the trained factors with no truncation error."""
    from rwkvc.frontend import load_model
    from rwkvc.pipeline import parse_recipe, run_passes
    from rwkvc.training.demo import RECIPE, build_data
    from rwkvc.training.svd_finetune import finetune
    root = Path(trained["ckpt"]).parents[1]
    train_p, val_p = build_data(root / "data", RECIPE["ctx_len"], log=lambda *a: None)
    out = finetune(str(trained["ckpt"]), train_p, str(tmp_path / "ft"), rank=0.25, targets="att+ffn", steps=24,
                   val_file=val_p, lr_init=3e-4, lr_final=1e-4, sample_offset=4096, log=lambda *a: None)
    rep = json.loads((tmp_path / "ft" / "svd-report.json").read_text())
    print(f"\nsvd fine-tune: val loss dense {rep['val_loss_dense']:.4f}, truncated {rep['val_loss_truncated']:.4f}, "
          f"fine-tuned {rep['val_loss_finetuned']:.4f}")
    assert rep["val_loss_truncated"] > rep["val_loss_dense"]
    assert rep["val_loss_finetuned"] < rep["val_loss_truncated"]
    model = run_passes(load_model(out), parse_recipe("svd(rank=0.25,targets=att+ffn)"))
    assert model.passes[-1]["mean_relative_error"] < 1e-3
