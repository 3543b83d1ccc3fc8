#!/usr/bin/env bash
# Boots the Debian test guest (scripts/build-debian-guest.sh: Debian's cloud kernel, a busybox
# initramfs, a copy of its ext4 disk) with its serial console on this terminal:
#   scripts/debian-guest.sh [rhyve options...]
# On this project's PVM hosts the kernel's own code is emulated: about ten minutes to
# "Run /init", where user space stops at its first system call (a PVM defect; README.md).
# On hardware KVM the guest's /init reports its virtio devices and powers off (status 1).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --quiet
g=$(scripts/build-debian-guest.sh)
disk=$(mktemp --suffix=.ext4)
trap 'rm -f "$disk"' EXIT
cp "$g/disk.ext4" "$disk"
cmdline="console=ttyS0"
# On PVM, fewer things for the emulated kernel to spend minutes on, and int 0x80 for user space.
if [ "$(scripts/kvm-kind.sh 2>/dev/null)" = pvm ]; then
    cmdline="$cmdline vdso32=0 mitigations=off nowatchdog no-kvmclock rodata=off cryptomgr.notests init_on_alloc=0 panic=1"
fi
set -x
target/release/rhyve -c 2 -m 512M -l com1,stdio -s "2,virtio-blk,$disk" -s 3,virtio-rnd \
    -o "boot.kernel=$g/vmlinuz" -o "boot.initrd=$g/initrd.img" -o "boot.cmdline=$cmdline" "$@" debian
