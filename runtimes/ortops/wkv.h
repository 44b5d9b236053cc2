// The RWKV-7 recurrence (WKV), heads split over the intra-op threads:
//   Rwkv7WkvStep(r, w, k, v, a, vg, v_first, g, S (H, N, N), w0, a0, v0, k_k, k_a, r_k, ln_x.weight,
//                ln_x.bias)  attrs eps, first  (wkv_compute)
//       -> y (1, C): the step's time-mix output before its output projection, S' (H, N, N)
//   Rwkv7WkvSeq(r, logw, k, v, a, b (T, C), S (H, N, N)) -> y (T, C), S'  (wkv_seq_compute): a prefill's
//       recurrence, token by token
//   Rwkv7WkvPrefill(r, w, k, v, a, vg, v_first, g (T, C), S, then Rwkv7WkvStep's vectors)  attrs eps, first
//       (wkv_prefill_compute) -> y (T, C), S': Rwkv7WkvStep token by token (the prefill's whole time-mix
//       between its projections, one node a layer instead of ~50 element-wise ones)
// Heads hold at most 256 channels (the ONNX lowering emits these ops only for such models).
#pragma once
#include "common.h"

namespace {

const float kDecayScale = 0.60653065971263342f;   // exp(-0.5): w = exp(-exp(-0.5) * sigmoid(w_raw))

// One head of the RWKV-7 recurrence and its output, all vectors of length N (this head's slice).
//   S' = S diag(decay) + (S a) b^T + v k^T;  y = S' r;  out = (GroupNorm(y) * lnw + lnb + v * (k . (r*r_k))) * g
// N is a template argument for the usual head sizes, so the row loops unroll completely. `next` (or null): the
// state the caller reads next (the next head's), whose rows are prefetched while this head's are updated, so
// that its first pass does not wait on memory (the batched step reads its B states once a step, from memory:
// 1.02-1.04x its speed at 8 streams of the 0.1B int4 on the Zen 4, interleaved in one process).
template <int64_t NT>
void wkv7_head(const float* S, float* S2, const float* next, int64_t n, const float* r, const float* decay, const float* k,
               const float* v, const float* a, const float* b, const float* r_k, const float* lnw,
               const float* lnb, const float* g, float eps, float* out) {
  const int64_t N = NT ? NT : n;
  float y[256], sa[256];
  int64_t i0 = 0;
#ifdef __AVX512F__
  if (NT && NT % 16 == 0) {   // 16 rows at a time, their dot products' lanes summed together (no reduction a row)
    for (; i0 < N; i0 += 16) {
      __m512 acc[16];
      for (int64_t i = 0; i < 16; ++i) {
        const float* Si = S + (i0 + i) * N;
        __m512 t = _mm512_setzero_ps();
        for (int64_t j = 0; j < N; j += 16) t = _mm512_fmadd_ps(_mm512_loadu_ps(Si + j), _mm512_loadu_ps(a + j), t);
        acc[i] = t;
      }
      _mm512_storeu_ps(sa + i0, lane_sums16(acc, 0));
    }
    for (i0 = 0; i0 < N; i0 += 16) {
      __m512 acc[16];
      for (int64_t i = 0; i < 16; ++i) {
        const float* Si = S + (i0 + i) * N;
        float* S2i = S2 + (i0 + i) * N;
        const __m512 vi = _mm512_set1_ps(v[i0 + i]), sai = _mm512_set1_ps(sa[i0 + i]);
        if (next)
          for (int64_t j = 0; j < N; j += 16) __builtin_prefetch(next + (i0 + i) * N + j, 0, 3);
        __m512 t = _mm512_setzero_ps();
        for (int64_t j = 0; j < N; j += 16) {
          const __m512 s = _mm512_fmadd_ps(vi, _mm512_loadu_ps(k + j),
                                           _mm512_fmadd_ps(sai, _mm512_loadu_ps(b + j),
                                                           _mm512_mul_ps(_mm512_loadu_ps(Si + j), _mm512_loadu_ps(decay + j))));
          _mm512_storeu_ps(S2i + j, s);
          t = _mm512_fmadd_ps(s, _mm512_loadu_ps(r + j), t);
        }
        acc[i] = t;
      }
      _mm512_storeu_ps(y + i0, lane_sums16(acc, 0));
    }
  }
#endif
  // two passes over the rows, each of independent dot products (the out-of-order core overlaps them)
  for (int64_t i = i0; i < N; ++i) {
    const float* Si = S + i * N;
    float acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < N; ++j) acc += Si[j] * a[j];
    sa[i] = acc;
  }
  for (int64_t i = i0; i < N; ++i) {
    const float* Si = S + i * N;
    float* S2i = S2 + i * N;
    const float vi = v[i], sai = sa[i];
    if (next)
      for (int64_t j = 0; j < N; j += 16) __builtin_prefetch(next + i * N + j, 0, 3);
    float yi = 0;
#pragma omp simd reduction(+ : yi)
    for (int64_t j = 0; j < N; ++j) {
      const float s = Si[j] * decay[j] + sai * b[j] + vi * k[j];
      S2i[j] = s;
      yi += s * r[j];
    }
    y[i] = yi;
  }
  float mean = 0, var = 0, rk = 0;
#pragma omp simd reduction(+ : mean, rk)
  for (int64_t i = 0; i < N; ++i) {
    mean += y[i];
    rk += k[i] * r[i] * r_k[i];
  }
  mean /= N;
#pragma omp simd reduction(+ : var)
  for (int64_t i = 0; i < N; ++i) var += (y[i] - mean) * (y[i] - mean);
  var /= N;
  const float inv = 1.0f / std::sqrt(var + eps);
  for (int64_t i = 0; i < N; ++i) out[i] = ((y[i] - mean) * inv * lnw[i] + lnb[i] + v[i] * rk) * g[i];
}

