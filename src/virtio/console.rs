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
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::pci::rate_limited;
use super::{drain, ActiveQueue, VirtioDevice, VirtioIrq, Worker};
use crate::config::{Config, Node};

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

/// The receive and transmit queue of port `p`.
fn port_queues(p: usize) -> (u16, u16) {
    let rx = if p == 0 { 0 } else { 2 + 2 * p as u16 };
    (rx, rx + 1)
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
    worker: Option<Worker>,
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
                    q.extend(&buf[..n.min(room)]);
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
            std::thread::Builder::new()
                .name(format!("vtcon port {i}"))
                .spawn(move || serve(listener, thread_io))
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
            worker: None,
        })
    }
}

/// Control message: id, event, value, then an optional payload (the port name).
fn control(id: u32, event: u16, value: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(8 + payload.len());
    m.extend_from_slice(&id.to_le_bytes());
    m.extend_from_slice(&event.to_le_bytes());
    m.extend_from_slice(&value.to_le_bytes());
    m.extend_from_slice(payload);
    m
}

/// Copies `data` into the next receive chain; returns bytes used, or None without a buffer.
fn fill(q: &mut ActiveQueue, mem: &GuestMemoryMmap, data: &[u8], bad: &AtomicU64) -> Option<usize> {
    let chain = q.queue.pop_descriptor_chain(mem)?;
    let head = chain.head_index();
    let mut off = 0;
    for d in chain {
        if !d.is_write_only() || off >= data.len() {
            continue;
        }
        let n = (d.len() as usize).min(data.len() - off);
        if mem.write_slice(&data[off..off + n], d.addr()).is_err() {
            if rate_limited(bad) {
                log::warn!("virtio-console: receive buffer outside guest memory");
            }
            break;
        }
        off += n;
    }
    let _ = q.queue.add_used(mem, head, off as u32);
    Some(off)
}

/// Everything readable in the next transmit chains, one Vec per chain.
fn take_tx(q: &mut ActiveQueue, mem: &GuestMemoryMmap) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(chain) = q.queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let mut buf = Vec::new();
        for d in chain {
            if d.is_write_only() || buf.len() + d.len() as usize > 1 << 20 {
                continue;
            }
            let start = buf.len();
            buf.resize(start + d.len() as usize, 0);
            if mem.read_slice(&mut buf[start..], d.addr()).is_err() {
                buf.truncate(start);
            }
        }
        let _ = q.queue.add_used(mem, head, 0);
        out.push(buf);
    }
    out
}

struct State {
    mem: GuestMemoryMmap,
    queues: Vec<Option<ActiveQueue>>,
    names: Vec<String>,
    io: Vec<Arc<PortIo>>,
    pending_ctrl: VecDeque<Vec<u8>>,
    irq: Arc<VirtioIrq>,
    bad: AtomicU64,
}

impl State {
    fn q(&mut self, i: u16) -> Option<&mut ActiveQueue> {
        self.queues.get_mut(usize::from(i)).and_then(|q| q.as_mut())
    }

    fn notify(&mut self, i: u16) {
        let mem = self.mem.clone();
        if let Some(q) = self.q(i) {
            if q.queue.needs_notification(&mem).unwrap_or(true) {
                self.irq.signal_queue(i);
            }
        }
    }

    /// Sends pending control messages while the driver has buffers for them.
    fn flush_ctrl(&mut self) {
        let mem = self.mem.clone();
        let mut sent = false;
        while let Some(m) = self.pending_ctrl.front().cloned() {
            let bad = &self.bad;
            let Some(q) = self
                .queues
                .get_mut(usize::from(CTRL_RX))
                .and_then(|q| q.as_mut())
            else {
                return;
            };
            if fill(q, &mem, &m, bad).is_none() {
                break;
            }
            self.pending_ctrl.pop_front();
            sent = true;
        }
        if sent {
            self.notify(CTRL_RX);
        }
    }

