"""The emission context of the TVM lowering: one Relax BlockBuilder, the cache of kernels (one per shape),
the weights of the function being built, and the calls of the dense-path kernels that every weight kind
and the block use."""
from __future__ import annotations

from typing import Callable

from rwkvc import ir

from .base import F32, KernelShape, relax, te, tirx
from .kernels import dense_kernel, int8_kernel, nbit_kernel, quantize_act_te, wkv4_kernel, wkv5_kernel, wkv7_kernel


class Ctx:
    """One BlockBuilder, the kernel cache, and the arguments of the function being built."""

    def __init__(self, bb, ks: KernelShape, cfg: ir.ModelConfig):
        self.bb, self.ks, self.cfg = bb, ks, cfg
        self.kernels: dict[tuple, object] = {}
        self.W: dict[str, object] = {}     # relative parameter name -> relax expr, for the current function
        self.quantized: list = []          # (x, (codes, scale)): activations already quantised in this function
        self.tokens = None                 # the layer function's tokens (T,) int64, where it takes them (RWKV-7a)

    def emit(self, expr):
        return self.bb.emit(expr)

    def kernel(self, key: tuple, make: Callable):
        if key not in self.kernels:
            func = make()
            self.kernels[key] = self.bb.add_func(func, func.attrs["global_symbol"])
        return self.kernels[key]

    def rows_of(self, x):
        return x.ty.shape[0]

    def is_decode(self, x) -> bool:
        T = self.rows_of(x)
        return isinstance(T, tirx.IntImm) and int(T) == 1

    def _slice(self, y, n: int, out: int):
        return y if n == out else self.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[out]))

    def dense(self, x, wp, out: int):
        """x (T, K) @ packed wp (NB, K, P) -> (T, out)."""
        K = int(x.ty.shape[1])
        NB, K2, P = (int(d) for d in wp.ty.shape)
        assert K == K2, (K, K2)
        decode = self.is_decode(x)
        wd = str(wp.ty.dtype)
        gv = self.kernel(("dense", K, NB, P, decode, wd), lambda: dense_kernel(K, NB, P, self.ks.rows, decode, wd))
        y = self.emit(relax.call_tir(gv, [x, wp], relax.TensorType([self.rows_of(x), NB * P], F32)))
        return self._slice(y, NB * P, out)

    def quantize(self, x):
        """(codes - zero int16 (T, K), scale (1,)) of x: one DynamicQuantizeLinear per distinct input."""
        for v, q in self.quantized:
            if v.same_as(x):
                return q
        out = self.bb.emit_te(quantize_act_te, x, primfunc_name_hint="quantize_act")
        q = (self.emit(relax.TupleGetItem(out, 0)), self.emit(relax.TupleGetItem(out, 1)))
        self.quantized.append((x, q))
        return q

    def int8(self, x, q, scale, out: int):
        """x (T, K) float32 @ int8 panels q (NB, K, P) with per-channel scale (NB*P,) -> (T, out)."""
        xc, xs = self.quantize(x)
        K = int(x.ty.shape[1])
        NB, _, P = (int(d) for d in q.ty.shape)
        decode = self.is_decode(x)
        gv = self.kernel(("int8", K, NB, P, decode), lambda: int8_kernel(K, NB, P, self.ks.rows, decode))
        y = self.emit(relax.call_tir(gv, [xc, q, xs, scale], relax.TensorType([self.rows_of(x), NB * P], F32)))
        return self._slice(y, NB * P, out)

    def pad_cols(self, x, K: int):
        """x (T, k) -> (T, K) with zero columns appended (for kernels that read K in whole groups)."""
        k = int(x.ty.shape[1])
        if k == K:
            return x
        return self.bb.emit_te(lambda x: te.compute((x.shape[0], K), lambda t, j: tirx.if_then_else(
            j < k, x[t, tirx.min(j, k - 1)], tirx.const(0, F32)), name="pad_cols"), x, primfunc_name_hint="pad_cols")

    def nbit(self, x, codes, out: int, bits: int, group: int | None = None, scales=None, zeros=None,
             const_scale: float = 1.0):
        """x (T, k) @ dequant(`bits`-bit code panels (NB, K*bits/8, P)).T -> (T, out); see nbit_kernel."""
        NB, KB, P = (int(d) for d in codes.ty.shape)
        K = KB * (8 // bits)
        x = self.pad_cols(x, K)
        decode = self.is_decode(x)
        key = ("nbit", K, NB, P, decode, bits, group, None if group else const_scale)
        gv = self.kernel(key, lambda: nbit_kernel(K, NB, P, self.ks.rows, decode, bits, group, const_scale))
        args = [x, codes] + ([scales, zeros] if group is not None else [])
        y = self.emit(relax.call_tir(gv, args, relax.TensorType([self.rows_of(x), NB * P], F32)))
        return self._slice(y, NB * P, out)

    def wkv7(self, S, **v):
        H, N = self.cfg.n_head, self.cfg.head_size
        T = self.rows_of(v["r"])
        gv = self.kernel(("wkv7", H, N), lambda: wkv7_kernel(H, N, self.ks.lanes))
        args = [self.emit(relax.op.reshape(v[n], [T, H, N])) for n in ("r", "w", "k", "v", "a", "b")]
        out = self.emit(relax.call_tir(gv, args + [S], [relax.TensorType([H, N, N], F32),
                                                         relax.TensorType([T, H, N], F32)]))
        S2 = self.emit(relax.TupleGetItem(out, 0))
        y = self.emit(relax.op.reshape(self.emit(relax.TupleGetItem(out, 1)), [T, H * N]))
        return y, S2

    def wkv5(self, S, r, w, k, v):
        """RWKV-5/6's recurrence (no bonus): r, w, k, v (T, C), S (H, N, N) -> y (T, C), S'."""
        H, N = self.cfg.n_head, self.cfg.head_size
        T = self.rows_of(r)
        gv = self.kernel(("wkv5", H, N), lambda: wkv5_kernel(H, N, self.ks.lanes))
        args = [self.emit(relax.op.reshape(a, [T, H, N])) for a in (r, w, k, v)]
        out = self.emit(relax.call_tir(gv, args + [S], [relax.TensorType([H, N, N], F32),
                                                         relax.TensorType([T, H, N], F32)]))
        y = self.emit(relax.op.reshape(self.emit(relax.TupleGetItem(out, 1)), [T, H * N]))
        return y, self.emit(relax.TupleGetItem(out, 0))

    def wkv4(self, S, k, v, w, u):
        """RWKV-4's recurrence: k, v (T, C), w, u (C,), S (3, C) -> y (T, C), S'."""
        C, T = self.cfg.n_embd, self.rows_of(k)
        gv = self.kernel(("wkv4", C), lambda: wkv4_kernel(C))
        out = self.emit(relax.call_tir(gv, [k, v, w, u, S], [relax.TensorType([3, C], F32),
                                                              relax.TensorType([T, C], F32)]))
        return self.emit(relax.TupleGetItem(out, 1)), self.emit(relax.TupleGetItem(out, 0))