using HeadFn = void (*)(const float*, float*, const float*, int64_t, const float*, const float*, const float*, const float*,
                        const float*, const float*, const float*, const float*, const float*, const float*, float,
                        float*);

HeadFn head_kernel(int64_t N) {
  return N == 64 ? wkv7_head<64> : N == 32 ? wkv7_head<32> : N == 128 ? wkv7_head<128> : wkv7_head<0>;
}

struct WkvArgs {
  const float *r, *w, *k, *v, *a, *vg, *vf, *g, *S, *w0, *a0, *v0, *k_k, *k_a, *r_k, *lnw, *lnb;
  float* y;
  float* S2;
  int64_t N;
  float eps;
  bool first;
};

// head h of one token: the decay, normalised key and value residual from the projections, then the
// recurrence from the head's state S to S2 (which may be S: wkv7_head reads a row before writing it); `next`
// as wkv7_head's
inline void wkv_step_head(const WkvArgs& p, int64_t h, HeadFn head, const float* S, float* S2,
                          const float* next = nullptr) {
  const int64_t N = p.N;
  float decay[256], kk[256], kn[256], aa[256], bb[256], vv[256];
  const int64_t o = h * N;
  // the head's slices as plain pointers (indexing p's members by o + j made the loops gathers)
  const float *__restrict w = p.w + o, *__restrict w0 = p.w0 + o, *__restrict k = p.k + o, *__restrict k_k = p.k_k + o,
              *__restrict a = p.a + o, *__restrict a0 = p.a0 + o, *__restrict k_a = p.k_a + o, *__restrict v = p.v + o;
  float norm = 0;
#pragma omp simd reduction(+ : norm)
  for (int64_t j = 0; j < N; ++j) {
    decay[j] = fast_exp(-kDecayScale * sigmoid(w[j] + w0[j]));
    kk[j] = k[j] * k_k[j];
    norm += kk[j] * kk[j];
  }
  norm = std::sqrt(norm);
  const float scale = 1.0f / (norm > 1e-12f ? norm : 1e-12f);
#pragma omp simd
  for (int64_t j = 0; j < N; ++j) {
    const float iclr = sigmoid(a0[j] + a[j]);
    const float kkj = kk[j] * scale;
    aa[j] = -kkj;
    bb[j] = kkj * iclr;
    kn[j] = k[j] * ((1.0f - k_a[j]) + iclr * k_a[j]);
  }
  if (p.first) {
    for (int64_t j = 0; j < N; ++j) vv[j] = v[j];
  } else {
    const float *__restrict vf = p.vf + o, *__restrict v0 = p.v0 + o, *__restrict vg = p.vg + o;
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) vv[j] = v[j] + (vf[j] - v[j]) * sigmoid(v0[j] + vg[j]);
  }
  head(S, S2, next, N, p.r + o, decay, kn, vv, aa, bb, p.r_k + o, p.lnw + o, p.lnb + o, p.g + o, p.eps, p.y + o);
}

