// VMDK descriptor text: the key=value header, the extent lines and the disk database.
//
//   # Disk DescriptorFile
//   version=1
//   CID=fffffffe
//   parentCID=ffffffff
//   createType="twoGbMaxExtentSparse"
//   RW 4192256 SPARSE "disk-s001.vmdk"
//   RW 2048 FLAT "disk-flat.vmdk" 0
//   RW 2048 ZERO
//   ddb.adapterType = "lsilogic"
#include <cctype>
#include <charconv>
#include <cstring>

#include "formats/vmdk/vmdk_internal.h"
#include "util/endian.h"
#include "util/limits.h"

namespace vimgfs::vmdk {
namespace {

std::string_view Trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t' || s.front() == '\r')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

std::string_view Unquote(std::string_view s) {
  s = Trim(s);
  if (s.size() >= 2 && s.front() == '"' && s.back() == '"') s = s.substr(1, s.size() - 2);
  return s;
}

// One whitespace-separated token, or a "quoted string" (without the quotes).
bool NextToken(std::string_view* s, std::string_view* tok, bool* quoted) {
  *s = Trim(*s);
  if (s->empty()) return false;
  *quoted = false;
  if (s->front() == '"') {
    auto close = s->find('"', 1);
    if (close == std::string_view::npos) return false;
    *tok = s->substr(1, close - 1);
    *quoted = true;
    s->remove_prefix(close + 1);
    return true;
  }
  size_t n = 0;
  while (n < s->size() && (*s)[n] != ' ' && (*s)[n] != '\t') n++;
  *tok = s->substr(0, n);
  s->remove_prefix(n);
  return true;
}

bool ParseU64(std::string_view s, uint64_t* v, int base = 10) {
  if (s.empty()) return false;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), *v, base);
  return ec == std::errc() && p == s.data() + s.size();
}

// CID values are read like sscanf("%x"): leading hex digits, the rest ignored.
bool ParseHex32(std::string_view s, uint32_t* v) {
  uint64_t x = 0;
  size_t n = 0;
  while (n < s.size() && n < 8 && std::isxdigit(static_cast<unsigned char>(s[n]))) n++;
  if (n == 0 || !ParseU64(s.substr(0, n), &x, 16)) return false;
  *v = static_cast<uint32_t>(x);
  return true;
}

Status ParseExtentLine(std::string_view line, Access access, std::string_view rest, ExtentLine* out) {
  // qemu-img's words; the caller's "Could not open 'FILE'" names the file.
  auto bad = [&](const char* /*why, for the reader*/) {
    return Status::InvalidFormat("Invalid extent line: {}", line);
  };
  out->access = access;
  std::string_view tok;
  bool quoted;
  if (!NextToken(&rest, &tok, &quoted) || quoted || !ParseU64(tok, &out->sectors))
    return bad("the size is not a number");
  if (out->sectors == 0) return bad("the size is zero");
  if (out->sectors > limits::kMaxVirtualSize / kSector) return bad("the size is too large");
  if (!NextToken(&rest, &tok, &quoted) || quoted) return bad("no extent type");
  out->type = std::string(tok);
  const std::string& t = out->type;
  if (t == "ZERO") {
    // A file name is allowed and ignored.
    return Status::Ok();
  }
  if (t != "SPARSE" && t != "FLAT" && t != "VMFS" && t != "VMFSSPARSE" && t != "VMFSRDM" && t != "VMFSRAW" &&
      t != "SESPARSE")
    return bad("unknown extent type");
  if (!NextToken(&rest, &tok, &quoted) || !quoted || tok.empty()) return bad("no quoted file name");
  out->file = std::string(tok);
  if (NextToken(&rest, &tok, &quoted)) {
    if (quoted || !ParseU64(tok, &out->offset)) return bad("the offset is not a number");
    if (out->offset > limits::kMaxVirtualSize / kSector) return bad("the offset is too large");
    if (t != "FLAT") return bad("only FLAT extents take an offset (qemu reads VMFS without one)");
  } else if (t == "FLAT") {
    return bad("a FLAT extent needs an offset");
  }
  if (NextToken(&rest, &tok, &quoted)) return bad("unexpected text after the extent");
  return Status::Ok();
}

}  // namespace

