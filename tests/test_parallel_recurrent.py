"""Parallel mode equals RNN mode: every generation's readable reference (rwkvc.reference.v4 ... v7) gives
the same logits and the same final state when its WKV runs in the parallel (chunked, training) form as
when it runs token by token.

    v4           wkv4_chunked    (log-space max trick over an L x L window)
    v5.x, v6     wkv5_chunked    (per-chunk attention matrix with pairwise decay products; v6's decay per token)
    v7           wkv7_chunked    (the generalised delta rule's WY / UT form)

Random tiny models (fixed seeds) with realistic scales: decays from ~1 to ~1e-4 per step, non-zero
bonuses and LoRAs, state-tuned initial states (v5.2, v6) and RWKV-Lite's factorised projections, FFN
predictors and clustered head. Sequences of several lengths, including ones that are not a multiple of
the chunk, start from a non-zero state carried over from a prefix. Bounds are relative to the largest
reference value, for the logits and for each part of the final state: 1e-12 in fp64 (the two forms
differ by ~1e-15), 1e-5 in fp32 (they differ by <= ~1e-6). A model whose decay moved by 1e-3 differs by
~1e-4, beyond both bounds, so the comparison can fail. The v4 and v5/v6 parallel forms also give the
recurrent forms' gradients (fp64), so they can serve training.
"""
import copy
import functools

import numpy as np
import pytest
import torch

from rwkvc.reference import v4, v5, v7
from rwkvc.testing import (random_v4_state_dict, random_v5_state_dict, random_v6_state_dict,
                           random_v7_state_dict)

