// The plug-in contract between the engine and the image formats.
//
// A format answers "where does guest byte N live" (Lookup) and "make guest bytes N..M
// live somewhere new" (PrepareWrite / CommitWrite); the engine (vimgfs::Image) moves every
// byte: it splits requests, reads data, decompresses, falls back to the backing image,
// fills copy-on-write heads and tails, and writes data before it commits a mapping.
//
// Threading: the engine calls every ClusterMap method with its metadata mutex held, so a
// format needs no locking of its own. Data I/O is done by the engine with no lock held.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <variant>
#include <vector>

#include "vimgfs/dirty_bits.h"
#include "vimgfs/env.h"
#include "vimgfs/status.h"

namespace vimgfs {

enum class Codec {
  kNone,
  kDeflateRaw,  // raw deflate, no header (qcow2 zlib clusters)
  kZlib,        // zlib stream with header (VMDK streamOptimized grains)
  kZstd,        // zstd frame(s) (qcow2 compression_type=zstd)
  kBzip2,       // one bzip2 stream (dmg UDBZ chunks)
};

// Where a run of guest bytes lives.
struct Mapping {
  enum class Kind {
    kUnallocated,  // not in this image: read the backing image, or zeros without one
    kZero,         // reads as zeros; the backing image is not consulted
    kData,         // plain data at file+host_offset
    kCompressed,   // one compressed unit; decompress, then take the slice
  };
  Kind kind = Kind::kUnallocated;
  uint64_t length = 0;       // guest bytes covered, starting at the looked-up offset
  File* file = nullptr;      // kData, kCompressed: the host file (owned by the format)
  uint64_t host_offset = 0;  // kData: host offset of the first guest byte of this run
                             // kCompressed: host offset of the compressed stream
  // kCompressed only:
  uint64_t compressed_length = 0;  // bytes to read from host_offset (an upper bound is fine)
  uint64_t unit_guest_offset = 0;  // guest offset where the compressed unit begins
  uint32_t unit_size = 0;          // decompressed size of the unit
  Codec codec = Codec::kNone;
  // The stream must end exactly at unit_size bytes (cloop: qemu inflates with Z_FINISH and
  // wants Z_STREAM_END); otherwise a stream that goes on past the unit is read up to it
  // (qcow2, VMDK grains, as qemu reads them).
  bool stream_ends_unit = false;
  // kData: the bytes may be overwritten in place (qcow2: refcount 1, i.e. not shared with
  // a snapshot). When false, a write needs PrepareWrite even though data is present.
  bool writable = false;
  // kData: `map` reports the run as data as it is, without asking the host file for holes
  // (qemu's drivers that do not recurse into their file, like vpc's dynamic disks).
  bool opaque_data = false;
  // kData, kZero with a file: the host bytes are encrypted (file decrypts them), so qemu's
  // block status gives no host offset and `map` shows none.
  bool encrypted = false;

