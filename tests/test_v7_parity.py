"""RWKV-7: the cpu artifact against the official `rwkv` package and rwkvc's reference model.

Bound (from the spine issue): max |logit diff| <= 1e-4 * max(1, max |reference logit|) over a 64-token
sequence, fed one token at a time and as prefill chunks of several sizes; the state after a prefill
equals the state after the same tokens one by one.
"""
import numpy as np
import pytest
import torch

import rwkvc
from rwkvc.testing import save_random_v7

from helpers import official_rwkv

SHAPES = {
    # name: (n_layer, n_embd, head_size, vocab, file dtype, low-rank dims)
    "h64-v65536-fp32": (2, 128, 64, 65536, "fp32", None),
    "h32-c96-v1000-fp16": (3, 96, 32, 1000, "fp16", {"w": 32, "a": 32, "v": 32, "g": 64}),
    "h32-c160-v5003-bf16": (2, 160, 32, 5003, "bf16", {"w": 64, "a": 32, "v": 32, "g": 96}),
}
T = 64


def bound(ref):
    return 1e-4 * max(1.0, float(np.abs(ref).max()))


@pytest.fixture(scope="module", params=list(SHAPES))
def case(request, tmp_path_factory):
    L, C, N, V, dt, dims = SHAPES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    ckpt = save_random_v7(d / "model.pth", n_layer=L, n_embd=C, head_size=N, vocab_size=V, dtype=dt,
                          dims=dims, seed=L * 1000 + C)
    art = rwkvc.compile(ckpt, d / "art", target="cpu")
    tokens = np.random.default_rng(C).integers(0, V, T).tolist()
    ref = official_rwkv(ckpt)
    ref_logits, st = [], None
    for t in tokens:
        out, st = ref.forward([t], st)
        ref_logits.append(out.float().numpy().copy())
    return dict(ckpt=ckpt, art=art, tokens=tokens, ref_logits=np.stack(ref_logits), ref_state=st, L=L)


def test_step_by_step_matches_official(case):
    m = rwkvc.load(case["art"])
    state = None
    for i, t in enumerate(case["tokens"]):
        logits, state = m.forward([t], state)
        assert logits.shape == (m.config.vocab_size,) and logits.dtype == np.float32
        ref = case["ref_logits"][i]
        diff = float(np.abs(logits - ref).max())
        assert diff <= bound(ref), f"token {i}: max |diff| {diff:.3g} > {bound(ref):.3g}"
    # the final state matches the official package's (att x_prev, wkv, ffn x_prev per layer)
    st = case["ref_state"]
    for i in range(case["L"]):
        np.testing.assert_allclose(state.shift[i, 0], st[3 * i].numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(state.wkv[i], st[3 * i + 1].numpy(), rtol=1e-4, atol=1e-4 * max(1, float(st[3 * i + 1].abs().max())))
        np.testing.assert_allclose(state.shift[i, 1], st[3 * i + 2].numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunks", [[64], [1, 7, 16, 40], [33, 31], [5] * 12 + [4]])
def test_prefill_chunks_match_official_and_steps(case, chunks):
    m = rwkvc.load(case["art"])
    toks = case["tokens"]
    state, pos = None, 0
    for c in chunks:
        logits, state = m.forward(toks[pos:pos + c], state)
        pos += c
        ref = case["ref_logits"][pos - 1]
        diff = float(np.abs(logits - ref).max())
        assert diff <= bound(ref), f"after {pos} tokens (chunks {chunks}): {diff:.3g} > {bound(ref):.3g}"
    step_state = None
    for t in toks:
        _, step_state = m.forward([t], step_state)
    scale = max(1.0, float(np.abs(step_state.wkv).max()))
    np.testing.assert_allclose(state.wkv, step_state.wkv, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(state.shift, step_state.shift, rtol=0, atol=1e-5)


def test_chunked_prefill_updates_only_its_own_state(case):
    """A prompt longer than the prefill chunk: the chunks after the first update the call's own state in place
    (Rwkv7WkvPrefill reads a head's state before writing it); the caller's state is untouched and the result is the
    one-call prefill's."""
    toks = case["tokens"]
    small, whole = rwkvc.load(case["art"], prefill_chunk=8), rwkvc.load(case["art"], prefill_chunk=1024)
    assert small.runtime.wkv_in_place["prefill"]
    _, s0 = small.forward(toks[:5])
    kept = s0.copy()
    logits, s1 = small.forward(toks[5:], s0)
    np.testing.assert_array_equal(s0.wkv, kept.wkv)
    np.testing.assert_array_equal(s0.shift, kept.shift)
    assert not np.shares_memory(s1.wkv, s0.wkv)
    assert small.runtime._slots["step"].source(s1) >= 0   # the prompt's state is a step slot's: steps go on there
    ref_logits, ref = whole.forward(toks[5:], kept)
    scale = max(1.0, float(np.abs(ref.wkv).max()))
    np.testing.assert_allclose(s1.wkv, ref.wkv, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-4 * max(1.0, float(np.abs(ref_logits).max())))


def test_in_place_decode_equals_the_step_that_keeps_its_state(case):
    """Model.forward / greedy_step with in_place=True: each step writes over the state it read, in the one step
    slot that state is in, and every logit and state is bit for bit the out-of-place step's."""
    toks = case["tokens"]
    m = rwkvc.load(case["art"])
    assert m.runtime.wkv_in_place["step"]
    _, s = m.forward(toks[:6])
    kept, ref = s.copy(), []
    st = s
    for t in toks[6:12]:
        lg, st = m.forward([t], st)
        ref.append((lg.copy(), st.copy()))
    _, st = m.forward(toks[:6])
    n_slots = len(m.runtime._slots["step"].slots)
    for t, (ref_lg, ref_st) in zip(toks[6:12], ref):
        before = st.wkv.ctypes.data
        lg, st = m.forward([t], st, in_place=True)
        assert st.wkv.ctypes.data == before
        np.testing.assert_array_equal(lg, ref_lg)
        np.testing.assert_array_equal(st.wkv, ref_st.wkv)
        np.testing.assert_array_equal(st.shift, ref_st.shift)
    assert len(m.runtime._slots["step"].slots) == n_slots
    top, st2 = m.greedy_step(int(toks[12]), kept.copy(), in_place=True)   # a state no slot holds: a new one
    assert top == int(np.argmax(m.forward([int(toks[12])], kept)[0])) and np.array_equal(st2.wkv, m.forward(
        [int(toks[12])], kept)[1].wkv)


def test_reference_model_matches_artifact(case):
    """The PyTorch reference (the training model) and the emitted ONNX agree in float32."""
    from rwkvc.reference.v7 import RWKV7, config_from_state_dict
    sd = {k: v.float() for k, v in torch.load(case["ckpt"], weights_only=True).items()}
    model = RWKV7(config_from_state_dict(sd))
    model.load_state_dict(sd)
    with torch.no_grad():
        ref, _ = model(torch.tensor([case["tokens"]]))
    m = rwkvc.load(case["art"])
    logits, _ = m.forward(case["tokens"])
    r = ref[0, -1].numpy()
    assert float(np.abs(logits - r).max()) <= bound(r)


def test_onnx_checker_full(case):
    import onnx
    for entry in ("step.onnx", "prefill.onnx"):
        onnx.checker.check_model(str(case["art"] / entry), full_check=True)
