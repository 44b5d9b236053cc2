"""rwkvc's GPT baseline (rwkvc.reference.gpt, trained by `train.py --model gpt`) as a distillation teacher.

The student keeps its token embedding, LayerNorms, GELU MLPs and head; receptance/key/value start from the
query/key/value thirds of `attn.c_attn`, output from `attn.c_proj`. The learned position table (`wpe`) has
no place in an RNN and is dropped: stage 1 aligns the time-mixes on the teacher's hidden states (which hold
the positions), stage 2 teaches the whole student to do without them.
"""
from __future__ import annotations

from pathlib import Path

import torch

from rwkvc.errors import RwkvcError
from rwkvc.reference.hybrid import Hybrid, HybridConfig
from rwkvc.training.distill_teacher import Teacher, lora_dims


class GPTTeacher(Teacher):
    def __init__(self, path: Path):
        from rwkvc.frontend import load_state_dict
        from rwkvc.reference.gpt import gpt_from_state_dict, is_gpt_state_dict
        sd = load_state_dict(path)
        if not is_gpt_state_dict(sd):
            raise RwkvcError(f"--teacher {path}: not a GPT checkpoint of rwkvc (no transformer.wte / transformer.wpe); "
                             "give one written by train.py --model gpt, or a transformers model directory")
        try:
            self.module = gpt_from_state_dict(sd)
        except (ValueError, RuntimeError) as e:
            raise RwkvcError(f"--teacher {path}: {str(e).strip().splitlines()[0][:200]}") from None
        self.name = f"gpt {path}"
        self.freeze()

    def config(self, head_size: int = 0) -> HybridConfig:
        c = self.module.cfg
        N = head_size or c.head_size
        if c.n_embd % N:
            raise RwkvcError(f"--head_size {N} does not divide the teacher's n_embd {c.n_embd}")
        return HybridConfig(n_layer=c.n_layer, n_embd=c.n_embd, head_size=N, vocab_size=c.vocab_size,
                            ffn_dim=c.ffn_dim, norm="layer_norm", norm_eps=1e-5, norm_bias=c.bias, act="gelu",
                            mlp_bias=c.bias, tie_embeddings=c.tie_head, **lora_dims(c.n_embd))

    @torch.no_grad()
    def copy_into(self, s: Hybrid) -> None:
        t = self.module.transformer
        C = self.module.cfg.n_embd
        s.model.embed_tokens.weight.copy_(t.wte.weight)
        s.model.norm.load_state_dict(t.ln_f.state_dict())
        if not s.cfg.tie_embeddings:
            s.lm_head.weight.copy_(self.module.lm_head.weight)
        for tb, sl in zip(t.h, s.model.layers):
            sl.input_layernorm.load_state_dict(tb.ln_1.state_dict())
            sl.post_attention_layernorm.load_state_dict(tb.ln_2.state_dict())
            sl.mlp.up_proj.load_state_dict(tb.mlp.c_fc.state_dict())
            sl.mlp.down_proj.load_state_dict(tb.mlp.c_proj.state_dict())
            tm, w = sl.self_attn.time_mixer, tb.attn.c_attn.weight                # (3C, C): q, k, v
            tm.receptance.weight.copy_(w[:C])
            tm.key.weight.copy_(w[C:2 * C])
            tm.value.weight.copy_(w[2 * C:])
            tm.output.weight.copy_(tb.attn.c_proj.weight)

    def attention_modules(self):
        return [blk.attn for blk in self.module.transformer.h]

    def logits(self, idx):
        return self.module(idx)
