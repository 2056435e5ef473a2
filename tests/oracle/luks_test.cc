// The luks format beside qemu-img: images qemu-img makes in every cipher family, mode,
// IV generator and hash read byte-exact in vimgfs; images vimgfs makes and writes (unaligned,
// from many threads) read the same in qemu; info, errors and exit codes as qemu-img's; a
// wrong or missing key, damaged key slots and truncated key material give one clear error.
#include <thread>

#include <fmt/format.h>

#include "cli_test_helpers.h"
#include "vimgfs/image.h"

namespace vimgfs::test {
namespace {

struct Combo {
  const char* alg;
  const char* mode;
  const char* ivgen;
  const char* hash;
  std::string Options() const {
    return fmt::format("cipher-alg={},cipher-mode={},ivgen-alg={},hash-alg={}", alg, mode, ivgen, hash);
  }
};
// Each family, mode, IV generator (essiv with two hashes) and PBKDF2 hash at least once.
const Combo kCombos[] = {
    {"aes-256", "xts", "plain64", "sha256"},      {"aes-128", "cbc", "essiv", "sha1"},
    {"serpent-256", "xts", "plain", "sha512"},    {"twofish-128", "ctr", "plain64", "sha256"},
    {"cast5-128", "cbc", "plain64", "ripemd160"}, {"aes-192", "xts", "essiv", "sha224"},
    {"aes-256", "ecb", "plain64", "sha384"},      {"serpent-128", "cbc", "essiv", "md5"},
};

constexpr const char* kSecret = "--object secret,id=s0,data=abc";

std::string Opts(const std::string& file, const char* secret = "s0") {
  return fmt::format("--image-opts driver=luks,key-secret={},file.filename={}", secret, file);
}

// Opens `path` (format `fmt`, passphrase "abc") and writes from eight threads at once:
// thread t writes bytes [k*stride + t*run, +run) with 0x10 + t for k < rounds, so runs of
// neighbouring threads share sectors (and clusters). `model` gets the same bytes.
void WriteInterleaved(const std::string& path, const char* fmt, uint64_t stride, uint64_t run,
                      uint64_t rounds, std::vector<uint8_t>* model) {
  OpenOptions o;
  o.format = fmt;
  o.key_secret = "s0";
  o.secrets = [](const std::string&) -> Result<std::string> { return std::string("abc"); };
  auto img = Image::Open(path, o);
  ASSERT_TRUE(img.ok()) << img.error().message();
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; t++) {
    threads.emplace_back([&, t] {
      std::vector<std::byte> bytes(run, std::byte(0x10 + t));
      for (uint64_t k = 0; k < rounds; k++) {
        Status s = (*img)->Write(k * stride + t * run, bytes);
        if (!s.ok()) ADD_FAILURE() << s.message();
      }
    });
  }
  for (auto& th : threads) th.join();
  for (uint64_t k = 0; k < rounds; k++)
    for (int t = 0; t < 8; t++) std::fill_n(model->begin() + k * stride + t * run, run, 0x10 + t);
  ASSERT_TRUE((*img)->Close().ok());
}

class LuksTest : public CliTwinTest {
 protected:
  // qemu-img create -f luks (MustQemuCreate).
  void QemuCreate(const std::string& file, const std::string& options, const std::string& size) {
    MustQemuCreate(fmt::format("qemu-img create -q -f luks {} -o key-secret=s0,iter-time=10,{} {} {}",
                               kSecret, options, file, size));
  }
  // qemu times its key derivation by thread CPU time and gives up when a run reads 0 ms,
  // which a loaded machine can make happen: tried again (ShQemu).
  void MustQemuCreate(const std::string& line) {
    CommandResult r = ShQemu(line);
    ASSERT_EQ(r.exit_code, 0) << line << "\n" << r.err;
  }
  std::string Bytes(const std::string& file) {
    auto b = ReadWholeFile(F(file));
    return std::string(b.begin(), b.end());
  }
};

TEST_F(LuksTest, QemuImagesReadByteExactInEveryCipher) {
  for (const Combo& c : kCombos) {
    SCOPED_TRACE(c.Options());
    QemuCreate("q/a.luks", c.Options(), "3M");
    // Unaligned runs; the rest was never written and decrypts to noise, in both.
    MustSh(fmt::format("qemu-io {} {} -c 'write -P 0x5a 1000 70001' -c 'write -P 0xa5 2M 4096' >/dev/null",
                       kSecret, Opts("q/a.luks")));
    MustSh(fmt::format("qemu-img convert {} {} -O raw q/q.raw", kSecret, Opts("q/a.luks")));
    CommandResult v = V(fmt::format("convert {} {} -O raw q/v.raw", kSecret, Opts("q/a.luks")));
    ASSERT_EQ(v.exit_code, 0) << v.err;
    EXPECT_TRUE(Bytes("q/q.raw") == Bytes("q/v.raw"));
    ExpectSameOnOneCopy("info --output=json a.luks");
    ExpectSameOnOneCopy("info a.luks");
    ExpectSameOnOneCopy(fmt::format("map --output=json {} {}", kSecret, Opts("a.luks")));
    ExpectSameOnOneCopy(fmt::format("check {} {}", kSecret, Opts("a.luks")));
    ExpectSameOnOneCopy(fmt::format("compare {} --image-opts {} driver=raw,file.filename=q.raw", kSecret,
                                    Opts("a.luks").substr(13)));
  }
}

// Writes through the engine from eight threads at once, each its own unaligned runs (many
// share sectors with a neighbour's), then qemu reads the image.
TEST_F(LuksTest, EngineWritesReadBackInQemu) {
  for (const Combo& c : {kCombos[0], kCombos[1], kCombos[4]}) {
    SCOPED_TRACE(c.Options());
    CommandResult cr = V(fmt::format("create -q -f luks {} -o key-secret=s0,iter-time=10,{} q/w.luks 1M",
                                     kSecret, c.Options()));
    ASSERT_EQ(cr.exit_code, 0) << cr.err;
    MustSh(fmt::format("qemu-img convert {} {} -O raw q/before.raw", kSecret, Opts("q/w.luks")));
    std::vector<uint8_t> model = ReadWholeFile(F("q/before.raw"));
    ASSERT_EQ(model.size(), 1u << 20);
    // Runs of 125 bytes: most sectors take writes from several threads.
    WriteInterleaved(F("q/w.luks"), "luks", 1000, 125, 200, &model);
    MustSh(fmt::format("qemu-img convert {} {} -O raw q/after.raw", kSecret, Opts("q/w.luks")));
    EXPECT_TRUE(ReadWholeFile(F("q/after.raw")) == model);
  }
}

TEST_F(LuksTest, ConvertedImagesCompareEqualInQemu) {
  MustSh("head -c 3000000 /dev/urandom > q/src.raw && qemu-img resize -q -f raw q/src.raw 3M");
  for (const Combo& c : {kCombos[2], kCombos[3], kCombos[5]}) {
    SCOPED_TRACE(c.Options());
    CommandResult r = V(fmt::format("convert {} -O luks -o key-secret=s0,iter-time=10,{} q/src.raw q/c.luks",
                                    kSecret, c.Options()));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    CommandResult q = Q(fmt::format("compare {} --image-opts {} driver=raw,file.filename=q/src.raw", kSecret,
                                    Opts("q/c.luks").substr(13)));
    EXPECT_EQ(q.exit_code, 0) << q.out << q.err;
    // ... and back out again in vimgfs.
    r = V(fmt::format("convert {} {} -O raw q/back.raw", kSecret, Opts("q/c.luks")));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_TRUE(ReadWholeFile(F("q/back.raw")) == ReadWholeFile(F("q/src.raw")));
    // The header qemu reads shows what was asked for.
    auto j = nlohmann::json::parse(Q("info --output=json q/c.luks").out);
    EXPECT_EQ(j["format-specific"]["data"]["cipher-alg"], c.alg);
    EXPECT_EQ(j["format-specific"]["data"]["cipher-mode"], c.mode);
    EXPECT_EQ(j["format-specific"]["data"]["ivgen-alg"], c.ivgen);
    EXPECT_EQ(j["format-specific"]["data"]["hash-alg"], c.hash);
    EXPECT_EQ(j["virtual-size"], 3 << 20);
  }
  // resize as qemu-img: the payload ends the file.
  CommandResult r = V(fmt::format("resize {} {} 5M", kSecret, Opts("q/c.luks")));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(Q("info --output=json q/c.luks").out)["virtual-size"], 5 << 20);
}

