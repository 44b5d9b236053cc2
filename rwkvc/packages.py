"""One import name per module: rwkvc's stage folders (passes/, targets/, runtimes/, training/) are the
packages rwkvc.passes, rwkvc.targets, rwkvc.runtimes and rwkvc.training, and belong to the tree whose core
(rwkvc/) is loaded. Each folder's __init__ calls `claim`, so a second name (`import passes` from the
repository root) or a folder of another checkout fails at import instead of loading a second copy."""
from __future__ import annotations

import sys
from pathlib import Path

STAGES = ("passes", "targets", "runtimes", "training")


class PackageNameError(ImportError):
    """A stage package imported under a second name or beside another tree's core."""


def claim(name: str, file: str) -> None:
    """Refuse to load the stage package at `file` under any name but rwkvc.<folder>, or beside another
    tree's core."""
    folder = Path(file).resolve().parent
    expected = "rwkvc." + folder.name
    if name != expected:
        raise PackageNameError(f"{folder} is the package {expected}: import {expected}, not {name}")
    core = Path(sys.modules["rwkvc"].__file__).resolve().parent
    if folder.parent not in (core, core.parent):   # installed: rwkvc/passes; a source tree: ROOT/passes
        raise PackageNameError(f"{expected} at {folder} does not belong to the rwkvc core at {core}: "
                          f"install one checkout (pip install -e DIR) and run from it")
