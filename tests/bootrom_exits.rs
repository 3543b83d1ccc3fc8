//! KVM tests of the core: small ROM guests from guests/rom started at the reset vector, checked
//! by what they print on COM1 and by rhyve's exit status (bhyve(8): 0 reset, 3 triple fault,
//! 4 error).

mod common;
use common::*;

#[test]
fn hello_rom_starts_at_reset_vector_prints_on_com1_and_resets_via_cf9() {
    let r = run_rom("hello", &[]);
    assert_eq!(
        r.code(),
        0,
        "reset through 0xcf9 is status 0; stderr: {}",
        r.stderr
    );
    assert!(
        r.stdout.contains("Hello from the rhyve test guest!"),
        "{}",
        r.stdout
    );
    // The ROM records CS and IP at its first instructions: the x86 reset vector.
    assert!(
        r.stdout.contains("reset vector: CS=f000 IP=fff0"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("memory: 256 MiB"),
        "default -m is 256M: {}",
        r.stdout
    );
    assert!(r.stderr.is_empty(), "quiet by default: {}", r.stderr);
}

#[test]
fn guest_reads_memory_size_from_cmos_below_and_above_4g() {
    let r = run_rom("hello", &["-m", "1G"]);
    assert!(r.stdout.contains("memory: 1024 MiB"), "{}", r.stdout);
    // 5 GiB: 3 GiB below the PCI hole, 2 GiB from 4 GiB up.
    let r = run_rom("hello", &["-m", "5G"]);
    assert!(r.stdout.contains("memory: 5120 MiB"), "{}", r.stdout);
    assert_eq!(r.code(), 0);
}

#[test]
fn rtc_gives_utc_wall_clock_with_u() {
    let r = run_rom("hello", &["-u"]);
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("time: "))
        .unwrap_or_else(|| panic!("no time line: {}", r.stdout));
    // "time: 2026-11-25 01:58:34 (RTC)"
    let t = &line[6..25];
    let out = std::process::Command::new("date")
        .args(["-u", "-d", t, "+%s"])
        .output()
        .unwrap();
    let guest: i64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("bad time {t}"));
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (host - guest).abs() < 120,
        "guest RTC {t} vs host UTC {host}"
    );
}