  bool operator==(const Mapping&) const = default;
};

// Host space a format reserved for a write. The engine writes the whole range
// [guest_offset, guest_offset+length) to file at host_offset — the caller's bytes where
// the request covers it, the current content (copy-on-write) elsewhere — then commits.
struct WritePlan {
  uint64_t guest_offset = 0;
  uint64_t length = 0;
  File* file = nullptr;
  uint64_t host_offset = 0;
  // The host range was never written (it lies past the file's old end) and reads as
  // zeros: the engine need not write the zero parts of a copy-on-write fill, which keeps
  // the file as sparse as qemu keeps it.
  bool fresh = false;
  uint64_t cookie[4] = {0, 0, 0, 0};  // format-private
};

struct SnapshotInfo {
  std::string id;
  std::string name;
  uint64_t vm_state_size = 0;
  uint64_t date_sec = 0;
  uint32_t date_nsec = 0;
  uint64_t vm_clock_nsec = 0;
  uint64_t icount = UINT64_MAX;  // UINT64_MAX: absent
  uint64_t disk_size = 0;
};

// What the engine needs to open a backing image.
struct BackingRef {
  std::string name;    // as stored in the image
  std::string format;  // backing-format hint, may be empty
};

// qemu-img info's "format-specific" facts, typed per format; the CLI renders them as
// JSON or text (the formats never build JSON).
struct Qcow2Bitmap {
  std::string name;
  uint64_t granularity = 0;
  bool in_use = false;
  bool auto_enabled = false;  // the "auto" flag: tracks writes while the image is open
};
// A persistent dirty bitmap (qcow2's) with its bits, as qemu-img bitmap and convert
// --bitmaps handle it: bit k set means granule k of the disk, bytes
// [k << granularity_bits, (k + 1) << granularity_bits), changed since the bit was last
// cleared. The bits cover the whole disk, no more.
struct DirtyBitmap {
  std::string name;
  uint32_t granularity_bits = 16;
  bool enabled = true;     // records guest writes (qcow2's "auto" flag)
  bool consistent = true;  // false: in use when last closed (a crash); no bits, only removable
  DirtyBits bits;
};
struct LuksSlotDetails {
  bool active = false;
  uint32_t iterations = 0;  // shown for active slots only
  uint64_t key_offset = 0;  // bytes
  uint32_t stripes = 0;
};
// A LUKS header: the luks format's, or the one inside an encrypted qcow2 image.
struct LuksDetails {
  std::string ivgen_alg;
  std::string ivgen_hash_alg;  // essiv only
  std::string hash_alg;
  std::string cipher_alg;
  std::string uuid;
  std::string cipher_mode;
  std::vector<LuksSlotDetails> slots;
  uint64_t payload_offset = 0;  // bytes
  uint32_t master_key_iterations = 0;
};
struct Qcow2Details {
  bool v3 = true;  // compat 1.1; false: 0.10
  bool zstd = false;
  bool lazy_refcounts = false;  // v3 only
  std::vector<Qcow2Bitmap> bitmaps;
  uint32_t refcount_bits = 16;
  bool has_data_file = false;            // an external data file is in use
  std::optional<std::string> data_file;  // its name, when the image stores one
  bool data_file_raw = false;
  bool corrupt = false;  // v3 only
  bool extended_l2 = false;
  std::string encrypt_format;          // "aes", "luks"; empty: not encrypted
  std::optional<LuksDetails> encrypt;  // encrypt.format=luks
};
struct VmdkExtentDetails {
  std::string filename;
  std::string format;  // the descriptor's extent type: SPARSE, FLAT, ZERO, VMFS, ...
  uint64_t virtual_size = 0;
  uint64_t cluster_size = 0;  // 0: not sparse
  bool compressed = false;
};
struct VmdkDetails {
  uint32_t cid = 0;
  uint32_t parent_cid = 0;
  std::string create_type;
  std::vector<VmdkExtentDetails> extents;
};
using FormatDetails = std::variant<std::monostate, Qcow2Details, VmdkDetails, LuksDetails>;

// Format-level facts for `info`.
struct FormatInfo {
  std::string format;  // "qcow2", "vmdk", "vdi", "raw"
  uint64_t virtual_size = 0;
  uint64_t cluster_size = 0;  // 0: none (raw)
  bool dirty = false;
  bool encrypted = false;
  std::vector<SnapshotInfo> snapshots;
  // The codec of the compressed clusters this image stores (convert -c); kNone: none.
  Codec compression = Codec::kNone;
  // Zero clusters read as zeros over any backing file (qcow2 v3; v2 can only deallocate).
  bool zero_clusters = false;
  FormatDetails format_specific;  // monostate: the format has none (as in qemu)
};

struct CheckReport {
  int64_t corruptions = 0;
  int64_t leaks = 0;
  int64_t check_errors = 0;
  int64_t corruptions_fixed = 0;
  int64_t leaks_fixed = 0;
  uint64_t image_end_offset = 0;  // 0: not reported
  uint64_t total_clusters = 0;    // 0: not reported
  uint64_t allocated_clusters = 0;
  uint64_t fragmented_clusters = 0;
  uint64_t compressed_clusters = 0;
  std::vector<std::string> messages;  // "ERROR cluster 5 refcount=0 reference=1" lines
  // Set when the check could not go on (qemu-img: "Check failed: <failure>", exit 1);
  // error_reports are then the program's own error lines, printed before the messages.
  std::string failure;
  std::vector<std::string> error_reports;
};

enum class RepairMode { kNone, kLeaks, kAll };

// One open image's mapping. Created by FormatDriver::Open, driven by vimgfs::Image.
// The bytes of the secret named `id` (qemu's --object secret), or qemu's "No secret with
// id 'X'".
using SecretLookup = std::function<Result<std::string>(const std::string& id)>;

// What `amend` asks of a format (qemu-img amend -o): the options given, each one of the
// driver's FormatTraits::amend_options, typed as create's (sizes and numbers as decimals,
// bools as on/off).
struct AmendRequest {
  std::map<std::string, std::string> options;
  bool force = false;  // --force: what qemu only does when forced (erasing the last keyslot)
  SecretLookup secrets;
  // Called with the fraction of the work done (0..1) as steps finish (qemu-img amend -p).
  std::function<void(double)> progress;
};

class ClusterMap {
 public:
  virtual ~ClusterMap() = default;

