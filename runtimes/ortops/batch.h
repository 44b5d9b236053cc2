// The batched decode step's kernels (op set 8): B sequences of one token each, every one with its own state,
// in one kernel call (rwkvc.targets.onnx.batch's batch_step):
//   Rwkv7Mix1B / Rwkv7Mix6B(x (B, C), dx (B, C) or (1, C), ln.weight, ln.bias, prev (B, C), mix (M, C))  attrs
//       eps, row  (mix_batch_compute) -> s = x + dx, n = LayerNorm(s), n + (prev - n) * mix[m] for each of the M
//       rows, row b's token shift from prev row b (Rwkv7Mix1 / Rwkv7Mix6 shift row t from row t - 1 instead).
//       With row >= 0 (op set 10), prev is the step's whole shift state (B, R, C) and sequence b's row is its
//       row `row`, and n comes out as (B, 1, C): the graph then needs no Split of the state, no Reshape a
//       row, and concatenates the n's into the new state
//   Rwkv7WkvStepB(r, w, k, v, a, vg, v_first, g (B, C), S (B, H, N, N), then Rwkv7WkvStep's vectors)
//       attrs eps, first  (wkv_batch_compute) -> y (B, C), S' (B, H, N, N): Rwkv7WkvStep for each sequence,
//       the B H heads split over the intra-op threads
//   Rwkv7MatMulQ16 / Rwkv7MatMulQ16x8(x (B, K), then Rwkv7MatVecQ16's inputs)  attrs n, block, bits
//       (matmul_q16_compute) -> y (B, N) = x W^T, the same numbers as Rwkv7MatVecQ16 / Q16x8 over B rows, each
//       16-row group of codes loaded and split into nibbles once for up to 8 rows (rows16_avx2_rows)
//   Rwkv7MatMulSet(x_0 .. (B, K_i), then codes, scales, zero points per product)  Rwkv7MatVecSet's attributes
//       (matmul_set_compute) -> Rwkv7MatVecSet's products over B rows (outputs (B, N)): a layer's
//       projections and LoRAs in one kernel, one split over the intra-op threads a level
#pragma once
#include "matvec_ops.h"
#include "mix.h"
#include "wkv.h"

namespace {

void mix_batch_compute(const Attrs& at, OrtKernelContext* ctx) {
  Tensor x = input(ctx, 0), dx = input(ctx, 1), lw = input(ctx, 2), lb = input(ctx, 3), prev = input(ctx, 4),
         mix = input(ctx, 5);
  const int64_t C = lw.size, M = std::min<int64_t>(mix.size / C, 8), B = x.size / C, dstride = dx.size == C ? 0 : C;
  const int64_t R = at.row >= 0 && B ? prev.size / (B * C) : 1, row = std::max<int64_t>(at.row, 0);   // prev's rows a sequence
  const int64_t dims[2] = {B, C}, ndims[3] = {B, 1, C};
  float* s = output(ctx, 0, dims, 2);
  float* n = at.row >= 0 ? output(ctx, 1, ndims, 3) : output(ctx, 1, dims, 2);
  float* o[8];
  for (int64_t m = 0; m < M; ++m) o[m] = output(ctx, 2 + m, dims, 2);
  if (prev.size != B * R * C || row >= R) return;   // the graph gives every sequence its own row
  for (int64_t b = 0; b < B; ++b) {
    float* sb = s + b * C;
    float* nb = n + b * C;
    const float* xb = x.data + b * C;
    const float* db = dx.data + b * dstride;
    const float* pb = prev.data + (b * R + row) * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) sb[c] = xb[c] + db[c];
    layer_norm(sb, lw.data, lb.data, at.eps, C, nb);
    for (int64_t m = 0; m < M; ++m) {
      float* om = o[m] + b * C;
      const float* mm = mix.data + m * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) om[c] = nb[c] + (pb[c] - nb[c]) * mm[c];
    }
  }
}

