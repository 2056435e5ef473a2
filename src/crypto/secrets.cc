// Secret objects (secrets.h).
#include "crypto/secrets.h"

#include <cstring>
#include <fstream>
#include <sstream>
#include <vector>

namespace vimgfs::crypto {
namespace {

// qemu's option list: key=value pairs split at ',' (",," is a comma in a value); a first
// element without '=' is the object type.
std::vector<std::pair<std::string, std::string>> SplitObject(const std::string& text) {
  std::vector<std::pair<std::string, std::string>> out;
  size_t i = 0;
  bool first = true;
  while (i <= text.size()) {
    std::string key, value;
    bool has_value = false;
    while (i < text.size() && text[i] != '=' && text[i] != ',') key += text[i++];
    if (i < text.size() && text[i] == '=') {
      has_value = true;
      i++;
      while (i < text.size()) {
        if (text[i] == ',' && i + 1 < text.size() && text[i + 1] == ',') {
          value += ',';
          i += 2;
        } else if (text[i] == ',') {
          break;
        } else {
          value += text[i++];
        }
      }
    }
    if (first && !has_value) {
      out.emplace_back("qom-type", key);
    } else if (!key.empty()) {
      out.emplace_back(key, value);
    }
    first = false;
    if (i >= text.size()) break;
    i++;  // the ','
  }
  return out;
}

Result<std::string> DecodeBase64(const std::string& in) {
  std::string out;
  uint32_t acc = 0;
  int bits = 0;
  size_t pad = 0;
  for (char c : in) {
    int v;
    if (c >= 'A' && c <= 'Z') {
      v = c - 'A';
    } else if (c >= 'a' && c <= 'z') {
      v = c - 'a' + 26;
    } else if (c >= '0' && c <= '9') {
      v = c - '0' + 52;
    } else if (c == '+') {
      v = 62;
    } else if (c == '/') {
      v = 63;
    } else if (c == '=') {
      pad++;
      continue;
    } else {
      return Status::InvalidArgument("Base64 data contains invalid characters");
    }
    if (pad) return Status::InvalidArgument("Base64 data contains invalid characters");
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out += static_cast<char>((acc >> bits) & 0xff);
    }
  }
  if (pad > 2) return Status::InvalidArgument("Base64 data contains invalid characters");
  return out;
}

}  // namespace

Result<bool> SecretStore::AddObject(const std::string& spec) {
  std::string type, id, data, file, format = "raw";
  bool has_data = false, has_file = false;
  for (const auto& [k, v] : SplitObject(spec)) {
    if (k == "qom-type") {
      type = v;
    } else if (k == "id") {
      id = v;
    } else if (k == "data") {
      data = v;
      has_data = true;
    } else if (k == "file") {
      file = v;
      has_file = true;
    } else if (k == "format") {
      format = v;
    } else if (type == "secret" && (k == "keyid" || k == "iv")) {
      return Status::Unsupported("secret objects encrypted with another secret (keyid=) are not supported");
    } else if (type == "secret" && k != "loaded") {
      return Status::InvalidArgument("Property 'secret.{}' not found", k);
    }
  }
  if (type != "secret") return false;
  if (id.empty()) return Status::InvalidArgument("Parameter 'id' is missing");
  if (has_data && has_file) return Status::InvalidArgument("'file' and 'data' are mutually exclusive");
  if (!has_data && !has_file) return Status::InvalidArgument("Either 'file' or 'data' must be provided");
  if (format != "raw" && format != "base64")
    return Status::InvalidArgument("Parameter 'format' does not accept value '{}'", format);
  if (secrets_.contains(id))
    return Status::InvalidArgument("attempt to add duplicate property '{}' to object (type 'container')", id);
  std::string value = data;
  if (has_file) {
    std::ifstream in(file, std::ios::binary);
    if (!in)
      return Status::FromErrno(errno, "Unable to read {}: Failed to open file \u201c{}\u201d: {}", file, file,
                               std::strerror(errno));
    std::ostringstream ss;
    ss << in.rdbuf();
    value = ss.str();
  }
  if (format == "base64") {
    ASSIGN_OR_RETURN(value, DecodeBase64(value));
  }
  secrets_[id] = std::move(value);
  return true;
}

Result<std::string> SecretStore::Get(const std::string& id) const {
  auto it = secrets_.find(id);
  if (it == secrets_.end()) return Status::NotFound("No secret with id '{}'", id);
  return it->second;
}

SecretStore& SecretStore::Process() {
  static SecretStore store;
  return store;
}

namespace {
bool ValidUtf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xe ? 3 : (c >> 3) == 0x1e ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    uint32_t cp = n == 1 ? c : c & (0x7f >> n);
    for (size_t k = 1; k < n; k++) {
      const auto d = static_cast<unsigned char>(s[i + k]);
      if ((d & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (d & 0x3f);
    }
    // Overlong forms, surrogates and values past U+10FFFF are not UTF-8.
    static const uint32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMin[n] || (cp >= 0xd800 && cp <= 0xdfff) || cp > 0x10ffff) return false;
    i += n;
  }
  return true;
}
}  // namespace

Result<std::string> LookupPassphrase(const SecretLookup& secrets, const std::string& id) {
  if (!secrets) return Status::NotFound("No secret with id '{}'", id);
  ASSIGN_OR_RETURN(std::string value, secrets(id));
  if (!ValidUtf8(value)) return Status::InvalidArgument("Data from secret {} is not valid UTF-8", id);
  return value;
}

void ScrubSecretData(char* arg) {
  // "data=" at the start or after a ',' that is not an escaped ",,".
  for (char* p = arg; (p = std::strstr(p, "data=")) != nullptr; p += 5) {
    if (p != arg && p[-1] != ',') continue;
    for (char* v = p + 5; *v;) {
      if (v[0] == ',' && v[1] == ',') {
        v[0] = v[1] = 'x';
        v += 2;
      } else if (v[0] == ',') {
        break;
      } else {
        *v++ = 'x';
      }
    }
  }
}

}  // namespace vimgfs::crypto
