#!/bin/sh
# Builds the test-guest ROMs with the machine's own gcc and binutils into $1 (default
# target/guests). Each ROM is 64 KiB and ends at 4 GiB; see rom/start.S.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../target/guests}
mkdir -p "$out"
cc="gcc -m32 -c -nostdlib -I$here/rom"
$cc -o "$out/start.o" "$here/rom/start.S"
build() { # name source [cpp flags]
    name=$1 src=$2
    shift 2
    $cc "$@" -o "$out/$name.o" "$src"
    ld -m elf_i386 -T "$here/rom/rom.ld" -o "$out/$name.elf" "$out/start.o" "$out/$name.o"
    objcopy -O binary "$out/$name.elf" "$out/$name.rom"
    size=$(stat -c %s "$out/$name.rom")
    [ "$size" -eq 65536 ] || { echo "guests/build.sh: $name.rom is $size bytes, not 65536" >&2; exit 1; }
}
for src in "$here"/rom/*.S; do
    name=$(basename "$src" .S)
    [ "$name" = start ] && continue
    build "$name" "$src"
done
build outloop0 "$here/rom/outloop.S" -DLOOPS=1
build virtio_rnd_stay "$here/rom/virtio_rnd.S" -DSTAY
