//! A tiny HTTP/1.1 client over a unix socket: one request per connection (`Connection: close`),
//! the response read as a status line, headers, then Content-Length bytes or up to EOF.
//!
//! Everything read from the socket is checked: a response that is not HTTP, that is cut short,
//! or that is too large is an [`Error::Malformed`] saying what was wrong, never a panic.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How long rhyve may take to answer (and to take the request).
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// How long rhyve may take to answer vm.send-migration and vm.receive-migration, which answer
/// when the migration is over: a minute more than rhyve itself waits for one (3600 s), so
/// that its own answer to a migration that takes too long comes first.
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(3600 + 60);
/// The most header bytes taken before giving up on a response (rhyve's own limit is 16 KiB).
const MAX_HEADER_BYTES: u64 = 64 * 1024;
/// The most body bytes taken (rhyve's answers are a few KiB).
const MAX_BODY_BYTES: u64 = 16 * 1024 * 1024;

/// A response from rhyve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    /// Header names as sent, values trimmed, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Why a request got no usable response.
#[derive(Debug)]
pub enum Error {
    /// The socket could not be connected to (no such file, nobody listening, no permission).
    Connect(io::Error),
    /// The connection was closed (or reset) before a status line came.
    Closed,
    /// No answer (or the request not taken) within this time: [`TIMEOUT`], or the longer
    /// one the request was given.
    TimedOut(Duration),
    /// Reading or writing failed after connecting.
    Io(io::Error),
    /// What came back is not an HTTP response we can use.
    Malformed(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Connect(e) => write!(f, "cannot connect: {e}"),
            Error::Closed => write!(f, "rhyve closed the connection without answering"),
            Error::TimedOut(t) => {
                write!(f, "no answer from rhyve within {} s", t.as_secs_f64())
            }
            Error::Io(e) => write!(f, "talking to rhyve: {e}"),
            Error::Malformed(m) => write!(f, "malformed response from rhyve: {m}"),
        }
    }
}

fn malformed(msg: impl Into<String>) -> Error {
    Error::Malformed(msg.into())
}

/// The bytes of a request for `path` (absolute, e.g. `/api/v1/vm.pause`). A JSON body gets its
/// Content-Type and Content-Length; a PUT or POST without one says `Content-Length: 0`.
pub fn format_request(method: &str, path: &str, body: Option<&[u8]>) -> Vec<u8> {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\n\
         Host: localhost\r\n\
         User-Agent: rhyvectl/{}\r\n\
         Accept: application/json\r\n\
         Connection: close\r\n",
        env!("CARGO_PKG_VERSION")
    );
    match body {
        Some(b) => {
            head.push_str("Content-Type: application/json\r\n");
            head.push_str(&format!("Content-Length: {}\r\n", b.len()));
        }
        None if method != "GET" && method != "HEAD" => head.push_str("Content-Length: 0\r\n"),
        None => {}
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    if let Some(b) = body {
        out.extend_from_slice(b);
    }
    out
}

/// Sends one request to the API socket at `socket` and reads the response, which must come
/// within `answer_within` ([`TIMEOUT`] for most calls); the request itself must be taken
/// within [`TIMEOUT`].
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    answer_within: Duration,
) -> Result<Response, Error> {
    let mut stream = UnixStream::connect(socket).map_err(Error::Connect)?;
    stream
        .set_read_timeout(Some(answer_within))
        .map_err(Error::Io)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(Error::Io)?;
    stream
        .write_all(&format_request(method, path, body))
        .map_err(|e| match e.kind() {
            // rhyve went away between accepting and reading.
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => Error::Closed,
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::TimedOut(TIMEOUT),
            _ => Error::Io(e),
        })?;
    stream.flush().map_err(Error::Io)?;
    read_response(stream).map_err(|e| match e {
        Error::TimedOut(_) => Error::TimedOut(answer_within),
        e => e,
    })
}

/// Maps a read error: before the status line a reset is the server going away. A time-out
/// says [`TIMEOUT`]; [`request`] puts in the time the read was given.
fn read_error(e: io::Error, before_status: bool) -> Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::TimedOut(TIMEOUT),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe if before_status => {
            Error::Closed
        }
        _ => Error::Io(e),
    }
}

