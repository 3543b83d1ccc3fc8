#!/usr/bin/env python3
"""Where a stock Linux boot's time goes on this host, and how it compares with QEMU.

Boots the Debian test guest (scripts/build-debian-guest.sh: Debian's cloud kernel, a busybox
initramfs, a virtio-blk disk, virtio-rnd) to its /init's poweroff, and reports
  - wall-clock time from exec to milestones: first console line, both CPUs up, PCI root,
    "Run /init", the guest's own "init running", poweroff;
  - VM exits by kind (rhyve's -o debug.exit_stats=true);
  - where the vCPUs were, from RIPs sampled at 100 Hz (-o debug.rip_samples): the
    decompressor (code below the kernel map), kernel functions (symbols from the Debian
    -dbg package's vmlinux when --symbols fetched it; the kernel runs with nokaslr), user
    space, halted;
  - the same kernel, initramfs and command line under QEMU (-accel tcg; with --qemu-kvm also
    -accel kvm), to the same milestones.
Run from the repository root after `cargo build --release`:
    python3 bench/linux-boot-profile.py [--symbols] [--no-unpack] [--qemu-kvm] [--no-qemu]
--no-unpack boots the bzImage through its own decompressor (boot.unpack_bzimage=false) instead
of rhyve unpacking its kernel ELF for the PVH entry (PVM's default).
"""
import bisect, collections, os, shutil, subprocess, sys, tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CMDLINE = ("console=ttyS0 vdso32=0 nokaslr mitigations=off nowatchdog no-kvmclock rodata=off "
           "cryptomgr.notests init_on_alloc=0 panic=1 rhyve.end=poweroff")
MARKS = [("first console line", "Linux version"), ("2 CPUs up", "smp: Brought up"),
         ("PCI root bridge", "PCI Root Bridge"), ("Run /init", "Run /init as init process"),
         ("init killed (PVM defect)", "Attempted to kill init"),
         ("/init running", "rhyve-guest: init running"), ("virtio modules loaded", "rhyve-guest: modules loaded"),
         ("poweroff", "rhyve-guest: end:"),
         ("KVM emulation failure (QEMU stops)", "KVM internal error")]


def run_timed(cmd, deadline=1800):
    """Runs cmd (killed after `deadline` s), returns ({mark: seconds}, output lines, exit code,
    diagnostics: the lines that are not the guest's console, e.g. rhyve's or QEMU's own)."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    timer = threading.Timer(deadline, p.kill)
    timer.start()
    seen, lines, diag = {}, [], []
    for raw in p.stdout:
        line = raw.decode(errors="replace").rstrip()
        lines.append(line)
        if line.startswith(("rhyve:", "  ", "qemu", "KVM", "emulation failure", "Code=")) and "[" not in line[:12]:
            diag.append(line)
        for name, m in MARKS:
            if m in line and name not in seen:
                seen[name] = time.monotonic() - t0
                print(f"  {seen[name]:7.1f} s  {name}", flush=True)
    code = p.wait()
    timer.cancel()
    seen["exit"] = time.monotonic() - t0
    return seen, lines, code, "\n".join(diag)


def symbols():
    """Kernel text symbols (address, name) from the -dbg package's vmlinux, or None."""
    vmlinux = os.path.join(ROOT, ".cache/linux-dbg/vmlinux")
    if not os.path.exists(vmlinux):
        return None
    syms = []
    for l in subprocess.check_output(["nm", "-n", vmlinux]).decode().splitlines():
        parts = l.split()
        if len(parts) == 3 and parts[1] in "tTwW":
            syms.append((int(parts[0], 16), parts[2]))
    return syms


