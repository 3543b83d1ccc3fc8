//! KVM tests of virtio devices, driven by small guest drivers in guests/rom.

mod common;
use common::*;

#[test]
fn virtio_rnd_serves_random_bytes_and_survives_hostile_chains() {
    let r = run_rom("virtio_rnd", &["-s", "4,virtio-rnd"]);
    assert_eq!(r.code(), 0, "{}\n{}", r.stdout, r.stderr);
    let out = &r.stdout;
    assert_eq!(
        value(out, "ids "),
        0x1044_1af4,
        "virtio vendor, modern device ID for entropy"
    );
    assert_eq!(
        value(out, "class/rev ") & 0xff,
        1,
        "modern devices have revision 1"
    );
    assert_eq!(
        value(out, "device features 63:32 ") & 1,
        1,
        "VERSION_1 offered"
    );
    let statuses: Vec<&str> = out.lines().filter(|l| l.starts_with("status 0")).collect();
    assert_eq!(
        statuses,
        ["status 0000000b", "status 0000000f"],
        "FEATURES_OK kept, DRIVER_OK set"
    );
    assert_eq!(value(out, "queue max "), 256);
    assert_eq!(value(out, "request 1 len "), 16);
    assert_eq!(value(out, "request 2 len "), 16);
    let bufs: Vec<&str> = out.lines().filter(|l| l.starts_with("bytes ")).collect();
    assert_eq!(bufs.len(), 2);
    assert_ne!(
        bufs[0], bufs[1],
        "two requests, two different random blocks"
    );
    assert_ne!(bufs[0], "bytes 00000000000000000000000000000000");
    assert_eq!(
        value(out, "outside memory len "),
        0,
        "a buffer outside RAM gets nothing"
    );
    assert!(
        value(out, "looping chain completed, len ") <= 256 * 16,
        "a loop ends"
    );
    assert_eq!(
        value(out, "after bad requests len "),
        16,
        "the device still works"
    );
    assert_eq!(value(out, "status after reset "), 0);
    assert_eq!(value(out, "msix vectors "), 2, "one per queue plus config");
    assert!(
        value(out, "msix interrupts ") >= 1,
        "completions arrive as MSI-X interrupts"
    );
    assert!(
        r.stderr.contains("outside guest memory"),
        "bad input is logged: {}",
        r.stderr
    );
}

fn disk(name: &str, fill: u8) -> std::path::PathBuf {
    // On the target directory's filesystem: O_DIRECT (nocache) does not work on tmpfs.
    let p = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{name}-{}.img", std::process::id()));
    std::fs::write(&p, vec![fill; 1 << 20]).expect("create the disk image");
    p
}

fn pattern() -> Vec<u8> {
    (0..512u32).map(|i| (i * 7 + 3) as u8).collect()
}

fn blk_run(img: &std::path::Path, opts: &str) -> Run {
    let dev = format!("4,virtio-blk,{}{opts}", img.display());
    run_rom("virtio_blk", &["-s", &dev])
}

#[test]
fn virtio_blk_writes_flushes_reads_back_and_zeroes() {
    let img = disk("blk", 0xaa);
    let r = blk_run(&img, ",ser=TESTDISK01");
    assert_eq!(r.code(), 0, "{}\n{}", r.stdout, r.stderr);
    let out = &r.stdout;
    assert_eq!(value(out, "ids "), 0x1042_1af4);
    assert_eq!(value(out, "capacity "), 2048, "1 MiB in 512-byte sectors");
    assert_eq!(value(out, "blk_size "), 512);
    assert_eq!(value(out, "get-id status "), 0);
    assert!(out.contains("serial TESTDISK01"), "{out}");
    assert_eq!(value(out, "write status "), 0);
    assert_eq!(value(out, "flush status "), 0);
    assert_eq!(value(out, "read status "), 0);
    assert_eq!(
        value(out, "read used len "),
        513,
        "data plus the status byte"
    );
    assert!(out.contains("compare ok"), "{out}");
    assert_eq!(
        value(out, "past the end status "),
        1,
        "IOERR beyond the capacity"
    );
    assert_eq!(value(out, "write zeroes status "), 0);
    assert_eq!(value(out, "sector 2 first dword "), 0);
    assert!(
        value(out, "msix interrupts ") >= 1,
        "completions arrive as MSI-X interrupts"
    );
    let data = std::fs::read(&img).unwrap();
    assert_eq!(
        &data[512..1024],
        &pattern()[..],
        "the write reached the file"
    );
    assert!(
        data[1024..1536].iter().all(|b| *b == 0),
        "write-zeroes reached the file"
    );
    assert!(
        data[1536..].iter().all(|b| *b == 0xaa),
        "nothing else changed"
    );
    assert!(data[..512].iter().all(|b| *b == 0xaa));
    std::fs::remove_file(&img).unwrap();
}

