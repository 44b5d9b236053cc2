"""Helpers the v4, v5 and v6 importers share: layer counting, shape checks with one-line errors that
name the key, and the conversions from checkpoint tensors to IR pieces.

Official token-shift mixing vectors of v4/v5 (`time_mix_*`) interpolate the other way round from v6/v7
(`x * m + prev * (1 - m)`); the IR keeps one convention for every version, `x + (prev - x) * mix`, so
their IR mix is `1 - time_mix`.
"""
from __future__ import annotations

import numpy as np

from .. import ir
from ..errors import RwkvcError
from ..mapped import transposed


def to_np(t) -> np.ndarray:
    from ..frontend import to_numpy
    return to_numpy(t)


def vec(sd, key) -> np.ndarray:
    """A parameter as a 1-D float array (checkpoints store many as (1, 1, C))."""
    return np.ascontiguousarray(to_np(sd[key]).reshape(-1))


def mix_from_time_mix(sd, key) -> np.ndarray:
    """v4/v5 `time_mix_*` (x * m + prev * (1 - m)) -> the IR's mix (x + (prev - x) * mix), float32: 1 - m of
    an fp16 m rounded back to fp16 would move it by up to 2^-11 (the official package takes 1 - m in float32)."""
    m = vec(sd, key)
    return 1.0 - m.astype(np.float32)


def dense(sd, key, transpose=False) -> ir.Linear:
    w = to_np(sd[key])
    if transpose:
        w = transposed(w)
    return ir.Linear(key.removesuffix(".weight"), ir.Dense(w))


def norm(sd, prefix, eps=1e-5) -> ir.Norm:
    return ir.Norm(vec(sd, prefix + ".weight"), vec(sd, prefix + ".bias"), eps)


def n_layers(sd, gen: str) -> int:
    layers = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if not layers:
        raise RwkvcError(f"RWKV-{gen} checkpoint has no 'blocks.N.*' keys")
    L = max(layers) + 1
    missing = sorted(set(range(L)) - layers)
    if missing:
        raise RwkvcError(f"checkpoint has no keys for blocks.{missing[0]} (layers 0..{L - 1} expected)")
    return L


def need(sd, key, ndim=None, gen="") -> tuple:
    if key not in sd:
        raise RwkvcError(f"RWKV-{gen} checkpoint is missing '{key}'; the file is incomplete")
    shp = tuple(sd[key].shape)
    if ndim is not None and len(shp) != ndim:
        raise RwkvcError(f"'{key}' has shape {shp}; expected a {ndim}-D tensor")
    return shp


def squeezed(shape) -> tuple:
    return tuple(d for d in shape if d != 1)


class ShapeCheck:
    """Collects expected shapes, then checks a state dict: every expected key present with its shape
    (size-1 dimensions aside, so (1, 1, C) and (C,) vectors both pass), and no key left over."""

    def __init__(self, gen: str, dims: str):
        self.gen, self.dims = gen, dims
        self.shapes: dict[str, tuple] = {}
        self.optional: set[str] = set()
        self.ignored_prefixes: list[str] = []

    def add(self, key, shape, optional=False):
        self.shapes[key] = tuple(shape)
        if optional:
            self.optional.add(key)

    def ignore(self, prefix: str):
        """Keys starting with `prefix` are known and deliberately not used."""
        self.ignored_prefixes.append(prefix)

    def run(self, sd) -> None:
        for k, shp in self.shapes.items():
            if k not in sd:
                if k in self.optional:
                    continue
                raise RwkvcError(f"RWKV-{self.gen} checkpoint is missing '{k}' (expected shape {shp}); "
                                 "the file is incomplete")
            got = tuple(sd[k].shape)
            if got != shp and squeezed(got) != squeezed(shp):
                raise RwkvcError(f"'{k}' has shape {got}, expected {shp} for {self.dims}")
        extra = sorted(k for k in sd if k not in self.shapes and not k.startswith("_")
                       and not any(k.startswith(p) for p in self.ignored_prefixes))
        if extra:
            raise RwkvcError(f"unexpected key '{extra[0]}' in an RWKV-{self.gen} checkpoint"
                             f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}; "
                             "it may mix versions or hold extensions rwkvc does not know")


