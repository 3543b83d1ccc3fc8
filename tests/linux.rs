//! A stock Linux kernel (Debian's cloud kernel, fetched by scripts/fetch-linux.sh) booted
//! directly from its bzImage. On this project's PVM hosts the kernel's own code is emulated and
//! is slow; this test checks the early boot: the banner, the E820 map rhyve gave, the ACPI
//! tables parsed, the DSDT's AML run by Linux's interpreter, and the PCI root bridge found.
//! It takes about three minutes here (PVM emulation assists, MSR filter and command-line
//! additions on), with two vCPUs.

mod common;
use common::*;

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

fn kernel() -> String {
    let out = std::process::Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/fetch-linux.sh"
    ))
    .output()
    .expect("run scripts/fetch-linux.sh");
    assert!(
        out.status.success(),
        "cannot fetch the Debian kernel: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rel = String::from_utf8_lossy(&out.stdout).trim().to_string();
    format!("{}/{rel}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn stock_debian_kernel_reads_rhyves_e820_acpi_tables_and_finds_the_pci_root() {
    require_kvm();
    let k = format!("boot.kernel={}", kernel());
    let mut child = spawn(&[
        "-c",
        "2",
        "-m",
        "512M",
        "-l",
        "com1,stdio",
        "-o",
        &k,
        "-o",
        "boot.cmdline=console=ttyS0 earlyprintk=serial,ttyS0 mitigations=off nowatchdog cryptomgr.notests no-kvmclock init_on_alloc=0 rodata=off",
        "linux",
    ]);
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let want = [
        "Linux version 6.",
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable",
        "BIOS-e820: [mem 0x00000000e0000000-0x00000000efffffff] reserved",
        "ACPI: RSDP 0x00000000000F2400",
        "ACPI: MCFG",
        "ACPI: APIC",
        "ACPI: INT_SRC_OVR (bus 0 bus_irq 0 global_irq 2 dfl dfl)",
        "ACPI: INT_SRC_OVR (bus 0 bus_irq 9 global_irq 9 high level)",
        "PCI: MMCONFIG at [mem 0xe0000000-0xefffffff] reserved in E820",
        // The DSDT's AML, run by Linux's interpreter.
        "ACPI: 1 ACPI AML tables successfully acquired and loaded",
        "ACPI: PM: (supports S0 S5)",
        "ACPI: PCI Root Bridge [PCI0] (domain 0000 [bus 00-ff])",
        // PVM answers IA32_APIC_BASE reads with 0; rhyve's MSR filter answers them, so Linux
        // keeps its local APIC and starts the second vCPU with INIT/SIPI.
        "x2apic enabled",
        "smp: Brought up 1 node, 2 CPUs",
    ];
    let mut seen = vec![false; want.len()];
    let mut log = String::new();
    let deadline = Instant::now() + Duration::from_secs(900);
    while !seen.iter().all(|s| *s) && Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(line) => {
                for (i, w) in want.iter().enumerate() {
                    if line.contains(w) {
                        seen[i] = true;
                    }
                }
                log.push_str(&line);
                log.push('\n');
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => break,
        }
    }
    // The guest has not enabled ACPI yet, so SIGTERM powers it off directly.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let r = wait_with_deadline(child, Duration::from_secs(30));
    for (w, s) in want.iter().zip(&seen) {
        assert!(
            *s,
            "kernel never printed {w:?}; stderr: {}\nconsole:\n{log}",
            r.stderr
        );
    }
    assert!(matches!(r.code(), 1 | 4), "{}", r.stderr);
}
