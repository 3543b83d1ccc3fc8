//! The HTTP/1.1 subset the API speaks: one request at a time per connection, bodies by
//! `Content-Length` only, every limit enforced before anything is buffered past it.
//! Everything here handles bytes from whoever can open the socket: nothing may panic.

/// Largest request line plus headers.
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest request body (a VmConfig is a few KiB).
pub const MAX_BODY: usize = 1 << 20;

/// One parsed request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The target without its query string.
    pub path: String,
    pub body: Vec<u8>,
    /// The connection closes after the answer (`Connection: close`, or HTTP/1.0 without
    /// keep-alive).
    pub close: bool,
}

/// What the bytes so far amount to.
#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// More bytes are needed; `expect_continue` when the client waits for `100 Continue`
    /// before it sends the body.
    Incomplete { expect_continue: bool },
    /// A whole request, and how many bytes of the buffer it took.
    Done(Request, usize),
}

/// A request the server refuses: the status to answer, and why. The connection closes after
/// it (what follows a malformed request cannot be framed).
#[derive(Debug, PartialEq, Eq)]
pub struct HttpError {
    pub status: u16,
    pub msg: String,
}

fn refuse(status: u16, msg: impl Into<String>) -> HttpError {
    HttpError {
        status,
        msg: msg.into(),
    }
}

/// Where the header block ends: the index just past its blank line.
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0usize;
    while let Some(nl) = buf.get(i..)?.iter().position(|&b| b == b'\n') {
        let line_end = i.checked_add(nl)?;
        let next = line_end.checked_add(1)?;
        match buf.get(next) {
            Some(b'\n') => return next.checked_add(1),
            Some(b'\r') if buf.get(next.checked_add(1)?) == Some(&b'\n') => {
                return next.checked_add(2)
            }
            _ => i = next,
        }
    }
    None
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Parses the request at the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<Parse, HttpError> {
    let Some(end) = head_end(buf) else {
        if buf.len() > MAX_HEAD {
            return Err(refuse(431, "the request line and headers exceed 16 KiB"));
        }
        return Ok(Parse::Incomplete {
            expect_continue: false,
        });
    };
    if end > MAX_HEAD {
        return Err(refuse(431, "the request line and headers exceed 16 KiB"));
    }
    let head = buf.get(..end).unwrap_or_default();
    let head = std::str::from_utf8(head).map_err(|_| refuse(400, "headers are not UTF-8"))?;
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(refuse(
            400,
            "malformed request line (expected METHOD /path HTTP/1.1)",
        ));
    };
    if !is_token(method) {
        return Err(refuse(400, "malformed method in the request line"));
    }
    if !target.starts_with('/') {
        return Err(refuse(
            400,
            "the request target must be a path starting with /",
        ));
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        v if v.starts_with("HTTP/") => {
            return Err(refuse(505, format!("{v} is not supported: use HTTP/1.1")))
        }
        _ => return Err(refuse(400, "malformed HTTP version in the request line")),
    };
    let mut close = http10;
    let mut length: Option<usize> = None;
    let mut expect_continue = false;
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(refuse(
                400,
                format!("malformed header line '{}'", clip(line)),
            ));
        };
        if !is_token(name) {
            return Err(refuse(
                400,
                format!("malformed header name '{}'", clip(name)),
            ));
        }
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => {
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(refuse(400, "Content-Length is not a number"));
                }
                let n = value.parse::<usize>().unwrap_or(usize::MAX);
                if length.is_some_and(|l| l != n) {
                    return Err(refuse(400, "two different Content-Length headers"));
                }
                if n > MAX_BODY {
                    return Err(refuse(413, "the request body exceeds 1 MiB"));
                }
                length = Some(n);
            }
            "transfer-encoding" => {
                return Err(refuse(
                    411,
                    "chunked or encoded bodies are not accepted: send Content-Length",
                ))
            }
            "connection" => {
                let v = value.to_ascii_lowercase();
                if v.split(',').any(|t| t.trim() == "close") {
                    close = true;
                } else if v.split(',').any(|t| t.trim() == "keep-alive") {
                    close = false;
                }
            }
            "expect" => {
                if value.eq_ignore_ascii_case("100-continue") {
                    expect_continue = true;
                } else {
                    return Err(refuse(417, format!("cannot meet Expect: {}", clip(value))));
                }
            }
            _ => {}
        }
    }
    let length = length.unwrap_or(0);
    let total = end
        .checked_add(length)
        .ok_or_else(|| refuse(413, "the request body is too large"))?;
    let Some(body) = buf.get(end..total) else {
        return Ok(Parse::Incomplete { expect_continue });
    };
    let path = target
        .split(['?', '#'])
        .next()
        .unwrap_or_default()
        .to_string();
    Ok(Parse::Done(
        Request {
            method: method.to_string(),
            path,
            body: body.to_vec(),
            close,
        },
        total,
    ))
}

