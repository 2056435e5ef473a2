// Guest partition tables (src/guest/partition_table.cc). Tables written by sfdisk and
// sgdisk onto sparse files are read back and compared with what `sfdisk --json` reports;
// hostile tables built in memory must read as "no table" or be cut down with a note, never
// crash, hang, read outside the disk or allocate without bound.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "guest/partition_table.h"
#include "support/test_util.h"
#include "util/endian.h"

namespace vimgfs::guest {
namespace {

using Kind = PartitionTable::Kind;
constexpr uint64_t kMiB = 1 << 20;

std::string Notes(const PartitionTable& t) {
  std::string all;
  for (const std::string& n : t.notes) all += "[" + n + "] ";
  return all;
}

bool HasNote(const PartitionTable& t, const std::string& part) {
  return std::any_of(t.notes.begin(), t.notes.end(),
                     [&](const std::string& n) { return n.find(part) != std::string::npos; });
}

std::vector<unsigned> Numbers(const PartitionTable& t) {
  std::vector<unsigned> out;
  for (const Partition& p : t.partitions) out.push_back(p.number);
  return out;
}

// Every partition inside the disk, numbers ascending and unique: what any table must hold.
void ExpectSane(const PartitionTable& t, uint64_t disk_size) {
  EXPECT_LE(t.partitions.size(), kMaxPartitions);
  for (size_t i = 0; i < t.partitions.size(); ++i) {
    const Partition& p = t.partitions[i];
    EXPECT_GT(p.length, 0u) << "partition " << p.number;
    EXPECT_LT(p.offset, disk_size) << "partition " << p.number;
    EXPECT_LE(p.length, disk_size - std::min(p.offset, disk_size)) << "partition " << p.number;
    if (i > 0) {
      EXPECT_LT(t.partitions[i - 1].number, p.number) << Notes(t);
    }
  }
}

uint32_t Crc(const std::byte* p, size_t n) {
  return static_cast<uint32_t>(crc32(0, reinterpret_cast<const Bytef*>(p), static_cast<uInt>(n)));
}

// ---------------------------------------------------------------------------------------
// In-memory disks.

// A disk in memory. A read outside it fails the test: the parser promises never to ask.
class MemDisk {
 public:
  explicit MemDisk(uint64_t size) : bytes_(size) {}

  DiskReader Reader() {
    return [this](uint64_t off, std::span<std::byte> out) -> Status {
      ++reads_;
      if (off > bytes_.size() || out.size() > bytes_.size() - off) {
        ADD_FAILURE() << "read of " << out.size() << " bytes at " << off << " outside a disk of "
                      << bytes_.size();
        return Status::OutOfRange("read outside the disk");
      }
      std::memcpy(out.data(), bytes_.data() + off, out.size());
      return Status::Ok();
    };
  }
  PartitionTable Parse() {
    auto t = ReadPartitionTable(Reader(), bytes_.size());
    EXPECT_TRUE(t.ok()) << t.status().message();
    if (!t.ok()) return {};
    ExpectSane(*t, bytes_.size());
    return std::move(*t);
  }

  uint64_t size() const { return bytes_.size(); }
  int reads() const { return reads_; }
  std::byte* at(uint64_t off) { return bytes_.data() + off; }

  void Signature(uint64_t sector) {
    bytes_[sector * 512 + 510] = std::byte{0x55};
    bytes_[sector * 512 + 511] = std::byte{0xAA};
  }
  // Slot `slot` of the MBR or EBR in `sector`, with the 0x55AA signature.
  void Entry(uint64_t sector, int slot, uint8_t type, uint32_t lba, uint32_t sectors, uint8_t status = 0) {
    std::byte* p = at(sector * 512 + 446 + 16 * slot);
    p[0] = std::byte{status};
    p[4] = std::byte{type};
    StoreLE32(p + 8, lba);
    StoreLE32(p + 12, sectors);
    Signature(sector);
  }

