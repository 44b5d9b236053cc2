// The parts of ONNX Runtime's C API (its stable, append-only ABI) that rwkvc's kernels use, declared here
// because the onnxruntime wheel ships no C headers. OrtApi is a table of function pointers whose order
// never changes between releases; these are the slots (0-based) of the functions we call, all present
// since API version 1. Custom-op descriptors of `version` 14 have every member up to the variadic ones.
#pragma once
#include <cstddef>
#include <cstdint>

#define ORT_API_CALL

extern "C" {
struct OrtApi;
struct OrtStatus;
struct OrtSessionOptions;
struct OrtCustomOpDomain;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtValue;
struct OrtTensorTypeAndShapeInfo;
struct OrtShapeInferContext;

enum ONNXTensorElementDataType {
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED = 0,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT = 1,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 = 2,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 = 3,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16 = 4,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 = 6,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 = 7,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 = 10
};
enum OrtCustomOpInputOutputCharacteristic { INPUT_OUTPUT_REQUIRED = 0, INPUT_OUTPUT_OPTIONAL = 1, INPUT_OUTPUT_VARIADIC = 2 };
enum OrtMemType { OrtMemTypeCPUInput = -2, OrtMemTypeCPUOutput = -1, OrtMemTypeDefault = 0 };

struct OrtApiBase {
  const OrtApi*(ORT_API_CALL* GetApi)(uint32_t version);
  const char*(ORT_API_CALL* GetVersionString)();
};

struct OrtCustomOp {
  uint32_t version;
  void*(ORT_API_CALL* CreateKernel)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info);
  const char*(ORT_API_CALL* GetName)(const OrtCustomOp* op);
  const char*(ORT_API_CALL* GetExecutionProviderType)(const OrtCustomOp* op);
  ONNXTensorElementDataType(ORT_API_CALL* GetInputType)(const OrtCustomOp* op, size_t index);
  size_t(ORT_API_CALL* GetInputTypeCount)(const OrtCustomOp* op);
  ONNXTensorElementDataType(ORT_API_CALL* GetOutputType)(const OrtCustomOp* op, size_t index);
  size_t(ORT_API_CALL* GetOutputTypeCount)(const OrtCustomOp* op);
  void(ORT_API_CALL* KernelCompute)(void* op_kernel, OrtKernelContext* context);
  void(ORT_API_CALL* KernelDestroy)(void* op_kernel);
  OrtCustomOpInputOutputCharacteristic(ORT_API_CALL* GetInputCharacteristic)(const OrtCustomOp* op, size_t index);
  OrtCustomOpInputOutputCharacteristic(ORT_API_CALL* GetOutputCharacteristic)(const OrtCustomOp* op, size_t index);
  OrtMemType(ORT_API_CALL* GetInputMemoryType)(const OrtCustomOp* op, size_t index);
  int(ORT_API_CALL* GetVariadicInputMinArity)(const OrtCustomOp* op);
  int(ORT_API_CALL* GetVariadicInputHomogeneity)(const OrtCustomOp* op);
  int(ORT_API_CALL* GetVariadicOutputMinArity)(const OrtCustomOp* op);
  int(ORT_API_CALL* GetVariadicOutputHomogeneity)(const OrtCustomOp* op);
  // members read only by descriptors of version >= 16 (left null here)
  OrtStatus*(ORT_API_CALL* CreateKernelV2)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info,
                                           void** kernel);
  OrtStatus*(ORT_API_CALL* KernelComputeV2)(void* op_kernel, OrtKernelContext* context);
  OrtStatus*(ORT_API_CALL* InferOutputShapeFn)(const OrtCustomOp* op, OrtShapeInferContext* ctx);
  int(ORT_API_CALL* GetStartVersion)(const OrtCustomOp* op);
  int(ORT_API_CALL* GetEndVersion)(const OrtCustomOp* op);
  size_t(ORT_API_CALL* GetMayInplace)(int** input_index, int** output_index);
  void(ORT_API_CALL* ReleaseMayInplace)(int* input_index, int* output_index);
  size_t(ORT_API_CALL* GetAliasMap)(int** input_index, int** output_index);
  void(ORT_API_CALL* ReleaseAliasMap)(int* input_index, int* output_index);
};
static_assert(sizeof(OrtCustomOp) == 208, "OrtCustomOp layout");
}

