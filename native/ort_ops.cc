// rwkvc's fused CPU kernels for ONNX Runtime (custom-op domain "ai.rwkvc", version 2).
//
// The cpu target's one-token step graph of an RWKV-7 model would otherwise run ~70 ONNX Runtime kernels a
// layer, most of them element-wise work on one 768-wide row that costs less than the executor's ~2.5 us
// per kernel. These ops fold that work into four kernels a layer, and serve the prefill too; the matrix
// products stay ONNX Runtime's own (MatMul, MatMulNBits, ...):
//
//   Rwkv7Mix(x, dx, ln.weight, ln.bias, prev, mix (M, C))  attr eps
//       -> s = x + dx, n = LayerNorm(s), n + (shift(n) - n) * mix[m] for each of the M rows (2 + M outputs;
//          x is (T, C): shift(n) is n one row back, its first row prev)
//   Rwkv7WkvStep(r, w, k, v, a, vg, v_first, g, S (H, N, N), w0, a0, v0, k_k, k_a, r_k, ln_x.weight,
//                ln_x.bias)  attrs eps, first
//       -> y (1, C): the time-mix's output before its output projection, S' (H, N, N)
//   ReluSquare(x) -> max(x, 0)^2
//   Rwkv7WkvSeq(r, logw, k, v, a, b (T, C), S (H, N, N)) -> y (T, C), S': the prefill's recurrence
//
// Version 2 adds the compression passes' per-token bookkeeping for the step graph (one token), each
// reading only the rows it uses, straight from the memory-mapped initializers:
//   Rwkv7SparseFfn / Rwkv7SparseFfnF32(xk (1, C), fc1T (C, D), fc2T (D, F), codes (F, bytes), key rows
//       (F, C), key scale (F,), value rows Vᵀ (F, C), value scale (C,))  attrs mlp_threshold, q_scale,
//       q_lo, q_bits -> the FFN output (1, C) computed over the units the predictors pick (int8 rows with
//       per-row / per-output scales and 8-bit activations as the plain graph has them, or float32 rows
//       with empty scales)
//   Rwkv7ClusteredHead / Rwkv7ClusteredHeadF32(x (1, C), cluster logits (K,), rows (V, C), row scale (V,),
//       bounds (K + 1,), row token (V,), token cluster (V,) uint16, token log q (V,) or empty)
//       attrs top_p, min_k, max_k -> logits (1, V): RWKV-Lite's hierarchical head
//   Rwkv7LowRankQ4(x (1, K), A packed, scales, zeros, B packed, scales, zeros)  attr act -> B act(A x), both
//       factors in MatMulNBits' 4-bit layout (svd-factored projections and the LoRAs after int4)
//
// Built by rwkvc.runtimes.ortops with the host's g++ and registered into each session from rwkvc's own
// package (never from an artifact). ort_abi.h declares the few parts of ONNX Runtime's C API it uses.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <string>
#include <thread>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "ort_abi.h"