V, B, PREFIX = 97, 2, 5
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
LITE = dict(factorised=(("att.receptance", 16, True), ("att.key", 16, True), ("att.value", 24, False),
                        ("ffn.key", 32, False), ("ffn.value", 32, False)), mlp_dim=16, head_clusters=8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one torch thread avoids two threads' contention on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def with_time_state(sd, n_layer, H, N, seed):
    g = torch.Generator().manual_seed(seed)
    return {**sd, **{f"blocks.{i}.att.time_state": 0.3 * torch.randn(H, N, N, generator=g) for i in range(n_layer)}}


def build(name):
    """-> (model, parallel WKV (chunk_len -> fn), initial State of a batch (dtype -> State))."""
    if name == "v4":
        m = v4.RWKV4.from_state_dict(random_v4_state_dict(n_layer=2, n_embd=64, vocab_size=V, seed=1))
        return m, v4.wkv4_chunked, lambda dt: v4.State(*(s.to(dt) for s in vars(v4.State.zeros(m.cfg, B)).values()))
    if name == "v7":
        sd = random_v7_state_dict(n_layer=2, n_embd=64, head_size=16, vocab_size=V, seed=7)
        m = v7.RWKV7(v7.config_from_state_dict(sd))
        m.load_state_dict(sd)
        return m, v7.wkv7_chunked, lambda dt: v7.State.zeros(m.cfg, B, dtype=dt)
    if name == "v6":
        from rwkvc.reference.v6 import RWKV6
        m = RWKV6.from_state_dict(random_v6_state_dict(n_layer=2, n_embd=64, head_size=16, vocab_size=V,
                                                       time_state=True, seed=6))
    else:  # v5.0, v5.1, v5.2 (state-tuned), v5.2-lite (RWKV-Lite, state-tuned, clustered head)
        version = name[1:4]
        lite = name.endswith("lite")
        sd = random_v5_state_dict(n_layer=2, n_embd=64, head_size=16, vocab_size=V, version=version, seed=5,
                                  **(LITE if lite else {}))
        if version == "5.2":
            sd = with_time_state(sd, 2, 4, 16, seed=len(name))
        clusters = np.random.default_rng(3).integers(0, LITE["head_clusters"], V) if lite else None
        m = v5.RWKV5.from_state_dict(sd, v5.LiteOptions(clusters=clusters))
    return m, v5.wkv5_chunked, lambda dt: v5.State(*(s.to(dt) for s in vars(m.zero_state(B)).values()))


NAMES = ["v4", "v5.0", "v5.1", "v5.2", "v5.2-lite", "v6", "v7"]


@pytest.fixture(scope="module", params=NAMES)
def gen(request):
    m, chunked, initial = build(request.param)
    return dict(name=request.param, model=m.eval(), chunked=chunked, initial=initial)


def tokens(T, seed):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def rel(got, ref):
    return ((got - ref).abs().max() / ref.abs().max()).item()


@torch.no_grad()
def both_forms(model, chunked, idx, state, chunk_len):
    """-> {"logits", "shift", "wkv"}: the largest relative difference of the parallel form from the recurrent."""
    ref_logits, ref_state = model(idx, state)
    got_logits, got_state = model(idx, state, wkv_fn=functools.partial(chunked, chunk_len=chunk_len))
    assert got_logits.shape == ref_logits.shape and got_logits.dtype == ref_logits.dtype
    return {"logits": rel(got_logits, ref_logits), "shift": rel(got_state.shift, ref_state.shift),
            "wkv": rel(got_state.wkv, ref_state.wkv)}


@torch.no_grad()
def start_state(g, dtype, carried):
    """The model's initial state (zeros, or its time_state), or the state after a prefix of PREFIX tokens."""
    s = g["initial"](dtype)
    return g["model"](tokens(PREFIX, 99), s)[1] if carried else s


@pytest.mark.parametrize("T,chunk_len,carried", [(1, 16, True), (16, 16, True), (37, 16, True), (37, 64, True),
                                                 (23, 8, False)])
def test_parallel_equals_recurrent_fp64(gen, T, chunk_len, carried):
    model = copy.deepcopy(gen["model"]).double()
    g = {**gen, "model": model}
    errs = both_forms(model, gen["chunked"], tokens(T, T), start_state(g, torch.float64, carried), chunk_len)
    assert max(errs.values()) < TOL[torch.float64], f"{gen['name']} T={T} chunk={chunk_len}: {errs}"


def test_parallel_equals_recurrent_fp32(gen):
    errs = both_forms(gen["model"], gen["chunked"], tokens(37, 1), start_state(gen, torch.float32, True), 16)
    assert max(errs.values()) < TOL[torch.float32], f"{gen['name']}: {errs}"


def test_a_changed_decay_breaks_the_bound(gen):
    """The comparison can fail: the parallel form of a model whose decay moved by 1e-3 (time_decay, or
    RWKV-7's w0) against the recurrent form of the original misses the fp64 bound by far, the fp32 one too."""
    model = copy.deepcopy(gen["model"]).double()
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in moved.named_parameters():
            if name.endswith(("att.time_decay", "att.w0")):
                p += 1e-3
    state = start_state({**gen, "model": model}, torch.float64, True)
    idx = tokens(37, 2)
    with torch.no_grad():
        ref_logits, ref_state = model(idx, state)
        got_logits, got_state = moved(idx, state, wkv_fn=functools.partial(gen["chunked"], chunk_len=16))
    assert rel(got_logits, ref_logits) > TOL[torch.float32]
    assert rel(got_state.wkv, ref_state.wkv) > TOL[torch.float32]


@pytest.mark.parametrize("per_token", [False, True])
def test_wkv5_chunked_extreme_decays_fp32(per_token):
    """Decays from 1 - 3e-4 down to exactly 0 (fp32 underflow) stay finite and exact in the parallel
    form: each decay product is the exp of its own span's log sum, never a ratio of two products."""
    g = torch.Generator().manual_seed(11)
    Bk, T, H, N = 2, 40, 2, 16
    logit = torch.linspace(-8.0, 5.0, H * N).view(H, N)                   # exp(-exp(5)) = 0 in fp32
    if per_token:
        logit = logit + torch.randn(Bk, T, H, N, generator=g)
    w = torch.exp(-torch.exp(logit))
    assert (w == 0).any() and (w > 0.999).any()
    r, k, vv = (torch.randn(Bk, T, H, N, generator=g) for _ in range(3))
    u, s0 = torch.randn(H, N, generator=g), torch.randn(Bk, H, N, N, generator=g)
    y_ref, s_ref = v5.wkv5_recurrent(r, k, vv, w, u, s0)
    y, s = v5.wkv5_chunked(r, k, vv, w, u, s0, chunk_len=16)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert rel(y, y_ref) < TOL[torch.float32] and rel(s, s_ref) < TOL[torch.float32]


def kernel_inputs(kind, seed):
    """fp64 inputs of wkv4 / wkv5 (per-token decay), B=2 T=21 C=16 (H=2 N=8), with gradients."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    if kind == "v4":
        w = -torch.exp(torch.linspace(-6, 2.3, 16, dtype=torch.float64))
        state = torch.stack([rnd(2, 16), 0.5 + rnd(2, 16).abs(), rnd(2, 16)], 1)        # aa, bb > 0, pp
        xs = [w, rnd(16), 2 * rnd(2, 21, 16), rnd(2, 21, 16), state]
    else:
        w = torch.exp(-torch.exp(2 * rnd(2, 21, 2, 8)))
        xs = [rnd(2, 21, 2, 8), rnd(2, 21, 2, 8), rnd(2, 21, 2, 8), w, rnd(2, 8), rnd(2, 2, 8, 8)]
    return [x.requires_grad_() for x in xs]


@pytest.mark.parametrize("kind", ["v4", "v5"])
def test_chunked_gradients_equal_recurrent(kind):
    """The parallel forms are training forms: their gradients (every input, the incoming state included)
    equal the recurrent form's, fp64, 1e-12 relative."""
    xs = kernel_inputs(kind, seed=4)
    recurrent, chunked = (v4.wkv4_recurrent, v4.wkv4_chunked) if kind == "v4" else (v5.wkv5_recurrent, v5.wkv5_chunked)
    grads = []
    for fn in (recurrent, functools.partial(chunked, chunk_len=8)):
        y, s = fn(*xs)
        gy = torch.sin(torch.arange(y.numel(), dtype=y.dtype)).view_as(y)              # a fixed, uneven cotangent
        loss = (y * gy).sum() + (s[:, :2] if kind == "v4" else s).square().sum()         # v4: aa, bb (pp is a max)
        grads.append(torch.autograd.grad(loss, xs))
    for i, (ref, got) in enumerate(zip(*grads)):
        assert rel(got, ref) < TOL[torch.float64], f"{kind}: gradient of input {i}: {rel(got, ref):.1e}"