// heads h0 .. h1 of the step, each prefetching the next one's state (`after` after the last, or null)
void wkv_heads(const WkvArgs& p, int64_t h0, int64_t h1, const float* after = nullptr) {
  const int64_t NN = p.N * p.N;
  const HeadFn head = head_kernel(p.N);
  for (int64_t h = h0; h < h1; ++h)
    wkv_step_head(p, h, head, p.S + h * NN, p.S2 + h * NN, h + 1 < h1 ? p.S + (h + 1) * NN : after);
}

// Rwkv7WkvStep's and Rwkv7WkvPrefill's inputs and outputs (T: the rows of r, 1 in a step)
WkvArgs wkv_args(const Attrs& at, OrtKernelContext* ctx, int64_t& H, int64_t& T) {
  Tensor in[17];
  for (size_t i = 0; i < 17; ++i) in[i] = input(ctx, i);
  const Tensor& S = in[8];
  H = S.dims[0];
  const int64_t N = S.dims[1], C = H * N;
  T = in[0].size / std::max<int64_t>(1, C);
  const int64_t rows[2] = {T, C};
  float* y = output(ctx, 0, rows, 2);
  float* S2 = output(ctx, 1, S.dims, 3);
  return WkvArgs{in[0].data, in[1].data, in[2].data, in[3].data, in[4].data, in[5].data, in[6].data, in[7].data,
                 S.data, in[9].data, in[10].data, in[11].data, in[12].data, in[13].data, in[14].data, in[15].data,
                 in[16].data, y, S2, N, at.eps, at.first != 0};
}

void wkv_compute(const Attrs& at, OrtKernelContext* ctx) {
  int64_t H, T;
  const WkvArgs p = wkv_args(at, ctx, H, T);
  const int64_t N = p.N;
  if (N > 256) return;   // rwkvc.targets.onnx.v7_fused.fused_supported: heads of at most FUSED_MAX_HEAD = 256
  // heads over the intra-op threads once the state is big enough to pay for waking them (a 0.1B-shaped
  // layer's 12 heads of 64 take ~20 us)
  parallel_ranges(ctx, H, std::max<int64_t>(1, (int64_t(1) << 14) / (N * N)),
                  [&](int64_t h0, int64_t h1) { wkv_heads(p, h0, h1); });
}

// Rwkv7WkvPrefill: each head's state copied to a local buffer (it stays in L1 over the tokens; S2 may be S),
// its tokens in order as Rwkv7WkvStep computes them, heads over the intra-op threads
void wkv_prefill_compute(const Attrs& at, OrtKernelContext* ctx) {
  int64_t H, T;
  const WkvArgs p = wkv_args(at, ctx, H, T);
  const int64_t N = p.N, NN = N * N, C = H * N;
  if (N > 256) return;   // as above
  parallel_ranges(ctx, H, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> buf(NN);
    const HeadFn head = head_kernel(N);
    for (int64_t h = h0; h < h1; ++h) {
      std::copy(p.S + h * NN, p.S + (h + 1) * NN, buf.data());
      WkvArgs q = p;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t o = t * C;
        q.r = p.r + o, q.w = p.w + o, q.k = p.k + o, q.v = p.v + o, q.a = p.a + o, q.vg = p.vg + o;
        q.vf = p.vf + o, q.g = p.g + o, q.y = p.y + o;
        wkv_step_head(q, h, head, buf.data(), buf.data());
      }
      std::copy(buf.begin(), buf.end(), p.S2 + h * NN);
    }
  });
}

