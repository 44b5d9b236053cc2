"""Passes: IR -> IR rewrites that return a report. `PASSES` is the registry (name -> Pass).

A pass declares its parameters (name -> (type, default, check)) so a recipe string such as
"svd(rank=0.25),int4(group=32)" is parsed and validated before any work starts.
"""
from __future__ import annotations

from rwkvc.packages import claim

claim(__name__, __file__)   # one import name: rwkvc.passes

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from rwkvc import ir


@dataclass(frozen=True)
class Param:
    type: type
    default: Any
    check: Callable[[Any], bool] = lambda v: True
    allowed: str = ""          # words for the error message, e.g. "a fraction in (0, 1]"


class Pass(Protocol):
    name: str
    params: dict[str, Param]
    requires: tuple[str, ...]      # passes that must run before this one
    forbids_after: tuple[str, ...]  # passes that must not already have run

    def run(self, model: ir.Model, args: dict, ctx: "PassContext") -> tuple[ir.Model, dict]: ...


@dataclass
class PassContext:
    calib_tokens: Any = None       # np.ndarray of token ids for passes that calibrate, or None
    progress: bool = True
    dump_dir: str | None = None
    extra: dict = field(default_factory=dict)
    later: tuple = ()              # the names of the recipe's passes after the running one (run_passes)
    spill_dir: str | None = None   # where keep() writes new weights (a compile's scratch directory), or None

    def keep(self, rep):
        """A weight representation a pass puts into the IR: with spill_dir, its big arrays go to scratch files
        and are read back when used (rwkvc.mapped.spill_rep), so a pass over a big model holds one matrix."""
        if self.spill_dir is None:
            return rep
        from rwkvc.mapped import spill_rep
        return spill_rep(rep, self.spill_dir)


PASSES: dict[str, Pass] = {}


def register(p):
    PASSES[p.name] = p
    return p


# the passes register themselves on import (kept at the bottom: they import Param / register from here)
from . import quant, svd, lazy_emb, sparse_ffn, hhead, calib_quant  # noqa: E402,F401
