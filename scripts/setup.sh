#!/usr/bin/env bash
# Installs what a fresh machine lacks for building rhyve, its test guests and the nested
# harness (QEMU), and says which KVM this host has. Safe to run again: it installs only what
# is missing. Prints nothing else unless it installs something.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: a command each needs, and the package that provides it.
need=()
for pair in gcc:gcc as:binutils ld:binutils objcopy:binutils nm:binutils unshare:util-linux ip:iproute2 \
    ping:iputils-ping iasl:acpica-tools cpio:cpio mkfs.ext4:e2fsprogs debugfs:e2fsprogs \
    qemu-system-x86_64:qemu-system-x86 bc:bc curl:curl mcopy:mtools sfdisk:fdisk syslinux:syslinux; do
    cmd=${pair%%:*} pkg=${pair#*:}
    command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
# Firmware the firmware tests boot (qboot, SeaBIOS, OVMF; QEMU's own ROMs for the nested
# harness), and the boot loaders their disks carry (scripts/build-firmware-disks.sh).
for pair in /usr/share/qemu/qboot.rom:qemu-system-data /usr/share/seabios/bios.bin:seabios \
    /usr/share/OVMF/OVMF_CODE_4M.fd:ovmf /usr/lib/syslinux/mbr/mbr.bin:syslinux-common \
    /usr/lib/systemd/boot/efi/systemd-bootx64.efi:systemd-boot-efi; do
    [ -e "${pair%%:*}" ] || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup: installing ${need[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo is missing: install a Rust toolchain (rustup)" >&2; exit 1; }
# Python's venv module (Debian packages it apart), for schemathesis's venv.
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup: installing python3-venv" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
fi
# schemathesis (PyPI), which checks the API server against docs/api/openapi.yaml.
scripts/api-check.sh --install
# The stock Linux kernel the tests boot (cached under .cache/linux).
scripts/fetch-linux.sh >/dev/null
