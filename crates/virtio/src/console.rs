//! virtio-console with named ports (virtio 1.2 §5.3, MULTIPORT; bhyve `pci_virtio_console.c`):
//! `-s N,virtio-console,NAME=/path/to/sock[,NAME2=/path2]`, up to 16 ports. Each port is a unix
//! socket rhyve listens on, serving one client at a time; the guest sees the port's name
//! (Linux: /sys/class/virtio-ports/vportXpY/name). Bytes from the client wait in the device
//! until the guest posts receive buffers; bytes the guest sends while nobody is connected are
//! dropped, as on a serial line.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rhyve_hypervisor::memory::GuestMem;
use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::eventfd::EventFd;

use super::rate_limited;
use super::{
    drain, Activation, ActiveQueue, Engine, QueueHandler, Running, VirtioDevice, VirtioIrq,
};
use rhyve_config::{Config, Node};
use serde::Deserialize;

pub const MAX_PORTS: usize = 16;
const QUEUE_SIZE: u16 = 64;
const F_MULTIPORT: u64 = 1 << 1;
const CTRL_RX: u16 = 2;
const CTRL_TX: u16 = 3;
/// Control events (virtio 1.2 §5.3.6.2).
const DEVICE_READY: u16 = 0;
const DEVICE_ADD: u16 = 1;
const PORT_READY: u16 = 3;
const PORT_OPEN: u16 = 6;
const PORT_NAME: u16 = 7;
/// Most bytes buffered from a client while the guest reads nothing.
const INBOUND_MAX: usize = 64 << 10;
/// Most bytes taken from one transmit chain.
const TX_CHAIN_MAX: usize = 1 << 20;
/// Most bytes read of one control message (the driver sends only the 8-byte header).
const CTRL_MSG_MAX: usize = 8;
/// Longest control message a restored state may hold for the driver: a header and a port name
/// (names are configuration; none is near this long).
const CTRL_MSG_MAX_OUT: usize = 8 + 4096;
/// Most control messages held for a driver that posts no c_ivq buffers (a handshake needs
/// three per port).
const CTRL_PENDING_MAX: usize = 4 * MAX_PORTS;

/// The receive and transmit queue of port `p` (ports are fewer than `MAX_PORTS`).
// p < MAX_PORTS (16), so 2 + 2p + 1 is far below u16::MAX.
#[allow(clippy::arithmetic_side_effects)]
fn port_queues(p: usize) -> (u16, u16) {
    let p = p.min(MAX_PORTS) as u16;
    let rx = if p == 0 { 0 } else { 2 + 2 * p };
    (rx, rx + 1)
}

/// The number of queues for `ports` ports: a receive and a transmit queue each, and the
/// control pair.
fn queue_count(ports: usize) -> usize {
    ports.saturating_mul(2).saturating_add(2)
}

/// One port's host side, shared between its socket thread and the device worker.
struct PortIo {
    client: Mutex<Option<UnixStream>>,
    inbound: Mutex<VecDeque<u8>>,
    /// Signalled when `inbound` gains bytes.
    ready: EventFd,
}

struct Port {
    name: String,
    io: Arc<PortIo>,
}

pub struct Console {
    ports: Vec<Port>,
    running: Option<Running<State>>,
    stats: Arc<ConsoleStats>,
}

/// Bytes the guest received from its ports' clients and sent to them, since the device was
/// created (the API's `vm.counters`).
#[derive(Default)]
struct ConsoleStats {
    rx_bytes: AtomicU64,
    tx_bytes: AtomicU64,
}

/// What a console holds beyond its queues: control messages the driver has not taken yet, and
/// bytes from each port's client the guest has not read yet.
#[derive(serde::Serialize, serde::Deserialize)]
struct ConsoleState {
    pending_ctrl: Vec<Vec<u8>>,
    inbound: Vec<Vec<u8>>,
}

fn listen(path: &str) -> Result<UnixListener, String> {
    // A socket left by an earlier run is replaced; any other file is not ours to remove.
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if m.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        } else {
            return Err(format!("{path} exists and is not a socket"));
        }
    }
    UnixListener::bind(path).map_err(|e| format!("cannot listen on {path}: {e}"))
}

