//! Real Linux guests: Debian's cloud kernel and the project's busybox initramfs
//! (scripts/build-debian-guest.sh, scenarios in tests/guest/scenarios.sh) booted to user space,
//! where Linux's own drivers use rhyve's devices. Every assertion is on what the guest itself
//! printed, or on what the host sees afterwards (the disk images, the tap, the sockets).
//!
//! These need a KVM that can run Linux user space: hardware KVM, or the nested harness's
//! (QEMU's TCG with an SVM CPU as the outer guest; `scripts/nested.sh`, README.md). On a PVM host
//! each test fails saying so; `scripts/test.sh` runs this file in the nested harness there and
//! on hosts without /dev/kvm. Timings inside the harness are emulation timings: deadlines
//! follow the console's progress (`LinuxGuest`), not the clock.
//!
//! One scenario by hand, console visible:
//! `scripts/nested.sh -c 4 cargo test --release --test real_guest -- --nocapture NAME`.

mod common;
use common::*;

use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What every real guest's kernel gets: the console and nothing that hides a defect (no
/// `rodata=off`, no `no-kvmclock`: real guests never pass those).
const CMDLINE: &str = "console=ttyS0";

/// A scratch file for this test, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        Scratch(std::env::temp_dir().join(format!("rhyve-rg-{tag}-{}", std::process::id())))
    }
    fn path(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The test guest's ext4 disk, copied (fully allocated, so a discard shows as freed blocks).
fn ext4_copy(g: &Path, tag: &str) -> Scratch {
    let s = Scratch::new(&format!("{tag}.ext4"));
    let data = std::fs::read(g.join("disk.ext4")).expect("read the test disk");
    std::fs::write(&s.0, data).expect("write the disk copy");
    s
}

/// Boots the test guest with `args` (rhyve options before the boot ones), running the guest
/// scenarios `scenario` and ending with `end`; `extra` is appended to the kernel command line.
fn boot(tag: &str, args: &[&str], scenario: &str, end: &str, extra: &str) -> LinuxGuest {
    require_hw_kvm();
    let g = debian_guest();
    let cmdline = format!("{CMDLINE} rhyve.scenario={scenario} rhyve.end={end} {extra}");
    let all = with_debian_guest(&g, args, &cmdline, tag);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    LinuxGuest::new(tag, spawn(&all))
}

/// The same, inside network namespace `ns`.
fn boot_in(ns: &Netns, tag: &str, args: &[&str], scenario: &str, extra: &str) -> LinuxGuest {
    require_hw_kvm();
    let g = debian_guest();
    let cmdline = format!("{CMDLINE} rhyve.scenario={scenario} rhyve.end=poweroff {extra}");
    let all = with_debian_guest(&g, args, &cmdline, tag);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    LinuxGuest::new(tag, ns.spawn_rhyve(&all))
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Runs `f` on a thread that has entered network namespace `ns` (a network namespace is a
/// per-thread property, so sockets it creates live there).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open the namespace");
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a namespace descriptor this thread owns; it changes only this
        // thread's network namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("netns thread")
}

#[test]
fn real_guest_one_cpu_detects_kvm_uses_kvm_clock_and_poweroff_is_status_1() {
    let mut g = boot(
        "1cpu",
        &["-c", "1", "-m", "512M", "-l", "com1,stdio"],
        "platform",
        "poweroff",
        "",
    );
    let r = g.finish();
    g.assert_lines(
        &r,
        &[
            "Run /init as init process",
            "rhyve-guest: hypervisor: Hypervisor detected: KVM",
            "rhyve-guest: clocksource: kvm-clock",
            "rhyve-guest: cpus online: 0\n",
            "rhyve-guest: end: poweroff",
        ],
    );
    assert_eq!(r.code(), 1, "poweroff -f is bhyve's status 1: {}", r.stderr);
}

#[test]
fn real_guest_two_cpus_come_online_and_reboot_is_status_0() {
    let mut g = boot(
        "2cpu",
        &["-c", "2", "-m", "512M", "-l", "com1,stdio"],
        "platform",
        "reboot",
        "",
    );
    let r = g.finish();
    g.assert_lines(
        &r,
        &[
            "rhyve-guest: cpus online: 0-1",
            "rhyve-guest: hypervisor: Hypervisor detected: KVM",
            "rhyve-guest: end: reboot",
        ],
    );
    assert_eq!(
        r.code(),
        0,
        "reboot -f is bhyve's reset status 0: {}",
        r.stderr
    );
}

#[test]
#[ignore = "intermittent in the nested harness: a 4-vCPU guest failed or hung in 2 of 4 runs of this test on 2026-12-02 (and in 2 of 11 hand boots: one L1 kernel panic, corrupted stack end in svm_vcpu_run, one L1 that went idle mid-boot), while -c 2 passed 15 of 15; issue 9; not run by scripts/test.sh; run by hand in the nested harness (any host; on hardware KVM without scripts/nested.sh): scripts/nested.sh -c 4 cargo test --release --test real_guest -- --ignored"]
fn real_guest_two_sockets_of_two_cores_report_that_topology_and_halt_is_status_2() {
    let mut g = boot(
        "topo",
        &[
            "-c",
            "4,sockets=2,cores=2,threads=1",
            "-m",
            "512M",
            "-l",
            "com1,stdio",
        ],
        "platform",
        "halt",
        "",
    );
    let r = g.finish();
    g.assert_lines(
        &r,
        &["rhyve-guest: cpus online: 0-3", "rhyve-guest: end: halt"],
    );
    // CPUs 0,1 in package 0 and 2,3 in package 1; cores 0 and 1 in each; no SMT.
    for cpu in 0..4 {
        let want = format!(
            "rhyve-guest: topology cpu{cpu}: package {} core {} threads {cpu}",
            cpu / 2,
            cpu % 2
        );
        g.assert_lines(&r, &[&want]);
        let want = format!(
            "rhyve-guest: cpu {cpu} package {} core {} siblings 2 cores 2",
            cpu / 2,
            cpu % 2
        );
        g.assert_lines(&r, &[&want]);
    }
    assert_eq!(
        r.code(),
        2,
        "halt -f with every vCPU halted is status 2: {}",
        r.stderr
    );
}

#[test]
fn real_guest_thousands_of_small_o_direct_reads_complete_without_a_fault() {
    let g0 = debian_guest();
    let disk = ext4_copy(&g0, "reads");
    let blk = format!("2,virtio-blk,{}", disk.path());
    let mut g = boot(
        "reads",
        &["-c", "1", "-m", "512M", "-l", "com1,stdio", "-s", &blk],
        "small_reads",
        "poweroff",
        "rhyve.reads=3000",
    );
    let r = g.finish();
    g.assert_lines(&r, &["rhyve-guest: small reads: 3000 done"]);
    assert_eq!(r.code(), 1, "{}", r.stderr);
}

#[test]
fn real_guest_virtio_blk_ext4_survives_remount_discard_and_zeroes_reach_the_images_ro_is_refused() {
    let g0 = debian_guest();
    let vda = ext4_copy(&g0, "blk-a");
    // vdb: 4 MiB of 0xff, 4096-byte sectors; vdc: read-only, with known content.
    let vdb = Scratch::new("blk-b.raw");
    std::fs::write(&vdb.0, vec![0xffu8; 4 << 20]).expect("write vdb");
    let vdc = Scratch::new("blk-c.raw");
    let mut c = b"rhyve-ro-disk".to_vec();
    c.resize(1 << 20, 0);
    std::fs::write(&vdc.0, &c).expect("write vdc");
    let blocks_before = std::fs::metadata(&vda.0).expect("stat vda").blocks();
    let a = format!("2,virtio-blk,{},ser=RHYVE-SER-1", vda.path());
    let b = format!("3,virtio-blk,{},sectorsize=4096", vdb.path());
    let cc = format!("4,virtio-blk,{},ro", vdc.path());
    let mut g = boot(
        "blk",
        &[
            "-c",
            "1",
            "-m",
            "512M",
            "-l",
            "com1,stdio",
            "-s",
            &a,
            "-s",
            &b,
            "-s",
            &cc,
        ],
        "blk",
        "poweroff",
        "",
    );
    let r = g.finish();
    g.assert_lines(
        &r,
        &[
            "rhyve-guest: disk vda serial RHYVE-SER-1 ro 0 lbs 512",
            "ro 0 lbs 4096 pbs 4096 discard",
            "ro 1 lbs 512 pbs 512 discard 0 zeroes 0",
            "rhyve-guest: blk read: hello from the host's ext4 image",
            "rhyve-guest: blk unmounted",
            "rhyve-guest: blk discard vdb ok",
            "rhyve-guest: blk write-zeroes vdb ok",
            "rhyve-guest: blk vdb third MiB:  ff",
            "rhyve-guest: blk vdc write refused",
            "rhyve-guest: blk vdc reads: rhyve-ro-dis",
        ],
    );
    assert_eq!(r.code(), 1, "{}", r.stderr);
    // The file written, fsync'd, re-read after a remount: the same bytes.
    let wrote = g.guest_value("blk wrote data.bin").unwrap_or_default();
    let reread = g.guest_value("blk reread data.bin").unwrap_or_default();
    assert!(
        wrote.len() == 64 && wrote == reread,
        "wrote {wrote:?}, re-read {reread:?}"
    );
    // Write-zeroes is offered to the driver (so it reached rhyve, not a fallback of writes).
    let vdb_line = g.guest_value("disk vdb").unwrap_or_default();
    assert!(!vdb_line.ends_with("zeroes 0"), "vdb: {vdb_line}");
    // fstrim's discards punched the freed blocks out of the image file.
    let blocks_after = std::fs::metadata(&vda.0).expect("stat vda").blocks();
    assert!(
        blocks_after + (4 << 20) / 512 < blocks_before,
        "fstrim freed too little: {blocks_before} -> {blocks_after} blocks ({})",
        g.guest_value("blk fstrim:").unwrap_or_default()
    );
    // The guest's file is in the host's image after rhyve exits.
    let out = std::process::Command::new("debugfs")
        .args(["-R", "cat /kept.txt"])
        .arg(&vda.0)
        .output()
        .expect("run debugfs (e2fsprogs)");
    let kept = String::from_utf8_lossy(&out.stdout);
    assert!(
        kept.starts_with("kept by the guest")
            && g.console
                .contains(&format!("rhyve-guest: blk {}", kept.trim())),
        "the host's image holds {kept:?}"
    );
    // vdb: the discarded and the zeroed MiB read as zeros; the third MiB is untouched.
    let b = std::fs::read(&vdb.0).expect("read vdb");
    assert!(
        b[..2 << 20].iter().all(|&x| x == 0),
        "vdb's first 2 MiB are not zero"
    );
    assert!(
        b[2 << 20..].iter().all(|&x| x == 0xff),
        "vdb's last 2 MiB changed"
    );
    // vdc: untouched.
    assert_eq!(std::fs::read(&vdc.0).expect("read vdc"), c);
}

#[test]
fn real_guest_virtio_net_pings_the_tap_and_carries_64_mib_each_way_intact() {
    let ns = Netns::new("rgnet");
    let mut g = boot_in(
        &ns,
        "net",
        &[
            "-c",
            "1",
            "-m",
            "512M",
            "-l",
            "com1,stdio",
            "-s",
            "3,virtio-net,tap0,mac=52:54:00:12:34:56,mtu=1400",
        ],
        "net",
        "rhyve.ip=10.78.1.2/24 rhyve.peer=10.78.1.1 rhyve.mib=64",
    );
    ns.configure_tap("tap0", "10.78.1.1/24", Duration::from_secs(120));
    assert!(
        ns.exec(&["ip", "link", "set", "tap0", "mtu", "1400"])
            .status
            .success(),
        "set the tap's MTU"
    );
    const LEN: usize = 64 << 20;
    // The guest sends first: accept it on the tap's address, read exactly LEN bytes.
    let listener = in_netns(&ns.0, || {
        std::net::TcpListener::bind("10.78.1.1:5001").expect("listen on the tap's address")
    });
    let rx = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("the guest connects");
        let mut buf = vec![0u8; LEN];
        s.read_exact(&mut buf).expect("read the guest's bytes");
        sha256_hex(&buf)
    });
    let sending = g.wait_for("rhyve-guest: net: sending ");
    let received_sum = rx.join().expect("receiver");
    let sent_by_guest = sending
        .as_deref()
        .and_then(|l| l.split("net: sending ").nth(1))
        .unwrap_or_default()
        .trim()
        .to_string();
    // Then the host sends LEN pseudo-random bytes to the guest's listener.
    let mut data = vec![0u8; LEN];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    let sent_sum = sha256_hex(&data);
    assert!(
        g.wait_for("rhyve-guest: net: sent").is_some(),
        "{}",
        g.console
    );
    let ns_name = ns.0.clone();
    let tx = std::thread::spawn(move || {
        in_netns(&ns_name, move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(300);
            let mut s = loop {
                match std::net::TcpStream::connect("10.78.1.2:5002") {
                    Ok(s) => break s,
                    Err(e) if std::time::Instant::now() < deadline => {
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Err(e) => panic!("connect to the guest: {e}"),
                }
            };
            s.write_all(&data).expect("send to the guest");
            s.shutdown(std::net::Shutdown::Write).expect("shutdown");
            // Wait for the guest to close its end.
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
        })
    });
    let r = g.finish();
    tx.join().expect("sender");
    g.assert_lines(
        &r,
        &[
            "rhyve-guest: net: eth0 52:54:00:12:34:56 mtu 1400",
            "rhyve-guest: net: ping 10.78.1.1 ok",
        ],
    );
    assert_eq!(sent_by_guest, received_sum, "guest -> host stream differs");
    let got = g.guest_value("net: received").unwrap_or_default();
    assert_eq!(
        got,
        format!("{LEN} bytes {sent_sum}"),
        "host -> guest stream differs"
    );
    assert_eq!(r.code(), 1, "{}", r.stderr);
}

