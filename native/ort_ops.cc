// rwkvc's fused CPU kernels for ONNX Runtime (custom-op domain "ai.rwkvc", version 3).
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
//
// Version 3 adds the step's quantised products, reading MatMulNBits' own inputs (op set v2's
// Rwkv7LowRankQ4, never emitted by default, is gone):
//   Rwkv7MatVecQ(x (1, K), codes, scales, zero points)  attrs bits, block -> W x, computed as MatMulNBits'
//       accuracy level 4 computes it (8-bit activations per block, integer dot products with AVX-512 VNNI)
//   Rwkv7MatVecSet(x_0 .., then codes, scales, zero points per product)  attrs n_x, src, acts, bitss, blocks,
//       emits -> a layer's products as one kernel (chains of two with relu or relu squared between)
//
// Version 4 adds Rwkv7ClusteredHeadTop (the head's top token, its logits optional); version 5 lets a set's
// chains have tanh or sigmoid between their products (the RWKV-7 LoRAs in one set); version 6 adds
// Rwkv7SparseFfnQ / Rwkv7SparseFfnQF32: the MLP predictor in int8, 1-bit codes 16 rows together.
//
// Version 7 adds a layout for the step's 4-bit and int8 matrices, 16 rows interleaved a vector (4-bit scales
// float16; matvec_rows16), emitted where rwkvc's kernels are its only readers (the step and the prefill):
//   Rwkv7MatVecQ16(x (.., K), codes (N16, nb, 8 G), scales (N16, nb, 16) float16, zero points (N16, nb, 8) or
//       empty)  attrs n, block -> W x (one row: the step; T rows: the prefill), and Rwkv7MatVecSet's optional
//       attributes layouts (1 for such a product) and ns (its N)
//   Rwkv7MatVecQ16x8(x, codes (N16, nb, 16 G) uint8 (q + 128), scales (N16, 16) float32 (one a row), empty)
//       attrs n, block, bits = 8 -> W x for an int8 matrix (MatMulNBits bits 8's numbers) in that layout
//
// Built by rwkvc.runtimes.ortops with the host's g++ and registered into each session from rwkvc's own
// package (never from an artifact). ort_abi.h declares the few parts of ONNX Runtime's C API it uses.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "ort_abi.h"

namespace {

const OrtApi* g_api = nullptr;
// ONNX Runtime's intra-op thread pool (API 17, ONNX Runtime 1.17); null before that: kernels run serially
ort::ParallelForFn g_parallel_for = nullptr;
int g_threads = 1;   // set by the runtime (rwkvc_ort_ops_set_threads): the session's intra-op threads

// f(lo, hi) over [0, n) in up to g_threads ranges on ONNX Runtime's intra-op pool, each at least `grain`
// long (waking a thread costs ~2 us); in this thread when there is one range, no pool, or the pool fails.
// `align`: range bounds are multiples of it.
template <class F>
void parallel_ranges(OrtKernelContext* ctx, int64_t n, int64_t grain, F&& f, int64_t align = 1) {
  const int64_t tasks = std::min<int64_t>(g_threads, n / std::max<int64_t>(grain, 1));
  if (tasks > 1 && g_parallel_for) {
    struct Job {
      std::remove_reference_t<F>* f;
      int64_t n, per;
    } job{&f, n, ((n + tasks - 1) / tasks + align - 1) / align * align};
    auto run = [](void* p, size_t i) {
      const Job* j = static_cast<const Job*>(p);
      const int64_t lo = int64_t(i) * j->per, hi = std::min(j->n, lo + j->per);
      if (lo < hi) (*j->f)(lo, hi);
    };
    OrtStatus* st = g_parallel_for(ctx, run, size_t(tasks), 0, &job);
    if (!st) return;
    ort::ReleaseStatus(g_api, st);
  }
  f(int64_t(0), n);
}

#ifdef __AVX2__
// the sum of a __m256's lanes
inline float hsum256(__m256 a) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

#endif

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

#ifdef __AVX512F__
inline __m512 lane_sums16(__m512* v, int first);   // below: 16 vectors' lane sums
#endif

// One head of the RWKV-7 recurrence and its output, all vectors of length N (this head's slice).
//   S' = S diag(decay) + (S a) b^T + v k^T;  y = S' r;  out = (GroupNorm(y) * lnw + lnb + v * (k . (r*r_k))) * g
// N is a template argument for the usual head sizes, so the row loops unroll completely.
template <int64_t NT>
void wkv7_head(const float* S, float* S2, int64_t n, const float* r, const float* decay, const float* k,
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

const OrtValue* input_value(OrtKernelContext* ctx, size_t i) {
  const OrtValue* v = nullptr;
  ort::KernelContext_GetInput(g_api, ctx, i, &v);
  return v;
}

const float* input_data(const OrtValue* v) {
  void* p = nullptr;
  ort::GetTensorMutableData(g_api, const_cast<OrtValue*>(v), &p);
  return static_cast<const float*>(p);
}

Tensor input(OrtKernelContext* ctx, size_t i) {
  const OrtValue* v = input_value(ctx, i);
  Tensor t;
  t.data = input_data(v);
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

std::vector<int64_t> ints_attr(const OrtKernelInfo* info, const char* name) {
  size_t n = 0;
  OrtStatus* st = ort::KernelInfoGetAttributeArray_int64(g_api, info, name, nullptr, &n);
  if (st) {
    ort::ReleaseStatus(g_api, st);
    return {};
  }
  std::vector<int64_t> v(n);
  st = ort::KernelInfoGetAttributeArray_int64(g_api, info, name, v.data(), &n);
  if (st) {
    ort::ReleaseStatus(g_api, st);
    return {};
  }
  return v;
}

int64_t int_attr(const OrtKernelInfo* info, const char* name, int64_t dflt) {
  int64_t v = dflt;
  OrtStatus* st = ort::KernelInfoGetAttribute_int64(g_api, info, name, &v);
  if (st) ort::ReleaseStatus(g_api, st);
  return st ? dflt : v;
}

// the shapes of a kernel's inputs, read once: its weights are constant initializers and the step graph's
// vectors have fixed shapes, so a call then asks ONNX Runtime for the data pointers only (the full query
// costs ~0.3 us an input, and a layer's Rwkv7MatVecSet has ~40 inputs)
struct InputCache {
  std::unique_ptr<std::atomic<bool>[]> ready;
  std::vector<Tensor> shape;
  std::mutex fill;
  explicit InputCache(size_t n) : ready(new std::atomic<bool>[n]), shape(n) {
    for (size_t i = 0; i < n; ++i) ready[i] = false;
  }
};

struct Attrs {
  float eps;
  int64_t first;
  float mlp_threshold, q_scale, top_p;
  int64_t q_lo, q_bits, min_k, max_k, act;
  int64_t bits, block;
  std::vector<int64_t> src, acts, bitss, blocks, emits;   // Rwkv7MatVecSet's program
  std::vector<int64_t> layouts, ns;                          // op set 7: each product's layout (1: interleaved) and N
  int64_t n_x;
  int64_t n;                                                 // Rwkv7MatVecQ16's N
  std::shared_ptr<InputCache> cache;                        // for cached_input (Rwkv7MatVecQ / Rwkv7MatVecSet)
};

// input i with its shape from the cache (filled on the first call)
Tensor cached_input(const Attrs& at, OrtKernelContext* ctx, size_t i) {
  InputCache& c = *at.cache;
  if (!c.ready[i].load(std::memory_order_acquire)) {
    std::lock_guard<std::mutex> lock(c.fill);
    if (!c.ready[i].load(std::memory_order_relaxed)) {
      c.shape[i] = input(ctx, i);
      c.ready[i].store(true, std::memory_order_release);
    }
  }
  Tensor t = c.shape[i];
  t.data = input_data(input_value(ctx, i));
  return t;
}

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

struct WkvArgs {
  const float *r, *w, *k, *v, *a, *vg, *vf, *g, *S, *w0, *a0, *v0, *k_k, *k_a, *r_k, *lnw, *lnb;
  float* y;
  float* S2;
  int64_t N;
  float eps;
  bool first;
};

// heads h0 .. h1 of the step
void wkv_heads(const WkvArgs& p, int64_t h0, int64_t h1) {
  const int64_t N = p.N;
  const HeadFn head = head_kernel(N);
  float decay[256], kk[256], kn[256], aa[256], bb[256], vv[256];
  for (int64_t h = h0; h < h1; ++h) {
    const int64_t o = h * N;
    float norm = 0;
#pragma omp simd reduction(+ : norm)
    for (int64_t j = 0; j < N; ++j) {
      decay[j] = fast_exp(-kDecayScale * sigmoid(p.w[o + j] + p.w0[o + j]));
      kk[j] = p.k[o + j] * p.k_k[o + j];
      norm += kk[j] * kk[j];
    }
    norm = std::sqrt(norm);
    const float scale = 1.0f / (norm > 1e-12f ? norm : 1e-12f);
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) {
      const float iclr = sigmoid(p.a0[o + j] + p.a[o + j]);
      const float kkj = kk[j] * scale;
      aa[j] = -kkj;
      bb[j] = kkj * iclr;
      kn[j] = p.k[o + j] * ((1.0f - p.k_a[o + j]) + iclr * p.k_a[o + j]);
    }
    if (p.first) {
      for (int64_t j = 0; j < N; ++j) vv[j] = p.v[o + j];
    } else {
#pragma omp simd
      for (int64_t j = 0; j < N; ++j)
        vv[j] = p.v[o + j] + (p.vf[o + j] - p.v[o + j]) * sigmoid(p.v0[o + j] + p.vg[o + j]);
    }
    head(p.S + h * N * N, p.S2 + h * N * N, N, p.r + o, decay, kn, vv, aa, bb, p.r_k + o, p.lnw + o, p.lnb + o,
         p.g + o, p.eps, p.y + o);
  }
}

void wkv_compute(const Attrs& at, OrtKernelContext* ctx) {
  Tensor in[17];
  for (size_t i = 0; i < 17; ++i) in[i] = input(ctx, i);
  const Tensor& S = in[8];
  const int64_t H = S.dims[0], N = S.dims[1], C = H * N;
  const int64_t row[2] = {1, C};
  float* y = output(ctx, 0, row, 2);
  float* S2 = output(ctx, 1, S.dims, 3);
  if (N > 256) return;   // emit_onnx.fused_supported: heads of at most FUSED_MAX_HEAD = 256
  WkvArgs p{in[0].data, in[1].data, in[2].data, in[3].data, in[4].data, in[5].data, in[6].data, in[7].data,
            S.data, in[9].data, in[10].data, in[11].data, in[12].data, in[13].data, in[14].data, in[15].data,
            in[16].data, y, S2, N, at.eps, at.first != 0};
  // heads over the intra-op threads once the state is big enough to pay for waking them (a 0.1B-shaped
  // layer's 12 heads of 64 take ~20 us)
  parallel_ranges(ctx, H, std::max<int64_t>(1, (int64_t(1) << 14) / (N * N)),
                  [&](int64_t h0, int64_t h1) { wkv_heads(p, h0, h1); });
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
  void dot16(const float* const* rows, int64_t C, float* out) const {
    for (int i = 0; i < 16; ++i) out[i] = dot(rows[i], C);
  }
};

template <>
struct Act<int8_t> {
  using Acc = int32_t;      // MatMulInteger's accumulator
  std::vector<int32_t> q;   // code - zero point
  std::vector<uint8_t> u;   // the uint8 codes, zero-padded to whole 64s (for VNNI's unsigned operand)
  std::vector<int16_t> q16; // code - zero point as int16, zero-padded to whole 16s (AVX2's vpmaddwd)
  int32_t zp = 0;
  float scale = 1.0f;
  void set(const float* v, int64_t n) {
    float mn = 0, mx = 0;
    for (int64_t i = 0; i < n; ++i) mn = std::min(mn, v[i]), mx = std::max(mx, v[i]);
    scale = mx == mn ? 1.0f : (mx - mn) / 255.0f;
    const float zpf = std::nearbyint(std::max(0.0f, std::min(255.0f, 0.0f - mn / scale)));
    zp = int32_t(zpf);
    q.resize(n);
    u.assign((n + 63) / 64 * 64, 0);
    q16.assign((n + 15) / 16 * 16, 0);
    for (int64_t i = 0; i < n; ++i) {
      q[i] = int32_t(std::nearbyint(std::max(-zpf, std::min(255.0f - zpf, v[i] / scale))));
      u[i] = uint8_t(q[i] + zp);
      q16[i] = int16_t(q[i]);
    }
  }
  Acc at(size_t j) const { return q[j]; }
  // sum_c (code_c - zp) row_c, exactly: with VNNI sum_c code_c row_c - zp sum_c row_c, 64 bytes a step
  float dot(const int8_t* row, int64_t C) const {
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i d = _mm512_setzero_si512(), s = _mm512_setzero_si512();
    int64_t c = 0;
    for (; c + 64 <= C; c += 64) {
      const __m512i w = _mm512_loadu_si512(row + c);
      d = _mm512_dpbusd_epi32(d, _mm512_loadu_si512(u.data() + c), w);
      s = _mm512_dpbusd_epi32(s, ones, w);
    }
    if (c < C) {
      const __m512i w = _mm512_maskz_loadu_epi8((__mmask64(1) << (C - c)) - 1, row + c);
      d = _mm512_dpbusd_epi32(d, _mm512_loadu_si512(u.data() + c), w);
      s = _mm512_dpbusd_epi32(s, ones, w);
    }
    return float(_mm512_reduce_add_epi32(d) - zp * _mm512_reduce_add_epi32(s));
#elif defined(__AVX2__)
    // 16 codes a step: the row's bytes widened to int16, vpmaddwd's pairs summed into 8 int32 lanes (exact:
    // |code - zp| <= 255, |row| <= 128)
    __m256i d0 = _mm256_setzero_si256(), d1 = _mm256_setzero_si256();
    int64_t c = 0;
    for (; c + 32 <= C; c += 32) {
      const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c)));
      const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c + 16)));
      d0 = _mm256_add_epi32(d0, _mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q16.data() + c))));
      d1 = _mm256_add_epi32(d1, _mm256_madd_epi16(w1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q16.data() + c + 16))));
    }
    int32_t lanes[8];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes), _mm256_add_epi32(d0, d1));
    int32_t acc = 0;
    for (int j = 0; j < 8; ++j) acc += lanes[j];
    for (; c < C; ++c) acc += q[c] * int32_t(row[c]);
    return float(acc);
#else
    int32_t acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t c = 0; c < C; ++c) acc += q[c] * int32_t(row[c]);
    return float(acc);
