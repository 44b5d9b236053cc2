"""Token sampling with the semantics of the official ``rwkv.utils.PIPELINE``.

Order of operations for one step (as ``PIPELINE.generate`` + ``sample_logits``):

1. banned tokens get logit ``-inf``;
2. every token seen so far gets ``logit -= alpha_presence + count * alpha_frequency``
   where ``count`` is its decayed occurrence count;
3. ``probs = softmax(logits)``; top-p keeps every token whose probability is >= the
   probability of the token at which the descending cumulative sum first reaches
   ``top_p``; top-k (if > 0) keeps only the ``top_k`` most probable tokens;
4. the kept probabilities are raised to ``1/temperature``, renormalised and one
   token is drawn.  ``temperature == 0`` means greedy argmax of the adjusted logits.

After a token is accepted, :meth:`Sampler.observe` decays every count by
``alpha_decay`` and adds the token's weight (1, or 0 for whitespace/digit tokens
when the sampler was given a tokenizer, as the official generate loop does).

numpy only; one step over a 65536-entry vocabulary costs well under a millisecond
for typical (peaked) distributions.
"""

from __future__ import annotations

import math
import numbers
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from rwkvc.errors import RwkvcError

__all__ = ["SamplingConfig", "Sampler"]

_EMPTY = "cannot sample from empty logits"
_NAN = "logits contain NaN; check the model output (overflow in fp16?)"
_NOTHING = "every token is banned or has logit -inf; nothing can be sampled"

