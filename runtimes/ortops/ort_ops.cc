// rwkvc's fused CPU kernels for ONNX Runtime: custom-op domain "ai.rwkvc", op set 9.
//
// Without them the cpu target's step graph of an RWKV-7 model runs ~70 ONNX Runtime kernels a layer, most
// of them element-wise work on one 768-wide row that costs less than the executor's ~2.5 us per kernel, plus
// its matrix products. These ops fold a layer into a few kernels, serve the prefill too, and compute the
// step's 4-bit and int8 products:
//
//   file              ops
//   mix.h             Rwkv7Mix1, Rwkv7Mix6 (residual add, LayerNorm, token-shift mixes), ReluSquare
//   wkv.h             Rwkv7WkvStep (the step's recurrence and time-mix output), Rwkv7WkvPrefill (the
//                     prefill's), Rwkv7WkvSeq (a prefill's recurrence alone)
//   sparse_ffn.h      Rwkv7SparseFfn, Rwkv7SparseFfnF32, Rwkv7SparseFfnQ, Rwkv7SparseFfnQF32
//   clustered_head.h  Rwkv7ClusteredHead, Rwkv7ClusteredHeadF32, Rwkv7ClusteredHeadTop, Rwkv7ClusteredHeadTopF32
//   matvec_ops.h      Rwkv7MatVecQ, Rwkv7MatVecQ16, Rwkv7MatVecQ16x8, Rwkv7MatVecSet
//   batch.h           Rwkv7Mix1B, Rwkv7Mix6B, Rwkv7WkvStepB, Rwkv7MatMulQ16, Rwkv7MatMulQ16x8, Rwkv7MatMulSet
//                     (the batched step's: B sequences of one token each)
// with their helpers in common.h (ONNX Runtime plumbing, the thread split, SIMD reductions), act_dots.h
// (activation-row dot products), matvec_q.h and matvec_q16.h (the matrix-vector products in MatMulNBits'
// layout and in the interleaved one); ort_abi.h declares the parts of ONNX Runtime's C API used.
//
// The op set's version (rwkvc_ort_ops_version) is the newest one an artifact may name: this library runs
// artifacts of versions 1 to 10, each op keeping the meaning it has in the version that adds it. The versions:
//   1  Rwkv7Mix1, Rwkv7Mix6, Rwkv7WkvStep, ReluSquare, Rwkv7WkvSeq
//   2  Rwkv7SparseFfn(F32), Rwkv7ClusteredHead(F32)
//   3  Rwkv7MatVecQ, Rwkv7MatVecSet (chains with relu or relu squared between products)
//   4  Rwkv7ClusteredHeadTop(F32)
//   5  tanh and sigmoid between a set's products
//   6  Rwkv7SparseFfnQ(F32)
//   7  the interleaved layout: Rwkv7MatVecQ16, Rwkv7MatVecQ16x8, and Rwkv7MatVecSet's layouts and ns
//   8  the batched step: Rwkv7Mix1B, Rwkv7Mix6B, Rwkv7WkvStepB, Rwkv7MatMulQ16, Rwkv7MatMulQ16x8, Rwkv7MatMulSet
//   9  Rwkv7WkvPrefill
//   10 Rwkv7Mix1B / Mix6B's attribute row (their shift rows read from the batched step's whole shift state)
//
// This file is the library's one translation unit: it includes every family (their helpers share one
// anonymous namespace, so the compiler sees and inlines across all of them), defines the op table, and
// exports RegisterCustomOps, rwkvc_ort_ops_version and rwkvc_ort_ops_set_threads. rwkvc.runtimes.ortops
// builds it with the host's g++ and registers it into each session from rwkvc's own package (never from an
// artifact).
#include "common.h"
#include "mix.h"
#include "wkv.h"
#include "act_dots.h"
#include "sparse_ffn.h"
#include "clustered_head.h"
#include "matvec_q.h"
#include "matvec_q16.h"
#include "matvec_ops.h"
#include "batch.h"

