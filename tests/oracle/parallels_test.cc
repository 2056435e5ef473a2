// Parallels against qemu-img 7.2: images qemu makes (across cluster sizes, and qemu's
// sample images) read byte-for-byte like `qemu-img convert -O raw`, and info, map and
// check print what qemu-img prints; images vimgfs makes and writes pass `qemu-img check`
// and compare equal to the same writes on a raw file; the in-use mark, check and its
// repairs behave as qemu's, down to the repaired file's bytes; hostile headers and BATs
// are refused or read safely.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "support/test_util.h"
#include "util/endian.h"
#include "vimgfs/image.h"

namespace vimgfs {
namespace {

using test::Quote;
using test::RunCommand;

std::string Vimgfs() { return Quote(test::VimgfsBinary()); }

std::unique_ptr<Image> OpenOrDie(const std::string& path, bool ro) {
  OpenOptions o;
  o.read_only = ro;
  o.format = "parallels";
  auto img = Image::Open(path, o);
  EXPECT_TRUE(img.ok()) << img.error().message();
  return img.ok() ? std::move(img).value() : nullptr;
}

void QemuIo(const std::string& image, const std::vector<std::string>& cmds) {
  std::string line = "qemu-io -f parallels";
  for (const auto& c : cmds) line += " -c " + Quote(c);
  auto r = RunCommand(line + " " + Quote(image));
  ASSERT_EQ(r.exit_code, 0) << r.err;
}

// vimgfs reads the disk as qemu-img convert -O raw does (a disk over 64 MiB: its first
// 8 MiB, as qemu-img dd copies them).
void ExpectSameAsQemuRaw(const test::TempDir& dir, const std::string& image) {
  const std::string ours = dir.File("ours.raw"), theirs = dir.File("qemu.raw");
  auto img = OpenOrDie(image, true);
  ASSERT_NE(img, nullptr);
  const bool whole = img->size() <= (64 << 20);
  if (whole) {
    auto r = RunCommand("qemu-img convert -f parallels -O raw " + Quote(image) + " " + Quote(theirs));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    r = RunCommand(Vimgfs() + " convert -f parallels -O raw " + Quote(image) + " " + Quote(ours));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(test::Sha256OfFile(ours), test::Sha256OfFile(theirs)) << image;
  } else {
    std::filesystem::remove(theirs);
    auto r = RunCommand("qemu-img dd -f parallels -O raw bs=1M count=8 if=" + Quote(image) +
                        " of=" + Quote(theirs));
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  // And through the library, in odd pieces that cross clusters.
  const auto want = test::ReadWholeFile(theirs);
  if (whole) {
    ASSERT_EQ(img->size(), want.size());
  }
  std::vector<std::byte> got(want.size());
  for (uint64_t at = 0; at < got.size();) {
    const uint64_t n = std::min<uint64_t>(got.size() - at, 77 * 1024 + 512);
    ASSERT_TRUE(img->Read(at, std::span(got).subspan(at, n)).ok());
    at += n;
  }
  EXPECT_EQ(std::memcmp(got.data(), want.data(), want.size()), 0) << image;
}

// `args` run by qemu-img and vimgfs print the same (stdout and stderr) and exit alike.
void ExpectSameOutput(const std::string& args) {
  auto q = RunCommand("qemu-img " + args);
  auto v = RunCommand(Vimgfs() + " " + args);
  EXPECT_EQ(v.exit_code, q.exit_code) << args << "\n" << v.err;
  EXPECT_EQ(v.out, q.out) << args;
  std::string verr = v.err;
  if (verr.starts_with("vimgfs: ")) verr = "qemu-img: " + verr.substr(8);
  EXPECT_EQ(verr, q.err) << args;
}

void ExpectInfoMapCheckAlike(const std::string& image) {
  const std::string f = " -f parallels " + Quote(image);
  ExpectSameOutput("info" + f);
  ExpectSameOutput("info --output=json" + f);
  ExpectSameOutput("map" + f);
  ExpectSameOutput("map --output=json" + f);
  ExpectSameOutput("check" + f);
  ExpectSameOutput("check --output=json" + f);
}

void ExpectQemuCheckClean(const std::string& image) {
  auto r = RunCommand("qemu-img check -f parallels " + Quote(image));
  EXPECT_EQ(r.exit_code, 0) << image << "\n" << r.out << r.err;
  EXPECT_NE(r.out.find("No errors were found on the image."), std::string::npos) << r.out << r.err;
}

void ExpectQemuCompareEqual(const std::string& image, const std::string& raw) {
  auto r = RunCommand("qemu-img compare -f parallels -F raw " + Quote(image) + " " + Quote(raw));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
}

uint32_t InUseField(const std::string& image) {
  auto bytes = test::ReadWholeFile(image);
  return bytes.size() >= 48 ? LoadLE32(reinterpret_cast<const std::byte*>(bytes.data()) + 44) : 0;
}

// Rewrites the 32-bit little-endian field at byte `at` of `image`.
void Poke32(const std::string& image, uint64_t at, uint32_t value) {
  auto bytes = test::ReadWholeFile(image);
  ASSERT_GE(bytes.size(), at + 4);
  StoreLE32(reinterpret_cast<std::byte*>(bytes.data()) + at, value);
  test::WriteWholeFile(image, bytes);
}

TEST(ParallelsOracle, QemuMadeImagesReadByteExactAndInfoMapCheckAlike) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  // 1536: a cluster that is not a power of two (qemu accepts any multiple of 512).
  const std::pair<const char*, const char*> cases[] = {
      {"512", "off"}, {"4k", "off"}, {"64k", "falloc"}, {"1M", "off"}, {"1536", "off"}};
  for (const auto& [cluster, prealloc] : cases) {
    {
      SCOPED_TRACE(std::string(cluster) + " " + prealloc);
      const std::string img = dir.File(std::string("q_") + cluster + prealloc + ".parallels");
      auto r = RunCommand(std::string("qemu-img create -q -f parallels -o cluster_size=") + cluster +
                          ",preallocation=" + prealloc + " " + Quote(img) + " 5000k");
      ASSERT_EQ(r.exit_code, 0) << r.err;
      QemuIo(img, {"write -P 0x11 0 4k", "write -P 0x22 1000k 300k", "write -P 0x33 4999k 1k",
                   "write -P 0x44 2049k 512", "write -z 1500k 64k", "write -P 0x55 70k 8k"});
      ExpectSameAsQemuRaw(dir, img);
      ExpectInfoMapCheckAlike(img);
    }
  }
}

TEST(ParallelsOracle, QemuSampleImagesReadAsQemuReadsThem) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  // v1: "WithoutFreeSpace", entries in sectors; v2: in clusters; with-bitmap: a format
  // extension holding a dirty bitmap (vimgfs reads the disk data, not the bitmap).
  for (const char* name : {"parallels-v1", "parallels-v2", "parallels-with-bitmap"}) {
    SCOPED_TRACE(name);
    std::string path;
    REQUIRE_QEMU_SAMPLE(path, name, dir.path());
    ExpectSameAsQemuRaw(dir, path);
    ExpectInfoMapCheckAlike(path);
  }
  // Written by vimgfs (entries in sectors for v1, in clusters for v2), read back by qemu.
  const std::string raw = dir.File("new.raw");
  auto data = test::RandomBytes(2 << 20, 3);
  std::fill(data.begin() + (192 << 10), data.begin() + (512 << 10), 0);
  test::WriteWholeFile(raw, data);
  for (const char* name : {"parallels-v1", "parallels-v2"}) {
    SCOPED_TRACE(name);
    std::string path;
    REQUIRE_QEMU_SAMPLE(path, name, dir.path());
    auto r = RunCommand(Vimgfs() + " convert -n -f raw -O parallels " + Quote(raw) + " " + Quote(path));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    ExpectQemuCheckClean(path);
    ExpectQemuCompareEqual(path, raw);
  }
}

TEST(ParallelsOracle, WritesGoPastTheFormatExtensionAndLeaveItIntact) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  std::string path;
  REQUIRE_QEMU_SAMPLE(path, "parallels-with-bitmap", dir.path());
  const auto before = test::ReadWholeFile(path);
  const uint64_t ext = uint64_t{LoadLE32(reinterpret_cast<const std::byte*>(before.data()) + 56)} * 512;
  ASSERT_GT(ext, 0u);
  std::vector<std::byte> data(3 << 20);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<std::byte>(i * 7 + 1);
  {
    auto im = OpenOrDie(path, false);
    ASSERT_NE(im, nullptr);
    ASSERT_TRUE(im->Write(0, data).ok());
    ASSERT_TRUE(im->Close().ok());
  }
  const auto after = test::ReadWholeFile(path);
  ASSERT_GE(after.size(), before.size());
  // Everything past the BAT that was there before is untouched: the extension cluster and
  // the bitmap clusters it names (qemu's read-only open parses them again below).
  EXPECT_EQ(std::memcmp(after.data() + (1 << 20), before.data() + (1 << 20), before.size() - (1 << 20)), 0);
  const std::string raw = dir.File("expect.raw");
  {
    std::vector<uint8_t> bytes(8 << 20);
    std::memcpy(bytes.data(), data.data(), data.size());
    test::WriteWholeFile(raw, bytes);
  }
  auto r = RunCommand("qemu-img dd -f parallels -O raw bs=1M count=8 if=" + Quote(path) +
                      " of=" + Quote(dir.File("got.raw")));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(test::Sha256OfFile(dir.File("got.raw")), test::Sha256OfFile(raw));
  r = RunCommand("qemu-img check -f parallels " + Quote(path));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
}

