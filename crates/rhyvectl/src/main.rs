//! rhyvectl: control a running rhyve through its API socket, in bhyvectl(8)'s spirit.
//!
//! `rhyvectl --vm=NAME --get-stats`, `--pause`, `--force-reset`, `--watch-exits`, ... Each
//! action is one HTTP request to rhyve's API (api-spec: HTTP/1.1 over a unix socket, paths
//! under /api/v1, JSON bodies, errors as {"error": "..."}); see `rhyvectl --help`.
//!
//! Modules: [`args`] reads the command line, [`http`] speaks HTTP over the socket, [`render`]
//! makes the tables. This file runs the actions and turns failures into messages and exit
//! statuses (0 done, 1 an action failed or rhyve is unreachable, 2 a usage error).

mod args;
mod http;
mod render;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::Value;

use args::{Action, Command};

/// Clears the screen and puts the cursor home (`--watch-exits` on a terminal).
const CLEAR: &str = "\x1b[H\x1b[2J";

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let stdout = io::stdout();
    let tty = stdout.is_terminal();
    let mut out = stdout.lock();
    let mut err = io::stderr();
    ExitCode::from(run(&args, &mut out, &mut err, tty))
}

/// Why an action failed; its Display is the message after `rhyvectl: `.
#[derive(Debug)]
enum Failure {
    /// The socket cannot be connected to.
    Unreachable { socket: PathBuf, err: io::Error },
    /// rhyve answered with an error status.
    Server {
        path: String,
        status: u16,
        message: String,
    },
    /// The request got no usable HTTP response.
    Http { path: String, err: http::Error },
    /// The response is HTTP but its body is not what the API promises.
    Body { path: String, msg: String },
    /// Writing to stdout failed.
    Output(io::Error),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Unreachable { socket, err } => {
                let s = socket.display();
                write!(
                    f,
                    "cannot reach rhyve at {s}: {err} (is rhyve running with --api-socket {s} or --api?)"
                )
            }
            Failure::Server {
                path,
                status,
                message,
            } => write!(f, "{path}: {status} {message}"),
            Failure::Http { path, err } => write!(f, "{path}: {err}"),
            Failure::Body { path, msg } => {
                write!(f, "{path}: malformed response from rhyve: {msg}")
            }
            Failure::Output(e) => write!(f, "writing the output: {e}"),
        }
    }
}

impl Failure {
    /// Whether this says rhyve (or its VM) is gone: the socket refuses connections or is
    /// removed, the connection closes unanswered, or the VM no longer exists (404).
    fn vm_gone(&self) -> bool {
        matches!(
            self,
            Failure::Unreachable { .. }
                | Failure::Http {
                    err: http::Error::Closed,
                    ..
                }
                | Failure::Server { status: 404, .. }
        )
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Output(e)
    }
}

/// Whether to go on with the next action.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    /// `--watch-exits` saw the VM end: stop there, successfully.
    Stop,
}

/// Runs rhyvectl with `args` (without the program name); returns the exit status.
fn run(args: &[OsString], out: &mut dyn Write, err: &mut dyn Write, tty: bool) -> u8 {
    // (`let _ =` on writes to `err`: a message that cannot go to stderr has nowhere to go.)
    let cmd = match args::parse(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(err, "rhyvectl: {e}");
            return 2;
        }
    };
    let done = match cmd {
        Command::Help => out.write_all(args::HELP.as_bytes()).map_err(Failure::from),
        Command::Version => {
            writeln!(out, "rhyvectl {}", env!("CARGO_PKG_VERSION")).map_err(Failure::from)
        }
        Command::Run(inv) => {
            let mut ctl = Ctl {
                socket: inv.target.socket(),
                out,
                err: &mut *err,
                tty,
            };
            let mut done = Ok(());
            for action in &inv.actions {
                match ctl.act(action) {
                    Ok(Flow::Continue) => {}
                    Ok(Flow::Stop) => break,
                    Err(f) => {
                        done = Err(f);
                        break;
                    }
                }
            }
            done
        }
    };
    match done.and_then(|()| out.flush().map_err(Failure::from)) {
        Ok(()) => 0,
        // Output into a closed pipe (`| head`): the reader has what it wanted.
        Err(Failure::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => 1,
        Err(f) => {
            let _ = writeln!(err, "rhyvectl: {f}");
            1
        }
    }
}

