"""The Python API.

    m = rwkvc.load("artifact_dir")
    logits, state = m.forward(tokens, state=None)   # logits of the last token, float32 (V,); state reusable
    text = m.generate("The", n=100, temperature=1.0, top_p=0.85)
    for piece in m.stream("The", n=100): print(piece, end="")

`forward` has the official `rwkv` package's meaning, but never mutates the state it is given: the
returned state is new, and the old one can be used again (to branch a conversation, say). A loop that keeps
only the latest state passes `in_place=True`: a decode step may then write the new state over the old one
(and its logits over the old logits), one state's memory instead of two; the numbers are the same.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from . import ir
from .artifact import read_manifest
from .errors import RwkvcError, RwkvcTypeError, RwkvcValueError


@dataclass
class Generation:
    text: str
    tokens: list[int]
    state: ir.State
    stop_reason: str   # "length", "stop_token", "stop_string"


class Model:
    def __init__(self, path: str | os.PathLike, threads: int | None = None, **runtime_options):
        from .options import RuntimeOptions
        from .runtimes import get_runtime
        from .hf_tokenizer import load_artifact_tokenizer
        self.options = RuntimeOptions.resolve(threads)
        from .integrity import check_on_load
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        check_on_load(self.path, self.manifest)
        try:
            self.config = ir.ModelConfig.from_dict(self.manifest["model"])
        except (KeyError, TypeError, ValueError) as e:
            raise RwkvcError(f"{self.path / 'manifest.json'}: its model description is damaged ({e!r}); "
                             "recompile the artifact") from None
        self._state_shapes = self.config.state_shapes()
        runtime = get_runtime(self.manifest["runtime"])
        known = set(inspect.signature(runtime).parameters) - {"path", "manifest", "threads"}
        unknown = sorted(set(runtime_options) - known)
        if unknown:
            raise RwkvcError(f"rwkvc.load: option {unknown[0]!r} is not one the {self.manifest['runtime']} runtime "
                             f"of this artifact takes (it takes: {', '.join(sorted(known)) or 'none'})")
        self.runtime = runtime(self.path, self.manifest, threads=self.options.threads, **runtime_options)
        self.tokenizer = load_artifact_tokenizer(self.path, self.manifest, self.config.vocab_size)
        self._init_state = self._load_init_state()

    def _load_init_state(self) -> ir.State | None:
        """The compiled-in initial state, or None for zeros (made anew on each use, in pages the system maps on
        first write: rwkvc.mapped.zero_pages; a zero state read by a forward costs no memory, a 1.5B's is
        12.4 MB)."""
        init = self.manifest.get("state", {}).get("init")
        if not init:
            return None
        with np.load(self.path / init) as z:
            return ir.State(z["shift"].astype(np.float32), z["wkv"].astype(np.float32))

    # -- state --------------------------------------------------------------------------------------
    def init_state(self) -> ir.State:
        """The model's initial state (zeros, or a tuned state compiled in)."""
        if self._init_state is None:
            from .mapped import zero_pages
            return ir.State.zeros(self.config, zero_pages)
        return self._init_state.copy()

    def use_state(self, state: str | os.PathLike | ir.State | None) -> ir.State:
        """Swap the initial state every forward/stream without an explicit state starts from: a tuned
        state file (blocks.N.att.time_state .pth/.safetensors, see rwkvc.states), a saved .npz state, an
        ir.State, or None for the artifact's own (zeros, or the state compiled in). Returns it."""
        if state is None:
            self._init_state = self._load_init_state()
        elif isinstance(state, ir.State):
            self._init_state = self.check_state(state)
        else:
            from .states import state_for_model
            self._init_state = state_for_model(state, self.config)
        return self.init_state()

    def check_state(self, state: ir.State) -> ir.State:
        if not isinstance(state, ir.State):
            raise RwkvcTypeError(f"a state is an rwkvc.ir.State (from forward, init_state or load_state), "
                                 f"not {type(state).__name__}")
        shift, wkv = state.shift, state.wkv
        if shift.shape != self._state_shapes["shift"] or wkv.shape != self._state_shapes["wkv"]:
            for name, shp in self._state_shapes.items():
                got = getattr(state, name).shape
                if tuple(got) != shp:
                    raise RwkvcValueError(f"state.{name} has shape {tuple(got)}, this model needs {shp}")
        if shift.dtype == np.float32 and wkv.dtype == np.float32 and shift.flags.c_contiguous and \
                wkv.flags.c_contiguous:            # the usual case (a state this model returned): no copy
            return state
        return ir.State(np.ascontiguousarray(state.shift, np.float32), np.ascontiguousarray(state.wkv, np.float32))

    @staticmethod
    def check_state_path(path: str | os.PathLike) -> Path:
        """Where save_state can write (checked before any work): not a directory, in one that exists."""
        p = Path(path)
        if p.is_dir():
            raise RwkvcError(f"{p}: is a directory; give a file name for the state (e.g. {p / 'state.npz'})")
        if not p.parent.is_dir():
            raise RwkvcError(f"{p.parent}: no such directory for the state file; create it first")
        if not os.access(p.parent, os.W_OK):
            raise RwkvcError(f"{p.parent}: not writable; save the state somewhere you can write")
        return p

    def save_state(self, state: ir.State, path: str | os.PathLike) -> None:
        p = self.check_state_path(path)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp.npz")
        try:
            np.savez(tmp, shift=state.shift, wkv=state.wkv, model=np.array(str(self.config.to_dict())))
            os.replace(tmp, p)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise RwkvcError(f"{p}: cannot write the state ({e.strerror}); nothing was written") from None

    def load_state(self, path: str | os.PathLike) -> ir.State:
        p = Path(path)
        if not p.exists():
            raise RwkvcError(f"{p}: no such state file")
        try:
            with np.load(p, allow_pickle=False) as z:
                st = ir.State(z["shift"], z["wkv"])
        except Exception as e:
            raise RwkvcError(f"{p}: not a state file saved by rwkvc ({type(e).__name__}: {e})") from None
        return self.check_state(st)

    # -- inference ----------------------------------------------------------------------------------
    def forward(self, tokens: int | Sequence[int], state: ir.State | None = None,
                in_place: bool = False) -> tuple[np.ndarray, ir.State]:
        """(logits of the last token, the state after all tokens). in_place: the caller gives `state` and the
        logits returned with it up (the module's docstring)."""
        if type(tokens) is list and len(tokens) == 1 and type(tokens[0]) is int:   # a decode step: no numpy
            lo = hi = tokens[0]
            toks = np.array(tokens, np.int64)
        else:
            toks = np.atleast_1d(np.asarray(tokens))
            if toks.size and not np.issubdtype(toks.dtype, np.integer):
                raise RwkvcTypeError(f"forward takes integer token ids, not {toks.dtype} values "
                                     "(encode text with m.encode)")
            toks = toks.astype(np.int64)
            if toks.ndim != 1 or toks.size == 0:
                raise RwkvcValueError("forward needs at least one token id")
            lo, hi = (int(toks[0]),) * 2 if toks.size == 1 else (int(toks.min()), int(toks.max()))
        if lo < 0 or hi >= self.config.vocab_size:
            bad = hi if hi >= self.config.vocab_size else lo
            raise RwkvcValueError(f"token id {bad} is outside this model's vocabulary 0..{self.config.vocab_size - 1} "
                             "(was the model trained with the RWKV World tokenizer?)")
        state = self.init_state() if state is None else self.check_state(state)
        if in_place and self._in_place:
            return self.runtime.forward(toks, state, in_place=True)
        return self.runtime.forward(toks, state)

    @property
    def _in_place(self) -> bool:
        """Whether this runtime's steps can write over the state they read (runtimes.onnxruntime)."""
        return bool(getattr(self.runtime, "wkv_in_place", {}).get("step"))

    def greedy_step(self, token: int, state: ir.State, in_place: bool = False) -> tuple[int, ir.State]:
        """One greedy decode step: (np.argmax of forward([token], state)'s logits, the new state). Where the
        artifact's head gives its top token (a clustered head with rwkvc's cpu kernels) and `state` came from a
        step, the logits are never written. in_place: as forward's."""
        step_top = getattr(self.runtime, "step_top", None)
        if step_top is not None and type(token) is int and 0 <= token < self.config.vocab_size:
            out = step_top(token, state, in_place=in_place and self._in_place)
            if out is not None:
                return out
        logits, state = self.forward([token], state, in_place)
        return int(np.argmax(logits)), state

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens)

    def stream(self, prompt: str | Sequence[int] = "", n: int = 100, state: ir.State | None = None,
               sampling=None, result: list | None = None, **sampling_kw) -> Iterator[str]:
        """Yield generated text as it comes. `result`, if given a list, receives the final Generation."""
        from .sampling import Sampler, SamplingConfig
        from .tokenizer import StreamDecoder
        cfg = sampling or SamplingConfig(**sampling_kw)
        if n < 0:
            raise RwkvcError("n (tokens to generate) must be >= 0")
        V = self.config.vocab_size
        for name, ids in (("token_ban", cfg.token_ban), ("token_stop", cfg.token_stop)):
            outside = [i for i in ids if not 0 <= i < V]
            if outside:
                raise RwkvcError(f"{name}: token id {outside[0]} is not in this model's vocabulary (0 to {V - 1})")
        # ids the vocabulary has no text for are never sampled
        unused = tuple(i for i in self.tokenizer.unused_ids if i < self.config.vocab_size)
        if unused:
            cfg = dataclasses.replace(cfg, token_ban=tuple(sorted(set(cfg.token_ban) | set(unused))))
        sampler = Sampler(cfg, tokenizer=self.tokenizer)
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if state is None:
            state = self.init_state()
        if not ids:
            ids = [0]  # an empty prompt starts a new document
        logits, state = self.forward(ids, state)
        dec = StreamDecoder(self.tokenizer)
        out_tokens: list[int] = []
        stops = tuple(cfg.stop_strings)
        hold = max((len(s) - 1 for s in stops), default=0)  # a tail that could still grow into a stop string
        text, emitted, reason = "", 0, "length"
        # greedy without penalties: a step that gives its top token instead of logits where the artifact has one
        # (the argmax of the logits: only a banned top needs the logits, and then the step is redone)
        step_top = getattr(self.runtime, "step_top", None) if cfg.temperature == 0 and not (
            cfg.alpha_presence or cfg.alpha_frequency) else None
        banned = frozenset(cfg.token_ban)
        top = None
        for _ in range(n):
            tok = sampler.sample(logits) if top is None else top
            if tok in cfg.token_stop:
                reason = "stop_token"
                break
            sampler.observe(tok)
            out_tokens.append(tok)
            # every state after the prompt's is this loop's own: a step writes over it (Model.forward's in_place),
            # except a top-token step that a banned top would redo from the state it read
            out = (step_top(tok, state, in_place=not banned and self._in_place) if step_top is not None
                   else None)
            if out is not None and out[0] not in banned:
                top, state = out
            else:
                top = None
                logits, state = self.forward([tok], state, in_place=True)   # the state holds every token emitted
            text += dec.feed(tok)
            hit = min((i for i in (text.find(s, max(0, emitted - hold)) for s in stops) if i >= 0), default=-1)
            if hit >= 0:
                text, reason = text[:hit], "stop_string"
                break
            if len(text) - hold > emitted:
                yield text[emitted:len(text) - hold]
                emitted = len(text) - hold
        if reason != "stop_string":
            text += dec.flush()
        if len(text) > emitted:
            yield text[emitted:]
        if result is not None:
            result.append(Generation(text, out_tokens, state, reason))

    def generate(self, prompt: str | Sequence[int] = "", n: int = 100, **kw) -> str:
        return "".join(self.stream(prompt, n, **kw))


