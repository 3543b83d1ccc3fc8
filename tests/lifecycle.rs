//! KVM tests of the vCPU lifecycle: pause and resume while the guest runs, `-p` pinning of the
//! `vcpu N` threads, and SIGTERM.

mod common;
use common::*;

use std::time::{Duration, Instant};

use rhyve::cli::{self, Action};
use rhyve::vmm::control::SuspendReason;
use rhyve::vmm::Vm;
use vm_memory::{Bytes, GuestAddress};

/// The spin ROM's counter (guests/rom/rom.h COUNTER).
const COUNTER: u64 = 0x6000;

fn counter(vm: &Vm) -> u32 {
    vm.guest_memory()
        .read_obj::<u32>(GuestAddress(COUNTER))
        .expect("read guest counter")
}

/// Creates and starts a 2-vCPU VM on the spin ROM, with `extra` options.
fn start_spin_vm(extra: &[&str], name: &str) -> Vm {
    let bootrom = format!("bootrom,{}", rom("spin"));
    let mut args: Vec<String> = ["-c", "2"].iter().map(|a| a.to_string()).collect();
    args.extend(extra.iter().map(|a| a.to_string()));
    args.extend(["-l".to_string(), bootrom, name.to_string()]);
    let Action::Run(cfg) = cli::parse(&args).expect("the test options parse").action else {
        panic!("expected a VM config")
    };
    let mut vm = Vm::create(&cfg).expect("create the VM");
    vm.start().expect("start the vCPUs");
    vm
}

#[test]
fn pause_stops_the_guest_and_resume_lets_it_continue() {
    require_kvm();
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("pause-com1-{}", std::process::id()));
    let com1 = format!("com1,{}", out.display());
    let mut vm = start_spin_vm(&["-l", &com1], "pausevm");
    assert_eq!(
        vm.control().active_cpus().count(),
        2,
        "both vCPUs in the cpumask"
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    while counter(&vm) < 1000 {
        assert!(Instant::now() < deadline, "guest never started counting");
        std::thread::sleep(Duration::from_millis(10));
    }
    vm.pause().expect("pause");
    let frozen = counter(&vm);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(counter(&vm), frozen, "the guest ran while paused");
    // The AP (blocked in KVM_RUN waiting for SIPI) was parked too, and stays in the cpumask.
    assert_eq!(vm.control().active_cpus().count(), 2);

    vm.resume();
    let deadline = Instant::now() + Duration::from_secs(30);
    while counter(&vm) <= frozen {
        assert!(
            Instant::now() < deadline,
            "guest did not continue after resume"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Pause again, then stop while paused: the vCPUs must still leave their loops.
    vm.pause().expect("second pause");
    vm.control().suspend(SuspendReason::PowerOff);
    assert_eq!(vm.wait(), SuspendReason::PowerOff);
    assert!(
        vm.control().active_cpus().is_empty(),
        "every vCPU cleared itself"
    );
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("spinning"), "COM1 to a file: {text:?}");
    std::fs::remove_file(&out).unwrap();
}

#[test]
fn a_started_vm_dropped_without_wait_stops_its_vcpus_first() {
    require_kvm();
    let vm = start_spin_vm(&[], "dropvm");
    let ctl = vm.control();
    let deadline = Instant::now() + Duration::from_secs(30);
    while counter(&vm) < 100 {
        assert!(Instant::now() < deadline, "guest never started counting");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The vCPUs run from the ROM mapping the VM owns: dropping it must stop them first.
    drop(vm);
    assert!(
        ctl.active_cpus().is_empty(),
        "vCPU threads still ran after the VM was dropped: {:?}",
        ctl.active_cpus()
    );
    assert_eq!(ctl.suspend_reason(), Some(SuspendReason::Error));
}

fn threads_of(pid: u32) -> Vec<(String, String)> {
    let mut v = Vec::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in dir.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            let allowed = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap_or("")
                .trim()
                .to_string();
            v.push((comm.trim().to_string(), allowed));
        }
    }
    v
}