TEST_F(LuksTest, KeysAndSecretsAsQemu) {
  QemuCreate("q/k.luks", "cipher-alg=aes-128", "1M");
  // Wrong, missing and unknown keys, one line each; the passphrase never in the output.
  for (const std::string& args :
       {fmt::format("convert --object secret,id=s0,data=wrongpass {} -O raw out.raw", Opts("k.luks")),
        std::string("convert -O raw k.luks out.raw"), std::string("map k.luks"),
        fmt::format("convert {} {} -O raw out.raw", kSecret, Opts("k.luks", "nosuch")),
        std::string("create -f luks x.luks 1M"),
        std::string("create -f luks --object secret,id=s0 -o key-secret=s0 x.luks 1M"),
        std::string(
            "create -f luks --object secret,id=s0,data=a,file=/etc/hostname -o key-secret=s0 x.luks 1M"),
        std::string("create -f luks --object secret,data=a -o key-secret=s0 x.luks 1M"),
        std::string("create -f luks --object secret,id=s0,data=@@,format=base64 -o key-secret=s0 x.luks 1M"),
        std::string("info --object secret,id=s0,file=/nonexistent k.luks"),
        std::string("create -f luks -o help"),
        fmt::format("create -f luks {} -o key-secret=s0,iter-time=abc x.luks 1M", kSecret),
        fmt::format("create -f luks {} -o key-secret=s0,cipher-alg=des x.luks 1M", kSecret),
        fmt::format("create -f luks {} -o key-secret=s0,cipher-mode=xts,cipher-alg=cast5-128 x.luks 1M",
                    kSecret),
        std::string("measure -O luks --size 1G"),
        fmt::format(
            "measure {} -O luks -o key-secret=s0,cipher-alg=aes-128,cipher-mode=cbc --output=json k.luks",
            kSecret)}) {
    ExpectSameOnOneCopy(args);
    EXPECT_EQ(Sh("cd q && ../bin/qemu-img " + args).err.find("wrongpass"), std::string::npos);
  }
  // info reads no data, so qemu-img does not even look at the key: neither does vimgfs.
  // (qemu names such an image by a json: filename of its options: the first line differs.)
  {
    const std::string args = fmt::format("info --object secret,id=s0,data=x {} | tail -n +2", Opts("k.luks"));
    CommandResult q = Sh("cd q && qemu-img " + args), v = Sh("cd q && ../bin/qemu-img " + args);
    EXPECT_EQ(v.out, q.out);
    EXPECT_EQ(v.err, q.err);
  }
  CommandResult wrong =
      V(fmt::format("convert --object secret,id=s0,data=x {} -O raw q/out.raw", Opts("q/k.luks")));
  EXPECT_EQ(wrong.exit_code, 1);
  EXPECT_EQ(wrong.err,
            "vimgfs: Could not open 'driver=luks,key-secret=s0,file.filename=q/k.luks': Invalid "
            "password, cannot unlock any keyslot\n");
  // The same secret from a file and in base64.
  MustSh("printf abc > q/pass && printf YWJj > q/pass64");
  for (const char* object : {"secret,id=s0,file=pass", "secret,id=s0,file=pass64,format=base64",
                             "secret,id=s0,data=YWJj,format=base64"}) {
    SCOPED_TRACE(object);
    ExpectSameOnOneCopy(fmt::format("compare --object {} --image-opts {} {}", object,
                                    Opts("k.luks").substr(13), Opts("k.luks").substr(13)));
  }
  // json: names carry the secret's ID too.
  ExpectSameOnOneCopy(
      fmt::format("map --output=json {} "
                  "'json:{{\"driver\":\"luks\",\"key-secret\":\"s0\",\"file\":{{\"filename\":\"k.luks\"}}}}'",
                  kSecret));
}