namespace {

const OrtApi* g_api = nullptr;

// ---- the math ----------------------------------------------------------------------------------------

// exp in single precision that compilers vectorise (the libm call does not vectorise without -ffast-math):
// x = n ln2 + r with |r| <= ln2/2, e^r by a degree-7 polynomial, 2^n through the exponent bits. Relative
// error ~2e-7 over the float range; below -87.3 it returns ~1e-38 instead of going subnormal.
inline float fast_exp(float x) {
  x = x > -87.3f ? x : -87.3f;
  x = x < 88.7f ? x : 88.7f;
  // n = round(x / ln2), by truncating a positive value (floor does not vectorise without -fno-trapping-math)
  const int32_t ni = int32_t(x * 1.44269504088896341f + 128.5f) - 128;
  const float n = float(ni);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;   // ln2 split in two for an exact n*ln2
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  return e * __builtin_bit_cast(float, (ni + 127) << 23);
}

inline float sigmoid(float x) { return 1.0f / (1.0f + fast_exp(-x)); }

const float kDecayScale = 0.60653065971263342f;   // exp(-0.5): w = exp(-exp(-0.5) * sigmoid(w_raw))

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

// One head of the RWKV-7 recurrence and its output, all vectors of length N (this head's slice).
//   S' = S diag(decay) + (S a) b^T + v k^T;  y = S' r;  out = (GroupNorm(y) * lnw + lnb + v * (k . (r*r_k))) * g
// N is a template argument for the usual head sizes, so the row loops unroll completely.
template <int64_t NT>
void wkv7_head(const float* S, float* S2, int64_t n, const float* r, const float* decay, const float* k,
               const float* v, const float* a, const float* b, const float* r_k, const float* lnw,
               const float* lnb, const float* g, float eps, float* out) {
  const int64_t N = NT ? NT : n;
  float y[256], sa[256];
  // two passes over the rows, each of independent dot products (the out-of-order core overlaps them)
  for (int64_t i = 0; i < N; ++i) {
    const float* Si = S + i * N;
    float acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < N; ++j) acc += Si[j] * a[j];
    sa[i] = acc;
  }
  for (int64_t i = 0; i < N; ++i) {
    const float* Si = S + i * N;
    float* S2i = S2 + i * N;
    const float vi = v[i], sai = sa[i];
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

using HeadFn = void (*)(const float*, float*, int64_t, const float*, const float*, const float*, const float*,
                        const float*, const float*, const float*, const float*, const float*, const float*, float,
                        float*);

HeadFn head_kernel(int64_t N) {
  return N == 64 ? wkv7_head<64> : N == 32 ? wkv7_head<32> : N == 128 ? wkv7_head<128> : wkv7_head<0>;
}

// ---- ONNX Runtime plumbing -----------------------------------------------------------------------------

struct Tensor {
  const float* data = nullptr;   // the data of a float tensor; raw<T>() for other element types
  int64_t dims[4] = {0, 0, 0, 0};
  size_t rank = 0;
  int64_t size = 1;
  template <class T>
  const T* raw() const { return reinterpret_cast<const T*>(data); }
};

Tensor input(OrtKernelContext* ctx, size_t i) {
  const OrtValue* v = nullptr;
  ort::KernelContext_GetInput(g_api, ctx, i, &v);
  Tensor t;
  void* p = nullptr;
  ort::GetTensorMutableData(g_api, const_cast<OrtValue*>(v), &p);
  t.data = static_cast<const float*>(p);
  OrtTensorTypeAndShapeInfo* info = nullptr;
  ort::GetTensorTypeAndShape(g_api, v, &info);
  ort::GetDimensionsCount(g_api, info, &t.rank);
  if (t.rank > 4) t.rank = 4;
  ort::GetDimensions(g_api, info, t.dims, t.rank);
  ort::ReleaseTensorTypeAndShapeInfo(g_api, info);
  for (size_t d = 0; d < t.rank; ++d) t.size *= t.dims[d];
  return t;
}

float* output(OrtKernelContext* ctx, size_t i, const int64_t* dims, size_t rank) {
  OrtValue* v = nullptr;
  ort::KernelContext_GetOutput(g_api, ctx, i, dims, rank, &v);
  void* p = nullptr;
  ort::GetTensorMutableData(g_api, v, &p);
  return static_cast<float*>(p);
}

float float_attr(const OrtKernelInfo* info, const char* name, float dflt) {
  float v = dflt;
  OrtStatus* st = ort::KernelInfoGetAttribute_float(g_api, info, name, &v);
  if (st) ort::ReleaseStatus(g_api, st);
  return st ? dflt : v;
}

int64_t int_attr(const OrtKernelInfo* info, const char* name, int64_t dflt) {
  int64_t v = dflt;
  OrtStatus* st = ort::KernelInfoGetAttribute_int64(g_api, info, name, &v);
  if (st) ort::ReleaseStatus(g_api, st);
  return st ? dflt : v;
}

struct Attrs {
  float eps;
  int64_t first;
  float mlp_threshold, q_scale, top_p;
  int64_t q_lo, q_bits, min_k, max_k, act;
};

// ---- the kernels ---------------------------------------------------------------------------------------

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

void wkv_compute(const Attrs& at, OrtKernelContext* ctx) {
  Tensor in[17];
  for (size_t i = 0; i < 17; ++i) in[i] = input(ctx, i);
  const float *r = in[0].data, *w = in[1].data, *k = in[2].data, *v = in[3].data, *a = in[4].data,
              *vg = in[5].data, *vf = in[6].data, *g = in[7].data, *w0 = in[9].data, *a0 = in[10].data,
              *v0 = in[11].data, *k_k = in[12].data, *k_a = in[13].data, *r_k = in[14].data,
              *lnw = in[15].data, *lnb = in[16].data;
  const Tensor& S = in[8];
  const int64_t H = S.dims[0], N = S.dims[1], C = H * N;
  const int64_t row[2] = {1, C};
  float* y = output(ctx, 0, row, 2);
  float* S2 = output(ctx, 1, S.dims, 3);
  if (N > 256) return;   // emit_onnx.fused_supported: heads of at most FUSED_MAX_HEAD = 256
  const HeadFn head = head_kernel(N);
  const bool first = at.first != 0;
  float decay[256], kk[256], kn[256], aa[256], bb[256], vv[256];
  for (int64_t h = 0; h < H; ++h) {
    const int64_t o = h * N;
    float norm = 0;
#pragma omp simd reduction(+ : norm)
    for (int64_t j = 0; j < N; ++j) {
      decay[j] = fast_exp(-kDecayScale * sigmoid(w[o + j] + w0[o + j]));
      kk[j] = k[o + j] * k_k[o + j];
      norm += kk[j] * kk[j];
    }
    norm = std::sqrt(norm);
    const float scale = 1.0f / (norm > 1e-12f ? norm : 1e-12f);
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) {
      const float iclr = sigmoid(a0[o + j] + a[o + j]);
      const float kkj = kk[j] * scale;
      aa[j] = -kkj;
      bb[j] = kkj * iclr;
      kn[j] = k[o + j] * ((1.0f - k_a[o + j]) + iclr * k_a[o + j]);
    }
    if (first) {
      for (int64_t j = 0; j < N; ++j) vv[j] = v[o + j];
    } else {
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) vv[j] = v[o + j] + (vf[o + j] - v[o + j]) * sigmoid(v0[o + j] + vg[o + j]);
    }
    head(S.data + h * N * N, S2 + h * N * N, N, r + o, decay, kn, vv, aa, bb, r_k + o, lnw + o, lnb + o, g + o,
         at.eps, y + o);
  }
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

int g_threads = 1;   // set by the runtime (rwkvc_ort_ops_set_threads): the session's intra-op threads

// Rwkv7WkvSeq(r, logw, k, v, a, b (T, C), S (H, N, N)) -> y (T, C), S' (H, N, N): the prefill's WKV,
// token by token (the exact recurrence), heads split over g_threads threads.
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
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(g_threads, H));
  std::vector<std::thread> pool;
  for (int64_t p = 1; p < nt; ++p) pool.emplace_back(run, H * p / nt, H * (p + 1) / nt);
  run(0, H / nt);   // this thread: the first share
  for (auto& th : pool) th.join();
}

