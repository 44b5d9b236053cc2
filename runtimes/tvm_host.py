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
        self.path, self.manifest, self.prefill_chunk = Path(path), manifest, prefill_chunk
        try:
            lib = tvm.runtime.load_module(str(self.path / manifest["library"]))
        except Exception as e:  # TVM raises its own error types
            raise RwkvcError(f"{self.path / manifest['library']}: TVM cannot load it ({str(e).splitlines()[0][:200]}); "
                             "recompile the artifact with this TVM") from None
        self.dev = tvm.cpu()
        self.vm = relax.VirtualMachine(lib, self.dev)
        self.params = self._params(tvm)
        self._tensor = tvm.runtime.tensor
        self._fns = {e: self.vm[e] for e in ("step", "prefill")}

    def _params(self, tvm):
        """The parameters as TVM tensors over a copy-on-write memory map of weights.bin (zero-copy via
        DLPack; the VM never writes them): only the pages a step touches become resident, e.g. the rows of
        a lazy embedding, the chosen clusters of a clustered head. Falls back to copies where DLPack refuses."""
        import json
        with open(self.path / "params.json") as f:
            index = json.load(f)
        mm = np.memmap(self.path / index["file"], dtype=np.uint8, mode="c")
        out = []
        for e in index["params"]:
            a = mm[e["offset"]:e["offset"] + e["nbytes"]].view(e["dtype"]).reshape(e["shape"])
            try:
                out.append(tvm.runtime.from_dlpack(a))
            except Exception:  # noqa: BLE001  (an old numpy / TVM without DLPack for this array)
                out.append(tvm.runtime.tensor(np.ascontiguousarray(a), self.dev))
        return out

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
