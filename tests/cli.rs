//! The command-line contract through the real binary: help and lists exit 0, config.dump
//! prints the tree, and every user mistake is one line on stderr with status 4, never a panic.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn help_and_lists_exit_0() {
    let r = run(&["-h"]);
    assert_eq!(r.code(), 0);
    assert!(r.stdout.contains("Usage: rhyve"));
    let r = run(&["-s", "help"]);
    assert_eq!(r.code(), 0);
    assert!(
        r.stdout.contains("hostbridge") && r.stdout.contains("lpc"),
        "{}",
        r.stdout
    );
    let r = run(&["-l", "help"]);
    assert_eq!(r.code(), 0);
    assert!(
        r.stdout.contains("com1") && r.stdout.contains("bootrom"),
        "{}",
        r.stdout
    );
}

#[test]
fn config_dump_prints_the_tree_with_defaults_and_implied_devices() {
    let r = run(&[
        "-c",
        "sockets=2,cores=2",
        "-m",
        "1G",
        "-l",
        "com1,stdio",
        "-o",
        "config.dump=1",
        "-p",
        "3:1",
        "vm1",
    ]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    for line in [
        "cpus=4",
        "sockets=2",
        "cores=2",
        "threads=1",
        "memory.size=1G",
        "name=vm1",
        "lpc.com1.path=stdio",
        "pci.0.0.0.device=hostbridge",
        "pci.0.31.0.device=lpc",
        "vcpu.3.cpuset=1",
        "x86.strictmsr=true",
    ] {
        assert!(
            r.stdout.lines().any(|l| l == line),
            "missing {line}: {}",
            r.stdout
        );
    }
    // The dump reads back with -k and gives the same tree.
    let f = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("dump-{}.conf", std::process::id()));
    std::fs::write(&f, &r.stdout).unwrap();
    let again = run(&["-k", f.to_str().unwrap()]);
    assert_eq!(again.stdout, r.stdout);
    std::fs::remove_file(&f).unwrap();
}

#[test]
fn user_mistakes_are_one_line_and_status_4() {
    let cases: &[(&[&str], &str)] = &[
        (&["-Q", "vm"], "unknown option -Q"),
        (&["-m", "12X", "vm"], "not a memory size"),
        (&["-c", "3,sockets=2", "vm"], "topology"),
        (&["-o", "memory.sise=1G", "vm"], "unknown config key"),
        (&["-s", "40,hostbridge", "vm"], "slot"),
        (&["-s", "2,virtio-foo", "vm"], "unknown PCI emulation"),
        (&["-s", "0,hostbridge", "-s", "0,lpc", "vm"], "already used"),
        (&["-l", "com9,stdio", "vm"], "unknown LPC device"),
        (&["vm"], "nothing to boot"),
        (&[], "VM name is required"),
        (&["-c", "100000", "-l", "bootrom,/x", "vm"], "vCPUs"),
        (
            &["-G", "1234", "-l", "bootrom,/x", "vm"],
            "not supported yet",
        ),
        (&["-m", "1000K", "-l", "bootrom,/x", "vm"], "at least 1 MiB"),
    ];
    for (args, want) in cases {
        let r = run(args);
        assert_eq!(r.code(), 4, "{args:?}: {}", r.stderr);
        assert!(
            r.stderr.contains(want),
            "{args:?}: want {want:?} in {}",
            r.stderr
        );
        assert_eq!(
            r.stderr.trim_end().lines().count(),
            1,
            "{args:?}: {}",
            r.stderr
        );
        assert!(!r.stderr.contains("panicked"), "{args:?}");
    }
}

