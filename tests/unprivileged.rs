//! rhyve run by a user with no privilege: only access to /dev/kvm, /dev/net/tun, its disk
//! image and a tap created for it beforehand; no capabilities (README.md, "Running without
//! root"). The test, as root, sets that up without changing the host: inside a network
//! namespace and a private mount namespace it makes its own /dev with just those device nodes,
//! owned by `nobody`, and runs rhyve as `nobody` with every capability dropped (setpriv).

mod common;
use common::*;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

const NOBODY: u32 = 65534;

/// `rhyve ARGS` as `nobody` without capabilities in namespace `ns`, with a /dev of its own
/// holding /dev/kvm, /dev/net/tun and /dev/null (same device numbers as the host's).
fn run_as_nobody(ns: &Netns, args: &[&str]) -> Run {
    let dev = |p: &str| {
        let rdev = std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{p}: {e}"))
            .rdev();
        (libc::major(rdev), libc::minor(rdev))
    };
    let (kvm, tun) = (dev("/dev/kvm"), dev("/dev/net/tun"));
    let script = format!(
        "set -e; mount -t tmpfs -o mode=755 rhyve-dev /dev; \
         mknod -m 600 /dev/kvm c {} {}; chown {NOBODY}:{NOBODY} /dev/kvm; \
         mkdir /dev/net; mknod -m 600 /dev/net/tun c {} {}; chown {NOBODY}:{NOBODY} /dev/net/tun; \
         mknod -m 666 /dev/null c 1 3; \
         exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups --inh-caps=-all \
         --bounding-set=-all -- \"$0\" \"$@\"",
        kvm.0, kvm.1, tun.0, tun.1
    );
    let child = std::process::Command::new("ip")
        .args([
            "netns", "exec", &ns.0, "unshare", "--mount", "sh", "-c", &script,
        ])
        .arg(env!("CARGO_BIN_EXE_rhyve"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run ip netns exec unshare setpriv");
    wait_with_deadline(child, Duration::from_secs(60))
}

/// A directory of this test's own that `nobody` may enter.
fn dir_for_nobody(tag: &str) -> common::api::Dir {
    let dir = common::api::Dir::new(tag);
    std::fs::set_permissions(dir.path(""), std::fs::Permissions::from_mode(0o755))
        .expect("chmod the directory");
    dir
}

/// A disk image `nobody` owns, in `dir`.
fn nobodys_disk(dir: &common::api::Dir) -> String {
    let img = dir.path("disk.img");
    std::fs::write(&img, vec![0xaau8; 1 << 20]).expect("write the image");
    std::os::unix::fs::chown(&img, Some(NOBODY), Some(NOBODY)).expect("chown the image");
    img.display().to_string()
}

#[test]
fn a_user_with_only_dev_kvm_its_image_and_a_tap_made_for_it_opens_the_tap_and_runs_virtio_blk() {
    require_kvm();
    let ns = Netns::new("nopriv");
    let uid = NOBODY.to_string();
    let out = ns.exec(&[
        "ip", "tuntap", "add", "dev", "rtap0", "mode", "tap", "user", &uid,
    ]);
    assert!(out.status.success(), "ip tuntap add: {out:?}");
    let dir = dir_for_nobody("nopriv");
    let img = nobodys_disk(&dir);
    let blk = format!("4,virtio-blk,{img}");
    let boot = format!("bootrom,{}", rom("virtio_blk"));
    let r = run_as_nobody(
        &ns,
        &[
            "-s",
            &blk,
            "-s",
            "5,virtio-net,rtap0",
            "-l",
            "com1,stdio",
            "-l",
            &boot,
            "vm",
        ],
    );
    assert_eq!(r.code(), 0, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("compare ok"), "{}", r.stdout);
    assert_eq!(value(&r.stdout, "write status "), 0, "{}", r.stdout);
    let data = std::fs::read(&img).expect("read the image back");
    assert_ne!(
        data.get(512..1024),
        Some(&[0xaau8; 512][..]),
        "the guest's write reached nobody's image"
    );
    // The seccomp filters were installed (no privilege needed: no_new_privs) and nothing in
    // the run fell outside them.
    assert!(!r.stderr.contains("seccomp"), "{}", r.stderr);
}

#[test]
fn what_needs_privilege_says_so_in_one_line() {
    require_kvm();
    let ns = Netns::new("nopriv-err");
    let dir = dir_for_nobody("nopriv-err");
    let boot = format!("bootrom,{}", rom("null"));
    // A tap nobody made for this user: creating one needs CAP_NET_ADMIN.
    let r = run_as_nobody(&ns, &["-s", "5,virtio-net,rtap9", "-l", &boot, "vm"]);
    assert_eq!(r.code(), 4, "{}", r.stderr);
    assert_eq!(r.stderr.trim_end().lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("rtap9") && r.stderr.contains("CAP_NET_ADMIN"),
        "{}",
        r.stderr
    );
    // An image this user may not write: the path and the reason.
    let root_img = dir.path("root.img");
    std::fs::write(&root_img, vec![0u8; 1 << 20]).expect("write");
    std::fs::set_permissions(&root_img, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let blk = format!("4,virtio-blk,{}", root_img.display());
    let r = run_as_nobody(&ns, &["-s", &blk, "-l", &boot, "vm"]);
    assert_eq!(r.code(), 4, "{}", r.stderr);
    assert_eq!(r.stderr.trim_end().lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains(&root_img.display().to_string()) && r.stderr.contains("ermission denied"),
        "{}",
        r.stderr
    );
}