class GptModel(Model):
    """A GPT artifact (rwkvc compile GPT.pth; targets/gpt_onnx.py): the same forward / stream / generate; its
    state is the KV cache (rwkvc.runtimes.gpt.KVCache), which grows with the context."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, **runtime_options):
        if runtime_options:
            raise RwkvcError(f"rwkvc.load: option {sorted(runtime_options)[0]!r} is not one a GPT artifact takes "
                             "(it takes: threads)")
        from .integrity import check_on_load
        from .options import RuntimeOptions
        from .runtimes.gpt import GptRuntime
        from .hf_tokenizer import load_artifact_tokenizer
        self.options = RuntimeOptions.resolve(threads)
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        check_on_load(self.path, self.manifest)
        self.runtime = GptRuntime(self.path, self.manifest, threads=self.options.threads)
        self.config = self.runtime.shape
        self.tokenizer = load_artifact_tokenizer(self.path, self.manifest)

    def init_state(self):
        return self.runtime.empty_cache()

    def check_state(self, state):
        return self.runtime.check_cache(state)

    def use_state(self, state):
        raise RwkvcError(f"{self.path}: a GPT artifact has no initial state to swap (its state is the KV cache)")

    def save_state(self, *args):
        raise RwkvcError(f"{self.path}: saving or loading a GPT's KV cache is not supported; keep the prompt "
                         "instead")

    load_state = check_state_path = save_state


# manifest["model"]["kind"] -> the Model class that runs it (RWKV artifacts have no kind)
MODEL_KINDS = {"rwkv": Model, "gpt": GptModel}


def load(path: str | os.PathLike, threads: int | None = None, **runtime_options) -> Model:
    """Load a compiled artifact directory."""
    kind = read_manifest(path)["model"].get("kind", "rwkv")
    if kind not in MODEL_KINDS:
        raise RwkvcError(f"{path}: an artifact of model kind {kind!r}, which this rwkvc cannot run; upgrade rwkvc")
    return MODEL_KINDS[kind](path, threads=threads, **runtime_options)
