// Files an image names (VMDK extents, backing files, qcow2 data files) are opened race-free:
// while another thread swaps the named file for a symlink to a secret outside the folder,
// or for a FIFO, thousands of opens never read the secret (--untrusted) and never hang.
// Runs on the host file system (PosixEnv), since the races are the kernel's.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <thread>

#include <gtest/gtest.h>

#include "support/test_util.h"
#include "vimgfs/image.h"

namespace vimgfs {
namespace {

using test::TempDir;

constexpr uint64_t kSize = 1 << 20;
constexpr std::byte kSecretByte{0x5e};
constexpr std::byte kGuestByte{0x61};

// Swaps `target` with each of `stages` in turn (renameat2 RENAME_EXCHANGE: the target
// always exists, and is one of them at any instant) until stopped.
class Swapper {
 public:
  Swapper(std::string target, std::vector<std::string> stages)
      : target_(std::move(target)), stages_(std::move(stages)), thread_([this] { Run(); }) {}
  ~Swapper() {
    stop_ = true;
    thread_.join();
  }
  uint64_t swaps() const { return swaps_; }

 private:
  void Run() {
    while (!stop_) {
      for (const std::string& s : stages_) {
        // Twice: out and back, so the regular file is in place half of the time.
        for (int i = 0; i < 2; i++)
          if (renameat2(AT_FDCWD, target_.c_str(), AT_FDCWD, s.c_str(), RENAME_EXCHANGE) == 0) swaps_++;
      }
    }
  }
  std::string target_;
  std::vector<std::string> stages_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> swaps_{0};
  std::thread thread_;
};

// Fails the test if `fn` (one open attempt) does not come back within 10 s: an open that
// blocks on a FIFO would hang forever.
template <typename Fn>
void WithWatchdog(Fn fn) {
  std::atomic<bool> done{false};
  std::thread worker([&] {
    fn();
    done = true;
  });
  auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (!done && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  if (!done) {
    ADD_FAILURE() << "an open hung (blocked on a FIFO?)";
    std::fflush(nullptr);
    _exit(1);  // the worker cannot be joined
  }
  worker.join();
}

void FillFile(const std::string& path, std::byte b, uint64_t size) {
  std::vector<uint8_t> data(size, static_cast<uint8_t>(b));
  test::WriteWholeFile(path, data);
}

struct Stats {
  int opened = 0;       // read the guest bytes
  int refused = 0;      // the open or the read failed cleanly
  int read_secret = 0;  // followed the symlink (allowed only when trusted)
  int rounds = 0;
};

// Opens `image` while the swapper runs, at least `min_rounds` times and on until the race
// has been seen from both sides (a round that got the regular file, one that got a swapped
// stage) or `budget` runs out: on a loaded one-CPU machine the swapper may not run at all
// during the first few thousand rounds. Every successful untrusted open must read guest
// bytes (never the secret) at the start of the disk.
Stats OpenRepeatedly(const std::string& image, const std::string& format, bool untrusted, int min_rounds,
                     std::chrono::seconds budget) {
  Stats st;
  OpenOptions o;
  o.format = format;
  o.read_only = true;
  o.untrusted = untrusted;
  std::vector<std::byte> buf(4096);
  auto deadline = std::chrono::steady_clock::now() + budget;
  auto race_seen = [&] { return st.opened > 0 && st.refused + st.read_secret > 0; };
  for (; st.rounds < min_rounds || (!race_seen() && std::chrono::steady_clock::now() < deadline);
       st.rounds++) {
    auto img = Image::Open(image, o);
    if (!img.ok()) {
      st.refused++;
      continue;
    }
    Status s = (*img)->Read(0, buf);
    if (!s.ok()) {
      st.refused++;
      continue;
    }
    if (buf[0] == kSecretByte) {
      st.read_secret++;
      EXPECT_FALSE(untrusted) << "round " << st.rounds << ": read the file outside the folder";
      if (untrusted) break;
      continue;
    }
    EXPECT_EQ(buf[0], kGuestByte) << "round " << st.rounds;
    if (buf[0] != kGuestByte) break;
    st.opened++;
  }
  return st;
}

class ReferenceRace : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    outside_.emplace();
    dir_.emplace();
    secret_ = outside_->File("secret");
    FillFile(secret_, kSecretByte, kSize);
    chmod(secret_.c_str(), 0600);
  }
  // Stage files beside `target`: a symlink to the secret and a FIFO.
  std::vector<std::string> Stages(const std::string& target) {
    std::string link = target + ".link", fifo = target + ".fifo";
    EXPECT_EQ(symlink(secret_.c_str(), link.c_str()), 0);
    EXPECT_EQ(mkfifo(fifo.c_str(), 0600), 0);
    return {link, fifo};
  }
  void Race(const std::string& image, const std::string& format, const std::string& target) {
    bool untrusted = GetParam();
    Swapper swapper(target, Stages(target));
    Stats st;
    WithWatchdog(
        [&] { st = OpenRepeatedly(image, format, untrusted, kMinRounds, std::chrono::seconds(30)); });
    EXPECT_GT(st.opened, 0) << "the regular file never won a round in " << st.rounds;
    EXPECT_GT(st.refused + st.read_secret, 0) << "no round of " << st.rounds << " saw a swapped file ("
                                              << swapper.swaps() << " swaps): the race was not exercised";
    if (untrusted) {
      EXPECT_EQ(st.read_secret, 0);
    }
    EXPECT_GT(swapper.swaps(), 100u);
  }

