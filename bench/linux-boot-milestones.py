#!/usr/bin/env python3
# Wall-clock time from exec of rhyve to milestones in a stock Linux boot (Debian cloud kernel,
# fetched by scripts/fetch-linux.sh). Run from the repository root after cargo build --release.
import subprocess, sys, time
k = subprocess.check_output(["scripts/fetch-linux.sh"]).decode().strip()
cmd = ["target/release/rhyve", "-c", "2", "-m", "512M", "-l", "com1,stdio", "-o", "boot.kernel=" + k,
       "-o", "boot.cmdline=console=ttyS0 mitigations=off nowatchdog cryptomgr.notests no-kvmclock init_on_alloc=0 rodata=off", "linux"]
marks = ["Linux version", "smp: Brought up", "ACPI: Interpreter enabled", "ACPI: PCI Root Bridge", "Serial: 8250", "Kernel panic"]
t0 = time.monotonic()
p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
seen = {}
for line in p.stdout:
    l = line.decode(errors="replace")
    for m in marks:
        if m in l and m not in seen:
            seen[m] = time.monotonic() - t0
            print(f"{seen[m]:7.1f} s  {l.strip()[:110]}", flush=True)
    if "Kernel panic" in l:
        p.terminate()
        break
p.wait()
