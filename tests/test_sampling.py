"""Sampler: greedy, reproducibility, cutoffs, penalties, and parity with rwkv.utils.PIPELINE."""

from __future__ import annotations

import numpy as np
import pytest

from rwkvc.errors import RwkvcError
from rwkvc.sampling import Sampler, SamplingConfig


def _logits(n: int = 1000, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


# ------------------------------------------------------------------ basics
def test_greedy_is_argmax():
    s = Sampler(SamplingConfig(temperature=0))
    for seed in range(20):
        x = _logits(65536, seed)
        assert s.sample(x) == int(np.argmax(x))


def test_fixed_seed_reproducible():
    x = _logits(65536, 3, scale=1.0)
    cfg = SamplingConfig(temperature=1.0, top_p=0.95, seed=42)
    a, b = Sampler(cfg), Sampler(cfg)
    ra = [a.sample(x) for _ in range(50)]
    rb = [b.sample(x) for _ in range(50)]
    assert ra == rb
    assert len(set(ra)) > 1  # it does actually sample
    a.reset(reseed=True)
    assert [a.sample(x) for _ in range(50)] == ra
    c = Sampler(SamplingConfig(temperature=1.0, top_p=0.95, seed=43))
    assert [c.sample(x) for _ in range(50)] != ra


def test_full_vocabulary_draw_is_the_draw_over_the_positive_tokens():
    """top_p = 1, temperature 1 draws over the whole vocabulary without indexing the tokens of positive
    probability: the same tokens, seed for seed, as the draw over those tokens (cumulative sums of their
    probabilities, one uniform a draw), including logits where most tokens underflow to probability 0 and
    where all but one are banned or one token holds all the mass (no uniform drawn then)."""
    V = 4096
    rows = [_logits(V, seed, scale) for seed, scale in ((0, 1.0), (1, 3.0), (2, 300.0))]
    spread = _logits(V, 3, 1.0)
    spread[::7] -= 2000.0                       # a seventh of the tokens underflow
    rows.append(spread)
    cfg = SamplingConfig(temperature=1.0, top_p=1.0, seed=7, token_ban=tuple(range(1, V)))
    only0 = Sampler(cfg)
    s, rng = Sampler(SamplingConfig(temperature=1.0, top_p=1.0, seed=7)), np.random.default_rng(7)
    for i in range(200):
        x = rows[i % len(rows)]
        if i % 50 == 49:                        # every token but 0 banned: token 0, no uniform drawn
            before = only0.rng.bit_generator.state
            assert only0.sample(x) == 0 and only0.rng.bit_generator.state == before
        x64 = x.astype(np.float64)
        p = np.exp(x64 - x64.max())
        p /= p.sum()
        ids = np.flatnonzero(p > 0)
        c = np.cumsum(p[ids])
        want = int(ids[min(int(np.searchsorted(c, rng.random() * c[-1], side="right")), ids.size - 1)])
        assert s.sample(x) == want
    x = np.full(V, -1e4, np.float32)
    x[5] = 0.0                                  # one token holds all the mass: it is chosen, nothing drawn
    before = s.rng.bit_generator.state
    assert s.sample(x) == 5 and s.rng.bit_generator.state == before


def test_draw_in_two_levels_is_the_cumulative_draw():
    """_draw_index over a long weight vector (block sums, then one block's cumulative sum) gives the index of
    np.searchsorted(np.cumsum(w), r * total, "right") for uniform r, never a token of weight 0 (also for draws
    placed exactly on the boundaries, where rounding decides), and past the end only where the total is
    exceeded."""
    from rwkvc.sampling import DRAW_BLOCK, _draw_index
    rng = np.random.default_rng(0)
    for n in (65536, 65536 + 77, 5000):
        w = np.exp(rng.standard_normal(n) * 4)
        w[rng.random(n) < 0.3] = 0.0                     # 30 % of the tokens with probability 0
        w[DRAW_BLOCK:3 * DRAW_BLOCK] = 0.0               # whole blocks of them
        c = np.cumsum(w)
        for r in rng.random(3000):
            assert _draw_index(w, r) == int(np.searchsorted(c, r * c[-1], side="right"))
        for j in rng.choice(np.flatnonzero(w), 300):     # the boundaries of positive tokens
            k = _draw_index(w, c[j] / c[-1])
            assert k == n or w[k] > 0
        assert _draw_index(w, 0.0) == int(np.flatnonzero(w)[0])


def test_top_k_1_is_greedy():
    s = Sampler(SamplingConfig(top_k=1, top_p=1.0, temperature=1.3, seed=0))
    for seed in range(10):
        x = _logits(65536, seed, scale=0.5)
        assert s.sample(x) == int(np.argmax(x))


def test_tiny_top_p_is_argmax():
    s = Sampler(SamplingConfig(top_p=1e-9, temperature=2.0, seed=0))
    for seed in range(10):
        x = _logits(65536, seed, scale=0.5)
        assert s.sample(x) == int(np.argmax(x))


def test_banned_tokens_never_sampled():
    x = np.zeros(50, dtype=np.float32)
    x[:5] = 5.0  # the banned ones would dominate
    ban = (0, 1, 2, 3, 4)
    s = Sampler(SamplingConfig(top_p=1.0, token_ban=ban, seed=1))
    draws = {s.sample(x) for _ in range(500)}
    assert not draws & set(ban)
    assert Sampler(SamplingConfig(temperature=0, token_ban=ban)).sample(x) not in ban
    assert s.distribution(x)[list(ban)].sum() == 0


def test_all_banned_raises():
    s = Sampler(SamplingConfig(token_ban=(0, 1, 2)))
    with pytest.raises(RwkvcError, match="banned"):
        s.sample(np.zeros(3))
    with pytest.raises(RwkvcError, match="banned"):
        Sampler(SamplingConfig(temperature=0, token_ban=(0, 1, 2))).sample(np.zeros(3))


def test_greedy_without_adjustments_is_the_adjusted_argmax_and_its_errors():
    """temperature 0 with no bans and no penalties takes the argmax of the logits as given (no float64 copy):
    the same token as the adjusting path (a penalty of 0 forces that path), ties to the first, and the same
    errors for NaN logits and all -inf."""
    fast = Sampler(SamplingConfig(temperature=0))
    slow = Sampler(SamplingConfig(temperature=0, alpha_presence=1e-300))
    slow.observe(65535)
    for seed in range(10):
        x = _logits(65536, seed)
        x[seed * 7] = x.max()                   # a tie: the first of the two
        assert fast.sample(x) == slow.sample(x) == int(np.argmax(x))
    for bad, what in ((np.array([0.0, np.nan, 1.0], np.float32), "NaN"), (np.full(4, -np.inf), "banned")):
        for s in (fast, slow):
            with pytest.raises(RwkvcError, match=what):
                s.sample(bad)


def test_presence_penalty_changes_argmax_by_hand():
    x = np.array([1.0, 0.9, 0.5, 0.85], dtype=np.float32)
    s = Sampler(SamplingConfig(temperature=0, alpha_presence=0.2, alpha_frequency=0.0))
    assert s.sample(x) == 0
    s.observe(0)  # logit 0 -> 1.0 - 0.2 = 0.8 < 0.9
    assert s.sample(x) == 1
    s.observe(1)  # logit 1 -> 0.7, logit 0 stays 0.8 (presence is not decayed) -> 3 (0.85)
    assert s.sample(x) == 3
    np.testing.assert_allclose(s.adjust(x), [0.8, 0.7, 0.5, 0.85], rtol=0, atol=1e-6)


def test_frequency_penalty_and_decay_by_hand():
    cfg = SamplingConfig(temperature=0, alpha_presence=0.1, alpha_frequency=0.5, alpha_decay=0.9)
    s = Sampler(cfg)
    s.observe(2)
    s.observe(2)
    s.observe(1)
    # counts: t2: (1*0.9 + 1)*0.9 = 1.71 ; t1: 1
    occ = s.occurrence
    assert occ[2] == pytest.approx(1.71) and occ[1] == pytest.approx(1.0)
    x = np.array([0.0, 3.0, 3.0, 0.0])
    expect = [0.0, 3.0 - (0.1 + 0.5 * 1.0), 3.0 - (0.1 + 0.5 * 1.71), 0.0]
    np.testing.assert_allclose(s.adjust(x), expect)
    assert s.sample(x) == 1


def test_zero_weight_tokens_with_tokenizer():
    from rwkvc.tokenizer import WorldTokenizer

    tok = WorldTokenizer()
    s = Sampler(SamplingConfig(alpha_presence=1.0, alpha_frequency=1.0), tokenizer=tok)
    space, digit, word = tok.encode(" ")[0], tok.encode("7")[0], tok.encode("hello")[0]
    for t in (space, digit, word):
        s.observe(t)
    occ = s.occurrence
    assert occ[space] == 0.0 and occ[digit] == 0.0 and occ[word] == 1.0
    # presence still applies to zero-weight tokens, as in the official loop
    adj = s.adjust(np.zeros(65536))
    assert adj[space] == -1.0 and adj[word] == -2.0


def test_distribution_matches_softmax():
    x = np.array([2.0, 1.0, 0.5, 0.0, -1.0])
    p = _softmax(x)
    s = Sampler(SamplingConfig(temperature=1.0, top_p=1.0, seed=123))
    n = 20000
    counts = np.bincount([s.sample(x) for _ in range(n)], minlength=5)
    freq = counts / n
    # 0.015 absolute is > 4 standard deviations (sd <= sqrt(0.25/20000) = 0.0035).
    assert np.abs(freq - p).max() < 0.015, (freq, p)
    np.testing.assert_allclose(s.distribution(x), p, rtol=1e-12)


def test_temperature_sharpens():
    x = np.array([2.0, 1.0, 0.0])
    p_cold = Sampler(SamplingConfig(temperature=0.5, top_p=1.0)).distribution(x)
    np.testing.assert_allclose(p_cold, _softmax(x / 0.5))
    # Very small temperatures stay finite (computed in log space).
    p_tiny = Sampler(SamplingConfig(temperature=1e-4, top_p=1.0)).distribution(x)
    assert p_tiny[0] == pytest.approx(1.0)


def test_2d_logits_and_torch_like_input():
    x = _logits(100, 1)[None, :]
    assert Sampler(SamplingConfig(temperature=0)).sample(x) == int(np.argmax(x))


# -------------------------------------------------- parity with the official
@pytest.fixture(scope="module")
def official_probs():
    """Final distribution of rwkv.utils.PIPELINE.sample_logits (CPU path), captured
    from its np.random.choice call instead of comparing random draws."""
    torch = pytest.importorskip("torch")
    from rwkv import utils as rwkv_utils

    pipe = rwkv_utils.PIPELINE.__new__(rwkv_utils.PIPELINE)

    def run(x: np.ndarray, temperature: float, top_p: float, top_k: int) -> np.ndarray:
        captured = {}

        def fake_choice(a, p):
            captured["p"] = np.asarray(p, dtype=np.float64)
            return 0

        orig = rwkv_utils.np.random.choice
        rwkv_utils.np.random.choice = fake_choice
        try:
            pipe.sample_logits(torch.tensor(x), temperature=temperature, top_p=top_p, top_k=top_k)
        finally:
            rwkv_utils.np.random.choice = orig
        return captured["p"]

    return run


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.85, 0.95, 0.999])
@pytest.mark.parametrize("top_k", [0, 1, 5, 40])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
def test_cutoffs_match_official(official_probs, top_p, top_k, temperature):
    for seed in range(3):
        x = _logits(2000, seed, scale=2.0)
        ref = official_probs(x, temperature, top_p, top_k)
        ours = Sampler(SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k)).distribution(x)
        assert set(np.flatnonzero(ref)) == set(np.flatnonzero(ours))
        np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_cutoffs_match_official_vocab_size(official_probs):
    x = _logits(65536, 9, scale=2.5)
    for top_p, top_k in [(0.85, 0), (0.5, 0), (0.9, 100)]:
        ref = official_probs(x, 1.0, top_p, top_k)
        ours = Sampler(SamplingConfig(top_p=top_p, top_k=top_k)).distribution(x)
        assert set(np.flatnonzero(ref)) == set(np.flatnonzero(ours))