#[test]
fn real_guest_reads_a_mib_from_virtio_rnd() {
    let mut g = boot(
        "rng",
        &[
            "-c",
            "1",
            "-m",
            "512M",
            "-l",
            "com1,stdio",
            "-s",
            "3,virtio-rnd",
        ],
        "rng",
        "poweroff",
        "rhyve.kib=1024",
    );
    let r = g.finish();
    g.assert_lines(
        &r,
        &[
            "rhyve-guest: rng: current virtio_rng.0",
            "rhyve-guest: rng: read 1048576 bytes",
        ],
    );
    assert_eq!(r.code(), 1, "{}", r.stderr);
}

#[test]
fn real_guest_virtio_console_names_its_port_and_carries_bytes_both_ways() {
    let sock = Scratch::new("console.sock");
    let _ = std::fs::remove_file(&sock.0);
    let con = format!("5,virtio-console,org.rhyve.test={}", sock.path());
    let mut g = boot(
        "console",
        &["-c", "1", "-m", "512M", "-l", "com1,stdio", "-s", &con],
        "console",
        "poweroff",
        "rhyve.port=org.rhyve.test",
    );
    // Connect while the guest boots: rhyve listens on the port's socket from its start.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut s = loop {
        match std::os::unix::net::UnixStream::connect(&sock.0) {
            Ok(s) => break s,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "connect {}: {e}",
                    sock.path()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    let wrote = g.wait_for("rhyve-guest: console wrote to");
    assert!(
        wrote.is_some(),
        "the guest never wrote to its port:\n{}",
        g.console
    );
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\n") {
        match s.read(&mut byte) {
            Ok(1) => got.push(byte[0]),
            other => panic!("reading the port: {other:?} after {got:?}"),
        }
    }
    assert_eq!(got, b"hello from the guest\n");
    s.write_all(b"hello from the host\n")
        .expect("write to the port");
    let r = g.finish();
    g.assert_lines(
        &r,
        &[
            "name org.rhyve.test",
            "rhyve-guest: console read: hello from the host",
        ],
    );
    assert_eq!(r.code(), 1, "{}", r.stderr);
}

