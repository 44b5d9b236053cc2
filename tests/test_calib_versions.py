"""The passes that calibrate by running the model (sparse-ffn, hhead, int4/int8 gptq/awq) on RWKV-4, -5, -6.

rwkvc.calib.IRRunner runs every generation from the IR; its float logits must be the cpu artifact's (the
same 1e-4 bound as the parity tests), and the calibrated passes must compile, with their lossless settings
giving the dense logits; int4 gptq's logit MSE against the float model is at most GPTQ_MSE_OVER_RTN of
round-to-nearest's at the same group.
"""
import numpy as np
import pytest

import rwkvc
from rwkvc.calib import ir_logits
from rwkvc.frontend import load_model
from rwkvc.testing import (random_v4_state_dict, random_v5_state_dict, random_v6_state_dict,
                           save_state_dict)

MAKERS = {
    "4": lambda: random_v4_state_dict(n_layer=2, n_embd=64, vocab_size=300, seed=4),
    "5.2": lambda: random_v5_state_dict(n_layer=2, n_embd=64, head_size=32, vocab_size=300, seed=5),
    "6": lambda: random_v6_state_dict(n_layer=2, n_embd=64, head_size=32, vocab_size=300, seed=6),
}
T = 24


@pytest.fixture(scope="module", params=list(MAKERS))
def case(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("v" + request.param)
    ckpt = save_state_dict(MAKERS[request.param](), d / "m.pth")
    art = rwkvc.compile(ckpt, d / "dense", target="cpu")
    tokens = np.random.default_rng(7).integers(0, 300, T)
    m = rwkvc.load(art)
    logits, state = [], None
    for t in tokens.tolist():
        out, state = m.forward([t], state)
        logits.append(out)
    return dict(ckpt=ckpt, dir=d, tokens=tokens, dense=np.stack(logits), version=request.param)


def tol(ref):
    return 1e-4 * max(1.0, float(np.abs(ref).max()))


def test_ir_runner_matches_the_artifact(case):
    model = load_model(case["ckpt"])
    assert model.config.version == case["version"]
    got = ir_logits(model, case["tokens"], simulate=False)
    assert np.abs(got - case["dense"]).max() <= tol(case["dense"])


@pytest.mark.parametrize("recipe", ["sparse-ffn(threshold=0)", "hhead(k=8,p=1.0,steps=10,tokens=96)"])
def test_calibrated_lossless_settings_give_the_dense_logits(case, recipe):
    calib = np.random.default_rng(1).integers(0, 300, 400)
    from rwkvc.passes import PassContext
    ctx = PassContext(calib_tokens=calib, progress=False)
    art = rwkvc.compile(case["ckpt"], case["dir"] / recipe.split("(")[0], target="cpu", passes=recipe, ctx=ctx)
    m = rwkvc.load(art)
    state, worst = None, 0.0
    for i, t in enumerate(case["tokens"].tolist()):
        out, state = m.forward([t], state)
        worst = max(worst, float(np.abs(out - case["dense"][i]).max()))
    assert worst <= tol(case["dense"])


def step_logits(art, tokens) -> np.ndarray:
    m, state, out = rwkvc.load(art), None, []
    for t in tokens.tolist():
        lg, state = m.forward([t], state)
        out.append(lg)
    return np.stack(out)


# gptq's logit MSE against the float model, as a fraction of round-to-nearest's at the same bits and group
# (measured on these models: 0.86 (v4), 0.82 (v5.2), 0.86 (v6))
GPTQ_MSE_OVER_RTN = 0.95


def test_gptq_calibrates_and_beats_round_to_nearest(case):
    from rwkvc.passes import PassContext
    calib = np.random.default_rng(2).integers(0, 300, 400)
    ctx = PassContext(calib_tokens=calib, progress=False)
    art = rwkvc.compile(case["ckpt"], case["dir"] / "gptq", target="cpu", passes="int4(group=32,method=gptq)", ctx=ctx)
    rtn = rwkvc.compile(case["ckpt"], case["dir"] / "rtn", target="cpu", passes="int4(group=32,method=rtn)", ctx=ctx)
    m = rwkvc.load(art)
    out, _ = m.forward(case["tokens"].tolist())
    ref = case["dense"][-1]
    # random weights have no structure to exploit; int4 keeps the last token's logits within 25 % of their range
    assert np.isfinite(out).all()
    assert np.abs(out - ref).max() <= 0.25 * (ref.max() - ref.min())
    # and calibrating pays: over held-out tokens (not the calibration text), gptq's logits are nearer the
    # float model's than round-to-nearest's
    mse = {name: float(np.mean((step_logits(a, case["tokens"]) - case["dense"]) ** 2)) for name, a in
           (("gptq", art), ("rtn", rtn))}
    assert mse["gptq"] <= GPTQ_MSE_OVER_RTN * mse["rtn"], \
        f"v{case['version']}: gptq logit MSE {mse['gptq']:.3g} > {GPTQ_MSE_OVER_RTN} x rtn's {mse['rtn']:.3g}"
