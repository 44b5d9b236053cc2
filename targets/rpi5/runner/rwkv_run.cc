// `run`: the native runner of an rwkvc TVM artifact (a Raspberry Pi 5 needs no Python).
//
//   ./run --prompt TEXT -n N [sampling options]           stream generated text to stdout
//   ./run --tokens 1,2,3 --dump-logits FILE [--step]      logits of the last token (with --step: one
//                                                         step per token, every token's logits), float32
//   ./run --encode TEXT | --decode 1,2,3                  the tokenizer alone
//   ./run --serve                                         binary forward() protocol on stdin/stdout
//   --state-in FILE / --state-out FILE                    raw float32 state: shift (L,2,C) then wkv (L,H,N,N; v4 L,3,C)
//
// Without --state-in, a run starts from the artifact's initial state: zeros, or the tuned state compiled
// in with `rwkvc compile --state` (manifest "init_state_raw", the same raw float32 layout).
//
// Generation follows rwkvc's Python API (rwkvc/api.py Model.stream): prompt -> prefill, then sample,
// stop on a stop token, observe, step, decode incrementally, stop on a stop string.
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "rwkv_model.h"
#include "sampler.h"
#include "world_tokenizer.h"

using namespace rwkv;

namespace {

const char* kUsage =
    "usage: run [--artifact DIR] --prompt TEXT [-n N] [--temperature T] [--top-p P] [--top-k K]\n"
    "           [--presence A] [--frequency A] [--decay D] [--ban ID]... [--stop-token ID]... [--stop TEXT]...\n"
    "           [--seed S] [--state-in FILE] [--state-out FILE] [--threads N] [--ids-out FILE]\n"
    "       run --tokens 1,2,3 --dump-logits FILE [--step] [--state-in FILE] [--state-out FILE]\n"
    "       run --encode TEXT | --decode 1,2,3 | --serve\n"
    "       run --sample-logits FILE [sampling options]   (sampler check: sample each float32 row of V logits)\n"
    "       run --rng SEED [-n N]                            (print N numpy default_rng(SEED).random() values)\n";

struct Args {
  std::string artifact, prompt, tokens, dump_logits, state_in, state_out, encode, decode, ids_out, sample_logits;
  bool have_prompt = false, step = false, serve = false, have_encode = false, have_decode = false;
  int64_t n = 100, threads = 0, rng_seed = -1;
  SamplingConfig sc;
  std::vector<int64_t> stop_tokens;
  std::vector<std::string> stops;
};

[[noreturn]] void Fail(const std::string& msg) {
  std::fprintf(stderr, "error: %s\n", msg.c_str());
  std::exit(2);
}

std::vector<int64_t> ParseIds(const std::string& s) {
  std::vector<int64_t> out;
  size_t i = 0;
  while (i < s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    std::string part = s.substr(i, j - i);
    if (!part.empty()) {
      char* end = nullptr;
      long long v = std::strtoll(part.c_str(), &end, 10);
      if (*end) Fail("not a token id list: " + s);
      out.push_back(v);
    }
    i = j + 1;
  }
  return out;
}

std::string Unescape(const std::string& s) {  // \n \t \r \\ in --stop, as the rwkvc CLI does
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 1 < s.size()) {
      char e = s[++i];
      if (e == 'n') out += '\n';
      else if (e == 't') out += '\t';
      else if (e == 'r') out += '\r';
      else if (e == '\\') out += '\\';
      else {
        out += '\\';
        out += e;
      }
    } else {
      out += s[i];
    }
  }
  return out;
}

