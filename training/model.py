"""The training view of the reference RWKV-7: RWKV-LM's initialisation, the WKV kernel, the loss.

Training trains `rwkvc.reference.v7.RWKV7` itself (one definition of the maths); this module only
chooses how its WKV recurrence is computed, initialises it as RWKV-LM does, and wraps it with the
next-token loss so an engine (plain PyTorch or DeepSpeed) sees one module that returns a loss.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rwkvc.errors import RwkvcError
from rwkvc.reference.v7 import RWKV7, ChannelMix, TimeMix, V7Config, wkv7_chunked, wkv7_recurrent


def model_config(args) -> V7Config:
    dims = V7Config.default_dims(args.n_embd)
    dims["ffn_dim"] = args.ffn_dim
    return V7Config(n_layer=args.n_layer, n_embd=args.n_embd, head_size=args.head_size_a,
                    vocab_size=args.vocab_size, **dims)


@torch.no_grad()
def init_rwkv_lm(model: RWKV7, seed: int) -> RWKV7:
    """RWKV-LM x070's initialisation (train_temp/src/model.py), applied to the reference module."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    C, L, H, N = cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.head_size

    def ortho(t: torch.Tensor, gain: float):  # as nn.init.orthogonal_, from our generator
        rows, cols = t.shape
        q, r = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), generator=g, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # a uniformly random orthogonal basis
        t.copy_((q if rows >= cols else q.T) * gain)

    def ortho_lora(t: torch.Tensor, scale: float):  # RWKV-LM's ortho_init
        rows, cols = t.shape
        ortho(t, (math.sqrt(rows / cols) if rows > cols else 1.0) * scale)

    def uniform(t: torch.Tensor, bound: float):
        t.copy_((torch.rand(t.shape, generator=g) * 2 - 1) * bound)

    uniform(model.emb.weight, 1e-4)
    ortho(model.head.weight, 0.5 * math.sqrt(cfg.vocab_size / C) if cfg.vocab_size > C else 0.5)
    for m in model.modules():
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            m.weight.fill_(1.0)
            m.bias.zero_()
    n = torch.arange(C, dtype=torch.float32)
    ddd = (n / C).view(1, 1, C)
    linear = n / (C - 1) - 0.5
    zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag = zigzag * zigzag.abs()
    for i, blk in enumerate(model.blocks):
        r0 = i / (L - 1) if L > 1 else 0.0   # 0 -> 1
        r1 = 1.0 - i / L                      # 1 -> ~0
        att, ffn = blk.att, blk.ffn
        for name, pw in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            getattr(att, name).copy_(1.0 - ddd ** (pw * r1))
        www = -6 + 6 * (n / (C - 1)) ** (1 + 1 * r0 ** 0.3)
        att.w0.copy_((www + 0.5 + zigzag * 2.5).view(1, 1, C))   # +0.5: the softplus offset
        att.a0.copy_((-0.19 + zigzag * 0.3 + linear * 0.4).view(1, 1, C))
        att.v0.copy_((0.73 - linear * 0.4).view(1, 1, C))
        for lo, hi in (("w1", "w2"), ("a1", "a2"), ("v1", "v2"), ("g1", "g2")):
            getattr(att, lo).zero_()
            ortho_lora(getattr(att, hi), 0.1)
        att.k_k.copy_((0.71 - linear * 0.1).view(1, 1, C))
        att.k_a.fill_(1.02)
        att.r_k.fill_(-0.04)
        uniform(att.receptance.weight, 0.5 / math.sqrt(C))
        uniform(att.key.weight, 0.05 / math.sqrt(C))
        uniform(att.value.weight, 0.5 / math.sqrt(C))
        att.output.weight.zero_()
        ffn.x_k.copy_(1.0 - ddd ** (r1 ** 4))
        uniform(ffn.key.weight, 0.5 / math.sqrt(C))
        ffn.value.weight.zero_()
    return model


# ------------------------------------------------------------------------------------------------
# WKV kernels. All take and return what `wkv7_recurrent` does:
#   r, w (decay), k, v, a, b: (B, T, H, N); wkv: (B, H, N, N) [value, key] -> y, wkv

def _fp32_wkv(fn, r, w, k, v, a, b, wkv):
    """Run fn with autocast off and at least fp32 (bf16 matmul outputs come in under autocast)."""
    dt = torch.promote_types(torch.promote_types(r.dtype, w.dtype), torch.float32)
    with torch.autocast(device_type=r.device.type, enabled=False):
        y, s = fn(*(z.to(dt) for z in (r, w, k, v, a, b, wkv)))
    return y, s.to(wkv.dtype)


def _fla_wkv(chunk_rwkv7, dtype, r, w, k, v, a, b, wkv):
    """flash-linear-attention's chunked RWKV-7 kernel (CUDA/Triton). It takes the log decay and keeps
    its state as [key, value], the transpose of ours."""
    y, s = chunk_rwkv7(r=r.to(dtype), w=torch.log(w.float()).to(dtype), k=k.to(dtype), v=v.to(dtype),
                       a=a.to(dtype), b=b.to(dtype), scale=1.0,
                       initial_state=wkv.float().transpose(-1, -2).contiguous(), output_final_state=True)
    return y, s.transpose(-1, -2).to(wkv.dtype)


