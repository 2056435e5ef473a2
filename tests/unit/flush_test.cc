// Flushes through the engine, for every format: after in-place writes a flush writes no
// metadata and syncs each host file once, and that sync runs without the engine's
// metadata lock, so reads, lookups and writes of other threads go on while an fsync is
// slow (guest fsync storms through the mount).
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <future>
#include <mutex>
#include <thread>

#include <gtest/gtest.h>

#include "io/forwarding_file.h"
#include "vimgfs/image.h"

namespace vimgfs {
namespace {

constexpr uint64_t kMiB = 1 << 20;

// Wraps an Env: counts syncs and metadata writes, and can hold every Sync at a gate.
class GateEnv : public Env {
 public:
  explicit GateEnv(Env* base) : base_(base) {}
  std::atomic<int> syncs{0}, metadata_writes{0};

  void CloseGate() {
    std::lock_guard lk(mu_);
    closed_ = true;
    arrived_ = false;
  }
  void OpenGate() {
    std::lock_guard lk(mu_);
    closed_ = false;
    cv_.notify_all();
  }
  bool WaitUntilASyncWaits() {
    std::unique_lock lk(mu_);
    return cv_.wait_for(lk, std::chrono::seconds(10), [&] { return arrived_; });
  }

  Result<std::unique_ptr<File>> Open(const std::string& p, OpenMode m) override {
    ASSIGN_OR_RETURN(auto f, base_->Open(p, m));
    return std::unique_ptr<File>(new Gated(this, std::move(f)));
  }
  Result<std::unique_ptr<File>> Create(const std::string& p, bool ex) override {
    return base_->Create(p, ex);
  }
  Status Remove(const std::string& p) override { return base_->Remove(p); }
  Result<FileStat> Stat(const std::string& p) override { return base_->Stat(p); }

 private:
  void AtSync() {
    syncs++;
    std::unique_lock lk(mu_);
    arrived_ = true;
    cv_.notify_all();
    cv_.wait(lk, [&] { return !closed_; });
  }

  class Gated : public ForwardingFile {
   public:
    Gated(GateEnv* e, std::unique_ptr<File> f) : ForwardingFile(std::move(f)), e_(e) {}
    Status PWrite(uint64_t o, std::span<const std::byte> b, IoTag t) override {
      if (t != IoTag::kData && t != IoTag::kCowData) e_->metadata_writes++;
      return ForwardingFile::PWrite(o, b, t);
    }
    Status Sync(bool d) override {
      e_->AtSync();
      return ForwardingFile::Sync(d);
    }

   private:
    GateEnv* e_;
  };

  Env* base_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool closed_ = false, arrived_ = false;
};

struct FormatCase {
  const char* name;
  const char* format;
  std::map<std::string, std::string> options;
};

void PrintTo(const FormatCase& c, std::ostream* os) { *os << c.name; }

class FlushTest : public ::testing::TestWithParam<FormatCase> {
 protected:
  void SetUp() override {
    mem_ = NewMemEnv();
    CreateContext ctx;
    ctx.env = mem_.get();
    ctx.path = "img";
    ctx.size = 8 * kMiB;
    ctx.options = GetParam().options;
    Status s = Image::Create(GetParam().format, ctx);
    ASSERT_TRUE(s.ok()) << s.message();
    gate_ = std::make_unique<GateEnv>(mem_.get());
    OpenOptions o;
    o.env = gate_.get();
    o.format = GetParam().format;
    auto img = Image::Open("img", o);
    ASSERT_TRUE(img.ok()) << img.status().message();
    img_ = std::move(img).value();
    // Allocate the first 2 MiB and make it durable: later writes there are in place.
    std::vector<std::byte> data(2 * kMiB, std::byte{0x5a});
    ASSERT_TRUE(img_->Write(0, data).ok());
    ASSERT_TRUE(img_->Flush().ok());
  }
  void TearDown() override {
    if (gate_) gate_->OpenGate();
  }