TEST(ParallelsOracle, CreateWritesWhatQemuWritesAndRefusesWhatQemuRefuses) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  for (const char* opts : {"", "-o cluster_size=4k", "-o cluster_size=64k,preallocation=falloc",
                           "-o cluster_size=1000", "-o preallocation=full"}) {
    for (const char* size : {"1001", "10M", "3G"}) {
      SCOPED_TRACE(std::string(opts) + " " + size);
      const std::string q = dir.File("q.img"), v = dir.File("v.img");
      auto rq =
          RunCommand(std::string("qemu-img create -q -f parallels ") + opts + " " + Quote(q) + " " + size);
      auto rv = RunCommand(Vimgfs() + " create -q -f parallels " + opts + " " + Quote(v) + " " + size);
      ASSERT_EQ(rq.exit_code, 0) << rq.err;
      ASSERT_EQ(rv.exit_code, 0) << rv.err;
      EXPECT_EQ(test::ReadWholeFile(v), test::ReadWholeFile(q));  // no random fields
    }
  }
  ExpectSameOutput("create -f parallels -o help");
  const std::string x = Quote(dir.File("x.img"));
  ExpectSameOutput("create -f parallels -o cluster_size=0 " + x + " 1M");
  ExpectSameOutput("create -f parallels -o cluster_size=3G " + x + " 1M");
  ExpectSameOutput("create -f parallels -o cluster_size=512 " + x + " 3T");
  ExpectSameOutput("create -f parallels -o preallocation=metadata " + x + " 1M");
  ExpectSameOutput("create -f parallels -o bogus=1 " + x + " 1M");
  // qemu's driver cannot resize, and says so; the image is left as it was.
  ASSERT_EQ(RunCommand("qemu-img create -q -f parallels " + x + " 1M").exit_code, 0);
  const auto before = test::ReadWholeFile(dir.File("x.img"));
  ExpectSameOutput("resize -f parallels " + x + " 2M");
  EXPECT_EQ(test::ReadWholeFile(dir.File("x.img")), before);
  // qemu's parallels images name no backing file.
  ASSERT_EQ(RunCommand("qemu-img create -q -f raw " + Quote(dir.File("base.raw")) + " 1M").exit_code, 0);
  ExpectSameOutput("create -f parallels -b " + Quote(dir.File("base.raw")) + " -F raw " + x + " 1M");
}

