"""rwkvc artifacts as an lm-evaluation-harness model: `--model rwkvc --model_args artifact=DIR[,threads=N]`.

lm-eval finds models in its registry, filled by the @register_model decorator when the module defining
the model is imported; it has no plugin discovery for models. So this module registers "rwkvc" on import,
and running it is the `lm_eval` command with rwkvc registered:

    python -m rwkvc.serve.lm_eval run --model rwkvc --model_args artifact=DIR --tasks hellaswag
    python -m rwkvc.serve.lm_eval run --model rwkvc --model_args artifact=DIR --tasks my_task --include_path tasks/

or from Python: `import rwkvc.serve.lm_eval` then `lm_eval.simple_evaluate(model="rwkvc", ...)`.

    loglikelihood          log p(continuation | context) and whether it is the greedy continuation; the
                           context's state is kept in a PrefixCache, so the choices of a multiple-choice
                           question prefill their shared context once
    loglikelihood_rolling  log p of a whole text, from the start-of-document token 0 (an RNN has no
                           window: the text is scored in one pass whatever its length)
    generate_until         greedy (or sampled: do_sample, temperature, top_p) text up to `until` or
                           max_gen_toks

Contexts are split from continuations as lm-eval's Hugging Face model does: trailing spaces of the
context move to the continuation, and the continuation's tokens are those of context + continuation after
the context's own tokens. An empty context is the start-of-document token 0.
"""
from __future__ import annotations

import math
import sys

import numpy as np

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from rwkvc.sampling import SamplingConfig

from .cache import PrefixCache

DEFAULT_GEN_TOKENS = 256


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max()
    return x - m - math.log(np.exp(x - m).sum())


@register_model("rwkvc")
class RwkvcLM(LM):
    def __init__(self, artifact: str | None = None, threads: int | None = None, cache_mb: float = 256,
                 **_lm_eval_options):   # batch_size, device...: one sequence at a time on the artifact's runtime
        super().__init__()
        from rwkvc.api import load
        from rwkvc.errors import RwkvcError
        if not artifact:
            raise RwkvcError("the rwkvc lm-eval model needs --model_args artifact=DIR")
        self.model = load(artifact, threads=int(threads) if threads else None)
        self.cache = PrefixCache(int(float(cache_mb) * 2 ** 20))

    # -- helpers ------------------------------------------------------------------------------------
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        enc = self.model.encode
        ctx = enc(context)
        whole = enc(context + continuation)
        if whole[:len(ctx)] != ctx:        # the boundary tokenized differently: score the parts apart
            return ctx or [0], enc(continuation)
        return ctx or [0], whole[len(ctx):]

    def context_state(self, ctx: list[int]):
        n, hit = self.cache.longest(ctx)
        logits, state = hit if hit is not None else (None, self.model.init_state())
        if n < len(ctx):
            logits, state = self.model.forward(ctx[n:], state)
            self.cache.put(ctx, logits, state)
        return logits, state

    def score(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        """log p(cont | ctx) and whether every token of cont is the argmax."""
        logits, state = self.context_state(ctx)
        total, greedy = 0.0, True
        for i, t in enumerate(cont):
            lp = _log_softmax(logits)
            total += float(lp[t])
            greedy = greedy and int(np.argmax(logits)) == t
            if i + 1 < len(cont):
                logits, state = self.model.forward([t], state)
        return total, greedy

    # -- lm-eval's interface --------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for req in _progress(requests, disable_tqdm, "loglikelihood"):
            context, continuation = req.args
            out.append(self.score(*self.encode_pair(context, continuation)))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in _progress(requests, disable_tqdm, "loglikelihood_rolling"):
            toks = self.model.encode(req.args[0])
            out.append(self.score([0], toks)[0] if toks else 0.0)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in _progress(requests, disable_tqdm, "generate_until"):
            context, kw = req.args
            kw = dict(kw or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kw.pop("max_gen_toks", DEFAULT_GEN_TOKENS))
            sample = bool(kw.pop("do_sample", False))
            temp = float(kw.pop("temperature", 1.0 if sample else 0.0)) if sample else 0.0
            cfg = SamplingConfig(temperature=temp, top_p=float(kw.pop("top_p", 1.0)) if sample else 1.0,
                                 stop_strings=tuple(u for u in until if u), token_stop=(0,),
                                 seed=kw.pop("seed", 0) if sample else None)
            ctx = self.model.encode(context) or [0]
            # from the cached context state: Model.stream takes the state before the last token, feeds it
            out.append(self.model.generate(ctx[-1:], n, state=self._before_last(ctx), sampling=cfg))
        return out

    def _before_last(self, ctx: list[int]):
        """The state before ctx's last token (stream feeds that token itself), from the context cache."""
        if len(ctx) == 1:
            return self.model.init_state()
        return self.context_state(ctx[:-1])[1]


def _progress(requests, disable: bool, what: str):
    if disable or len(requests) < 2:
        return requests
    from tqdm import tqdm
    return tqdm(requests, desc=f"rwkvc {what}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """The `lm_eval` command, with the rwkvc model registered."""
    from lm_eval.__main__ import cli_evaluate
    if argv is not None:
        sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
