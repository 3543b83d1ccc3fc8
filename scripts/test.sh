#!/usr/bin/env bash
# Sets up a machine and runs every check: rustfmt, clippy, unit tests and the KVM tests.
#   scripts/test.sh          the whole suite (what CI runs)
#   scripts/test.sh --fast   unit tests only: a few seconds (the MSI-X ones open /dev/kvm)
#   scripts/test.sh --no-linux   everything but the two long Linux boots: about a minute
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fast" ]; then
    exec cargo test --lib
fi
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
if [ "${1:-}" = "--no-linux" ]; then
    cargo test -- --skip debian_guest 2>&1 | tee "$log"
else
    cargo test 2>&1 | tee "$log"
fi
status=${PIPESTATUS[0]}
set -e
# One closing line over every test binary: "tests: N passed, N failed".
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
