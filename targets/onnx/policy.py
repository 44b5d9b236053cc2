"""The ONNX lowering's choices as one value: which of rwkvc's own kernels the graphs use, the layouts they
read, and the fp16 rescale period.

A target builds the policy once, from its compile options and the host it compiles on (`for_host`), passes
it to the lowering (every emitter reads `g.policy`), and records it in the artifact's manifest
(manifest["lowering"]). Tests and benchmarks pin it by passing their own.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from rwkvc.errors import RwkvcError

RESCALE_EVERY = 6   # the official package's RESCALE_LAYER for fp16


@dataclass(frozen=True)
class LoweringPolicy:
    # rwkvc's fused kernels (rwkvc.abi.FUSED_DOMAIN) for the step's element-wise work and the prefill's WKV,
    # where the model is one they cover (rwkvc.targets.onnx.v7_fused.fused_supported)
    fused: bool = False
    # in the fused step, rwkvc's kernels for the quantised matrix-vector products (Rwkv7MatVecQ / Q16 / Set)
    # instead of ONNX Runtime's MatMulNBits: faster with AVX-512 VNNI, and with AVX2 alone on the interleaved
    # layouts (1.35x on the 0.1B int4 step, 1.3x its prefill on a Zen 3); the portable loops of a CPU with
    # neither are slower, so `for_host` sets it from the CPU flags
    matvec_q: bool = False
    # those matrices stored in the interleaved layouts of op set 7 (rwkvc.weights.int4.interleave16,
    # rwkvc.weights.int8.interleave16_int8), read by the step and the prefill alike; False: MatMulNBits'
    # layout, read by Rwkv7MatVecQ in the step and MatMulNBits in the prefill (int8 then stays MatMulNBits')
    matvec_i16: bool = True
    # products join rwkvc's kernels with at least this many columns ...
    matvec_min_k: int = 256
    # ... or at most this many weights whatever their width (a 0.1B svd factor, 192 x 768); large narrow
    # ones (a 128-wide head) stay ONNX Runtime's, which is faster there
    matvec_small: int = 1 << 18
    # float16: att.output and ffn.value of layer i divided by 2^(i // rescale_every), the residual halved
    # every rescale_every layers (0: no rescaling)
    rescale_every: int = RESCALE_EVERY

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "bool" and not isinstance(v, bool):
                raise RwkvcError(f"LoweringPolicy.{f.name} must be True or False, got {v!r}")
            if f.type == "int" and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise RwkvcError(f"LoweringPolicy.{f.name} must be a whole number >= 0, got {v!r}")
        if self.matvec_min_k < 1:
            raise RwkvcError(f"LoweringPolicy.matvec_min_k must be >= 1, got {self.matvec_min_k}")

    @staticmethod
    def for_host(fused: bool, cpu_flags: str) -> "LoweringPolicy":
        """The policy for a CPU with these flags (/proc/cpuinfo's, rwkvc.host.cpu_flags)."""
        return LoweringPolicy(fused=fused, matvec_q=bool({"avx512_vnni", "avx2"} & set(cpu_flags.split())))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
