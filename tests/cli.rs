//! The command-line contract through the real binary: help and lists exit 0, config.dump
//! prints the tree, and every user mistake is one line on stderr with status 4, never a panic.

mod common;
use common::*;

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