/// Reads one line (up to LF) of at most `budget` bytes, without its CR LF; None at EOF.
fn read_line<R: BufRead>(
    r: &mut R,
    budget: &mut u64,
    before_status: bool,
) -> Result<Option<Vec<u8>>, Error> {
    let mut line = Vec::new();
    let n = r
        .by_ref()
        .take(*budget)
        .read_until(b'\n', &mut line)
        .map_err(|e| read_error(e, before_status))?;
    *budget = budget.saturating_sub(n as u64);
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        if *budget == 0 {
            return Err(malformed(format!(
                "the header block is larger than {MAX_HEADER_BYTES} bytes"
            )));
        }
        return Err(malformed(
            "the connection closed in the middle of the header block",
        ));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(line))
}

/// Parses `HTTP/1.x SSS reason`.
fn parse_status_line(line: &[u8]) -> Result<(u16, String), Error> {
    let text = String::from_utf8_lossy(line);
    let shown = || text.chars().take(80).collect::<String>();
    let mut parts = text.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    let code = parts.next().unwrap_or("");
    let reason = parts.next().unwrap_or("").trim();
    if !version.starts_with("HTTP/1.") {
        return Err(malformed(format!(
            "expected an HTTP/1.x status line, got '{}'",
            shown()
        )));
    }
    let status = match code.parse::<u16>() {
        Ok(s) if code.len() == 3 && (100..=599).contains(&s) => s,
        _ => {
            return Err(malformed(format!(
                "bad status code in status line '{}'",
                shown()
            )))
        }
    };
    Ok((status, reason.to_string()))
}

/// Parses one `Name: value` header line.
fn parse_header(line: &[u8]) -> Result<(String, String), Error> {
    let text = String::from_utf8_lossy(line);
    let shown = || text.chars().take(80).collect::<String>();
    let Some((name, value)) = text.split_once(':') else {
        return Err(malformed(format!(
            "header line without a colon: '{}'",
            shown()
        )));
    };
    let valid_name = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
    if !valid_name {
        return Err(malformed(format!("bad header name in '{}'", shown())));
    }
    Ok((name.to_string(), value.trim().to_string()))
}

/// Reads a response from `r`: status line, headers, then the body (Content-Length bytes, or up
/// to EOF when there is no Content-Length; none for 1xx, 204 and 304). Interim 1xx responses
/// are skipped.
pub fn read_response<R: Read>(r: R) -> Result<Response, Error> {
    let mut r = BufReader::new(r);
    loop {
        let resp = read_one(&mut r)?;
        if !(100..200).contains(&resp.status) {
            return Ok(resp);
        }
    }
}