  static constexpr int kMinRounds = 3000;
  std::optional<TempDir> outside_, dir_;
  std::string secret_;
};

TEST_P(ReferenceRace, VmdkExtent) {
  std::string flat = dir_->File("disk-flat.vmdk");
  FillFile(flat, kGuestByte, kSize);
  std::string desc =
      "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
      "createType=\"monolithicFlat\"\n\nRW 2048 FLAT \"disk-flat.vmdk\" 0\n\n"
      "ddb.virtualHWVersion = \"4\"\n";
  test::WriteWholeFile(dir_->File("disk.vmdk"), std::vector<uint8_t>(desc.begin(), desc.end()));
  Race(dir_->File("disk.vmdk"), "vmdk", flat);
}

TEST_P(ReferenceRace, Qcow2BackingFile) {
  std::string base = dir_->File("base.raw");
  FillFile(base, kGuestByte, kSize);
  CreateContext c;
  c.path = dir_->File("top.qcow2");
  c.size = kSize;
  c.backing = BackingRef{"base.raw", "raw"};
  ASSERT_TRUE(Image::Create("qcow2", c).ok());
  Race(c.path, "qcow2", base);
}

TEST_P(ReferenceRace, Qcow2DataFile) {
  CreateContext c;
  c.path = dir_->File("img.qcow2");
  c.size = kSize;
  c.options = {{"data_file", "img.data"}, {"data_file_raw", "on"}};
  ASSERT_TRUE(Image::Create("qcow2", c).ok());
  {
    OpenOptions o;
    auto img = Image::Open(c.path, o);
    ASSERT_TRUE(img.ok()) << img.error().message();
    std::vector<std::byte> guest(kSize, kGuestByte);
    ASSERT_TRUE((*img)->Write(0, guest).ok());
    ASSERT_TRUE((*img)->Close().ok());
  }
  Race(c.path, "qcow2", dir_->File("img.data"));
}

INSTANTIATE_TEST_SUITE_P(Trust, ReferenceRace, ::testing::Values(true, false),
                         [](const auto& info) { return info.param ? "Untrusted" : "Trusted"; });

// The rules without a race: --untrusted follows no symlink, even one inside the folder, and
// no name that leaves it; trusted or not, a FIFO is refused at once.
TEST(ReferenceRules, RefusedWithoutBlocking) {
  TempDir dir, outside;
  std::string secret = outside.File("secret");
  FillFile(secret, kSecretByte, kSize);
  FillFile(dir.File("real.raw"), kGuestByte, kSize);
  ASSERT_EQ(symlink("real.raw", dir.File("inside-link").c_str()), 0);
  ASSERT_EQ(symlink(secret.c_str(), dir.File("outside-link").c_str()), 0);
  ASSERT_EQ(mkfifo(dir.File("fifo").c_str(), 0600), 0);
  ASSERT_EQ(mkdir(dir.File("sub").c_str(), 0700), 0);
  FillFile(dir.File("sub/nested.raw"), kGuestByte, kSize);
  std::string referrer = dir.File("image.qcow2");
  Env& env = *Env::Default();

  struct Case {
    std::string name;
    bool untrusted;
    bool ok;
  };
  std::vector<Case> cases = {
      {"real.raw", true, true},
      {"./sub/nested.raw", true, true},
      {dir.File("real.raw"), true, true},
      {"inside-link", true, false},
      {"outside-link", true, false},
      {"../" + outside.path().substr(outside.path().rfind('/') + 1) + "/secret", true, false},
      {secret, true, false},
      {"fifo", true, false},
      {"sub", true, false},
      {"missing", true, false},
      {"inside-link", false, true},
      {"outside-link", false, true},
      {"fifo", false, false},
      {"sub", false, false},
      {"json:{}", false, false},
      {"nbd://host/x", false, false},
  };
  for (const Case& c : cases) {
    WithWatchdog([&] {
      auto r = OpenReference(env, referrer, c.name, OpenMode::kReadOnly, c.untrusted);
      EXPECT_EQ(r.ok(), c.ok) << c.name << (c.untrusted ? " (untrusted)" : "") << ": "
                              << (r.ok() ? std::string("opened") : r.error().message());
      if (!r.ok()) {
        EXPECT_NE(r.error().message().find(c.name), std::string::npos)
            << "the error names the reference: " << r.error().message();
      }
    });
  }
}

}  // namespace
}  // namespace vimgfs
