// 4-bit and int8 matrices interleaved 16 rows a vector (op set 7), the layout the ONNX lowering emits where
// rwkvc's kernels are a matrix's only readers (the step and the prefill).
//
// MatMulNBits' layout keeps a row's codes together: the step's one-row product then costs ~14 vector
// operations per 64 bytes (the activation codes loaded per chunk, the blocks' scales spread over the lanes,
// a zero-point dot product and a lane sum per row). In the interleaved layout (rwkvc.weights.int4's
// interleave16) the 64 bytes at (group g of 16 rows, block b, step j) hold, for each row r of the group, its
// 4 bytes at 4 r: byte i = code(k = b G + 8 j + i) | code(k + 4) << 4. Lane r of vpdpbusd is then row r: the
// low nibbles take x's codes k .. k + 3 and the high ones k + 4 .. k + 7, one 32-bit broadcast each (in x's
// order, no tables), and a block ends with one vector of 16 rows' scales (float16) and zero points: ~6
// operations per 64 bytes and no lane sums (1.9-4.3x the row layout's speed on the 0.1B's shapes, hot in
// cache). int8 (rwkvc.weights.int8's interleave16_int8): rows16_vnni8.
//   block b's integer sum per row: (z_r) (-sum of x's codes in b) + sum_k code_k x_k  (the zero points' term
//   as vpdpbusd's starting value); y_r = sum_b that * scale_r,b * xscale_b
// x is quantised as Rwkv7MatVecQ quantises it (MatMulNBits' accuracy level 4): the same integers.
//
// Here: quantise16 / matvec_prepare16 (x's codes), rows16_vnni / rows16_vnni8 (AVX-512 VNNI), rows16_avx2
// (AVX2 with F16C), rows16_portable, and rows16_tokens / matvec_rows16, which pick one, for T tokens at once.
#pragma once
#include "matvec_q.h"

namespace {

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
// The kernels for 4+ rows are bound by their arithmetic, not by reading the codes: they prefetch the codes
// kPrefetchAhead bytes ahead (at 8 rows a 64-byte vector takes ~16 vpdpbusd, so 2 KB is ~500 cycles: a
// memory latency and more), non-temporal: a batched step reads its codes once, and its B states should
// stay in the last-level cache. On the Zen 4 a batched step of 8 streams ran 0.99-1.44x as fast as without
// prefetching in six interleaved runs (T0 prefetches 0.94-1.16x), the prefill unchanged
// (docs/benchmarks/serving.md; -DRWKVC_PREFETCH_AHEAD=0 builds without).
#ifndef RWKVC_PREFETCH_AHEAD
#define RWKVC_PREFETCH_AHEAD 2048
#endif
#ifndef RWKVC_PREFETCH_HINT
#define RWKVC_PREFETCH_HINT _MM_HINT_NTA
#endif
constexpr int64_t kPrefetchAhead = RWKVC_PREFETCH_AHEAD;

// groups g0 .. g1 of 16 rows for TT tokens at once (each vector's nibbles split once, then TT vpdpbusd
// pairs); a group past row N - 1 stores only its rows
template <int64_t G, int TT>
void rows16_vnni(const MatVecQ& m, const Acts16* a, int64_t g0, int64_t g1) {
  constexpr int64_t vpb = G / 8;   // vectors a block
  // accumulators a token: two for fewer than 8 tokens (vpdpbusd's latency), one at 8, where the 8 tokens'
  // chains keep it busy and 16 more registers spilled (the same sums; with the level threshold of
  // matmul_set_compute, 0.95x an 8-stream step's time on the Zen 4, bench/kernel_ab.py)
  constexpr int U = TT >= 8 ? 1 : 2;
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
      __m512i acc[TT][U];
      for (int t = 0; t < TT; ++t) {
        acc[t][0] = _mm512_mullo_epi32(z, _mm512_set1_epi32(a[t].nsum[b]));
        if (U == 2) acc[t][U - 1] = _mm512_setzero_si512();
      }
      // two vectors a step, each into its own accumulator where U = 2 (vpb is even; indexing the
      // accumulators by a run-time j & 1 kept them on the stack)
      for (int64_t j = 0; j < vpb; j += 2) {
        for (int u = 0; u < 2; ++u) {
          if (TT >= 4 && kPrefetchAhead > 0) _mm_prefetch(reinterpret_cast<const char*>(wc + (b * vpb + j + u) * 64 + kPrefetchAhead), RWKVC_PREFETCH_HINT);
          const __m512i w = _mm512_loadu_si512(wc + (b * vpb + j + u) * 64);
          const __m512i lo = _mm512_and_si512(w, nib), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), nib);
          for (int t = 0; t < TT; ++t) {
            int32_t x0, x1;
            std::memcpy(&x0, a[t].q + b * G + 8 * (j + u), 4);
            std::memcpy(&x1, a[t].q + b * G + 8 * (j + u) + 4, 4);
            acc[t][u % U] = _mm512_dpbusd_epi32(acc[t][u % U], lo, _mm512_set1_epi32(x0));
            acc[t][u % U] = _mm512_dpbusd_epi32(acc[t][u % U], hi, _mm512_set1_epi32(x1));
          }
        }
      }
      const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + b * 16)));
      for (int t = 0; t < TT; ++t)
        f[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(U == 2 ? _mm512_add_epi32(acc[t][0], acc[t][U - 1]) : acc[t][0]),
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
          if (TT >= 4 && kPrefetchAhead > 0) _mm_prefetch(reinterpret_cast<const char*>(wc + (b * vpb + j + u) * 64 + kPrefetchAhead), RWKVC_PREFETCH_HINT);
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
  if (ok && t + 2 <= T) ok = rows16_simd<2>(m, a + t, g0, g1), t += 2;   // two tokens: the codes read once
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

}  // namespace
