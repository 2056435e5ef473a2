// create -f vmdk: the five subformats qemu-img writes, with its layout (64 KiB grains, 512
// entries per grain table, descriptor at sector 1 in 20 sectors, redundant directory and
// tables first, all tables preallocated) and its descriptor text.
#include <random>

#include "formats/format_util.h"
#include "formats/vmdk/vmdk_internal.h"
#include "util/checked.h"
#include "util/endian.h"
#include "util/limits.h"
#include "vimgfs/image.h"

namespace vimgfs::vmdk {
namespace {

constexpr uint64_t kGrainSectors = 128;  // 64 KiB
constexpr uint32_t kGtes = 512;
constexpr uint64_t kDescSectors = 20;
constexpr uint64_t kTwoGbExtentBytes = 2ull << 30;

std::string BaseName(const std::string& path) {
  auto slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

std::string DirPrefix(const std::string& path) {
  auto slash = path.rfind('/');
  return slash == std::string::npos ? std::string() : path.substr(0, slash + 1);
}

uint32_t RandomCid() {
  std::random_device rd;
  return static_cast<uint32_t>(rd());
}

// The parent's CID, read through the engine (qemu opens the backing file to get it).
Result<uint32_t> ParentCid(const CreateContext& ctx, const std::string& name) {
  OpenOptions o;
  o.env = ctx.env;
  o.open_backing = false;
  auto img = Image::OpenReferenced(ctx.path, name, o);
  if (!img.ok()) return img.error().WithContext("Could not open backing file");
  if ((*img)->format() != "vmdk") return Status::InvalidArgument("backing_file must be a vmdk image");
  FormatInfo fi = (*img)->Info();
  const auto* vmdk = std::get_if<VmdkDetails>(&fi.format_specific);
  return vmdk ? vmdk->cid : 0xffffffffu;
}

}  // namespace

SparseLayout PlanSparseExtent(uint64_t capacity_bytes, bool zeroed_grain, bool compressed) {
  SparseLayout l;
  SparseHeader& h = l.header;
  h.capacity = DivRoundUp(capacity_bytes, kSector);
  h.grain_size = kGrainSectors;
  h.num_gtes_per_gt = kGtes;
  l.gd_entries = DivRoundUp(h.capacity, kGrainSectors * kGtes);
  l.gt_bytes = uint64_t{kGtes} * 4;
  uint64_t gd_sectors = DivRoundUp(l.gd_entries * 4, kSector);
  uint64_t gt_sectors = DivRoundUp(l.gt_bytes, kSector);
  h.desc_offset = 1;
  h.desc_size = kDescSectors;
  h.rgd_offset = h.desc_offset + h.desc_size;
  h.gd_offset = h.rgd_offset + gd_sectors + gt_sectors * l.gd_entries;
  h.overhead = AlignUp(h.gd_offset + gd_sectors + gt_sectors * l.gd_entries, kGrainSectors);
  h.flags = kFlagNewlineTest | kFlagRedundantGt;
  if (zeroed_grain) h.flags |= kFlagZeroedGrain;
  if (compressed) h.flags |= kFlagCompressed | kFlagMarkers;
  h.version = compressed ? 3 : zeroed_grain ? 2 : 1;
  h.compress_algorithm = compressed ? kCompressDeflate : 0;
  return l;
}

Status WriteEmptySparseExtent(File& file, const SparseLayout& l, std::string_view descriptor) {
  const SparseHeader& h = l.header;
  if (descriptor.size() >= h.desc_size * kSector)
    return Status::InvalidArgument("'{}': VMDK description file too big", file.path());
  RETURN_IF_ERROR(file.Truncate(0));
  std::byte hdr[kSector];
  EncodeSparseHeader(h, hdr);
  RETURN_IF_ERROR(file.PWrite(0, hdr, IoTag::kHeader));
  if (!descriptor.empty())
    RETURN_IF_ERROR(
        file.PWrite(h.desc_offset * kSector, std::as_bytes(std::span(descriptor)), IoTag::kHeader));
  uint64_t gd_sectors = DivRoundUp(l.gd_entries * 4, kSector);
  uint64_t gt_sectors = DivRoundUp(l.gt_bytes, kSector);
  for (uint64_t dir : {h.rgd_offset, h.gd_offset}) {
    std::vector<std::byte> b(gd_sectors * kSector);
    for (uint64_t i = 0; i < l.gd_entries; i++)
      StoreLE32(b.data() + 4 * i, static_cast<uint32_t>(dir + gd_sectors + i * gt_sectors));
    RETURN_IF_ERROR(file.PWrite(dir * kSector, b, IoTag::kGrainDir));
  }
  // The grain tables are zeros: the file grows over them.
  RETURN_IF_ERROR(file.Truncate(h.overhead * kSector));
  return file.Sync(false);
}

Status CreateVmdk(const CreateContext& ctx) {
  const std::string& path = ctx.path;
  std::string subformat = "monolithicSparse", adapter = "ide", hwversion, tools = "2147483647";
  std::string prealloc = "off";
  bool compat6 = false, zeroed = false;
  std::optional<BackingRef> backing = ctx.backing;
  for (const auto& [k, v] : ctx.options) {
    if (k == "subformat") {
      subformat = v;
    } else if (k == "adapter_type") {
      adapter = v;
    } else if (k == "hwversion") {
      hwversion = v == "undefined" ? "" : v;
    } else if (k == "compat6") {
      ASSIGN_OR_RETURN(compat6, ParseBoolOption(k, v));
    } else if (k == "zeroed_grain") {
      ASSIGN_OR_RETURN(zeroed, ParseBoolOption(k, v));
    } else if (k == "toolsversion") {
      tools = v;
    } else if (k == "preallocation") {
      prealloc = v;
    } else if (k == "backing_file") {
      if (!backing)
        backing = BackingRef{v, ""};
      else
        backing->name = v;
    } else if (k == "backing_fmt") {
      if (!backing)
        backing = BackingRef{"", v};
      else
        backing->format = v;
    } else if (k == "size") {
      // ctx.size holds it
    } else {
      return Status::InvalidArgument("Invalid parameter '{}'", k);
    }
  }
  if (adapter != "ide" && adapter != "lsilogic" && adapter != "buslogic" && adapter != "legacyESX")
    return Status::InvalidArgument("invalid parameter value: {}", adapter);
  const bool flat = subformat == "monolithicFlat" || subformat == "twoGbMaxExtentFlat";
  const bool split = subformat == "twoGbMaxExtentSparse" || subformat == "twoGbMaxExtentFlat";
  const bool stream = subformat == "streamOptimized";
  if (!flat && !split && !stream && subformat != "monolithicSparse")
    return Status::InvalidArgument("invalid parameter value: {}", subformat);
  if (prealloc != "off" && prealloc != "falloc" && prealloc != "full")
    return Status::InvalidArgument("Invalid preallocation mode: '{}'", prealloc);
  if (compat6 && !hwversion.empty())
    return Status::InvalidArgument("compat6 cannot be enabled with hwversion set");
  if (compat6) hwversion = "6";
  if (hwversion.empty()) hwversion = "4";
  if (flat && zeroed) return Status::InvalidArgument("Flat image can't enable zeroed grain");
  if (backing && backing->name.empty()) backing.reset();
  if (backing && flat) return Status::InvalidArgument("Flat image can't have backing file");
  if (backing && !backing->format.empty() && backing->format != "vmdk")
    return Status::InvalidArgument("backing_file must be a vmdk image");
  if (ctx.size > limits::kMaxVirtualSize)
    return Status::InvalidArgument("image size {} is too large", ctx.size);
  if (!flat) prealloc = "off";  // as qemu: the file layer preallocates the file while it is empty

  DescriptorText d;
  d.cid = RandomCid();
  d.create_type = subformat;
  d.hw_version = hwversion;
  d.size = ctx.size;
  d.adapter_type = adapter;
  d.tools_version = tools;
  if (backing) {
    ASSIGN_OR_RETURN(d.parent_cid, ParentCid(ctx, backing->name));
    d.parent_hint = backing->name;
  }

  // Extent file names: "<prefix>-flat<ext>", "-f001", "-s001" next to the descriptor.
  std::string base = BaseName(path), dir = DirPrefix(path), prefix = base, postfix;
  if (auto dot = base.rfind('.'); dot != std::string::npos) {
    prefix = base.substr(0, dot);
    postfix = base.substr(dot);
  }
  const uint64_t sectors = DivRoundUp(ctx.size, kSector);

  if (!flat && !split) {
    // One sparse file holding the descriptor.
    ExtentLine e{Access::kRW, sectors, "SPARSE", base, 0};
    d.extents.push_back(e);
    ASSIGN_OR_RETURN(auto f, CreateImageFile(ctx, path));
    return WriteEmptySparseExtent(*f, PlanSparseExtent(ctx.size, zeroed, stream), FormatDescriptor(d));
  }

  uint64_t extent_bytes = split ? kTwoGbExtentBytes : AlignUp(ctx.size, kSector);
  if (extent_bytes == 0) extent_bytes = kSector;
  uint64_t remaining = sectors * kSector;
  int n = 0;
  do {
    uint64_t bytes = std::min(remaining, extent_bytes);
    n++;
    std::string name = !split ? prefix + "-flat" + postfix
                              : fmt::format("{}-{}{:03d}{}", prefix, flat ? 'f' : 's', n, postfix);
    ASSIGN_OR_RETURN(auto f, CreateImageFile(ctx, dir + name));
    if (flat) {
      RETURN_IF_ERROR(f->Truncate(bytes));
      if (prealloc == "falloc" && bytes) RETURN_IF_ERROR(f->Allocate(0, bytes));
      if (prealloc == "full" && bytes) {
        std::vector<std::byte> zeros(1 << 20);
        for (uint64_t off = 0; off < bytes; off += zeros.size())
          RETURN_IF_ERROR(
              f->PWrite(off, std::span(zeros.data(), std::min<uint64_t>(zeros.size(), bytes - off))));
      }
      RETURN_IF_ERROR(f->Sync(false));
      d.extents.push_back(ExtentLine{Access::kRW, bytes / kSector, "FLAT", name, 0});
    } else {
      RETURN_IF_ERROR(WriteEmptySparseExtent(*f, PlanSparseExtent(bytes, zeroed, false), ""));
      d.extents.push_back(ExtentLine{Access::kRW, bytes / kSector, "SPARSE", name, 0});
    }
    remaining -= bytes;
  } while (remaining > 0);

  std::string text = FormatDescriptor(d);
  ASSIGN_OR_RETURN(auto desc, CreateImageFile(ctx, path));
  RETURN_IF_ERROR(desc->PWrite(0, std::as_bytes(std::span(text)), IoTag::kHeader));
  return desc->Sync(false);
}

}  // namespace vimgfs::vmdk
