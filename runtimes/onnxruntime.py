"""Run cpu / cuda artifacts with ONNX Runtime: a step session, and a prefill session made on first use."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from rwkvc import ir
from rwkvc.abi import DENSE_EMBEDDING, HEAD_MODE  # noqa: F401  (DENSE_EMBEDDING: tests read held[...])
from rwkvc.errors import RwkvcError

from . import hugepages
from .ort_weights import (WKV_WRITERS, dense_embedding, index_graphs, mem_available, prepack_fits,  # noqa: F401
                          prepackable, shared_weights, wkv_in_place)


def _c_bound(sess, inputs: list, outputs: list):
    """onnxruntime's C-level IOBinding of numpy inputs [(name, array)] and buffers [(name, shape, address[,
    dtype: float32])], to run with sess._sess.run_with_iobinding (again and again while those buffers stay);
    None where onnxruntime has no such binding. Its Python wrapper costs ~3 us a bound output (builds a device
    object, checks graph capture), ~30 us of a small model's ~250 us step."""
    c_sess = getattr(sess, "_sess", None)
    if _C_BINDING is None or c_sess is None:
        return None
    make, dev = _C_BINDING
    b = make(c_sess)
    for name, arr in inputs:
        b.bind_input(name, arr)
    for name, shape, addr, *dt in outputs:
        b.bind_output(name, dev, dt[0] if dt else np.float32, shape, addr)
    return b


def _run_bound(sess, inputs: list, outputs: list, run_options=None) -> None:
    """Run `sess` on numpy inputs [(name, array)] into buffers [(name, shape, address[, dtype: float32])], through
    the C-level binding where onnxruntime has one (_c_bound)."""
    b = _c_bound(sess, inputs, outputs)
    if b is not None:
        sess._sess.run_with_iobinding(b, run_options)
        return
    b = sess.io_binding()
    for name, arr in inputs:
        b.bind_cpu_input(name, arr)
    for name, shape, addr, *dt in outputs:
        b.bind_output(name, "cpu", 0, dt[0] if dt else np.float32, shape, addr)
    sess.run_with_iobinding(b, run_options)


def _c_binding():
    try:
        from onnxruntime.capi import _pybind_state as C
        from onnxruntime.capi.onnxruntime_inference_collection import OrtDevice
        return C.SessionIOBinding, OrtDevice.make("cpu", 0)._get_c_device()
    except (ImportError, AttributeError):   # another onnxruntime layout: the public IOBinding
        return None


_C_BINDING = _c_binding()


