// vimgfs::Image: the engine. One open image (and its backing chain) as a block device.
// The mount and every command use this and nothing below it.
//
// Thread-safety: every public method may be called from many threads at once. Reads and
// in-place writes of different or the same clusters run in parallel; allocating writes,
// zeroing and discards take an exclusive lock on the clusters they touch only; calls into
// the format (table lookups and updates) serialize on one metadata mutex, with no data
// I/O done under it.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <span>
#include <string>
#include <vector>

#include "vimgfs/env.h"
#include "vimgfs/format.h"
#include "vimgfs/status.h"

namespace vimgfs {

// One run of `map`: what the guest range [offset, offset+length) is.
struct BlockStatus {
  uint64_t offset = 0;
  uint64_t length = 0;
  int depth = 0;         // 0: this image; n: the n-th backing image; chain length: none
  bool present = false;  // some image in the chain has it (data or zero)
  bool zero = false;     // reads as zeros
  bool data = false;     // backed by data (may still be zero bytes)
  bool has_offset = false;
  uint64_t host_offset = 0;  // valid with has_offset (plain data only)
  std::string filename;      // the host file holding it (has_offset)
  bool compressed = false;

  // Whether two adjacent runs can be merged, as qemu-img map does.
  bool Continues(const BlockStatus& prev) const;
};

class RangeLock;

class Image {
 public:
  // Opens path (probing its format unless options.format is set) and its backing chain.
  static Result<std::unique_ptr<Image>> Open(const std::string& path, const OpenOptions& options);
  // Opens, read-only with its chain, the image that a file name stored inside the image at
  // `referrer_path` names (a backing file or parent), by OpenReference's rules.
  static Result<std::unique_ptr<Image>> OpenReferenced(const std::string& referrer_path,
                                                       const std::string& name, const OpenOptions& options);
  // Creates a new image of `format` (options as qemu-img -o). A backing file named in
  // ctx.backing is checked to exist unless `unsafe` (qemu-img create -u).
  static Status Create(const std::string& format, CreateContext ctx, bool unsafe = false);
  // Detects the format of path from its content ("raw" when nothing matches).
  static Result<std::string> Probe(Env& env, const std::string& path);

  ~Image();
  Image(const Image&) = delete;
  Image& operator=(const Image&) = delete;

  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }
  const std::string& format() const { return format_; }
  // The ID of the secret the image was opened with (encrypted formats; empty: none), so
  // that a command opening it again (commit's base, for writing) can unlock it alike.
  const std::string& key_secret() const { return key_secret_; }
  // The format was guessed as raw (no format given): sector 0 is protected (see Write).
  bool probed_raw() const { return probed_raw_; }
  // What the image's format can do (its driver's declaration).
  const FormatTraits& traits() const { return driver_->traits(); }
  bool read_only() const { return read_only_; }
  // ClusterMap::ZeroInit of this image (its backing files aside).
  bool ZeroInit();
  Image* backing() const { return backing_.get(); }
  // The backing reference stored in the image, whether or not it was opened.
  const std::optional<BackingRef>& backing_ref() const { return backing_ref_; }
  // The path the backing reference resolved to ("" if none or not opened).
  const std::string& backing_path() const { return backing_path_; }

  Status Read(uint64_t off, std::span<std::byte> buf);
  Status Write(uint64_t off, std::span<const std::byte> buf);
  // Makes the range read as zeros; whole clusters are zero-flagged (and freed when
  // unmap) where the format can, the rest is written with zeros.
  Status WriteZeroes(uint64_t off, uint64_t len, bool unmap);
  // As WriteZeroes, but only when the format can mark the whole clusters of the range zero
  // without writing them (NBD's fast zero): otherwise kUnsupported (ENOTSUP) with nothing
  // changed. Partial clusters at the ends are written with zeros, as they are small.
  Status WriteZeroesFast(uint64_t off, uint64_t len, bool unmap);
  // Frees host space of whole clusters in the range; content of the range afterwards
  // is format-defined (zeros or backing data), like qemu's discard.
  Status Discard(uint64_t off, uint64_t len);
  // How Preallocate gives newly allocated host space its zeros.
  enum class Fill {
    kHole,      // punched: the host file stays sparse (qcow2 "metadata")
    kReserved,  // punched, then reserved unwritten with fallocate ("falloc")
    kZeros,     // written with zeros ("full")
  };
  // Gives every unallocated cluster of [off, off+len), and every zero cluster without a
  // host cluster, a home in the image that reads as zeros, without writing guest data
  // through the whole range; mapped clusters are left as they are, partial clusters at
  // the ends are written with zeros. kUnsupported from
  // a format that cannot allocate (the caller writes zeros instead).
  Status Preallocate(uint64_t off, uint64_t len, Fill fill);
  // Changes the virtual size (the format's Resize; size() follows). A grow over a backing
  // image longer than the old size makes the new space read as zeros, not as the backing
  // image's data, as qemu's truncate does; with `metadata_prealloc` those zeros get host
  // clusters of their own, as qemu's resize --preallocation=metadata lays them out (the
  // caller preallocates the rest with Preallocate). Not to be called while other I/O runs.
  Status Resize(uint64_t new_size, bool allow_shrink, bool metadata_prealloc = false);
  // All acknowledged writes durable, data and metadata.
  Status Flush();
  // Flush calls now waiting for one under way to finish (they share what follows it).
  int flushes_waiting();
  // Flushes, marks clean and closes the chain. Called by the destructor if not before.
  Status Close();

