//! Shared helpers for the KVM integration tests: build the test-guest ROMs once, run rhyve with
//! a deadline, and fail loudly (never skip) when /dev/kvm is missing.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Panics with a clear message when KVM is unavailable: a KVM test must fail, not pass.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test needs KVM: cannot open /dev/kvm ({e}); run it on a host with KVM");
    }
}

/// Directory with the built ROMs (guests/build.sh, run once per test binary).
pub fn guests() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("guests-{}", std::process::id()));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guests/build.sh");
        let st = Command::new("sh")
            .arg(&script)
            .arg(&out)
            .status()
            .expect("run guests/build.sh");
        assert!(st.success(), "guests/build.sh failed");
        out
    })
}

pub fn rom(name: &str) -> String {
    guests()
        .join(format!("{name}.rom"))
        .to_string_lossy()
        .into_owned()
}

/// Address of `symbol` in a ROM's ELF, for checking reported RIPs.
pub fn rom_symbol(name: &str, symbol: &str) -> u64 {
    let out = Command::new("nm")
        .arg(guests().join(format!("{name}.elf")))
        .output()
        .expect("run nm");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.ends_with(&format!(" {symbol}")))
        .unwrap_or_else(|| panic!("{symbol} not in {name}.elf"));
    let addr = line.split(' ').next().unwrap_or_default();
    u64::from_str_radix(addr, 16).unwrap_or_else(|_| panic!("bad nm line {line}"))
}

pub fn rhyve() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rhyve"));
    c.env_remove("RHYVE_LOG");
    c
}

pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }
}

/// Waits for `child` to exit, killing it and failing the test after `limit`.
pub fn wait_with_deadline(mut child: Child, limit: Duration) -> Run {
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for rhyve") {
            break st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("rhyve did not exit within {limit:?}; stderr: {err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut stdout);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    Run {
        status,
        stdout,
        stderr,
    }
}

/// Starts rhyve with `args`, stdin from `stdin`, stdout and stderr captured.
pub fn spawn_with(args: &[&str], stdin: Stdio) -> Child {
    rhyve()
        .args(args)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rhyve")
}

/// Starts rhyve with `args` and stdin from /dev/null.
pub fn spawn(args: &[&str]) -> Child {
    spawn_with(args, Stdio::null())
}

/// Runs rhyve with `args` and stdin from /dev/null.
pub fn run(args: &[&str]) -> Run {
    let child = spawn(args);
    // Outputs are small (a few lines), so the pipes cannot fill while we poll.
    wait_with_deadline(child, Duration::from_secs(60))
}

/// Runs a ROM on COM1=stdio with extra options.
pub fn run_rom(name: &str, extra: &[&str]) -> Run {
    require_kvm();
    let rom = rom(name);
    let bootrom = format!("bootrom,{rom}");
    let mut args: Vec<&str> = extra.to_vec();
    args.extend(["-l", "com1,stdio", "-l", &bootrom, "testvm"]);
    run(&args)
}

/// The hex number after `label` on the first line of `out` that starts with it.
pub fn value(out: &str, label: &str) -> u32 {
    let line = out
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no '{label}' line in:\n{out}"));
    u32::from_str_radix(line[label.len()..].trim(), 16)
        .unwrap_or_else(|_| panic!("bad line {line}"))
}

/// A network namespace this test owns; removed on drop.
pub struct Netns(pub String);

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("rhyve-{tag}-{}", std::process::id());
        let st = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip (iproute2)");
        assert!(
            st.success(),
            "cannot create network namespace {name} (needs root)"
        );
        Netns(name)
    }

    pub fn exec(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .output()
            .expect("run ip netns exec")
    }
}

impl Netns {
    /// `rhyve ARGS` run inside this namespace, with stdout and stderr piped.
    pub fn spawn_rhyve(&self, args: &[&str]) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.0, env!("CARGO_BIN_EXE_rhyve")])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run rhyve in the namespace")
    }

    /// Waits (up to `limit`) for `tap` to appear in the namespace (rhyve creates it), then
    /// gives it `addr` (CIDR) and brings it up: the host's end of the guest's link.
    pub fn configure_tap(&self, tap: &str, addr: &str, limit: Duration) {
        let deadline = std::time::Instant::now() + limit;
        while !self.exec(&["ip", "link", "show", tap]).status.success() {
            assert!(std::time::Instant::now() < deadline, "{tap} never appeared");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(self
            .exec(&["ip", "addr", "add", addr, "dev", tap])
            .status
            .success());
        assert!(self
            .exec(&["ip", "link", "set", tap, "up"])
            .status
            .success());
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}
