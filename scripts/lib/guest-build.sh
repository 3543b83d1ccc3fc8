# Shared by the guest builders (build-debian-guest.sh, build-l1.sh): sourced, not run.
# Each caller sets: root (the checkout), work (a scratch directory under it), moddir (the
# kernel's lib/modules/VERSION), rootfs (the initramfs tree being built).

# busybox ARCH DEST [apt options]: download Debian's busybox-static for ARCH (never installed
# on the host) and unpack it into DEST.
busybox() {
    local arch=$1 dest=$2
    shift 2
    (cd "$work" && apt-get "$@" download "busybox-static:$arch" >/dev/null 2>>"apt-download.log") || {
        echo "$(basename "$0"): cannot download busybox-static:$arch (see $work/apt-download.log)" >&2
        exit 1
    }
    dpkg-deb -x "$work"/busybox-static_*_"$arch".deb "$dest"
}

# add_mod NAME: copy module NAME and, first, every module its .modinfo "depends=" names into
# $rootfs/lib/modules, appending each file name to the array `order` (load order).
declare -A done_mod=()
order=()
modfile() { find "$moddir/kernel" \( -name "$1.ko" -o -name "$(echo "$1" | tr _ -).ko" \) | head -n 1; }
add_mod() {
    local name=$1 f dep
    [ -n "${done_mod[$name]:-}" ] && return
    f=$(modfile "$name")
    [ -n "$f" ] || { echo "$(basename "$0"): module $name not found under $moddir" >&2; exit 1; }
    for dep in $(objcopy -O binary -j .modinfo "$f" /dev/stdout | tr '\0' '\n' | sed -n 's/^depends=//p' | tr ',' ' '); do
        add_mod "$dep"
    done
    done_mod[$name]=1
    cp "$f" "$rootfs/lib/modules/"
    order+=("$(basename "$f")")
}

# cpio_newc DIR OUT: an uncompressed newc archive of DIR (owned by root), with /dev/console
# appended as its own archive for the kernel's first open, before devtmpfs is mounted.
cpio_newc() {
    (cd "$1" && { find . -mindepth 1 | LC_ALL=C sort; } | cpio -o -H newc --quiet -R 0:0) >"$2"
    python3 - "$2" <<'PY'
import sys
# One newc entry (dev/console, char 5:1, mode 0600) and the trailer.
def entry(name, mode, rmaj=0, rmin=0):
    name = name.encode() + b"\0"
    hdr = "070701" + "".join(f"{v:08X}" for v in (0, mode, 0, 0, 1, 0, 0, 0, 0, rmaj, rmin, len(name), 0))
    data = hdr.encode() + name
    return data + b"\0" * (-len(data) % 4)
blob = entry("dev", 0o040755) + entry("dev/console", 0o020600, 5, 1) + entry("TRAILER!!!", 0)
blob += b"\0" * (-len(blob) % 512)
open(sys.argv[1], "ab").write(blob)
PY
}
