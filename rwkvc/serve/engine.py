"""The serving engine: one worker thread that runs every live request with continuous batching.

    engine = Engine(rwkvc.load(DIR), max_batch=8, cache_bytes=256 << 20)
    handle = engine.submit(Job(segments=[tokens], max_tokens=100, sampling=cfg), on_event)
    # on_event("text", piece) ... then on_event("done", {"finish_reason": ..., "usage": {...}})
    #                              or on_event("error", message)

Each turn of the worker: waiting requests are taken in while there is room and their prompts prefilled,
oldest first, about prefill_chunk tokens a turn (from the longest cached prefix, rwkvc.serve.cache); where
two or more joining prompts each have at least MIN_BATCH_PREFILL tokens left before their next segment
end, up to prefill_chunk // MIN_BATCH_PREFILL of them advance together by the same count of tokens in one batched prefill call
(rwkvc.runtimes.ort_batch.prefill_batch; no padding, so each state is that of its own prefill), the
shorter tails one by one; a request whose prompt is done samples its first token and joins; then one batched step advances every live
sequence by a token (rwkvc.runtimes.ort_batch.BatchPool: one graph call for all, a lone sequence too), and
each samples its next token with its own sampler and seed; finished and
cancelled sequences leave. So requests
join and leave between steps, and a sequence's tokens depend only on its own prompt, sampling options and
seed (its logits are those of a separate decode, to float rounding).

A request's generation follows rwkvc.api.Model.stream exactly (the same sampler calls, stop tokens, stop
strings held back until they can no longer match, the same text), so the server's greedy output is
`rwkvc run`'s. Artifacts without a batched step graph, and --max-batch 1, step the live sequences one by
one with the artifact's own step (SequentialPool).
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from rwkvc import ir
from rwkvc.errors import RwkvcError
from rwkvc.sampling import Sampler, SamplingConfig
from rwkvc.tokenizer import StreamDecoder

from .cache import PrefixCache, prefix_hashes

log = logging.getLogger("rwkvc.serve")

MIN_BATCH_PREFILL = 128  # tokens per sequence below which a batched prefill is not faster than separate ones


@dataclass(frozen=True)
class Job:
    """One generation: the prompt as token segments (the cache keeps the state after each segment's end),
    how many tokens at most, how to sample."""
    segments: tuple[tuple[int, ...], ...]
    max_tokens: int
    sampling: SamplingConfig

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise RwkvcError(f"max_tokens must be an int >= 0, got {self.max_tokens!r}")
        object.__setattr__(self, "segments", tuple(tuple(int(t) for t in s) for s in self.segments))

    @property
    def tokens(self) -> list[int]:
        return [t for s in self.segments for t in s]


class SequentialPool:
    """BatchPool's interface over the artifact's own one-sequence step: the live sequences one by one."""

    def __init__(self, model, max_batch: int):
        self.model, self.max_batch = model, max_batch
        self.states: list[ir.State] = []

    @property
    def n(self) -> int:
        return len(self.states)

    state_bytes = 0

    def add(self, state: ir.State) -> int:
        self.states.append(state)
        return len(self.states) - 1

    def state(self, slot: int) -> ir.State:
        return self.states[slot].copy()

    def remove(self, slot: int) -> int:
        last = len(self.states) - 1
        self.states[slot] = self.states[last]
        self.states.pop()
        return last

    def step(self, tokens) -> np.ndarray:
        out = []
        for i, t in enumerate(tokens):
            logits, self.states[i] = self.model.forward([int(t)], self.states[i])
            out.append(logits)
        return np.stack(out)


class Handle:
    """A submitted request: cancel() makes it leave at the next step (no more events)."""

    _ids = iter(range(1, 1 << 62))

    def __init__(self, job: Job, on_event: Callable, sampler: Sampler, tokenizer, stop_ids: frozenset):
        self.id = next(Handle._ids)
        self.job, self.on_event, self.sampler = job, on_event, sampler
        self.dec = StreamDecoder(tokenizer)
        cfg = sampler.cfg
        self.stops = tuple(cfg.stop_strings)
        self.hold = max((len(s) - 1 for s in self.stops), default=0)
        self.stop_ids = stop_ids
        self.text, self.emitted, self.reason = "", 0, "length"
        self.out_tokens: list[int] = []
        self.pending = -1                   # the token the next step feeds
        self.cancelled = False
        self.prompt_tokens = self.cached_tokens = 0
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None

    def cancel(self) -> None:
        self.cancelled = True

    def choose(self, logits: np.ndarray) -> int | None:
        """The next token from `logits`, or None when the request ends here (a stop token)."""
        tok = self.sampler.sample(logits)
        if tok in self.stop_ids:
            self.reason = "stop_token"
            return None
        self.sampler.observe(tok)
        self.out_tokens.append(tok)
        return tok

    def feed(self, tok: int) -> bool:
        """Add the token's text (sending what can no longer be part of a stop string); True when the
        request ends here (a stop string, or max_tokens reached)."""
        if self.t_first is None:
            self.t_first = time.perf_counter()
        self.text += self.dec.feed(tok)
        lo = max(0, self.emitted - self.hold)
        hit = min((i for i in (self.text.find(s, lo) for s in self.stops) if i >= 0), default=-1)
        if hit >= 0:
            self.text, self.reason = self.text[:hit], "stop_string"
            return True
        if len(self.text) - self.hold > self.emitted:
            self.on_event("text", self.text[self.emitted:len(self.text) - self.hold])
            self.emitted = len(self.text) - self.hold
        return len(self.out_tokens) >= self.job.max_tokens

    def finish(self) -> None:
        if self.reason != "stop_string":
            self.text += self.dec.flush()
        if len(self.text) > self.emitted:
            self.on_event("text", self.text[self.emitted:])
            self.emitted = len(self.text)
        self.on_event("done", {
            "finish_reason": "length" if self.reason == "length" else "stop", "stop_reason": self.reason,
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.out_tokens),
                      "total_tokens": self.prompt_tokens + len(self.out_tokens)},
            "cached_tokens": self.cached_tokens, "tokens": list(self.out_tokens), "text": self.text})


class Engine:
    def __init__(self, model, max_batch: int = 8, cache_bytes: int = 256 << 20, batched: bool | None = None,
                 prefill_chunk: int = 512, batch_prefill: bool | None = None,
                 batch_prefill_min: int = MIN_BATCH_PREFILL):
        """model: an rwkvc.api.Model. batched: the artifact's batched step graph (None: where it has one and
        max_batch > 1). prefill_chunk: prompt tokens prefilled between two steps of the live sequences.
        batch_prefill: joining prompts prefilled together through the artifact's batched prefill graph
        (None: where it has one and max_batch > 1), at least batch_prefill_min tokens each (so at most
        prefill_chunk // batch_prefill_min prompts a call)."""
        from rwkvc.runtimes.ort_batch import BatchPool, has_batch_prefill, has_batch_step
        if not isinstance(max_batch, int) or max_batch < 1:
            raise RwkvcError(f"--max-batch must be >= 1, got {max_batch!r}")
        self.model, self.max_batch = model, max_batch
        self.cache = PrefixCache(cache_bytes)
        if batched is None:
            batched = max_batch > 1 and has_batch_step(model.manifest)
        self.pool = BatchPool(model.runtime, max_batch) if batched else SequentialPool(model, max_batch)
        self.batched = batched
        if batch_prefill is None:
            batch_prefill = max_batch > 1 and has_batch_prefill(model.manifest)
        if not isinstance(batch_prefill_min, int) or batch_prefill_min < 1:
            raise RwkvcError(f"batch_prefill_min must be an int >= 1, got {batch_prefill_min!r}")
        self.batch_prefill, self.batch_prefill_min = batch_prefill, batch_prefill_min
        vocab = model.config.vocab_size
        self._unused = tuple(i for i in model.tokenizer.unused_ids if i < vocab)
        self.pending: deque[Handle] = deque()
        self.live: list[Handle] = []
        self.prefilling: list[list] = []   # [handle, its _prefill_chunks generator, (span, state) it asks for]
        if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise RwkvcError(f"prefill_chunk must be an int >= 1, got {prefill_chunk!r}")
        self.prefill_chunk = prefill_chunk
        self.cv = threading.Condition()
        self._stop = False
        self.counts = {"requests": 0, "completed": 0, "failed": 0, "cancelled": 0, "generated_tokens": 0,
                       "prompt_tokens": 0, "steps": 0, "step_sequences": 0, "peak_running": 0,
                       "batched_prefills": 0, "batched_prefill_tokens": 0}
        self.thread = threading.Thread(target=self._run, name="rwkvc-serve-engine", daemon=True)
        self.thread.start()

    # -- the requests' side (any thread) ------------------------------------------------------------
    def submit(self, job: Job, on_event: Callable) -> Handle:
        cfg = job.sampling
        V = self.model.config.vocab_size
        for name, ids in (("ban_token_ids", cfg.token_ban), ("stop_token_ids", cfg.token_stop)):
            bad = [i for i in ids if not 0 <= i < V]
            if bad:
                raise RwkvcError(f"{name}: token id {bad[0]} is not in this model's vocabulary (0 to {V - 1})")
        bad = [t for t in job.tokens if not 0 <= t < V]
        if bad:
            raise RwkvcError(f"prompt token id {bad[0]} is not in this model's vocabulary (0 to {V - 1})")
        if self._unused:
            cfg = dataclasses.replace(cfg, token_ban=tuple(sorted(set(cfg.token_ban) | set(self._unused))))
        h = Handle(job, on_event, Sampler(cfg, tokenizer=self.model.tokenizer), self.model.tokenizer,
                   frozenset(cfg.token_stop))
        with self.cv:
            if self._stop:
                raise RwkvcError("the server is shutting down")
            self.pending.append(h)
            self.counts["requests"] += 1
            self.cv.notify()
        return h

    def close(self) -> None:
        with self.cv:
            self._stop = True
            self.cv.notify()
        self.thread.join(timeout=30)

    def stats(self) -> dict:
        c = dict(self.counts)
        c["mean_batch"] = c["step_sequences"] / c["steps"] if c["steps"] else 0.0
        return {**c, "running": len(self.live), "waiting": len(self.pending) + len(self.prefilling),
                "max_batch": self.max_batch,
                "batched_step": self.batched, "batched_prefill": self.batch_prefill, "state_pool_bytes": int(self.pool.state_bytes),
                "prefix_cache": self.cache.stats()}

    # -- the worker -----------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cv:
                while not self._stop and not self.pending and not self.live and not self.prefilling:
                    self.cv.wait()
                if self._stop:
                    break
                while self.pending and len(self.live) + len(self.prefilling) < self.max_batch:
                    h = self.pending.popleft()
                    self.prefilling.append([h, self._prefill_chunks(h.job, self.prefill_chunk), None])
            try:
                self._advance_prefills()
                self._drop_cancelled()
                if self.live:
                    self._step()
            except Exception as e:   # never leave a request waiting: fail the live ones, keep serving
                log.exception("engine step failed")
                failed = [e[0] for e in self.prefilling]
                self.prefilling.clear()
                while self.live:
                    failed.append(self.live[-1])
                    self._leave(len(self.live) - 1, finished=False)
                for h in failed:
                    self.counts["failed"] += 1
                    h.on_event("error", f"internal error: {type(e).__name__}: {e}")
        for h in list(self.pending) + [e[0] for e in self.prefilling] + self.live:   # shutting down
            h.on_event("error", "the server is shutting down")

    def _advance_prefills(self) -> None:
        """Prefill the joining requests, oldest first, about prefill_chunk tokens a turn, so a long prompt
        holds up the live sequences' steps by one chunk at a time; a request whose prompt is done joins.
        Prompts with at least batch_prefill_min tokens to go before their next segment end advance together,
        as many as the turn's budget gives each that many (one batched prefill call, the same count of
        tokens each)."""
        budget = self.prefill_chunk
        while self.prefilling and budget > 0:
            for e in [e for e in self.prefilling if e[0].cancelled]:
                self.prefilling.remove(e)
                self.counts["cancelled"] += 1
            for e in [e for e in self.prefilling if e[2] is None]:   # newly taken in: what they ask for first
                self._resume(e, None)
            if not self.prefilling:
                break
            lo = self.batch_prefill_min
            group = [e for e in self.prefilling if len(e[2][0]) >= lo][:budget // lo] if self.batch_prefill else []
            T = min([len(e[2][0]) for e in group] + [budget // max(1, len(group))])
            if len(group) >= 2 and T >= lo:
                from rwkvc.runtimes.ort_batch import prefill_batch
                logits, states = prefill_batch(self.model.runtime, [e[2][0][:T] for e in group],
                                               [e[2][1] for e in group])
                self.counts["batched_prefills"] += 1
                self.counts["batched_prefill_tokens"] += T * len(group)
                for b, e in enumerate(group):
                    self._resume(e, (logits[b].copy(), states[b], T))
                budget -= T * len(group)
                continue
            e = self.prefilling[0]
            span, state = e[2]
            self._resume(e, (*self.model.forward(span, state), len(span)))
            budget -= len(span)

    def _resume(self, e: list, result) -> None:
        """Hand a prefilling request's generator the result of its last span (None: start it); it asks for
        its next span, or is done (it joins) or failed (it leaves with an error)."""
        h, gen = e[0], e[1]
        try:
            e[2] = next(gen) if result is None else gen.send(result)
            return
        except StopIteration as done:
            self.prefilling.remove(e)
            logits, state, h.cached_tokens = done.value
        except RwkvcError as err:
            self.prefilling.remove(e)
            self.counts["failed"] += 1
            h.on_event("error", str(err))
            return
        self._join(h, logits, state)

    def _prefill_chunks(self, job: Job, chunk: int | None):
        """Prefill the job's prompt from its longest cached prefix: yields (span, state), the next tokens to
        prefill (up to `chunk`, within one segment) and the state they start from, and is sent (logits,
        state, n): the result after the span's first n tokens. Caches the state after each segment's end;
        returns (logits, state, tokens found in the cache)."""
        toks = job.tokens or [0]                   # an empty prompt starts a new document (as Model.stream)
        ends, n = [], 0
        for s in job.segments:
            n += len(s)
            if s and n not in ends:
                ends.append(n)
        if not ends or ends[-1] != len(toks):
            ends.append(len(toks))
        hs = prefix_hashes(toks)
        done, hit = self.cache.longest(toks, hs)
        cached = done
        logits, state = hit if hit is not None else (None, self.model.init_state())
        for e in ends:
            if e <= done:
                continue
            while done < e:
                stop = e if chunk is None else min(e, done + chunk)
                logits, state, n = yield toks[done:stop], state
                done += n
            self.cache.put(toks[:e], logits, state, hs[e - 1])
        return logits, state, cached

    def prefill(self, job: Job) -> tuple[np.ndarray, ir.State, int]:
        """Logits and state after the job's prompt, from its longest cached prefix (caching the state after
        each segment's end). Returns (logits, state, tokens found in the cache)."""
        gen = self._prefill_chunks(job, None)
        try:
            span, state = next(gen)
            while True:
                span, state = gen.send((*self.model.forward(span, state), len(span)))
        except StopIteration as done:
            return done.value

    def _join(self, h: Handle, logits: np.ndarray, state: ir.State) -> None:
        h.prompt_tokens = max(1, len(h.job.tokens))
        self.counts["prompt_tokens"] += h.prompt_tokens
        if h.job.max_tokens == 0:
            self._done(h)
            return
        tok = h.choose(logits)
        if tok is None or h.feed(tok):
            self._done(h)
            return
        h.pending = tok
        self.pool.add(state)
        self.live.append(h)

    def _step(self) -> None:
        # a lone sequence too: the batched graph at B = 1 runs as fast as the artifact's own step, and the
        # state stays in the pool (the own step, with the state moved out and back, took 1.15-1.24x the time
        # on the 0.1B int4 and 1.06x on fp32: bench/lone_step.py)
        logits = self.pool.step([h.pending for h in self.live])
        self.counts["steps"] += 1
        self.counts["step_sequences"] += len(self.live)
        self.counts["peak_running"] = max(self.counts["peak_running"], len(self.live))
        ended = []
        for i, h in enumerate(self.live):
            tok = h.choose(logits[i])
            if tok is None or h.feed(tok):
                ended.append(i)
            else:
                h.pending = tok
        for i in reversed(ended):
            self._leave(i)

    def _drop_cancelled(self) -> None:
        for i in reversed(range(len(self.live))):
            if self.live[i].cancelled:
                self._leave(i, finished=False)
                self.counts["cancelled"] += 1

    def _leave(self, i: int, finished: bool = True) -> None:
        h = self.live[i]
        moved = self.pool.remove(i)
        if moved != i:
            self.live[i] = self.live[moved]
        self.live.pop()
        if finished:
            self._done(h)

    def _done(self, h: Handle) -> None:
        self.counts["completed"] += 1
        self.counts["generated_tokens"] += len(h.out_tokens)
        h.finish()
        t = time.perf_counter() - h.t_submit
        log.info("request %d: %d prompt tokens (%d from the prefix cache), %d generated, %s, %.2f s", h.id,
                 h.prompt_tokens, h.cached_tokens, len(h.out_tokens), h.reason, t)
