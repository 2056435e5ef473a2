// vimgfs bench: qemu-img bench, a read or write benchmark of an image through the engine:
// `count` requests of `bufsize` bytes, `depth` at a time, at offsets that start at
// `offset` and advance by `step` (wrapping at the end of the disk), optionally with a
// flush every `flush-interval` requests. Same options, checks, output and exit codes as
// qemu-img 7.2's; the requests run on threads (the engine is synchronous) rather than
// as asynchronous I/O.
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <shared_mutex>
#include <thread>
#include <vector>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "cli/option_parser.h"

namespace vimgfs::cli {
namespace {

const char kUsage[] =
    "usage: vimgfs bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval]\n"
    "                    [-i aio] [-n] [--no-drain] [-o offset] [--pattern=pattern] [-q]\n"
    "                    [-s buffer_size] [-S step_size] [-t cache] [-U] [-w] [--untrusted]\n"
    "                    filename\n"
    "\n"
    "Runs a simple read (or, with -w, write) benchmark on the image, as qemu-img bench does:\n"
    "count requests (default 75000) of buffer_size bytes (default 4K), depth of them at a\n"
    "time (default 64), starting at offset (default 0) and each step_size bytes after the\n"
    "last (default: buffer_size), wrapping at the end of the disk. Prints the time taken.\n"
    "  -w              write requests (of the byte --pattern, default 0) instead of reads\n"
    "  --flush-interval=N  with -w: flush after every N requests (N >= depth), waiting for\n"
    "                  the requests in flight first unless --no-drain\n"
    "  -t cache        none, writeback (default), writethrough, directsync or unsafe;\n"
    "                  writethrough and directsync flush after every write\n"
    "  -n, -i aio      qemu's AIO choices (threads, native, io_uring): accepted and checked,\n"
    "                  the engine does its own I/O; native needs -t none or directsync\n"
    "  -U, --force-share  read the image even while another process writes it (no lock)\n"
    "  -q              quiet\n"
    "  --image-opts    the name is a key=value list (driver=qcow2,file.filename=F)\n";

// qemu_strtoul with base 0 and a bound: the whole string must be a number (a leading
// minus wraps, as strtoul does, and so fails the bound).
std::optional<unsigned long> ParseBounded(const char* arg, unsigned long max) {
  if (arg == nullptr || *arg == '\0') return std::nullopt;
  errno = 0;
  char* end = nullptr;
  unsigned long v = std::strtoul(arg, &end, 0);
  if (errno != 0 || end == arg || *end != '\0' || v > max) return std::nullopt;
  return v;
}

}  // namespace

int RunBench(int argc, char** argv) {
  std::string fmt, cache = "writeback", aio = "threads";
  bool quiet = false, is_write = false, force_share = false, untrusted = false, image_opts = false;
  bool drain_on_flush = true, native_aio = false;
  unsigned long count = 75000, depth = 64, pattern = 0, flush_interval = 0;
  uint64_t offset = 0, bufsize = 4096, step = 0;
  // An option's own error ends the command at once with 1, as qemu-img does.
  auto bounded = [](unsigned long* out, unsigned long max, const char* what) {
    return [out, max, what](const char* arg) -> std::optional<int> {
      auto v = ParseBounded(arg, max);
      if (!v) {
        PrintError(what);
        return 1;
      }
      *out = *v;
      return std::nullopt;
    };
  };
  auto size_value = [](uint64_t* out, const char* what, uint64_t max) {
    return [out, what, max](const char* arg) -> std::optional<int> {
      auto v = CvtNum(what, arg, 0, max);
      if (!v) return 1;
      *out = *v;
      return std::nullopt;
    };
  };
  OptionParser opts("bench", kUsage);
  opts.Add('c', nullptr, true, bounded(&count, INT_MAX, "Invalid request count specified"))
      .Add('d', nullptr, true, bounded(&depth, INT_MAX, "Invalid queue depth specified"))
      .Value('f', nullptr, &fmt)
      .Flag('n', nullptr, &native_aio)
      .Value('i', nullptr, &aio)
      .Add('o', nullptr, true, size_value(&offset, "offset", INT64_MAX))
      .Flag('q', nullptr, &quiet)
      .Add('s', nullptr, true, size_value(&bufsize, "buffer size", INT_MAX))
      .Add('S', nullptr, true, size_value(&step, "step_size", INT_MAX))
      .Value('t', nullptr, &cache)
      .Flag('w', nullptr, &is_write)
      .Flag('U', "force-share", &force_share)
      .Add(0, "pattern", true, bounded(&pattern, 0xff, "Invalid pattern byte specified"))
      .Add(0, "flush-interval", true, bounded(&flush_interval, INT_MAX, "Invalid flush interval specified"))
      .Add(0, "no-drain", false,
           [&](const char*) -> std::optional<int> {
             drain_on_flush = false;
             return std::nullopt;
           })
      .CommonImageOptions(&untrusted, &image_opts);
  if (auto stop = opts.Parse(argc, argv)) return *stop;
  if (aio != "threads" && aio != "native" && aio != "io_uring") {
    PrintError("Invalid aio option: " + aio);
    return 1;
  }
  if (!IsCacheMode(cache)) {
    PrintError("Invalid cache mode");
    return 1;
  }
  if (opts.operands().size() != 1) return UsageError("bench", "Expecting one image file name");
  const std::string filename = opts.operands()[0];
  if (!is_write && flush_interval != 0) {
    PrintError("--flush-interval is only available in write tests");
    return 1;
  }
  if (flush_interval != 0 && flush_interval < depth) {
    PrintError("Flush interval can't be smaller than depth");
    return 1;
  }
  const bool direct = IsDirectCacheMode(cache);
  if ((native_aio || aio == "native") && !direct) {
    PrintError(
        fmt::format("Could not open '{}': aio=native was specified, but it requires cache.direct=on, "
                    "which was not specified.",
                    filename));
    return 1;
  }
  if (is_write && force_share) {
    PrintError(
        fmt::format("Could not open '{}': force-share=on can only be used with read-only images", filename));
    return 1;
  }

  ImageOpen o;
  o.env = CacheModeEnv(cache);
  o.image_opts = image_opts;
  o.format = fmt;
  o.read_only = !is_write;
  o.force_share = force_share;
  o.untrusted = untrusted;
  std::unique_ptr<Image> image = OpenOrReport(filename, o);
  if (!image) return 1;
  const uint64_t size = image->size();
  if (step == 0) step = bufsize;
  std::printf(
      "Sending %lu %s requests, %llu bytes each, %lu in parallel (starting at offset %llu, step size %llu)\n",
      count, is_write ? "write" : "read", static_cast<unsigned long long>(bufsize), depth,
      static_cast<unsigned long long>(offset), static_cast<unsigned long long>(step));
  if (flush_interval != 0) std::printf("Sending flush every %lu requests\n", flush_interval);
  std::fflush(stdout);

  const bool flush_each_write = cache == "writethrough" || cache == "directsync";
  std::mutex next_mu;  // guards next_offset, issued, completed, failure
  uint64_t next_offset = offset;
  unsigned long issued = 0, completed = 0;
  std::string failure;      // qemu-img's line for the first failed request
  std::shared_mutex drain;  // requests hold it shared; a draining flush takes it whole
  auto fail = [&](const char* what, const Status& st) {
    std::lock_guard lock(next_mu);
    if (failure.empty()) failure = fmt::format("{}: {}", what, std::strerror(st.err() > 0 ? st.err() : EIO));
  };
  auto worker = [&] {
    std::vector<std::byte> buf(bufsize, std::byte(static_cast<unsigned char>(pattern)));
    for (;;) {
      uint64_t at;
      {
        std::lock_guard lock(next_mu);
        if (issued == count || !failure.empty()) return;
        ++issued;
        at = next_offset;
        next_offset = size == 0 ? 0 : (next_offset + step) % size;
      }
      Status st;
      {
        std::shared_lock held(drain);
        if (at > size || bufsize > size - at)  // as the block layer: EIO past the end
          st = Status::Error(ErrorKind::kIo, EIO, "request past the end of the disk");
        else if (is_write)
          st = image->Write(at, buf);
        else
          st = image->Read(at, buf);
        if (st.ok() && is_write && flush_each_write) st = image->Flush();
      }
      if (!st.ok()) return fail("Failed request", st);
      bool flush_now;
      {
        std::lock_guard lock(next_mu);
        ++completed;
        flush_now = flush_interval != 0 && completed % flush_interval == 0;
      }
      if (!flush_now) continue;
      Status fl;
      if (drain_on_flush) {
        std::unique_lock whole(drain);  // waits for the requests in flight
        fl = image->Flush();
      } else {
        fl = image->Flush();
      }
      // qemu-img's wording: a draining flush completes like a request.
      if (!fl.ok()) return fail(drain_on_flush ? "Failed request" : "Failed flush request", fl);
    }
  };

  const auto start = std::chrono::steady_clock::now();
  const unsigned long threads = std::max(1ul, std::min({depth, count, 16ul}));
  std::vector<std::thread> pool;
  for (unsigned long i = 0; i < threads; ++i) pool.emplace_back(worker);
  for (std::thread& t : pool) t.join();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (!failure.empty()) {
    PrintError(failure);
    return 1;
  }
  std::printf("Run completed in %3.3f seconds.\n", secs);
  if (Status st = image->Close(); !st.ok()) {
    PrintFileError(filename, st);
    return 1;
  }
  return 0;
}

}  // namespace vimgfs::cli