# The official generate loop gives weight 0 to tokens whose text is a substring of this.
_ZERO_WEIGHT_TEXT = " \t0123456789"


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _id_tuple(name: str, value: Any) -> tuple[int, ...]:
    if _is_int(value):
        value = (value,)
    try:
        items = tuple(value)
    except TypeError:
        raise RwkvcError(f"SamplingConfig.{name} must be a sequence of token ids (ints >= 0), got {value!r}") from None
    for t in items:
        if not _is_int(t) or t < 0:
            raise RwkvcError(f"SamplingConfig.{name} must contain token ids (ints >= 0), got {t!r}")
    return tuple(int(t) for t in items)


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0  # >= 0; 0 = greedy
    top_p: float = 0.85  # (0, 1]
    top_k: int = 0  # >= 0; 0 = off
    alpha_presence: float = 0.0  # subtracted once from every token seen so far
    alpha_frequency: float = 0.0  # subtracted per (decayed) occurrence
    alpha_decay: float = 0.996  # [0, 1]; occurrence counts decay by this every step
    token_ban: tuple[int, ...] = ()  # ids never sampled
    token_stop: tuple[int, ...] = ()  # ids that end generation (checked by the caller)
    stop_strings: tuple[str, ...] = ()  # texts that end generation (checked by the caller)
    seed: int | None = None  # None = nondeterministic

    def __post_init__(self) -> None:
        def fail(name: str, allowed: str) -> None:
            raise RwkvcError(f"SamplingConfig.{name} must be {allowed}, got {getattr(self, name)!r}")

        t = self.temperature
        if not _is_real(t) or not math.isfinite(t) or t < 0:
            fail("temperature", "a finite number >= 0 (0 = greedy)")
        p = self.top_p
        if not _is_real(p) or not (0 < p <= 1):
            fail("top_p", "a number in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < 0:
            fail("top_k", "an int >= 0 (0 = off)")
        for name in ("alpha_presence", "alpha_frequency"):
            v = getattr(self, name)
            if not _is_real(v) or not math.isfinite(v):
                fail(name, "a finite number")
        d = self.alpha_decay
        if not _is_real(d) or not (0 <= d <= 1):
            fail("alpha_decay", "a number in [0, 1]")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            fail("seed", "None or an int >= 0")

        ss = self.stop_strings
        if isinstance(ss, str):
            ss = (ss,)
        try:
            ss = tuple(ss)
        except TypeError:
            fail("stop_strings", "a sequence of non-empty strings")
        for s in ss:
            if not isinstance(s, str) or not s:
                raise RwkvcError(f"SamplingConfig.stop_strings must contain non-empty strings, got {s!r}")

        set_ = object.__setattr__
        set_(self, "temperature", float(t))
        set_(self, "top_p", float(p))
        set_(self, "top_k", int(self.top_k))
        set_(self, "alpha_presence", float(self.alpha_presence))
        set_(self, "alpha_frequency", float(self.alpha_frequency))
        set_(self, "alpha_decay", float(d))
        set_(self, "token_ban", _id_tuple("token_ban", self.token_ban))
        set_(self, "token_stop", _id_tuple("token_stop", self.token_stop))
        set_(self, "stop_strings", ss)
        if self.seed is not None:
            set_(self, "seed", int(self.seed))


class Sampler:
    """Stateful sampler: holds the RNG and the decayed occurrence counts.

    ``tokenizer`` is optional; when given, tokens whose text is a substring of
    ``" \\t0123456789"`` (spaces, tabs, digits) count with weight 0 in
    :meth:`observe`, exactly like the official ``PIPELINE.generate``.  Without it,
    every observed token counts 1.
    """

    def __init__(self, cfg: SamplingConfig | None = None, tokenizer: Any = None):
        self.cfg = cfg if cfg is not None else SamplingConfig()
        self.rng = np.random.default_rng(self.cfg.seed)
        self._ban = np.asarray(self.cfg.token_ban, dtype=np.int64)
        self._stop = frozenset(self.cfg.token_stop)
        self._zero_weight: frozenset[int] = frozenset()
        if tokenizer is not None:
            self._zero_weight = frozenset(_zero_weight_ids(tokenizer))
        self.reset()

    # ----------------------------------------------------------------- state
    def reset(self, reseed: bool = False) -> None:
        """Forget occurrence counts (and optionally restart the RNG from cfg.seed)."""
        self._slot: dict[int, int] = {}  # token -> index into _ids/_counts
        self._ids = np.zeros(0, dtype=np.int64)
        self._counts = np.zeros(0, dtype=np.float64)
        if reseed:
            self.rng = np.random.default_rng(self.cfg.seed)

    @property
    def occurrence(self) -> dict[int, float]:
        """Decayed occurrence counts, like the official ``occurrence`` dict."""
        return {int(t): float(c) for t, c in zip(self._ids, self._counts)}

    def is_stop(self, token: int) -> bool:
        return token in self._stop

    def observe(self, token: int, weight: float | None = None) -> None:
        """Record an accepted token: decay all counts, then add its weight."""
        token = int(token)
        if weight is None:
            weight = 0.0 if token in self._zero_weight else 1.0
        if self._counts.size and self.cfg.alpha_decay != 1.0:
            self._counts *= self.cfg.alpha_decay
        slot = self._slot.get(token)
        if slot is None:
            self._slot[token] = len(self._ids)
            self._ids = np.append(self._ids, token)
            self._counts = np.append(self._counts, float(weight))
        else:
            self._counts[slot] += weight

    # --------------------------------------------------------------- sampling
    def adjust(self, logits: np.ndarray) -> np.ndarray:
        """Logits (float64 copy, 1-D) after bans and presence/frequency penalties."""
        x = np.array(logits, dtype=np.float64).reshape(-1)
        if x.size == 0:
            raise RwkvcError(_EMPTY)
        if self._ban.size:
            ban = self._ban[self._ban < x.size]
            x[ban] = -np.inf
        if self._ids.size:
            ids = self._ids
            keep = ids < x.size
            if not keep.all():
                ids, counts = ids[keep], self._counts[keep]
            else:
                counts = self._counts
            x[ids] -= self.cfg.alpha_presence + counts * self.cfg.alpha_frequency
        if np.isnan(x.max()):   # (max propagates a NaN: one pass, no mask)
            raise RwkvcError(_NAN)
        return x

    def _candidates(self, x: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """Kept token ids and their sampling weights (unnormalised) for adjusted logits x; ids None: every
        token, the weights over the whole vocabulary (zero where a token's probability underflows, which
        the cumulative sums step over, so a draw gives what the kept ids would)."""
        cfg = self.cfg
        m = x.max()
        if not np.isfinite(m):
            if m == -np.inf:
                raise RwkvcError(_NOTHING)
            # +inf logits: they share all the probability mass.
            ids = np.flatnonzero(x == np.inf)
            return ids, np.ones(ids.size)
        probs = x - m                      # exp(x - m) / sum, in one buffer
        np.exp(probs, out=probs)
        total = probs.sum()                # 1.0 exactly where one token holds all the mass
        probs /= total
        n = probs.size

        keep_mask = None
        if cfg.top_p < 1.0:
            cutoff = _top_p_cutoff(probs, cfg.top_p)
            keep_mask = probs >= cutoff
        k = cfg.top_k
        if 0 < k < n:
            # Both filters keep a prefix of the descending order: intersect by taking
            # the top k among the top-p survivors (cheaper than partitioning all of V).
            pool = np.flatnonzero(keep_mask) if keep_mask is not None else np.arange(n)
            if pool.size > k:
                pool = pool[np.argpartition(probs[pool], pool.size - k)[pool.size - k :]]
            ids = np.sort(pool)
        elif keep_mask is not None:
            ids = np.flatnonzero(keep_mask)
        elif cfg.temperature == 1.0 and total != 1.0:
            return None, probs            # every token (two or more positive): no index of them, no gather
        else:
            ids = np.flatnonzero(probs > 0)
        if ids.size == 0:  # cannot happen, but never return an empty set
            ids = np.array([int(np.argmax(x))])
        # probs ** (1/T) renormalised == exp((x - m) / T) renormalised (stable for small T).
        if cfg.temperature == 1.0:
            w = probs[ids]
        else:
            w = np.exp((x[ids] - m) / cfg.temperature)
        return ids, w

    def distribution(self, logits: np.ndarray) -> np.ndarray:
        """Full probability vector the next :meth:`sample` would draw from."""
        x = self.adjust(logits)
        out = np.zeros(x.size, dtype=np.float64)
        if self.cfg.temperature == 0:
            out[int(np.argmax(x))] = 1.0
            return out
        ids, w = self._candidates(x)
        if ids is None:
            return w / w.sum()
        out[ids] = w / w.sum()
        return out

    def sample(self, logits: np.ndarray) -> int:
        """Draw the next token id from ``logits`` (does not call :meth:`observe`)."""
        cfg = self.cfg
        if cfg.temperature == 0:
            if self._ban.size or (self._ids.size and (cfg.alpha_presence or cfg.alpha_frequency)):
                return _argmax(self.adjust(logits))
            a = np.asarray(logits).reshape(-1)   # nothing to adjust: the logits as given, no float64 copy
            if a.size == 0:
                raise RwkvcError(_EMPTY)
            return _argmax(a)
        ids, w = self._candidates(self.adjust(logits))
        if ids is not None and ids.size == 1:
            return int(ids[0])
        k = _draw_index(w, self.rng.random())
        if ids is None:   # the whole vocabulary: past the end means the last token of positive weight
            return k if k < w.size else int(np.flatnonzero(w)[-1])
        return int(ids[min(k, ids.size - 1)])

    def __call__(self, logits: np.ndarray) -> int:
        return self.sample(logits)


def _argmax(x: np.ndarray) -> int:
    """Greedy: the first index of the largest logit (a NaN is where argmax stops, and an error)."""
    k = int(np.argmax(x))
    if np.isnan(x[k]):
        raise RwkvcError(_NAN)
    if x[k] == -np.inf:
        raise RwkvcError(_NOTHING)
    return k


DRAW_BLOCK = 256


def _draw_index(w: np.ndarray, r: float) -> int:
    """The index at which the cumulative sum of the weights w first exceeds r times their total
    (np.searchsorted(np.cumsum(w), r * total, side="right"); w.size where rounding puts it past the end).
    Over a whole vocabulary in two levels: the sums of blocks of DRAW_BLOCK weights, then the cumulative sum
    of the one block the draw falls in (numpy's cumsum is sequential, ~3.5 ns an element: 0.23 ms over 65536;
    this ~0.02 ms). The sums are added in another order, so a draw can differ from the one-level draw only
    where it falls within rounding (~1e-16 of the total) of a boundary; a token of weight 0 is never drawn."""
    n = w.size
    if n < 4 * DRAW_BLOCK:
        c = np.cumsum(w)
        return int(np.searchsorted(c, r * c[-1], side="right"))
    sums = np.add.reduceat(w, np.arange(0, n, DRAW_BLOCK))
    cs = np.cumsum(sums)
    u = r * cs[-1]
    b = int(np.searchsorted(cs, u, side="right"))
    if b >= sums.size:
        return n
    block = w[b * DRAW_BLOCK:(b + 1) * DRAW_BLOCK]
    k = int(np.searchsorted((cs[b - 1] if b else 0.0) + np.cumsum(block), u, side="right"))
    if k >= block.size:   # the block's own sums rounded below u: its last token of positive weight
        k = int(np.flatnonzero(block)[-1])
    return b * DRAW_BLOCK + k


def _top_p_cutoff(probs: np.ndarray, top_p: float) -> float:
    """Probability of the token at which the descending cumulative sum first reaches top_p.

    Only tokens above a probability threshold are sorted (the set of tokens with
    p >= t is exactly a prefix of the descending order), lowering the threshold
    until the prefix reaches ``top_p``; peaked distributions never pay for a full
    sort of the vocabulary.  If rounding keeps the total below ``top_p`` the
    smallest positive probability is returned (keep everything), unlike the
    official code which would then fall back to greedy.
    """
    pmax = float(probs.max())
    if pmax >= top_p:
        return pmax
    for t in (1e-3, 1e-5, -1.0):
        top = probs[probs >= t] if t >= 0 else probs
        if t >= 0 and float(top.sum()) < top_p:
            continue
        top = np.sort(top)[::-1]
        cum = np.cumsum(top)
        hit = np.flatnonzero(cum >= top_p)
        if hit.size:
            return float(top[hit[0]])
    pos = probs[probs > 0]
    return float(pos.min()) if pos.size else 0.0


_ZERO_WEIGHT_CACHE: "weakref.WeakKeyDictionary[Any, list[int]]" = weakref.WeakKeyDictionary()


def _zero_weight_ids(tokenizer: Any) -> list[int]:
    """The ids whose text is in _ZERO_WEIGHT_TEXT, found once per tokenizer (a scan of the vocabulary costs
    ~0.1 s, which a server making a sampler per request must not pay each time)."""
    try:
        return _ZERO_WEIGHT_CACHE[tokenizer]
    except (KeyError, TypeError):
        pass
    out = _scan_zero_weight_ids(tokenizer)
    try:
        _ZERO_WEIGHT_CACHE[tokenizer] = out
    except TypeError:   # not weakly referenceable: no cache
        pass
    return out


def _scan_zero_weight_ids(tokenizer: Any) -> list[int]:
    table = getattr(tokenizer, "_id_to_bytes", None)
    out = []
    if table is None:
        return out
    for idx, b in enumerate(table):
        if b is None or len(b) > len(_ZERO_WEIGHT_TEXT):
            continue
        try:
            s = b.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if s in _ZERO_WEIGHT_TEXT:
            out.append(idx)
    return out
