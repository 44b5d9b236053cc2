// RWKV "World" tokenizer (rwkv_vocab_v20230424): greedy longest match over the vocabulary bytes,
// the same ids as rwkvc/tokenizer.py. The vocabulary file's lines are `<id> <literal> <byte length>`
// with a Python str or bytes literal; they are read by a small restricted literal parser (quotes,
// the b prefix and backslash escapes only), never evaluated.
#pragma once

#include <cstdint>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace rwkv {

inline void AppendUtf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    if (cp >= 0xD800 && cp < 0xE000) throw std::runtime_error("lone surrogate in a str literal");
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x110000) {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    throw std::runtime_error("code point out of range");
  }
}

// Parse one Python string literal ('..', "..", b'..', b"..") into bytes (str literals as UTF-8).
inline std::string ParsePyLiteral(const std::string& s) {
  size_t i = 0;
  bool is_bytes = false;
  if (i < s.size() && (s[i] == 'b' || s[i] == 'B')) {
    is_bytes = true;
    ++i;
  }
  if (i >= s.size() || (s[i] != '\'' && s[i] != '"')) throw std::runtime_error("not a quoted literal");
  char q = s[i++];
  if (s.size() < i + 1 || s.back() != q) throw std::runtime_error("unterminated literal");
  size_t end = s.size() - 1;
  std::string out;
  auto hex = [&](size_t pos, int n) -> uint32_t {
    if (pos + n > end) throw std::runtime_error("truncated escape");
    uint32_t v = 0;
    for (int k = 0; k < n; ++k) {
      char c = s[pos + k];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= c - '0';
      else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
      else throw std::runtime_error("bad hex escape");
    }
    return v;
  };
  while (i < end) {
    unsigned char c = s[i];
    if (c == static_cast<unsigned char>(q)) throw std::runtime_error("unescaped quote inside literal");
    if (c != '\\') {
      if (is_bytes && c >= 0x80) throw std::runtime_error("non-ASCII character in a bytes literal");
      out += static_cast<char>(c);  // str literals: the file is UTF-8, copy the bytes through
      ++i;
      continue;
    }
    if (i + 1 >= end) throw std::runtime_error("dangling backslash");
    char e = s[i + 1];
    i += 2;
    switch (e) {
      case '\\': out += '\\'; break;
      case '\'': out += '\''; break;
      case '"': out += '"'; break;
      case 'a': out += '\a'; break;
      case 'b': out += '\b'; break;
      case 'f': out += '\f'; break;
      case 'n': out += '\n'; break;
      case 'r': out += '\r'; break;
      case 't': out += '\t'; break;
      case 'v': out += '\v'; break;
      case '\n': break;  // line continuation
      case 'x': {
        uint32_t v = hex(i, 2);
        i += 2;
        if (is_bytes) out += static_cast<char>(v);
        else AppendUtf8(out, v);
        break;
      }
      case 'u':
      case 'U': {
        if (is_bytes) {  // not an escape in bytes literals
          out += '\\';
          out += e;
          break;
        }
        int n = e == 'u' ? 4 : 8;
        AppendUtf8(out, hex(i, n));
        i += n;
        break;
      }
      default:
        if (e >= '0' && e <= '7') {  // octal, up to 3 digits
          uint32_t v = e - '0';
          for (int k = 0; k < 2 && i < end && s[i] >= '0' && s[i] <= '7'; ++k) v = v * 8 + (s[i++] - '0');
          if (is_bytes) out += static_cast<char>(v & 0xFF);
          else AppendUtf8(out, v);
        } else if (e == 'N') {
          throw std::runtime_error("\\N{...} escapes are not supported");
        } else {  // unknown escapes keep the backslash, as Python does
          out += '\\';
          out += e;
        }
    }
  }
  return out;
}

