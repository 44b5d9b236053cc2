"""Typed options of running an artifact (the compile side's choices are the target's LoweringPolicy).

`threads` has one meaning everywhere: the CPU threads one forward pass may use (ONNX Runtime's intra-op
threads and rwkvc's kernels' split on `cpu`, TVM's worker threads on `tvm-host`, the native runner's
`--threads` on `rpi5`). None takes RWKVC_THREADS from the environment, and without it the runtime's own
default (one per physical core).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import RwkvcError, RwkvcValueError

THREADS_ENV = "RWKVC_THREADS"


def threads_from_env() -> int | None:
    """RWKVC_THREADS as a thread count, None when unset or empty; anything else is a clear error."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise RwkvcError(f"{THREADS_ENV}={raw!r}: not a positive whole number of threads; set it like "
                         f"{THREADS_ENV}=2 or unset it")
    return n


@dataclass(frozen=True)
class RuntimeOptions:
    threads: int | None = None   # CPU threads of one forward pass; None: RWKVC_THREADS, else the runtime's default

    def __post_init__(self):
        t = self.threads
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise RwkvcValueError(f"threads={t!r}: give a positive whole number of CPU threads, or None for the default")

    @classmethod
    def resolve(cls, threads: int | None = None) -> "RuntimeOptions":
        """The options for `threads` as given, falling back to RWKVC_THREADS."""
        return cls(threads=threads if threads is not None else threads_from_env())