#endif
  }
  // out[i] = dot(rows[i], C) for 16 rows: the same integers, one lane reduction for all 16 (dot()'s two
  // horizontal sums a row were a third of a clustered head's exact logits)
  void dot16(const int8_t* const* rows, int64_t C, float* out) const;
};

#ifdef __AVX512F__
// round k of lane_sums16's pairing: the permutex2var indices of the two halves it adds
alignas(64) constexpr int32_t kLanePairs[4][2][16] = {
    {{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}, {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}},
    {{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27}, {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31}},
    {{0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29}, {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31}},
    {{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}, {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31}}};
// the lane sums of 16 rows as one vector (out[r] = row r's sum), from v[0 .. 16 >> first): vector i holding
// 2^first rows (i 2^first ..) with 16 >> first lanes each, in row order. Rounds of pairing: round k adds the
// lane halves of two vectors of 2^k rows each into one vector of 2^(k+1) rows.
inline __m512 lane_sums16(__m512* v, int first = 0) {
  const auto& idx = kLanePairs;
  for (int round = first, n = 16 >> first; round < 4; ++round, n /= 2) {
    const __m512i a = _mm512_load_si512(idx[round][0]), b = _mm512_load_si512(idx[round][1]);
    for (int i = 0; i < n / 2; ++i)
      v[i] = _mm512_add_ps(_mm512_permutex2var_ps(v[2 * i], a, v[2 * i + 1]), _mm512_permutex2var_ps(v[2 * i], b, v[2 * i + 1]));
  }
  return v[0];
}
#endif

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
// lane_sums16 over int32 lanes, exactly
inline __m512i lane_sums16i(__m512i* v) {
  const auto& idx = kLanePairs;
  for (int round = 0, n = 16; round < 4; ++round, n /= 2) {
    const __m512i a = _mm512_load_si512(idx[round][0]), b = _mm512_load_si512(idx[round][1]);
    for (int i = 0; i < n / 2; ++i)
      v[i] = _mm512_add_epi32(_mm512_permutex2var_epi32(v[2 * i], a, v[2 * i + 1]),
                              _mm512_permutex2var_epi32(v[2 * i], b, v[2 * i + 1]));
  }
  return v[0];
}
#endif

void Act<int8_t>::dot16(const int8_t* const* rows, int64_t C, float* out) const {
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
  const __m512i ones = _mm512_set1_epi8(1), z = _mm512_set1_epi32(zp);
  const __mmask64 tail = C % 64 ? (__mmask64(1) << (C % 64)) - 1 : 0;
  __m512i v[16];
  for (int i = 0; i < 16; ++i) {
    __m512i d = _mm512_setzero_si512(), s = _mm512_setzero_si512();
    int64_t c = 0;
    for (; c + 64 <= C; c += 64) {
      const __m512i w = _mm512_loadu_si512(rows[i] + c);
      d = _mm512_dpbusd_epi32(d, _mm512_loadu_si512(u.data() + c), w);
      s = _mm512_dpbusd_epi32(s, ones, w);
    }
    if (tail) {
      const __m512i w = _mm512_maskz_loadu_epi8(tail, rows[i] + c);
      d = _mm512_dpbusd_epi32(d, _mm512_loadu_si512(u.data() + c), w);
      s = _mm512_dpbusd_epi32(s, ones, w);
    }
    v[i] = _mm512_sub_epi32(d, _mm512_mullo_epi32(z, s));
  }
  _mm512_storeu_ps(out, _mm512_cvtepi32_ps(lane_sums16i(v)));
#else
  for (int i = 0; i < 16; ++i) out[i] = dot(rows[i], C);
#endif
}

// out[j] = x.dot(row(j), C) for j < n, 16 rows at a time (Act::dot16), then one by one
template <class W, class RowOf>
void act_dots(const Act<W>& x, int64_t n, int64_t C, RowOf row, float* out) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const W* r16[16];
    for (int i = 0; i < 16; ++i) r16[i] = row(j + i);
    x.dot16(r16, C, out + j);
  }
  for (; j < n; ++j) out[j] = x.dot(row(j), C);
}

// sorted(v)[k] of v (n > k >= 0) without sorting: a bisection on the floats' order-preserving integer keys,
// 32 counting passes at most over n (vectorised), ~0.5 us for n = 512 against ~3 us for nth_element
float kth_smallest(const float* v, int64_t n, int64_t k) {
  thread_local std::vector<uint32_t> key_buf;
  key_buf.resize(n);
  uint32_t* key = key_buf.data();
  uint32_t lo = UINT32_MAX, hi = 0;
  int64_t i = 0;
#ifdef __AVX512F__
  // key = bits ^ (negative ? all ones : the sign bit); 16 lanes at a time, the counts by mask popcounts
  const __m512i sign = _mm512_set1_epi32(int32_t(0x80000000u));
  __m512i vlo = _mm512_set1_epi32(-1), vhi = _mm512_setzero_si512();
  for (; i + 16 <= n; i += 16) {
    const __m512i b = _mm512_loadu_si512(v + i);
    const __m512i kk = _mm512_xor_si512(b, _mm512_or_si512(_mm512_srai_epi32(b, 31), sign));
    _mm512_storeu_si512(key + i, kk);
    vlo = _mm512_min_epu32(vlo, kk), vhi = _mm512_max_epu32(vhi, kk);
  }
  lo = uint32_t(_mm512_reduce_min_epu32(vlo)), hi = uint32_t(_mm512_reduce_max_epu32(vhi));
#endif
  for (; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, v + i, 4);
    key[i] = b ^ ((b >> 31) ? 0xFFFFFFFFu : 0x80000000u);
    lo = std::min(lo, key[i]), hi = std::max(hi, key[i]);
  }
  const int64_t nv = n / 16 * 16;
  while (lo < hi) {   // the smallest key with more than k keys at or below it
    const uint32_t mid = lo + (hi - lo) / 2;
    int64_t cnt = 0, j = 0;
#ifdef __AVX512F__
    const __m512i vm = _mm512_set1_epi32(int32_t(mid));
    for (; j < nv; j += 16) cnt += __builtin_popcount(unsigned(_mm512_cmple_epu32_mask(_mm512_loadu_si512(key + j), vm)));
#endif
    for (; j < n; ++j) cnt += key[j] <= mid;
    if (cnt > k) hi = mid; else lo = mid + 1;
  }
  const uint32_t b = (lo >> 31) ? lo ^ 0x80000000u : ~lo;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// est[f] = sum_c code(f, c) * x[c] for codes packed `bits` (1, 2, 4 or 8) to a code, little-endian within
// each byte, each row padded to whole bytes. Codes of 1 or 2 bits go through a table of every byte's
// partial sum at each byte position (one add per entry to build, one lookup per byte of a row).
void code_dot(const uint8_t* codes, int64_t F, int64_t C, int64_t bits, const float* x, float* est) {
  const int64_t per = 8 / bits, rb = (C + per - 1) / per, mask = (1 << bits) - 1;
  std::vector<float> xp(rb * per + 16, 0.0f);   // x, zero-padded to whole bytes and one vector past them
  std::memcpy(xp.data(), x, C * sizeof(float));
#ifdef __AVX512F__
  if (bits == 1) {   // 16 codes are a lane mask: a masked add of 16 floats of x; 16 rows' sums at once
    auto row_acc = [&](int64_t f) {
      const uint8_t* row = codes + f * rb;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();   // two chains of adds
      int64_t p = 0;
      for (; p + 4 <= rb; p += 4) {   // two masks of 16 codes, read as they lie
        uint16_t m0, m1;
        std::memcpy(&m0, row + p, 2);
        std::memcpy(&m1, row + p + 2, 2);
        a0 = _mm512_mask_add_ps(a0, __mmask16(m0), a0, _mm512_loadu_ps(xp.data() + p * 8));
        a1 = _mm512_mask_add_ps(a1, __mmask16(m1), a1, _mm512_loadu_ps(xp.data() + p * 8 + 16));
      }
      for (; p < rb; p += 2) {
        const __mmask16 m = __mmask16(row[p] | (p + 1 < rb ? row[p + 1] << 8 : 0));
        a0 = _mm512_mask_add_ps(a0, m, a0, _mm512_loadu_ps(xp.data() + p * 8));
      }
      return _mm512_add_ps(a0, a1);
    };
    int64_t f = 0;
    for (; f + 16 <= F; f += 16) {
      __m512 v[16];
      for (int i = 0; i < 16; ++i) v[i] = row_acc(f + i);
      _mm512_storeu_ps(est + f, lane_sums16(v));
    }
    for (; f < F; ++f) est[f] = _mm512_reduce_add_ps(row_acc(f));
    return;
  }
#elif defined(__AVX2__)
  if (bits == 1) {   // a byte of codes is 8 lanes' mask (its bits against 1, 2, .., 128): x where set, summed
    const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    for (int64_t f = 0; f < F; ++f) {
      const uint8_t* row = codes + f * rb;
      const auto masked = [&](int64_t p) {   // x[8p .. 8p + 8) where byte p's codes are set, else 0
        const __m256i m = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(row[p]), sel), sel);
        return _mm256_and_ps(_mm256_castsi256_ps(m), _mm256_loadu_ps(xp.data() + p * 8));
      };
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();   // two chains of adds
      int64_t p = 0;
      for (; p + 2 <= rb; p += 2) {
        a0 = _mm256_add_ps(a0, masked(p));
        a1 = _mm256_add_ps(a1, masked(p + 1));
      }
      if (p < rb) a0 = _mm256_add_ps(a0, masked(p));
      est[f] = hsum256(_mm256_add_ps(a0, a1));
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

// est[f] = sum_c code(f, c) * x[c] for 1-bit codes laid out 16 rows together (op set 6): group g of rows
// 16 g .. 16 g + 15 holds, for each byte position p of a row (its channels 8 p .. 8 p + 7, little-endian),
// the 16 rows' bytes in row order (codes[(g rb + p) 16 + r]); F is padded to whole 16s with zero rows.
// Each 4 channels' bits of a row are a nibble, and a table of the 16 subset sums of those 4 channels of x
// turns a nibble into its partial sum: 16 rows' nibbles index one vector of 16 floats at once (vpermps),
// so 16 rows x 8 channels cost two permutes and two adds, against 16 masked adds row by row.
// code_dot16_table: the tables, T[q * 16 + s] (q < 2 ceil(C / 8), 64-byte aligned, valid until the next call
// in this thread); code_dot16_groups: est of the rows of groups g0 .. g1 from them (any thread).
const float* code_dot16_table(const float* x, int64_t C) {
  const int64_t nq = 2 * ((C + 7) / 8);
  thread_local std::vector<float> table_buf;
  table_buf.resize(nq * 16 + 16);
  float* T = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(table_buf.data()) + 63) & ~uintptr_t(63));
  for (int64_t q = 0; q < nq; ++q) {   // T[q][s] = sum of x[4 q + i] over the bits i of s, in order i = 0..3
    float xs[4];
    for (int i = 0; i < 4; ++i) xs[i] = 4 * q + i < C ? x[4 * q + i] : 0.0f;
#ifdef __AVX512F__
    __m512 t = _mm512_setzero_ps();
    t = _mm512_mask_add_ps(t, 0xAAAA, t, _mm512_set1_ps(xs[0]));
    t = _mm512_mask_add_ps(t, 0xCCCC, t, _mm512_set1_ps(xs[1]));
    t = _mm512_mask_add_ps(t, 0xF0F0, t, _mm512_set1_ps(xs[2]));
    t = _mm512_mask_add_ps(t, 0xFF00, t, _mm512_set1_ps(xs[3]));
    _mm512_store_ps(T + q * 16, t);
#else
    for (int s = 0; s < 16; ++s) {
      float t = 0.0f;
      for (int i = 0; i < 4; ++i)
        if (s >> i & 1) t += xs[i];
      T[q * 16 + s] = t;
    }
#endif
  }
  return T;
}

void code_dot16_groups(const uint8_t* codes, int64_t F, int64_t C, const float* T, float* est, int64_t g0, int64_t G) {
  const int64_t rb = (C + 7) / 8;
  int64_t g = g0;
#ifdef __AVX512F__
  for (; g < G; ++g) {
    const uint8_t* b = codes + g * rb * 16;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;   // four chains of adds
    int64_t p = 0;
    for (; p + 2 <= rb; p += 2) {
      const __m512i i0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + p * 16)));
      const __m512i i1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + p * 16 + 16)));
      a0 = _mm512_add_ps(a0, _mm512_permutexvar_ps(i0, _mm512_load_ps(T + 32 * p)));   // low nibbles: index bits 0..3
      a1 = _mm512_add_ps(a1, _mm512_permutexvar_ps(_mm512_srli_epi32(i0, 4), _mm512_load_ps(T + 32 * p + 16)));
      a2 = _mm512_add_ps(a2, _mm512_permutexvar_ps(i1, _mm512_load_ps(T + 32 * p + 32)));
      a3 = _mm512_add_ps(a3, _mm512_permutexvar_ps(_mm512_srli_epi32(i1, 4), _mm512_load_ps(T + 32 * p + 48)));
    }
    if (p < rb) {
      const __m512i i0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + p * 16)));
      a0 = _mm512_add_ps(a0, _mm512_permutexvar_ps(i0, _mm512_load_ps(T + 32 * p)));
      a1 = _mm512_add_ps(a1, _mm512_permutexvar_ps(_mm512_srli_epi32(i0, 4), _mm512_load_ps(T + 32 * p + 16)));
    }
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
    const int64_t w = std::min<int64_t>(16, F - 16 * g);
    _mm512_mask_storeu_ps(est + 16 * g, __mmask16((1u << w) - 1), sum);
  }
#elif defined(__AVX2__)
  for (; g < G; ++g) {   // two halves of 8 rows; a nibble's table is two vectors of 8, picked by its bit 3
    const uint8_t* b = codes + g * rb * 16;
    for (int half = 0; half < 2; ++half) {
      __m256 a0 = _mm256_setzero_ps(), a1 = a0;
      for (int64_t p = 0; p < rb; ++p) {
        __m128i by;
        std::memcpy(&by, b + p * 16 + 8 * half, 8);
        const __m256i i0 = _mm256_cvtepu8_epi32(by), i1 = _mm256_srli_epi32(i0, 4);
        const auto look = [&](__m256i idx, const float* t) {
          const __m256 lo = _mm256_permutevar8x32_ps(_mm256_load_ps(t), idx), hi = _mm256_permutevar8x32_ps(_mm256_load_ps(t + 8), idx);
          return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
        };
        a0 = _mm256_add_ps(a0, look(i0, T + 32 * p));
        a1 = _mm256_add_ps(a1, look(i1, T + 32 * p + 16));
      }
      float o[8];
      _mm256_storeu_ps(o, _mm256_add_ps(a0, a1));
      for (int r = 0; r < 8 && 16 * g + 8 * half + r < F; ++r) est[16 * g + 8 * half + r] = o[r];
    }
  }
