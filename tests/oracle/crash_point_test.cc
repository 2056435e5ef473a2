// Kill at every write: each command that rewrites metadata (snapshot create / delete /
// apply, resize grow and shrink, commit, rebase, check -r leaks and -r all, amend of the
// refcount width and the version) is run once to count its host
// writes and syncs, then again stopped dead at each of them in turn (the process killed:
// what was written stays; and a power loss: what was not synced is gone). After every
// stop, the image must check clean or with leaks only, in vimgfs and in qemu-img, and the
// guest disk and the snapshot list must be as they were before the command or after it.
// docs/ARCHITECTURE.md, "Crash ordering": a crash may leak clusters, never corrupt.
#include <gtest/gtest.h>

#include <cstring>
#include <functional>

#include "support/image_internals.h"
#include "formats/qcow2/qcow2_internal.h"
#include "support/power_loss_env.h"
#include "support/test_util.h"
#include "vimgfs/image.h"

namespace vimgfs {
namespace {

using test::Quote;
using test::RunCommand;

const std::string kBase = "/m/base.img";
const std::string kTop = "/m/top.img";
const std::string kOther = "/m/other.img";
constexpr uint64_t kDisk = 1 << 20;

Result<std::vector<std::byte>> ReadFile(Env& env, const std::string& path) {
  ASSIGN_OR_RETURN(auto f, env.Open(path, OpenMode::kReadOnly));
  ASSIGN_OR_RETURN(uint64_t size, f->Size());
  std::vector<std::byte> buf(size);
  RETURN_IF_ERROR(f->PRead(0, buf));
  return buf;
}

// Copies the files that exist in `from` to `to` (a fresh state for each run).
void CopyFiles(Env& from, Env& to) {
  for (const std::string& p : {kBase, kTop, kOther}) {
    auto st = from.Stat(p);
    if (!st.ok() || !st->exists) continue;
    auto data = ReadFile(from, p);
    ASSERT_TRUE(data.ok()) << data.status().message();
    auto f = to.Create(p, false);
    ASSERT_TRUE(f.ok());
    ASSERT_TRUE((*f)->PWrite(0, *data).ok());
  }
}

std::unique_ptr<Image> Open(Env* env, const std::string& path, bool read_only, bool backing = true) {
  OpenOptions o;
  o.env = env;
  o.read_only = read_only;
  o.open_backing = backing;
  auto img = Image::Open(path, o);
  EXPECT_TRUE(img.ok()) << path << ": " << img.status().message();
  return img.ok() ? std::move(img).value() : nullptr;
}

std::vector<std::byte> Pattern(size_t n, uint64_t seed) {
  auto r = test::RandomBytes(n, seed);
  std::vector<std::byte> out(n);
  std::memcpy(out.data(), r.data(), n);
  return out;
}

// What a user sees of an image: its disk (through the backing chain) and its snapshots.
struct View {
  std::vector<std::byte> disk;
  std::vector<std::string> snapshots;
  bool operator==(const View&) const = default;
};

View Look(Env* env, const std::string& path) {
  View v;
  auto img = Open(env, path, true);
  if (!img) return v;
  v.disk.resize(img->size());
  Status s = img->Read(0, v.disk);
  EXPECT_TRUE(s.ok()) << s.message();
  for (const SnapshotInfo& si : img->Info().snapshots) v.snapshots.push_back(si.id + ":" + si.name);
  return v;
}

// ---- the commands, as the CLI runs them, with an Env to run in ----

Status Snapshot(Env* env, char action, const std::string& name) {
  auto img = Open(env, kTop, false, false);
  if (!img) return Status::Corrupt("open failed");
  Status s = action == 'c'   ? img->SnapshotCreate(name)
             : action == 'a' ? img->SnapshotApply(name)
                             : img->SnapshotDelete(name);
  Status c = img->Close();
  return s.ok() ? c : s;
}

Status Resize(Env* env, uint64_t size) {
  auto img = Open(env, kTop, false, false);
  if (!img) return Status::Corrupt("open failed");
  Status s = ImageInternals::Map(*img).Resize(size, true);
  Status c = img->Close();
  return s.ok() ? c : s;
}

// cmd_resize.cc growing an overlay over a longer backing file: the grown part must read
// zeros (the engine settles the last cluster, the format zeroes past the old end).
Status GrowOverBacking(Env* env) {
  auto img = Open(env, kTop, false, true);
  if (!img) return Status::Corrupt("open failed");
  Status s = img->Resize(kDisk, false);
  Status c = img->Close();
  return s.ok() ? c : s;
}

// cmd_commit.cc: everything the overlay has goes into its backing file, then the overlay
// is emptied.
Status Commit(Env* env) {
  {
    auto top = Open(env, kTop, true);
    auto base = Open(env, kBase, false);
    if (!top || !base) return Status::Corrupt("open failed");
    auto runs = top->Map(0, top->size());
    RETURN_IF_ERROR(runs.status());
    for (const BlockStatus& b : *runs) {
      if (!b.present || b.depth != 0) continue;
      std::vector<std::byte> buf(b.length);
      RETURN_IF_ERROR(top->Read(b.offset, buf));
      RETURN_IF_ERROR(base->Write(b.offset, buf));
    }
    RETURN_IF_ERROR(base->Close());
  }
  auto top = Open(env, kTop, false, false);
  if (!top) return Status::Corrupt("open failed");
  Status s = top->MakeEmpty();
  if (s.kind() == ErrorKind::kUnsupported) s = Status::Ok();
  Status c = top->Close();
  return s.ok() ? c : s;
}

// cmd_rebase.cc (safe mode): what the image reads from its old backing file and would read
// differently from the new one is copied in, then the reference changes.
Status Rebase(Env* env) {
  auto img = Open(env, kTop, false);
  auto other = Open(env, kOther, true);
  if (!img || !other) return Status::Corrupt("open failed");
  const uint64_t unit = img->cluster_size();
  auto runs = img->Map(0, img->size(), true);
  RETURN_IF_ERROR(runs.status());
  for (const BlockStatus& r : *runs) {
    if (r.depth == 0) continue;
    for (uint64_t pos = r.offset; pos < r.offset + r.length;) {
      uint64_t n = std::min(unit - pos % unit, r.offset + r.length - pos);
      std::vector<std::byte> a(n), b(n);
      RETURN_IF_ERROR(img->backing()->Read(pos, a));
      RETURN_IF_ERROR(other->Read(pos, b));
      if (a != b) RETURN_IF_ERROR(img->Write(pos, a));
      pos += n;
    }
  }
  RETURN_IF_ERROR(img->SetBacking(BackingRef{"other.img", img->backing()->format()}));
  return img->Close();
}

// cmd_amend.cc: options of an existing image.
Status Amend(Env* env, std::map<std::string, std::string> options) {
  auto img = Open(env, kTop, false, false);
  if (!img) return Status::Corrupt("open failed");
  AmendRequest req;
  req.options = std::move(options);
  Status s = img->Amend(req);
  Status c = img->Close();
  return s.ok() ? c : s;
}

// cmd_bitmap.cc: a bitmap removed, one added and merged into, one cleared; the new set is
// stored at close, the removed one's clusters freed after the header switch.
Status BitmapChanges(Env* env) {
  // The open writes too (the bitmaps marked in use): a stop there is one of the cases.
  OpenOptions o;
  o.env = env;
  o.open_backing = false;
  ASSIGN_OR_RETURN(std::unique_ptr<Image> img, Image::Open(kTop, o));
  using Op = Image::BitmapChange::Op;
  Status s;
  for (const Image::BitmapChange& c : {Image::BitmapChange{Op::kRemove, "a", 0, true, "", nullptr, 0},
                                       Image::BitmapChange{Op::kAdd, "c", 4096, true, "", nullptr, 0},
                                       Image::BitmapChange{Op::kMerge, "c", 0, true, "b", nullptr, 0},
                                       Image::BitmapChange{Op::kClear, "b", 0, true, "", nullptr, 0}}) {
    if (s.ok()) s = img->ChangeBitmap(c);
  }
  Status c = img->Close();
  return s.ok() ? c : s;
}

Status Repair(Env* env, RepairMode mode) {
  auto img = Open(env, kTop, false, false);
  if (!img) return Status::Corrupt("open failed");
  auto r = img->Check(mode);
  Status c = img->Close();
  return r.ok() ? c : r.status();
}

// ---- images to run them on ----

Status Create(Env* env, const std::string& format, const std::string& path, uint64_t size,
              std::map<std::string, std::string> options, const std::string& backing = "",
              const std::string& backing_format = "") {
  CreateContext ctx;
  ctx.env = env;
  ctx.path = path;
  ctx.size = size;
  ctx.options = std::move(options);
  if (!backing.empty()) ctx.backing = BackingRef{backing, backing_format};
  return Image::Create(format, ctx);
}

// Data spread over several L2 tables and refcount blocks, some of it zeroed and discarded.
Status Fill(Env* env, const std::string& path, uint64_t seed) {
  auto img = Open(env, path, false);
  if (!img) return Status::Corrupt("open failed");
  const uint64_t size = img->size();
  for (uint64_t off : {uint64_t{0}, size / 7, size / 3, size / 2 + 4096, size - 70000}) {
    auto data = Pattern(40000, seed + off);
    RETURN_IF_ERROR(img->Write(off, data));
  }
  RETURN_IF_ERROR(img->WriteZeroes(size / 3, 8192, true));
  return img->Close();
}

// Leaked clusters (allocated, referenced by nothing), for check -r to repair.
Status Leak(Env* env, const std::string& path) {
  auto img = Open(env, path, false, false);
  if (!img) return Status::Corrupt("open failed");
  auto* q = dynamic_cast<qcow2::Qcow2Map*>(&ImageInternals::Map(*img));
  if (!q) return Status::Unsupported("not qcow2");
  for (int i = 0; i < 3; i++) RETURN_IF_ERROR(q->AllocClusters(2 + i).status());
  RETURN_IF_ERROR(q->FlushAll());
  return img->Close();
}

// A refcount of 0 for the active L1 table: check -r all must rebuild the whole refcount
// structure.
Status LoseL1Refcount(Env* env, const std::string& path) {
  auto img = Open(env, path, false, false);
  if (!img) return Status::Corrupt("open failed");
  auto* q = dynamic_cast<qcow2::Qcow2Map*>(&ImageInternals::Map(*img));
  if (!q) return Status::Unsupported("not qcow2");
  RETURN_IF_ERROR(q->SetRefcount(q->header_.l1_table_offset >> q->cluster_bits_, 0));
  RETURN_IF_ERROR(q->FlushAll());
  return img->Close();
}

struct Case {
  std::string name;
  const char* format;
  std::map<std::string, std::string> options;
  std::function<Status(Env*)> setup;    // makes kTop (and kBase / kOther) in a MemEnv
  std::function<Status(Env*)> command;  // what is killed
  // The image starts corrupt (a repair is what is killed): a stop must leave it as
  // repairable as before, so the judge runs the repair again first, as a user would.
  bool repair_again = false;
};
void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

std::function<Status(Env*)> WithSnapshots(const char* format, std::map<std::string, std::string> options) {
  return [=](Env* env) -> Status {
    RETURN_IF_ERROR(Create(env, format, kTop, kDisk, options));
    RETURN_IF_ERROR(Fill(env, kTop, 1));
    RETURN_IF_ERROR(Snapshot(env, 'c', "one"));
    RETURN_IF_ERROR(Fill(env, kTop, 2));
    RETURN_IF_ERROR(Snapshot(env, 'c', "two"));
    return Fill(env, kTop, 3);
  };
}

// Bitmaps "a" and "b" (enabled), then writes they record.
std::function<Status(Env*)> WithBitmaps(const char* format, std::map<std::string, std::string> options) {
  return [=](Env* env) -> Status {
    RETURN_IF_ERROR(Create(env, format, kTop, kDisk, options));
    {
      auto img = Open(env, kTop, false, false);
      if (!img) return Status::Corrupt("open failed");
      for (const char* name : {"a", "b"}) {
        Image::BitmapChange add;
        add.name = name;
        RETURN_IF_ERROR(img->ChangeBitmap(add));
      }
      RETURN_IF_ERROR(img->Close());
    }
    return Fill(env, kTop, 1);
  };
}

std::function<Status(Env*)> Plain(const char* format, std::map<std::string, std::string> options) {
  return [=](Env* env) -> Status {
    RETURN_IF_ERROR(Create(env, format, kTop, kDisk, options));
    return Fill(env, kTop, 1);
  };
}

// base (filled) <- top (filled elsewhere); other: a different backing file for rebase.
// The backing files are of base_format, the overlay qcow2.
std::function<Status(Env*)> Chain(const char* base_format, std::map<std::string, std::string> base_options,
                                  std::map<std::string, std::string> options) {
  return [=](Env* env) -> Status {
    RETURN_IF_ERROR(Create(env, base_format, kBase, kDisk, base_options));
    RETURN_IF_ERROR(Fill(env, kBase, 10));
    // Like the base but for two places, so rebase has a few clusters to copy.
    RETURN_IF_ERROR(Create(env, base_format, kOther, kDisk, base_options));
    RETURN_IF_ERROR(Fill(env, kOther, 10));
    {
      auto other = Open(env, kOther, false);
      if (!other) return Status::Corrupt("open failed");
      RETURN_IF_ERROR(other->Write(kDisk / 8, Pattern(9000, 20)));
      RETURN_IF_ERROR(other->Write(kDisk - 5000, Pattern(5000, 21)));
      RETURN_IF_ERROR(other->Close());
    }
    RETURN_IF_ERROR(Create(env, "qcow2", kTop, kDisk, options, "base.img", base_format));
    auto img = Open(env, kTop, false);
    if (!img) return Status::Corrupt("open failed");
    for (uint64_t off : {uint64_t{4096}, kDisk / 4, kDisk / 2 - 512})
      RETURN_IF_ERROR(img->Write(off, Pattern(30000, off)));
    return img->Close();
  };
}

class CrashPointTest : public ::testing::TestWithParam<Case> {
 protected:
  // Checks the state a stop left: clean or leaks only, and as before or after. Files the
  // command did not touch are not checked again.
  void Judge(Env* env, Env* pristine, const View& before, const View& after, const std::string& where) {
    SCOPED_TRACE(where);
    if (GetParam().repair_again && *ReadFile(*env, kTop) != *ReadFile(*pristine, kTop)) {
      Status again = Repair(env, RepairMode::kAll);
      ASSERT_TRUE(again.ok()) << "repairing again: " << again.message();
    }
    std::vector<std::string> changed;
    for (const std::string& p : {kBase, kTop, kOther}) {
      auto st = env->Stat(p);
      if (!st.ok() || !st->exists) continue;
      auto data = ReadFile(*env, p);
      ASSERT_TRUE(data.ok());
      // qemu-img check needs the backing files beside the image.
      test::WriteWholeFile(
          dir_.File(p.substr(p.rfind('/') + 1)),
          std::vector<uint8_t>(reinterpret_cast<const uint8_t*>(data->data()),
                               reinterpret_cast<const uint8_t*>(data->data()) + data->size()));
      auto old = ReadFile(*pristine, p);
      if (!old.ok() || *old != *data) changed.push_back(p);
    }
    for (const std::string& p : changed) {
      auto img = Open(env, p, true, false);
      ASSERT_TRUE(img) << p;
      auto report = img->Check(RepairMode::kNone);
      if (report.ok()) {
        EXPECT_EQ(report->corruptions, 0)
            << p << ": " << (report->messages.empty() ? "" : report->messages[0]);
        EXPECT_EQ(report->check_errors, 0) << p;
      } else {
        EXPECT_EQ(report.status().kind(), ErrorKind::kUnsupported) << report.status().message();
      }
      auto chk = RunCommand("qemu-img check " + Quote(dir_.File(p.substr(p.rfind('/') + 1))));
      // 63: qemu cannot check the format either (qcow).
      const bool uncheckable = !report.ok() && chk.exit_code == 63;
      EXPECT_TRUE(chk.exit_code == 0 || chk.exit_code == 3 || uncheckable)
          << p << ": qemu-img check says " << chk.exit_code << ":\n"
          << chk.out << chk.err;
    }
    View now = Look(env, kTop);
    EXPECT_TRUE(now.disk == before.disk || now.disk == after.disk)
        << "the disk reads as neither before nor after";
    EXPECT_TRUE(now.snapshots == before.snapshots || now.snapshots == after.snapshots)
        << "the snapshot list is neither the one before nor after";
  }

