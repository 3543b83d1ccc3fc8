#!/usr/bin/env bash
# Sets up a machine and runs every check: rustfmt, clippy, unit tests and the KVM tests.
#   scripts/test.sh          the whole suite (what CI runs)
#   scripts/test.sh --fast   unit tests only: a few seconds (the MSI-X ones open /dev/kvm)
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
cargo test 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line over every test binary: "tests: N passed, N failed".
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
