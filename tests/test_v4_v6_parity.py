"""RWKV-4, -5 and -6: the cpu artifact against the official `rwkv` package ('cpu fp32') and rwkvc's
PyTorch references.

Bound (as for RWKV-7): max |logit diff| <= 1e-4 * max(1, max |reference logit|) over 64 tokens, fed one at a
time and in prefill chunks of several sizes; the final state equals the official package's, and the state
after a prefill equals the state after the same tokens one by one. The official package runs in a
subprocess without RWKV_V7_ON (with it, its RWKV class only loads RWKV-7).
"""
import numpy as np
import pytest
import torch

import rwkvc
from rwkvc.testing import (random_v4_state_dict, random_v5_state_dict, random_v6_state_dict, run_official_many,
                           save_state_dict)

T = 64
CHUNKS = [[64], [1, 7, 16, 40], [33, 31], [5] * 12 + [4]]

CASES = {
    # name: (state-dict maker, kwargs)
    "v4-L2-c64-v1000": (random_v4_state_dict, dict(n_layer=2, n_embd=64, vocab_size=1000)),
    "v4-L3-c96-f256-v3001": (random_v4_state_dict, dict(n_layer=3, n_embd=96, ffn_dim=256, vocab_size=3001)),
    "v5.2-L2-h32-c64-v1000": (random_v5_state_dict, dict(n_layer=2, n_embd=64, head_size=32, vocab_size=1000)),
    "v5.2-L3-h64-c128-v2003": (random_v5_state_dict, dict(n_layer=3, n_embd=128, head_size=64, vocab_size=2003)),
    "v5.1-L2-h16-c64-v1000": (random_v5_state_dict, dict(n_layer=2, n_embd=64, head_size=16, vocab_size=1000,
                                                         version="5.1")),
    "v6-L2-h32-c64-v1000-time_state": (random_v6_state_dict, dict(n_layer=2, n_embd=64, head_size=32, vocab_size=1000,
                                                                  time_state=True)),
    "v6-L3-h32-c96-maa16-w32-v2003": (random_v6_state_dict, dict(n_layer=3, n_embd=96, head_size=32, vocab_size=2003,
                                                                 dim_maa=16, dim_decay=32)),
}


def bound(ref):
    return 1e-4 * max(1.0, float(np.abs(ref).max()))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every case's checkpoint, artifact and official results (one official subprocess for all)."""
    cases = {}
    for name, (make, kw) in CASES.items():
        d = tmp_path_factory.mktemp(name)
        sd = make(seed=sum(map(ord, name)), **kw)
        ckpt = save_state_dict(sd, d / "model.pth")
        art = rwkvc.compile(ckpt, d / "art", target="cpu")
        tokens = np.random.default_rng(len(name)).integers(0, kw["vocab_size"], T).tolist()
        cases[name] = dict(name=name, sd=sd, ckpt=ckpt, art=art, tokens=tokens)
    offs = run_official_many([(c["ckpt"], c["tokens"], CHUNKS) for c in cases.values()])
    for c, off in zip(cases.values(), offs):
        c["off"] = off
    return cases


@pytest.fixture(scope="module", params=list(CASES))
def case(request, built):
    c = built[request.param]
    if "model" not in c:   # the artifact, fed token by token once
        m = rwkvc.load(c["art"])
        logits, state = [], None
        for t in c["tokens"]:
            lg, state = m.forward([t], state)
            logits.append(lg)
        c.update(model=m, steps=np.stack(logits), step_state=state)
    return c


def official_state(m, state):
    """Our state in the official package's flattened per-layer order (v5/v6 wkv as [key, value])."""
    parts = []
    for i in range(m.config.n_layer):
        wkv = state.wkv[i] if m.config.version == "4" else np.swapaxes(state.wkv[i], -1, -2)
        parts += [state.shift[i, 0], wkv.reshape(-1), state.shift[i, 1]]
    return np.concatenate(parts)


def test_version_detected(case):
    assert case["model"].config.version == case["name"].split("-")[0][1:]


