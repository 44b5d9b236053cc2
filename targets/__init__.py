"""Targets: name -> Target (see targets/base.py)."""
from __future__ import annotations

from rwkvc.packages import claim

claim(__name__, __file__)   # one import name: rwkvc.targets

from rwkvc.errors import RwkvcError

from .base import Capabilities, Target, unsupported
from .cpu import CpuTarget

TARGETS: dict[str, Target] = {"cpu": CpuTarget()}
TARGETS["rpi5"] = __import__("rwkvc.targets.rpi5", fromlist=["TARGET"]).TARGET  # imports TVM only to compile
TARGETS["cuda"] = __import__("rwkvc.targets.cuda", fromlist=["TARGET"]).TARGET
TARGETS["tvm-host"] = __import__("rwkvc.targets.tvm_host", fromlist=["TARGET"]).TARGET  # imports TVM only to compile


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise RwkvcError(f"unknown target '{name}'; choose one of: {', '.join(TARGETS)}")
    return TARGETS[name]


__all__ = ["TARGETS", "Capabilities", "Target", "get_target", "unsupported"]
