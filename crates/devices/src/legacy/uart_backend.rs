//! Where a COM port's bytes go and come from (bhyve `uart_backend.c`): `stdio`, a file or
//! device path, or `tcp=ip:port` (a listening socket serving one client at a time).

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileTypeExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A backend as named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpec {
    Stdio,
    Path(String),
    Tcp(SocketAddr),
}

impl BackendSpec {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "stdio" {
            return Ok(BackendSpec::Stdio);
        }
        if let Some(addr) = s.strip_prefix("tcp=") {
            return addr
                .parse()
                .map(BackendSpec::Tcp)
                .map_err(|_| format!("'{addr}' is not ip:port (for example tcp=127.0.0.1:4321)"));
        }
        if s.is_empty() {
            return Err("empty backend path".into());
        }
        Ok(BackendSpec::Path(s.to_string()))
    }
}

/// The output side of a backend.
pub enum UartOut {
    Stdout,
    File(File),
    /// The connected TCP client, if any; output is dropped while nobody is connected.
    Tcp(Arc<Mutex<Option<TcpStream>>>),
}

/// The console line being written, while the boot timeline looks for its markers.
static LINE: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Lines whose appearance on a console the boot timeline records (the first time).
const MARKERS: &[&str] = &["Run /init", "login:"];

/// The boot timeline's view of console output: the first byte, and marker lines.
fn timeline(buf: &[u8]) {
    use rhyve_base::timeline;
    if buf.is_empty() {
        return;
    }
    timeline::mark_once("console: first byte");
    let mut line = LINE.lock().unwrap_or_else(|p| p.into_inner());
    for &b in buf {
        if b == b'\n' || line.len() >= 512 {
            let text = String::from_utf8_lossy(&line);
            for m in MARKERS {
                if text.contains(m) {
                    timeline::mark_once(&format!("console: {m}"));
                }
            }
            line.clear();
        } else {
            line.push(b);
        }
    }
}

impl Write for UartOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if rhyve_base::timeline::enabled() {
            timeline(buf);
        }
        match self {
            UartOut::Stdout => io::stdout().lock().write(buf),
            UartOut::File(f) => f.write(buf),
            UartOut::Tcp(client) => {
                let mut c = client.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(s) = c.as_mut() {
                    if s.write_all(buf).is_err() {
                        // The client went away: drop it so the next one can connect.
                        *c = None;
                    }
                }
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            UartOut::Stdout => io::stdout().lock().flush(),
            UartOut::File(f) => f.flush(),
            UartOut::Tcp(_) => Ok(()),
        }
    }
}

/// The input side of a backend: a source of bytes for the guest.
pub enum UartIn {
    None,
    Stdin,
    File(File),
    Tcp {
        listener: TcpListener,
        client: Arc<Mutex<Option<TcpStream>>>,
    },
}

/// An opened backend.
pub struct Backend {
    pub out: UartOut,
    pub input: UartIn,
}

static STDIO_TAKEN: AtomicBool = AtomicBool::new(false);

/// The port that owns stdio gives it back when its UART goes (a VM rebooted or deleted over
/// the API builds a new one).
impl Drop for UartOut {
    fn drop(&mut self) {
        if matches!(self, UartOut::Stdout) {
            STDIO_TAKEN.store(false, Ordering::SeqCst);
        }
    }
}

/// Where stdin's bytes go: the UART of the VM that owns stdio now.
type StdinFeed = Box<dyn FnMut(&[u8]) + Send>;
static STDIN_FEED: Mutex<Option<StdinFeed>> = Mutex::new(None);
static STDIN_PUMP: std::sync::Once = std::sync::Once::new();

