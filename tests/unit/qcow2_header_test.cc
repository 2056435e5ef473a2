// qcow2 hostile input: every header field mutated out of range gives one clear error
// (naming the file) and never a crash; hostile tables give errors on access; random
// corruption of the header and tables never crashes open, read, map or write.
#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <random>

#include "support/image_internals.h"
#include "formats/drivers.h"
#include "util/endian.h"
#include "vimgfs/image.h"

namespace vimgfs {
namespace {

constexpr const char* kPath = "/img/t.qcow2";

class Qcow2Hostile : public ::testing::Test {
 protected:
  void SetUp() override {
    env_ = NewMemEnv();
    Make({}, 16 << 20);
  }
  void Make(std::map<std::string, std::string> opts, uint64_t size) {
    CreateContext ctx;
    ctx.env = env_.get();
    ctx.path = kPath;
    ctx.size = size;
    ctx.options = std::move(opts);
    Status s = Qcow2Driver()->Create(ctx);
    ASSERT_TRUE(s.ok()) << s.message();
  }
  Result<std::unique_ptr<Image>> Open(bool ro = true) {
    OpenOptions o;
    o.env = env_.get();
    o.format = "qcow2";
    o.read_only = ro;
    return Image::Open(kPath, o);
  }
  std::unique_ptr<File> Raw() { return std::move(env_->Open(kPath, OpenMode::kReadWrite)).value(); }
  void Put32(uint64_t off, uint32_t v) {
    std::byte b[4];
    StoreBE32(b, v);
    ASSERT_TRUE(Raw()->PWrite(off, b).ok());
  }
  void Put64(uint64_t off, uint64_t v) {
    std::byte b[8];
    StoreBE64(b, v);
    ASSERT_TRUE(Raw()->PWrite(off, b).ok());
  }
  uint64_t Get64(uint64_t off) {
    std::byte b[8];
    EXPECT_TRUE(Raw()->PRead(off, b).ok());
    return LoadBE64(b);
  }
  // Opening must fail with a message naming the file and containing `what`.
  void ExpectOpenError(const std::string& what) {
    auto r = Open();
    ASSERT_FALSE(r.ok()) << "expected an error about: " << what;
    EXPECT_NE(r.error().message().find("t.qcow2"), std::string::npos) << r.error().message();
    EXPECT_NE(r.error().message().find(what), std::string::npos) << r.error().message();
  }
  // Whatever the image holds: open, read all, map, write, no crash.
  void Exercise() {
    auto r = Open(false);
    if (!r.ok()) return;
    Image& img = **r;
    std::vector<std::byte> buf(std::min<uint64_t>(img.size(), 4 << 20));
    (void)img.Read(0, buf);
    (void)img.Map(0, img.size());
    if (img.size() > 70000) {
      std::vector<std::byte> w(70000, std::byte{7});
      (void)img.Write(1000, w);
      (void)img.WriteZeroes(0, std::min<uint64_t>(img.size(), 1 << 20), true);
    }
    (void)img.Close();
  }
  std::unique_ptr<Env> env_;
};

TEST_F(Qcow2Hostile, CleanImageOpens) {
  auto r = Open();
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ((*r)->size(), 16u << 20);
  EXPECT_EQ((*r)->format(), "qcow2");
}

TEST_F(Qcow2Hostile, TruncatedFile) {
  ASSERT_TRUE(Raw()->Truncate(40).ok());
  ExpectOpenError("too small");
}

TEST_F(Qcow2Hostile, BadMagic) {
  Put32(0, 0x12345678);
  ExpectOpenError("not in qcow2 format");
}

TEST_F(Qcow2Hostile, BadVersion) {
  Put32(4, 1);
  ExpectOpenError("version 1");
  Put32(4, 4);
  ExpectOpenError("version 4");
}

TEST_F(Qcow2Hostile, ClusterBitsOutOfRange) {
  Put32(20, 8);
  ExpectOpenError("cluster size");
  Put32(20, 22);
  ExpectOpenError("cluster size");
  Put32(20, 0xffffffff);
  ExpectOpenError("cluster size");
}

TEST_F(Qcow2Hostile, AbsurdL1) {
  Put32(36, 0x7fffffff);
  ExpectOpenError("L1 table");
  Put32(36, 1);
  Put64(40, 1ull << 50);
  ExpectOpenError("past the end of the file");
  Put64(40, 0x30001);
  ExpectOpenError("L1 table offset");
  Put64(40, 0x30000);
  Put32(36, 0);  // too small for 16 MiB
  ExpectOpenError("too small");
}

TEST_F(Qcow2Hostile, RefcountTablePastEof) {
  Put64(48, 1ull << 40);
  ExpectOpenError("refcount table offset");
  Put64(48, 0x10000);
  Put32(56, 0x7fffffff);
  ExpectOpenError("refcount table");
  Put32(56, 0);
  ExpectOpenError("no refcount table");
}

TEST_F(Qcow2Hostile, HugeBackingName) {
  Put64(8, 0x200);
  Put32(16, 5000);
  ExpectOpenError("backing file name");
  Put32(16, 100);
  Put64(8, 0x20000);
  ExpectOpenError("backing file name");
}

TEST_F(Qcow2Hostile, UnknownIncompatibleBits) {
  Put64(72, 1ull << 20);
  ExpectOpenError("Unsupported qcow2 feature");
}

TEST_F(Qcow2Hostile, OtherHeaderFields) {
  Put32(100, 105);
  ExpectOpenError("header length");
  Put32(100, 112);
  Put32(96, 7);
  ExpectOpenError("refcount width");
  Put32(96, 4);
  Put32(32, 2);  // LUKS without its header extension
  ExpectOpenError("Could not read encryption header");
  Put32(32, 3);
  ExpectOpenError("Unsupported encryption method: 3");
  Put32(32, 0);
  Put64(24, 1ull << 62);
  ExpectOpenError("virtual size");
  Put64(24, 16 << 20);
  Put32(60, 1000000);
  ExpectOpenError("Snapshot table too large");
  Put32(60, 1);
  Put64(64, (1ull << 40) + 512);  // unaligned (past the end is allowed: read as zeros, as qemu)
  ExpectOpenError("snapshot table offset");
  Put64(64, 1ull << 63);
  ExpectOpenError("snapshot table offset");
  Put32(60, 0);
  // A header extension claiming more than the cluster.
  Put32(112, 0x12345678);
  Put32(116, 0x7fffffff);
  ExpectOpenError("header extension");
}

TEST_F(Qcow2Hostile, BadTableEntriesGiveErrorsOnAccess) {
  // L1 entry pointing to an unaligned L2 table.
  uint64_t l1 = Get64(40);
  Put64(l1, 0x8000000000012345ull);
  auto r = Open(false);
  ASSERT_TRUE(r.ok()) << r.error().message();
  std::vector<std::byte> buf(4096);
  Status s = (*r)->Read(0, buf);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("L2 table"), std::string::npos) << s.message();
  EXPECT_FALSE((*r)->Write(0, buf).ok());
}

TEST_F(Qcow2Hostile, CorruptBitOpensReadOnly) {
  Put64(72, 2);
  auto r = Open(false);
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_TRUE((*r)->read_only());
  std::vector<std::byte> buf(512);
  EXPECT_TRUE((*r)->Read(0, buf).ok());
  EXPECT_FALSE((*r)->Write(0, buf).ok());
  EXPECT_FALSE(ImageInternals::Map(**r).PrepareWrite(0, 512).ok());
  EXPECT_TRUE(std::get<Qcow2Details>((*r)->Info().format_specific).corrupt);
}

TEST_F(Qcow2Hostile, RandomCorruptionNeverCrashes) {
  // VIMGFS_QCOW2_SEED picks another corruption sequence (for longer local runs).
  const char* seed_env = getenv("VIMGFS_QCOW2_SEED");
  std::mt19937_64 rng(seed_env ? strtoull(seed_env, nullptr, 10) : 42);
  for (int round = 0; round < 300; round++) {
    Make(round % 3 == 0 ? std::map<std::string, std::string>{{"cluster_size", "4k"}}
                        : std::map<std::string, std::string>{},
         16 << 20);
    {
      auto r = Open(false);
      ASSERT_TRUE(r.ok());
      std::vector<std::byte> w(200000, std::byte{1});
      ASSERT_TRUE((*r)->Write(12345, w).ok());
      if (round % 2) {
        // A snapshot table and shared tables to corrupt as well.
        ASSERT_TRUE((*r)->SnapshotCreate("s").ok());
        ASSERT_TRUE((*r)->Write(70000, w).ok());
      }
      ASSERT_TRUE((*r)->Close().ok());
    }
    auto f = Raw();
    uint64_t size = std::move(f->Size()).value();
    int flips = 1 + static_cast<int>(rng() % 8);
    for (int i = 0; i < flips; i++) {
      uint64_t off = rng() % 2 == 0 ? rng() % 128 : rng() % size;
      std::byte b{static_cast<uint8_t>(rng())};
      ASSERT_TRUE(f->PWrite(off, {&b, 1}).ok());
    }
    Exercise();
    // The snapshot view and the snapshot operations on the damaged image.
    OpenOptions o;
    o.env = env_.get();
    o.format = "qcow2";
    o.snapshot = "s";
    if (auto v = Image::Open(kPath, o); v.ok()) {
      std::vector<std::byte> buf(1 << 20);
      (void)(*v)->Read(0, buf);
    }
    if (auto rw = Open(false); rw.ok()) {
      (void)(*rw)->SnapshotApply("s");
      (void)(*rw)->SnapshotDelete("s");
      (void)(*rw)->Check(RepairMode::kAll);
      (void)(*rw)->Close();
    }
  }
}

TEST_F(Qcow2Hostile, DirtyLazyRefcountImageIsRepairedOnWriteOpen) {
  Make({{"lazy_refcounts", "on"}}, 16 << 20);
  {
    auto r = Open(false);
    ASSERT_TRUE(r.ok());
    std::vector<std::byte> w(300000, std::byte{9});
    ASSERT_TRUE((*r)->Write(0, w).ok());
    ASSERT_TRUE((*r)->Close().ok());
  }
  // Simulate a crash with lazy refcounts: dirty bit set, refcounts of data lost.
  Put64(72, 1);
  uint64_t rt = Get64(48);
  uint64_t rb = Get64(rt);
  std::vector<std::byte> zeros(65536 - 16);
  ASSERT_TRUE(Raw()->PWrite(rb + 16, zeros).ok());  // keeps the 8 metadata clusters' counts
  {
    auto r = Open(true);
    ASSERT_TRUE(r.ok());
    EXPECT_TRUE((*r)->Info().dirty);
  }
  {
    auto r = Open(false);
    ASSERT_TRUE(r.ok()) << r.error().message();
    EXPECT_FALSE((*r)->Info().dirty);
    auto rep = (*r)->Check(RepairMode::kNone);
    ASSERT_TRUE(rep.ok());
    EXPECT_EQ(rep->corruptions, 0);
    EXPECT_EQ(rep->leaks, 0);
    std::vector<std::byte> buf(300000);
    ASSERT_TRUE((*r)->Read(0, buf).ok());
    EXPECT_EQ(buf[299999], std::byte{9});
  }
}

TEST_F(Qcow2Hostile, ZeroRefcountForMetadataIsNotReallocated) {
  // Refcounts of the header, refcount table, refcount block and L1 table all zeroed.
  uint64_t rt = Get64(48);
  uint64_t rb = Get64(rt);
  Put64(rb, 0);
  auto r = Open(false);
  ASSERT_TRUE(r.ok()) << r.error().message();
  std::vector<std::byte> w(4096, std::byte{3});
  Status s = (*r)->Write(0, w);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("check -r all"), std::string::npos) << s.message();
  // The L1 table still holds what it held: nothing was written over it.
  EXPECT_EQ(Get64(Get64(40)), 0u);
}

}  // namespace
}  // namespace vimgfs
