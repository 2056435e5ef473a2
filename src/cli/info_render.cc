#include "cli/info_render.h"

#include <cinttypes>
#include <cstdio>
#include <ctime>

#include "cli/cli_util.h"

namespace vimgfs::cli {

nlohmann::ordered_json SnapshotJson(const SnapshotInfo& s) {
  nlohmann::ordered_json j;
  j["id"] = s.id;
  j["name"] = s.name;
  j["vm-state-size"] = s.vm_state_size;
  j["date-sec"] = s.date_sec;
  j["date-nsec"] = s.date_nsec;
  j["vm-clock-sec"] = s.vm_clock_nsec / 1000000000ull;
  j["vm-clock-nsec"] = s.vm_clock_nsec % 1000000000ull;
  if (s.icount != UINT64_MAX) j["icount"] = s.icount;
  return j;
}

namespace {

nlohmann::ordered_json LuksJson(const LuksDetails& d);

nlohmann::ordered_json Qcow2Json(const Qcow2Details& d) {
  nlohmann::ordered_json data;
  data["compat"] = d.v3 ? "1.1" : "0.10";
  data["compression-type"] = d.zstd ? "zstd" : "zlib";
  if (d.v3) data["lazy-refcounts"] = d.lazy_refcounts;
  if (!d.bitmaps.empty()) {
    nlohmann::ordered_json list = nlohmann::ordered_json::array();
    for (const Qcow2Bitmap& b : d.bitmaps) {
      nlohmann::ordered_json flags = nlohmann::ordered_json::array();
      if (b.in_use) flags.push_back("in-use");
      if (b.auto_enabled) flags.push_back("auto");
      list.push_back({{"flags", flags}, {"name", b.name}, {"granularity", b.granularity}});
    }
    data["bitmaps"] = list;
  }
  data["refcount-bits"] = d.refcount_bits;
  if (!d.encrypt_format.empty()) {
    nlohmann::ordered_json e = d.encrypt ? LuksJson(*d.encrypt) : nlohmann::ordered_json::object();
    e["format"] = d.encrypt_format;
    data["encrypt"] = e;
  }
  if (d.data_file) data["data-file"] = *d.data_file;
  if (d.has_data_file) data["data-file-raw"] = d.data_file_raw;
  if (d.v3) {
    data["corrupt"] = d.corrupt;
    data["extended-l2"] = d.extended_l2;
  }
  return data;
}

nlohmann::ordered_json VmdkJson(const VmdkDetails& d) {
  nlohmann::ordered_json extents = nlohmann::ordered_json::array();
  for (const VmdkExtentDetails& e : d.extents) {
    nlohmann::ordered_json x;
    if (e.compressed) x["compressed"] = true;
    x["virtual-size"] = e.virtual_size;
    x["filename"] = e.filename;
    if (e.cluster_size) x["cluster-size"] = e.cluster_size;
    x["format"] = e.format;
    extents.push_back(x);
  }
  return {{"cid", d.cid}, {"parent-cid", d.parent_cid}, {"create-type", d.create_type}, {"extents", extents}};
}

// qemu's QCryptoBlockInfoLUKS.
nlohmann::ordered_json LuksJson(const LuksDetails& d) {
  nlohmann::ordered_json data;
  data["ivgen-alg"] = d.ivgen_alg;
  if (!d.ivgen_hash_alg.empty()) data["ivgen-hash-alg"] = d.ivgen_hash_alg;
  data["hash-alg"] = d.hash_alg;
  data["cipher-alg"] = d.cipher_alg;
  data["uuid"] = d.uuid;
  data["cipher-mode"] = d.cipher_mode;
  nlohmann::ordered_json slots = nlohmann::ordered_json::array();
  for (const LuksSlotDetails& s : d.slots) {
    nlohmann::ordered_json x;
    x["active"] = s.active;
    if (s.active) x["iters"] = s.iterations;
    x["key-offset"] = s.key_offset;
    if (s.active) x["stripes"] = s.stripes;
    slots.push_back(x);
  }
  data["slots"] = slots;
  data["payload-offset"] = d.payload_offset;
  data["master-key-iters"] = d.master_key_iterations;
  return data;
}

}  // namespace

nlohmann::ordered_json FormatSpecificJson(const std::string& format, const FormatDetails& details) {
  nlohmann::ordered_json data;
  if (const auto* q = std::get_if<Qcow2Details>(&details))
    data = Qcow2Json(*q);
  else if (const auto* v = std::get_if<VmdkDetails>(&details))
    data = VmdkJson(*v);
  else if (const auto* l = std::get_if<LuksDetails>(&details))
    data = LuksJson(*l);
  else
    return nullptr;
  return {{"type", format}, {"data", std::move(data)}};
}

std::string SnapshotTableHeader() {
  char buf[128];
  std::snprintf(buf, sizeof buf, "%-10s%-17s%8s%20s%13s%11s", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK",
                "ICOUNT");
  return buf;
}

std::string SnapshotTableRow(const SnapshotInfo& s) {
  char date[64] = "";
  time_t t = static_cast<time_t>(s.date_sec);
  struct tm tm;
  if (localtime_r(&t, &tm)) std::strftime(date, sizeof date, "%Y-%m-%d %H:%M:%S", &tm);
  uint64_t secs = s.vm_clock_nsec / 1000000000ull;
  char clock[64];
  std::snprintf(clock, sizeof clock, "%02d:%02d:%02d.%03d", static_cast<int>(secs / 3600),
                static_cast<int>((secs / 60) % 60), static_cast<int>(secs % 60),
                static_cast<int>((s.vm_clock_nsec / 1000000) % 1000));
  char icount[32] = "";
  if (s.icount != UINT64_MAX)
    std::snprintf(icount, sizeof icount, "%" PRId64, static_cast<int64_t>(s.icount));
  std::string size = SizeToStr(s.vm_state_size);
  char buf[512];
  std::snprintf(buf, sizeof buf, "%-9s %-16s %8s%20s%13s%11s", s.id.c_str(), s.name.c_str(), size.c_str(),
                date, clock, icount);
  return buf;
}

std::string HumanImageInfo(const nlohmann::ordered_json& j) {
  std::string out;
  uint64_t vsize = j.value("virtual-size", uint64_t{0});
  out += fmt::format("image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\n", j.value("filename", ""),
                     j.value("format", ""), SizeToStr(vsize), vsize);
  if (j.contains("actual-size")) {
    out += "disk size: " + SizeToStr(j["actual-size"].get<uint64_t>()) + "\n";
  } else {
    out += "disk size: unavailable\n";
  }
  if (j.value("encrypted", false)) out += "encrypted: yes\n";
  if (j.contains("cluster-size")) out += fmt::format("cluster_size: {}\n", j["cluster-size"].get<uint64_t>());
  if (j.value("dirty-flag", false)) out += "cleanly shut down: no\n";
  if (j.contains("backing-filename")) {
    std::string b = j["backing-filename"].get<std::string>();
    out += "backing file: " + b;
    if (!j.contains("full-backing-filename")) {
      out += " (cannot determine actual path)";
    } else if (j["full-backing-filename"].get<std::string>() != b) {
      out += " (actual path: " + j["full-backing-filename"].get<std::string>() + ")";
    }
    out += "\n";
    if (j.contains("backing-filename-format"))
      out += "backing file format: " + j["backing-filename-format"].get<std::string>() + "\n";
  }
  if (j.contains("snapshots")) {
    out += "Snapshot list:\n" + SnapshotTableHeader() + "\n";
    for (const auto& s : j["snapshots"]) {
      SnapshotInfo si;
      si.id = s.value("id", "");
      si.name = s.value("name", "");
      si.vm_state_size = s.value("vm-state-size", uint64_t{0});
      si.date_sec = s.value("date-sec", uint64_t{0});
      si.date_nsec = s.value("date-nsec", uint32_t{0});
      si.vm_clock_nsec =
          s.value("vm-clock-sec", uint64_t{0}) * 1000000000ull + s.value("vm-clock-nsec", uint64_t{0});
      si.icount = s.contains("icount") ? s["icount"].get<uint64_t>() : UINT64_MAX;
      out += SnapshotTableRow(si) + "\n";
    }
  }
  if (j.contains("format-specific")) {
    out += "Format specific information:\n";
    const auto& fs = j["format-specific"];
    if (fs.contains("data")) out += QemuHumanDump(fs["data"], 1);
  }
  return out;
}

}  // namespace vimgfs::cli