class WorldTokenizer {
 public:
  explicit WorldTokenizer(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw std::runtime_error("cannot open vocabulary file " + path);
    std::string line;
    int lineno = 0;
    while (std::getline(f, line)) {
      ++lineno;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.find_first_not_of(" \t") == std::string::npos) continue;
      size_t first = line.find(' '), last = line.rfind(' ');
      if (first == std::string::npos || first == 0 || last <= first)
        throw std::runtime_error(path + ":" + std::to_string(lineno) + ": corrupt vocabulary line");
      int64_t id = std::stoll(line.substr(0, first));
      size_t len = std::stoul(line.substr(last + 1));
      std::string lit = line.substr(first + 1, last - first - 1);
      size_t a = lit.find_first_not_of(' '), b = lit.find_last_not_of(' ');
      std::string bytes;
      try {
        bytes = ParsePyLiteral(lit.substr(a, b - a + 1));
      } catch (const std::exception& e) {
        throw std::runtime_error(path + ":" + std::to_string(lineno) + ": corrupt vocabulary line (" + e.what() + ")");
      }
      if (bytes.size() != len || len == 0 || id <= 0)
        throw std::runtime_error(path + ":" + std::to_string(lineno) + ": token length or id mismatch");
      if (static_cast<size_t>(id) >= table_.size()) table_.resize(id + 1);
      table_[id] = bytes;
      present_.resize(table_.size(), false);
      present_[id] = true;
    }
    for (size_t id = 0; id < table_.size(); ++id) {
      if (!present_[id]) continue;
      to_id_[table_[id]] = static_cast<int64_t>(id);  // later ids win, like the Python tokenizer
      if (table_[id].size() > max_len_) max_len_ = table_[id].size();
    }
    for (int c = 0; c < 256; ++c)
      if (!to_id_.count(std::string(1, static_cast<char>(c))))
        throw std::runtime_error(path + ": vocabulary lacks a single byte token");
  }

  // greedy longest match: at each position the longest vocabulary entry that prefixes the rest
  std::vector<int64_t> Encode(const std::string& text) const {
    std::vector<int64_t> out;
    size_t i = 0, n = text.size();
    while (i < n) {
      size_t maxl = std::min(max_len_, n - i);
      for (size_t l = maxl; l >= 1; --l) {
        auto it = to_id_.find(text.substr(i, l));
        if (it != to_id_.end()) {
          out.push_back(it->second);
          i += l;
          break;
        }
      }
    }
    return out;
  }

  // bytes of a token; "" for end-of-document (0); throws for ids without bytes
  const std::string& TokenBytes(int64_t id) const {
    static const std::string empty;
    if (id == 0) return empty;
    if (id < 0 || static_cast<size_t>(id) >= table_.size() || !present_[id])
      throw std::runtime_error("token id " + std::to_string(id) + " is not in the vocabulary");
    return table_[id];
  }

  bool HasBytes(int64_t id) const { return id > 0 && static_cast<size_t>(id) < table_.size() && present_[id]; }

 private:
  std::vector<std::string> table_;
  std::vector<bool> present_;
  std::unordered_map<std::string, int64_t> to_id_;
  size_t max_len_ = 1;
};

// Incremental UTF-8 decoder with Python's errors="replace" behaviour: each maximal invalid subpart
// becomes one U+FFFD, an incomplete sequence is held until more bytes come (or flushed as U+FFFD).
class Utf8StreamDecoder {
 public:
  std::string Feed(const std::string& bytes) {
    pending_ += bytes;
    return Drain(false);
  }
  std::string Flush() { return Drain(true); }

 private:
  static constexpr const char* kReplacement = "\xEF\xBF\xBD";
  std::string pending_;

  std::string Drain(bool final) {
    std::string out;
    size_t i = 0, n = pending_.size();
    const auto* p = reinterpret_cast<const unsigned char*>(pending_.data());
    while (i < n) {
      unsigned char c = p[i];
      if (c < 0x80) {
        out += static_cast<char>(c);
        ++i;
        continue;
      }
      int need;
      unsigned char lo = 0x80, hi = 0xBF;  // valid range of the second byte
      if (c >= 0xC2 && c <= 0xDF) {
        need = 1;
      } else if (c >= 0xE0 && c <= 0xEF) {
        need = 2;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
      } else if (c >= 0xF0 && c <= 0xF4) {
        need = 3;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
      } else {
        out += kReplacement;
        ++i;
        continue;
      }
      size_t k = 1;
      bool bad = false;
      for (; k <= static_cast<size_t>(need); ++k) {
        if (i + k >= n) break;
        unsigned char d = p[i + k];
        unsigned char l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
        if (d < l || d > h) {
          bad = true;
          break;
        }
      }
      if (bad) {  // the valid prefix [i, i+k) is one maximal invalid subpart
        out += kReplacement;
        i += k;
        continue;
      }
      if (k <= static_cast<size_t>(need)) {  // ran out of bytes inside a valid prefix
        if (final) {
          out += kReplacement;
          i = n;
        }
        break;
      }
      out.append(pending_, i, need + 1);
      i += need + 1;
    }
    pending_.erase(0, i);
    return out;
  }
};

}  // namespace rwkv