/// At most 64 characters of something a client sent, for an error message.
fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}

/// The reason phrase of the statuses the API answers with.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// An encoded response. A 204 carries neither body nor Content-Length; everything else a
/// JSON body (possibly empty).
pub fn response(status: u16, body: &[u8], close: bool, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} {}\r\nServer: rhyve\r\n", reason(status));
    if status != 204 {
        out.push_str("Content-Type: application/json\r\n");
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    for (k, v) in extra {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if close {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    if status != 204 {
        out.extend_from_slice(body);
    }
    out
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    fn done(buf: &[u8]) -> (Request, usize) {
        match parse(buf) {
            Ok(Parse::Done(r, n)) => (r, n),
            other => panic!("expected a request, got {other:?}"),
        }
    }

    fn status(buf: &[u8]) -> u16 {
        match parse(buf) {
            Err(e) => e.status,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_get_and_a_put_with_a_body_parse_and_say_how_much_they_took() {
        let (r, n) = done(b"GET /api/v1/vmm.ping?x=1 HTTP/1.1\r\nHost: localhost\r\n\r\nGET");
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), r.close),
            ("GET", "/api/v1/vmm.ping", false)
        );
        assert_eq!(n, 54);
        let req =
            b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
        let (r, n) = done(req);
        assert_eq!(
            (r.body.as_slice(), r.close, n),
            (&b"{}"[..], true, req.len())
        );
        // Bare LF line ends are accepted; HTTP/1.0 closes unless asked to keep alive.
        let (r, _) = done(b"GET / HTTP/1.0\n\n");
        assert!(r.close);
        let (r, _) = done(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
        assert!(!r.close);
    }

    #[test]
    fn partial_requests_wait_for_more_and_expect_continue_is_reported() {
        for cut in 0..40 {
            let req = b"PUT /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello";
            if cut < req.len() {
                assert!(
                    matches!(parse(&req[..cut]), Ok(Parse::Incomplete { .. })),
                    "{cut}"
                );
            }
        }
        let r = parse(b"PUT /a HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(
            r,
            Ok(Parse::Incomplete {
                expect_continue: true
            })
        );
    }

    #[test]
    fn malformed_and_oversized_requests_get_their_status() {
        assert_eq!(status(b"GET\r\n\r\n"), 400);
        assert_eq!(status(b"GET /a HTTP/1.1 extra\r\n\r\n"), 400);
        assert_eq!(status(b"GET a HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"G(T /a HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"GET /a HTTP/2.0\r\n\r\n"), 505);
        assert_eq!(status(b"GET /a FTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"GET /a HTTP/1.1\r\nno colon\r\n\r\n"), 400);
        assert_eq!(status(b"GET /a HTTP/1.1\r\nbad name: x\r\n\r\n"), 400);
        assert_eq!(
            status(b"PUT /a HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"PUT /a HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"PUT /a HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"),
            413
        );
        assert_eq!(
            status(b"PUT /a HTTP/1.1\r\nContent-Length: 1048577\r\n\r\n"),
            413
        );
        assert_eq!(
            status(b"PUT /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            411
        );
        assert_eq!(status(b"PUT /a HTTP/1.1\r\nExpect: magic\r\n\r\n"), 417);
        assert_eq!(status(b"GET /\xff HTTP/1.1\r\n\r\n"), 400);
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_HEAD + 1, b'a');
        assert_eq!(status(&long), 431);
        long.extend_from_slice(b"\r\n\r\n");
        assert_eq!(status(&long), 431);
    }

    #[test]
    fn responses_carry_their_length_and_a_204_carries_nothing() {
        let r = response(200, b"{}", false, &[]);
        let text = String::from_utf8(r).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(
            text.contains("Content-Length: 2\r\n") && text.ends_with("\r\n\r\n{}"),
            "{text}"
        );
        let text = String::from_utf8(response(204, b"ignored", true, &[("Allow", "PUT")])).unwrap();
        assert!(!text.contains("Content-Length") && text.ends_with("Connection: close\r\n\r\n"));
        assert!(text.contains("Allow: PUT\r\n"), "{text}");
    }
}
