"""`factored`: W ~ B act(A x) (+ diag x) with A and B any weight representations (a low-rank matrix whose
factors were quantised)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .lowrank import TwoFactors


@dataclass
class Factored(TwoFactors):
    """W ~ B act(A x) (+ diag * x), A (rank, in) and B (out, rank) any weight representations."""
    a: object
    b: object
    act: str | None = None
    diag: np.ndarray | None = None
    kind: ClassVar[str] = "factored"

    def __post_init__(self):
        self.check_factors()

    def arrays(self) -> dict[str, np.ndarray]:
        d = {"a." + k: v for k, v in self.a.arrays().items()}
        d.update({"b." + k: v for k, v in self.b.arrays().items()})
        if self.diag is not None:
            d["diag"] = self.diag
        return d

    def to_dense(self) -> np.ndarray:
        if self.act is not None:
            raise ValueError("a Factored matrix with an activation has no dense equivalent")
        w = self.b.to_dense() @ self.a.to_dense()
        if self.diag is not None:
            w = w + np.diag(np.asarray(self.diag, np.float32))
        return w

    def quantized(self, q, name: str):
        """The factors not yet quantised, quantised by q(name, w)."""
        a, ca = self.a.quantized(q, name + ".a")
        b, cb = self.b.quantized(q, name + ".b")
        return (Factored(a, b, self.act, self.diag), True) if (ca or cb) else (self, False)

    def describe(self) -> str:
        extra = (f" act={self.act}" if self.act else "") + (" +diag" if self.diag is not None else "")
        return f"factored {self.shape[0]}x{self.shape[1]} rank {self.rank}{extra} (a: {self.a.describe()}, b: {self.b.describe()})"
