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
    cargo test --workspace --lib --no-run --quiet
    exec $here cargo test --workspace --lib
fi
cargo fmt --all -- --check
python3 scripts/layers.py
cargo clippy --workspace --all-targets --quiet -- -D warnings
# Build everything on the host (native speed); the runs below only execute.
cargo test --workspace --no-run --quiet
[ ${#prof[@]} -eq 0 ] || cargo test "${prof[@]}" --workspace --no-run --quiet
if [ "$mode" != "--no-linux" ]; then
    cargo test --release --no-run --quiet --test real_guest --test linux
    # Built here: the nested harness has no network to download Debian's packages.
    scripts/build-debian-guest.sh >/dev/null
fi
# The test ROMs, built once here; every test binary reads them (tests/common: guests).
rm -rf target/test-guests
sh guests/build.sh target/test-guests
export RHYVE_TEST_GUESTS=$PWD/target/test-guests
log=$(mktemp)
trap 'rm -f "$log"' EXIT
export CARGO_TERM_COLOR=never
status=0
[ "$kind" = pvm ] || echo "test: not running tests/linux.rs (its boots are about PVM hosts): this host's KVM is not PVM" >&2
# In the harness each test binary gets its own L1, judged by progress (scripts/lib/watch.py):
# an L1 that prints nothing for the given time is stopped, with its kernel's backtraces in
# the log. A binary that stalled or had failures runs again, up to twice, with only the tests
# that have not passed yet (scripts/lib/tally.py reads which did); each test's last result
# counts. Stalls and reruns are counted in the closing lines.
in_l1() {
    local stall=$1 rc=0 attempt out sep=() skip=()
    shift
    out=$(mktemp)
    case " $* " in *" -- "*) ;; *) sep=(--) ;; esac
    for attempt in 1 2 3; do
        echo "test: harness run $attempt: $* ${sep[*]} ${skip[*]}"
        RHYVE_L1_MONITOR=/tmp/rhyve-l1-mon.$$ scripts/lib/watch.py "$stall" $nested "$@" \
            "${sep[@]}" "${skip[@]}" 2>&1 | tee "$out"
        rc=${PIPESTATUS[0]}
        rm -f /tmp/rhyve-l1-mon.$$
        [ "$rc" -ne 0 ] || break
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 125 ]; then
            echo "test: harness stall: L1 stalled or died (status $rc) in attempt $attempt of: $*" >&2
        else
            # Under this emulation a vCPU now and then loses its control flow (README.md,
            # "The nested harness"): the failed tests run again, and their last run counts.
            # A defect that fails every time still fails.
            echo "test: harness rerun: tests failed (status $rc) in attempt $attempt of: $*" >&2
        fi
        [ "$attempt" -lt 3 ] || break
        [ ${#skip[@]} -gt 0 ] || skip=(--exact)
        while read -r name; do skip+=(--skip "$name"); done < <(scripts/lib/tally.py --passed "$out")
    done
    rm -f "$out"
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
run 300 cargo test --no-fail-fast --workspace --lib --bins
# rhyvectl's own binary tests (exit statuses against in-test servers; no KVM).
run 300 cargo test --no-fail-fast -p rhyvectl --test cli
if [ -n "$here" ]; then
    for t in tests/*.rs; do
        t=$(basename "$t" .rs)
        case $t in linux | real_guest) continue ;; esac
        run 300 cargo test "${prof[@]}" --no-fail-fast --test "$t" -- "${threads[@]}"
    done
else
    # tests/linux.rs' PVM boots and firmware runs come below, with the release build.
    run 0 cargo test "${prof[@]}" --no-fail-fast --tests -- --skip debian_guest --skip firmware_ --skip real_guest
fi
if [ "$mode" != "--no-linux" ]; then
    # The Linux guests with the release build: their devices move megabytes. The PVM boots
    # run on the host, and only on a PVM host, one at a time: on 2026-12-05 each took about
    # 710 s alone here, while two side by side (3 vCPUs on 2 cores) took 1650 s and the
    # 2-vCPU one went silent for the whole 600 s stall allowance. Since 2026-12-07 there is
    # one Linux boot (two took 2210 s of a 3837 s CI run).
    if [ "$kind" = pvm ]; then
        cargo test --release --no-fail-fast --test linux -- --nocapture --test-threads=1 2>&1 | tee -a "$log"
        s=${PIPESTATUS[0]}
        [ "$s" -eq 0 ] || status=$s
    fi
    rgcmd=(cargo test --release --no-fail-fast --test real_guest -- --nocapture "${rgthreads[@]}")
    if [ -n "$rg" ]; then
        # Every guest console line is shown, so the watchdog sees a booting guest's progress.
        export RHYVE_TEST_CONSOLE=1
        # The harness's QEMU (7.2 and 10.0 alike) aborts when an SVM guest writes CR8 while a
        # virtual interrupt is pending, which OVMF's interrupt return path does on every tick
        # (README.md, "The nested harness"): the OVMF boots run only on hardware KVM.
        echo "test: not running the OVMF boots (real_guest_ovmf_*) in the nested harness: its QEMU aborts on OVMF's CR8 writes" | tee -a "$log" >&2
        # Whole names: a rerun adds --exact, which makes --skip match whole names only.
        for t in real_guest_ovmf_boots_systemd_boot_from_a_gpt_disk_and_keeps_a_uefi_variable_across_boots \
            real_guest_ovmf_single_file_boots_systemd_boot_to_user_space; do
            grep -q "^fn $t()" tests/real_guest.rs || { echo "test: scripts/test.sh skips $t, which tests/real_guest.rs lacks" >&2; exit 1; }
            rgcmd+=(--skip "$t")
        done
        in_l1 480 "${rgcmd[@]}" 2>&1 | tee -a "$log"
    else
        "${rgcmd[@]}" 2>&1 | tee -a "$log"
    fi
    s=${PIPESTATUS[0]}
    [ "$s" -eq 0 ] || status=$s
fi
set -e
# The closing lines: every test that failed or did not finish, by name, then
# "tests: N passed, N failed, ..." over every test binary, each test by its last result.
scripts/lib/tally.py "$log"
exit "$status"
