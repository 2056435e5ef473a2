// Host file access. Nothing under src/engine or src/formats calls POSIX directly: they go
// through File and Env so tests can swap in an in-memory or fault-injecting Env.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "vimgfs/status.h"

namespace vimgfs {

// Names what a write is for, so a fault-injection rule can aim at one exact step
// (the idea of qemu's blkdebug events).
enum class IoTag {
  kData,
  kCowData,
  kHeader,
  kL1,
  kL2,
  kRefTable,
  kRefBlock,
  kBlockMap,
  kGrainTable,
  kGrainDir,
  kOther,
};

enum class OpenMode { kReadOnly, kReadWrite };

// One run of a sparse host file as SEEK_DATA/SEEK_HOLE report it.
struct HostExtent {
  bool data = true;     // false: a hole (reads as zeros)
  uint64_t length = 0;  // bytes from the queried offset; 0 at or past EOF
  // An NBD server's block status read through another metadata context (qemu's
  // x-dirty-bitmap), as base:allocation flags: bit 0 "hole", bit 1 "zero". They say nothing
  // about the bytes (which read as data); only `map` shows them, as qemu-img map does.
  std::optional<uint32_t> context_flags = std::nullopt;
};

// A host file. Thread-safe: PRead/PWrite at distinct offsets may run concurrently.
class File {
 public:
  virtual ~File() = default;

  // Reads buf.size() bytes at off. Bytes past the end of the file read as zeros.
  virtual Status PRead(uint64_t off, std::span<std::byte> buf) = 0;
  // Writes all of buf at off, growing the file if needed.
  virtual Status PWrite(uint64_t off, std::span<const std::byte> buf, IoTag tag = IoTag::kData) = 0;
  // PRead and PWrite of the bytes of guest offset `guest_off`: the same, except for an
  // encrypted file whose IVs count guest sectors (crypto::CryptFile for qcow's AES), which
  // needs to know. The engine calls these for guest data.
  virtual Status PReadFor(uint64_t off, std::span<std::byte> buf, uint64_t guest_off) {
    return PRead(off, buf);
  }
  virtual Status PWriteFor(uint64_t off, std::span<const std::byte> buf, uint64_t guest_off, IoTag tag) {
    return PWrite(off, buf, tag);
  }
  // Makes every completed write durable (fdatasync when data_only, else fsync).
  virtual Status Sync(bool data_only = true) = 0;
  virtual Result<uint64_t> Size() = 0;
  virtual Status Truncate(uint64_t size) = 0;
  // Deallocates [off, off+len) keeping the size; reads return zeros. kUnsupported if the
  // host can't.
  virtual Status PunchHole(uint64_t off, uint64_t len) = 0;
  // Reserves disk blocks for [off, off+len) (fallocate mode 0), growing the file.
  virtual Status Allocate(uint64_t off, uint64_t len) = 0;
  // Whether off is in data or a hole, and how far that run goes (SEEK_DATA/SEEK_HOLE).
  virtual Result<HostExtent> ProbeExtent(uint64_t off) = 0;
  // Bytes the file occupies on the host (st_blocks * 512).
  virtual Result<uint64_t> AllocatedSize() = 0;

  virtual const std::string& path() const = 0;
  virtual bool writable() const = 0;
  // The OS descriptor, or -1 (in-memory files). Used for qemu-compatible locks.
  virtual int fd() const { return -1; }
};

struct FileStat {
  bool exists = false;
  bool regular = false;
  bool directory = false;
  uint64_t size = 0;
};

class Env {
 public:
  virtual ~Env() = default;
  // The process-wide POSIX Env. Never deleted.
  static Env* Default();
  // Default() through NewDirectIoEnv (O_DIRECT where the request allows). Never deleted.
  static Env* DefaultDirect();

  virtual Result<std::unique_ptr<File>> Open(const std::string& path, OpenMode mode) = 0;
  // Creates (or truncates, unless exclusive) a regular file for reading and writing.
  virtual Result<std::unique_ptr<File>> Create(const std::string& path, bool exclusive = false) = 0;
  virtual Status Remove(const std::string& path) = 0;
  // Follows symlinks, like stat(2). A missing file is not an error: exists = false.
  virtual Result<FileStat> Stat(const std::string& path) = 0;

  // Opens a file that an image names (backing file, data file, extent): `name` is resolved
  // against the folder `dir` and opened in one step, and the descriptor itself is checked,
  // so nobody can swap the file between the check and the open. Only a regular file is
  // opened: a FIFO, device or directory is refused without blocking and without side
  // effects (Status err() EPERM). With `beneath`, resolution never leaves `dir`: a "..", a
  // symlink or an absolute name outside `dir` is refused (err() EXDEV). A missing file is
  // kNotFound. The default implementation checks, then opens: right for Envs whose files
  // nobody else can change (in memory); PosixEnv overrides it.
  virtual Result<std::unique_ptr<File>> OpenReference(const std::string& dir, const std::string& name,
                                                      OpenMode mode, bool beneath);
};

// qemu's file-protocol hints on a new, empty file: NOCOW (btrfs; a refusal is ignored,
// as qemu ignores it) and, unless 0, an extent size hint (XFS). Fails when the hint cannot
// be set. A file with no descriptor (in memory) takes neither and succeeds.
Status SetFileCreateHints(File& file, bool nocow, uint32_t extent_size_hint);

// `name` joined to folder `dir` ("." for none) as a path, lexically: an absolute name stays.
std::string JoinPath(const std::string& dir, const std::string& name);

// An Env whose host files are read and written around the host's page cache where the
// request allows (O_DIRECT: qemu's cache.direct=on, "-t none"): aligned requests go direct,
// the rest (headers, table entries, unaligned tails) through the page cache. Opening fails
// on a file system without O_DIRECT. Files without a descriptor (NBD exports) are as `base`
// gives them. `base` must outlive it.
std::unique_ptr<Env> NewDirectIoEnv(Env* base);

// Creates an in-memory Env (tests, fuzzing). Files persist for the Env's lifetime.
std::unique_ptr<Env> NewMemEnv();

}  // namespace vimgfs