def select_wkv(impl: str, device: torch.device, chunk_len: int, compute_dtype=torch.float32):
    """-> (name, fn) for `RWKV7.forward(..., wkv_fn=fn)`."""
    if impl in ("fla", "auto") and device.type == "cuda":
        try:
            from fla.ops.rwkv7 import chunk_rwkv7
        except ImportError:
            if impl == "fla":
                raise RwkvcError("--wkv fla needs flash-linear-attention (`pip install flash-linear-attention`)") from None
        else:
            dt = compute_dtype if compute_dtype in (torch.bfloat16, torch.float16) else torch.float32
            return "fla", functools.partial(_fla_wkv, chunk_rwkv7, dt)
    elif impl == "fla":
        raise RwkvcError("--wkv fla runs on CUDA only; use --wkv chunked on CPU")
    if impl == "recurrent":
        return "recurrent", functools.partial(_fp32_wkv, wkv7_recurrent)
    return f"chunked{chunk_len}", functools.partial(_fp32_wkv, functools.partial(wkv7_chunked, chunk_len=chunk_len))


# ------------------------------------------------------------------------------------------------
# gradient checkpointing without renaming any parameter

class _Checkpointed:
    """Mixin: recompute this module's forward in the backward pass (hooks still run, so ZeRO-3
    gathers the parameters again for the recomputation)."""

    def __call__(self, *args, **kw):
        if torch.is_grad_enabled():
            return checkpoint(super().__call__, *args, use_reentrant=False, **kw)
        return super().__call__(*args, **kw)


class CheckpointedTimeMix(_Checkpointed, TimeMix):
    pass


class CheckpointedChannelMix(_Checkpointed, ChannelMix):
    pass


def enable_grad_checkpointing(model: RWKV7):
    """Recompute every time-mix and channel-mix in the backward pass (--grad_cp 1)."""
    swap = {TimeMix: CheckpointedTimeMix, ChannelMix: CheckpointedChannelMix}
    for m in model.modules():
        if type(m) in swap:
            m.__class__ = swap[type(m)]


# ------------------------------------------------------------------------------------------------
# loss

class L2Wrap(torch.autograd.Function):
    """RWKV-LM's L2Wrap: identity on the loss, plus a gradient 1e-4 / (B*T) * max_logit on each
    position's largest logit, which keeps logits from drifting large (helps bf16 inference)."""

    @staticmethod
    def forward(ctx, loss, logits):
        ctx.save_for_backward(logits)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (y,) = ctx.saved_tensors
        factor = 1e-4 / (y.shape[0] * y.shape[1])
        maxx, ids = torch.max(y, -1, keepdim=True)
        gy = torch.zeros_like(y)
        gy.scatter_(-1, ids, maxx * factor)
        return grad_output, gy


class LinearCrossEntropy(torch.autograd.Function):
    """cross_entropy(x @ W^T, targets) (+ L2Wrap's gradient), without ever holding the (N, V) logits.

    The loss is the last op, so its gradients are known in the forward pass: each chunk of rows
    computes logits, softmax, loss and its share of dx = g W and dW = g^T x, then frees them.
    backward only scales (dx, dW) by the incoming gradient. Matmuls run in `mm_dtype` (bf16 under
    bf16 autocast), softmax and accumulation in fp32. x: (N, C), W: (V, C), targets: (N,) int64.
    """

    @staticmethod
    def forward(ctx, x, W, targets, mm_dtype, reduction, l2wrap, chunk):
        N = x.shape[0]
        scale = 1.0 / N if reduction == "mean" else 1.0
        need = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        xm, Wm = x.to(mm_dtype), W.to(mm_dtype)
        dx = torch.empty(x.shape, dtype=torch.float32, device=x.device) if need else None
        dW = torch.zeros(W.shape, dtype=torch.float32, device=W.device) if need else None
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for s in range(0, N, chunk):
            xc, tc = xm[s:s + chunk], targets[s:s + chunk, None]
            z = (xc @ Wm.t()).float()                                  # (n, V) logits
            m, am = z.max(-1, keepdim=True)
            z.sub_(m).exp_()                                           # exp(z - max)
            se = z.sum(-1, keepdim=True)
            zt = z.gather(1, tc)
            total += (se.log() - zt.log()).sum()                      # logsumexp(z) - z_target
            if not need:
                continue
            z.mul_(scale / se)                                         # softmax * scale
            z.scatter_add_(1, tc, torch.full_like(zt, -scale))         # - onehot * scale
            if l2wrap:
                z.scatter_add_(1, am, m * (1e-4 / N))
            g = z.to(mm_dtype)
            dx[s:s + chunk] = (g @ Wm).float()
            dW += (g.t() @ xc).float()
        ctx.save_for_backward(dx.to(x.dtype) if need else None, dW.to(W.dtype) if need else None)
        return total * scale

    @staticmethod
    def backward(ctx, grad):
        dx, dW = ctx.saved_tensors
        return dx * grad.to(dx.dtype), dW * grad.to(dW.dtype), None, None, None, None, None