class _StepSlots:
    """The step's outputs in reusable buffers, with their bindings made once.

    A slot is one float32 buffer holding the logits, the shift and every layer's wkv. The step reads one
    slot's state and writes another's outputs. Each pair of slots keeps a ready IOBinding; a call then sets
    the token and runs. This saves ~25 us a call (binding 2 + 2L tensors) against a small model's ~200 us step.

    A slot is reused only when nothing outside holds its buffer: a caller's logits and State are views of it,
    and sys.getrefcount sees them. So a kept state or logits array is never overwritten. Slots are made as
    needed, up to MAX; past that, or for a state that is not a slot's, the caller binds per call.

    in_place (the graph's matrix states may be updated in place: wkv_in_place): a step asked to write over the
    state it reads (a loop that gives up each state for the next, as a decode does) writes its slot's matrix
    states and logits, the new shift through a scratch buffer copied over the slot's: one slot instead of two,
    a state's bytes (12.4 MB at 1.5B) less."""

    MAX = 8

    def __init__(self, sess, vocab: int, shift_shape: tuple, wkv_shape: tuple, names: list, top: bool,
                 in_place: bool = False):
        import threading

        import onnxruntime as ort
        self.sess, self.vocab, self.names = sess, vocab, names
        self.shift_shape, self.wkv_shape = tuple(shift_shape), tuple(wkv_shape)
        self.n_shift, self.n_wkv = int(np.prod(shift_shape)), int(np.prod(wkv_shape))
        self.slots: list[dict] = []
        self.pairs: dict[tuple[int, int, int], tuple] = {}   # (src, dst, mode) -> (binding, token array, mode array)
        self.lock = threading.Lock()
        self._ort = ort
        self.top = top          # the graph has the "top" output and "head_mode" input
        self._no_logits = ort.OrtValue.ortvalue_from_numpy(np.zeros(0, np.float32))._ortvalue
        self.in_place = in_place
        if in_place:
            self.shift_tmp = np.zeros(self.shift_shape, np.float32)
            self._shift_tmp = ort.OrtValue.ortvalue_from_numpy(self.shift_tmp)._ortvalue

    def _views(self, buf: np.ndarray):
        V, S = self.vocab, self.n_shift
        return buf[:V], buf[V:V + S].reshape(self.shift_shape), buf[V + S:].reshape(self.wkv_shape)

    def _new_slot(self) -> int:
        buf = np.zeros(self.vocab + self.n_shift + self.n_wkv, np.float32)
        logits, shift, wkv = self._views(buf)
        ov = self._ort.OrtValue.ortvalue_from_numpy
        slot = {"buf": buf, "logits": ov(logits)._ortvalue, "shift": ov(shift)._ortvalue,
                "wkv": [ov(wkv[i])._ortvalue for i in range(len(wkv))]}
        if self.top:
            slot["top"] = np.zeros(1, np.int64)
            slot["top_ov"] = ov(slot["top"])._ortvalue
        del logits, shift, wkv
        self.slots.append(slot)
        slot["rc"] = sys.getrefcount(buf) - 1   # the references a free slot has: ours only (less `buf`)
        return len(self.slots) - 1

    def _free_slot(self, avoid: int) -> int | None:
        for i, sl in enumerate(self.slots):
            if i != avoid and sys.getrefcount(sl["buf"]) == sl["rc"]:
                return i
        return self._new_slot() if len(self.slots) < self.MAX else None

    def source(self, state: ir.State) -> int:
        """The slot whose buffer `state` is (the one a step returned), else -1."""
        base = state.wkv.base
        for i, sl in enumerate(self.slots):
            if base is sl["buf"] and state.shift.base is base and \
                    state.shift.ctypes.data == sl["buf"].ctypes.data + 4 * self.vocab:
                return i
        return -1

    def _binding(self, src: int, dst: int, mode: int):
        key = (src, dst, mode)
        if key not in self.pairs:
            make, _ = _C_BINDING
            b = make(self.sess._sess)
            ov = self._ort.OrtValue.ortvalue_from_numpy
            tok, mode_arr = np.zeros(1, np.int64), np.array([mode], np.int64)   # live as long as the binding
            b.bind_ortvalue_input("tokens", ov(tok)._ortvalue)
            a, o = self.slots[src], self.slots[dst]
            b.bind_ortvalue_input("shift_in", a["shift"])
            b.bind_ortvalue_output("logits", o["logits"] if mode == 0 else self._no_logits)
            b.bind_ortvalue_output("shift_out", self._shift_tmp if src == dst else o["shift"])
            if self.top:
                b.bind_ortvalue_input(HEAD_MODE, ov(mode_arr)._ortvalue)
                b.bind_ortvalue_output("top", o["top_ov"])
            for i, (n_in, n_out) in enumerate(self.names):
                b.bind_ortvalue_input(n_in, a["wkv"][i])
                b.bind_ortvalue_output(n_out, o["wkv"][i])
            self.pairs[key] = (b, tok, mode_arr)
        return self.pairs[key][:2]

    def run(self, token: int, state: ir.State, top_only: bool = False, in_place: bool = False):
        """(logits, new state) in a free slot, or None when this call cannot use the slots. top_only (a graph
        with the "top" output): (top token, new state), the logits not written. in_place (where the graph
        allows it): the new state and logits written over `state`'s slot."""
        if not self.lock.acquire(blocking=False):   # another thread is stepping: it binds per call
            return None
        try:
            src = self.source(state)
            if src < 0:
                return None
            dst = src if in_place and self.in_place else self._free_slot(src)
            if dst is None:
                return None
            b, tok = self._binding(src, dst, int(top_only))
            tok[0] = token
            self.sess._sess.run_with_iobinding(b, None)
            logits, shift, wkv = self._views(self.slots[dst]["buf"])
            if src == dst:
                shift[...] = self.shift_tmp
            return (int(self.slots[dst]["top"][0]) if top_only else logits), ir.State(shift, wkv)
        finally:
            self.lock.release()

    def first(self, state: ir.State, run) -> tuple[np.ndarray, ir.State] | None:
        """A step from a state that is no slot's: run(outputs) into a free slot's buffer."""
        with self.lock:
            dst = self._free_slot(-1)
            if dst is None:
                return None
            buf = self.slots[dst]["buf"]
            logits, shift, wkv = self._views(buf)
            run(logits, shift, wkv)
            return logits, ir.State(shift, wkv)


