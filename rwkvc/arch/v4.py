"""RWKV-4 ("Dove"): checkpoint keys -> IR, every shape checked.

Keys per layer: att.time_mix_{k,v,r} (1,1,C), att.time_decay (C,), att.time_first (C,),
att.{key,value,receptance,output}.weight (C,C); ffn.time_mix_{k,r}, ffn.key (F,C), ffn.value (C,F),
ffn.receptance (C,C). Told apart by `att.time_first` without `att.ln_x` (v5.0/5.1 also use time_first).

IR: mix x_k/x_v/x_r (= 1 - time_mix), vec w0 = time_decay (the decay per step is exp(-exp(w0))),
vec u = time_first (the current token's bonus, in the exponent). RWKV-4 has no heads: head_size = C.
"""
from __future__ import annotations

from .. import ir
from . import common as cm

GEN = "4"


class V4:
    name = "4"

    def detect(self, sd) -> bool:
        return "blocks.0.att.time_first" in sd and "blocks.0.att.ln_x.weight" not in sd

    def marker(self, sd) -> str:
        return "blocks.0.att.time_first"

    def config(self, sd) -> ir.ModelConfig:
        V, C = cm.need(sd, "emb.weight", 2, GEN)
        L = cm.n_layers(sd, GEN)
        F = cm.need(sd, "blocks.0.ffn.key.weight", 2, GEN)[0]
        return cm.config("4", L, C, C, V, F, gen=GEN)

    def to_ir(self, sd) -> ir.Model:
        cfg = self.config(sd)
        L, C, F, V = cfg.n_layer, cfg.n_embd, cfg.ffn_dim, cfg.vocab_size
        chk = cm.ShapeCheck(GEN, f"L={L} C={C} F={F} V={V}")
        cm.base_shapes(chk, L, C, F, V)
        for i in range(L):
            a = f"blocks.{i}.att."
            for m in ("time_mix_k", "time_mix_v", "time_mix_r"):
                chk.add(a + m, (1, 1, C))
            chk.add(a + "time_decay", (C,))
            chk.add(a + "time_first", (C,))
            for m in ("key", "value", "receptance", "output"):
                chk.add(a + m + ".weight", (C, C))
        chk.run(sd)

        atts, ffns = [], []
        for i in range(L):
            a, f = f"blocks.{i}.att.", f"blocks.{i}.ffn."
            mix = {f"x_{m}": cm.mix_from_time_mix(sd, a + f"time_mix_{m}") for m in "kvr"}
            vec = {"w0": cm.vec(sd, a + "time_decay"), "u": cm.vec(sd, a + "time_first")}
            lin = {m: cm.dense(sd, a + m + ".weight") for m in ("receptance", "key", "value", "output")}
            atts.append(ir.TimeMix("4", mix, vec, lin, None))
            ffns.append(cm.channel_mix(sd, "4", i, {"x_k": cm.mix_from_time_mix(sd, f + "time_mix_k"),
                                                    "x_r": cm.mix_from_time_mix(sd, f + "time_mix_r")}))
        return cm.assemble(cfg, sd, atts, ffns)


ARCH = V4()
