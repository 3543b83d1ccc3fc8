#!/usr/bin/env bash
# Builds the Debian test guest from Debian packages, once per machine (cached under
# .cache/debian-guest/, rebuilt when this script changes):
#   vmlinuz     Debian's cloud kernel (linux-image-cloud-amd64, via scripts/fetch-linux.sh)
#   initrd.img  a busybox initramfs: i386 busybox-static (a 32-bit user space, which enters the
#               kernel with int 0x80 when booted with vdso32=0: PVM mishandles 64-bit syscall
#               from guest user mode), the kernel's virtio modules and an /init that loads them,
#               mounts the virtio-blk ext4 disk, reads the virtio RNG, configures virtio-net,
#               prints what it found on the console and powers off (or reboots)
#   disk.ext4   a 16 MiB ext4 file system holding hello.txt, for /dev/vda
# Prints the directory. The guest's /init reads these kernel command-line options:
#   rhyve.ip=ADDR/LEN  rhyve.peer=ADDR   configure eth0 and ping the peer once
#   rhyve.end=poweroff|reboot|shell      what to do at the end (default poweroff)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=.cache/debian-guest
# One build at a time (tests running in parallel all ask for the guest).
mkdir -p .cache
exec 9>.cache/debian-guest.lock
flock 9
stamp=$(sha256sum scripts/build-debian-guest.sh | cut -c1-16)
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ]; then
    echo "$root/$out"
    exit 0
fi

for cmd in cpio:cpio mkfs.ext4:e2fsprogs dpkg-deb:dpkg objcopy:binutils; do
    command -v "${cmd%%:*}" >/dev/null 2>&1 || {
        echo "build-debian-guest: ${cmd%%:*} is missing: run scripts/setup.sh (or apt-get install ${cmd#*:})" >&2
        exit 1
    }
done

kernel=$(scripts/fetch-linux.sh)
kver=$(basename "$kernel" | sed 's/^vmlinuz-//')
moddir=.cache/linux/lib/modules/$kver
[ -d "$moddir" ] || { echo "build-debian-guest: $moddir is missing: remove .cache/linux and run again" >&2; exit 1; }

rm -rf "$out" && mkdir -p "$out/work"
work=$out/work

# i386 busybox-static, downloaded with a private apt state so the host's dpkg architectures
# are left alone; the amd64 build too, at /bin64, to show what 64-bit user space does (boot
# with rdinit=/bin64/sh).
apt_i386=(-o APT::Architecture=i386 -o APT::Architectures::=i386 -o "Dir::State::Lists=$root/$work/apt/lists"
          -o "Dir::Cache=$root/$work/apt/cache" -o Dir::State::status=/dev/null)
mkdir -p "$work/apt/lists/partial" "$work/apt/cache/archives/partial"
# A mirror mid-sync can fail one index (e.g. the security suite's); the package is in the others.
apt-get "${apt_i386[@]}" update -qq >"$work/apt-update.log" 2>&1 || true
# busybox ARCH DEST [apt options]: download busybox-static for ARCH and unpack it into DEST.
busybox() {
    local arch=$1 dest=$2
    shift 2
    (cd "$work" && apt-get "$@" download "busybox-static:$arch" >/dev/null 2>>"apt-download.log") || {
        echo "build-debian-guest: cannot download busybox-static:$arch (see $work/apt-download.log)" >&2
        exit 1
    }
    dpkg-deb -x "$work"/busybox-static_*_"$arch".deb "$dest"
}
busybox i386 "$work/bb" "${apt_i386[@]}"
busybox amd64 "$work/bb64"

rootfs=$work/rootfs
mkdir -p "$rootfs"/{bin,bin64,dev,proc,sys,mnt,lib/modules}
cp "$work/bb/bin/busybox" "$rootfs/bin/busybox"
cp "$work/bb64/bin/busybox" "$rootfs/bin64/busybox"
ln -s busybox "$rootfs/bin64/sh"
for applet in sh mount umount insmod ip ping cat echo dd od head grep sync sleep uname \
    poweroff reboot ls mkdir cut tr wc sha256sum date; do
    ln -s busybox "$rootfs/bin/$applet"
done

