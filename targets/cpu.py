"""`cpu`: ONNX Runtime on the host CPU (MLAS kernels), fp32 or fp16.

float16: weights and activations in fp16 with the official package's layer rescaling (every 6 layers) and
the recurrences in float32 (see rwkvc.emit_onnx.emit); ONNX Runtime runs fp16 ops it has no CPU kernel
for in float32 by itself, so the saving on CPU is mostly memory. RWKV-4/5/6 only for now.
"""
from __future__ import annotations

import sys

import numpy as np

from rwkvc import emit_onnx, ir
from rwkvc.errors import RwkvcError

from .base import Capabilities


class CpuTarget:
    name = "cpu"
    description = "ONNX Runtime, CPU execution provider (x86-64 / aarch64 hosts)"

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(weight_kinds=frozenset(emit_onnx.LINEAR_EMITTERS), dtypes=("float32", "float16"),
                            versions=frozenset(emit_onnx.TIME_MIX_EMITTERS), runtime="onnxruntime",
                            extras={"providers": ["CPUExecutionProvider"],
                                    "float16_versions": sorted(emit_onnx.FP16_VERSIONS)})

    def compile(self, model: ir.Model, out_dir: str, options: dict, progress=None) -> dict:
        dtype = options.get("dtype") or "float32"
        if dtype == "float16" and model.config.version not in emit_onnx.FP16_VERSIONS:
            raise RwkvcError(f"target 'cpu' lowers RWKV-v{model.config.version} in float32 only "
                             f"(float16: v{', v'.join(sorted(emit_onnx.FP16_VERSIONS))}); use --dtype float32")
        fused = fused_kernels(model, dtype, options.get("fused"))
        files = emit_onnx.emit(model, out_dir, dtype=np.dtype(dtype), progress=progress, fused=fused)
        fields = {"entry_points": files, "runtime": "onnxruntime", "providers": ["CPUExecutionProvider"],
                  "dtype": dtype, "weights": "weights.bin"}
        if fused:
            from rwkvc.runtimes import ortops
            fields["custom_ops"] = {"domain": ortops.DOMAIN, "version": ortops.VERSION, "entry_points": sorted(files)}
        return fields


def fused_kernels(model: ir.Model, dtype: str, want: bool | None) -> bool:
    """Whether the step graph uses rwkvc's fused kernels. want None (the default): where the model is one
    they cover (RWKV-7, float32, emit_onnx.fused_supported) and this machine has the C++ compiler that builds them once."""
    from rwkvc.runtimes import ortops
    covered = emit_onnx.fused_supported(model, dtype)
    if want is False or (want is None and not covered):
        return False
    if not covered:
        raise RwkvcError(f"--fused: rwkvc's fused kernels cover RWKV-7 in float32, not RWKV-v{model.config.version} "
                         f"in {dtype} (and heads of at most {emit_onnx.FUSED_MAX_HEAD} channels; this model's have "
                         f"{model.config.head_size}); drop --fused")
    if ortops.compiler() is None:
        if want:
            raise RwkvcError("--fused: no C++ compiler to build rwkvc's fused kernels with (apt-get install g++, "
                             "or set CXX); or compile with --no-fused")
        print("note: no C++ compiler found, so the step graph uses plain ONNX operators (slower); "
              "apt-get install g++ for rwkvc's fused kernels", file=sys.stderr)
        return False
    return True
