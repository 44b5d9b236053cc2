"""`rwkvc eval`: how much a (compressed) artifact's predictions differ from the uncompressed model's.

    r = evaluate("art/", "heldout.txt", ref="model.pth", n_tokens=2000)
    r["ppl"], r["ref_ppl"], r["ppl_delta_pct"], r["top1_agreement"], r["mean_kl"]

Both models read the same tokens one at a time through their step graphs (teacher forcing); at each
position t the artifact's distribution over token t+1 is compared with the reference's:

    ppl             exp(mean -log p(token t+1))                        (the artifact's perplexity)
    ppl_delta_pct   100 * (ppl / ref_ppl - 1)
    top1_agreement  fraction of positions where both argmaxes agree
    mean_kl         mean over positions of KL(ref || artifact), nats per token

`ref` is a checkpoint (compiled dense for the cpu target into a temporary directory) or an artifact
directory. The data is a text file (encoded with the artifact's tokenizer), a .npy of token ids or a binidx prefix.
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np

from .errors import RwkvcError


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max()
    return x - (m + math.log(np.exp(x - m).sum()))


class _Stepper:
    """Feeds tokens one at a time to an artifact (or anything with forward(tokens, state))."""

    def __init__(self, model):
        self.model, self.state = model, None

    def __call__(self, tok: int) -> np.ndarray:
        logits, self.state = self.model.forward([int(tok)], self.state)
        return logits


def _load(path, threads):
    from .api import load
    return load(path, threads=threads)


def compile_reference(ref: str, workdir: str) -> str:
    p = Path(ref)
    if p.is_dir():
        return str(p)
    from .pipeline import compile_checkpoint
    return str(compile_checkpoint(str(p), Path(workdir) / "ref-dense", target="cpu", force=True))


def evaluate(artifact, data, ref=None, n_tokens: int = 2000, threads=None, progress=None) -> dict:
    """Metrics of `artifact` on `data` (see the module docstring); with `ref`, also against it."""
    from .calib import load_tokens
    art = _load(artifact, threads)
    tokens = load_tokens(data, limit=n_tokens + 1, tokenizer=art.tokenizer)   # text: the artifact's own tokenizer
    if len(tokens) < 2:
        raise RwkvcError(f"{data}: too few tokens to evaluate")
    V = art.config.vocab_size
    if int(tokens.max()) >= V:
        raise RwkvcError(f"{data}: token id {int(tokens.max())} is outside the model's vocabulary ({V})")
    with tempfile.TemporaryDirectory(prefix="rwkvc-eval-") as tmp:
        ref_model = None
        if ref is not None:
            ref_model = _load(compile_reference(ref, tmp), threads)
            if ref_model.config.vocab_size != V:
                raise RwkvcError(f"--ref has vocabulary {ref_model.config.vocab_size}, the artifact {V}")
        a_step = _Stepper(art)
        r_step = _Stepper(ref_model) if ref_model is not None else None
        nll = ref_nll = kl = 0.0
        agree = 0
        n = len(tokens) - 1
        t0 = time.perf_counter()
        for t in range(n):
            la = _log_softmax(a_step(tokens[t]))
            nxt = int(tokens[t + 1])
            nll -= la[nxt]
            if r_step is not None:
                lr = _log_softmax(r_step(tokens[t]))
                ref_nll -= lr[nxt]
                kl += float(np.sum(np.exp(lr) * (lr - la)))
                agree += int(np.argmax(la) == np.argmax(lr))
            if progress:
                progress(t + 1, n)
        wall = time.perf_counter() - t0
    name = str(data) if isinstance(data, (str, Path)) else f"<{len(tokens)} token ids>"
    out = {"artifact": str(artifact), "data": name, "tokens": n, "loss": nll / n, "ppl": math.exp(nll / n),
           "wall_s": round(wall, 2)}
    if r_step is not None:
        out.update({"ref": str(ref), "ref_loss": ref_nll / n, "ref_ppl": math.exp(ref_nll / n),
                    "ppl_delta_pct": 100.0 * (math.exp((nll - ref_nll) / n) - 1.0),
                    "top1_agreement": agree / n, "mean_kl": kl / n})
    return out


def format_report(r: dict) -> str:
    lines = [f"artifact        {r['artifact']}", f"data            {r['data']} ({r['tokens']} predicted tokens)",
             f"perplexity      {r['ppl']:.4f}  (loss {r['loss']:.4f} nats/token)"]
    if "ref_ppl" in r:
        lines += [f"reference       {r['ref_ppl']:.4f}  (loss {r['ref_loss']:.4f})  [{r['ref']}]",
                  f"delta           {r['ppl_delta_pct']:+.3f} %",
                  f"top-1 agreement {100 * r['top1_agreement']:.2f} %",
                  f"mean KL         {r['mean_kl']:.5f} nats/token"]
    return "\n".join(lines)
