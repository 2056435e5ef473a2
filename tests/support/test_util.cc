#include "support/test_util.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace vimgfs::test {

namespace {
std::string Slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}
}  // namespace

CommandResult RunCommand(const std::string& command) {
  char out_tmpl[] = "/tmp/vimgfs-out-XXXXXX";
  char err_tmpl[] = "/tmp/vimgfs-err-XXXXXX";
  int ofd = mkstemp(out_tmpl);
  int efd = mkstemp(err_tmpl);
  close(ofd);
  close(efd);
  std::string full = "(" + command + ") >" + out_tmpl + " 2>" + err_tmpl + " </dev/null";
  int status = std::system(full.c_str());
  CommandResult r;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = Slurp(out_tmpl);
  r.err = Slurp(err_tmpl);
  unlink(out_tmpl);
  unlink(err_tmpl);
  return r;
}

std::string Quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) {
    if (c == '\'')
      q += "'\\''";
    else
      q += c;
  }
  return q + "'";
}

bool HaveProgram(const std::string& name) { return RunCommand("command -v " + Quote(name)).exit_code == 0; }

std::string VimgfsBinary() {
  if (const char* e = std::getenv("VIMGFS_BINARY")) return e;
  return VIMGFS_BINARY;
}

std::string CorpusDir() {
  std::string dir = std::getenv("VIMGFS_CORPUS") ? std::getenv("VIMGFS_CORPUS") : VIMGFS_CORPUS;
  return std::filesystem::exists(dir + "/MANIFEST.tsv") ? dir : "";
}

std::string QemuSourceDir() {
  namespace fs = std::filesystem;
  const char* env = std::getenv("VIMGFS_QEMU_SOURCE");
  if (env && *env) return fs::exists(std::string(env) + "/tests/qemu-iotests") ? env : "";
  std::error_code ec;
  std::string best;
  for (const auto& e : fs::directory_iterator("/var/tmp/vimgfs-iotests", ec)) {
    std::string p = e.path().string();
    if (fs::exists(p + "/tests/qemu-iotests/sample_images") && p > best) best = p;
  }
  return best;
}

std::string QemuSampleImage(const std::string& name, const std::string& dir) {
  std::string src = QemuSourceDir();
  if (src.empty()) return "";
  std::string packed = src + "/tests/qemu-iotests/sample_images/" + name + ".bz2";
  if (!std::filesystem::exists(packed)) return "";
  std::string out = dir + "/" + name;
  if (RunCommand("bzip2 -dc " + Quote(packed) + " > " + Quote(out)).exit_code != 0) return "";
  return out;
}

std::vector<std::vector<std::string>> CorpusManifest(const std::string& corpus) {
  std::vector<std::vector<std::string>> rows;
  std::ifstream in(corpus + "/MANIFEST.tsv");
  std::string line;
  std::getline(in, line);  // header
  while (std::getline(in, line)) {
    std::vector<std::string> cols;
    std::stringstream ss(line);
    std::string col;
    while (std::getline(ss, col, '\t')) cols.push_back(col);
    if (cols.size() >= 7) rows.push_back(cols);
  }
  return rows;
}

std::string FuzzRegressionDir() { return VIMGFS_FUZZ_REGRESSIONS; }

TempDir::TempDir() {
  const char* base = std::getenv("VIMGFS_TEST_TMPDIR");
  std::string tmpl = std::string(base ? base : "/tmp") + "/vimgfs-test-XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (!mkdtemp(buf.data())) throw std::runtime_error("mkdtemp failed");
  path_ = buf.data();
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::string Sha256OfFile(const std::string& path) {
  CommandResult r = RunCommand("sha256sum " + Quote(path));
  return r.out.substr(0, 64);
}

std::vector<uint8_t> ReadWholeFile(const std::string& path) {
  std::string s = Slurp(path);
  return std::vector<uint8_t>(s.begin(), s.end());
}

void WriteWholeFile(const std::string& path, const std::vector<uint8_t>& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
}

uint64_t CachedBytes(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error("cannot open " + path);
  struct stat st;
  fstat(fd, &st);
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  uint64_t cached = 0;
  if (st.st_size > 0) {
    void* map = mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) {
      close(fd);
      throw std::runtime_error("cannot map " + path);
    }
    std::vector<unsigned char> vec((static_cast<size_t>(st.st_size) + page - 1) / page);
    if (mincore(map, static_cast<size_t>(st.st_size), vec.data()) == 0)
      for (unsigned char v : vec) cached += (v & 1) ? page : 0;
    munmap(map, static_cast<size_t>(st.st_size));
  }
  close(fd);
  return cached;
}

std::string PageCacheBypassUnavailableReason(const std::string& dir) {
  struct statfs fs {};
  if (statfs(dir.c_str(), &fs) == 0 && (fs.f_type == TMPFS_MAGIC || fs.f_type == RAMFS_MAGIC))
    return dir + " is on tmpfs/ramfs, whose files are the page cache";
  return DirectIoUnavailableReason(dir);
}

std::string DirectIoUnavailableReason(const std::string& dir) {
  const std::string probe = dir + "/direct-io-probe";
  int fd = open(probe.c_str(), O_RDWR | O_CREAT | O_DIRECT | O_CLOEXEC, 0644);
  if (fd < 0) return dir + " has no O_DIRECT (" + std::strerror(errno) + ")";
  void* buf = nullptr;
  bool ok = posix_memalign(&buf, 4096, 4096) == 0;
  if (ok) {
    std::memset(buf, 0, 4096);
    ok = pwrite(fd, buf, 4096, 0) == 4096;
  }
  free(buf);
  close(fd);
  unlink(probe.c_str());
  return ok ? "" : dir + " refused an O_DIRECT write";
}

void DropCachedPages(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error("cannot open " + path);
  fdatasync(fd);
  posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  close(fd);
}

std::vector<uint8_t> RandomBytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> v(n);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t x = rng();
    std::memcpy(v.data() + i, &x, 8);
  }
  for (; i < n; i++) v[i] = static_cast<uint8_t>(rng());
  return v;
}

}  // namespace vimgfs::test