#endif
  for (; g < G; ++g) {
    const uint8_t* b = codes + g * rb * 16;
    for (int r = 0; r < 16 && 16 * g + r < F; ++r) {
      float acc = 0.0f;
      for (int64_t p = 0; p < rb; ++p) acc += T[32 * p + (b[p * 16 + r] & 15)] + T[32 * p + 16 + (b[p * 16 + r] >> 4)];
      est[16 * g + r] = acc;
    }
  }
}

// out[o] = sum_i x[i] W[i n_out + o] (W row-major n_in x n_out), summed in float over i in order; rows with
// x[i] == 0 skipped. W float32 (scale null), or int8 with one scale per output (a weight is W scale[o]:
// the sum is over x[i] W, then scaled). With AVX-512, up to 128 outputs are summed in registers across all
// rows.
#ifdef __AVX512F__
template <int NV, class W>
void xw_block(const float* x, int64_t n_in, const W* Wm, const float* scale, int64_t n_out, int64_t o0, int64_t o_end,
              float* out) {
  const int64_t w = std::min<int64_t>(16 * NV, o_end - o0);
  __mmask16 mk[NV];
  __m512 acc[NV];
  for (int v = 0; v < NV; ++v) {
    const int64_t k = std::max<int64_t>(0, std::min<int64_t>(16, w - 16 * v));
    mk[v] = __mmask16((1u << k) - 1);
    acc[v] = _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < n_in; ++i) {
    if (x[i] == 0) continue;
    const __m512 xi = _mm512_set1_ps(x[i]);
    const W* r = Wm + i * n_out + o0;
    for (int v = 0; v < NV; ++v) {
      __m512 wv;
      if constexpr (std::is_same_v<W, float>) wv = _mm512_maskz_loadu_ps(mk[v], r + 16 * v);
      else wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk[v], r + 16 * v)));
      acc[v] = _mm512_fmadd_ps(xi, wv, acc[v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    if (scale) acc[v] = _mm512_mul_ps(acc[v], _mm512_maskz_loadu_ps(mk[v], scale + o0 + 16 * v));
    _mm512_mask_storeu_ps(out + o0 + 16 * v, mk[v], acc[v]);
  }
}
#endif

// out[o] = (x W)[o] (times scale[o]) for o in [o_lo, o_hi), W (n_in, n_out) row-major
template <class W>
void xw_rows(const float* x, int64_t n_in, const W* Wm, const float* scale, int64_t n_out, float* out,
             int64_t o_lo, int64_t o_hi) {
#ifdef __AVX512F__
  for (int64_t o0 = o_lo; o0 < o_hi; o0 += 128) {
    switch (std::min<int64_t>(8, (o_hi - o0 + 15) / 16)) {
      case 1: xw_block<1>(x, n_in, Wm, scale, n_out, o0, o_hi, out); break;
      case 2: xw_block<2>(x, n_in, Wm, scale, n_out, o0, o_hi, out); break;
      case 3: xw_block<3>(x, n_in, Wm, scale, n_out, o0, o_hi, out); break;
      case 4: xw_block<4>(x, n_in, Wm, scale, n_out, o0, o_hi, out); break;
      case 5: xw_block<5>(x, n_in, Wm, scale, n_out, o0, o_hi, out); break;
      case 6: xw_block<6>(x, n_in, Wm, scale, n_out, o0, o_hi, out); break;
      case 7: xw_block<7>(x, n_in, Wm, scale, n_out, o0, o_hi, out); break;
      default: xw_block<8>(x, n_in, Wm, scale, n_out, o0, o_hi, out); break;
    }
  }
#else
  std::fill(out + o_lo, out + o_hi, 0.0f);
  for (int64_t i = 0; i < n_in; ++i) {
    const float xi = x[i];
    if (xi == 0) continue;
    const W* r = Wm + i * n_out;
#pragma omp simd
    for (int64_t o = o_lo; o < o_hi; ++o) out[o] += xi * float(r[o]);
  }
  if (scale)
    for (int64_t o = o_lo; o < o_hi; ++o) out[o] *= scale[o];
#endif
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
// acc[c] += sum_j u[j] rows[j][c] (uint8 u, int8 rows of C), exactly as the scalar sum: four rows a step,
// their bytes interleaved so that each int32 lane of vpdpbusd sums one channel's four products
// (channels c_lo .. c_hi of C only)
void rows_axpy_u8(const uint8_t* u, const int8_t* const* rows, int64_t n, int64_t c_lo, int64_t c_hi, int32_t* acc) {
  for (int64_t c0 = c_lo; c0 < c_hi; c0 += 64) {
    const int64_t w = std::min<int64_t>(64, c_hi - c0);
    const __mmask64 m = w == 64 ? ~__mmask64(0) : (__mmask64(1) << w) - 1;
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t j = 0; j < n; j += 4) {
      const int64_t j1 = std::min(j + 1, n - 1), j2 = std::min(j + 2, n - 1), j3 = std::min(j + 3, n - 1);
      const uint32_t hw = uint32_t(u[j]) | uint32_t(j + 1 < n ? u[j + 1] : 0) << 8 |
                          uint32_t(j + 2 < n ? u[j + 2] : 0) << 16 | uint32_t(j + 3 < n ? u[j + 3] : 0) << 24;
      const __m512i h = _mm512_set1_epi32(int32_t(hw));
      const __m512i r0 = _mm512_maskz_loadu_epi8(m, rows[j] + c0), r1 = _mm512_maskz_loadu_epi8(m, rows[j1] + c0),
                    r2 = _mm512_maskz_loadu_epi8(m, rows[j2] + c0), r3 = _mm512_maskz_loadu_epi8(m, rows[j3] + c0);
      const __m512i ab_lo = _mm512_unpacklo_epi8(r0, r1), ab_hi = _mm512_unpackhi_epi8(r0, r1),
                    cd_lo = _mm512_unpacklo_epi8(r2, r3), cd_hi = _mm512_unpackhi_epi8(r2, r3);
      a0 = _mm512_dpbusd_epi32(a0, h, _mm512_unpacklo_epi16(ab_lo, cd_lo));   // channels 16 L + 0..3
      a1 = _mm512_dpbusd_epi32(a1, h, _mm512_unpackhi_epi16(ab_lo, cd_lo));   // 16 L + 4..7
      a2 = _mm512_dpbusd_epi32(a2, h, _mm512_unpacklo_epi16(ab_hi, cd_hi));   // 16 L + 8..11
      a3 = _mm512_dpbusd_epi32(a3, h, _mm512_unpackhi_epi16(ab_hi, cd_hi));   // 16 L + 12..15
    }
    alignas(64) int32_t t[4][16];
    _mm512_store_si512(t[0], a0), _mm512_store_si512(t[1], a1), _mm512_store_si512(t[2], a2), _mm512_store_si512(t[3], a3);
    for (int L = 0; L < 4; ++L)   // lane 4 L + p of a_i: channel 16 L + 4 i + p
      for (int i = 0; i < 4; ++i)
        for (int p = 0; p < 4; ++p) {
          const int64_t ch = 16 * L + 4 * i + p;
          if (ch < w) acc[c0 + ch] += t[i][4 * L + p];
        }
  }
}
#endif

// Rwkv7SparseFfn(xk (1, C), fc1T (C, D), fc2T (D, F), codes (F, bytes), K (F, C), K scale (F,), Vᵀ (F, C),
// V scale (C,)) -> y (1, C). A unit f fires when the MLP predictor's sigmoid(relu(xk fc1T) fc2T)_f exceeds
// mlp_threshold, or when the quantised key's estimate q_scale * codes_f . xk exceeds the q_lo-th smallest
// estimate of this token (an absent predictor has empty tensors). Then y = sum over fired f of
// relu(xk . K_f * kscale_f)^2 * Vᵀ_f, times vscale per output channel; only the fired rows are read.
// W = int8_t: int8 rows and scales, xk and the relu squares as 8-bit activations (Act); W = float: float32
// rows, scales empty.
// Rwkv7SparseFfnQ / Rwkv7SparseFfnQF32 (op set 6, Q = true): the MLP predictor's weights in int8 with one
// scale per output, fc1T (C, D) int8, fc1 scale (D,), fc2T (D, F) int8, fc2 scale (F,), computed in float
// (xw_rows), then codes, K, K scale, Vᵀ, V scale as above; 1-bit codes 16 rows together (code_dot16_groups,
// (ceil(F / 16), bytes, 16)), codes of more bits as above.
template <class W, bool Q = false>
void sparse_ffn_compute(const Attrs& at, OrtKernelContext* ctx) {
  constexpr int o = Q ? 2 : 0;   // the inputs after the predictor's
  Tensor xk = input(ctx, 0), fc1 = input(ctx, 1), fc2 = input(ctx, Q ? 3 : 2), codes = input(ctx, 3 + o),
         K = input(ctx, 4 + o), ks = input(ctx, 5 + o), VT = input(ctx, 6 + o), vs = input(ctx, 7 + o);
  const int64_t C = xk.size, F = K.dims[0];
  const int64_t ydims[2] = {1, C};
  float* y = output(ctx, 0, ydims, 2);
  struct Scratch {   // one thread-local lookup a call
    std::vector<float> mlp, est, hid, h;
    std::vector<int32_t> units;
    std::vector<const int8_t*> rows;
    std::vector<uint8_t> u;
  };
  thread_local Scratch sc;
  float lt = INFINITY, thr = INFINITY;   // the thresholds; an absent predictor fires nothing
  sc.mlp.resize(F), sc.est.resize(F);
  float* __restrict mlp = sc.mlp.data();
  float* __restrict est = sc.est.data();
  // Three splits over the intra-op threads, each where its work is big enough to pay for waking a thread
  // (~2 us): the predictors' scores over groups of 16 units, the fired units' key rows, the value product's
  // channels. (The thread_local scratch is used through pointers: named in a lambda, a pool thread would see
  // its own.)
  const float* hid = nullptr;
  int64_t D = 0;
  // in x W (outputs o_lo .. o_hi) for W = fc1T or fc2T; with Q int8, its scales the input after it
  const float* fc1s = Q && fc1.size ? input(ctx, 2).data : nullptr;
  const float* fc2s = Q && fc1.size ? input(ctx, 4).data : nullptr;
  const auto product = [&](const float* in, int64_t n_in, const Tensor& Wt, const float* scale, int64_t n_out,
                           float* out, int64_t o_lo, int64_t o_hi) {
    if constexpr (Q) xw_rows(in, n_in, Wt.raw<int8_t>(), scale, n_out, out, o_lo, o_hi);
    else xw_rows(in, n_in, Wt.data, nullptr, n_out, out, o_lo, o_hi);
  };
  if (fc1.size) {   // the MLP predictor: fc1T (C, D), fc2T (D, F), float32 or int8 with scales
    D = fc1.size / C;
    sc.hid.resize(D);
    float* hd = sc.hid.data();
    product(xk.data, C, fc1, fc1s, D, hd, 0, D);
    for (int64_t d = 0; d < D; ++d) hd[d] = hd[d] > 0 ? hd[d] : 0.0f;
    hid = hd;
    // sigmoid(l) > t  <=>  l > log(t / (1 - t)): one compare a unit, no exp
    const float t = at.mlp_threshold;
    lt = t <= 0 ? -INFINITY : t >= 1 ? INFINITY : std::log(t) - std::log1p(-t);
  }
  const bool codes16 = codes.size && Q && at.q_bits == 1;   // 1-bit codes 16 rows together
  const float* T = codes16 ? code_dot16_table(xk.data, C) : nullptr;
  const float qs = at.q_scale;
  const int64_t NG = (F + 15) / 16, group_bytes = 16 * (D * (Q ? 1 : 4) + (codes16 ? (C + 7) / 8 : 0));
  parallel_ranges(ctx, NG, std::max<int64_t>(16, (int64_t(1) << 15) / std::max<int64_t>(1, group_bytes)),
                  [&](int64_t g0, int64_t g1) {
    const int64_t f0 = 16 * g0, f1 = std::min(F, 16 * g1);
    if (hid) product(hid, D, fc2, fc2s, F, mlp, f0, f1);
    if (codes16) {
      code_dot16_groups(codes.raw<uint8_t>(), F, C, T, est, g0, g1);
      for (int64_t f = f0; f < f1; ++f) est[f] *= qs;
    }
  });
  if (codes.size) {   // the quantised-key predictor
    if (!codes16) {
      code_dot(codes.raw<uint8_t>(), F, C, at.q_bits, xk.data, est);
      for (int64_t f = 0; f < F; ++f) est[f] *= qs;
    }
    thr = kth_smallest(est, F, std::min<int64_t>(std::max<int64_t>(at.q_lo, 0), F - 1));
  }
  const bool use_mlp = fc1.size, use_est = codes.size;
  const W* kr = K.raw<W>();
  const W* vr = VT.raw<W>();
  Act<W> x;
  x.set(xk.data, C);
  sc.units.resize(F + 16);   // the fired units, in order (a branch-free compaction), and their relu(k)^2
  int32_t* units = sc.units.data();
  int64_t n = 0, f = 0;
#ifdef __AVX512F__
  const __m512 vlt = _mm512_set1_ps(lt), vthr = _mm512_set1_ps(thr);
  for (; f + 16 <= F; f += 16) {
    __mmask16 m = 0;
    if (use_mlp) m |= _mm512_cmp_ps_mask(_mm512_loadu_ps(mlp + f), vlt, _CMP_GT_OQ);
    if (use_est) m |= _mm512_cmp_ps_mask(_mm512_loadu_ps(est + f), vthr, _CMP_GT_OQ);
    const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(int32_t(f)), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    // compress in a register, then a full store (units has 16 spare): a compress to memory is microcoded on Zen 4
    _mm512_storeu_si512(units + n, _mm512_maskz_compress_epi32(m, idx));
    n += __builtin_popcount(unsigned(m));
  }
#endif
  for (; f < F; ++f) {
    units[n] = int32_t(f);
    n += (use_mlp && mlp[f] > lt) || (use_est && est[f] > thr);
  }
  sc.h.resize(n);
  float* h = sc.h.data();
  const int64_t row_bytes = C * int64_t(sizeof(W));
  parallel_ranges(ctx, n, std::max<int64_t>(16, (int64_t(1) << 15) / row_bytes), [&](int64_t j0, int64_t j1) {
    act_dots(x, j1 - j0, C, [&](int64_t j) { return kr + int64_t(units[j0 + j]) * C; }, h + j0);
    for (int64_t j = j0; j < j1; ++j) {
      float k = h[j];
      if (ks.size) k *= x.scale * ks.data[units[j]];
      h[j] = k > 0 ? k * k : 0.0f;
    }
  }, 16);   // whole 16s: dot16's groups
  Act<W> hv;   // h as the value product's activations
  hv.set(h, n);
  using Acc = typename Act<W>::Acc;
  thread_local std::vector<Acc> acc_buf;
  acc_buf.assign(C, Acc(0));
  Acc* acc = acc_buf.data();
  const float* vsd = vs.size ? vs.data : nullptr;
  const auto finish = [&](int64_t c0, int64_t c1) {   // y from the accumulators
    for (int64_t c = c0; c < c1; ++c) y[c] = vsd ? float(acc[c]) * (hv.scale * vsd[c]) : float(acc[c]);
  };
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if constexpr (std::is_same_v<W, int8_t>) {
    if (hv.zp == 0) {   // relu^2 >= 0: codes from 0 (always, but the general case stays below)
      sc.rows.clear(), sc.u.clear();
      for (int64_t j = 0; j < n; ++j)
        if (hv.u[j]) sc.rows.push_back(vr + int64_t(units[j]) * C), sc.u.push_back(hv.u[j]);
      const uint8_t* u = sc.u.data();
      const int8_t* const* rows = sc.rows.data();
      const int64_t nr = int64_t(sc.rows.size());
      parallel_ranges(ctx, C, std::max<int64_t>(64, (int64_t(1) << 15) / std::max<int64_t>(1, nr)),
                      [&](int64_t c0, int64_t c1) {
        rows_axpy_u8(u, rows, nr, c0, c1, acc);
        finish(c0, c1);
      }, 64);
      return;
    }
  }
#endif
  for (int64_t j = 0; j < n; ++j) {
    const Acc hj = hv.at(j);
    if (hj == 0) continue;
    const W* v = vr + int64_t(units[j]) * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) acc[c] += hj * Acc(v[c]);
  }
  finish(0, C);
}

