"""The frozen base's matrices: fp32 / bf16 / fp16 or 4 bits (nf4, int4), dense rows handed out on demand.

    nf4   per row, blocks of `quant_group` (default 64) inputs: w ~ NF4[code] * absmax(block)
          (the 16 NormalFloat levels of QLoRA / bitsandbytes), 4.5 bits per weight
    int4  rwkvc's own weight math (rwkvc.weights.int4 quantize_int4): asymmetric group-wise,
          w ~ (code - zero) * scale, 4 + 40/group bits per weight

Matrices are dequantised a few rows (~4 MB) at a time, per use, in the backward pass too (nothing but the
packed codes is kept for backward), so the resident base is the 4-bit storage (the memory saving of
RWKV-LM-State-4bit, without bitsandbytes). FrozenLinear and FrozenEmbedding take the place of a
reference model's nn.Linear / nn.Embedding; head_logprobs is the head's loss, vocabulary-chunk by chunk.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

STORAGE = ("fp32", "bf16", "fp16", "nf4", "int4")
DENSE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# NormalFloat-4 levels (QLoRA, Dettmers et al. 2023; the table bitsandbytes uses)
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


# ------------------------------------------------------------------------------------------------
# 4-bit weight math (plain functions; tests compare them with NumPy / rwkvc.weights.int4)


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """(R, 2m) codes 0..15 -> (R, m) uint8, element 2i in the low nibble (as rwkvc.weights.int4.pack_int4)."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def quantize_nf4(w: torch.Tensor, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """w (R, K) -> packed codes (R, Kp/2) uint8 and absmax (R, Kp/block) float32, Kp = K padded to block.
    Each block of `block` inputs of a row: w ~ NF4[code] * absmax (nearest level)."""
    R, K = w.shape
    nb = -(-K // block)
    wp = torch.zeros(R, nb * block, dtype=torch.float32)
    wp[:, :K] = w.float()
    wb = wp.view(R, nb, block)
    absmax = wb.abs().amax(-1)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    mids = (NF4[1:] + NF4[:-1]) / 2
    codes = torch.bucketize(wb / absmax[..., None], mids).view(R, nb * block)
    return _pack(codes), absmax


def _byte_lut(levels: torch.Tensor) -> torch.Tensor:
    """(16,) levels -> (256, 2): the two levels a packed byte holds (low nibble first)."""
    b = torch.arange(256)
    return torch.stack([levels[b & 0x0F], levels[b >> 4]], 1)


_NF4_LUT = _byte_lut(NF4)
_INT4_LUT = _byte_lut(torch.arange(16, dtype=torch.float32))


def _lookup(packed: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """packed (R, m) uint8 -> (R, 2m) float32 levels (int32 indices: no int64 copy of the codes)."""
    return F.embedding(packed.to(torch.int32), lut.to(packed.device)).view(packed.shape[0], -1)


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, K: int, dtype=torch.float32) -> torch.Tensor:
    R, nb = absmax.shape
    lv = _lookup(packed, _NF4_LUT).view(R, nb, -1)                             # (R, nb, block)
    return (lv * absmax[..., None]).view(R, -1)[:, :K].to(dtype)


def quantize_int4_torch(w: torch.Tensor, group: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rwkvc's int4 weight math (rwkvc.weights.int4.quantize_int4) -> packed codes (R, Kp/2), scales (R, nb),
    zeros (R, nb) uint8: w ~ (code - zero) * scale per group of `group` inputs."""
    from rwkvc.weights.int4 import quantize_int4
    codes, scales, zeros = quantize_int4(w.float().numpy(), group)
    return _pack(torch.from_numpy(codes)), torch.from_numpy(scales), torch.from_numpy(zeros)


def dequantize_int4_torch(packed, scales, zeros, K: int, dtype=torch.float32) -> torch.Tensor:
    R, nb = scales.shape
    c = _lookup(packed, _INT4_LUT).view(R, nb, -1)
    return ((c - zeros[..., None].float()) * scales[..., None]).view(R, -1)[:, :K].to(dtype)


