"""The frozen base and the forward pass with a trainable initial wkv state.

    load_base    checkpoint -> the reference model (rwkvc.reference.v5/v6/v7) with every matrix (Linear
                 layers, embedding, head) replaced by a frozen FrozenMatrix (training/frozen.py) held as
                 fp32, bf16 or 4 bits; vectors, norms and LoRA factors stay fp32, frozen. Built on the
                 meta device, so no full-precision copy of the model is ever made.
    StateModel   the frozen base + the trainable initial state (L, H, N, N); the head's loss is computed
                 vocabulary-chunk by chunk (no (B, T, V) logits, no dequantised head).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from rwkvc.errors import RwkvcError
from rwkvc.training.frozen import FrozenEmbedding, FrozenLinear, FrozenMatrix, head_logprobs


@dataclass


class Base:
    version: str                      # "7", "6", "5"
    model: nn.Module                  # reference module; matrices FrozenLinear / FrozenEmbedding
    n_layer: int
    n_embd: int
    n_head: int
    head_size: int
    vocab_size: int
    time_state: torch.Tensor | None   # (L, H, N, N) if the checkpoint had one
    storage: str
    report: dict = field(default_factory=dict)


def _read_checkpoint(path: str) -> dict:
    from rwkvc.frontend import load_state_dict
    return load_state_dict(path)


def load_base(path: str, storage: str = "fp32", group: int = 64) -> Base:
    """Checkpoint -> the frozen base model in `storage` (frozen.STORAGE). RWKV v5 (not RWKV-Lite), v6, v7."""
    from rwkvc.frontend import detect_version
    sd = _read_checkpoint(path)
    arch = detect_version(sd)
    ver = arch.name
    ts = {int(k.split(".")[1]): v for k, v in sd.items() if k.endswith(".att.time_state")}
    sd = {k: v for k, v in sd.items() if not k.endswith(".att.time_state")}
    if ver == "7":
        from rwkvc.reference.v7 import RWKV7, config_from_state_dict
        cfg = config_from_state_dict(sd)
        make = lambda: RWKV7(cfg)  # noqa: E731
        L, C, H, N, V = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size, cfg.vocab_size
    elif ver == "6":
        from rwkvc.reference.v6 import RWKV6, V6Config
        cfg = V6Config.from_state_dict(sd)
        make = lambda: RWKV6(cfg)  # noqa: E731
        L, C, H, N, V = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size, cfg.vocab_size
    elif ver == "5":
        from rwkvc.reference.v5 import RWKV5, V5Config
        cfg = V5Config.from_state_dict(sd)
        if cfg.factorised or cfg.mlp_dim or cfg.head_clusters or any(k.startswith("head_l") for k in sd):
            raise RwkvcError(f"{path}: RWKV-Lite checkpoints are not supported by state tuning (plain RWKV-5 is)")
        make = lambda: RWKV5(cfg)  # noqa: E731
        L, C, H, N, V = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size, cfg.vocab_size
    else:
        raise RwkvcError(f"{path}: state tuning does not cover RWKV-{ver} checkpoints (it tunes plain RWKV-5, 6 and 7)")
    with torch.device("meta"):
        model = make()
    n_frozen = bytes_frozen = bytes_src = 0
    w = mat = new = None
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, (nn.Linear, nn.Embedding)):
            continue
        key = name + ".weight"
        if key not in sd:
            raise RwkvcError(f"{path}: missing '{key}' for RWKV-{ver} L={L} C={C}")
        w = sd[key]
        want = (mod.num_embeddings, mod.embedding_dim) if isinstance(mod, nn.Embedding) else (mod.out_features, mod.in_features)
        if tuple(w.shape) != want:
            raise RwkvcError(f"{path}: '{key}' has shape {tuple(w.shape)}, expected {want}")
        mat = FrozenMatrix(w, storage, group)
        new = FrozenEmbedding(mat) if isinstance(mod, nn.Embedding) else FrozenLinear(mat)
        model.set_submodule(name, new)
        n_frozen += 1
        bytes_frozen += mat.nbytes()
        bytes_src += w.numel() * 2   # against bf16
    own = {k for k, _ in model.named_parameters()}
    rest = {k: v.float() for k, v in sd.items() if k in own}
    matrices = {n + ".weight" for n, mod in model.named_modules() if isinstance(mod, (FrozenLinear, FrozenEmbedding))}
    unknown = sorted(k for k in sd if k not in own and k not in matrices)
    if unknown:
        raise RwkvcError(f"{path}: unexpected key '{unknown[0]}' for RWKV-{ver}; is it a plain RWKV checkpoint?")
    model.load_state_dict(rest, strict=False, assign=True)
    for k, p in list(model.named_parameters()):
        if p.is_meta:   # RWKV-7's unused layer-0 v0/v1/v2 may be absent from a checkpoint
            if ver == "7" and k.startswith("blocks.0.att.v"):
                model.get_submodule(k.rsplit(".", 1)[0]).register_parameter(
                    k.rsplit(".", 1)[1], nn.Parameter(torch.zeros(p.shape), requires_grad=False))
            else:
                raise RwkvcError(f"{path}: checkpoint is missing '{k}' {tuple(p.shape)}")
    model.requires_grad_(False)
    model.eval()
    del sd, rest, w, mat, new          # `w` would keep a memory-mapped checkpoint mapped
    release_freed_memory()
    time_state = None
    if ts:
        if sorted(ts) != list(range(L)) or any(tuple(v.shape) != (H, N, N) for v in ts.values()):
            raise RwkvcError(f"{path}: its time_state tensors do not make one (H, N, N) = {(H, N, N)} per layer")
        time_state = torch.stack([ts[i].float() for i in range(L)])
    rep = {"matrices": n_frozen, "frozen_matrix_bytes": bytes_frozen, "bf16_matrix_bytes": bytes_src,
           "other_param_bytes": sum(p.numel() * 4 for p in model.parameters())}
    return Base(ver, model, L, C, H, N, V, time_state, storage, rep)


def release_freed_memory() -> None:
    """Give the heap memory freed while loading/quantising back to the OS (glibc malloc_trim), so the
    training peak is not the loading peak's leftovers. A no-op elsewhere."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def base_digest(model: nn.Module) -> str:
    """sha256 over every frozen tensor (name, dtype, shape, bytes): equal digests = bit-identical base."""
    h = hashlib.sha256()
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# the forward pass with a trainable initial state