  test::TempDir dir_;
};

TEST_P(CrashPointTest, EveryStopLeavesACleanImageAsBeforeOrAfter) {
  REQUIRE_QEMU_IMG();
  const Case& c = GetParam();
  auto pristine = NewMemEnv();
  Status s = c.setup(pristine.get());
  ASSERT_TRUE(s.ok()) << s.message();
  const View before = Look(pristine.get(), kTop);

  // A clean run: the view after, and how many writes and syncs the command makes.
  auto done = NewMemEnv();
  CopyFiles(*pristine, *done);
  int total;
  {
    test::PowerLossEnv env(done.get());
    s = c.command(&env);
    ASSERT_TRUE(s.ok()) << s.message();
    total = env.ops();
  }
  const View after = Look(done.get(), kTop);
  ASSERT_GT(total, 0);

  int stops = 0;
  for (double keep : {1.0, 0.0}) {
    for (int n = 1; n <= total && !HasFatalFailure(); n++) {
      auto mem = NewMemEnv();
      CopyFiles(*pristine, *mem);
      {
        test::PowerLossEnv env(mem.get());
        env.CrashAtOp(n, n, keep);
        (void)c.command(&env);  // fails: it was stopped
        ASSERT_TRUE(env.crashed()) << "op " << n << " of " << total << " was never reached";
      }
      Judge(mem.get(), pristine.get(), before, after,
            fmt::format("{} at write/sync {} of {}", keep == 1.0 ? "killed" : "power lost", n, total));
      stops++;
    }
  }
  RecordProperty("crash_points", stops);
  std::printf("%s: %d crash points\n", c.name.c_str(), stops);
}

std::vector<Case> Cases() {
  std::vector<Case> out;
  struct Opt {
    const char* name;
    std::map<std::string, std::string> o;
  };
  const std::vector<Opt> opts = {
      {"c512", {{"cluster_size", "512"}}},
      {"c4k_v2", {{"cluster_size", "4096"}, {"compat", "0.10"}}},
      {"c4k_refcount8", {{"cluster_size", "4096"}, {"refcount_bits", "8"}}},
      {"c64k_extended_l2", {{"extended_l2", "on"}}},
      {"c4k_lazy", {{"cluster_size", "4096"}, {"lazy_refcounts", "on"}}},
  };
  for (const Opt& o : opts) {
    auto name = [&](const char* what) { return std::string("qcow2_") + what + "_" + o.name; };
    out.push_back({name("snapshot_create"), "qcow2", o.o, WithSnapshots("qcow2", o.o),
                   [](Env* e) { return Snapshot(e, 'c', "three"); }});
    out.push_back({name("snapshot_delete"), "qcow2", o.o, WithSnapshots("qcow2", o.o),
                   [](Env* e) { return Snapshot(e, 'd', "one"); }});
    out.push_back({name("snapshot_apply"), "qcow2", o.o, WithSnapshots("qcow2", o.o),
                   [](Env* e) { return Snapshot(e, 'a', "one"); }});
    out.push_back({name("resize_grow"), "qcow2", o.o, Plain("qcow2", o.o),
                   [](Env* e) { return Resize(e, 64 * kDisk); }});
    // qemu refuses to resize a v2 image that has snapshots (so does vimgfs): v2 shrinks
    // without them.
    const bool v2 = o.o.count("compat") && o.o.at("compat") == "0.10";
    out.push_back({name("resize_shrink"), "qcow2", o.o,
                   v2 ? Plain("qcow2", o.o) : WithSnapshots("qcow2", o.o),
                   [](Env* e) { return Resize(e, kDisk / 3 & ~uint64_t{511}); }});
    out.push_back({name("commit"), "qcow2", o.o, Chain("qcow2", o.o, o.o), Commit});
    // The overlay shrunk to an unaligned size first: its last cluster keeps data past the
    // end. (v2 has no zero clusters: qemu refuses such a grow, and so does vimgfs.)
    if (!v2)
      out.push_back({name("resize_grow_over_backing"), "qcow2", o.o,
                     [=](Env* e) -> Status {
                       RETURN_IF_ERROR(Chain("qcow2", o.o, o.o)(e));
                       return Resize(e, kDisk / 3 & ~uint64_t{511});
                     },
                     GrowOverBacking});
    out.push_back({name("rebase"), "qcow2", o.o, Chain("qcow2", o.o, o.o), Rebase});
    out.push_back({name("check_repair_leaks"), "qcow2", o.o,
                   [=](Env* e) -> Status {
                     RETURN_IF_ERROR(WithSnapshots("qcow2", o.o)(e));
                     return Leak(e, kTop);
                   },
                   [](Env* e) { return Repair(e, RepairMode::kLeaks); }});
    out.push_back({name("check_repair_all"), "qcow2", o.o,
                   [=](Env* e) -> Status {
                     RETURN_IF_ERROR(WithSnapshots("qcow2", o.o)(e));
                     return Leak(e, kTop);
                   },
                   [](Env* e) { return Repair(e, RepairMode::kAll); }});
    // amend: a new refcount width (snapshots make counts above 1), and a version change
    // (a downgrade turns zero clusters into data clusters, over a backing file too).
    const bool extended_l2 = o.o.count("extended_l2") > 0;
    const char* width = o.o.count("refcount_bits") ? "64" : "4";
    if (!v2)
      out.push_back({name("amend_refcount_bits"), "qcow2", o.o, WithSnapshots("qcow2", o.o), [=](Env* e) {
                       return Amend(e, {{"refcount_bits", width}});
                     }});
    if (!v2) out.push_back({name("bitmap_changes"), "qcow2", o.o, WithBitmaps("qcow2", o.o), BitmapChanges});
    if (v2) {
      out.push_back({name("amend_upgrade"), "qcow2", o.o, WithSnapshots("qcow2", o.o), [](Env* e) {
                       return Amend(e, {{"compat", "1.1"}});
                     }});
    } else if (!extended_l2 && !o.o.count("refcount_bits")) {
      out.push_back({name("amend_downgrade"), "qcow2", o.o, WithSnapshots("qcow2", o.o), [](Env* e) {
                       return Amend(e, {{"compat", "0.10"}});
                     }});
      out.push_back({name("amend_downgrade_backed"), "qcow2", o.o, Chain("qcow2", o.o, o.o), [](Env* e) {
                       return Amend(e, {{"compat", "0.10"}});
                     }});
    }
    out.push_back({name("check_repair_rebuild"), "qcow2", o.o,
                   [=](Env* e) -> Status {
                     RETURN_IF_ERROR(WithSnapshots("qcow2", o.o)(e));
                     return LoseL1Refcount(e, kTop);
                   },
                   [](Env* e) { return Repair(e, RepairMode::kAll); }, true});
  }
  // The other writable formats where a command rewrites their metadata: commit into them,
  // VDI's resize.
  const std::map<std::string, std::string> top = {{"cluster_size", "4096"}};
  for (const Opt& o : std::vector<Opt>{{"vdi", {}}, {"vdi_static", {{"static", "on"}}}}) {
    out.push_back({std::string("vdi_commit_") + o.name, "vdi", o.o, Chain("vdi", o.o, top), Commit});
    out.push_back({std::string("vdi_resize_grow_") + o.name, "vdi", o.o, Plain("vdi", o.o),
                   [](Env* e) { return Resize(e, 2 * kDisk); }});
  }
  out.push_back({"qcow_commit", "qcow", {}, Chain("qcow", {}, top), Commit});
  for (const Opt& o : std::vector<Opt>{{"vmdk", {}}, {"vmdk_zeroed_grain", {{"zeroed_grain", "on"}}}})
    out.push_back({std::string("vmdk_commit_") + o.name, "vmdk", o.o, Chain("vmdk", o.o, top), Commit});
  for (const Opt& o : std::vector<Opt>{{"qed", {{"cluster_size", "4096"}, {"table_size", "2"}}}}) {
    out.push_back({std::string("qed_commit_") + o.name, "qed", o.o, Chain("qed", o.o, top), Commit});
    out.push_back({std::string("qed_resize_grow_") + o.name, "qed", o.o, Plain("qed", o.o),
                   [](Env* e) { return Resize(e, 2 * kDisk); }});
  }
  return out;
}

INSTANTIATE_TEST_SUITE_P(Commands, CrashPointTest, ::testing::ValuesIn(Cases()),
                         [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace vimgfs
