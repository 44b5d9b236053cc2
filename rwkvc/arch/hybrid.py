"""RWKV-7 hybrids (ARWKV / RWKVInside, `RwkvHybridForCausalLM`): a transformer's embeddings, norms, MLPs
and head with RWKV-7 time-mixes in place of attention. Checkpoint directory -> IR, every key and shape
checked. The math is rwkvc.reference.hybrid; the key names are in docs/DISTILLATION.md.

    read_hybrid(path) -> (config.json as a dict, {key: tensor} in rwkvc's complete layout)
    to_ir(config, sd) -> ir.Model, version "7-hybrid"

`path` is a directory holding config.json and model.safetensors (or model-0000N-of-0000M.safetensors
shards, or a .pth), or a weights file with config.json beside it (what training/distill.py writes).
Published checkpoints without the output gate (`wkv_has_gate: false`) get an exact gate of ones
(g1 = 0, g2 = 1: sigmoid(0) * 2 = 1 in the two rows); layer 0's unused v0/v1/v2 are zeros when absent.

IR of one layer:
    ln1 = input_layernorm (Norm, rms=True for RMSNorm)   att = TimeMix("7", ...) as RWKV-7's
    ln2 = post_attention_layernorm                        ffn = ChannelMix(act, mix={}, lin={key: up_proj,
                                                                value: down_proj[, gate: gate_proj]}, bias)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .. import ir
from ..errors import RwkvcError
from ..mapped import transposed
from .v7 import LORA, MIX, SQUARE, VEC

VERSION = "7-hybrid"
ARCHITECTURES = ("RwkvHybridForCausalLM",)
MODEL_TYPES = ("rwkv_hybrid", "rwkv7_hybrid")
TM = "model.layers.{}.self_attn.time_mixer."
ACTS = {"silu": "silu", "swiglu": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
        "gelu_tanh": "gelu_tanh"}


def config_path(path) -> Path | None:
    """The config.json of a hybrid checkpoint at `path` (a directory or a file beside one), or None."""
    p = Path(path)
    cand = p / "config.json" if p.is_dir() else p.parent / "config.json"
    if not cand.is_file():
        return None
    try:
        d = json.loads(cand.read_text(encoding="utf-8"))
    except (ValueError, OSError, UnicodeDecodeError):
        return None
    if not isinstance(d, dict):
        return None
    archs = d.get("architectures") or []
    if any(a in ARCHITECTURES for a in archs) or d.get("model_type") in MODEL_TYPES:
        return cand
    return None


def is_hybrid(path) -> bool:
    return config_path(path) is not None


def _weights_files(p: Path) -> list[Path]:
    if p.is_file():
        return [p]
    single = [p / "model.safetensors", p / "model.pth"]
    for f in single:
        if f.is_file():
            return [f]
    shards = sorted(p.glob("model-*-of-*.safetensors"))
    if shards:
        return shards
    raise RwkvcError(f"{p}: a hybrid checkpoint directory needs model.safetensors (or its shards) beside "
                     "config.json")


def read_hybrid(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and the tensors, completed to rwkvc's layout (gate, layer-0 value LoRA) and checked."""
    from ..frontend import check_finite, load_state_dict
    p = Path(path)
    cp = config_path(p)
    if cp is None:
        raise RwkvcError(f"{p}: no config.json of an RWKV-7 hybrid (architectures {list(ARCHITECTURES)}) "
                         f"{'in it' if p.is_dir() else 'beside it'}")
    config = json.loads(cp.read_text(encoding="utf-8"))
    sd: dict[str, torch.Tensor] = {}
    for f in _weights_files(p):
        sd.update(load_state_dict(f))
    check_finite(sd)
    for k in ("num_hidden_layers", "hidden_size", "head_size", "vocab_size", "intermediate_size"):
        if not isinstance(config.get(k), int) or config[k] <= 0:
            raise RwkvcError(f"{cp}: '{k}' must be a positive integer (found {config.get(k)!r})")
    if config.get("wkv_version", 7) != 7:
        raise RwkvcError(f"{cp}: wkv_version {config.get('wkv_version')!r}; rwkvc reads RWKV-7 hybrids (7)")
    act = str(config.get("hidden_act", "silu"))
    if act not in ACTS:
        raise RwkvcError(f"{cp}: hidden_act {act!r} is not one rwkvc lowers ({', '.join(sorted(ACTS))})")
    config["hidden_act"] = ACTS[act]
    L, C = config["num_hidden_layers"], config["hidden_size"]
    if C % config["head_size"]:
        raise RwkvcError(f"{cp}: hidden_size {C} is not a multiple of head_size {config['head_size']}")
    for i in range(L):
        t = TM.format(i)
        if t + "ln_x.weight" not in sd and t + "r_k" in sd:
            raise RwkvcError(f"'{t}ln_x.weight' is missing: rwkvc lowers hybrids whose time-mix has its group "
                             "norm (ln_x)")
        if t + "g1" not in sd and t + "r_k" in sd:     # no output gate: an exact gate of ones
            sd[t + "g1"] = torch.zeros(C, 2)
            sd[t + "g2"] = torch.ones(2, C)
            sd.setdefault(t + "x_g", torch.zeros(1, 1, C))
    t0, t1 = TM.format(0), TM.format(1 if L > 1 else 0)
    if t0 + "v1" not in sd and t1 + "v1" in sd:
        Dv = sd[t1 + "v1"].shape[1]
        sd[t0 + "v0"], sd[t0 + "v1"], sd[t0 + "v2"] = torch.zeros(1, 1, C), torch.zeros(C, Dv), torch.zeros(Dv, C)
    if "lm_head.weight" in sd and config.get("tie_word_embeddings"):
        config["tie_word_embeddings"] = False        # a written head wins over the flag
    if "lm_head.weight" not in sd and not config.get("tie_word_embeddings"):
        raise RwkvcError(f"{p}: no 'lm_head.weight' and tie_word_embeddings is not set; the checkpoint is incomplete")
    _check_shapes(config, sd)
    return config, sd


