"""User-facing errors."""
from __future__ import annotations

import sys
from typing import Callable


class RwkvcError(Exception):
    """A user-facing error: one line, naming the problem and what to do."""


class RwkvcValueError(RwkvcError, ValueError):
    """A value the caller gave is not one rwkvc can use (catchable as ValueError too)."""


class RwkvcTypeError(RwkvcError, TypeError):
    """An argument of the wrong type (catchable as TypeError too)."""


def exit_status(fn: Callable[[], object]) -> int:
    """Run a script's work: 0 when it succeeds; a RwkvcError becomes one `error: ...` line on stderr and
    exit status 2 (no traceback). For the `main()` of the scripts under training/."""
    try:
        fn()
    except RwkvcError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
