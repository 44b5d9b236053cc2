"""What a target is: a name, its capabilities as data, and a compile step IR -> artifact files.

The lowering asks a target what it supports (`capabilities`) instead of branching on its name; the
compile driver (rwkvc.artifact) refuses, before any work, an IR the target cannot lower.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from rwkvc import ir


@dataclass(frozen=True)
class Capabilities:
    weight_kinds: frozenset[str]                   # IR weight representations it can lower
    dtypes: tuple[str, ...] = ("float32",)         # compute dtypes, the first is the default
    versions: frozenset[str] = frozenset({"7"})    # RWKV generations it can lower
    runtime: str = "onnxruntime"                   # which runtimes/ module runs its artifacts
    extras: dict = field(default_factory=dict)


class Target(Protocol):
    name: str
    description: str
    capabilities: Capabilities

    def compile(self, model: ir.Model, out_dir: str, options: dict, progress=None) -> dict:
        """Write the target's files into out_dir (a fresh temporary directory); return manifest fields
        (at least `entry_points`)."""
        ...


def unsupported(target: Target, model: ir.Model, dtype: str) -> str | None:
    """Why `target` cannot lower `model`, or None."""
    caps = target.capabilities
    if model.config.version not in caps.versions:
        return f"target '{target.name}' cannot lower RWKV-v{model.config.version} (it supports v{', v'.join(sorted(caps.versions))})"
    if dtype not in caps.dtypes:
        return f"target '{target.name}' computes in {', '.join(caps.dtypes)}, not {dtype}"
    kinds = {lin.kind for lin in model.linears()} | {model.emb.weight.kind}
    missing = sorted(kinds - caps.weight_kinds)
    if missing:
        return (f"target '{target.name}' has no kernel for weight representation(s) {', '.join(missing)} "
                f"(it lowers {', '.join(sorted(caps.weight_kinds))}); drop the pass that made them or pick another target")
    return None