 private:
  std::vector<std::byte> bytes_;
  int reads_ = 0;
};

struct GptPart {
  uint64_t first = 0, last = 0;
  std::u16string name;
  bool used = true;
};

struct GptLayout {
  uint32_t ss = 512;
  uint32_t entries = 128;
  uint32_t entry_size = 128;
  uint32_t header_size = 92;
  uint64_t array_lba = 2;      // of the primary; the backup's array sits just below its header
  std::vector<GptPart> parts;  // parts[i] in entry i
};

// Sets the header CRC of the GPT header in the sector at byte `off` (over header_size
// bytes, capped at the sector).
void FixHeaderCrc(MemDisk& d, uint64_t off, uint32_t ss) {
  std::byte* h = d.at(off);
  StoreLE32(h + 16, 0);
  StoreLE32(h + 16, Crc(h, std::min(LoadLE32(h + 12), ss)));
}

// Edits both GPT headers of a disk written by WriteGpt, keeping their CRCs valid.
void EditHeaders(MemDisk& d, uint32_t ss, const std::function<void(std::byte*)>& edit) {
  for (uint64_t lba : {uint64_t{1}, d.size() / ss - 1}) {
    edit(d.at(lba * ss));
    FixHeaderCrc(d, lba * ss, ss);
  }
}

// A protective MBR, primary and backup headers and arrays, all CRCs valid.
void WriteGpt(MemDisk& d, const GptLayout& g) {
  d.Entry(0, 0, 0xEE, 1, static_cast<uint32_t>(std::min<uint64_t>(d.size() / 512 - 1, 0xFFFFFFFF)));
  std::vector<std::byte> array(uint64_t{g.entries} * g.entry_size);
  for (size_t i = 0; i < g.parts.size(); ++i) {
    const GptPart& p = g.parts[i];
    if (!p.used) continue;
    std::byte* e = array.data() + i * g.entry_size;
    std::memset(e, 0xAF, 16);  // type GUID: anything non-zero is in use
    StoreLE64(e + 16, 0x1234 + i);
    StoreLE64(e + 32, p.first);
    StoreLE64(e + 40, p.last);
    for (size_t c = 0; c < p.name.size() && c < 36; ++c) StoreLE16(e + 56 + 2 * c, p.name[c]);
  }
  const uint32_t array_crc = Crc(array.data(), array.size());
  const uint64_t last = d.size() / g.ss - 1;
  const uint64_t array_sectors = (array.size() + g.ss - 1) / g.ss;
  const uint64_t backup_array = last - array_sectors;
  auto header = [&](uint64_t lba, uint64_t alt, uint64_t array_lba) {
    std::memcpy(d.at(array_lba * g.ss), array.data(), array.size());
    std::byte* h = d.at(lba * g.ss);
    std::memset(h, 0, g.ss);
    std::memcpy(h, "EFI PART", 8);
    StoreLE32(h + 8, 0x00010000);
    StoreLE32(h + 12, g.header_size);
    StoreLE64(h + 24, lba);
    StoreLE64(h + 32, alt);
    StoreLE64(h + 40, g.array_lba + array_sectors);
    StoreLE64(h + 48, backup_array - 1);
    StoreLE64(h + 56, 0xD15C);
    StoreLE64(h + 72, array_lba);
    StoreLE32(h + 80, g.entries);
    StoreLE32(h + 84, g.entry_size);
    StoreLE32(h + 88, array_crc);
    FixHeaderCrc(d, lba * g.ss, g.ss);
  };
  header(1, last, g.array_lba);
  header(last, 1, backup_array);
}

// ---------------------------------------------------------------------------------------
// Tables made by sfdisk and sgdisk.

class FileDisk {
 public:
  explicit FileDisk(const std::string& path) : fd_(::open(path.c_str(), O_RDONLY | O_CLOEXEC)) {
    EXPECT_GE(fd_, 0) << path;
    if (fd_ >= 0) size_ = static_cast<uint64_t>(::lseek(fd_, 0, SEEK_END));
  }
  ~FileDisk() {
    if (fd_ >= 0) ::close(fd_);
  }
  uint64_t size() const { return size_; }
  DiskReader Reader() const {
    return [this](uint64_t off, std::span<std::byte> out) -> Status {
      if (off > size_ || out.size() > size_ - off) {
        ADD_FAILURE() << "read of " << out.size() << " bytes at " << off << " outside the disk";
        return Status::OutOfRange("read outside the disk");
      }
      size_t done = 0;
      while (done < out.size()) {
        ssize_t n = ::pread(fd_, out.data() + done, out.size() - done, static_cast<off_t>(off + done));
        if (n <= 0) return Status::Io("pread failed");
        done += static_cast<size_t>(n);
      }
      return Status::Ok();
    };
  }

 private:
  int fd_;
  uint64_t size_ = 0;
};

class PartitionTableTools : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!test::HaveProgram("sfdisk")) GTEST_SKIP() << "sfdisk not installed (apt-get install fdisk)";
  }

  // A sparse file of `size` bytes with the table sfdisk makes from `script`.
  std::string Sfdisk(const std::string& name, uint64_t size, const std::string& script) {
    std::string path = dir_.File(name);
    Run("truncate -s " + std::to_string(size) + " " + test::Quote(path));
    Run("printf '%s' " + test::Quote(script) + " | sfdisk -q " + test::Quote(path));
    return path;
  }
  void Run(const std::string& cmd) {
    test::CommandResult r = test::RunCommand(cmd);
    ASSERT_EQ(r.exit_code, 0) << cmd << ": " << r.err;
  }
  nlohmann::json SfdiskJson(const std::string& path) {
    test::CommandResult r = test::RunCommand("sfdisk --json " + test::Quote(path));
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return nlohmann::json::parse(r.out)["partitiontable"];
  }
  PartitionTable Parse(const std::string& path) {
    FileDisk f(path);
    auto t = ReadPartitionTable(f.Reader(), f.size());
    EXPECT_TRUE(t.ok()) << t.status().message();
    if (!t.ok()) return {};
    ExpectSane(*t, f.size());
    return std::move(*t);
  }
  void Poke(const std::string& path, uint64_t off, const std::vector<uint8_t>& bytes) {
    int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    EXPECT_EQ(::pwrite(fd, bytes.data(), bytes.size(), static_cast<off_t>(off)),
              static_cast<ssize_t>(bytes.size()));
    ::close(fd);
  }

  // The table must hold exactly the partitions sfdisk lists, field by field.
  static void ExpectMatches(const PartitionTable& t, const nlohmann::json& pt) {
    const bool gpt = pt["label"] == "gpt";
    EXPECT_EQ(t.kind, gpt ? Kind::kGpt : Kind::kMbr) << Notes(t);
    const uint64_t ss = pt["sectorsize"].get<uint64_t>();
    EXPECT_EQ(t.sector_size, ss);
    std::vector<Partition> want;
    for (const auto& j : pt["partitions"]) {
      Partition p;
      const std::string node = j["node"];
      size_t digits = node.find_last_not_of("0123456789") + 1;
      p.number = static_cast<unsigned>(std::stoul(node.substr(digits)));
      p.offset = j["start"].get<uint64_t>() * ss;
      p.length = j["size"].get<uint64_t>() * ss;
      if (!gpt) {
        p.mbr_type = static_cast<uint8_t>(std::stoul(j["type"].get<std::string>(), nullptr, 16));
        p.extended = p.mbr_type == 0x05 || p.mbr_type == 0x0F || p.mbr_type == 0x85;
      }
      if (j.contains("name")) p.label = j["name"];
      want.push_back(p);
    }
    std::sort(want.begin(), want.end(), [](auto& a, auto& b) { return a.number < b.number; });
    ASSERT_EQ(t.partitions.size(), want.size()) << pt.dump() << "\n" << Notes(t);
    for (size_t i = 0; i < want.size(); ++i) {
      const Partition &got = t.partitions[i], &w = want[i];
      SCOPED_TRACE("partition " + std::to_string(w.number));
      EXPECT_EQ(got.number, w.number);
      EXPECT_EQ(got.offset, w.offset);
      EXPECT_EQ(got.length, w.length);
      EXPECT_EQ(got.extended, w.extended);
      EXPECT_EQ(got.mbr_type, w.mbr_type);
      EXPECT_EQ(got.label, w.label);
    }
  }

  test::TempDir dir_;
};