#[test]
fn vcpu_threads_are_named_and_pinned_with_p_and_sigterm_powers_off() {
    require_kvm();
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    let last = (ncpu - 1).to_string();
    let bootrom = format!("bootrom,{}", rom("spin"));
    let pin0 = format!("0:{last}");
    let child = spawn(&[
        "-c",
        "2",
        "-p",
        &pin0,
        "-p",
        "1:0",
        "-l",
        "com1,stdio",
        "-l",
        &bootrom,
        "vm",
    ]);
    let pid = child.id();
    let mut g = LinuxGuest::new("spin", child);
    assert!(g.wait_for("spinning").is_some(), "{}", g.console);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let t = threads_of(pid);
        let v0 = t.iter().find(|(c, _)| c == "vcpu 0").map(|x| x.1.clone());
        let v1 = t.iter().find(|(c, _)| c == "vcpu 1").map(|x| x.1.clone());
        if v0.as_deref() == Some(last.as_str()) && v1.as_deref() == Some("0") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "vcpu threads not named/pinned as asked: {t:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SIGTERM is the power button: the VM stops with status 1 (powered off).
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let r = g.finish();
    assert_eq!(r.code(), 1, "{}", r.stderr);
}

#[test]
fn sigint_stops_the_vm_with_status_4() {
    require_kvm();
    let bootrom = format!("bootrom,{}", rom("spin"));
    let mut g = LinuxGuest::new("spin", spawn(&["-l", "com1,stdio", "-l", &bootrom, "vm"]));
    // Judged by the guest's progress, not a fixed time: signals are blocked until the
    // VM runs.
    assert!(g.wait_for("spinning").is_some(), "{}", g.console);
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(g.pid(), libc::SIGINT) };
    let r = g.finish();
    assert_eq!(r.code(), 4, "{}", r.stderr);
    assert!(r.stderr.contains("stopped by signal"), "{}", r.stderr);
}

/// Opens a pseudo-terminal; returns (master, slave) descriptors.
fn openpty() -> (i32, i32) {
    let (mut m, mut s) = (0, 0);
    // SAFETY: valid output pointers; null name/termios/winsize are allowed.
    let r = unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty");
    (m, s)
}

fn lflag(fd: i32) -> libc::tcflag_t {
    // SAFETY: zeroed termios is valid storage; fd is an open terminal.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::tcgetattr(fd, &mut t) }, 0);
    t.c_lflag
}

#[test]
fn the_terminal_is_restored_on_reset_error_and_signal_exits() {
    require_kvm();
    use std::os::fd::FromRawFd;
    for (rom_name, extra, signal, want) in [
        ("hello", vec![], None, 0),
        ("ports", vec!["-e"], None, 4),
        ("spin", vec![], Some(libc::SIGINT), 4),
        ("spin", vec![], Some(libc::SIGTERM), 1),
    ] {
        let (master, slave) = openpty();
        let before = lflag(slave);
        assert_ne!(
            before & libc::ICANON,
            0,
            "a new pty starts in canonical mode"
        );
        let bootrom = format!("bootrom,{}", rom(rom_name));
        let mut args = extra.clone();
        args.extend(["-l", "com1,stdio", "-l", &bootrom, "vm"]);
        // SAFETY: slave is an open descriptor we own; the Stdio takes ownership of a dup.
        let stdin = unsafe { std::process::Stdio::from_raw_fd(libc::dup(slave)) };
        let child = spawn_with(&args, stdin);
        if let Some(sig) = signal {
            // Wait until rhyve has switched the terminal to raw mode, then signal it.
            let deadline = Instant::now() + Duration::from_secs(10);
            while lflag(slave) & libc::ICANON != 0 {
                assert!(
                    Instant::now() < deadline,
                    "rhyve never made the terminal raw"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, sig) };
        }
        let r = wait_with_deadline(child, Duration::from_secs(30));
        assert_eq!(r.code(), want, "{rom_name} {extra:?}: {}", r.stderr);
        assert_eq!(
            lflag(slave),
            before,
            "{rom_name} {extra:?} left the terminal changed"
        );
        // SAFETY: closing descriptors we opened.
        unsafe {
            libc::close(slave);
            libc::close(master);
        }
    }
}

