#!/usr/bin/env bash
# Builds the outer guest ("L1") of the nested harness, once per machine (cached under
# .cache/l1/, rebuilt when this script or its library changes):
#   vmlinuz     Debian's cloud kernel (scripts/fetch-linux.sh), the same one the tests boot
#   initrd.img  an amd64 busybox initramfs with the virtio, virtiofs, KVM (kvm-amd: QEMU's TCG
#               emulates an AMD CPU with SVM), tun, veth and bridge modules, and an /init that mounts
#               the host's root (shared by virtiofsd as "host"), gives it L1's own /dev (with
#               /dev/kvm), /proc, /sys, /tmp and /run, runs the command named by l1.run= in it
#               and writes its exit status to the file named by l1.status=, then powers off.
# scripts/nested.sh runs L1. Prints the directory.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=.cache/l1
mkdir -p .cache
exec 9>.cache/l1.lock
flock 9
stamp=$(cat scripts/build-l1.sh scripts/lib/guest-build.sh | sha256sum | cut -c1-16)
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ]; then
    echo "$root/$out"
    exit 0
fi
for cmd in cpio:cpio dpkg-deb:dpkg objcopy:binutils; do
    command -v "${cmd%%:*}" >/dev/null 2>&1 || {
        echo "build-l1: ${cmd%%:*} is missing: run scripts/setup.sh (or apt-get install ${cmd#*:})" >&2
        exit 1
    }
done
kernel=$(scripts/fetch-linux.sh)
kver=$(basename "$kernel" | sed 's/^vmlinuz-//')
moddir=.cache/linux/lib/modules/$kver
[ -d "$moddir" ] || { echo "build-l1: $moddir is missing: remove .cache/linux and run again" >&2; exit 1; }

rm -rf "$out" && mkdir -p "$out/work"
work=$out/work
rootfs=$work/rootfs
# shellcheck source=lib/guest-build.sh
. scripts/lib/guest-build.sh
busybox amd64 "$work/bb"
mkdir -p "$rootfs"/{bin,dev,proc,sys,host,lib/modules}
cp "$work/bb/bin/busybox" "$rootfs/bin/busybox"
for m in virtio_pci virtiofs kvm_amd tun veth bridge; do add_mod "$m"; done
printf '%s\n' "${order[@]}" >"$rootfs/lib/modules/order"

cat >"$rootfs/init" <<'INIT'
#!/bin/busybox sh
# The nested harness's L1: a KVM host (SVM, emulated by QEMU's TCG) whose root is the host's.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
arg() { for w in $(cat /proc/cmdline); do case $w in "l1.$1="*) echo "${w#*=}";; esac; done; }
for m in $(cat /lib/modules/order); do insmod "/lib/modules/$m" || echo "l1: insmod $m failed"; done
run=$(arg run)
status=$(arg status)
if mount -t virtiofs host /host; then
    mount -t devtmpfs devtmpfs /host/dev
    mkdir -p /host/dev/pts /host/dev/shm
    mount -t devpts -o ptmxmode=0666 devpts /host/dev/pts
    mount -t tmpfs tmpfs /host/dev/shm
    mount -t proc proc /host/proc
    mount -t sysfs sysfs /host/sys
    mount -t tmpfs tmpfs /host/tmp
    mount -t tmpfs tmpfs /host/run
    ip link set lo up
    [ -c /dev/kvm ] || echo "l1: no /dev/kvm: the KVM modules did not load (see above)"
    # One idle VM for L1's lifetime. KVM switches SVM on and off on every CPU, with an IPI to
    # each, when its first VM is created and its last one destroyed, so every test VM did
    # that; in L1 such an IPI now and then went unanswered (kvm_destroy_vm spinning in
    # smp_call_function_many_cond under hardware_disable_all: a soft lockup, then a hung L1).
    # With this VM open, SVM stays on and no test VM's start or end sends those IPIs.
    chroot /host /usr/bin/python3 -c '
import fcntl, os, sys, time
try:
    kvm = os.open("/dev/kvm", os.O_RDWR)
    vm = fcntl.ioctl(kvm, 0xAE01, 0)  # KVM_CREATE_VM
except OSError as e:
    sys.exit(f"l1: cannot keep a VM open, each VM will switch SVM on and off: {e}")
open("/run/l1-vm-held", "w").close()
while True:
    time.sleep(3600)
' &
    for _ in $(seq 300); do [ -e /host/run/l1-vm-held ] && break; sleep 0.1; done
    chroot /host /bin/bash "$run"
    echo $? >"/host$status"
else
    echo "l1: cannot mount the host's root (virtiofs tag host)"
fi
sync
poweroff -f
INIT
chmod 755 "$rootfs/init"
cpio_newc "$rootfs" "$out/initrd.img"
cp "$kernel" "$out/vmlinuz"
rm -rf "$work"
echo "$stamp" >"$out/stamp"
echo "$root/$out"