// max of v[0 .. n) ignoring NaNs (as std::max(acc, v) folds), from `init`; nan: whether any v is NaN
inline float max_skip_nan(const float* v, int64_t n, float init, bool* nan = nullptr) {
  int64_t i = 0;
  bool any_nan = false;
#ifdef __AVX512F__
  __m512 a = _mm512_set1_ps(init);
  __mmask16 un = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(v + i);
    a = _mm512_max_ps(x, a);   // NaN in x: a (the second operand)
    un |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  }
  init = _mm512_reduce_max_ps(a);
  any_nan = un != 0;
#endif
  for (; i < n; ++i) {
    init = std::max(init, v[i]);
    any_nan |= std::isnan(v[i]);
  }
  if (nan) *nan = any_nan;
  return init;
}

// The clustered head's argmax without its V logits: the largest is an exact logit or, for a cluster not
// chosen, approx[c] + max log q over c (rounding is monotonic: no token of c can exceed it); ties go to the
// smallest token id, as np.argmax over the logits (exact logits overwrite their tokens' approximations).
// Only clusters holding the largest value are scanned token by token. mlq: each cluster's max log q (empty
// without a prior). -1 when the largest is NaN.
int64_t head_top(const std::vector<float>& exact, const std::vector<int32_t>& chosen, const std::vector<float>& approx,
                 const int32_t* bounds, const int32_t* tok, const Tensor& lq, const Tensor& mlq, int64_t K) {
  std::vector<uint8_t> is_chosen(K, 0);
  for (int32_t c : chosen) is_chosen[c] = 1;
  const auto cluster_best = [&](int64_t c) { return approx[c] + (mlq.size ? mlq.data[c] : 0.0f); };
  bool nan = false;
  float best = max_skip_nan(exact.data(), int64_t(exact.size()), -INFINITY, &nan);
  for (int64_t c = 0; c < K; ++c)
    if (!is_chosen[c] && bounds[c + 1] > bounds[c]) best = std::max(best, cluster_best(c));
  if (std::isnan(best) || nan) return -1;
  int64_t top = INT64_MAX;
  size_t e = 0;
  for (int32_t c : chosen) {
    const int64_t r0 = bounds[c], r1 = bounds[c + 1];
    int64_t r = r0;
#ifdef __AVX512F__
    const __m512 vb = _mm512_set1_ps(best);
    for (; r + 16 <= r1; r += 16, e += 16) {   // 16 at a time: only a match is looked at one by one
      __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(exact.data() + e), vb, _CMP_EQ_OQ);
      for (; m; m &= m - 1) top = std::min<int64_t>(top, tok[r + __builtin_ctz(m)]);
    }
#endif
    for (; r < r1; ++r, ++e)
      if (exact[e] == best) top = std::min<int64_t>(top, tok[r]);
  }
  for (int64_t c = 0; c < K; ++c) {
    if (is_chosen[c] || bounds[c + 1] == bounds[c] || cluster_best(c) != best) continue;
    for (int64_t r = bounds[c]; r < bounds[c + 1]; ++r)
      if (approx[c] + (lq.size ? lq.data[tok[r]] : 0.0f) == best) top = std::min<int64_t>(top, tok[r]);
  }
  return top == INT64_MAX ? -1 : top;
}

// Rwkv7ClusteredHead(x (C,) or (1, C), z (K,), rows (V, C), row scale (V,), bounds (K + 1,), row_token (V,),
// token_cluster (V,), token_log_q (V,) or empty) -> logits (V,) or (1, V) in token order.
//   log p = log_softmax(z); clusters by descending p, the j-th chosen iff j < min_k, or j < max_k and the
//   clusters before it hold < top_p; exact logits x . row (int8 rows: x as 8-bit activations, Act) for
//   the chosen clusters' rows (rows cluster by cluster, bounds[c] .. bounds[c+1]), every other token t gets
//   approx[c(t)] + log q_t with approx = log p + logsumexp(exact) - log(sum of the chosen clusters' p),
//   log q_t the token's log prior (empty: log q = -log |c|).
// Rwkv7ClusteredHeadTop (op set 4): two more inputs, each cluster's max log q (K,) or empty, and mode (1,)
// int64; a second output, top (1,) int64, np.argmax of the logits (head_top). Mode 1 writes no logits
// (shape (0,)): a greedy decode step reads the chosen clusters' rows and never writes the V logits.
template <class W, bool TOP = false>
void clustered_head_compute(const Attrs& at, OrtKernelContext* ctx) {
  Tensor x = input(ctx, 0), z = input(ctx, 1), rows = input(ctx, 2), rs = input(ctx, 3), bnd = input(ctx, 4),
         rtok = input(ctx, 5), tcl = input(ctx, 6), lq = input(ctx, 7);
  const int64_t C = x.size, K = z.size, V = rows.dims[0];
  // Top: with logits (mode 0) or only the top token (mode 1: logits (0,))
  const bool write = !TOP || input(ctx, 9).raw<int64_t>()[0] == 0;
  const int64_t odims[2] = {1, write ? V : 0};   // x (C,): logits (V,); x (1, C): (1, V)
  float* out = x.rank <= 1 ? output(ctx, 0, odims + 1, 1) : output(ctx, 0, odims, 2);
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
  // descending p, ties in cluster order (a stable sort's order), sorted only as far as the ranks taken:
  // the first 16, then twice as many each time more are needed
  const auto before = [&](int32_t a, int32_t b) { return prob[a] > prob[b] || (prob[a] == prob[b] && a < b); };
  int64_t ranked = 0;
  std::vector<int32_t> chosen;
  float mass = 0;   // of the clusters taken so far: the mass before the next rank
  for (int64_t j = 0; j < K; ++j) {
    const bool take = j < at.min_k || (j < at.max_k && mass < at.top_p);
    if (!take) break;   // the mass before a rank only grows: no later rank is taken either
    if (j == ranked) {
      ranked = std::min<int64_t>(K, std::max<int64_t>(16, 2 * ranked));
      std::partial_sort(order.begin() + j, order.begin() + ranked, order.end(), before);
    }
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
  // the exact products of the chosen rows [e0, e1) in file order, cluster by cluster (start: each chosen
  // cluster's first index in that order)
  std::vector<int64_t> start(chosen.size() + 1, 0);
  for (size_t i = 0; i < chosen.size(); ++i) start[i + 1] = start[i] + bounds[chosen[i] + 1] - bounds[chosen[i]];
  const auto exact_rows = [&](int64_t e0, int64_t e1) {
    size_t i = std::upper_bound(start.begin(), start.end(), e0) - start.begin() - 1;
    for (; i < chosen.size() && start[i] < e1; ++i) {
      const int64_t a = std::max(e0, start[i]), b = std::min(e1, start[i + 1]);
      const int64_t r0 = bounds[chosen[i]] + (a - start[i]);
      float* ex = exact.data() + a;
      act_dots(xa, b - a, C, [&](int64_t j) { return rw + (r0 + j) * C; }, ex);
      if (rs.size) {
        const float xs = xa.scale;
        const float* rsc = rs.data + r0;
#pragma omp simd
        for (int64_t j = 0; j < b - a; ++j) ex[j] = ex[j] * (xs * rsc[j]);
      }
    }
  };
  // over the intra-op threads where they are large (a 0.1B-shaped head reads ~3.5 MB of rows a token; a small
  // model's few hundred KB stay on one thread, where waking another did not pay)
  parallel_ranges(ctx, n, std::max<int64_t>(16, (int64_t(1) << 18) / (C * int64_t(sizeof(W)))), exact_rows, 16);
  const float emax = max_skip_nan(exact.data(), n, -INFINITY);
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
  const int32_t* tok = rtok.raw<int32_t>();
  if (TOP) {   // the first token of the largest logit, as np.argmax of the logits below finds it (-1: NaN)
    const int64_t one = 1;
    int64_t* top = reinterpret_cast<int64_t*>(output(ctx, 1, &one, 1));
    top[0] = head_top(exact, chosen, approx, bounds, tok, lq, input(ctx, 8), K);
    if (!write) return;
  }
  // every token's approximate logit, over the intra-op threads (~20 us for 65536 tokens on one)
  parallel_ranges(ctx, V, 1 << 14, [&](int64_t lo, int64_t hi) {
    int64_t t = lo;
#ifdef __AVX512F__
    for (; t + 16 <= hi; t += 16) {   // 16 table lookups a gather
      const __m512i idx = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tc + t)));
      __m512 v = _mm512_i32gather_ps(idx, approx.data(), 4);
      if (lq.size) v = _mm512_add_ps(v, _mm512_loadu_ps(lq.data + t));
      _mm512_storeu_ps(out + t, v);
    }
#endif
    for (; t < hi; ++t) out[t] = approx[tc[t]] + (lq.size ? lq.data[t] : 0.0f);
  }, 16);
  int64_t e = 0;
  for (int32_t c : chosen)
    for (int64_t r = bounds[c]; r < bounds[c + 1]; ++r) out[tok[r]] = exact[e++];
}

// ---- quantised matrix-vector products (version 3) --------------------------------------------------------

// Rwkv7MatVecQ(x (.., K), codes (N, nb, G bits / 8) uint8, scales (N, nb), zero points (N, ceil(nb / 2))
// 4-bit packed, or empty)  attrs bits (4 or 8), block (G) -> y (.., N) = W x for W in MatMulNBits' layout
// (w = (code - zero) * scale; without zero points the zero is 2^(bits - 1); 8-bit codes take no zero points).
// It computes what MatMulNBits' accuracy level 4 computes: x quantised to int8 per block of G (scale
// max |x| / 127, rounded half to even), an integer dot product per block, then the two scales; the step's
// one row streams the codes with AVX-512 VNNI, rows split over the session's intra-op threads.
//
// A row's codes are read in chunks of 64 bytes (128 4-bit or 64 8-bit weights): 16 int32 lanes of
// vpdpbusd, each the dot product of 8 (4) codes with the matching activation codes, which are laid out
// per call to match (for 4-bit codes each chunk's even elements, then its odd ones: a byte's low and high
// nibbles). The zero points' term, sum_b zero_b scale_b xscale_b sum(x codes of block b), is one short dot
// product per row over its blocks.
struct MatVecQ {
  int64_t K, N, nb, G, bits, row_bytes, zb;
  int64_t chunk;                  // weights per 64-byte chunk
  int64_t nch;                    // chunks per row
  bool packed;                    // rows of at most 64 bytes dividing 64, read several a vector (rows_packed)
  const uint8_t* codes;
  const float* scales;
  const uint8_t* zeros;           // nullptr: the default zero point
  std::vector<int8_t> q;          // x's codes in order (scratch)
  std::vector<int8_t> xq;         // per chunk: 64 (8-bit) or 128 (4-bit: even, odd) activation codes
  std::vector<float> xscale;      // per block: the activation scale (padded to whole 16s)
  std::vector<float> lane_scale;  // per chunk and lane: its block's activation scale (blocks smaller than a chunk)
  std::vector<float> zsum;        // per block: xscale * the sum of its activation codes (padded to whole 16s)
  std::vector<float> rep_sum;     // packed rows (matvec_rows_packed): per lane, the sum of its activation codes
  std::vector<int32_t> lane_zero; // no zero points (4-bit, all 8): per chunk and lane, -8 x the sum of its
                                  // activation codes, vpdpbusd's starting value (the zero points' term in the lanes)
  // op set 7, rows interleaved 16 a vector (matvec_rows16): 4-bit codes (N16, nb, 8 G), float16 scales
  // (N16, nb, 16), zero points (N16, nb, 8) (16 nibbles, row 2i low, 2i + 1 high) or null; 8-bit codes
  // (N16, nb, 16 G), float32 scales (N16, 16) in `scales`
  bool i16 = false;
  const uint16_t* hscales = nullptr;
  std::vector<int32_t> nsum;      // i16: per block, minus the sum of its activation codes
};

