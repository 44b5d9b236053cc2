// An rwkvc TVM artifact loaded through the TVM runtime (tvm-ffi C++ API):
//   model.so (Relax VM executable + kernels) -> vm_load_executable -> VM module with step / prefill;
//   weights.bin memory-mapped, one tensor per params.json entry (zero-copy), passed as the params tuple.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace rwkv {

namespace ffi = tvm::ffi;

inline std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot read " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

inline ffi::Any JsonAt(const ffi::json::Object& o, const char* key) {
  auto it = o.find(ffi::String(key));
  if (it == o.end()) throw std::runtime_error(std::string("manifest has no field '") + key + "'");
  return (*it).second;
}

// A tensor over memory it does not own (a slice of the weights mapping, or a caller's buffer).
struct BorrowedAlloc {
  void* ptr;
  void AllocData(DLTensor* t) { t->data = ptr; }
  void FreeData(DLTensor*) {}
};

inline ffi::Tensor Borrow(void* ptr, std::vector<int64_t> shape, DLDataType dtype) {
  return ffi::Tensor::FromNDAlloc(BorrowedAlloc{ptr}, ffi::Shape(shape), dtype, DLDevice{kDLCPU, 0});
}

struct State {
  std::vector<float> shift, wkv;  // (L, 2, C), (L, H, N, N) (RWKV-4: (L, 3, C), aa / bb / pp per channel)
};

class Model {
 public:
  int64_t L = 0, C = 0, H = 0, N = 0, V = 0;
  std::string dir, vocab_file, version;
  std::vector<int64_t> wkv_shape;  // the wkv state's shape (ModelConfig.state_shapes)