class _LossHead(nn.Linear):
    """The model's head (same weight, same maths: logits = x W^T) that, while `targets` is set,
    returns the next-token loss instead of the logits, via LinearCrossEntropy. LMLoss sets it for
    the duration of one forward; the parameter names do not change. The loss is computed inside
    the head's own forward so ZeRO-3 has its weight gathered at that moment."""

    targets = None
    reduction = "mean"
    l2wrap = True
    chunk_elems = 1 << 27  # logits per chunk (512 MB in fp32): rows = chunk_elems // V

    def forward(self, x):
        if self.targets is None:
            return super().forward(x)
        dev = x.device.type
        mm = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.weight.dtype
        with torch.autocast(device_type=dev, enabled=False):
            return LinearCrossEntropy.apply(x.flatten(0, -2), self.weight, self.targets.flatten(), mm,
                                            self.reduction, self.l2wrap,
                                            max(1, self.chunk_elems // self.weight.shape[0]))


class LMLoss(nn.Module):
    """Wraps the reference model: forward(idx (B, T), targets (B, T)) -> cross-entropy (fp32).

    The model is the only child, as `model`, so `wrapper.model.state_dict()` is the official
    checkpoint format. With fused_head the head computes the loss chunk by chunk (LinearCrossEntropy);
    otherwise the full (B, T, V) logits are made and RWKV-LM's L2Wrap is applied to them."""

    def __init__(self, model: RWKV7, wkv_fn=None, l2wrap: bool = True, fused_head: bool = True):
        super().__init__()
        self.model = model
        self.wkv_fn = wkv_fn
        self.l2wrap = l2wrap
        self.fused_head = fused_head
        if fused_head and type(model.head) is nn.Linear:
            model.head.__class__ = _LossHead

    def forward(self, idx, targets, reduction: str = "mean"):
        l2 = self.l2wrap and self.training and reduction == "mean"
        if self.fused_head and isinstance(self.model.head, _LossHead):  # a pass may have replaced the head
            head = self.model.head
            head.targets, head.reduction, head.l2wrap = targets, reduction, l2
            try:
                loss, _ = self.model(idx, wkv_fn=self.wkv_fn)
            finally:
                head.targets = None
            return loss
        logits, _ = self.model(idx, wkv_fn=self.wkv_fn)                        # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)
        return L2Wrap.apply(loss, logits) if l2 else loss


def param_groups(model: RWKV7, weight_decay: float):
    """RWKV-LM x070's groups: decay only on the 2-D projection matrices (`*.weight` of Linear layers:
    receptance/key/value/output, FFN, head), not on the embedding, norms, mixing vectors or the LoRA
    factors; att.w0 (decay bias) learns at 2x."""
    decay, plain, fast = [], [], []
    for name, p in model.named_parameters():
        if name.endswith("att.w0"):
            fast.append(p)
        elif weight_decay > 0 and p.dim() == 2 and name.endswith(".weight") and name != "emb.weight":
            decay.append(p)
        else:
            plain.append(p)
    groups = [dict(params=plain, weight_decay=0.0, lr_scale=1.0, name="1x"),
              dict(params=fast, weight_decay=0.0, lr_scale=2.0, name="2x"),
              dict(params=decay, weight_decay=weight_decay, lr_scale=1.0, name="decay")]
    return [g for g in groups if g["params"]]


def lr_at(step: int, args, total_steps: int, real_bsz: int) -> float:
    """RWKV-LM's schedule at (0-based) step: exponential decay lr_init -> lr_final over the run (linear if
    either is 0), or cosine over my_exit_tokens when that is set; times a linear warmup from 1%."""
    w = max(0, args.warmup_steps)
    if args.lr_final == args.lr_init or total_steps <= w:
        lr = args.lr_init
    else:
        progress = min(1.0, max(0.0, (step - w + 1) / (total_steps - w)))
        if args.lr_final == 0 or args.lr_init == 0:
            lr = args.lr_init + (args.lr_final - args.lr_init) * progress
        else:
            lr = args.lr_init * math.exp(math.log(args.lr_final / args.lr_init) * progress)
    if args.my_exit_tokens > 0 and args.lr_init > 0:
        tokens, warm = step * args.ctx_len * real_bsz, w * args.ctx_len * real_bsz
        progress = min(1.0, max(0.0, (tokens - warm) / max(1, args.my_exit_tokens - warm)))
        f = args.lr_final / args.lr_init
        lr = args.lr_init * ((0.5 + f / 2) + (0.5 - f / 2) * math.cos(math.pi * progress))
    if step < w:
        lr *= 0.01 + 0.99 * step / w
    return lr