// block b of x (lo .. hi) quantised to q[lo .. hi): its scale max |x| / 127 and the sum of its codes
inline int32_t quantise_block(const float* x, int64_t lo, int64_t hi, int8_t* q, float& scale) {
  int64_t i = lo;
  float amax = 0;
#ifdef __AVX512F__
  __m512 vmax = _mm512_setzero_ps();
  for (; i + 16 <= hi; i += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
  amax = _mm512_reduce_max_ps(vmax);
#endif
  for (; i < hi; ++i) amax = std::max(amax, std::fabs(x[i]));
  scale = amax / 127.0f;
  const float inv = amax > 0 ? 127.0f / amax : 0.0f;
  int32_t s = 0;
  i = lo;
#ifdef __AVX512F__
  // x inv rounded half to even (the default rounding mode, as nearbyint), then clamped: the same codes
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512i lim = _mm512_set1_epi32(127), nlim = _mm512_set1_epi32(-127);
  __m512i vs = _mm512_setzero_si512();
  for (; i + 16 <= hi; i += 16) {
    const __m512i c = _mm512_max_epi32(nlim, _mm512_min_epi32(lim, _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + i), vinv))));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(c));
    vs = _mm512_add_epi32(vs, c);
  }
  s = _mm512_reduce_add_epi32(vs);
#endif
  for (; i < hi; ++i) {
    q[i] = int8_t(std::nearbyint(std::max(-127.0f, std::min(127.0f, x[i] * inv))));
    s += q[i];
  }
  return s;
}

void matvec_prepare16(MatVecQ& m, const float* x);   // below

// x's codes and tables for one row of x
void matvec_prepare(MatVecQ& m, const float* x) {
  if (m.i16) return matvec_prepare16(m, x);
  const int64_t Kp = m.nch * m.chunk, wpl = m.chunk / 16, nbp = (m.nb + 15) / 16 * 16;
  std::vector<int8_t>& q = m.q;
  q.resize(Kp);
  std::fill(q.begin() + m.K, q.end(), int8_t(0));
  m.xscale.assign(std::max(nbp, Kp / m.G + 1), 0.0f);
  m.zsum.assign(nbp, 0.0f);
  for (int64_t b = 0; b * m.G < m.K; ++b) {
    const int64_t lo = b * m.G, hi = std::min(m.K, lo + m.G);
    const int32_t s = quantise_block(x, lo, hi, q.data(), m.xscale[b]);
    m.zsum[b] = m.xscale[b] * float(s);
  }
  m.xq.resize(m.nch * (m.bits == 4 ? 128 : 64));
  m.lane_scale.resize(m.nch * 16);
  for (int64_t c = 0; c < m.nch; ++c) {
    const int8_t* qc = q.data() + c * m.chunk;
    int8_t* out = m.xq.data() + c * (m.bits == 4 ? 128 : 64);
    if (m.bits == 4) {
#if defined(__AVX512VBMI__)
      // a chunk's even codes, then its odd ones: one two-source byte permutation each
      alignas(64) static const struct Idx { uint8_t e[64], o[64]; Idx() { for (int j = 0; j < 64; ++j) e[j] = uint8_t(2 * j), o[j] = uint8_t(2 * j + 1); } } idx;
      const __m512i a = _mm512_loadu_si512(qc), b = _mm512_loadu_si512(qc + 64);
      _mm512_storeu_si512(out, _mm512_permutex2var_epi8(a, _mm512_load_si512(idx.e), b));
      _mm512_storeu_si512(out + 64, _mm512_permutex2var_epi8(a, _mm512_load_si512(idx.o), b));
#else
      for (int64_t j = 0; j < 64; ++j) out[j] = qc[2 * j], out[64 + j] = qc[2 * j + 1];
#endif
    } else {
      std::memcpy(out, qc, 64);
    }
    if ((m.G & (m.G - 1)) == 0) {   // blocks of a power of two (all MatMulNBits blocks): a shift, not a division
      const int sh = __builtin_ctzll(uint64_t(m.G));
      for (int64_t l = 0; l < 16; ++l) m.lane_scale[c * 16 + l] = m.xscale[(c * m.chunk + l * wpl) >> sh];
    } else {
      for (int64_t l = 0; l < 16; ++l) m.lane_scale[c * 16 + l] = m.xscale[(c * m.chunk + l * wpl) / m.G];
    }
  }
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if (!m.zeros && m.bits == 4 && !m.packed) {
    m.lane_zero.resize(m.nch * 16);
    const __m512i ones = _mm512_set1_epi8(1), m8 = _mm512_set1_epi32(-8);
    for (int64_t c = 0; c < m.nch; ++c) {
      const int8_t* xc = m.xq.data() + c * 128;
      __m512i t = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_loadu_si512(xc));
      t = _mm512_dpbusd_epi32(t, ones, _mm512_loadu_si512(xc + 64));
      _mm512_storeu_si512(m.lane_zero.data() + c * 16, _mm512_mullo_epi32(t, m8));
    }
  }
#endif
  if (m.packed) {   // one row's tables repeated for each row of a vector (per divides 64)
    const int64_t per = m.row_bytes, lanes = per / 4;
    int8_t* xq = m.xq.data();
    for (int64_t j = per; j < 64; j += per) {
      std::memcpy(xq + j, xq, per);
      if (m.bits == 4) std::memcpy(xq + 64 + j, xq + 64, per);
    }
    m.rep_sum.resize(16);
    for (int64_t l0 = 0; l0 < lanes; ++l0) {
      int32_t sum = 0;
      for (int64_t j = 0; j < wpl; ++j) sum += q[l0 * wpl + j];
      for (int64_t l = l0; l < 16; l += lanes) {
        m.rep_sum[l] = float(sum);
        m.lane_scale[l] = m.xscale[l0 * wpl / m.G];
      }
    }
  }
}

inline float zero_point(const MatVecQ& m, int64_t n, int64_t b) {
  if (!m.zeros) return float(int64_t(1) << (m.bits - 1));
  const uint8_t z = m.zeros[n * m.zb + b / 2];
  return float((b & 1) ? z >> 4 : z & 15);
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
// 16 lanes of sum_b zero_b * scale_b * zsum_b for row n (the caller subtracts them before its lane sum)
inline __m512 matvec_zero_term(const MatVecQ& m, int64_t n) {
  const float* srow = m.scales + n * m.nb;
  __m512 acc = _mm512_setzero_ps();
  for (int64_t b = 0; b < m.nb; b += 16) {
    const __mmask16 k = m.nb - b >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (m.nb - b)) - 1);
    __m512 z;
    if (m.zeros) {   // 16 blocks' zero points: 8 bytes, low nibble first
      const int64_t nbytes = std::min<int64_t>(8, m.zb - b / 2);
      const __m128i zb8 = _mm_maskz_loadu_epi8(__mmask16((1u << nbytes) - 1), m.zeros + n * m.zb + b / 2);
      const __m128i nib = _mm_set1_epi8(15);
      const __m128i z16 = _mm_unpacklo_epi8(_mm_and_si128(zb8, nib), _mm_and_si128(_mm_srli_epi16(zb8, 4), nib));
      z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(z16));
    } else {
      z = _mm512_set1_ps(float(int64_t(1) << (m.bits - 1)));
    }
    acc = _mm512_fmadd_ps(_mm512_mul_ps(z, _mm512_maskz_loadu_ps(k, srow + b)), _mm512_loadu_ps(m.zsum.data() + b), acc);
  }
  return acc;
}

// Rows of at most 64 bytes that divide 64 (K = nb G of 32, 64 or 128 4-bit or 16, 32, 64 8-bit weights):
// R = 64 / row_bytes rows a vector. Codes and scales of consecutive rows are contiguous, so a vector of R
// rows reads like one chunk of several blocks: lane l holds weights wpl l .. of the R rows' codes, its scale
// is scales[n0 nb + wpl l / G]; its zero point is nibble zidx[l] from row n0's zero points, and the
// activation tables repeat x's per row (MatVecQ.rep_*). y[n0 .. n1), n0 a multiple of 16.
template <int BITS>
void matvec_rows_packed(const MatVecQ& m, int64_t n0, int64_t n1, float* y) {
  constexpr int64_t wpl = BITS == 4 ? 8 : 4;
  const int64_t R = 64 / m.row_bytes, lanes = 16 / R;   // rows a vector, lanes a row
  int32_t sidx[16], zsh[16];
  for (int64_t l = 0; l < 16; ++l) {
    const int64_t r = l / lanes, b = (l % lanes) * wpl / m.G;
    sidx[l] = int32_t(r * m.nb + b);
    zsh[l] = int32_t(4 * (r * 2 * m.zb + b));   // the nibble's bit offset from row n0's first zero byte
  }
  const __m512i vsidx = _mm512_loadu_si512(sidx), vzsh = _mm512_loadu_si512(zsh), nib = _mm512_set1_epi8(15),
                z15 = _mm512_set1_epi32(15);
  const __m512 zdef = _mm512_set1_ps(float(int64_t(1) << (BITS - 1)));
  const __m512 ls = _mm512_loadu_ps(m.lane_scale.data()), lsum = _mm512_loadu_ps(m.rep_sum.data());
  const __m512i xe = _mm512_loadu_si512(m.xq.data()), xo = _mm512_loadu_si512(m.xq.data() + 64);
  for (int64_t n = n0; n < n1; n += 16) {
    __m512 v[16];
    const int64_t nv = 16 / R;
    for (int64_t i = 0; i < nv; ++i) {
      const int64_t r0 = n + i * R, have = std::max<int64_t>(0, std::min<int64_t>(R, m.N - r0));
      const uint8_t* codes = m.codes + r0 * m.row_bytes;
      const __m512i w = have == R ? _mm512_loadu_si512(codes)
                                  : _mm512_maskz_loadu_epi8(have ? (~__mmask64(0) >> (64 - have * m.row_bytes)) : 0, codes);
      __m512i d;
      if (BITS == 4) {
        d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(w, nib), xe);
        d = _mm512_dpbusd_epi32(d, _mm512_and_si512(_mm512_srli_epi16(w, 4), nib), xo);
      } else {
        d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xe);
      }
      const int64_t ns = have * m.nb;   // scales of these rows
      const __m512 sc = _mm512_permutexvar_ps(vsidx, _mm512_maskz_loadu_ps(__mmask16((1u << ns) - 1), m.scales + r0 * m.nb));
      __m512 z = zdef;
      if (BITS == 4 && m.zeros) {
        uint32_t zz = 0;   // 4 bytes from row r0's zero points (past these rows' only when inside the tensor)
        const uint8_t* zp = m.zeros + r0 * m.zb;
        if (r0 * m.zb + 4 <= m.N * m.zb) std::memcpy(&zz, zp, 4);
        else for (int64_t j = 0; j < have * m.zb; ++j) zz |= uint32_t(zp[j]) << (8 * j);
        z = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(int32_t(zz)), vzsh), z15));
      }
      const __m512 t = _mm512_fnmadd_ps(z, lsum, _mm512_cvtepi32_ps(d));
      v[i] = _mm512_mul_ps(_mm512_mul_ps(t, ls), sc);
    }
    const __m512 out = lane_sums16(v, R == 4 ? 2 : R == 2 ? 1 : 0);
    const int64_t k = std::min<int64_t>(16, n1 - n);
    _mm512_mask_storeu_ps(y + n, __mmask16((1u << k) - 1), out);
  }
}

// row n's 16 lane partials of codes in blocks smaller than a chunk (4-bit G < 128, 8-bit G < 64: several
// blocks a chunk, lane scales by permutation), the zero points' term subtracted
template <int BITS, int64_t G>
inline __m512 matvec_row_small(const MatVecQ& m, int64_t n, __mmask64 tail_mask, __mmask16 tail_smask) {
  constexpr int64_t chunk = BITS == 4 ? 128 : 64, wpl = chunk / 16, bpc = chunk / G;
  alignas(64) static const int32_t rel[16] = {0 * wpl / G, 1 * wpl / G, 2 * wpl / G, 3 * wpl / G, 4 * wpl / G,
                                              5 * wpl / G, 6 * wpl / G, 7 * wpl / G, 8 * wpl / G, 9 * wpl / G,
                                              10 * wpl / G, 11 * wpl / G, 12 * wpl / G, 13 * wpl / G,
                                              14 * wpl / G, 15 * wpl / G};
  const __m512i vrel = _mm512_load_si512(rel), nib = _mm512_set1_epi8(15);
  const uint8_t* row = m.codes + n * m.row_bytes;
  const float* srow = m.scales + n * m.nb;
  // 4-bit without zero points: their term starts each chunk's lanes (lane_zero); else one dot a row
  const bool folded = BITS == 4 && !m.zeros;
  __m512 acc0 = _mm512_setzero_ps(), acc1 = folded ? acc0 : _mm512_sub_ps(acc0, matvec_zero_term(m, n));
  for (int64_t c = 0; c < m.nch; ++c) {
    const bool last = c + 1 == m.nch;
    const __m512i w = last ? _mm512_maskz_loadu_epi8(tail_mask, row + c * 64) : _mm512_loadu_si512(row + c * 64);
    __m512i d;
    if (BITS == 4) {
      const int8_t* xc = m.xq.data() + c * 128;
      const __m512i d0 = folded ? _mm512_loadu_si512(m.lane_zero.data() + c * 16) : _mm512_setzero_si512();
      d = _mm512_dpbusd_epi32(d0, _mm512_and_si512(w, nib), _mm512_loadu_si512(xc));
      d = _mm512_dpbusd_epi32(d, _mm512_and_si512(_mm512_srli_epi16(w, 4), nib), _mm512_loadu_si512(xc + 64));
    } else {
      d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(m.xq.data() + c * 64));
    }
    const __mmask16 sm = last ? tail_smask : __mmask16((1u << bpc) - 1);
    const __m512 ws = _mm512_permutexvar_ps(vrel, _mm512_maskz_loadu_ps(sm, srow + c * bpc));
    const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(d), _mm512_loadu_ps(m.lane_scale.data() + c * 16));
    if (c & 1) acc1 = _mm512_fmadd_ps(t, ws, acc1);
    else acc0 = _mm512_fmadd_ps(t, ws, acc0);
  }
  return _mm512_add_ps(acc0, acc1);
}

