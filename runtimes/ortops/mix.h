// The element-wise fused ops of the RWKV-7 step and prefill:
//   Rwkv7Mix1 / Rwkv7Mix6(x, dx, ln.weight, ln.bias, prev, mix (M, C))  attr eps  (mix_compute)
//       -> s = x + dx, n = LayerNorm(s), n + (shift(n) - n) * mix[m] for each of the M rows (2 + M outputs;
//          x is (T, C): shift(n) is n one row back, its first row prev); M = 1 for the channel-mix, 6 for the
//          time-mix
//   ReluSquare(x) -> max(x, 0)^2  (relu_square_compute)
#pragma once
#include "common.h"

namespace {

void layer_norm(const float* x, const float* w, const float* b, float eps, int64_t n, float* out) {
  float mean = 0;
#pragma omp simd reduction(+ : mean)
  for (int64_t i = 0; i < n; ++i) mean += x[i];
  mean /= n;
  float var = 0;
#pragma omp simd reduction(+ : var)
  for (int64_t i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
  var /= n;
  const float inv = 1.0f / std::sqrt(var + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = (x[i] - mean) * inv * w[i] + b[i];
}

// Rows t = 0..T-1 of x (T, C) plus dx (T, C, or one row broadcast): s = x + dx, n = LayerNorm(s) per row,
// and for each mix row m: n_t + (n_{t-1} - n_t) * mix[m], with n_{-1} = prev (the token shift).
void mix_compute(const Attrs& at, OrtKernelContext* ctx) {
  Tensor x = input(ctx, 0), dx = input(ctx, 1), lw = input(ctx, 2), lb = input(ctx, 3), prev = input(ctx, 4),
         mix = input(ctx, 5);
  const int64_t C = lw.size, M = mix.size / C, T = x.size / C, dstride = dx.size == C ? 0 : C;
  const int64_t dims[2] = {T, C};
  float* s = output(ctx, 0, dims, 2);
  float* n = output(ctx, 1, dims, 2);
  float* o[8];
  for (int64_t m = 0; m < M && m < 8; ++m) o[m] = output(ctx, 2 + m, dims, 2);
  for (int64_t t = 0; t < T; ++t) {
    float* st = s + t * C;
    float* nt = n + t * C;
    const float* xt = x.data + t * C;
    const float* dt = dx.data + t * dstride;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) st[c] = xt[c] + dt[c];
    layer_norm(st, lw.data, lb.data, at.eps, C, nt);
    const float* pv = t == 0 ? prev.data : nt - C;
    for (int64_t m = 0; m < M && m < 8; ++m) {
      float* om = o[m] + t * C;
      const float* mm = mix.data + m * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) om[c] = nt[c] + (pv[c] - nt[c]) * mm[c];
    }
  }
}

void relu_square_compute(const Attrs&, OrtKernelContext* ctx) {
  Tensor x = input(ctx, 0);
  float* out = output(ctx, 0, x.dims, x.rank);
  for (int64_t i = 0; i < x.size; ++i) {
    const float t = x.data[i] > 0 ? x.data[i] : 0.0f;
    out[i] = t * t;
  }
}

}  // namespace
