//! Core benchmarks, each a ratio against a reference measured in the same run:
//!
//! 1. Port-I/O exit round trip: the `outloop` ROM (N writes to port 0x80, then a reset) run by
//!    rhyve's `vm_loop` and bus, against the same ROM run by a minimal raw KVM_RUN loop on an
//!    identically created VM. Per-exit cost = (T(N) - T(1)) / (N - 1), so fixed start-up and
//!    teardown cancel out; the guest's own instructions are the same on both sides.
//! 2. Exec to first guest instruction: spawn the rhyve binary with `debug.boot_timer`; the ROM's
//!    first instruction writes port 0x80 and rhyve prints the CLOCK_MONOTONIC time of that exit.
//!
//! Run: `cargo bench --bench exits` (needs /dev/kvm, gcc and binutils for the ROMs).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_READONLY, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit};
use rhyve::cli::{self, Action};
use rhyve::devices::legacy::post::monotonic_ns;
use rhyve::vmm::Vm;

/// Must match guests/build.sh's default for outloop.rom.
const LOOPS: f64 = 100_000.0;
const REPEAT: usize = 5;

fn build_guests() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = root.join("target/bench-guests");
    let st = Command::new("sh")
        .arg(root.join("guests/build.sh"))
        .arg(&out)
        .status()
        .expect("run guests/build.sh");
    assert!(st.success(), "guests/build.sh failed");
    out
}

/// The reference: create a VM the way rhyve does (irqchip, PIT, 2 MiB RAM, ROM read-only at the
/// top of 4 GiB), then a bare KVM_RUN loop that only recognises the two ports the ROM uses.
fn raw_kvm_run(rom: &[u8]) -> Duration {
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("create VM");
    vm.set_identity_map_address(0xfeff_c000).ok();
    vm.set_tss_address(0xfeff_d000).ok();
    vm.create_irq_chip().expect("irqchip");
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .expect("pit");
    let map = |size: usize| -> *mut u8 {
        // SAFETY: anonymous private mapping; checked for failure below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p.cast()
    };
    let ram_size = 2 << 20;
    let ram = map(ram_size);
    let rom_mem = map(rom.len());
    // SAFETY: rom_mem has rom.len() writable bytes.
    unsafe { std::ptr::copy_nonoverlapping(rom.as_ptr(), rom_mem, rom.len()) };
    // SAFETY: both mappings stay alive (leaked) for the rest of the process.
    unsafe {
        vm.set_user_memory_region(kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: ram_size as u64,
            userspace_addr: ram as u64,
        })
        .expect("ram slot");
        vm.set_user_memory_region(kvm_userspace_memory_region {
            slot: 1,
            flags: KVM_MEM_READONLY,
            guest_phys_addr: (1u64 << 32) - rom.len() as u64,
            memory_size: rom.len() as u64,
            userspace_addr: rom_mem as u64,
        })
        .expect("rom slot");
    }
    let mut vcpu = vm.create_vcpu(0).expect("vcpu");
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .expect("cpuid");
    vcpu.set_cpuid2(&cpuid).expect("set cpuid");
    rhyve::hypervisor::vcpu_reset(&vcpu).expect("reset state");
    let start = Instant::now();
    loop {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(0xcf9, _) => break,
            VcpuExit::IoOut(..) => {}
            VcpuExit::IoIn(_, data) => data.fill(0xff),
            VcpuExit::MmioRead(_, data) => data.fill(0xff),
            VcpuExit::MmioWrite(..) => {}
            other => panic!("raw loop: unexpected exit {other:?}"),
        }
    }
    start.elapsed()
}

/// The same ROM through rhyve's VM, vCPU thread and `vm_loop`, timed from start to stop.
fn rhyve_run(rom: &Path) -> Duration {
    let args = [
        "-m".to_string(),
        "2M".to_string(),
        "-l".to_string(),
        format!("bootrom,{}", rom.display()),
        "bench".to_string(),
    ];
    let Action::Run(cfg) = cli::parse(&args).expect("parse").action else {
        panic!("not a run")
    };
    let mut vm = Vm::create(&cfg).expect("create VM");
    let start = Instant::now();
    vm.start().expect("start");
    let reason = vm.wait();
    let t = start.elapsed();
    assert_eq!(reason.exit_status(), 0, "outloop ROM ends with a reset");
    t
}

fn min_of(n: usize, mut f: impl FnMut() -> Duration) -> Duration {
    (0..n).map(|_| f()).min().unwrap_or_default()
}

fn per_exit(t_n: Duration, t_1: Duration) -> f64 {
    (t_n.as_secs_f64() - t_1.as_secs_f64()) / (LOOPS - 1.0) * 1e6
}

/// Exec-to-first-guest-instruction times (ms) for `mem`, over `n` runs.
fn exec_to_first_instruction(bin: &str, rom: &Path, mem: &str, n: usize) -> Vec<f64> {
    let mut v = Vec::new();
    for _ in 0..n {
        let t0 = monotonic_ns();
        let out = Command::new(bin)
            .args(["-m", mem, "-o", "debug.boot_timer=true"])
            .arg("-l")
            .arg(format!("bootrom,{}", rom.display()))
            .arg("bench")
            .stdin(Stdio::null())
            .output()
            .expect("run rhyve");
        let err = String::from_utf8_lossy(&out.stderr);
        let ns: u64 = err
            .lines()
            .find_map(|l| l.split("at monotonic ").nth(1))
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no boot-timer line in: {err}"));
        v.push((ns - t0) as f64 / 1e6);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a list; this harness has no unit tests.
    }
    let guests = build_guests();
    let outloop = guests.join("outloop.rom");
    let outloop1 = guests.join("outloop0.rom");
    let rom_n = std::fs::read(&outloop).expect("read outloop.rom");
    let rom_1 = std::fs::read(&outloop1).expect("read outloop0.rom");

    println!("== port-I/O exit round trip ({LOOPS} OUTs to port 0x80, best of {REPEAT})");
    // Interleave the two sides so machine noise hits both alike.
    let mut raw_n = Duration::MAX;
    let mut raw_1 = Duration::MAX;
    let mut rh_n = Duration::MAX;
    let mut rh_1 = Duration::MAX;
    for _ in 0..REPEAT {
        raw_n = raw_n.min(raw_kvm_run(&rom_n));
        rh_n = rh_n.min(rhyve_run(&outloop));
        raw_1 = raw_1.min(raw_kvm_run(&rom_1));
        rh_1 = rh_1.min(rhyve_run(&outloop1));
    }
    let raw = per_exit(raw_n, raw_1);
    let rh = per_exit(rh_n, rh_1);
    println!("raw KVM_RUN loop : {raw:8.3} us/exit");
    println!("rhyve vm_loop    : {rh:8.3} us/exit");
    println!("ratio rhyve/raw  : {:8.3}x   (target <= 1.2x)", rh / raw);

    let bin = env!("CARGO_BIN_EXE_rhyve");
    let null = guests.join("null.rom");
    println!("\n== exec to first guest instruction (10 runs each; ms)");
    let _warm = min_of(1, || {
        exec_to_first_instruction(bin, &null, "256M", 1);
        Duration::ZERO
    });
    for mem in ["256M", "16G"] {
        let v = exec_to_first_instruction(bin, &null, mem, 10);
        println!(
            "-m {mem:>4}: min {:6.2}  median {:6.2}  max {:6.2}   (target < 10 ms)",
            v[0],
            v[v.len() / 2],
            v[v.len() - 1]
        );
    }
}