def fetch_symbols():
    """Downloads linux-image-<version>-dbg (about 280 MB) and keeps only its vmlinux."""
    dest = os.path.join(ROOT, ".cache/linux-dbg")
    if os.path.exists(os.path.join(dest, "vmlinux")):
        return
    kernel = subprocess.check_output([os.path.join(ROOT, "scripts/fetch-linux.sh")]).decode().strip()
    ver = os.path.basename(kernel)[len("vmlinuz-"):]
    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        subprocess.check_call(["apt-get", "download", f"linux-image-{ver}-dbg"], cwd=tmp)
        deb = [f for f in os.listdir(tmp) if f.endswith(".deb")][0]
        member = f"./usr/lib/debug/boot/vmlinux-{ver}"
        subprocess.check_call(f"dpkg-deb --fsys-tarfile {deb} | tar -x {member}", shell=True, cwd=tmp)
        shutil.move(os.path.join(tmp, member), os.path.join(dest, "vmlinux"))


# Kernel functions grouped by what the boot was doing (first match wins).
GROUPS = [
    ("timer tick and scheduler", ("tick", "hrtimer", "timekeeping", "ktime_get", "sched_clock", "update_load_avg",
                                  "update_curr", "load_balance", "update_sd_lb", "update_blocked", "rcu_sched_clock",
                                  "update_vsyscall", "update_fast_timekeeper", "account_", "clockevents", "lapic_next",
                                  "update_rq_clock", "psi_", "update_process_times", "__sysvec_apic_timer",
                                  "native_apic_msr", "x2apic", "run_timer", "__run_timers", "irqtime", "cpuacct",
                                  "task_tick", "update_min_vruntime", "reweight", "__calc_delta")),
    ("ftrace start-up (symbol lookups, code checks)", ("get_symbol", "kallsyms", "ftrace", "test_for_valid_rec",
                                                       "arch_syscall_match", "syscall_match", "find_syscall")),
    ("trace events set-up", ("trace_event", "trace_define", "event_", "eval_")),
    ("BTF parsing", ("btf",)),
    ("alternatives, jump labels, ORC, text patching", ("text_poke", "apply_", "insn_", "jump_label", "orc", "sort_r",
                                                      "do_swap", "optimize_nops", "alternative")),
    ("memory copy and initialisation", ("memmove", "memcpy", "memset", "clear_page", "clear_bss", "memmap_init",
                                        "__init_single_page", "memblock", "copy_page", "deferred_init")),
    ("stop_machine / cross-CPU waits", ("multi_cpu_stop", "stop_machine", "rcu_momentary", "smp_call_function",
                                         "csd_lock", "native_queued_spin", "pv_queued_spin", "_raw_spin")),
    ("udelay/mdelay loops", ("delay_tsc", "__const_udelay", "__udelay", "delay_loop")),
    ("serial console output", ("serial8250", "io_serial", "uart_console", "wait_for_xmitr", "vprintk", "vsnprintf",
                               "console_", "format_decode", "number", "string", "symbol_string")),
]


def group_of(name):
    if name.startswith("("):
        return name
    for title, keys in GROUPS:
        if any(k in name for k in keys):
            return title
    return "other kernel code"


def where(samples, syms, marks):
    """Prints the share of samples per place, overall and per boot phase."""
    addrs = [a for a, _ in syms] if syms else []

    def place(cpl, rip, state):
        if state == "H":
            return "(halted, waiting for an interrupt)"
        if state == "W":
            return "(AP waiting for INIT/SIPI)"
        if cpl == 3:
            return "(user space)"
        if rip < 0xffffffff80000000:
            return "(decompressor / code below the kernel map)"
        if not syms:
            return "(kernel)"
        i = bisect.bisect_right(addrs, rip) - 1
        return syms[i][1] if i >= 0 else "(kernel, no symbol)"

    phases = [("exec to console", 0, marks.get("first console line", 1e9))]
    prev = marks.get("first console line", 1e9)
    for name in ["Run /init", "exit"]:
        if name in marks:
            phases.append((f"to {name}", prev, marks[name]))
            prev = marks[name]
    for title, lo, hi in [("whole run", 0, 1e9)] + phases:
        # The BSP (vCPU 0) does the kernel's initialisation; the AP mostly idles.
        c = collections.Counter(place(cpl, rip, h) for t, v, cpl, rip, h in samples if lo <= t < hi and v == 0)
        ap = collections.Counter(place(cpl, rip, h) for t, v, cpl, rip, h in samples if lo <= t < hi and v == 1)
        total = sum(c.values())
        if not total:
            continue
        print(f"\n  where vCPU 0 was, {title} ({lo:.0f}-{min(hi, marks['exit']):.0f} s, {total} samples at 100 Hz):")
        if syms:
            groups = collections.Counter()
            for name, n in c.items():
                groups[group_of(name)] += n
            for name, n in groups.most_common():
                print(f"    {100.0 * n / total:5.1f}%  {name}")
            print("    top functions:")
        for name, n in c.most_common(12):
            print(f"    {100.0 * n / total:5.1f}%  {name}")
        if ap:
            idle = sum(n for name, n in ap.items() if name.startswith("(halted") or name.startswith("(AP"))
            print(f"    (vCPU 1 meanwhile: {100.0 * idle / sum(ap.values()):.0f}% halted or waiting for SIPI)")


