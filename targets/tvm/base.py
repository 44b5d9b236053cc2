"""What every part of the TVM lowering shares: the TVM modules (imported on first use, so that rwkvc
imports, and the cpu target works, without TVM), the dtype names, and the kernels' register tiling."""
from __future__ import annotations

from dataclasses import dataclass

from rwkvc.errors import RwkvcError

F32 = "float32"
WEIGHT_DTYPES = ("float32", "float16")

_MODULES: dict[str, object] = {}


def import_tvm():
    """The `tvm` package (and its relax, te, tirx, s_tir modules, reached through the names below);
    a clear error where TVM is not installed."""
    if not _MODULES:
        try:
            import tvm as _tvm
            from tvm import relax as _relax, s_tir as _s_tir, te as _te, tirx as _tirx
        except ImportError:
            raise RwkvcError("the TVM targets need Apache TVM: pip install apache-tvm "
                             "(or run scripts/setup_tvm.sh)") from None
        _MODULES.update(tvm=_tvm, relax=_relax, te=_te, tirx=_tirx, s_tir=_s_tir)
    return _MODULES["tvm"]


class _TvmModule:
    """One of TVM's modules, imported by the first attribute read (`relax.op`, `tirx.IntImm`, ...)."""
    __slots__ = ("_name",)

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        import_tvm()
        return getattr(_MODULES[self._name], attr)


tvm, relax, te, tirx, s_tir = (_TvmModule(n) for n in ("tvm", "relax", "te", "tirx", "s_tir"))


@dataclass(frozen=True)
class KernelShape:
    """Register tiling of the kernels; a target declares it (capabilities.extras['kernel'])."""
    panel: int = 16     # output columns per packed weight panel (a multiple of the vector width)
    rows: int = 4       # prefill rows per register tile (panel x rows accumulators)
    lanes: int = 4      # float32 lanes of one vector register (the WKV reductions' width)
    weights: str = "float32"   # storage of matrices and the embedding; float16 halves bytes, math stays fp32

    def __post_init__(self):
        for f in ("panel", "rows", "lanes"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"KernelShape.{f} must be a positive int, got {v!r}")
        if self.weights not in WEIGHT_DTYPES:
            raise ValueError(f"KernelShape.weights must be one of {', '.join(WEIGHT_DTYPES)}, got {self.weights!r}")
