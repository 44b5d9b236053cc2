"""Run a GPT artifact (targets/gpt_onnx.py) with ONNX Runtime: the transformer's state is its KV cache.

    rt = GptRuntime(path, manifest, threads=2)
    logits, cache = rt.forward(np.array(tokens), rt.empty_cache())     # prefill
    logits, cache = rt.forward(np.array([tok]), cache)                 # one step

A KVCache holds every cached token's key and value per layer, (H, P, N) each, and the tokens themselves.
forward never changes the cache it is given (the graphs write new arrays), so a cache can be branched
like an RWKV state. The learned positions end at block_size: a forward that would pass it restarts the
cache from the last block_size // 2 tokens, or from the last block_size tokens of a longer prompt (re-run
through the prefill graph), as nanoGPT's sampler crops its context; `restarts` counts how often.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rwkvc.errors import RwkvcError, RwkvcTypeError, RwkvcValueError


@dataclass(frozen=True)
class GptShape:
    """A GPT artifact's dimensions, from manifest["model"]."""
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    block_size: int
    ffn_dim: int

    def __post_init__(self):
        for f in self.__dataclass_fields__:
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"GptShape.{f} must be a positive int, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GptShape.n_embd ({self.n_embd}) is not a multiple of n_head ({self.n_head})")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @staticmethod
    def from_dict(d: dict) -> "GptShape":
        return GptShape(**{k: d[k] for k in GptShape.__dataclass_fields__})

    def to_dict(self) -> dict:
        return {"kind": "gpt", **{k: getattr(self, k) for k in self.__dataclass_fields__}}


@dataclass
class KVCache:
    """keys[i], values[i]: (H, P, N) float32 for layer i; tokens: the P token ids they were computed from."""
    keys: list
    values: list
    tokens: np.ndarray

    @property
    def length(self) -> int:
        return int(self.tokens.size)

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values: 2 L H P N * 4, growing with every token."""
        return sum(a.nbytes for a in self.keys) + sum(a.nbytes for a in self.values)

    def copy(self) -> "KVCache":
        return KVCache([a.copy() for a in self.keys], [a.copy() for a in self.values], self.tokens.copy())

    @staticmethod
    def empty(shape: GptShape) -> "KVCache":
        z = np.zeros((shape.n_head, 0, shape.head_size), np.float32)
        return KVCache([z] * shape.n_layer, [z] * shape.n_layer, np.zeros(0, np.int64))


class GptRuntime:
    """forward(tokens (T,) int64, cache) -> logits (V,) float32 of the last token, new cache."""

    def __init__(self, path: Path, manifest: dict, threads: int | None = None, prefill_chunk: int = 512):
        import onnxruntime as ort
        self.path, self.manifest = Path(path), manifest
        try:
            self.shape = GptShape.from_dict(manifest["model"])
        except (KeyError, TypeError, ValueError) as e:
            raise RwkvcError(f"{self.path / 'manifest.json'}: its GPT description is damaged ({e!r}); "
                             "export the checkpoint again") from None
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or 0
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.so, self._sessions, self.restarts, self.prefill_chunk = so, {}, 0, prefill_chunk
        self.session("step")

    def session(self, entry: str):
        if entry not in self._sessions:
            import onnxruntime as ort

            from rwkvc.artifact import inside
            fn = inside(self.path, self.manifest["entry_points"][entry], f"entry point {entry}")
            try:
                self._sessions[entry] = ort.InferenceSession(str(fn), self.so, providers=["CPUExecutionProvider"])
            except Exception as e:  # ORT raises its own Fail/InvalidGraph types
                raise RwkvcError(f"{fn}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]}); "
                                 "export the artifact again") from None
        return self._sessions[entry]

    def empty_cache(self) -> KVCache:
        return KVCache.empty(self.shape)

    def check_cache(self, cache) -> KVCache:
        if not isinstance(cache, KVCache):
            raise RwkvcTypeError(f"a GPT artifact's state is its KVCache (from forward or init_state), not "
                                 f"{type(cache).__name__}")
        s = self.shape
        want = (s.n_head, cache.length, s.head_size)
        for name, arrs in (("keys", cache.keys), ("values", cache.values)):
            if len(arrs) != s.n_layer or any(tuple(a.shape) != want for a in arrs):
                raise RwkvcValueError(f"KVCache.{name} does not fit this model: it needs {s.n_layer} arrays of "
                                      f"shape {want}")
        return cache

    def run(self, entry: str, tokens: np.ndarray, cache: KVCache) -> tuple[np.ndarray, KVCache]:
        feed = {"tokens": np.ascontiguousarray(tokens, np.int64)}
        for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
            feed[f"past_key.{i}"], feed[f"past_value.{i}"] = k, v
        out = self.session(entry).run(None, feed)
        L = self.shape.n_layer
        return out[0], KVCache(out[1:2 * L + 1:2], out[2:2 * L + 1:2], np.concatenate([cache.tokens, tokens]))

    def forward(self, tokens: np.ndarray, cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """A prompt goes through the prefill graph prefill_chunk tokens at a time (the attention scores of a
        chunk are (H, chunk, P + chunk) floats, not (H, T, T)); one token through the step graph."""
        block = self.shape.block_size
        if cache.length + len(tokens) > block:   # past the learned positions: restart from the recent tokens
            self.restarts += 1
            everything = np.concatenate([cache.tokens, tokens])
            tokens, cache = everything[-max(min(len(tokens), block), block // 2):], self.empty_cache()
        logits = None
        for s in range(0, len(tokens), self.prefill_chunk):
            chunk = tokens[s:s + self.prefill_chunk]
            logits, cache = self.run("step" if len(chunk) == 1 else "prefill", chunk, cache)
        return logits, cache
