// Token sampling with the semantics (and the random stream) of rwkvc/sampling.py:
//   bans -> presence/frequency penalties -> softmax -> top-p -> top-k -> temperature -> one draw.
// The draw uses numpy's default_rng(seed): SeedSequence + PCG64 (XSL-RR) + random() doubles, so a
// seeded run makes the same choices as the Python Sampler given the same logits. Float64 throughout;
// the softmax normaliser is numpy's pairwise sum, cumulative sums are sequential as in numpy.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace rwkv {

// ---- numpy.random.SeedSequence + PCG64 ---------------------------------------------------------
class Pcg64 {
 public:
  explicit Pcg64(const std::vector<uint32_t>& entropy) {
    uint64_t v[4];
    SeedSequenceState(entropy, v);
    unsigned __int128 s = (static_cast<unsigned __int128>(v[0]) << 64) | v[1];
    unsigned __int128 i = (static_cast<unsigned __int128>(v[2]) << 64) | v[3];
    inc_ = (i << 1) | 1;
    state_ = 0;
    Step();
    state_ += s;
    Step();
  }
  static Pcg64 FromSeed(uint64_t seed) {
    std::vector<uint32_t> e;
    do {
      e.push_back(static_cast<uint32_t>(seed & 0xFFFFFFFFu));
      seed >>= 32;
    } while (seed);
    return Pcg64(e);
  }
  uint64_t Next64() {
    Step();
    uint64_t x = static_cast<uint64_t>(state_ >> 64) ^ static_cast<uint64_t>(state_);
    unsigned rot = static_cast<unsigned>(state_ >> 122);
    return (x >> rot) | (x << ((64 - rot) & 63));
  }
  double Random() { return static_cast<double>(Next64() >> 11) * (1.0 / 9007199254740992.0); }

 private:
  unsigned __int128 state_, inc_;
  void Step() {
    const unsigned __int128 mul = (static_cast<unsigned __int128>(0x2360ED051FC65DA4ULL) << 64) | 0x4385DF649FCCF645ULL;
    state_ = state_ * mul + inc_;
  }
  static void SeedSequenceState(const std::vector<uint32_t>& ent, uint64_t out[4]) {
    const uint32_t INIT_A = 0x43b0d7e5, MULT_A = 0x931e8875, INIT_B = 0x8b51f9dd, MULT_B = 0x58f38ded;
    const uint32_t MIX_L = 0xca01f9dd, MIX_R = 0x4973f715;
    uint32_t hc = INIT_A;
    auto hashmix = [&](uint32_t v) {
      v ^= hc;
      hc *= MULT_A;
      v *= hc;
      v ^= v >> 16;
      return v;
    };
    auto mix = [&](uint32_t x, uint32_t y) {
      uint32_t r = MIX_L * x - MIX_R * y;
      r ^= r >> 16;
      return r;
    };
    uint32_t pool[4];
    for (size_t i = 0; i < 4; ++i) pool[i] = hashmix(i < ent.size() ? ent[i] : 0);
    for (int s = 0; s < 4; ++s)
      for (int d = 0; d < 4; ++d)
        if (s != d) pool[d] = mix(pool[d], hashmix(pool[s]));
    for (size_t s = 4; s < ent.size(); ++s)
      for (int d = 0; d < 4; ++d) pool[d] = mix(pool[d], hashmix(ent[s]));
    uint32_t h = INIT_B, words[8];
    for (int i = 0; i < 8; ++i) {
      uint32_t v = pool[i % 4];
      v ^= h;
      h *= MULT_B;
      v *= h;
      v ^= v >> 16;
      words[i] = v;
    }
    for (int k = 0; k < 4; ++k) out[k] = static_cast<uint64_t>(words[2 * k]) | (static_cast<uint64_t>(words[2 * k + 1]) << 32);
  }
};

