//! The control API (README.md, "Control API"): cloud-hypervisor's endpoints from curl over the
//! unix socket against ROM guests, bad requests of every kind, and clients that misbehave.

mod common;
use common::api::*;
use common::*;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The ticker's console lines so far, read until `n` more ticks came or `wait` passed.
fn more_ticks(g: &mut LinuxGuest, n: usize, wait: Duration) -> Vec<u32> {
    let before = ticks(&g.console).len();
    let deadline = Instant::now() + wait;
    while ticks(&g.console).len() < before + n && Instant::now() < deadline {
        g.stall = Duration::from_millis(200);
        g.wait_for("tick ");
    }
    ticks(&g.console)
}

#[test]
fn help_and_version_are_long_options_and_unknown_ones_are_refused() {
    let r = run(&["--help"]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(r.stdout.contains("--api-socket PATH"), "{}", r.stdout);
    let r = run(&["--version"]);
    assert_eq!(r.code(), 0);
    assert_eq!(
        r.stdout.trim(),
        format!("rhyve {}", env!("CARGO_PKG_VERSION"))
    );
    let r = run(&["--frobnicate", "vm"]);
    assert_eq!(r.code(), 4);
    assert!(
        r.stderr.contains("unknown option --frobnicate"),
        "{}",
        r.stderr
    );
    let r = run(&["--api-socket"]);
    assert_eq!(r.code(), 4);
    assert!(
        r.stderr.contains("--api-socket needs an argument"),
        "{}",
        r.stderr
    );
    // Only the API may come without a VM name; VM options need one.
    let r = run(&["--api-socket", "/tmp/x.sock", "-m", "64M"]);
    assert_eq!(r.code(), 4);
    assert!(r.stderr.contains("VM name is required"), "{}", r.stderr);
    let r = run(&["--api"]);
    assert_eq!(r.code(), 4);
    // --api puts the socket under /run/rhyve by the VM's name (config.dump shows it).
    let r = run(&[
        "--api",
        "-o",
        "config.dump=true",
        "-l",
        "bootrom,/x",
        "apiname",
    ]);
    assert!(
        r.stdout.contains("api.socket=/run/rhyve/apiname.sock"),
        "{}",
        r.stdout
    );
}

/// A VM from the command line, driven over the API: info, pause (the guest stops printing),
/// resume (it goes on from the next number), exit statistics, reboot (it starts over),
/// power-button (refused: the ROM has no ACPI), shutdown (rhyve ends with bhyve's status 1).
#[test]
fn a_command_line_vm_answers_every_endpoint_from_curl() {
    require_kvm();
    let sock = socket("cli");
    let s = sock.to_str().expect("utf-8 path");
    let mut child = spawn_rom("ticker", &["--api-socket", s, "-s", "4,virtio-rnd"]);
    wait_for_api(&sock, &mut child);
    let mut g = LinuxGuest::new("api", child);
    let (code, ping) = get(&sock, "vmm.ping");
    assert_eq!(code, 200);
    assert_eq!(ping["pid"], g.pid());
    assert_eq!(ping["version"], env!("CARGO_PKG_VERSION"));
    let t = more_ticks(&mut g, 3, Duration::from_secs(30));
    assert!(t.len() >= 3, "{}", g.console);

    let (code, info) = get(&sock, "vm.info");
    assert_eq!(code, 200);
    assert_eq!(info["state"], "Running");
    assert!(
        info["config"]["payload"]["firmware"]
            .as_str()
            .unwrap_or("")
            .ends_with("ticker.rom"),
        "{info}"
    );
    assert_eq!(info["config"]["rng"]["id"], "_rng0");
    assert_eq!(info["memory_actual_size"], 256u64 << 20);

    assert_eq!(put(&sock, "vm.pause"), 204);
    assert_eq!(get(&sock, "vm.info").1["state"], "Paused");
    assert_eq!(put(&sock, "vm.pause"), 405, "pausing a paused VM");
    assert_eq!(put(&sock, "vm.power-button"), 405, "a paused VM");
    let frozen = more_ticks(&mut g, 1, Duration::from_millis(1500));
    let at_pause = frozen.len();
    std::thread::sleep(Duration::from_millis(1000));
    let frozen = more_ticks(&mut g, 1, Duration::from_millis(500));
    assert_eq!(frozen.len(), at_pause, "ticks while paused: {}", g.console);
    assert_eq!(put(&sock, "vm.resume"), 204);
    assert_eq!(put(&sock, "vm.resume"), 405, "resuming a running VM");
    let after = more_ticks(&mut g, 3, Duration::from_secs(30));
    assert!(
        after.len() >= at_pause + 3,
        "no ticks after resume: {}",
        g.console
    );
    assert!(
        after.windows(2).all(|w| w[1] == w[0] + 1),
        "ticks lost or repeated across pause/resume: {after:?}"
    );

    let (code, st) = get(&sock, "vm.exit-stats");
    assert_eq!(code, 200);
    let io = &st["vcpus"][0]["kinds"]["IO"];
    assert!(io["count"].as_u64().unwrap_or(0) > 0, "{st}");
    let buckets: u64 = io["buckets"]
        .as_array()
        .expect("buckets")
        .iter()
        .filter_map(Value::as_u64)
        .sum();
    assert_eq!(
        Some(buckets),
        io["count"].as_u64(),
        "every exit is in one bucket: {st}"
    );
    assert_eq!(st["bucket_upper_ns"].as_array().map(Vec::len), Some(23));
    let (code, counters) = get(&sock, "vm.counters");
    assert_eq!(code, 200);
    assert_eq!(
        counters["_rng0"]["bytes"], 0,
        "the ticker never reads randomness: {counters}"
    );

    assert_eq!(
        put(&sock, "vm.power-button"),
        409,
        "no ACPI in the ticker ROM"
    );
    assert_eq!(put(&sock, "vm.reboot"), 204);
    let seen = ticks(&g.console).len();
    let restarted = more_ticks(&mut g, 2, Duration::from_secs(30));
    assert_eq!(
        restarted.get(seen),
        Some(&1),
        "the rebooted guest starts over: {restarted:?}"
    );
    assert_eq!(put(&sock, "vm.create"), 400, "vm.create without a body");
    let (code, _) = curl(
        &sock,
        "PUT",
        "vm.create",
        Some(&json!({"payload": {"firmware": "/x"}})),
    );
    assert_eq!(code, 409, "a VM is already created");
    assert_eq!(put(&sock, "vm.boot"), 409, "already booted");
    assert_eq!(put(&sock, "vm.shutdown"), 204);
    let r = g.finish();
    assert_eq!(
        r.code(),
        1,
        "powered off over the API: bhyve's status 1\n{}",
        r.stderr
    );
    assert!(!sock.exists(), "rhyve removes its socket");
}

/// `rhyve --api-socket PATH` alone waits for its VM: create (refused fields named), boot,
/// shutdown (the VMM stays), boot again, delete, and vmm.shutdown (status 0). A guest reset
/// reboots an API VM in place: the virtio-rnd ROM resets after each run and runs again. The
/// device's counters show a guest's requests (read while its ROM idles: a rebooting VM's
/// counters start again at every boot, and the short window in which they show both
/// requests was missed by 20 ms polls in a run of 60 s).
#[test]
fn an_api_only_rhyve_is_given_its_vm_over_the_api() {
    require_kvm();
    let sock = socket("only");
    let dir = std::env::temp_dir().join(format!("rhyve-api-only-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (d0, d1, out) = (dir.join("d0.img"), dir.join("d1.img"), dir.join("com1.txt"));
    for d in [&d0, &d1] {
        std::fs::write(d, vec![0u8; 1 << 20]).expect("disk image");
    }
    let mut child = spawn_api_only(&sock, &["-v"]);
    assert_eq!(get(&sock, "vm.info").0, 404);
    assert_eq!(put(&sock, "vm.boot"), 404);
    assert_eq!(put(&sock, "vm.pause"), 404);
    let mut cfg = json!({
        "payload": {"firmware": rom("virtio_rnd_stay")},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 128u64 << 20},
        // Two disks take slots 2 and 3, so virtio-rnd lands at 0:4.0, where the ROM looks.
        "disks": [{"path": d0}, {"path": d1, "readonly": true}],
        "rng": {"src": "/dev/urandom"},
        "serial": {"mode": "File", "file": out},
    });
    cfg["memory"]["hugepages"] = json!(true);
    let (code, e) = curl(&sock, "PUT", "vm.create", Some(&cfg));
    assert_eq!(code, 400);
    assert!(
        e["error"]
            .as_str()
            .unwrap_or("")
            .contains("memory.hugepages"),
        "{e}"
    );
    cfg["memory"]["hugepages"] = json!(false);
    assert_eq!(curl(&sock, "PUT", "vm.create", Some(&cfg)).0, 204);
    let (code, info) = get(&sock, "vm.info");
    assert_eq!((code, info["state"].as_str()), (200, Some("Created")));
    assert_eq!(get(&sock, "vm.exit-stats").0, 404, "not booted");
    assert_eq!(put(&sock, "vm.pause"), 405, "not booted");
    assert_eq!(put(&sock, "vm.boot"), 204);
    assert_eq!(get(&sock, "vm.info").1["state"], "Running");
    // This ROM idles when done: its device's counters show its requests (the two good ones,
    // then the bad ones).
    let deadline = Instant::now() + Duration::from_secs(60);
    let rng = loop {
        let (_, c) = get(&sock, "vm.counters");
        if c["_rng0"]["requests"].as_u64().unwrap_or(0) >= 2 || Instant::now() > deadline {
            break c;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(rng["_rng0"]["requests"].as_u64().unwrap_or(0) >= 2, "{rng}");
    assert!(rng["_rng0"]["bytes"].as_u64().unwrap_or(0) >= 16, "{rng}");
    assert_eq!(rng["_disk0"]["read_ops"], 0, "{rng}");
    assert!(rng["_disk1"].is_object(), "{rng}");
    assert_eq!(put(&sock, "vm.shutdown"), 204);
    assert_eq!(put(&sock, "vm.delete"), 204);
    // This one resets when it is done: the VM reboots in place and runs it again (rhyve -v
    // says so each time), still there, still Running.
    cfg["payload"]["firmware"] = json!(rom("virtio_rnd"));
    assert_eq!(curl(&sock, "PUT", "vm.create", Some(&cfg)).0, 204);
    assert_eq!(put(&sock, "vm.boot"), 204);
    let deadline = Instant::now() + Duration::from_secs(60);
    while take_stderr(&mut child).matches("guest reset").count() < 3 {
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "rhyve ended ({st}) on a guest reset: {}",
                take_stderr(&mut child)
            );
        }
        assert!(
            Instant::now() < deadline,
            "fewer than 3 guest resets in 60 s: {}",
            take_stderr(&mut child)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(get(&sock, "vm.info").1["state"], "Running");
    assert_eq!(put(&sock, "vm.shutdown"), 204);
    assert_eq!(get(&sock, "vm.info").1["state"], "Shutdown");
    assert_eq!(put(&sock, "vm.shutdown"), 405, "not running");
    assert_eq!(put(&sock, "vm.boot"), 204, "a shut-down VM boots again");
    assert_eq!(get(&sock, "vm.info").1["state"], "Running");
    assert_eq!(put(&sock, "vm.delete"), 204);
    assert_eq!(get(&sock, "vm.info").0, 404);
    assert_eq!(put(&sock, "vmm.shutdown"), 204);
    let r = wait_with_deadline(child, Duration::from_secs(30));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(r.stderr.contains("guest reset"), "{}", r.stderr);
    assert!(!sock.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// vm.power-button reaches a guest that enabled ACPI: the pwrbtn ROM sees it and powers off.
#[test]
fn the_power_button_over_the_api_shuts_an_acpi_guest_down() {
    require_kvm();
    let sock = socket("pwrbtn");
    let s = sock.to_str().expect("utf-8 path");
    let mut child = spawn_rom("pwrbtn", &["--api-socket", s]);
    wait_for_api(&sock, &mut child);
    let mut g = LinuxGuest::new("pwrbtn", child);
    assert!(
        g.wait_for("waiting for the power button").is_some(),
        "{}",
        g.console
    );
    assert_eq!(put(&sock, "vm.power-button"), 204);
    let r = g.finish();
    assert!(g.console.contains("power button pressed"), "{}", g.console);
    assert_eq!(r.code(), 1, "{}", r.stderr);
}

/// Malformed HTTP, wrong methods and paths, huge heads and bodies, chunked bodies, clients
/// that stall or vanish mid-request, and more clients than the server takes: each gets its
/// status and a JSON error; the guest keeps running and the API keeps answering.
#[test]
fn bad_requests_get_their_status_and_bad_clients_disturb_nothing() {
    require_kvm();
    let sock = socket("bad");
    let s = sock.to_str().expect("utf-8 path");
    let mut child = spawn_rom("ticker", &["--api-socket", s]);
    wait_for_api(&sock, &mut child);
    let mut g = LinuxGuest::new("bad", child);

    for (req, want) in [
        (&b"garbage\r\n\r\n"[..], 400),
        (b"GET /api/v1/vm.info HTTP/9.9\r\n\r\n", 505),
        (b"GET /api/v1/vm.nothing HTTP/1.1\r\n\r\n", 404),
        (b"GET /elsewhere HTTP/1.1\r\n\r\n", 404),
        (
            b"POST /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            405,
        ),
        (
            b"PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            411,
        ),
        (
            b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 9999999\r\n\r\n",
            413,
        ),
        (
            b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 5\r\n\r\n{nope",
            400,
        ),
        (
            b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 9\r\n\r\n{\"a\": 1}\n",
            400,
        ),
        (
            b"GET /api/v1/vm.info HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            400,
        ),
    ] {
        let resp = raw(&sock, req);
        assert_eq!(
            status_of(&resp),
            want,
            "{}: {resp}",
            String::from_utf8_lossy(req)
        );
        assert!(json_body(&resp)["error"].is_string(), "{resp}");
    }
    let resp = raw(&sock, b"GET /api/v1/vm.pause HTTP/1.1\r\n\r\n");
    assert!(resp.contains("Allow: PUT\r\n"), "{resp}");
    let mut huge = b"GET /api/v1/vmm.ping HTTP/1.1\r\nX-Filler: ".to_vec();
    huge.resize(64 << 10, b'a');
    assert_eq!(status_of(&raw(&sock, &huge)), 431);
    // Two requests on one connection are answered in order (keep-alive, pipelined).
    let resp = raw(
        &sock,
        b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\nGET /api/v1/vm.info HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(resp.matches("HTTP/1.1 200 OK").count(), 2, "{resp}");

    // A client that stalls half-way and one that leaves mid-request hold nobody up.
    let mut stalled = UnixStream::connect(&sock).expect("connect");
    stalled
        .write_all(b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
        .expect("write");
    {
        let mut gone = UnixStream::connect(&sock).expect("connect");
        gone.write_all(b"GET /api/v1/vm.in").expect("write");
    }
    // Many clients at once: each is answered (200) or turned away (503), none hangs.
    let clients: Vec<_> = (0..80)
        .map(|_| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                status_of(&raw(
                    &sock,
                    b"GET /api/v1/vmm.ping HTTP/1.1\r\nConnection: close\r\n\r\n",
                ))
            })
        })
        .collect();
    let codes: Vec<u16> = clients
        .into_iter()
        .map(|c| c.join().expect("client"))
        .collect();
    assert!(codes.iter().all(|c| *c == 200 || *c == 503), "{codes:?}");
    assert!(
        codes.iter().filter(|c| **c == 200).count() >= 40,
        "{codes:?}"
    );
    assert_eq!(get(&sock, "vmm.ping").0, 200);
    // The stalled client is let go after 10 s of silence with a 408.
    stalled
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut out = String::new();
    let _ = stalled.read_to_string(&mut out);
    assert_eq!(status_of(&out), 408, "{out}");
    // The guest ran on through all of it.
    let before = ticks(&g.console).len();
    let after = more_ticks(&mut g, 3, Duration::from_secs(30));
    assert!(after.len() >= before + 3, "{}", g.console);
    assert_eq!(put(&sock, "vm.shutdown"), 204);
    assert_eq!(g.finish().code(), 1);
}

/// `-o debug.timeline=PATH` records a boot's steps in order, and scripts/boot-timeline.py
/// draws them as an SVG.
#[test]
fn the_boot_timeline_records_each_step_and_draws_as_svg() {
    require_kvm();
    let path = std::env::temp_dir().join(format!("rhyve-timeline-{}.txt", std::process::id()));
    let opt = format!("debug.timeline={}", path.display());
    let r = run_rom("virtio_rnd", &["-s", "4,virtio-rnd", "-o", &opt]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let text = std::fs::read_to_string(&path).expect("timeline written");
    let events: Vec<(f64, String)> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (ms, name) = l.split_once(' ')?;
            Some((ms.parse().ok()?, name.to_string()))
        })
        .collect();
    let names: Vec<&str> = events.iter().map(|(_, n)| n.as_str()).collect();
    let want = [
        "exec",
        "vm created",
        "vcpu 0: first KVM_RUN",
        "console: first byte",
        "virtio-rnd: DRIVER_OK",
        "vm stopped: Reset",
    ];
    let mut at = 0;
    for w in want {
        at += names[at..]
            .iter()
            .position(|n| *n == w)
            .unwrap_or_else(|| panic!("no '{w}' after {:?} in:\n{text}", &names[..at]));
    }
    assert!(
        events.windows(2).all(|w| w[0].0 <= w[1].0),
        "times go forward: {text}"
    );
    let svg = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/boot-timeline.py"
        ))
        .arg(&path)
        .output()
        .expect("python3");
    let out = String::from_utf8_lossy(&svg.stdout);
    assert!(
        svg.status.success(),
        "{}",
        String::from_utf8_lossy(&svg.stderr)
    );
    assert!(
        out.starts_with("<svg") && out.trim_end().ends_with("</svg>"),
        "{out}"
    );
    assert!(out.contains("virtio-rnd: DRIVER_OK"), "{out}");
    let _ = std::fs::remove_file(&path);
}

/// schemathesis (scripts/api-check.sh), an independent client, checks the live server
/// against docs/api/openapi.yaml: no 5xx, every response as documented, no hang; a ROM guest
/// runs under the API meanwhile, and rhyve is still there and answering afterwards.
#[test]
fn schemathesis_finds_the_server_as_its_openapi_document_says() {
    require_kvm();
    let sock = socket("schemathesis");
    let out = std::env::temp_dir().join(format!("rhyve-api-st-{}.txt", std::process::id()));
    let mut child = spawn_api_only(&sock, &[]);
    let cfg =
        json!({"payload": {"firmware": rom("ticker")}, "serial": {"mode": "File", "file": out}});
    assert_eq!(curl(&sock, "PUT", "vm.create", Some(&cfg)).0, 204);
    assert_eq!(put(&sock, "vm.boot"), 204);
    let check = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/api-check.sh"))
        .arg(&sock)
        .output()
        .expect("scripts/api-check.sh");
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        check.status.success(),
        "schemathesis found problems:\n{report}"
    );
    assert!(report.contains("passed"), "{report}");
    if let Ok(Some(st)) = child.try_wait() {
        panic!("rhyve ended ({st}) under schemathesis:\n{report}");
    }
    assert_eq!(get(&sock, "vmm.ping").0, 200);
    assert_eq!(put(&sock, "vmm.shutdown"), 204);
    let r = wait_with_deadline(child, Duration::from_secs(30));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let _ = std::fs::remove_file(&out);
}

/// `rhyvectl`, built beside rhyve (`cargo build -p rhyvectl`; the test command builds the
/// whole workspace first).
fn rhyvectl() -> Command {
    let rhyve = Path::new(env!("CARGO_BIN_EXE_rhyve"));
    let ctl = rhyve.with_file_name("rhyvectl");
    assert!(
        ctl.exists(),
        "{} is missing: build it with cargo build -p rhyvectl",
        ctl.display()
    );
    Command::new(ctl)
}

/// rhyvectl against a live rhyve: ping, pause and resume, stats, a watch of two samples, and
/// a forced power-off that ends rhyve with status 1.
#[test]
fn rhyvectl_drives_a_running_vm() {
    require_kvm();
    let sock = socket("ctl");
    let s = sock.to_str().expect("utf-8 path");
    let mut child = spawn_rom("ticker", &["--api-socket", s, "-s", "4,virtio-rnd"]);
    wait_for_api(&sock, &mut child);
    let mut g = LinuxGuest::new("ctl", child);
    let at = format!("--api-socket={s}");
    let ctl = |args: &[&str]| {
        let out = rhyvectl()
            .arg(&at)
            .args(args)
            .output()
            .expect("run rhyvectl");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, out, err) = ctl(&["--ping"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("\"pid\":{}", g.pid())), "{out}");
    assert_eq!(ctl(&["--pause"]).0, 0);
    assert_eq!(get(&sock, "vm.info").1["state"], "Paused");
    let (code, _, err) = ctl(&["--pause"]);
    assert_eq!(code, 1, "a second pause is refused");
    assert!(err.contains("405"), "{err}");
    assert_eq!(ctl(&["--resume"]).0, 0);
    let t = more_ticks(&mut g, 2, Duration::from_secs(30));
    assert!(t.len() >= 2, "{}", g.console);
    let (code, out, err) = ctl(&["--get-stats"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("_rng0") && out.contains("IO"), "{out}");
    let (code, out, err) = ctl(&["--watch-exits=0.2", "--count=2"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("IO"), "{out}");
    let (code, out, _) = ctl(&["--info"]);
    assert_eq!(code, 0);
    assert!(out.contains("\"Running\""), "{out}");
    // --snapshot pauses the VM and writes the snapshot; it stays paused until --resume.
    let snap = std::env::temp_dir().join(format!("rhyve-ctl-snap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&snap);
    let arg = format!("--snapshot={}", snap.display());
    let (code, _, err) = ctl(&[&arg]);
    assert_eq!(code, 0, "{err}");
    assert!(snap.join("manifest.json").exists());
    assert_eq!(get(&sock, "vm.info").1["state"], "Paused");
    assert_eq!(ctl(&["--resume"]).0, 0);
    let _ = std::fs::remove_dir_all(&snap);
    assert_eq!(ctl(&["--force-poweroff"]).0, 0);
    assert_eq!(g.finish().code(), 1);
    let (code, _, err) = ctl(&["--ping"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach rhyve"), "{err}");
}