constexpr const char* kMbrScript =
    "label: dos\n"
    "start=2048, size=8M, type=83\n"
    "size=8M, type=7, bootable\n"
    "size=32M, type=5\n"
    "size=4M, type=83\n"
    "size=6M, type=82\n"
    "size=3M, type=c\n"
    "size=5M, type=83\n";

TEST_F(PartitionTableTools, SfdiskMbrWithLogicals) {
  std::string path = Sfdisk("mbr.img", 64 * kMiB, kMbrScript);
  nlohmann::json pt = SfdiskJson(path);
  ASSERT_EQ(pt["partitions"].size(), 7u) << pt.dump();  // 1-4, then logicals 5-7
  PartitionTable t = Parse(path);
  ExpectMatches(t, pt);
  EXPECT_TRUE(t.notes.empty()) << Notes(t);

  // Each EBR of the chain (found here by following the links by hand) is metadata; the
  // data of a partition is not.
  std::vector<uint8_t> raw = test::ReadWholeFile(path);
  const Partition* ext = nullptr;
  for (const Partition& p : t.partitions)
    if (p.extended) ext = &p;
  ASSERT_NE(ext, nullptr);
  uint64_t ebr = ext->offset / 512;
  int ebrs = 0;
  while (true) {
    EXPECT_TRUE(t.Touches(ebr * 512, 512)) << "EBR at sector " << ebr;
    EXPECT_TRUE(t.Touches(ebr * 512 + 511, 1)) << "EBR at sector " << ebr;
    ++ebrs;
    uint32_t link = LoadLE32(raw.data() + ebr * 512 + 446 + 16 + 8);
    if (raw[ebr * 512 + 446 + 16 + 4] == 0) break;
    ebr = ext->offset / 512 + link;
  }
  EXPECT_EQ(ebrs, 3);
  for (const Partition& p : t.partitions) {
    if (p.extended) continue;
    EXPECT_FALSE(t.Touches(p.offset, p.length)) << "partition " << p.number;
  }
}

TEST_F(PartitionTableTools, SfdiskGptWithNames) {
  std::string path = Sfdisk("gpt.img", 64 * kMiB,
                            "label: gpt\n"
                            "size=8M, name=boot, type=uefi\n"
                            "size=16M, name=\"root fs\"\n"
                            "size=4M, name=swap, type=swap\n"
                            "size=2M, name=d\xc3\xa9j\xc3\xa0\n"
                            "size=1M\n");
  nlohmann::json pt = SfdiskJson(path);
  ASSERT_EQ(pt["partitions"].size(), 5u) << pt.dump();
  PartitionTable t = Parse(path);
  ExpectMatches(t, pt);
  EXPECT_EQ(t.partitions[3].label, "d\xc3\xa9j\xc3\xa0");
  EXPECT_TRUE(t.notes.empty()) << Notes(t);
  // Header and array (LBA 1 to 33) and the backup at the end are watched.
  EXPECT_TRUE(t.Touches(512, 1));
  EXPECT_TRUE(t.Touches(33 * 512 + 511, 1));
  EXPECT_TRUE(t.Touches(64 * kMiB - 512, 512));
  EXPECT_FALSE(t.Touches(t.partitions[0].offset, t.partitions[0].length));
}

TEST_F(PartitionTableTools, SgdiskGptWithGapsInNumbering) {
  if (!test::HaveProgram("sgdisk")) GTEST_SKIP() << "sgdisk not installed (apt-get install gdisk)";
  std::string path = dir_.File("sg.img");
  Run("truncate -s 64M " + test::Quote(path));
  Run("sgdisk -n 1:2048:+8M -c 1:boot -n 3:0:+4M -c 3:data -n 7:0:+1M -c '7:\xe2\x82\xac uro' " +
      test::Quote(path));
  nlohmann::json pt = SfdiskJson(path);
  ASSERT_EQ(pt["partitions"].size(), 3u) << pt.dump();
  PartitionTable t = Parse(path);
  ExpectMatches(t, pt);
  EXPECT_EQ(Numbers(t), (std::vector<unsigned>{1, 3, 7}));
}

