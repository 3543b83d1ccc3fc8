#!/usr/bin/env bash
# Installs what a fresh machine lacks for building rhyve and its test guests, and checks KVM.
# Safe to run again: it installs only what is missing.
set -euo pipefail

if ! [ -c /dev/kvm ]; then
    echo "setup: /dev/kvm is missing: rhyve runs guests on KVM; load the kvm module (or use a host with KVM)" >&2
    exit 1
fi
if ! { exec 3<>/dev/kvm; } 2>/dev/null; then
    echo "setup: /dev/kvm is not readable and writable by $(id -un): add yourself to the kvm group or run as root" >&2
    exit 1
fi
exec 3>&-

# Debian packages: a command each needs, and the package that provides it.
need=()
for pair in gcc:gcc as:binutils ld:binutils objcopy:binutils nm:binutils unshare:util-linux ip:iproute2 ping:iputils-ping iasl:acpica-tools cpio:cpio mkfs.ext4:e2fsprogs debugfs:e2fsprogs; do
    cmd=${pair%%:*} pkg=${pair#*:}
    command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup: installing ${need[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo is missing: install a Rust toolchain (rustup)" >&2; exit 1; }
# The stock Linux kernel some tests boot (cached under .cache/linux).
"$(dirname "$0")/fetch-linux.sh" >/dev/null
