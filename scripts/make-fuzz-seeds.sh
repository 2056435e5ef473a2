#!/usr/bin/env bash
# Makes seed inputs for the libFuzzer targets (tests/fuzz) with qemu-img and qemu-io, at run
# time: OUT/<format>/ for each <format>_fuzzer (qcow2 vmdk vdi vpc vhdx qcow parallels qed
# bochs cloop dmg), OUT/vmdk_descriptor/ for vmdk_descriptor_fuzzer, OUT/luks_header/ for
# luks_header_fuzzer (headers and slot 0's key material, passphrase "abc"), OUT/partition_table/
# for partition_table_fuzzer (small disks partitioned by sfdisk and sgdisk, plus a 4 KiB-
# sector GPT and a looping EBR chain written by python3). qemu-img cannot
# create bochs, cloop or dmg: their seeds are qemu's sample images (from qemu's source
# fetched by scripts/iotests.sh --fetch, or $VIMGFS_QEMU_SOURCE) and, for bochs and cloop,
# small images written here by python3. Nothing it makes belongs in the repository. Small
# virtual sizes and clusters keep the seeds small (mostly well under
# 300 KiB): vdi (1 MiB blocks) and vpc (2 MiB blocks) are cut after the part written
# (reads past the end of a file are zeros), vpc keeping its footer; a VHDX cannot be
# smaller than 4 MiB (see below).
#
# Images of ../shared/corpus (or $VIMGFS_CORPUS), when that folder exists, join as extra
# seeds by the format MANIFEST.tsv gives them (the qemu_driver column): plain files are
# symlinked (read in place), compressed ones (.gz, .bz2) are unpacked here. Files larger
# than $VIMGFS_FUZZ_SEED_MAX bytes (default 4 MiB; unpacked and trailing zeros dropped)
# are left out. Saved crash inputs in tests/fuzz/regressions/<format>-* join their format.
#
#   scripts/make-fuzz-seeds.sh [OUT]     # OUT defaults to /var/tmp/vimgfs-fuzz/seeds
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-${VIMGFS_FUZZ_DIR:-/var/tmp/vimgfs-fuzz}/seeds}
corpus=${VIMGFS_CORPUS:-$src/../shared/corpus}
cap=${VIMGFS_FUZZ_SEED_MAX:-4194304}