def expected_shapes(config: dict, sd: dict) -> dict[str, tuple]:
    from ..reference.hybrid import config_from_state_dict
    for k in (TM.format(0) + "w1", TM.format(0) + "a1", TM.format(0) + "g1", TM.format(0) + "v1"):
        if k not in sd or sd[k].dim() != 2:
            raise RwkvcError(f"hybrid checkpoint is missing '{k}' (a 2-D tensor); the file is incomplete")
    try:
        cfg = config_from_state_dict(sd, config)
    except ValueError as e:
        raise RwkvcError(f"inconsistent hybrid config.json: {e}") from None
    C, H, N, Fd, V = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.ffn_dim, cfg.vocab_size
    D = {"w": cfg.dim_w, "a": cfg.dim_a, "v": cfg.dim_v, "g": cfg.dim_g}
    s = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,)}
    if cfg.norm == "layer_norm" and cfg.norm_bias:
        s["model.norm.bias"] = (C,)
    if not cfg.tie_embeddings:
        s["lm_head.weight"] = (V, C)
    for i in range(cfg.n_layer):
        b, t = f"model.layers.{i}.", TM.format(i)
        for n in ("input_layernorm", "post_attention_layernorm"):
            s[b + n + ".weight"] = (C,)
            if cfg.norm == "layer_norm" and cfg.norm_bias:
                s[b + n + ".bias"] = (C,)
        for m in MIX + VEC:
            s[t + m] = (1, 1, C)
        for nm, a1, a2 in LORA:
            s[t + a1], s[t + a2] = (C, D[nm]), (D[nm], C)
        s[t + "r_k"] = (H, N)
        for m in SQUARE:
            s[t + m + ".weight"] = (C, C)
        s[t + "ln_x.weight"] = s[t + "ln_x.bias"] = (C,)
        mats = {"up_proj": (Fd, C), "down_proj": (C, Fd)}
        if cfg.act == "silu":
            mats["gate_proj"] = (Fd, C)
        for m, shp in mats.items():
            s[b + f"mlp.{m}.weight"] = shp
            if cfg.mlp_bias:
                s[b + f"mlp.{m}.bias"] = (shp[0],)
    return s


