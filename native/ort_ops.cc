// rwkvc's fused CPU kernels for ONNX Runtime (custom-op domain "ai.rwkvc", version 1).
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
// Built by rwkvc.runtimes.ortops with the host's g++ and registered into each session from rwkvc's own
// package (never from an artifact). ort_abi.h declares the few parts of ONNX Runtime's C API it uses.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <string>
#include <thread>
#include <vector>

#include "ort_abi.h"

namespace {

const OrtApi* g_api = nullptr;

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

// One head of the RWKV-7 recurrence and its output, all vectors of length N (this head's slice).
//   S' = S diag(decay) + (S a) b^T + v k^T;  y = S' r;  out = (GroupNorm(y) * lnw + lnb + v * (k . (r*r_k))) * g
// N is a template argument for the usual head sizes, so the row loops unroll completely.
template <int64_t NT>
void wkv7_head(const float* S, float* S2, int64_t n, const float* r, const float* decay, const float* k,
               const float* v, const float* a, const float* b, const float* r_k, const float* lnw,
               const float* lnb, const float* g, float eps, float* out) {
  const int64_t N = NT ? NT : n;
  float y[256], sa[256];
  // two passes over the rows, each of independent dot products (the out-of-order core overlaps them)
  for (int64_t i = 0; i < N; ++i) {
    const float* Si = S + i * N;
    float acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < N; ++j) acc += Si[j] * a[j];
    sa[i] = acc;
  }
  for (int64_t i = 0; i < N; ++i) {
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
  const float* data = nullptr;
  int64_t dims[4] = {0, 0, 0, 0};
  size_t rank = 0;
  int64_t size = 1;
};

Tensor input(OrtKernelContext* ctx, size_t i) {
  const OrtValue* v = nullptr;
  ort::KernelContext_GetInput(g_api, ctx, i, &v);
  Tensor t;
  void* p = nullptr;
  ort::GetTensorMutableData(g_api, const_cast<OrtValue*>(v), &p);
  t.data = static_cast<const float*>(p);
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

int64_t int_attr(const OrtKernelInfo* info, const char* name, int64_t dflt) {
  int64_t v = dflt;
  OrtStatus* st = ort::KernelInfoGetAttribute_int64(g_api, info, name, &v);
  if (st) ort::ReleaseStatus(g_api, st);
  return st ? dflt : v;
}

struct Attrs {
  float eps;
  int64_t first;
};

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

void wkv_compute(const Attrs& at, OrtKernelContext* ctx) {
  Tensor in[17];
  for (size_t i = 0; i < 17; ++i) in[i] = input(ctx, i);
  const float *r = in[0].data, *w = in[1].data, *k = in[2].data, *v = in[3].data, *a = in[4].data,
              *vg = in[5].data, *vf = in[6].data, *g = in[7].data, *w0 = in[9].data, *a0 = in[10].data,
              *v0 = in[11].data, *k_k = in[12].data, *k_a = in[13].data, *r_k = in[14].data,
              *lnw = in[15].data, *lnb = in[16].data;
  const Tensor& S = in[8];
  const int64_t H = S.dims[0], N = S.dims[1], C = H * N;
  const int64_t row[2] = {1, C};
  float* y = output(ctx, 0, row, 2);
  float* S2 = output(ctx, 1, S.dims, 3);
  if (N > 256) return;   // emit_onnx.fused_supported: heads of at most FUSED_MAX_HEAD = 256
  const HeadFn head = head_kernel(N);
  const bool first = at.first != 0;
  float decay[256], kk[256], kn[256], aa[256], bb[256], vv[256];
  for (int64_t h = 0; h < H; ++h) {
    const int64_t o = h * N;
    float norm = 0;
#pragma omp simd reduction(+ : norm)
    for (int64_t j = 0; j < N; ++j) {
      decay[j] = fast_exp(-kDecayScale * sigmoid(w[o + j] + w0[o + j]));
      kk[j] = k[o + j] * k_k[o + j];
      norm += kk[j] * kk[j];
    }
    norm = std::sqrt(norm);
    const float scale = 1.0f / (norm > 1e-12f ? norm : 1e-12f);
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) {
      const float iclr = sigmoid(a0[o + j] + a[o + j]);
      const float kkj = kk[j] * scale;
      aa[j] = -kkj;
      bb[j] = kkj * iclr;
      kn[j] = k[o + j] * ((1.0f - k_a[o + j]) + iclr * k_a[o + j]);
    }
    if (first) {
      for (int64_t j = 0; j < N; ++j) vv[j] = v[o + j];
    } else {
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) vv[j] = v[o + j] + (vf[o + j] - v[o + j]) * sigmoid(v0[o + j] + vg[o + j]);
    }
    head(S.data + h * N * N, S2 + h * N * N, N, r + o, decay, kn, vv, aa, bb, r_k + o, lnw + o, lnb + o, g + o,
         at.eps, y + o);
  }
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

int g_threads = 1;   // set by the runtime (rwkvc_ort_ops_set_threads): the session's intra-op threads

// Rwkv7WkvSeq(r, logw, k, v, a, b (T, C), S (H, N, N)) -> y (T, C), S' (H, N, N): the prefill's WKV,
// token by token (the exact recurrence), heads split over g_threads threads.
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
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(g_threads, H));
  std::vector<std::thread> pool;
  for (int64_t p = 1; p < nt; ++p) pool.emplace_back(run, H * p / nt, H * (p + 1) / nt);
  run(0, H / nt);   // this thread: the first share
  for (auto& th : pool) th.join();
}

