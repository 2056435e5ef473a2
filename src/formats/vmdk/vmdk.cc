// The vmdk driver: probe, open (monolithic sparse file, or descriptor + extents), and the
// ClusterMap that lays the extents end to end in guest order and routes each request to
// the extents it touches.
#include <algorithm>
#include <random>

#include "formats/drivers.h"
#include "formats/vmdk/stream_writer.h"
#include "formats/vmdk/vmdk_internal.h"
#include "util/checked.h"
#include "util/endian.h"
#include "util/limits.h"

namespace vimgfs {
namespace vmdk {
namespace {

bool KnownCreateType(const std::string& t) {
  for (const char* k :
       {"monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "streamOptimized",
        "vmfs", "vmfsSparse", "vmfsThin", "vmfsPreallocated", "vmfsEagerZeroedThick", "vmfsRaw",
        "vmfsRawDeviceMap", "vmfsPassthroughRawDeviceMap", "custom"}) {
    if (t == k) return true;
  }
  return false;
}

class VmdkMap final : public ClusterMap {
 public:
  std::unique_ptr<File> main_file;  // the descriptor file (separate descriptor case)
  File* image_file = nullptr;       // the file the user named (descriptor or sparse file)
  // Where the descriptor lives, for the CID update on the first write (as qemu does it, so
  // a child made against the old content sees that its parent changed).
  File* desc_file = nullptr;
  uint64_t desc_offset = 0;
  uint64_t desc_capacity = 0;  // bytes available in place (embedded: desc_size sectors)
  std::string desc_text;
  bool cid_updated = false;
  bool cid_synced = false;  // a descriptor file's new CID is durable
  // The parent's CID differs from our parentCID: it changed since this image was made on
  // it, so its content no longer shows through (qemu fails such reads with EINVAL).
  std::optional<std::string> stale_parent;
  std::vector<std::unique_ptr<Extent>> extents;
  uint64_t size = 0;
  uint64_t cluster = 65536;
  bool ro = false;
  std::string create_type;
  uint32_t cid = 0xffffffff, parent_cid = 0xffffffff;
  std::optional<BackingRef> parent;

  uint64_t virtual_size() const override { return size; }
  uint64_t cluster_size() const override { return cluster; }
  bool read_only() const override { return ro; }
  std::optional<BackingRef> backing() const override { return parent; }

  size_t Find(uint64_t off) const {
    auto it = std::upper_bound(extents.begin(), extents.end(), off,
                               [](uint64_t o, const std::unique_ptr<Extent>& e) { return o < e->start; });
    return static_cast<size_t>(it - extents.begin()) - 1;
  }

  Status Lookup(uint64_t off, uint64_t len, std::vector<Mapping>* out) override {
    while (len > 0) {
      Extent& e = *extents[Find(off)];
      uint64_t rel = off - e.start;
      uint64_t n = std::min(len, e.length - rel);
      size_t first = out->size();
      RETURN_IF_ERROR(e.Lookup(rel, n, out));
      for (size_t i = first; i < out->size(); i++) {
        if ((*out)[i].kind == Mapping::Kind::kCompressed) (*out)[i].unit_guest_offset += e.start;
        if ((*out)[i].kind == Mapping::Kind::kUnallocated && stale_parent)
          return Status::Error(ErrorKind::kCorrupt, EINVAL, *stale_parent);
      }
      off += n;
      len -= n;
    }
    return Status::Ok();
  }

  Result<WritePlan> PrepareWrite(uint64_t off, uint64_t len) override {
    size_t i = Find(off);
    Extent& e = *extents[i];
    uint64_t rel = off - e.start;
    ASSIGN_OR_RETURN(WritePlan plan, e.PrepareWrite(rel, std::min(len, e.length - rel)));
    plan.guest_offset += e.start;
    plan.cookie[0] = i;
    return plan;
  }

  Status CommitWrite(const WritePlan& plan) override {
    if (plan.cookie[0] >= extents.size()) return Status::Corrupt("vmdk: bad write plan");
    Extent& e = *extents[plan.cookie[0]];
    WritePlan p = plan;
    p.guest_offset -= e.start;
    RETURN_IF_ERROR(e.CommitWrite(p));
    return UpdateCid();
  }