TEST(ParallelsOracle, VimgfsWritesQemuReadsAndChecksClean) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string raw = dir.File("src.raw");
  {
    auto data = test::RandomBytes(3 << 20, 7);
    std::memset(data.data() + (1 << 20), 0, 1 << 20);  // a zero MiB: left unallocated
    data.resize(6 << 20);
    test::WriteWholeFile(raw, data);
  }
  for (const char* cluster : {"512", "4k", "64k", "1M"}) {
    SCOPED_TRACE(cluster);
    const std::string img = dir.File(std::string("c_") + cluster + ".parallels");
    auto r = RunCommand(Vimgfs() + " convert -O parallels -o cluster_size=" + cluster + " " + Quote(raw) +
                        " " + Quote(img));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    ExpectQemuCheckClean(img);
    ExpectQemuCompareEqual(img, raw);
    EXPECT_EQ(InUseField(img), 0u);
    ExpectSameOutput("map --output=json -f parallels " + Quote(img));

    // Writes through the engine, from 4 threads, unaligned; the same on a raw copy.
    const std::string mirror = dir.File("mirror.raw");
    std::filesystem::copy_file(raw, mirror, std::filesystem::copy_options::overwrite_existing);
    {
      auto im = OpenOrDie(img, false);
      ASSERT_NE(im, nullptr);
      EXPECT_EQ(InUseField(img), 0x746F6E59u);  // marked in use while open for writing
      std::vector<std::thread> threads;
      std::vector<std::vector<std::pair<uint64_t, std::vector<std::byte>>>> writes(4);
      for (int t = 0; t < 4; ++t) {
        threads.emplace_back([&, t] {
          std::mt19937_64 rng(t + 100);
          for (int i = 0; i < 40; ++i) {
            // Each thread its own 1.5 MiB slice, so the mirror's order does not matter.
            const uint64_t len = 1 + rng() % 70000;
            const uint64_t off = t * (1536 << 10) + rng() % ((1536 << 10) - len);
            std::vector<std::byte> buf(len, static_cast<std::byte>(rng()));
            if (i % 7 == 0) {
              ASSERT_TRUE(im->WriteZeroes(off, len, false).ok());
              std::fill(buf.begin(), buf.end(), std::byte{0});
            } else {
              ASSERT_TRUE(im->Write(off, buf).ok());
            }
            writes[t].emplace_back(off, std::move(buf));
          }
        });
      }
      for (auto& th : threads) th.join();
      ASSERT_TRUE(im->Flush().ok());
      ASSERT_TRUE(im->Close().ok());
      std::fstream m(mirror, std::ios::in | std::ios::out | std::ios::binary);
      for (const auto& w : writes) {
        for (const auto& [off, buf] : w) {
          m.seekp(static_cast<std::streamoff>(off));
          m.write(reinterpret_cast<const char*>(buf.data()), static_cast<std::streamsize>(buf.size()));
        }
      }
    }
    EXPECT_EQ(InUseField(img), 0u);  // cleared on close
    ExpectQemuCheckClean(img);
    ExpectQemuCompareEqual(img, mirror);
  }
  // And back: qemu's image converted by vimgfs to qcow2 reads the same.
  const std::string img = dir.File("c_64k.parallels"), q2 = dir.File("c.qcow2");
  ASSERT_EQ(RunCommand(Vimgfs() + " convert -f parallels -O qcow2 " + Quote(img) + " " + Quote(q2)).exit_code,
            0);
  auto r = RunCommand("qemu-img compare -f parallels -F qcow2 " + Quote(img) + " " + Quote(q2));
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
}