class FrozenMatrix(nn.Module):
    """A frozen (out, in) matrix in one storage format (STORAGE); hands out dense rows on demand.
    Its tensors are buffers, so no optimizer ever sees them."""

    ROW_CHUNK = 4096   # rows quantised at a time (bounds the temporary float copy)

    def __init__(self, w: torch.Tensor, fmt: str, group: int = 64):
        super().__init__()
        if fmt not in STORAGE:
            raise ValueError(f"storage {fmt!r} is not one of {STORAGE}")
        self.fmt, self.group = fmt, group
        self.out_features, self.in_features = (int(s) for s in w.shape)
        if fmt in DENSE_DTYPES:
            self.register_buffer("w", w.detach().to(DENSE_DTYPES[fmt]).contiguous())
            return
        parts = []
        for s in range(0, self.out_features, self.ROW_CHUNK):
            rows = w[s:s + self.ROW_CHUNK].detach()
            parts.append(quantize_nf4(rows, group) if fmt == "nf4" else quantize_int4_torch(rows, group))
        names = ("packed", "absmax") if fmt == "nf4" else ("packed", "scales", "zeros")
        for j, name in enumerate(names):
            self.register_buffer(name, torch.cat([p[j] for p in parts]).contiguous())

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def _dequant(self, sel, dtype) -> torch.Tensor:
        K = self.in_features
        if self.fmt in DENSE_DTYPES:
            return self.w[sel].to(dtype)
        if self.fmt == "nf4":
            return dequantize_nf4(self.packed[sel], self.absmax[sel], K, dtype)
        return dequantize_int4_torch(self.packed[sel], self.scales[sel], self.zeros[sel], K, dtype)

    def rows(self, a: int, b: int, dtype=torch.float32) -> torch.Tensor:
        return self._dequant(slice(a, b), dtype)

    def take(self, idx: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        return self._dequant(idx.reshape(-1), dtype)

    def dense(self, dtype=torch.float32) -> torch.Tensor:
        return self._dequant(slice(None), dtype)

    def _chunks(self, dtype):
        """Row ranges small enough that a dense copy stays ~4 MB; one range when no copy is needed."""
        if self.fmt in DENSE_DTYPES and DENSE_DTYPES[self.fmt] == dtype:
            return [(0, self.out_features)]
        n = max(1, (1 << 20) // self.in_features)
        return [(a, min(self.out_features, a + n)) for a in range(0, self.out_features, n)]

    def matmul_t(self, x: torch.Tensor, dtype) -> torch.Tensor:
        """x (..., in) @ W^T -> (..., out), W made dense a few rows at a time."""
        parts = [x @ self.rows(a, b, dtype).t() for a, b in self._chunks(dtype)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, -1)

    def matmul(self, g: torch.Tensor, dtype) -> torch.Tensor:
        """g (..., out) @ W -> (..., in), W made dense a few rows at a time."""
        out = None
        for a, b in self._chunks(dtype):
            y = g[..., a:b] @ self.rows(a, b, dtype)
            out = y if out is None else out.add_(y)
        return out

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype if x.dtype.is_floating_point else torch.float32


class _FrozenMatmul(torch.autograd.Function):
    """y = x W^T with W frozen: W is made dense a few rows at a time, in the forward and again in the
    backward, instead of a dense copy being kept alive between them (what keeps a 4-bit base 4-bit
    during training)."""

    @staticmethod
    def forward(ctx, x, mat: FrozenMatrix, dtype):
        ctx.mat, ctx.dtype, ctx.in_dtype = mat, dtype, x.dtype
        return mat.matmul_t(x.to(dtype), dtype)

    @staticmethod
    def backward(ctx, g):
        return ctx.mat.matmul(g.to(ctx.dtype), ctx.dtype).to(ctx.in_dtype), None, None


class FrozenLinear(nn.Module):
    def __init__(self, mat: FrozenMatrix):
        super().__init__()
        self.mat = mat

    def forward(self, x):
        dt = _compute_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return _FrozenMatmul.apply(x, self.mat, dt)


class FrozenEmbedding(nn.Module):
    def __init__(self, mat: FrozenMatrix):
        super().__init__()
        self.mat = mat

    def forward(self, idx):
        return self.mat.take(idx, torch.float32).view(*idx.shape, self.mat.in_features)


class _HeadLogProb(torch.autograd.Function):
    """log softmax(x W^T)[target] per row, W frozen (V, C), computed vocabulary-chunk by chunk with an
    online logsumexp: never more than (token chunk x vocabulary chunk) logits nor one chunk of W alive.
    The gradient is known in the forward pass (d logp_t / d x_t = W[t] - sum_v p_v W_v), so only that
    (n, C) matrix is saved. x: (n, C), targets: (n,) -> (n,) float32."""

    @staticmethod
    def forward(ctx, x, mat: FrozenMatrix, targets, dtype, tok_chunk, voc_chunk):
        n, C = x.shape
        V = mat.out_features
        need = ctx.needs_input_grad[0]
        xm = x.detach().to(dtype)
        f32 = dict(dtype=torch.float32, device=x.device)
        m = torch.full((n,), -math.inf, **f32)
        se = torch.zeros(n, **f32)
        zt = torch.zeros(n, **f32)
        acc = torch.zeros(n, C, **f32) if need else None
        for v0 in range(0, V, voc_chunk):
            v1 = min(V, v0 + voc_chunk)
            W = mat.rows(v0, v1, dtype)                                           # (vc, C)
            for s in range(0, n, tok_chunk):
                e = min(n, s + tok_chunk)
                z = (xm[s:e] @ W.t()).float()                                     # (nc, vc)
                m_new = torch.maximum(m[s:e], z.max(-1).values)
                scale = torch.exp(m[s:e] - m_new)
                p = torch.exp(z - m_new[:, None])
                se[s:e] = se[s:e] * scale + p.sum(-1)
                if need:
                    acc[s:e] = acc[s:e] * scale[:, None] + (p.to(dtype) @ W).float()
                t = targets[s:e]
                hit = (t >= v0) & (t < v1)
                if bool(hit.any()):
                    zt[s:e] = torch.where(hit, z.gather(1, (t - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(1),
                                          zt[s:e])
                m[s:e] = m_new
        logp = zt - (m + se.log())
        if need:
            J = mat.take(targets, dtype).float() - acc / se[:, None]
            ctx.save_for_backward(J)
            ctx.in_dtype = x.dtype
        return logp

    @staticmethod
    def backward(ctx, g):
        (J,) = ctx.saved_tensors
        return (g[:, None] * J).to(ctx.in_dtype), None, None, None, None, None


def head_logprobs(x: torch.Tensor, head: FrozenLinear, targets: torch.Tensor, tok_chunk: int = 256,
                  voc_chunk: int = 0) -> torch.Tensor:
    """x (B, T, C), targets (B, T) -> log p(target) (B, T) float32, through the frozen head."""
    B, T, C = x.shape
    dt = _compute_dtype(x)
    vc = voc_chunk or max(256, (1 << 20) // C)   # ~4 MB of fp32 head rows per chunk
    with torch.autocast(device_type=x.device.type, enabled=False):
        lp = _HeadLogProb.apply(x.reshape(B * T, C), head.mat, targets.reshape(-1), dt, tok_chunk, vc)
    return lp.view(B, T)
