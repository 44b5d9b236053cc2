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
    for s in range(0, E.shape[0], chunk):
        out[s:s + chunk] = folded_rows(model, s, s + chunk)
    return out


def folded_rows(model, start: int, stop: int) -> np.ndarray:
    """Rows start:stop of folded_embedding(model) (only those rows of the table are read, 1024 at a time)."""
    E, n = model.emb.weight.w, model.ln0
    stop = min(stop, E.shape[0])
    out = np.empty((max(0, stop - start), E.shape[1]), np.float32)
    for s in range(start, stop, 1024):
        e = np.asarray(E[s:min(s + 1024, stop)], np.float64)
        if n is None:
            out[s - start:s - start + len(e)] = e
            continue
        mu = e.mean(-1, keepdims=True)
        var = ((e - mu) ** 2).mean(-1, keepdims=True)
        out[s - start:s - start + len(e)] = (e - mu) / np.sqrt(var + n.eps) * n.weight + n.bias
    return out


def folded_lazy(model):
    """folded_embedding(model) as an rwkvc.mapped.LazyArray read by blocks of rows (a writer streams it)."""
    from rwkvc.mapped import LazyArray
    return LazyArray(lambda: folded_embedding(model), model.emb.weight.w.shape, np.float32, "emb (ln0 folded)",
                     rows=lambda a, b: folded_rows(model, a, b))
