// PowerLossEnv: wraps another Env and remembers, per file, what its last Sync made
// durable and which writes came after. Crash() then plays a power loss: each file goes
// back to its durable content plus a random subset of the later writes (kept in their
// order, each whole or not at all), and every handle opened before it fails from then on
// (EIO), so an abandoned Image can't flush. The "drop unsynced writes" file of docs/TESTING.md.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "vimgfs/env.h"

namespace vimgfs::test {

class PowerLossEnv : public Env {
 public:
  explicit PowerLossEnv(Env* base) : base_(base) {}

  // keep_probability: the chance that each write since a file's last sync survives.
  void Crash(std::mt19937_64& rng, double keep_probability);
  // Crashes when the n-th sync from now is asked for (before it makes anything durable),
  // so crashes also land between the ordered steps of one flush. That sync fails (EIO).
  void CrashAtSync(int n, uint64_t seed, double keep_probability);
  // Crashes at the n-th write or sync from now (writes: PWrite, Truncate, PunchHole,
  // Allocate), before it happens: a command stopped dead at that point. keep 1.0 is a
  // killed process (every earlier write reached the host); less is a power loss too.
  void CrashAtOp(int n, uint64_t seed, double keep_probability);
  // Writes and syncs seen so far (how many crash points a command has).
  int ops() const;
  bool crashed() const;

  Result<std::unique_ptr<File>> Open(const std::string& path, OpenMode mode) override;
  Result<std::unique_ptr<File>> Create(const std::string& path, bool exclusive) override;
  Status Remove(const std::string& path) override;
  Result<FileStat> Stat(const std::string& path) override { return base_->Stat(path); }

 private:
  struct Op {
    enum Kind { kWrite, kTruncate, kPunch, kAllocate } kind;
    uint64_t off = 0, len = 0;
    std::vector<std::byte> data;
  };
  struct FileLog {
    std::vector<std::byte> durable;
    std::vector<Op> since_sync;
  };
  class Handle;
  Status Record(const std::string& path, uint64_t generation, Op op);
  // Counts one write or sync; true when it is the one to crash at (then crashed).
  bool CrashHereLocked();
  Status SyncFile(const std::string& path, uint64_t generation, File& base_file);
  static void Apply(std::vector<std::byte>& content, const Op& op);
  void CrashLocked(std::mt19937_64& rng, double keep_probability);

  Env* base_;
  std::map<std::string, FileLog> logs_;
  mutable std::mutex mu_;
  uint64_t generation_ = 0;
  int crashes_ = 0;
  int syncs_until_crash_ = 0;  // 0: not armed
  int ops_until_crash_ = 0;    // 0: not armed
  int ops_ = 0;
  uint64_t crash_seed_ = 0;
  double crash_keep_ = 0;
};

}  // namespace vimgfs::test