  virtual uint64_t virtual_size() const = 0;
  // The allocation unit (qcow2 cluster, VMDK grain, VDI block); raw: 1 MiB nominal.
  virtual uint64_t cluster_size() const = 0;
  virtual bool read_only() const = 0;
  // The smallest part of an allocation unit that is allocated or zeroed on its own (qcow2
  // extended L2: a subcluster); cluster_size() where units are not divided.
  virtual uint64_t subcluster_size() const { return cluster_size(); }

  // Appends mappings covering exactly [guest_off, guest_off+len) in order. Never
  // allocates; may load tables into the cache. REQUIRES: range inside virtual_size().
  virtual Status Lookup(uint64_t guest_off, uint64_t len, std::vector<Mapping>* out) = 0;
  // Lookup from cached metadata alone: true with the mappings appended when every table
  // it needs is cached and valid; false (out unchanged or to be cut back by the caller)
  // otherwise, and the engine calls Lookup. The engine calls it under a shared lock,
  // concurrently with other LookupCached calls but never with any other call: it must
  // change nothing but atomics (TableCache::Peek). Called only for formats whose traits
  // say cached_lookups.
  virtual bool LookupCached(uint64_t guest_off, uint64_t len, std::vector<Mapping>* out) { return false; }

  // Reserves host space for a write starting at guest_off (refcounts or bitmaps updated
  // in the cache, nothing linked yet). The plan starts at or before guest_off and covers
  // at least the first allocation unit; it may cover less than len (the engine loops).
  virtual Result<WritePlan> PrepareWrite(uint64_t guest_off, uint64_t len) {
    return Status::Unsupported("writing this format is not supported");
  }
  // Links the plan's host space into the tables. Called after the data write succeeded.
  virtual Status CommitWrite(const WritePlan& plan) { return Status::Unsupported("write"); }
  // Returns reserved space after a failed data write (a leak is acceptable).
  virtual void AbortWrite(const WritePlan& plan) {}
  // The guest bytes [off, off+len) are being changed (written, zeroed, discarded): formats
  // that keep dirty bitmaps record it (qcow2). Called by the engine for every change, from
  // any thread and without its locks: it must be thread-safe and must not block.
  virtual void NoteGuestWrite(uint64_t off, uint64_t len) {}

  // Makes [guest_off, guest_off+len) read as zeros without writing data, freeing the host
  // space when unmap. REQUIRES: aligned to cluster_size() (the end may be virtual_size()).
  // kUnsupported: the engine writes zeros instead.
  virtual Status ZeroRange(uint64_t guest_off, uint64_t len, bool unmap) {
    return Status::Unsupported("zero clusters");
  }
  // Frees the host space of [guest_off, guest_off+len); the range then reads as zeros or
  // from the backing image, as the format does it. Same alignment rule as ZeroRange.
  virtual Status Discard(uint64_t guest_off, uint64_t len) { return Status::Ok(); }

