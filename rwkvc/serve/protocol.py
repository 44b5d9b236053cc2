"""The OpenAI request bodies rwkvc serves, and their mapping onto rwkvc's sampling options.

    OpenAI field                      rwkvc (`rwkvc run` option)          default
    temperature                       --temperature (0 = greedy)          1.0
    top_p                             --top-p                              0.85 (rwkvc run's)
    max_tokens (max_completion_tokens) -n                                  100
    stop (string or list)             --stop                               none (chat: also "\\n\\n")
    seed                              --seed                               none (nondeterministic)
    presence_penalty                  --presence                           0
    frequency_penalty                 --frequency                          0
    top_k            (extension)      --top-k                              0 (off)
    penalty_decay    (extension)      --decay                              0.996
    stop_token_ids   (extension)      --stop-token                         [0] (end of document, always)
    ban_token_ids    (extension)      --ban                                none

Fields rwkvc cannot honour (n > 1, echo, logprobs, a non-empty logit_bias, suffix, tools) are refused with
a 400 that names them, rather than ignored.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from rwkvc.errors import RwkvcError
from rwkvc.sampling import SamplingConfig

DEFAULT_MAX_TOKENS = 100


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=0)
    temperature: Optional[float] = Field(default=None, ge=0)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    top_k: Optional[int] = Field(default=None, ge=0)
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    penalty_decay: Optional[float] = Field(default=None, ge=0, le=1)
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = None
    ban_token_ids: Optional[list[int]] = None
    seed: Optional[int] = Field(default=None, ge=0)
    stream: bool = False
    stream_options: Optional[dict] = None
    n: Optional[int] = 1
    logprobs: Any = None
    logit_bias: Optional[dict] = None
    user: Optional[str] = None

    def refuse_unsupported(self, extra: dict) -> None:
        if self.n not in (None, 1):
            raise RwkvcError("n: only n=1 is supported; send the request n times (with different seeds)")
        if self.logprobs not in (None, False, 0):
            raise RwkvcError("logprobs: not supported by this server (use the rwkvc Python API or the lm-eval adapter)")
        if self.logit_bias:
            raise RwkvcError("logit_bias: not supported; use ban_token_ids to exclude tokens")
        for k, v in extra.items():
            if v not in (None, False, [], {}, ""):
                raise RwkvcError(f"{k}: not supported by this server")

    def sampling(self, extra_stops: tuple[str, ...] = ()) -> SamplingConfig:
        for name in ("stop_token_ids", "ban_token_ids"):
            bad = [t for t in getattr(self, name) or [] if t < 0]
            if bad:
                raise RwkvcError(f"{name}: token ids are >= 0, got {bad[0]}")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise RwkvcError("stop: stop strings must be non-empty")
        kw = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
              "alpha_presence": self.presence_penalty, "alpha_frequency": self.frequency_penalty,
              "alpha_decay": self.penalty_decay, "seed": self.seed}
        kw = {k: v for k, v in kw.items() if v is not None}
        return SamplingConfig(**kw, stop_strings=tuple(stops) + tuple(extra_stops),
                              token_stop=tuple(sorted({0, *(self.stop_token_ids or [])})),
                              token_ban=tuple(self.ban_token_ids or ()))

    def limit(self, alt: Optional[int] = None) -> int:
        n = self.max_tokens if self.max_tokens is not None else alt
        return DEFAULT_MAX_TOKENS if n is None else n


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str], list[list[int]]] = ""
    echo: Optional[bool] = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    def unsupported(self) -> dict:
        return {"echo": self.echo, "suffix": self.suffix, "best_of": None if self.best_of in (None, 1) else self.best_of}

    def prompt_one(self) -> Union[str, list[int]]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise RwkvcError(f"prompt: one prompt per request (got a list of {len(p)}); send them as separate "
                                 "requests, which the server batches")
            return p[0]
        return p


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[dict], None] = ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=0)
    tools: Optional[list] = None
    response_format: Optional[dict] = None

    def unsupported(self) -> dict:
        rf = self.response_format
        return {"tools": self.tools, "response_format": None if not rf or rf.get("type") == "text" else rf}

    def message_dicts(self) -> list[dict]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.content or ""}
                for m in self.messages]
