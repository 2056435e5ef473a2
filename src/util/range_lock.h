// RangeLock: shared/exclusive locks on byte ranges of the guest disk. The engine locks
// whole clusters, so two writers allocating the same cluster serialize while requests to
// other clusters proceed.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <list>
#include <mutex>

namespace vimgfs {

class RangeLock {
 public:
  struct Held {
    uint64_t start, end;
    bool exclusive;
  };

  class Guard {
   public:
    Guard(RangeLock& lock, uint64_t start, uint64_t end, bool exclusive) : lock_(lock) {
      it_ = lock_.Acquire(start, end, exclusive);
    }
    ~Guard() { lock_.Release(it_); }
    Guard(const Guard&) = delete;
    Guard& operator=(const Guard&) = delete;

   private:
    RangeLock& lock_;
    std::list<Held>::iterator it_;
  };

  std::list<Held>::iterator Acquire(uint64_t start, uint64_t end, bool exclusive) {
    std::unique_lock lk(mu_);
    cv_.wait(lk, [&] {
      for (const Held& h : held_) {
        if (h.start < end && start < h.end && (exclusive || h.exclusive)) return false;
      }
      return true;
    });
    held_.push_front({start, end, exclusive});
    return held_.begin();
  }

  void Release(std::list<Held>::iterator it) {
    {
      std::lock_guard lk(mu_);
      held_.erase(it);
    }
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::list<Held> held_;
};

}  // namespace vimgfs
