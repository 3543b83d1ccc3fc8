//! Shared helpers for the KVM integration tests: build the test-guest ROMs once, run rhyve with
//! a deadline, and fail loudly (never skip) when /dev/kvm is missing.
#![allow(dead_code)]

pub mod api;

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
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

/// Directory with the built ROMs: `RHYVE_TEST_GUESTS` when set (scripts/test.sh builds them
/// once on the host, so the nested harness, where gcc runs emulated and building them took
/// about 200 s per test binary, only reads them), else built by guests/build.sh once per test
/// binary.
pub fn guests() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("RHYVE_TEST_GUESTS") {
            let dir = PathBuf::from(dir);
            assert!(
                dir.join("hello.rom").is_file(),
                "RHYVE_TEST_GUESTS={} has no built ROMs: run guests/build.sh {} first",
                dir.display(),
                dir.display()
            );
            return dir;
        }
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
pub fn wait_with_deadline(child: Child, limit: Duration) -> Run {
    match wait_or_kill(child, limit) {
        Ok(r) => r,
        Err(err) => panic!("rhyve did not exit within {limit:?}; stderr: {err}"),
    }
}

/// Waits for `child` to exit; after `limit` kills it and returns its stderr as the error.
pub fn wait_or_kill(mut child: Child, limit: Duration) -> Result<Run, String> {
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for rhyve") {
            break st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(take_stderr(&mut child));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut stdout);
    }
    let stderr = take_stderr(&mut child);
    Ok(Run {
        status,
        stdout,
        stderr,
    })
}

/// What `drain_stderr` has read so far, by child pid.
type Drained = Arc<Mutex<Vec<u8>>>;
type Readers = Mutex<HashMap<u32, (Drained, std::thread::JoinHandle<()>)>>;
fn drained() -> &'static Readers {
    static D: OnceLock<Readers> = OnceLock::new();
    D.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Reads `child`'s stderr pipe on a thread of its own from now on, so a child that logs more
/// than a pipe holds (64 KiB) while the test is busy elsewhere never blocks on the write
/// (a rebooting `-v` VM does within seconds). `take_stderr` and `wait_with_deadline` return
/// what it read.
pub fn drain_stderr(child: &mut Child) {
    let Some(mut pipe) = child.stderr.take() else {
        return;
    };
    let buf: Drained = Arc::default();
    let sink = buf.clone();
    let reader = std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut chunk) {
            if n == 0 {
                break;
            }
            if let (Ok(mut b), Some(c)) = (sink.lock(), chunk.get(..n)) {
                b.extend_from_slice(c);
            }
        }
    });
    if let Ok(mut d) = drained().lock() {
        d.insert(child.id(), (buf, reader));
    }
}

/// `child`'s stderr: from its pipe, or from `drain_stderr`'s thread; after the child has
/// exited, all of it; before, what has come so far.
pub fn take_stderr(child: &mut Child) -> String {
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
        return err;
    }
    let exited = matches!(child.try_wait(), Ok(Some(_)));
    let Ok(mut d) = drained().lock() else {
        return err;
    };
    let buf = if exited {
        // The child is gone, so its pipe ends: the reader finishes with all of it.
        let entry = d.remove(&child.id());
        drop(d);
        entry.map(|(buf, reader)| {
            let _ = reader.join();
            buf
        })
    } else {
        d.get(&child.id()).map(|(buf, _)| buf.clone())
    };
    if let Some(b) = buf.as_ref().and_then(|b| b.lock().ok()) {
        err = String::from_utf8_lossy(&b).into_owned();
    }
    err
}

/// Starts rhyve with `args`, stdin from `stdin`, stdout and stderr captured (stderr read
/// as it comes: `drain_stderr`).
pub fn spawn_with(args: &[&str], stdin: Stdio) -> Child {
    let mut child = rhyve()
        .args(args)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rhyve");
    drain_stderr(&mut child);
    child
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

/// Whether this test runs inside the nested harness's L1 (scripts/nested.sh says so).
pub fn in_nested_harness() -> bool {
    std::env::var_os("RHYVE_NESTED_L1").is_some()
}

/// A run of the multi-processor ROM (`smp`), which ends with "cpus up: N". In the nested
/// harness a run whose BSP went astray (a triple fault, or no such line) is run once more,
/// saying so on the test's output: there an L2 vCPU now and then loses its control flow right
/// after a port-I/O exit, with nothing in rhyve touching its state or memory (README.md, "The
/// nested harness"). Anywhere else one run is all there is.
pub fn run_smp_rom(extra: &[&str]) -> Run {
    if !in_nested_harness() {
        return run_rom("smp", extra);
    }
    let why = match wait_or_kill(spawn_rom("smp", extra), Duration::from_secs(60)) {
        Ok(r) if r.code() != 3 && r.stdout.contains("cpus up") => return r,
        Ok(r) => format!("status {}: {}", r.code(), r.stderr.trim_end()),
        Err(e) => format!("no exit in 60 s: {}", e.trim_end()),
    };
    // Straight to the process's stderr, past the test harness's capture, so the run's log
    // (and scripts/test.sh's closing line) shows every retry.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "\nharness: retry: the smp ROM with {extra:?} went astray ({why}); running it once more"
    );
    run_rom("smp", extra)
}

