// 4-bit and 8-bit matrix-vector products on MatMulNBits' own layout (codes, scales, zero points), computed
// as MatMulNBits' accuracy level 4 computes them: MatVecQ (one product's weights and its activations'
// codes and tables), quantise_block, matvec_prepare, and the rows' paths: AVX-512 VNNI (packed short rows,
// blocks smaller than a chunk, blocks of whole chunks), AVX2 (4-bit) and portable; matvec_rows picks one.
// The interleaved layout's paths are matvec_q16.h's.
#pragma once
#include "common.h"

namespace {

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

void matvec_prepare16(MatVecQ& m, const float* x);   // matvec_q16.h

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

void matvec_rows16(const MatVecQ& m, int64_t n0, int64_t n1, float* y);   // matvec_q16.h

void matvec_rows(const MatVecQ& m, int64_t n0, int64_t n1, float* y) {
  if (m.i16) return matvec_rows16(m, n0, n1, y);
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if (matvec_rows_vnni(m, n0, n1, y)) return;
#elif defined(__AVX2__)
  if (matvec_rows_avx2(m, n0, n1, y)) return;
#endif
  matvec_rows_portable(m, n0, n1, y);
}

}  // namespace