void relu_square_compute(const Attrs&, OrtKernelContext* ctx) {
  Tensor x = input(ctx, 0);
  float* out = output(ctx, 0, x.dims, x.rank);
  for (int64_t i = 0; i < x.size; ++i) {
    const float t = x.data[i] > 0 ? x.data[i] : 0.0f;
    out[i] = t * t;
  }
}

// ---- op definitions --------------------------------------------------------------------------------------

struct OpDef {
  OrtCustomOp base;   // first member: ONNX Runtime hands back &base
  const char* name;
  size_t n_in, n_out;
  void (*compute)(const Attrs&, OrtKernelContext*);
};

struct Kernel {
  const OpDef* op;
  Attrs attrs;
};

const OpDef* def(const OrtCustomOp* op) { return reinterpret_cast<const OpDef*>(op); }

void* ORT_API_CALL create_kernel(const OrtCustomOp* op, const OrtApi*, const OrtKernelInfo* info) {
  return new Kernel{def(op), {float_attr(info, "eps", 1e-5f), int_attr(info, "first", 0)}};
}
const char* ORT_API_CALL get_name(const OrtCustomOp* op) { return def(op)->name; }
const char* ORT_API_CALL get_ep(const OrtCustomOp*) { return "CPUExecutionProvider"; }
ONNXTensorElementDataType ORT_API_CALL io_type(const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
size_t ORT_API_CALL n_inputs(const OrtCustomOp* op) { return def(op)->n_in; }
size_t ORT_API_CALL n_outputs(const OrtCustomOp* op) { return def(op)->n_out; }
void ORT_API_CALL compute(void* kernel, OrtKernelContext* ctx) {
  auto* k = static_cast<Kernel*>(kernel);
  k->op->compute(k->attrs, ctx);
}
void ORT_API_CALL destroy(void* kernel) { delete static_cast<Kernel*>(kernel); }
OrtCustomOpInputOutputCharacteristic ORT_API_CALL required(const OrtCustomOp*, size_t) {
  return INPUT_OUTPUT_REQUIRED;
}
OrtMemType ORT_API_CALL mem_default(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL one(const OrtCustomOp*) { return 1; }

OpDef make(const char* name, size_t n_in, size_t n_out, void (*fn)(const Attrs&, OrtKernelContext*)) {
  OpDef d;
  std::memset(&d, 0, sizeof d);
  d.base.version = kCustomOpVersion;
  d.base.CreateKernel = create_kernel;
  d.base.GetName = get_name;
  d.base.GetExecutionProviderType = get_ep;
  d.base.GetInputType = io_type;
  d.base.GetInputTypeCount = n_inputs;
  d.base.GetOutputType = io_type;
  d.base.GetOutputTypeCount = n_outputs;
  d.base.KernelCompute = compute;
  d.base.KernelDestroy = destroy;
  d.base.GetInputCharacteristic = required;
  d.base.GetOutputCharacteristic = required;
  d.base.GetInputMemoryType = mem_default;
  d.base.GetVariadicInputMinArity = one;
  d.base.GetVariadicInputHomogeneity = one;
  d.base.GetVariadicOutputMinArity = one;
  d.base.GetVariadicOutputHomogeneity = one;
  d.name = name;
  d.n_in = n_in;
  d.n_out = n_out;
  d.compute = fn;
  return d;
}

// the Mix op's output count is part of its name: Rwkv7Mix1 (channel-mix), Rwkv7Mix6 (time-mix)
OpDef g_ops[] = {
    make("Rwkv7Mix1", 6, 3, mix_compute),
    make("Rwkv7Mix6", 6, 8, mix_compute),
    make("Rwkv7WkvStep", 17, 2, wkv_compute),
    make("ReluSquare", 1, 1, relu_square_compute),
    make("Rwkv7WkvSeq", 7, 2, wkv_seq_compute),
};

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
  g_api = base->GetApi(kOrtApiVersion);
  if (!g_api) return nullptr;   // an older ONNX Runtime: session creation then names the unknown ops
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = ort::CreateCustomOpDomain(g_api, "ai.rwkvc", &domain)) return st;
  for (OpDef& d : g_ops)
    if (OrtStatus* st = ort::CustomOpDomain_Add(g_api, domain, &d.base)) return st;
  return ort::AddCustomOpDomain(g_api, options, domain);
}

// the library's version of the op set, for rwkvc.runtimes.ortops to check what it loaded
extern "C" __attribute__((visibility("default"))) int rwkvc_ort_ops_version() { return 1; }

// threads for the kernels that split work (Rwkv7WkvSeq); the runtime passes its intra-op thread count
extern "C" __attribute__((visibility("default"))) void rwkvc_ort_ops_set_threads(int n) { g_threads = n > 0 ? n : 1; }