Args ParseArgs(int argc, char** argv) {
  Args a;
  a.sc.token_ban.clear();
  auto need = [&](int& i) -> std::string {
    if (i + 1 >= argc) Fail(std::string(argv[i]) + " needs a value");
    return argv[++i];
  };
  auto num = [&](const std::string& flag, const std::string& v) {
    char* end = nullptr;
    double d = std::strtod(v.c_str(), &end);
    if (v.empty() || *end) Fail(flag + " must be a number, got '" + v + "'");
    return d;
  };
  auto integer = [&](const std::string& flag, const std::string& v) {
    char* end = nullptr;
    long long d = std::strtoll(v.c_str(), &end, 10);
    if (v.empty() || *end) Fail(flag + " must be an integer, got '" + v + "'");
    return static_cast<int64_t>(d);
  };
  for (int i = 1; i < argc; ++i) {
    std::string f = argv[i];
    if (f == "-h" || f == "--help") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    } else if (f == "--artifact") a.artifact = need(i);
    else if (f == "--prompt" || f == "-p") { a.prompt = need(i); a.have_prompt = true; }
    else if (f == "-n") a.n = integer(f, need(i));
    else if (f == "--temperature") a.sc.temperature = num(f, need(i));
    else if (f == "--top-p") a.sc.top_p = num(f, need(i));
    else if (f == "--top-k") a.sc.top_k = integer(f, need(i));
    else if (f == "--presence") a.sc.alpha_presence = num(f, need(i));
    else if (f == "--frequency") a.sc.alpha_frequency = num(f, need(i));
    else if (f == "--decay") a.sc.alpha_decay = num(f, need(i));
    else if (f == "--ban") a.sc.token_ban.push_back(integer(f, need(i)));
    else if (f == "--stop-token") a.stop_tokens.push_back(integer(f, need(i)));
    else if (f == "--stop") a.stops.push_back(Unescape(need(i)));
    else if (f == "--seed") {
      int64_t s = integer(f, need(i));
      if (s < 0) Fail("--seed must be >= 0");
      a.sc.seeded = true;
      a.sc.seed = static_cast<uint64_t>(s);
    } else if (f == "--state-in") a.state_in = need(i);
    else if (f == "--state-out") a.state_out = need(i);
    else if (f == "--threads") a.threads = integer(f, need(i));
    else if (f == "--ids-out") a.ids_out = need(i);
    else if (f == "--tokens") a.tokens = need(i);
    else if (f == "--dump-logits") a.dump_logits = need(i);
    else if (f == "--step") a.step = true;
    else if (f == "--serve") a.serve = true;
    else if (f == "--encode") { a.encode = need(i); a.have_encode = true; }
    else if (f == "--decode") { a.decode = need(i); a.have_decode = true; }
    else if (f == "--sample-logits") a.sample_logits = need(i);
    else if (f == "--rng") a.rng_seed = integer(f, need(i));
    else Fail("unknown option " + f + "\n" + kUsage);
  }
  const SamplingConfig& s = a.sc;
  if (!(s.temperature >= 0) || !std::isfinite(s.temperature)) Fail("--temperature must be a finite number >= 0");
  if (!(s.top_p > 0 && s.top_p <= 1)) Fail("--top-p must be in (0, 1]");
  if (s.top_k < 0) Fail("--top-k must be >= 0");
  if (!(s.alpha_decay >= 0 && s.alpha_decay <= 1)) Fail("--decay must be in [0, 1]");
  if (a.n < 0) Fail("-n must be >= 0");
  if (a.stop_tokens.empty()) a.stop_tokens.push_back(0);
  return a;
}

std::string DefaultArtifactDir(const char* argv0) {
  char buf[4096];
  ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  std::string exe = n > 0 ? std::string(buf, n) : std::string(argv0);
  size_t slash = exe.rfind('/');
  return slash == std::string::npos ? "." : exe.substr(0, slash);
}

void ReadState(const std::string& path, State& st) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) Fail("cannot read state file " + path);
  bool ok = std::fread(st.shift.data(), sizeof(float), st.shift.size(), f) == st.shift.size() &&
            std::fread(st.wkv.data(), sizeof(float), st.wkv.size(), f) == st.wkv.size();
  std::fclose(f);
  if (!ok) Fail(path + ": state file too short for this model (raw float32 shift then wkv expected)");
}

// The artifact's compiled-in initial state, if it has one (else `st` stays as it is).
void LoadInitState(const std::string& dir, State& st) {
  ffi::json::Object m = ffi::json::Parse(ReadFile(dir + "/manifest.json")).cast<ffi::json::Object>();
  auto it = m.find(ffi::String("init_state_raw"));
  if (it == m.end()) return;
  ReadState(dir + "/" + std::string((*it).second.cast<ffi::String>()), st);
}

void WriteFloats(const std::string& path, const std::vector<const std::vector<float>*>& parts) {
  std::string tmp = path + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) Fail("cannot write " + path);
  for (auto* p : parts) std::fwrite(p->data(), sizeof(float), p->size(), f);
  if (std::fclose(f) != 0 || std::rename(tmp.c_str(), path.c_str()) != 0) Fail("cannot write " + path);
}

