"""GRPO's policy: a recurrent language model as the sampler and the learner see it.

A policy is any torch module with

    forward(tokens (B, T) int64, state | None) -> (logits (B, T, V), state)     None = the empty state

plus two operations on its state, so that one prompt's state can serve a whole group:

    select_state(state, index (B',) int64) -> state    rows `index` of the batch (repeats allowed)
    cat_states([state, ...]) -> state                  batches joined

RWKV-7 (rwkvc.reference.v7.RWKV7) and the RWKV-7 hybrids (rwkvc.reference.hybrid.Hybrid: a transformer's
embeddings, norms, MLPs and head around RWKV-7 time-mixes; the same State) are registered here; another
family gives its module `select_state` / `cat_states` methods (or an entry in STATE_OPS), a loader in
LOADERS and a policy maker in POLICIES.

Sampling (`sample_groups`) is the RNN's advantage: each prompt is read once, its state copied G times,
and all P*G completions step together, each keeping one fixed-size state (no cache that grows); rows
that have stopped leave the batch. `completion_logprobs` reads each prompt once again (with gradients)
and all completions from the copied states in one batched forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from rwkvc.errors import RwkvcError
from rwkvc.reference.hybrid import Hybrid
from rwkvc.reference.v7 import RWKV7, State, config_from_state_dict


# ------------------------------------------------------------------------------------------------
# state operations, per state type

def _v7_select(s: State, index: torch.Tensor) -> State:
    # shift (L, 2, B, C), wkv (L, B, H, N, N)
    return State(s.shift.index_select(2, index), s.wkv.index_select(1, index))


def _v7_cat(states: list[State]) -> State:
    return State(torch.cat([s.shift for s in states], 2), torch.cat([s.wkv for s in states], 1))


STATE_OPS: dict[type, tuple[Callable, Callable]] = {State: (_v7_select, _v7_cat)}


@dataclass
class Policy:
    """module: the trained nn.Module (its state_dict is the checkpoint); forward(tokens, state)."""
    module: nn.Module
    forward: Callable

    def _ops(self, state):
        if hasattr(self.module, "select_state") and hasattr(self.module, "cat_states"):
            return self.module.select_state, self.module.cat_states
        ops = STATE_OPS.get(type(state))
        if ops is None:
            raise RwkvcError(f"the policy's state ({type(state).__name__}) has no select/cat operations: give the "
                             "model select_state(state, index) and cat_states(states) methods")
        return ops

    def select(self, state, index: torch.Tensor):
        return self._ops(state)[0](state, index)

    def cat(self, states: list):
        return self._ops(states[0])[1](states)



def _device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def recurrent_policy(model: nn.Module, wkv_fn=None) -> Policy:
    """RWKV7 and Hybrid: forward(idx, state, wkv_fn=...) -> (logits, State)."""
    def forward(tokens, state):
        return model(tokens, state, wkv_fn=wkv_fn)
    return Policy(model, forward)


def _is_rwkv7(path: str) -> bool:
    return True                                   # the fallback: checked by its keys when loaded


def _load_rwkv7(path: str) -> tuple[nn.Module, dict]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RwkvcError(f"--load_model {path} not found") from None
    except Exception as e:
        raise RwkvcError(f"--load_model {path}: not a readable torch checkpoint ({type(e).__name__})") from None
    keys = ("emb.weight", "blocks.0.att.k_k", "blocks.0.att.a0", "blocks.0.att.r_k")
    if not isinstance(sd, dict) or not all(k in sd for k in keys):
        raise RwkvcError(f"--load_model {path}: not a checkpoint of a family GRPO trains ({', '.join(LOADERS)})")
    model = RWKV7(config_from_state_dict(sd))
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model, {}


def _is_hybrid(path: str) -> bool:
    from rwkvc.arch.hybrid import config_path
    return config_path(path) is not None


def _load_hybrid(path: str) -> tuple[nn.Module, dict]:
    """A hybrid directory (config.json + model.safetensors) or weights file with config.json beside it; the
    checkpoints GRPO writes (rwkv-N.pth) get the config.json beside them, the layout rwkvc compile reads."""
    import json

    from rwkvc.reference.hybrid import load
    model = load(path)
    return model, {"config.json": json.dumps(model.cfg.to_json(), indent=1)}


# name -> (recognises a checkpoint path, loads it -> (module in fp32, files to write beside its checkpoints)),
# tried in order
LOADERS: dict[str, tuple[Callable[[str], bool], Callable[[str], tuple[nn.Module, dict]]]] = {
    "RWKV-7 hybrid": (_is_hybrid, _load_hybrid), "RWKV-7": (_is_rwkv7, _load_rwkv7)}
POLICIES: dict[type, Callable] = {RWKV7: recurrent_policy, Hybrid: recurrent_policy}


def load_module(path: str) -> tuple[str, nn.Module, dict]:
    """A checkpoint -> (family name, module in fp32, {file name: text} to write beside its checkpoints);
    one-line errors for a missing or foreign file."""
    from pathlib import Path
    if not Path(path).exists():
        raise RwkvcError(f"--load_model {path} not found")
    for name, (match, load) in LOADERS.items():
        if match(path):
            try:
                module, sidecars = load(path)
            except RwkvcError:
                raise
            except Exception as e:
                raise RwkvcError(f"--load_model {path}: a {name} checkpoint that does not load "
                                 f"({(str(e).splitlines() or [''])[0][:200]})") from None
            return name, module, sidecars
    raise RwkvcError(f"--load_model {path}: not a checkpoint of a family GRPO trains ({', '.join(LOADERS)})")


def vocab_size(module: nn.Module) -> int | None:
    cfg = getattr(module, "cfg", None)
    return getattr(cfg, "vocab_size", None)


def make_policy(module: nn.Module, wkv_fn=None) -> Policy:
    make = POLICIES.get(type(module))
    if make is not None:
        return make(module, wkv_fn)
    return Policy(module, module.forward)   # any module with forward(tokens, state) -> (logits, state)


# ------------------------------------------------------------------------------------------------
# reading prompts: once each, then copied to the group

def prompt_states(policy: Policy, prompts: list[list[int]], group: int):
    """P prompts -> (last logits (P * G, V), state of P * G rows), prompt-major. Prompts of one length
    are read together (B = how many), each once; the copies to the group are row selections."""
    dev = _device(policy.module)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    lasts, states, order = [], [], []
    for ids in by_len.values():
        lg, st = policy.forward(torch.tensor([prompts[i] for i in ids], dtype=torch.long, device=dev), None)
        lasts.append(lg[:, -1])                                                           # (n, V)
        states.append(st)
        order += ids
    pos = torch.empty(len(prompts), dtype=torch.long)
    pos[torch.tensor(order)] = torch.arange(len(prompts))                                 # prompt i's row
    rows = pos.repeat_interleave(group).to(dev)
    last = torch.cat(lasts) if len(lasts) > 1 else lasts[0]
    state = policy.cat(states) if len(states) > 1 else states[0]
    return last.index_select(0, rows), policy.select(state, rows)


# ------------------------------------------------------------------------------------------------
# sampling

def pick_tokens(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> tokens (B,): greedy when temperature == 0, else tempered nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1:
        sp, si = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p          # keep tokens until top_p is reached (the first always)
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@dataclass
class Completion:
    tokens: list[int]     # what was sampled, the stop's tokens (or end-of-text) included: what is trained on
    text: str             # decoded, cut before the first stop string
    stopped: bool         # ended by a stop string or end-of-text (else by max_new_tokens)


def _cut(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    at = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:at], True) if at >= 0 else (text, False)


@torch.no_grad()
def sample_groups(policy: Policy, prompts: list[list[int]], group: int, tokenizer, *, temperature: float,
                  top_p: float, max_new_tokens: int, stops: tuple[str, ...], gen: torch.Generator | None,
                  eod: int | None = 0, ban: torch.Tensor | None = None) -> list[Completion]:
    """Sample `group` completions of each prompt -> len(prompts) * group Completions, prompt-major.

    Each prompt is read once; its state and last logits are copied to its group, then all rows
    step together, rows that stop leaving the batch. ban: token ids never sampled (ids the tokenizer
    cannot decode)."""
    dev = _device(policy.module)
    lg, state = prompt_states(policy, prompts, group)                                      # R = P * G rows
    R = lg.shape[0]
    toks: list[list[int]] = [[] for _ in range(R)]
    stopped = [False] * R
    active = list(range(R))
    for _ in range(max_new_tokens):
        if ban is not None and len(ban):
            lg = lg.index_fill(-1, ban, float("-inf"))
        picked = pick_tokens(lg, temperature, top_p, gen).tolist()
        keep = []
        for j, (r, t) in enumerate(zip(active, picked)):
            toks[r].append(t)
            if eod is not None and t == eod:
                stopped[r] = True
                continue
            if stops:
                if _cut(tokenizer.decode(toks[r]), stops)[1]:
                    stopped[r] = True
                    continue
            keep.append(j)
        if not keep or len(toks[active[0]]) >= max_new_tokens:
            break
        idx = torch.tensor(keep, dtype=torch.long, device=dev)
        if len(keep) < len(active):
            state, active = policy.select(state, idx), [active[j] for j in keep]
        step_in = torch.tensor([[picked[j]] for j in keep], dtype=torch.long, device=dev)
        lg, state = policy.forward(step_in, state)
        lg = lg[:, -1]
    out = []
    for r in range(R):
        text = _cut(tokenizer.decode([t for t in toks[r] if t != eod]), stops)[0]
        out.append(Completion(toks[r], text, stopped[r]))
    return out


# ------------------------------------------------------------------------------------------------
# log-probabilities of completions (the learner)

def pad_completions(comps: list[list[int]], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> tokens (R, T) int64 (0-padded), mask (R, T) float32."""
    T = max(len(c) for c in comps)
    x = torch.zeros(len(comps), T, dtype=torch.long)
    m = torch.zeros(len(comps), T)
    for i, c in enumerate(comps):
        x[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        m[i, :len(c)] = 1.0
    return x.to(device), m.to(device)


def completion_logprobs(policy: Policy, prompts: list[list[int]], group: int, tokens: torch.Tensor,
                        temperature: float) -> torch.Tensor:
    """log pi(token | prompt, earlier tokens) of each completion token, of the tempered policy.

    prompts: P token lists; tokens: (P * G, T) completions (prompt-major, padded) -> (P * G, T) float32.
    Each prompt is read once; its state and last logits serve its G completions."""
    last, state = prompt_states(policy, prompts, group)
    logits = last.unsqueeze(1)                                                            # (R, 1, V)
    if tokens.shape[1] > 1:
        rest, _ = policy.forward(tokens[:, :-1], state)                                   # (R, T-1, V)
        logits = torch.cat([logits, rest], 1)
    logp = torch.log_softmax(logits.float() / temperature, -1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)                              # (R, T)