/// Accepts clients one at a time and queues what they send for the guest.
fn serve(listener: UnixListener, io: Arc<PortIo>) {
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let Ok(mut reader) = stream.try_clone() else {
            continue;
        };
        {
            let mut c = io.client.lock().unwrap_or_else(|p| p.into_inner());
            if c.is_some() {
                continue; // one client at a time: this one is dropped (closed)
            }
            *c = Some(stream);
        }
        let mut buf = [0u8; 4096];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut q = io.inbound.lock().unwrap_or_else(|p| p.into_inner());
                    let room = INBOUND_MAX.saturating_sub(q.len());
                    q.extend(buf.get(..n.min(room)).unwrap_or_default());
                    drop(q);
                    let _ = io.ready.write(1);
                }
            }
        }
        *io.client.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl Console {
    pub fn new(cfg: &Config, prefix: &str) -> Result<Self, String> {
        let mut ports = Vec::new();
        // Ports are numbered nodes (`port.N.name`, `port.N.path`): names may contain dots.
        let mut ids: Vec<usize> = Vec::new();
        for (n, node) in cfg.children(&format!("{prefix}.port")) {
            match (n.parse::<usize>(), node) {
                (Ok(i), Node::Table(_)) => ids.push(i),
                _ => return Err(format!("port.{n}: ports are port.N.name and port.N.path")),
            }
        }
        ids.sort_unstable();
        for i in ids {
            let get = |k: &str| -> Result<String, String> {
                cfg.get(&format!("{prefix}.port.{i}.{k}"))
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("port {i} has no {k}"))
            };
            let (name, path) = (get("name")?, get("path")?);
            let listener = listen(&path)?;
            let io = Arc::new(PortIo {
                client: Mutex::new(None),
                inbound: Mutex::new(VecDeque::new()),
                ready: EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?,
            });
            let thread_io = io.clone();
            rhyve_base::thread::spawn(
                rhyve_base::thread::Role::ConsoleBackend,
                format!("vtcon port {i}"),
                move || serve(listener, thread_io),
            )
            .map_err(|e| e.to_string())?;
            ports.push(Port {
                name: name.to_string(),
                io,
            });
        }
        if ports.is_empty() {
            return Err(
                "needs at least one port: -s SLOT,virtio-console,NAME=/path/to/socket".into(),
            );
        }
        if ports.len() > MAX_PORTS {
            return Err(format!("at most {MAX_PORTS} ports"));
        }
        Ok(Console {
            ports,
            running: None,
            stats: Arc::default(),
        })
    }
}

/// Control message: id, event, value, then an optional payload (the port name).
fn control(id: u32, event: u16, value: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(payload.len().saturating_add(8));
    m.extend_from_slice(&id.to_le_bytes());
    m.extend_from_slice(&event.to_le_bytes());
    m.extend_from_slice(&value.to_le_bytes());
    m.extend_from_slice(payload);
    m
}

/// Copies `data` into the next receive chain; returns bytes used, or None without a buffer.
fn fill(q: &mut Queue, mem: &GuestMem, data: &[u8], bad: &AtomicU64) -> Option<usize> {
    let chain = q.pop_descriptor_chain(mem)?;
    let head = chain.head_index();
    let mut off = 0;
    for d in chain {
        let Some(rest) = data.get(off..).filter(|r| !r.is_empty()) else {
            break;
        };
        if !d.is_write_only() {
            continue;
        }
        let n = usize::try_from(d.len())
            .unwrap_or(usize::MAX)
            .min(rest.len());
        let part = rest.get(..n).unwrap_or_default();
        if mem.write_slice(part, d.addr()).is_err() {
            if rate_limited(bad) {
                log::warn!("virtio-console: receive buffer outside guest memory");
            }
            break;
        }
        // n <= the bytes left after `off`, so off stays <= data.len().
        off = off.saturating_add(n);
    }
    let _ = q.add_used(mem, head, u32::try_from(off).unwrap_or(u32::MAX));
    Some(off)
}

/// Hands what is readable in each available transmit chain to `sink`, one chain at a time
/// (at most `max` bytes of each), completing the chains as it goes: the worker never holds
/// more than one chain's bytes, however many chains the driver offers in one notification.
/// Whether any chain was used.
fn take_tx(q: &mut ActiveQueue, mem: &GuestMem, max: usize, mut sink: impl FnMut(Vec<u8>)) -> bool {
    let mut any = false;
    q.serve_all(mem, |queue, chain| {
        let head = chain.head_index();
        let mut buf = Vec::new();
        for d in chain {
            let n = usize::try_from(d.len()).unwrap_or(usize::MAX);
            let n = n.min(max.saturating_sub(buf.len()));
            if d.is_write_only() || n == 0 {
                continue;
            }
            let start = buf.len();
            buf.resize(start.saturating_add(n), 0);
            let dst = buf.get_mut(start..).unwrap_or_default();
            if mem.read_slice(dst, d.addr()).is_err() {
                buf.truncate(start);
            }
        }
        let _ = queue.add_used(mem, head, 0);
        any = true;
        sink(buf);
        true
    });
    any
}

/// A control message's id, event and value.
fn parse_control(m: &[u8]) -> Option<(u32, u16, u16)> {
    let id = u32::from_le_bytes(m.get(0..4)?.try_into().ok()?);
    let event = u16::from_le_bytes(m.get(4..6)?.try_into().ok()?);
    let value = u16::from_le_bytes(m.get(6..8)?.try_into().ok()?);
    Some((id, event, value))
}

