#!/usr/bin/env bash
# Snapshot and restore times against guest memory size, untouched and touched, with the host's
# own sequential write and read of the same amount on the same file system as the limit.
#   bench/snapshot.sh [DIR]     (DIR: where snapshots go; default target/bench-snapshot)
# Needs the release build (cargo build --release --workspace) and the test ROMs
# (sh guests/build.sh target/test-guests). Prints one line per case; medians of 3.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-target/bench-snapshot}
rhyve=target/release/rhyve
roms=target/test-guests
[ -x "$rhyve" ] || { echo "bench/snapshot.sh: build first: cargo build --release --workspace" >&2; exit 2; }
[ -f "$roms/memfill.rom" ] || { echo "bench/snapshot.sh: build the ROMs: sh guests/build.sh $roms" >&2; exit 2; }
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
sock=$dir/api.sock
api() { curl -s --max-time 600 --unix-socket "$sock" -X "$1" "http://localhost/api/v1/$2" ${3:+-d "$3"}; }
now() { date +%s.%N; }
median() { sort -n | sed -n 2p; }

# The host's own sequential write (with fsync) and read of SIZE MiB on this file system.
host_io() {
    local mib=$1 f=$dir/host-io
    local t0 t1 t2
    t0=$(now)
    dd if=/dev/zero of="$f" bs=1M count="$mib" conv=fsync status=none
    t1=$(now)
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    cat "$f" > /dev/null
    t2=$(now)
    rm -f "$f"
    echo "$(echo "($t1 - $t0) * 1000" | bc -l) $(echo "($t2 - $t1) * 1000" | bc -l)"
}

case_run() { # MEM ROM LABEL
    local mem=$1 rom=$2 label=$3 snaps=() restores=() written=""
    for i in 1 2 3; do
        rm -rf "$dir/snap" "$sock" "$dir/com1.txt" "$dir/com1b.txt" "$dir/restore.err"
        "$rhyve" --api-socket "$sock" -m "$mem" -l com1,"$dir/com1.txt" -l bootrom,"$roms/$rom" benchvm 2>/dev/null &
        pid=$!
        for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
        # Let the ROM touch its memory and tick.
        for _ in $(seq 600); do grep -q "tick 00000002" "$dir/com1.txt" 2>/dev/null && break; sleep 0.1; done
        api PUT vm.pause >/dev/null
        t0=$(now)
        api PUT vm.snapshot "{\"destination_url\": \"file://$dir/snap\"}" >/dev/null
        t1=$(now)
        snaps+=("$(echo "($t1 - $t0) * 1000" | bc -l)")
        api PUT vmm.shutdown >/dev/null || true
        wait "$pid" || true
        written=$(du -k "$dir/snap/memory" | cut -f1)
        sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
        # Restore, timed by rhyve itself (-v says how long the restore took).
        "$rhyve" -v -r "$dir/snap" -l com1,"$dir/com1b.txt" benchvm 2>"$dir/restore.err" &
        rpid=$!
        for _ in $(seq 600); do grep -q "restored" "$dir/restore.err" && break; sleep 0.05; done
        kill -TERM "$rpid" 2>/dev/null || true
        wait "$rpid" 2>/dev/null || true
        restores+=("$(sed -n 's/.*restored .* in \([0-9.]*\) ms.*/\1/p' "$dir/restore.err")")
    done
    s=$(printf '%s\n' "${snaps[@]}" | median)
    r=$(printf '%s\n' "${restores[@]}" | median)
    printf '%-22s snapshot %8.1f ms  restore %8.1f ms  memory file %7d KiB on disk\n' "$label" "$s" "$r" "$written"
}

echo "== snapshot and restore, medians of 3 (rhyve $($rhyve --version | cut -d' ' -f2))"
case_run 256M ticker.rom "256 MiB untouched"
case_run 1G ticker.rom "1 GiB untouched"
case_run 4G ticker.rom "4 GiB untouched"
case_run 256M memfill.rom "256 MiB, 240 touched"
case_run 1G memfill.rom "1 GiB, 240 touched"
read -r w r < <(host_io 240)
printf '%-22s write+fsync %8.1f ms  read (cold) %8.1f ms  (the limit for 240 MiB)\n' "host, 240 MiB" "$w" "$r"
rm -rf "$dir/snap" "$dir"/com1*.txt "$dir/restore.err"