SparseHeader DecodeSparseHeader(const std::byte* p) {
  SparseHeader h;
  h.magic = LoadLE32(p + 0);
  h.version = LoadLE32(p + 4);
  h.flags = LoadLE32(p + 8);
  h.capacity = LoadLE64(p + 12);
  h.grain_size = LoadLE64(p + 20);
  h.desc_offset = LoadLE64(p + 28);
  h.desc_size = LoadLE64(p + 36);
  h.num_gtes_per_gt = LoadLE32(p + 44);
  h.rgd_offset = LoadLE64(p + 48);
  h.gd_offset = LoadLE64(p + 56);
  h.overhead = LoadLE64(p + 64);
  h.unclean_shutdown = static_cast<uint8_t>(p[72]);
  h.compress_algorithm = LoadLE16(p + 77);
  return h;
}

void EncodeSparseHeader(const SparseHeader& h, std::byte* p) {
  std::memset(p, 0, kSector);
  StoreLE32(p + 0, h.magic);
  StoreLE32(p + 4, h.version);
  StoreLE32(p + 8, h.flags);
  StoreLE64(p + 12, h.capacity);
  StoreLE64(p + 20, h.grain_size);
  StoreLE64(p + 28, h.desc_offset);
  StoreLE64(p + 36, h.desc_size);
  StoreLE32(p + 44, h.num_gtes_per_gt);
  StoreLE64(p + 48, h.rgd_offset);
  StoreLE64(p + 56, h.gd_offset);
  StoreLE64(p + 64, h.overhead);
  p[72] = std::byte{h.unclean_shutdown};
  // The newline-detection characters: a file moved through a text-mode transfer shows.
  p[73] = std::byte{'\n'};
  p[74] = std::byte{' '};
  p[75] = std::byte{'\r'};
  p[76] = std::byte{'\n'};
  StoreLE16(p + 77, h.compress_algorithm);
}

Result<Descriptor> ParseDescriptor(std::string_view text, const std::string& path) {
  if (text.size() > limits::kMaxDescriptorBytes)
    return Status::InvalidFormat("'{}': VMDK descriptor is larger than {} bytes", path,
                                 limits::kMaxDescriptorBytes);
  auto nul = text.find('\0');
  if (nul != std::string_view::npos) text = text.substr(0, nul);
  Descriptor d;
  bool have_version = false;
  while (!text.empty()) {
    auto nl = text.find('\n');
    std::string_view raw = text.substr(0, nl);
    text = nl == std::string_view::npos ? std::string_view() : text.substr(nl + 1);
    std::string_view line = Trim(raw);
    if (line.empty() || line.front() == '#') continue;

    // Extent lines: ACCESS SECTORS TYPE ["FILE" [OFFSET]]
    std::string_view rest = line;
    std::string_view first;
    bool quoted;
    NextToken(&rest, &first, &quoted);
    std::optional<Access> access;
    if (!quoted && first == "RW") access = Access::kRW;
    if (!quoted && first == "RDONLY") access = Access::kRdOnly;
    if (!quoted && first == "NOACCESS") access = Access::kNoAccess;
    if (access && line.find('=') == std::string_view::npos) {
      if (d.extents.size() >= kMaxExtents)
        return Status::InvalidFormat("'{}': more than {} extents in the VMDK descriptor", path, kMaxExtents);
      ExtentLine e;
      RETURN_IF_ERROR(ParseExtentLine(line, *access, rest, &e));
      d.extents.push_back(std::move(e));
      continue;
    }

    auto eq = line.find('=');
    if (eq == std::string_view::npos) continue;  // not ours to judge; qemu ignores it too
    std::string_view key = Trim(line.substr(0, eq));
    std::string_view value = Unquote(line.substr(eq + 1));
    if (key == "version") {
      uint64_t v;
      if (!ParseU64(value, &v) || v == 0 || v > 3)
        return Status::Unsupported("'{}': VMDK descriptor version '{}' is not supported", path, value);
      d.version = static_cast<uint32_t>(v);
      have_version = true;
    } else if (key == "CID") {
      if (!ParseHex32(value, &d.cid))
        return Status::InvalidFormat("'{}': invalid CID '{}' in the VMDK descriptor", path, value);
    } else if (key == "parentCID") {
      if (!ParseHex32(value, &d.parent_cid))
        return Status::InvalidFormat("'{}': invalid parentCID '{}' in the VMDK descriptor", path, value);
    } else if (key == "createType") {
      d.create_type = std::string(value);
    } else if (key == "parentFileNameHint") {
      if (value.size() > limits::kMaxBackingNameBytes)
        return Status::InvalidFormat("'{}': parentFileNameHint is longer than {} bytes", path,
                                     limits::kMaxBackingNameBytes);
      if (!value.empty()) d.parent_hint = std::string(value);
    } else if (key.substr(0, 4) == "ddb.") {
      d.ddb.emplace_back(std::string(key), std::string(value));
    }
  }
  (void)have_version;  // VMware writes it; qemu does not insist once the file is open
  return d;
}

