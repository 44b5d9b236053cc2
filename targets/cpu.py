"""`cpu`: ONNX Runtime on the host CPU (MLAS kernels), fp32 or fp16.

float16: weights and activations in fp16 with the official package's layer rescaling (every 6 layers) and
the recurrences in float32 (see rwkvc.targets.onnx.build.emit); ONNX Runtime runs fp16 ops it has no CPU
kernel for in float32 by itself, so the saving on CPU is mostly memory. RWKV-4/5/6 only for now.

The lowering's choices (fused kernels or plain operators, which matrix-vector kernels, interleaved layouts)
are one LoweringPolicy, built here from the compile options and this host's CPU flags, and recorded in the
manifest (manifest["lowering"]).
"""
from __future__ import annotations

import sys

import numpy as np

from rwkvc import host, ir
from rwkvc.errors import RwkvcError

from . import onnx as lowering
from .base import Capabilities, CompileOptions
from .onnx import LoweringPolicy

CAPABILITIES = Capabilities(weight_kinds=lowering.LOWERED, dtypes=("float32", "float16"),
                            versions=lowering.VERSIONS, runtime="onnxruntime",
                            extras={"providers": ["CPUExecutionProvider"],
                                    "float16_versions": sorted(lowering.FP16_VERSIONS)})


class CpuTarget:
    name = "cpu"
    description = "ONNX Runtime, CPU execution provider (x86-64 / aarch64 hosts)"
    capabilities = CAPABILITIES

    def compile(self, model: ir.Model, out_dir: str, options: dict, progress=None) -> dict:
        opts = CompileOptions.parse(options)
        dtype = opts.dtype or "float32"
        if dtype == "float16" and model.config.version not in lowering.FP16_VERSIONS:
            raise RwkvcError(f"target 'cpu' lowers RWKV-v{model.config.version} in float32 only "
                             f"(float16: v{', v'.join(sorted(lowering.FP16_VERSIONS))}); use --dtype float32")
        policy = lowering_policy(model, dtype, opts)
        files = lowering.emit(model, out_dir, dtype=np.dtype(dtype), policy=policy, progress=progress)
        fields = {"entry_points": files, "runtime": "onnxruntime", "providers": ["CPUExecutionProvider"],
                  "dtype": dtype, "weights": "weights.bin", "lowering": policy.to_dict()}
        if policy.fused:
            from rwkvc.abi import FUSED_DOMAIN, FUSED_VERSION
            fields["custom_ops"] = {"domain": FUSED_DOMAIN, "version": FUSED_VERSION, "entry_points": sorted(files)}
        return fields


def lowering_policy(model: ir.Model, dtype: str, opts: CompileOptions) -> LoweringPolicy:
    """The policy this compile lowers with: opts.lowering as given, or the host's (LoweringPolicy.for_host)
    with the fused kernels where fused_kernels says."""
    if opts.lowering is not None:
        if opts.lowering.fused:
            fused_kernels(model, dtype, True)   # refuses what the kernels do not cover
        return opts.lowering
    return LoweringPolicy.for_host(fused_kernels(model, dtype, opts.fused), host.cpu_flags())


def fused_kernels(model: ir.Model, dtype: str, want: bool | None) -> bool:
    """Whether the step graph uses rwkvc's fused kernels. want None (the default): where the model is one
    they cover (RWKV-7, float32, rwkvc.targets.onnx.fused_supported) and this machine has the C++ compiler
    that builds them once."""
    covered = lowering.fused_supported(model, dtype)
    if want is False or (want is None and not covered):
        return False
    if not covered:
        raise RwkvcError(f"--fused: rwkvc's fused kernels cover RWKV-7 in float32, not RWKV-v{model.config.version} "
                         f"in {dtype} (and heads of at most {lowering.FUSED_MAX_HEAD} channels; this model's have "
                         f"{model.config.head_size}); drop --fused")
    if host.compiler() is None:
        if want:
            raise RwkvcError("--fused: no C++ compiler to build rwkvc's fused kernels with (apt-get install g++, "
                             "or set CXX); or compile with --no-fused")
        print("note: no C++ compiler found, so the step graph uses plain ONNX operators (slower); "
              "apt-get install g++ for rwkvc's fused kernels", file=sys.stderr)
        return False
    return True