fn read_one<R: BufRead>(r: &mut R) -> Result<Response, Error> {
    let mut budget = MAX_HEADER_BYTES;
    let Some(status_line) = read_line(r, &mut budget, true)? else {
        return Err(Error::Closed);
    };
    let (status, reason) = parse_status_line(&status_line)?;
    let mut headers = Vec::new();
    loop {
        match read_line(r, &mut budget, false)? {
            None => {
                return Err(malformed(
                    "the connection closed before the end of the headers",
                ))
            }
            Some(line) if line.is_empty() => break,
            Some(line) if line.starts_with(b" ") || line.starts_with(b"\t") => {
                return Err(malformed("folded header lines are not accepted"));
            }
            Some(line) => headers.push(parse_header(&line)?),
        }
    }
    let mut resp = Response {
        status,
        reason,
        headers,
        body: Vec::new(),
    };
    if (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(resp);
    }
    if resp.header("Transfer-Encoding").is_some() {
        return Err(malformed(
            "Transfer-Encoding is not supported (rhyve sends Content-Length)",
        ));
    }
    let mut length: Option<u64> = None;
    for (name, value) in &resp.headers {
        if !name.eq_ignore_ascii_case("Content-Length") {
            continue;
        }
        let n = match value.parse::<u64>() {
            Ok(n) if value.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(malformed(format!("bad Content-Length '{value}'"))),
        };
        if length.is_some_and(|l| l != n) {
            return Err(malformed("two different Content-Length headers"));
        }
        length = Some(n);
    }
    match length {
        Some(n) if n > MAX_BODY_BYTES => {
            return Err(malformed(format!(
                "a body of {n} bytes is more than the {MAX_BODY_BYTES} accepted"
            )))
        }
        Some(n) => {
            r.by_ref()
                .take(n)
                .read_to_end(&mut resp.body)
                .map_err(|e| read_error(e, false))?;
            let got = resp.body.len() as u64;
            if got < n {
                return Err(malformed(format!(
                    "the body is cut short: Content-Length is {n} but the connection closed after {got} bytes"
                )));
            }
        }
        None => {
            r.by_ref()
                .take(MAX_BODY_BYTES + 1)
                .read_to_end(&mut resp.body)
                .map_err(|e| read_error(e, false))?;
            if resp.body.len() as u64 > MAX_BODY_BYTES {
                return Err(malformed(format!(
                    "the body is more than the {MAX_BODY_BYTES} bytes accepted"
                )));
            }
        }
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Result<Response, Error> {
        read_response(bytes)
    }

    fn malformed_msg(bytes: &[u8]) -> String {
        match parse(bytes) {
            Err(Error::Malformed(m)) => m,
            other => panic!(
                "{:?}: expected Malformed, got {other:?}",
                String::from_utf8_lossy(bytes)
            ),
        }
    }

    /// A reader that fails with `kind` once its bytes run out.
    struct Failing(&'static [u8], io::ErrorKind);
    impl Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0.is_empty() {
                return Err(io::Error::from(self.1));
            }
            let n = buf.len().min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn request_bytes() {
        let get = String::from_utf8(format_request("GET", "/api/v1/vm.info", None)).unwrap();
        assert_eq!(
            get,
            format!(
                "GET /api/v1/vm.info HTTP/1.1\r\nHost: localhost\r\nUser-Agent: rhyvectl/{}\r\n\
                 Accept: application/json\r\nConnection: close\r\n\r\n",
                env!("CARGO_PKG_VERSION")
            )
        );
        let put = String::from_utf8(format_request("PUT", "/api/v1/vm.pause", None)).unwrap();
        assert!(put.starts_with("PUT /api/v1/vm.pause HTTP/1.1\r\n"));
        assert!(put.ends_with("Connection: close\r\nContent-Length: 0\r\n\r\n"));
        let body = br#"{"a":1}"#;
        let with = format_request("PUT", "/api/v1/vm.create", Some(body));
        let with = String::from_utf8(with).unwrap();
        assert!(with.contains("\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n"));
        assert!(with.ends_with("\r\n\r\n{\"a\":1}"));
    }

    #[test]
    fn status_headers_and_body_with_content_length() {
        let r = parse(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\ncontent-length: 11\r\n\
              X-Empty:\r\n\r\n{\"ok\":true}trailing garbage is not read",
        )
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.reason, "OK");
        assert_eq!(r.header("Content-Type"), Some("application/json"));
        assert_eq!(r.header("CONTENT-LENGTH"), Some("11"));
        assert_eq!(r.header("x-empty"), Some(""));
        assert_eq!(r.header("Allow"), None);
        assert_eq!(r.body, b"{\"ok\":true}");
    }

    #[test]
    fn body_until_eof_without_content_length_and_bare_lf() {
        let r = parse(b"HTTP/1.0 404 Not Found\nServer: x\n\n{\"error\": \"no\"}\n").unwrap();
        assert_eq!((r.status, r.reason.as_str()), (404, "Not Found"));
        assert_eq!(r.header("server"), Some("x"));
        assert_eq!(r.body, b"{\"error\": \"no\"}\n");
    }

    #[test]
    fn no_body_for_204_and_interim_responses_are_skipped() {
        let r = parse(b"HTTP/1.1 204 No Content\r\n\r\nnot a body").unwrap();
        assert_eq!(r.status, 204);
        assert!(r.body.is_empty());
        let r =
            parse(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"{}"[..]));
        // A status line with no reason phrase.
        let r = parse(b"HTTP/1.1 405\r\nAllow: GET\r\nContent-Length: 0\r\n\r\n").unwrap();
        assert_eq!((r.status, r.reason.as_str()), (405, ""));
        assert_eq!(r.header("allow"), Some("GET"));
    }

    #[test]
    fn truncated_responses() {
        assert!(matches!(parse(b""), Err(Error::Closed)));
        assert!(malformed_msg(b"HTTP/1.1 200 OK").contains("middle of the header block"));
        assert!(malformed_msg(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n")
            .contains("before the end of the headers"));
        let m = malformed_msg(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{\"a\":");
        assert!(
            m.contains("Content-Length is 10") && m.contains("after 5 bytes"),
            "{m}"
        );
    }

    #[test]
    fn garbage() {
        assert!(
            malformed_msg(b"SSH-2.0-OpenSSH_9.6\r\n").contains("expected an HTTP/1.x status line")
        );
        assert!(malformed_msg(b"\x00\xff\xfe\n").contains("status line"));
        assert!(malformed_msg(b"HTTP/1.1 2000 OK\r\n\r\n").contains("bad status code"));
        assert!(malformed_msg(b"HTTP/1.1 abc OK\r\n\r\n").contains("bad status code"));
        assert!(malformed_msg(b"HTTP/1.1 099 X\r\n\r\n").contains("bad status code"));
        assert!(malformed_msg(b"HTTP/2 200\r\n\r\n").contains("HTTP/1.x"));
        assert!(
            malformed_msg(b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n").contains("without a colon")
        );
        assert!(
            malformed_msg(b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n").contains("bad header name")
        );
        assert!(malformed_msg(b"HTTP/1.1 200 OK\r\n: x\r\n\r\n").contains("bad header name"));
        assert!(malformed_msg(b"HTTP/1.1 200 OK\r\nA: b\r\n  folded\r\n\r\n").contains("folded"));
        for cl in ["-1", "+5", "1 2", "0x10", "99999999999999999999999"] {
            let m = malformed_msg(
                format!("HTTP/1.1 200 OK\r\nContent-Length: {cl}\r\n\r\n").as_bytes(),
            );
            assert!(m.contains("bad Content-Length"), "{cl}: {m}");
        }
        assert!(malformed_msg(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
        )
        .contains("two different"));
        assert!(
            malformed_msg(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n")
                .contains("more than")
        );
        assert!(
            malformed_msg(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
                .contains("Transfer-Encoding")
        );
    }

    #[test]
    fn an_endless_header_block_is_refused() {
        let mut big = b"HTTP/1.1 200 OK\r\n".to_vec();
        while big.len() < 70 * 1024 {
            big.extend_from_slice(
                b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
            );
        }
        assert!(malformed_msg(&big).contains("larger than"));
        // One line with no end at all.
        let line = vec![b'a'; 70 * 1024];
        assert!(malformed_msg(&line).contains("larger than"));
    }

    #[test]
    fn read_errors_are_sorted() {
        let r = read_response(Failing(b"", io::ErrorKind::ConnectionReset));
        assert!(matches!(r, Err(Error::Closed)));
        let r = read_response(Failing(
            b"HTTP/1.1 200 OK\r\n",
            io::ErrorKind::ConnectionReset,
        ));
        assert!(matches!(r, Err(Error::Io(_))));
        let r = read_response(Failing(b"HTTP/1.1 200", io::ErrorKind::WouldBlock));
        assert!(matches!(r, Err(Error::TimedOut(_))));
    }

    #[test]
    fn a_read_times_out_after_the_time_it_was_given() {
        use std::os::unix::net::UnixListener;
        let dir = std::env::temp_dir().join(format!("rhyvectl-http-slow-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("slow.sock");
        // A server that takes the request and never answers.
        let listener = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            std::thread::sleep(Duration::from_millis(500));
            drop(stream);
        });
        let t = std::time::Instant::now();
        let r = request(
            &sock,
            "PUT",
            "/api/v1/vm.pause",
            None,
            Duration::from_millis(100),
        );
        let e = r.unwrap_err();
        assert!(
            matches!(e, Error::TimedOut(d) if d == Duration::from_millis(100)),
            "{e:?}"
        );
        assert!(t.elapsed() < Duration::from_millis(450));
        assert_eq!(e.to_string(), "no answer from rhyve within 0.1 s");
        assert_eq!(
            Error::TimedOut(TIMEOUT).to_string(),
            "no answer from rhyve within 30 s"
        );
        assert_eq!(
            Error::TimedOut(MIGRATION_TIMEOUT).to_string(),
            "no answer from rhyve within 3660 s"
        );
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn connect_failure_is_a_connect_error() {
        let dir = std::env::temp_dir().join(format!("rhyvectl-http-{}", std::process::id()));
        let r = request(
            &dir.join("nothing.sock"),
            "GET",
            "/api/v1/vmm.ping",
            None,
            TIMEOUT,
        );
        match r {
            Err(Error::Connect(e)) => assert_eq!(e.kind(), io::ErrorKind::NotFound),
            other => panic!("{other:?}"),
        }
    }
}