#[test]
fn real_guest_console_on_ttys0_and_a_second_com_port_to_a_file() {
    let com2 = Scratch::new("com2.txt");
    let com2_arg = format!("com2,{}", com2.path());
    let mut g = boot(
        "serial",
        &["-c", "1", "-m", "512M", "-l", "com1,stdio", "-l", &com2_arg],
        "serial",
        "poweroff",
        "",
    );
    let r = g.finish();
    g.assert_lines(
        &r,
        &[
            "printk: console [ttyS0] enabled",
            "ttyS0 at I/O 0x3f8 (irq = 4",
            "ttyS1 at I/O 0x2f8 (irq = 3",
            "rhyve-guest: serial: wrote ttyS1",
        ],
    );
    let text = std::fs::read_to_string(&com2.0).expect("read COM2's file");
    assert!(text.contains("hello on COM2"), "COM2's file holds {text:?}");
    assert_eq!(r.code(), 1, "{}", r.stderr);
}

#[test]
fn real_guest_sigterm_presses_the_power_button_and_acpid_powers_off_with_status_1() {
    let mut g = boot(
        "acpid",
        &["-c", "1", "-m", "512M", "-l", "com1,stdio"],
        "acpid",
        "wait",
        "",
    );
    assert!(
        g.wait_for("rhyve-guest: acpid: waiting").is_some(),
        "acpid never started:\n{}",
        g.console
    );
    // Let acpid open its input devices.
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(g.pid(), libc::SIGTERM) };
    let r = g.finish();
    g.assert_lines(&r, &["rhyve-guest: power button pressed"]);
    assert_eq!(r.code(), 1, "{}", r.stderr);
}