TEST(ParallelsOracle, ImageLeftInUseIsRefusedAndRepairedAsQemuDoes) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  const std::string base = dir.File("base.img");
  ASSERT_EQ(
      RunCommand("qemu-img create -q -f parallels -o cluster_size=64k " + Quote(base) + " 4M").exit_code, 0);
  QemuIo(base, {"write -P 1 0 100k", "write -P 2 1M 64k"});
  Poke32(base, 44, 0x746F6E59);  // what a writer killed before closing leaves
  {
    // Space past the last cluster too: a leak.
    std::ofstream(base, std::ios::binary | std::ios::app) << std::string(100000, 'x');
  }
  // Read-only: fine; for writing: refused with qemu's message.
  ExpectSameAsQemuRaw(dir, base);
  ExpectSameOutput("info -f parallels " + Quote(base));
  auto w = RunCommand(Vimgfs() + " resize -f parallels " + Quote(base) + " 8M");
  EXPECT_NE(w.exit_code, 0);
  EXPECT_NE(w.err.find("parallels: Image was not closed correctly; cannot be opened read/write"),
            std::string::npos)
      << w.err;
  for (const char* mode : {"", "-r leaks", "-r all"}) {
    for (const char* output : {"human", "json"}) {
      SCOPED_TRACE(std::string(mode) + " " + output);
      std::filesystem::create_directories(dir.File("q"));
      std::filesystem::create_directories(dir.File("v"));
      std::filesystem::copy_file(base, dir.File("q/x.img"),
                                 std::filesystem::copy_options::overwrite_existing);
      std::filesystem::copy_file(base, dir.File("v/x.img"),
                                 std::filesystem::copy_options::overwrite_existing);
      const std::string args = std::string("check ") + mode + " --output=" + output + " -f parallels x.img";
      auto q = RunCommand("cd " + Quote(dir.File("q")) + " && qemu-img " + args);
      auto v = RunCommand("cd " + Quote(dir.File("v")) + " && " + Vimgfs() + " " + args);
      EXPECT_EQ(v.exit_code, q.exit_code);
      EXPECT_EQ(v.out, q.out);
      EXPECT_EQ(v.err, q.err);
      // The repaired files are the same bytes (the mark cleared by any read-write open).
      EXPECT_EQ(test::ReadWholeFile(dir.File("v/x.img")), test::ReadWholeFile(dir.File("q/x.img")));
    }
  }
}

