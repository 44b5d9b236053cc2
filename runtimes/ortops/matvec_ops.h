// The quantised matrix-vector ops, on matvec_q.h's and matvec_q16.h's products:
//   Rwkv7MatVecQ(x (.., K), codes, scales, zero points)  attrs bits, block  (matvec_q_compute)
//       -> W x in MatMulNBits' layout
//   Rwkv7MatVecQ16 / Rwkv7MatVecQ16x8(x (.., K), codes, scales, zero points or empty)  attrs n, block, act
//       (matvec_q16_compute) -> act(W x) in the interleaved layout (one row: the step; T rows: the prefill;
//       act as apply_act's, op set 9: the prefill's FFN key with its relu squared)
//   Rwkv7MatVecSet(x_0 .., then codes, scales, zero points per product)  attrs n_x, src, acts, bitss, blocks,
//       emits, layouts, ns  (matvec_set_compute) -> a layer's products as one kernel (chains with an
//       activation between their products, apply_act)
// Each reads its weights through matvec_input and splits its rows over the intra-op threads.
#pragma once
#include "matvec_q16.h"

namespace {

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

// Rwkv7MatVecQ16(x (.., K), codes (N16, nb, 8 G) uint8, scales (N16, nb, 16) float16, zero points (N16, nb, 8)
// uint8 or empty)  attrs n (N), block (G), act -> y (.., N) = act(W x) for W in the interleaved layout (op set 7,
// matvec_q16.h; act: op set 9).
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
  if (T == 1) {
    matvec_run(ctx, m, x.data, y);
    return apply_act(at.act, y, m.N);
  }
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
  const int64_t act = at.act, N = m.N;
  parallel_ranges(ctx, N16, std::max<int64_t>(1, std::min<int64_t>(span, N16 / std::max(1, g_threads))),
                  [&, T, span](int64_t g0, int64_t g1) {
                    for (int64_t g = g0; g < g1; g += span) rows16_tokens(mq, as.data(), T, g, std::min(g1, g + span));
                    if (act)   // on the rows this range wrote, while they are in cache
                      for (int64_t t = 0; t < T; ++t)
                        apply_act(act, y + t * N + g0 * 16, std::min(N, g1 * 16) - g0 * 16);
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

}  // namespace
