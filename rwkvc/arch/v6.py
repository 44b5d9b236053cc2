"""RWKV-6 ("Finch", x060): checkpoint keys -> IR, every shape checked.

Keys per layer (D = maa LoRA width, Dw = decay LoRA width):
    att.time_maa_{x,w,k,v,r,g} (1,1,C)      token-shift bases
    att.time_maa_w1 (C, 5D), att.time_maa_w2 (5, D, C)   data-dependent token shift (order w,k,v,r,g)
    att.time_decay (1,1,C), att.time_decay_w1 (C, Dw), att.time_decay_w2 (Dw, C)   data-dependent decay
    att.time_faaaa (H, N)                    bonus u
    att.{receptance,key,value,gate,output}.weight (C,C), att.ln_x (C,)
    att.time_state (H, N, N)                 optional: a state-tuned initial state
    ffn.time_maa_{k,r} (1,1,C), ffn.key (F,C), ffn.value (C,F), ffn.receptance (C,C)

IR: every matrix is a Linear (out, in): maa1 = time_maa_w1^T (5D, C), maa2_<m> = time_maa_w2[m]^T (C, D),
w1 = time_decay_w1^T (Dw, C), w2 = time_decay_w2^T (C, Dw) -- the same names as RWKV-7's decay LoRA.
mix x_x/x_w/x_k/x_v/x_r/x_g = time_maa_*, vec w0 = time_decay, u = time_faaaa (flattened).
"""
from __future__ import annotations

import numpy as np

from .. import ir
from ..errors import RwkvcError
from . import common as cm

GEN = "6"
MAA = ("w", "k", "v", "r", "g")     # the order of time_maa_w1's five blocks


class V6:
    name = "6"

    def detect(self, sd) -> bool:
        return "blocks.0.att.time_maa_x" in sd or "blocks.0.ffn.time_maa_k" in sd

    def marker(self, sd) -> str:
        return "blocks.0.att.time_maa_x" if "blocks.0.att.time_maa_x" in sd else "blocks.0.ffn.time_maa_k"

    def config(self, sd) -> ir.ModelConfig:
        V, C = cm.need(sd, "emb.weight", 2, GEN)
        L = cm.n_layers(sd, GEN)
        H, N = cm.need(sd, "blocks.0.att.time_faaaa", 2, GEN)
        if H * N != C:
            raise RwkvcError(f"blocks.0.att.time_faaaa has shape {(H, N)} but n_embd is {C}: "
                             "heads x head size must equal n_embd")
        F = cm.need(sd, "blocks.0.ffn.key.weight", 2, GEN)[0]
        c1, d5 = cm.need(sd, "blocks.0.att.time_maa_w1", 2, GEN)
        if d5 % 5:
            raise RwkvcError(f"'blocks.0.att.time_maa_w1' has shape {(c1, d5)}: its width must be 5 x the maa LoRA width")
        dw = cm.need(sd, "blocks.0.att.time_decay_w1", 2, GEN)[1]
        return cm.config("6", L, C, N, V, F, lora=(("maa", d5 // 5), ("w", dw)), gen=GEN)

    def to_ir(self, sd) -> ir.Model:
        cfg = self.config(sd)
        L, C, H, N, F, V = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size, cfg.ffn_dim, cfg.vocab_size
        D, Dw = dict(cfg.lora)["maa"], dict(cfg.lora)["w"]
        chk = cm.ShapeCheck(GEN, f"L={L} C={C} H={H} N={N} F={F} V={V} maa LoRA {D} decay LoRA {Dw}")
        cm.base_shapes(chk, L, C, F, V, ffn_mix=("time_maa_k", "time_maa_r"))
        has_state = "blocks.0.att.time_state" in sd
        for i in range(L):
            a = f"blocks.{i}.att."
            for m in ("x",) + MAA:
                chk.add(a + f"time_maa_{m}", (1, 1, C))
            chk.add(a + "time_maa_w1", (C, 5 * D))
            chk.add(a + "time_maa_w2", (5, D, C))
            chk.add(a + "time_decay", (1, 1, C))
            chk.add(a + "time_decay_w1", (C, Dw))
            chk.add(a + "time_decay_w2", (Dw, C))
            chk.add(a + "time_faaaa", (H, N))
            for m in ("receptance", "key", "value", "gate", "output"):
                chk.add(a + m + ".weight", (C, C))
            chk.add(a + "ln_x.weight", (C,))
            chk.add(a + "ln_x.bias", (C,))
            if has_state:
                chk.add(a + "time_state", (H, N, N))
        chk.run(sd)

        atts, ffns = [], []
        for i in range(L):
            a, f = f"blocks.{i}.att.", f"blocks.{i}.ffn."
            mix = {f"x_{m}": cm.vec(sd, a + f"time_maa_{m}") for m in ("x",) + MAA}
            vec = {"w0": cm.vec(sd, a + "time_decay"), "u": cm.vec(sd, a + "time_faaaa")}
            lin = {m: cm.dense(sd, a + m + ".weight") for m in ("receptance", "key", "value", "gate", "output")}
            lin["maa1"] = cm.dense(sd, a + "time_maa_w1", transpose=True)                 # (5D, C)
            w2 = cm.to_np(sd[a + "time_maa_w2"])
            for j, m in enumerate(MAA):
                lin[f"maa2_{m}"] = ir.Linear(f"{a}time_maa_w2.{m}", ir.Dense(np.ascontiguousarray(w2[j].T)))  # (C, D)
            lin["w1"] = cm.dense(sd, a + "time_decay_w1", transpose=True)                 # (Dw, C)
            lin["w2"] = cm.dense(sd, a + "time_decay_w2", transpose=True)                 # (C, Dw)
            atts.append(ir.TimeMix("6", mix, vec, lin, cm.norm(sd, a + "ln_x", eps=64e-5)))
            ffns.append(cm.channel_mix(sd, "6", i, {"x_k": cm.vec(sd, f + "time_maa_k"),
                                                    "x_r": cm.vec(sd, f + "time_maa_r")}))
        return cm.assemble(cfg, sd, atts, ffns, init_state=cm.time_state(sd, L, H, N, GEN))


ARCH = V6()
