"""`cuda`: ONNX Runtime's CUDA execution provider on an NVIDIA GPU.

Why ONNX Runtime rather than TVM's CUDA codegen: the same ONNX graphs as `cpu` (one emitter, one set of
parity tests), cuDNN/cuBLAS kernels for the matrix products, and compiling needs no GPU and no CUDA
toolkit. The artifact computes in float16 with the official package's layer rescaling (att.output and
ffn.value of layer i divided by 2^(i // 6), the residual halved every 6 layers) for the RWKV generations
whose fp16 lowering exists (`emit_onnx.FP16_VERSIONS`), and in float32 otherwise; `--dtype` overrides.
Running needs `onnxruntime-gpu` (the runtime says so in one line when the provider is missing).
"""
from __future__ import annotations

import numpy as np

from rwkvc import emit_onnx, ir
from rwkvc.errors import RwkvcError

from .base import Capabilities

PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"]


class CudaTarget:
    name = "cuda"
    description = "ONNX Runtime, CUDA execution provider (NVIDIA GPUs); float16 with layer rescaling"

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(weight_kinds=frozenset(emit_onnx.LINEAR_EMITTERS), dtypes=("auto", "float16", "float32"),
                            versions=frozenset(emit_onnx.TIME_MIX_EMITTERS), runtime="onnxruntime",
                            extras={"providers": PROVIDERS, "float16_versions": sorted(emit_onnx.FP16_VERSIONS)})

    def compile(self, model: ir.Model, out_dir: str, options: dict, progress=None) -> dict:
        dtype = options.get("dtype") or "auto"
        if dtype == "auto":
            dtype = "float16" if model.config.version in emit_onnx.FP16_VERSIONS else "float32"
        if dtype == "float16" and model.config.version not in emit_onnx.FP16_VERSIONS:
            raise RwkvcError(f"target 'cuda' lowers RWKV-v{model.config.version} in float32 only for now "
                             f"(float16: v{', v'.join(sorted(emit_onnx.FP16_VERSIONS))}); use --dtype float32")
        files = emit_onnx.emit(model, out_dir, dtype=np.dtype(dtype), progress=progress)
        return {"entry_points": files, "runtime": "onnxruntime", "providers": PROVIDERS,
                "dtype": dtype, "weights": "weights.bin"}


TARGET = CudaTarget()