// row n's lane partials of codes whose blocks span whole chunks (4-bit G >= 128, 8-bit G >= 64): one scale
// a block
template <int BITS>
inline __m512 matvec_row_wide(const MatVecQ& m, int64_t n, __mmask64 tail_mask) {
  const int64_t cpb = m.G / m.chunk;                     // chunks per block
  constexpr int64_t xstride = BITS == 4 ? 128 : 64;
  const __m512i nib = _mm512_set1_epi8(15);
  const uint8_t* row = m.codes + n * m.row_bytes;
  const float* srow = m.scales + n * m.nb;
  const bool folded = BITS == 4 && !m.zeros;   // as matvec_row_small
  __m512 acc0 = _mm512_setzero_ps(), acc1 = folded ? acc0 : _mm512_sub_ps(acc0, matvec_zero_term(m, n));
  for (int64_t b = 0; b < m.nb; ++b) {
    __m512i d = _mm512_setzero_si512();
    for (int64_t c = b * cpb; c < (b + 1) * cpb && c < m.nch; ++c) {
      const __m512i w = c + 1 < m.nch ? _mm512_loadu_si512(row + c * 64) : _mm512_maskz_loadu_epi8(tail_mask, row + c * 64);
      const int8_t* xc = m.xq.data() + c * xstride;
      if (BITS == 4) {
        if (folded) d = _mm512_add_epi32(d, _mm512_loadu_si512(m.lane_zero.data() + c * 16));
        d = _mm512_dpbusd_epi32(d, _mm512_and_si512(w, nib), _mm512_loadu_si512(xc));
        d = _mm512_dpbusd_epi32(d, _mm512_and_si512(_mm512_srli_epi16(w, 4), nib), _mm512_loadu_si512(xc + 64));
      } else {
        d = _mm512_dpbusd_epi32(d, w, _mm512_loadu_si512(xc));
      }
    }
    const __m512 s = _mm512_set1_ps(srow[b] * m.xscale[b]);
    if (b & 1) acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc1);
    else acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc0);
  }
  return _mm512_add_ps(acc0, acc1);
}

// y[n0..n1) 16 rows at a time (one vector of lane sums), the rest one by one
template <class RowFn>
void matvec_rows_by16(int64_t n0, int64_t n1, float* y, RowFn row) {
  int64_t n = n0;
  for (; n + 16 <= n1; n += 16) {
    __m512 v[16];
    for (int i = 0; i < 16; ++i) v[i] = row(n + i);
    _mm512_storeu_ps(y + n, lane_sums16(v));
  }
  for (; n < n1; ++n) y[n] = _mm512_reduce_add_ps(row(n));
}

bool matvec_rows_vnni(const MatVecQ& m, int64_t n0, int64_t n1, float* y) {
  if (m.packed) {
    if (m.bits == 4) matvec_rows_packed<4>(m, n0, n1, y);
    else matvec_rows_packed<8>(m, n0, n1, y);
    return true;
  }
  const int64_t tail = m.row_bytes - (m.nch - 1) * 64;   // bytes in a row's last chunk (1..64)
  const __mmask64 tm = tail >= 64 ? ~__mmask64(0) : ((__mmask64(1) << tail) - 1);
  if (m.G < m.chunk) {
    const int64_t bpc = m.chunk / m.G, tail_blocks = m.nb - (m.nch - 1) * bpc;
    const __mmask16 ts = __mmask16((1u << std::min<int64_t>(bpc, tail_blocks)) - 1);
    auto run = [&](auto row) { matvec_rows_by16(n0, n1, y, row); return true; };
    if (m.bits == 4) {
      switch (m.G) {
        case 16: return run([&](int64_t n) { return matvec_row_small<4, 16>(m, n, tm, ts); });
        case 32: return run([&](int64_t n) { return matvec_row_small<4, 32>(m, n, tm, ts); });
        case 64: return run([&](int64_t n) { return matvec_row_small<4, 64>(m, n, tm, ts); });
        default: return false;
      }
    }
    switch (m.G) {
      case 16: return run([&](int64_t n) { return matvec_row_small<8, 16>(m, n, tm, ts); });
      case 32: return run([&](int64_t n) { return matvec_row_small<8, 32>(m, n, tm, ts); });
      default: return false;
    }
  }
  if (m.G % m.chunk) return false;
  if (m.bits == 4) matvec_rows_by16(n0, n1, y, [&](int64_t n) { return matvec_row_wide<4>(m, n, tm); });
  else matvec_rows_by16(n0, n1, y, [&](int64_t n) { return matvec_row_wide<8>(m, n, tm); });
  return true;
}
#endif

#if defined(__AVX2__) && !(defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__))
// R rows n .. n + R - 1 (R <= 4): each half's activation codes and scales are loaded once for all R
template <int64_t G, int R>
inline void matvec_avx2_4_rows(const MatVecQ& m, int64_t n, float* y) {
  constexpr int64_t bph = G >= 64 ? 1 : 64 / G;   // blocks a half
  const __m256i nib = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  const __m256i rel = _mm256_setr_epi32(0 * 8 / G, 1 * 8 / G, 2 * 8 / G, 3 * 8 / G, 4 * 8 / G, 5 * 8 / G,
                                        6 * 8 / G, 7 * 8 / G);
  const int64_t halves = (m.row_bytes + 31) / 32, full = m.row_bytes / 32;
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t p = 0; p < halves; ++p) {
    const int8_t* xc = m.xq.data() + (p / 2) * 128 + (p & 1) * 32;   // even codes; odd ones 64 further
    const __m256i xe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc));
    const __m256i xo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc + 64));
    const __m256 ls = _mm256_loadu_ps(m.lane_scale.data() + 8 * p);
    const int64_t b0 = 64 * p / G;
    const __m128i smask = _mm_cmpgt_epi32(_mm_set1_epi32(int32_t(std::min<int64_t>(bph, m.nb - b0))),
                                          _mm_setr_epi32(0, 1, 2, 3));
    for (int r = 0; r < R; ++r) {
      const uint8_t* row = m.codes + (n + r) * m.row_bytes;
      const float* srow = m.scales + (n + r) * m.nb;
      __m256i w;
      if (p < full) {
        w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * p));
      } else {
        alignas(32) uint8_t pad[32] = {};
        std::memcpy(pad, row + 32 * p, m.row_bytes - 32 * p);
        w = _mm256_load_si256(reinterpret_cast<const __m256i*>(pad));
      }
      const __m256i d16 = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(w, nib), xe),
                                           _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w, 4), nib), xo));
      const __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(d16, ones)), ls);
      const __m256 ws = G >= 64 ? _mm256_set1_ps(srow[b0])
                                : _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_maskload_ps(srow + b0, smask)), rel);
      acc[r] = _mm256_fmadd_ps(t, ws, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const float* srow = m.scales + (n + r) * m.nb;
    float zt = 0;
    if (m.zeros) {
      for (int64_t b = 0; b < m.nb; ++b) zt += zero_point(m, n + r, b) * srow[b] * m.zsum[b];
    } else {   // the default zero point: one dot product, vectorised
      for (int64_t b = 0; b < m.nb; ++b) zt += srow[b] * m.zsum[b];
      zt *= float(int64_t(1) << (m.bits - 1));
    }
    y[n + r] = hsum256(acc[r]) - zt;
  }
}

// AVX2 (no VNNI), 4-bit codes: a row is read 32 bytes (64 weights, one half of a VNNI chunk) at a time,
// four rows together. vpmaddubsw multiplies the low and the high nibbles with their activation codes
// (pairs of at most 2 * 15 * 127: no saturation), vpmaddwd sums pairs into 8 int32 lanes of 8 weights
// each; lane l of half p lies in block (64 p + 8 l) / G, so its activation scale is lane_scale[8 p + l]
// and its weight scale srow[that block] (G >= 64: one block a half, broadcast; G = 16 / 32: 4 / 2 scales
// a half, loaded masked and spread by a permutation). The zero points' term is subtracted per row, as
// the portable code does. A row's last half, when its bytes end inside it, is read from a zero-padded copy.
template <int64_t G>
void matvec_rows_avx2_4(const MatVecQ& m, int64_t n0, int64_t n1, float* y) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) matvec_avx2_4_rows<G, 4>(m, n, y);
  for (; n < n1; ++n) matvec_avx2_4_rows<G, 1>(m, n, y);
}

bool matvec_rows_avx2(const MatVecQ& m, int64_t n0, int64_t n1, float* y) {
  if (m.bits != 4) return false;
  switch (m.G) {
    case 16: matvec_rows_avx2_4<16>(m, n0, n1, y); return true;
    case 32: matvec_rows_avx2_4<32>(m, n0, n1, y); return true;
    case 64: matvec_rows_avx2_4<64>(m, n0, n1, y); return true;
    case 128: matvec_rows_avx2_4<128>(m, n0, n1, y); return true;
    case 256: matvec_rows_avx2_4<256>(m, n0, n1, y); return true;
    default: return false;
  }
}
#endif

// portable: the same integer sums per block, then the same float steps
void matvec_rows_portable(const MatVecQ& m, int64_t n0, int64_t n1, float* y) {
  std::vector<int8_t> xs(m.nb * m.G, 0);   // activation codes in natural order
  const int64_t xstride = m.bits == 4 ? 128 : 64;
  for (int64_t e = 0; e < m.nb * m.G && e < m.nch * m.chunk; ++e) {
    const int64_t c = e / m.chunk, i = e % m.chunk;
    xs[e] = m.bits == 4 ? m.xq[c * xstride + (i & 1) * 64 + i / 2] : m.xq[c * xstride + i];
  }
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = m.codes + n * m.row_bytes;
    float acc = 0;
    for (int64_t b = 0; b < m.nb; ++b) {
      int32_t d = 0;
      for (int64_t i = 0; i < m.G; ++i) {
        const int64_t e = b * m.G + i;
        const int32_t code = m.bits == 4 ? ((e & 1) ? row[e / 2] >> 4 : row[e / 2] & 15) : row[e];
        d += code * int32_t(xs[e]);
      }
      const float s = m.scales[n * m.nb + b];
      acc += float(d) * m.xscale[b] * s - zero_point(m, n, b) * s * m.zsum[b];
    }
    y[n] = acc;
  }
}

void matvec_rows16(const MatVecQ& m, int64_t n0, int64_t n1, float* y);   // below

void matvec_rows(const MatVecQ& m, int64_t n0, int64_t n1, float* y) {
  if (m.i16) return matvec_rows16(m, n0, n1, y);
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if (matvec_rows_vnni(m, n0, n1, y)) return;
#elif defined(__AVX2__)
  if (matvec_rows_avx2(m, n0, n1, y)) return;
#endif
  matvec_rows_portable(m, n0, n1, y);
}

// ---- 4-bit and int8 matrices interleaved 16 rows a vector (version 7) -----------------------------------
//
// MatMulNBits' layout keeps a row's codes together: the step's one-row product then costs ~14 vector
// operations per 64 bytes (the activation codes loaded per chunk, the blocks' scales spread over the lanes,
// a zero-point dot product and a lane sum per row). In the interleaved layout (passes.quant.interleave16) the
// 64 bytes at (group g of 16 rows, block b, step j) hold, for each row r of the group, its 4 bytes at 4 r:
// byte i = code(k = b G + 8 j + i) | code(k + 4) << 4. Lane r of vpdpbusd is then row r: the low nibbles
// take x's codes k .. k + 3 and the high ones k + 4 .. k + 7, one 32-bit broadcast each (in x's order, no
// tables), and a block ends with one vector of 16 rows' scales (float16) and zero points: ~6 operations per
// 64 bytes and no lane sums (1.9-4.3x the row layout's speed on the 0.1B's shapes, hot in cache). int8: rows16_vnni8.
//   block b's integer sum per row: (z_r) (-sum of x's codes in b) + sum_k code_k x_k  (the zero points' term
//   as vpdpbusd's starting value); y_r = sum_b that * scale_r,b * xscale_b
// x is quantised as Rwkv7MatVecQ quantises it (MatMulNBits' accuracy level 4): the same integers.

// IEEE half -> float (exact), for the paths without F16C
inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16, e = (h >> 10) & 31, f = h & 1023;
  uint32_t bits;
  if (e == 31) bits = sign | 0x7F800000u | (f << 13);
  else if (e) bits = sign | ((e + 112) << 23) | (f << 13);
  else if (!f) bits = sign;
  else {   // subnormal: f 2^-24
    float v = float(f) * 5.9604644775390625e-8f;
    std::memcpy(&bits, &v, 4);
    bits |= sign;
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// one token's activations for the interleaved kernels
struct Acts16 {
  const int8_t* q;        // codes, nb G (zero past K)
  const float* xscale;    // per block
  const int32_t* nsum;    // per block: minus the sum of its codes
  float* y;               // the output row (N)
};

// x's codes into q (nb G, zero padded), scales and minus code sums per block
void quantise16(const float* x, int64_t K, int64_t G, int64_t nb, int8_t* q, float* xscale, int32_t* nsum) {
  std::fill(q + K, q + nb * G, int8_t(0));
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t lo = b * G, hi = std::min(K, lo + G);
    nsum[b] = lo < hi ? -quantise_block(x, lo, hi, q, xscale[b]) : 0;
    if (lo >= hi) xscale[b] = 0.0f;
  }
}

void matvec_prepare16(MatVecQ& m, const float* x) {
  m.q.resize(m.nb * m.G);
  m.xscale.resize(m.nb);
  m.nsum.resize(m.nb);
  quantise16(x, m.K, m.G, m.nb, m.q.data(), m.xscale.data(), m.nsum.data());
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
// groups g0 .. g1 of 16 rows for TT tokens at once (each vector's nibbles split once, then TT vpdpbusd
// pairs); a group past row N - 1 stores only its rows
template <int64_t G, int TT>
void rows16_vnni(const MatVecQ& m, const Acts16* a, int64_t g0, int64_t g1) {
  constexpr int64_t vpb = G / 8;   // vectors a block
  const __m512i nib = _mm512_set1_epi8(15);
  const __m128i n15 = _mm_set1_epi8(15);
  const int64_t gstride = m.nb * G * 8;
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* wc = m.codes + g * gstride;
    const uint16_t* sc = m.hscales + g * m.nb * 16;
    const uint8_t* zc = m.zeros ? m.zeros + g * m.nb * 8 : nullptr;
    __m512 f[TT];
    for (int t = 0; t < TT; ++t) f[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < m.nb; ++b) {
      __m512i z;   // the 16 rows' zero points of this block
      if (zc) {
        const __m128i z8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(zc + b * 8));
        z = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(_mm_and_si128(z8, n15), _mm_and_si128(_mm_srli_epi16(z8, 4), n15)));
      } else {
        z = _mm512_set1_epi32(8);
      }
      __m512i acc[TT][2];
      for (int t = 0; t < TT; ++t) {
        acc[t][0] = _mm512_mullo_epi32(z, _mm512_set1_epi32(a[t].nsum[b]));
        acc[t][1] = _mm512_setzero_si512();
      }
      // two vectors a step, each into its own accumulator (vpb is even; indexing the accumulators by a
      // run-time j & 1 kept them on the stack)
      for (int64_t j = 0; j < vpb; j += 2) {
        for (int u = 0; u < 2; ++u) {
          const __m512i w = _mm512_loadu_si512(wc + (b * vpb + j + u) * 64);
          const __m512i lo = _mm512_and_si512(w, nib), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), nib);
          for (int t = 0; t < TT; ++t) {
            int32_t x0, x1;
            std::memcpy(&x0, a[t].q + b * G + 8 * (j + u), 4);
            std::memcpy(&x1, a[t].q + b * G + 8 * (j + u) + 4, 4);
            acc[t][u] = _mm512_dpbusd_epi32(acc[t][u], lo, _mm512_set1_epi32(x0));
            acc[t][u] = _mm512_dpbusd_epi32(acc[t][u], hi, _mm512_set1_epi32(x1));
          }
        }
      }
      const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + b * 16)));
      for (int t = 0; t < TT; ++t)
        f[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc[t][0], acc[t][1])),
                               _mm512_mul_ps(s, _mm512_set1_ps(a[t].xscale[b])), f[t]);
    }
    const int64_t k = std::min<int64_t>(16, m.N - g * 16);
    for (int t = 0; t < TT; ++t) _mm512_mask_storeu_ps(a[t].y + g * 16, __mmask16((1u << k) - 1), f[t]);
  }
}

