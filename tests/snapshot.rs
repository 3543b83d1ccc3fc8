//! Snapshot and restore (docs/snapshot.md): a ROM guest that counts on COM1 is snapshotted
//! over the API, restored in a new process (`rhyve -r`, and `vm.restore`), and counts on
//! without a gap or a repeat; bad snapshots are one line and status 4.

mod common;
use common::api::*;
use common::*;

use std::path::Path;
use std::time::Duration;

use serde_json::json;

/// Runs the ticker with the API and COM1 on `com1`, lets it count, pauses it and snapshots it
/// into `snap`; returns the console up to the snapshot. rhyve is then shut down.
fn ticker_snapshot(d: &Dir, snap: &Path, com1: &Path) -> String {
    let sock = d.path("a.sock");
    let com = format!("com1,{}", com1.display());
    let s = sock.to_str().expect("utf-8");
    let mut child = spawn_rom_with_com("ticker", &com, &["--api-socket", s, "-s", "4,virtio-rnd"]);
    wait_for_api(&sock, &mut child);
    wait_ticks(com1, 5);
    let url = json!({"destination_url": format!("file://{}", snap.display())});
    let (code, e) = curl(&sock, "PUT", "vm.snapshot", Some(&url));
    assert_eq!(code, 405, "a running VM is not snapshotted: {e}");
    assert_eq!(put(&sock, "vm.pause"), 204);
    let (code, e) = curl(&sock, "PUT", "vm.snapshot", Some(&url));
    assert_eq!(code, 204, "{e}");
    let before = std::fs::read_to_string(com1).expect("console");
    // Into a directory of other files: refused.
    let other = json!({"destination_url": format!("file://{}", d.0.display())});
    assert_eq!(curl(&sock, "PUT", "vm.snapshot", Some(&other)).0, 400);
    assert_eq!(put(&sock, "vm.shutdown"), 204);
    let r = wait_with_deadline(child, Duration::from_secs(30));
    assert_eq!(r.code(), 1, "{}", r.stderr);
    before
}

#[test]
fn a_snapshot_restored_by_dash_r_counts_on_without_a_gap_or_a_repeat() {
    let d = Dir::new("snap-r");
    let (snap, a, b) = (d.path("snap"), d.path("a.txt"), d.path("b.txt"));
    let before = ticker_snapshot(&d, &snap, &a);
    // Sparse: 256 MiB of guest RAM, a few pages of it written.
    let blocks = std::fs::metadata(snap.join("memory"))
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .unwrap_or(u64::MAX);
    assert!(blocks < 4 << 20, "memory file uses {blocks} bytes on disk");
    // A new process, COM1 to a new file.
    let com = format!("com1,{}", b.display());
    let snap_s = snap.to_str().expect("utf-8");
    let child = spawn(&["-v", "-r", snap_s, "-l", &com, "snapvm"]);
    let after = wait_ticks(&b, 5);
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let r = wait_with_deadline(child, Duration::from_secs(30));
    assert!(r.stderr.contains("restored"), "{}", r.stderr);
    // The line cut by the pause goes on in the new file: together they count 1, 2, 3, ...
    let all = ticks(&format!("{before}{after}"));
    assert!(
        all.len() >= ticks(&before).len() + 3,
        "{before}\n---\n{after}"
    );
    assert!(consecutive_from_one(&all), "a gap or a repeat: {all:?}");
}

#[test]
fn vm_restore_over_the_api_brings_the_guest_back_paused_or_running() {
    let d = Dir::new("snap-api");
    let (snap, a) = (d.path("snap"), d.path("a.txt"));
    let before = ticker_snapshot(&d, &snap, &a);
    let sock = d.path("b.sock");
    let child = spawn_api_only(&sock, &[]);
    let bad = json!({"source_url": format!("file://{}", d.0.display())});
    assert_eq!(
        curl(&sock, "PUT", "vm.restore", Some(&bad)).0,
        400,
        "not a snapshot"
    );
    let url = json!({"source_url": format!("file://{}", snap.display())});
    assert_eq!(curl(&sock, "PUT", "vm.restore", Some(&url)).0, 204);
    assert_eq!(get(&sock, "vm.info").1["state"], "Paused");
    assert_eq!(
        curl(&sock, "PUT", "vm.restore", Some(&url)).0,
        409,
        "a VM is there"
    );
    // The snapshot's COM1 file is written again from where the guest was.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        ticks(&std::fs::read_to_string(&a).unwrap_or_default()).is_empty(),
        "paused"
    );
    assert_eq!(put(&sock, "vm.resume"), 204);
    let after = wait_ticks(&a, 3);
    let all = ticks(&format!("{before}{after}"));
    assert!(consecutive_from_one(&all), "a gap or a repeat: {all:?}");
    assert_eq!(put(&sock, "vmm.shutdown"), 204);
    assert_eq!(wait_with_deadline(child, Duration::from_secs(30)).code(), 0);
}