// numpy's float64 add.reduce over a contiguous array (pairwise, blocks of 8, leaves <= 128)
inline double PairwiseSum(const double* a, size_t n) {
  if (n < 8) {
    double r = 0.;
    for (size_t i = 0; i < n; ++i) r += a[i];
    return r;
  }
  if (n <= 128) {
    double r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    size_t i = 8;
    for (; i < n - (n % 8); i += 8)
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  size_t n2 = n / 2;
  n2 -= n2 % 8;
  return PairwiseSum(a, n2) + PairwiseSum(a + n2, n - n2);
}

struct SamplingConfig {
  double temperature = 1.0;   // >= 0; 0 = greedy
  double top_p = 0.85;        // (0, 1]
  int64_t top_k = 0;          // 0 = off
  double alpha_presence = 0.0;
  double alpha_frequency = 0.0;
  double alpha_decay = 0.996;
  std::vector<int64_t> token_ban;
  bool seeded = false;
  uint64_t seed = 0;
};

class Sampler {
 public:
  Sampler(SamplingConfig cfg, std::vector<bool> zero_weight)
      : cfg_(std::move(cfg)), zero_weight_(std::move(zero_weight)),
        rng_(cfg_.seeded ? Pcg64::FromSeed(cfg_.seed) : RandomPcg()) {}

  void Observe(int64_t tok) {
    double w = (tok >= 0 && static_cast<size_t>(tok) < zero_weight_.size() && zero_weight_[tok]) ? 0.0 : 1.0;
    if (!counts_.empty() && cfg_.alpha_decay != 1.0)
      for (double& c : counts_) c *= cfg_.alpha_decay;
    auto it = slot_.find(tok);
    if (it == slot_.end()) {
      slot_[tok] = ids_.size();
      ids_.push_back(tok);
      counts_.push_back(w);
    } else {
      counts_[it->second] += w;
    }
  }

  int64_t Sample(const float* logits, size_t n) {
    std::vector<double> x(logits, logits + n);
    for (int64_t b : cfg_.token_ban)
      if (b >= 0 && static_cast<size_t>(b) < n) x[b] = -std::numeric_limits<double>::infinity();
    for (size_t s = 0; s < ids_.size(); ++s)
      if (static_cast<size_t>(ids_[s]) < n) x[ids_[s]] -= cfg_.alpha_presence + counts_[s] * cfg_.alpha_frequency;
    for (double v : x)
      if (std::isnan(v)) throw std::runtime_error("logits contain NaN; check the model output");
    const double inf = std::numeric_limits<double>::infinity();
    size_t am = std::max_element(x.begin(), x.end()) - x.begin();  // first maximum, as np.argmax
    double m = x[am];
    if (cfg_.temperature == 0) {
      if (m == -inf) throw std::runtime_error("every token is banned or has logit -inf; nothing can be sampled");
      return static_cast<int64_t>(am);
    }
    std::vector<int64_t> ids;
    std::vector<double> w;
    if (!std::isfinite(m)) {
      if (m == -inf) throw std::runtime_error("every token is banned or has logit -inf; nothing can be sampled");
      for (size_t i = 0; i < n; ++i)
        if (x[i] == inf) ids.push_back(i);
      w.assign(ids.size(), 1.0);
    } else {
      std::vector<double> probs(n);
      for (size_t i = 0; i < n; ++i) probs[i] = std::exp(x[i] - m);
      double tot = PairwiseSum(probs.data(), n);
      for (double& p : probs) p /= tot;
      bool filtered = cfg_.top_p < 1.0;
      double cutoff = filtered ? TopPCutoff(probs) : 0.0;
      int64_t k = cfg_.top_k;
      if (k > 0 && static_cast<size_t>(k) < n) {
        std::vector<int64_t> pool;
        for (size_t i = 0; i < n; ++i)
          if (!filtered || probs[i] >= cutoff) pool.push_back(i);
        if (pool.size() > static_cast<size_t>(k)) {
          // the k most probable (ties: lower id first; numpy's argpartition leaves ties unspecified)
          std::nth_element(pool.begin(), pool.begin() + k, pool.end(), [&](int64_t a, int64_t b) {
            return probs[a] > probs[b] || (probs[a] == probs[b] && a < b);
          });
          pool.resize(k);
        }
        std::sort(pool.begin(), pool.end());
        ids = pool;
      } else {
        for (size_t i = 0; i < n; ++i)
          if (filtered ? probs[i] >= cutoff : probs[i] > 0) ids.push_back(i);
      }
      if (ids.empty()) ids.push_back(static_cast<int64_t>(am));
      for (int64_t id : ids)
        w.push_back(cfg_.temperature == 1.0 ? probs[id] : std::exp((x[id] - m) / cfg_.temperature));
    }
    if (ids.size() == 1) return ids[0];
    std::vector<double> c(w.size());
    double acc = 0;
    for (size_t i = 0; i < w.size(); ++i) c[i] = acc += w[i];
    double u = rng_.Random() * c.back();
    size_t pos = std::upper_bound(c.begin(), c.end(), u) - c.begin();  // searchsorted side="right"
    return ids[std::min(pos, ids.size() - 1)];
  }

 private:
  SamplingConfig cfg_;
  std::vector<bool> zero_weight_;
  Pcg64 rng_;
  std::vector<int64_t> ids_;
  std::vector<double> counts_;
  std::unordered_map<int64_t, size_t> slot_;

  static Pcg64 RandomPcg() {
    std::random_device rd;
    return Pcg64({rd(), rd(), rd(), rd()});
  }

  // probability of the token at which the descending cumulative sum first reaches top_p
  double TopPCutoff(const std::vector<double>& probs) const {
    double pmax = *std::max_element(probs.begin(), probs.end());
    if (pmax >= cfg_.top_p) return pmax;
    for (double t : {1e-3, 1e-5, -1.0}) {  // sort only the head of the distribution when it suffices
      std::vector<double> top;
      for (double p : probs)
        if (t < 0 || p >= t) top.push_back(p);
      std::sort(top.begin(), top.end(), std::greater<double>());
      double cum = 0;
      for (double p : top) {
        cum += p;
        if (cum >= cfg_.top_p) return p;
      }
    }
    double mn = 0;
    for (double p : probs)
      if (p > 0 && (mn == 0 || p < mn)) mn = p;
    return mn;
  }
};

}  // namespace rwkv
