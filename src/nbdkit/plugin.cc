// nbdkit-vimgfs-plugin: serves an image's guest view over NBD through nbdkit, on the same
// engine as the mount (docs/ARCHITECTURE.md, "Serving over NBD").
//
//   nbdkit [-r] vimgfs IMAGE [format=FMT] [readonly=true] [untrusted=true] [overlay=FILE]
//                            [snapshot=NAME] [cache_size=SIZE] [cache=none|writeback]
//
// One Image serves every connection (the parallel thread model, multi-conn): a flush on
// any connection makes every write acknowledged before it durable, whichever connection
// sent it. The image is opened and locked in get_ready, before nbdkit forks into the
// background (the OFD locks survive the fork, and Image::Open starts no threads), so an
// image that cannot be served is reported on the terminal and nbdkit exits 1. cleanup,
// after the last connection, flushes, marks the image clean and closes it.
#define NBDKIT_API_VERSION 2  // the callbacks with flags (FUA, may-trim, req-one)
#include <nbdkit-plugin.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "engine/serve.h"
#include "vimgfs/image.h"

namespace {

using vimgfs::Image;
using vimgfs::Status;

vimgfs::ServeOptions g_options;
std::unique_ptr<Image> g_image;

// Reports a failed Status to nbdkit: the message to its log, the errno to the client.
int Fail(const Status& st) {
  nbdkit_error("%s", st.ToString().c_str());
  nbdkit_set_error(st.err() > 0 ? st.err() : EIO);
  return -1;
}

int Config(const char* key, const char* value) {
  const std::string k = key;
  if (k == "file") {
    char* path = nbdkit_realpath(value);
    if (path == nullptr) return -1;
    g_options.image = path;
    free(path);
  } else if (k == "format") {
    g_options.format = value;
  } else if (k == "overlay") {
    char* path = nbdkit_absolute_path(value);  // created when absent: no realpath yet
    if (path == nullptr) return -1;
    g_options.overlay = path;
    free(path);
  } else if (k == "snapshot") {
    g_options.snapshot = value;
  } else if (k == "readonly" || k == "untrusted") {
    int on = nbdkit_parse_bool(value);
    if (on < 0) return -1;
    (k == "readonly" ? g_options.read_only : g_options.untrusted) = on != 0;
  } else if (k == "cache") {
    auto direct = vimgfs::DirectIoForCacheMode(value);
    if (!direct.ok()) {
      nbdkit_error("%s", direct.error().message().c_str());
      return -1;
    }
    g_options.direct_io = *direct;
  } else if (k == "cache_size") {
    int64_t bytes = nbdkit_parse_size(value);
    if (bytes < 0) return -1;
    g_options.cache_bytes = static_cast<uint64_t>(bytes);
  } else {
    nbdkit_error("unknown parameter '%s' (see nbdkit-vimgfs-plugin(1))", key);
    return -1;
  }
  return 0;
}

int ConfigComplete() {
  if (g_options.image.empty()) {
    nbdkit_error("the image is missing: nbdkit vimgfs IMAGE (or file=IMAGE)");
    return -1;
  }
  return 0;
}

// nbdkit -r (--readonly) reaches a plugin only per connection, through open's flag, after
// get_ready has opened the image: nbdkit's own command line is read for it instead, so a
// read-only server opens the image read-only (a shared lock, nothing written to it). The
// options before the plugin name are nbdkit's (nbdkit(1)); an option not known here ends
// the search, which then falls back to what readonly= says.
bool ServerIsReadOnly() {
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  std::vector<std::string> args;
  for (std::string a; std::getline(in, a, '\0');) args.push_back(a);
  static const std::set<std::string> kLongWithValue = {
      "--debug",   "--exportname", "--filter", "--group",         "--ipaddr",  "--log", "--mask-handshake",
      "--pidfile", "--port",       "--run",    "--selinux-label", "--threads", "--tls", "--tls-certificates",
      "--tls-psk", "--unix",       "--user"};
  static const std::set<std::string> kLongFlags = {"--ipv4-only",       "--ipv6-only", "--exit-with-parent",
                                                   "--foreground",      "--newstyle",  "--no-sr",
                                                   "--oldstyle",        "--single",    "--swap",
                                                   "--tls-verify-peer", "--verbose",   "--vsock"};
  for (size_t i = 1; i < args.size(); i++) {
    const std::string& a = args[i];
    if (a == "--readonly" || a == "--read-only") return true;
    if (a.rfind("--", 0) == 0) {
      const std::string name = a.substr(0, a.find('='));
      if (kLongWithValue.contains(name)) {
        if (name == a) i++;  // the value is the next argument
      } else if (!kLongFlags.contains(name)) {
        return false;
      }
      continue;
    }
    if (a.size() < 2 || a[0] != '-') return false;  // the plugin: nbdkit's options ended
    for (size_t k = 1; k < a.size(); k++) {
      if (a[k] == 'r') return true;
      if (std::strchr("DegiPptUu", a[k])) {
        if (k + 1 == a.size()) i++;  // "-P FILE"; "-PFILE" has it in place
        break;
      }
    }
  }
  return false;
}

int GetReady() {
  if (ServerIsReadOnly()) g_options.read_only = true;
  g_options.warn = [](const std::string& line) { nbdkit_debug("%s", line.c_str()); };
  g_options.cannot_write_hint =
      "serve it with readonly=true, write to an overlay with overlay=FILE, or convert it (vimgfs convert -O "
      "qcow2)";
  auto image = vimgfs::OpenForServing(g_options);
  if (!image.ok()) {
    nbdkit_error("%s", image.error().ToString().c_str());
    return -1;
  }
  g_image = std::move(*image);
  return 0;
}

void Cleanup() {
  if (!g_image) return;
  Status st = g_image->Close();
  if (!st.ok()) nbdkit_error("closing %s: %s", g_options.image.c_str(), st.ToString().c_str());
  g_image.reset();
}

// Every connection shares the one image: the handle only has to be non-null.
void* Open(int /*readonly*/) { return g_image.get(); }
void Close(void*) {}

int64_t GetSize(void*) { return static_cast<int64_t>(g_image->size()); }
int CanWrite(void*) { return g_image->read_only() ? 0 : 1; }
int CanFlush(void*) { return 1; }
int CanTrim(void*) { return CanWrite(nullptr); }
int CanZero(void*) { return CanWrite(nullptr); }
// Fast zero: done when the format marks the clusters zero without writing them
// (Image::WriteZeroesFast), ENOTSUP at once with nothing changed otherwise.
int CanFastZero(void*) { return CanWrite(nullptr); }
// nbdkit sends a flush after each write carrying FUA.
int CanFua(void*) { return NBDKIT_FUA_EMULATE; }
int CanMultiConn(void*) { return 1; }
int CanExtents(void*) { return 1; }
int CanCache(void*) { return NBDKIT_CACHE_NONE; }

int PRead(void*, void* buf, uint32_t count, uint64_t offset, uint32_t) {
  Status st = g_image->Read(offset, {static_cast<std::byte*>(buf), count});
  return st.ok() ? 0 : Fail(st);
}

int PWrite(void*, const void* buf, uint32_t count, uint64_t offset, uint32_t) {
  Status st = g_image->Write(offset, {static_cast<const std::byte*>(buf), count});
  return st.ok() ? 0 : Fail(st);
}

int Flush(void*, uint32_t) {
  Status st = g_image->Flush();
  return st.ok() ? 0 : Fail(st);
}

// NBD trim: the range's content is unspecified afterwards; it reads as zeros here, whole
// clusters freed.
int Trim(void*, uint32_t count, uint64_t offset, uint32_t) {
  Status st = g_image->WriteZeroes(offset, count, true);
  return st.ok() ? 0 : Fail(st);
}

int Zero(void*, uint32_t count, uint64_t offset, uint32_t flags) {
  const bool unmap = (flags & NBDKIT_FLAG_MAY_TRIM) != 0;
  if (flags & NBDKIT_FLAG_FAST_ZERO) {
    Status st = g_image->WriteZeroesFast(offset, count, unmap);
    if (st.ok()) return 0;
    if (st.kind() != vimgfs::ErrorKind::kUnsupported) return Fail(st);
    nbdkit_set_error(ENOTSUP);  // expected: the client writes the zeros itself, no log line
    return -1;
  }
  Status st = g_image->WriteZeroes(offset, count, unmap);
  return st.ok() ? 0 : Fail(st);
}

// Block status from the image's map, through the backing chain: unallocated and zero
// clusters are holes that read as zeros, so clients (nbdcopy, qemu-img convert) copy only
// the data.
int Extents(void*, uint32_t count, uint64_t offset, uint32_t flags, nbdkit_extents* extents) {
  auto runs = g_image->Map(offset, count);
  if (!runs.ok()) return Fail(runs.error());
  for (const vimgfs::BlockStatus& b : *runs) {
    if (b.length == 0) continue;
    uint32_t type = 0;
    if (b.zero) type |= NBDKIT_EXTENT_ZERO;
    if (!b.data) type |= NBDKIT_EXTENT_HOLE;
    if (nbdkit_add_extent(extents, b.offset, b.length, type) == -1) return -1;
    if (flags & NBDKIT_FLAG_REQ_ONE) break;
  }
  return 0;
}

int BlockSize(void*, uint32_t* minimum, uint32_t* preferred, uint32_t* maximum) {
  *minimum = 1;
  uint64_t cluster = g_image->cluster_size();
  *preferred = cluster >= 512 && cluster <= (2u << 20) ? static_cast<uint32_t>(cluster) : 4096;
  *maximum = 0xffffffff;
  return 0;
}

void DumpPlugin() {
#ifdef VIMGFS_VERSION
  std::printf("vimgfs_version=%s\n", VIMGFS_VERSION);
#endif
}

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

nbdkit_plugin MakePlugin() {
  nbdkit_plugin p{};
  p.name = "vimgfs";
  p.longname = "vimgfs: qcow2, VMDK, VDI, VHD, VHDX, QED, qcow, Parallels and raw images";
  p.version = VIMGFS_VERSION;
  p.description = "Serves the guest view of a virtual machine disk image through the vimgfs engine.";
  p.config = Config;
  p.config_complete = ConfigComplete;
  p.config_help =
      "[file=]IMAGE            the image to serve (format probed)\n"
      "format=FMT              its format (qcow2, vmdk, vdi, vpc, vhdx, qed, qcow, parallels, raw, ...)\n"
      "readonly=true           open it read-only (shared lock: others may read it too)\n"
      "untrusted=true          follow no backing file, data file or extent outside its folder\n"
      "overlay=FILE            send writes to the qcow2 FILE backed by IMAGE (created if absent)\n"
      "snapshot=NAME           serve the qcow2 internal snapshot NAME, read-only\n"
      "cache_size=SIZE         metadata cache per image (default 32M)\n"
      "cache=none              read and write the image's files around the host's page cache";
  p.magic_config_key = "file";
  p.get_ready = GetReady;
  p.cleanup = Cleanup;
  p.open = Open;
  p.close = Close;
  p.get_size = GetSize;
  p.can_write = CanWrite;
  p.can_flush = CanFlush;
  p.can_trim = CanTrim;
  p.can_zero = CanZero;
  p.can_fast_zero = CanFastZero;
  p.can_fua = CanFua;
  p.can_multi_conn = CanMultiConn;
  p.can_extents = CanExtents;
  p.can_cache = CanCache;
  p.pread = PRead;
  p.pwrite = PWrite;
  p.flush = Flush;
  p.trim = Trim;
  p.zero = Zero;
  p.extents = Extents;
  p.block_size = BlockSize;
  p.dump_plugin = DumpPlugin;
  p.errno_is_preserved = 0;
  return p;
}

nbdkit_plugin g_plugin = MakePlugin();

}  // namespace

NBDKIT_REGISTER_PLUGIN(g_plugin)