/// The actions against one API socket.
struct Ctl<'a> {
    socket: PathBuf,
    out: &'a mut dyn Write,
    err: &'a mut dyn Write,
    tty: bool,
}

impl Ctl<'_> {
    fn act(&mut self, action: &Action) -> Result<Flow, Failure> {
        match action {
            Action::GetStats => {
                let counters = self.counters()?;
                let stats = self.exit_stats()?;
                write!(
                    self.out,
                    "{}\n{}",
                    render::render_counters(&counters),
                    render::render_exit_stats(&stats)
                )?;
            }
            Action::Pause => self.put("vm.pause")?,
            Action::Resume => self.put("vm.resume")?,
            Action::ForceReset => self.put("vm.reboot")?,
            Action::ForcePoweroff => self.put("vm.shutdown")?,
            Action::PowerButton => self.put("vm.power-button")?,
            Action::Info => {
                let v = self.get("vm.info")?;
                let text = serde_json::to_string_pretty(&v).map_err(|e| Failure::Body {
                    path: api_path("vm.info"),
                    msg: e.to_string(),
                })?;
                writeln!(self.out, "{text}")?;
            }
            Action::Ping => {
                let v = self.get("vmm.ping")?;
                writeln!(self.out, "{v}")?;
            }
            Action::Snapshot(dir) => {
                let info = self.get("vm.info")?;
                if info.get("state").and_then(Value::as_str) != Some("Paused") {
                    self.put("vm.pause")?;
                }
                let url =
                    serde_json::json!({ "destination_url": format!("file://{}", dir.display()) });
                self.call_with(
                    "PUT",
                    "vm.snapshot",
                    Some(url.to_string().as_bytes()),
                    http::TIMEOUT,
                )?;
            }
            Action::SendMigration {
                url,
                downtime_ms,
                max_rounds,
            } => {
                let mut data = serde_json::Map::new();
                data.insert("destination_url".into(), url.as_str().into());
                if let Some(ms) = downtime_ms {
                    data.insert("downtime_ms".into(), (*ms).into());
                }
                if let Some(n) = max_rounds {
                    data.insert("max_rounds".into(), (*n).into());
                }
                self.migrate("vm.send-migration", data)?;
            }
            Action::ReceiveMigration { url, config } => {
                let mut data = serde_json::Map::new();
                data.insert("receiver_url".into(), url.as_str().into());
                if !config.is_empty() {
                    let keys: serde_json::Map<String, Value> = config
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().into()))
                        .collect();
                    data.insert("config".into(), keys.into());
                }
                self.migrate("vm.receive-migration", data)?;
            }
            Action::WatchExits { interval, count } => return self.watch(*interval, *count),
        }
        Ok(Flow::Continue)
    }

    /// One request; a 2xx answer's JSON body (None when it has none).
    fn call(&self, method: &str, endpoint: &str) -> Result<Option<Value>, Failure> {
        self.call_with(method, endpoint, None, http::TIMEOUT)
    }

    /// A request with this body, whose answer may take up to `answer_within`.
    fn call_with(
        &self,
        method: &str,
        endpoint: &str,
        body: Option<&[u8]>,
        answer_within: Duration,
    ) -> Result<Option<Value>, Failure> {
        let path = api_path(endpoint);
        let resp = http::request(&self.socket, method, &path, body, answer_within).map_err(
            |err| match err {
                http::Error::Connect(err) => Failure::Unreachable {
                    socket: self.socket.clone(),
                    err,
                },
                err => Failure::Http {
                    path: path.clone(),
                    err,
                },
            },
        )?;
        if !(200..300).contains(&resp.status) {
            return Err(Failure::Server {
                path,
                status: resp.status,
                message: error_message(&resp),
            });
        }
        if resp.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        serde_json::from_slice(&resp.body)
            .map(Some)
            .map_err(|e| Failure::Body {
                path,
                msg: format!("the body is not JSON ({e})"),
            })
    }

    /// PUT vm.send-migration or vm.receive-migration with `data`: rhyve answers when the
    /// migration is over, so the answer may take up to [`http::MIGRATION_TIMEOUT`].
    fn migrate(&self, endpoint: &str, data: serde_json::Map<String, Value>) -> Result<(), Failure> {
        let body = Value::Object(data).to_string();
        self.call_with(
            "PUT",
            endpoint,
            Some(body.as_bytes()),
            http::MIGRATION_TIMEOUT,
        )
        .map(drop)
    }

    fn put(&self, endpoint: &str) -> Result<(), Failure> {
        self.call("PUT", endpoint).map(drop)
    }

    fn get(&self, endpoint: &str) -> Result<Value, Failure> {
        self.call("GET", endpoint)?.ok_or_else(|| Failure::Body {
            path: api_path(endpoint),
            msg: "expected a JSON body, got none".into(),
        })
    }

    fn counters(&self) -> Result<render::Counters, Failure> {
        render::parse_counters(&self.get("vm.counters")?).map_err(|msg| Failure::Body {
            path: api_path("vm.counters"),
            msg,
        })
    }

    fn exit_stats(&self) -> Result<render::ExitStats, Failure> {
        render::parse_exit_stats(&self.get("vm.exit-stats")?).map_err(|msg| Failure::Body {
            path: api_path("vm.exit-stats"),
            msg,
        })
    }

    /// `--watch-exits`: a frame every `interval`, `count` times or until the VM ends.
    fn watch(&mut self, interval: Duration, count: Option<u64>) -> Result<Flow, Failure> {
        let mut prev: Option<(BTreeMap<String, render::KindStats>, Instant)> = None;
        let mut samples: u64 = 0;
        loop {
            let at = Instant::now();
            let stats = match self.exit_stats() {
                Ok(s) => s,
                Err(f) if samples > 0 && f.vm_gone() => {
                    let why = match &f {
                        Failure::Unreachable { socket, err } => {
                            format!("{}: {err}", socket.display())
                        }
                        f => f.to_string(),
                    };
                    let _ = writeln!(self.err, "rhyvectl: the VM ended ({why})");
                    return Ok(Flow::Stop);
                }
                Err(f) => return Err(f),
            };
            samples += 1;
            let since = prev
                .as_ref()
                .map(|(kinds, then)| (kinds, at.saturating_duration_since(*then)));
            let frame = render::render_watch(&stats, since, samples, interval);
            if self.tty {
                write!(self.out, "{CLEAR}{frame}")?;
            } else if samples > 1 {
                write!(self.out, "\n{frame}")?;
            } else {
                write!(self.out, "{frame}")?;
            }
            self.out.flush()?;
            prev = Some((render::sum_kinds(&stats), at));
            if count.is_some_and(|c| samples >= c) {
                return Ok(Flow::Continue);
            }
            std::thread::sleep(interval.saturating_sub(at.elapsed()));
        }
    }
}

