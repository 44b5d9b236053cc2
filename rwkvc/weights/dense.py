"""`dense`: a float matrix W (out, in), y = x @ W.T."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np


@dataclass
class Dense:
    """W (out, in): y = x @ W.T."""
    w: np.ndarray
    kind: ClassVar[str] = "dense"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.w.shape)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"w": self.w}

    def to_dense(self) -> np.ndarray:
        return np.asarray(self.w, dtype=np.float32)

    def quantized(self, q, name: str):
        """This matrix quantised by q(name, w float32) -> (representation, changed)."""
        w = self.w if getattr(self.w, "row_blocks", None) and self.w.dtype == np.float32 else \
            np.asarray(self.w, np.float32)   # a LazyArray stays lazy: the quantisers read it by blocks of rows
        return q(name, w), True

    def describe(self) -> str:
        return f"dense {self.w.shape[0]}x{self.w.shape[1]} {self.w.dtype}"
