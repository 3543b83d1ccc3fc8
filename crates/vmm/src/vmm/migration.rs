//! Live migration of a running VM to another rhyve process (cloud-hypervisor's
//! `vm.send-migration` / `vm.receive-migration`), over a unix socket or TCP. The protocol is in
//! docs/migration.md:
//!
//! 1. the source sends its manifest (the snapshot format's: config, RAM regions, vCPUs,
//!    disks); the destination builds that VM, not started, and acknowledges;
//! 2. pre-copy: the source turns on KVM's dirty log, sends every non-zero page, then in rounds
//!    the pages written since (by the vCPUs: KVM's log; by the devices: guest memory's own
//!    dirty bitmap), until what is left would go within the downtime target at the rate the
//!    last round went (or the rounds run out);
//! 3. stop-and-copy: the source pauses the VM (in-flight I/O completes), sends the last dirty
//!    pages and the machine state (vCPUs, devices, irqchip, PIT, clock);
//! 4. the destination applies it, still paused, and says it is ready; the source answers
//!    commit and stops; the destination resumes. Until the commit, any failure (a cut
//!    connection, a refusal, a timeout) leaves the source running and the destination
//!    without a VM.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rhyve_config::Config;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use super::snapshot::{self, MachineState, Manifest};
use super::Vm;

const PAGE: u64 = 4096;
/// Pages go in runs of at most this many bytes, one message each.
const RUN: usize = 1 << 20;
/// The manifest and the machine state are JSON of at most this size.
const MAX_JSON: u64 = 64 << 20;
/// Silence this long on the connection ends the migration (the other side is gone).
const SILENCE: Duration = Duration::from_secs(30);
/// How long the destination waits for the source to connect.
pub const ACCEPT: Duration = Duration::from_secs(120);
/// How long the source retries connecting (the destination may still be setting up).
const CONNECT: Duration = Duration::from_secs(5);

/// Message kinds: one byte, then the payload's length (u64, little-endian), then the payload.
const HELLO: u8 = 1;
const PAGES: u8 = 2;
const STATE: u8 = 3;
const REPLY: u8 = 4;
const COMMIT: u8 = 5;

/// Where a migration goes: `unix:/path` or `tcp:host:port` (cloud-hypervisor's forms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Url {
    Unix(PathBuf),
    Tcp(String),
}