  std::unique_ptr<Env> mem_;
  std::unique_ptr<GateEnv> gate_;
  std::unique_ptr<Image> img_;
};

TEST_P(FlushTest, InPlaceWritesFlushWithOneSyncAndNoMetadata) {
  std::vector<std::byte> b(4096, std::byte{1});
  ASSERT_TRUE(img_->Write(64 * 1024, b).ok());
  gate_->syncs = 0;
  gate_->metadata_writes = 0;
  ASSERT_TRUE(img_->Flush().ok());
  EXPECT_EQ(gate_->metadata_writes.load(), 0);
  // One, of the file the data is in (a VMDK descriptor file's new CID was synced by the
  // first flush, in SetUp).
  EXPECT_EQ(gate_->syncs.load(), 1);
}

TEST_P(FlushTest, OtherThreadsGoOnWhileTheSyncWaits) {
  std::vector<std::byte> b(4096, std::byte{2});
  ASSERT_TRUE(img_->Write(0, b).ok());
  gate_->CloseGate();
  auto flushed = std::async(std::launch::async, [&] { return img_->Flush(); });
  ASSERT_TRUE(gate_->WaitUntilASyncWaits()) << "the flush never synced";
  // The flush is inside its fsync now. These need the metadata lock; they must not wait.
  auto others = std::async(std::launch::async, [&] {
    std::vector<std::byte> r(4096);
    Status s = img_->Read(0, r);
    if (s.ok() && r != b) s = Status::Corrupt("read back the wrong data");
    if (s.ok()) s = img_->Write(kMiB, b);
    if (s.ok()) s = img_->Map(0, img_->size(), false).status();
    return s;
  });
  ASSERT_EQ(others.wait_for(std::chrono::seconds(10)), std::future_status::ready)
      << "reads and writes waited for another thread's fsync";
  Status s = others.get();
  EXPECT_TRUE(s.ok()) << s.message();
  EXPECT_NE(flushed.wait_for(std::chrono::milliseconds(0)), std::future_status::ready);
  gate_->OpenGate();
  s = flushed.get();
  EXPECT_TRUE(s.ok()) << s.message();
}

TEST_P(FlushTest, FlushesArrivingDuringOneShareTheNext) {
  std::vector<std::byte> b(4096, std::byte{3});
  ASSERT_TRUE(img_->Write(0, b).ok());
  gate_->syncs = 0;
  gate_->CloseGate();
  auto first = std::async(std::launch::async, [&] { return img_->Flush(); });
  ASSERT_TRUE(gate_->WaitUntilASyncWaits());
  // Three more writers with fsyncs while that flush waits in its sync: their writes came
  // after it began, so it does not cover them; one flush after it covers all three.
  std::vector<std::future<Status>> others;
  for (int i = 1; i <= 3; i++) {
    ASSERT_TRUE(img_->Write(static_cast<uint64_t>(i) * 4096, b).ok());
    others.push_back(std::async(std::launch::async, [&] { return img_->Flush(); }));
  }
  for (int i = 0; i < 1000 && img_->flushes_waiting() < 3; i++)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ASSERT_EQ(img_->flushes_waiting(), 3) << "the later flushes did not wait for the first";
  EXPECT_EQ(gate_->syncs.load(), 1);  // nobody else synced while the first one ran
  gate_->OpenGate();
  EXPECT_TRUE(first.get().ok());
  for (auto& f : others) EXPECT_TRUE(f.get().ok());
  EXPECT_EQ(gate_->syncs.load(), 2);
  // Nothing written since: a flush still syncs (changes made through the format's map
  // directly are not counted), but only once.
  ASSERT_TRUE(img_->Flush().ok());
  EXPECT_EQ(gate_->syncs.load(), 3);
}

INSTANTIATE_TEST_SUITE_P(
    Formats, FlushTest,
    ::testing::Values(FormatCase{"raw", "raw", {}}, FormatCase{"qcow2", "qcow2", {}},
                      FormatCase{"qcow2_v2", "qcow2", {{"compat", "0.10"}}}, FormatCase{"vdi", "vdi", {}},
                      FormatCase{"vdi_static", "vdi", {{"static", "on"}}}, FormatCase{"vmdk", "vmdk", {}},
                      FormatCase{"vmdk_split", "vmdk", {{"subformat", "twoGbMaxExtentSparse"}}},
                      FormatCase{"vmdk_flat", "vmdk", {{"subformat", "monolithicFlat"}}}),
    [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace vimgfs
