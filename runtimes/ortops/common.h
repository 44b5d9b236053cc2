// What every kernel family of rwkvc's ONNX Runtime kernels shares (ort_ops.cc compiles them all as one
// translation unit; the families' helpers live in one anonymous namespace):
//   - ONNX Runtime's API table (g_api) and intra-op thread pool (g_parallel_for, g_threads), set when the
//     library registers its ops, and parallel_ranges, which splits a kernel's work over that pool;
//   - the SIMD reductions: hsum256 (AVX2), lane_sums16 / lane_sums16i (AVX-512: 16 vectors' lane sums as one);
//   - fast_exp and sigmoid (single precision, vectorisable);
//   - the plumbing a kernel reads its inputs, outputs and attributes through: Tensor, input, output, the
//     *_attr readers, Attrs (every op's attributes) and cached_input (shapes read once a kernel).
// ort_abi.h declares the parts of ONNX Runtime's C API used here.
#pragma once
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

// ---- SIMD reductions ----------------------------------------------------------------------------------

#ifdef __AVX2__
// the sum of a __m256's lanes
inline float hsum256(__m256 a) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

#endif

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

// ---- math ----------------------------------------------------------------------------------------------

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
  int64_t row = -1;                                          // Rwkv7Mix1B / Mix6B: the shift row in the whole state
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

}  // namespace