#[test]
fn bad_snapshots_are_one_line_and_status_4() {
    let d = Dir::new("snap-bad");
    let (snap, a) = (d.path("snap"), d.path("a.txt"));
    ticker_snapshot(&d, &snap, &a);
    let restore = |dir: &Path| {
        let s = dir.to_str().expect("utf-8").to_string();
        let com = format!("com1,{}", d.path("x.txt").display());
        let r = run(&["-r", &s, "-l", &com, "snapvm"]);
        (r.code(), r.stderr)
    };
    let copy = |name: &str| {
        let c = d.path(name);
        std::fs::create_dir_all(&c).expect("dir");
        for f in [
            "manifest.json",
            "memory",
            "vcpus.json",
            "devices.json",
            "platform.json",
        ] {
            std::fs::copy(snap.join(f), c.join(f)).expect("copy");
        }
        c
    };
    // A manifest from a future format.
    let future = copy("future");
    let m = std::fs::read_to_string(future.join("manifest.json")).expect("manifest");
    std::fs::write(
        future.join("manifest.json"),
        m.replace("\"format\":1", "\"format\":2"),
    )
    .expect("write");
    let (code, err) = restore(&future);
    assert_eq!(code, 4);
    assert!(
        err.contains("snapshot format 2 is not this rhyve's"),
        "{err}"
    );
    // A truncated memory file.
    let short = copy("short");
    std::fs::OpenOptions::new()
        .write(true)
        .open(short.join("memory"))
        .and_then(|f| f.set_len(1 << 20))
        .expect("truncate");
    let (code, err) = restore(&short);
    assert_eq!(code, 4);
    assert!(err.contains("damaged or truncated"), "{err}");
    // No manifest at all; a damaged vCPU file.
    let (code, err) = restore(&d.path("nothing"));
    assert_eq!(code, 4);
    assert!(err.contains("manifest.json"), "{err}");
    let broken = copy("broken");
    std::fs::write(broken.join("vcpus.json"), b"{not json").expect("write");
    let (code, err) = restore(&broken);
    assert_eq!(code, 4);
    assert!(err.contains("vcpus.json"), "{err}");
    // -c or -m with -r: the snapshot decides.
    let s = snap.to_str().expect("utf-8");
    let r = run(&["-r", s, "-m", "512M", "snapvm"]);
    assert_eq!(r.code(), 4);
    assert!(r.stderr.contains("leave out -c and -m"), "{}", r.stderr);
    // A disk the snapshot's VM had is gone.
    let disk = d.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    let sock = d.path("c.sock");
    let s = sock.to_str().expect("utf-8");
    let blk = format!("3,virtio-blk,{}", disk.display());
    let com = format!("com1,{}", d.path("c.txt").display());
    let mut child = spawn_rom_with_com("ticker", &com, &["--api-socket", s, "-s", &blk]);
    wait_for_api(&sock, &mut child);
    assert_eq!(put(&sock, "vm.pause"), 204);
    let with_disk = d.path("with-disk");
    let url = json!({"destination_url": format!("file://{}", with_disk.display())});
    assert_eq!(curl(&sock, "PUT", "vm.snapshot", Some(&url)).0, 204);
    assert_eq!(put(&sock, "vm.shutdown"), 204);
    wait_with_deadline(child, Duration::from_secs(30));
    // Unchanged, the disk's VM restores (and is stopped by SIGTERM, status 1).
    {
        let s = with_disk.to_str().expect("utf-8");
        let com = format!("com1,{}", d.path("z.txt").display());
        let child = spawn(&["-v", "-r", s, "-l", &com, "snapvm"]);
        let mut g = LinuxGuest::new("disk", child);
        std::thread::sleep(Duration::from_secs(1));
        assert!(
            g.is_running(),
            "the restore with its disk ended: {}",
            g.console
        );
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(g.pid(), libc::SIGTERM) };
        let r = g.finish();
        assert!(r.stderr.contains("restored"), "{}", r.stderr);
    }
    // The disk written to since the snapshot: its guest would read other data than it wrote.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&disk, vec![1u8; 1 << 20]).expect("rewrite disk");
    let (code, err) = restore(&with_disk);
    assert_eq!(code, 4);
    assert!(err.contains("changed since the snapshot"), "{err}");
    // A copy of another size in its place (`-s` with a new path): refused too.
    let other = d.path("other.img");
    std::fs::write(&other, vec![0u8; 2 << 20]).expect("other disk");
    let s = with_disk.to_str().expect("utf-8");
    let blk = format!("3,virtio-blk,{}", other.display());
    let com = format!("com1,{}", d.path("y.txt").display());
    let r = run(&["-r", s, "-s", &blk, "-l", &com, "snapvm"]);
    assert_eq!(r.code(), 4);
    assert!(
        r.stderr.contains("give a copy of that disk"),
        "{}",
        r.stderr
    );
    std::fs::remove_file(&disk).expect("rm disk");
    let (code, err) = restore(&with_disk);
    assert_eq!(code, 4);
    assert!(err.contains("disk.img"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}