#[test]
fn virtio_blk_read_only_refuses_writes_and_leaves_the_file_alone() {
    let img = disk("blk-ro", 0xaa);
    let r = blk_run(&img, ",ro");
    assert_eq!(r.code(), 0, "{}\n{}", r.stdout, r.stderr);
    let out = &r.stdout;
    assert_ne!(
        value(out, "device features 31:0 ") & (1 << 5),
        0,
        "VIRTIO_BLK_F_RO offered"
    );
    assert_eq!(value(out, "write status "), 1, "IOERR");
    assert!(out.contains("compare mismatch"), "{out}");
    assert_eq!(value(out, "write zeroes status "), 2, "UNSUPP");
    assert!(std::fs::read(&img).unwrap().iter().all(|b| *b == 0xaa));
    std::fs::remove_file(&img).unwrap();
}

#[test]
fn virtio_blk_nocache_and_sector_size_options() {
    let img = disk("blk-direct", 0);
    let r = blk_run(&img, ",nocache,direct,sectorsize=4096");
    assert_eq!(r.code(), 0, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(value(&r.stdout, "blk_size "), 4096);
    assert!(r.stdout.contains("compare ok"), "{}", r.stdout);
    assert_eq!(&std::fs::read(&img).unwrap()[512..1024], &pattern()[..]);
    std::fs::remove_file(&img).unwrap();
}

#[test]
fn bad_virtio_blk_configurations_are_one_line_and_status_4() {
    require_kvm();
    let rom = format!("bootrom,{}", rom("null"));
    let img = disk("blk-bad", 0);
    let img_s = img.display().to_string();
    for (dev, want) in [
        (
            "4,virtio-blk,/nonexistent/disk.img".to_string(),
            "cannot open /nonexistent/disk.img",
        ),
        (
            format!("4,virtio-blk,{img_s},sectorsize=1000"),
            "sectorsize=1000",
        ),
        (
            format!("4,virtio-blk,{img_s},color=blue"),
            "no option 'color'",
        ),
        ("4,virtio-blk".to_string(), "needs a backing file"),
        (format!("4,virtio-blk,{img_s},ro=maybe"), "not a boolean"),
    ] {
        let r = run(&["-s", &dev, "-l", &rom, "vm"]);
        assert_eq!(r.code(), 4, "{dev}: {}", r.stderr);
        assert!(
            r.stderr.contains(want),
            "{dev}: want {want:?}: {}",
            r.stderr
        );
        assert_eq!(r.stderr.trim_end().lines().count(), 1, "{}", r.stderr);
    }
    std::fs::remove_file(&img).unwrap();
}

#[test]
fn virtio_net_carries_frames_both_ways_through_a_tap_in_a_private_netns() {
    require_kvm();
    let ns = Netns::new("net");
    let bootrom = format!("bootrom,{}", rom("virtio_net"));
    let child = ns.spawn_rhyve(&[
        "-s",
        "4,virtio-net,tap0,mac=52:54:00:12:34:56",
        "-l",
        "com1,stdio",
        "-l",
        &bootrom,
        "vm",
    ]);
    // rhyve creates tap0 inside the namespace; give it the host side's address there.
    ns.configure_tap("tap0", "10.77.0.1/24", std::time::Duration::from_secs(20));
    // The guest answers ARP only (no ICMP replies): ping just makes the host send an ARP
    // request and then, having learnt the guest's MAC from the reply, an echo request.
    let _ = ns.exec(&["ping", "-c", "3", "-i", "0.5", "-W", "1", "10.77.0.2"]);
    let r = wait_with_deadline(child, std::time::Duration::from_secs(60));
    assert_eq!(r.code(), 0, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(value(&r.stdout, "ids "), 0x1041_1af4);
    assert!(r.stdout.contains("mac 52:54:00:12:34:56"), "{}", r.stdout);
    assert!(r.stdout.contains("arp reply sent"), "{}", r.stdout);
    assert!(
        value(&r.stdout, "msix interrupts ") >= 1,
        "frames arrive with MSI-X interrupts"
    );
    assert!(
        r.stdout
            .contains("icmp echo request received, dst mac 52:54:00:12:34:56"),
        "the host used the MAC from the guest's reply: {}",
        r.stdout
    );
}

#[test]
fn bad_virtio_net_configurations_are_one_line_and_status_4() {
    require_kvm();
    let ns = Netns::new("netbad");
    let rom = format!("bootrom,{}", rom("null"));
    for (dev, want) in [
        (
            "4,virtio-net,/nonexistent/tap",
            "cannot open tap /nonexistent/tap",
        ),
        (
            "4,virtio-net,averyveryverylongtapname",
            "1 to 15 characters",
        ),
        (
            "4,virtio-net,tap0,mac=01:00:00:00:00:01",
            "not a unicast MAC",
        ),
        ("4,virtio-net,tap0,mtu=20", "mtu=20"),
        ("4,virtio-net", "needs a backend"),
    ] {
        let out = ns.exec(&[env!("CARGO_BIN_EXE_rhyve"), "-s", dev, "-l", &rom, "vm"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{dev}: {stderr}");
        assert!(stderr.contains(want), "{dev}: want {want:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    }
}

#[test]
fn virtio_console_names_its_ports_and_carries_bytes_over_a_unix_socket() {
    require_kvm();
    use std::io::{Read, Write};
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("vtcon-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (s0, s1) = (dir.join("p0.sock"), dir.join("p1.sock"));
    let dev = format!(
        "4,virtio-console,org.rhyve.test={},second={}",
        s0.display(),
        s1.display()
    );
    let bootrom = format!("bootrom,{}", rom("virtio_console"));
    let child = spawn(&["-s", &dev, "-l", "com1,stdio", "-l", &bootrom, "vm"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut conn = loop {
        if let Ok(c) = std::os::unix::net::UnixStream::connect(&s0) {
            break c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "port socket never appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    conn.write_all(b"ping from host").unwrap();
    conn.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !got.ends_with(b"ping from host") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let r = wait_with_deadline(child, std::time::Duration::from_secs(60));
    assert_eq!(r.code(), 0, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(
        got, b"pong: ping from host",
        "the guest's reply reached the socket"
    );
    let out = &r.stdout;
    assert_eq!(value(out, "ids "), 0x1043_1af4);
    assert_eq!(value(out, "max ports "), 2);
    for line in [
        "ctrl port 0 event 1 value 0",
        "ctrl port 1 event 1 value 0",
        "ctrl port 0 event 7 value 0 name org.rhyve.test",
        "ctrl port 1 event 7 value 0 name second",
        "ctrl port 0 event 6 value 1",
        "port 0 got: ping from host",
    ] {
        assert!(
            out.lines().any(|l| l == line),
            "missing {line:?} in:\n{out}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_virtio_console_configurations_are_one_line_and_status_4() {
    require_kvm();
    let rom = format!("bootrom,{}", rom("null"));
    let file = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("notasock-{}", std::process::id()));
    std::fs::write(&file, b"x").unwrap();
    let not_sock = format!("4,virtio-console,p={}", file.display());
    for (dev, want) in [
        ("4,virtio-console", "needs at least one port"),
        ("4,virtio-console,justaname", "is not NAME=/path/to/socket"),
        (
            "4,virtio-console,p=/nonexistent/dir/s.sock",
            "cannot listen on /nonexistent/dir/s.sock",
        ),
        (not_sock.as_str(), "is not a socket"),
    ] {
        let r = run(&["-s", dev, "-l", &rom, "vm"]);
        assert_eq!(r.code(), 4, "{dev}: {}", r.stderr);
        assert!(
            r.stderr.contains(want),
            "{dev}: want {want:?}: {}",
            r.stderr
        );
        assert_eq!(r.stderr.trim_end().lines().count(), 1, "{}", r.stderr);
    }
    std::fs::remove_file(&file).unwrap();
}

#[test]
fn a_bhyve_line_with_every_device_runs_and_the_guest_sees_ids_and_bar_sizes() {
    require_kvm();
    let ns = Netns::new("lspci");
    let img = disk("lspci", 0);
    let blk = format!("2,virtio-blk,{}", img.display());
    let bootrom = format!("bootrom,{}", rom("lspci"));
    let out = ns.exec(&[
        env!("CARGO_BIN_EXE_rhyve"),
        "-c",
        "2",
        "-m",
        "512M",
        "-s",
        "0,hostbridge",
        "-s",
        &blk,
        "-s",
        "3,virtio-net,tap0",
        "-s",
        "4,virtio-rnd",
        "-s",
        "31,lpc",
        "-l",
        "com1,stdio",
        "-l",
        &bootrom,
        "vm",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // IDs, class/revision, then the six BAR masks: virtio devices have one 32 KiB 64-bit BAR4.
    let virtio_bars = "00000000 00000000 00000000 00000000 ffff8004 ffffffff";
    let want = [
        "00:00.0 12751275 06000000 00000000 00000000 00000000 00000000 00000000 00000000"
            .to_string(),
        format!("00:02.0 10421af4 01800001 {virtio_bars}"),
        format!("00:03.0 10411af4 02000001 {virtio_bars}"),
        format!("00:04.0 10441af4 ff000001 {virtio_bars}"),
        "00:1f.0 70008086 06010000 00000000 00000000 00000000 00000000 00000000 00000000"
            .to_string(),
    ];
    let got: Vec<&str> = stdout.lines().collect();
    assert_eq!(got, want);
    std::fs::remove_file(&img).unwrap();
}
