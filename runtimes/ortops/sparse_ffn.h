// The sparse FFN of the step graph (one token): the units an MLP predictor or a quantised-key predictor
// picks, each reading only the rows it uses, straight from the memory-mapped initializers.
//   Rwkv7SparseFfn / Rwkv7SparseFfnF32(xk (1, C), fc1T (C, D), fc2T (D, F), codes (F, bytes), key rows (F, C),
//       key scale (F,), value rows Vᵀ (F, C), value scale (C,))  attrs mlp_threshold, q_scale, q_lo, q_bits
//       -> the FFN output (1, C) over the units the predictors pick (int8 rows with per-row / per-output scales
//       and 8-bit activations as the plain graph has them, or float32 rows with empty scales)
//   Rwkv7SparseFfnQ / Rwkv7SparseFfnQF32: the MLP predictor in int8, 1-bit codes 16 rows together
// Here: the predictors' scores (code_dot, code_dot16_table / code_dot16_groups, xw_rows), the q_lo-th
// smallest estimate (kth_smallest), the value product (rows_axpy_u8 with AVX-512 VNNI) and the op
// (sparse_ffn_compute).
#pragma once
#include "act_dots.h"

namespace {

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

}  // namespace