impl Url {
    pub fn parse(s: &str) -> Result<Url, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            let p = p.strip_prefix("//").unwrap_or(p);
            if !p.starts_with('/') {
                return Err(format!("{s}: unix:/absolute/path expected"));
            }
            return Ok(Url::Unix(PathBuf::from(p)));
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            let a = a.strip_prefix("//").unwrap_or(a);
            match a.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {
                    return Ok(Url::Tcp(a.to_string()))
                }
                _ => return Err(format!("{s}: tcp:host:port expected")),
            }
        }
        Err(format!("{s}: unix:/path or tcp:host:port expected"))
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Url::Unix(p) => write!(f, "unix:{}", p.display()),
            Url::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// One migration connection.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
            Stream::Tcp(s) => {
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
        }
    }

    fn io(&mut self) -> &mut dyn ReadWrite {
        match self {
            Stream::Unix(s) => s,
            Stream::Tcp(s) => s,
        }
    }

    fn send(&mut self, kind: u8, parts: &[&[u8]]) -> Result<(), String> {
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let mut head = [0u8; 9];
        head[0] = kind;
        head[1..].copy_from_slice(&len.to_le_bytes());
        let w = self.io();
        w.write_all(&head).map_err(lost)?;
        for p in parts {
            w.write_all(p).map_err(lost)?;
        }
        Ok(())
    }

    fn send_json(&mut self, kind: u8, v: &impl Serialize) -> Result<(), String> {
        let data = serde_json::to_vec(v).map_err(|e| e.to_string())?;
        self.send(kind, &[&data])
    }

    /// The next message's kind and length (at most `max`); its payload follows.
    fn head(&mut self, max: u64) -> Result<(u8, u64), String> {
        let mut head = [0u8; 9];
        self.io().read_exact(&mut head).map_err(lost)?;
        let mut n = [0u8; 8];
        n.copy_from_slice(&head[1..]);
        let len = u64::from_le_bytes(n);
        if len > max {
            return Err(format!(
                "a message of {len} bytes (kind {}): not a rhyve migration",
                head[0]
            ));
        }
        Ok((head[0], len))
    }

    fn payload(&mut self, len: u64) -> Result<Vec<u8>, String> {
        let mut v = vec![0u8; usize::try_from(len).map_err(|e| e.to_string())?];
        self.io().read_exact(&mut v).map_err(lost)?;
        Ok(v)
    }

    /// A message of kind `want`, as JSON.
    fn expect_json<T: for<'de> Deserialize<'de>>(&mut self, want: u8) -> Result<T, String> {
        let (kind, len) = self.head(MAX_JSON)?;
        if kind != want {
            return Err(format!("message kind {kind} where {want} was due"));
        }
        let data = self.payload(len)?;
        serde_json::from_slice(&data).map_err(|e| format!("a damaged message: {e}"))
    }

    /// The other side's answer: Ok, or its error.
    fn expect_reply(&mut self) -> Result<(), String> {
        let r: Reply = self.expect_json(REPLY)?;
        match r.error {
            None => Ok(()),
            Some(e) => Err(format!("the destination refused: {e}")),
        }
    }

    fn reply(&mut self, r: &Result<(), String>) -> Result<(), String> {
        self.send_json(
            REPLY,
            &Reply {
                error: r.as_ref().err().cloned(),
            },
        )
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn lost(e: std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            format!("the other side said nothing for {} s", SILENCE.as_secs())
        }
        std::io::ErrorKind::UnexpectedEof => "the other side closed the connection".into(),
        _ => format!("the connection failed: {e}"),
    }
}

#[derive(Serialize, Deserialize)]
struct Reply {
    error: Option<String>,
}

/// How the source migrates.
#[derive(Debug, Clone, Copy)]
pub struct SendOptions {
    /// The pause the guest may see: pre-copy goes on until what is left fits in it.
    pub downtime: Duration,
    /// Pre-copy rounds after the first full pass, at most.
    pub max_rounds: u32,
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            downtime: Duration::from_millis(300),
            max_rounds: 30,
        }
    }
}

/// What a migration did.
#[derive(Debug, Default, Clone)]
pub struct Sent {
    /// Guest RAM bytes sent, over all rounds.
    pub bytes: u64,
    pub memory_size: u64,
    /// Pre-copy rounds after the first pass.
    pub rounds: u32,
    /// Bytes sent with the VM paused.
    pub final_bytes: u64,
    pub total: Duration,
    /// From the pause to the destination's ready.
    pub downtime: Duration,
}

fn connect(url: &Url) -> Result<Stream, String> {
    let deadline = Instant::now() + CONNECT;
    loop {
        let r = match url {
            Url::Unix(p) => UnixStream::connect(p).map(Stream::Unix),
            Url::Tcp(a) => TcpStream::connect(a).map(Stream::Tcp),
        };
        match r {
            Ok(s) => {
                s.set_timeouts(SILENCE).map_err(|e| e.to_string())?;
                return Ok(s);
            }
            Err(e)
                if Instant::now() < deadline
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(format!("cannot connect to {url}: {e}")),
        }
    }
}