struct State {
    mem: GuestMem,
    queues: Vec<Option<ActiveQueue>>,
    names: Vec<String>,
    io: Vec<Arc<PortIo>>,
    /// Control messages for the driver that wait for a c_ivq buffer.
    pending_ctrl: VecDeque<Vec<u8>>,
    irq: Arc<VirtioIrq>,
    bad: AtomicU64,
    stats: Arc<ConsoleStats>,
    /// The fd that stands in for a queue the driver left disabled (it never fires).
    _idle: Option<EventFd>,
}

impl QueueHandler for State {
    fn handle(&mut self, token: usize) -> bool {
        self.on_event(token);
        true
    }
    fn queues(&self) -> Vec<&ActiveQueue> {
        self.queues.iter().flatten().collect()
    }
}

impl State {
    fn q(&mut self, i: u16) -> Option<&mut ActiveQueue> {
        self.queues.get_mut(usize::from(i)).and_then(|q| q.as_mut())
    }

    /// What the worker does when `token` fires: a queue's notification (token = queue index)
    /// or a port's inbound data (token = queue count + port).
    fn on_event(&mut self, token: usize) {
        let nq = self.queues.len();
        if let Some(p) = token.checked_sub(nq) {
            if let Some(io) = self.io.get(p) {
                drain(&io.ready);
                self.deliver(p);
            }
            return;
        }
        let Ok(t) = u16::try_from(token) else { return };
        if let Some(q) = self.q(t) {
            drain(&q.notify);
        }
        match t {
            CTRL_RX => self.flush_ctrl(),
            CTRL_TX => self.handle_ctrl_tx(),
            _ => {
                let p = usize::from(t.saturating_sub(2) / 2);
                if t % 2 == 0 {
                    self.deliver(p);
                } else {
                    self.transmit(p);
                }
            }
        }
    }

    /// Interrupts the driver for queue `i`'s new used entries, unless it suppressed that.
    /// Call only after adding to the used ring.
    fn notify(&mut self, i: u16) {
        let mem = self.mem.clone();
        if let Some(q) = self.q(i) {
            if q.queue.needs_notification(&mem).unwrap_or(true) {
                self.irq.signal_queue(i);
            }
        }
    }

    /// Queues a control message for the driver.
    fn send_ctrl(&mut self, msg: Vec<u8>) {
        if self.pending_ctrl.len() >= CTRL_PENDING_MAX {
            if rate_limited(&self.bad) {
                log::warn!("virtio-console: the driver takes no control messages; dropped one");
            }
            return;
        }
        self.pending_ctrl.push_back(msg);
    }

    /// Sends pending control messages while the driver has buffers for them; when it runs out,
    /// asks it to kick c_ivq as it adds one (Linux re-posts each buffer after reading it).
    fn flush_ctrl(&mut self) {
        let mem = self.mem.clone();
        let mut sent = false;
        let pending = &mut self.pending_ctrl;
        let bad = &self.bad;
        let Some(q) = self
            .queues
            .get_mut(usize::from(CTRL_RX))
            .and_then(|q| q.as_mut())
        else {
            return;
        };
        q.serve_rx(&mem, |queue| {
            while let Some(m) = pending.front() {
                if fill(queue, &mem, m, bad).is_none() {
                    return true;
                }
                pending.pop_front();
                sent = true;
            }
            false
        });
        if sent {
            self.notify(CTRL_RX);
        }
    }

    fn handle_ctrl_tx(&mut self) {
        let mem = self.mem.clone();
        let Some(q) = self.q(CTRL_TX) else { return };
        // At most a queue's worth of CTRL_MSG_MAX-byte messages.
        let mut msgs = Vec::new();
        if !take_tx(q, &mem, CTRL_MSG_MAX, |m| msgs.push(m)) {
            return;
        }
        self.notify(CTRL_TX);
        for m in msgs {
            let Some((id, event, value)) = parse_control(&m) else {
                continue;
            };
            let port = usize::try_from(id).ok().filter(|&p| p < self.names.len());
            match (event, value, port) {
                (DEVICE_READY, 1, _) => {
                    for p in 0..self.names.len() {
                        let id = u32::try_from(p).unwrap_or(u32::MAX);
                        self.send_ctrl(control(id, DEVICE_ADD, 0, &[]));
                    }
                }
                (PORT_READY, 1, Some(p)) => {
                    let name = self.names.get(p).cloned().unwrap_or_default();
                    self.send_ctrl(control(id, PORT_NAME, 0, name.as_bytes()));
                    self.send_ctrl(control(id, PORT_OPEN, 1, &[]));
                }
                _ => {
                    log::debug!("virtio-console: control event {event} value {value} for port {id}")
                }
            }
        }
        self.flush_ctrl();
    }

