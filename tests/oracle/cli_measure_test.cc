// `measure` beside qemu-img measure: the same figures, JSON, messages and exit codes, for
// new images of many sizes and options and for source images of several formats (iotest
// 178 and what OpenStack and libvirt size their volumes with).
#include <string>

#include "cli_test_helpers.h"

namespace vimgfs::test {
namespace {

class CliMeasureTest : public CliTwinTest {};

TEST_F(CliMeasureTest, NewImagesOfEverySizeAndOptionAsQemu) {
  for (const char* out : {"human", "json"}) {
    for (const char* size : {"0", "512", "1M", "2G", "64G", "256G", "1T", "2P", "7E"}) {
      ExpectSame(std::string("measure --output=") + out + " -O qcow2 --size " + size);
      ExpectSame(std::string("measure --output=") + out + " -O raw --size " + size);
    }
  }
  for (const char* o :
       {"cluster_size=512", "cluster_size=4k", "cluster_size=2M", "refcount_bits=1", "refcount_bits=64",
        "compat=0.10", "compat=1.1", "extended_l2=on", "extended_l2=on,cluster_size=2M",
        "preallocation=metadata", "preallocation=falloc", "preallocation=full", "lazy_refcounts=on",
        "backing_file=x", "cluster_size=512,refcount_bits=64", "nocow=on"}) {
    ExpectSame(std::string("measure -O qcow2 -o ") + o + " --size 100G");
    ExpectSame(std::string("measure --output=json -O qcow2 -o ") + o + " --size 3G");
  }
}

TEST_F(CliMeasureTest, SourceImagesAsQemu) {
  // raw and qcow2 sources, empty and with data (iotest 178's writes), a snapshot, bitmaps,
  // a backing chain, a v2 qcow2 (no bitmaps line) and a VMDK.
  InBoth(
      "qemu-img create -q -f raw r.raw 1G && qemu-io -f raw -c 'write 512 512' -c 'write 64K 64K' "
      "-c 'write 128M 63K' r.raw >/dev/null");
  InBoth("qemu-img create -q -f raw empty.raw 0 && qemu-img create -q -f qcow2 empty.qcow2 0");
  InBoth(
      "qemu-img create -q -f qcow2 q.qcow2 1G && qemu-io -c 'write 512 512' -c 'write 64K 64K' q.qcow2 "
      ">/dev/null && qemu-img snapshot -c snapshot1 q.qcow2 && qemu-io -c 'write 128M 63K' q.qcow2 "
      ">/dev/null");
  InBoth(
      "qemu-img create -q -f qcow2 bm.qcow2 3G && qemu-img bitmap --add bm.qcow2 b0 && "
      "qemu-img bitmap --add -g 512k bm.qcow2 a-longer-bitmap-name && qemu-io -c 'write 1G 1M' bm.qcow2 "
      ">/dev/null");
  InBoth(
      "qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 100M && qemu-io -c 'write -P 1 0 3M' v2.qcow2 "
      ">/dev/null");
  InBoth(
      "qemu-img create -q -f qcow2 -b q.qcow2 -F qcow2 top.qcow2 && qemu-io -c 'write 300M 1M' top.qcow2 "
      ">/dev/null");
  InBoth("qemu-img create -q -f vmdk d.vmdk 200M && qemu-io -f vmdk -c 'write 10M 5M' d.vmdk >/dev/null");
  InBoth("qemu-img create -q -f qcow2 full.qcow2 8M && qemu-io -c 'write 0 8M' full.qcow2 >/dev/null");
  for (const char* out : {"human", "json"}) {
    const std::string m = std::string("measure --output=") + out;
    for (const char* src : {"-f raw r.raw", "-f raw empty.raw", "empty.qcow2", "-f qcow2 q.qcow2", "bm.qcow2",
                            "v2.qcow2", "top.qcow2", "d.vmdk", "full.qcow2"}) {
      ExpectSameOnOneCopy(m + " -O qcow2 " + src);
      ExpectSameOnOneCopy(m + " -O raw " + src);
      ExpectSameOnOneCopy(m + " -O qcow2 -o cluster_size=4k " + src);
      ExpectSameOnOneCopy(m + " -O qcow2 -o backing_file=x " + src);
      ExpectSameOnOneCopy(m + " -O qcow2 -o preallocation=full " + src);
      ExpectSameOnOneCopy(m + " -O qcow2 -o compat=0.10 " + src);
    }
    ExpectSameOnOneCopy(m + " -O qcow2 -f qcow2 -l snapshot1 q.qcow2");
    ExpectSameOnOneCopy(m + " -O qcow2 -l snapshot.name=snapshot1 q.qcow2");
  }
}

TEST_F(CliMeasureTest, BadCommandLinesFailAsQemu) {
  InBoth("qemu-img create -q -f qcow2 t.qcow2 1G");
  for (const char* args : {"measure",
                           "measure --size 2G t.qcow2",
                           "measure t.qcow2 a",
                           "measure -f qcow2",
                           "measure -l snap1",
                           "measure -o , --size 1G",
                           "measure -l snapshot.foo=bar",
                           "measure --output foo",
                           "measure --size -1",
                           "measure -O foo t.qcow2",
                           "measure -O vmdk --size 1G",
                           "measure -O vdi t.qcow2",
                           "measure -O file --size 1G",
                           "measure -O bochs --size 1G",
                           "measure -O qcow2 -o cluster_size=3000 --size 1G",
                           "measure -O qcow2 -o compat=2.0 --size 1G",
                           "measure -O qcow2 -o compat=v3 --size 1G",
                           "measure -O qcow2 -o refcount_bits=3 --size 1G",
                           "measure -O qcow2 -o compat=0.10,refcount_bits=8 --size 1G",
                           "measure -O qcow2 -o extended_l2=on,cluster_size=4k --size 1G",
                           "measure -O qcow2 -o cluster_size=512 --size 7E",
                           "measure -O qcow2 -o invalid=1 --size 1G",
                           "measure -O qcow2 -o preallocation=maybe --size 1G",
                           "measure -O qcow2 -l nosuch t.qcow2",
                           "measure -O qcow2 missing.qcow2"}) {
    ExpectSame(args);
  }
}

}  // namespace
}  // namespace vimgfs::test