void relu_square_compute(const Attrs&, OrtKernelContext* ctx) {
  Tensor x = input(ctx, 0);
  float* out = output(ctx, 0, x.dims, x.rank);
  for (int64_t i = 0; i < x.size; ++i) {
    const float t = x.data[i] > 0 ? x.data[i] : 0.0f;
    out[i] = t * t;
  }
}

// ---- the compression passes' step kernels (version 2) ------------------------------------------------

#ifdef __AVX512F__
// 16 elements of a float32 / int8 / uint8 row as floats
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 load16(const uint8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#endif

// dot(x, row) for a float32 row, or an int8 / uint8 row (the caller applies its scale). Without AVX-512: 16
// partial sums, which GCC keeps in one vector register (a plain reduction loop came out as in-order scalar
// adds).
template <class W>
inline float dot_row(const float* x, const W* row, int64_t C) {
#ifdef __AVX512F__
  if (C % 16 == 0) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 32 <= C; c += 32) {
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + c), load16(row + c), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + c + 16), load16(row + c + 16), a1);
    }
    if (c < C) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + c), load16(row + c), a0);
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  }
#endif
  constexpr int64_t L = 16;
  float acc[L] = {};
  int64_t c = 0;
  for (; c + L <= C; c += L)
    for (int64_t j = 0; j < L; ++j) acc[j] += x[c + j] * float(row[c + j]);
  float s = 0;
  for (; c < C; ++c) s += x[c] * float(row[c]);
  for (int64_t j = 0; j < L; ++j) s += acc[j];
  return s;
}

// The activations the row kernels multiply rows with. Float32 rows take x as it is. Int8 rows take x as
// the plain graph does (rows_matmul_int8 / cols_matmul_int8: DynamicQuantizeLinear, MatMulInteger, then
// times x's scale * the row's scale), which the TVM targets compute too: one scale and zero point for the
// vector, uint8 codes made as ONNX Runtime makes them (range widened to 0, x / scale clamped to the codes,
// rounded half to even), an integer dot product.
template <class W>
struct Act;

template <>
struct Act<float> {
  using Acc = float;   // what a sum over rows accumulates in
  const float* x = nullptr;
  float scale = 1.0f;
  void set(const float* v, int64_t) { x = v; }
  Acc at(size_t j) const { return x[j]; }
  float dot(const float* row, int64_t C) const { return dot_row(x, row, C); }
};

