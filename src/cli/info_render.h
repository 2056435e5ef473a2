// Rendering of image facts as qemu-img prints them (info, snapshot -l).
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "vimgfs/image.h"

namespace vimgfs::cli {

// The ImageInfo object of `qemu-img info --output=json` for one image.
nlohmann::ordered_json ImageInfoJson(Image& img);
// The "format-specific" object ({"type": format, "data": {...}}); null when the format has none.
nlohmann::ordered_json FormatSpecificJson(const std::string& format, const FormatDetails& details);
// One element of "snapshots".
nlohmann::ordered_json SnapshotJson(const SnapshotInfo& s);
// The human layout of one ImageInfo object.
std::string HumanImageInfo(const nlohmann::ordered_json& info);
// "ID        TAG ..." and one row per snapshot (no trailing newline on either).
std::string SnapshotTableHeader();
std::string SnapshotTableRow(const SnapshotInfo& s);

}  // namespace vimgfs::cli