TEST_F(PartitionTableTools, GptPrimaryHeaderCorruptUsesBackup) {
  std::string path = Sfdisk("gpt.img", 64 * kMiB, "label: gpt\nsize=8M, name=a\nsize=8M, name=b\n");
  nlohmann::json pt = SfdiskJson(path);
  Poke(path, 512 + 0x38, {0x5A});  // a byte of the disk GUID: the header CRC no longer holds
  PartitionTable t = Parse(path);
  ExpectMatches(t, pt);
  EXPECT_TRUE(HasNote(t, "backup")) << Notes(t);
  // The backup header (last LBA) and its array are metadata now.
  EXPECT_TRUE(t.Touches(64 * kMiB - 512, 1));
}

TEST_F(PartitionTableTools, GptPrimaryArrayCorruptUsesBackup) {
  std::string path = Sfdisk("gpt.img", 64 * kMiB, "label: gpt\nsize=8M, name=a\nsize=8M, name=b\n");
  nlohmann::json pt = SfdiskJson(path);
  Poke(path, 1024 + 56, {'X'});  // the first entry's name: the array CRC no longer holds
  PartitionTable t = Parse(path);
  ExpectMatches(t, pt);
  EXPECT_EQ(t.partitions[0].label, "a");
  EXPECT_TRUE(HasNote(t, "backup")) << Notes(t);
}

TEST_F(PartitionTableTools, GptBothHeadersDestroyed) {
  std::string path = Sfdisk("gpt.img", 64 * kMiB, "label: gpt\nsize=8M, name=a\n");
  Poke(path, 512, std::vector<uint8_t>(512, 0));
  Poke(path, 64 * kMiB - 512, std::vector<uint8_t>(512, 0));
  PartitionTable t = Parse(path);
  EXPECT_EQ(t.kind, Kind::kNone);
  EXPECT_TRUE(t.partitions.empty());
  EXPECT_TRUE(HasNote(t, "protective MBR without a valid GPT")) << Notes(t);
  // A new table written there must still be noticed.
  EXPECT_TRUE(t.Touches(512, 512));
  EXPECT_TRUE(t.Touches(64 * kMiB - 512, 512));
}

// Sector-granular layouts (not 1 MiB aligned), as old tools and small disks have.
TEST_F(PartitionTableTools, SfdiskUnalignedSmallDisk) {
  std::string path = Sfdisk("small.img", 256 * 1024,
                            "label: dos\n"
                            "start=2, size=100, type=83\n"
                            "start=110, size=300, type=f\n"
                            "start=112, size=50, type=83\n"
                            "start=170, size=50, type=7\n"
                            "start=230, size=20, type=b\n"
                            "start=420, size=92, type=83\n");
  nlohmann::json pt = SfdiskJson(path);
  ASSERT_EQ(pt["partitions"].size(), 6u) << pt.dump();
  ExpectMatches(Parse(path), pt);
}

// ---------------------------------------------------------------------------------------
// Hostile MBRs and EBR chains.

TEST(PartitionTableMbr, EbrLinkedToItselfEnds) {
  MemDisk d(kMiB);
  d.Entry(0, 0, 0x05, 100, 1000);
  d.Entry(100, 0, 0x83, 2, 10);
  d.Entry(100, 1, 0x05, 0, 20);  // the next EBR is this one
  PartitionTable t = d.Parse();
  EXPECT_EQ(t.kind, Kind::kMbr);
  EXPECT_EQ(Numbers(t), (std::vector<unsigned>{1, 5}));
  EXPECT_EQ(t.partitions[1].offset, 102 * 512u);
  EXPECT_TRUE(HasNote(t, "chain breaks")) << Notes(t);
  EXPECT_LT(d.reads(), 5);
}

TEST(PartitionTableMbr, EbrCycleOfTwoEnds) {
  MemDisk d(kMiB);
  d.Entry(0, 0, 0x0F, 100, 1000);
  d.Entry(100, 0, 0x83, 1, 10);
  d.Entry(100, 1, 0x05, 100, 20);  // -> sector 200
  d.Entry(200, 0, 0x83, 1, 10);
  d.Entry(200, 1, 0x05, 0, 20);  // -> back to sector 100
  PartitionTable t = d.Parse();
  EXPECT_EQ(Numbers(t), (std::vector<unsigned>{1, 5, 6}));
  EXPECT_EQ(t.partitions[2].offset, 201 * 512u);
  EXPECT_TRUE(HasNote(t, "chain breaks")) << Notes(t);
}

TEST(PartitionTableMbr, EbrLinkPastTheDisk) {
  MemDisk d(kMiB);
  d.Entry(0, 0, 0x05, 100, 1000);
  d.Entry(100, 0, 0x83, 1, 10);
  d.Entry(100, 1, 0x05, 0xFFFFFF00, 20);
  PartitionTable t = d.Parse();
  EXPECT_EQ(Numbers(t), (std::vector<unsigned>{1, 5}));
  EXPECT_TRUE(HasNote(t, "chain breaks")) << Notes(t);
  // The last sector of the disk is still a place an EBR may be; one past it is not.
  MemDisk e(kMiB);
  e.Entry(0, 0, 0x05, 100, 1000);
  e.Entry(100, 1, 0x05, 2048 - 1 - 100, 1);
  e.Entry(2047, 0, 0x83, 0xFFFFFFFF, 1);
  PartitionTable u = e.Parse();
  EXPECT_EQ(Numbers(u), (std::vector<unsigned>{1}));
  EXPECT_TRUE(HasNote(u, "logical partition 5 starts outside")) << Notes(u);
}