template <>
struct Act<int8_t> {
  using Acc = int32_t;      // MatMulInteger's accumulator
  std::vector<int32_t> q;   // code - zero point
  float scale = 1.0f;
  void set(const float* v, int64_t n) {
    float mn = 0, mx = 0;
    for (int64_t i = 0; i < n; ++i) mn = std::min(mn, v[i]), mx = std::max(mx, v[i]);
    scale = mx == mn ? 1.0f : (mx - mn) / 255.0f;
    const float zp = std::nearbyint(std::max(0.0f, std::min(255.0f, 0.0f - mn / scale)));
    q.resize(n);
    for (int64_t i = 0; i < n; ++i) q[i] = int32_t(std::nearbyint(std::max(-zp, std::min(255.0f - zp, v[i] / scale))));
  }
  Acc at(size_t j) const { return q[j]; }
  float dot(const int8_t* row, int64_t C) const {
    int32_t acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t c = 0; c < C; ++c) acc += q[c] * int32_t(row[c]);
    return float(acc);
  }
};

// est[f] = sum_c code(f, c) * x[c] for codes packed `bits` (1, 2, 4 or 8) to a code, little-endian within
// each byte, each row padded to whole bytes. Codes of 1 or 2 bits go through a table of every byte's
// partial sum at each byte position (one add per entry to build, one lookup per byte of a row).
void code_dot(const uint8_t* codes, int64_t F, int64_t C, int64_t bits, const float* x, float* est) {
  const int64_t per = 8 / bits, rb = (C + per - 1) / per, mask = (1 << bits) - 1;
  std::vector<float> xp(rb * per + 16, 0.0f);   // x, zero-padded to whole bytes and one vector past them
  std::memcpy(xp.data(), x, C * sizeof(float));
#ifdef __AVX512F__
  if (bits == 1) {   // 16 codes are a lane mask: a masked add of 16 floats of x
    for (int64_t f = 0; f < F; ++f) {
      const uint8_t* row = codes + f * rb;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t p = 0; p < rb; p += 2) {
        const __mmask16 m = __mmask16(row[p] | (p + 1 < rb ? row[p + 1] << 8 : 0));
        acc = _mm512_mask_add_ps(acc, m, acc, _mm512_loadu_ps(xp.data() + p * 8));
      }
      est[f] = _mm512_reduce_add_ps(acc);
    }
    return;
  }
#endif
  if (bits <= 2) {
    std::vector<float> lut(rb * 256);
    for (int64_t p = 0; p < rb; ++p) {
      float* t = lut.data() + p * 256;
      const float* xs = xp.data() + p * per;
      t[0] = 0;
      for (int v = 1; v < 256; ++v) {   // drop v's lowest non-zero code: an entry already built
        const int i = __builtin_ctz(v) / bits, cv = (v >> (i * bits)) & mask;
        t[v] = t[v ^ (cv << (i * bits))] + float(cv) * xs[i];
      }
    }
    for (int64_t f = 0; f < F; ++f) {
      const uint8_t* row = codes + f * rb;
      float acc = 0;
      for (int64_t p = 0; p < rb; ++p) acc += lut[p * 256 + row[p]];
      est[f] = acc;
    }
    return;
  }
  std::vector<float> unpacked(rb * per);
  for (int64_t f = 0; f < F; ++f) {
    const uint8_t* row = codes + f * rb;
    if (bits == 8) {
      est[f] = dot_row(xp.data(), row, C);
      continue;
    }
    for (int64_t p = 0; p < rb; ++p) {
      unpacked[2 * p] = float(row[p] & 15);
      unpacked[2 * p + 1] = float(row[p] >> 4);
    }
    est[f] = dot_row(xp.data(), unpacked.data(), C);
  }
}