# Virtio modules in dependency order, read from each module's .modinfo "depends=".
declare -A done_mod=()
order=()
modfile() { find "$moddir/kernel" \( -name "$1.ko" -o -name "$(echo "$1" | tr _ -).ko" \) | head -n 1; }
add_mod() {
    local name=$1 f dep
    [ -n "${done_mod[$name]:-}" ] && return
    f=$(modfile "$name")
    [ -n "$f" ] || { echo "build-debian-guest: module $name not found under $moddir" >&2; exit 1; }
    for dep in $(objcopy -O binary -j .modinfo "$f" /dev/stdout | tr '\0' '\n' | sed -n 's/^depends=//p' | tr ',' ' '); do
        add_mod "$dep"
    done
    done_mod[$name]=1
    cp "$f" "$rootfs/lib/modules/"
    order+=("$(basename "$f")")
}
for m in virtio_pci virtio_blk virtio_net virtio_rng virtio_console; do add_mod "$m"; done
printf '%s\n' "${order[@]}" >"$rootfs/lib/modules/order"

cat >"$rootfs/init" <<'EOF'
#!/bin/sh
# rhyve's Debian test guest: report what the virtio devices do, then end as asked.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "rhyve-guest: $*"; }
arg() { for w in $(cat /proc/cmdline); do case $w in "rhyve.$1="*) echo "${w#*=}";; esac; done; }
say "init running: kernel $(uname -r) $(uname -m), /bin/busybox ELF class $(od -An -tu1 -j4 -N1 /bin/busybox | tr -d ' ') (1: 32-bit)"
say "cpus online: $(cat /sys/devices/system/cpu/online)"
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m || say "insmod $m failed"; done
say "modules loaded: $(cat /lib/modules/order | tr '\n' ' ')"
if [ -b /dev/vda ]; then
    if mount -t ext4 /dev/vda /mnt; then
        say "blk read: $(cat /mnt/hello.txt)"
        echo "written by the guest at boot $(cat /proc/sys/kernel/random/boot_id)" >/mnt/from-guest.txt
        sync
        say "blk wrote: $(cat /mnt/from-guest.txt)"
        umount /mnt && say "blk unmounted"
    else
        say "blk: mount /dev/vda failed"
    fi
else
    say "blk: no /dev/vda"
fi
if [ -c /dev/hwrng ]; then
    say "rng: $(cat /sys/class/misc/hw_random/rng_current) gave $(dd if=/dev/hwrng bs=16 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')"
else
    say "rng: no /dev/hwrng"
fi
ip=$(arg ip)
peer=$(arg peer)
if [ -n "$ip" ] && [ -d /sys/class/net/eth0 ]; then
    ip link set lo up
    ip addr add "$ip" dev eth0 && ip link set eth0 up
    say "net: eth0 $(cat /sys/class/net/eth0/address) $ip"
    if [ -n "$peer" ]; then
        if ping -c 1 -W 10 "$peer" >/dev/null; then say "net: ping $peer ok"; else say "net: ping $peer failed"; fi
    fi
fi
end=$(arg end)
say "end: ${end:-poweroff}"
case "$end" in
    reboot) reboot -f ;;
    shell) exec sh ;;
    *) poweroff -f ;;
esac
EOF
chmod 755 "$rootfs/init"

(cd "$rootfs" && { find . -mindepth 1 | LC_ALL=C sort; } | cpio -o -H newc --quiet -R 0:0) >"$work/rootfs.cpio"
# /dev/console for the kernel's first open, before devtmpfs: appended as its own archive.
python3 - "$work/console.cpio" <<'EOF'
import sys
# One newc entry (dev/console, char 5:1, mode 0600) and the trailer.
def entry(name, mode, rmaj=0, rmin=0):
    name = name.encode() + b"\0"
    hdr = "070701" + "".join(f"{v:08X}" for v in (0, mode, 0, 0, 1, 0, 0, 0, 0, rmaj, rmin, len(name), 0))
    data = hdr.encode() + name
    return data + b"\0" * (-len(data) % 4)
blob = entry("dev", 0o040755) + entry("dev/console", 0o020600, 5, 1) + entry("TRAILER!!!", 0)
blob += b"\0" * (-len(blob) % 512)
open(sys.argv[1], "wb").write(blob)
EOF
# Uncompressed: the guest kernel's own code is emulated on PVM hosts, where gunzip costs minutes.
cat "$work/rootfs.cpio" "$work/console.cpio" >"$out/initrd.img"

mkdir -p "$work/disk"
echo "hello from the host's ext4 image" >"$work/disk/hello.txt"
mkfs.ext4 -q -F -L rhyve-test -d "$work/disk" "$out/disk.ext4" 16M >&2

cp "$kernel" "$out/vmlinuz"
rm -rf "$work"
echo "$stamp" >"$out/stamp"
echo "$root/$out"
