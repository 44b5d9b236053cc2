"""The RWKV-7 hybrid (ARWKV / RWKVInside) in plain PyTorch: a transformer's embeddings, norms, MLPs and head
with every self-attention replaced by an RWKV-7 time-mix. The readable truth of the family.

    x = embed_tokens[idx]                                                   (B, T, C)
    per layer:  x = x + time_mixer(input_layernorm(x))                      RWKV-7's TimeMix, no rotary
                x = x + mlp(post_attention_layernorm(x))                    the teacher's MLP, unchanged
    logits = lm_head(norm(x))                                               (B, T, V)

The time-mix is `rwkvc.reference.v7.TimeMix` itself (same parameters, same WKV forms), and layer 0's value
is the `v_first` every later layer mixes towards, as in RWKV-7. Norms are RMSNorm (Qwen2, Llama) or
LayerNorm (GPT); MLPs are SwiGLU (`down(silu(gate(x)) * up(x))`, Qwen2 / Llama) or GELU
(`down(gelu(up(x)))`, GPT, with biases where the teacher has them). The model has no positional encoding:
the recurrence orders the tokens.

Parameter names are those of the published hybrids (`RwkvHybridForCausalLM`, docs/DISTILLATION.md), so
`state_dict()` is their `model.safetensors` and `save` / `load` write and read their directory layout
(`config.json` + `model.safetensors`).

Dimensions: B batch, T time, C channels (hidden_size), H heads, N head size, F MLP width, V vocabulary,
L layers. State: the RWKV-7 `State` (shift (L, 2, B, C), of which row 1 stays zero: an MLP has no token
shift; wkv (L, B, H, N, N)).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .v7 import State, TimeMix, V7Config

ARCHITECTURE = "RwkvHybridForCausalLM"
NORMS = ("rms_norm", "layer_norm")
ACTS = ("silu", "gelu", "gelu_tanh")      # silu: SwiGLU (gate_proj present); gelu*: a two-matrix MLP


@dataclass(frozen=True)
class HybridConfig:
    n_layer: int
    n_embd: int
    head_size: int
    vocab_size: int
    ffn_dim: int
    dim_w: int
    dim_a: int
    dim_v: int
    dim_g: int
    norm: str = "rms_norm"
    norm_eps: float = 1e-6
    norm_bias: bool = False
    act: str = "silu"
    mlp_bias: bool = False
    tie_embeddings: bool = False

    def __post_init__(self):
        for f in ("n_layer", "n_embd", "head_size", "vocab_size", "ffn_dim", "dim_w", "dim_a", "dim_v", "dim_g"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"HybridConfig.{f} must be a positive int, got {v!r}")
        if self.n_embd % self.head_size:
            raise ValueError(f"HybridConfig.n_embd ({self.n_embd}) must be a multiple of head_size ({self.head_size})")
        if self.norm not in NORMS:
            raise ValueError(f"HybridConfig.norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.act not in ACTS:
            raise ValueError(f"HybridConfig.act must be one of {', '.join(ACTS)}, got {self.act!r}")
        if not (isinstance(self.norm_eps, float) and self.norm_eps > 0):
            raise ValueError(f"HybridConfig.norm_eps must be a positive float, got {self.norm_eps!r}")

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    def v7(self) -> V7Config:
        """The time-mix's RWKV-7 dimensions (ffn_dim is the MLP's; v7.TimeMix does not read it)."""
        return V7Config(n_layer=self.n_layer, n_embd=self.n_embd, head_size=self.head_size,
                        vocab_size=self.vocab_size, ffn_dim=self.ffn_dim, dim_w=self.dim_w, dim_a=self.dim_a,
                        dim_v=self.dim_v, dim_g=self.dim_g)

    # -- config.json (the published hybrids' keys, plus rwkvc's for what they leave implicit) -------
    def to_json(self) -> dict:
        d = {"architectures": [ARCHITECTURE], "model_type": "rwkv_hybrid", "wkv_version": 7,
             "wkv_has_gate": True, "num_hidden_layers": self.n_layer, "hidden_size": self.n_embd,
             "head_size": self.head_size, "vocab_size": self.vocab_size, "intermediate_size": self.ffn_dim,
             "lora_rank_decay": self.dim_w, "lora_rank_iclr": self.dim_a,
             "lora_rank_value_residual_mix": self.dim_v, "lora_rank_gate": self.dim_g,
             "hidden_act": self.act, "tie_word_embeddings": self.tie_embeddings,
             "norm_type": self.norm, "norm_bias": self.norm_bias, "mlp_bias": self.mlp_bias}
        d["rms_norm_eps" if self.norm == "rms_norm" else "layer_norm_eps"] = self.norm_eps
        return d

    @staticmethod
    def from_json(d: dict, dims: dict) -> "HybridConfig":
        """From a config.json and the low-rank widths read off the tensors (`dims`: dim_w, dim_a, dim_v,
        dim_g), which are the truth where the two disagree."""
        norm = d.get("norm_type", "rms_norm" if "rms_norm_eps" in d else "layer_norm")
        eps = d.get("rms_norm_eps" if norm == "rms_norm" else "layer_norm_eps", 1e-6 if norm == "rms_norm" else 1e-5)
        return HybridConfig(n_layer=int(d["num_hidden_layers"]), n_embd=int(d["hidden_size"]),
                            head_size=int(d["head_size"]), vocab_size=int(d["vocab_size"]),
                            ffn_dim=int(d["intermediate_size"]), norm=norm, norm_eps=float(eps),
                            norm_bias=bool(d.get("norm_bias", False)), act=str(d.get("hidden_act", "silu")),
                            mlp_bias=bool(d.get("mlp_bias", False)),
                            tie_embeddings=bool(d.get("tie_word_embeddings", False)), **dims)


def make_norm(cfg: HybridConfig) -> nn.Module:
    if cfg.norm == "rms_norm":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.norm_bias)


class MLP(nn.Module):
    """SwiGLU (act silu): down(silu(gate(x)) * up(x)); else down(act(up(x))). x (B, T, C) -> (B, T, C)."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        C, Fd, b = cfg.n_embd, cfg.ffn_dim, cfg.mlp_bias
        self.act = cfg.act
        if cfg.act == "silu":
            self.gate_proj = nn.Linear(C, Fd, bias=b)
        self.up_proj = nn.Linear(C, Fd, bias=b)
        self.down_proj = nn.Linear(Fd, C, bias=b)

    def forward(self, x):
        if self.act == "silu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))              # (B, T, F) inside
        h = F.gelu(self.up_proj(x), approximate="tanh" if self.act == "gelu_tanh" else "none")
        return self.down_proj(h)