#[test]
fn missing_dev_kvm_is_a_clear_error() {
    // Hide /dev/kvm in a private mount namespace; rhyve must say what is wrong and exit 4.
    let bin = env!("CARGO_BIN_EXE_rhyve");
    let rom = rom("null");
    let script = format!("mount -t tmpfs none /dev && exec {bin} -l bootrom,{rom} vm");
    let out = std::process::Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .output()
        .expect("run unshare (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("cannot open /dev/kvm"), "{stderr}");
}

#[test]
fn bad_direct_boot_configurations_are_one_line_and_status_4() {
    require_kvm();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("kboot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk");
    std::fs::write(&junk, vec![0u8; 8192]).unwrap();
    let junk_k = format!("boot.kernel={}", junk.display());
    let rom = format!("bootrom,{}", rom("null"));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["-o", "boot.kernel=/nonexistent/vmlinuz", "vm"],
            "boot.kernel /nonexistent/vmlinuz",
        ),
        (
            vec!["-o", &junk_k, "vm"],
            "neither an ELF vmlinux nor a bzImage",
        ),
        (vec!["-o", &junk_k, "-l", &rom, "vm"], "not both"),
    ];
    for (args, want) in cases {
        let r = run(&args);
        assert_eq!(r.code(), 4, "{args:?}: {}", r.stderr);
        assert!(
            r.stderr.contains(want),
            "{args:?}: want {want:?}: {}",
            r.stderr
        );
        assert_eq!(r.stderr.trim_end().lines().count(), 1, "{}", r.stderr);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The bad-input list: every kind of wrong value a user can give (unknown options, missing
/// files, directories, truncated kernels and ROMs, absurd sizes, duplicate slots, bad device
/// options, bad config files) ends rhyve with one line on stderr naming the culprit, status 4,
/// no panic or backtrace, and no hang.
#[test]
fn the_bad_input_list_is_one_line_naming_the_culprit_and_status_4() {
    require_kvm();
    let tmp = common::api::Dir::new("badinput");
    let dir = tmp.0.clone();
    let p = |n: &str| tmp.path(n).display().to_string();
    let empty = p("empty.rom");
    std::fs::write(&empty, b"").unwrap();
    let odd = p("odd.rom");
    std::fs::write(&odd, vec![0x90u8; 1000]).unwrap();
    let huge = p("huge.rom");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    // A bzImage whose header says 30 setup sectors, cut off after 4 KiB.
    let mut bz = vec![0u8; 4096];
    bz[0x1F1] = 30;
    bz[0x1FE..0x200].copy_from_slice(&[0x55, 0xAA]);
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    let short_bz = p("short-bzImage");
    std::fs::write(&short_bz, &bz).unwrap();
    let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
    elf.resize(40, 0);
    let short_elf = p("short-vmlinux");
    std::fs::write(&short_elf, &elf).unwrap();
    let disk = p("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let badcfg = p("bad.conf");
    std::fs::write(&badcfg, "memory.size=1G\nthis line has no equals sign\n").unwrap();
    let unknown_cfg = p("unknown.conf");
    std::fs::write(&unknown_cfg, "memory.sise=1G\n").unwrap();
    let d = dir.display().to_string();
    let rom = rom("null");
    let boot = format!("bootrom,{rom}");
    let with_rom = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec!["-l".into(), boot.clone()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v.push("vm".into());
        v
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let cases: Vec<(Vec<String>, String)> = vec![
        // Options.
        (s(&["--no-such-option", "vm"]), "--no-such-option".into()),
        (s(&["-Z", "vm"]), "-Z".into()),
        (s(&["-c"]), "-c".into()),
        (s(&["-c", "0", "vm"]), "0".into()),
        (s(&["-c", "two", "vm"]), "two".into()),
        (
            s(&["-c", "2,sockets=3,cores=1,threads=1", "vm"]),
            "topology".into(),
        ),
        (s(&["-m", "-5", "vm"]), "-5".into()),
        (with_rom(&["-m", "100T"]), "memory".into()),
        (s(&["-p", "0:x", "vm"]), "0:x".into()),
        (s(&["-p", "9:0", "-l", &boot, "vm"]), "9".into()),
        (s(&["-o", "nokey", "vm"]), "nokey".into()),
        (s(&["-o", "x86.strictmsr=perhaps", "vm"]), "perhaps".into()),
        (
            s(&["-o", "sandbox.seccomp=maybe", "vm"]),
            "sandbox.seccomp".into(),
        ),
        (s(&["-o", "uuid=not-a-uuid", "vm"]), "not-a-uuid".into()),
        // Config files.
        (
            s(&["-k", "/nonexistent/rhyve.conf", "vm"]),
            "/nonexistent/rhyve.conf".into(),
        ),
        (s(&["-k", &d, "vm"]), d.clone()),
        (
            s(&["-k", &badcfg, "vm"]),
            "this line has no equals sign".into(),
        ),
        (s(&["-k", &unknown_cfg, "vm"]), "memory.sise".into()),
        // ROMs and kernels.
        (
            s(&["-l", "bootrom,/nonexistent/rom.fd", "vm"]),
            "/nonexistent/rom.fd".into(),
        ),
        (s(&["-l", &format!("bootrom,{d}"), "vm"]), d.clone()),
        (s(&["-l", &format!("bootrom,{empty}"), "vm"]), empty.clone()),
        (s(&["-l", &format!("bootrom,{odd}"), "vm"]), odd.clone()),
        (s(&["-l", &format!("bootrom,{huge}"), "vm"]), huge.clone()),
        (
            with_rom(&["-o", "boot.initrd=/nonexistent/initrd"]),
            "boot.initrd".into(),
        ),
        (
            s(&["-o", &format!("boot.kernel={short_bz}"), "vm"]),
            short_bz.clone(),
        ),
        (
            s(&["-o", &format!("boot.kernel={short_elf}"), "vm"]),
            short_elf.clone(),
        ),
        (s(&["-o", &format!("boot.kernel={d}"), "vm"]), d.clone()),
        // Devices.
        (
            with_rom(&["-s", "2,virtio-blk,/nonexistent/disk.img"]),
            "/nonexistent/disk.img".into(),
        ),
        (with_rom(&["-s", &format!("2,virtio-blk,{d}")]), d.clone()),
        (
            with_rom(&["-s", &format!("2,virtio-blk,{disk},sectorsize=3")]),
            "sectorsize".into(),
        ),
        (
            with_rom(&["-s", &format!("2,virtio-blk,{disk},frobnicate=1")]),
            "frobnicate".into(),
        ),
        (
            with_rom(&["-s", "2,virtio-rnd", "-s", "2,virtio-rnd"]),
            "2".into(),
        ),
        (with_rom(&["-s", "99,virtio-rnd"]), "99".into()),
        (with_rom(&["-s", "2:9,virtio-rnd"]), "2:9".into()),
        (
            with_rom(&["-s", "2,virtio-net,nosuchtap0,mac=zz"]),
            "mac".into(),
        ),
        // Below a plain file: no directory can be made there, even by root.
        (
            with_rom(&["-l", &format!("com1,{empty}/com1.log")]),
            format!("{empty}/com1.log"),
        ),
        (with_rom(&["-l", "com1,tcp=notaport"]), "notaport".into()),
        (
            with_rom(&["-l", "com1,stdio", "-l", "com2,stdio"]),
            "stdio".into(),
        ),
        // Snapshots and the API socket.
        (
            s(&["-r", "/nonexistent/snap", "vm"]),
            "/nonexistent/snap".into(),
        ),
        (
            s(&[
                "--api-socket",
                &format!("{empty}/api.sock"),
                "-l",
                &boot,
                "vm",
            ]),
            format!("{empty}/api.sock"),
        ),
    ];
    let mut bad = Vec::new();
    for (args, want) in &cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut c = rhyve();
        c.args(&a)
            .env("RUST_BACKTRACE", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let r = wait_with_deadline(c.spawn().expect("spawn rhyve"), Duration::from_secs(30));
        let err = r.stderr.trim_end();
        let ok = r.code() == 4
            && err.lines().count() == 1
            && err.contains(want.as_str())
            && !err.contains("panicked")
            && !err.contains("backtrace");
        if !ok {
            bad.push(format!(
                "{a:?} (want {want:?}): status {} stderr {err:?}",
                r.code()
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} cases:\n{}",
        bad.len(),
        cases.len(),
        bad.join("\n")
    );
}