// qcow2 with encrypt.format=luks: qemu's images read byte-exact (info, map, check as
// qemu-img), vimgfs's read in qemu, and the header cluster vimgfs writes is qemu's.
class EncryptedQcow2Test : public LuksTest {
 protected:
  static std::string QOpts(const std::string& file) {
    return "--image-opts driver=qcow2,encrypt.key-secret=s0,file.filename=" + file;
  }
  void QemuCreateQcow2(const std::string& file, const std::string& options) {
    MustQemuCreate(
        fmt::format("qemu-img create -q -f qcow2 {} -o "
                    "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,{} {} 4M",
                    kSecret, options, file));
  }
};

TEST_F(EncryptedQcow2Test, QemuImagesReadByteExact) {
  for (const char* options :
       {"cluster_size=65536", "cluster_size=4096,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc",
        "cluster_size=65536,extended_l2=on,encrypt.cipher-alg=serpent-256",
        "cluster_size=16384,encrypt.ivgen-alg=essiv,encrypt.hash-alg=sha1"}) {
    SCOPED_TRACE(options);
    QemuCreateQcow2("q/e.qcow2", options);
    MustSh(fmt::format(
        "qemu-io {} {} -c 'write -P 0x5a 1000 70001' -c 'write -z 200k 64k' -c 'write -P 0xa5 2M 4096' "
        ">/dev/null",
        kSecret, QOpts("q/e.qcow2")));
    MustSh(fmt::format("qemu-img convert {} {} -O raw q/q.raw", kSecret, QOpts("q/e.qcow2")));
    CommandResult v = V(fmt::format("convert {} {} -O raw q/v.raw", kSecret, QOpts("q/e.qcow2")));
    ASSERT_EQ(v.exit_code, 0) << v.err;
    EXPECT_TRUE(Bytes("q/q.raw") == Bytes("q/v.raw"));
    ExpectSameOnOneCopy("info --output=json e.qcow2");
    ExpectSameOnOneCopy("info e.qcow2");
    ExpectSameOnOneCopy("map e.qcow2");  // no key: refused as qemu-img refuses
    ExpectSameOnOneCopy(fmt::format("map --output=json {} {}", kSecret, QOpts("e.qcow2")));
    ExpectSameOnOneCopy(fmt::format("check {} {}", kSecret, QOpts("e.qcow2")));
    ExpectSameOnOneCopy(
        fmt::format("convert --object secret,id=s0,data=bad {} -O raw x.raw", QOpts("e.qcow2")));
  }
}