fn api_path(endpoint: &str) -> String {
    format!("/api/v1/{endpoint}")
}

/// The one-line message of an error response: its {"error": ...}, else the body's first line,
/// else the reason phrase.
fn error_message(resp: &http::Response) -> String {
    let from_json = serde_json::from_slice::<Value>(&resp.body)
        .ok()
        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string));
    let text = from_json.unwrap_or_else(|| {
        String::from_utf8_lossy(&resp.body)
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("")
            .to_string()
    });
    let one_line: String = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(300)
        .collect();
    if !one_line.is_empty() {
        one_line
    } else if !resp.reason.is_empty() {
        resp.reason.clone()
    } else {
        "(no message)".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read};
    use std::os::unix::net::UnixListener;
    use std::path::Path;
    use std::thread::JoinHandle;

    /// A fresh directory for one test's socket, removed on drop.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(name: &str) -> TempDir {
            let d = std::env::temp_dir().join(format!("rhyvectl-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            TempDir(d)
        }
        fn sock(&self) -> PathBuf {
            self.0.join("api.sock")
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Reads one request as a server would: the head up to the blank line, then
    /// Content-Length bytes.
    fn read_request(stream: &mut std::os::unix::net::UnixStream) -> Vec<u8> {
        let mut r = BufReader::new(stream);
        let mut raw = Vec::new();
        let mut length = 0usize;
        loop {
            let mut line = Vec::new();
            if r.read_until(b'\n', &mut line).unwrap() == 0 {
                break;
            }
            raw.extend_from_slice(&line);
            let text = String::from_utf8_lossy(&line).to_ascii_lowercase();
            if let Some(v) = text.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
            if line == b"\r\n" {
                break;
            }
        }
        let mut body = vec![0; length];
        r.read_exact(&mut body).unwrap();
        raw.extend_from_slice(&body);
        raw
    }

    /// A server on `sock` giving `answers` in order, one per connection, then closing (so the
    /// next connect is refused). Returns the requests it got.
    fn serve(sock: &Path, answers: Vec<Vec<u8>>) -> JoinHandle<Vec<String>> {
        let listener = UnixListener::bind(sock).unwrap();
        std::thread::spawn(move || {
            let mut got = Vec::new();
            for answer in answers {
                let (mut stream, _) = listener.accept().unwrap();
                got.push(String::from_utf8(read_request(&mut stream)).unwrap());
                stream.write_all(&answer).unwrap();
            }
            got
        })
    }

    fn json_answer(status: &str, body: &Value) -> Vec<u8> {
        let body = body.to_string();
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    const NO_CONTENT: &[u8] = b"HTTP/1.1 204 No Content\r\n\r\n";

    /// Runs rhyvectl; (status, stdout, stderr).
    fn rhyvectl(args: &[&str], tty: bool) -> (u8, String, String) {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let status = run(&args, &mut out, &mut err, tty);
        (
            status,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    fn sock_arg(dir: &TempDir) -> String {
        format!("--api-socket={}", dir.sock().display())
    }

    fn bounds() -> Vec<u64> {
        (8..=30).map(|s| 1u64 << s).collect()
    }

    /// vm.exit-stats with one vCPU: `io` IO exits in bucket 3 (<2.05us), 1 HLT >=1.07s.
    fn exit_stats(io: u64) -> Value {
        let mut io_buckets = vec![0u64; 24];
        io_buckets[3] = io;
        let mut hlt_buckets = vec![0u64; 24];
        hlt_buckets[23] = 1;
        serde_json::json!({
            "bucket_upper_ns": bounds(),
            "vcpus": [{"id": 0, "exits": io + 1, "kinds": {
                "IO": {"count": io, "total_ns": io * 1500, "buckets": io_buckets},
                "HLT": {"count": 1, "total_ns": 2_000_000_000u64, "buckets": hlt_buckets}
            }}]
        })
    }

    #[test]
    fn pause_sends_a_put_with_no_body() {
        let dir = TempDir::new("pause");
        let server = serve(&dir.sock(), vec![NO_CONTENT.to_vec()]);
        let (status, out, err) = rhyvectl(&[&sock_arg(&dir), "--pause"], false);
        assert_eq!((status, out.as_str(), err.as_str()), (0, "", ""));
        let reqs = server.join().unwrap();
        assert_eq!(reqs.len(), 1);
        let req = &reqs[0];
        let (head, body) = req.split_once("\r\n\r\n").unwrap();
        let mut lines = head.split("\r\n");
        assert_eq!(lines.next(), Some("PUT /api/v1/vm.pause HTTP/1.1"));
        let headers: Vec<&str> = lines.collect();
        for want in ["Host: localhost", "Connection: close", "Content-Length: 0"] {
            assert!(headers.contains(&want), "{want} missing from {headers:?}");
        }
        assert!(!headers.iter().any(|h| h.starts_with("Transfer-Encoding")));
        assert_eq!(body, "");
    }

    #[test]
    fn actions_map_to_their_endpoints_in_order() {
        let dir = TempDir::new("order");
        let server = serve(&dir.sock(), vec![NO_CONTENT.to_vec(); 5]);
        let (status, _, err) = rhyvectl(
            &[
                &sock_arg(&dir),
                "--force-reset",
                "--resume",
                "--power-button",
                "--force-poweroff",
                "--pause",
            ],
            false,
        );
        assert_eq!((status, err.as_str()), (0, ""));
        let lines: Vec<String> = server
            .join()
            .unwrap()
            .iter()
            .map(|r| r.lines().next().unwrap().to_string())
            .collect();
        assert_eq!(
            lines,
            [
                "PUT /api/v1/vm.reboot HTTP/1.1",
                "PUT /api/v1/vm.resume HTTP/1.1",
                "PUT /api/v1/vm.power-button HTTP/1.1",
                "PUT /api/v1/vm.shutdown HTTP/1.1",
                "PUT /api/v1/vm.pause HTTP/1.1",
            ]
        );
    }

    /// A request's line and its JSON body.
    fn line_and_json(req: &str) -> (&str, Value) {
        let (head, body) = req.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains("\r\nContent-Type: application/json\r\n"),
            "{head}"
        );
        (
            head.lines().next().unwrap(),
            serde_json::from_str(body).unwrap(),
        )
    }

    #[test]
    fn migrations_send_their_data() {
        let dir = TempDir::new("migrate");
        let server = serve(&dir.sock(), vec![NO_CONTENT.to_vec(); 3]);
        let (status, out, err) = rhyvectl(
            &[
                &sock_arg(&dir),
                "--receive-migration=unix:/tmp/in.sock",
                "--send-migration=tcp:dst:7000",
                "--config=lpc.com1.path=/tmp/b.txt",
                "--downtime-ms=20",
                "--config",
                "pci.0.3.0.path=/img",
                "--receive-migration=tcp:0.0.0.0:7001",
            ],
            false,
        );
        assert_eq!((status, out.as_str(), err.as_str()), (0, "", ""));
        let reqs = server.join().unwrap();
        let config = serde_json::json!({"lpc.com1.path": "/tmp/b.txt", "pci.0.3.0.path": "/img"});
        assert_eq!(
            line_and_json(&reqs[0]),
            (
                "PUT /api/v1/vm.receive-migration HTTP/1.1",
                serde_json::json!({"receiver_url": "unix:/tmp/in.sock", "config": config})
            )
        );
        assert_eq!(
            line_and_json(&reqs[1]),
            (
                "PUT /api/v1/vm.send-migration HTTP/1.1",
                serde_json::json!({"destination_url": "tcp:dst:7000", "downtime_ms": 20})
            )
        );
        assert_eq!(
            line_and_json(&reqs[2]).1,
            serde_json::json!({"receiver_url": "tcp:0.0.0.0:7001", "config": config})
        );
    }

    #[test]
    fn a_failed_migration_is_status_1() {
        let dir = TempDir::new("migratefail");
        let msg = "vm.send-migration: tcp:dst:7000: Connection refused (os error 111) (the VM runs on here)";
        let server = serve(
            &dir.sock(),
            vec![json_answer(
                "500 Internal Server Error",
                &serde_json::json!({ "error": msg }),
            )],
        );
        let (status, out, err) = rhyvectl(
            &[&sock_arg(&dir), "--send-migration=tcp:dst:7000", "--info"],
            false,
        );
        assert_eq!((status, out.as_str()), (1, ""));
        assert_eq!(
            err,
            format!("rhyvectl: /api/v1/vm.send-migration: 500 {msg}\n")
        );
        let reqs = server.join().unwrap();
        assert_eq!(
            line_and_json(&reqs[0]).1,
            serde_json::json!({"destination_url": "tcp:dst:7000"})
        );
    }

    #[test]
    fn get_stats_prints_counters_then_exits() {
        let dir = TempDir::new("stats");
        let counters = serde_json::json!({
            "_disk0": {"read_bytes": 4096, "read_ops": 1, "write_bytes": 0, "write_ops": 0},
            "_console0": {"rx_bytes": 12, "tx_bytes": 3400}
        });
        let server = serve(
            &dir.sock(),
            vec![
                json_answer("200 OK", &counters),
                json_answer("200 OK", &exit_stats(40)),
            ],
        );
        let (status, out, err) = rhyvectl(&[&sock_arg(&dir), "--get-stats"], false);
        assert_eq!((status, err.as_str()), (0, ""));
        assert_eq!(
            out,
            "\
device counters:
DEVICE     COUNTER      VALUE
_console0  rx_bytes        12
_console0  tx_bytes      3400
_disk0     read_bytes    4096
_disk0     read_ops         1
_disk0     write_bytes      0
_disk0     write_ops        0

exits per vCPU (1 vCPU, 41 exits; times are exit handling):
VCPU  KIND  COUNT    MEAN      P50      P99
0     IO       40  1.50us  <2.05us  <2.05us
0     HLT       1   2.00s  >=1.07s  >=1.07s
"
        );
        let reqs = server.join().unwrap();
        assert!(reqs[0].starts_with("GET /api/v1/vm.counters HTTP/1.1\r\n"));
        assert!(reqs[1].starts_with("GET /api/v1/vm.exit-stats HTTP/1.1\r\n"));
        assert!(!reqs[0].contains("Content-Length"));
    }

    #[test]
    fn info_is_pretty_and_ping_is_one_line() {
        let dir = TempDir::new("info");
        let ping =
            serde_json::json!({"build_version": "b", "version": "0.1.0", "pid": 7, "features": []});
        let info = serde_json::json!({"state": "Running", "memory_actual_size": 1024});
        let server = serve(
            &dir.sock(),
            vec![json_answer("200 OK", &ping), json_answer("200 OK", &info)],
        );
        let (status, out, _) = rhyvectl(&[&sock_arg(&dir), "--ping", "--info"], false);
        assert_eq!(status, 0);
        assert_eq!(
            out,
            "{\"build_version\":\"b\",\"features\":[],\"pid\":7,\"version\":\"0.1.0\"}\n\
             {\n  \"memory_actual_size\": 1024,\n  \"state\": \"Running\"\n}\n"
        );
        let reqs = server.join().unwrap();
        assert!(reqs[0].starts_with("GET /api/v1/vmm.ping "));
        assert!(reqs[1].starts_with("GET /api/v1/vm.info "));
    }

    #[test]
    fn a_server_error_stops_the_actions() {
        let dir = TempDir::new("error");
        let answer = json_answer(
            "405 Method Not Allowed",
            &serde_json::json!({"error": "the VM is not running (vm.boot starts it)"}),
        );
        // Only one answer: a second request would find the socket closed.
        let server = serve(&dir.sock(), vec![answer]);
        let (status, out, err) = rhyvectl(&[&sock_arg(&dir), "--pause", "--info"], false);
        assert_eq!(status, 1);
        assert_eq!(out, "");
        assert_eq!(
            err,
            "rhyvectl: /api/v1/vm.pause: 405 the VM is not running (vm.boot starts it)\n"
        );
        assert_eq!(server.join().unwrap().len(), 1);
    }

    #[test]
    fn an_error_without_json_uses_the_body_or_reason() {
        let dir = TempDir::new("plainerr");
        let server = serve(
            &dir.sock(),
            vec![
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 9\r\n\r\noops\nmore"
                    .to_vec(),
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n".to_vec(),
            ],
        );
        let (_, _, err) = rhyvectl(&[&sock_arg(&dir), "--resume"], false);
        assert_eq!(err, "rhyvectl: /api/v1/vm.resume: 500 oops\n");
        let (_, _, err) = rhyvectl(&[&sock_arg(&dir), "--resume"], false);
        assert_eq!(
            err,
            "rhyvectl: /api/v1/vm.resume: 503 Service Unavailable\n"
        );
        server.join().unwrap();
    }

    #[test]
    fn unreachable_socket() {
        let dir = TempDir::new("unreachable");
        let sock = dir.sock();
        let (status, out, err) = rhyvectl(&[&sock_arg(&dir), "--ping"], false);
        assert_eq!((status, out.as_str()), (1, ""));
        let s = sock.display();
        assert_eq!(
            err,
            format!(
                "rhyvectl: cannot reach rhyve at {s}: No such file or directory (os error 2) \
                 (is rhyve running with --api-socket {s} or --api?)\n"
            )
        );
    }

    #[test]
    fn malformed_responses_are_reported() {
        let dir = TempDir::new("malformed");
        let server = serve(
            &dir.sock(),
            vec![
                b"garbage\r\n\r\n".to_vec(),
                b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{\"state\"".to_vec(),
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec(),
                json_answer("200 OK", &serde_json::json!([1, 2])),
                Vec::new(),
            ],
        );
        let cases = [
            ("--info", "/api/v1/vm.info: malformed response from rhyve: expected an HTTP/1.x status line, got 'garbage'"),
            ("--info", "/api/v1/vm.info: malformed response from rhyve: the body is cut short: Content-Length is 50 but the connection closed after 8 bytes"),
            ("--info", "/api/v1/vm.info: malformed response from rhyve: the body is not JSON (expected value at line 1 column 1)"),
            ("--info", "/api/v1/vm.info: malformed response from rhyve: expected a JSON body, got none"),
            ("--get-stats", "/api/v1/vm.counters: malformed response from rhyve: vm.counters is not an object"),
            ("--info", "/api/v1/vm.info: rhyve closed the connection without answering"),
        ];
        for (action, want) in cases {
            let (status, out, err) = rhyvectl(&[&sock_arg(&dir), action], false);
            assert_eq!((status, out.as_str()), (1, ""), "{err}");
            assert_eq!(err, format!("rhyvectl: {want}\n"));
        }
        server.join().unwrap();
    }

    #[test]
    fn watch_exits_counts_samples_and_rates() {
        let dir = TempDir::new("watch");
        let server = serve(
            &dir.sock(),
            vec![
                json_answer("200 OK", &exit_stats(100)),
                json_answer("200 OK", &exit_stats(150)),
            ],
        );
        let (status, out, err) =
            rhyvectl(&[&sock_arg(&dir), "--watch-exits=0.2", "--count=2"], false);
        assert_eq!((status, err.as_str()), (0, ""));
        assert_eq!(server.join().unwrap().len(), 2);
        let frames: Vec<&str> = out.split("\n\n").collect();
        assert_eq!(frames.len(), 2, "{out}");
        assert_eq!(
            frames[0],
            "\
exits summed over 1 vCPU, sample 1 (every 0.2s): 101 exits, -/s
KIND  TOTAL  EXITS/S      P50      P99
IO      100        -  <2.05us  <2.05us
HLT       1        -  >=1.07s  >=1.07s"
        );
        // 50 more IO exits in about 0.2 s: some 250/s, less if the machine is slow.
        let io = frames[1].lines().find(|l| l.starts_with("IO")).unwrap();
        let cols: Vec<&str> = io.split_whitespace().collect();
        assert_eq!(cols[1], "150");
        let rate: f64 = cols[2].parse().unwrap();
        assert!(rate > 20.0 && rate <= 251.0, "{io}");
        assert!(!out.contains('\x1b'));
    }

    #[test]
    fn watch_exits_ends_well_when_the_vm_goes_away() {
        let dir = TempDir::new("watchend");
        let server = serve(
            &dir.sock(),
            vec![
                json_answer("200 OK", &exit_stats(1)),
                json_answer("200 OK", &exit_stats(2)),
            ],
        );
        // The server stops after two answers: the third sample is refused, and the action
        // after the watch is not tried.
        let (status, out, err) =
            rhyvectl(&[&sock_arg(&dir), "--watch-exits=0.01", "--pause"], true);
        assert_eq!(status, 0, "{err}");
        assert_eq!(out.matches(CLEAR).count(), 2);
        assert!(out.starts_with(CLEAR));
        assert!(out.contains("sample 2 (every 0.01s): 3 exits"));
        assert_eq!(
            err,
            format!(
                "rhyvectl: the VM ended ({}: Connection refused (os error 111))\n",
                dir.sock().display()
            )
        );
        assert_eq!(server.join().unwrap().len(), 2);
    }

    #[test]
    fn watch_exits_fails_when_there_was_never_a_sample() {
        let dir = TempDir::new("watchnone");
        let (status, _, err) = rhyvectl(&[&sock_arg(&dir), "--watch-exits"], false);
        assert_eq!(status, 1);
        assert!(err.starts_with("rhyvectl: cannot reach rhyve at "), "{err}");
        let server = serve(
            &dir.sock(),
            vec![json_answer(
                "404 Not Found",
                &serde_json::json!({"error": "the VM is not booted"}),
            )],
        );
        let (status, _, err) = rhyvectl(&[&sock_arg(&dir), "--watch-exits"], false);
        assert_eq!(status, 1);
        assert_eq!(
            err,
            "rhyvectl: /api/v1/vm.exit-stats: 404 the VM is not booted\n"
        );
        server.join().unwrap();
    }

    #[test]
    fn usage_errors_are_status_2_and_one_line() {
        for args in [&[][..], &["--pause"], &["--vm=a"], &["--vm=a", "--bogus"]] {
            let (status, out, err) = rhyvectl(args, false);
            assert_eq!(status, 2, "{args:?}");
            assert_eq!(out, "");
            assert!(err.starts_with("rhyvectl: "), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
        let (status, out, _) = rhyvectl(&["--help"], false);
        assert_eq!((status, out.as_str()), (0, args::HELP));
        let (status, out, _) = rhyvectl(&["--version"], false);
        assert_eq!(
            (status, out),
            (0, format!("rhyvectl {}\n", env!("CARGO_PKG_VERSION")))
        );
    }

    #[test]
    fn output_into_a_closed_pipe_is_quiet() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut err = Vec::new();
        let status = run(&[OsString::from("--help")], &mut Closed, &mut err, false);
        assert_eq!((status, err.len()), (1, 0));
    }
}