// Rwkv7SparseFfn(xk (1, C), fc1T (C, D), fc2T (D, F), codes (F, bytes), K (F, C), K scale (F,), Vᵀ (F, C),
// V scale (C,)) -> y (1, C). A unit f fires when the MLP predictor's sigmoid(relu(xk fc1T) fc2T)_f exceeds
// mlp_threshold, or when the quantised key's estimate q_scale * codes_f . xk exceeds the q_lo-th smallest
// estimate of this token (an absent predictor has empty tensors). Then y = sum over fired f of
// relu(xk . K_f * kscale_f)^2 * Vᵀ_f, times vscale per output channel; only the fired rows are read.
// W = int8_t: int8 rows and scales, xk and the relu squares as 8-bit activations (Act); W = float: float32
// rows, scales empty.
template <class W>
void sparse_ffn_compute(const Attrs& at, OrtKernelContext* ctx) {
  Tensor xk = input(ctx, 0), fc1 = input(ctx, 1), fc2 = input(ctx, 2), codes = input(ctx, 3), K = input(ctx, 4),
         ks = input(ctx, 5), VT = input(ctx, 6), vs = input(ctx, 7);
  const int64_t C = xk.size, F = K.dims[0];
  const int64_t ydims[2] = {1, C};
  float* y = output(ctx, 0, ydims, 2);
  std::vector<uint8_t> fire(F, 0);
  std::vector<float> buf(F);
  if (fc1.size) {   // the MLP predictor: fc1T (C, D), fc2T (D, F), both float32
    const int64_t D = fc1.size / C;
    std::vector<float> h(D, 0.0f);
    for (int64_t c = 0; c < C; ++c) {
      const float xc = xk.data[c];
      const float* r = fc1.data + c * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) h[d] += xc * r[d];
    }
    std::fill(buf.begin(), buf.end(), 0.0f);
    for (int64_t d = 0; d < D; ++d) {
      const float hd = h[d] > 0 ? h[d] : 0.0f;
      if (hd == 0) continue;
      const float* r = fc2.data + d * F;
#pragma omp simd
      for (int64_t f = 0; f < F; ++f) buf[f] += hd * r[f];
    }
    // sigmoid(l) > t  <=>  l > log(t / (1 - t)): one compare a unit, no exp
    const float t = at.mlp_threshold;
    const float lt = t <= 0 ? -INFINITY : t >= 1 ? INFINITY : std::log(t) - std::log1p(-t);
    for (int64_t f = 0; f < F; ++f) fire[f] = buf[f] > lt;
  }
  if (codes.size) {   // the quantised-key predictor
    code_dot(codes.raw<uint8_t>(), F, C, at.q_bits, xk.data, buf.data());
    for (int64_t f = 0; f < F; ++f) buf[f] *= at.q_scale;
    std::vector<float> sorted(buf);
    const int64_t lo = std::min<int64_t>(std::max<int64_t>(at.q_lo, 0), F - 1);
    std::nth_element(sorted.begin(), sorted.begin() + lo, sorted.end());
    const float thr = sorted[lo];
    for (int64_t f = 0; f < F; ++f) fire[f] |= buf[f] > thr;
  }
  const W* kr = K.raw<W>();
  const W* vr = VT.raw<W>();
  Act<W> x;
  x.set(xk.data, C);
  std::vector<int64_t> units;   // the fired units and their relu(k)^2
  std::vector<float> h;
  for (int64_t f = 0; f < F; ++f) {
    if (!fire[f]) continue;
    float k = x.dot(kr + f * C, C);
    if (ks.size) k *= x.scale * ks.data[f];
    units.push_back(f);
    h.push_back(k > 0 ? k * k : 0.0f);
  }
  Act<W> hv;   // h as the value product's activations
  hv.set(h.data(), int64_t(h.size()));
  using Acc = typename Act<W>::Acc;
  std::vector<Acc> acc(C, Acc(0));
  for (size_t j = 0; j < units.size(); ++j) {
    const Acc hj = hv.at(j);
    if (hj == 0) continue;
    const W* v = vr + units[j] * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) acc[c] += hj * Acc(v[c]);
  }
  for (int64_t c = 0; c < C; ++c) y[c] = vs.size ? float(acc[c]) * (hv.scale * vs.data[c]) : float(acc[c]);
}

