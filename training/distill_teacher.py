"""Teachers for distillation into an RWKV-7 hybrid, and the student made from one.

    teacher = load_teacher("qwen2-dir")        # a transformers causal LM (Qwen2, Llama, Mistral), local files only
    teacher = load_teacher("gpt/rwkv-final.pth")  # rwkvc's GPT baseline (rwkvc.reference.gpt)
    student = teacher.student(seed=0)           # rwkvc.reference.hybrid.Hybrid, initialised from the teacher
    logits = teacher.logits(idx)                # (B, T, V), no gradients
    xs, ys = teacher.attention_io(idx)          # per layer: the attention's input (normed) and its output

A Teacher is a frozen nn.Module (`.module`) plus what the stages need of it. The student keeps the teacher's
embeddings, norms, MLPs and head; each time-mix's receptance/key/value/output start from the attention's
query/key/value/output projections (grouped key/value heads repeated to every query head), the rest of the
time-mix as RWKV-LM initialises it (rwkvc.training.model.init_rwkv_lm).
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from rwkvc.errors import RwkvcError
from rwkvc.reference.hybrid import Hybrid, HybridConfig
from rwkvc.reference.v7 import RWKV7, V7Config

HF_FAMILIES = ("qwen2", "llama", "mistral")


def lora_dims(C: int) -> dict:
    d = V7Config.default_dims(C)
    return {k: d[k] for k in ("dim_w", "dim_a", "dim_v", "dim_g")}


def repeat_heads(w: torch.Tensor, n_kv: int, n_rep: int, N: int) -> torch.Tensor:
    """(n_kv * N, C) grouped key/value rows -> (n_kv * n_rep * N, C), every kv head repeated for its queries."""
    C = w.shape[-1]
    return w.view(n_kv, 1, N, C).expand(n_kv, n_rep, N, C).reshape(n_kv * n_rep * N, C)


@torch.no_grad()
def init_time_mixes(student: Hybrid, seed: int) -> None:
    """RWKV-LM's initialisation of every time-mix (from a donor RWKV-7 of the same width)."""
    from rwkvc.training.model import init_rwkv_lm
    donor = RWKV7(replace(student.cfg.v7(), vocab_size=2, ffn_dim=1))
    init_rwkv_lm(donor, seed)
    for tm, blk in zip(student.time_mixers(), donor.blocks):
        tm.load_state_dict(blk.att.state_dict())


class Teacher:
    module: nn.Module
    name: str

    def config(self, head_size: int = 0) -> HybridConfig: ...
    def copy_into(self, student: Hybrid) -> None: ...
    def attention_modules(self) -> list[nn.Module]: ...
    def logits(self, idx: torch.Tensor) -> torch.Tensor: ...

    def freeze(self):
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        return self

    @torch.no_grad()
    def student(self, seed: int = 0, head_size: int = 0) -> Hybrid:
        s = Hybrid(self.config(head_size))
        init_time_mixes(s, seed)
        self.copy_into(s)
        return s

    @torch.no_grad()
    def attention_io(self, idx: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Each layer's attention input (the normed hidden state, (B, T, C)) and output (B, T, C), and the
        logits, from one teacher forward pass (forward hooks on the attention modules)."""
        xs, ys, hooks = {}, {}, []
        mods = self.attention_modules()
        for i, m in enumerate(mods):
            def hook(mod, args, kwargs, out, i=i):
                xs[i] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                ys[i] = out[0] if isinstance(out, tuple) else out
            hooks.append(m.register_forward_hook(hook, with_kwargs=True))
        try:
            logits = self.logits(idx)
        finally:
            for h in hooks:
                h.remove()
        return [xs[i] for i in range(len(mods))], [ys[i] for i in range(len(mods))], logits


class HFTeacher(Teacher):
    """A transformers causal LM (Qwen2 / Llama / Mistral layout) read from a local directory."""

    def __init__(self, path: Path):
        try:
            from transformers import AutoModelForCausalLM
        except ImportError:
            raise RwkvcError("a Hugging Face teacher needs `pip install transformers`") from None
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if cfg.get("model_type") not in HF_FAMILIES:
            raise RwkvcError(f"{path}: model_type {cfg.get('model_type')!r}; distillation reads the "
                             f"{', '.join(HF_FAMILIES)} families (a causal LM with q/k/v/o attention and a SwiGLU MLP)")
        try:
            self.module = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
        except Exception as e:
            raise RwkvcError(f"{path}: transformers cannot load the teacher ({str(e).strip().splitlines()[0][:200]})") from None
        self.name = f"{cfg['model_type']} {path}"
        self.hf = self.module.config
        self.freeze()

    def config(self, head_size: int = 0) -> HybridConfig:
        c = self.hf
        C = c.hidden_size
        N = head_size or getattr(c, "head_dim", None) or C // c.num_attention_heads
        if C % N:
            raise RwkvcError(f"--head_size {N} does not divide the teacher's hidden size {C}")
        return HybridConfig(n_layer=c.num_hidden_layers, n_embd=C, head_size=N, vocab_size=c.vocab_size,
                            ffn_dim=c.intermediate_size, norm="rms_norm", norm_eps=float(c.rms_norm_eps),
                            act="silu", mlp_bias=bool(getattr(c, "mlp_bias", False)),
                            tie_embeddings=bool(c.tie_word_embeddings), **lora_dims(C))

    @torch.no_grad()
    def copy_into(self, s: Hybrid) -> None:
        t, c = self.module, self.hf
        s.model.embed_tokens.weight.copy_(t.model.embed_tokens.weight)
        s.model.norm.weight.copy_(t.model.norm.weight)
        if not s.cfg.tie_embeddings:
            s.lm_head.weight.copy_(t.lm_head.weight)
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        n_q, n_kv = c.num_attention_heads, c.num_key_value_heads
        for tl, sl in zip(t.model.layers, s.model.layers):
            sl.input_layernorm.load_state_dict(tl.input_layernorm.state_dict())
            sl.post_attention_layernorm.load_state_dict(tl.post_attention_layernorm.state_dict())
            sl.mlp.load_state_dict(tl.mlp.state_dict())
            tm, at = sl.self_attn.time_mixer, tl.self_attn
            if n_q * hd == c.hidden_size:   # shapes allow: r/k/v/o from q/k/v/o (biases dropped)
                tm.receptance.weight.copy_(at.q_proj.weight)
                tm.key.weight.copy_(repeat_heads(at.k_proj.weight, n_kv, n_q // n_kv, hd))
                tm.value.weight.copy_(repeat_heads(at.v_proj.weight, n_kv, n_q // n_kv, hd))
                tm.output.weight.copy_(at.o_proj.weight)

    def attention_modules(self):
        return [layer.self_attn for layer in self.module.model.layers]

    def logits(self, idx):
        return self.module(input_ids=idx, use_cache=False).logits


def load_teacher(path: str) -> Teacher:
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():
        return HFTeacher(p)
    if p.is_file():
        from rwkvc.training.distill_gpt import GPTTeacher
        return GPTTeacher(p)
    raise RwkvcError(f"--teacher {path}: give a transformers model directory (config.json + weights) or a GPT "
                     "checkpoint trained by rwkvc (train.py --model gpt)")