TEST_F(EncryptedQcow2Test, VimgfsImagesReadInQemu) {
  for (const char* options : {"cluster_size=65536", "cluster_size=4096,encrypt.cipher-alg=twofish-256"}) {
    SCOPED_TRACE(options);
    // The header cluster is qemu's, byte for byte.
    QemuCreateQcow2("q/h.qcow2", options);
    CommandResult r =
        V(fmt::format("create -q -f qcow2 {} -o "
                      "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,{} q/n.qcow2 4M",
                      kSecret, options));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(Sh("head -c 4096 q/n.qcow2 | od -An -tx1").out, Sh("head -c 4096 q/h.qcow2 | od -An -tx1").out);
    EXPECT_EQ(Sh("stat -c %s q/n.qcow2").out, Sh("stat -c %s q/h.qcow2").out);
    // Engine writes from eight threads, unaligned, sharing sectors and clusters.
    std::vector<uint8_t> model(4 << 20, 0);
    WriteInterleaved(F("q/n.qcow2"), "qcow2", 9000, 300, 150, &model);
    CommandResult check = Q(fmt::format("check {} {}", kSecret, QOpts("q/n.qcow2")));
    EXPECT_EQ(check.exit_code, 0) << check.out << check.err;
    MustSh(fmt::format("qemu-img convert {} {} -O raw q/after.raw", kSecret, QOpts("q/n.qcow2")));
    EXPECT_TRUE(ReadWholeFile(F("q/after.raw")) == model);
  }
  // convert -O qcow2 -o encrypt.*: qemu sees the source.
  MustSh("head -c 3000000 /dev/urandom > q/src.raw");
  CommandResult r =
      V(fmt::format("convert {} -O qcow2 -o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 "
                    "q/src.raw q/c.qcow2",
                    kSecret));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  CommandResult cmp =
      Q(fmt::format("compare {} {} driver=raw,file.filename=q/src.raw", kSecret, QOpts("q/c.qcow2")));
  EXPECT_NE(cmp.out.find("Images are identical"), std::string::npos) << cmp.out << cmp.err;
  EXPECT_EQ(Q(fmt::format("check {} {}", kSecret, QOpts("q/c.qcow2"))).exit_code, 0);
  // Without a key nothing but info opens; compression is refused.
  r = V(fmt::format("convert -c {} -O qcow2 -o encrypt.format=luks,encrypt.key-secret=s0 q/src.raw q/z.qcow2",
                    kSecret));
  EXPECT_NE(r.exit_code, 0);
}