    /// Moves client bytes waiting for port `p` into its receive buffers.
    fn deliver(&mut self, p: usize) {
        let mem = self.mem.clone();
        let (rx, _) = port_queues(p);
        let Some(io) = self.io.get(p).cloned() else {
            return;
        };
        let (bad, stats) = (&self.bad, &self.stats);
        let Some(q) = self
            .queues
            .get_mut(usize::from(rx))
            .and_then(|q| q.as_mut())
        else {
            return;
        };
        let mut sent = false;
        q.serve_rx(&mem, |queue| {
            let mut inbound = io.inbound.lock().unwrap_or_else(|e| e.into_inner());
            while !inbound.is_empty() {
                let chunk: Vec<u8> = inbound.iter().take(4096).copied().collect();
                let Some(n) = fill(queue, &mem, &chunk, bad) else {
                    return true;
                };
                // A chain with no room (n = 0) is used up all the same.
                inbound.drain(..n.min(chunk.len()));
                stats.rx_bytes.fetch_add(n as u64, Ordering::Relaxed);
                sent = true;
            }
            false
        });
        if sent {
            self.notify(rx);
        }
    }

    /// Writes what the driver sent on port `p` to its client (dropped when none is connected),
    /// chain by chain.
    fn transmit(&mut self, p: usize) {
        let (_, tx) = port_queues(p);
        let Some(io) = self.io.get(p).cloned() else {
            return;
        };
        let mem = self.mem.clone();
        let stats = self.stats.clone();
        let Some(q) = self.q(tx) else { return };
        let sent = take_tx(q, &mem, TX_CHAIN_MAX, |c| {
            stats.tx_bytes.fetch_add(c.len() as u64, Ordering::Relaxed);
            let mut client = io.client.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = client.as_mut() {
                if s.write_all(&c).is_err() {
                    *client = None;
                }
            }
        });
        if sent {
            self.notify(tx);
        }
    }
}

impl VirtioDevice for Console {
    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("rx_bytes", self.stats.rx_bytes.load(Ordering::Relaxed)),
            ("tx_bytes", self.stats.tx_bytes.load(Ordering::Relaxed)),
        ]
    }

    fn name(&self) -> &'static str {
        "virtio-console"
    }
    fn device_type(&self) -> u16 {
        3
    }
    fn pci_class(&self) -> (u8, u8) {
        (0x07, 0x80)
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; queue_count(self.ports.len())]
    }
    fn features(&self) -> u64 {
        F_MULTIPORT
    }
    fn config_len(&self) -> usize {
        12
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; 12];
        c[4..8].copy_from_slice(&(self.ports.len() as u32).to_le_bytes());
        super::read_config_window(&c, offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), String> {
        if a.acked & F_MULTIPORT == 0 {
            return Err("virtio-console: the driver must accept MULTIPORT for named ports".into());
        }
        let nq = queue_count(self.ports.len());
        let mut slots: Vec<Option<ActiveQueue>> = (0..nq).map(|_| None).collect();
        // Tokens: one per queue notify, then one per port's inbound-data event.
        let mut fds = vec![-1; nq];
        let mut queues = a.queues;
        for q in queues.drain(..) {
            let i = usize::from(q.index);
            if let (Some(fd), Some(slot)) = (fds.get_mut(i), slots.get_mut(i)) {
                *fd = q.notify.as_raw_fd();
                *slot = Some(q);
            }
        }
        // A queue the driver left disabled gets a placeholder fd that never fires.
        let idle = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
        for fd in fds.iter_mut().filter(|fd| **fd < 0) {
            *fd = idle.as_raw_fd();
        }
        fds.extend(self.ports.iter().map(|p| p.io.ready.as_raw_fd()));
        let st = State {
            mem: a.mem.clone(),
            queues: slots,
            names: self.ports.iter().map(|p| p.name.clone()).collect(),
            io: self.ports.iter().map(|p| p.io.clone()).collect(),
            pending_ctrl: VecDeque::new(),
            irq: a.irq.clone(),
            bad: AtomicU64::new(0),
            stats: self.stats.clone(),
            _idle: Some(idle),
        };
        let fds = fds.into_iter().map(|fd| (fd, false)).collect();
        let a = Activation {
            queues: Vec::new(),
            ..a
        };
        self.running = Some(Running::start("virtio-console", fds, &a, st)?);
        Ok(())
    }

    fn engine(&self) -> Option<&dyn Engine> {
        self.running.as_ref().map(|r| r as &dyn Engine)
    }

    fn stop(&mut self) {
        self.running = None;
    }

    fn save_state(&self) -> Result<serde_json::Value, String> {
        let pending_ctrl = self
            .running
            .as_ref()
            .map(|r| r.lock().pending_ctrl.iter().cloned().collect())
            .unwrap_or_default();
        let inbound = self
            .ports
            .iter()
            .map(|p| {
                let b = p.io.inbound.lock().unwrap_or_else(|e| e.into_inner());
                b.iter().copied().collect()
            })
            .collect();
        serde_json::to_value(ConsoleState {
            pending_ctrl,
            inbound,
        })
        .map_err(|e| e.to_string())
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let st = ConsoleState::deserialize(state).map_err(|e| e.to_string())?;
        if st.inbound.len() != self.ports.len() {
            return Err(format!(
                "virtio-console: {} ports saved, {} configured",
                st.inbound.len(),
                self.ports.len()
            ));
        }
        if st.inbound.iter().any(|b| b.len() > INBOUND_MAX) {
            return Err("virtio-console: more held input than a port holds".into());
        }
        if st.pending_ctrl.len() > CTRL_PENDING_MAX
            || st.pending_ctrl.iter().any(|m| m.len() > CTRL_MSG_MAX_OUT)
        {
            return Err("virtio-console: more or longer control messages than it holds".into());
        }
        match &self.running {
            Some(r) => r.lock().pending_ctrl = st.pending_ctrl.into(),
            None if st.pending_ctrl.is_empty() => {}
            None => return Err("virtio-console: control messages for a stopped device".into()),
        }
        for (p, bytes) in self.ports.iter().zip(st.inbound) {
            let any = !bytes.is_empty();
            *p.io.inbound.lock().unwrap_or_else(|e| e.into_inner()) = bytes.into();
            if any {
                let _ = p.io.ready.write(1);
            }
        }
        Ok(())
    }
}