  // What [off, off+len) is, merged into runs, looking through the backing chain
  // (qemu-img map semantics). With this_image_only, depth is 0 or 1 (1 = not here).
  Result<std::vector<BlockStatus>> Map(uint64_t off, uint64_t len, bool this_image_only = false);
  // As `qemu-img map` reports it: like Map, but an image whose format qemu asks no block
  // status of (FormatTraits::block_status) is all data with no offset, at its depth.
  // Map stays exact for the tools that copy or seek (convert, the mount's SEEK_DATA).
  Result<std::vector<BlockStatus>> MapAsQemu(uint64_t off, uint64_t len);
  // The raw mappings of this image alone (no backing), for tools that copy allocated data.
  Status Lookup(uint64_t off, uint64_t len, std::vector<Mapping>* out);

  FormatInfo Info();
  // The allocation unit (qcow2 cluster, VMDK grain, VDI block; raw: 1 MiB nominal).
  uint64_t cluster_size() const { return cluster_size_; }
  Env& env() { return *env_; }
  // The image file itself.
  File& file() { return *file_; }
  // Host files other than the image file (data file, extents), for `info` and locking.
  std::vector<File*> host_files();

  // Changes of the image as a whole. Each runs with every cluster locked exclusive, so
  // reads and writes on other threads wait for it, and is counted for Flush like a write.
  // kUnsupported where the format has no such thing.
  //
  // Checks the image's metadata, repairing what `mode` allows (qemu-img check -r).
  Result<CheckReport> Check(RepairMode mode);
  // Internal snapshots (qemu-img snapshot -c/-a/-d). After Apply, size() is the
  // snapshot's size.
  Status SnapshotCreate(const std::string& name);
  Status SnapshotApply(const std::string& name);
  Status SnapshotDelete(const std::string& name);
  // Drops every cluster of this image, so the whole disk reads from the backing image.
  Status MakeEmpty();
  // Rewrites the backing reference stored in the image (rebase, commit). backing() still
  // shows the chain opened with the image until it is opened again.
  Status SetBacking(const std::optional<BackingRef>& ref);
  // qemu-img amend: the format's changes, with a resize to a `size` option (not 0) made
  // between its two stages as qemu's drivers order it (ClusterMap::Amend).
  Status Amend(const AmendRequest& req);
  // Persistent dirty bitmaps (docs/ARCHITECTURE.md, "Dirty bitmaps"): what the image
  // keeps, and qemu-img bitmap's operations on them by qemu's rules, one at a time, stored
  // at Close. Errors carry qemu's words alone (the CLI says which operation failed).
  bool BitmapsSupported();
  Result<std::vector<DirtyBitmap>> Bitmaps();
  struct BitmapChange {
    enum class Op { kAdd, kRemove, kClear, kEnable, kDisable, kMerge } op = Op::kAdd;
    std::string name;
    uint64_t granularity = 0;  // kAdd: bytes, a power of two >= 512; 0: qemu's default
    bool enabled = true;       // kAdd: records writes from the start
    std::string source_name;   // kMerge: the bitmap merged into `name`
    // kMerge: the bitmaps of the image holding it, read once by the caller (Bitmaps()),
    // and that image's disk size; null: this image's own.
    const std::vector<DirtyBitmap>* source = nullptr;
    uint64_t source_size = 0;
  };
  Status ChangeBitmap(const BitmapChange& change);

  // Stores the allocation unit at off (aligned to cluster_size()) as one stream already
  // compressed in the image's codec (convert -c).
  Status WriteCompressed(uint64_t off, std::span<const std::byte> stream);