  // qemu gives the image a new random CID the first time it writes to it.
  Status UpdateCid() {
    if (cid_updated || !desc_file || ro) return Status::Ok();
    cid_updated = true;
    auto p = desc_text.find("\nCID=");
    if (desc_text.rfind("CID=", 0) == 0)
      p = 0;
    else if (p != std::string::npos)
      p += 1;
    if (p == std::string::npos) return Status::Ok();
    auto end = desc_text.find('\n', p);
    if (end == std::string::npos) return Status::Ok();
    if (end > p && desc_text[end - 1] == '\r') end--;
    uint32_t fresh;
    do {
      fresh = static_cast<uint32_t>(std::random_device{}());
    } while (fresh == cid || fresh == 0xffffffff);
    std::string text = desc_text.substr(0, p) + fmt::format("CID={:x}", fresh) + desc_text.substr(end);
    if (text.size() > desc_capacity) return Status::Ok();  // no room in place: keep the old one
    std::string out = text;
    if (desc_capacity == UINT64_MAX) {
      // A descriptor file: rewritten whole at its new length.
      if (text.size() < desc_text.size()) RETURN_IF_ERROR(desc_file->Truncate(text.size()));
    } else if (out.size() < desc_text.size()) {
      out.append(desc_text.size() - out.size(), '\0');  // embedded: NUL-terminated text
    }
    RETURN_IF_ERROR(desc_file->PWrite(desc_offset, std::as_bytes(std::span(out)), IoTag::kHeader));
    desc_text = text;
    cid = fresh;
    return Status::Ok();
  }

  Status ZeroRange(uint64_t off, uint64_t len, bool unmap) override {
    if (ro) return Status::ReadOnly("image is read-only");
    while (len > 0) {
      Extent& e = *extents[Find(off)];
      uint64_t rel = off - e.start;
      uint64_t n = std::min(len, e.length - rel);
      RETURN_IF_ERROR(e.ZeroRange(rel, n));
      off += n;
      len -= n;
    }
    return UpdateCid();
  }

  Status WriteBack() override {
    if (ro) return Status::Ok();
    for (auto& e : extents) RETURN_IF_ERROR(e->WriteBack());
    // A descriptor file of its own holds the CID that the first write changes: synced
    // once, here (SyncFiles syncs the extents only).
    if (cid_updated && !cid_synced && desc_file && desc_capacity == UINT64_MAX) {
      RETURN_IF_ERROR(desc_file->Sync(true));
      cid_synced = true;
    }
    return Status::Ok();
  }
  Status SyncFiles() override {
    if (ro) return Status::Ok();
    for (auto& e : extents) RETURN_IF_ERROR(e->SyncFile());
    return Status::Ok();
  }
  Status Close() override { return Flush(); }
  Status Resize(uint64_t, bool, GrowZeros) override {
    return Status::Unsupported("Image format driver does not support resize");
  }

  FormatInfo Info() override {
    FormatInfo fi;
    fi.format = "vmdk";
    fi.virtual_size = size;
    // qemu: the first extent's grain, when it is sparse and every extent agrees.
    uint64_t g = extents.empty() ? 0 : extents[0]->grain_bytes();
    for (auto& e : extents) {
      if (e->grain_bytes() != g) g = 0;
    }
    fi.cluster_size = g;
    VmdkDetails d;
    d.cid = cid;
    d.parent_cid = parent_cid;
    d.create_type = create_type;
    for (auto& e : extents) d.extents.push_back(e->Info());
    fi.format_specific = std::move(d);
    return fi;
  }

  std::vector<File*> host_files() override {
    std::vector<File*> files;
    for (auto& e : extents) {
      File* f = e->file();
      if (f && f != image_file && std::find(files.begin(), files.end(), f) == files.end()) files.push_back(f);
    }
    return files;
  }

  Result<CheckReport> Check(RepairMode mode) override {
    if (mode != RepairMode::kNone)
      return Status::Unsupported("'{}': this image format does not support repairs", Path());
    return CheckExtents(extents);
  }