/// The PCI functions Linux lists, as "BB:SS.F vendor:device".
fn pci_functions(g: &LinuxGuest) -> Vec<String> {
    g.console
        .lines()
        .filter_map(|l| l.strip_prefix("rhyve-guest: pci 0000:"))
        .map(|l| l.split(" class").next().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn real_guest_platform_has_no_acpi_complaints_the_pci_layout_asked_for_msix_and_the_rtc_time() {
    let g0 = debian_guest();
    let disk = ext4_copy(&g0, "platform");
    let sock = Scratch::new("platform.sock");
    let _ = std::fs::remove_file(&sock.0);
    let blk = format!("2,virtio-blk,{}", disk.path());
    let con = format!("7,virtio-console,p={}", sock.path());
    let mut g = boot(
        "platform",
        &[
            "-c",
            "1",
            "-m",
            "512M",
            "-l",
            "com1,stdio",
            "-s",
            &blk,
            "-s",
            "4,virtio-rnd",
            "-s",
            &con,
        ],
        "platform,rng",
        "poweroff",
        "rhyve.kib=4",
    );
    let rtc_line = g.wait_for("rhyve-guest: rtc: ");
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let r = g.finish();
    g.assert_lines(
        &r,
        &[
            "rhyve-guest: acpi problems: 0",
            "rhyve-guest: rng: read 4096 bytes",
        ],
    );
    assert!(
        !g.console.contains("i8042: Can't read CTR"),
        "{}",
        g.console
    );
    assert!(!g.console.contains("unchecked MSR access"), "{}", g.console);
    assert_eq!(
        pci_functions(&g),
        [
            "00:00.0 0x1275:0x1275",
            "00:02.0 0x1af4:0x1042",
            "00:04.0 0x1af4:0x1044",
            "00:07.0 0x1af4:0x1043",
            "00:1f.0 0x8086:0x7000",
        ],
        "{}",
        g.console
    );
    // Each virtio function's queues and config change use MSI-X vectors (Linux 6.1 lists
    // MSI-X vectors as PCI-MSI; virtio-pci's modern transport has only MSI-X).
    let msix = g
        .console
        .lines()
        .filter(|l| {
            l.starts_with("rhyve-guest: irq") && l.contains("PCI-MSI") && l.contains("virtio")
        })
        .count();
    assert!(msix >= 6, "MSI-X vectors in use: {msix}\n{}", g.console);
    let rtc: i64 = rtc_line
        .as_deref()
        .and_then(|l| l.split("rtc: ").nth(1))
        .and_then(|v| v.split(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        (rtc - host_now).abs() <= 5,
        "the guest's RTC says {rtc}, the host {host_now}"
    );
    assert_eq!(r.code(), 1, "{}", r.stderr);
}

#[test]
fn real_guest_devices_sharing_an_intx_pin_all_work_with_msi_off() {
    let g0 = debian_guest();
    let disk = ext4_copy(&g0, "intx");
    // Slots 4 and 12 swizzle to the same I/O APIC pin.
    let blk = format!("12,virtio-blk,{}", disk.path());
    let mut g = boot(
        "intx",
        &[
            "-c",
            "1",
            "-m",
            "512M",
            "-l",
            "com1,stdio",
            "-s",
            "4,virtio-rnd",
            "-s",
            &blk,
        ],
        "platform,rng,small_reads",
        "poweroff",
        "pci=nomsi rhyve.kib=64 rhyve.reads=300",
    );
    let r = g.finish();
    g.assert_lines(
        &r,
        &[
            "rhyve-guest: interrupts: 0 msi lines",
            "rhyve-guest: rng: read 65536 bytes",
            "rhyve-guest: small reads: 300 done",
        ],
    );
    let irq = |slot: &str| {
        g.guest_value(&format!("pci 0000:00:{slot}"))
            .and_then(|l| l.rsplit(' ').next().map(str::to_string))
            .unwrap_or_default()
    };
    assert_eq!(
        irq("04.0"),
        irq("0c.0"),
        "slots 4 and 12 should share a pin"
    );
    assert_eq!(r.code(), 1, "{}", r.stderr);
}

#[test]
fn real_guest_debian_guest_default_init_reads_writes_its_disk_reads_rng_pings_and_powers_off() {
    // The Debian test guest's own /init, with the bzImage through the 64-bit boot protocol and
    // its decompressor, as tests/linux.rs boots it on PVM hosts.
    let g0 = debian_guest();
    let disk = ext4_copy(&g0, "default");
    let ns = Netns::new("rgdef");
    let blk = format!("2,virtio-blk,{}", disk.path());
    let mut g = boot_in(
        &ns,
        "default",
        &[
            "-c",
            "1",
            "-m",
            "512M",
            "-l",
            "com1,stdio",
            "-s",
            &blk,
            "-s",
            "3,virtio-rnd",
            "-s",
            "4,virtio-net,tap0,mac=52:54:00:00:78:02",
            "-o",
            "boot.unpack_bzimage=false",
        ],
        "default",
        "rhyve.ip=10.78.0.2/24 rhyve.peer=10.78.0.1",
    );
    ns.configure_tap("tap0", "10.78.0.1/24", Duration::from_secs(120));
    let r = g.finish();
    g.assert_lines(
        &r,
        &[
            "rhyve-guest: init running: kernel 6.",
            "/bin/busybox ELF class 1",
            "rhyve-guest: blk read: hello from the host's ext4 image",
            "rhyve-guest: blk wrote: written by the guest at boot",
            "rhyve-guest: blk unmounted",
            "rhyve-guest: rng: virtio_rng.0 gave ",
            "rhyve-guest: net: eth0 52:54:00:00:78:02 10.78.0.2/24",
            "rhyve-guest: net: ping 10.78.0.1 ok",
            "rhyve-guest: end: poweroff",
        ],
    );
    let rng = g.guest_value("rng: virtio_rng.0 gave").unwrap_or_default();
    assert_eq!(rng.len(), 32, "16 random bytes in hex: {rng:?}");
    assert_eq!(r.code(), 1, "poweroff -f is status 1: {}", r.stderr);
    let out = std::process::Command::new("debugfs")
        .args(["-R", "cat /from-guest.txt"])
        .arg(&disk.0)
        .output()
        .expect("run debugfs (e2fsprogs)");
    let written = String::from_utf8_lossy(&out.stdout);
    assert!(
        written.starts_with("written by the guest at boot") && g.console.contains(written.trim()),
        "the host's file holds {written:?}"
    );
}

#[test]
fn real_guest_bzimage_unpacked_by_rhyve_enters_through_pvh_and_reaches_user_space() {
    // boot.unpack_bzimage (PVM's default) on a hardware-style KVM: the kernel ELF, unpacked
    // on the host, entered through its PVH note, runs the same user space.
    let mut g = boot(
        "pvh",
        &[
            "-v",
            "-c",
            "1",
            "-m",
            "256M",
            "-l",
            "com1,stdio",
            "-o",
            "boot.unpack_bzimage=true",
        ],
        "platform",
        "reboot",
        "",
    );
    let r = g.finish();
    assert!(
        r.stderr.contains("unpacked its") && r.stderr.contains("entry Pvh"),
        "rhyve did not unpack the bzImage for PVH: {}",
        r.stderr
    );
    g.assert_lines(
        &r,
        &[
            "rhyve-guest: init running: kernel 6.",
            "rhyve-guest: hypervisor: Hypervisor detected: KVM",
            "rhyve-guest: end: reboot",
        ],
    );
    assert_eq!(r.code(), 0, "{}", r.stderr);
}

/// One request to rhyve's API over its unix socket (the L1 of the nested harness has no
/// curl): (status, JSON body or Null).
fn api(sock: &Path, method: &str, endpoint: &str) -> (u16, serde_json::Value) {
    api_with(sock, method, endpoint, None, Duration::from_secs(60))
}

/// The same with a JSON body, waiting up to `wait` for the answer.
fn api_with(
    sock: &Path,
    method: &str,
    endpoint: &str,
    body: Option<&serde_json::Value>,
    wait: Duration,
) -> (u16, serde_json::Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let resp = common::api::raw_with(sock, req.as_bytes(), wait);
    (common::api::status_of(&resp), common::api::json_body(&resp))
}

/// A Linux guest driven over the API: its virtio-rnd reads show in vm.counters, vm.reboot
/// restarts it (it boots and reads again, on a new device), and vm.power-button reaches acpid,
/// which powers the guest off (status 1).
#[test]
fn real_guest_api_counters_move_reboot_restarts_and_the_power_button_shuts_it_down() {
    let sock = std::env::temp_dir().join(format!("rhyve-rg-api-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let s = sock.to_str().expect("utf-8 path").to_string();
    let mut g = boot(
        "api",
        &[
            "--api-socket",
            &s,
            "-c",
            "1",
            "-m",
            "512M",
            "-l",
            "com1,stdio",
            "-s",
            "3,virtio-rnd",
        ],
        "rng,acpid",
        "wait",
        "rhyve.kib=256",
    );
    for round in ["first boot", "after vm.reboot"] {
        assert!(
            g.wait_for("rhyve-guest: rng: read 262144 bytes").is_some(),
            "{round}: no rng read:\n{}",
            g.console
        );
        let (code, c) = api(&sock, "GET", "vm.counters");
        assert_eq!(code, 200, "{c}");
        assert!(
            c["_rng0"]["bytes"].as_u64().unwrap_or(0) >= 262144,
            "{round}: {c}"
        );
        assert!(
            g.wait_for("rhyve-guest: acpid: waiting").is_some(),
            "{round}: acpid never started:\n{}",
            g.console
        );
        assert_eq!(api(&sock, "GET", "vm.info").1["state"], "Running");
        if round == "first boot" {
            assert_eq!(api(&sock, "PUT", "vm.reboot").0, 204);
        }
    }
    // Let acpid open its input devices.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(api(&sock, "PUT", "vm.power-button").0, 204);
    let r = g.finish();
    g.assert_lines(&r, &["rhyve-guest: power button pressed"]);
    assert_eq!(r.code(), 1, "{}", r.stderr);
}

/// The numbers of the "rhyve-guest: record N" lines of a console, in order.
fn records(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.split("rhyve-guest: record ").nth(1))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// The ping replies' sequence numbers ("64 bytes from ...: seq=N ...") of a console.
fn ping_seqs(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.split("seq=").nth(1))
        .filter_map(|n| n.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Reads console lines until the guest has printed record `n` (or later).
fn wait_record(g: &mut LinuxGuest, n: u64, what: &str) {
    while records(&g.console).last().copied().unwrap_or(0) < n {
        assert!(
            g.wait_for("rhyve-guest: record ").is_some(),
            "{what}: the guest stopped before record {n}:\n{}",
            g.console
        );
    }
}

/// A Linux guest appending numbered, fsync'ed records to its virtio-blk disk and pinging the
/// host over virtio-net is snapshotted, restored in a new process (`rhyve -r`), then live
/// migrated to a third: it carries on through both. The disk holds every record from 1 on,
/// each once; the consoles of the three processes together count on without a gap or a
/// repeat; the pings lose at most the replies that fell into the pauses.
#[test]
fn real_guest_snapshot_restore_and_live_migration_keep_records_and_pings_going() {
    require_hw_kvm();
    let g = debian_guest();
    let ns = Netns::new("rgmig");
    for cmd in [
        // A MAC of its own: a bridge otherwise takes its ports', and changes it when they
        // come and go, which the guest's ARP cache would not know.
        &[
            "ip",
            "link",
            "add",
            "br0",
            "address",
            "02:00:0a:4e:09:01",
            "type",
            "bridge",
        ][..],
        &["ip", "addr", "add", "10.78.9.1/24", "dev", "br0"],
        &["ip", "link", "set", "br0", "up"],
    ] {
        assert!(ns.exec(cmd).status.success(), "{cmd:?}");
    }
    // A tap rhyve creates joins the bridge that holds the host's address.
    let bridge = |tap: &str| -> Result<(), String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        while !ns.exec(&["ip", "link", "show", tap]).status.success() {
            if std::time::Instant::now() > deadline {
                return Err(format!("{tap} never appeared"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for cmd in [
            &["ip", "link", "set", tap, "master", "br0"][..],
            &["ip", "link", "set", tap, "up"],
        ] {
            let out = ns.exec(cmd);
            if !out.status.success() {
                return Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)));
            }
        }
        Ok(())
    };
    // A failure with the guest's rhyve's own words.
    let joined = |g: &mut LinuxGuest, r: Result<(), String>| {
        if let Err(e) = r {
            let out = g.finish();
            panic!("{e}\nrhyve ({}): {}\n{}", out.code(), out.stderr, g.console);
        }
    };
    let disk = Scratch::new("records.img");
    std::fs::write(&disk.0, vec![0u8; 8 << 20]).expect("the records disk");
    let dir = std::env::temp_dir().join(format!("rhyve-rg-mig-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (sock_a, sock_b, sock_c) = (dir.join("a.sock"), dir.join("b.sock"), dir.join("c.sock"));
    let snap = dir.join("snap");
    let blk = format!("2,virtio-blk,{}", disk.path());
    let net = |tap: &str| format!("3,virtio-net,{tap},mac=52:54:00:12:34:59");
    let cmdline = format!(
        "{CMDLINE} rhyve.scenario=records rhyve.end=poweroff rhyve.ip=10.78.9.2/24 rhyve.peer=10.78.9.1"
    );
    let sa = sock_a.to_str().expect("utf-8").to_string();
    let net_a = net("tapa");
    let args = with_debian_guest(
        &g,
        &[
            "--api-socket",
            &sa,
            "-c",
            "1",
            "-m",
            "512M",
            "-l",
            "com1,stdio",
            "-s",
            &blk,
            "-s",
            &net_a,
        ],
        &cmdline,
        "records",
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut a = LinuxGuest::new("mig-a", ns.spawn_rhyve(&args));
    joined(&mut a, bridge("tapa"));
    wait_record(&mut a, 10, "first boot");
    // Snapshot: pause, write, and this process ends.
    assert_eq!(api(&sock_a, "PUT", "vm.pause").0, 204);
    let url = serde_json::json!({"destination_url": format!("file://{}", snap.display())});
    let (code, e) = api_with(
        &sock_a,
        "PUT",
        "vm.snapshot",
        Some(&url),
        Duration::from_secs(600),
    );
    assert_eq!(code, 204, "vm.snapshot: {e}");
    assert_eq!(api(&sock_a, "PUT", "vmm.shutdown").0, 204);
    let ra = a.finish();
    assert_eq!(ra.code(), 1, "{}", ra.stderr);
    // Restore in a new process, the same tap name again (the first process's went with it).
    let sb = sock_b.to_str().expect("utf-8").to_string();
    let snap_s = snap.to_str().expect("utf-8").to_string();
    let mut b = LinuxGuest::new(
        "mig-b",
        ns.spawn_rhyve(&[
            "-v",
            "--api-socket",
            &sb,
            "-r",
            &snap_s,
            "-l",
            "com1,stdio",
            "-s",
            &net_a,
            "records",
        ]),
    );
    joined(&mut b, bridge("tapa"));
    let last_a = records(&a.console).last().copied().unwrap_or(0);
    wait_record(&mut b, last_a + 10, "after the restore");
    // Live migration to a third process, on a tap of its own on the same bridge.
    let sc = sock_c.to_str().expect("utf-8").to_string();
    let mut c = LinuxGuest::new("mig-c", ns.spawn_rhyve(&["-v", "--api-socket", &sc]));
    wait_for_api_of(&sock_c);
    let mig = format!("unix:{}", dir.join("mig.sock").display());
    let recv = {
        let (sock, body) = (
            sock_c.clone(),
            serde_json::json!({"receiver_url": mig, "config": {"pci.0.3.0.backend": "tapc"}}),
        );
        std::thread::spawn(move || {
            api_with(
                &sock,
                "PUT",
                "vm.receive-migration",
                Some(&body),
                Duration::from_secs(900),
            )
        })
    };
    // The destination creates tapc when it builds the VM: join it to the bridge meanwhile, so
    // that the pings lost at the switch-over measure rhyve's downtime, not how long this
    // harness takes to run `ip` in a loaded L1 once the migration is over (7 pings, 1.4 s,
    // when it joined afterwards in the 2026-12-05 CI, with 72 ms of downtime).
    let tapc = std::thread::scope(|s| {
        let tapc = s.spawn(|| bridge("tapc"));
        let body = serde_json::json!({ "destination_url": mig });
        let (code, e) = api_with(
            &sock_b,
            "PUT",
            "vm.send-migration",
            Some(&body),
            Duration::from_secs(900),
        );
        assert_eq!(code, 204, "vm.send-migration: {e}");
        let (code, e) = recv.join().expect("receive thread");
        assert_eq!(code, 204, "vm.receive-migration: {e}");
        tapc.join()
            .unwrap_or_else(|_| Err("joining tapc to the bridge panicked".into()))
    });
    joined(&mut c, tapc);
    let rb = b.finish();
    assert_eq!(rb.code(), 1, "{}", rb.stderr);
    let downtime_ms: f64 = rb
        .stderr
        .split("downtime ")
        .nth(1)
        .and_then(|t| t.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no downtime in: {}", rb.stderr));
    let last_b = records(&b.console).last().copied().unwrap_or(0);
    wait_record(&mut c, last_b + 10, "after the migration");
    assert_eq!(api(&sock_c, "PUT", "vmm.shutdown").0, 204);
    let rc = c.finish();
    assert_eq!(rc.code(), 0, "{}", rc.stderr);
    // The consoles: each counts on by one; across the processes no number comes twice, and
    // at most the one whose line the pause cut in two is missing from them (the disk below
    // has it).
    let parts: Vec<Vec<u64>> = [&a.console, &b.console, &c.console]
        .iter()
        .map(|t| records(t))
        .collect();
    for p in &parts {
        assert!(p.windows(2).all(|w| w[1] == w[0] + 1), "records: {parts:?}");
    }
    let all: Vec<u64> = parts.concat();
    assert_eq!(all.first(), Some(&1), "records: {parts:?}");
    assert!(
        all.windows(2).all(|w| w[1] > w[0] && w[1] <= w[0] + 2),
        "records across the processes: {parts:?}"
    );
    // The disk: sector N holds record N, for every N the guest said it wrote.
    let data = std::fs::read(&disk.0).expect("read the records disk");
    let last = *all.last().unwrap_or(&0);
    for n in 1..=last {
        let at = usize::try_from(n * 512).expect("offset");
        let sector = data.get(at..at + 16).unwrap_or_default();
        assert_eq!(
            sector,
            format!("record {n:08}\n").as_bytes(),
            "sector {n} of the disk"
        );
    }
    // Pings: the replies of all three processes, a sequence with holes only at the pauses.
    let seqs: Vec<u64> = [&a.console, &b.console, &c.console]
        .iter()
        .flat_map(|t| ping_seqs(t))
        .collect();
    assert!(seqs.len() >= 20, "few ping replies: {seqs:?}");
    let lost: u64 = seqs
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]).saturating_sub(1))
        .sum();
    // One request in flight at each of the two pauses, and one every 200 ms of the migration's
    // downtime (the guest's clock stops while it is paused for the snapshot).
    let allowed = 2 + 2 + (downtime_ms / 200.0).ceil() as u64;
    assert!(
        lost <= allowed,
        "{lost} ping replies lost (allowed {allowed}, downtime {downtime_ms} ms): {seqs:?}"
    );
    assert!(
        seqs.windows(2).all(|w| w[1] > w[0]),
        "ping replies repeated or out of order: {seqs:?}"
    );
    eprintln!(
        "[records] {last} records on disk, {} ping replies, {lost} lost (allowed {allowed}), migration downtime {downtime_ms} ms",
        seqs.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits until rhyve's API at `sock` answers a ping.
fn wait_for_api_of(sock: &Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !(sock.exists() && api(sock, "GET", "vmm.ping").0 == 200) {
        assert!(
            std::time::Instant::now() < deadline,
            "{} never answered",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// QEMU's qboot (Debian's qemu-system-data), the firmware the tests below boot first.
const QBOOT: &str = "/usr/share/qemu/qboot.rom";

/// The firmware file `path`, or a panic naming the package to install.
fn firmware(path: &str, package: &str) -> String {
    assert!(
        Path::new(path).is_file(),
        "{path} is missing: apt-get install {package} (scripts/setup.sh installs it)"
    );
    path.into()
}

#[test]
fn real_guest_qboot_boots_the_kernel_it_reads_from_fw_cfg_with_rhyves_acpi_tables() {
    // qboot at the reset vector, on the i440fx host bridge it recognises; it reads the memory
    // map, the ACPI tables (through the table loader) and the kernel, initrd and command line
    // from fw_cfg, and jumps into the kernel: no direct boot by rhyve.
    let rom = firmware(QBOOT, "qemu-system-data");
    let opts = firmware_args(&rom, "512M");
    let mut g = boot(
        "qboot",
        &opts.iter().map(String::as_str).collect::<Vec<_>>(),
        "firmware,platform",
        "poweroff",
        "",
    );
    let r = g.finish();
    g.assert_lines(
        &r,
        &[
            // qboot's own map: the 0xd0000 ACPI NVS area it keeps its tables' copy in.
            "BIOS-e820: [mem 0x00000000000d0000-",
            "Run /init as init process",
            "rhyve-guest: firmware: bios",
            // The tables were installed by the firmware, not at rhyve's own 0xf2400.
            "rhyve-guest: rsdp: ACPI: RSDP 0x00000000000F",
            "rhyve-guest: acpi problems: 0",
            "rhyve-guest: hypervisor: Hypervisor detected: KVM",
            "rhyve-guest: end: poweroff",
        ],
    );
    assert!(
        !g.console.contains("RSDP 0x00000000000F2400"),
        "the guest found rhyve's direct-boot tables, not the firmware's copy"
    );
    assert_eq!(r.code(), 1, "{}", r.stderr);
}

/// A copy of the test guest's boot disk `name` (scripts/lib/firmware-disks.sh).
fn boot_disk_copy(name: &str, tag: &str) -> Scratch {
    let g = debian_guest();
    let s = Scratch::new(&format!("{tag}.img"));
    std::fs::copy(g.join(name), &s.0).expect("copy the boot disk");
    s
}

/// Boots firmware `rom` (with `extra` rhyve options) from boot disk `disk` on virtio-blk:
/// no kernel given to rhyve; the disk's boot loader starts the test guest's firmware scenario.
fn boot_firmware(tag: &str, rom: &str, disk: &Scratch, extra: &[&str]) -> LinuxGuest {
    require_hw_kvm();
    let mut args = firmware_args(rom, "512M");
    args.extend(["-s".into(), format!("2,virtio-blk,{}", disk.path())]);
    args.extend(extra.iter().map(|a| a.to_string()));
    args.push(tag.into());
    LinuxGuest::new(
        tag,
        spawn(&args.iter().map(String::as_str).collect::<Vec<_>>()),
    )
}

#[test]
fn real_guest_seabios_boots_syslinux_from_an_mbr_disk_on_virtio_blk_to_user_space() {
    // SeaBIOS from the reset vector: it shadows itself through PAM, installs rhyve's ACPI
    // tables from fw_cfg, finds the virtio-blk disk with its own driver and boots its MBR;
    // SYSLINUX loads the kernel and initramfs through the BIOS's disk services.
    let rom = firmware("/usr/share/seabios/bios.bin", "seabios");
    let disk = boot_disk_copy("bios.img", "seabios");
    let mut g = boot_firmware("seabios", &rom, &disk, &[]);
    let r = g.finish();
    g.assert_lines(
        &r,
        &[
            "SeaBIOS (version",
            "Booting from Hard Disk",
            "SYSLINUX",
            "Run /init as init process",
            "rhyve-guest: firmware: bios",
            "rhyve-guest: rsdp: ACPI: RSDP 0x00000000000F",
            "rhyve-guest: acpi problems: 0",
            // SYSLINUX names the image it loaded first.
            "rhyve-guest: cmdline: BOOT_IMAGE=/vmlinuz console=ttyS0 rhyve.scenario=firmware",
            "rhyve-guest: end: poweroff",
        ],
    );
    assert_eq!(r.code(), 1, "{}", r.stderr);
}

/// Debian's OVMF (package ovmf): the code and a variable-store template, and the single file.
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
const OVMF_ONE: &str = "/usr/share/ovmf/OVMF.fd";

/// The UEFI boot's lines: systemd-boot from the ESP's removable-media path, the kernel's EFI
/// stub, and the guest seeing UEFI.
const UEFI_BOOT: &[&str] = &[
    "Run /init as init process",
    "rhyve-guest: firmware: efi",
    "rhyve-guest: acpi problems: 0",
    // The options of systemd-boot's loader entry (scripts/lib/firmware-disks.sh): only
    // systemd-boot gives the kernel these.
    "console=ttyS0 rhyve.scenario=firmware rhyve.end=poweroff",
];

/// The value the firmware scenario found in its UEFI variable, and the one it wrote.
fn efivar(console: &str) -> (String, String) {
    let field = |key: &str| {
        console
            .lines()
            .find_map(|l| l.split_once(key).map(|(_, v)| v.trim().to_string()))
            .unwrap_or_else(|| panic!("the guest never printed {key:?}"))
    };
    (
        field("rhyve-guest: efivar before: "),
        field("rhyve-guest: efivar written: "),
    )
}

#[test]
fn real_guest_ovmf_boots_systemd_boot_from_a_gpt_disk_and_keeps_a_uefi_variable_across_boots() {
    // OVMF with its variable store in a varfile (bhyve's -l bootrom,CODE,VARS): rhyve presents
    // the store as a CFI flash, so what the guest writes through UEFI's runtime services
    // reaches the file and the next boot reads it.
    let code = firmware(OVMF_CODE, "ovmf");
    let vars = Scratch::new("ovmf-vars.fd");
    std::fs::copy(firmware(OVMF_VARS, "ovmf"), &vars.0).expect("copy the variable store");
    let rom = format!("{code},{}", vars.path());
    let template = std::fs::read(OVMF_VARS).expect("read the template");
    let mut written = Vec::new();
    for boot in ["ovmf-1", "ovmf-2"] {
        let disk = boot_disk_copy("efi.img", boot);
        let mut g = boot_firmware(boot, &rom, &disk, &[]);
        let r = g.finish();
        g.assert_lines(&r, UEFI_BOOT);
        assert_eq!(r.code(), 1, "{}", r.stderr);
        written.push(efivar(&g.console));
    }
    assert_eq!(
        written[0].0, "none",
        "the fresh store had the variable already"
    );
    assert_eq!(
        written[1].0, written[0].1,
        "the second boot did not read what the first wrote"
    );
    assert_ne!(
        std::fs::read(&vars.0).expect("read the store"),
        template,
        "the varfile was not written"
    );
}

#[test]
fn real_guest_ovmf_single_file_boots_systemd_boot_to_user_space() {
    // OVMF.fd, code and variables in one ROM: it boots; its variables do not persist (the ROM
    // is read-only, so the firmware keeps them in RAM).
    let rom = firmware(OVMF_ONE, "ovmf");
    let disk = boot_disk_copy("efi.img", "ovmf-one");
    let mut g = boot_firmware("ovmf-one", &rom, &disk, &[]);
    let r = g.finish();
    g.assert_lines(&r, UEFI_BOOT);
    assert_eq!(r.code(), 1, "{}", r.stderr);
}
