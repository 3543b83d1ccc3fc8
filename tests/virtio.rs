//! KVM tests of virtio devices, driven by small guest drivers in guests/rom.

mod common;
use common::*;

fn value(out: &str, label: &str) -> u32 {
    let line = out
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no '{label}' line in:\n{out}"));
    u32::from_str_radix(line[label.len()..].trim(), 16)
        .unwrap_or_else(|_| panic!("bad line {line}"))
}

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
    assert!(
        r.stderr.contains("outside guest memory"),
        "bad input is logged: {}",
        r.stderr
    );
}