class OrtRuntime:
    """forward(tokens (T,) int64, state) -> logits (V,) float32, new state."""

    def __init__(self, path: Path, manifest: dict, threads: int | None = None, providers=None,
                 prefill_chunk: int | None = None, huge_pages: bool = True, prepack: bool | None = None):
        """prefill_chunk: a prompt goes through the prefill graph this many tokens a call. The activations (and
        ONNX Runtime's arena, which keeps the largest) grow with it, each call reads every weight once, and each
        call costs a graph run: the default is 128 below a width of 2048 (a 0.1B int4 prefills ~12 % slower at
        64) and 32 from there (32 rows still do ~64 multiply-adds a weight byte read at int4, more than the
        kernels need to be compute-bound: a 1.5B int4 prefills within ~5 % at 32, 48 and 64 in interleaved
        runs of bench/prefill_chunk.py, and peaks ~3 MB lower than at 64, ~13 MB lower than at 128;
        docs/benchmarks/big-models.md).
        prepack False: ONNX Runtime's kernels read every weight in place in the shared mapping instead of each
        session packing its own copy of the float matrices (MatMul): an fp32 artifact then needs about one copy
        of its weights instead of three, for ~10-25 % of its decode and ~15 % of its prefill speed; quantised
        artifacts, whose matrices rwkvc's kernels read in place, barely change (rwkvc.load(path, prepack=False)).
        None (the default): pre-pack where the weights and two packed copies of the float matrices fit in half
        the memory available (ort_weights.prepack_fits; a 1.5B fp32 peaks at 17.4 GB with them, 6.2 GB without).
        huge_pages (with Linux's transparent huge pages; RWKVC_HUGE_PAGES=0 turns it off too): the weights read
        in place are copied into 2 MiB pages at load (hugepages.anonymous_copy, where the copy takes at most
        half the memory available) and ONNX Runtime's packed copies collapsed into them."""
        import onnxruntime as ort
        if prefill_chunk is None:
            prefill_chunk = 128 if int(manifest.get("model", {}).get("n_embd", 0)) < 2048 else 32
        self.path, self.manifest, self.prefill_chunk = Path(path), manifest, prefill_chunk
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or 0   # 0: ORT's default (one per physical core)
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ONNX Runtime's default order runs each layer's shift-state Slice (the last row of a (T, C) tensor) at
        # the end of the graph, keeping 2 T x C tensors a layer alive through the whole prefill (43 MB at 1.5B
        # int4 with 128-token calls); the priority-based order runs them as soon as their input is ready
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        # ONNX Runtime rewrites DequantizeLinear -> MatMul (the sparse FFN's int8 MLP predictor in the plain
        # graphs) into an 8-bit MatMulNBits; level 0 keeps its activations in float32, as the IR has them
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        self.so = so
        if manifest.get("custom_ops"):
            from . import ortops
            ortops.require(manifest["custom_ops"])
            ortops.register(so, threads)
        wanted = providers or manifest.get("providers") or ["CPUExecutionProvider"]
        avail = ort.get_available_providers()
        missing = [p for p in wanted if p not in avail]
        if missing:
            raise RwkvcError(f"this artifact needs ONNX Runtime provider {missing[0]}, which this onnxruntime "
                             f"does not have (available: {', '.join(avail)}); install onnxruntime-gpu or "
                             "compile for --target cpu")
        self.providers = wanted
        cpu = wanted == ["CPUExecutionProvider"]
        self.huge_pages = huge_pages and cpu and hugepages.enabled()
        idx = index_graphs(self.path, manifest["entry_points"])   # each graph parsed once (runtimes/ort_weights.py)
        # the entry points whose states may be updated in place (forward's steps and later prefill chunks, BatchPool)
        self.wkv_in_place = idx.wkv_in_place
        # the dense embedding is read by a Gather only, so ONNX Runtime would leave it memory-mapped and
        # each new token's row could be a page fault on the file (the lazy-emb pass is the way to keep it
        # on disk); hold it in memory like every other weight, one copy shared by both sessions
        self.held: dict[str, np.ndarray] = dense_embedding(self.path, idx) if cpu else {}
        self.prepack = prepack_fits(idx, self.held) if prepack is None else bool(prepack)
        if not self.prepack:
            so.add_session_config_entry("session.disable_prepacking", "1")
        self._held_values = []                      # the OrtValues over them must outlive the sessions
        for name, arr in self.held.items():
            self._held_values.append(ort.OrtValue.ortvalue_from_numpy(arr))
            so.add_initializer(name, self._held_values[-1])
        # every other weight: one read-only mapping of the file that every session reads (shared_weights)
        self.mapped, self._tables = shared_weights(self.path, idx, self.held) if cpu else ({}, [])
        # the file mappings (their pages read only to pre-pack are handed back once a session is made)
        self._file_maps = list({id(a.base): a.base for a in self.mapped.values() if a.base is not None}.values())
        self._anonymous = None
        if self.huge_pages:
            self._copy_to_huge_pages()
        self._table_rows = 0      # tokens since the tables' pages were last handed back (read_rows)
        # the embedding tables read by rows whose rows are wide enough (~16 a page at most) that a new token's
        # row is likely not in memory: read_rows reads a call's rows of them ahead, together
        self._token_tables = [a for n in sorted(idx.by_token & idx.rows & set(self.mapped))
                              if (a := self.mapped[n]).ndim and a.strides[0] >= 256]
        del idx
        for name, arr in self.mapped.items():
            self._held_values.append(ort.OrtValue.ortvalue_from_numpy(arr))
            so.add_initializer(name, self._held_values[-1])
        if self.huge_pages:
            hugepages.collapse({(a.ctypes.data, a.ctypes.data + a.nbytes) for a in self.held.values()})
        self._sessions: dict[str, object] = {}
        self._io_cache: dict[str, tuple] = {}
        self._slots: dict[str, _StepSlots] = {}
        self._release = None                 # run options of a prompt's last prefill call (forward)
        if cpu:
            self._release = ort.RunOptions()
            self._release.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self.session("step")

    def session(self, entry: str):
        if entry not in self._sessions:
            import onnxruntime as ort
            fn = self.path / self.manifest["entry_points"][entry]
            before = hugepages.anonymous_regions() if self.huge_pages else set()
            # ONNX Runtime plans one block for all of a run's activations per input shape and keeps it beside
            # the arena's first-run chunks: worth it for the step's fixed shapes, not for a prefill, whose
            # chunks vary in length (62 MB more at 1.5B int4 for the same speed; docs/benchmarks/big-models.md)
            self.so.enable_mem_pattern = not entry.endswith("prefill")
            try:
                self._sessions[entry] = ort.InferenceSession(str(fn), self.so, providers=self.providers)
            except Exception as e:  # ORT raises its own Fail/InvalidGraph types
                raise RwkvcError(f"{fn}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]}); "
                                 "recompile the artifact") from None
            if self.huge_pages:   # the weights the session just packed
                hugepages.collapse(hugepages.anonymous_regions() - before)
            if self._file_maps:   # the pages a kernel read to pre-pack its own copy are not read again: hand
                from rwkvc.mapped import release_array   # them back
                for mm in self._file_maps:
                    release_array(mm)
        return self._sessions[entry]

    def _copy_to_huge_pages(self) -> None:
        """The weights the kernels read in place, every step, into 2 MiB pages instead of the file's 4 KiB
        ones (hugepages.anonymous_copy); not the tables read by rows (they stay on disk), nor the matrices
        ONNX Runtime packs copies of where it pre-packs; only where the copy takes at most half the memory
        available (file pages can be dropped and read again under memory pressure, anonymous ones only
        swapped)."""
        from rwkvc.mapped import release_array
        tables = {id(a) for a in self._tables}
        in_place = {n: a for n, a in self.mapped.items()
                    if id(a) not in tables and not (self.prepack and prepackable(a.dtype, a.shape))}
        avail = mem_available()
        if avail is None or sum(a.nbytes for a in in_place.values()) <= avail // 2:
            copies, self._anonymous = hugepages.anonymous_copy(in_place, release_array)
            self.mapped.update(copies)

    def huge_page_bytes(self) -> int:
        """Bytes of the weight copy (hugepages.anonymous_copy) that lie in 2 MiB pages now; 0 without a copy."""
        if self._anonymous is None:
            return 0
        base = np.frombuffer(self._anonymous, np.uint8)
        return hugepages.huge_bytes(base.ctypes.data, base.ctypes.data + base.nbytes)

    TABLE_RELEASE_TOKENS = 256

    def read_rows(self, tokens) -> None:
        """Before a call that reads these tokens' rows of the tables read by rows. Where there are several
        tokens, start reading their rows of the embedding tables together (rwkvc.mapped.read_ahead_rows): a
        row not in memory comes from the file, and the graph's Gather would fault on the rows one after
        another. Every TABLE_RELEASE_TOKENS tokens, hand the tables' pages back: each row read maps the
        page-cache pages around it too (the kernel's fault-around, 64 KB), so without this the lazy embedding
        would become resident a few rows at a time. A row read again is a minor fault."""
        if self._tables:
            self._table_rows += len(tokens)
            if self._table_rows >= self.TABLE_RELEASE_TOKENS:
                from rwkvc.mapped import release_array
                self._table_rows = 0
                for a in self._tables:
                    release_array(a)
            if len(tokens) > 1 and self._token_tables:
                from rwkvc.mapped import read_ahead_rows
                for a in self._token_tables:
                    read_ahead_rows(a, tokens)

    def run(self, entry: str, tokens: np.ndarray, state: ir.State, run_options=None,
            in_place: bool = False) -> tuple[np.ndarray, ir.State]:
        """One call of an entry point. The graphs take and give each layer's matrix state as its own tensor
        (`wkv_in.i` / `wkv_out.i`): inputs are bound to views of `state.wkv` and outputs to slices of a new
        state array, so no state is split, concatenated or copied around the call. in_place: forward's."""
        self.read_rows(tokens)
        sess, legacy, vocab, names, has_top = self._io(entry)
        if legacy:  # format 1 artifacts: one wkv tensor for all layers
            logits, shift, wkv = sess.run(None, {"tokens": tokens, "shift_in": state.shift, "wkv_in": state.wkv})
            return logits, ir.State(shift, wkv)
        if entry != "step":
            self._io("step")    # (makes the step's slots, where a prefill's state goes too)
        slots = self._slots.get("step")
        if slots is not None:   # into a reused buffer (_StepSlots); a step's binding made once
            out = slots.run(int(tokens[0]), state, in_place=in_place) if entry == "step" else None
            if out is None:     # (a prefill's state in a slot: the steps after it start from there)
                out = slots.first(state, lambda lg, sh, wkv: self._run_into(sess, names, tokens, state, lg, sh, wkv,
                                                                            has_top, run_options))
            if out is not None:
                return out
        # new buffers: the logits (a caller may keep them), and the state (the shift, then each layer's wkv)
        logits = np.empty(vocab, np.float32)
        st = np.empty(state.shift.size + state.wkv.size, np.float32)
        shift, wkv = st[:state.shift.size].reshape(state.shift.shape), st[state.shift.size:].reshape(state.wkv.shape)
        self._run_into(sess, names, tokens, state, logits, shift, wkv, has_top, run_options)
        return logits, ir.State(shift, wkv)

    def step_top(self, token: int, state: ir.State, in_place: bool = False) -> tuple[int, ir.State] | None:
        """A step giving np.argmax of its logits and the new state, the logits never written, where the step
        graph has a top-token head (Rwkv7ClusteredHeadTop) and `state` is one a step returned; else None.
        in_place: as forward's."""
        if not self._io("step")[4] or "step" not in self._slots:
            return None
        self.read_rows((token,))
        out = self._slots["step"].run(token, state, top_only=True, in_place=in_place)
        if out is not None and out[0] < 0 and out[1].wkv.ctypes.data == state.wkv.ctypes.data:   # written over:
            # the step cannot be redone by forward's path
            raise RwkvcError("logits contain NaN; check the model output (overflow in fp16?)")
        return out if out is not None and out[0] >= 0 else None   # -1: a NaN logit (forward's path reports it)

    @staticmethod
    def _run_into(sess, names, tokens, state: ir.State, logits, shift, wkv, has_top: bool = False,
                  run_options=None) -> None:
        """One call with the outputs written into the given float32 arrays (contiguous). has_top: the graph
        has the head's top-token output (head_mode 0: logits and top; the top is not kept here)."""
        shift_in = np.ascontiguousarray(state.shift, dtype=np.float32)
        wkv_in = np.ascontiguousarray(state.wkv, dtype=np.float32)
        ins = [("tokens", np.ascontiguousarray(tokens, dtype=np.int64)), ("shift_in", shift_in)]
        outs = [("logits", [logits.size], logits.ctypes.data), ("shift_out", list(shift.shape), shift.ctypes.data)]
        if has_top:
            top = np.zeros(1, np.int64)
            ins.append((HEAD_MODE, np.zeros(1, np.int64)))
            outs.append(("top", [1], top.ctypes.data, np.int64))
        layer = list(wkv.shape[1:])
        for i, (n_in, n_out) in enumerate(names):
            ins.append((n_in, wkv_in[i]))
            outs.append((n_out, layer, wkv[i].ctypes.data))
        _run_bound(sess, ins, outs, run_options)

    def _io(self, entry: str):
        """(session, format-1 graph?, vocabulary size, [(wkv_in.i, wkv_out.i)], has the "top" output?) of an
        entry point, looked up once."""
        if entry not in self._io_cache:
            sess = self.session(entry)
            inputs = [i.name for i in sess.get_inputs()]
            layers = sum(n.startswith("wkv_in.") for n in inputs)
            dim = sess.get_outputs()[0].shape[0]   # symbolic where the head can write no logits (head_mode)
            legacy, vocab = "wkv_in" in inputs, dim if isinstance(dim, int) else int(self.manifest["model"]["vocab_size"])
            names = [(f"wkv_in.{i}", f"wkv_out.{i}") for i in range(layers)]
            has_top = HEAD_MODE in inputs
            self._io_cache[entry] = (sess, legacy, vocab, names, has_top)
            if entry == "step" and not legacy and layers and _C_BINDING is not None and \
                    self.providers == ["CPUExecutionProvider"] and getattr(sess, "_sess", None) is not None:
                shp = {i.name: i.shape for i in sess.get_inputs()}
                if all(isinstance(d, int) for d in shp["shift_in"] + shp["wkv_in.0"]):
                    self._slots[entry] = _StepSlots(sess, vocab, shp["shift_in"], [layers] + shp["wkv_in.0"], names,
                                                    has_top, self.wkv_in_place.get("step", False))
        return self._io_cache[entry]

    def forward(self, tokens: np.ndarray, state: ir.State, in_place: bool = False) -> tuple[np.ndarray, ir.State]:
        """in_place: the caller gives `state` up (and the logits that came with it): a step may write the new
        state over it, where the step graph allows that and `state` is one a step or prefill returned."""
        if len(tokens) == 1:
            return self.run("step", tokens, state, in_place=in_place)
        logits = None
        for s in range(0, len(tokens), self.prefill_chunk):
            chunk = tokens[s:s + self.prefill_chunk]
            # the prompt's last prefill call hands the arena's free blocks back (its activations, ~20 MB at
            # 1.5B int4, would stay through the decode), and the C heap returns them to the system
            release = self._release if s + self.prefill_chunk >= len(tokens) else None
            if s and len(chunk) > 1 and self.wkv_in_place.get("prefill"):
                # the state the last chunk made is this call's own: update its matrix states in place
                logits, state = self._run_in_place("prefill", chunk, state, release)
            else:
                logits, state = self.run("step" if len(chunk) == 1 else "prefill", chunk, state, release)
        if self._release is not None:
            from rwkvc.mapped import trim_heap
            trim_heap()
        return logits, state

    def _run_in_place(self, entry: str, tokens: np.ndarray, state: ir.State,
                      run_options=None) -> tuple[np.ndarray, ir.State]:
        """run(entry, tokens, state) with the new matrix states written over `state.wkv` (wkv_in_place) and the
        new shift copied over `state.shift` (the graph reads all of it first): `state` keeps its buffer, so a
        state in a step slot stays the slot's and the steps after the prompt take the slot's bound path."""
        self.read_rows(tokens)
        sess, _, vocab, names, has_top = self._io(entry)
        logits, shift = np.empty(vocab, np.float32), np.empty(state.shift.shape, np.float32)
        self._run_into(sess, names, tokens, state, logits, shift, state.wkv, has_top, run_options)
        state.shift[...] = shift
        return logits, state
