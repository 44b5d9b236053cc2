"""RWKV-7a "DeepEmbed" (the official package's RWKV_DE_VERSION=1): an RWKV-7 checkpoint whose every channel-mix
has a per-token table. Keys per layer, beside RWKV-7's:

    blocks.N.ffn.s_emb.weight     (V, D*D)    the per-token table (D = 32 in released models: (V, 1024))
    blocks.N.ffn.s_emb_x.weight   (D*D, C)    the embedding's projection merged into it (after ln0)
    blocks.N.ffn.s0               (1, 1, F)   (or (F,))
    blocks.N.ffn.s1               (C, D)
    blocks.N.ffn.s2               (D, F)

The IR is RWKV-7's with config version "7a" (so a target that does not lower DeepEmbed refuses the model by
its version), channel-mixes of version "7a" and their `ChannelMix.deep` (rwkvc.weights.deepembed)."""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from .. import ir
from ..errors import RwkvcError
from ..weights.deepembed import DeepEmbed, DeepEmbedTable
from .common import squeezed
from .v7 import ARCH as V7_ARCH

DEEP_KEY = re.compile(r"blocks\.(\d+)\.ffn\.(s_emb\.weight|s_emb_x\.weight|s0|s1|s2)$")
MARKER = "blocks.0.ffn.s_emb.weight"


def is_deep(sd) -> bool:
    """Whether a checkpoint has DeepEmbed keys (any layer's s_emb / s_emb_x / s0 / s1 / s2)."""
    return any(DEEP_KEY.match(k) for k in sd)


class V7a:
    name = "7a"

    def detect(self, sd) -> bool:
        return ("blocks.0.att.k_k" in sd or "blocks.0.att.r_k" in sd) and is_deep(sd)

    def marker(self, sd) -> str:
        return MARKER if MARKER in sd else next(k for k in sd if DEEP_KEY.match(k))

    def expected_shapes(self, sd, cfg: ir.ModelConfig) -> tuple[int, dict[str, tuple]]:
        """D (the table's side) and every DeepEmbed key's shape, from blocks.0.ffn.s1 and the config."""
        C, F, V = cfg.n_embd, cfg.ffn_dim, cfg.vocab_size
        k1 = "blocks.0.ffn.s1"
        if k1 not in sd:
            raise RwkvcError(f"RWKV-7a (DeepEmbed) checkpoint is missing '{k1}' (expected shape ({C}, D)); "
                             "the file is incomplete")
        s1 = tuple(sd[k1].shape)
        if len(s1) != 2 or s1[0] != C or s1[1] < 1:
            raise RwkvcError(f"'{k1}' has shape {s1}, expected ({C}, D) (n_embd x the DeepEmbed rank)")
        D = int(s1[1])
        shapes = {}
        for i in range(cfg.n_layer):
            f = f"blocks.{i}.ffn."
            shapes |= {f + "s_emb.weight": (V, D * D), f + "s_emb_x.weight": (D * D, C), f + "s0": (1, 1, F),
                       f + "s1": (C, D), f + "s2": (D, F)}
        return D, shapes

    def check(self, sd, cfg: ir.ModelConfig) -> int:
        D, shapes = self.expected_shapes(sd, cfg)
        w = tuple(sd[MARKER].shape) if MARKER in sd else None
        if w is not None and (len(w) != 2 or w[1] != D * D):
            side = math.isqrt(w[1]) if len(w) == 2 else 0
            raise RwkvcError(f"'{MARKER}' has shape {w}, expected ({cfg.vocab_size}, {D * D}): its rows must hold a "
                             f"{D}x{D} matrix for blocks.0.ffn.s1's rank {D}"
                             + (f" (they hold {side}x{side})" if side * side == (w[1] if len(w) == 2 else -1) else ""))
        dims = f"L={cfg.n_layer} C={cfg.n_embd} F={cfg.ffn_dim} V={cfg.vocab_size} D={D}"
        for k, shp in shapes.items():
            if k not in sd:
                raise RwkvcError(f"RWKV-7a (DeepEmbed) checkpoint is missing '{k}' (expected shape {shp}); "
                                 "every layer's channel-mix needs s_emb, s_emb_x, s0, s1 and s2")
            got = tuple(sd[k].shape)
            if got != shp and squeezed(got) != squeezed(shp):
                raise RwkvcError(f"'{k}' has shape {got}, expected {shp} for {dims}")
        extra = sorted(k for k in sd if DEEP_KEY.match(k) and k not in shapes)
        if extra:
            raise RwkvcError(f"unexpected key '{extra[0]}' in an RWKV-7a checkpoint of {cfg.n_layer} layers; "
                             "it may mix checkpoints")
        return D

    def to_ir(self, sd) -> ir.Model:
        from ..frontend import to_numpy
        base = {k: v for k, v in sd.items() if not DEEP_KEY.match(k)}
        cfg = V7_ARCH.config(base)
        self.check(sd, cfg)
        model = V7_ARCH.to_ir(base)                  # RWKV-7's keys, each shape checked, unknown keys refused
        model.config = dataclasses.replace(model.config, version="7a")

        def arr(k):
            return np.ascontiguousarray(to_numpy(sd[k]))

        for i, blk in enumerate(model.blocks):
            f = f"blocks.{i}.ffn."
            table = DeepEmbedTable(arr(f + "s_emb.weight"), arr(f + "s_emb_x.weight"), model.emb.weight.w, model.ln0)
            blk.ffn = dataclasses.replace(blk.ffn, version="7a", deep=DeepEmbed(
                table, arr(f + "s0").reshape(-1), arr(f + "s1"), arr(f + "s2")))
        return model


ARCH = V7a()