case "$(realpath -m "$out")/" in
  "$src"/*) echo "make-fuzz-seeds: $out is inside the source tree; pick a folder outside it" >&2
            exit 2 ;;
esac
command -v qemu-img >/dev/null && command -v qemu-io >/dev/null ||
  { echo "make-fuzz-seeds: qemu-img and qemu-io are needed (package qemu-utils)" >&2; exit 2; }

formats=(qcow2 vmdk vdi vpc vhdx qcow parallels qed bochs cloop dmg vmdk_descriptor partition_table luks_header)
rm -rf "$out"
for f in "${formats[@]}"; do mkdir -p "$out/$f"; done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

failed=0
# run CMD...: a seed qemu cannot make (an option this qemu lacks) is skipped with a warning.
run() {
  if ! "$@" >/dev/null 2>"$work/err"; then
    echo "make-fuzz-seeds: skipped: $* ($(head -c 200 "$work/err" | tr '\n' ' '))" >&2
    failed=$((failed + 1))
    return 1
  fi
}
img() { run qemu-img create -q "$@"; }
# io FMT FILE 'cmd' ...: qemu-io commands on an image.
io() {
  local fmt=$1 file=$2; shift 2
  local args=()
  for c in "$@"; do args+=(-c "$c"); done
  run qemu-io -f "$fmt" "${args[@]}" "$file"
}
keep() { cp "$2" "$out/$1/$3"; }               # keep FMT FILE NAME
# Offset just past the last non-zero byte of a file (od folds repeated lines into '*').
data_end() {
  od -A d -t x1 "$1" | awk '
    $1 == "*" { star = 1; next }
    { if (star && prevnz) last = $1; star = 0; nz = 0
      for (i = 2; i <= NF; i++) if ($i != "00") nz = 1
      if (nz) last = $1 + NF - 1; prevnz = nz }
    END { print last + 0 }'
}
# keep_trimmed FMT FILE NAME [MAX]: without trailing zeros, rounded up to 512 bytes, and
# cut at MAX bytes.
keep_trimmed() {
  local n; n=$(data_end "$2"); n=$(( (n + 511) / 512 * 512 ))
  [ -z "${4:-}" ] || [ "$n" -le "$4" ] || n=$4
  head -c "$n" "$2" >"$out/$1/$3"
}
# keep_cut_footer FMT FILE NAME BYTES: the first BYTES, then the 512-byte footer (vpc).
keep_cut_footer() {
  { head -c "$4" "$2"; tail -c 512 "$2"; } >"$out/$1/$3"
}

# ---- qcow2 ----
q() { rm -f "$1"; img -f qcow2 "$@"; }
pattern=('write -P 0x11 0 3k' 'write -P 0x22 8k 4k' 'write -z 64k 8k' 'write -P 0x33 200k 1k')
q plain.qcow2 -o cluster_size=4k 1M && io qcow2 plain.qcow2 "${pattern[@]}" &&
  keep qcow2 plain.qcow2 plain.qcow2
q v2.qcow2 -o compat=0.10,cluster_size=4k 1M && io qcow2 v2.qcow2 "${pattern[@]}" &&
  keep qcow2 v2.qcow2 compat010.qcow2
q small.qcow2 -o cluster_size=512 256k && io qcow2 small.qcow2 "${pattern[@]:0:2}" &&
  keep qcow2 small.qcow2 cluster512.qcow2
for ct in zlib zstd; do
  q comp.qcow2 -o cluster_size=4k,compression_type=$ct 1M &&
    io qcow2 comp.qcow2 'write -c -P 0x44 0 16k' 'write -c -P 0x45 32k 4k' 'write -P 0x46 48k 4k' &&
    keep qcow2 comp.qcow2 compressed-$ct.qcow2
done
q base.qcow2 -o cluster_size=4k 1M && io qcow2 base.qcow2 'write -P 0x55 0 8k' &&
  q over.qcow2 -o cluster_size=4k -b base.qcow2 -F qcow2 1M &&
  io qcow2 over.qcow2 'write -P 0x66 4k 4k' && keep qcow2 over.qcow2 backing.qcow2
q snap.qcow2 -o cluster_size=4k 1M && io qcow2 snap.qcow2 'write -P 0x77 0 8k' &&
  run qemu-img snapshot -c first snap.qcow2 && io qcow2 snap.qcow2 'write -P 0x78 4k 8k' &&
  run qemu-img snapshot -c second snap.qcow2 && io qcow2 snap.qcow2 'discard 0 4k' &&
  keep qcow2 snap.qcow2 snapshots.qcow2
q ext.qcow2 -o cluster_size=16k,extended_l2=on 1M &&
  io qcow2 ext.qcow2 'write -P 0x88 0 2k' 'write -z 32k 8k' 'write -P 0x89 70k 3k' 'discard 128k 16k' &&
  keep qcow2 ext.qcow2 extended_l2.qcow2
q extc.qcow2 -o cluster_size=16k,extended_l2=on 1M &&
  io qcow2 extc.qcow2 'write -c -P 0x8a 0 16k' 'write -P 0x8b 20k 2k' &&
  keep qcow2 extc.qcow2 extended_l2-compressed.qcow2
for rb in 1 64; do
  q rb.qcow2 -o cluster_size=4k,refcount_bits=$rb 1M && io qcow2 rb.qcow2 "${pattern[@]}" &&
    keep qcow2 rb.qcow2 refcount$rb.qcow2
done
q lazy.qcow2 -o cluster_size=4k,lazy_refcounts=on 1M && io qcow2 lazy.qcow2 "${pattern[@]:0:2}" &&
  keep qcow2 lazy.qcow2 lazy_refcounts.qcow2
q pre.qcow2 -o cluster_size=4k,preallocation=metadata 256k && keep qcow2 pre.qcow2 prealloc-metadata.qcow2
q bm.qcow2 -o cluster_size=4k 1M && run qemu-img bitmap --add bm.qcow2 b0 &&
  run qemu-img bitmap --add -g 512 --disable bm.qcow2 b1 && io qcow2 bm.qcow2 "${pattern[@]:0:2}" &&
  keep qcow2 bm.qcow2 bitmaps.qcow2
q bm.qcow2 -o cluster_size=4k 1M && run qemu-img bitmap --add bm.qcow2 b0 &&
  run qemu-img bitmap --add -g 64k bm.qcow2 b1 && io qcow2 bm.qcow2 'write -P 0x99 0 4k' &&
  keep qcow2 bm.qcow2 bitmaps.qcow2
rm -f df.raw
q df.qcow2 -o cluster_size=4k,data_file=df.raw,data_file_raw=on 256k &&
  io qcow2 df.qcow2 'write -P 0xaa 0 4k' && keep qcow2 df.qcow2 data_file.qcow2

# ---- vmdk ----
v() { rm -f "$1"; img -f vmdk "$@"; }
v sparse.vmdk 1M && io vmdk sparse.vmdk 'write -P 0x12 0 4k' 'write -P 0x13 640k 1k' &&
  keep vmdk sparse.vmdk monolithicSparse.vmdk
v c6.vmdk -o compat6=on,adapter_type=lsilogic 1M && io vmdk c6.vmdk 'write -P 0x14 0 1k' &&
  keep vmdk c6.vmdk compat6.vmdk
v zg.vmdk -o zeroed_grain=on 1M && io vmdk zg.vmdk 'write -P 0x15 0 1k' 'write -z 64k 64k' &&
  keep vmdk zg.vmdk zeroed_grain.vmdk
v so.vmdk -o subformat=streamOptimized 1M && io vmdk so.vmdk 'write -P 0x16 0 64k' &&
  keep vmdk so.vmdk streamOptimized.vmdk
rm -f so-src.raw && run qemu-img create -q -f raw so-src.raw 512k &&
  io raw so-src.raw 'write -P 0x17 0 70k' 'write -P 0x18 300k 4k' &&
  run qemu-img convert -O vmdk -o subformat=streamOptimized so-src.raw so2.vmdk &&
  keep vmdk so2.vmdk streamOptimized-convert.vmdk
v vbase.vmdk 1M && v child.vmdk -b vbase.vmdk -F vmdk 1M &&
  io vmdk child.vmdk 'write -P 0x19 0 2k' && keep vmdk child.vmdk backing.vmdk
for sub in monolithicFlat twoGbMaxExtentFlat twoGbMaxExtentSparse; do
  rm -f d-$sub*.vmdk
  if v d-$sub.vmdk -o subformat=$sub 1M; then
    keep vmdk d-$sub.vmdk descriptor-$sub.vmdk
    keep vmdk_descriptor d-$sub.vmdk $sub.txt
  fi
done
[ -f d-twoGbMaxExtentSparse-s001.vmdk ] && keep vmdk d-twoGbMaxExtentSparse-s001.vmdk extent-s001.vmdk
# The descriptor embedded in a sparse extent (sector 1 on, NUL-padded).
for f in sparse child so; do
  [ -f $f.vmdk ] && dd if=$f.vmdk bs=512 skip=1 count=20 status=none | tr -d '\000' \
    >"$out/vmdk_descriptor/embedded-$f.txt"
done

# ---- vdi (1 MiB blocks: cut after the data written) ----
rm -f dyn.vdi st.vdi
img -f vdi dyn.vdi 4M && keep vdi dyn.vdi empty.vdi
img -f vdi dyn.vdi 4M && io vdi dyn.vdi 'write -P 0x21 0 3k' 'write -P 0x22 100k 1k' &&
  keep_trimmed vdi dyn.vdi dynamic.vdi
img -f vdi -o static=on st.vdi 128k && io vdi st.vdi 'write -P 0x23 0 1k' &&
  keep_trimmed vdi st.vdi static.vdi

# ---- vpc (2 MiB blocks: cut, footer kept) ----
rm -f dyn.vhd fix.vhd
img -f vpc dyn.vhd 4M && keep vpc dyn.vhd dynamic-empty.vhd
img -f vpc dyn.vhd 4M && io vpc dyn.vhd 'write -P 0x31 0 3k' 'write -P 0x32 2M 1k' &&
  keep_cut_footer vpc dyn.vhd dynamic.vhd 65536
img -f vpc -o subformat=fixed,force_size=on fix.vhd 128k && io vpc fix.vhd 'write -P 0x33 0 1k' &&
  keep vpc fix.vhd fixed.vhd
img -f vpc -o subformat=fixed fix2.vhd 64k && keep vpc fix2.vhd fixed-chs.vhd

# ---- vhdx ----
# qemu puts the regions at 1 MiB steps (the metadata region ends at 4 MiB) and the first
# data block at 8 MiB, so a VHDX cannot be small: each seed is its first 4 MiB. Images
# with data then name blocks past their end, which the parser must refuse cleanly.
rm -f a.vhdx b.vhdx c.vhdx
keep4m() { head -c 4194304 "$2" >"$out/$1/$3"; }
img -f vhdx -o block_size=1M,log_size=1M a.vhdx 4M && keep4m vhdx a.vhdx empty.vhdx
img -f vhdx -o block_size=8M,log_size=1M,block_state_zero=off c.vhdx 16M &&
  keep4m vhdx c.vhdx block8m.vhdx
img -f vhdx -o block_size=1M,log_size=1M b.vhdx 4M && io vhdx b.vhdx 'write -P 0x41 0 2k' &&
  keep4m vhdx b.vhdx written-cut.vhdx

# ---- qed (4 KiB clusters keep the files small) ----
rm -f a.qed b.qed base.qed
img -f qed -o cluster_size=4k a.qed 1M && keep qed a.qed empty.qed
img -f qed -o cluster_size=4k,table_size=2 b.qed 1M &&
  io qed b.qed 'write -P 0x51 0 3k' 'write -z 64k 8k' 'write -P 0x52 200k 1k' && keep qed b.qed written.qed
img -f qed -o cluster_size=4k base.qed 1M && img -f qed -o cluster_size=4k -b base.qed -F qed over.qed &&
  io qed over.qed 'write -P 0x53 4k 4k' && keep qed over.qed backing.qed
# ---- parallels (small clusters keep the BAT and the data small) ----
rm -f p.parallels
img -f parallels -o cluster_size=4k p.parallels 1M && keep parallels p.parallels empty.parallels
img -f parallels -o cluster_size=4k p.parallels 1M &&
  io parallels p.parallels 'write -P 0x51 0 3k' 'write -P 0x52 100k 1k' 'write -P 0x53 20k 4k' &&
  keep parallels p.parallels written.parallels
# ---- qcow (version 1): plain, with a backing file, compressed ----
rm -f p.qcow b.qcow c.qcow
img -f qcow p.qcow 4M && keep qcow p.qcow empty.qcow
img -f qcow p.qcow 4M && io qcow p.qcow 'write -P 0x51 0 5k' 'write -P 0x52 2M 1k' && keep qcow p.qcow plain.qcow
img -f qcow -b p.qcow -F qcow b.qcow && io qcow b.qcow 'write -P 0x53 1k 1k' && keep qcow b.qcow backing.qcow
# qemu-img 7.2 exits 1 after a complete convert -c to qcow (its final alignment write fails).
# (set -e: its exit status must not stop the script.)
qemu-img convert -c -O qcow p.qcow c.qcow 2>/dev/null || true
if [ -s c.qcow ]; then keep qcow c.qcow compressed.qcow; fi

# ---- bochs, cloop, dmg (read-only formats: qemu-img cannot create them) ----
samples=""
for d in ${VIMGFS_QEMU_SOURCE:-${VIMGFS_IOTESTS_DIR:-/var/tmp/vimgfs-iotests}/*}; do
  [ -d "$d/tests/qemu-iotests/sample_images" ] && samples=$d/tests/qemu-iotests/sample_images
done
[ -f "$samples/empty.bochs.bz2" ] && bzip2 -dc "$samples/empty.bochs.bz2" >"$out/bochs/empty.bochs"
[ -f "$samples/simple-pattern.cloop.bz2" ] &&
  bzip2 -dc "$samples/simple-pattern.cloop.bz2" >"$out/cloop/simple-pattern.cloop"
[ -f "$samples/simple-dmg.dmg.bz2" ] && bzip2 -dc "$samples/simple-dmg.dmg.bz2" >"$out/dmg/simple.dmg"
[ -n "$samples" ] || echo "make-fuzz-seeds: qemu's source not fetched (scripts/iotests.sh --fetch): no sample seeds" >&2
if command -v python3 >/dev/null; then
  python3 - "$out" <<'PY'
import struct, sys, zlib
out = sys.argv[1]
def bochs(name, version, extent, bitmap, disk, sectors):
    spe = extent // 512
    entries = (disk // 512 + spe - 1) // spe
    catalog = [0xFFFFFFFF] * entries
    bitmap_sectors = 1 + (bitmap - 1) // 512
    blocks = {}
    for s in sectors:
        e = s // spe
        if catalog[e] == 0xFFFFFFFF:
            catalog[e] = len(blocks)
            blocks[catalog[e]] = bytearray((bitmap_sectors + spe) * 512)
        b = blocks[catalog[e]]
        b[(s % spe) // 8] |= 1 << (s % spe % 8)
        at = (bitmap_sectors + s % spe) * 512
        b[at:at + 512] = bytes([s & 0xff, 0xb0]) * 256
    h = bytearray(512)
    h[0:22] = b"Bochs Virtual HD Image"; h[32:39] = b"Redolog"; h[48:55] = b"Growing"
    struct.pack_into("<IIIII", h, 64, version, 512, entries, bitmap, extent)
    struct.pack_into("<Q", h, 84 if version == 0x10000 else 88, disk)
    data = bytes(h) + struct.pack("<%dI" % entries, *catalog)
    for i in sorted(blocks):
        data += bytes(blocks[i])
    open(out + "/bochs/" + name, "wb").write(data)
bochs("written.bochs", 0x20000, 4096, 1, 256 * 1024, [0, 1, 9, 63, 200, 511])
bochs("v1.bochs", 0x10000, 4096, 1, 64 * 1024, [3, 4, 100])
bochs("extent64k.bochs", 0x20000, 65536, 16, 512 * 1024, [0, 130, 900])
def cloop(name, block, blocks, level):
    streams = [zlib.compress(bytes([i * 7 & 0xff]) * (block // 2) + bytes(range(256)) * (block // 512), level)
               for i in range(blocks)]
    at = 136 + 8 * (blocks + 1)
    offsets = [at]
    for s in streams:
        at += len(s); offsets.append(at)
    script = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\nexit $?\n"
    data = script.ljust(128, b"\0") + struct.pack(">II", block, blocks)
    data += struct.pack(">%dQ" % (blocks + 1), *offsets) + b"".join(streams)
    open(out + "/cloop/" + name, "wb").write(data)
cloop("blocks4k.cloop", 4096, 6, 6)
cloop("blocks1536.cloop", 1536, 5, 9)
cloop("stored.cloop", 2048, 3, 0)
PY
else
  echo "make-fuzz-seeds: python3 missing: bochs and cloop get qemu's sample images only" >&2
fi

# ---- LUKS headers: each cipher family and mode, IV generator and hash, with the fewest
# PBKDF2 iterations qemu writes (iter-time=1: its floor of 1000), passphrase "abc"; kept
# up to the end of slot 0's key material. qemu times its key derivation by thread CPU
# time and gives up when a run reads 0 ms: such a create is tried again.
for spec in aes-256:xts:plain64:sha256 aes-128:cbc:essiv:sha1 serpent-128:xts:plain:sha512 \
            twofish-128:ctr:plain64:sha256 cast5-128:cbc:plain64:ripemd160 aes-192:xts:essiv:sha224; do
  IFS=: read -r alg mode ivgen hash <<<"$spec"
  for attempt in 1 2 3 4 5; do
    qemu-img create -q -f luks --object secret,id=s0,data=abc -o "key-secret=s0,cipher-alg=$alg,cipher-mode=$mode,ivgen-alg=$ivgen,hash-alg=$hash,iter-time=1" \
      "$work/l.luks" 64k 2>"$work/err" && break
  done
  if [ -f "$work/l.luks" ]; then
    head -c 266240 "$work/l.luks" >"$out/luks_header/$alg-$mode-$ivgen-$hash.luks"
    rm -f "$work/l.luks"
  else
    echo "make-fuzz-seeds: skipped: luks $spec ($(head -c 200 "$work/err"))" >&2
    failed=$((failed + 1))
  fi
done

# ---- partition tables (whole small disks; the fuzzer also reads an input as the head of
# a larger disk, which the 64 KiB head of a 64 MiB disk exercises) ----
pt=$out/partition_table
sfdisk=$(PATH=$PATH:/usr/sbin:/sbin command -v sfdisk || true)
sgdisk=$(PATH=$PATH:/usr/sbin:/sbin command -v sgdisk || true)
# part NAME SIZE SCRIPT: an sfdisk table on a fresh sparse disk of SIZE, kept whole.
part() {
  rm -f "$1" && truncate -s "$2" "$1" && printf '%s' "$3" | run "$sfdisk" -q "$1" && cp "$1" "$pt/$1"
}
if [ -n "$sfdisk" ]; then
  # Sector-granular starts keep the disks small; the EBRs sit inside the 256 KiB.
  part mbr.img 256K $'label: dos\nstart=2, size=100, type=83\nstart=110, size=300, type=f\nstart=112, size=50, type=83\nstart=170, size=50, type=7\nstart=230, size=20, type=b\nstart=420, size=92, type=83, bootable\n'
  part mbr-primaries.img 64K $'label: dos\nstart=1, size=40, type=c\nstart=41, size=40, type=5\nstart=81, size=47, type=83\n'
  part gpt.img 256K $'label: gpt\nfirst-lba: 34\nstart=40, size=100, name=esp, type=uefi\nstart=140, size=200, name="root fs"\nstart=340, size=100, name=d\xc3\xa9j\xc3\xa0\n'
  rm -f big.img && truncate -s 64M big.img &&
    printf 'label: gpt\nsize=8M, name=boot\nsize=16M, name=root\n' | run "$sfdisk" -q big.img &&
    head -c 65536 big.img >"$pt/gpt-head.img"
else
  echo "make-fuzz-seeds: sfdisk missing (package fdisk): fewer partition table seeds" >&2
fi
if [ -n "$sgdisk" ]; then
  rm -f sg.img && truncate -s 1M sg.img &&
    run "$sgdisk" -a 8 -n 1:40:+64K -c 1:boot -n 3:0:+128K -c 3:data -n 5:0:0 -c 5:rest sg.img &&
    cp sg.img "$pt/sgdisk.img"
fi
if command -v python3 >/dev/null; then
  python3 - "$pt" <<'PY'
import struct, sys, zlib
out = sys.argv[1]
def mbr_entry(status, typ, lba, sectors):
    return struct.pack("<B3sB3sII", status, b"\0" * 3, typ, b"\0" * 3, lba, sectors)
def boot_sector(entries):
    s = bytearray(512)
    for i, e in enumerate(entries):
        s[446 + 16 * i:462 + 16 * i] = e
    s[510:512] = b"\x55\xaa"
    return s
# A GPT with 4 KiB sectors (no tool here writes one onto a file).
ss, size = 4096, 1 << 20
last = size // ss - 1
arr = bytearray(128 * 128)
for i, (first, end, name) in enumerate([(6, 100, "efi"), (101, 240, "root")]):
    e = 128 * i
    arr[e:e + 16] = bytes(range(1, 17))
    struct.pack_into("<QQ", arr, e + 16, 0x5EED + i, 0)
    struct.pack_into("<QQ", arr, e + 32, first, end)
    arr[e + 56:e + 56 + 2 * len(name)] = name.encode("utf-16-le")
def header(lba, alt, array_lba):
    h = bytearray(ss)
    h[0:8] = b"EFI PART"
    struct.pack_into("<IIII QQQQ 16s QIII", h, 8, 0x10000, 92, 0, 0, lba, alt, 6, last - 5,
                     b"fuzzseedgptdisk!", array_lba, 128, 128, zlib.crc32(arr))
    struct.pack_into("<I", h, 16, zlib.crc32(bytes(h[:92])))
    return h
disk = bytearray(size)
disk[0:512] = boot_sector([mbr_entry(0, 0xEE, 1, size // 512 - 1)])
disk[ss:2 * ss] = header(1, last, 2)
disk[2 * ss:2 * ss + len(arr)] = arr
disk[(last - 4) * ss:(last - 4) * ss + len(arr)] = arr
disk[last * ss:] = header(last, 1, last - 4)
open(out + "/gpt-4k.img", "wb").write(disk)
# An EBR chain that loops back to its first EBR.
disk = bytearray(64 * 1024)
disk[0:512] = boot_sector([mbr_entry(0x80, 0x83, 1, 7), mbr_entry(0, 0x05, 8, 100)])
disk[8 * 512:9 * 512] = boot_sector([mbr_entry(0, 0x83, 1, 3), mbr_entry(0, 0x05, 4, 10)])
disk[12 * 512:13 * 512] = boot_sector([mbr_entry(0, 0x07, 1, 3), mbr_entry(0, 0x05, 0, 10)])
open(out + "/ebr-loop.img", "wb").write(disk)
PY
fi
# The fuzzer must never be left without seeds: a bare MBR with one partition.
if [ -z "$(ls -A "$pt")" ]; then
  { head -c 446 /dev/zero; printf '\x80\0\0\0\x83\0\0\0\x01\0\0\0\x7f\0\0\0'; head -c 48 /dev/zero
    printf '\x55\xaa'; head -c 65024 /dev/zero; } >"$pt/mbr-minimal.img"
fi

# ---- saved crash inputs ----
if [ -d "$src/tests/fuzz/regressions" ]; then
  for f in "$src"/tests/fuzz/regressions/*; do
    [ -f "$f" ] || continue
    b=$(basename "$f")
    for fmt in "${formats[@]}"; do
      [[ $b == "$fmt"-* ]] && ln -sf "$f" "$out/$fmt/regression-$b"
    done
  done
fi

# ---- ../shared/corpus ----
ncorpus=0
if [ -f "$corpus/MANIFEST.tsv" ]; then
  corpus=$(cd "$corpus" && pwd)
  while IFS=$'\t' read -r path _ _ _ driver _; do
    [ "$path" = path ] && continue
    [ -d "$out/$driver" ] && [ -f "$corpus/$path" ] || continue
    name=corpus-$(basename "$path")
    case "$path" in
      *.gz|*.bz2)
        name=${name%.*}
        case "$path" in *.gz) dec=(gzip -dc) ;; *) dec=(bzip2 -dc) ;; esac
        command -v "${dec[0]}" >/dev/null || continue
        # Unpack only as much as can survive the cap (plus the zeros that get dropped).
        "${dec[@]}" "$corpus/$path" 2>/dev/null | head -c $((cap * 64)) >"$work/unpacked" || true
        n=$(data_end "$work/unpacked")
        [ "$n" -gt 0 ] && [ "$n" -le "$cap" ] || continue
        keep_trimmed "$driver" "$work/unpacked" "$name" ;;
      *)
        [ "$(stat -c %s "$corpus/$path")" -le "$cap" ] || continue
        ln -sf "$corpus/$path" "$out/$driver/$name" ;;
    esac
    ncorpus=$((ncorpus + 1))
  done <"$corpus/MANIFEST.tsv"
fi

for f in "${formats[@]}"; do
  n=$(find "$out/$f" -mindepth 1 | wc -l)
  [ "$n" -gt 0 ] || { echo "make-fuzz-seeds: no seed for $f" >&2; exit 1; }
  echo "seeds: $f: $n files, largest $(find -L "$out/$f" -type f -printf '%s\n' | sort -n | tail -1) bytes"
done
echo "seeds in $out ($ncorpus from $corpus; $failed qemu steps skipped)"
