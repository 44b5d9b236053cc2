"""Batched decode on an artifact's batch_step graph (rwkvc.targets.onnx.batch): B live sequences in slots
0..B-1 of state pools, one graph call a step for all of them.

The pools are double-buffered: a step reads slots 0..B-1 of one pool and writes the same slots of the
other (ONNX Runtime's outputs bound straight into it), then the two swap, so a step copies no state. Where
every layer's new matrix state comes from rwkvc's Rwkv7WkvStepB (which writes each state row after its last
read of it), the matrix states have one pool, updated in place: half the memory, and a step's writes land
on the lines it has just read instead of a second pool's. A
sequence joins by having its state written into slot B; one that leaves is replaced by the last slot's
sequence (one state copy), so the live slots stay a contiguous block, which is what the graph takes.

    pool = BatchPool(runtime, max_batch=8)
    slot = pool.add(state)               # a prefilled sequence joins
    logits = pool.step(tokens)           # tokens (B,) int64 -> logits (B, V), a view valid until the next step
    moved = pool.remove(slot)            # the slot now holds the sequence that was in slot `moved`

    logits, states = prefill_batch(runtime, tokens, states)   # B sequences T tokens each, one graph call
"""
from __future__ import annotations

import numpy as np

from rwkvc import ir
from rwkvc.errors import RwkvcError

from .onnxruntime import _c_bound, _run_bound

BATCH_ENTRY = "batch_step"
BATCH_PREFILL_ENTRY = "batch_prefill"


def has_batch_step(manifest: dict) -> bool:
    return BATCH_ENTRY in manifest.get("entry_points", {}) and manifest.get("runtime") == "onnxruntime"


def has_batch_prefill(manifest: dict) -> bool:
    return BATCH_PREFILL_ENTRY in manifest.get("entry_points", {}) and manifest.get("runtime") == "onnxruntime"


def prefill_batch(runtime, tokens, states: list[ir.State]) -> tuple[np.ndarray, list[ir.State]]:
    """B sequences advance by T tokens each in one batch_prefill call: tokens (B, T) int (every one a real
    token: equal-length chunks, no padding), states[b] the state of sequence b -> (logits (B, V) of each
    sequence's last token, the B new states)."""
    if not has_batch_prefill(runtime.manifest):
        raise RwkvcError(f"{runtime.path}: this artifact has no batched prefill graph (RWKV-7 float32 artifacts "
                         "compiled by this rwkvc have one); recompile it")
    toks = np.ascontiguousarray(tokens, np.int64)
    if toks.ndim != 2 or toks.shape[0] != len(states) or toks.shape[1] == 0:
        raise RwkvcError(f"prefill_batch: tokens of shape {toks.shape} for {len(states)} states (want (B, T), T >= 1)")
    feed = {"tokens": toks, "shift_in": np.stack([s.shift for s in states]).astype(np.float32, copy=False)}
    L = states[0].wkv.shape[0]
    runtime.read_rows(toks.reshape(-1))
    for i in range(L):
        feed[f"wkv_in.{i}"] = np.ascontiguousarray(np.stack([s.wkv[i] for s in states]), np.float32)
    out = runtime.session(BATCH_PREFILL_ENTRY).run(None, feed)
    logits, shift, wkv = out[0], out[1], out[2:]
    return logits, [ir.State(shift[b], np.stack([w[b] for w in wkv])) for b in range(len(states))]