// Rwkv7ClusteredHead(x (1, C), z (K,), rows (V, C), row scale (V,), bounds (K + 1,), row_token (V,),
// token_cluster (V,), token_log_q (V,) or empty) -> logits (1, V) in token order.
//   log p = log_softmax(z); clusters by descending p, the j-th chosen iff j < min_k, or j < max_k and the
//   clusters before it hold < top_p; exact logits x . row (int8 rows: x as 8-bit activations, Act) for
//   the chosen clusters' rows (rows cluster by cluster, bounds[c] .. bounds[c+1]), every other token t gets
//   approx[c(t)] + log q_t with approx = log p + logsumexp(exact) - log(sum of the chosen clusters' p),
//   log q_t the token's log prior (empty: log q = -log |c|).
template <class W>
void clustered_head_compute(const Attrs& at, OrtKernelContext* ctx) {
  Tensor x = input(ctx, 0), z = input(ctx, 1), rows = input(ctx, 2), rs = input(ctx, 3), bnd = input(ctx, 4),
         rtok = input(ctx, 5), tcl = input(ctx, 6), lq = input(ctx, 7);
  const int64_t C = x.size, K = z.size, V = rows.dims[0];
  const int64_t odims[2] = {1, V};
  float* out = output(ctx, 0, odims, 2);
  const int32_t* bounds = bnd.raw<int32_t>();
  float zmax = z.data[0];
  for (int64_t c = 1; c < K; ++c) zmax = std::max(zmax, z.data[c]);
  double zs = 0;
  for (int64_t c = 0; c < K; ++c) zs += std::exp(double(z.data[c] - zmax));
  const float lse_z = zmax + float(std::log(zs));
  std::vector<float> logp(K), prob(K);
  for (int64_t c = 0; c < K; ++c) {
    logp[c] = z.data[c] - lse_z;
    prob[c] = std::exp(logp[c]);
  }
  std::vector<int32_t> order(K);
  for (int64_t c = 0; c < K; ++c) order[c] = int32_t(c);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return prob[a] > prob[b]; });
  std::vector<int32_t> chosen;
  float mass = 0;   // of the clusters taken so far: the mass before the next rank
  for (int64_t j = 0; j < K; ++j) {
    const bool take = j < at.min_k || (j < at.max_k && mass < at.top_p);
    if (!take) break;   // the mass before a rank only grows: no later rank is taken either
    chosen.push_back(order[j]);
    mass += prob[order[j]];
  }
  std::sort(chosen.begin(), chosen.end());   // read the rows in file order
  int64_t n = 0;
  for (int32_t c : chosen) n += bounds[c + 1] - bounds[c];
  std::vector<float> exact(n);
  const W* rw = rows.raw<W>();
  Act<W> xa;
  xa.set(x.data, C);
  float emax = -INFINITY;
  int64_t e = 0;
  for (int32_t c : chosen)
    for (int64_t r = bounds[c]; r < bounds[c + 1]; ++r, ++e) {
      float v = xa.dot(rw + r * C, C);
      if (rs.size) v *= xa.scale * rs.data[r];
      exact[e] = v;
      emax = std::max(emax, v);
    }
  float lanes[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int64_t j = 0; j < 16; ++j) lanes[j] += fast_exp(exact[i + j] - emax);
  double es = 0;
  for (; i < n; ++i) es += fast_exp(exact[i] - emax);
  for (int64_t j = 0; j < 16; ++j) es += lanes[j];
  const float shift = emax + float(std::log(es)) - std::log(mass);
  std::vector<float> approx(K);
  for (int64_t c = 0; c < K; ++c) approx[c] = logp[c] + shift;
  const uint16_t* tc = tcl.raw<uint16_t>();
  if (!lq.size)
    for (int64_t c = 0; c < K; ++c) approx[c] -= std::log(float(std::max(bounds[c + 1] - bounds[c], 1)));
  int64_t t = 0;
#ifdef __AVX512F__
  for (; t + 16 <= V; t += 16) {   // 16 table lookups a gather
    const __m512i idx = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tc + t)));
    __m512 v = _mm512_i32gather_ps(idx, approx.data(), 4);
    if (lq.size) v = _mm512_add_ps(v, _mm512_loadu_ps(lq.data + t));
    _mm512_storeu_ps(out + t, v);
  }
#endif
  for (; t < V; ++t) out[t] = approx[tc[t]] + (lq.size ? lq.data[t] : 0.0f);
  const int32_t* tok = rtok.raw<int32_t>();
  e = 0;
  for (int32_t c : chosen)
    for (int64_t r = bounds[c]; r < bounds[c + 1]; ++r) out[tok[r]] = exact[e++];
}

// ---- int4 low-rank products (version 2) ------------------------------------------------------------------

// y (N,) = W x for W (N, K) in MatMulNBits' 4-bit layout: packed (N, nb, G/2) codes, element 2i of a
// block in the low nibble, scales (N, nb), zero points (N, ceil(nb/2)) 4-bit packed the same way;
// w = (code - zero) * scale. x is deinterleaved once per call (each block's even elements, then its odd
// ones) so a byte's two codes multiply two contiguous runs of x; x's per-block sums take the zero points.
void q4_gemv(const uint8_t* packed, const float* scales, const uint8_t* zeros, int64_t N, int64_t nb, int64_t G,
             const float* x, int64_t K, float* y) {
  const int64_t H = G / 2;
  std::vector<float> xd(nb * G, 0.0f), xs(nb, 0.0f);
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t i = 0; i < G && b * G + i < K; ++i) {
      const float v = x[b * G + i];
      xd[b * G + (i & 1) * H + i / 2] = v;
      xs[b] += v;
    }
  const int64_t zb = (nb + 1) / 2;
  for (int64_t n = 0; n < N; ++n) {
    float acc = 0;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* q = packed + (n * nb + b) * H;
      const float* xe = xd.data() + b * G;
      const float* xo = xe + H;
      float d;
#ifdef __AVX512F__
      if (H % 16 == 0) {
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        const __m512i lo4 = _mm512_set1_epi32(15);
        for (int64_t i = 0; i < H; i += 16) {
          const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i)));
          a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(c, lo4)), _mm512_loadu_ps(xe + i), a0);
          a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(c, 4)), _mm512_loadu_ps(xo + i), a1);
        }
        d = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
      } else
