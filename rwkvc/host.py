"""The host rwkvc runs on: its CPU's instruction-set flags (the kernel cache key and the cpu target's
lowering read them) and its C++ compiler (which builds rwkvc's ONNX Runtime kernels)."""
from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path


def cpu_flags() -> str:
    """The CPU's feature flags, space-separated: /proc/cpuinfo's `flags` (x86) or `Features` (Arm) line, or
    platform.processor() where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def compiler() -> str | None:
    """The host's C++ compiler (what builds rwkvc's ONNX Runtime kernels): $CXX, else g++ or c++ on the
    PATH; None when there is none."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
