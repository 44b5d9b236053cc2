"""`lowrank`: W ~ B act(A x) (+ diag x) with float factors, and the SVD that makes them.

    svd_factor(w, rank) -> (a (rank, in), b (out, rank)) with b @ a the best rank-`rank` approximation of
                           w (Eckart-Young), the singular values split evenly (b = U sqrt(S), a = sqrt(S) V^T)
                           so both factors have the same scale (which suits their later quantisation)
    singular_values(w)  -> the singular values of w, largest first
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np


def svd_factor(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    w = np.asarray(w, np.float32)
    U, S, Vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    r = int(max(1, min(rank, len(S))))
    s = np.sqrt(S[:r])
    return (s[:, None] * Vt[:r]).astype(np.float32), (U[:, :r] * s[None, :]).astype(np.float32)


def singular_values(w: np.ndarray) -> np.ndarray:
    return np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)


class TwoFactors:
    """Shape and rank of W ~ B act(A x) with a (rank, in) and b (out, rank), whatever a and b hold."""
    a: object
    b: object

    def check_factors(self):
        if self.a.shape[0] != self.b.shape[1]:
            raise ValueError(f"{type(self).__name__}: a {self.a.shape} and b {self.b.shape} disagree on the rank")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.b.shape[0], self.a.shape[1])

    @property
    def rank(self) -> int:
        return self.a.shape[0]



@dataclass
class LowRank(TwoFactors):
    """W ~ B act(A x) (+ diag * x): y = act(x @ A.T) @ B.T (+ x * diag).

    a (rank, in), b (out, rank). act: None, "relu" or "relu2" (squared relu), as RWKV-Lite's
    factorised projections use; diag (in,) only for square matrices.
    """
    a: np.ndarray
    b: np.ndarray
    act: str | None = None
    diag: np.ndarray | None = None
    kind: ClassVar[str] = "lowrank"

    def __post_init__(self):
        self.check_factors()
        if self.act not in (None, "relu", "relu2"):
            raise ValueError(f"LowRank.act must be None, 'relu' or 'relu2', got {self.act!r}")

    def arrays(self) -> dict[str, np.ndarray]:
        d = {"a": self.a, "b": self.b}
        if self.diag is not None:
            d["diag"] = self.diag
        return d

    def to_dense(self) -> np.ndarray:
        if self.act is not None:
            raise ValueError("a LowRank with an activation has no dense equivalent")
        w = np.asarray(self.b, np.float32) @ np.asarray(self.a, np.float32)
        if self.diag is not None:
            w = w + np.diag(np.asarray(self.diag, np.float32))
        return w

    def quantized(self, q, name: str):
        """Both factors quantised by q(name, w): a Factored matrix."""
        from .factored import Factored
        a = q(name + ".a", np.asarray(self.a, np.float32))
        b = q(name + ".b", np.asarray(self.b, np.float32))
        return Factored(a, b, self.act, self.diag), True

    def describe(self) -> str:
        extra = (f" act={self.act}" if self.act else "") + (" +diag" if self.diag is not None else "")
        return f"lowrank {self.shape[0]}x{self.shape[1]} rank {self.rank}{extra} {self.a.dtype}"