def _check_shapes(config: dict, sd: dict) -> None:
    shapes = expected_shapes(config, sd)
    for k, shp in shapes.items():
        if k not in sd:
            raise RwkvcError(f"hybrid checkpoint is missing '{k}' (expected shape {shp}); the file is incomplete")
        if tuple(sd[k].shape) != shp:
            raise RwkvcError(f"'{k}' has shape {tuple(sd[k].shape)}, expected {shp} for the config.json beside it")
    extra = sorted(k for k in sd if k not in shapes)
    if extra:
        raise RwkvcError(f"unexpected key '{extra[0]}' in an RWKV-7 hybrid checkpoint"
                         f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}; rwkvc reads the "
                         "RwkvHybridForCausalLM layout (docs/DISTILLATION.md)")


def to_ir(config: dict, sd: dict) -> ir.Model:
    from ..frontend import to_numpy
    from ..reference.hybrid import config_from_state_dict
    cfg = config_from_state_dict(sd, config)
    C = cfg.n_embd

    def vec(k):
        return np.ascontiguousarray(to_numpy(sd[k]).reshape(-1))

    def lin(k, transpose=False):
        w = to_numpy(sd[k])
        return ir.Linear(k.removesuffix(".weight"), ir.Dense(transposed(w) if transpose else w))

    def norm(p, eps=cfg.norm_eps):
        bias = vec(p + ".bias") if p + ".bias" in sd else np.zeros(C, np.float32)
        return ir.Norm(vec(p + ".weight"), bias, eps, rms=cfg.norm == "rms_norm")

    blocks = []
    for i in range(cfg.n_layer):
        t, b = TM.format(i), f"model.layers.{i}."
        vecs = {k: vec(t + k) for k in VEC if not (i == 0 and k == "v0")}
        vecs["r_k"] = vec(t + "r_k")
        lins = {m: lin(t + m + ".weight") for m in SQUARE}
        for nm, a1, a2 in LORA:
            if i == 0 and nm == "v":
                continue
            lins[a1], lins[a2] = lin(t + a1, transpose=True), lin(t + a2, transpose=True)
        att = ir.TimeMix("7", {m: vec(t + m) for m in MIX}, vecs, lins,
                         ir.Norm(vec(t + "ln_x.weight"), vec(t + "ln_x.bias"), 64e-5))
        mats = {"key": "up_proj", "value": "down_proj"}
        if cfg.act == "silu":
            mats["gate"] = "gate_proj"
        ffn = ir.ChannelMix(cfg.act, {}, {k: lin(b + f"mlp.{m}.weight") for k, m in mats.items()},
                            bias={k: vec(b + f"mlp.{m}.bias") for k, m in mats.items() if b + f"mlp.{m}.bias" in sd})
        blocks.append(ir.Block(norm(b + "input_layernorm"), att, norm(b + "post_attention_layernorm"), ffn))
    mcfg = ir.ModelConfig(version=VERSION, n_layer=cfg.n_layer, n_embd=C, head_size=cfg.head_size,
                          vocab_size=cfg.vocab_size, ffn_dim=cfg.ffn_dim,
                          lora=tuple(sorted({"w": cfg.dim_w, "a": cfg.dim_a, "v": cfg.dim_v, "g": cfg.dim_g}.items())))
    emb = to_numpy(sd["model.embed_tokens.weight"])
    head = lin("lm_head.weight") if not cfg.tie_embeddings else ir.Linear("lm_head", ir.Dense(np.array(emb)))
    return ir.Model(mcfg, ir.Embedding(ir.Dense(emb)), None, blocks, norm("model.norm"), head)


def load_model(path) -> ir.Model:
    config, sd = read_hybrid(path)
    return to_ir(config, sd)