std::vector<bool> ZeroWeightIds(const WorldTokenizer& tok, int64_t V) {
  // tokens whose text is a substring of " \t0123456789" count 0 in the penalties (as PIPELINE does)
  static const std::string kZero = " \t0123456789";
  std::vector<bool> z(V, false);
  for (int64_t id = 1; id < V; ++id)
    if (tok.HasBytes(id) && kZero.find(tok.TokenBytes(id)) != std::string::npos) z[id] = true;
  return z;
}

void AddUnusedBans(const WorldTokenizer& tok, int64_t V, SamplingConfig& sc) {
  for (int64_t id = 1; id < V; ++id)
    if (!tok.HasBytes(id)) sc.token_ban.push_back(id);
}

bool ReadAll(int fd, void* buf, size_t n) {
  char* p = static_cast<char*>(buf);
  while (n) {
    ssize_t r = read(fd, p, n);
    if (r <= 0) return false;
    p += r;
    n -= r;
  }
  return true;
}

void WriteAll(int fd, const void* buf, size_t n) {
  const char* p = static_cast<const char*>(buf);
  while (n) {
    ssize_t r = write(fd, p, n);
    if (r <= 0) std::exit(3);
    p += r;
    n -= r;
  }
}

// request: int64 T (<= 0 quits), T int64 tokens, state floats; reply: int64 0, V logits, state floats
// or int64 1, int64 length, message. A hello (magic, L, C, H, N, V as int64) is sent first.
int Serve(Model& m) {
  int64_t hello[6] = {0x52574B56, m.L, m.C, m.H, m.N, m.V};
  WriteAll(1, hello, sizeof(hello));
  State st = m.ZeroState();
  for (;;) {
    int64_t T;
    if (!ReadAll(0, &T, sizeof(T)) || T <= 0) return 0;
    std::vector<int64_t> toks(T);
    if (!ReadAll(0, toks.data(), T * sizeof(int64_t)) || !ReadAll(0, st.shift.data(), st.shift.size() * 4) ||
        !ReadAll(0, st.wkv.data(), st.wkv.size() * 4))
      return 1;
    try {
      std::vector<float> logits = m.Forward(toks, st);
      int64_t ok = 0;
      WriteAll(1, &ok, sizeof(ok));
      WriteAll(1, logits.data(), logits.size() * 4);
      WriteAll(1, st.shift.data(), st.shift.size() * 4);
      WriteAll(1, st.wkv.data(), st.wkv.size() * 4);
    } catch (const std::exception& e) {
      int64_t bad = 1, len = std::strlen(e.what());
      WriteAll(1, &bad, sizeof(bad));
      WriteAll(1, &len, sizeof(len));
      WriteAll(1, e.what(), len);
    }
  }
}