def test_step_by_step_matches_official(case):
    for i, logits in enumerate(case["steps"]):
        assert logits.shape == (case["model"].config.vocab_size,) and logits.dtype == np.float32
        ref = case["off"]["steps"][i]
        diff = float(np.abs(logits - ref).max())
        assert diff <= bound(ref), f"{case['name']} token {i}: max |diff| {diff:.3g} > {bound(ref):.3g}"
    ours = official_state(case["model"], case["step_state"])
    ref = case["off"]["state"]
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(ref).max())))


@pytest.mark.parametrize("ci", range(len(CHUNKS)))
def test_prefill_chunks_match_official_and_steps(case, ci):
    m = case["model"]
    toks = case["tokens"]
    state, pos = None, 0
    for j, c in enumerate(CHUNKS[ci]):
        logits, state = m.forward(toks[pos:pos + c], state)
        pos += c
        for ref in (case["off"]["steps"][pos - 1], case["off"][f"chunks{ci}"][j]):
            diff = float(np.abs(logits - ref).max())
            assert diff <= bound(ref), f"after {pos} tokens (chunks {CHUNKS[ci]}): {diff:.3g} > {bound(ref):.3g}"
    step_state = case["step_state"]
    scale = max(1.0, float(np.abs(step_state.wkv).max()))
    np.testing.assert_allclose(state.wkv, step_state.wkv, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(state.shift, step_state.shift, rtol=0, atol=1e-5)


def test_reference_model_matches_artifact(case):
    """rwkvc's PyTorch reference of the version and the emitted ONNX agree in float32."""
    from rwkvc.reference.v4 import RWKV4
    from rwkvc.reference.v5 import RWKV5
    from rwkvc.reference.v6 import RWKV6
    cls = {"4": RWKV4, "5": RWKV5, "6": RWKV6}[case["name"][1]]
    ref, _ = cls.from_state_dict(case["sd"])(torch.tensor([case["tokens"]]))
    r = ref[0].numpy()
    np.testing.assert_allclose(r, case["off"]["steps"], rtol=0, atol=bound(case["off"]["steps"]))
    logits, _ = case["model"].forward(case["tokens"])
    assert float(np.abs(logits - r[-1]).max()) <= bound(r[-1])


def test_time_state_is_the_initial_state(case):
    if "time_state" not in case["name"]:
        pytest.skip("no time_state in this checkpoint")
    m = case["model"]
    L = m.config.n_layer
    want = np.stack([case["sd"][f"blocks.{i}.att.time_state"].numpy() for i in range(L)])
    np.testing.assert_array_equal(m.init_state().wkv, want)
    # and it matters: starting from zeros instead gives other logits
    zero = m.forward(case["tokens"][:4], state=type(m.init_state())(np.zeros_like(m.init_state().shift),
                                                                     np.zeros_like(want)))[0]
    assert float(np.abs(zero - case["off"]["steps"][3]).max()) > 100 * bound(case["off"]["steps"][3])


def test_onnx_checker_full(case):
    import onnx
    for entry in ("step.onnx", "prefill.onnx"):
        onnx.checker.check_model(str(case["art"] / entry), full_check=True)


def test_half_precision_checkpoint_loads_as_the_reference():
    """fp16 / bf16 files: the IR keeps the file's values; the artifact matches the reference in float32."""
    from rwkvc.frontend import model_from_state_dict
    from rwkvc.reference.v6 import RWKV6
    for dt in ("fp16", "bf16"):
        sd = random_v6_state_dict(n_layer=2, n_embd=64, head_size=32, vocab_size=500, dtype=dt, seed=3)
        m = model_from_state_dict(sd)
        assert m.config.version == "6"
        ref, _ = RWKV6.from_state_dict(sd)(torch.tensor([[1, 2, 3, 4]]))
        import tempfile
        from rwkvc.artifact import compile_to_dir
        from rwkvc.targets import get_target
        with tempfile.TemporaryDirectory() as d:
            art = compile_to_dir(m, get_target("cpu"), f"{d}/art")
            logits, _ = rwkvc.load(art).forward([1, 2, 3, 4])
        r = ref[0, -1].numpy()
        assert float(np.abs(logits - r).max()) <= bound(r)