  // A flush in two parts. WriteBack writes dirty metadata to the host files in dependency
  // order, syncing between writes only where the order needs it; SyncFiles then syncs
  // every host file, after which the data and metadata written before the flush began are
  // durable. The engine runs WriteBack under its metadata lock and SyncFiles without it,
  // so lookups and in-place writes go on during the fsync (the slow part).
  virtual Status WriteBack() = 0;
  // May run concurrently with any call but Close (the set of files is fixed at open).
  virtual Status SyncFiles() = 0;
  Status Flush() {
    RETURN_IF_ERROR(WriteBack());
    return SyncFiles();
  }
  // Flushes and marks the image clean (dirty bit cleared). The map is unusable after.
  virtual Status Close() = 0;

  virtual std::optional<BackingRef> backing() const { return std::nullopt; }
  virtual FormatInfo Info() = 0;
  // Whether a new image reads as zeros where nothing was written (qemu's has_zero_init):
  // convert then skips the source's zeros. Not so for luks, whose unwritten sectors
  // decrypt to noise, nor for an encrypted qcow2 with preallocated clusters.
  virtual bool ZeroInit() { return true; }
  // Host files other than the main one (data file, extents), for `info` and locking.
  virtual std::vector<File*> host_files() { return {}; }

  // Whether qemu's block status (qemu-img map) looks through this image's data runs into
  // the host file, so holes there show as zeros. Most drivers' answers come from the host
  // file itself; qcow2 looks only when the image seems preallocated (see its override).
  virtual Result<bool> MapShowsHostHoles() { return true; }

  virtual Result<CheckReport> Check(RepairMode mode) {
    return Status::Unsupported("this format cannot be checked");
  }
  // What a grow adds, when it must read as zeros even where a backing image has data (the
  // engine asks for it when the backing image is longer than the old size, as qemu does,
  // and has first made the last partial cluster one the format can zero in place: see
  // Image::Resize).
  enum class GrowZeros {
    kNone,       // nothing to hide
    kZeros,      // zeros, as cheaply as the format can mark them
    kWithHomes,  // zeros over host clusters of their own (qemu's metadata preallocation)
  };
  // Changes the virtual size.
  virtual Status Resize(uint64_t new_size, bool allow_shrink, GrowZeros zero_grown = GrowZeros::kNone) {
    return Status::Unsupported("resizing this format is not supported");
  }
  virtual Status SnapshotCreate(const std::string& name) {
    return Status::Unsupported("this format has no internal snapshots");
  }
  virtual Status SnapshotApply(const std::string& name) {
    return Status::Unsupported("this format has no internal snapshots");
  }
  virtual Status SnapshotDelete(const std::string& name) {
    return Status::Unsupported("this format has no internal snapshots");
  }
  // Stores the whole allocation unit at guest_off (aligned to cluster_size()) as one
  // already-compressed stream in the image's own codec (convert -c): the stream is written
  // to the file, then linked. kUnsupported where the format has no compressed units.
  virtual Status WriteCompressed(uint64_t guest_off, std::span<const std::byte> stream) {
    return Status::Unsupported("this format cannot store compressed clusters");
  }
  // Drops every cluster of the active layer so the whole disk reads from the backing
  // image again (qemu-img commit empties the overlay so). kUnsupported where the format
  // cannot (qemu leaves such overlays as they are).
  virtual Status MakeEmpty() { return Status::Unsupported("cannot empty this format"); }
  // Rewrites the backing reference in the header (rebase -u, commit).
  virtual Status SetBacking(const std::optional<BackingRef>& ref) {
    return Status::Unsupported("this format has no backing file");
  }
  // Persistent dirty bitmaps (qemu-img bitmap, convert --bitmaps). The engine applies
  // qemu's rules over them (Image::ChangeBitmap); the format loads and stores them.
  // Whether this image can keep them (qemu's bdrv_supports_persistent_dirty_bitmap).
  virtual bool BitmapsSupported() { return false; }
  // The image's bitmaps, with their bits; a read-only open reads them without marking
  // them in use.
  virtual Result<std::vector<DirtyBitmap>> ReadBitmaps() { return std::vector<DirtyBitmap>{}; }
  // Why a new bitmap could not join `existing` (qemu's can_store_new_dirty_bitmap, without
  // the name check): kUnsupported where the format keeps no bitmaps at all, another code
  // with the format's reason otherwise.
  virtual Status CanStoreBitmap(const std::string& name, uint32_t granularity_bits,
                                const std::vector<DirtyBitmap>& existing) {
    return Status::Unsupported("Operation not supported");
  }
  // The image's bitmaps from now on: kept up to date by later writes and stored at Close.
  // REQUIRES: read-write, no guest write running.
  virtual Status ReplaceBitmaps(std::vector<DirtyBitmap> bitmaps) {
    return Status::Unsupported("Operation not supported");
  }