TEST(ParallelsOracle, LeakRepairOfAnEmptyImageWithALargeBatMatchesQemu) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  // qemu's image end offset is the first cluster's end when none is allocated: the rest of
  // the BAT counts as leaked, -r cuts it, and the close grows the file back.
  for (const char* mode : {"-r leaks", "-r all"}) {
    std::filesystem::remove_all(dir.File("q"));
    std::filesystem::remove_all(dir.File("v"));
    std::filesystem::create_directories(dir.File("q"));
    std::filesystem::create_directories(dir.File("v"));
    ASSERT_EQ(RunCommand("cd " + Quote(dir.File("q")) +
                         " && qemu-img create -q -f parallels -o cluster_size=64k x.img 10G")
                  .exit_code,
              0);
    std::filesystem::copy_file(dir.File("q/x.img"), dir.File("v/x.img"));
    const std::string args = std::string("check ") + mode + " -f parallels x.img";
    auto q = RunCommand("cd " + Quote(dir.File("q")) + " && qemu-img " + args);
    auto v = RunCommand("cd " + Quote(dir.File("v")) + " && " + Vimgfs() + " " + args);
    EXPECT_EQ(v.exit_code, q.exit_code);
    EXPECT_EQ(v.out, q.out);
    EXPECT_EQ(v.err, q.err);
    EXPECT_EQ(test::ReadWholeFile(dir.File("v/x.img")), test::ReadWholeFile(dir.File("q/x.img")));
  }
}

// A small qemu-made image with data in clusters 0..3 (4 KiB clusters, data from 4 KiB).
std::string MakeSmall(const test::TempDir& dir, const std::string& name) {
  const std::string img = dir.File(name);
  EXPECT_EQ(RunCommand("qemu-img create -q -f parallels -o cluster_size=4k " + Quote(img) + " 64k").exit_code,
            0);
  QemuIo(img, {"write -P 0xa1 0 16k"});
  return img;
}