#endif
      {
        float lanes[8] = {};
        int64_t i = 0;
        for (; i + 8 <= H; i += 8)
          for (int64_t j = 0; j < 8; ++j) lanes[j] += float(q[i + j] & 15) * xe[i + j] + float(q[i + j] >> 4) * xo[i + j];
        d = 0;
        for (; i < H; ++i) d += float(q[i] & 15) * xe[i] + float(q[i] >> 4) * xo[i];
        for (int64_t j = 0; j < 8; ++j) d += lanes[j];
      }
      const uint8_t zp = zeros[n * zb + b / 2];
      acc += scales[n * nb + b] * (d - float((b & 1) ? zp >> 4 : zp & 15) * xs[b]);
    }
    y[n] = acc;
  }
}

struct Q4 {
  const uint8_t* packed;
  const float* scales;
  const uint8_t* zeros;
  int64_t N, nb, G;
};

Q4 q4_input(OrtKernelContext* ctx, size_t i) {
  Tensor p = input(ctx, i), s = input(ctx, i + 1), z = input(ctx, i + 2);
  return {p.raw<uint8_t>(), s.data, z.raw<uint8_t>(), p.dims[0], p.dims[1], 2 * p.dims[2]};
}

// Rwkv7LowRankQ4(x (1, K), A packed, A scales, A zeros, B packed, B scales, B zeros)  attr act
//   -> B act(A x) (1, N): a low-rank product whose two factors are int4 (an svd-factored projection or a
//   RWKV-7 LoRA), act 0 none, 1 tanh, 2 sigmoid, 3 relu, 4 relu squared. Two MatMulNBits kernels and the
//   activation's become one.
void lowrank_q4_compute(const Attrs& at, OrtKernelContext* ctx) {
  Tensor x = input(ctx, 0);
  const Q4 A = q4_input(ctx, 1), B = q4_input(ctx, 4);
  std::vector<float> h(A.N);
  q4_gemv(A.packed, A.scales, A.zeros, A.N, A.nb, A.G, x.data, x.size, h.data());
  for (float& v : h) {
    switch (at.act) {
      case 1: v = std::tanh(v); break;
      case 2: v = 1.0f / (1.0f + std::exp(-v)); break;
      case 3: v = v > 0 ? v : 0.0f; break;
      case 4: v = v > 0 ? v * v : 0.0f; break;
      default: break;
    }
  }
  const int64_t ydims[2] = {1, B.N};
  float* y = output(ctx, 0, ydims, 2);
  q4_gemv(B.packed, B.scales, B.zeros, B.N, B.nb, B.G, h.data(), A.N, y);
}

// ---- op definitions --------------------------------------------------------------------------------------

struct OpDef {
  OrtCustomOp base;   // first member: ONNX Runtime hands back &base
  const char* name;
  const char* in_types;   // one letter per input (element_type), e.g. "fbf"
  size_t n_in, n_out;
  void (*compute)(const Attrs&, OrtKernelContext*);
};

struct Kernel {
  const OpDef* op;
  Attrs attrs;
};

const OpDef* def(const OrtCustomOp* op) { return reinterpret_cast<const OpDef*>(op); }

