"""GRPO's rewards: `reward(prompt, completion, answer) -> float`, built in or the user's own.

    exact            1.0 when the completion, stripped of surrounding whitespace, equals the answer
    number           1.0 when the completion's first number equals the answer's (12 == 12.0)
    contains         1.0 when the answer appears in the completion
    format           1.0 when the completion is one non-empty line (no newline inside)
    format=REGEX     1.0 when the stripped completion matches REGEX in full (re.fullmatch)
    MODULE:FUNC      the user's function, imported by name from sys.path (`mypkg.rewards:score`; PYTHONPATH=.
                     for the current directory) or from a file (`path/to/rewards.py:score`); called as
                     FUNC(prompt, completion, answer)

A spec sums terms joined by `+`, each optionally weighted: `exact+0.1*format` is exact match plus a
tenth for a one-line answer. (A REGEX that needs `+` writes it as `{1,}`.) The completion a reward sees
is the sampled text cut before the first stop string; `answer` is the prompts file's "answer" (None when
a line has none).

Only a spec the user writes on the command line ever names code to run; nothing is read from a model.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rwkvc.errors import RwkvcError

NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def _text(answer) -> str:
    return "" if answer is None else str(answer).strip()


def exact(prompt: str, completion: str, answer) -> float:
    return float(answer is not None and completion.strip() == _text(answer))


def number(prompt: str, completion: str, answer) -> float:
    got, want = NUMBER.search(completion), NUMBER.search(_text(answer))
    return float(got is not None and want is not None and float(got.group()) == float(want.group()))


def contains(prompt: str, completion: str, answer) -> float:
    return float(answer is not None and _text(answer) != "" and _text(answer) in completion)


def one_line(prompt: str, completion: str, answer) -> float:
    text = completion.strip()
    return float(text != "" and "\n" not in text)


def regex_format(pattern: str) -> Callable:
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise RwkvcError(f"--reward format={pattern}: not a regular expression ({e})") from None

    def fmt(prompt: str, completion: str, answer) -> float:
        return float(rx.fullmatch(completion.strip()) is not None)
    fmt.__name__ = f"format={pattern}"
    return fmt


# name -> (function, or a factory taking the `=PARAM` text)
BUILTINS: dict[str, Callable] = {"exact": exact, "number": number, "contains": contains, "format": one_line}
PARAMETRIC: dict[str, Callable[[str], Callable]] = {"format": regex_format}


def _user_function(spec: str) -> Callable:
    """MODULE:FUNC or FILE.py:FUNC -> the function (the user's own code, named by the user)."""
    where, _, name = spec.rpartition(":")
    if not where or not name.isidentifier():
        raise RwkvcError(f"--reward {spec!r}: expected a built-in ({', '.join(BUILTINS)}) or MODULE:FUNC")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise RwkvcError(f"--reward {spec}: file {where} not found")
            mod_name = f"_rwkvc_reward_{path.stem}"
            loader = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(loader)
            sys.modules[mod_name] = module
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except RwkvcError:
        raise
    except ModuleNotFoundError as e:
        raise RwkvcError(f"--reward {spec}: module {e.name or where} not found (on sys.path, or give "
                         "FILE.py:FUNC)") from None
    except Exception as e:
        raise RwkvcError(f"--reward {spec}: importing {where} failed: {type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:200]}") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise RwkvcError(f"--reward {spec}: {where} has no {name}")
    if not callable(fn):
        raise RwkvcError(f"--reward {spec}: {where}.{name} is not a function")
    try:
        inspect.signature(fn).bind("prompt", "completion", "answer")
    except TypeError:
        raise RwkvcError(f"--reward {spec}: {name} must take (prompt, completion, answer)") from None
    except ValueError:  # a builtin without a signature: trust it
        pass
    return fn


@dataclass(frozen=True)
class Reward:
    """A weighted sum of reward terms; calling it scores one completion."""
    spec: str
    terms: tuple  # ((weight, name, fn), ...)

    def __call__(self, prompt: str, completion: str, answer) -> float:
        total = 0.0
        for w, name, fn in self.terms:
            try:
                r = fn(prompt, completion, answer)
            except Exception as e:
                raise RwkvcError(f"reward {name} raised {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]} "
                                 f"(prompt {prompt[:60]!r}, completion {completion[:60]!r})") from None
            try:
                r = float(r)
            except (TypeError, ValueError):
                r = math.nan
            if not math.isfinite(r):
                raise RwkvcError(f"reward {name} returned {r!r} for completion {completion[:60]!r}; it must "
                                 "return a finite number")
            total += w * r
        return total

    @property
    def needs_answer(self) -> bool:
        return any(fn in (exact, number, contains) for _, _, fn in self.terms)


def parse_reward(spec: str) -> Reward:
    """'exact+0.1*format' / 'mymod:score' -> Reward; a bad spec is one RwkvcError line."""
    if not spec or not spec.strip():
        raise RwkvcError(f"--reward is empty: give a built-in ({', '.join(BUILTINS)}) or MODULE:FUNC")
    terms = []
    for term in spec.split("+"):
        term = term.strip()
        weight = 1.0
        m = re.fullmatch(r"([-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)\s*\*\s*(.+)", term)
        if m:
            weight, term = float(m.group(1)), m.group(2).strip()
        if not term:
            raise RwkvcError(f"--reward {spec!r}: an empty term (terms are joined by '+')")
        name, eq, param = term.partition("=")
        if eq and name in PARAMETRIC:
            terms.append((weight, term, PARAMETRIC[name](param)))
        elif not eq and term in BUILTINS:
            terms.append((weight, term, BUILTINS[term]))
        else:
            terms.append((weight, term, _user_function(term)))
    return Reward(spec, tuple(terms))