/// bhyve's form: `NAME=PATH[,NAME=PATH...]`, numbered in order as `port.N.name`/`.path`.
pub fn legacy_config(cfg: &mut Config, prefix: &str, opts: &str) -> Result<(), String> {
    for (i, item) in opts.split(',').filter(|s| !s.is_empty()).enumerate() {
        let (name, path) = item
            .split_once('=')
            .filter(|(n, p)| !n.is_empty() && !p.is_empty())
            .ok_or_else(|| format!("'{item}' is not NAME=/path/to/socket"))?;
        let set = |cfg: &mut Config, k: &str, v: &str| {
            cfg.set(&format!("{prefix}.port.{i}.{k}"), v)
                .map_err(|e| e.to_string())
        };
        set(cfg, "name", name)?;
        set(cfg, "path", path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
    use super::*;
    use crate::mock::{self, Driver};
    use std::collections::BTreeMap;
    use virtio_queue::desc::{split::Descriptor as Desc, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestAddress};

    #[test]
    fn queue_numbering_skips_the_control_pair() {
        assert_eq!(port_queues(0), (0, 1));
        assert_eq!(port_queues(1), (4, 5));
        assert_eq!(port_queues(15), (32, 33));
        let m = control(7, PORT_NAME, 0, b"a.b");
        assert_eq!(m, [7, 0, 0, 0, 7, 0, 0, 0, b'a', b'.', b'b']);
    }

    #[test]
    fn fill_and_take_tolerate_hostile_buffers() {
        let m = GuestMem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let vq = MockSplitQueue::create(&m, GuestAddress(0x8000), 16);
        let descs = [(0x1000u64, 4u32, 2u16), (0xfff_0000, 16, 2), (0x2000, 8, 0)];
        for (i, (a, l, f)) in descs.into_iter().enumerate() {
            vq.desc_table()
                .store(i as u16, RawDescriptor::from(Desc::new(a, l, f, 0)))
                .unwrap();
            vq.avail().ring().ref_at(i).unwrap().store(i as u16);
        }
        vq.avail().idx().store(3);
        let mut q = ActiveQueue {
            index: 0,
            queue: vq.create_queue().unwrap(),
            notify: EventFd::new(0).unwrap(),
        };
        let bad = AtomicU64::new(0);
        // A 4-byte buffer takes 4 of 10 bytes; one outside RAM takes none.
        assert_eq!(fill(&mut q.queue, &m, b"0123456789", &bad), Some(4));
        assert_eq!(fill(&mut q.queue, &m, b"0123456789", &bad), Some(0));
        let mut b = [0u8; 4];
        m.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(&b, b"0123");
        // The next chain is readable: take_tx gets its bytes (and completes it).
        m.write_slice(b"guestout", GuestAddress(0x2000)).unwrap();
        let mut got = Vec::new();
        assert!(take_tx(&mut q, &m, TX_CHAIN_MAX, |c| got.push(c)));
        assert_eq!(got, vec![b"guestout".to_vec()]);
        assert_eq!(
            m.read_obj::<u16>(vq.used_addr().unchecked_add(2)).unwrap(),
            3
        );
        assert_eq!(fill(&mut q.queue, &m, b"x", &bad), None, "no buffers left");
    }

    #[test]
    fn transmit_chains_are_bounded_and_handed_over_one_at_a_time() {
        let m = GuestMem::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        let vq = MockSplitQueue::create(&m, GuestAddress(0x8000), 16);
        // Chain 0: two 1 MiB descriptors; chain 1 (descriptor 2): 64 KiB.
        let descs = [
            (0x10_0000u64, 1u32 << 20, 1u16, 1u16),
            (0x20_0000, 1 << 20, 0, 0),
            (0x30_0000, 64 << 10, 0, 0),
        ];
        for (i, (a, l, f, n)) in descs.into_iter().enumerate() {
            vq.desc_table()
                .store(i as u16, RawDescriptor::from(Desc::new(a, l, f, n)))
                .unwrap();
        }
        vq.avail().ring().ref_at(0).unwrap().store(0);
        vq.avail().ring().ref_at(1).unwrap().store(2);
        vq.avail().idx().store(2);
        let mut q = ActiveQueue {
            index: 0,
            queue: vq.create_queue().unwrap(),
            notify: EventFd::new(0).unwrap(),
        };
        let mut sizes = Vec::new();
        assert!(take_tx(&mut q, &m, TX_CHAIN_MAX, |c| sizes.push(c.len())));
        assert_eq!(
            sizes,
            vec![TX_CHAIN_MAX, 64 << 10],
            "2 MiB chain cut to the cap"
        );
        // A control "message" of 64 KiB is read as its header only.
        vq.avail().ring().ref_at(2).unwrap().store(2);
        vq.avail().idx().store(3);
        let mut sizes = Vec::new();
        assert!(take_tx(&mut q, &m, CTRL_MSG_MAX, |c| sizes.push(c.len())));
        assert_eq!(sizes, vec![CTRL_MSG_MAX]);
        assert!(!take_tx(&mut q, &m, CTRL_MSG_MAX, |_| panic!(
            "no chain left"
        )));
    }

    #[test]
    fn legacy_options_number_the_ports() {
        let mut c = Config::new();
        legacy_config(
            &mut c,
            "pci.0.5.0",
            "org.qemu.guest_agent.0=/tmp/a.sock,b=/tmp/b",
        )
        .unwrap();
        assert_eq!(
            c.get("pci.0.5.0.port.0.name").unwrap().as_deref(),
            Some("org.qemu.guest_agent.0")
        );
        assert_eq!(
            c.get("pci.0.5.0.port.1.path").unwrap().as_deref(),
            Some("/tmp/b")
        );
        assert!(legacy_config(&mut c, "pci.0.6.0", "nopath").is_err());
        assert!(legacy_config(&mut c, "pci.0.6.0", "=x").is_err());
    }

    fn mem() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// The device's state for ports named `names`, every queue enabled with EVENT_IDX, and
    /// the driver's side of each queue.
    fn device<'a>(m: &'a GuestMem, names: &[&str]) -> (State, Vec<Driver<'a>>) {
        let nq = 2 + 2 * names.len();
        let mut drivers: Vec<Driver> = (0..nq)
            .map(|i| Driver::new(m, 0x1_0000 + 0x1000 * i as u64, 16))
            .collect();
        let queues = drivers
            .iter()
            .enumerate()
            .map(|(i, d)| Some(d.queue(i as u16)))
            .collect();
        // Linux polls the control-out queue in __send_control_msg and takes no interrupt for
        // it, so every interrupt in these tests is for a queue the driver waits on.
        let c_ovq = drivers.remove(usize::from(CTRL_TX)).polled();
        drivers.insert(usize::from(CTRL_TX), c_ovq);
        let io = names
            .iter()
            .map(|_| {
                Arc::new(PortIo {
                    client: Mutex::new(None),
                    inbound: Mutex::new(VecDeque::new()),
                    ready: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                })
            })
            .collect();
        let st = State {
            mem: m.clone(),
            queues,
            names: names.iter().map(|n| n.to_string()).collect(),
            io,
            pending_ctrl: VecDeque::new(),
            irq: mock::irq(),
            bad: AtomicU64::new(0),
            stats: Arc::default(),
            _idle: None,
        };
        (st, drivers)
    }

    const CTRL_BUF: u32 = 0x100;

    /// Linux's virtio_console driver (drivers/char/virtio_console.c), as far as the MULTIPORT
    /// handshake goes: virtcons_probe, __send_control_msg, control_work_handler, add_port.
    struct Guest<'a> {
        q: Vec<Driver<'a>>,
        sent: u64,
        added: Vec<u32>,
        names: BTreeMap<u32, String>,
        open: BTreeMap<u32, u16>,
    }

    impl Guest<'_> {
        /// add_inbuf / virtqueue_add_outbuf plus virtqueue_kick, which notifies the device
        /// only if avail_event asks for it.
        fn post(&mut self, st: &mut State, queue: u16, buf: (u64, u32, bool)) -> bool {
            let kick = self.q[usize::from(queue)].post(&[buf]);
            if kick {
                st.on_event(usize::from(queue));
            }
            kick
        }

        /// __send_control_msg: one message on c_ovq, then a spin until the device used it.
        fn send(&mut self, st: &mut State, id: u32, event: u16, value: u16) {
            let addr = 0x5_0000 + 0x10 * (self.sent % 16);
            self.sent += 1;
            st.mem
                .write_slice(&control(id, event, value, &[]), GuestAddress(addr))
                .unwrap();
            let kicked = self.post(st, CTRL_TX, (addr, 8, false));
            let c_ovq = &mut self.q[usize::from(CTRL_TX)];
            assert!(
                c_ovq.take_used().is_some(),
                "control event {event} for port {id} never used (kicked: {kicked}, avail_event {}): Linux spins in __send_control_msg",
                c_ovq.avail_event()
            );
        }

        fn post_ctrl_buf(&mut self, st: &mut State, k: u64) {
            self.post(st, CTRL_RX, (0x4_0000 + 0x1000 * k, CTRL_BUF, true));
        }

        /// control_work_handler, scheduled by c_ivq's interrupt: handles every used buffer
        /// and gives it back.
        fn control_work(&mut self, st: &mut State) {
            while let Some((head, len)) = self.q[usize::from(CTRL_RX)].take_used() {
                let addr = self.q[usize::from(CTRL_RX)].buffer(head);
                let mut msg = vec![0u8; len as usize];
                st.mem.read_slice(&mut msg, GuestAddress(addr)).unwrap();
                let (id, event, value) = parse_control(&msg).expect("a whole control message");
                match event {
                    DEVICE_ADD => {
                        // add_port: fill the port's receive queue, then PORT_READY.
                        self.added.push(id);
                        let (rx, _) = port_queues(id as usize);
                        for k in 0..4u64 {
                            let buf = 0x6_0000 + 0x1000 * u64::from(id) + 0x100 * k;
                            self.post(st, rx, (buf, 0x100, true));
                        }
                        self.send(st, id, PORT_READY, 1);
                    }
                    PORT_NAME => {
                        let name = String::from_utf8(msg[8..].to_vec()).unwrap();
                        assert!(self.names.insert(id, name).is_none());
                    }
                    PORT_OPEN => {
                        self.open.insert(id, value);
                    }
                    e => panic!("unexpected control event {e}"),
                }
                self.post(st, CTRL_RX, (addr, CTRL_BUF, true));
            }
        }
    }

    /// DEVICE_READY -> PORT_ADD per port -> PORT_READY -> PORT_NAME, PORT_OPEN, with every
    /// kick subject to avail_event and control_work run only on the device's interrupts.
    /// `late`: the driver posts its two c_ivq buffers only after DEVICE_READY, so the
    /// device holds messages until buffers arrive, and keeps running out of them.
    fn handshake(late: bool) {
        let m = mem();
        let names = ["org.qemu.guest_agent.0", "org.example.second"];
        let (mut st, q) = device(&m, &names);
        let irq = st.irq.clone();
        let mut g = Guest {
            q,
            sent: 0,
            added: Vec::new(),
            names: BTreeMap::new(),
            open: BTreeMap::new(),
        };
        if !late {
            g.post_ctrl_buf(&mut st, 0);
            g.post_ctrl_buf(&mut st, 1);
        }
        g.send(&mut st, u32::MAX, DEVICE_READY, 1);
        if late {
            assert_eq!(st.pending_ctrl.len(), 2, "PORT_ADDs wait for buffers");
            g.post_ctrl_buf(&mut st, 0);
            g.post_ctrl_buf(&mut st, 1);
        }
        for _ in 0..64 {
            if !mock::interrupted(&irq) {
                break;
            }
            g.control_work(&mut st);
        }
        assert_eq!(g.added, [0, 1], "late c_ivq buffers: {late}");
        assert_eq!(g.names.get(&0).map(String::as_str), Some(names[0]));
        assert_eq!(g.names.get(&1).map(String::as_str), Some(names[1]));
        assert_eq!(g.open, BTreeMap::from([(0, 1), (1, 1)]));
        assert!(st.pending_ctrl.is_empty());
    }

    #[test]
    fn with_event_idx_the_multiport_handshake_completes_for_two_named_ports() {
        handshake(false);
    }

    #[test]
    fn with_event_idx_control_messages_wait_for_late_c_ivq_buffers() {
        handshake(true);
    }

    /// Port data with EVENT_IDX: every guest write after the first is kicked and reaches the
    /// client; bytes from the client wait for a buffer, and the buffer the driver adds after
    /// rx ran out is kicked.
    #[test]
    fn with_event_idx_port_data_flows_both_ways_after_the_first_kick() {
        let m = mem();
        let (mut st, mut d) = device(&m, &["p0"]);
        let irq = st.irq.clone();
        let (mut host, guest_side) = UnixStream::pair().unwrap();
        *st.io[0].client.lock().unwrap() = Some(guest_side);
        for i in 0..3u16 {
            let addr = 0x3_0000 + 0x100 * u64::from(i);
            m.write_slice(format!("out{i}").as_bytes(), GuestAddress(addr))
                .unwrap();
            assert!(
                d[1].post(&[(addr, 4, false)]),
                "write {i}: the driver kicks (avail_event {})",
                d[1].avail_event()
            );
            st.on_event(1);
            assert_eq!(d[1].take_used(), Some((i, 0)));
        }
        let mut got = [0u8; 12];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"out0out1out2");
        let inbound_event = st.queues.len();
        for i in 0..3u16 {
            let text = format!("in{i}");
            st.io[0].inbound.lock().unwrap().extend(text.bytes());
            st.on_event(inbound_event);
            assert_eq!(d[0].take_used(), None, "no receive buffer yet");
            let addr = 0x4_0000 + 0x100 * u64::from(i);
            assert!(
                d[0].post(&[(addr, 0x100, true)]),
                "receive buffer {i}: the driver kicks (avail_event {})",
                d[0].avail_event()
            );
            st.on_event(0);
            assert!(mock::interrupted(&irq), "the driver is interrupted");
            assert_eq!(d[0].take_used(), Some((i, 3)));
            let mut b = [0u8; 3];
            m.read_slice(&mut b, GuestAddress(addr)).unwrap();
            assert_eq!(b, text.as_bytes());
        }
        // vm.counters: 12 bytes out, 9 in.
        assert_eq!(st.stats.tx_bytes.load(Ordering::Relaxed), 12);
        assert_eq!(st.stats.rx_bytes.load(Ordering::Relaxed), 9);
    }

    /// A console whose worker runs `st` (ports as `device` made them).
    fn running_console(st: State, paused: bool) -> Console {
        let ports = st
            .names
            .iter()
            .zip(&st.io)
            .map(|(name, io)| Port {
                name: name.clone(),
                io: io.clone(),
            })
            .collect();
        let mut fds: Vec<(i32, bool)> = st
            .queues
            .iter()
            .flatten()
            .map(|q| (q.notify.as_raw_fd(), false))
            .collect();
        fds.extend(st.io.iter().map(|io| (io.ready.as_raw_fd(), false)));
        let a = Activation {
            mem: st.mem.clone(),
            acked: F_MULTIPORT,
            queues: Vec::new(),
            irq: st.irq.clone(),
            paused,
        };
        let running = Running::start("virtio-console test", fds, &a, st).unwrap();
        Console {
            ports,
            running: Some(running),
            stats: Arc::default(),
        }
    }

    fn wait_used(d: &mut Driver) -> (u16, u32) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Some(u) = d.take_used() {
                return u;
            }
            assert!(std::time::Instant::now() < deadline, "nothing used");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    #[test]
    fn held_control_messages_and_client_bytes_survive_save_and_restore() {
        let m = mem();
        let (mut st, mut drivers) = device(&m, &["org.rhyve.a"]);
        // A port-add the driver has no c_ivq buffer for yet, and bytes from the port's client
        // the guest has not read.
        st.send_ctrl(control(0, DEVICE_ADD, 0, &[]));
        st.io[0].inbound.lock().unwrap().extend(b"hello guest");
        let mut con = running_console(st, false);
        con.pause();
        let saved = con.save_state().unwrap();

        let (fresh_st, _) = device(&m, &["org.rhyve.a"]);
        let mut fresh = running_console(fresh_st, true);
        fresh.restore_state(&saved).unwrap();
        assert_eq!(
            fresh.save_state().unwrap(),
            saved,
            "saved again: the same state"
        );
        drop(con);
        fresh.resume();
        // The driver's first c_ivq buffer gets the held message; port 0's receive buffer the
        // held bytes.
        let kick = drivers[usize::from(CTRL_RX)].post(&[(0x4_0000, CTRL_BUF, true)]);
        assert!(kick);
        let _ = fresh.running.as_ref().unwrap().lock().queues[usize::from(CTRL_RX)]
            .as_ref()
            .unwrap()
            .notify
            .write(1);
        assert_eq!(wait_used(&mut drivers[usize::from(CTRL_RX)]), (0, 8));
        let msg: [u8; 8] = {
            let mut b = [0u8; 8];
            m.read_slice(&mut b, GuestAddress(0x4_0000)).unwrap();
            b
        };
        assert_eq!(parse_control(&msg), Some((0, DEVICE_ADD, 0)));
        drivers[0].post(&[(0x6_0000, 64, true)]);
        let _ = fresh.running.as_ref().unwrap().lock().queues[0]
            .as_ref()
            .unwrap()
            .notify
            .write(1);
        assert_eq!(wait_used(&mut drivers[0]), (0, 11));
        let mut got = [0u8; 11];
        m.read_slice(&mut got, GuestAddress(0x6_0000)).unwrap();
        assert_eq!(&got, b"hello guest");
        // States a console cannot hold are refused.
        let mut two_ports = saved.clone();
        two_ports["inbound"] = serde_json::json!([[], []]);
        assert!(fresh.restore_state(&two_ports).is_err());
        let mut flood = saved;
        flood["pending_ctrl"] = serde_json::json!(vec![vec![0u8; 8]; CTRL_PENDING_MAX + 1]);
        assert!(fresh.restore_state(&flood).is_err());
    }
}