 private:
  Result<std::vector<BlockStatus>> MapImpl(uint64_t off, uint64_t len, bool this_image_only, bool as_qemu);
  friend struct ImageOpener;
  friend struct ImageInternals;  // white-box tests reach the format's map through it
  Image() = default;
  Status CheckProbedRawHead(uint64_t off, std::span<const std::byte> buf);
  bool KnownZero(uint64_t off, uint64_t len);
  Status SettleLastCluster();
  Status WriteZeroChunks(uint64_t off, uint64_t len);
  Status ReadUnlocked(uint64_t off, std::span<std::byte> buf);
  Status ReadMapping(const Mapping& m, uint64_t off, std::span<std::byte> buf);
  Status WriteAllocating(uint64_t off, std::span<const std::byte> buf);
  // kReadOnly (for a call that writes) or kOutOfRange naming the call, else Ok.
  Status CheckRange(const char* what, uint64_t off, uint64_t len, bool writes) const;
  // The format's plan for a write at pos (under the metadata lock), checked to cover pos
  // and end by max_end; a bad plan is returned to the format and reported as corrupt.
  Result<WritePlan> PlanWrite(uint64_t pos, uint64_t len, uint64_t max_end);
  // Links a plan whose data write gave `data_written`, or gives it back if that failed.
  Status FinishPlan(const WritePlan& plan, const Status& data_written);
  // Makes a planned host range read as zeros, as `fill` says.
  Status FillHost(const WritePlan& plan, Fill fill);
  // Writes a copy-on-write fill into a fresh plan (WritePlan::fresh), leaving its zero
  // pieces unwritten.
  Status WriteSkippingZeros(const WritePlan& plan, std::span<const std::byte> data);
  // A write of a plan's host range, which may lie past the end of its file.
  Status WritePlanData(const WritePlan& plan, uint64_t at, std::span<const std::byte> data, IoTag tag);
  // Makes `file` at least `end` bytes long, never shorter (see grow_mu_).
  Status GrowFileTo(File& file, uint64_t end);
  enum class ZeroMode { kZero, kFastOnly, kDiscard };
  Status ZeroUnlocked(uint64_t off, uint64_t len, bool unmap, ZeroMode mode);
  // Runs `change` on the format's map with every cluster locked exclusive and the
  // metadata lock held, then refreshes the size and drops decompressed units.
  Status ChangeWhole(bool writes, const std::function<Status(ClusterMap&)>& change);
  ClusterMap& map() { return *map_; }

  Env* env_ = nullptr;
  std::string path_;
  std::string format_;
  const FormatDriver* driver_ = nullptr;
  std::string key_secret_;
  bool read_only_ = false;
  bool probed_raw_ = false;      // format guessed as raw: protect sector 0 (see Write)
  bool cached_lookups_ = false;  // FormatTraits::cached_lookups of the driver
  uint64_t size_ = 0;
  uint64_t cluster_size_ = 0;
  File* file_ = nullptr;  // owned by map_
  std::unique_ptr<ClusterMap> map_;
  std::unique_ptr<Image> backing_;
  std::optional<BackingRef> backing_ref_;
  std::string backing_path_;
  // Guards every call into map_: exclusive, except for ClusterMap::LookupCached (shared).
  std::shared_mutex meta_mu_;
  // Changes whenever a host range of this image may come to hold other data (writes
  // committed, zeroing, resize, close): decompressed units cached under an older
  // generation are stale. Per image, so one image's writes keep the others' caches.
  std::atomic<uint64_t> mapping_generation_{0};  // set on open (Image::Open)
  void MappingChanged();
  std::unique_ptr<RangeLock> range_lock_;  // cluster-range locks for writers
  // A file grows by a truncate only after its size was read; a write past that size on
  // another thread in between would be cut off. Plan data writes (the writes that reach
  // past the end outside meta_mu_) hold this shared; GrowFileTo holds it exclusive, and
  // meta_mu_ too for the format's own writes past the end (tables). Taken before meta_mu_.
  std::shared_mutex grow_mu_;
  bool closed_ = false;

  // Flushes are shared (group commit): one that starts covers every write finished
  // before it, so fsyncs arriving while it runs wait and share the next one.
  Status FlushNow();
  std::atomic<uint64_t> writes_done_{0};  // writes, zeroings, discards finished
  std::mutex flush_mu_;
  std::condition_variable flush_cv_;
  bool flushing_ = false;
  int flush_waiters_ = 0;
  uint64_t flushed_through_ = 0;  // writes_done_ a completed flush covered
  friend class WriteDone;
};

// True for the error Image::Open gives when a backing chain comes back to an image: it
// reads "Backing file 'X' creates an infinite loop." and takes no "Could not open" context.
bool IsBackingLoop(const Status& s);
// True for the error Image::Open gives when asked to open for writing an image whose
// format is only read (FormatTraits::read_only): "'X': Image is read-only", as qemu-img.
bool IsReadOnlyFormat(const Status& s);

// Parses qemu-img size strings as qemu does: "10G", "512", "1.5M", "64k", "1024.0",
// "0x200" (binary units, B k K M G T P E; a fraction needs a unit above B).
// kInvalidArgument for text that is not a size, kOutOfRange for one of 2^64 or more.
Result<uint64_t> ParseSize(std::string_view text);

}  // namespace vimgfs