int Generate(Model& m, const WorldTokenizer& tok, Args& a, State& st) {
  AddUnusedBans(tok, m.V, a.sc);
  Sampler sampler(a.sc, ZeroWeightIds(tok, m.V));
  std::vector<int64_t> ids = tok.Encode(a.prompt);
  if (ids.empty()) ids.push_back(0);  // an empty prompt starts a new document
  std::vector<float> logits = m.Forward(ids, st);
  Utf8StreamDecoder dec;
  std::string text;
  size_t emitted = 0, hold = 0;
  for (const std::string& s : a.stops) hold = std::max(hold, s.size() - 1);
  std::vector<int64_t> out_ids;
  bool stopped_by_string = false;
  for (int64_t i = 0; i < a.n; ++i) {
    int64_t t = sampler.Sample(logits.data(), logits.size());
    if (std::find(a.stop_tokens.begin(), a.stop_tokens.end(), t) != a.stop_tokens.end()) break;
    sampler.Observe(t);
    out_ids.push_back(t);
    logits = m.Forward({t}, st);  // the state always holds every token emitted
    text += dec.Feed(tok.TokenBytes(t));
    size_t from = emitted > hold ? emitted - hold : 0, hit = std::string::npos;
    for (const std::string& s : a.stops) hit = std::min(hit, text.find(s, from));
    if (hit != std::string::npos) {
      text.resize(hit);
      stopped_by_string = true;
      break;
    }
    if (text.size() > emitted + hold) {
      std::fwrite(text.data() + emitted, 1, text.size() - hold - emitted, stdout);
      std::fflush(stdout);
      emitted = text.size() - hold;
    }
  }
  if (!stopped_by_string) text += dec.Flush();
  if (text.size() > emitted) std::fwrite(text.data() + emitted, 1, text.size() - emitted, stdout);
  std::fputc('\n', stdout);
  std::fflush(stdout);
  if (!a.ids_out.empty()) {
    std::FILE* f = std::fopen(a.ids_out.c_str(), "w");
    if (!f) Fail("cannot write " + a.ids_out);
    for (size_t i = 0; i < out_ids.size(); ++i) std::fprintf(f, "%s%lld", i ? "," : "", static_cast<long long>(out_ids[i]));
    std::fputc('\n', f);
    std::fclose(f);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Args a = ParseArgs(argc, argv);
  if (a.threads > 0) setenv("TVM_NUM_THREADS", std::to_string(a.threads).c_str(), 1);  // before the pool starts
  try {
    if (a.rng_seed >= 0) {
      Pcg64 g = Pcg64::FromSeed(static_cast<uint64_t>(a.rng_seed));
      for (int64_t i = 0; i < a.n; ++i) std::printf("%a\n", g.Random());
      return 0;
    }
    std::string dir = a.artifact.empty() ? DefaultArtifactDir(argv[0]) : a.artifact;
    if (a.have_encode || a.have_decode || !a.sample_logits.empty()) {  // no model needed
      ffi::json::Object m = ffi::json::Parse(ReadFile(dir + "/manifest.json")).cast<ffi::json::Object>();
      WorldTokenizer tok(dir + "/" + std::string(JsonAt(JsonAt(m, "tokenizer").cast<ffi::json::Object>(), "file").cast<ffi::String>()));
      if (a.have_encode) {
        std::vector<int64_t> ids = tok.Encode(a.encode);
        for (size_t i = 0; i < ids.size(); ++i) std::printf("%s%lld", i ? "," : "", static_cast<long long>(ids[i]));
        std::printf("\n");
      } else if (a.have_decode) {
        Utf8StreamDecoder dec;
        std::string text;
        for (int64_t id : ParseIds(a.decode)) text += dec.Feed(tok.TokenBytes(id));
        text += dec.Flush();
        std::fwrite(text.data(), 1, text.size(), stdout);
      } else {
        int64_t V = JsonAt(JsonAt(m, "model").cast<ffi::json::Object>(), "vocab_size").cast<int64_t>();
        std::string raw = ReadFile(a.sample_logits);
        size_t rows = raw.size() / (V * sizeof(float));
        AddUnusedBans(tok, V, a.sc);
        Sampler s(a.sc, ZeroWeightIds(tok, V));
        for (size_t r = 0; r < rows; ++r) {
          int64_t t = s.Sample(reinterpret_cast<const float*>(raw.data()) + r * V, V);
          s.Observe(t);
          std::printf("%s%lld", r ? "," : "", static_cast<long long>(t));
        }
        std::printf("\n");
      }
      return 0;
    }
    Model m(dir);
    if (a.serve) return Serve(m);
    State st = m.ZeroState();
    LoadInitState(dir, st);
    if (!a.state_in.empty()) ReadState(a.state_in, st);
    if (!a.tokens.empty()) {
      std::vector<int64_t> ids = ParseIds(a.tokens);
      if (ids.empty()) Fail("--tokens needs at least one id");
      std::vector<float> all;
      if (a.step) {
        for (int64_t t : ids) {
          std::vector<float> lg = m.Forward({t}, st);
          all.insert(all.end(), lg.begin(), lg.end());
        }
      } else {
        all = m.Forward(ids, st);
      }
      if (!a.dump_logits.empty()) WriteFloats(a.dump_logits, {&all});
    } else if (a.have_prompt) {
      WorldTokenizer tok(m.vocab_file);
      Generate(m, tok, a, st);
    } else {
      std::fputs(kUsage, stderr);
      return 2;
    }
    if (!a.state_out.empty()) WriteFloats(a.state_out, {&st.shift, &st.wkv});
  } catch (const std::exception& e) {
    Fail(e.what());
  }
  return 0;
}