namespace {

struct OpDef {
  OrtCustomOp base;   // first member: ONNX Runtime hands back &base
  const char* name;
  const char* in_types;   // one letter per input (element_type), e.g. "fbf"
  const char* out_types;  // one letter per output; nullptr: all float32
  size_t n_in, n_out;
  void (*compute)(const Attrs&, OrtKernelContext*);
  bool variadic;          // one variadic input of mixed types and one variadic float output
};

struct Kernel {
  const OpDef* op;
  Attrs attrs;
};

const OpDef* def(const OrtCustomOp* op) { return reinterpret_cast<const OpDef*>(op); }

void* ORT_API_CALL create_kernel(const OrtCustomOp* op, const OrtApi*, const OrtKernelInfo* info) {
  Attrs a{float_attr(info, "eps", 1e-5f), int_attr(info, "first", 0), float_attr(info, "mlp_threshold", 0.5f),
          float_attr(info, "q_scale", 1.0f), float_attr(info, "top_p", 1.0f), int_attr(info, "q_lo", 0),
          int_attr(info, "q_bits", 1), int_attr(info, "min_k", 1), int_attr(info, "max_k", 1 << 30),
          int_attr(info, "act", 0), int_attr(info, "bits", 4), int_attr(info, "block", 32)};
  a.n = int_attr(info, "n", 0);
  a.row = int_attr(info, "row", -1);
  if (def(op)->variadic) {
    a.src = ints_attr(info, "src");
    a.acts = ints_attr(info, "acts");
    a.bitss = ints_attr(info, "bitss");
    a.blocks = ints_attr(info, "blocks");
    a.emits = ints_attr(info, "emits");
    a.layouts = ints_attr(info, "layouts");
    a.ns = ints_attr(info, "ns");
    a.n_x = int_attr(info, "n_x", 1);
  }
  a.cache = std::make_shared<InputCache>(def(op)->variadic ? a.n_x + 3 * a.src.size() : def(op)->n_in);
  return new Kernel{def(op), a};
}
const char* ORT_API_CALL get_name(const OrtCustomOp* op) { return def(op)->name; }
const char* ORT_API_CALL get_ep(const OrtCustomOp*) { return "CPUExecutionProvider"; }
// f float32, h float16, u uint8, b int8, w uint16, i int32, l int64
ONNXTensorElementDataType element_type(char c) {
  switch (c) {
    case 'u': return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    case 'b': return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
    case 'w': return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16;
    case 'h': return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    case 'i': return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    case 'l': return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
}
ONNXTensorElementDataType ORT_API_CALL in_type(const OrtCustomOp* op, size_t i) {
  return def(op)->variadic ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED : element_type(def(op)->in_types[i]);
}
ONNXTensorElementDataType ORT_API_CALL out_type(const OrtCustomOp* op, size_t i) {
  return def(op)->out_types ? element_type(def(op)->out_types[i]) : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
size_t ORT_API_CALL n_inputs(const OrtCustomOp* op) { return def(op)->n_in; }
size_t ORT_API_CALL n_outputs(const OrtCustomOp* op) { return def(op)->n_out; }
void ORT_API_CALL compute(void* kernel, OrtKernelContext* ctx) {
  auto* k = static_cast<Kernel*>(kernel);
  k->op->compute(k->attrs, ctx);
}
void ORT_API_CALL destroy(void* kernel) { delete static_cast<Kernel*>(kernel); }
OrtCustomOpInputOutputCharacteristic ORT_API_CALL required(const OrtCustomOp* op, size_t) {
  return def(op)->variadic ? INPUT_OUTPUT_VARIADIC : INPUT_OUTPUT_REQUIRED;
}
int ORT_API_CALL homogeneous(const OrtCustomOp* op) { return def(op)->variadic ? 0 : 1; }
OrtMemType ORT_API_CALL mem_default(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL one(const OrtCustomOp*) { return 1; }

OpDef make(const char* name, const char* in_types, size_t n_out, void (*fn)(const Attrs&, OrtKernelContext*),
         const char* out_types = nullptr) {
  OpDef d;
  std::memset(&d, 0, sizeof d);
  d.base.version = kCustomOpVersion;
  d.base.CreateKernel = create_kernel;
  d.base.GetName = get_name;
  d.base.GetExecutionProviderType = get_ep;
  d.base.GetInputType = in_type;
  d.base.GetInputTypeCount = n_inputs;
  d.base.GetOutputType = out_type;
  d.base.GetOutputTypeCount = n_outputs;
  d.base.KernelCompute = compute;
  d.base.KernelDestroy = destroy;
  d.base.GetInputCharacteristic = required;
  d.base.GetOutputCharacteristic = required;
  d.base.GetInputMemoryType = mem_default;
  d.base.GetVariadicInputMinArity = one;
  d.base.GetVariadicInputHomogeneity = homogeneous;
  d.base.GetVariadicOutputMinArity = one;
  d.base.GetVariadicOutputHomogeneity = one;
  d.name = name;
  d.in_types = in_types;
  d.n_in = std::strlen(in_types);
  d.n_out = n_out;
  d.out_types = out_types;
  d.compute = fn;
  d.variadic = false;
  return d;
}

OpDef make_variadic(const char* name, void (*fn)(const Attrs&, OrtKernelContext*)) {
  OpDef d = make(name, "f", 1, fn);
  d.variadic = true;
  return d;
}

// the Mix op's output count is part of its name: Rwkv7Mix1 (channel-mix), Rwkv7Mix6 (time-mix)
OpDef g_ops[] = {
    make("Rwkv7Mix1", "ffffff", 3, mix_compute),
    make("Rwkv7Mix6", "ffffff", 8, mix_compute),
    make("Rwkv7WkvStep", "fffffffffffffffff", 2, wkv_compute),
    make("ReluSquare", "f", 1, relu_square_compute),
    make("Rwkv7WkvSeq", "fffffff", 2, wkv_seq_compute),
    make("Rwkv7WkvPrefill", "fffffffffffffffff", 2, wkv_prefill_compute),
    make("Rwkv7SparseFfn", "fffubfbf", 1, sparse_ffn_compute<int8_t>),
    make("Rwkv7SparseFfnF32", "fffuffff", 1, sparse_ffn_compute<float>),
    make("Rwkv7SparseFfnQ", "fbfbfubfbf", 1, sparse_ffn_compute<int8_t, true>),
    make("Rwkv7SparseFfnQF32", "fbfbfuffff", 1, sparse_ffn_compute<float, true>),
    make("Rwkv7ClusteredHead", "ffbfiiwf", 1, clustered_head_compute<int8_t>),
    make("Rwkv7ClusteredHeadF32", "ffffiiwf", 1, clustered_head_compute<float>),
    make("Rwkv7ClusteredHeadTop", "ffbfiiwffl", 2, clustered_head_compute<int8_t, true>, "fl"),
    make("Rwkv7ClusteredHeadTopF32", "ffffiiwffl", 2, clustered_head_compute<float, true>, "fl"),
    make("Rwkv7MatVecQ", "fufu", 1, matvec_q_compute),
    make("Rwkv7MatVecQ16", "fuhu", 1, matvec_q16_compute),
    make("Rwkv7MatVecQ16x8", "fufu", 1, matvec_q16_compute),
    make_variadic("Rwkv7MatVecSet", matvec_set_compute),
    make("Rwkv7Mix1B", "ffffff", 3, mix_batch_compute),
    make("Rwkv7Mix6B", "ffffff", 8, mix_batch_compute),
    make("Rwkv7WkvStepB", "fffffffffffffffff", 2, wkv_batch_compute),
    make("Rwkv7MatMulQ16", "fuhu", 1, matmul_q16_compute),
    make("Rwkv7MatMulQ16x8", "fufu", 1, matmul_q16_compute),
    make_variadic("Rwkv7MatMulSet", matmul_set_compute),
};

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
  g_api = base->GetApi(kOrtApiVersion);
  if (!g_api) return nullptr;   // an older ONNX Runtime: session creation then names the unknown ops
  if (const OrtApi* api = base->GetApi(ort::kParallelForApiVersion)) g_parallel_for = ort::KernelContext_ParallelFor(api);
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = ort::CreateCustomOpDomain(g_api, "ai.rwkvc", &domain)) return st;
  for (OpDef& d : g_ops)
    if (OrtStatus* st = ort::CustomOpDomain_Add(g_api, domain, &d.base)) return st;
  return ort::AddCustomOpDomain(g_api, options, domain);
}

// the library's version of the op set, for rwkvc.runtimes.ortops to check what it loaded
extern "C" __attribute__((visibility("default"))) int rwkvc_ort_ops_version() { return 10; }

// threads for the kernels that split work (Rwkv7WkvSeq); the runtime passes its intra-op thread count
extern "C" __attribute__((visibility("default"))) void rwkvc_ort_ops_set_threads(int n) { g_threads = n > 0 ? n : 1; }
