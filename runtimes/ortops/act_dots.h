// Dot products of one activation vector with weight rows, for the sparse FFN and the clustered head:
// dot_row (float32, int8 or uint8 rows), Act<float> / Act<int8_t> (the activations as the plain ONNX graph
// quantises them: 8-bit with one scale and zero point for int8 rows; AVX-512 VNNI, AVX2 and portable paths)
// and act_dots (16 rows at a time through Act::dot16, then one by one).
#pragma once
#include "common.h"

namespace {

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

}  // namespace
