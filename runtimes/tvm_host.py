"""Run `tvm-host` artifacts in-process with the `tvm` package's Relax VM."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from rwkvc import ir
from rwkvc.errors import RwkvcError


class TvmHostRuntime:
    """forward(tokens (T,) int64, state) -> logits (V,) float32, new state."""

    def __init__(self, path: Path, manifest: dict, threads: int | None = None, prefill_chunk: int = 1024):
        if threads:
            # read when TVM's thread pool starts: the first TVM artifact loaded in a process sets it
            os.environ["TVM_NUM_THREADS"] = str(threads)
        try:
            import tvm
            from tvm import relax
        except ImportError:
            raise RwkvcError("this artifact needs Apache TVM: pip install apache-tvm "
                             "(or run scripts/setup_tvm.sh)") from None
        from rwkvc.targets.tvm_lower import read_params
        self.path, self.manifest, self.prefill_chunk = Path(path), manifest, prefill_chunk
        try:
            lib = tvm.runtime.load_module(str(self.path / manifest["library"]))
        except Exception as e:  # TVM raises its own error types
            raise RwkvcError(f"{self.path / manifest['library']}: TVM cannot load it ({str(e).splitlines()[0][:200]}); "
                             "recompile the artifact with this TVM") from None
        self.dev = tvm.cpu()
        self.vm = relax.VirtualMachine(lib, self.dev)
        self.params = [tvm.runtime.tensor(np.ascontiguousarray(a), self.dev) for a in read_params(str(self.path))]
        self._tensor = tvm.runtime.tensor
        self._fns = {e: self.vm[e] for e in ("step", "prefill")}

    def run(self, entry: str, tokens: np.ndarray, state: ir.State) -> tuple[np.ndarray, ir.State]:
        t = self._tensor
        logits, shift, wkv = self._fns[entry](t(np.ascontiguousarray(tokens, np.int64)), t(state.shift),
                                              t(state.wkv), self.params)
        return logits.numpy(), ir.State(shift.numpy(), wkv.numpy())

    def forward(self, tokens: np.ndarray, state: ir.State) -> tuple[np.ndarray, ir.State]:
        logits = None
        for s in range(0, len(tokens), self.prefill_chunk):
            chunk = tokens[s:s + self.prefill_chunk]
            logits, state = self.run("step" if len(chunk) == 1 else "prefill", chunk, state)
        return logits, state