class StateModel(nn.Module):
    """The frozen base + `state` (L, H, N, N), the trainable initial wkv of every layer ([value, key],
    rwkvc's layout = time_state's). The token-shift state starts at zero and is not trained."""

    def __init__(self, base: Base, init: torch.Tensor | None = None, wkv_fn=None, grad_cp: bool = False):
        super().__init__()
        self.base = base
        self.net = base.model
        shape = (base.n_layer, base.n_head, base.head_size, base.head_size)
        s = torch.zeros(shape) if init is None else init.detach().float().clone()
        if tuple(s.shape) != shape:
            raise RwkvcError(f"initial state has shape {tuple(s.shape)}, the model needs {shape}")
        self.state = nn.Parameter(s)
        self.wkv_fn = wkv_fn
        self.grad_cp = grad_cp

    def _block(self, i: int, x, wkv, v_first):
        blk = self.net.blocks[i]
        zero = x.new_zeros(x.shape[0], x.shape[2])                                # (B, C) token shift
        if self.base.version == "7":
            dx, _, _, v_first = blk.att(blk.ln1(x), zero, wkv, v_first, wkv_fn=self.wkv_fn)
        else:
            dx, _, _ = blk.att(blk.ln1(x), zero, wkv)
        x = x + dx
        dx, _ = blk.ffn(blk.ln2(x), zero)
        return x + dx, v_first

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) -> ln_out(x) (B, T, C)."""
        from torch.utils.checkpoint import checkpoint
        B = idx.shape[0]
        x = self.net.blocks[0].ln0(self.net.emb(idx))
        v_first = None
        for i in range(self.base.n_layer):
            wkv = self.state[i].unsqueeze(0).expand(B, -1, -1, -1)                # (B, H, N, N)
            if self.grad_cp and torch.is_grad_enabled():
                x, v_first = checkpoint(self._block, i, x, wkv, v_first, use_reentrant=False)
            else:
                x, v_first = self._block(i, x, wkv, v_first)
        return self.net.ln_out(x)

    def logprobs(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B, T) inputs and targets -> log p(target) (B, T) float32."""
        return head_logprobs(self.hidden(idx), self.net.head, targets)

    @torch.no_grad()
    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T, V) float32 (small models / tests)."""
        h = self.hidden(idx).float()
        return h @ self.net.head.mat.dense(torch.float32).t()