void wkv_batch_compute(const Attrs& at, OrtKernelContext* ctx) {
  Tensor in[17];
  for (size_t i = 0; i < 17; ++i) in[i] = input(ctx, i);
  const Tensor& S = in[8];
  const int64_t B = S.dims[0], H = S.dims[1], N = S.dims[2], C = H * N;
  const int64_t row[2] = {B, C};
  float* y = output(ctx, 0, row, 2);
  float* S2 = output(ctx, 1, S.dims, 4);
  if (N > 256 || S.rank != 4) return;   // fused_supported: heads of at most FUSED_MAX_HEAD = 256
  // sequence b's arguments: its rows of the per-sequence inputs (0..7) and its state, the vectors shared
  auto args = [&](int64_t b) {
    const int64_t o = b * C, so = b * H * N * N;
    return WkvArgs{in[0].data + o, in[1].data + o, in[2].data + o, in[3].data + o, in[4].data + o, in[5].data + o,
                   in[6].data + o, in[7].data + o, S.data + so, in[9].data, in[10].data, in[11].data, in[12].data,
                   in[13].data, in[14].data, in[15].data, in[16].data, y + o, S2 + so, N, at.eps, at.first != 0};
  };
  // heads i0 .. i1 of the B H (sequence-major), as runs of one sequence's heads, each run's last head
  // prefetching the next run's first state
  parallel_ranges(ctx, B * H, std::max<int64_t>(1, (int64_t(1) << 14) / (N * N)), [&](int64_t i0, int64_t i1) {
    for (int64_t b = i0 / H; b * H < i1; ++b)
      wkv_heads(args(b), std::max<int64_t>(i0 - b * H, 0), std::min<int64_t>(i1 - b * H, H),
                (b + 1) * H < i1 ? S.data + (b + 1) * H * N * N : nullptr);
  });
}

#if defined(__AVX2__) && defined(__F16C__) && !(defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__))
// rows16_avx2 for TT rows of x at once with fewer instructions a row: 4-bit products summed in int16 over
// runs of 4 vectors before one vpmaddwd into int32 (a vector's two vpmaddubsw pairs add up to at most
// 2 x 2 x 15 x 127 = 7620, four of them 30480 < 2^15: exact), the int32 block sums and the float sums kept
// on the stack (touched once a run and once a block). The same integers, scaled in the same order, as
// rows16_avx2: the same floats.
template <int64_t G, int BITS, int TT>
void rows16_avx2_rows(const MatVecQ& m, const Acts16* a, int64_t g0, int64_t g1) {
  constexpr int64_t wpv = BITS == 4 ? 8 : 4, vpb = G / wpv;   // weights a row per vector, vectors a block
  constexpr int64_t run = BITS == 4 ? (vpb < 4 ? vpb : 4) : 1;
  static_assert(vpb % run == 0, "whole runs a block");
  const __m256i nib = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(char(0x80));
  const __m256i zsh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const int64_t gstride = m.nb * vpb * 64;
  for (int64_t g = g0; g < g1; ++g)
    for (int h = 0; h < 2; ++h) {
      const int64_t r0 = g * 16 + 8 * h, k = std::min<int64_t>(8, m.N - r0);
      if (k <= 0) break;
      const uint8_t* wc = m.codes + g * gstride + 32 * h;
      __m256 f[TT];
      __m256i acc[TT];
      for (int t = 0; t < TT; ++t) f[t] = _mm256_setzero_ps();
      for (int64_t b = 0; b < m.nb; ++b) {
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
        for (int64_t j0 = 0; j0 < vpb; j0 += run) {
          __m256i s16[TT];
          for (int t = 0; t < TT; ++t) s16[t] = _mm256_setzero_si256();
          for (int64_t j = j0; j < j0 + run; ++j) {
            const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wc + (b * vpb + j) * 64));
            if (BITS == 4) {
              const __m256i lo = _mm256_and_si256(w, nib), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), nib);
              for (int t = 0; t < TT; ++t) {
                int32_t x0, x1;
                std::memcpy(&x0, a[t].q + b * G + 8 * j, 4);
                std::memcpy(&x1, a[t].q + b * G + 8 * j + 4, 4);
                s16[t] = _mm256_add_epi16(s16[t], _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(x0)),
                                                                   _mm256_maddubs_epi16(hi, _mm256_set1_epi32(x1))));
              }
            } else {
              const __m256i q = _mm256_xor_si256(w, flip), aq = _mm256_abs_epi8(q);
              for (int t = 0; t < TT; ++t) {
                int32_t x0;
                std::memcpy(&x0, a[t].q + b * G + 4 * j, 4);
                s16[t] = _mm256_maddubs_epi16(aq, _mm256_sign_epi8(_mm256_set1_epi32(x0), q));
              }
            }
          }
          for (int t = 0; t < TT; ++t) acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(s16[t], ones));
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
        if (BITS == 8) y = _mm256_mul_ps(y, _mm256_loadu_ps(m.scales + r0));
        _mm256_maskstore_ps(a[t].y + r0, mask, y);
      }
    }
}

template <int TT>
bool rows16_rows_simd(const MatVecQ& m, const Acts16* a, int64_t g0, int64_t g1) {
  if (m.bits == 8) RWKVC_BY_BLOCK(rows16_avx2_rows, 8, TT)
  RWKVC_BY_BLOCK(rows16_avx2_rows, 4, TT)
}
#define RWKVC_ROWS16_ROWS 1
#endif