#[test]
fn exit_stats_and_rip_samples_show_where_a_guest_spins() {
    require_kvm();
    let samples = std::env::temp_dir().join(format!("rhyve-samples-{}", std::process::id()));
    let bootrom = format!("bootrom,{}", rom("spin"));
    let to = format!("debug.rip_samples={}", samples.display());
    let child = spawn(&[
        "-c",
        "2",
        "-o",
        "debug.exit_stats=true",
        "-o",
        &to,
        "-o",
        "debug.rip_sample_hz=200",
        "-l",
        "com1,stdio",
        "-l",
        &bootrom,
        "vm",
    ]);
    let mut g = LinuxGuest::new("spin", child);
    assert!(g.wait_for("spinning").is_some(), "{}", g.console);
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(g.pid(), libc::SIGTERM) };
    let r = g.finish();
    assert_eq!(r.code(), 1, "{}", r.stderr);
    // The exit table: the greeting's bytes went out through COM1's data port.
    for want in ["rhyve: VM exits by kind", "KVM_EXIT_IO", "I/O port 0x03f8"] {
        assert!(r.stderr.contains(want), "no {want:?} in {}", r.stderr);
    }
    // The samples: vCPU 0 spins in its two-instruction loop at CPL0; vCPU 1, an AP nobody
    // started, waits for INIT/SIPI.
    let text = std::fs::read_to_string(&samples).expect("samples file");
    let _ = std::fs::remove_file(&samples);
    let rows: Vec<Vec<&str>> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(rows.iter().all(|r| r.len() == 5), "{text}");
    let main = rom_symbol("spin", "main");
    let rip = |r: &Vec<&str>| u64::from_str_radix(r[3].trim_start_matches("0x"), 16).unwrap();
    let v0: Vec<_> = rows.iter().filter(|r| r[1] == "0").collect();
    let v1: Vec<_> = rows.iter().filter(|r| r[1] == "1").collect();
    assert!(v0.len() >= 50 && v1.len() >= 50, "200 Hz for 2 s: {text}");
    let spinning = v0
        .iter()
        .filter(|r| r[2] == "0" && r[4] == "R" && (main..main + 0x100).contains(&rip(r)))
        .count();
    assert!(
        spinning * 10 >= v0.len() * 9,
        "vCPU 0 samples outside its loop at {main:#x}: {text}"
    );
    assert!(v1.iter().all(|r| r[4] == "W"), "{text}");
}

/// The VmFlags of guest RAM's mapping in /proc/PID/smaps, and every large mapping's first
/// line (for the failure message). Guest RAM is the smallest writable anonymous mapping of at
/// least `size` bytes: the kernel merges it with an adjacent anonymous mapping whose flags
/// match (with `-C` nothing sets it apart from, say, the ROM's), so its mapping can be larger
/// than the RAM; nothing else rhyve maps is that large.
fn mapping_flags(pid: u32, size: u64) -> (Option<String>, String) {
    let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return (None, format!("no /proc/{pid}/smaps"));
    };
    let mut big = String::new();
    let mut best: Option<(u64, String)> = None;
    let mut this: Option<u64> = None;
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        let range = f.next().unwrap_or("");
        if let Some((a, b)) = range.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                let perms = f.next().unwrap_or("");
                let inode = f.nth(2).unwrap_or("");
                let len = b.saturating_sub(a);
                if len >= size {
                    big.push_str(line);
                    big.push('\n');
                }
                let anon_rw = perms.starts_with("rw") && inode == "0";
                this = (anon_rw && len >= size).then_some(len);
                continue;
            }
        }
        if let (Some(len), Some(flags)) = (this, line.strip_prefix("VmFlags:")) {
            big.push_str(line);
            big.push('\n');
            if best.as_ref().is_none_or(|(l, _)| len < *l) {
                best = Some((len, flags.trim().to_string()));
            }
        }
    }
    (best.map(|(_, f)| f), big)
}

