// The fuzz body: the input is an image file in an in-memory Env; it is opened as each
// format (and probed), or as one forced format (FuzzOneImageAs), then read, mapped and
// asked for info, then checked and repaired as `check` and `check -r all` do. Writes go to
// a fresh copy per pass, so allocation paths on hostile tables run too. Shared by the libFuzzer targets and
// the regression test that replays saved inputs in every test run.
#include "fuzz/fuzz_one_image.h"

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "vimgfs/format.h"
#include "vimgfs/image.h"

namespace vimgfs {

namespace {

std::unique_ptr<Env> EnvWith(const uint8_t* data, size_t size) {
  auto env = NewMemEnv();
  auto f = env->Create("/img");
  if (f.ok()) (void)(*f)->PWrite(0, {reinterpret_cast<const std::byte*>(data), size});
  return env;
}

// Two passes over one format (read only, then read-write) on the image in env.
void RunFormat(Env* env, const uint8_t* data, size_t size, const std::string& fmt) {
  for (bool write : {false, true}) {
    OpenOptions o;
    o.env = env;
    o.format = fmt;
    o.read_only = !write;
    o.untrusted = true;  // no external references from fuzzed images
    o.cache_bytes = 1 << 20;
    auto img = Image::Open("/img", o);
    if (!img.ok()) continue;
    Image& im = **img;
    (void)im.Info();
    uint64_t sz = im.size();
    std::vector<std::byte> buf(64 * 1024);
    for (uint64_t off : {uint64_t{0}, sz / 2, sz > buf.size() ? sz - buf.size() : 0}) {
      uint64_t n = std::min<uint64_t>(buf.size(), sz - std::min(off, sz));
      (void)im.Read(off, std::span(buf.data(), n));
    }
    (void)im.Map(0, std::min<uint64_t>(sz, 64ull << 20));
    // Persistent bitmaps: read, and in the write pass changed as the bitmap command does.
    auto maps = im.Bitmaps();
    if (write && maps.ok()) {
      using Op = Image::BitmapChange::Op;
      const std::string first = maps->empty() ? "none" : maps->front().name;
      for (const Image::BitmapChange& c : {Image::BitmapChange{Op::kAdd, "fz", 4096, true, "", nullptr, 0},
                                           Image::BitmapChange{Op::kMerge, "fz", 0, true, first, nullptr, 0},
                                           Image::BitmapChange{Op::kRemove, first, 0, true, "", nullptr, 0}})
        (void)im.ChangeBitmap(c);
    }
    if (write && sz > 0) {
      std::vector<std::byte> w(4096, std::byte{0xab});
      (void)im.Write(sz / 3, std::span(w.data(), std::min<uint64_t>(w.size(), sz - sz / 3)));
      (void)im.WriteZeroes(0, std::min<uint64_t>(sz, 1 << 20), true);
      (void)im.Flush();
    }
    (void)im.Close();
    // Each write pass damages the image for the next pass: restore it.
    auto f = env->Create("/img");
    if (f.ok()) (void)(*f)->PWrite(0, {reinterpret_cast<const std::byte*>(data), size});
  }
}

// check as the CLI runs it: read-only, then -r all and the check after it.
void CheckFormat(Env* env, const uint8_t* data, size_t size, const std::string& fmt) {
  for (RepairMode mode : {RepairMode::kNone, RepairMode::kAll}) {
    OpenOptions o;
    o.env = env;
    o.format = fmt;
    o.read_only = mode == RepairMode::kNone;
    o.untrusted = true;
    o.for_check = true;
    o.cache_bytes = 1 << 20;
    auto img = Image::Open("/img", o);
    if (!img.ok()) continue;
    if ((*img)->Check(mode).ok() && mode != RepairMode::kNone) (void)(*img)->Check(RepairMode::kNone);
    (void)(*img)->Close();
    auto f = env->Create("/img");
    if (f.ok()) (void)(*f)->PWrite(0, {reinterpret_cast<const std::byte*>(data), size});
  }
}

}  // namespace

void FuzzOneImage(const uint8_t* data, size_t size) {
  auto env = EnvWith(data, size);
  std::vector<std::string> formats = {""};
  for (const FormatDriver* d : AllFormats())
    if (std::string_view(d->name()) != "raw") formats.push_back(d->name());
  for (const std::string& fmt : formats) {
    RunFormat(env.get(), data, size, fmt);
    CheckFormat(env.get(), data, size, fmt);
  }
}

bool FuzzOneImageAs(const uint8_t* data, size_t size, std::string_view format) {
  if (!format.empty() && FindFormat(format) == nullptr) return false;
  auto env = EnvWith(data, size);
  RunFormat(env.get(), data, size, std::string(format));
  CheckFormat(env.get(), data, size, std::string(format));
  return true;
}

}  // namespace vimgfs
