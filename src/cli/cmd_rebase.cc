// vimgfs rebase: qemu-img rebase (safe: copies what differs; -u: header only).
#include <cstdio>
#include <cstring>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "cli/option_parser.h"

namespace vimgfs::cli {
namespace {

const char kUsage[] =
    "usage: vimgfs rebase [-f fmt] [-u] [-p] [-q] [-U] -b backing_file [-F backing_fmt] [--untrusted]\n"
    "                     filename\n"
    "\n"
    "Changes the backing file of an image. Safe mode (default) first copies into the image\n"
    "every cluster it does not have whose content differs between the old and the new\n"
    "backing file, so the guest sees the same disk. -u only rewrites the reference.\n"
    "-b \"\" makes the image independent of any backing file.\n"
    "  -U, --force-share  open the old and new backing files without locking them\n";

constexpr uint64_t kStep = 1 << 20;

// Reads [off, off+buf.size()) of img, zeros past its end (or everywhere when img is null).
Status ReadOrZero(Image* img, uint64_t off, std::span<std::byte> buf) {
  uint64_t have = 0;
  if (img && off < img->size()) {
    have = std::min<uint64_t>(buf.size(), img->size() - off);
    RETURN_IF_ERROR(img->Read(off, buf.first(have)));
  }
  std::memset(buf.data() + have, 0, buf.size() - have);
  return Status::Ok();
}

}  // namespace

int RunRebase(int argc, char** argv) {
  std::string fmt, backing, backing_fmt;
  bool have_b = false, unsafe = false, progress = false, quiet = false, untrusted = false;
  bool force_share = false;
  OptionParser opts("rebase", kUsage);
  opts.Value('f', nullptr, &fmt)
      .Value('F', nullptr, &backing_fmt)
      .Add('b', nullptr, true,
           [&](const char* arg) -> std::optional<int> {
             backing = arg;
             have_b = true;
             return std::nullopt;
           })
      .Flag('u', nullptr, &unsafe)
      .Flag('p', nullptr, &progress)
      .Flag('q', nullptr, &quiet)
      .Flag('U', "force-share", &force_share)
      .Accept('t', nullptr, true)
      .Accept('T', nullptr, true)
      .Accept('c', nullptr, false)
      .CommonImageOptions(&untrusted);
  if (auto stop = opts.Parse(argc, argv)) return *stop;
  if (quiet) progress = false;
  if (opts.operands().size() != 1) return UsageError("rebase", "Expecting one image file name");
  if (!have_b) return UsageError("rebase", "Must specify backing file (-b)");
  std::string filename = opts.operands()[0];
  // -U applies to the backing files only, as in qemu-img: the image rebase writes is locked.
  ImageOpen o;
  o.lock_backing = !force_share;
  o.format = fmt;
  o.read_only = false;
  o.untrusted = untrusted;
  o.open_backing = !unsafe;
  auto img = OpenOrReport(filename, o);
  if (!img) return 1;
  // Checked after the open, as qemu-img does (a missing image is reported first).
  if (!backing.empty() && backing_fmt.empty()) {
    PrintError(
        fmt::format("Could not change the backing file to '{}': backing format must be specified", backing));
    return 1;
  }

  if (!unsafe) {
    std::unique_ptr<Image> new_base;
    if (!backing.empty()) {
      ImageOpen bo;
      bo.force_share = force_share;
      bo.format = backing_fmt;
      bo.untrusted = untrusted;
      std::string path = PathCombine(filename, backing);
      auto b = OpenImage(path, bo);
      if (!b.ok()) {
        PrintError(
            fmt::format("Could not open new backing file '{}': {}", path, OpenErrorMessage(path, b.error())));
        return 1;
      }
      new_base = std::move(b).value();
    }
    Image* old_base = img->backing();
    // Zero clusters that keep reading zeros over any backing file: qcow2 v3 (v2 can only
    // deallocate, which would show the new backing file).
    const bool zero_clusters = img->Info().zero_clusters;
    Progress bar(progress && StdoutIsTty());
    std::vector<std::byte> a(kStep), b(kStep);
    const uint64_t size = img->size();
    const uint64_t cluster = img->cluster_size();
    for (uint64_t pos = 0; pos < size; pos += kStep) {
      uint64_t n = std::min(kStep, size - pos);
      auto runs = img->Map(pos, n, true);
      if (!runs.ok()) {
        PrintFileError(filename, runs.error());
        return 1;
      }
      for (const BlockStatus& r : *runs) {
        if (r.depth == 0) continue;  // the image has it: unaffected by its backing file
        std::span<std::byte> sa(a.data(), r.length), sb(b.data(), r.length);
        Status s = ReadOrZero(old_base, r.offset, sa);
        if (!s.ok()) {
          PrintError(fmt::format("error while reading old backing file: {}", s.message()));
          return 1;
        }
        s = ReadOrZero(new_base.get(), r.offset, sb);
        if (!s.ok()) {
          PrintError(fmt::format("error while reading new backing file: {}", s.message()));
          return 1;
        }
        // Copy differing clusters (512-byte runs would split clusters for no gain).
        uint64_t unit = std::min<uint64_t>(cluster, r.length);
        for (uint64_t i = 0; i < r.length;) {
          uint64_t end = std::min(r.length, (r.offset + i) / unit * unit + unit - r.offset);
          if (std::memcmp(sa.data() + i, sb.data() + i, end - i) != 0) {
            // Past the old backing file's end (or with none) the image read zeros: it gets
            // zero clusters, not zero data, as qemu-img writes them (iotest 252).
            const bool old_zero = zero_clusters && (!old_base || r.offset + i >= old_base->size());
            s = old_zero ? img->WriteZeroes(r.offset + i, end - i, false)
                         : img->Write(r.offset + i, sa.subspan(i, end - i));
            if (!s.ok()) {
              PrintError(fmt::format("error while writing to COW image: {}", s.message()));
              return 1;
            }
          }
          i = end;
        }
      }
      bar.Update(static_cast<double>(pos + n) / size);
    }
    bar.Done();
  }

  std::optional<BackingRef> ref;
  if (!backing.empty()) ref = BackingRef{backing, backing_fmt};
  Status s = img->SetBacking(ref);
  if (!s.ok()) {
    PrintError(fmt::format("Could not change the backing file to '{}': {}", backing, s.message()));
    return 1;
  }
  s = img->Close();
  if (!s.ok()) {
    PrintFileError(filename, s);
    return 1;
  }
  return 0;
}

}  // namespace vimgfs::cli