TEST(PartitionTableMbr, PrimaryPastTheEndIsCutShort) {
  MemDisk d(kMiB + 100);  // not a whole number of sectors
  d.Entry(0, 1, 0x83, 1024, 0xFFFFFFFF, 0x80);
  PartitionTable t = d.Parse();
  ASSERT_EQ(Numbers(t), (std::vector<unsigned>{2}));
  EXPECT_EQ(t.partitions[0].offset, 1024 * 512u);
  EXPECT_EQ(t.partitions[0].length, kMiB + 100 - 1024 * 512);
  EXPECT_EQ(t.partitions[0].mbr_type, 0x83);
  EXPECT_TRUE(HasNote(t, "cut short")) << Notes(t);
}

TEST(PartitionTableMbr, PrimaryStartingPastTheEndIsIgnored) {
  MemDisk d(kMiB);
  d.Entry(0, 0, 0x83, 2048, 10);  // the first sector after the disk
  d.Entry(0, 1, 0x83, 0xFFFFFFFF, 0xFFFFFFFF);
  d.Entry(0, 2, 0x83, 0, 10);  // sector 0 is the MBR itself
  d.Entry(0, 3, 0x83, 1, 2047);
  PartitionTable t = d.Parse();
  EXPECT_EQ(t.kind, Kind::kMbr);
  EXPECT_EQ(Numbers(t), (std::vector<unsigned>{4}));
  EXPECT_EQ(t.partitions[0].length, 2047 * 512u);
  EXPECT_TRUE(HasNote(t, "primary partition 1 starts outside")) << Notes(t);
  EXPECT_TRUE(HasNote(t, "primary partition 2 starts outside")) << Notes(t);
}

TEST(PartitionTableMbr, BootSectorIsNotAnMbr) {
  MemDisk d(kMiB);
  const uint8_t fat[] = {0xEB, 0x3C, 0x90, 'M', 'S', 'D', 'O', 'S', '5', '.', '0'};
  std::memcpy(d.at(0), fat, sizeof fat);
  for (int i = 446; i < 510; ++i) *d.at(i) = std::byte{0x31};  // boot code, not entries
  d.Signature(0);
  PartitionTable t = d.Parse();
  EXPECT_EQ(t.kind, Kind::kNone);
  EXPECT_TRUE(t.partitions.empty());
  EXPECT_TRUE(HasNote(t, "boot sector")) << Notes(t);

  // One bad status byte is enough, even when the other slots look like entries.
  MemDisk e(kMiB);
  e.Entry(0, 0, 0x83, 1, 100, 0x80);
  e.Entry(0, 3, 0x83, 200, 100, 0x01);
  EXPECT_EQ(e.Parse().kind, Kind::kNone);
}

TEST(PartitionTableMbr, NoSignatureNoTable) {
  MemDisk d(kMiB);
  d.Entry(0, 0, 0x83, 1, 100);
  *d.at(511) = std::byte{0};
  PartitionTable t = d.Parse();
  EXPECT_EQ(t.kind, Kind::kNone);
  EXPECT_TRUE(HasNote(t, "no boot signature")) << Notes(t);

  MemDisk empty(kMiB);
  empty.Signature(0);
  PartitionTable u = empty.Parse();
  EXPECT_EQ(u.kind, Kind::kMbr);
  EXPECT_TRUE(u.partitions.empty());
}

TEST(PartitionTableMbr, DiskSmallerThanASector) {
  for (uint64_t size : {0, 1, 446, 511}) {
    MemDisk d(size);
    PartitionTable t = d.Parse();
    EXPECT_EQ(t.kind, Kind::kNone) << size;
    EXPECT_TRUE(HasNote(t, "smaller than one sector")) << Notes(t);
    EXPECT_EQ(d.reads(), 0);
    EXPECT_EQ(t.Touches(0, 1), size > 0);
  }
  // Exactly one sector: an MBR whose partitions all lie outside it.
  MemDisk d(512);
  d.Entry(0, 0, 0x83, 1, 100);
  d.Entry(0, 1, 0x05, 1, 100);
  PartitionTable t = d.Parse();
  EXPECT_EQ(t.kind, Kind::kMbr);
  EXPECT_TRUE(t.partitions.empty());
}

TEST(PartitionTableMbr, EmptyExtendedPartition) {
  MemDisk d(kMiB);
  d.Entry(0, 0, 0x83, 1, 99);
  d.Entry(0, 1, 0x85, 1000, 1000);  // no EBR written at sector 1000
  PartitionTable t = d.Parse();
  ASSERT_EQ(Numbers(t), (std::vector<unsigned>{1, 2}));
  EXPECT_TRUE(t.partitions[1].extended);
  EXPECT_FALSE(t.partitions[0].extended);
  EXPECT_TRUE(t.notes.empty()) << Notes(t);
  EXPECT_TRUE(t.Touches(1000 * 512, 512));  // where an EBR will be written
}

// Linux numbers the logicals of a second extended partition after those of the first.
TEST(PartitionTableMbr, TwoExtendedPartitionsNumberOnce) {
  MemDisk d(kMiB);
  d.Entry(0, 0, 0x05, 100, 300);
  d.Entry(100, 0, 0x83, 1, 10);
  d.Entry(100, 1, 0x05, 50, 20);
  d.Entry(150, 0, 0x83, 1, 10);
  d.Entry(0, 2, 0x0F, 500, 300);
  d.Entry(500, 0, 0x83, 1, 10);
  PartitionTable t = d.Parse();
  EXPECT_EQ(Numbers(t), (std::vector<unsigned>{1, 3, 5, 6, 7})) << Notes(t);
  ASSERT_EQ(t.partitions.size(), 5u);
  EXPECT_EQ(t.partitions[2].offset, 101 * 512u);
  EXPECT_EQ(t.partitions[3].offset, 151 * 512u);
  EXPECT_EQ(t.partitions[4].offset, 501 * 512u);
}