  // qemu-img amend. A `size` option is the engine's (Image::Amend resizes between the two
  // stages, where qemu's drivers do): kMain makes every other change qemu makes before
  // the resize, kAfterResize those it makes after it (qcow2's downgrade).
  enum class AmendStage { kMain, kAfterResize };
  virtual Status Amend(const AmendRequest& req, AmendStage stage) {
    return Status::Unsupported("this format does not support option amendment");
  }
};

// What the user's command line says of a backing image (backing.* in --image-opts or
// json:): the secret that unlocks it, and a file and format that replace the name and
// format the image above stores (empty: those stored).
struct BackingSpec {
  std::string format;
  std::string filename;
  std::string key_secret;  // empty: the secret of the image above
};

// Options a user passes at open time.
struct OpenOptions {
  Env* env = nullptr;                          // nullptr: Env::Default()
  std::string format;                          // empty: probe
  const class FormatDriver* driver = nullptr;  // tests: use this driver, skip the registry
  bool read_only = false;
  bool untrusted = false;    // refuse every external reference (docs/ARCHITECTURE.md, "Names inside images")
  bool open_backing = true;  // false: leave the chain unopened (info without --backing-chain)
  std::string snapshot;      // qcow2 internal snapshot to view read-only
  uint64_t cache_bytes = 32ull << 20;  // metadata cache cap per image
  int max_chain_depth = 64;
  // Open for `check` as qemu-img opens with BDRV_O_CHECK: metadata tables reaching past
  // the end of the file read as zeros, and what the check reports (a snapshot's bad L1
  // table, an empty refcount table) does not stop the open.
  bool for_check = false;
  // The caller writes no guest data through this read-write open (snapshot create and
  // delete, commit emptying the overlay, which qemu does not record in bitmaps either), so
  // persistent dirty bitmaps stay valid and keep their autoclear bit. Otherwise a
  // read-write open clears it: writes would not be recorded in them.
  bool keep_bitmaps = false;
  // Encrypted images: the ID of the secret that holds the passphrase (key-secret= in
  // --image-opts or json:), and where the caller's secrets are looked up (--object secret).
  std::string key_secret;
  SecretLookup secrets;
  // qcow2: the external data file named on the user's command line (data-file.filename
  // in --image-opts or json:), opened instead of the name the image stores. Not passed
  // down to backing images.
  std::string data_file;
  // The backing chain as the command line describes it: [0] the backing image, [1] its
  // backing image, ...; what is not described is opened as the images name it.
  std::vector<BackingSpec> backing_specs;
  // Only metadata is read (qemu-img info, qemu's BDRV_O_NO_IO): an encrypted image opens
  // without its key, and no guest data can be read.
  bool no_io = false;
  // Lines the open has for the user, unprefixed: what the repair of a dirty qcow2 image
  // found and fixed (qemu prints check -r all's lines then). May be empty.
  std::function<void(const std::string&)> notice;
};

// A file an image names, opened.
struct OpenedReference {
  std::string path;  // the name joined to the referring image's folder
  std::unique_ptr<File> file;
};

// Opens a file name an image refers to (backing file, data file, extent), resolved against
// the referring image's folder, by the rules of docs/ARCHITECTURE.md ("Names inside
// images"): regular files only, no `json:` or `proto:` names, and with `untrusted` nothing
// outside that folder and no symlink. Resolution and open are one step (Env::OpenReference),
// so the file cannot be swapped in between.
Result<OpenedReference> OpenReference(Env& env, const std::string& referrer_path, const std::string& name,
                                      OpenMode mode, bool untrusted);

// What FormatDriver::Open gets.
struct OpenContext {
  Env* env = nullptr;
  std::string path;
  std::unique_ptr<File> file;  // the image file, opened in the right mode
  OpenOptions options;
};

// What FormatDriver::Create gets. `options` are qemu-img's -o pairs, already split.
struct CreateContext {
  Env* env = nullptr;
  std::string path;
  uint64_t size = 0;
  std::map<std::string, std::string> options;
  std::optional<BackingRef> backing;
  // qemu's file-protocol options, for each new file while it is empty (CreateImageFile):
  // NOCOW (btrfs) and an extent size hint (XFS; 0: none). Best effort, as in qemu.
  bool nocow = false;
  uint32_t extent_size_hint = 1u << 20;
  bool extent_size_hint_given = false;           // a hint not set is then worth a warning
  std::vector<std::string>* warnings = nullptr;  // for the user; may be null
  SecretLookup secrets;                          // key-secret=ID of encrypted formats
};

// Creates (truncating) a new file of an image being created, with ctx's file hints.
Result<std::unique_ptr<File>> CreateImageFile(const CreateContext& ctx, const std::string& path);

// One option of `create -o`, as qemu-img 7.2 describes it (-o help, "Formatting" line).
struct CreateOptionSpec {
  enum class Type { kString, kSize, kNumber, kBool };
  const char* name;
  Type type;
  const char* help;
  const char* default_value = nullptr;  // shown when not given (qemu's def_value_str)
};

// What a format can do, declared once by its driver. Front ends ask this, never a name.
struct FormatTraits {
  // The create options, in qemu 7.2's order (that of the "Formatting" line).
  std::vector<CreateOptionSpec> create_options;
  // How `create -o preallocation` is honoured: by the format (qcow2 allocates clusters),
  // by the file protocol on the new file while it is empty (raw, flat extents), or not at
  // all (the format sizes its file itself: vdi).
  enum class CreatePreallocation { kFormat, kFile, kIgnored };
  CreatePreallocation create_preallocation = CreatePreallocation::kFile;
  // How `convert -c` stores compressed data: none; compressed clusters through
  // Image::WriteCompressed (qcow2); or only as a subformat written front to back by a
  // writer of its own (vmdk streamOptimized, named by compressed_subformat).
  enum class Compression { kNone, kClusters, kStreamSubformat };
  Compression compression = Compression::kNone;
  const char* compressed_subformat = "";
  // How `resize --preallocation` gives a grown area its space: not at all, through
  // Image::Preallocate (off, metadata, falloc, full), or in the host file itself, whose
  // offsets are the guest's (raw: off, falloc, full).
  enum class GrowPreallocation { kNone, kClusters, kHostFile };
  GrowPreallocation grow_preallocation = GrowPreallocation::kNone;
  // Added to "The image size is too large for file format 'F'" on create.
  const char* too_large_hint = "";
  // Whether qemu's driver answers block status. Without it (vhdx) qemu-img map sees the
  // whole image as data at depth 0, with no offset (Image::MapAsQemu).
  bool block_status = true;
  // What qemu-img info calls the disk size: the image file's allocation alone, or (vmdk,
  // whose driver sums its extents) that of every host file. qcow2's data file is not counted.
  bool disk_size_sums_host_files = false;
  // Whether ClusterMap::LookupCached can answer (qcow2). Only then does the engine try it
  // under the shared lock first; other formats go straight to Lookup, with no second try.
  bool cached_lookups = false;
  // qemu's driver cannot write (bochs, cloop): a read-write open is refused with qemu's
  // "Image is read-only" before the file is read, and the format cannot be created.
  bool read_only = false;
  // Whether qemu's driver answers bdrv_get_info, so that qemu-img info shows "dirty-flag"
  // (bochs, cloop and dmg do not).
  bool reports_dirty_flag = true;
  // The options `amend -o` takes, as qemu 7.2 lists them; none where qemu's driver cannot
  // amend ("Format driver 'X' does not support option amendment").
  std::vector<CreateOptionSpec> amend_options = {};
};

// A new image written front to back, each allocation unit stored once as one compressed
// stream (vmdk streamOptimized), for formats whose traits say kStreamSubformat.
class StreamWriter {
 public:
  virtual ~StreamWriter() = default;
  virtual uint64_t unit_size() const = 0;
  virtual Codec codec() const = 0;
  // The longest stream a unit may take (the codec's worst case on incompressible data).
  virtual uint64_t max_stream_bytes() const = 0;
  // Stores unit `index` (guest bytes [index*unit_size(), ...)), compressed in codec() from
  // the zero-padded unit. Units that are all zeros are not stored; ascending order.
  virtual Status WriteCompressedUnit(uint64_t index, std::span<const std::byte> stream) = 0;
  // Writes what remains (tables, end marker) and syncs; the image is valid only after it.
  virtual Status Finish() = 0;
};

// A format: stateless, registered in formats/registry.cc.
class Image;

// What `measure` asks of a format (qemu-img measure): the create options (-o, split as for
// Create, the size among them), and the image whose content is to be measured, or none for
// a new image of options' size.
struct MeasureRequest {
  std::map<std::string, std::string> options;
  Image* source = nullptr;  // its whole backing chain counts, as a conversion would copy it
};
struct MeasureResult {
  uint64_t required = 0;         // bytes the image takes for the source's data
  uint64_t fully_allocated = 0;  // bytes with every cluster allocated
  // The source's persistent bitmaps, when both the source and this format keep them.
  std::optional<uint64_t> bitmaps;
};

class FormatDriver {
 public:
  virtual ~FormatDriver() = default;
  virtual const char* name() const = 0;
  virtual const FormatTraits& traits() const = 0;
  // How sure the driver is that `head` (the first bytes of the file, up to 4 KiB) is
  // its format: 0 no, 100 certain (qemu's probe scores).
  virtual int Probe(std::span<const std::byte> head, const std::string& path) const = 0;
  virtual Result<std::unique_ptr<ClusterMap>> Open(OpenContext ctx) const = 0;
  virtual Status Create(const CreateContext& ctx) const {
    return Status::Unsupported("creating {} images is not supported", name());
  }
  // Creates the image as a stream (FormatTraits::compressed_subformat), written by the
  // copy pipeline (CopyToStream).
  virtual Result<std::unique_ptr<StreamWriter>> CreateStream(const CreateContext& ctx) const {
    return Status::Unsupported("{} images cannot be written as a stream", name());
  }
  // The size an image of this format takes (qemu-img measure), computed as qemu computes it.
  virtual Result<MeasureResult> Measure(const MeasureRequest& req) const {
    return Status::Unsupported("Block driver '{}' does not support size measurement", name());
  }
};

// All registered drivers, in probe order.
const std::vector<const FormatDriver*>& AllFormats();
const FormatDriver* FindFormat(std::string_view name);
// The name of the container qemu-img would probe `head` (the first bytes of the file at
// `path`) as, where vimgfs has no driver for it: such a file is refused, never read as raw.
std::optional<std::string> UndrivenContainer(std::span<const std::byte> head, const std::string& path);
// A format qemu-img opens that vimgfs has no driver for (`-f qed`).
bool IsUndrivenQemuFormat(std::string_view name);

}  // namespace vimgfs
