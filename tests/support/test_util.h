// Helpers shared by the tests: temp dirs, running commands (qemu-img is the oracle),
// hashing files, seeded random data.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace vimgfs::test {

struct CommandResult {
  int exit_code = -1;
  std::string out;  // stdout
  std::string err;  // stderr
};

// Runs `sh -c command`, capturing stdout and stderr.
CommandResult RunCommand(const std::string& command);
// Shell-quotes one argument.
std::string Quote(const std::string& s);
// Whether a program is on PATH.
bool HaveProgram(const std::string& name);
// Path of the built vimgfs binary (from the VIMGFS_BINARY compile definition / env var).
std::string VimgfsBinary();
// Path of ../shared/corpus (env VIMGFS_CORPUS overrides); "" if absent.
std::string CorpusDir();
// The rows of the corpus's MANIFEST.tsv (path, source, creator, format, qemu_driver,
// virtual_size, raw_sha256, ...), each with at least those 7 columns.
std::vector<std::vector<std::string>> CorpusManifest(const std::string& corpus);
// tests/fuzz/regressions: inputs that once crashed a fuzz target.
std::string FuzzRegressionDir();
// qemu's source tree fetched by scripts/iotests.sh --fetch (env VIMGFS_QEMU_SOURCE, else the
// newest folder under /var/tmp/vimgfs-iotests); "" if absent.
std::string QemuSourceDir();
// qemu-iotests' sample image `name` (e.g. "parallels-v1"; stored there as name.bz2),
// decompressed into `dir`: its path, or "" when qemu's source has not been fetched.
std::string QemuSampleImage(const std::string& name, const std::string& dir);

// A fresh directory removed (recursively) on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

std::string Sha256OfFile(const std::string& path);
std::vector<uint8_t> ReadWholeFile(const std::string& path);
void WriteWholeFile(const std::string& path, const std::vector<uint8_t>& data);
// Deterministic pseudo-random bytes.
std::vector<uint8_t> RandomBytes(size_t n, uint64_t seed);
// Bytes of the file the host's page cache holds now (mincore), in whole pages.
uint64_t CachedBytes(const std::string& path);
// Why files in folder `dir` cannot be opened O_DIRECT ("" when they can).
std::string DirectIoUnavailableReason(const std::string& dir);
// Why a test that files stay out of the host's page cache cannot run in folder `dir` (""
// when it can): no O_DIRECT there, or a file system whose files live in the page cache.
std::string PageCacheBypassUnavailableReason(const std::string& dir);
// Writes the file's dirty pages back and asks the kernel to drop its cached ones.
void DropCachedPages(const std::string& path);

// Skips the current test when qemu-img is missing (CI always has it).
#define REQUIRE_QEMU_IMG()                                                   \
  do {                                                                       \
    if (!::vimgfs::test::HaveProgram("qemu-img"))                            \
      GTEST_SKIP() << "qemu-img not installed (apt-get install qemu-utils)"; \
  } while (0)

// Sets `path` to qemu's sample image `name` decompressed into `dir`, or skips the test
// saying how to fetch it (CI fetches it before the tests: scripts/test.sh).
#define REQUIRE_QEMU_SAMPLE(path, name, dir)                                                      \
  do {                                                                                            \
    path = ::vimgfs::test::QemuSampleImage(name, dir);                                            \
    if (path.empty())                                                                             \
      GTEST_SKIP() << "qemu's sample image " << (name)                                            \
                   << " is not here: run scripts/iotests.sh --fetch (or set VIMGFS_QEMU_SOURCE)"; \
  } while (0)

}  // namespace vimgfs::test
