// The built-in format drivers. Each is defined in its folder under src/formats/.
#pragma once

#include "vimgfs/format.h"

namespace vimgfs {

const FormatDriver* RawDriver();
const FormatDriver* Qcow2Driver();
const FormatDriver* VmdkDriver();
const FormatDriver* VdiDriver();
const FormatDriver* VhdxDriver();
const FormatDriver* VpcDriver();
const FormatDriver* DmgDriver();
const FormatDriver* BochsDriver();
const FormatDriver* CloopDriver();
const FormatDriver* QcowDriver();
const FormatDriver* ParallelsDriver();
const FormatDriver* QedDriver();
const FormatDriver* LuksDriver();

}  // namespace vimgfs