/// Sends stdin's bytes to `feed` from now on. stdin is read by one thread for the process's
/// life (a blocking read cannot be taken back), which hands each chunk to the current feed.
pub fn feed_stdin(feed: StdinFeed) {
    *STDIN_FEED.lock().unwrap_or_else(|p| p.into_inner()) = Some(feed);
    STDIN_PUMP.call_once(|| {
        let started =
            rhyve_base::thread::spawn(rhyve_base::thread::Role::ConsoleBackend, "stdin", || {
                pump(io::stdin().lock(), |bytes| {
                    if let Some(f) = STDIN_FEED
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .as_mut()
                    {
                        f(bytes);
                    }
                })
            });
        if let Err(e) = started {
            log::warn!("stdin: no input thread: {e}");
        }
    });
}

/// Opens a backend. Only one port may use stdio, as in bhyve.
pub fn open(spec: &BackendSpec) -> Result<Backend, String> {
    match spec {
        BackendSpec::Stdio => {
            if STDIO_TAKEN.swap(true, Ordering::SeqCst) {
                return Err("stdio is already used by another COM port".into());
            }
            rhyve_base::term::enable_raw_stdin();
            Ok(Backend {
                out: UartOut::Stdout,
                input: UartIn::Stdin,
            })
        }
        BackendSpec::Path(p) => {
            let is_chardev = std::fs::metadata(p)
                .map(|m| m.file_type().is_char_device())
                .unwrap_or(false);
            if is_chardev {
                // A terminal or nmdm-like device: both directions.
                let f = File::options()
                    .read(true)
                    .write(true)
                    .open(p)
                    .map_err(|e| format!("cannot open {p}: {e}"))?;
                let r = f.try_clone().map_err(|e| format!("{p}: {e}"))?;
                Ok(Backend {
                    out: UartOut::File(f),
                    input: UartIn::File(r),
                })
            } else {
                // A plain file records the guest's output.
                let f = File::create(p).map_err(|e| format!("cannot create {p}: {e}"))?;
                Ok(Backend {
                    out: UartOut::File(f),
                    input: UartIn::None,
                })
            }
        }
        BackendSpec::Tcp(addr) => {
            let listener =
                TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            let client = Arc::new(Mutex::new(None));
            Ok(Backend {
                out: UartOut::Tcp(client.clone()),
                input: UartIn::Tcp { listener, client },
            })
        }
    }
}

/// Reads from `src` until EOF or error, handing each chunk to `deliver`.
pub fn pump<R: Read>(mut src: R, mut deliver: impl FnMut(&[u8])) {
    let mut buf = [0u8; 256];
    loop {
        match src.read(&mut buf) {
            Ok(0) => return,
            // `read` never reports more than the buffer's length; a reader that did is done.
            Ok(n) => match buf.get(..n) {
                Some(chunk) => deliver(chunk),
                None => return,
            },
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
}

/// Serves TCP clients one at a time: a second client is refused while one is connected.
pub fn serve_tcp(
    listener: TcpListener,
    client: Arc<Mutex<Option<TcpStream>>>,
    deliver: impl FnMut(&[u8]) + Clone + Send + 'static,
) {
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let mut c = client.lock().unwrap_or_else(|p| p.into_inner());
        if c.is_some() {
            log::info!("COM port: refusing a second TCP client");
            drop(stream);
            continue;
        }
        let Ok(reader) = stream.try_clone() else {
            continue;
        };
        *c = Some(stream);
        drop(c);
        let client = client.clone();
        let deliver = deliver.clone();
        rhyve_base::thread::spawn(
            rhyve_base::thread::Role::ConsoleBackend,
            "uart tcp",
            move || {
                pump(reader, deliver);
                *client.lock().unwrap_or_else(|p| p.into_inner()) = None;
            },
        )
        .ok();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn spec_parsing() {
        assert_eq!(BackendSpec::parse("stdio").unwrap(), BackendSpec::Stdio);
        assert_eq!(
            BackendSpec::parse("/tmp/x").unwrap(),
            BackendSpec::Path("/tmp/x".into())
        );
        assert_eq!(
            BackendSpec::parse("tcp=127.0.0.1:4321").unwrap(),
            BackendSpec::Tcp("127.0.0.1:4321".parse().unwrap())
        );
        assert!(BackendSpec::parse("tcp=localhost").is_err());
        assert!(BackendSpec::parse("").is_err());
    }
}
