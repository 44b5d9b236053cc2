"""`cuda`: ONNX Runtime's CUDA execution provider on an NVIDIA GPU.

Why ONNX Runtime rather than TVM's CUDA codegen: the same ONNX graphs as `cpu` (one lowering,
rwkvc.targets.onnx, one set of parity tests), cuDNN/cuBLAS kernels for the matrix products, and compiling
needs no GPU and no CUDA toolkit. The artifact computes in float16 with the official package's layer
rescaling (att.output and ffn.value of layer i divided by 2^(i // 6), the residual halved every 6 layers)
for the RWKV generations whose fp16 lowering exists (`FP16_VERSIONS`), and in float32 otherwise; `--dtype`
overrides. The graphs use plain ONNX operators only (LoweringPolicy(), recorded in manifest["lowering"]).
Running needs `onnxruntime-gpu` (the runtime says so in one line when the provider is missing).
"""
from __future__ import annotations

import numpy as np

from rwkvc import ir
from rwkvc.errors import RwkvcError

from . import onnx as lowering
from .base import Capabilities, CompileOptions
from .onnx import LoweringPolicy

PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"]

CAPABILITIES = Capabilities(weight_kinds=lowering.LOWERED, dtypes=("auto", "float16", "float32"),
                            versions=lowering.VERSIONS, runtime="onnxruntime",
                            extras={"providers": PROVIDERS, "float16_versions": sorted(lowering.FP16_VERSIONS)})


class CudaTarget:
    name = "cuda"
    description = "ONNX Runtime, CUDA execution provider (NVIDIA GPUs); float16 with layer rescaling"
    capabilities = CAPABILITIES

    def compile(self, model: ir.Model, out_dir: str, options: dict, progress=None) -> dict:
        opts = CompileOptions.parse(options)
        if opts.fused:
            raise RwkvcError("--fused/--no-fused apply to --target cpu, not cuda")
        dtype = opts.dtype or "auto"
        if dtype == "auto":
            dtype = "float16" if model.config.version in lowering.FP16_VERSIONS else "float32"
        if dtype == "float16" and model.config.version not in lowering.FP16_VERSIONS:
            raise RwkvcError(f"target 'cuda' lowers RWKV-v{model.config.version} in float32 only for now "
                             f"(float16: v{', v'.join(sorted(lowering.FP16_VERSIONS))}); use --dtype float32")
        policy = opts.lowering or LoweringPolicy()
        if policy.fused:
            raise RwkvcError("target 'cuda' lowers with plain ONNX operators: give a LoweringPolicy with fused=False")
        files = lowering.emit(model, out_dir, dtype=np.dtype(dtype), policy=policy, progress=progress)
        return {"entry_points": files, "runtime": "onnxruntime", "providers": PROVIDERS,
                "dtype": dtype, "weights": "weights.bin", "lowering": policy.to_dict()}


TARGET = CudaTarget()
