"""`scaled`: W = Q diag(in_scale), the AWQ representation: the input is multiplied by in_scale, then Q
(any representation, AWQ's Int4 of W diag(s)) applied."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np


@dataclass
class Scaled:
    """W = Q diag(in_scale): y = Q (x * in_scale)."""
    inner: object
    in_scale: np.ndarray
    kind: ClassVar[str] = "scaled"

    @property
    def shape(self):
        return self.inner.shape

    def arrays(self):
        d = {"inner." + k: v for k, v in self.inner.arrays().items()}
        d["in_scale"] = self.in_scale
        return d

    def to_dense(self):
        return self.inner.to_dense() * self.in_scale[None, :]

    def quantized(self, q, name: str):
        return self, False

    def describe(self):
        return f"scaled input x {self.inner.describe()}"