// The recurrence over T tokens for one head, on the transposed state Z = S^T held in a local buffer:
// every product is then a sum of scaled rows of Z (no horizontal reductions), and Z stays in L1.
//   sa = sum_j a_j Z_j;  Z_j <- w_j Z_j + b_j sa + k_j v;  y = sum_j r_j Z_j      (rows Z_j of length N)
template <int64_t NT>
void wkv7_seq_head(float* Z, int64_t n, int64_t T, int64_t C, const float* r, const float* logw, const float* k,
                   const float* v, const float* a, const float* b, float* y) {
  const int64_t N = NT ? NT : n;
  float sa[256], acc[256], w[256];
  for (int64_t t = 0; t < T; ++t) {
    const int64_t o = t * C;
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) w[j] = fast_exp(logw[o + j]);
    for (int64_t i = 0; i < N; ++i) sa[i] = 0, acc[i] = 0;
    for (int64_t j = 0; j < N; ++j) {
      const float aj = a[o + j];
      const float* Zj = Z + j * N;
#pragma omp simd
      for (int64_t i = 0; i < N; ++i) sa[i] += aj * Zj[i];
    }
    const float* vt = v + o;
    for (int64_t j = 0; j < N; ++j) {
      const float wj = w[j], bj = b[o + j], kj = k[o + j], rj = r[o + j];
      float* Zj = Z + j * N;
#pragma omp simd
      for (int64_t i = 0; i < N; ++i) {
        const float z = Zj[i] * wj + sa[i] * bj + vt[i] * kj;
        Zj[i] = z;
        acc[i] += z * rj;
      }
    }
    for (int64_t i = 0; i < N; ++i) y[o + i] = acc[i];
  }
}


// Rwkv7WkvSeq(r, logw, k, v, a, b (T, C), S (H, N, N)) -> y (T, C), S' (H, N, N): the prefill's WKV,
// token by token (the exact recurrence), heads split over the intra-op pool (parallel_ranges).
void wkv_seq_compute(const Attrs&, OrtKernelContext* ctx) {
  Tensor in[7];
  for (size_t i = 0; i < 7; ++i) in[i] = input(ctx, i);
  const Tensor& S = in[6];
  const int64_t H = S.dims[0], N = S.dims[1], C = H * N, T = in[0].size / C;
  const int64_t ydims[2] = {T, C};
  float* y = output(ctx, 0, ydims, 2);
  float* S2 = output(ctx, 1, S.dims, 3);
  if (N > 256) return;   // as above
  auto run = [&](int64_t h0, int64_t h1) {
    std::vector<float> buf(N * N);
    float* Z = buf.data();
    for (int64_t h = h0; h < h1; ++h) {
      const float* Sh = S.data + h * N * N;
      for (int64_t i = 0; i < N; ++i)
        for (int64_t j = 0; j < N; ++j) Z[j * N + i] = Sh[i * N + j];
      const int64_t o = h * N;
      auto fn = N == 64 ? wkv7_seq_head<64> : N == 32 ? wkv7_seq_head<32> : wkv7_seq_head<0>;
      fn(Z, N, T, C, in[0].data + o, in[1].data + o, in[2].data + o, in[3].data + o, in[4].data + o,
         in[5].data + o, y + o);
      float* S2h = S2 + h * N * N;
      for (int64_t i = 0; i < N; ++i)
        for (int64_t j = 0; j < N; ++j) S2h[i * N + j] = Z[j * N + i];
    }
  };
  parallel_ranges(ctx, H, 1, run);   // heads over the intra-op threads
}

}  // namespace
