"""What a target is: a name, its capabilities as data, and a compile step IR -> artifact files.

The lowering asks a target what it supports (`capabilities`) instead of branching on its name; the
compile driver (rwkvc.artifact) refuses, before any work, an IR the target cannot lower.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

from rwkvc import ir
from rwkvc.errors import RwkvcError


@dataclass(frozen=True)
class Capabilities:
    weight_kinds: frozenset[str]                   # IR weight representations it can lower
    dtypes: tuple[str, ...] = ("float32",)         # compute dtypes, the first is the default
    versions: frozenset[str] = frozenset({"7"})    # RWKV generations it can lower
    runtime: str = "onnxruntime"                   # which runtimes/ module runs its artifacts
    extras: dict = field(default_factory=dict)

    def why_not(self, target: str, model: ir.Model, dtype: str) -> str | None:
        """Why target `target` with these capabilities cannot lower `model` in `dtype`, or None."""
        if model.config.version not in self.versions:
            return (f"target '{target}' cannot lower RWKV-v{model.config.version} "
                    f"(it supports v{', v'.join(sorted(self.versions))})")
        if dtype not in self.dtypes:
            return f"target '{target}' computes in {', '.join(self.dtypes)}, not {dtype}"
        kinds = {lin.kind for lin in model.linears()} | {model.emb.weight.kind}
        kinds |= {blk.ffn.deep.table.kind for blk in model.blocks if getattr(blk.ffn, "deep", None) is not None}
        missing = sorted(kinds - self.weight_kinds)
        if missing:
            return (f"target '{target}' has no kernel for weight representation(s) {', '.join(missing)} "
                    f"(it lowers {', '.join(sorted(self.weight_kinds))}); drop the pass that made them or pick "
                    "another target")
        return None


@dataclass(frozen=True)
class CompileOptions:
    """What `rwkvc.compile(..., options={...})` / the CLI pass a target, typed.

    dtype     compute dtype (None: the target's default)
    fused     cpu: rwkvc's fused kernels on (True), off (False), or where they apply and g++ exists (None)
    lowering  cpu / cuda: the ONNX lowering's policy (rwkvc.targets.onnx.LoweringPolicy) pinned instead of
              derived from `fused` and this host's CPU
    """
    dtype: str | None = None
    fused: bool | None = None
    lowering: object | None = None

    def __post_init__(self):
        if self.dtype is not None and not isinstance(self.dtype, str):
            raise RwkvcError(f"compile option dtype must be a dtype name such as 'float32', got {self.dtype!r}")
        if self.fused is not None and not isinstance(self.fused, bool):
            raise RwkvcError(f"compile option fused must be True, False or None, got {self.fused!r}")
        if self.lowering is not None:
            from .onnx.policy import LoweringPolicy
            if not isinstance(self.lowering, LoweringPolicy):
                raise RwkvcError(f"compile option lowering must be a LoweringPolicy, got {type(self.lowering).__name__}")
            if self.fused is not None and self.fused != self.lowering.fused:
                raise RwkvcError(f"compile options fused={self.fused} and lowering.fused={self.lowering.fused} disagree")

    @staticmethod
    def parse(options: "dict | CompileOptions | None") -> "CompileOptions":
        if isinstance(options, CompileOptions):
            return options
        d = dict(options or {})
        names = [f.name for f in dataclasses.fields(CompileOptions)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise RwkvcError(f"unknown compile option {unknown[0]!r} (options: {', '.join(names)})")
        return CompileOptions(**d)


class Target(Protocol):
    name: str
    description: str
    capabilities: Capabilities

    def compile(self, model: ir.Model, out_dir: str, options: dict, progress=None) -> dict:
        """Write the target's files into out_dir (a fresh temporary directory); return manifest fields
        (at least `entry_points`). options: CompileOptions' fields (CompileOptions.parse)."""
        ...


def unsupported(target: Target, model: ir.Model, dtype: str) -> str | None:
    """Why `target` cannot lower `model`, or None."""
    return target.capabilities.why_not(target.name, model, dtype)