/// bhyve `-S` wires guest memory (locked and resident, `lo` in smaps) and guest memory stays
/// out of core dumps (`dd`) unless `-C` asks for it.
#[test]
fn dash_s_wires_guest_memory_and_dash_c_puts_it_in_core_dumps() {
    require_kvm();
    const RAM: u64 = 96 << 20;
    for (extra, locked, dumped) in [
        (&["-m", "96M"][..], false, false),
        (&["-m", "96M", "-S"][..], true, false),
        (&["-m", "96M", "-C"][..], false, true),
    ] {
        let child = spawn_rom("spin", extra);
        let pid = child.id();
        let mut g = LinuxGuest::new("spin", child);
        assert!(g.wait_for("spinning").is_some(), "{}", g.console);
        let (flags, maps) = mapping_flags(pid, RAM);
        let flags = flags.unwrap_or_default();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let vmlck_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmLck:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let _ = g.finish();
        let words: Vec<&str> = flags.split_whitespace().collect();
        assert!(
            !words.is_empty(),
            "{extra:?}: no guest RAM mapping of {RAM} bytes or more in smaps:\n{maps}"
        );
        assert_eq!(
            words.contains(&"lo"),
            locked,
            "{extra:?}: VmFlags {flags}\n{maps}"
        );
        assert_eq!(
            words.contains(&"dd"),
            !dumped,
            "{extra:?}: VmFlags {flags}\n{maps}"
        );
        if locked {
            assert!(vmlck_kib * 1024 >= RAM, "{extra:?}: VmLck {vmlck_kib} kB");
        }
    }
}

/// The vCPU mailbox: a paused vCPU answers "save your state" and "take this state" from its
/// own thread. The state saved twice while paused is the same; a restored state takes effect:
/// the BSP, sent to a `hlt` with interrupts off, halts for good and the VM ends with status 2.
#[test]
fn a_paused_vcpu_saves_and_restores_its_state_through_its_mailbox() {
    use rhyve::vmm::control::RunState;
    require_kvm();
    let mut vm = start_spin_vm(&[], "statevm");
    let deadline = Instant::now() + Duration::from_secs(30);
    while counter(&vm) < 1000 {
        assert!(Instant::now() < deadline, "guest never started counting");
        std::thread::sleep(Duration::from_millis(10));
    }
    let ctl = vm.control();
    let msrs: Vec<u32> = kvm_ioctls::Kvm::new()
        .expect("/dev/kvm")
        .get_msr_index_list()
        .expect("KVM_GET_MSR_INDEX_LIST")
        .as_slice()
        .to_vec();
    let t = Duration::from_secs(20);
    let e = ctl.save_vcpu(0, msrs.clone(), t).unwrap_err();
    assert!(e.contains("pause the VM first"), "{e}");

    vm.pause().expect("pause");
    assert_eq!(ctl.vcpu_state(0), Some(RunState::Paused));
    assert_eq!(
        ctl.vcpu_state(1),
        Some(RunState::Paused),
        "the AP parks too"
    );
    let s = ctl
        .save_vcpu(0, msrs.clone(), t)
        .expect("vcpu 0 saves its state");
    assert_eq!(s.id, 0);
    assert!(!s.msrs.is_empty(), "MSRs read");
    let again = ctl.save_vcpu(0, msrs.clone(), t).expect("and again");
    let json = |v: &dyn erased_serde_free::Json| v.json();
    assert_eq!(
        json(&s.regs),
        json(&again.regs),
        "registers stay put while paused"
    );
    assert_eq!(json(&s.sregs), json(&again.sregs));
    let frozen = counter(&vm);

    // The state of vcpu 0 is refused by vcpu 1.
    let other = ctl.save_vcpu(0, msrs.clone(), t).expect("a copy");
    let e = ctl.restore_vcpu(1, other, t).unwrap_err();
    assert!(e.contains("given the state of vcpu 0"), "{e}");

    // A `hlt` in RAM, and vcpu 0 restored to it with interrupts off.
    const HLT_AT: u64 = 0x8000;
    vm.guest_memory()
        .write_obj(0xf4u8, GuestAddress(HLT_AT))
        .expect("write hlt");
    let mut s = s;
    s.regs.rip = HLT_AT;
    s.regs.rflags &= !(1 << 9);
    ctl.restore_vcpu(0, s, t).expect("vcpu 0 takes the state");
    let back = ctl.save_vcpu(0, msrs, t).expect("saved after restore");
    assert_eq!(
        back.regs.rip, HLT_AT,
        "the restored registers are the vCPU's"
    );
    vm.resume();
    assert_eq!(
        vm.wait(),
        SuspendReason::Halt,
        "the BSP halted where it was sent"
    );
    assert_eq!(counter(&vm), frozen, "the spin loop never ran again");
    assert_eq!(ctl.vcpu_state(0), Some(RunState::Exited));
}

