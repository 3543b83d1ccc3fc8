#!/usr/bin/env bash
# Sets up a machine and runs every check: rustfmt, clippy, unit tests, the KVM tests and the
# real-Linux-guest scenarios.
#   scripts/test.sh              the whole suite (what CI runs)
#   scripts/test.sh --fast       unit tests only (a few seconds where KVM is at hand; the
#                                MSI-X ones open /dev/kvm)
#   scripts/test.sh --no-linux   everything but the Linux guests
# The KVM tests run where a KVM can run them (scripts/kvm-kind.sh):
#   hw    here, all of them;
#   pvm   here, all but the real-guest scenarios (tests/real_guest.rs), which need Linux user
#         space and run in the nested harness (scripts/nested.sh: QEMU's TCG with an SVM CPU);
#   none  all of them in the nested harness (QEMU needs no KVM; everything is emulated, so
#         about ten times slower).
# The PVM-only boots (tests/linux.rs' debian_guest_*_on_pvm) run only on PVM hosts, where
# their subject exists; this script says so when it leaves them out.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-all}
scripts/setup.sh
kind=$(scripts/kvm-kind.sh 2>/tmp/rhyve-kvm-kind.$$ || true)
echo "test: this host's KVM: $kind ($(cat /tmp/rhyve-kvm-kind.$$ 2>/dev/null; rm -f /tmp/rhyve-kvm-kind.$$))" >&2
# L1 gets 4 vCPUs (a 4-vCPU guest in an L1 with 2 panicked L1's kernel once), and runs one
# test, so one rhyve VM, at a time: with several L2 VMs at once, L1's kernel panicked
# ("corrupted stack end detected inside scheduler" on a rhyve vCPU thread) or hung, in 3 of 4
# runs here; with one at a time it did not (README.md, "The nested harness").
nested="scripts/nested.sh -c 4"
# In the harness the ROM tests use the release build too: everything is emulated there, and
# the hello ROM's run took 3.1 s with the debug build, 1.8 s with release. The unit tests stay debug (overflow
# checks) everywhere.
case $kind in
    hw) here="" ; rg="" ; threads=() ; rgthreads=(--test-threads=2) ; prof=() ;;
    pvm) here="" ; rg=$nested ; threads=() ; rgthreads=(--test-threads=1) ; prof=() ;;
    *) here=$nested ; rg=$nested ; threads=(--test-threads=1) ; rgthreads=(--test-threads=1) ; prof=(--release) ;;
esac
if [ "$mode" = "--fast" ]; then
    cargo test --lib --no-run --quiet
    exec $here cargo test --lib
fi
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
# Build everything on the host (native speed); the runs below only execute.
cargo test --no-run --quiet
[ ${#prof[@]} -eq 0 ] || cargo test "${prof[@]}" --no-run --quiet
if [ "$mode" != "--no-linux" ]; then
    cargo test --release --no-run --quiet --test real_guest --test linux
    # Built here: the nested harness has no network to download Debian's packages.
    scripts/build-debian-guest.sh >/dev/null
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
export CARGO_TERM_COLOR=never
status=0
[ "$kind" = pvm ] || echo "test: not running tests/linux.rs (its boots are about PVM hosts): this host's KVM is not PVM" >&2
# In the harness each test binary gets its own L1, judged by progress (scripts/lib/watch.py):
# an L1 that prints nothing for the given time is stopped, with its kernel's backtraces in
# the log, and that binary runs once more. Stalls are counted in the closing line.
in_l1() {
    local stall=$1 rc=0 attempt
    shift
    for attempt in 1 2; do
        echo "test: harness run: $*"
        RHYVE_L1_MONITOR=/tmp/rhyve-l1-mon.$$ scripts/lib/watch.py "$stall" $nested "$@"
        rc=$?
        rm -f /tmp/rhyve-l1-mon.$$
        [ "$rc" -ne 0 ] || return 0
        [ "$attempt" -eq 1 ] || break
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 125 ]; then
            echo "test: harness stall: L1 stalled or died (status $rc) running: $*" >&2
        else
            # Under this emulation a vCPU now and then loses its control flow (README.md,
            # "The nested harness"): a failing binary runs once more, and only that second
            # run's results count. A defect that fails every time still fails.
            echo "test: harness rerun: tests failed (status $rc) running: $*" >&2
        fi
    done
    return "$rc"
}
# Runs "$@" where the KVM tests run (here, or in the harness), appending to the log.
run() {
    local stall=$1
    shift
    if [ -n "$here" ]; then
        in_l1 "$stall" "$@" 2>&1 | tee -a "$log"
    else
        "$@" 2>&1 | tee -a "$log"
    fi
    s=${PIPESTATUS[0]}
    [ "$s" -eq 0 ] || status=$s
}
set +e
run 300 cargo test --no-fail-fast --lib --bins
if [ -n "$here" ]; then
    for t in tests/*.rs; do
        t=$(basename "$t" .rs)
        case $t in linux | real_guest) continue ;; esac
        run 400 cargo test "${prof[@]}" --no-fail-fast --test "$t" -- "${threads[@]}"
    done
else
    run 0 cargo test "${prof[@]}" --no-fail-fast --tests -- --skip debian_guest --skip real_guest
fi
if [ "$mode" != "--no-linux" ]; then
    # The Linux guests with the release build: their devices move megabytes. The PVM boots
    # run on the host, and only on a PVM host.
    if [ "$kind" = pvm ]; then
        cargo test --release --no-fail-fast --test linux -- --nocapture 2>&1 | tee -a "$log"
        s=${PIPESTATUS[0]}
        [ "$s" -eq 0 ] || status=$s
    fi
    rgcmd=(cargo test --release --no-fail-fast --test real_guest -- --nocapture "${rgthreads[@]}")
    if [ -n "$rg" ]; then
        # Every guest console line is shown, so the watchdog sees a booting guest's progress.
        export RHYVE_TEST_CONSOLE=1
        in_l1 480 "${rgcmd[@]}" 2>&1 | tee -a "$log"
    else
        "${rgcmd[@]}" 2>&1 | tee -a "$log"
    fi
    s=${PIPESTATUS[0]}
    [ "$s" -eq 0 ] || status=$s
fi
set -e
# One closing line over every test binary: "tests: N passed, N failed".
# Each attempt in the harness starts with "test: harness run"; an attempt that ends in a stall
# or a rerun has its results taken back, so only the last attempt of each binary counts.
stalls=$(grep -c '^test: harness stall' "$log" || true)
reruns=$(grep -c '^test: harness rerun' "$log" || true)
retries=$(grep -c '^harness: retry' "$log" || true)
tr -d '\r' <"$log" | awk -v s="$stalls" -v n="$reruns" -v r="$retries" '
    /^test: harness run:/ { bp = 0; bf = 0 }
    /^test result:/ { p += $4; f += $6; bp += $4; bf += $6 }
    /^test: harness (stall|rerun):/ { p -= bp; f -= bf; bp = 0; bf = 0 }
    END { printf "tests: %d passed, %d failed (harness: %d stalls, %d failing binaries rerun; SMP ROM runs retried: %d)\n", p, f, s, n, r }'
exit "$status"
