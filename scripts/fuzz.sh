#!/usr/bin/env bash
# Runs rhyve's fuzz targets (fuzz/fuzz_targets, cargo-fuzz with libFuzzer) for SECONDS each.
#   scripts/fuzz.sh [SECONDS] [TARGET...]     default: 30 s, every target
# Each target starts from seeds made here from the test guests (guests/build.sh) and example
# command lines, and keeps what it finds in fuzz/corpus/TARGET (not committed). A crash, a
# timeout (10 s for one input) or a leak stops that target with libFuzzer's report and the
# input in fuzz/artifacts/TARGET; the script then exits 1. FUZZING.md records long runs.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-30}
[ $# -gt 0 ] && shift
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
if [ $# -gt 0 ]; then targets=("$@"); else mapfile -t targets < <(cargo +nightly fuzz list --fuzz-dir fuzz); fi
# Seeds.
seeds=fuzz/seeds
rm -rf "$seeds"
for t in "${targets[@]}"; do mkdir -p "$seeds/$t" "fuzz/corpus/$t"; done
if [ ! -d target/test-guests ]; then sh guests/build.sh target/test-guests >/dev/null; fi
n=0
for rom in target/test-guests/*.rom; do
    n=$((n + 1))
    # The ROMs' reset-vector code is 16-bit, their protected-mode parts 32-bit: both modes.
    [ -d "$seeds/assist_decoder" ] && for m in 0 1 2; do
        { printf "\\x0$m"; tail -c 64 "$rom"; } > "$seeds/assist_decoder/$(basename "$rom" .rom)-$m"
        { printf "\\x0$m"; head -c 256 "$rom"; } > "$seeds/assist_decoder/$(basename "$rom" .rom)-head-$m"
    done
done
[ -d "$seeds/cli" ] && {
    printf -- '-c\x002\x00-m\x00512M\x00-s\x000,hostbridge\x00-s\x002,virtio-blk,disk.img,ro\x00-l\x00com1,stdio\x00-l\x00bootrom,rom.fd\x00vm' > "$seeds/cli/typical"
    printf -- '-c\x004,sockets=2,cores=2,threads=1\x00-o\x00boot.kernel=vmlinuz\x00-o\x00boot.cmdline=console=ttyS0\x00vm' > "$seeds/cli/kernel"
    printf -- '--api-socket\x00/tmp/a.sock' > "$seeds/cli/api"
}
[ -d "$seeds/config_file" ] && printf 'memory.size=1G\ncpus=2\npci.0.2.0.device=virtio-blk\npci.0.2.0.path=%%(disk)\ndisk=/tmp/d.img\n# comment\n\nlpc.com1.path=stdio\n' > "$seeds/config_file/example"
[ -d "$seeds/rtc" ] && printf '\x00\x0a\x01\x26\x00\x0b\x01\x42\x02\x0c\x03\x00\x00\x32\x03\x00' > "$seeds/rtc/periodic"
[ -d "$seeds/fw_cfg" ] && printf '\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x03\x00\x00\x00\x00\x00\x00\x00\x00\x19\x00\x02\x00\x10\x00\x00\x00\x00\x0a\x00' > "$seeds/fw_cfg/select-read"
[ -d "$seeds/bzimage" ] && head -c 4096 .cache/debian-guest/vmlinuz > "$seeds/bzimage/debian-head" 2>/dev/null || true
status=0
for t in "${targets[@]}"; do
    echo "fuzz: $t for ${secs} s"
    if ! cargo +nightly fuzz run --fuzz-dir fuzz "$t" "fuzz/corpus/$t" "$seeds/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"fuzz/last-$t.log" 2>&1; then
        echo "fuzz: $t FAILED (fuzz/last-$t.log):" >&2
        tail -n 40 "fuzz/last-$t.log" >&2
        status=1
    fi
    grep -E "^stat::number_of_executed_units|^Done" "fuzz/last-$t.log" | sed "s/^/fuzz: $t: /" || true
done
exit "$status"