def config(version, L, C, N, V, F, lora=(), gen="") -> ir.ModelConfig:
    try:
        return ir.ModelConfig(version=version, n_layer=int(L), n_embd=int(C), head_size=int(N), vocab_size=int(V),
                              ffn_dim=int(F), lora=tuple(sorted(lora)))
    except ValueError as e:
        raise RwkvcError(f"inconsistent RWKV-{gen} checkpoint: {e}") from None


def base_shapes(chk: ShapeCheck, L, C, F, V, ffn_receptance=True, ffn_mix=("time_mix_k", "time_mix_r")):
    """Embedding, norms, head and the (v4-v6) channel-mix."""
    chk.add("emb.weight", (V, C))
    chk.add("blocks.0.ln0.weight", (C,))
    chk.add("blocks.0.ln0.bias", (C,))
    chk.add("ln_out.weight", (C,))
    chk.add("ln_out.bias", (C,))
    chk.add("head.weight", (V, C))
    for i in range(L):
        b = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            chk.add(b + ln + ".weight", (C,))
            chk.add(b + ln + ".bias", (C,))
        for m in ffn_mix:
            chk.add(b + "ffn." + m, (1, 1, C))
        chk.add(b + "ffn.key.weight", (F, C))
        chk.add(b + "ffn.value.weight", (C, F))
        if ffn_receptance:
            chk.add(b + "ffn.receptance.weight", (C, C))


def assemble(cfg: ir.ModelConfig, sd, atts: list, ffns: list, init_state=None) -> ir.Model:
    blocks = [ir.Block(norm(sd, f"blocks.{i}.ln1"), atts[i], norm(sd, f"blocks.{i}.ln2"), ffns[i])
              for i in range(cfg.n_layer)]
    return ir.Model(cfg, ir.Embedding(ir.Dense(to_np(sd["emb.weight"]))), norm(sd, "blocks.0.ln0"), blocks,
                    norm(sd, "ln_out"), dense(sd, "head.weight"), init_state=init_state)


def channel_mix(sd, version, i, mixes, lins: dict | None = None) -> ir.ChannelMix:
    """v4-v6 channel-mix: r = sigmoid(R xr), y = r * V relu(K xk)^2. `mixes` maps IR mix name -> IR vector."""
    f = f"blocks.{i}.ffn."
    lins = lins or {}
    lin = {"key": lins.get("key") or dense(sd, f + "key.weight"),
           "value": lins.get("value") or dense(sd, f + "value.weight"),
           "receptance": lins.get("receptance") or dense(sd, f + "receptance.weight")}
    return ir.ChannelMix(version, mixes, lin)


def time_state(sd, L, H, N, gen) -> ir.State | None:
    """A state-tuned checkpoint's `blocks.N.att.time_state` (H, N, N), stored (value, key) like rwkvc's wkv."""
    keys = [f"blocks.{i}.att.time_state" for i in range(L)]
    present = [k for k in keys if k in sd]
    if not present:
        return None
    if len(present) != L:
        missing = next(k for k in keys if k not in sd)
        raise RwkvcError(f"RWKV-{gen} checkpoint has time_state for some layers but not '{missing}'")
    for k in keys:
        if tuple(sd[k].shape) != (H, N, N):
            raise RwkvcError(f"'{k}' has shape {tuple(sd[k].shape)}, expected {(H, N, N)} (heads x head size x head size)")
    wkv = np.stack([to_np(sd[k]).astype(np.float32) for k in keys])
    return ir.State(np.zeros((L, 2, H * N), np.float32), wkv)