TEST(PartitionTableMbr, AtMostMaxPartitionsLogicals) {
  const unsigned logicals = kMaxPartitions + 50;
  MemDisk d((4 * logicals + 16) * 512);
  d.Entry(0, 0, 0x05, 4, 4 * logicals + 8);
  for (unsigned i = 0; i < logicals; ++i) {
    uint64_t ebr = 4 + 4 * i;
    d.Entry(ebr, 0, 0x83, 1, 2);
    if (i + 1 < logicals) d.Entry(ebr, 1, 0x05, 4 * (i + 1), 3);
  }
  PartitionTable t = d.Parse();
  EXPECT_EQ(t.kind, Kind::kMbr);
  EXPECT_EQ(t.partitions.size(), kMaxPartitions);
  EXPECT_FALSE(t.notes.empty());
  EXPECT_EQ(t.partitions.front().number, 1u);
  EXPECT_TRUE(t.partitions.front().extended);
  EXPECT_EQ(t.partitions[1].number, 5u);
}

TEST(PartitionTableMbr, ReadErrorsPropagate) {
  MemDisk d(kMiB);
  d.Entry(0, 0, 0x05, 100, 1000);
  d.Entry(100, 0, 0x83, 1, 10);
  DiskReader inner = d.Reader();
  for (uint64_t fail_at : {uint64_t{0}, uint64_t{100 * 512}}) {
    DiskReader failing = [&](uint64_t off, std::span<std::byte> out) -> Status {
      if (off == fail_at) return Status::Io("the disk is on fire at {}", off);
      return inner(off, out);
    };
    auto t = ReadPartitionTable(failing, d.size());
    ASSERT_FALSE(t.ok()) << fail_at;
    EXPECT_NE(t.status().message().find("on fire at " + std::to_string(fail_at)), std::string::npos)
        << t.status().message();
  }
}

// ---------------------------------------------------------------------------------------
// Hostile GPTs.

GptLayout ThreeParts() {
  GptLayout g;
  g.parts = {{100, 199, u"one"}, {200, 299, u"two"}, {}, {300, 399, u""}};
  g.parts[2].used = false;
  return g;
}

TEST(PartitionTableGpt, InMemoryLayoutParses) {
  MemDisk d(kMiB);
  WriteGpt(d, ThreeParts());
  PartitionTable t = d.Parse();
  ASSERT_EQ(t.kind, Kind::kGpt) << Notes(t);
  EXPECT_EQ(t.sector_size, 512u);
  EXPECT_EQ(Numbers(t), (std::vector<unsigned>{1, 2, 4}));
  EXPECT_EQ(t.partitions[0].offset, 100 * 512u);
  EXPECT_EQ(t.partitions[0].length, 100 * 512u);
  EXPECT_EQ(t.partitions[1].label, "two");
  EXPECT_EQ(t.partitions[2].label, "");
  EXPECT_EQ(t.partitions[2].mbr_type, 0);
  EXPECT_TRUE(t.notes.empty()) << Notes(t);
}

TEST(PartitionTableGpt, FourKiBSectors) {
  MemDisk d(8 * kMiB);
  GptLayout g;
  g.ss = 4096;
  g.parts = {{256, 511, u"esp"}, {512, 2000, u"root"}};
  WriteGpt(d, g);
  PartitionTable t = d.Parse();
  ASSERT_EQ(t.kind, Kind::kGpt) << Notes(t);
  EXPECT_EQ(t.sector_size, 4096u);
  ASSERT_EQ(Numbers(t), (std::vector<unsigned>{1, 2}));
  EXPECT_EQ(t.partitions[1].offset, 512 * 4096u);
  EXPECT_EQ(t.partitions[1].length, 1489 * 4096u);
  EXPECT_EQ(t.partitions[0].label, "esp");
  EXPECT_TRUE(t.Touches(4096, 1));                // header
  EXPECT_TRUE(t.Touches(8 * kMiB - 4096, 4096));  // backup
  EXPECT_TRUE(t.notes.empty()) << Notes(t);
}

TEST(PartitionTableGpt, EntryArrayTooLargeOrOverflowing) {
  struct Case {
    uint32_t entries, entry_size;
  };
  for (Case c : {Case{0xFFFFFFFF, 0xFFFFFF80}, Case{0x02000001, 0x80}, Case{8193, 128}, Case{1, 0x80000000},
                 Case{4, 0}, Case{0, 128}, Case{4, 100}, Case{4, 200}}) {
    MemDisk d(4 * kMiB);
    WriteGpt(d, ThreeParts());
    EditHeaders(d, 512, [&](std::byte* h) {
      StoreLE32(h + 80, c.entries);
      StoreLE32(h + 84, c.entry_size);
    });
    PartitionTable t = d.Parse();
    EXPECT_EQ(t.kind, Kind::kNone) << c.entries << " x " << c.entry_size;
    EXPECT_TRUE(HasNote(t, "entry array")) << Notes(t);
  }
}

