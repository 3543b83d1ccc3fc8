#!/usr/bin/env bash
# Builds the Debian test guest from Debian packages, once per machine (cached under
# .cache/debian-guest/, rebuilt when this script changes):
#   vmlinuz     Debian's cloud kernel (linux-image-cloud-amd64, via scripts/fetch-linux.sh)
#   initrd.img  a busybox initramfs: i386 busybox-static (a 32-bit user space, which enters the
#               kernel with int 0x80 when booted with vdso32=0: PVM mishandles 64-bit syscall
#               from guest user mode), the kernel's virtio modules and an /init that loads them,
#               runs the scenarios asked for (tests/guest/scenarios.sh; by default it mounts the
#               virtio-blk ext4 disk, reads the virtio RNG, configures virtio-net), prints what
#               it found on the console and powers off (or reboots, halts, or gives a shell);
#               the host's util-linux blkdiscard (for write-zeroes) with its libraries
#   disk.ext4   a 16 MiB ext4 file system holding hello.txt, for /dev/vda
#   bios.img, efi.img   boot disks for the firmware tests (scripts/lib/firmware-disks.sh)
# Prints the directory. The guest's /init reads these kernel command-line options:
#   rhyve.ip=ADDR/LEN  rhyve.peer=ADDR   configure eth0 and ping the peer once
#   rhyve.scenario=NAME[,NAME...]        run tests/guest/scenarios.sh's scenario_NAME (default)
#   rhyve.end=poweroff|reboot|halt|shell|wait   what to do at the end (default poweroff)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=.cache/debian-guest
# One build at a time (tests running in parallel all ask for the guest).
mkdir -p .cache
exec 9>.cache/debian-guest.lock
flock 9
stamp=$(cat scripts/build-debian-guest.sh scripts/lib/guest-build.sh scripts/lib/firmware-disks.sh tests/guest/scenarios.sh | sha256sum | cut -c1-16)
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ]; then
    echo "$root/$out"
    exit 0
fi

for cmd in cpio:cpio mkfs.ext4:e2fsprogs dpkg-deb:dpkg objcopy:binutils mcopy:mtools sfdisk:fdisk syslinux:syslinux; do
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
rootfs=$work/rootfs
# shellcheck source=lib/guest-build.sh
. scripts/lib/guest-build.sh

# i386 busybox-static, downloaded with a private apt state so the host's dpkg architectures
# are left alone; the amd64 build too, at /bin64, to show what 64-bit user space does (boot
# with rdinit=/bin64/sh).
apt_i386=(-o APT::Architecture=i386 -o APT::Architectures::=i386 -o "Dir::State::Lists=$root/$work/apt/lists"
          -o "Dir::Cache=$root/$work/apt/cache" -o Dir::State::status=/dev/null)
mkdir -p "$work/apt/lists/partial" "$work/apt/cache/archives/partial"
# A mirror mid-sync can fail one index (e.g. the security suite's); the package is in the others.
apt-get "${apt_i386[@]}" update -qq >"$work/apt-update.log" 2>&1 || true
busybox i386 "$work/bb" "${apt_i386[@]}"
busybox amd64 "$work/bb64"

mkdir -p "$rootfs"/{bin,bin64,dev,proc,sys,mnt,tmp,etc,lib/modules}
cp "$work/bb/bin/busybox" "$rootfs/bin/busybox"
cp "$work/bb64/bin/busybox" "$rootfs/bin64/busybox"
ln -s busybox "$rootfs/bin64/sh"
for applet in $("$work/bb/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$rootfs/bin/$applet"
done
# util-linux's blkdiscard (busybox's cannot write zeroes) and the libraries it links.
blkdiscard=$(command -v blkdiscard) || { echo "build-debian-guest: blkdiscard is missing: apt-get install util-linux" >&2; exit 1; }
for lib in $(ldd "$blkdiscard" | grep -o '/[^ ]*'); do
    mkdir -p "$rootfs$(dirname "$lib")" && cp -L "$lib" "$rootfs$lib"
done
mkdir -p "$rootfs/usr/sbin"
cp -L "$blkdiscard" "$rootfs/usr/sbin/blkdiscard"
cp tests/guest/scenarios.sh "$rootfs/scenarios.sh"

# Virtio modules (and the ACPI button with evdev, for acpid; efivarfs, for UEFI boots) in dependency order, read from
# each module's .modinfo "depends=".
for m in virtio_pci virtio_blk virtio_net virtio_rng virtio_console button evdev efivarfs; do add_mod "$m"; done
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
# efivarfs only where there is EFI (it refuses to load elsewhere).
for m in $(cat /lib/modules/order); do
    case $m in efivarfs.ko) [ -d /sys/firmware/efi ] || continue ;; esac
    insmod /lib/modules/$m || say "insmod $m failed"
done
say "modules loaded: $(cat /lib/modules/order | tr '\n' ' ')"
mkdir -p /tmp && mount -t tmpfs tmpfs /tmp
. /scenarios.sh
scenarios=$(arg scenario)
for s in $(echo "${scenarios:-default}" | tr ',' ' '); do
    say "scenario $s"
    "scenario_$s"
done
end=$(arg end)
say "end: ${end:-poweroff}"
case "$end" in
    reboot) reboot -f ;;
    halt) halt -f ;;
    shell) setsid cttyhack sh; poweroff -f ;;
    wait) while :; do sleep 1; done ;;
    *) poweroff -f ;;
esac
EOF
chmod 755 "$rootfs/init"

# Uncompressed: the guest kernel's own code is emulated on PVM hosts, where gunzip costs minutes.
cpio_newc "$rootfs" "$out/initrd.img"

mkdir -p "$work/disk"
echo "hello from the host's ext4 image" >"$work/disk/hello.txt"
mkfs.ext4 -q -F -L rhyve-test -d "$work/disk" "$out/disk.ext4" 16M >&2

cp "$kernel" "$out/vmlinuz"
# shellcheck source=lib/firmware-disks.sh
. scripts/lib/firmware-disks.sh
firmware_disks "$out/vmlinuz" "$out/initrd.img" "$out"
rm -rf "$work"
echo "$stamp" >"$out/stamp"
echo "$root/$out"
