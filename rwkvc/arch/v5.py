"""RWKV-5 ("Eagle"; 5.0, 5.1, 5.2) and RWKV-Lite's compressed 5.2: checkpoint keys -> IR, shapes checked.

Keys per layer: att.time_mix_{k,v,r,g} (1,1,C), att.time_decay, att.time_faaaa (or time_first),
att.{receptance,key,value,gate,output}.weight (C,C), att.ln_x (C,), ffn as RWKV-4. Sub-versions, as the
official `rwkv` package tells them apart:
    5.0  no gate;              time_decay (H,) per head,   time_first (H,) (bonus exp(time_first))
    5.1  gate;                 time_decay (H,) per head
    5.2  gate;                 time_decay (H, N) per channel, time_faaaa (H, N)
Told apart from RWKV-4 by att.ln_x and from RWKV-6/7 by att.time_mix_k.

IR: mix x_* = 1 - time_mix_*, vec w0 = time_decay per channel (C,) (decay exp(-exp(w0))), vec u = the
multiplicative bonus per channel (C,); per-head parameters of 5.0/5.1 are repeated over their N channels.
RWKV-Lite's factorised projections, FFN predictors and hierarchical head: see rwkvc.arch.lite.
"""
from __future__ import annotations

import numpy as np

from .. import ir
from ..errors import RwkvcError
from . import common as cm
from . import lite

GEN = "5"


class V5:
    name = "5"

    def detect(self, sd) -> bool:
        return "blocks.0.att.ln_x.weight" in sd and "blocks.0.att.time_mix_k" in sd

    def marker(self, sd) -> str:
        return "blocks.0.att.time_mix_k"

    def config(self, sd) -> ir.ModelConfig:
        V, C = cm.need(sd, "emb.weight", 2, GEN)
        L = cm.n_layers(sd, GEN)
        td = cm.need(sd, "blocks.0.att.time_decay", None, GEN)
        H = int(td[0]) if td else 0
        if H <= 0 or C % H:
            raise RwkvcError(f"'blocks.0.att.time_decay' has shape {td}: its first dimension (heads) must divide n_embd={C}")
        per_channel = len(td) > 1 and td[1] > 1
        gated = "blocks.0.att.gate.weight" in sd or lite.is_factorised(sd, "blocks.0.att.gate")
        version = "5.2" if per_channel else ("5.1" if gated else "5.0")
        if per_channel and not gated:
            raise RwkvcError("RWKV-5.2 checkpoint (per-channel time_decay) is missing 'blocks.0.att.gate.weight'")
        if lite.is_factorised(sd, "blocks.0.ffn.key"):
            F = cm.need(sd, "blocks.0.ffn.key2.weight", 2, GEN)[0]
        else:
            F = cm.need(sd, "blocks.0.ffn.key.weight", 2, GEN)[0]
        return cm.config(version, L, C, C // H, V, F, gen=GEN)

    def to_ir(self, sd) -> ir.Model:
        cfg = self.config(sd)
        L, C, H, N, F, V = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size, cfg.ffn_dim, cfg.vocab_size
        gated = cfg.version != "5.0"
        bonus = "time_faaaa" if "blocks.0.att.time_faaaa" in sd else "time_first"
        per_head = (H,) if cfg.version != "5.2" else (H, N)
        chk = cm.ShapeCheck(GEN, f"RWKV-{cfg.version} L={L} C={C} H={H} N={N} F={F} V={V}")
        cm.base_shapes(chk, L, C, F, V, ffn_receptance=False)
        has_state = "blocks.0.att.time_state" in sd
        mlp = []
        for i in range(L):
            a, f = f"blocks.{i}.att.", f"blocks.{i}.ffn."
            for m in "kvr" + ("g" if gated else ""):
                chk.add(a + f"time_mix_{m}", (1, 1, C))
            chk.add(a + "time_decay", per_head)
            chk.add(a + bonus, per_head)
            for m in ("receptance", "key", "value") + (("gate",) if gated else ()):
                lite.projection_shapes(sd, chk, a + m, C, C)
            chk.add(a + "output.weight", (C, C))
            chk.add(a + "ln_x.weight", (C,))
            chk.add(a + "ln_x.bias", (C,))
            if has_state:
                chk.add(a + "time_state", (H, N, N))
            lite.projection_shapes(sd, chk, f + "receptance", C, C)
            if lite.is_factorised(sd, f + "key"):   # x0594: both FFN matrices factorised
                del chk.shapes[f + "key.weight"], chk.shapes[f + "value.weight"]
                lite.projection_shapes(sd, chk, f + "key", F, C)
                lite.projection_shapes(sd, chk, f + "value", C, F)
            mlp.append(lite.mlp_shapes(sd, chk, i, C, F))
        lite.head_shapes(sd, chk, C)
        chk.run(sd)

        def per_channel(key, fn=None):
            v = cm.to_np(sd[key]).astype(np.float32).reshape(-1)
            v = fn(v) if fn else v
            return np.ascontiguousarray(np.repeat(v, N) if v.size == H else v)

        atts, ffns = [], []
        for i in range(L):
            a, f = f"blocks.{i}.att.", f"blocks.{i}.ffn."
            mix = {f"x_{m}": cm.mix_from_time_mix(sd, a + f"time_mix_{m}") for m in "rkv" + ("g" if gated else "")}
            vec = {"w0": per_channel(a + "time_decay"),
                   "u": per_channel(a + bonus, np.exp if bonus == "time_first" else None)}
            lin = {m: lite.read_projection(sd, a + m) for m in ("receptance", "key", "value") + (("gate",) if gated else ())}
            lin["output"] = cm.dense(sd, a + "output.weight")
            atts.append(ir.TimeMix(cfg.version, mix, vec, lin, cm.norm(sd, a + "ln_x", eps=64e-5)))
            flin = {"receptance": lite.read_projection(sd, f + "receptance"),
                    "key": lite.read_projection(sd, f + "key", relu_without_diag=True),
                    "value": lite.read_projection(sd, f + "value", relu_without_diag=True)}
            ffn = cm.channel_mix(sd, cfg.version, i, {"x_k": cm.mix_from_time_mix(sd, f + "time_mix_k"),
                                                      "x_r": cm.mix_from_time_mix(sd, f + "time_mix_r")}, flin)
            if mlp[i]:
                ffn.sparse = lite.sparse_ffn(sd, i, flin["key"])
            ffns.append(ffn)
        return cm.assemble(cfg, sd, atts, ffns, init_state=cm.time_state(sd, L, H, N, GEN))


ARCH = V5()
