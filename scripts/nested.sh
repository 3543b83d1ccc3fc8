#!/usr/bin/env bash
# The nested harness: runs a command inside an outer guest ("L1": Debian's cloud kernel under
# QEMU's TCG with an emulated AMD CPU that has SVM and nested paging), where /dev/kvm is a
# KVM with hardware-virtualization semantics. L1's root is this host's root, shared with
# virtiofsd, so the command sees the same files (the checkout, target/, installed tools) in
# the same current directory; /dev (with /dev/kvm), /proc, /sys, /tmp and /run are L1's own.
#   scripts/nested.sh [-c L1_CPUS] [-m L1_MEM] [-i] [-v] COMMAND [ARGS...]
# Prints what the command prints (on L1's serial console) and exits with its status (125 if
# L1 itself failed). -i passes this terminal's input to the command (an interactive guest
# console); without it the command's input is empty. -v shows L1's whole kernel log; without it
# only warnings and worse (loglevel=5), so a soft lockup's or RCU stall's backtrace still shows. Timings inside L1 are emulation timings.
# RHYVE_L1_TCG=single runs L1's vCPUs on one host thread (QEMU's default is one per vCPU).
# RHYVE_L1_CPU=MODEL replaces L1's CPU model (qemu64,+svm,+npt; with -cpu max, L2 reports an
# XSAVE consistency problem).
# With RHYVE_L1_MONITOR=PATH, QEMU's monitor listens on that unix socket (scripts/lib/watch.py
# uses it to ask a stuck L1 for backtraces; L1's kernel takes every magic SysRq key).
# L1 runs without transparent huge pages: with them, L1's kernel panicked now and then
# ("corrupted stack end detected inside scheduler" on a rhyve vCPU thread) while L2 guests
# ran; see README.md, "The nested harness".
set -euo pipefail
cpus=${RHYVE_L1_CPUS:-2} mem=${RHYVE_L1_MEM:-4G} quiet="quiet loglevel=5" input=/dev/null
while getopts c:m:iv opt; do
    case $opt in
        c) cpus=$OPTARG ;;
        m) mem=$OPTARG ;;
        i) input=/dev/stdin ;;
        v) quiet= ;;
        *) echo "usage: scripts/nested.sh [-c L1_CPUS] [-m L1_MEM] [-i] [-v] COMMAND [ARGS...]" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || { echo "nested: no command given (scripts/nested.sh -h)" >&2; exit 2; }
here=$(dirname "$0")
for cmd in qemu-system-x86_64:qemu-system-x86; do
    command -v "${cmd%%:*}" >/dev/null 2>&1 || {
        echo "nested: ${cmd%%:*} is missing: run scripts/setup.sh (or apt-get install ${cmd#*:})" >&2
        exit 1
    }
done
# L1 shares the host's root except its own /tmp, /run, /dev, /proc and /sys: a checkout there
# is not what L1 sees (the run would end with "L1 ended without the command's exit status").
case "$PWD/" in
/tmp/* | /run/* | /dev/* | /proc/* | /sys/*)
    echo "nested: $PWD is under a directory L1 does not share with this host (/tmp, /run, /dev, /proc, /sys are its own): run from a checkout elsewhere" >&2
    exit 1
    ;;
esac
virtiofsd=/usr/lib/qemu/virtiofsd
[ -x "$virtiofsd" ] || { echo "nested: $virtiofsd is missing: apt-get install qemu-system-common" >&2; exit 1; }
l1=$("$here/build-l1.sh")

runs=$l1/runs
mkdir -p "$runs"
id=$(mktemp -u XXXXXXXX)
script=$runs/$id.sh status=$runs/$id.status sock=$runs/$id.sock
trap 'rm -f "$script" "$status" "$sock"; kill "${fsd:-}" 2>/dev/null || true' EXIT
{
    echo "# scripts/nested.sh: the command, its directory and environment, run in L1"
    # The environment, less what names this host's terminal or session.
    export -p | grep -v -E '^declare -x (TERM|SSH_|DISPLAY|XDG_|DBUS_|SHLVL|OLDPWD|_=)' || true
    # Tells the tests where they run (tests/common: in_nested_harness).
    echo "export RHYVE_NESTED_L1=1"
    printf 'cd %q || exit 125\n' "$PWD"
    printf 'exec'
    printf ' %q' "$@"
    printf '\n'
} >"$script"

"$virtiofsd" --socket-path="$sock" -o source=/ -o cache=auto -o sandbox=chroot \
    -o log_level=err </dev/null >"$runs/$id.fsd.log" 2>&1 &
fsd=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
[ -S "$sock" ] || { echo "nested: virtiofsd did not start: $(cat "$runs/$id.fsd.log")" >&2; exit 125; }

monitor=()
[ -z "${RHYVE_L1_MONITOR:-}" ] || monitor=(-monitor "unix:$RHYVE_L1_MONITOR,server,nowait")
qemu-system-x86_64 "${monitor[@]}" -accel "tcg,thread=${RHYVE_L1_TCG:-multi}" -cpu "${RHYVE_L1_CPU:-qemu64,+svm,+npt}" -smp "$cpus" -m "$mem" \
    -machine pc -nodefaults -display none -no-reboot \
    -object "memory-backend-memfd,id=mem,size=$mem,share=on" -numa node,memdev=mem \
    -chardev "socket,id=fs,path=$sock" -device vhost-user-fs-pci,chardev=fs,tag=host \
    -chardev stdio,id=con,signal=off -serial chardev:con \
    -kernel "$l1/vmlinuz" -initrd "$l1/initrd.img" \
    -append "console=ttyS0 panic=-1 $quiet mitigations=off transparent_hugepage=never sysrq_always_enabled l1.run=$script l1.status=$status" \
    <"$input" || true
if ! [ -s "$status" ]; then
    echo "nested: L1 ended without the command's exit status (rerun with -v for L1's kernel log)" >&2
    exit 125
fi
exit "$(cat "$status")"
