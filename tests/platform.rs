//! KVM tests of the platform: ACPI power management (PM1a registers, PM timer, S5 poweroff)
//! and the SIGTERM power button.

mod common;
use common::*;

use std::time::{Duration, Instant};

#[test]
fn guest_powers_off_through_pm1a_cnt_with_status_1() {
    let r = run_rom("acpioff", &[]);
    assert_eq!(r.code(), 1, "S5 is a power-off: {}", r.stderr);
    assert_eq!(
        value(&r.stdout, "pm1a control ") & 1,
        1,
        "SMI_CMD ACPI_ENABLE sets SCI_EN"
    );
    assert!(r.stdout.contains("pm timer runs"), "{}", r.stdout);
    assert!(!r.stdout.contains("still running after S5"), "{}", r.stdout);
    // -D (destroy on power-off) is accepted and changes nothing else here.
    let r = run_rom("acpioff", &["-D"]);
    assert_eq!(r.code(), 1);
}

#[test]
fn sigterm_presses_the_power_button_and_an_acpi_guest_shuts_down() {
    require_kvm();
    let bootrom = format!("bootrom,{}", rom("pwrbtn"));
    let mut g = LinuxGuest::new("pwrbtn", spawn(&["-l", "com1,stdio", "-l", &bootrom, "vm"]));
    // Press once the guest has enabled ACPI and the button event (it says so); a press
    // before that powers off directly, which the assertions below would catch.
    assert!(
        g.wait_for("waiting for the power button").is_some(),
        "{}",
        g.console
    );
    let start = Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(g.pid(), libc::SIGTERM) };
    let r = g.finish();
    assert_eq!(r.code(), 1, "{}", r.stderr);
    assert!(
        g.console.contains("power button pressed"),
        "the guest saw PWRBTN_STS and powered off itself: {}",
        g.console
    );
    assert_eq!(
        value(&g.console, "status after clear ") & 0x100,
        0,
        "PWRBTN_STS is write-1-to-clear"
    );
    assert!(start.elapsed() < Duration::from_secs(30));
}

#[test]
fn guest_finds_rsdp_walks_xsdt_counts_lapics_and_powers_off_via_the_fadt() {
    let r = run_rom("acpi", &["-c", "3"]);
    assert_eq!(
        r.code(),
        1,
        "power-off through the FADT's PM1a_CNT: {}",
        r.stderr
    );
    let out = &r.stdout;
    assert_eq!(
        value(out, "RSDP at "),
        0xf2400,
        "bhyve's address, found by the legacy scan"
    );
    assert_eq!(value(out, "RSDP revision "), 2);
    for sig in ["XSDT", "FACP", "DSDT", "APIC", "MCFG", "SPCR"] {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("table {sig} ")))
            .unwrap_or_else(|| panic!("{sig} not reached:\n{out}"));
        assert!(line.ends_with(" ok"), "{sig} checksum: {line}");
    }
    assert!(
        out.contains("MADT local APICs 3"),
        "one LAPIC per vCPU: {out}"
    );
    assert!(!out.contains("still running"), "{out}");
    // acpi_tables=false: nothing to find.
    let r = run_rom("acpi", &["-o", "acpi_tables=false"]);
    assert!(r.stdout.contains("no RSDP"), "{}", r.stdout);
}

#[test]
fn the_mp_table_lists_every_cpu_unless_y() {
    let r = run_rom("mptable", &["-c", "3"]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert_eq!(value(&r.stdout, "MP floating pointer at "), 0xf0000);
    assert_eq!(value(&r.stdout, "pointer checksum "), 0);
    assert_eq!(value(&r.stdout, "table checksum "), 0);
    assert_eq!(value(&r.stdout, "processors "), 3);
    let r = run_rom("mptable", &["-Y"]);
    assert!(r.stdout.contains("no MP table"), "{}", r.stdout);
}

fn count(out: &str, label: &str) -> u32 {
    out.lines()
        .find_map(|l| l.strip_prefix(label))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no '{label}' line in:\n{out}"))
}

#[test]
fn rtc_periodic_and_alarm_interrupts_arrive_on_irq_8() {
    let r = run_rom("rtcirq", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    // 1024 Hz for one second (timed by the PM timer). A shared, noisy host loses a few, and
    // an emulated one (the nested harness: 328 seen there, and fewer when other work shares
    // the machine) many more: the guest's interrupt path is emulated too. Tens per second
    // are periodic delivery (the alarm gives one a second); more than 1024 is not.
    let periodic = count(&r.stdout, "periodic interrupts in one second: ");
    assert!((50..=1100).contains(&periodic), "periodic: {periodic}");
    // An every-second alarm over three seconds (plus possibly one left pending before; one
    // fewer when the emulated guest's three seconds end just before one).
    let alarm = count(&r.stdout, "alarm interrupts in three seconds: ");
    assert!((1..=5).contains(&alarm), "alarm: {alarm}");
}
