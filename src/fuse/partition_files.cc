// Partition files over the guest's partition table (see partition_files.h).
#include "fuse/partition_files.h"

#include <algorithm>

namespace vimgfs::mount {

PartitionFiles::PartitionFiles(Image* image, bool enabled, std::function<void(const std::string&)> log)
    : image_(image), enabled_(enabled), disk_size_(image->size()), log_(std::move(log)) {
  // Before the first reading, writes to the disk's edges (a new table) count.
  auto initial = std::make_shared<Layout>();
  initial->table.metadata = guest::EdgeRanges(disk_size_);
  layout_.store(std::move(initial));
  if (!enabled_) stale_ = false;
}

std::vector<PartitionFile> PartitionFiles::List() {
  if (stale_.load(std::memory_order_acquire)) Refresh();
  return Current()->files;
}

std::optional<FileView> PartitionFiles::Find(fuse_ino_t ino) const {
  if (ino < kFirstIno) return std::nullopt;
  for (const PartitionFile& f : Current()->files)
    if (f.view.ino == ino) return f.view;
  std::lock_guard lock(mu_);
  auto it = retired_.find(ino);
  if (it == retired_.end()) return std::nullopt;
  return it->second;
}

void PartitionFiles::Refresh() {
  std::lock_guard lock(mu_);
  // Cleared before reading: a write racing with this read marks the list stale again.
  if (!stale_.exchange(false, std::memory_order_acq_rel)) return;
  auto read = [&](uint64_t off, std::span<std::byte> out) { return image_->Read(off, out); };
  auto table = guest::ReadPartitionTable(read, disk_size_);
  if (!table.ok()) {
    log_(fmt::format("reading the partition table: {}", table.error().message()));
    stale_ = true;  // try again at the next listing
    return;
  }
  if (table->notes != last_notes_) {
    for (const std::string& note : table->notes) log_("partition table: " + note);
    last_notes_ = table->notes;
  }
  std::shared_ptr<const Layout> old = Current();
  auto fresh = std::make_shared<Layout>();
  for (const guest::Partition& p : table->partitions) {
    PartitionFile f{fmt::format("p{}", p.number), {0, p.offset, p.length}};
    auto same = std::find_if(old->files.begin(), old->files.end(), [&](const PartitionFile& o) {
      return o.name == f.name && o.view.offset == f.view.offset && o.view.length == f.view.length;
    });
    f.view.ino = same != old->files.end() ? same->view.ino : next_ino_++;
    fresh->files.push_back(std::move(f));
  }
  for (const PartitionFile& o : old->files) {
    bool kept = std::any_of(fresh->files.begin(), fresh->files.end(),
                            [&](const PartitionFile& f) { return f.view.ino == o.view.ino; });
    if (kept) continue;
    retired_[o.view.ino] = o.view;
    retired_order_.push_back(o.view.ino);
    if (retired_order_.size() > kMaxRetired) {
      retired_.erase(retired_order_.front());
      retired_order_.pop_front();
    }
  }
  fresh->table = std::move(*table);
  layout_.store(std::move(fresh), std::memory_order_release);
}

}  // namespace vimgfs::mount