TEST(PartitionTableGpt, EntryArrayAtTheCap) {
  MemDisk d(4 * kMiB);
  GptLayout g = ThreeParts();
  g.entries = 8192;  // exactly 1 MiB of entries
  for (auto& p : g.parts) p.first += 2048, p.last += 2048;
  WriteGpt(d, g);
  PartitionTable t = d.Parse();
  ASSERT_EQ(t.kind, Kind::kGpt) << Notes(t);
  EXPECT_EQ(Numbers(t), (std::vector<unsigned>{1, 2, 4}));
  EXPECT_TRUE(t.Touches(1024 + kMiB - 1, 1));
  EXPECT_FALSE(t.Touches(1024 + kMiB, 1));
}

TEST(PartitionTableGpt, ArrayPastTheDisk) {
  MemDisk d(kMiB);
  WriteGpt(d, ThreeParts());
  EditHeaders(d, 512, [](std::byte* h) { StoreLE64(h + 72, 2048 - 10); });  // 32 sectors from 2038
  PartitionTable t = d.Parse();
  EXPECT_EQ(t.kind, Kind::kNone);
  EXPECT_TRUE(HasNote(t, "outside the disk")) << Notes(t);
  MemDisk e(kMiB);
  WriteGpt(e, ThreeParts());
  EditHeaders(e, 512, [](std::byte* h) { StoreLE64(h + 72, uint64_t{1} << 60); });
  EXPECT_EQ(e.Parse().kind, Kind::kNone);
}

TEST(PartitionTableGpt, HeaderSizeOutOfRange) {
  for (uint32_t size : {0u, 91u, 513u, 4096u, 0xFFFFFFFFu}) {
    MemDisk d(kMiB);
    WriteGpt(d, ThreeParts());
    EditHeaders(d, 512, [&](std::byte* h) { StoreLE32(h + 12, size); });
    PartitionTable t = d.Parse();
    EXPECT_EQ(t.kind, Kind::kNone) << size;
    EXPECT_TRUE(HasNote(t, "header size " + std::to_string(size))) << Notes(t);
  }
  // The limits themselves are fine.
  for (uint32_t size : {92u, 512u}) {
    MemDisk d(kMiB);
    GptLayout g = ThreeParts();
    g.header_size = size;
    WriteGpt(d, g);
    EXPECT_EQ(d.Parse().kind, Kind::kGpt) << size;
  }
  MemDisk d(8 * kMiB);
  GptLayout g;
  g.ss = 4096;
  g.header_size = 4096;
  g.parts = {{300, 400, u"x"}};
  WriteGpt(d, g);
  EXPECT_EQ(d.Parse().kind, Kind::kGpt);
}

TEST(PartitionTableGpt, HeaderNotWhereItSaysOrBadUsableRange) {
  MemDisk d(kMiB);
  WriteGpt(d, ThreeParts());
  EditHeaders(d, 512, [](std::byte* h) { StoreLE64(h + 24, LoadLE64(h + 24) + 1); });
  PartitionTable t = d.Parse();
  EXPECT_EQ(t.kind, Kind::kNone);
  EXPECT_TRUE(HasNote(t, "header says it is at LBA")) << Notes(t);

  MemDisk e(kMiB);
  WriteGpt(e, ThreeParts());
  EditHeaders(e, 512, [](std::byte* h) { StoreLE64(h + 48, 2048); });  // one past the last LBA
  PartitionTable u = e.Parse();
  EXPECT_EQ(u.kind, Kind::kNone);
  EXPECT_TRUE(HasNote(u, "usable range")) << Notes(u);
}

TEST(PartitionTableGpt, BadEntriesAreLeftOut) {
  MemDisk d(kMiB);
  GptLayout g;
  g.parts = {{100, 199, u"good"},         {300, 299, u"first>last"}, {500, 2048, u"past end"},
             {0, 10, u"at zero"},         {2047, 2047, u"last lba"}, {1, 1, u"lba 1"},
             {1ull << 63, ~0ull, u"huge"}};
  WriteGpt(d, g);
  PartitionTable t = d.Parse();
  ASSERT_EQ(t.kind, Kind::kGpt) << Notes(t);
  // Linux keeps entries that overlap the GPT's own sectors, and so do we.
  EXPECT_EQ(Numbers(t), (std::vector<unsigned>{1, 5, 6}));
  for (unsigned n : {2, 3, 4, 7})
    EXPECT_TRUE(HasNote(t, "GPT partition " + std::to_string(n) + " lies outside")) << Notes(t);
  EXPECT_EQ(t.partitions[1].offset, 2047 * 512u);
  EXPECT_EQ(t.partitions[1].length, 512u);
}

TEST(PartitionTableGpt, AtMostMaxPartitions) {
  MemDisk d(2 * kMiB);
  GptLayout g;
  g.entries = 512;
  for (unsigned i = 0; i < kMaxPartitions + 40; ++i) g.parts.push_back({200 + i, 200 + i, u"p"});
  WriteGpt(d, g);
  PartitionTable t = d.Parse();
  ASSERT_EQ(t.kind, Kind::kGpt) << Notes(t);
  EXPECT_EQ(t.partitions.size(), kMaxPartitions);
  EXPECT_EQ(t.partitions.back().number, kMaxPartitions);
  EXPECT_TRUE(HasNote(t, "ignored")) << Notes(t);
}