void* ORT_API_CALL create_kernel(const OrtCustomOp* op, const OrtApi*, const OrtKernelInfo* info) {
  Attrs a{float_attr(info, "eps", 1e-5f), int_attr(info, "first", 0), float_attr(info, "mlp_threshold", 0.5f),
          float_attr(info, "q_scale", 1.0f), float_attr(info, "top_p", 1.0f), int_attr(info, "q_lo", 0),
          int_attr(info, "q_bits", 1), int_attr(info, "min_k", 1), int_attr(info, "max_k", 1 << 30),
          int_attr(info, "act", 0)};
  return new Kernel{def(op), a};
}
const char* ORT_API_CALL get_name(const OrtCustomOp* op) { return def(op)->name; }
const char* ORT_API_CALL get_ep(const OrtCustomOp*) { return "CPUExecutionProvider"; }
// f float32, u uint8, b int8, w uint16, i int32
ONNXTensorElementDataType element_type(char c) {
  switch (c) {
    case 'u': return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    case 'b': return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
    case 'w': return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16;
    case 'i': return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
}
ONNXTensorElementDataType ORT_API_CALL in_type(const OrtCustomOp* op, size_t i) {
  return element_type(def(op)->in_types[i]);
}
ONNXTensorElementDataType ORT_API_CALL out_type(const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
size_t ORT_API_CALL n_inputs(const OrtCustomOp* op) { return def(op)->n_in; }
size_t ORT_API_CALL n_outputs(const OrtCustomOp* op) { return def(op)->n_out; }
void ORT_API_CALL compute(void* kernel, OrtKernelContext* ctx) {
  auto* k = static_cast<Kernel*>(kernel);
  k->op->compute(k->attrs, ctx);
}
void ORT_API_CALL destroy(void* kernel) { delete static_cast<Kernel*>(kernel); }
OrtCustomOpInputOutputCharacteristic ORT_API_CALL required(const OrtCustomOp*, size_t) {
  return INPUT_OUTPUT_REQUIRED;
}
OrtMemType ORT_API_CALL mem_default(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL one(const OrtCustomOp*) { return 1; }

OpDef make(const char* name, const char* in_types, size_t n_out, void (*fn)(const Attrs&, OrtKernelContext*)) {
  OpDef d;
  std::memset(&d, 0, sizeof d);
  d.base.version = kCustomOpVersion;
  d.base.CreateKernel = create_kernel;
  d.base.GetName = get_name;
  d.base.GetExecutionProviderType = get_ep;
  d.base.GetInputType = in_type;
  d.base.GetInputTypeCount = n_inputs;
  d.base.GetOutputType = out_type;
  d.base.GetOutputTypeCount = n_outputs;
  d.base.KernelCompute = compute;
  d.base.KernelDestroy = destroy;
  d.base.GetInputCharacteristic = required;
  d.base.GetOutputCharacteristic = required;
  d.base.GetInputMemoryType = mem_default;
  d.base.GetVariadicInputMinArity = one;
  d.base.GetVariadicInputHomogeneity = one;
  d.base.GetVariadicOutputMinArity = one;
  d.base.GetVariadicOutputHomogeneity = one;
  d.name = name;
  d.in_types = in_types;
  d.n_in = std::strlen(in_types);
  d.n_out = n_out;
  d.compute = fn;
  return d;
}

// the Mix op's output count is part of its name: Rwkv7Mix1 (channel-mix), Rwkv7Mix6 (time-mix)
OpDef g_ops[] = {
    make("Rwkv7Mix1", "ffffff", 3, mix_compute),
    make("Rwkv7Mix6", "ffffff", 8, mix_compute),
    make("Rwkv7WkvStep", "fffffffffffffffff", 2, wkv_compute),
    make("ReluSquare", "f", 1, relu_square_compute),
    make("Rwkv7WkvSeq", "fffffff", 2, wkv_seq_compute),
    make("Rwkv7SparseFfn", "fffubfbf", 1, sparse_ffn_compute<int8_t>),
    make("Rwkv7SparseFfnF32", "fffuffff", 1, sparse_ffn_compute<float>),
    make("Rwkv7ClusteredHead", "ffbfiiwf", 1, clustered_head_compute<int8_t>),
    make("Rwkv7ClusteredHeadF32", "ffffiiwf", 1, clustered_head_compute<float>),
    make("Rwkv7LowRankQ4", "fufuufu", 1, lowrank_q4_compute),
};

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
  g_api = base->GetApi(kOrtApiVersion);
  if (!g_api) return nullptr;   // an older ONNX Runtime: session creation then names the unknown ops
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = ort::CreateCustomOpDomain(g_api, "ai.rwkvc", &domain)) return st;
  for (OpDef& d : g_ops)
    if (OrtStatus* st = ort::CustomOpDomain_Add(g_api, domain, &d.base)) return st;
  return ort::AddCustomOpDomain(g_api, options, domain);
}

// the library's version of the op set, for rwkvc.runtimes.ortops to check what it loaded
extern "C" __attribute__((visibility("default"))) int rwkvc_ort_ops_version() { return 2; }

// threads for the kernels that split work (Rwkv7WkvSeq); the runtime passes its intra-op thread count
extern "C" __attribute__((visibility("default"))) void rwkvc_ort_ops_set_threads(int n) { g_threads = n > 0 ? n : 1; }