  std::string Path() const { return image_file ? image_file->path() : std::string(); }
};

Status AddExtentsFromDescriptor(VmdkMap* map, const Descriptor& d, const std::string& desc_path,
                                const OpenContext& ctx) {
  Env& env = *ctx.env;
  for (const ExtentLine& line : d.extents) {
    uint64_t bytes = line.sectors * kSector;
    if (line.type == "ZERO" || line.access == Access::kNoAccess) {
      auto z = NewZeroExtent(bytes);
      z->read_only = line.access != Access::kRW;
      if (line.access == Access::kNoAccess) z->type = line.type;
      map->extents.push_back(std::move(z));
      continue;
    }
    if (line.type == "SESPARSE" || line.type == "VMFSRDM" || line.type == "VMFSRAW")
      return Status::Unsupported("'{}': {} extents are not supported", desc_path, line.type);
    bool ro = ctx.options.read_only || line.access == Access::kRdOnly;
    auto opened = OpenReference(env, desc_path, line.file, ro ? OpenMode::kReadOnly : OpenMode::kReadWrite,
                                ctx.options.untrusted);
    if (!opened.ok() && ctx.options.untrusted && !ctx.options.open_backing && opened.error().err() == EXDEV) {
      // `info --untrusted` shows the name without opening it; nothing can read it.
      map->extents.push_back(NewUnopenedExtent(line.file, line.type, bytes));
      continue;
    }
    if (!opened.ok()) return opened.error();
    std::unique_ptr<File> f = std::move(opened->file);
    File* raw = f.get();
    if (line.type == "FLAT" || line.type == "VMFS") {
      map->extents.push_back(NewFlatExtent(raw, std::move(f), line.offset * kSector, bytes, ro, line.type));
      continue;
    }
    // SPARSE (KDMV) or VMFSSPARSE (COWD): the header's capacity is the extent's size.
    auto r = OpenSparseExtent(raw, std::move(f), ro, ctx.options.cache_bytes / 4);
    if (!r.ok()) return r.error().WithContext("'{}': extent '{}'", desc_path, line.file);
    if (!r->extent)
      return Status::InvalidFormat("'{}': extent '{}' holds a descriptor, not a sparse extent", desc_path,
                                   line.file);
    r->extent->type = line.type;
    map->extents.push_back(std::move(r->extent));
  }
  return Status::Ok();
}

// The CID of the vmdk in `f` (embedded or separate descriptor), or nullopt.
std::optional<uint32_t> ReadCid(File* f) {
  const std::string& path = f->path();
  auto size = f->Size();
  if (!size.ok() || *size < 4) return std::nullopt;
  std::byte raw[kSector] = {};
  if (!f->PRead(0, std::span(raw, std::min<uint64_t>(kSector, *size))).ok()) return std::nullopt;
  std::string text;
  if (LoadLE32(raw) == kMagicKdmv) {
    auto t = ReadEmbeddedDescriptor(*f, DecodeSparseHeader(raw));
    if (!t.ok()) return std::nullopt;
    text = std::move(t).value();
  } else {
    if (*size > limits::kMaxDescriptorBytes) return std::nullopt;
    text.resize(*size);
    if (!f->PRead(0, std::as_writable_bytes(std::span(text.data(), text.size()))).ok()) return std::nullopt;
    if (!LooksLikeDescriptor(text)) return std::nullopt;
  }
  auto d = ParseDescriptor(text, path);
  if (!d.ok()) return std::nullopt;
  return d->cid;
}

void CheckParentCid(VmdkMap* map, const OpenContext& ctx) {
  if (!map->parent || !ctx.options.open_backing) return;
  auto parent =
      OpenReference(*ctx.env, ctx.path, map->parent->name, OpenMode::kReadOnly, ctx.options.untrusted);
  if (!parent.ok()) return;  // the engine reports it when it opens the chain
  std::optional<uint32_t> cid = ReadCid(parent->file.get());
  if (!cid || *cid != map->parent_cid)
    map->stale_parent = fmt::format(
        "'{}': the parent image '{}' has changed since this image was made on it (its CID is {}, "
        "parentCID here is {:x})",
        ctx.path, map->parent->name, cid ? fmt::format("{:x}", *cid) : "unreadable", map->parent_cid);
}

void ApplyDescriptorKeys(VmdkMap* map, const Descriptor& d) {
  map->cid = d.cid;
  map->parent_cid = d.parent_cid;
  if (d.parent_hint) map->parent = BackingRef{*d.parent_hint, "vmdk"};
}

Result<std::unique_ptr<ClusterMap>> OpenVmdk(OpenContext ctx) {
  auto map = std::make_unique<VmdkMap>();
  const std::string path = ctx.path;
  ASSIGN_OR_RETURN(uint64_t file_size, ctx.file->Size());
  if (file_size < 4) return Status::InvalidFormat("'{}': File is too small, not a valid image", path);
  std::byte head[4] = {};
  RETURN_IF_ERROR(ctx.file->PRead(0, head));
  uint32_t magic = LoadLE32(head);

  map->image_file = ctx.file.get();
  std::string desc_text;
  bool container = false;
  uint64_t embedded_desc_offset = 0, embedded_desc_bytes = 0;
  if (magic == kMagicKdmv && file_size >= kSector) {
    // A capacity-0 sparse file with a descriptor is only a descriptor container (qemu).
    std::byte hdr[kSector];
    RETURN_IF_ERROR(ctx.file->PRead(0, hdr));
    SparseHeader h = DecodeSparseHeader(hdr);
    if (h.desc_offset != 0 && h.desc_offset < UINT64_MAX / kSector && h.desc_size < (1ull << 40)) {
      embedded_desc_offset = h.desc_offset * kSector;
      embedded_desc_bytes = h.desc_size * kSector;
    }
    if (h.capacity == 0 && h.desc_offset != 0 && h.gd_offset != kGdAtEnd) {
      ASSIGN_OR_RETURN(desc_text, ReadEmbeddedDescriptor(*ctx.file, h));
      container = true;
    }
  }
  if ((magic == kMagicKdmv || magic == kMagicCowd) && !container) {
    File* raw = ctx.file.get();
    ASSIGN_OR_RETURN(SparseOpenResult r, OpenSparseExtent(raw, std::move(ctx.file), ctx.options.read_only,
                                                          ctx.options.cache_bytes));
    if (!r.extent) return Status::InvalidFormat("'{}': invalid sparse VMDK header", path);
    bool compressed = r.extent->compressed();
    map->extents.push_back(std::move(r.extent));
    map->create_type = compressed ? "streamOptimized" : "monolithicSparse";
    if (!r.embedded_desc.empty()) {
      ASSIGN_OR_RETURN(Descriptor d, ParseDescriptor(r.embedded_desc, path));
      ApplyDescriptorKeys(map.get(), d);
      map->desc_file = map->image_file;
      map->desc_offset = embedded_desc_offset;
      map->desc_capacity = embedded_desc_bytes ? embedded_desc_bytes - 1 : 0;
      map->desc_text = std::move(r.embedded_desc);
    }
  } else {
    if (!container) {
      if (file_size > limits::kMaxDescriptorBytes)
        return Status::InvalidFormat("'{}': VMDK descriptor file too big ({} bytes, at most {})", path,
                                     file_size, limits::kMaxDescriptorBytes);
      desc_text.resize(file_size);
      RETURN_IF_ERROR(
          ctx.file->PRead(0, std::as_writable_bytes(std::span(desc_text.data(), desc_text.size()))));
    }
    map->main_file = std::move(ctx.file);
    ASSIGN_OR_RETURN(Descriptor d, ParseDescriptor(desc_text, path));
    if (d.create_type.empty())
      return Status::InvalidFormat("'{}': invalid VMDK image descriptor (no createType)", path);
    if (!KnownCreateType(d.create_type))
      return Status::Unsupported("'{}': Unsupported image type '{}'", path, d.create_type);
    map->create_type = d.create_type;
    ApplyDescriptorKeys(map.get(), d);
    if (!container) {
      map->desc_file = map->main_file.get();
      map->desc_capacity = UINT64_MAX;
      map->desc_text = desc_text;
    }
    if (d.extents.empty()) return Status::InvalidFormat("'{}': the VMDK descriptor names no extents", path);
    RETURN_IF_ERROR(AddExtentsFromDescriptor(map.get(), d, path, ctx));
  }

  uint64_t pos = 0;
  uint64_t max_grain = 0;
  for (auto& e : map->extents) {
    e->start = pos;
    auto next = CheckedAdd(pos, e->length);
    if (!next || *next > limits::kMaxVirtualSize)
      return Status::InvalidFormat("'{}': the extents add up to more than {} bytes", path,
                                   limits::kMaxVirtualSize);
    pos = *next;
    max_grain = std::max(max_grain, e->grain_bytes());
    if (e->read_only) map->ro = true;
  }
  // Zero-length extents (a capacity-0 sparse file) add nothing and are dropped from routing.
  std::erase_if(map->extents, [](const std::unique_ptr<Extent>& e) { return e->length == 0; });
  if (map->extents.empty() && pos == 0) {
    map->extents.push_back(NewZeroExtent(0));
  }
  map->size = pos;
  map->cluster = max_grain ? max_grain : 65536;
  CheckParentCid(map.get(), ctx);
  map->ro = map->ro || ctx.options.read_only;
  if (!ctx.options.snapshot.empty())
    return Status::Unsupported("'{}': vmdk images have no internal snapshots", path);
  return std::unique_ptr<ClusterMap>(std::move(map));
}

class VmdkDriverImpl final : public FormatDriver {
 public:
  const char* name() const override { return "vmdk"; }
  const FormatTraits& traits() const override {
    using Opt = CreateOptionSpec::Type;
    static const FormatTraits kTraits = {
        .create_options =
            {
                {"size", Opt::kSize, "Virtual disk size"},
                {"adapter_type", Opt::kString,
                 "Virtual adapter type, can be one of ide (default), lsilogic, buslogic or legacyESX"},
                {"backing_file", Opt::kString, "File name of a base image"},
                {"backing_fmt", Opt::kString, "Must be 'vmdk' if present"},
                {"compat6", Opt::kBool, "VMDK version 6 image", "off"},
                {"hwversion", Opt::kString, "VMDK hardware version", "undefined"},
                {"toolsversion", Opt::kString, "VMware guest tools version"},
                {"subformat", Opt::kString,
                 "VMDK flat extent format, can be one of {monolithicSparse (default) | monolithicFlat | "
                 "twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized} "},
                {"zeroed_grain", Opt::kBool,
                 "Enable efficient zero writes using the zeroed-grain GTE feature"},
            },
        .compression = FormatTraits::Compression::kStreamSubformat,
        .compressed_subformat = "streamOptimized",
        .disk_size_sums_host_files = true,
    };
    return kTraits;
  }
  int Probe(std::span<const std::byte> head, const std::string&) const override {
    if (head.size() >= 4) {
      uint32_t magic = LoadLE32(head.data());
      if (magic == kMagicKdmv || magic == kMagicCowd) return 100;
    }
    std::string_view text(reinterpret_cast<const char*>(head.data()), head.size());
    return LooksLikeDescriptor(text) ? 100 : 0;
  }
  Result<std::unique_ptr<ClusterMap>> Open(OpenContext ctx) const override {
    if (!ctx.env) ctx.env = ctx.options.env ? ctx.options.env : Env::Default();
    return OpenVmdk(std::move(ctx));
  }
  Status Create(const CreateContext& ctx) const override {
    CreateContext c = ctx;
    if (!c.env) c.env = Env::Default();
    return CreateVmdk(c);
  }
  Result<std::unique_ptr<StreamWriter>> CreateStream(const CreateContext& ctx) const override {
    Env* env = ctx.env ? ctx.env : Env::Default();
    ASSIGN_OR_RETURN(auto w, StreamOptimizedWriter::Open(*env, ctx.path, ctx.size, ctx.options));
    return std::unique_ptr<StreamWriter>(std::move(w));
  }
};

}  // namespace
}  // namespace vmdk

const FormatDriver* VmdkDriver() {
  static vmdk::VmdkDriverImpl driver;
  return &driver;
}

}  // namespace vimgfs
