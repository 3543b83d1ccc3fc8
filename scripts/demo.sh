#!/usr/bin/env bash
# The main job: boot a guest with its serial console (COM1) on this terminal.
# - On a KVM that can run Linux user space (hardware KVM): the Debian test guest (Debian's
#   cloud kernel, a busybox initramfs; scripts/build-debian-guest.sh) to a shell. Leaving the
#   shell (exit, or Ctrl-D) powers the guest off: rhyve exits with status 1.
# - On PVM hosts, whose KVM cannot run Linux user space: the project's own small guest, which
#   greets, reports how it started and resets (status 0).
# - Without /dev/kvm: the Debian guest as above, inside the nested harness (scripts/nested.sh:
#   everything emulated, so its boot takes a minute or more).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --quiet
kind=$(scripts/kvm-kind.sh 2>/dev/null || true)
case $kind in
    pvm)
        echo "demo: this host's KVM is PVM, which cannot run Linux user space: booting the project's own guest" >&2
        guests/build.sh target/guests >/dev/null
        echo "+ target/release/rhyve -c 2 -m 512M -l com1,stdio -l bootrom,target/guests/hello.rom demo" >&2
        exec target/release/rhyve -c 2 -m 512M -l com1,stdio -l bootrom,target/guests/hello.rom demo
        ;;
    hw) ;;
    *)
        scripts/build-debian-guest.sh >/dev/null
        echo "demo: no usable /dev/kvm here: booting it inside the nested harness (emulated: slow)" >&2
        exec scripts/nested.sh -c 2 -i scripts/demo.sh
        ;;
esac
g=$(scripts/build-debian-guest.sh)
disk=$(mktemp --suffix=.ext4)
trap 'rm -f "$disk"' EXIT
cp "$g/disk.ext4" "$disk"
set -x
target/release/rhyve -c 2 -m 512M -l com1,stdio -s "2,virtio-blk,$disk" -s 3,virtio-rnd \
    -o "boot.kernel=$g/vmlinuz" -o "boot.initrd=$g/initrd.img" \
    -o "boot.cmdline=console=ttyS0 quiet rhyve.end=shell" demo