/// Starts a ROM on COM1=stdio with extra options.
pub fn spawn_rom(name: &str, extra: &[&str]) -> Child {
    require_kvm();
    let bootrom = format!("bootrom,{}", rom(name));
    let mut args: Vec<&str> = extra.to_vec();
    args.extend(["-l", "com1,stdio", "-l", &bootrom, "testvm"]);
    spawn(&args)
}

/// Runs a ROM on COM1=stdio with extra options.
pub fn run_rom(name: &str, extra: &[&str]) -> Run {
    wait_with_deadline(spawn_rom(name, extra), Duration::from_secs(60))
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
    /// `rhyve ARGS` run inside this namespace, with stdout and stderr piped (stderr read as
    /// it comes: `drain_stderr`).
    pub fn spawn_rhyve(&self, args: &[&str]) -> Child {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0, env!("CARGO_BIN_EXE_rhyve")])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run rhyve in the namespace");
        drain_stderr(&mut child);
        child
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

/// Panics unless this host's KVM has hardware-virtualization semantics (VT-x/AMD-V, or the
/// nested harness's SVM): real Linux user space cannot run on PVM.
pub fn require_hw_kvm() {
    require_kvm();
    assert!(
        !rhyve::hypervisor::cpuid::host_is_pvm(),
        "this test needs a KVM that can run Linux user space, and this host's is PVM: run it \
         in the nested harness (scripts/nested.sh; scripts/test.sh does)"
    );
}

/// The Debian test guest's directory (scripts/build-debian-guest.sh, built once per machine).
pub fn debian_guest() -> PathBuf {
    let out = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/build-debian-guest.sh"
    ))
    .output()
    .expect("run scripts/build-debian-guest.sh");
    assert!(
        out.status.success(),
        "cannot build the Debian test guest: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The script's last line is the directory.
    let stdout = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(stdout.lines().last().unwrap_or_default().trim())
}

/// `-o boot.kernel=... -o boot.initrd=... -o boot.cmdline=CMDLINE` for the test guest in
/// `g`, after `args`: the whole rhyve command line, ending with the VM name.
pub fn with_debian_guest(g: &Path, args: &[&str], cmdline: &str, name: &str) -> Vec<String> {
    let mut v: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    v.extend([
        "-o".into(),
        format!("boot.kernel={}", g.join("vmlinuz").display()),
        "-o".into(),
        format!("boot.initrd={}", g.join("initrd.img").display()),
        "-o".into(),
        format!("boot.cmdline={cmdline}"),
        name.into(),
    ]);
    v
}

/// A booting Linux guest whose console (rhyve's stdout) is read line by line. Deadlines are
/// about progress, not wall time: a boot fails when its console is silent for `stall`
/// (emulated hosts are slow, and a shared machine slower still), when the kernel panics, or
/// after `limit` in all.
pub struct LinuxGuest {
    pub tag: String,
    child: Option<Child>,
    lines: std::sync::mpsc::Receiver<String>,
    pub console: String,
    start: Instant,
    /// When the console last printed a line.
    last_line: Instant,
    pub stall: Duration,
    pub limit: Duration,
}

impl LinuxGuest {
    pub fn new(tag: &str, mut child: Child) -> LinuxGuest {
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        LinuxGuest {
            tag: tag.into(),
            child: Some(child),
            lines: rx,
            console: String::new(),
            start: Instant::now(),
            last_line: Instant::now(),
            stall: Duration::from_secs(300),
            limit: Duration::from_secs(900),
        }
    }