// 8-bit codes (uint8, q + 128): each 64 bytes hold 4 weights of each of the 16 rows, one vpdpbusd a token
// against x's codes k .. k + 3; the zero point is 128 for every row, the scale one a row (float32), applied
// once at the end
template <int64_t G, int TT>
void rows16_vnni8(const MatVecQ& m, const Acts16* a, int64_t g0, int64_t g1) {
  constexpr int64_t vpb = G / 4;
  const int64_t gstride = m.nb * G * 16;
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* wc = m.codes + g * gstride;
    __m512 f[TT];
    for (int t = 0; t < TT; ++t) f[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < m.nb; ++b) {
      __m512i acc[TT][2];
      for (int t = 0; t < TT; ++t) {
        acc[t][0] = _mm512_set1_epi32(128 * a[t].nsum[b]);
        acc[t][1] = _mm512_setzero_si512();
      }
      for (int64_t j = 0; j < vpb; j += 2)   // two vectors a step (as rows16_vnni)
        for (int u = 0; u < 2; ++u) {
          const __m512i w = _mm512_loadu_si512(wc + (b * vpb + j + u) * 64);
          for (int t = 0; t < TT; ++t) {
            int32_t x0;
            std::memcpy(&x0, a[t].q + b * G + 4 * (j + u), 4);
            acc[t][u] = _mm512_dpbusd_epi32(acc[t][u], w, _mm512_set1_epi32(x0));
          }
        }
      for (int t = 0; t < TT; ++t)
        f[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc[t][0], acc[t][1])),
                               _mm512_set1_ps(a[t].xscale[b]), f[t]);
    }
    const __m512 s = _mm512_loadu_ps(m.scales + g * 16);
    const int64_t k = std::min<int64_t>(16, m.N - g * 16);
    for (int t = 0; t < TT; ++t) _mm512_mask_storeu_ps(a[t].y + g * 16, __mmask16((1u << k) - 1), _mm512_mul_ps(f[t], s));
  }
}

#endif

// fn<G, ...>(m, a, g0, g1) for m.G in the op's blocks (16 .. 256); false for another block
#define RWKVC_BY_BLOCK(fn, ...)                                          \
  switch (m.G) {                                                         \
    case 16: fn<16, __VA_ARGS__>(m, a, g0, g1); return true;             \
    case 32: fn<32, __VA_ARGS__>(m, a, g0, g1); return true;             \
    case 64: fn<64, __VA_ARGS__>(m, a, g0, g1); return true;             \
    case 128: fn<128, __VA_ARGS__>(m, a, g0, g1); return true;           \
    case 256: fn<256, __VA_ARGS__>(m, a, g0, g1); return true;           \
    default: return false;                                               \
  }

// rows16_simd<TT>(m, a, g0, g1): the groups for TT tokens with this build's vector path (VNNI, else AVX2);
// false where it has none for m's block
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define RWKVC_ROWS16_SIMD 1
template <int TT>
bool rows16_simd(const MatVecQ& m, const Acts16* a, int64_t g0, int64_t g1) {
  if (m.bits == 8) RWKVC_BY_BLOCK(rows16_vnni8, TT)
  RWKVC_BY_BLOCK(rows16_vnni, TT)
}
#endif

#if defined(__AVX2__) && defined(__F16C__) && !(defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__))
// AVX2 (no VNNI): each half of a vector (rows 8 h .. 8 h + 7) at a time. 4-bit: vpmaddubsw of the low and
// high nibbles with x's broadcast codes (two pairs of at most 15 x 127 each: no saturation), vpmaddwd into
// 8 int32 lanes. 8-bit: the codes as int8 q (code ^ 0x80), vpmaddubsw of |q| with x's codes given q's signs
// (pairs of at most 127 x 127 x 2: exact), so no zero-point term. The same integers as the VNNI path.
template <int64_t G, int BITS, int TT>
void rows16_avx2(const MatVecQ& m, const Acts16* a, int64_t g0, int64_t g1) {
  constexpr int64_t wpv = BITS == 4 ? 8 : 4, vpb = G / wpv;   // weights a row per vector, vectors a block
  const __m256i nib = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(char(0x80));
  const __m256i zsh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const int64_t gstride = m.nb * vpb * 64;
  for (int64_t g = g0; g < g1; ++g)
    for (int h = 0; h < 2; ++h) {
      const int64_t r0 = g * 16 + 8 * h, k = std::min<int64_t>(8, m.N - r0);
      if (k <= 0) break;
      const uint8_t* wc = m.codes + g * gstride + 32 * h;
      __m256 f[TT];
      for (int t = 0; t < TT; ++t) f[t] = _mm256_setzero_ps();
      for (int64_t b = 0; b < m.nb; ++b) {
        __m256i acc[TT];
        if (BITS == 4) {
          __m256i z = _mm256_set1_epi32(8);
          if (m.zeros) {
            int32_t zz;
            std::memcpy(&zz, m.zeros + (g * m.nb + b) * 8 + 4 * h, 4);
            z = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(zz), zsh), _mm256_set1_epi32(15));
          }
          for (int t = 0; t < TT; ++t) acc[t] = _mm256_mullo_epi32(z, _mm256_set1_epi32(a[t].nsum[b]));
        } else {
          for (int t = 0; t < TT; ++t) acc[t] = _mm256_setzero_si256();
        }
        for (int64_t j = 0; j < vpb; ++j) {
          const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wc + (b * vpb + j) * 64));
          if (BITS == 4) {
            const __m256i lo = _mm256_and_si256(w, nib), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), nib);
            for (int t = 0; t < TT; ++t) {
              int32_t x0, x1;
              std::memcpy(&x0, a[t].q + b * G + 8 * j, 4);
              std::memcpy(&x1, a[t].q + b * G + 8 * j + 4, 4);
              const __m256i d16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(x0)),
                                                   _mm256_maddubs_epi16(hi, _mm256_set1_epi32(x1)));
              acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(d16, ones));
            }
          } else {
            const __m256i q = _mm256_xor_si256(w, flip), aq = _mm256_abs_epi8(q);
            for (int t = 0; t < TT; ++t) {
              int32_t x0;
              std::memcpy(&x0, a[t].q + b * G + 4 * j, 4);
              const __m256i d16 = _mm256_maddubs_epi16(aq, _mm256_sign_epi8(_mm256_set1_epi32(x0), q));
              acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(d16, ones));
            }
          }
        }
        if (BITS == 4) {
          const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m.hscales + (g * m.nb + b) * 16 + 8 * h)));
          for (int t = 0; t < TT; ++t)
            f[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t]), _mm256_mul_ps(s, _mm256_set1_ps(a[t].xscale[b])), f[t]);
        } else {
          for (int t = 0; t < TT; ++t)
            f[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t]), _mm256_set1_ps(a[t].xscale[b]), f[t]);
        }
      }
      const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(k)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      for (int t = 0; t < TT; ++t) {
        __m256 y = f[t];
        if (BITS == 8) y = _mm256_mul_ps(y, _mm256_loadu_ps(m.scales + r0));   // (N16, 16): rows past N are 0
        _mm256_maskstore_ps(a[t].y + r0, mask, y);
      }
    }
}

#define RWKVC_ROWS16_SIMD 1
template <int TT>
bool rows16_simd(const MatVecQ& m, const Acts16* a, int64_t g0, int64_t g1) {
  if (m.bits == 8) RWKVC_BY_BLOCK(rows16_avx2, 8, TT)
  RWKVC_BY_BLOCK(rows16_avx2, 4, TT)
}
#endif

// portable: the same integer sums per block, then the same float steps
void rows16_portable(const MatVecQ& m, const Acts16& a, int64_t g0, int64_t g1) {
  const int64_t G = m.G, vpb = G / 8;
  if (m.bits == 8) {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t r = 0; r < 16 && g * 16 + r < m.N; ++r) {
        float f = 0.0f;
        for (int64_t b = 0; b < m.nb; ++b) {
          int32_t acc = 128 * a.nsum[b];
          for (int64_t j = 0; j < G / 4; ++j) {
            const uint8_t* w = m.codes + ((g * m.nb + b) * (G / 4) + j) * 64 + 4 * r;
            for (int i = 0; i < 4; ++i) acc += int32_t(w[i]) * a.q[b * G + 4 * j + i];
          }
          f += float(acc) * a.xscale[b];
        }
        a.y[g * 16 + r] = f * m.scales[g * 16 + r];
      }
    return;
  }
  for (int64_t g = g0; g < g1; ++g)
    for (int64_t r = 0; r < 16 && g * 16 + r < m.N; ++r) {
      float f = 0.0f;
      for (int64_t b = 0; b < m.nb; ++b) {
        int32_t z = 8;
        if (m.zeros) {
          const uint8_t zz = m.zeros[(g * m.nb + b) * 8 + r / 2];
          z = (r & 1) ? zz >> 4 : zz & 15;
        }
        int32_t acc = z * a.nsum[b];
        for (int64_t j = 0; j < vpb; ++j) {
          const uint8_t* w = m.codes + ((g * m.nb + b) * vpb + j) * 64 + 4 * r;
          const int8_t* x = a.q + b * G + 8 * j;
          for (int i = 0; i < 4; ++i) acc += int32_t(w[i] & 15) * x[i] + int32_t(w[i] >> 4) * x[4 + i];
        }
        f += float(acc) * (half_to_float(m.hscales[(g * m.nb + b) * 16 + r]) * a.xscale[b]);
      }
      a.y[g * 16 + r] = f;
    }
}

// rows g0 16 .. g1 16 (clipped to N) for tokens a[0 .. T)
void rows16_tokens(const MatVecQ& m, const Acts16* a, int64_t T, int64_t g0, int64_t g1) {
#ifdef RWKVC_ROWS16_SIMD
  int64_t t = 0;
  bool ok = true;
  for (; ok && t + 4 <= T; t += 4) ok = rows16_simd<4>(m, a + t, g0, g1);
  for (; ok && t < T; ++t) ok = rows16_simd<1>(m, a + t, g0, g1);
  if (ok) return;
#endif
  for (int64_t t = 0; t < T; ++t) rows16_portable(m, a[t], g0, g1);
}

// y[n0 .. n1) for the prepared token (n0 a multiple of 16)
void matvec_rows16(const MatVecQ& m, int64_t n0, int64_t n1, float* y) {
  const Acts16 a{m.q.data(), m.xscale.data(), m.nsum.data(), y};
  rows16_tokens(m, &a, 1, n0 / 16, (n1 + 15) / 16);
}

// the MatVecQ of codes / scales / zeros inputs i, i + 1, i + 2 (bits, block G) for x of K elements
// layout 1: the interleaved layout (op set 7: codes (N16, nb, 8 G), float16 scales (N16, nb, 16)), N rows
void matvec_input(MatVecQ& m, const Attrs& at, OrtKernelContext* ctx, size_t i, int64_t bits, int64_t G, int64_t K,
                  int64_t layout = 0, int64_t N = 0) {
  Tensor codes = cached_input(at, ctx, i), scales = cached_input(at, ctx, i + 1), zeros = cached_input(at, ctx, i + 2);
  m.i16 = layout == 1;
  if (m.i16) {
    m.bits = bits;
    m.G = G;
    m.N = N;
    m.nb = codes.dims[1];
    m.row_bytes = m.nb * G * bits / 8;
    m.K = K;
    m.codes = codes.raw<uint8_t>();
    m.hscales = bits == 4 ? scales.raw<uint16_t>() : nullptr;   // 8-bit: float32, one a row
    m.scales = bits == 4 ? nullptr : scales.data;
    m.zeros = bits == 4 && zeros.size ? zeros.raw<uint8_t>() : nullptr;
    m.packed = false;
    return;
  }
  m.bits = bits;
  m.G = G;
  m.N = codes.dims[0];
  m.nb = codes.dims[1];
  m.row_bytes = m.nb * codes.dims[2];
  m.K = K;
  m.zb = (m.nb + 1) / 2;
  m.chunk = m.bits == 4 ? 128 : 64;
  m.nch = (m.row_bytes + 63) / 64;
  m.codes = codes.raw<uint8_t>();
  m.scales = scales.data;
  m.zeros = m.bits == 4 && zeros.size ? zeros.raw<uint8_t>() : nullptr;
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
  m.packed = m.row_bytes <= 64 && 64 % m.row_bytes == 0 && m.K == m.nb * m.G && m.G >= m.chunk / 16;
#else
  m.packed = false;   // matvec_rows_packed is VNNI's
#endif
}

// y (N,) = W x for one row x, rows split over the intra-op threads when the matrix is big enough to pay for
// waking them
void matvec_run(OrtKernelContext* ctx, MatVecQ& m, const float* x, float* y) {
  matvec_prepare(m, x);
  parallel_ranges(ctx, m.N, std::max<int64_t>(16, (int64_t(1) << 15) / m.row_bytes),
                  [&](int64_t n0, int64_t n1) { matvec_rows(m, n0, n1, y); }, 16);   // whole 16s: rows_packed's groups
}

