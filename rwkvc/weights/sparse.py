"""`sparse`: the activation-sparsity predictors of a channel-mix (RWKV-Lite), and the packed layouts of
their key codes.

    pack_codes(codes, bits)   (F, C) codes of up to `bits` bits -> (F, ceil(C bits / 8)) bytes, little-endian
    pack_codes16(codes)       1-bit codes of 16 rows together, byte position by byte position
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """(F, C) codes of up to `bits` bits -> (F, ceil(C bits / 8)) uint8, `bits` (1, 2, 4 or 8) a code,
    little-endian within each byte: the Rwkv7SparseFfn kernel's layout."""
    F, C = codes.shape
    per = 8 // bits
    c = np.zeros((F, -(-C // per) * per), np.uint8)
    c[:, :C] = codes
    c = c.reshape(F, -1, per)
    out = np.zeros(c.shape[:2], np.uint8)
    for j in range(per):
        out |= (c[..., j] << (bits * j)).astype(np.uint8)
    return out


def pack_codes16(codes: np.ndarray) -> np.ndarray:
    """(F, C) 1-bit codes -> (ceil(F / 16), ceil(C / 8), 16) uint8: pack_codes' bytes of 16 rows together,
    byte position by byte position (the rows padded to whole 16s with zeros): Rwkv7SparseFfnQ's layout,
    where one vector load holds 16 rows' codes of 8 channels."""
    b = pack_codes(codes, 1)
    F, rb = b.shape
    G = -(-F // 16)
    out = np.zeros((G * 16, rb), np.uint8)
    out[:F] = b
    return np.ascontiguousarray(out.reshape(G, 16, rb).transpose(0, 2, 1))


@dataclass
class SparseFFN:
    """Activation sparsity of a channel-mix (RWKV-Lite): per token, predict which of the F hidden units
    fire and compute only those rows of `key` and columns of `value`.

    With xk (C,) the token-shifted input of `key`:
        mlp   = sigmoid(fc2 @ relu(fc1 @ xk)) > mlp_threshold                       (F,)  if fc1 is set
        q     = q_scale * (q_codes @ xk) + q_zero * sum(xk)                          (F,)  if q_codes is set
        quant = q > quantile(q, q_quantile)     (linear interpolation, as torch.quantile)
        active = mlp | quant
        h = relu(key @ xk)^2 where active, 0 elsewhere;   y = value @ h
    q_codes are the `key` weight quantised to q_bits (RWKV-Lite: 1 bit, one scale and zero point for the
    whole matrix), so q approximates key @ xk. A unit the predictors miss is dropped: lossy by design.
    fc1_scale / fc2_scale: the MLP predictor stored in int8 (the sparse-ffn pass's default): fc1 and fc2 are then
    exactly int8 codes times one float32 scale per output row (fc1_scale (D,), fc2_scale (F,)), the values
    every consumer computes with; a target may store the codes and scales instead.
    """
    fc1: np.ndarray | None = None          # (D, C) MLP predictor, first layer
    fc2: np.ndarray | None = None          # (F, D)
    fc1_scale: np.ndarray | None = None    # (D,) with fc2_scale: fc1 = int8 codes * fc1_scale[:, None]
    fc2_scale: np.ndarray | None = None    # (F,)
    mlp_threshold: float = 0.7
    q_codes: np.ndarray | None = None      # (F, C) uint8 codes in [0, 2^q_bits)
    q_scale: float = 1.0
    q_zero: float = 0.0
    q_bits: int = 1
    q_quantile: float = 0.95

    def __post_init__(self):
        if (self.fc1 is None) != (self.fc2 is None):
            raise ValueError("SparseFFN needs both fc1 and fc2 (or neither)")
        if self.fc1 is None and self.q_codes is None:
            raise ValueError("SparseFFN needs at least one predictor (fc1/fc2 or q_codes)")
        if self.fc1 is not None and self.fc1.shape[0] != self.fc2.shape[1]:
            raise ValueError(f"SparseFFN: fc1 {self.fc1.shape} and fc2 {self.fc2.shape} disagree on the hidden width")
        if not (0.0 <= self.q_quantile <= 1.0):
            raise ValueError(f"SparseFFN.q_quantile must be in [0, 1], got {self.q_quantile}")
        if (self.fc1_scale is None) != (self.fc2_scale is None) or (self.fc1_scale is not None and self.fc1 is None):
            raise ValueError("SparseFFN: an int8 MLP predictor needs fc1, fc2 and both scales")
        if self.fc1_scale is not None and (self.fc1_scale.shape != self.fc1.shape[:1] or self.fc2_scale.shape != self.fc2.shape[:1]):
            raise ValueError(f"SparseFFN: scales {self.fc1_scale.shape}/{self.fc2_scale.shape} do not match fc1 "
                             f"{self.fc1.shape}/fc2 {self.fc2.shape}")

    def fc_codes(self) -> tuple[np.ndarray, np.ndarray]:
        """An int8 MLP predictor's codes: fc1 / fc1_scale, fc2 / fc2_scale (exact), int8."""
        return tuple(np.rint(np.asarray(w, np.float32) / np.where(sc == 0, 1, sc)[:, None]).astype(np.int8)
                     for w, sc in ((self.fc1, self.fc1_scale), (self.fc2, self.fc2_scale)))

    @staticmethod
    def code_bytes(F: int, C: int, bits: int) -> int:
        """The key copy's codes as a target stores them: each of F rows' C codes packed to `bits`."""
        return F * -(-C * bits // 8)

    def stored_bytes(self) -> int:
        """What a target stores of the predictors: an int8 MLP as codes and scales, key codes packed to
        q_bits (the fused kernels' layout)."""
        n = 0
        if self.fc1_scale is not None:
            n += self.fc1.size + self.fc2.size + 4 * (self.fc1_scale.size + self.fc2_scale.size)
        elif self.fc1 is not None:
            n += 4 * (self.fc1.size + self.fc2.size)
        if self.q_codes is not None:
            n += self.code_bytes(*self.q_codes.shape, self.q_bits)
        return n

    def arrays(self) -> dict[str, np.ndarray]:
        d = {}
        if self.fc1 is not None:
            d["fc1"], d["fc2"] = self.fc1, self.fc2
        if self.fc1_scale is not None:
            d["fc1_scale"], d["fc2_scale"] = self.fc1_scale, self.fc2_scale
        if self.q_codes is not None:
            d["q_codes"] = self.q_codes
        return d

    def describe(self) -> str:
        parts = []
        if self.fc1 is not None:
            parts.append(f"{'int8 ' if self.fc1_scale is not None else ''}mlp predictor "
                         f"{self.fc1.shape[1]}->{self.fc1.shape[0]}->{self.fc2.shape[0]} > {self.mlp_threshold}")
        if self.q_codes is not None:
            parts.append(f"{self.q_bits}-bit key predictor top {1 - self.q_quantile:.0%}")
        return "sparse ffn: " + " | ".join(parts)