    /// Whether rhyve is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// Reads console lines until one contains `want` (returns it), or the console ends,
    /// stalls, panics or runs out of time (returns None).
    pub fn wait_for(&mut self, want: &str) -> Option<String> {
        use std::sync::mpsc::RecvTimeoutError;
        self.last_line = Instant::now();
        loop {
            match self.lines.recv_timeout(Duration::from_secs(1)) {
                Ok(line) => {
                    self.last_line = Instant::now();
                    let line = line.trim_end_matches('\r').to_string();
                    let all = std::env::var_os("RHYVE_TEST_CONSOLE").is_some();
                    if all || line.contains("rhyve-guest:") || line.contains("Run /init") {
                        eprintln!(
                            "[{} {:6.1} s] {line}",
                            self.tag,
                            self.start.elapsed().as_secs_f64()
                        );
                    }
                    self.console.push_str(&line);
                    self.console.push('\n');
                    if line.contains("Kernel panic - not syncing") {
                        // Let the panic's lines arrive, then stop.
                        std::thread::sleep(Duration::from_secs(2));
                        while let Ok(l) = self.lines.try_recv() {
                            self.console.push_str(&l);
                            self.console.push('\n');
                        }
                        return None;
                    }
                    if !want.is_empty() && line.contains(want) {
                        return Some(line);
                    }
                }
                Err(RecvTimeoutError::Timeout)
                    if self.last_line.elapsed() < self.stall
                        && self.start.elapsed() < self.limit => {}
                Err(_) => return None,
            }
        }
    }

    /// Reads the console to its end and waits for rhyve's exit; returns the exit. A console
    /// that stalled or ran out of time fails the test at once, rhyve killed, with how long
    /// the console was silent, its last lines and rhyve's stderr.
    pub fn finish(&mut self) -> Run {
        self.wait_for("");
        let mut child = self.child.take().expect("finish once");
        let running = matches!(child.try_wait(), Ok(None));
        let silent = self.last_line.elapsed();
        if running && (silent >= self.stall || self.start.elapsed() >= self.limit) {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = take_stderr(&mut child);
            let lines: Vec<&str> = self.console.lines().collect();
            let tail = lines[lines.len().saturating_sub(30)..].join("\n");
            panic!(
                "[{}] the console was silent for {:.0} s (stall limit {:?}) after {:.0} s in all \
                 ({} lines printed); rhyve killed\nrhyve's stderr: {stderr}\nlast console lines:\n{tail}",
                self.tag,
                silent.as_secs_f64(),
                self.stall,
                self.start.elapsed().as_secs_f64(),
                lines.len()
            );
        }
        let r = wait_with_deadline(child, Duration::from_secs(60));
        eprintln!(
            "[{} {:6.1} s] rhyve exited with status {}",
            self.tag,
            self.start.elapsed().as_secs_f64(),
            r.code()
        );
        r
    }

    /// Ends a guest that has shown what the test needed: rhyve is killed; returns its exit
    /// and stderr.
    pub fn stop(&mut self) -> Run {
        let mut child = self.child.take().expect("stop once");
        let _ = child.kill();
        let status = child.wait().expect("wait for the killed rhyve");
        Run {
            status,
            stdout: String::new(),
            stderr: take_stderr(&mut child),
        }
    }

    /// Panics, showing the whole console and rhyve's stderr, unless every line of `want`
    /// appeared on the console.
    pub fn assert_lines(&self, r: &Run, want: &[&str]) {
        for w in want {
            assert!(
                self.console.contains(w),
                "[{}] the guest never printed {w:?}\nrhyve's stderr: {}\nconsole:\n{}",
                self.tag,
                r.stderr,
                self.console
            );
        }
    }

    /// The rest of the first console line that starts with "rhyve-guest: {label}".
    pub fn guest_value(&self, label: &str) -> Option<String> {
        let key = format!("rhyve-guest: {label}");
        self.console
            .lines()
            .find_map(|l| l.strip_prefix(&key))
            .map(|v| v.trim().to_string())
    }
}

impl Drop for LinuxGuest {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// rhyve's options for booting firmware `rom` built for QEMU: one vCPU, `mem`, the i440fx
/// host bridge, COM1 on stdout, the ROM (`ROM[,VARS]`) and fw_cfg (README.md, "Firmware").
pub fn firmware_args(rom: &str, mem: &str) -> Vec<String> {
    [
        "-c",
        "1",
        "-m",
        mem,
        "-s",
        "0,hostbridge,model=i440fx",
        "-l",
        "com1,stdio",
        "-l",
        &format!("bootrom,{rom}"),
        "-l",
        "fwcfg,qemu",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}
