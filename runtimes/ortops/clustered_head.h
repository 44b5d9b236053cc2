// RWKV-Lite's hierarchical (clustered) head of the step graph:
//   Rwkv7ClusteredHead / Rwkv7ClusteredHeadF32(x (1, C), cluster logits (K,), rows (V, C), row scale (V,),
//       bounds (K + 1,), row token (V,), token cluster (V,) uint16, token log q (V,) or empty)
//       attrs top_p, min_k, max_k -> logits (1, V)
//   Rwkv7ClusteredHeadTop / Rwkv7ClusteredHeadTopF32: also the top token (its logits optional)
// Here: clustered_head_compute and the argmax without the V logits (head_top, max_skip_nan).
#pragma once
#include "act_dots.h"

namespace {

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

}  // namespace