def main():
    args = sys.argv[1:]
    os.chdir(ROOT)
    guest = subprocess.check_output(["scripts/build-debian-guest.sh"]).decode().strip().splitlines()[-1]
    if "--symbols" in args:
        fetch_symbols()
    syms = symbols()
    tmp = tempfile.mkdtemp()
    disk = os.path.join(tmp, "disk.ext4")
    shutil.copy(os.path.join(guest, "disk.ext4"), disk)
    samples_path = os.path.join(tmp, "samples")
    how = "the bzImage's decompressor" if "--no-unpack" in args else "kernel ELF unpacked by rhyve, PVH entry"
    print(f"rhyve (KVM, this host's PVM), -c 2 -m 512M, virtio-blk + virtio-rnd, {how}:")
    marks, lines, code, err = run_timed([
        "target/release/rhyve", "-c", "2", "-m", "512M", "-l", "com1,stdio",
        "-s", f"2,virtio-blk,{disk}", "-s", "3,virtio-rnd",
        "-o", f"boot.kernel={guest}/vmlinuz", "-o", f"boot.initrd={guest}/initrd.img",
        "-o", f"boot.cmdline={CMDLINE}", "-o", "debug.exit_stats=true",
        "-o", "boot.unpack_bzimage=" + ("false" if "--no-unpack" in args else "true"),
        "-o", f"debug.rip_samples={samples_path}", "linux"])
    print(f"  {marks['exit']:7.1f} s  exit status {code}")
    print("\n" + "\n".join("  " + l for l in err.replace("\r", "").splitlines()))
    samples = []
    for l in open(samples_path):
        if not l.startswith("#"):
            t, vcpu, cpl, rip, h = l.split()
            samples.append((float(t), int(vcpu), int(cpl), int(rip, 16), h))
    where(samples, syms, marks)
    if "--no-qemu" in args:
        return
    accels = ["tcg"] + (["kvm"] if "--qemu-kvm" in args else [])
    for accel in accels:
        shutil.copy(os.path.join(guest, "disk.ext4"), disk)
        print(f"\nQEMU {accel} (same kernel, initramfs, command line; -smp 2 -m 512M, virtio-blk + virtio-rng):")
        # QEMU pauses the VM on a KVM emulation failure and waits: give it 5 minutes.
        qm, _, qcode, qerr = run_timed(deadline=300, cmd=[
            "qemu-system-x86_64", "-accel", accel, "-M", "q35", "-smp", "2", "-m", "512M",
            "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
            "-kernel", f"{guest}/vmlinuz", "-initrd", f"{guest}/initrd.img", "-append", CMDLINE,
            "-drive", f"file={disk},format=raw,if=none,id=d0", "-device", "virtio-blk-pci,drive=d0",
            "-device", "virtio-rng-pci", "-nic", "none"])
        print(f"  {qm['exit']:7.1f} s  exit status {qcode}")
        print("\n".join("    " + l for l in qerr.splitlines()[:12]))
        for name, _ in MARKS:
            if name in marks and name in qm:
                print(f"    {name:24s} rhyve {marks[name]:7.1f} s   qemu-{accel} {qm[name]:7.1f} s   ratio {marks[name] / qm[name]:.2f}")


if __name__ == "__main__":
    main()
