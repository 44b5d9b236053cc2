"""The closed tables of the TVM lowering: a mixer's version (blk.att.version / blk.ffn.version) -> its lowering.

    TIME_MIX_LOWERINGS     (ctx, att, x, prev, S, v_first, first, prefill) -> (dx, S', v_first)
    CHANNEL_MIX_LOWERINGS  (ctx, ffn, x, prev, prefill) -> dx
    ATT_VECTORS            the time-mix's per-channel parameters as stored (default: att.vec as it is)
    WITHOUT_V_FIRST        time-mix versions that neither make nor take RWKV-7's v_first (layer 0's value)

A version the targets lower has an entry in both of the first two tables (`versions()`, the targets'
capabilities); its state is ModelConfig.state_shapes()'s.
"""
from __future__ import annotations

from .rwkv456 import (channel_mix_rwkv, time_mix_v4, time_mix_v5, time_mix_v6, vectors_v4,
                      vectors_v5)
from .deepembed import channel_mix_v7a
from .hybrid import MLP_LOWERINGS, VERSIONS as HYBRID_VERSIONS
from .v7 import channel_mix_v7, time_mix_v7

V5 = ("5.0", "5.1", "5.2")

TIME_MIX_LOWERINGS = {"7": time_mix_v7, "7a": time_mix_v7, "6": time_mix_v6, **{v: time_mix_v5 for v in V5}, "4": time_mix_v4}
CHANNEL_MIX_LOWERINGS = {"7": channel_mix_v7, "7a": channel_mix_v7a, **{v: channel_mix_rwkv for v in ("6", *V5, "4")},
                         **MLP_LOWERINGS}   # the RWKV-7 hybrids' MLPs, by activation
ATT_VECTORS = {"4": vectors_v4, **{v: vectors_v5 for v in V5}}
WITHOUT_V_FIRST = frozenset({"4", *V5, "6"})


def versions() -> frozenset[str]:
    """The RWKV versions the TVM lowering covers."""
    return frozenset(TIME_MIX_LOWERINGS) & frozenset(CHANNEL_MIX_LOWERINGS) | HYBRID_VERSIONS


def att_vectors(att) -> dict:
    low = ATT_VECTORS.get(att.version)
    return low(att) if low is not None else dict(att.vec)


def uses_v_first(version: str) -> bool:
    return version not in WITHOUT_V_FIRST