// rows g0 16 .. g1 16 (clipped to N) for the T rows of x a[0 .. T): 8 rows a pass over the codes, what is
// left as 4 on rows16_avx2 (faster than rows16_avx2_rows at 4, slower at 8) and the last 1 to 3 together
void rows16_batch(const MatVecQ& m, const Acts16* a, int64_t T, int64_t g0, int64_t g1) {
#ifdef RWKVC_ROWS16_ROWS
  using Fn = bool (*)(const MatVecQ&, const Acts16*, int64_t, int64_t);
  static constexpr Fn by_rows[4] = {nullptr, rows16_rows_simd<1>, rows16_rows_simd<2>, rows16_rows_simd<3>};
  bool ok = true;
  int64_t t = 0;
  for (; ok && t + 8 <= T; t += 8) ok = rows16_rows_simd<8>(m, a + t, g0, g1);
  if (ok && t + 4 <= T) ok = rows16_simd<4>(m, a + t, g0, g1), t += 4;
  if (ok && t < T) ok = by_rows[T - t](m, a + t, g0, g1);
  if (ok) return;
#elif defined(RWKVC_ROWS16_SIMD)   // AVX-512 VNNI: 8 rows a pass fit its 32 registers
  int64_t t = 0;
  bool ok = true;
  for (; ok && t + 8 <= T; t += 8) ok = rows16_simd<8>(m, a + t, g0, g1);
  if (ok && t < T) {
    rows16_tokens(m, a + t, T - t, g0, g1);
    return;
  }
  if (ok) return;
#endif
  rows16_tokens(m, a, T, g0, g1);
}

// Rwkv7MatMulQ16 / Rwkv7MatMulQ16x8(x (B, K), codes, scales, zero points or empty)  attrs n (N), block (G),
// bits -> y (B, N): each row as Rwkv7MatVecQ16 computes it (x quantised per row and block), the groups of
// 16 matrix rows split over the intra-op threads
void matmul_q16_compute(const Attrs& at, OrtKernelContext* ctx) {
  Tensor x = input(ctx, 0);
  const int64_t K = x.dims[x.rank - 1];
  thread_local MatVecQ m;
  matvec_input(m, at, ctx, 1, at.bits, at.block, K, 1, at.n);
  int64_t ydims[4];
  for (size_t d = 0; d < x.rank; ++d) ydims[d] = x.dims[d];
  ydims[x.rank - 1] = m.N;
  float* y = output(ctx, 0, ydims, x.rank);
  const int64_t T = x.size / std::max<int64_t>(1, K);
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
  const int64_t span = std::max<int64_t>(1, (int64_t(1) << 15) / gbytes);       // groups a pass of the rows
  const MatVecQ& mq = m;   // (thread_local by reference: a pool thread would see its own)
  const std::vector<Acts16>& as = acts;
  // a task per 2^20 multiply-adds at least (~10 us here): a product smaller than two of those (a LoRA's at
  // B = 8) runs in this thread, since waking another costs a few us idle and far more when other processes
  // hold the cores (the thread's wait is the whole step's)
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 20) / (16 * Kp * T));
  parallel_ranges(ctx, N16, grain,
                  [&, T, span](int64_t g0, int64_t g1) {
                    for (int64_t g = g0; g < g1; g += span) rows16_batch(mq, as.data(), T, g, std::min(g1, g + span));
                  });
}

// one product's B rows of activation codes (interleaved layout)
struct RowActs {
  std::vector<int8_t> q;
  std::vector<float> xs;
  std::vector<int32_t> ns;
  std::vector<Acts16> acts;
  void prepare(const MatVecQ& m, const float* x, int64_t B, float* y) {
    const int64_t Kp = m.nb * m.G;
    q.resize(B * Kp);
    xs.resize(B * m.nb);
    ns.resize(B * m.nb);
    acts.resize(B);
    for (int64_t t = 0; t < B; ++t) {
      quantise16(x + t * m.K, m.K, m.G, m.nb, q.data() + t * Kp, xs.data() + t * m.nb, ns.data() + t * m.nb);
      acts[t] = Acts16{q.data() + t * Kp, xs.data() + t * m.nb, ns.data() + t * m.nb, y + t * m.N};
    }
  }
};

