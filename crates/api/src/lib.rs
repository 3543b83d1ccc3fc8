//! rhyve's control API (cloud-hypervisor's REST API where rhyve has the feature): an HTTP/1.1
//! server on a unix socket, on its own thread (`Role::Api`).
//!
//! The API thread parses requests and answers the ones it can refuse on its own (malformed
//! HTTP, unknown paths, wrong methods, bad JSON). Every other request becomes a [`Call`] for
//! the main thread, which owns the VM: [`Api::fd`] becomes readable, the main loop takes the
//! calls ([`Api::take`]) and answers each ([`Call::reply`]); the API thread writes the answer.
//! Nothing here touches a vCPU or guest memory, and a slow or hostile client only ever holds
//! its own connection.

pub mod http;
pub mod routes;
mod server;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde_json::{json, Value};
use vmm_sys_util::eventfd::EventFd;

pub use routes::Endpoint;

/// An answer: a status, a JSON body for anything but 204, and for a 405 the method allowed.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: Option<Value>,
    pub allow: Option<&'static str>,
}

impl Reply {
    /// 200 with a body.
    pub fn ok(body: Value) -> Reply {
        Reply {
            status: 200,
            body: Some(body),
            allow: None,
        }
    }

    /// 204: done, nothing to say.
    pub fn done() -> Reply {
        Reply {
            status: 204,
            body: None,
            allow: None,
        }
    }

    /// An error status with `{"error": msg}`.
    pub fn error(status: u16, msg: impl Into<String>) -> Reply {
        Reply {
            status,
            body: Some(json!({ "error": msg.into() })),
            allow: None,
        }
    }
}

/// A request for the main thread. Dropped without an answer, it answers 500 itself, so a
/// client never waits for an answer that cannot come.
pub struct Call {
    pub endpoint: Endpoint,
    conn: u64,
    replies: Option<ReplyTo>,
}

/// Where a call's answer goes: the API thread's answer channel and its wake-up event.
type ReplyTo = (Sender<(u64, Reply)>, Arc<EventFd>);

impl Call {
    pub fn reply(mut self, r: Reply) {
        self.send(r);
    }

    fn send(&mut self, r: Reply) {
        if let Some((tx, evt)) = self.replies.take() {
            // The API thread may be gone (rhyve is stopping): then nobody is waiting.
            if tx.send((self.conn, r)).is_ok() {
                let _ = evt.write(1);
            }
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.send(Reply::error(
            500,
            "rhyve dropped this request unanswered (a bug)",
        ));
    }
}

/// Errors opening the API socket; each says what to do.
#[derive(Debug)]
pub struct ApiError(pub String);

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ApiError {}

/// The running API server.
pub struct Api {
    calls: Receiver<Call>,
    ready: EventFd,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

/// Binds `path`: a socket nobody listens on any more is replaced; a live one, or a file that
/// is not a socket, is left alone and refused.
fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    let shown = path.display();
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(ApiError(format!(
                "--api-socket {shown}: the path exists and is not a socket; choose another path"
            )));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ApiError(format!(
                "--api-socket {shown}: another process is serving this socket (another rhyve?); stop it or choose another path"
            )));
        }
        std::fs::remove_file(path).map_err(|e| {
            ApiError(format!(
                "--api-socket {shown}: cannot replace the stale socket: {e}"
            ))
        })?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| {
            ApiError(format!(
                "--api-socket {shown}: cannot create {}: {e}",
                dir.display()
            ))
        })?;
    }
    let l = UnixListener::bind(path)
        .map_err(|e| ApiError(format!("--api-socket {shown}: cannot listen: {e}")))?;
    // Only the owner may drive the VM (Firecracker and cloud-hypervisor do the same).
    use std::os::unix::fs::PermissionsExt;
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        log::warn!("--api-socket {shown}: cannot make the socket owner-only: {e}");
    }
    Ok(l)
}

impl Api {
    /// Listens on `path` and starts the API thread.
    pub fn start(path: &Path) -> Result<Api, ApiError> {
        let listener = bind(path)?;
        let io = |e: std::io::Error| ApiError(format!("API server: {e}"));
        let ready = EventFd::new(libc::EFD_NONBLOCK).map_err(io)?;
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(io)?);
        let (tx, calls) = std::sync::mpsc::channel();
        let srv = server::Server::new(listener, tx, ready.try_clone().map_err(io)?, stop.clone())
            .map_err(io)?;
        let thread =
            rhyve_base::thread::spawn(rhyve_base::thread::Role::Api, "api", move || srv.run())
                .map_err(io)?;
        log::info!("API listening on {}", path.display());
        Ok(Api {
            calls,
            ready,
            stop,
            thread: Some(thread),
            path: path.to_path_buf(),
        })
    }

    /// Readable when calls wait for [`Api::take`].
    pub fn fd(&self) -> RawFd {
        self.ready.as_raw_fd()
    }

    /// The calls waiting for the main thread.
    pub fn take(&self) -> Vec<Call> {
        let _ = self.ready.read();
        self.calls.try_iter().collect()
    }

    /// Stops the API thread once the answers given so far are written, and removes the socket.
    pub fn shutdown(&mut self) {
        let Some(t) = self.thread.take() else { return };
        // Answer what was never taken, so no client waits for rhyve to go away.
        for c in self.calls.try_iter() {
            c.reply(Reply::error(503, "rhyve is shutting down"));
        }
        let _ = self.stop.write(1);
        let _ = t.join();
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        self.shutdown();
    }
}
