"""The embedding table as every lowering stores it: ln0 folded into the rows."""
from __future__ import annotations

import numpy as np


def folded_embedding(model, chunk: int = 8192) -> np.ndarray:
    """emb rows with ln0 applied (as the official package does at load time); (V, C) float32.
    model: an rwkvc.ir.Model."""
    E = model.emb.weight.w
    if model.ln0 is None:
        return np.asarray(E, np.float32)
    out = np.empty(E.shape, np.float32)
    n = model.ln0
    for s in range(0, E.shape[0], chunk):
        e = np.asarray(E[s:s + chunk], np.float64)
        mu = e.mean(-1, keepdims=True)
        var = ((e - mu) ** 2).mean(-1, keepdims=True)
        out[s:s + chunk] = (e - mu) / np.sqrt(var + n.eps) * n.weight + n.bias
    return out