// Rwkv7MatMulSet: Rwkv7MatVecSet (matvec_ops.h) over B rows, each x_i (B, K_i), each output (B, N), every
// row as Rwkv7MatVecSet computes it. A level's interleaved products run as one split of their 16-row groups
// over the intra-op threads, by multiply-adds, each group for all B rows at once (rows16_batch); products
// in MatMulNBits' layout (scales not exact in float16) row by row in this thread.
void matmul_set_compute(const Attrs& at, OrtKernelContext* ctx) {
  const size_t P = at.src.size();
  thread_local std::vector<MatVecQ> ms;
  thread_local std::vector<RowActs> ra;
  thread_local std::vector<std::vector<float>> tmp;
  thread_local std::vector<Tensor> xs;
  thread_local std::vector<int64_t> level, cost;
  thread_local std::vector<std::pair<size_t, int64_t>> groups;   // (product, first group) of each group
  std::vector<float*> ys(P);
  if (ms.size() < P) ms.resize(P), ra.resize(P), tmp.resize(P);
  level.assign(P, 0);
  xs.resize(at.n_x);
  for (int64_t i = 0; i < at.n_x; ++i) xs[i] = input(ctx, i);   // (B changes from call to call)
  const int64_t B = xs[0].dims[0];
  int64_t levels = 0;
  for (size_t p = 0; p < P; ++p) {
    const int64_t s = at.src[p];
    level[p] = s >= 0 ? 0 : level[-s - 1] + 1;
    levels = std::max(levels, level[p] + 1);
  }
  size_t out = 0;
  for (size_t p = 0; p < P; ++p) {
    const int64_t s = at.src[p];
    const int64_t K = s >= 0 ? xs[s].dims[xs[s].rank - 1] : ms[-s - 1].N;
    matvec_input(ms[p], at, ctx, at.n_x + 3 * p, at.bitss[p], at.blocks[p], K,
                 at.layouts.empty() ? 0 : at.layouts[p], at.ns.empty() ? 0 : at.ns[p]);
    if (at.emits[p]) {
      const int64_t dims[2] = {B, ms[p].N};
      ys[p] = output(ctx, out++, dims, 2);
    } else {
      tmp[p].resize(B * ms[p].N);
      ys[p] = tmp[p].data();
    }
  }
  if (B == 0) return;
  for (int64_t L = 0; L < levels; ++L) {
    groups.clear();
    cost.assign(1, 0);
    for (size_t p = 0; p < P; ++p) {
      if (level[p] != L) continue;
      MatVecQ& m = ms[p];
      const int64_t s = at.src[p];
      const float* x = s >= 0 ? xs[s].data : ys[-s - 1];
      if (!m.i16) {   // MatMulNBits' layout: row by row, as Rwkv7MatVecSet
        for (int64_t t = 0; t < B; ++t) {
          matvec_prepare(m, x + t * m.K);
          matvec_rows(m, 0, m.N, ys[p] + t * m.N);
          apply_act(at.acts[p], ys[p] + t * m.N, m.N);
        }
        continue;
      }
      ra[p].prepare(m, x, B, ys[p]);
      for (int64_t g = 0; g < (m.N + 15) / 16; ++g) {
        groups.emplace_back(p, g);
        cost.push_back(cost.back() + 16 * m.nb * m.G * B);
      }
    }
    const int64_t G = int64_t(groups.size()), total = cost.back();
    if (!G) continue;
    const std::vector<MatVecQ>& mq = ms;   // (thread_local by reference: a pool thread would see its own)
    const std::vector<RowActs>& rq = ra;
    const std::vector<int64_t>& cs = cost;
    const std::vector<std::pair<size_t, int64_t>>& gs = groups;
    auto run = [&](int64_t g, int64_t g_end) {   // groups g .. g_end of the level, product by product
      while (g < g_end) {
        const size_t p = gs[g].first;
        const int64_t first = gs[g].second;
        int64_t last = first + 1;
        for (++g; g < g_end && gs[g].first == p; ++g) last = gs[g].second + 1;
        const MatVecQ& m = mq[p];
        rows16_batch(m, rq[p].acts.data(), B, first, last);
        const int64_t n0 = first * 16, n1 = std::min<int64_t>(last * 16, m.N);
        for (int64_t t = 0; t < B; ++t) apply_act(at.acts[p], ys[p] + t * m.N + n0, n1 - n0);
      }
    };
    // a task per 2^18 multiply-adds at least (~3 us here): a level of LoRA products (~1.7M multiply-adds at
    // B = 8 on the 0.1B) splits too, since the pool's threads are spinning between the levels of a step
    const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(g_threads, total >> 18));
    if (tasks == 1 || !g_parallel_for) {
      run(0, G);
      continue;
    }
    parallel_ranges(ctx, tasks, 1, [&, G, total, tasks](int64_t t0, int64_t t1) {
      // the groups whose cost prefix starts in [t0, t1) of `tasks` equal shares
      const int64_t lo = total * t0 / tasks, hi = total * t1 / tasks;
      const int64_t g0 = std::lower_bound(cs.begin(), cs.begin() + G, lo) - cs.begin();
      const int64_t g1 = std::lower_bound(cs.begin(), cs.begin() + G, hi) - cs.begin();
      run(g0, t1 == tasks ? G : g1);
    });
  }
}

}  // namespace
