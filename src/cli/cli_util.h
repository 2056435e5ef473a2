// Shared pieces of the qemu-img compatible commands: option parsing in qemu-img's
// manner, error lines, qemu's size and JSON formatting, and opening images.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli/option_parser.h"
#include "vimgfs/image.h"
#include "vimgfs/status.h"

namespace vimgfs::cli {

// Prints "vimgfs: <msg>" on stderr.
// Run under the name qemu-img (a symlink), messages say "qemu-img:" as qemu-img's do, so
// scripts that match them keep working. main() sets it from argv[0].
void SetProgramName(const char* argv0);
const std::string& ProgramName();  // "vimgfs" or "qemu-img"
bool RunAsQemuImg();
// "PROGRAM: msg" on stderr.
void PrintError(const std::string& msg);
// Prints "vimgfs: <path>: <msg>" unless msg already names path, then "vimgfs: <msg>".
void PrintFileError(const std::string& path, const Status& s);
// msg without a leading "'path': " (the format layer names the file it failed on).
std::string StripPathPrefix(const std::string& path, const std::string& msg);
// A lock conflict in qemu-img's two lines when run as qemu-img ("... lock\nIs another
// process using the image [x.qcow2]?"); other messages as they are.
std::string AsQemuWordsLocks(const Status& s);
// The message of an error opening `path`, as qemu-img words it: "Could not open 'x': ...".
std::string OpenErrorMessage(const std::string& path, const Status& s);
// Reports a bad command line like qemu-img: the message and a pointer to --help. Returns 1.
int UsageError(const std::string& command, const std::string& msg);

// qemu's size_to_str: "1 GiB", "396 KiB", "1.5 MiB" (three significant digits).
std::string SizeToStr(uint64_t v);

// Serializes JSON exactly as qemu's QObject JSON writer does (4-space indent, object keys
// in QDict hash-bucket order, as qemu-img prints them).
std::string QemuJson(const nlohmann::ordered_json& j);
// Iterates an object's keys in qemu's QDict order.
std::vector<std::string> QemuKeyOrder(const nlohmann::ordered_json& obj);
// qemu-img info's human dump of a "format-specific" data object.
std::string QemuHumanDump(const nlohmann::ordered_json& j, int indent);

// Splits qemu -o text ("a=1,b=x,,y") into ordered pairs; ",," is a literal comma and a
// bare key means "on". Appends to *out (later keys override earlier ones).
Status ParseOptionList(const std::string& text, std::vector<std::pair<std::string, std::string>>* out);
bool IsHelpOption(const std::string& text);  // "help" or "?" inside an -o list

struct ImageOpen {
  std::string format;  // -f; empty: probe
  bool read_only = true;
  bool untrusted = false;
  bool open_backing = true;
  std::string snapshot;
  Env* env = nullptr;  // nullptr: Env::Default()
  // -U/--force-share: take no lock. Otherwise the image is locked as qemu-img locks it
  // (shared for readers), so commands refuse an image a VM or a mount is writing, and so
  // are its backing files (shared) unless lock_backing is off.
  bool force_share = false;
  // Off where the same command then opens a file of this chain for writing (commit): OFD
  // locks cannot tell one process's opens apart, so it would refuse itself.
  bool lock_backing = true;
  // With lock_backing off: the image's own files are locked as a writer's although it is
  // opened read-only (commit writes it later; qemu-img opens it read-write from the start).
  bool lock_as_writer = false;
  // A raw image read lets others write it (qemu-img's info, map, check, compare, measure,
  // dd and bench do), unless the command needs its data unchanged meanwhile: convert's
  // sources, which qemu-img convert locks against writers.
  bool keep_raw_unchanged = false;
  // The name is a --image-opts list (json: names are always recognised).
  bool image_opts = false;
  bool for_check = false;     // OpenOptions::for_check
  bool keep_bitmaps = false;  // OpenOptions::keep_bitmaps
  bool no_io = false;         // OpenOptions::no_io (info)
  std::string key_secret;     // OpenOptions::key_secret; an image spec's key-secret= wins
};
// Opens an image; on failure prints the error line and returns nullptr.
std::unique_ptr<Image> OpenOrReport(const std::string& path, const ImageOpen& o);
Result<std::unique_ptr<Image>> OpenImage(const std::string& path, const ImageOpen& o);

// A file name from the command line as qemu's file protocol takes it: "file:" stripped
// ("./" put before a name that would then look like a protocol prefix, "a:b" -> "./a:b").
// Any other prefix before the first '/' names a protocol vimgfs does not have: "Unknown
// protocol 'x'", as qemu-img says for a protocol it does not know.
Result<std::string> HostFilename(const std::string& name);

// A -l argument (convert, measure) as qemu-img takes it: "snapshot.name=NAME",
// "snapshot.id=ID" or a bare name or ID, into *snapshot. Another "snapshot.*" key prints
// qemu-img's two error lines and returns false.
bool ParseSnapshotParam(const std::string& arg, std::string* snapshot);
// The same as an OptionParser handler for -l.
OptionParser::Handler SnapshotParamInto(std::string* snapshot);

// qemu-img's cvtnum_full: a size argument (ParseSize) in [min, max] (cvtnum: 0 to 2^63 - 1).
// On failure prints qemu-img's error lines naming `what` ("image size") and returns nullopt.
std::optional<uint64_t> CvtNum(const std::string& what, const std::string& value, uint64_t min = 0,
                               uint64_t max = INT64_MAX);
// An OptionParser handler for -r (convert, commit): qemu-img's "rate limit" size.
OptionParser::Handler RateLimitInto(uint64_t* rate);

// The file a backing reference names, as qemu finds it (bdrv_get_full_backing_filename):
// a name that is absolute or has a protocol prefix stays; another is relative to the
// image's folder ("dir/top" + "base" -> "dir/base", "file:top" + "base" -> "file:base").
std::string PathCombine(const std::string& base, const std::string& name);

// Whether `mode` is one of qemu's cache modes (-t/-T): none, writeback, unsafe,
// directsync, writethrough.
bool IsCacheMode(const std::string& mode);
// A cache mode that bypasses the host's page cache (qemu's cache.direct=on): none, off,
// directsync. Files are then opened through Env::DefaultDirect() (or NewDirectIoEnv).
bool IsDirectCacheMode(const std::string& mode);
// A -t (source = false) or -T (source = true) argument, as qemu-img checks it: an unknown
// mode prints "Invalid cache option: X" ("Invalid source cache option: X") and returns
// false; empty is the default. The Env the files it applies to are opened through.
bool CheckCacheMode(const std::string& mode, bool source);
Env* CacheModeEnv(const std::string& mode);

// Whether stdout is a terminal (progress bars).
bool StdoutIsTty();

// qemu-img's -p progress figure (util/qemu-progress.c): "    (12.34/100%)\r" on stdout,
// terminal or not, whenever the figure moved by more than one point, or is 0 or 100; a
// newline at the end. The figure is a float, as qemu's.
class Progress {
 public:
  explicit Progress(bool enabled) : enabled_(enabled) {}
  ~Progress() { End(); }
  void Start() { Print(0.0f); }  // "(0.00/100%)"
  void Update(double fraction) { Print(static_cast<float>(fraction * 100.0)); }
  void UpdatePercent(double percent) { Print(static_cast<float>(percent)); }
  void Done() {  // success: 100, then the newline
    Print(100.0f);
    End();
  }
  void End();  // the newline, once (also after a failure)

 private:
  void Print(float percent);
  bool enabled_;
  bool ended_ = false;
  float current_ = 0, last_print_ = 0;
};

}  // namespace vimgfs::cli