def test_generate_loop_matches_official_penalties():
    """Greedy decoding with presence/frequency penalties reproduces PIPELINE.generate."""
    torch = pytest.importorskip("torch")
    from rwkv import utils as rwkv_utils

    from rwkvc.tokenizer import WorldTokenizer

    tok = WorldTokenizer()
    V, active = 65536, 700  # ids < 700 include spaces/digits (zero-weight tokens)
    table = np.random.default_rng(5).standard_normal((17, active)).astype(np.float32)
    table[:, [33, 49, 50, 264, 283, 620]] += 2.0  # make zero-weight tokens attractive
    table[:, 0] = -1e4  # the official tokenizer cannot decode id 0 (end-of-document)

    class FakeModel:
        def __init__(self):
            self.seen = []

        def forward(self, tokens, state):
            self.seen += list(tokens)
            out = np.full(V, -1e4, dtype=np.float32)
            out[:active] = table[(tokens[-1] + len(self.seen)) % 17]
            return torch.tensor(out), state

    args = dict(alpha_presence=0.4, alpha_frequency=0.3, alpha_decay=0.95)
    prompt = "Hello"
    n = 60

    ref_model = FakeModel()
    pipe = rwkv_utils.PIPELINE.__new__(rwkv_utils.PIPELINE)

    class Vocab:  # PIPELINE treats anything whose type name has "Tokenizer" as HF tokenizers
        encode = staticmethod(tok.encode)
        decode = staticmethod(tok.decode)

    pipe.model, pipe.tokenizer = ref_model, Vocab()
    pargs = rwkv_utils.PIPELINE_ARGS(temperature=0, top_p=0.85, token_stop=[699], **args)
    pipe.generate(prompt, token_count=n, args=pargs)
    n_prompt = len(tok.encode(prompt))
    ref_tokens = ref_model.seen[n_prompt:]

    model = FakeModel()
    sampler = Sampler(SamplingConfig(temperature=0, token_stop=(699,), **args), tokenizer=tok)
    logits, _ = model.forward(tok.encode(prompt), None)
    ours = []
    for _ in range(n):
        t = sampler.sample(logits.numpy())
        if sampler.is_stop(t):
            break
        ours.append(t)
        sampler.observe(t)
        logits, _ = model.forward([t], None)
    # The official loop also feeds the final sampled token, one more forward than needed.
    assert ours[: len(ref_tokens)] == ref_tokens[: len(ours)]
    assert len(ours) >= 30 and len(set(ours)) > 5


# ------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(alpha_decay=1.1), "alpha_decay"),
        (dict(alpha_decay=-0.1), "alpha_decay"),
        (dict(alpha_presence=float("inf")), "alpha_presence"),
        (dict(alpha_frequency="x"), "alpha_frequency"),
        (dict(token_ban=(-1,)), "token_ban"),
        (dict(token_stop=("a",)), "token_stop"),
        (dict(stop_strings=("",)), "stop_strings"),
        (dict(seed=-5), "seed"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_bad_config_raises(kwargs, field):
    with pytest.raises(RwkvcError, match=field) as ei:
        SamplingConfig(**kwargs)
    assert "\n" not in str(ei.value)


def test_config_normalises_sequences():
    cfg = SamplingConfig(token_ban=[1, 2], token_stop=np.array([0]), stop_strings="\n\n", top_k=np.int64(3))
    assert cfg.token_ban == (1, 2) and cfg.token_stop == (0,) and cfg.stop_strings == ("\n\n",)
    assert type(cfg.top_k) is int
    hash(cfg)