/// Sends the pages at `pages` (sorted guest-physical addresses), coalesced into runs; returns
/// the bytes sent.
fn send_pages(vm: &Vm, s: &mut Stream, pages: &[u64], buf: &mut [u8]) -> Result<u64, String> {
    let mem = vm.guest_memory();
    let mut sent = 0u64;
    let mut i = 0;
    while i < pages.len() {
        let start = pages[i];
        let mut n = 1;
        while i + n < pages.len()
            && pages[i + n] == start + n as u64 * PAGE
            && (n + 1) * PAGE as usize <= buf.len()
        {
            n += 1;
        }
        let len = n * PAGE as usize;
        let chunk = &mut buf[..len];
        mem.read_slice(chunk, GuestAddress(start))
            .map_err(|e| format!("reading guest RAM at {start:#x}: {e}"))?;
        s.send(PAGES, &[&start.to_le_bytes(), chunk])?;
        sent += len as u64;
        i += n;
    }
    Ok(sent)
}

/// Every page written since the last call: by the vCPUs (KVM's log) or through guest memory
/// (the devices), sorted, each once.
fn dirty(vm: &Vm) -> Result<Vec<u64>, String> {
    let mut pages = vm
        .ram
        .take_vcpu_dirty(&vm.vm_fd)
        .map_err(|e| e.to_string())?;
    let by_vcpus = pages.len();
    pages.extend(rhyve_hypervisor::memory::take_dirty_pages(
        vm.guest_memory(),
    ));
    log::debug!(
        "migration: {by_vcpus} pages written by the vCPUs, {} through guest memory",
        pages.len() - by_vcpus
    );
    pages.sort_unstable();
    pages.dedup();
    Ok(pages)
}

/// Migrates the running VM `vm`, built from `cfg`, to the rhyve listening at `url`. On success
/// the VM runs there and is paused here, for the caller to stop; on failure it runs on here.
pub fn send(vm: &Vm, cfg: &Config, url: &Url, opts: SendOptions) -> Result<Sent, String> {
    let t0 = Instant::now();
    let mut paused = false;
    let r = send_inner(vm, cfg, url, opts, t0, &mut paused);
    if r.is_err() {
        let _ = vm.ram.log_dirty(&vm.vm_fd, false);
        if paused {
            vm.resume();
        }
    }
    r
}

fn send_inner(
    vm: &Vm,
    cfg: &Config,
    url: &Url,
    opts: SendOptions,
    t0: Instant,
    paused: &mut bool,
) -> Result<Sent, String> {
    if vm.control().is_paused() {
        return Err("the VM is paused: resume it first (a paused VM is snapshotted)".into());
    }
    let nvcpus = vm.control().active_cpus().ids().count();
    let manifest = snapshot::manifest_of(vm, cfg, nvcpus)?;
    let mut s = connect(url)?;
    s.send_json(HELLO, &manifest)?;
    s.expect_reply()?;
    let mut out = Sent {
        memory_size: manifest.memory.iter().map(|r| r.size).sum(),
        ..Default::default()
    };
    vm.ram
        .log_dirty(&vm.vm_fd, true)
        .map_err(|e| format!("KVM's dirty log: {e}"))?;
    // What devices wrote before now is in the full pass.
    rhyve_hypervisor::memory::take_dirty_pages(vm.guest_memory());
    let pass = Instant::now();
    out.bytes = snapshot::nonzero_runs(vm, |gpa, data| s.send(PAGES, &[&gpa.to_le_bytes(), data]))?;
    // Bytes per second of the last round.
    let mut rate = out.bytes as f64 / pass.elapsed().as_secs_f64().max(1e-6);
    log::debug!(
        "migration: the destination was ready after {:.1} ms; the full pass sent {} bytes in {:.1} ms",
        (pass - t0).as_secs_f64() * 1e3,
        out.bytes,
        pass.elapsed().as_secs_f64() * 1e3
    );
    let mut buf = vec![0u8; RUN];
    let mut pages = dirty(vm)?;
    while out.rounds < opts.max_rounds {
        let left = pages.len() as f64 * PAGE as f64;
        if left / rate <= opts.downtime.as_secs_f64() {
            break;
        }
        let round = Instant::now();
        let n = send_pages(vm, &mut s, &pages, &mut buf)?;
        out.bytes += n;
        out.rounds += 1;
        rate = n as f64 / round.elapsed().as_secs_f64().max(1e-6);
        pages = dirty(vm)?;
    }
    if out.rounds == opts.max_rounds {
        log::warn!(
            "migration: the guest writes memory faster than it can be sent; stopping it with {} pages left",
            pages.len()
        );
    }
    let stop = Instant::now();
    vm.pause()?;
    *paused = true;
    // What the last read of the log found is not sent yet; with what was written since.
    pages.extend(dirty(vm)?);
    pages.sort_unstable();
    pages.dedup();
    out.final_bytes = send_pages(vm, &mut s, &pages, &mut buf)?;
    out.bytes += out.final_bytes;
    let state = snapshot::capture(vm)?;
    s.send_json(STATE, &state)?;
    s.expect_reply()?;
    // The point of no return: from here the VM is the destination's.
    s.send(COMMIT, &[])?;
    out.downtime = stop.elapsed();
    out.total = t0.elapsed();
    Ok(out)
}