/// The KVM structures the test compares, as JSON.
mod erased_serde_free {
    pub trait Json {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> String {
            serde_json::to_string(self).expect("serialises")
        }
    }
}

/// Every device of a paused VM (PCI functions, a virtio device among them, and the legacy
/// ones) saves its state; a second VM built from the same options takes it, and saves the same
/// state again. A state the second VM has no device for is refused.
#[test]
fn a_paused_vms_devices_round_trip_into_a_fresh_vm() {
    require_kvm();
    let opts = ["-s", "3,virtio-rnd", "-s", "4,dummy"];
    let vm = start_spin_vm(&opts, "devstate");
    let deadline = Instant::now() + Duration::from_secs(30);
    while counter(&vm) < 1000 {
        assert!(Instant::now() < deadline, "guest never started counting");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(vm.save_devices().is_err(), "no device state while running");
    vm.pause().expect("pause");
    let saved = vm.save_devices().expect("every device saves");
    let keys: Vec<&str> = saved.iter().map(|(k, _)| k.as_str()).collect();
    for k in [
        "pci/root",
        "pci/0:3.0",
        "pci/0:4.0",
        "lpc/rtc",
        "lpc/pm",
        "lpc/i8042",
    ] {
        assert!(keys.contains(&k), "{k} missing from {keys:?}");
    }
    let vcpus = vm.save_vcpus().expect("every vCPU saves");
    assert_eq!(vcpus.len(), 2);

    let bootrom = format!("bootrom,{}", rom("spin"));
    let mut args: Vec<String> = ["-c", "2"].iter().map(|a| a.to_string()).collect();
    args.extend(opts.iter().map(|a| a.to_string()));
    args.extend(["-l".to_string(), bootrom, "devstate2".to_string()]);
    let Action::Run(cfg) = cli::parse(&args).expect("the test options parse").action else {
        panic!("expected a VM config")
    };
    let fresh = Vm::create(&cfg).expect("create the second VM");
    fresh.pause().expect("pause the second VM");
    fresh
        .restore_devices(&saved)
        .expect("the second VM takes the state");
    let again = fresh.save_devices().expect("and saves it again");
    assert_eq!(again.len(), saved.len());
    for ((k1, s1), (k2, s2)) in saved.iter().zip(&again) {
        assert_eq!(k1, k2);
        assert_eq!(s1, s2, "{k1}: saved again after restore, the state differs");
    }
    let mut extra = saved.clone();
    let (_, s) = extra[0].clone();
    extra.push(("pci/0:9.0".into(), s));
    assert!(fresh.restore_devices(&extra).is_err(), "no device at 0:9.0");
    // Started while paused (as a restore will), its vCPUs park before their first KVM_RUN.
    let mut fresh = fresh;
    fresh.start().expect("start the second VM");
    let c2 = fresh.control();
    let deadline = Instant::now() + Duration::from_secs(30);
    while c2.vcpu_state(0) != Some(rhyve::vmm::control::RunState::Paused) {
        assert!(
            Instant::now() < deadline,
            "vcpu 0 of a paused VM never parked"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(counter(&fresh), 0, "no guest code ran before resume");
    fresh.resume();
    let deadline = Instant::now() + Duration::from_secs(30);
    while counter(&fresh) < 1000 {
        assert!(
            Instant::now() < deadline,
            "the second VM never ran after resume"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(fresh);
    vm.resume();
}