  // prefill_chunk: as the Python runtimes (1024): int8 matrices quantise their input per call, so the
  // chunking is part of the numbers
  explicit Model(const std::string& artifact_dir, int64_t prefill_chunk = 1024)
      : dir(artifact_dir), chunk_(prefill_chunk) {
    ffi::json::Object m = ffi::json::Parse(ReadFile(dir + "/manifest.json")).cast<ffi::json::Object>();
    ffi::json::Object cfg = JsonAt(m, "model").cast<ffi::json::Object>();
    L = JsonAt(cfg, "n_layer").cast<int64_t>();
    C = JsonAt(cfg, "n_embd").cast<int64_t>();
    N = JsonAt(cfg, "head_size").cast<int64_t>();
    V = JsonAt(cfg, "vocab_size").cast<int64_t>();
    H = C / N;
    version = std::string(JsonAt(cfg, "version").cast<ffi::String>());
    wkv_shape = version == "4" ? std::vector<int64_t>{L, 3, C} : std::vector<int64_t>{L, H, N, N};
    vocab_file = dir + "/" + std::string(JsonAt(JsonAt(m, "tokenizer").cast<ffi::json::Object>(), "file").cast<ffi::String>());
    std::string lib_path = dir + "/" + std::string(JsonAt(m, "library").cast<ffi::String>());
    std::string index_path = dir + "/" + std::string(JsonAt(m, "params").cast<ffi::String>());

    ffi::Module lib = ffi::Module::LoadFromFile(lib_path);
    vm_ = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
    ffi::Module& vm = *vm_;
    vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2 /* pooled allocator */);
    step_ = vm->GetFunction("step").value();
    prefill_ = vm->GetFunction("prefill").value();
    LoadParams(index_path);
  }

  ~Model() {
    params_ = ffi::Array<ffi::Tensor>();
    if (map_) munmap(map_, map_len_);
  }

  // zeros; RWKV-4's running maximum exponent pp starts at -1e38 (as ir.State.zeros)
  State ZeroState() const {
    int64_t n = 1;
    for (int64_t d : wkv_shape) n *= d;
    State st{std::vector<float>(L * 2 * C, 0.f), std::vector<float>(n, 0.f)};
    if (version == "4")
      for (int64_t l = 0; l < L; ++l) std::fill_n(st.wkv.begin() + (l * 3 + 2) * C, C, -1e38f);
    return st;
  }

  // run tokens through the model, updating st; returns the logits of the last token (V floats)
  std::vector<float> Forward(const std::vector<int64_t>& tokens, State& st) {
    if (tokens.empty()) throw std::runtime_error("forward needs at least one token");
    for (int64_t t : tokens)
      if (t < 0 || t >= V)
        throw std::runtime_error("token id " + std::to_string(t) + " is outside the vocabulary 0.." + std::to_string(V - 1));
    std::vector<float> logits;
    for (size_t s = 0; s < tokens.size(); s += chunk_) {
      size_t n = std::min<size_t>(chunk_, tokens.size() - s);
      std::vector<int64_t> chunk(tokens.begin() + s, tokens.begin() + s + n);
      logits = Run(n == 1 ? step_ : prefill_, chunk, st);
    }
    return logits;
  }

 private:
  std::optional<ffi::Module> vm_;
  ffi::Function step_, prefill_;
  ffi::Array<ffi::Tensor> params_;
  void* map_ = nullptr;
  size_t map_len_ = 0;
  size_t chunk_;

  static DLDataType F32() { return DLDataType{kDLFloat, 32, 1}; }

  // params.json dtypes: float matrices and vectors, int8 / uint8 packed quantised weights (int8 codes,
  // 4-bit code pairs, zero points), int32 / int64 indices (clustered head order and bounds)
  static DLDataType ParamDType(const std::string& dt) {
    if (dt == "float32") return DLDataType{kDLFloat, 32, 1};
    if (dt == "float16") return DLDataType{kDLFloat, 16, 1};
    if (dt == "int8") return DLDataType{kDLInt, 8, 1};
    if (dt == "uint8") return DLDataType{kDLUInt, 8, 1};
    if (dt == "int32") return DLDataType{kDLInt, 32, 1};
    if (dt == "int64") return DLDataType{kDLInt, 64, 1};
    throw std::runtime_error("params.json: parameter dtype " + dt + " is not supported by this runner");
  }

  void LoadParams(const std::string& index_path) {
    ffi::json::Object idx = ffi::json::Parse(ReadFile(index_path)).cast<ffi::json::Object>();
    std::string wpath = dir + "/" + std::string(JsonAt(idx, "file").cast<ffi::String>());
    int fd = open(wpath.c_str(), O_RDONLY);
    if (fd < 0) throw std::runtime_error("cannot open " + wpath);
    struct stat sb;
    fstat(fd, &sb);
    map_len_ = sb.st_size;
    map_ = map_len_ ? mmap(nullptr, map_len_, PROT_READ, MAP_PRIVATE, fd, 0) : nullptr;
    close(fd);
    if (map_len_ && map_ == MAP_FAILED) throw std::runtime_error("cannot map " + wpath);
    std::vector<ffi::Tensor> ts;
    for (const ffi::Any& e : JsonAt(idx, "params").cast<ffi::json::Array>()) {
      ffi::json::Object o = e.cast<ffi::json::Object>();
      std::string dt = std::string(JsonAt(o, "dtype").cast<ffi::String>());
      DLDataType dtype = ParamDType(dt);
      std::vector<int64_t> shape;
      for (const ffi::Any& d : JsonAt(o, "shape").cast<ffi::json::Array>()) shape.push_back(d.cast<int64_t>());
      int64_t off = JsonAt(o, "offset").cast<int64_t>(), nbytes = JsonAt(o, "nbytes").cast<int64_t>();
      if (off + nbytes > static_cast<int64_t>(map_len_)) throw std::runtime_error("weights.bin is truncated");
      ts.push_back(Borrow(static_cast<char*>(map_) + off, shape, dtype));
    }
    params_ = ffi::Array<ffi::Tensor>(ts.begin(), ts.end());
  }

  std::vector<float> Run(const ffi::Function& fn, std::vector<int64_t>& tokens, State& st) {
    ffi::Tensor tok = Borrow(tokens.data(), {static_cast<int64_t>(tokens.size())}, DLDataType{kDLInt, 64, 1});
    ffi::Tensor sh = Borrow(st.shift.data(), {L, 2, C}, F32());
    ffi::Tensor wk = Borrow(st.wkv.data(), wkv_shape, F32());
    ffi::Array<ffi::Any> out = fn(tok, sh, wk, params_).cast<ffi::Array<ffi::Any>>();
    auto copy = [](const ffi::Any& a, float* dst, size_t n) {
      ffi::Tensor t = a.cast<ffi::Tensor>();
      if (static_cast<size_t>(t.numel()) != n) throw std::runtime_error("model output has an unexpected size");
      std::memcpy(dst, t.data_ptr(), n * sizeof(float));
    };
    std::vector<float> logits(V);
    copy(out[0], logits.data(), V);
    copy(out[1], st.shift.data(), st.shift.size());
    copy(out[2], st.wkv.data(), st.wkv.size());
    return logits;
  }
};

}  // namespace rwkv