// The legacy AES of qcow2 and qcow (IVs by guest sector): qemu's images read byte-exact,
// vimgfs creates the same file as qemu-img, and what vimgfs writes qemu reads.
TEST_F(LuksTest, LegacyAesQcowAndQcow2BothWays) {
  MustSh("head -c 3000000 /dev/urandom > q/src.raw");
  for (const char* fmt : {"qcow2", "qcow"}) {
    SCOPED_TRACE(fmt);
    const std::string opts = fmt::format("--image-opts driver={},encrypt.key-secret=s0,file.filename=", fmt);
    MustSh(fmt::format("qemu-img create -q -f {0} {1} -o encrypt.format=aes,encrypt.key-secret=s0 q/a.{0} 4M",
                       fmt, kSecret));
    CommandResult r = V(
        fmt::format("create -q -f {0} {1} -o encryption=on,encrypt.key-secret=s0 q/v.{0} 4M", fmt, kSecret));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_TRUE(Bytes(fmt::format("q/a.{}", fmt)) == Bytes(fmt::format("q/v.{}", fmt)));
    MustSh(
        fmt::format("qemu-io {} {}q/a.{} -c 'write -P 0x5a 1000 70001' -c 'write -P 0xa5 2M 4096' >/dev/null",
                    kSecret, opts, fmt));
    MustSh(fmt::format("qemu-img convert {} {}q/a.{} -O raw q/q.raw", kSecret, opts, fmt));
    r = V(fmt::format("convert {} {}q/a.{} -O raw q/v.raw", kSecret, opts, fmt));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_TRUE(Bytes("q/q.raw") == Bytes("q/v.raw"));
    ExpectSameOnOneCopy(fmt::format("info --output=json a.{}", fmt));
    ExpectSameOnOneCopy(fmt::format("convert -O raw a.{} x.raw", fmt));  // no key
    // Written by vimgfs (whole and partial clusters, through the engine's copy-on-write).
    r = V(fmt::format("convert {} -O {} -o encrypt.format=aes,encrypt.key-secret=s0 q/src.raw q/w.{}",
                      kSecret, fmt, fmt));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    CommandResult cmp =
        Q(fmt::format("compare {} {}q/w.{} driver=raw,file.filename=q/src.raw", kSecret, opts, fmt));
    EXPECT_NE(cmp.out.find("Images are identical"), std::string::npos) << cmp.out << cmp.err;
  }
}

// Damaged headers: the same refusal as qemu's, in its words, and the file untouched.
TEST_F(LuksTest, DamagedHeadersRefusedAsQemu) {
  QemuCreate("q/good.luks", "cipher-alg=aes-256", "1M");
  struct Damage {
    const char* name;
    const char* patch;  // dd input, at the offset
    int offset;
  };
  const Damage kDamage[] = {
      {"stripes", "\\000\\000\\001\\000", 208 + 44},       // slot 0's stripes
      {"state", "\\000\\001\\002\\003", 208 + 48},         // slot 1's state
      {"slot-offset", "\\000\\000\\000\\001", 208 + 40},   // slot 0 inside the header
      {"payload", "\\000\\000\\000\\004", 104},            // payload over the header
      {"version", "\\000\\002", 6},                        // LUKS2
      {"mode", "xts-plain65\\000", 40},                    // unknown IV generator
      {"keybytes", "\\000\\000\\000\\021", 108},           // odd XTS key
      {"digest-iterations", "\\000\\000\\000\\000", 164},  // zero iterations
      {"keymaterial", "\\377\\377\\377\\377", 8192},       // damaged key material: wrong key
  };
  for (const Damage& d : kDamage) {
    SCOPED_TRACE(d.name);
    const std::string file = std::string(d.name) + ".luks";
    MustSh(fmt::format(
        "cp q/good.luks q/{0} && printf '{1}' | dd of=q/{0} bs=1 seek={2} conv=notrunc status=none", file,
        d.patch, d.offset));
    const std::string before = Bytes("q/" + file);
    ExpectSameOnOneCopy(fmt::format("convert {} {} -O raw out.raw", kSecret, Opts(file)));
    if (std::string(d.name) == "version") {
      // qemu probes a LUKS2 container as raw; vimgfs refuses it, so that no raw write can
      // land on its header (docs/ARCHITECTURE.md, "Encryption").
      CommandResult r = V("info q/" + file);
      EXPECT_EQ(r.err, "vimgfs: Could not open 'q/version.luks': LUKS version 2 is not supported\n");
    } else {
      ExpectSameOnOneCopy(fmt::format("info {}", file));
    }
    EXPECT_TRUE(Bytes("q/" + file) == before);
  }
  // Key material cut short reads as zeros: no slot opens.
  MustSh("head -c 8192 q/good.luks > q/short.luks");
  CommandResult r = V(fmt::format("convert {} {} -O raw q/out.raw", kSecret, Opts("q/short.luks")));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("Could not refresh total sector count"), std::string::npos) << r.err;
  MustSh("qemu-img resize -q -f raw q/short.luks 3M");
  r = V(fmt::format("convert {} {} -O raw q/out.raw", kSecret, Opts("q/short.luks")));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("Invalid password, cannot unlock any keyslot"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace vimgfs::test