#[test]
fn reset_through_the_keyboard_controller_is_status_0() {
    let r = run_rom("kbdreset", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(r.stdout.contains("reset through the i8042"));
    assert!(!r.stdout.contains("still running"), "{}", r.stdout);
}

#[test]
fn triple_fault_is_status_3() {
    let r = run_rom("triple", &[]);
    assert_eq!(r.code(), 3, "stdout: {} stderr: {}", r.stdout, r.stderr);
    assert!(r.stdout.contains("triple fault next"));
    assert!(!r.stdout.contains("survived"));
}

#[test]
fn unassigned_ports_read_all_ones_and_writes_are_dropped() {
    let r = run_rom("ports", &["-w"]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("inb=ff inw=ffff inl=ffffffff"),
        "{}",
        r.stdout
    );
}

#[test]
fn strict_io_stops_on_an_unassigned_port_with_status_4() {
    let r = run_rom("ports", &["-e"]);
    assert_eq!(r.code(), 4);
    assert!(r.stdout.contains("probing port 0x1234"));
    assert!(
        !r.stdout.contains("inb="),
        "the access must not complete: {}",
        r.stdout
    );
    for want in ["inb", "port 0x1234", "vcpu 0", "-e"] {
        assert!(
            r.stderr.contains(want),
            "stderr lacks {want:?}: {}",
            r.stderr
        );
    }
}

#[test]
fn unimplemented_msrs_raise_gp_unless_w() {
    let r = run_rom("ports", &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(r.stdout.contains("rdmsr 0x1234: #GP"), "{}", r.stdout);
    assert!(r.stdout.contains("wrmsr 0x1234: #GP"), "{}", r.stdout);
    // Quiet by default (Linux probes MSRs it can live without); named with -v.
    assert!(!r.stderr.contains("MSR 0x1234"), "{}", r.stderr);
    let r = run_rom("ports", &["-v"]);
    assert!(
        r.stderr.contains("unimplemented MSR 0x1234"),
        "{}",
        r.stderr
    );
    let r = run_rom("ports", &["-w"]);
    assert!(
        r.stdout.contains("rdmsr 0x1234: value=00000000"),
        "{}",
        r.stdout
    );
    assert!(!r.stdout.contains("#GP"), "{}", r.stdout);
}

#[test]
fn an_exit_without_handler_names_exit_vcpu_and_rip_and_is_status_4() {
    let r = run_rom("unhandled", &[]);
    assert_eq!(r.code(), 4, "stdout: {}", r.stdout);
    // PVM stops at the iret; hardware virtualization runs it, then cannot fetch from MMIO.
    let at = if r.stdout.contains("iret ran without an exit") {
        "unhandled_mmio_rip"
    } else {
        "unhandled_rip"
    };
    let rip = rom_symbol("unhandled", at);
    assert!(
        r.stderr.contains("unhandled exit KVM_EXIT_"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("vcpu 0"), "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("rip {rip:#x}")),
        "want rip {rip:#x}: {}",
        r.stderr
    );
}

fn assert_all_aps_report(cpus: u32) {
    let r = run_smp_rom(&["-c", &cpus.to_string()]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(r.stdout.contains("BSP apic id 00"), "{}", r.stdout);
    for ap in 1..cpus {
        let line = format!("AP {ap:02x} up");
        assert!(r.stdout.contains(&line), "missing {line:?}: {}", r.stdout);
    }
    assert!(
        r.stdout.contains(&format!("cpus up: {cpus}")),
        "{}",
        r.stdout
    );
}

#[test]
fn two_vcpus_ap_starts_with_init_sipi_and_reports() {
    assert_all_aps_report(2);
}

#[test]
fn four_vcpus_each_ap_starts_with_init_sipi_and_reports() {
    assert_all_aps_report(4);
}

#[test]
fn stdin_reaches_the_guest_through_com1() {
    require_kvm();
    use std::io::Write;
    use std::process::Stdio;
    let bootrom = format!("bootrom,{}", rom("echo"));
    let mut child = spawn_with(&["-l", "com1,stdio", "-l", &bootrom, "vm"], Stdio::piped());
    // More than the 64-byte FIFO holds: input must wait for the guest, not be dropped.
    let text = "serial input that is longer than the uart fifo ".repeat(4);
    assert!(!text.contains('q'), "q ends the echo guest");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{text}q").as_bytes())
        .unwrap();
    let r = wait_with_deadline(child, std::time::Duration::from_secs(60));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(r.stdout.contains(&text.to_uppercase()), "{}", r.stdout);
    assert!(r.stdout.contains("bye"));
}

#[test]
fn com1_over_tcp_serves_a_client() {
    require_kvm();
    use std::io::{Read, Write};
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let bootrom = format!("bootrom,{}", rom("echo"));
    let com1 = format!("com1,tcp=127.0.0.1:{port}");
    let child = spawn(&["-l", &com1, "-l", &bootrom, "vm"]);
    let mut conn = None;
    for _ in 0..400 {
        // Until rhyve listens, a connect to the (free, ephemeral) port can connect the socket
        // to itself (TCP simultaneous open): such a connection is not rhyve's.
        if let Ok(c) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            if c.local_addr().ok() != c.peer_addr().ok() {
                conn = Some(c);
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    let mut conn = conn.expect("rhyve listens on the COM1 tcp address");
    // A second client is turned away while the first is connected.
    let mut second = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    second
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        second.read(&mut buf).unwrap_or(0),
        0,
        "second client must be closed"
    );
    conn.write_all(b"over tcp q").unwrap();
    conn.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 256];
    while !String::from_utf8_lossy(&got).contains("bye") {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
    let r = wait_with_deadline(child, std::time::Duration::from_secs(60));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(
        String::from_utf8_lossy(&got).contains("OVER TCP"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
}

#[test]
fn bad_boot_roms_are_refused_with_one_clear_line() {
    require_kvm();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("badrom-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let odd = dir.join("odd.rom");
    std::fs::write(&odd, vec![0xf4u8; 5000]).unwrap();
    let big = dir.join("big.rom");
    std::fs::write(&big, vec![0xf4u8; 32 << 20]).unwrap();
    for (path, want) in [
        (odd.to_str().unwrap(), "not a multiple of the page size"),
        (big.to_str().unwrap(), "too large"),
        ("/nonexistent/rom.bin", "No such file"),
    ] {
        let r = run(&["-l", &format!("bootrom,{path}"), "vm"]);
        assert_eq!(r.code(), 4, "{path}");
        assert!(r.stderr.contains(want), "{path}: {}", r.stderr);
        assert_eq!(
            r.stderr.trim_end().lines().count(),
            1,
            "one line: {}",
            r.stderr
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn varfile_is_mapped_writable_below_the_rom_and_guest_writes_persist() {
    require_kvm();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("vars-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let vars = dir.join("vars.fd");
    // The variable store must be whole pages; a bad one is refused before the guest runs.
    std::fs::write(&vars, vec![0u8; 100]).unwrap();
    let arg = format!("bootrom,{},{}", rom("vars"), vars.display());
    let r = run(&["-l", &arg, "vm"]);
    assert_eq!(r.code(), 4);
    assert!(r.stderr.contains("variable store"), "{}", r.stderr);
    std::fs::write(&vars, vec![0u8; 128 << 10]).unwrap();
    for want in ["vars counter=00000000", "vars counter=00000001"] {
        let r = run(&["-l", "com1,stdio", "-l", &arg, "vm"]);
        assert_eq!(r.code(), 0, "{}", r.stderr);
        assert!(r.stdout.contains(want), "want {want}: {}", r.stdout);
    }
    let data = std::fs::read(&vars).unwrap();
    assert_eq!(data.len(), 128 << 10, "the store keeps its size");
    assert_eq!(
        &data[data.len() - 4..],
        &2u32.to_le_bytes(),
        "both increments reached the file"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn every_vcpu_halted_with_interrupts_disabled_is_status_2() {
    let r = run_rom("halt", &[]);
    assert_eq!(r.code(), 2, "{}", r.stderr);
    assert!(r.stdout.contains("halting with interrupts disabled"));
    // An AP that was never started can never wake the BSP either.
    let r = run_rom("halt", &["-c", "2"]);
    assert_eq!(r.code(), 2, "{}", r.stderr);
}

#[test]
fn a_guest_idle_with_interrupts_enabled_is_not_halted() {
    require_kvm();
    let bootrom = format!("bootrom,{}", rom("idle"));
    let mut g = LinuxGuest::new("idle", spawn(&["-l", "com1,stdio", "-l", &bootrom, "vm"]));
    // Judged from the guest's progress: once it has said it idles, several halt-check
    // intervals (500 ms each) pass without rhyve stopping the VM.
    assert!(
        g.wait_for("idle with interrupts enabled").is_some(),
        "the guest never reached its idle loop: {}",
        g.console
    );
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert!(g.is_running(), "rhyve stopped an idle guest");
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(g.pid(), libc::SIGTERM) };
    let r = g.finish();
    assert_eq!(r.code(), 1, "{}", r.stderr);
}

#[test]
fn the_guest_sees_the_topology_asked_for() {
    for (spec, apics, per_core, per_pkg) in [
        ("cpus=4,sockets=1,cores=2,threads=2", [1u32, 2, 3], 2, 4),
        ("cpus=4,sockets=2,cores=2,threads=1", [1, 2, 3], 1, 2),
        ("4", [1, 2, 3], 1, 1),
    ] {
        let r = run_smp_rom(&["-c", spec]);
        assert_eq!(r.code(), 0, "{spec}: {}", r.stderr);
        let line =
            format!("topology: threads per core {per_core}, logical CPUs per package {per_pkg}");
        assert!(
            r.stdout.contains(&line),
            "{spec}: want {line:?}:\n{}",
            r.stdout
        );
        for a in apics {
            assert!(
                r.stdout.contains(&format!("AP {a:02x} up")),
                "{spec}: AP {a}:\n{}",
                r.stdout
            );
        }
        assert!(r.stdout.contains("cpus up: 4"), "{}", r.stdout);
    }
    // 2 sockets x 3 cores: the core field is 2 bits wide, so APIC IDs skip 3.
    let r = run_smp_rom(&["-c", "cpus=6,sockets=2,cores=3"]);
    for a in [1u32, 2, 4, 5, 6] {
        assert!(
            r.stdout.contains(&format!("AP {a:02x} up")),
            "AP {a}:\n{}",
            r.stdout
        );
    }
}

#[test]
fn apic_base_reads_the_lapic_enabled_bsp_and_follows_the_switch_to_x2apic() {
    // On PVM hosts the guest's own read of IA32_APIC_BASE gives 0; rhyve filters the read and
    // answers with KVM's value, so it must also show the x2APIC mode bit the guest set.
    let r = run_rom("apicbase", &[]);
    assert_eq!(r.code(), 0, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(value(&r.stdout, "apic base at reset: "), 0xfee0_0900);
    assert_eq!(value(&r.stdout, "apic base in x2apic mode: "), 0xfee0_0d00);
    assert_eq!(value(&r.stdout, "x2apic id: "), 0);
}