class Attention(nn.Module):
    """Holds the time-mix under the published name `self_attn.time_mixer`."""

    def __init__(self, cfg: HybridConfig, layer_id: int):
        super().__init__()
        self.time_mixer = TimeMix(cfg.v7(), layer_id)


class Layer(nn.Module):
    def __init__(self, cfg: HybridConfig, layer_id: int):
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg, layer_id)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = MLP(cfg)


class Body(nn.Module):
    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg)


class Hybrid(nn.Module):
    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Body(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    @torch.no_grad()
    def init_weights(self, seed: int = 0, scale: float = 1.0) -> "Hybrid":
        """Random weights for tests and benchmarks: the time-mixes as RWKV7.init_weights makes them, the
        rest normal (distillation starts from a teacher instead: rwkvc.training.distill_init)."""
        from dataclasses import replace
        from .v7 import RWKV7
        g = torch.Generator().manual_seed(seed)
        donor = RWKV7(replace(self.cfg.v7(), vocab_size=1, ffn_dim=1)).init_weights(seed, scale)
        for tm, blk in zip(self.time_mixers(), donor.blocks):
            tm.load_state_dict(blk.att.state_dict())
        for name, p in self.named_parameters():
            if ".time_mixer." in name:
                continue
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1 + 0.1 * scale * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * scale * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        return self

    def time_mixers(self) -> list[TimeMix]:
        return [layer.self_attn.time_mixer for layer in self.model.layers]

    def head(self, x):
        """x (..., C) -> logits (..., V)."""
        w = self.model.embed_tokens.weight if self.cfg.tie_embeddings else self.lm_head.weight
        return x @ w.T

    def forward(self, idx, state: State | None = None, last_only: bool = False, wkv_fn=None):
        """idx (B, T) int64 -> logits (B, T, V) (or (B, V) with last_only), new State.

        wkv_fn: the WKV form (v7.wkv7_recurrent by default; v7.wkv7_chunked for training and prefill)."""
        B, T = idx.shape
        if state is None:
            state = State.zeros(self.cfg.v7(), B, dtype=self.model.embed_tokens.weight.dtype, device=idx.device)
        x = self.model.embed_tokens(idx)                                           # (B, T, C)
        shifts, wkvs, v_first = [], [], None
        for i, layer in enumerate(self.model.layers):
            dx, s_att, wkv, v_first = layer.self_attn.time_mixer(layer.input_layernorm(x), state.shift[i, 0],
                                                                 state.wkv[i], v_first, wkv_fn=wkv_fn)
            x = x + dx
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            shifts.append(torch.stack([s_att, torch.zeros_like(s_att)]))
            wkvs.append(wkv)
        if last_only:
            x = x[:, -1]
        x = self.model.norm(x)
        return self.head(x), State(torch.stack(shifts), torch.stack(wkvs))

    # -- the published layout: config.json + model.safetensors -------------------------------------
    def save(self, out_dir: str | os.PathLike, dtype=torch.float32) -> Path:
        """Write config.json and model.safetensors into out_dir, each file atomically (temporary + rename)."""
        from safetensors.torch import save_file
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.state_dict().items()}
        for name, write in (("model.safetensors", lambda p: save_file(sd, p, metadata={"format": "pt"})),
                            ("config.json", lambda p: Path(p).write_text(json.dumps(self.cfg.to_json(), indent=1)))):
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=out)
            os.close(fd)
            try:
                write(tmp)
                os.replace(tmp, out / name)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return out


def config_from_state_dict(sd: dict, config: dict) -> HybridConfig:
    """The low-rank widths from the tensors, the rest from config.json."""
    p = "model.layers.{}.self_attn.time_mixer."
    L = int(config["num_hidden_layers"])
    dims = {"dim_w": sd[p.format(0) + "w1"].shape[1], "dim_a": sd[p.format(0) + "a1"].shape[1],
            "dim_v": sd[p.format(1 if L > 1 else 0) + "v1"].shape[1], "dim_g": sd[p.format(0) + "g1"].shape[1]}
    return HybridConfig.from_json(config, {k: int(v) for k, v in dims.items()})


def load(path: str | os.PathLike) -> Hybrid:
    """A hybrid from a directory (config.json + model.safetensors) or from its weights file (.safetensors or
    .pth) with config.json beside it. Unchecked: rwkvc.arch.hybrid reads published checkpoints with every
    key and shape checked and one-line errors."""
    from rwkvc.arch.hybrid import read_hybrid
    config, sd = read_hybrid(path)
    model = Hybrid(config_from_state_dict(sd, config))
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model
