#!/usr/bin/env bash
# Checks a live rhyve API server against docs/api/openapi.yaml with schemathesis.
#
#   scripts/api-check.sh SOCKET [--max-examples N]
#   scripts/api-check.sh --install       only install schemathesis (scripts/setup.sh does)
#
# SOCKET is the unix socket rhyve's API server listens on (rhyve --api-socket SOCKET).
# schemathesis speaks TCP only, so this script makes a network namespace of its own
# (rhyve-api-PID, loopback only, removed on exit), runs scripts/lib/unix_relay.py inside it
# (127.0.0.1:PORT -> SOCKET), and runs schemathesis there against http://127.0.0.1:PORT/api/v1.
# No traffic leaves that namespace's loopback. Needs root (ip netns).
#
# What it runs: every operation in the document except PUT /vmm.shutdown (it would end the
# server mid-run), vm.snapshot and vm.restore (they write and read directories wherever the
# generated URL says, which a fuzzer running as root must not be let do; tests/snapshot.rs
# covers them), and vm.send-migration and vm.receive-migration (they connect to, or listen at,
# whatever unix socket or TCP address the generated URL says, and then block while they wait
# for the other side: up to 120 s for a source, an hour for a migration, far past the 10 s
# request timeout; tests/migration.rs covers them), in schemathesis's examples, coverage and
# fuzzing phases (the stateful phase is off: the document defines no links), at most N
# generated cases per operation (default 30), one worker (the server holds one VM, so requests
# are best sent one at a time), a 10 s timeout per request, and every check schemathesis has
# except positive_data_acceptance (rhyve refuses, with 400, much that the schema cannot rule
# out: max_vcpus other than boot_vcpus, a kernel or tap that does not exist, a second VM).
#
# schemathesis is installed on demand: the first run creates a venv at .cache/schemathesis
# (git-ignored) and pip-installs schemathesis there (one line says so); later runs reuse it.
# scripts/setup.sh installs it ahead of the tests.
#
# Exits with schemathesis's status (0: every check passed), printing its output and summary;
# 2 for a usage error or a setup failure.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SCHEMATHESIS_VERSION=4.32.5
VENV=$ROOT/.cache/schemathesis
SPEC=$ROOT/docs/api/openapi.yaml
RELAY=$ROOT/scripts/lib/unix_relay.py

usage() {
    echo "usage: scripts/api-check.sh SOCKET [--max-examples N]" >&2
    exit 2
}
die() {
    echo "api-check: $*" >&2
    exit 2
}

# schemathesis, on demand, in its own venv.
install() {
    if ! "$VENV/bin/schemathesis" --version 2>/dev/null | grep -qF "$SCHEMATHESIS_VERSION"; then
        echo "api-check: installing schemathesis $SCHEMATHESIS_VERSION into .cache/schemathesis" >&2
        [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" || die "python3 -m venv failed (install python3-venv)"
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
            "schemathesis==$SCHEMATHESIS_VERSION" || die "pip could not install schemathesis"
    fi
}

socket_path="" max_examples=30
while [ $# -gt 0 ]; do
    case $1 in
    --max-examples) [ $# -ge 2 ] || usage; max_examples=$2; shift 2 ;;
    --max-examples=*) max_examples=${1#*=}; shift ;;
    --install) install; exit 0 ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    -*) usage ;;
    *) [ -z "$socket_path" ] || usage; socket_path=$1; shift ;;
    esac
done
[ -n "$socket_path" ] || usage
[[ $max_examples =~ ^[1-9][0-9]*$ ]] || die "--max-examples wants a positive integer, not '$max_examples'"
[ "$(id -u)" -eq 0 ] || die "needs root (it creates a network namespace with ip netns)"
command -v ip >/dev/null 2>&1 || die "ip (iproute2) is missing"
[ -S "$socket_path" ] || die "$socket_path is not a unix socket (is rhyve running with --api-socket $socket_path?)"
socket_path=$(cd "$(dirname "$socket_path")" && pwd)/$(basename "$socket_path")
install

ns=rhyve-api-$$
tmp=$(mktemp -d)
relay_pid="" st_pid=""
cleanup() {
    for pid in $st_pid $relay_pid; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ip netns add "$ns" || die "could not create network namespace $ns"
ip -n "$ns" link set lo up

# The relay, inside the namespace; it writes its port to $tmp/port once it listens.
ip netns exec "$ns" "$VENV/bin/python" "$RELAY" "$socket_path" --port 0 --ready "$tmp/port" \
    2>"$tmp/relay.log" &
relay_pid=$!
for _ in $(seq 100); do
    [ -s "$tmp/port" ] && break
    kill -0 "$relay_pid" 2>/dev/null || { cat "$tmp/relay.log" >&2; die "the relay did not start"; }
    sleep 0.05
done
[ -s "$tmp/port" ] || die "the relay did not start listening within 5 s"
port=$(cat "$tmp/port")

cmd=(
    "$VENV/bin/schemathesis" run "$SPEC"
    --url "http://127.0.0.1:$port/api/v1"
    --exclude-path /vmm.shutdown
    --exclude-path /vm.snapshot
    --exclude-path /vm.restore
    --exclude-path /vm.send-migration
    --exclude-path /vm.receive-migration
    --checks all --exclude-checks positive_data_acceptance
    --phases examples,coverage,fuzzing
    --max-examples "$max_examples"
    --request-timeout 10
    --workers 1
    --generation-database none
)
echo "api-check: schemathesis $SCHEMATHESIS_VERSION against $socket_path (via 127.0.0.1:$port in netns $ns)"
# From the scratch directory, so that nothing schemathesis writes lands in the work tree; in
# the background, so that a signal to this script ends the run at once (cleanup kills it).
(cd "$tmp" && exec ip netns exec "$ns" "${cmd[@]}") &
st_pid=$!
status=0
wait "$st_pid" || status=$?
st_pid=""
if [ -s "$tmp/relay.log" ] && grep -q "cannot connect" "$tmp/relay.log"; then
    echo "api-check: the relay could not always reach $socket_path:" >&2
    grep "cannot connect" "$tmp/relay.log" | sort | uniq -c | head -5 >&2
fi
exit "$status"
