"""`cpu`: ONNX Runtime on the host CPU (MLAS kernels), fp32."""
from __future__ import annotations

import numpy as np

from rwkvc import emit_onnx, ir

from .base import Capabilities


class CpuTarget:
    name = "cpu"
    description = "ONNX Runtime, CPU execution provider (x86-64 / aarch64 hosts)"

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(weight_kinds=frozenset(emit_onnx.LINEAR_EMITTERS), dtypes=("float32",),
                            versions=frozenset(emit_onnx.TIME_MIX_EMITTERS), runtime="onnxruntime",
                            extras={"providers": ["CPUExecutionProvider"]})

    def compile(self, model: ir.Model, out_dir: str, options: dict, progress=None) -> dict:
        files = emit_onnx.emit(model, out_dir, dtype=np.float32, progress=progress)
        return {"entry_points": files, "runtime": "onnxruntime", "providers": ["CPUExecutionProvider"],
                "dtype": "float32", "weights": "weights.bin"}
