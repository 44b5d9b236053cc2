"""RWKV generations. Each module describes one: how to recognise its checkpoints, how to import them
into the IR, and how to lower its time-mix to ONNX. `ARCHS` is the registry (name -> Arch)."""
from __future__ import annotations

from typing import Protocol


class Arch(Protocol):
    name: str            # "7a" (RWKV-7 DeepEmbed), "7", "6", "5" (5.0, 5.1, 5.2 and RWKV-Lite), "4"

    def detect(self, sd: dict) -> bool: ...
    def marker(self, sd: dict) -> str: ...          # the key that told this version apart
    def to_ir(self, sd: dict): ...                  # -> rwkvc.ir.Model


from . import v4, v5, v6, v7, v7a  # noqa: E402

ARCHS: dict[str, Arch] = {"7a": v7a.ARCH, "7": v7.ARCH, "6": v6.ARCH, "5": v5.ARCH, "4": v4.ARCH}
