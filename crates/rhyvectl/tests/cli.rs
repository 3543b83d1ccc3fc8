//! The rhyvectl binary as a shell sees it: exit statuses, stdout and stderr.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Command, Output};

fn rhyvectl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rhyvectl"))
        .args(args)
        .output()
        .expect("run rhyvectl")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rhyvectl-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create the temp dir");
    d
}

#[test]
fn help_and_version() {
    let o = rhyvectl(&["--help"]);
    assert_eq!(o.status.code(), Some(0));
    let help = text(&o.stdout);
    assert!(help.starts_with("usage: rhyvectl (--vm=NAME | --api-socket=PATH) ACTION..."));
    for opt in [
        "--get-stats",
        "--pause",
        "--resume",
        "--force-reset",
        "--force-poweroff",
        "--power-button",
        "--info",
        "--ping",
        "--watch-exits[=SECS]",
        "--count=N",
        "--send-migration=URL",
        "--downtime-ms=MS",
        "--max-rounds=N",
        "--receive-migration=URL",
        "--config=KEY=VALUE",
    ] {
        assert!(help.contains(opt), "--help does not mention {opt}");
    }
    assert_eq!(text(&rhyvectl(&["-h"]).stdout), help);

    let o = rhyvectl(&["--version"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        text(&o.stdout),
        format!("rhyvectl {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn usage_errors_exit_2_with_one_line() {
    for args in [
        &[][..],
        &["--pause"],
        &["--vm=a", "--api-socket=/x", "--pause"],
        &["--vm=a"],
        &["--vm=a", "--nope"],
        &["--vm=a", "--watch-exits=0"],
    ] {
        let o = rhyvectl(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(o.stdout.is_empty());
        let err = text(&o.stderr);
        assert!(err.starts_with("rhyvectl: "), "{err}");
        assert!(
            err.ends_with(" (rhyvectl --help lists the options)\n"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

#[test]
fn unreachable_exits_1() {
    let dir = temp_dir("unreachable");
    let sock = dir.join("none.sock");
    let s = sock.display().to_string();
    let o = rhyvectl(&["--api-socket", &s, "--pause"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        text(&o.stderr),
        format!(
            "rhyvectl: cannot reach rhyve at {s}: No such file or directory (os error 2) \
             (is rhyve running with --api-socket {s} or --api?)\n"
        )
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pause_then_a_refused_resume() {
    let dir = temp_dir("pause");
    let sock = dir.join("api.sock");
    let listener = UnixListener::bind(&sock).expect("bind");
    let server = std::thread::spawn(move || {
        let error = r#"{"error":"the VM is not paused"}"#;
        let answers = [
            "HTTP/1.1 204 No Content\r\n\r\n".to_string(),
            format!(
                "HTTP/1.1 405 Method Not Allowed\r\nAllow: PUT\r\nContent-Length: {}\r\n\r\n{error}",
                error.len()
            ),
        ];
        let mut lines = Vec::new();
        for answer in answers {
            let (mut stream, _) = listener.accept().expect("accept");
            let mut r = BufReader::new(&mut stream);
            let mut line = String::new();
            r.read_line(&mut line).expect("request line");
            lines.push(line);
            // The rest of the head, up to the blank line (no body is sent).
            loop {
                let mut l = String::new();
                if r.read_line(&mut l).expect("header") == 0 || l == "\r\n" {
                    break;
                }
            }
            stream.write_all(answer.as_bytes()).expect("answer");
        }
        lines
    });
    let s = sock.display().to_string();
    let o = rhyvectl(&[&format!("--api-socket={s}"), "--pause", "--resume"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty());
    assert_eq!(
        text(&o.stderr),
        "rhyvectl: /api/v1/vm.resume: 405 the VM is not paused\n"
    );
    assert_eq!(
        server.join().expect("server"),
        [
            "PUT /api/v1/vm.pause HTTP/1.1\r\n",
            "PUT /api/v1/vm.resume HTTP/1.1\r\n"
        ]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// What an in-test server got: the request line, the headers and the body.
struct Request {
    line: String,
    headers: Vec<String>,
    body: String,
}

/// A server on `sock` giving one `answer` per connection, in order; returns what it got.
fn serve(sock: &std::path::Path, answers: Vec<String>) -> std::thread::JoinHandle<Vec<Request>> {
    let listener = UnixListener::bind(sock).expect("bind");
    std::thread::spawn(move || {
        let mut got = Vec::new();
        for answer in answers {
            let (mut stream, _) = listener.accept().expect("accept");
            let mut r = BufReader::new(&mut stream);
            let mut line = String::new();
            r.read_line(&mut line).expect("request line");
            let mut headers = Vec::new();
            let mut length = 0;
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).expect("header") == 0 || h == "\r\n" {
                    break;
                }
                let h = h.trim_end().to_string();
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().expect("Content-Length");
                }
                headers.push(h);
            }
            let mut body = vec![0; length];
            std::io::Read::read_exact(&mut r, &mut body).expect("body");
            got.push(Request {
                line,
                headers,
                body: String::from_utf8(body).expect("UTF-8 body"),
            });
            stream.write_all(answer.as_bytes()).expect("answer");
        }
        got
    })
}

const NO_CONTENT: &str = "HTTP/1.1 204 No Content\r\n\r\n";

fn error_answer(status: &str, msg: &str) -> String {
    let body = serde_json::json!({ "error": msg }).to_string();
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// The request is a JSON PUT of `want` to `path`.
fn assert_put_json(req: &Request, path: &str, want: serde_json::Value) {
    assert_eq!(req.line, format!("PUT {path} HTTP/1.1\r\n"));
    assert!(
        req.headers
            .iter()
            .any(|h| h == "Content-Type: application/json"),
        "{:?}",
        req.headers
    );
    let got: serde_json::Value = serde_json::from_str(&req.body).expect("a JSON body");
    assert_eq!(got, want, "{}", req.body);
}

#[test]
fn send_migration_puts_its_data_and_exits_0_on_204() {
    let dir = temp_dir("send");
    let sock = dir.join("api.sock");
    let server = serve(&sock, vec![NO_CONTENT.into(), NO_CONTENT.into()]);
    let s = format!("--api-socket={}", sock.display());
    let o = rhyvectl(&[&s, "--send-migration=unix:/run/rhyve/dst.migrate"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(o.stdout.is_empty() && o.stderr.is_empty());
    let o = rhyvectl(&[
        &s,
        "--send-migration",
        "tcp:10.0.0.2:7000",
        "--downtime-ms",
        "50",
        "--max-rounds=5",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(o.stdout.is_empty() && o.stderr.is_empty());
    let reqs = server.join().expect("server");
    assert_put_json(
        &reqs[0],
        "/api/v1/vm.send-migration",
        serde_json::json!({"destination_url": "unix:/run/rhyve/dst.migrate"}),
    );
    assert_put_json(
        &reqs[1],
        "/api/v1/vm.send-migration",
        serde_json::json!({"destination_url": "tcp:10.0.0.2:7000", "downtime_ms": 50, "max_rounds": 5}),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_failed_send_migration_exits_1_with_rhyves_message() {
    let dir = temp_dir("sendfail");
    let sock = dir.join("api.sock");
    let msg = "vm.send-migration: tcp:10.0.0.2:7000: Connection refused (os error 111) (the VM runs on here)";
    let server = serve(&sock, vec![error_answer("500 Internal Server Error", msg)]);
    let s = format!("--api-socket={}", sock.display());
    // The failure ends rhyvectl: --info is not asked (the server would be gone).
    let o = rhyvectl(&[&s, "--send-migration=tcp:10.0.0.2:7000", "--info"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty());
    assert_eq!(
        text(&o.stderr),
        format!("rhyvectl: /api/v1/vm.send-migration: 500 {msg}\n")
    );
    let reqs = server.join().expect("server");
    assert_eq!(reqs.len(), 1);
    assert_put_json(
        &reqs[0],
        "/api/v1/vm.send-migration",
        serde_json::json!({"destination_url": "tcp:10.0.0.2:7000"}),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn receive_migration_puts_its_data_and_exits_0_on_204_1_on_409() {
    let dir = temp_dir("receive");
    let sock = dir.join("api.sock");
    let refused = "vm.receive-migration: a VM is already created (vm.delete it first)";
    let server = serve(
        &sock,
        vec![
            NO_CONTENT.into(),
            NO_CONTENT.into(),
            error_answer("409 Conflict", refused),
        ],
    );
    let s = format!("--api-socket={}", sock.display());
    let o = rhyvectl(&[&s, "--receive-migration=tcp:0.0.0.0:7000"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(o.stdout.is_empty() && o.stderr.is_empty());
    let o = rhyvectl(&[
        &s,
        "--receive-migration",
        "unix:/tmp/in.migrate",
        "--config",
        "lpc.com1.path=/tmp/b.txt",
        "--config=pci.0.3.0.path=/var/lib/disk-b.img",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(o.stdout.is_empty() && o.stderr.is_empty());
    let o = rhyvectl(&[&s, "--receive-migration=unix:/tmp/in.migrate"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty());
    assert_eq!(
        text(&o.stderr),
        format!("rhyvectl: /api/v1/vm.receive-migration: 409 {refused}\n")
    );
    let reqs = server.join().expect("server");
    assert_put_json(
        &reqs[0],
        "/api/v1/vm.receive-migration",
        serde_json::json!({"receiver_url": "tcp:0.0.0.0:7000"}),
    );
    assert_put_json(
        &reqs[1],
        "/api/v1/vm.receive-migration",
        serde_json::json!({
            "receiver_url": "unix:/tmp/in.migrate",
            "config": {"lpc.com1.path": "/tmp/b.txt", "pci.0.3.0.path": "/var/lib/disk-b.img"}
        }),
    );
    assert_put_json(
        &reqs[2],
        "/api/v1/vm.receive-migration",
        serde_json::json!({"receiver_url": "unix:/tmp/in.migrate"}),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_migration_arguments_exit_2() {
    for args in [
        &["--vm=a", "--send-migration=/tmp/dst.sock"][..],
        &["--vm=a", "--send-migration=tcp:host"],
        &["--vm=a", "--send-migration=tcp:h:1", "--downtime-ms=0"],
        &["--vm=a", "--pause", "--downtime-ms=10"],
        &["--vm=a", "--receive-migration=unix:rel"],
        &[
            "--vm=a",
            "--receive-migration=tcp:h:1",
            "--config=memory.size=1",
        ],
        &["--vm=a", "--pause", "--config=lpc.com1.path=/x"],
    ] {
        let o = rhyvectl(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(o.stdout.is_empty());
        let err = text(&o.stderr);
        assert!(err.starts_with("rhyvectl: "), "{err}");
        assert!(
            err.ends_with(" (rhyvectl --help lists the options)\n"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}