TEST(ParallelsOracle, HostileBatEntriesAreReadSafelyAndNeverWrittenThrough) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  // Past the end of the file: qemu reads zeros there and check reports (and -r all
  // unmaps) the cluster; vimgfs does the same and refuses to write into such an image.
  {
    const std::string img = MakeSmall(dir, "past_eof.img");
    Poke32(img, 64 + 4 * 2, 1000);  // cluster 2 at 4000 KiB, far past the end
    ExpectSameAsQemuRaw(dir, img);
    ExpectSameOutput("check -f parallels " + Quote(img));
    const auto before = test::ReadWholeFile(img);
    auto im = OpenOrDie(img, false);
    ASSERT_NE(im, nullptr);
    std::vector<std::byte> buf(4096, std::byte{1});
    Status s = im->Write(40 << 10, buf);  // an unallocated cluster
    EXPECT_FALSE(s.ok());
    EXPECT_NE(s.message().find("outside the image"), std::string::npos) << s.message();
    im.reset();
    EXPECT_EQ(test::ReadWholeFile(img), before);  // the in-use mark set and cleared again
    std::filesystem::copy_file(img, dir.File("past_eof_q.img"));
    auto v = RunCommand(Vimgfs() + " check -r all -f parallels " + Quote(img));
    auto q = RunCommand("qemu-img check -r all -f parallels " + Quote(dir.File("past_eof_q.img")));
    EXPECT_EQ(v.exit_code, q.exit_code);
    EXPECT_EQ(v.out, q.out);
    EXPECT_EQ(v.err, q.err);
    // Repaired: writable again, and qemu finds it clean after our write.
    im = OpenOrDie(img, false);
    ASSERT_NE(im, nullptr);
    EXPECT_TRUE(im->Write(40 << 10, buf).ok());
    ASSERT_TRUE(im->Close().ok());
    ExpectQemuCheckClean(img);
  }
  // Two entries naming one cluster, and one naming the BAT: read as qemu reads them,
  // never written through (a write would change two places of the disk, or the BAT).
  struct Bad {
    const char* what;
    const char* cluster_size;
    uint32_t cluster, entry;
    const char* message;
  };
  for (const Bad& b : {Bad{"shared", "4k", 3, 3, "overlap in the file"},  // cluster 2 lives at entry 3
                       Bad{"in the BAT", "512", 20, 1, "overlaps the Parallels header or BAT"}}) {
    SCOPED_TRACE(b.what);
    const std::string img = dir.File(std::string("bad_") + b.cluster_size + ".img");
    ASSERT_EQ(RunCommand(std::string("qemu-img create -q -f parallels -o cluster_size=") + b.cluster_size +
                         " " + Quote(img) + " 64k")
                  .exit_code,
              0);
    QemuIo(img, {"write -P 0xa1 0 16k"});
    Poke32(img, 64 + 4 * b.cluster, b.entry);
    ExpectSameAsQemuRaw(dir, img);
    const auto before = test::ReadWholeFile(img);
    auto im = OpenOrDie(img, false);
    ASSERT_NE(im, nullptr);
    std::vector<std::byte> buf(512, std::byte{7});
    for (uint64_t at : {uint64_t{0}, uint64_t{40} << 10}) {  // in place, and a new cluster
      Status s = im->Write(at, buf);
      EXPECT_FALSE(s.ok());
      EXPECT_NE(s.message().find(b.message), std::string::npos) << s.message();
    }
    im.reset();
    EXPECT_EQ(test::ReadWholeFile(img), before);
  }
}

TEST(ParallelsOracle, HostileHeadersAreRefusedWithOneLine) {
  REQUIRE_QEMU_IMG();
  test::TempDir dir;
  struct Case {
    const char* what;
    size_t at;
    uint32_t value;
    const char* message;
  };
  const Case cases[] = {
      {"zero cluster", 28, 0, "Zero sectors per track"},
      {"huge cluster", 28, 0x7fffffff, "Too big cluster"},
      {"huge catalog", 32, 0xffffffffu, "Catalog too large"},
      {"bad version", 16, 3, "not in Parallels format"},
      {"huge size", 40, 0xffffffffu, "larger than vimgfs's limit"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    const std::string img = MakeSmall(dir, std::string("h_") + std::to_string(c.at) + ".img");
    Poke32(img, c.at, c.value);
    const auto before = test::ReadWholeFile(img);
    OpenOptions o;
    o.format = "parallels";
    auto opened = Image::Open(img, o);
    ASSERT_FALSE(opened.ok());
    EXPECT_NE(opened.error().message().find(c.message), std::string::npos) << opened.error().message();
    EXPECT_EQ(opened.error().message().find('\n'), std::string::npos);
    EXPECT_EQ(test::ReadWholeFile(img), before);
  }
  // A file shorter than the header, with the magic.
  const std::string tiny = dir.File("tiny.img");
  std::ofstream(tiny, std::ios::binary) << "WithouFreSpacExt";
  OpenOptions o;
  o.format = "parallels";
  auto opened = Image::Open(tiny, o);
  ASSERT_FALSE(opened.ok());
  EXPECT_NE(opened.error().message().find("not in Parallels format"), std::string::npos);
  // A huge catalog within vimgfs's limit in a tiny file: entries past the end read as
  // zeros, as in qemu.
  const std::string sparse = MakeSmall(dir, "sparse_bat.img");
  Poke32(sparse, 32, 1 << 20);  // 1M entries, 4 MiB of BAT, file of a few KiB
  Poke32(sparse, 36, 1 << 20);  // 512 MiB disk
  ExpectSameAsQemuRaw(dir, sparse);
}

}  // namespace
}  // namespace vimgfs
