//! virtio-blk throughput against the host's own I/O on the same file, in one run:
//!
//! - guest: `guests/rom/blkbench.S` (64 MiB sequential write in 64 KiB requests + flush, then
//!   4096 random 4 KiB reads; batches of 8 indirect requests, one kick each), timed by the
//!   arrival of its "BENCH <phase> start/done" lines on COM1;
//! - host: the same writes (pwrite + fdatasync) and the same reads (pread, same LCG offsets)
//!   on the same file from this process;
//! - the device's own count of queue notifications per request (event suppression).
//!
//! Run: `cargo bench --bench blk` (needs /dev/kvm; the file lives under target/).

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SEQ_REQS: u64 = 1024;
const SEQ_LEN: u64 = 64 << 10;
const RND_REQS: u32 = 4096;
const RND_LEN: usize = 4096;
const SECTORS_4K: u32 = 16384;
const REPEAT: usize = 3;

fn build_guests(root: &Path) -> std::path::PathBuf {
    let out = root.join("target/bench-guests");
    let st = Command::new("sh")
        .arg(root.join("guests/build.sh"))
        .arg(&out)
        .status()
        .expect("run guests/build.sh");
    assert!(st.success());
    out
}

/// The guest's LCG (blkbench.S): 4 KiB-aligned byte offsets.
fn offsets() -> Vec<u64> {
    let mut x: u32 = 1;
    (0..RND_REQS)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            u64::from((x >> 8) & (SECTORS_4K - 1)) * 4096
        })
        .collect()
}

fn host(img: &Path) -> (Duration, Duration) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .expect("open image");
    let buf = vec![0u8; SEQ_LEN as usize];
    let t = Instant::now();
    for i in 0..SEQ_REQS {
        f.write_all_at(&buf, i * SEQ_LEN).expect("pwrite");
    }
    f.sync_data().expect("fdatasync");
    let seq = t.elapsed();
    let mut b = vec![0u8; RND_LEN];
    let offs = offsets();
    let t = Instant::now();
    for o in offs {
        f.read_exact_at(&mut b, o).expect("pread");
    }
    (seq, t.elapsed())
}

struct Guest {
    seq: Duration,
    rnd: Duration,
    requests: u64,
    notifies: u64,
}

fn guest(bin: &str, rom: &Path, img: &Path) -> Guest {
    let mut child = Command::new(bin)
        .arg("-v")
        .arg("-s")
        .arg(format!("4,virtio-blk,{}", img.display()))
        .args(["-l", "com1,stdio", "-l"])
        .arg(format!("bootrom,{}", rom.display()))
        .arg("bench")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run rhyve");
    let out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut marks = std::collections::HashMap::new();
    for line in out.lines() {
        let line = line.expect("read COM1");
        if let Some(m) = line.strip_prefix("BENCH ") {
            marks.insert(m.trim().to_string(), Instant::now());
        }
    }
    let outp = child.wait_with_output().expect("wait rhyve");
    assert!(outp.status.success(), "rhyve: {:?}", outp.status);
    let err = String::from_utf8_lossy(&outp.stderr);
    let stat = err
        .lines()
        .find(|l| l.contains("queue notifications"))
        .unwrap_or_else(|| panic!("no device stats in: {err}"));
    let nums: Vec<u64> = stat
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .take(2)
        .map(|s| s.parse().unwrap_or(0))
        .collect();
    let span = |p: &str| marks[&format!("{p} done")] - marks[&format!("{p} start")];
    Guest {
        seq: span("seqwrite"),
        rnd: span("randread"),
        requests: nums[0],
        notifies: nums[1],
    }
}

fn mbps(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e6
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rom = build_guests(root).join("blkbench.rom");
    let img = root.join("target/bench-blk.img");
    std::fs::write(&img, vec![0u8; (SEQ_REQS * SEQ_LEN) as usize]).expect("create image");
    let bin = env!("CARGO_BIN_EXE_rhyve");
    let (mut hs, mut hr, mut gs, mut gr) =
        (Duration::MAX, Duration::MAX, Duration::MAX, Duration::MAX);
    let mut last = None;
    for _ in 0..REPEAT {
        let (s, r) = host(&img);
        hs = hs.min(s);
        hr = hr.min(r);
        let g = guest(bin, &rom, &img);
        gs = gs.min(g.seq);
        gr = gr.min(g.rnd);
        last = Some(g);
    }
    let seq_bytes = SEQ_REQS * SEQ_LEN;
    println!("== virtio-blk vs host I/O on the same file (best of {REPEAT})");
    println!(
        "sequential write 64 MiB, 64 KiB requests + flush: guest {:8.1} MB/s  host {:8.1} MB/s  ratio {:5.2}x (target >= 0.5x)",
        mbps(seq_bytes, gs),
        mbps(seq_bytes, hs),
        hs.as_secs_f64() / gs.as_secs_f64()
    );
    println!(
        "random read 4 KiB x {RND_REQS}:                     guest {:8.0} IOPS  host {:8.0} IOPS  ratio {:5.2}x",
        f64::from(RND_REQS) / gr.as_secs_f64(),
        f64::from(RND_REQS) / hr.as_secs_f64(),
        hr.as_secs_f64() / gr.as_secs_f64()
    );
    if let Some(g) = last {
        println!(
            "queue notifications per request: {:.3} ({} notifications / {} requests; target well under 1)",
            g.notifies as f64 / g.requests.max(1) as f64,
            g.notifies,
            g.requests
        );
    }
    let _ = std::fs::remove_file(&img);
}
