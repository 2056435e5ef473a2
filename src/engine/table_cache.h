// TableCache: the metadata cache every format uses for its on-disk tables (qcow2 L2
// tables and refcount blocks, VMDK grain tables). Fixed-size tables keyed by host offset,
// LRU eviction, a dirty bit per table, and write-back ordering in the manner of qemu's
// qcow2-cache: a cache may depend on another cache being flushed first, or on the host
// file being synced first, before any of its dirty tables are written.
//
// The ordering rules are stated where they arise:
//   on allocation: l2.SetDependency(&refcounts)   (refcount raised before L2 points at it)
//   on free:       refcounts.SetDependency(&l2)   (refcount lowered after L2 stops pointing)
//   after data:    l2.DependsOnFlush()            (data durable before L2 points at it)
//
// Not thread-safe: the engine calls formats with its metadata mutex held.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <list>
#include <memory>
#include <span>
#include <unordered_map>
#include <vector>

#include "vimgfs/env.h"
#include "vimgfs/status.h"

namespace vimgfs {

class TableCache;

// A pinned table. While any TableRef to a table lives it is not evicted.
class TableRef {
 public:
  TableRef() = default;
  TableRef(const TableRef&) = delete;
  TableRef& operator=(const TableRef&) = delete;
  TableRef(TableRef&& o) noexcept { *this = std::move(o); }
  TableRef& operator=(TableRef&& o) noexcept;
  ~TableRef() { Release(); }

  std::byte* data() const;
  std::span<std::byte> bytes() const;
  uint64_t offset() const;
  explicit operator bool() const { return entry_ != nullptr; }
  // Call after changing the table's bytes.
  void MarkDirty() const;
  void Release();

 private:
  friend class TableCache;
  struct Entry;
  TableRef(TableCache* cache, void* entry) : cache_(cache), entry_(entry) {}
  TableCache* cache_ = nullptr;
  void* entry_ = nullptr;
};

class TableCache {
 public:
  // Tables of table_size bytes in file; at most max_tables kept (minimum 4).
  TableCache(File* file, uint32_t table_size, size_t max_tables, IoTag tag);
  ~TableCache();

  // The table at host offset, read from the file on a miss.
  Result<TableRef> Get(uint64_t offset);
  // The table at host offset if it is cached, else an empty ref. Changes nothing but the
  // pin count and the referenced mark (both atomic), so callers that exclude only the
  // cache's mutators (a shared lock, docs/ARCHITECTURE.md "Threading and lock order") may call it
  // concurrently. A peeked table gets a second chance at eviction.
  TableRef Peek(uint64_t offset);
  // A new table at offset, zero-filled and dirty, without reading the file.
  Result<TableRef> GetEmpty(uint64_t offset);
  // Drops the table at offset (it was freed); its dirty content is discarded.
  void Forget(uint64_t offset);

  // `first` must be flushed (and the file synced) before this cache writes anything.
  [[nodiscard]] Status SetDependency(TableCache* first);
  // The host file must be synced before this cache writes anything.
  void DependsOnFlush() { depends_on_flush_ = true; }

  // Writes every dirty table, honouring dependencies. Does not sync the file itself.
  Status WriteBack();
  // WriteBack, then sync the file if this cache wrote anything since its last sync: its
  // tables are durable after. *synced (optional): whether it synced.
  Status Flush(bool* synced = nullptr);

  bool dirty() const;
  uint32_t table_size() const { return table_size_; }
  size_t max_tables() const { return max_tables_; }

  struct Entry {
    uint64_t offset = 0;
    std::unique_ptr<std::byte[]> data;
    bool dirty = false;
    std::atomic<int> pins{0};
    std::atomic<bool> referenced{false};  // peeked since eviction last passed it
    std::list<Entry*>::iterator lru_pos;
  };

 private:
  friend class TableRef;
  Status ResolveDependencies();
  Status EvictOne();
  Result<Entry*> Slot(uint64_t offset);
  void Unpin(Entry* e);

  File* file_;
  uint32_t table_size_;
  size_t max_tables_;
  IoTag tag_;
  std::unordered_map<uint64_t, std::unique_ptr<Entry>> entries_;
  std::list<Entry*> lru_;  // front = most recently used
  TableCache* dependency_ = nullptr;
  bool depends_on_flush_ = false;
  bool unsynced_ = false;  // tables written since this cache last synced the file
};

}  // namespace vimgfs