TEST(PartitionTableGpt, UndecodableNameReadsEmpty) {
  MemDisk d(kMiB);
  GptLayout g;
  g.parts = {{100, 199, std::u16string(1, char16_t{0xD800}) + u"x"}, {200, 299, std::u16string(36, u'z')}};
  WriteGpt(d, g);
  PartitionTable t = d.Parse();
  ASSERT_EQ(t.partitions.size(), 2u) << Notes(t);
  EXPECT_EQ(t.partitions[0].label, "");
  EXPECT_EQ(t.partitions[1].label, std::string(36, 'z'));  // all 72 bytes, no NUL
}

TEST(PartitionTableGpt, BackupUsedWhenPrimaryDamaged) {
  MemDisk d(4 * kMiB);
  GptLayout g = ThreeParts();
  g.array_lba = 4096;  // far from the edges, so Touches shows what is watched
  for (auto& p : g.parts) p.first += 5000, p.last += 5000;
  WriteGpt(d, g);
  PartitionTable t = d.Parse();
  ASSERT_EQ(t.kind, Kind::kGpt) << Notes(t);
  EXPECT_TRUE(t.Touches(4096 * 512, 1));
  EXPECT_TRUE(t.Touches(4096 * 512 + 16383, 1));
  EXPECT_FALSE(t.Touches(4096 * 512 + 16384, 1));
  EXPECT_FALSE(t.Touches(4095 * 512, 512));

  *d.at(512 + 60) ^= std::byte{1};  // primary header CRC broken
  PartitionTable u = d.Parse();
  ASSERT_EQ(u.kind, Kind::kGpt) << Notes(u);
  EXPECT_EQ(Numbers(u), (std::vector<unsigned>{1, 2, 4}));
  EXPECT_TRUE(HasNote(u, "backup")) << Notes(u);
  EXPECT_FALSE(u.Touches(4096 * 512, 1));  // the damaged primary's array is not in use

  *d.at(4 * kMiB - 512 + 60) ^= std::byte{1};  // and the backup's
  PartitionTable v = d.Parse();
  EXPECT_EQ(v.kind, Kind::kNone);
  EXPECT_TRUE(HasNote(v, "header CRC mismatch")) << Notes(v);
  EXPECT_TRUE(HasNote(v, "protective MBR without a valid GPT")) << Notes(v);
}

TEST(PartitionTableGpt, ReadErrorsPropagate) {
  MemDisk d(kMiB);
  WriteGpt(d, ThreeParts());
  DiskReader inner = d.Reader();
  for (uint64_t fail_at : {uint64_t{0}, uint64_t{512}, uint64_t{1024}, kMiB - 512}) {
    if (fail_at == kMiB - 512) *d.at(512 + 60) ^= std::byte{1};  // so the backup is read
    DiskReader failing = [&](uint64_t off, std::span<std::byte> out) -> Status {
      if (off == fail_at) return Status::Io("bad block");
      return inner(off, out);
    };
    auto t = ReadPartitionTable(failing, d.size());
    ASSERT_FALSE(t.ok()) << fail_at;
    EXPECT_EQ(t.status().kind(), ErrorKind::kIo);
  }
}

// ---------------------------------------------------------------------------------------
// What a write must be checked against.

TEST(PartitionTableTouches, BlankDiskWatchesItsEdges) {
  MemDisk d(16 * kMiB);
  PartitionTable t = d.Parse();
  EXPECT_EQ(t.kind, Kind::kNone);
  EXPECT_TRUE(t.Touches(0, 1));
  EXPECT_TRUE(t.Touches(kWatchedEdge - 1, 1));
  EXPECT_FALSE(t.Touches(kWatchedEdge, 1));
  EXPECT_TRUE(t.Touches(kWatchedEdge, 16 * kMiB - 2 * kWatchedEdge + 1));
  EXPECT_FALSE(t.Touches(kWatchedEdge, 16 * kMiB - 2 * kWatchedEdge));
  EXPECT_TRUE(t.Touches(16 * kMiB - kWatchedEdge, 1));
  EXPECT_TRUE(t.Touches(16 * kMiB - 1, 1));
  EXPECT_FALSE(t.Touches(16 * kMiB - kWatchedEdge - 1, 1));

  // A disk smaller than two edges is watched whole.
  MemDisk s(kWatchedEdge + 4096);
  PartitionTable u = s.Parse();
  for (uint64_t off = 0; off < s.size(); off += 512) EXPECT_TRUE(u.Touches(off, 512)) << off;
}

TEST(PartitionTableTouches, MbrAndEbrSectors) {
  MemDisk d(16 * kMiB);
  d.Entry(0, 0, 0x83, 2048, 2048);
  d.Entry(0, 1, 0x05, 8192, 8192);
  d.Entry(8192, 0, 0x83, 2048, 1024);
  d.Entry(8192, 1, 0x05, 4096, 4096);
  d.Entry(12288, 0, 0x83, 2048, 1024);
  PartitionTable t = d.Parse();
  ASSERT_EQ(Numbers(t), (std::vector<unsigned>{1, 2, 5, 6}));
  EXPECT_TRUE(t.Touches(0, 512));
  EXPECT_TRUE(t.Touches(8192 * 512, 512));
  EXPECT_TRUE(t.Touches(12288 * 512 + 511, 1));
  EXPECT_TRUE(t.Touches(12288 * 512 - 1, 2));
  EXPECT_FALSE(t.Touches(8192 * 512 + 512, 4096 * 512 - 512));  // between the two EBRs
  EXPECT_FALSE(t.Touches(8192 * 512 - 512, 512));
  EXPECT_FALSE(t.Touches(12288 * 512 + 512, 512));
}

}  // namespace
}  // namespace vimgfs::guest
