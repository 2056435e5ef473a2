// create's and convert's option handling beside qemu-img's: sizes as qemu_strtosz reads
// them, -o lists and `-o help`, the file protocol's options (nocow, extent_size_hint,
// preallocation), "file:" names and qcow2's option checks. vimgfs runs under the name
// qemu-img, so every line of output and the exit code must be the same.
#include <string>
#include <vector>

#include "oracle/cli_test_helpers.h"

namespace vimgfs::test {
namespace {

class CliCreateTest : public CliTwinTest {};

TEST_F(CliCreateTest, SizesAsQemuReadsThem) {
  for (const std::string s :
       {"1024", "1024b", "1k",   "1.5k", "1.5M",  "1024.0", "1024.0b",   "1.k",    "0x200",
        "1.5",  "1.5b",  "1e3k", "1kB",  "-1024", "-1k",    "1kilobyte", "foobar", "99999999999999999999",
        "16E",  "8E",    "7E"}) {
    ExpectSame("create -f qcow2 t.qcow2 -- " + s);
    ExpectSame("create -f qcow2 -o size=" + s + " t.qcow2");
    ExpectSame("create -f raw t.raw -- " + s);
  }
  ExpectSame("create -f qcow2 -o size=10M t.qcow2 20M");  // only once
  ExpectSame("create -f qcow2 -o size=10M t.qcow2");
  ExpectSame("create -f qcow2 t.qcow2");
  for (const std::string s : {"1024", "1024.0", "1024.0b", "0.5k", "0.5M", "1.5k", "1M", "3k", "4M"})
    ExpectSame("create -f qcow2 -o cluster_size=" + s + " t.qcow2 64M");
}

TEST_F(CliCreateTest, BackingNamesAsQemuChecksThem) {
  ExpectSame("create -f qcow2 -b '' t.qcow2 1M");
  ExpectSame("create -f qcow2 -u -b t.qcow2 -F qcow2 t.qcow2 1M");
  ExpectSame("create -f qcow2 base.qcow2 1M");
  ExpectSame("create -f qcow2 -b base.qcow2 t.qcow2");
  ExpectSame("create -f qcow2 -u -b base.qcow2 t.qcow2");
  ExpectSame("create -f qcow2 -b base.qcow2 -F qcow2 t.qcow2");
  ExpectSame("create -f qcow2 -F qcow2 t.qcow2 1M");
  ExpectSame("create -f raw -b base.qcow2 -F qcow2 t.raw 1M");
  ExpectSame("create -f vdi -F qcow2 t.vdi 1M");
  ExpectSame("create -f qcow2 -u -b nosuch -F qcow2 t2.qcow2 1M");
  ExpectSame("check t2.qcow2");  // its backing file is missing: check fails
  ExpectSame("map t2.qcow2");
}

TEST_F(CliCreateTest, OptionListsAndHelp) {
  for (const std::string fmt : {"qcow2", "vmdk", "vdi", "raw", "file", "bochs", "nosuch"}) {
    ExpectSame("create -f " + fmt + " -o help");
    ExpectSame("create -f " + fmt + " -o help t.img 1M");
    ExpectSame("convert -O " + fmt + " -o help");
  }
  ExpectSame("create -o help");
  ExpectSame("create -f qcow2 -o cluster_size=4k,help t.qcow2 1M");
  ExpectSame("create -f qcow2 -o ?,cluster_size=4k t.qcow2 1M");
  ExpectSame("create -f qcow2 -o cluster_size=4k -o help t.qcow2 1M");
  ExpectSame("create -f qcow2 -o help foo:bar 1M");
  for (const std::string list : {"backing_file=x,", ",help", ",,", "", "a,,,", "a,,,,"}) {
    ExpectSame("create -f qcow2 -o '" + list + "' -o help t.qcow2 1M");
    ExpectSame("convert -O qcow2 -o '" + list + "' -o help a b");
  }
  ExpectSame("create -f qcow2 -u -o backing_file=x,,help,backing_fmt=qcow2 t.qcow2 1M");
  ExpectSame("create -f qcow2 -o cluster_size=4k -o lazy_refcounts=on -o cluster_size=8k t.qcow2 1M");
  ExpectSame("create -f qcow2 -o cluster_size=4k,cluster_size=8k t.qcow2 1M");
  ExpectSame("create -f qcow2 -o lazy_refcounts,noextended_l2 t.qcow2 1M");
  ExpectSame("create -f qcow2 -o lazy_refcounts,,x t.qcow2 1M");
  ExpectSame("create -f qcow2 -o foo=1,size=-1 t.qcow2 1M");
  ExpectSame("create -f qcow2 -o lazy_refcounts=maybe t.qcow2 1M");
  ExpectSame("create -f qcow2 -o refcount_bits=abc t.qcow2 1M");
  ExpectSame("create -f qcow2 -o refcount_bits=0x10,lazy_refcounts=yes t.qcow2 1M");
  ExpectSame("create -f bochs t.img 1M");
  ExpectSameFiles();
}

TEST_F(CliCreateTest, Qcow2OptionChecksInQemusOrderAndWords) {
  for (const std::string o :
       {"compat=0.42", "compat=foobar", "compat=v2", "compat=0.10,lazy_refcounts=on",
        "compat=0.10,refcount_bits=8", "compat=0.10,compression_type=zstd", "compat=0.10,extended_l2=on",
        "compat=0.10,data_file=d", "extended_l2=on,cluster_size=4k", "compression_type=lz4",
        "refcount_bits=3", "refcount_bits=128", "data_file_raw=on", "backing_fmt=qcow2", "preallocation=1234",
        "backing_file=b,backing_fmt=qcow2,preallocation=metadata",
        "compat=0.10,refcount_bits=16,lazy_refcounts=on,extended_l2=on", "encryption=off"}) {
    ExpectSame("create -f qcow2 -u -o " + o + " t.qcow2 1M");
  }
}

TEST_F(CliCreateTest, FileProtocolOptions) {
  for (const std::string fmt : {"qcow2", "vmdk", "vdi", "raw", "file"}) {
    for (const std::string o : {"preallocation=full,nocow=on,extent_size_hint=0",
                                "nocow=on,preallocation=falloc", "extent_size_hint=1k", "extent_size_hint=5G",
                                "extent_size_hint=-1", "preallocation=metadata", "preallocation=1234"}) {
      if (ExpectSame("create -f " + fmt + " -o " + o + " t." + fmt + " 1M")) {
        // qemu writes a little more; a vmdk's CID is random.
        ExpectSame("info t." + fmt + " | grep -v 'disk size\\|cid:'");
        ExpectSameFiles();
      }
      MustSh("rm -f q/* v/*");
    }
  }
}

TEST_F(CliCreateTest, FileProtocolPrefix) {
  ExpectSame("create -f qcow2 file:a:b.qcow2 1M");
  ExpectSame("create -f qcow2 -b a:b.qcow2 -F qcow2 file:c:d.qcow2");  // "a:b.qcow2": a protocol
  ExpectSame("create -f qcow2 -b base.qcow2 -F qcow2 file:c:d.qcow2 1M");
  ExpectSame("create -f qcow2 base.qcow2 1M");
  ExpectSame("create -f qcow2 -b base.qcow2 -F qcow2 file:c:d.qcow2");
  ExpectSame("info file:c:d.qcow2 | grep -v 'disk size'");  // qemu writes a little more
  ExpectSame("info --output=json file:a:b.qcow2 | grep -v actual-size");
  ExpectSame("check file:c:d.qcow2");
  ExpectSame("map file:c:d.qcow2");
  ExpectSame("info c:d.qcow2");
  ExpectSame("info file:nosuch");
  ExpectSame("create -f qcow2 foo:bar 1M");
  ExpectSame("convert -O raw file:a:b.qcow2 file:x:y.raw");
  ExpectSame("convert -O raw base.qcow2 x:y.raw");
  ExpectSame("create -f file t.file 1M");
  ExpectSame("info t.file | grep -v 'disk size'");
  ExpectSameFiles();
}

TEST_F(CliCreateTest, ConvertOptionConflicts) {
  ExpectSame("create -f qcow2 t.qcow2 1M");
  ExpectSame("convert -C -S 4k -O qcow2 t.qcow2 o.qcow2");
  ExpectSame("convert -C -c -O qcow2 t.qcow2 o.qcow2");
  ExpectSame("convert -C --salvage -O qcow2 t.qcow2 o.qcow2");
  ExpectSame("convert -n -o cluster_size=4k t.qcow2 o.qcow2");
  ExpectSame("convert -S 100 t.qcow2 o.qcow2");
  ExpectSame("convert -S 1.5 t.qcow2 o.qcow2");
  ExpectSame("convert -O qcow2 -o foo=bar t.qcow2 o.qcow2");
  ExpectSame("convert -O qcow2 -o compat=0.42 t.qcow2 o.qcow2");
  ExpectSame("convert -O raw -B t.qcow2 t.qcow2 o.raw");
  ExpectSame("convert -O qcow2 -B t.qcow2 t.qcow2 o.qcow2");
  ExpectSame("convert -O qcow2 -o backing_fmt=qcow2,backing_file=t.qcow2,,help t.qcow2 o.qcow2");
  ExpectSame("convert -c -O raw t.qcow2 o.raw");
  ExpectSame("convert -c -O qcow2 -o preallocation=full t.qcow2 o.qcow2");
  ExpectSame("convert -O qcow2 t.qcow2 t.qcow2 -B t.qcow2 o.qcow2");
  ExpectSameFiles();
}

}  // namespace
}  // namespace vimgfs::test