const uint32_t kOrtApiVersion = 14;      // GetApi(14): every ONNX Runtime since 1.14 has it
const uint32_t kCustomOpVersion = 14;    // this descriptor fills the members up to the variadic ones

namespace ort {

template <typename Fn>
inline Fn slot(const OrtApi* api, size_t index) {
  return reinterpret_cast<Fn>(reinterpret_cast<void* const*>(api)[index]);
}

#define RWKVC_ORT_FN(NAME, INDEX, PARAMS, ARGS)                                               \
  inline OrtStatus* NAME(const OrtApi* api, PARAMS) {                                           \
    return slot<OrtStatus* (*)(PARAMS)>(api, INDEX)(ARGS);                                      \
  }
#define P(...) __VA_ARGS__

RWKVC_ORT_FN(CreateCustomOpDomain, 26, P(const char* domain, OrtCustomOpDomain** out), P(domain, out))
RWKVC_ORT_FN(CustomOpDomain_Add, 27, P(OrtCustomOpDomain* domain, const OrtCustomOp* op), P(domain, op))
RWKVC_ORT_FN(AddCustomOpDomain, 28, P(OrtSessionOptions* options, OrtCustomOpDomain* domain), P(options, domain))
RWKVC_ORT_FN(GetTensorMutableData, 51, P(OrtValue* value, void** out), P(value, out))
RWKVC_ORT_FN(GetDimensionsCount, 61, P(const OrtTensorTypeAndShapeInfo* info, size_t* out), P(info, out))
RWKVC_ORT_FN(GetDimensions, 62, P(const OrtTensorTypeAndShapeInfo* info, int64_t* dims, size_t n), P(info, dims, n))
RWKVC_ORT_FN(GetTensorTypeAndShape, 65, P(const OrtValue* value, OrtTensorTypeAndShapeInfo** out), P(value, out))
RWKVC_ORT_FN(KernelInfoGetAttribute_float, 85, P(const OrtKernelInfo* info, const char* name, float* out),
             P(info, name, out))
RWKVC_ORT_FN(KernelInfoGetAttribute_int64, 86, P(const OrtKernelInfo* info, const char* name, int64_t* out),
             P(info, name, out))
RWKVC_ORT_FN(KernelInfoGetAttributeArray_int64, 163,
             P(const OrtKernelInfo* info, const char* name, int64_t* out, size_t* size), P(info, name, out, size))
RWKVC_ORT_FN(KernelContext_GetInput, 90, P(const OrtKernelContext* ctx, size_t index, const OrtValue** out),
             P(ctx, index, out))
RWKVC_ORT_FN(KernelContext_GetOutput, 91,
             P(OrtKernelContext* ctx, size_t index, const int64_t* dims, size_t n, OrtValue** out),
             P(ctx, index, dims, n, out))

#undef P
#undef RWKVC_ORT_FN

// KernelContext_ParallelFor (slot 274, API 17): fn(data, i) for i in 0..total-1 on the session's intra-op
// threads (num_batch 0: one task each)
using ParallelForFn = OrtStatus* (*)(const OrtKernelContext* ctx, void (*fn)(void*, size_t), size_t total,
                                     size_t num_batch, void* data);
const uint32_t kParallelForApiVersion = 17;
inline ParallelForFn KernelContext_ParallelFor(const OrtApi* api) { return slot<ParallelForFn>(api, 274); }

inline void ReleaseStatus(const OrtApi* api, OrtStatus* st) { slot<void (*)(OrtStatus*)>(api, 93)(st); }
inline void ReleaseTensorTypeAndShapeInfo(const OrtApi* api, OrtTensorTypeAndShapeInfo* info) {
  slot<void (*)(OrtTensorTypeAndShapeInfo*)>(api, 99)(info);
}

}  // namespace ort
