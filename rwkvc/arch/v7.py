"""RWKV-7 ("Goose", x070): checkpoint keys -> IR, with every shape checked."""
from __future__ import annotations

import numpy as np

from .. import ir
from ..errors import RwkvcError
from ..mapped import transposed

MIX = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")
VEC = ("w0", "a0", "v0", "k_k", "k_a")
LORA = (("w", "w1", "w2"), ("a", "a1", "a2"), ("v", "v1", "v2"), ("g", "g1", "g2"))
SQUARE = ("receptance", "key", "value", "output")


class V7:
    name = "7"

    def detect(self, sd) -> bool:
        from .v7a import is_deep   # RWKV-7a (DeepEmbed) checkpoints are rwkvc.arch.v7a's
        return ("blocks.0.att.k_k" in sd or "blocks.0.att.r_k" in sd) and not is_deep(sd)

    def marker(self, sd) -> str:
        return "blocks.0.att.k_k" if "blocks.0.att.k_k" in sd else "blocks.0.att.r_k"

    def config(self, sd) -> ir.ModelConfig:
        need(sd, "emb.weight", 2)
        need(sd, "blocks.0.att.r_k", 2)
        V, C = sd["emb.weight"].shape
        H, N = sd["blocks.0.att.r_k"].shape
        if H * N != C:
            raise RwkvcError(f"blocks.0.att.r_k has shape {(H, N)} but n_embd is {C}: heads x head size must equal n_embd")
        layers = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
        L = max(layers) + 1
        missing_layers = sorted(set(range(L)) - layers)
        if missing_layers:
            raise RwkvcError(f"checkpoint has no keys for blocks.{missing_layers[0]} (layers 0..{L - 1} expected)")
        need(sd, "blocks.0.ffn.key.weight", 2)
        lora = []
        for nm, a, _ in LORA:
            src = f"blocks.{1 if (nm == 'v' and L > 1) else 0}.att.{a}"
            need(sd, src, 2)
            lora.append((nm, int(sd[src].shape[1])))
        try:
            return ir.ModelConfig(version="7", n_layer=L, n_embd=int(C), head_size=int(N), vocab_size=int(V),
                                  ffn_dim=int(sd["blocks.0.ffn.key.weight"].shape[0]), lora=tuple(sorted(lora)))
        except ValueError as e:
            raise RwkvcError(f"inconsistent RWKV-7 checkpoint: {e}") from None

    def expected_shapes(self, cfg: ir.ModelConfig) -> dict[str, tuple]:
        C, H, N, F, V = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.ffn_dim, cfg.vocab_size
        D = dict(cfg.lora)
        s = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,),
             "ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)}
        for i in range(cfg.n_layer):
            b = f"blocks.{i}."
            for ln in ("ln1", "ln2"):
                s[b + ln + ".weight"] = s[b + ln + ".bias"] = (C,)
            for m in MIX + VEC:
                s[b + "att." + m] = (1, 1, C)
            for nm, a1, a2 in LORA:
                s[b + "att." + a1], s[b + "att." + a2] = (C, D[nm]), (D[nm], C)
            s[b + "att.r_k"] = (H, N)
            for m in SQUARE:
                s[b + f"att.{m}.weight"] = (C, C)
            s[b + "att.ln_x.weight"] = s[b + "att.ln_x.bias"] = (C,)
            s[b + "ffn.x_k"] = (1, 1, C)
            s[b + "ffn.key.weight"], s[b + "ffn.value.weight"] = (F, C), (C, F)
        return s

    def to_ir(self, sd) -> ir.Model:
        from ..frontend import to_numpy
        cfg = self.config(sd)
        shapes = self.expected_shapes(cfg)
        optional = {f"blocks.0.att.{k}" for k in ("v0", "v1", "v2")}  # unused in layer 0; some exporters drop them
        for k, shp in shapes.items():
            if k not in sd:
                if k in optional:
                    continue
                raise RwkvcError(f"RWKV-7 checkpoint is missing '{k}' (expected shape {shp}); the file is incomplete")
            if tuple(sd[k].shape) != shp:
                raise RwkvcError(f"'{k}' has shape {tuple(sd[k].shape)}, expected {shp} for "
                                 f"L={cfg.n_layer} C={cfg.n_embd} H={cfg.n_head} F={cfg.ffn_dim} V={cfg.vocab_size}")
        tuned = {f"blocks.{i}.att.time_state" for i in range(cfg.n_layer)}   # a state-tuned initial state
        extra = sorted(k for k in sd if k not in shapes and k not in tuned and not k.startswith("_"))
        if extra:
            raise RwkvcError(f"unexpected key '{extra[0]}' in an RWKV-7 checkpoint"
                             f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}; "
                             "it may mix versions or hold extensions rwkvc does not know")

        def vec(k):
            return to_numpy(sd[k]).reshape(-1)

        def lin(k, transpose=False):
            w = to_numpy(sd[k])
            return ir.Linear(k.removesuffix(".weight"), ir.Dense(transposed(w) if transpose else w))

        def norm(p, eps=1e-5):
            return ir.Norm(vec(p + ".weight"), vec(p + ".bias"), eps)

        blocks = []
        for i in range(cfg.n_layer):
            a = f"blocks.{i}.att."
            att_vec = {}
            for k in VEC:
                if not (i == 0 and k == "v0"):  # layer 0 has no value residual
                    att_vec[k] = vec(a + k)
            att_vec["r_k"] = vec(a + "r_k")
            lins = {m: lin(a + m + ".weight") for m in SQUARE}
            for nm, a1, a2 in LORA:
                if i == 0 and nm == "v":
                    continue  # layer 0 takes v as v_first; its v-LoRA is never used
                # official LoRA matrices are stored (in, out) and applied as x @ w1: keep (out, in) in the IR
                lins[a1], lins[a2] = lin(a + a1, transpose=True), lin(a + a2, transpose=True)
            att = ir.TimeMix("7", {m: vec(a + m) for m in MIX}, att_vec, lins, norm(a + "ln_x", eps=64e-5))
            f = f"blocks.{i}.ffn."
            ffn = ir.ChannelMix("7", {"x_k": vec(f + "x_k")},
                                {"key": lin(f + "key.weight"), "value": lin(f + "value.weight")})
            blocks.append(ir.Block(norm(f"blocks.{i}.ln1"), att, norm(f"blocks.{i}.ln2"), ffn))
        from .common import time_state
        return ir.Model(cfg, ir.Embedding(ir.Dense(to_numpy(sd["emb.weight"]))), norm("blocks.0.ln0"), blocks,
                        norm("ln_out"), lin("head.weight"),
                        init_state=time_state(sd, cfg.n_layer, cfg.n_head, cfg.head_size, "7"))


def need(sd, key, ndim):
    if key not in sd:
        raise RwkvcError(f"RWKV-7 checkpoint is missing '{key}'; the file is incomplete")
    if sd[key].dim() != ndim:
        raise RwkvcError(f"'{key}' has shape {tuple(sd[key].shape)}; expected a {ndim}-D tensor")


ARCH = V7()
