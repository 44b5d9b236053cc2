"""`tvm-host`: the TVM lowering (targets/tvm/) for this machine's CPU, run in-process by the
`tvm` Python package's Relax VM. It exists to compare TVM with ONNX Runtime on one machine."""
from __future__ import annotations

from rwkvc import ir

from .base import Capabilities
from .tvm import WEIGHT_DTYPES, versions, weight_kinds


class TvmHostTarget:
    name = "tvm-host"
    description = "Apache TVM (Relax VM, LLVM) for the host CPU, run in-process"

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(weight_kinds=weight_kinds(),
            # float16: matrices and embedding stored in fp16 (half the bytes and memory traffic),
            # widened to fp32 in registers; all arithmetic and the state stay fp32
            dtypes=WEIGHT_DTYPES,
                            versions=versions(), runtime="tvm-host",
                            # 32 output columns x 4 rows per register tile suits AVX2/AVX-512
                            extras={"kernel": {"panel": 32, "rows": 4, "lanes": 8}})

    def llvm_target(self) -> dict:
        from .tvm import import_tvm
        tvm = import_tvm()
        cg = tvm.target.codegen
        return {"kind": "llvm", "mtriple": cg.llvm_get_system_triple(), "mcpu": cg.llvm_get_system_cpu()}

    def compile(self, model: ir.Model, out_dir: str, options: dict, progress=None) -> dict:
        from .tvm import KernelShape, check_lowerable, compile_model
        check_lowerable(model)
        ks = KernelShape(**self.capabilities.extras["kernel"], weights=options.get("dtype") or "float32")
        fields = compile_model(model, out_dir, self.llvm_target(), ks, progress=progress)
        return {**fields, "runtime": "tvm-host"}


TARGET = TvmHostTarget()