// Rwkv7MatVecQ16(x (.., K), codes (N16, nb, 8 G) uint8, scales (N16, nb, 16) float16, zero points (N16, nb, 8)
// uint8 or empty)  attrs n (N), block (G) -> y (.., N) = W x for W in the interleaved layout (op set 7, above).
// One row of x: the step (matvec_run); T rows: the prefill, which reads each group's codes once for 4 tokens
// (rows16_vnni's TT) and keeps ~32 KB of codes in cache while all T tokens pass over them.
void matvec_q16_compute(const Attrs& at, OrtKernelContext* ctx) {
  Tensor x = input(ctx, 0);   // (the prefill's token count changes from call to call)
  const int64_t K = x.dims[x.rank - 1];
  thread_local MatVecQ m;
  matvec_input(m, at, ctx, 1, at.bits, at.block, K, 1, at.n);
  int64_t ydims[4];
  for (size_t d = 0; d < x.rank; ++d) ydims[d] = x.dims[d];
  ydims[x.rank - 1] = m.N;
  float* y = output(ctx, 0, ydims, x.rank);
  const int64_t T = x.size / std::max<int64_t>(1, K);
  if (T == 1) return matvec_run(ctx, m, x.data, y);
  if (T == 0) return;
  const int64_t Kp = m.nb * m.G;
  thread_local std::vector<int8_t> q;
  thread_local std::vector<float> xs;
  thread_local std::vector<int32_t> ns;
  thread_local std::vector<Acts16> acts;
  q.resize(T * Kp);
  xs.resize(T * m.nb);
  ns.resize(T * m.nb);
  acts.resize(T);
  for (int64_t t = 0; t < T; ++t) {
    quantise16(x.data + t * K, K, m.G, m.nb, q.data() + t * Kp, xs.data() + t * m.nb, ns.data() + t * m.nb);
    acts[t] = Acts16{q.data() + t * Kp, xs.data() + t * m.nb, ns.data() + t * m.nb, y + t * m.N};
  }
  const int64_t N16 = (m.N + 15) / 16, gbytes = std::max<int64_t>(1, 2 * m.bits * Kp);   // a group's code bytes
  const int64_t span = std::max<int64_t>(1, (int64_t(1) << 15) / gbytes);       // groups a pass of the tokens
  const MatVecQ& mq = m;   // (thread_local by reference: a pool thread would see its own)
  const std::vector<Acts16>& as = acts;
  parallel_ranges(ctx, N16, std::max<int64_t>(1, std::min<int64_t>(span, N16 / std::max(1, g_threads))),
                  [&, T, span](int64_t g0, int64_t g1) {
                    for (int64_t g = g0; g < g1; g += span) rows16_tokens(mq, as.data(), T, g, std::min(g1, g + span));
                  });
}

void matvec_q_compute(const Attrs& at, OrtKernelContext* ctx) {
  Tensor x = cached_input(at, ctx, 0);
  const int64_t K = x.dims[x.rank - 1];
  thread_local MatVecQ m;   // its buffers keep their capacity from call to call
  matvec_input(m, at, ctx, 1, at.bits, at.block, K);
  int64_t ydims[4];
  for (size_t d = 0; d < x.rank; ++d) ydims[d] = x.dims[d];
  ydims[x.rank - 1] = m.N;
  float* y = output(ctx, 0, ydims, x.rank);
  const int64_t rows = x.size / std::max<int64_t>(1, K);
  for (int64_t r = 0; r < rows; ++r) matvec_run(ctx, m, x.data + r * K, y + r * m.N);
}

// the activations a set applies to a product's result: 0 none, 1 tanh, 2 sigmoid (op set 5: libm's, within
// an ulp or two of ONNX Runtime's approximations), 3 relu, 4 relu squared (as ONNX Runtime computes them)
void apply_act(int64_t act, float* v, int64_t n) {
  if (act == 1)
    for (int64_t i = 0; i < n; ++i) v[i] = std::tanh(v[i]);
  else if (act == 2)
    for (int64_t i = 0; i < n; ++i) v[i] = 1.0f / (1.0f + std::exp(-v[i]));
  else if (act == 3)
    for (int64_t i = 0; i < n; ++i) v[i] = v[i] > 0 ? v[i] : 0.0f;
  else if (act == 4)
    for (int64_t i = 0; i < n; ++i) v[i] = v[i] > 0 ? v[i] * v[i] : 0.0f;
}

// Rwkv7MatVecSet(x_0 .. x_{n_x - 1} (1, K_i), then per product codes, scales, zeros)  attrs n_x and, per
// product p: src (x_src, or for src < 0 the result of product -src - 1), acts (applied to the result: 0 none,
// 1 tanh, 2 sigmoid (op set 5), 3 relu, 4 relu squared), bitss, blocks, emits (1: the result is the next output (1, N))
//   A layer's quantised products (its projections, low-rank factor pairs and LoRAs) as one kernel: one
//   ONNX Runtime kernel instead of ~16, each product computed as Rwkv7MatVecQ computes it.
void matvec_set_compute(const Attrs& at, OrtKernelContext* ctx) {
  const size_t P = at.src.size();
  thread_local std::vector<MatVecQ> ms;   // one a product: a level's products are prepared before its rows run
  thread_local std::vector<std::vector<float>> tmp;
  thread_local std::vector<Tensor> xs;
  thread_local std::vector<int64_t> level, cost;   // cost: prefix sums over a level's 16-row groups
  thread_local std::vector<std::pair<size_t, int64_t>> groups;   // (product, first row) of each group
  std::vector<float*> ys(P);   // each product's result (a later level's input)
  if (ms.size() < P) ms.resize(P);
  if (tmp.size() < P) tmp.resize(P);
  level.assign(P, 0);
  xs.resize(at.n_x);
  for (int64_t i = 0; i < at.n_x; ++i) xs[i] = cached_input(at, ctx, i);
  int64_t levels = 0;
  for (size_t p = 0; p < P; ++p) {
    const int64_t s = at.src[p];
    level[p] = s >= 0 ? 0 : level[-s - 1] + 1;   // a product's source comes before it
    levels = std::max(levels, level[p] + 1);
  }
  size_t out = 0;
  for (size_t p = 0; p < P; ++p) {   // the outputs in product order (their shapes are known from the weights)
    const int64_t s = at.src[p];
    const int64_t K = s >= 0 ? xs[s].dims[xs[s].rank - 1] : ms[-s - 1].N;
    matvec_input(ms[p], at, ctx, at.n_x + 3 * p, at.bitss[p], at.blocks[p], K,
                 at.layouts.empty() ? 0 : at.layouts[p], at.ns.empty() ? 0 : at.ns[p]);
    if (at.emits[p]) {
      const int64_t dims[2] = {1, ms[p].N};
      ys[p] = output(ctx, out++, dims, 2);
    } else {
      tmp[p].resize(ms[p].N);
      ys[p] = tmp[p].data();
    }
  }
  // level by level: a level's products are independent, so their rows run as one split over the intra-op
  // threads (16-row groups, by bytes), one wake-up a level instead of one a product
  for (int64_t L = 0; L < levels; ++L) {
    groups.clear();
    cost.assign(1, 0);
    int64_t total = 0;
    for (size_t p = 0; p < P; ++p) {
      if (level[p] != L) continue;
      const int64_t s = at.src[p];
      MatVecQ& m = ms[p];
      matvec_prepare(m, s >= 0 ? xs[s].data : ys[-s - 1]);
      total += m.N * (m.row_bytes + 16);
    }
    // a task per 32 KB of weights at least (waking a thread costs ~2 us)
    const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(g_threads, total / (int64_t(1) << 15)));
    if (tasks == 1 || !g_parallel_for) {   // one thread: the products one after another
      for (size_t p = 0; p < P; ++p)
        if (level[p] == L) {
          matvec_rows(ms[p], 0, ms[p].N, ys[p]);
          apply_act(at.acts[p], ys[p], ms[p].N);
        }
      continue;
    }
    for (size_t p = 0; p < P; ++p) {
      if (level[p] != L) continue;
      for (int64_t n = 0; n < ms[p].N; n += 16) {
        groups.emplace_back(p, n);
        cost.push_back(cost.back() + std::min<int64_t>(16, ms[p].N - n) * (ms[p].row_bytes + 16));
      }
    }
    const int64_t G = int64_t(groups.size());
    // (the thread_local vectors by reference: named in the lambda, a pool thread would see its own)
    const std::vector<MatVecQ>& mq = ms;
    const std::vector<int64_t>& cs = cost;
    const std::vector<std::pair<size_t, int64_t>>& gs = groups;
    parallel_ranges(ctx, tasks, 1, [&, G, total, tasks](int64_t t0, int64_t t1) {
      // the groups whose cost prefix starts in [t0, t1) of `tasks` equal shares
      const int64_t lo = total * t0 / tasks, hi = total * t1 / tasks;
      int64_t g = std::lower_bound(cs.begin(), cs.begin() + G, lo) - cs.begin();
      while (g < G && cs[g] < hi) {
        const size_t p = gs[g].first;
        const int64_t n0 = gs[g].second;
        int64_t n1 = std::min<int64_t>(n0 + 16, mq[p].N);
        for (++g; g < G && cs[g] < hi && gs[g].first == p; ++g) n1 = std::min<int64_t>(gs[g].second + 16, mq[p].N);
        matvec_rows(mq[p], n0, n1, ys[p]);
        apply_act(at.acts[p], ys[p] + n0, n1 - n0);
      }
    });
  }
}

// ---- op definitions --------------------------------------------------------------------------------------

struct OpDef {
  OrtCustomOp base;   // first member: ONNX Runtime hands back &base
  const char* name;
  const char* in_types;   // one letter per input (element_type), e.g. "fbf"
  const char* out_types;  // one letter per output; nullptr: all float32
  size_t n_in, n_out;
  void (*compute)(const Attrs&, OrtKernelContext*);
  bool variadic;          // one variadic input of mixed types and one variadic float output
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
          int_attr(info, "act", 0), int_attr(info, "bits", 4), int_attr(info, "block", 32)};
  a.n = int_attr(info, "n", 0);
  if (def(op)->variadic) {
    a.src = ints_attr(info, "src");
    a.acts = ints_attr(info, "acts");
    a.bitss = ints_attr(info, "bitss");
    a.blocks = ints_attr(info, "blocks");
    a.emits = ints_attr(info, "emits");
    a.layouts = ints_attr(info, "layouts");
    a.ns = ints_attr(info, "ns");
    a.n_x = int_attr(info, "n_x", 1);
  }
  a.cache = std::make_shared<InputCache>(def(op)->variadic ? a.n_x + 3 * a.src.size() : def(op)->n_in);
  return new Kernel{def(op), a};
}
const char* ORT_API_CALL get_name(const OrtCustomOp* op) { return def(op)->name; }
const char* ORT_API_CALL get_ep(const OrtCustomOp*) { return "CPUExecutionProvider"; }
// f float32, h float16, u uint8, b int8, w uint16, i int32, l int64
ONNXTensorElementDataType element_type(char c) {
  switch (c) {
    case 'u': return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    case 'b': return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
    case 'w': return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16;
    case 'h': return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    case 'i': return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    case 'l': return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
}
ONNXTensorElementDataType ORT_API_CALL in_type(const OrtCustomOp* op, size_t i) {
  return def(op)->variadic ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED : element_type(def(op)->in_types[i]);
}
ONNXTensorElementDataType ORT_API_CALL out_type(const OrtCustomOp* op, size_t i) {
  return def(op)->out_types ? element_type(def(op)->out_types[i]) : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
size_t ORT_API_CALL n_inputs(const OrtCustomOp* op) { return def(op)->n_in; }
size_t ORT_API_CALL n_outputs(const OrtCustomOp* op) { return def(op)->n_out; }
void ORT_API_CALL compute(void* kernel, OrtKernelContext* ctx) {
  auto* k = static_cast<Kernel*>(kernel);
  k->op->compute(k->attrs, ctx);
}
void ORT_API_CALL destroy(void* kernel) { delete static_cast<Kernel*>(kernel); }
OrtCustomOpInputOutputCharacteristic ORT_API_CALL required(const OrtCustomOp* op, size_t) {
  return def(op)->variadic ? INPUT_OUTPUT_VARIADIC : INPUT_OUTPUT_REQUIRED;
}
int ORT_API_CALL homogeneous(const OrtCustomOp* op) { return def(op)->variadic ? 0 : 1; }
OrtMemType ORT_API_CALL mem_default(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL one(const OrtCustomOp*) { return 1; }

OpDef make(const char* name, const char* in_types, size_t n_out, void (*fn)(const Attrs&, OrtKernelContext*),
         const char* out_types = nullptr) {
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
  d.base.GetVariadicInputHomogeneity = homogeneous;
  d.base.GetVariadicOutputMinArity = one;
  d.base.GetVariadicOutputHomogeneity = one;
  d.name = name;
  d.in_types = in_types;
  d.n_in = std::strlen(in_types);
  d.n_out = n_out;
  d.out_types = out_types;
  d.compute = fn;
  d.variadic = false;
  return d;
}

OpDef make_variadic(const char* name, void (*fn)(const Attrs&, OrtKernelContext*)) {
  OpDef d = make(name, "f", 1, fn);
  d.variadic = true;
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
    make("Rwkv7SparseFfnQ", "fbfbfubfbf", 1, sparse_ffn_compute<int8_t, true>),
    make("Rwkv7SparseFfnQF32", "fbfbfuffff", 1, sparse_ffn_compute<float, true>),
    make("Rwkv7ClusteredHead", "ffbfiiwf", 1, clustered_head_compute<int8_t>),
    make("Rwkv7ClusteredHeadF32", "ffffiiwf", 1, clustered_head_compute<float>),
    make("Rwkv7ClusteredHeadTop", "ffbfiiwffl", 2, clustered_head_compute<int8_t, true>, "fl"),
    make("Rwkv7ClusteredHeadTopF32", "ffffiiwffl", 2, clustered_head_compute<float, true>, "fl"),
    make("Rwkv7MatVecQ", "fufu", 1, matvec_q_compute),
    make("Rwkv7MatVecQ16", "fuhu", 1, matvec_q16_compute),
    make("Rwkv7MatVecQ16x8", "fufu", 1, matvec_q16_compute),
    make_variadic("Rwkv7MatVecSet", matvec_set_compute),
};

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
  g_api = base->GetApi(kOrtApiVersion);
  if (!g_api) return nullptr;   // an older ONNX Runtime: session creation then names the unknown ops
  if (const OrtApi* api = base->GetApi(ort::kParallelForApiVersion)) g_parallel_for = ort::KernelContext_ParallelFor(api);
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = ort::CreateCustomOpDomain(g_api, "ai.rwkvc", &domain)) return st;
  for (OpDef& d : g_ops)
    if (OrtStatus* st = ort::CustomOpDomain_Add(g_api, domain, &d.base)) return st;
  return ort::AddCustomOpDomain(g_api, options, domain);
}

// the library's version of the op set, for rwkvc.runtimes.ortops to check what it loaded
extern "C" __attribute__((visibility("default"))) int rwkvc_ort_ops_version() { return 7; }

// threads for the kernels that split work (Rwkv7WkvSeq); the runtime passes its intra-op thread count
extern "C" __attribute__((visibility("default"))) void rwkvc_ort_ops_set_threads(int n) { g_threads = n > 0 ? n : 1; }