    fn handle_ctrl_tx(&mut self) {
        let mem = self.mem.clone();
        let Some(q) = self.q(CTRL_TX) else { return };
        let msgs = take_tx(q, &mem);
        self.notify(CTRL_TX);
        for m in msgs {
            if m.len() < 8 {
                continue;
            }
            let id = u32::from_le_bytes([m[0], m[1], m[2], m[3]]);
            let event = u16::from_le_bytes([m[4], m[5]]);
            let value = u16::from_le_bytes([m[6], m[7]]);
            match (event, value) {
                (DEVICE_READY, 1) => {
                    for p in 0..self.names.len() {
                        self.pending_ctrl
                            .push_back(control(p as u32, DEVICE_ADD, 0, &[]));
                    }
                }
                (PORT_READY, 1) if (id as usize) < self.names.len() => {
                    let name = self.names[id as usize].clone();
                    self.pending_ctrl
                        .push_back(control(id, PORT_NAME, 0, name.as_bytes()));
                    self.pending_ctrl.push_back(control(id, PORT_OPEN, 1, &[]));
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
        let io = self.io[p].clone();
        let mut inbound = io.inbound.lock().unwrap_or_else(|e| e.into_inner());
        let mut sent = false;
        while !inbound.is_empty() {
            let chunk: Vec<u8> = inbound.iter().take(4096).copied().collect();
            let bad = &self.bad;
            let Some(q) = self
                .queues
                .get_mut(usize::from(rx))
                .and_then(|q| q.as_mut())
            else {
                break;
            };
            match fill(q, &mem, &chunk, bad) {
                Some(n) if n > 0 => {
                    inbound.drain(..n);
                    sent = true;
                }
                _ => break,
            }
        }
        drop(inbound);
        if sent {
            self.notify(rx);
        }
    }

    fn transmit(&mut self, p: usize) {
        let mem = self.mem.clone();
        let (_, tx) = port_queues(p);
        let Some(q) = self.q(tx) else { return };
        let chunks = take_tx(q, &mem);
        self.notify(tx);
        let mut client = self.io[p].client.lock().unwrap_or_else(|e| e.into_inner());
        for c in chunks {
            if let Some(s) = client.as_mut() {
                if s.write_all(&c).is_err() {
                    *client = None;
                }
            }
        }
    }
}

impl VirtioDevice for Console {
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
        vec![QUEUE_SIZE; 2 + 2 * self.ports.len()]
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

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked: u64,
        queues: Vec<ActiveQueue>,
        irq: Arc<VirtioIrq>,
    ) -> Result<(), String> {
        if acked & F_MULTIPORT == 0 {
            return Err("virtio-console: the driver must accept MULTIPORT for named ports".into());
        }
        let nq = 2 + 2 * self.ports.len();
        let mut slots: Vec<Option<ActiveQueue>> = (0..nq).map(|_| None).collect();
        // Tokens: one per queue notify, then one per port's inbound-data event.
        let mut fds = vec![-1; nq];
        for q in queues {
            let i = usize::from(q.index);
            if i < nq {
                fds[i] = q.notify.as_raw_fd();
                slots[i] = Some(q);
            }
        }
        // A queue the driver left disabled gets a placeholder fd that never fires.
        let idle = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
        for fd in fds.iter_mut().filter(|fd| **fd < 0) {
            *fd = idle.as_raw_fd();
        }
        fds.extend(self.ports.iter().map(|p| p.io.ready.as_raw_fd()));
        let mut st = State {
            mem,
            queues: slots,
            names: self.ports.iter().map(|p| p.name.clone()).collect(),
            io: self.ports.iter().map(|p| p.io.clone()).collect(),
            pending_ctrl: VecDeque::new(),
            irq,
            bad: AtomicU64::new(0),
        };
        self.worker = Some(Worker::spawn("virtio-console".into(), fds, move |token| {
            let _keep = &idle;
            if token >= nq {
                let p = token - nq;
                drain(&st.io[p].ready);
                st.deliver(p);
                return true;
            }
            if let Some(q) = st.q(token as u16) {
                drain(&q.notify);
            }
            match token as u16 {
                CTRL_RX => st.flush_ctrl(),
                CTRL_TX => st.handle_ctrl_tx(),
                t => {
                    let p = if t < 2 { 0 } else { usize::from((t - 2) / 2) };
                    if t % 2 == 0 {
                        st.deliver(p);
                    } else {
                        st.transmit(p);
                    }
                }
            }
            true
        })?);
        Ok(())
    }

    fn worker_slot(&mut self) -> &mut Option<Worker> {
        &mut self.worker
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
    use super::*;
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
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
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
        assert_eq!(fill(&mut q, &m, b"0123456789", &bad), Some(4));
        assert_eq!(fill(&mut q, &m, b"0123456789", &bad), Some(0));
        let mut b = [0u8; 4];
        m.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(&b, b"0123");
        // The next chain is readable: take_tx gets its bytes (and completes it).
        m.write_slice(b"guestout", GuestAddress(0x2000)).unwrap();
        assert_eq!(take_tx(&mut q, &m), vec![b"guestout".to_vec()]);
        assert_eq!(
            m.read_obj::<u16>(vq.used_addr().unchecked_add(2)).unwrap(),
            3
        );
        assert_eq!(fill(&mut q, &m, b"x", &bad), None, "no buffers left");
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
}