/// A destination waiting for its source.
pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Listens at `url` (a stale unix socket there is replaced).
pub fn listen(url: &Url) -> Result<Listener, String> {
    match url {
        Url::Unix(p) => {
            if std::fs::symlink_metadata(p).is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_socket()
            }) {
                let _ = std::fs::remove_file(p);
            }
            let l = UnixListener::bind(p).map_err(|e| format!("{url}: {e}"))?;
            Ok(Listener::Unix(l, p.clone()))
        }
        Url::Tcp(a) => TcpListener::bind(a)
            .map(Listener::Tcp)
            .map_err(|e| format!("{url}: {e}")),
    }
}

impl Listener {
    /// The one connection of this migration, within [`ACCEPT`].
    fn accept(&self) -> Result<Stream, String> {
        let deadline = Instant::now() + ACCEPT;
        let nonblocking = match self {
            Listener::Unix(l, _) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        };
        nonblocking.map_err(|e| e.to_string())?;
        loop {
            let r = match self {
                Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
                Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
            };
            match r {
                Ok(s) => {
                    match &s {
                        Stream::Unix(u) => u.set_nonblocking(false),
                        Stream::Tcp(t) => t.set_nonblocking(false),
                    }
                    .map_err(|e| e.to_string())?;
                    s.set_timeouts(SILENCE).map_err(|e| e.to_string())?;
                    return Ok(s);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(format!("no source connected within {} s", ACCEPT.as_secs()));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

/// A migrated VM, running here.
pub struct Received {
    pub vm: Vm,
    pub cfg: Config,
    pub bytes: u64,
}

/// Receives a VM on `l`: builds it from the source's manifest, with `overrides` (config
/// pairs, `pci.`/`lpc.` keys: another disk path, COM1 to another file) in place of the
/// source's; takes its memory and state; resumes it once the source commits.
pub fn receive(l: &Listener, overrides: &[(String, String)]) -> Result<Received, String> {
    let mut s = l.accept()?;
    let m: Manifest = s.expect_json(HELLO)?;
    let built = build(&m, overrides);
    s.reply(&built.as_ref().map(|_| ()).map_err(Clone::clone))?;
    let (mut vm, cfg) = built?;
    match take(&mut vm, &mut s) {
        Ok(bytes) => {
            vm.resume();
            Ok(Received { vm, cfg, bytes })
        }
        Err(e) => {
            // Started (parked) or not: its vCPU threads end with it.
            vm.control()
                .suspend(super::control::SuspendReason::PowerOff);
            vm.finish();
            Err(e)
        }
    }
}

fn build(m: &Manifest, overrides: &[(String, String)]) -> Result<(Vm, Config), String> {
    snapshot::check_manifest(m)?;
    let mut cfg = snapshot::config_of(m)?;
    for (k, v) in overrides {
        if !(k.starts_with("pci.") || k.starts_with("lpc.")) {
            return Err(format!(
                "{k}: only device keys (pci.*, lpc.*) can differ on the destination"
            ));
        }
        cfg.set(k, v).map_err(|e| e.to_string())?;
    }
    check_disk_sizes(m, &cfg)?;
    let vm = Vm::create(&cfg).map_err(|e| e.to_string())?;
    snapshot::check_layout(&vm, m)?;
    // Only the source's non-zero pages come: what building the VM wrote here (a kernel, boot
    // tables) must not show through where the source's RAM is zero.
    snapshot::zero_ram(&vm)?;
    Ok((vm, cfg))
}

/// A migrated guest's disks are the source's (shared, or copied): the same sizes.
fn check_disk_sizes(m: &Manifest, cfg: &Config) -> Result<(), String> {
    for d in &m.disks {
        let path = cfg.get_raw(&d.key).unwrap_or(&d.path);
        let size = std::fs::metadata(path)
            .map_err(|e| format!("disk {path}: {e}"))?
            .len();
        if size != d.size {
            return Err(format!(
                "disk {path} is {size} bytes, the source's {} is {}",
                d.path, d.size
            ));
        }
    }
    Ok(())
}

/// Pages until the state, then the state; ready; the commit. Returns the RAM bytes taken.
fn take(vm: &mut Vm, s: &mut Stream) -> Result<u64, String> {
    let mut bytes = 0u64;
    let mut buf = Vec::with_capacity(RUN);
    loop {
        let (kind, len) = s.head(MAX_JSON)?;
        match kind {
            PAGES => {
                if len < 8 || len > 8 + RUN as u64 || (len - 8) % PAGE != 0 {
                    return Err(format!("a page message of {len} bytes"));
                }
                let mut at = [0u8; 8];
                s.io().read_exact(&mut at).map_err(lost)?;
                let gpa = u64::from_le_bytes(at);
                buf.resize(usize::try_from(len - 8).unwrap_or(RUN), 0);
                s.io().read_exact(&mut buf).map_err(lost)?;
                vm.guest_memory()
                    .write_slice(&buf, GuestAddress(gpa))
                    .map_err(|e| format!("pages at {gpa:#x}: not guest RAM ({e})"))?;
                bytes = bytes.saturating_add(len - 8);
            }
            STATE => {
                let data = s.payload(len)?;
                let state: Result<MachineState, String> = serde_json::from_slice(&data)
                    .map_err(|e| format!("a damaged machine state: {e}"));
                let applied = state.and_then(|st| snapshot::apply(vm, st));
                s.reply(&applied)?;
                applied?;
                let (kind, _) = s.head(0)?;
                if kind != COMMIT {
                    return Err(format!("message kind {kind} where the commit was due"));
                }
                return Ok(bytes);
            }
            k => return Err(format!("message kind {k} during the memory copy")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_cloud_hypervisors_forms_and_anything_else_is_refused() {
        assert_eq!(
            Url::parse("unix:/tmp/m.sock"),
            Ok(Url::Unix("/tmp/m.sock".into()))
        );
        assert_eq!(
            Url::parse("unix:///tmp/m.sock"),
            Ok(Url::Unix("/tmp/m.sock".into()))
        );
        assert_eq!(
            Url::parse("tcp:127.0.0.1:6000"),
            Ok(Url::Tcp("127.0.0.1:6000".into()))
        );
        for bad in [
            "",
            "unix:rel",
            "tcp:host",
            "tcp::1",
            "tcp:h:99999",
            "file:///x",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_message_longer_than_allowed_is_refused_before_it_is_read() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Stream::Unix(a), Stream::Unix(b));
        a.send(HELLO, &[&[0u8; 100]]).unwrap();
        assert!(b.head(10).unwrap_err().contains("not a rhyve migration"));
        let (a, b) = UnixStream::pair().unwrap();
        let mut b = Stream::Unix(b);
        drop(a);
        assert!(b.head(10).unwrap_err().contains("closed"));
    }
}
