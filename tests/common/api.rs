//! Helpers for tests that drive rhyve's control API: a socket path, curl requests, waiting
//! for the server, the ticker ROM's numbers.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A socket path of this test's own.
pub fn socket(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("rhyve-api-{tag}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// One request with curl: (status, body as JSON, or Null when empty).
pub fn curl(sock: &Path, method: &str, endpoint: &str, body: Option<&Value>) -> (u16, Value) {
    let mut c = Command::new("curl");
    c.args(["-s", "--max-time", "30", "--unix-socket"])
        .arg(sock)
        .args(["-X", method, "-o", "-", "-w", "\n%{http_code}"]);
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "-d", &b.to_string()]);
    }
    c.arg(format!("http://localhost/api/v1/{endpoint}"));
    let out = c.output().expect("run curl (scripts/setup.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let code: u16 = code
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("curl {method} {endpoint}: {text:?}"));
    let v = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{endpoint}: not JSON ({e}): {body}"))
    };
    (code, v)
}

pub fn get(sock: &Path, e: &str) -> (u16, Value) {
    curl(sock, "GET", e, None)
}

pub fn put(sock: &Path, e: &str) -> u16 {
    let (code, body) = curl(sock, "PUT", e, None);
    if code >= 400 {
        assert!(
            body["error"].is_string(),
            "{e}: {code} without a JSON error: {body}"
        );
    }
    code
}

/// Waits until the socket answers a ping.
pub fn wait_for_api(sock: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("rhyve exited with {st} before its API answered");
        }
        if sock.exists() && get(sock, "vmm.ping").0 == 200 {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the API at {} never answered", sock.display());
}

/// The tick numbers in a console.
pub fn ticks(console: &str) -> Vec<u32> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("tick "))
        .filter_map(|n| u32::from_str_radix(n.trim(), 16).ok())
        .collect()
}

/// Waits until `file` holds at least `n` ticks (60 s at most); returns its text.
pub fn wait_ticks(file: &Path, n: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if ticks(&text).len() >= n || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// 1, 2, 3, ... without a gap or a repeat.
pub fn consecutive_from_one(t: &[u32]) -> bool {
    t.first() == Some(&1) && t.windows(2).all(|w| w[1] == w[0] + 1)
}

/// A temporary directory of this test's own, removed on drop.
pub struct Dir(pub PathBuf);

impl Dir {
    pub fn new(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("rhyve-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        Dir(d)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A ROM guest (spawn_rom) with COM1 on `com` (`com1,PATH`) and `extra` options.
pub fn spawn_rom_with_com(name: &str, com: &str, extra: &[&str]) -> Child {
    super::require_kvm();
    let bootrom = format!("bootrom,{}", super::rom(name));
    let mut args: Vec<&str> = extra.to_vec();
    args.extend(["-l", com, "-l", &bootrom, "romvm"]);
    super::spawn(&args)
}

/// Starts rhyve with only its API at `sock` (and `extra` options), waits until it answers.
pub fn spawn_api_only(sock: &Path, extra: &[&str]) -> Child {
    let mut child = super::rhyve()
        .args(extra)
        .arg("--api-socket")
        .arg(sock)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn rhyve");
    super::drain_stderr(&mut child);
    wait_for_api(sock, &mut child);
    child
}

/// Sends raw bytes on a new connection; returns what came back before the server closed
/// (or 5 s passed).
pub fn raw(sock: &Path, bytes: &[u8]) -> String {
    raw_with(sock, bytes, Duration::from_secs(5))
}

/// As `raw`, waiting up to `wait` for the answer.
pub fn raw_with(sock: &Path, bytes: &[u8], wait: Duration) -> String {
    let mut c = UnixStream::connect(sock).expect("connect");
    c.set_read_timeout(Some(wait)).expect("timeout");
    let _ = c.write_all(bytes);
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    String::from_utf8_lossy(&out).to_string()
}

/// The status code of a raw response (0 when there is none).
pub fn status_of(resp: &str) -> u16 {
    resp.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The JSON body of a raw response (Null when there is none or it is not JSON).
pub fn json_body(resp: &str) -> Value {
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or(Value::Null)
}