bool LooksLikeDescriptor(std::string_view head) {
  while (!head.empty()) {
    char c = head.front();
    if (c == '#') {
      auto nl = head.find('\n');
      if (nl == std::string_view::npos) return false;
      head.remove_prefix(nl + 1);
      continue;
    }
    if (c == ' ' || c == '\t' || c == '\r' || c == '\n') {
      head.remove_prefix(1);
      continue;
    }
    for (const char* v :
         {"version=1\n", "version=2\n", "version=3\n", "version=1\r\n", "version=2\r\n", "version=3\r\n"}) {
      if (head.substr(0, std::strlen(v)) == v) return true;
    }
    return false;
  }
  return false;
}

std::string FormatDescriptor(const DescriptorText& d) {
  std::string out;
  out += "# Disk DescriptorFile\n";
  out += "version=1\n";
  out += fmt::format("CID={:x}\n", d.cid);
  out += fmt::format("parentCID={:x}\n", d.parent_cid);
  out += fmt::format("createType=\"{}\"\n", d.create_type);
  if (d.parent_hint) out += fmt::format("parentFileNameHint=\"{}\"\n", *d.parent_hint);
  out += "\n# Extent description\n";
  for (const ExtentLine& e : d.extents) {
    const char* access = e.access == Access::kRW ? "RW" : e.access == Access::kRdOnly ? "RDONLY" : "NOACCESS";
    if (e.type == "FLAT") {
      out += fmt::format("{} {} FLAT \"{}\" {}\n", access, e.sectors, e.file, e.offset);
    } else if (e.type == "ZERO") {
      out += fmt::format("{} {} ZERO\n", access, e.sectors);
    } else {
      out += fmt::format("{} {} {} \"{}\"\n", access, e.sectors, e.type, e.file);
    }
  }
  uint64_t heads = d.adapter_type == "ide" ? 16 : 255;
  out += "\n# The Disk Data Base\n#DDB\n\n";
  out += fmt::format("ddb.virtualHWVersion = \"{}\"\n", d.hw_version);
  out += fmt::format("ddb.geometry.cylinders = \"{}\"\n", d.size / (63 * heads * kSector));
  out += fmt::format("ddb.geometry.heads = \"{}\"\n", heads);
  out += "ddb.geometry.sectors = \"63\"\n";
  out += fmt::format("ddb.adapterType = \"{}\"\n", d.adapter_type);
  out += fmt::format("ddb.toolsVersion = \"{}\"\n", d.tools_version);
  return out;
}

}  // namespace vimgfs::vmdk
