#include "engine/table_cache.h"

#include <cstring>

namespace vimgfs {

// ---- TableRef ----

TableRef& TableRef::operator=(TableRef&& o) noexcept {
  if (this != &o) {
    Release();
    cache_ = o.cache_;
    entry_ = o.entry_;
    o.cache_ = nullptr;
    o.entry_ = nullptr;
  }
  return *this;
}

static TableCache::Entry* AsEntry(void* p) { return static_cast<TableCache::Entry*>(p); }

std::byte* TableRef::data() const { return AsEntry(entry_)->data.get(); }
std::span<std::byte> TableRef::bytes() const { return {AsEntry(entry_)->data.get(), cache_->table_size()}; }
uint64_t TableRef::offset() const { return AsEntry(entry_)->offset; }
void TableRef::MarkDirty() const { AsEntry(entry_)->dirty = true; }
void TableRef::Release() {
  if (entry_) cache_->Unpin(AsEntry(entry_));
  entry_ = nullptr;
  cache_ = nullptr;
}

// ---- TableCache ----

TableCache::TableCache(File* file, uint32_t table_size, size_t max_tables, IoTag tag)
    : file_(file), table_size_(table_size), max_tables_(max_tables < 4 ? 4 : max_tables), tag_(tag) {}

TableCache::~TableCache() = default;

Status TableCache::SetDependency(TableCache* first) {
  // A cycle would need both flushed first; qemu breaks it by flushing the other one now.
  // If that fails the caller's change must not go ahead: its order could not be kept.
  if (first->dependency_ == this) RETURN_IF_ERROR(first->Flush());
  dependency_ = first;
  return Status::Ok();
}

Status TableCache::ResolveDependencies() {
  if (dependency_) {
    TableCache* d = dependency_;
    dependency_ = nullptr;
    bool synced = false;
    Status s = d->Flush(&synced);
    if (!s.ok()) {
      dependency_ = d;
      return s;
    }
    if (synced) depends_on_flush_ = false;  // d's sync covered the data too
  }
  if (depends_on_flush_) {
    RETURN_IF_ERROR(file_->Sync(true));
    depends_on_flush_ = false;
    unsynced_ = false;
  }
  return Status::Ok();
}

Status TableCache::WriteBack() {
  bool any = false;
  for (auto& [off, e] : entries_) any |= e->dirty;
  if (!any) {
    return Status::Ok();
  }
  RETURN_IF_ERROR(ResolveDependencies());
  for (auto& [off, e] : entries_) {
    if (!e->dirty) continue;
    RETURN_IF_ERROR(file_->PWrite(off, {e->data.get(), table_size_}, tag_)
                        .WithContext("writing metadata table at {:#x}", off));
    e->dirty = false;
    unsynced_ = true;
  }
  return Status::Ok();
}

Status TableCache::Flush(bool* synced) {
  if (synced) *synced = false;
  RETURN_IF_ERROR(WriteBack());
  if (dependency_ || depends_on_flush_) RETURN_IF_ERROR(ResolveDependencies());
  if (!unsynced_) return Status::Ok();
  RETURN_IF_ERROR(file_->Sync(true));
  unsynced_ = false;
  if (synced) *synced = true;
  return Status::Ok();
}

bool TableCache::dirty() const {
  for (auto& [off, e] : entries_)
    if (e->dirty) return true;
  return false;
}

Status TableCache::EvictOne() {
  // Least recently used unpinned table, from the back. Peeks do not reorder the list (they
  // run concurrently), so a peeked table is passed over once: the second pass takes it.
  for (int pass = 0; pass < 2; pass++) {
    for (auto it = lru_.rbegin(); it != lru_.rend(); ++it) {
      Entry* e = *it;
      if (e->pins.load(std::memory_order_relaxed) > 0) continue;
      if (pass == 0 && e->referenced.exchange(false, std::memory_order_relaxed)) continue;
      if (e->dirty) {
        RETURN_IF_ERROR(ResolveDependencies());
        RETURN_IF_ERROR(file_->PWrite(e->offset, {e->data.get(), table_size_}, tag_)
                            .WithContext("writing metadata table at {:#x}", e->offset));
        e->dirty = false;
        unsynced_ = true;
      }
      lru_.erase(e->lru_pos);
      entries_.erase(e->offset);
      return Status::Ok();
    }
  }
  return Status::Ok();  // everything pinned: grow past the cap for now
}

Result<TableCache::Entry*> TableCache::Slot(uint64_t offset) {
  while (entries_.size() >= max_tables_) {
    size_t before = entries_.size();
    RETURN_IF_ERROR(EvictOne());
    if (entries_.size() == before) break;
  }
  auto e = std::make_unique<Entry>();
  e->offset = offset;
  e->data.reset(new std::byte[table_size_]);
  lru_.push_front(e.get());
  e->lru_pos = lru_.begin();
  Entry* raw = e.get();
  entries_.emplace(offset, std::move(e));
  return raw;
}

Result<TableRef> TableCache::Get(uint64_t offset) {
  auto it = entries_.find(offset);
  Entry* e;
  if (it != entries_.end()) {
    e = it->second.get();
    lru_.splice(lru_.begin(), lru_, e->lru_pos);
  } else {
    ASSIGN_OR_RETURN(e, Slot(offset));
    Status s = file_->PRead(offset, {e->data.get(), table_size_});
    if (!s.ok()) {
      lru_.erase(e->lru_pos);
      entries_.erase(offset);
      return s.WithContext("reading metadata table at {:#x}", offset);
    }
  }
  e->pins++;
  return TableRef(this, e);
}

TableRef TableCache::Peek(uint64_t offset) {
  auto it = entries_.find(offset);
  if (it == entries_.end()) return TableRef();
  Entry* e = it->second.get();
  e->pins.fetch_add(1, std::memory_order_relaxed);
  e->referenced.store(true, std::memory_order_relaxed);
  return TableRef(this, e);
}

Result<TableRef> TableCache::GetEmpty(uint64_t offset) {
  auto it = entries_.find(offset);
  Entry* e;
  if (it != entries_.end()) {
    e = it->second.get();
    lru_.splice(lru_.begin(), lru_, e->lru_pos);
  } else {
    ASSIGN_OR_RETURN(e, Slot(offset));
  }
  std::memset(e->data.get(), 0, table_size_);
  e->dirty = true;
  e->pins++;
  return TableRef(this, e);
}

void TableCache::Forget(uint64_t offset) {
  auto it = entries_.find(offset);
  if (it == entries_.end() || it->second->pins.load(std::memory_order_relaxed) > 0) return;
  lru_.erase(it->second->lru_pos);
  entries_.erase(it);
}

void TableCache::Unpin(Entry* e) { e->pins.fetch_sub(1, std::memory_order_relaxed); }

}  // namespace vimgfs