class BatchPool:
    def __init__(self, runtime, max_batch: int):
        if max_batch < 1:
            raise RwkvcError(f"max_batch must be >= 1, got {max_batch}")
        if not has_batch_step(runtime.manifest):
            raise RwkvcError(f"{runtime.path}: this artifact has no batched step graph (RWKV-7 float32 artifacts "
                             "compiled by this rwkvc have one); recompile it, or serve with --max-batch 1")
        self.runtime = runtime   # (its mappings hold the weights the session reads: the pool keeps them alive)
        self.sess = runtime.session(BATCH_ENTRY)
        st = runtime.manifest["state"]
        self.shift_shape, self.wkv_shape = tuple(st["shift"]), tuple(st["wkv"])     # (L, 2, C), (L, H, N, N)
        # the shift as the graph takes it: (B, 2L, C), or (B, L, 2, C) in earlier artifacts (the same memory)
        L2C = (2 * self.shift_shape[0], self.shift_shape[2])
        rank = len(next(i.shape for i in self.sess.get_inputs() if i.name == "shift_in"))
        self.shift_dims = list(L2C if rank == 3 else self.shift_shape)
        self.vocab = int(runtime.manifest["model"]["vocab_size"])
        self.max_batch, self.n = max_batch, 0
        L = self.wkv_shape[0]
        self.shift = [np.zeros((max_batch, *self.shift_shape), np.float32) for _ in range(2)]
        self.in_place = runtime.wkv_in_place.get(BATCH_ENTRY, False)
        wkv = [np.zeros((max_batch, *self.wkv_shape[1:]), np.float32) for _ in range(L)]
        self.wkv = [wkv, wkv if self.in_place else [np.zeros_like(w) for w in wkv]]
        self.logits = np.zeros((max_batch, self.vocab), np.float32)
        self.tokens = np.zeros(max_batch, np.int64)
        self.cur = 0
        # (B, pool read) -> the step's binding: every buffer it binds is the pools', which never move, so a
        # binding made once serves every later step of that batch size (~25 us of binding 2L + 4 tensors a step)
        self._bound: dict[tuple[int, int], object] = {}

    @property
    def state_bytes(self) -> int:
        """Bytes of the pools (what max_batch costs in memory)."""
        wkv = sum(w.nbytes for w in self.wkv[0])
        return 2 * self.shift[0].nbytes + (1 if self.in_place else 2) * wkv + self.logits.nbytes

    def add(self, state: ir.State) -> int:
        """A sequence joins with `state`; returns its slot."""
        if self.n >= self.max_batch:
            raise RwkvcError(f"the batch is full ({self.max_batch} sequences)")
        self._write(self.n, state)
        self.n += 1
        return self.n - 1

    def set_state(self, slot: int, state: ir.State) -> None:
        """Replace the state of the sequence in `slot` (a live one)."""
        if not 0 <= slot < self.n:
            raise RwkvcError(f"slot {slot} is not live (live: 0..{self.n - 1})")
        self._write(slot, state)

    def _write(self, slot: int, state: ir.State) -> None:
        c = self.cur
        self.shift[c][slot] = state.shift
        for i, w in enumerate(self.wkv[c]):
            w[slot] = state.wkv[i]

    def state(self, slot: int) -> ir.State:
        """A copy of the state of the sequence in `slot`."""
        c = self.cur
        return ir.State(self.shift[c][slot].copy(), np.stack([w[slot] for w in self.wkv[c]]))

    def remove(self, slot: int) -> int:
        """The sequence in `slot` leaves; the last slot's sequence moves into it. Returns the slot it moved
        from (== slot when `slot` was the last)."""
        last = self.n - 1
        if not 0 <= slot <= last:
            raise RwkvcError(f"slot {slot} is not live (live: 0..{last})")
        if slot != last:
            c = self.cur
            self.shift[c][slot] = self.shift[c][last]
            for w in self.wkv[c]:
                w[slot] = w[last]
        self.n = last
        return last

    def step(self, tokens) -> np.ndarray:
        """One token for each live sequence (tokens (B,), B = the live count) -> logits (B, V), a view that
        the next step overwrites."""
        B = self.n
        toks = np.ascontiguousarray(tokens, np.int64).reshape(-1)
        if B == 0 or toks.size != B:
            raise RwkvcError(f"step: {toks.size} tokens for {B} live sequences")
        a = self.cur
        self.tokens[:B] = toks
        self.runtime.read_rows(toks)   # (B tokens' embedding rows read together; the tables handed back)
        bound = self._bound.get((B, a))
        if bound is None:
            bound = self._bind(B, a)
        if bound is None:   # another onnxruntime layout: bound anew each step
            _run_bound(self.sess, *self._io(B, a))
        else:
            self.sess._sess.run_with_iobinding(bound, None)
        self.cur = 1 - a
        return self.logits[:B]

    def _io(self, B: int, a: int) -> tuple[list, list]:
        """The step's inputs [(name, array)] and outputs [(name, shape, address)] for B sequences reading pool a."""
        ins = [("tokens", self.tokens[:B]), ("shift_in", self.shift[a][:B].reshape(B, *self.shift_dims))]
        ins += [(f"wkv_in.{i}", w[:B]) for i, w in enumerate(self.wkv[a])]
        outs = [("logits", [B, self.vocab], self.logits.ctypes.data),
                ("shift_out", [B, *self.shift_dims], self.shift[1 - a].ctypes.data)]
        outs += [(f"wkv_out.{i}", [B, *self.wkv_shape[1:]], w.ctypes.data) for i, w in enumerate(self.wkv[1 - a])]
        return ins, outs

    def _bind(self, B: int, a: int):
        """A C-level binding of _io(B, a), kept for the later steps; None where onnxruntime has none."""
        bound = _c_bound(self.sess, *self._io(B, a))
        if bound is not None:
            self._bound[(B, a)] = bound
        return bound
