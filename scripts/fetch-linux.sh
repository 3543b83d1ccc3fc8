#!/usr/bin/env bash
# Fetches Debian's cloud kernel (linux-image-cloud-amd64's current version) from the package
# registry and unpacks it under .cache/linux/ (never installed on the host). Cached: runs once
# per checkout. Prints the path of the bzImage.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.cache/linux
if ! ls "$dest"/boot/vmlinuz-* >/dev/null 2>&1; then
    mkdir -p "$dest/deb"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    if ! pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}') || [ -z "$pkg" ]; then
        $sudo apt-get update -qq >&2
        pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
    fi
    [ -n "$pkg" ] || { echo "fetch-linux: cannot find linux-image-cloud-amd64's kernel package" >&2; exit 1; }
    (cd "$dest/deb" && apt-get download "$pkg" >&2 2>/dev/null)
    dpkg-deb -x "$dest"/deb/*.deb "$dest"
    rm -rf "$dest/deb"
fi
ls "$dest"/boot/vmlinuz-* | head -n 1
