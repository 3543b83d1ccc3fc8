#!/usr/bin/env python3
"""Runs a command of the nested harness and judges it by progress, not wall time.

    scripts/lib/watch.py STALL_SECONDS COMMAND [ARGS...]

Copies the command's output through as it comes. When the command prints nothing for
STALL_SECONDS, or L1's kernel reports a soft lockup or an RCU stall, the outer guest (L1) is taken to be stuck: if RHYVE_L1_MONITOR names QEMU's
monitor socket (scripts/nested.sh opens it there), L1's kernel is asked through it for the
blocked tasks and every CPU's backtrace (magic SysRq w and l), which are printed on L1's
console and so here, and QEMU is asked where each L1 CPU is (its registers); then the command's whole process group (QEMU and virtiofsd included)
is killed and this exits with status 124. Otherwise it exits with the command's status.
"""

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time


# L1's kernel reporting that it is stuck: such an L1 was never seen to recover (a soft lockup
# in kvm_destroy_vm is reported again every ~28 s, for ever), so it is stopped at once.
SICK = re.compile(rb"BUG: soft lockup|rcu: INFO: rcu_\w+ (self-)?detected (stall|expedited)|"
                  rb"rcu_\w+ kthread (timer wakeup didn't happen|starved)")


def ask_l1_for_backtraces(path):
    """Asks L1's kernel for its backtraces (magic SysRq w, l), then asks QEMU itself where
    each L1 CPU is (a hard-hung L1 does not answer SysRq): QEMU's answer is printed here."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(path)
            for key in ("w", "l"):
                s.sendall(f"sendkey alt-sysrq-{key}\n".encode())
                time.sleep(1)
            s.sendall(b"info cpus\ninfo registers -a\n")
            reply = b""
            end = time.monotonic() + 5
            while time.monotonic() < end:
                try:
                    chunk = s.recv(65536)
                except socket.timeout:
                    break
                if not chunk:
                    break
                reply += chunk
                s.settimeout(max(0.1, min(1.0, end - time.monotonic())))
            text = reply.decode(errors="replace").replace("\r", "")
            if text.strip():
                print(f"watch: QEMU's view of L1's CPUs:\n{text}", file=sys.stderr, flush=True)
            else:
                print("watch: QEMU's monitor did not answer within 5 s (QEMU itself is stuck, "
                      "not only L1's kernel)", file=sys.stderr, flush=True)
    except OSError as e:
        print(f"watch: cannot reach L1's monitor at {path}: {e}", file=sys.stderr, flush=True)


def main():
    if len(sys.argv) < 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    stall = float(sys.argv[1])
    child = subprocess.Popen(sys.argv[2:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    out = sys.stdout.buffer
    fd = child.stdout.fileno()
    last = time.monotonic()
    stalled_at = None
    sick = False
    while True:
        ready, _, _ = select.select([fd], [], [], 5)
        if ready:
            data = os.read(fd, 65536)
            if not data:
                break
            out.write(data)
            out.flush()
            last = time.monotonic()
            sick = sick or bool(SICK.search(data))
        now = time.monotonic()
        why = None
        if sick:
            why = "L1's kernel reports a soft lockup or an RCU stall"
        elif now - last >= stall:
            why = f"no output for {stall:.0f} s"
        if stalled_at is None and why:
            stalled_at = now
            print(f"\nwatch: {why}: L1 looks stuck; asking it for backtraces, then stopping "
                  "it", file=sys.stderr, flush=True)
            monitor = os.environ.get("RHYVE_L1_MONITOR")
            if monitor:
                ask_l1_for_backtraces(monitor)
        if stalled_at is not None and now - stalled_at >= 30:
            break
    if stalled_at is not None:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.wait()
        return 124
    return child.wait()


if __name__ == "__main__":
    sys.exit(main())
