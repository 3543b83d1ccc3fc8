#!/usr/bin/env bash
# Live migration between two rhyve processes on this host over a unix socket: total time,
# downtime and guest RAM bytes sent against guest memory size, for an idle guest (the ticker
# ROM), a guest that touched 240 MiB and then idles (memfill), and a guest rewriting 64 MiB
# without pause (dirtier, 300 ms downtime target). The limit: the same number of bytes through a
# unix socket between two processes of this host, measured in the same run.
#   bench/migration.sh [DIR]    (DIR: sockets and consoles; default target/bench-migration)
# Needs the release build (cargo build --release --workspace) and the test ROMs
# (sh guests/build.sh target/test-guests). Prints one line per case; medians of 3 by total.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-target/bench-migration}
rhyve=target/release/rhyve
roms=target/test-guests
[ -x "$rhyve" ] || { echo "bench/migration.sh: build first: cargo build --release --workspace" >&2; exit 2; }
[ -f "$roms/dirtier.rom" ] || { echo "bench/migration.sh: build the ROMs: sh guests/build.sh $roms" >&2; exit 2; }
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
api() { curl -s --max-time 600 --unix-socket "$1" -X PUT "http://localhost/api/v1/$2" ${3:+-d "$3"}; }

# Bytes through a unix socket between two processes: ms for N bytes (1 MiB writes).
socket_ms() {
    python3 - "$1" <<'PY'
import os, socket, sys, time
n = int(sys.argv[1]); a, b = socket.socketpair()
buf = bytes(1 << 20)
t = time.perf_counter()
if os.fork() == 0:
    a.close(); left = n
    while left > 0:
        left -= b.send(buf[:min(left, len(buf))])
    os._exit(0)
b.close(); got = 0
while got < n:
    got += len(a.recv(1 << 20))
os.wait()
print(f"{(time.perf_counter() - t) * 1e3:.1f}")
PY
}

case_run() { # MEM ROM LABEL
    local mem=$1 rom=$2 label=$3 lines=()
    for i in 1 2 3; do
        rm -f "$dir"/*.sock "$dir"/com1*.txt "$dir"/src.err
        "$rhyve" -v --api-socket "$dir/src.sock" -m "$mem" -l com1,"$dir/com1.txt" -l bootrom,"$roms/$rom" benchvm 2>"$dir/src.err" &
        spid=$!
        "$rhyve" --api-socket "$dir/dst.sock" 2>/dev/null &
        dpid=$!
        for _ in $(seq 200); do [ -S "$dir/src.sock" ] && [ -S "$dir/dst.sock" ] && break; sleep 0.05; done
        for _ in $(seq 600); do grep -q "tick 00000003" "$dir/com1.txt" 2>/dev/null && break; sleep 0.1; done
        api "$dir/dst.sock" vm.receive-migration "{\"receiver_url\": \"unix:$dir/mig.sock\", \"config\": {\"lpc.com1.path\": \"$dir/com1b.txt\"}}" >/dev/null &
        rpid=$!
        api "$dir/src.sock" vm.send-migration "{\"destination_url\": \"unix:$dir/mig.sock\"}" >/dev/null
        wait "$rpid" || true
        wait "$spid" || true
        api "$dir/dst.sock" vmm.shutdown >/dev/null || true
        wait "$dpid" || true
        lines+=("$(grep -o 'migrated to .*' "$dir/src.err")")
    done
    # "migrated to URL: B of M bytes of RAM sent in T ms (R rounds ..., P bytes paused), downtime D ms"
    printf '%s\n' "${lines[@]}" | sed 's/.*: \([0-9]*\) of \([0-9]*\) bytes of RAM sent in \([0-9.]*\) ms (\([0-9]*\) rounds.*, \([0-9]*\) bytes paused), downtime \([0-9.]*\) ms/\3 \1 \2 \4 \5 \6/' \
        | sort -n | sed -n 2p | {
        read -r total bytes memsize rounds paused down
        limit=$(socket_ms "$bytes")
        awk -v l="$label" -v t="$total" -v d="$down" -v b="$bytes" -v m="$memsize" -v r="$rounds" -v p="$paused" -v s="$limit" 'BEGIN {
            printf "%-28s total %7.1f ms  downtime %6.1f ms  sent %5d of %5d MiB  rounds %2d  paused %6d KiB  socket limit %6.1f ms (%.1fx)\n",
                l, t, d, b / 1048576, m / 1048576, r, p / 1024, s, (s > 0 ? t / s : 0) }'
    }
}

echo "== live migration over a unix socket, medians of 3 (rhyve $($rhyve --version | cut -d' ' -f2))"
case_run 256M ticker.rom "256 MiB idle"
case_run 1G ticker.rom "1 GiB idle"
case_run 256M memfill.rom "256 MiB, 240 touched, idle"
case_run 1G memfill.rom "1 GiB, 240 touched, idle"
case_run 256M dirtier.rom "256 MiB, rewriting 64 MiB"
rm -f "$dir"/*.sock "$dir"/com1*.txt "$dir"/src.err
