"""IR -> TVM Relax -> a compiled VM executable; shared by the `rpi5` and `tvm-host` targets.

Why from the IR and not from the ONNX artifact: the ONNX graphs use a Scan for the WKV recurrence and
(after the compression passes) ONNX Runtime's own ops (MatMulNBits), which TVM's ONNX importer does
not know; and a quantised weight must stay packed in memory and be dequantised inside the matmul
kernel, which an importer that sees only standard ONNX ops cannot arrange. So the lowering walks the
IR, builds Relax functions with `relax.BlockBuilder`, and calls hand-scheduled TIR kernels for the
two things that dominate the time (matrices, the WKV recurrence); everything else is Relax ops that
TVM legalises and fuses.

    base.py            the TVM modules (imported on first use), dtype names, KernelShape (register tiling)
    params.py          Params (the VM's params order; weights.bin written as they are made, + params.json),
                       the packed layouts made a block of rows at a time (Streamed)
    kernels.py         TIR: packed-panel matrix products (float / int8 / n-bit codes), the activation
                       quantiser, the WKV recurrences (v7; v5/v6; v4)
    sparse_kernels.py  TIR that reads only the rows it needs: the sparse FFN's, the clustered head's
    context.py         Ctx: the BlockBuilder, the kernel cache, the dense-path kernel calls
    kinds.py           the closed table IR weight kind -> lowering (matrices, row-read matrices, embedding)
    sparse_ffn.py      RWKV-Lite's sparse FFN: the predictors' mask, the used units' rows only
    v7.py              the RWKV-7 time-mix and channel-mix in Relax
    rwkv456.py         RWKV-4, -5.x, -6 (RWKV-Lite's 5.2 layouts through the weight kinds and sparse_ffn)
    mixers.py          the closed tables version -> time-mix / channel-mix lowering
    graph.py           the parameters in order, the per-layer functions, the step / prefill entry points
    build.py           check, build the module, compile with TVM, export the library and weights

`params` is one tuple of tensors in `Params.names` order, written to `weights.bin` (page-aligned, raw
little-endian) with an index `params.json`; the runner memory-maps it, so weights are not baked into
the .so (compile time and library size stay small, and a model over 2 GB works).

Compressed kinds stay packed in weights.bin and are dequantised in registers inside their kernels:

    int8       int8 panels; activation quantised per tensor (ONNX DynamicQuantizeLinear), int32 sums
    int4       4-bit code pairs in panels + group scales / zero points; (code - zero) * scale, fp32 FMA
    factored, scaled   their parts through their own kinds
    clustered  selection kernel -> rows of the chosen clusters only -> combine (the hierarchical head)
    sparse FFN predictors (MLP, 1-bit key codes 8 per byte, quantile kernel) -> mask; the used units'
               rows of key and value.T only (dense / int8), else the full product times the mask
    lazy       the embedding rows in their storage format (fp32 / fp16 / int8 + row scales), gathered
"""
from __future__ import annotations

from .base import WEIGHT_DTYPES, KernelShape, import_tvm
from .build import build_module, check_lowerable, compile_model
from .kinds import weight_kinds
from .params import Params, pack_panels
from .mixers import CHANNEL_MIX_LOWERINGS, TIME_MIX_LOWERINGS, versions

__all__ = ["CHANNEL_MIX_LOWERINGS", "TIME_MIX_LOWERINGS", "WEIGHT_DTYPES", "KernelShape", "Params", "build_module", "check_lowerable",
           "compile_model", "import_tvm", "pack_panels", "versions", "weight_kinds"]
