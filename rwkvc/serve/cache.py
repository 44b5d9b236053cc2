"""A bounded cache of the states after prompt prefixes (an RNN's whole past is its state: a few MB however
long the prefix).

    cache = PrefixCache(max_bytes=256 << 20)
    n, entry = cache.longest(tokens)        # the longest cached prefix of tokens: n tokens, (logits, state)
    cache.put(tokens[:k], logits, state)    # after prefilling k tokens

Keys are token prefixes, found by a rolling hash of every prefix of the prompt (one pass over its tokens)
and confirmed by comparing the tokens; entries are evicted least recently used first, counted in bytes
(state + the logits after the prefix, which a prompt that ends exactly there needs, + the key), and never
exceed max_bytes in all. Entries are copies: what a caller does with the arrays it gets back (also copies)
cannot change them. Thread-safe.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from rwkvc import ir

_MOD = (1 << 61) - 1
_BASE = 1_000_003


def prefix_hashes(tokens) -> list[int]:
    """h[k] = hash of tokens[:k+1] (a polynomial rolling hash modulo a Mersenne prime)."""
    out, h = [], 0
    for t in tokens:
        h = (h * _BASE + int(t) + 1) % _MOD
        out.append(h)
    return out


@dataclass
class Entry:
    tokens: tuple[int, ...]
    logits: np.ndarray      # (V,) float32: the logits after the prefix's last token
    state: ir.State
    nbytes: int


class PrefixCache:
    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = int(max_bytes)
        self._d: OrderedDict[tuple[int, int], Entry] = OrderedDict()   # (length, hash) -> entry, LRU first
        self.bytes = 0
        self.hits = self.misses = self.tokens_reused = self.evictions = 0
        self._lock = threading.Lock()

    def longest(self, tokens, hashes: list[int] | None = None) -> tuple[int, tuple[np.ndarray, ir.State] | None]:
        """(n, (logits, state)) for the longest cached prefix tokens[:n] (n >= 1), copies; (0, None) if none.
        Counts a hit or a miss."""
        hs = hashes if hashes is not None else prefix_hashes(tokens)
        with self._lock:
            for n in range(len(hs), 0, -1):
                e = self._d.get((n, hs[n - 1]))
                if e is not None and list(e.tokens) == list(tokens[:n]):
                    self._d.move_to_end((n, hs[n - 1]))
                    self.hits += 1
                    self.tokens_reused += n
                    return n, (e.logits.copy(), e.state.copy())
            self.misses += 1
            return 0, None

    def put(self, tokens, logits: np.ndarray, state: ir.State, hash_: int | None = None) -> bool:
        """Keep (copies of) the logits and state after `tokens`; False where one entry exceeds the cache."""
        tokens = tuple(int(t) for t in tokens)
        if not tokens:
            return False
        key = (len(tokens), hash_ if hash_ is not None else prefix_hashes(tokens)[-1])
        nbytes = int(state.shift.nbytes + state.wkv.nbytes + np.asarray(logits).nbytes + 8 * len(tokens))
        if nbytes > self.max_bytes:
            return False
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            while self._d and self.bytes + nbytes > self.max_bytes:
                _, ev = self._d.popitem(last=False)
                self.bytes -= ev.nbytes
                self.evictions += 1
            self._d[key] = Entry(tokens, np.array(logits, np.float32), state.copy(), nbytes)
            self.bytes += nbytes
        return True

    def stats(self) -> dict:
        with self._lock:
            looked = self.hits + self.misses
            return {"entries": len(self._d), "bytes": self.bytes, "max_bytes": self.max_bytes, "hits": self.hits,
                    "misses": self.misses, "hit_rate": self.hits / looked if looked else 0.0,
                    "tokens_reused": self.tokens_reused, "evictions": self.evictions}
