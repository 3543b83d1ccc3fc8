//! virtio-net over a Linux tap (virtio 1.2 §5.1; bhyve `pci_virtio_net.c` with `net_backends.c`):
//! one rx and one tx queue, the 12-byte virtio-net header passed through to the tap
//! (IFF_VNET_HDR), checksum and TSO offloads negotiated with the tap, mergeable rx buffers.
//! rx and tx run on the device's worker thread, never on a vCPU.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rhyve_hypervisor::memory::GuestMem;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes};

use super::rate_limited;
use super::{
    drain, Activation, ActiveQueue, Engine, QueueHandler, Running, VirtioDevice, VirtioIrq,
};
use rhyve_config::{parse_u64, Config};
use serde::Deserialize;

const QUEUE_SIZE: u16 = 256;
const RX: u16 = 0;
const TX: u16 = 1;
/// virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers.
const HDR_LEN: usize = 12;
/// Largest frame with its header: 64 KiB GSO payload plus headers.
const MAX_FRAME: usize = 65_562;

const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MTU: u64 = 1 << 3;
const F_MAC: u64 = 1 << 5;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_GUEST_TSO6: u64 = 1 << 8;
const F_HOST_TSO4: u64 = 1 << 11;
const F_HOST_TSO6: u64 = 1 << 12;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_STATUS: u64 = 1 << 16;
const STATUS_LINK_UP: u16 = 1;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens tap `name` (creating it if this process may), or a tap character device path.
fn open_tap(backend: &str) -> Result<File, String> {
    let err = |what: &str, e: std::io::Error| {
        format!("cannot open tap {backend}: {what}: {e} (a tap needs CAP_NET_ADMIN, or one created for this user)")
    };
    let path = if backend.starts_with('/') {
        backend
    } else {
        "/dev/net/tun"
    };
    let file = File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| err(path, e))?;
    if !backend.starts_with('/') {
        if backend.is_empty() || backend.len() >= libc::IFNAMSIZ {
            return Err(format!("tap name '{backend}' must be 1 to 15 characters"));
        }
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        // The name's length was checked against IFNAMSIZ above; a longer one is refused there.
        let Some(name) = req.name.get_mut(..backend.len()) else {
            return Err(format!("tap name {backend} is too long"));
        };
        name.copy_from_slice(backend.as_bytes());
        // SAFETY: TUNSETIFF reads an ifreq from a valid pointer to a properly sized struct.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &req) } < 0 {
            return Err(err("TUNSETIFF", std::io::Error::last_os_error()));
        }
    }
    let hdr = HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads an int from a valid pointer.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr) } < 0 {
        return Err(err("TUNSETVNETHDRSZ", std::io::Error::last_os_error()));
    }
    Ok(file)
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *m = u8::from_str_radix(p, 16).ok()?;
    }
    // Unicast and not all zero.
    (mac[0] & 1 == 0 && mac != [0; 6]).then_some(mac)
}

pub struct Net {
    tap: Arc<File>,
    mac: [u8; 6],
    mtu: Option<u16>,
    running: Option<Running<NetQueues>>,
    stats: Arc<NetStats>,
}

impl Net {
    pub fn new(cfg: &Config, prefix: &str) -> Result<Self, String> {
        let get = |k: &str| cfg.get(&format!("{prefix}.{k}")).map_err(|e| e.to_string());
        let backend =
            get("backend")?.ok_or("needs a backend: -s SLOT,virtio-net,tapN[,mac=..][,mtu=..]")?;
        let mac = match get("mac")? {
            Some(m) => parse_mac(&m)
                .ok_or_else(|| format!("mac={m} is not a unicast MAC address xx:xx:xx:xx:xx:xx"))?,
            None => {
                // Stable per VM name and slot, in bhyve's OUI 58:9c:fc, locally administered.
                let seed = format!("{}{prefix}", cfg.get_raw("name").unwrap_or(""));
                let h = seed.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
                });
                [0x58, 0x9c, 0xfc, (h >> 16) as u8, (h >> 8) as u8, h as u8]
            }
        };
        let mtu = match get("mtu")? {
            None => None,
            Some(m) => Some(
                parse_u64(&m)
                    .filter(|n| (68..=65_535).contains(n))
                    .ok_or_else(|| format!("mtu={m} must be from 68 to 65535"))?
                    as u16,
            ),
        };
        let tap = open_tap(&backend)?;
        Ok(Net {
            tap: Arc::new(tap),
            mac,
            mtu,
            running: None,
            stats: Arc::default(),
        })
    }
}

/// Frames on their way from the tap to the guest.
struct Rx {
    frame: Vec<u8>,
    /// A frame read from the tap that found no guest buffer yet.
    pending: usize,
    mrg: bool,
}

impl Rx {
    /// Copies the pending frame into as many rx chains as it needs (one without mergeable
    /// buffers). Returns false when the guest has no buffer for it.
    fn deliver(&mut self, q: &mut Queue, mem: &GuestMem, bad: &AtomicU64) -> bool {
        let Some(frame) = self.frame.get(..self.pending) else {
            // A pending length past the buffer cannot happen (the tap read into it); drop it.
            self.pending = 0;
            return true;
        };
        let mut off = 0usize;
        let mut chains: Vec<(u16, u32)> = Vec::new();
        let mut first_hdr = None;
        while off < frame.len() {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                // Not enough buffers: give back what we took and wait for more.
                for _ in &chains {
                    q.go_to_previous_position();
                }
                return false;
            };
            let head = chain.head_index();
            let mut written = 0u32;
            for d in chain {
                if !d.is_write_only() || off >= frame.len() {
                    continue;
                }
                // off < frame.len() (checked above), so `rest` is the unsent tail.
                let rest = frame.get(off..).unwrap_or_default();
                let n = (d.len() as usize).min(rest.len());
                let part = rest.get(..n).unwrap_or_default();
                if mem.write_slice(part, d.addr()).is_err() {
                    if rate_limited(bad) {
                        log::warn!("virtio-net: rx buffer outside guest memory");
                    }
                    break;
                }
                if first_hdr.is_none() && off == 0 && n >= HDR_LEN {
                    first_hdr = Some(d.addr());
                }
                // n <= the frame's tail (at most MAX_FRAME bytes in all): neither can overflow.
                off = off.saturating_add(n);
                written = written.saturating_add(n as u32);
            }
            chains.push((head, written));
            if !self.mrg {
                break;
            }
        }
        // num_buffers, in the header of the first chain.
        if let Some(at) = first_hdr.and_then(|h| h.checked_add(10)) {
            let n = u16::try_from(chains.len()).unwrap_or(u16::MAX);
            let _ = mem.write_obj(n, at);
        }
        for (head, len) in chains {
            let _ = q.add_used(mem, head, len);
        }
        self.pending = 0;
        true
    }
}

/// Moves frames from the tap into the guest's rx buffers until the tap is drained or the
/// buffers run out (then the driver is asked to kick when it adds more: Linux refills rx only
/// after using what it had, and kicks only if asked). Returns whether any frame was delivered.
fn receive(
    rx: &mut Rx,
    q: &mut ActiveQueue,
    mem: &GuestMem,
    tap: &mut impl Read,
    stats: &NetStats,
) -> bool {
    let bad = &stats.bad;
    let mut delivered = false;
    q.serve_rx(mem, |queue| loop {
        if rx.pending == 0 {
            match tap.read(&mut rx.frame) {
                Ok(n) if n > HDR_LEN => {
                    log::trace!("virtio-net: {n} bytes from the tap");
                    rx.pending = n
                }
                // A runt: dropped.
                Ok(n) if n > 0 => continue,
                // Drained (EAGAIN) or the tap went away.
                _ => return false,
            }
        }
        let frame = rx.pending;
        if !rx.deliver(queue, mem, bad) {
            log::trace!("virtio-net: no rx buffer, frame held");
            return true;
        }
        stats.rx_frames.fetch_add(1, Ordering::Relaxed);
        stats
            .rx_bytes
            .fetch_add(frame.saturating_sub(HDR_LEN) as u64, Ordering::Relaxed);
        delivered = true;
    });
    delivered
}

/// Sends every frame the guest queued for transmission to the tap; returns whether it
/// completed any.
fn transmit(
    q: &mut ActiveQueue,
    mem: &GuestMem,
    tap: &File,
    buf: &mut Vec<u8>,
    stats: &NetStats,
) -> bool {
    let bad = &stats.bad;
    let sent = q.serve_all(mem, |queue, chain| {
        let head = chain.head_index();
        buf.clear();
        let mut ok = true;
        for d in chain {
            if d.is_write_only() {
                continue;
            }
            let start = buf.len();
            let n = usize::try_from(d.len()).unwrap_or(usize::MAX);
            if n > MAX_FRAME.saturating_sub(start) {
                ok = false;
                break;
            }
            // n <= MAX_FRAME - start (checked above).
            buf.resize(start.saturating_add(n), 0);
            let part = buf.get_mut(start..).unwrap_or_default();
            if mem.read_slice(part, d.addr()).is_err() {
                ok = false;
                break;
            }
        }
        if ok && buf.len() > HDR_LEN {
            // A tap takes a frame whole or not at all.
            match (&*tap).write(buf) {
                Ok(n) => {
                    stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                    stats
                        .tx_bytes
                        .fetch_add(n.saturating_sub(HDR_LEN) as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    if rate_limited(bad) {
                        log::warn!("virtio-net: tap write: {e}");
                    }
                }
            }
        } else if rate_limited(bad) {
            log::warn!("virtio-net: malformed tx chain dropped");
        }
        let _ = queue.add_used(mem, head, 0);
        true
    });
    sent > 0
}

impl VirtioDevice for Net {
    fn name(&self) -> &'static str {
        "virtio-net"
    }
    fn device_type(&self) -> u16 {
        1
    }
    fn pci_class(&self) -> (u8, u8) {
        (0x02, 0x00)
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        let mut f = F_CSUM
            | F_GUEST_CSUM
            | F_MAC
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_HOST_TSO4
            | F_HOST_TSO6
            | F_MRG_RXBUF
            | F_STATUS;
        if self.mtu.is_some() {
            f |= F_MTU;
        }
        f
    }
    fn config_len(&self) -> usize {
        12
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&STATUS_LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.unwrap_or(1500).to_le_bytes());
        super::read_config_window(&c, offset, data);
    }

    fn activate(&mut self, mut a: Activation) -> Result<(), String> {
        let mut rxq = None;
        let mut txq = None;
        for q in a.queues.drain(..) {
            match q.index {
                RX => rxq = Some(q),
                TX => txq = Some(q),
                _ => {}
            }
        }
        let (Some(rxq), Some(txq)) = (rxq, txq) else {
            return Err("virtio-net: the driver must enable the rx and tx queues".into());
        };
        // Offloads the guest accepts on rx are what the tap may hand us.
        let mut off: libc::c_uint = 0;
        if a.acked & F_GUEST_CSUM != 0 {
            off |= TUN_F_CSUM;
            if a.acked & F_GUEST_TSO4 != 0 {
                off |= TUN_F_TSO4;
            }
            if a.acked & F_GUEST_TSO6 != 0 {
                off |= TUN_F_TSO6;
            }
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe {
            libc::ioctl(
                self.tap.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(off),
            )
        } < 0
        {
            return Err(format!(
                "TUNSETOFFLOAD: {}",
                std::io::Error::last_os_error()
            ));
        }
        let fds = vec![
            (rxq.notify.as_raw_fd(), false),
            (txq.notify.as_raw_fd(), false),
            (self.tap.as_raw_fd(), true),
        ];
        let handler = NetQueues {
            rxq,
            txq,
            mem: a.mem.clone(),
            tap: self.tap.clone(),
            rx: Rx {
                frame: vec![0; MAX_FRAME],
                pending: 0,
                mrg: a.acked & F_MRG_RXBUF != 0,
            },
            txbuf: Vec::with_capacity(MAX_FRAME),
            irq: a.irq.clone(),
            stats: self.stats.clone(),
        };
        self.running = Some(Running::start("virtio-net", fds, &a, handler)?);
        Ok(())
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = &self.stats;
        vec![
            ("rx_bytes", s.rx_bytes.load(Ordering::Relaxed)),
            ("rx_frames", s.rx_frames.load(Ordering::Relaxed)),
            ("tx_bytes", s.tx_bytes.load(Ordering::Relaxed)),
            ("tx_frames", s.tx_frames.load(Ordering::Relaxed)),
        ]
    }

    fn engine(&self) -> Option<&dyn Engine> {
        self.running.as_ref().map(|r| r as &dyn Engine)
    }

    fn stop(&mut self) {
        self.running = None;
    }

    /// A frame read from the tap and not yet given to the guest is part of the device's
    /// state: a restored device delivers it first.
    fn save_state(&self) -> Result<serde_json::Value, String> {
        let held = self.running.as_ref().map(|r| {
            let h = r.lock();
            h.rx.frame.get(..h.rx.pending).unwrap_or_default().to_vec()
        });
        serde_json::to_value(NetState {
            held_frame: held.unwrap_or_default(),
        })
        .map_err(|e| e.to_string())
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let st = NetState::deserialize(state).map_err(|e| e.to_string())?;
        if st.held_frame.is_empty() {
            return Ok(());
        }
        let Some(r) = &self.running else {
            return Err("virtio-net: a held frame for a device the driver had not started".into());
        };
        let mut h = r.lock();
        let Some(slot) = h.rx.frame.get_mut(..st.held_frame.len()) else {
            return Err(format!(
                "virtio-net: a held frame of {} bytes, more than a frame",
                st.held_frame.len()
            ));
        };
        slot.copy_from_slice(&st.held_frame);
        h.rx.pending = st.held_frame.len();
        Ok(())
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct NetState {
    held_frame: Vec<u8>,
}

/// The rx and tx queues, the tap, and a received frame waiting for guest buffers.
struct NetQueues {
    rxq: ActiveQueue,
    txq: ActiveQueue,
    mem: GuestMem,
    tap: Arc<File>,
    rx: Rx,
    txbuf: Vec<u8>,
    irq: Arc<VirtioIrq>,
    stats: Arc<NetStats>,
}

/// Frames and bytes (without the virtio-net header) each way since the device was created
/// (the API's `vm.counters`), and the rate limiter of its warnings.
#[derive(Default)]
pub struct NetStats {
    rx_bytes: AtomicU64,
    rx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    tx_frames: AtomicU64,
    bad: AtomicU64,
}

impl QueueHandler for NetQueues {
    /// Tokens: 0 rx notify, 1 tx notify, 2 the tap readable.
    fn handle(&mut self, token: usize) -> bool {
        match token {
            0 | 2 => {
                if token == 0 {
                    drain(&self.rxq.notify);
                }
                if receive(
                    &mut self.rx,
                    &mut self.rxq,
                    &self.mem,
                    &mut &*self.tap,
                    &self.stats,
                ) && self.rxq.queue.needs_notification(&self.mem).unwrap_or(true)
                {
                    self.irq.signal_queue(RX);
                }
            }
            _ => {
                drain(&self.txq.notify);
                if transmit(
                    &mut self.txq,
                    &self.mem,
                    &self.tap,
                    &mut self.txbuf,
                    &self.stats,
                ) && self.txq.queue.needs_notification(&self.mem).unwrap_or(true)
                {
                    self.irq.signal_queue(TX);
                }
            }
        }
        true
    }
    fn queues(&self) -> Vec<&ActiveQueue> {
        vec![&self.rxq, &self.txq]
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
    use super::*;
    use crate::mock::Driver;
    use std::collections::VecDeque;
    use virtio_queue::desc::{split::Descriptor as Desc, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestAddress};

    fn mem() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// A queue whose chains are single descriptors (addr, len, flags).
    fn queue<'a>(
        m: &'a GuestMem,
        descs: &[(u64, u32, u16)],
    ) -> (MockSplitQueue<'a, GuestMem>, ActiveQueue) {
        let vq = MockSplitQueue::create(m, GuestAddress(0x8000), 16);
        for (i, &(a, l, f)) in descs.iter().enumerate() {
            vq.desc_table()
                .store(i as u16, RawDescriptor::from(Desc::new(a, l, f, 0)))
                .unwrap();
            vq.avail().ring().ref_at(i).unwrap().store(i as u16);
        }
        vq.avail().idx().store(descs.len() as u16);
        let q = ActiveQueue {
            index: 0,
            queue: vq.create_queue().unwrap(),
            notify: vmm_sys_util::eventfd::EventFd::new(0).unwrap(),
        };
        (vq, q)
    }

    #[test]
    fn rx_merges_buffers_and_waits_when_there_are_none() {
        let m = mem();
        // Two 64-byte buffers for a 100-byte frame: mergeable rx uses both.
        let (vq, mut q) = queue(&m, &[(0x1000, 64, 2), (0x2000, 64, 2)]);
        let mut rx = Rx {
            frame: (0..100u8).collect(),
            pending: 100,
            mrg: true,
        };
        assert!(rx.deliver(&mut q.queue, &m, &AtomicU64::new(0)));
        assert_eq!(rx.pending, 0);
        let used = vq.used_addr();
        assert_eq!(
            m.read_obj::<u16>(used.unchecked_add(2)).unwrap(),
            2,
            "two used entries"
        );
        assert_eq!(m.read_obj::<u32>(used.unchecked_add(8)).unwrap(), 64);
        assert_eq!(m.read_obj::<u32>(used.unchecked_add(16)).unwrap(), 36);
        assert_eq!(
            m.read_obj::<u16>(GuestAddress(0x1000 + 10)).unwrap(),
            2,
            "num_buffers"
        );
        // No buffers left: the frame stays pending, nothing is consumed.
        rx.pending = 100;
        assert!(!rx.deliver(&mut q.queue, &m, &AtomicU64::new(0)));
        assert_eq!(rx.pending, 100);
        assert_eq!(m.read_obj::<u16>(used.unchecked_add(2)).unwrap(), 2);
    }

    #[test]
    fn tx_drops_malformed_chains_without_panicking() {
        let m = mem();
        let tap = File::create(
            std::env::temp_dir().join(format!("rhyve-fake-tap-{}", std::process::id())),
        )
        .unwrap();
        // Readable frame; a write-only chain (nothing to send); a buffer outside RAM; a
        // header-only chain.
        let descs = [
            (0x1000, 60, 0),
            (0x2000, 60, 2),
            (0xfff_0000, 60, 0),
            (0x3000, 12, 0),
        ];
        let (vq, mut q) = queue(&m, &descs);
        let mut buf = Vec::new();
        assert!(transmit(&mut q, &m, &tap, &mut buf, &NetStats::default()));
        assert_eq!(
            m.read_obj::<u16>(vq.used_addr().unchecked_add(2)).unwrap(),
            4,
            "every chain is completed"
        );
        drop(tap);
        let written = std::fs::read(
            std::env::temp_dir().join(format!("rhyve-fake-tap-{}", std::process::id())),
        )
        .unwrap();
        assert_eq!(written.len(), 60, "only the good frame reached the backend");
    }

    #[test]
    fn mac_addresses() {
        assert_eq!(
            parse_mac("52:54:00:12:34:56"),
            Some([0x52, 0x54, 0, 0x12, 0x34, 0x56])
        );
        for bad in [
            "01:00:00:00:00:01",
            "00:00:00:00:00:00",
            "52:54:00:12:34",
            "52:54:00:12:34:5g",
            "525400123456",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    /// Linux transmits a frame, kicks if avail_event asks for it, and goes on: every frame
    /// after the first reaches the tap only if the device re-armed the kick.
    #[test]
    fn with_event_idx_every_tx_frame_is_kicked_and_sent() {
        let m = mem();
        let path =
            std::env::temp_dir().join(format!("rhyve-fake-tap-evidx-{}", std::process::id()));
        let tap = File::create(&path).unwrap();
        let mut d = Driver::new(&m, 0x8000, 16);
        let mut q = d.queue(TX);
        let mut buf = Vec::new();
        let bad = NetStats::default();
        for i in 0..3u16 {
            let addr = 0x1000 + 0x100 * u64::from(i);
            m.write_slice(&[i as u8 + 1; 60], GuestAddress(addr))
                .unwrap();
            assert!(
                d.post(&[(addr, 60, false)]),
                "frame {i}: the driver kicks (avail_event {})",
                d.avail_event()
            );
            assert!(transmit(&mut q, &m, &tap, &mut buf, &bad));
            assert_eq!(d.avail_event(), i + 1, "the next frame will be kicked");
            assert_eq!(d.take_used(), Some((i, 0)));
        }
        drop(tap);
        // vm.counters: three frames, each 60 bytes less the virtio-net header.
        assert_eq!(bad.tx_frames.load(Ordering::Relaxed), 3);
        assert_eq!(
            bad.tx_bytes.load(Ordering::Relaxed),
            3 * (60 - HDR_LEN as u64)
        );
        let written = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let want: Vec<u8> = (1..=3u8).flat_map(|t| [t; 60]).collect();
        assert_eq!(written, want, "three frames reached the tap, in order");
    }

    /// A tap that hands out queued frames and then reports EAGAIN.
    struct FakeTap(VecDeque<Vec<u8>>);

    impl Read for FakeTap {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let f = self.0.pop_front().ok_or(std::io::ErrorKind::WouldBlock)?;
            buf[..f.len()].copy_from_slice(&f);
            Ok(f.len())
        }
    }

    /// Frames wait in the device while the guest has no rx buffer; the buffer the driver adds
    /// after rx ran out must be kicked, also when the device had popped one and given it back
    /// (a frame needing two mergeable buffers with one posted).
    #[test]
    fn with_event_idx_rx_asks_for_a_kick_when_it_runs_out_of_buffers() {
        let m = mem();
        let mut d = Driver::new(&m, 0x8000, 16);
        let mut q = d.queue(RX);
        let mut rx = Rx {
            frame: vec![0; MAX_FRAME],
            pending: 0,
            mrg: true,
        };
        let frames = [vec![1u8; 100], vec![2u8; 100], vec![3u8; 200]];
        let mut tap = FakeTap(frames.iter().cloned().collect());
        let bad = NetStats::default();
        assert!(!receive(&mut rx, &mut q, &m, &mut tap, &bad));
        assert_eq!(rx.pending, 100, "the first frame waits for a buffer");
        for (i, addr) in [0x1000u64, 0x2000].into_iter().enumerate() {
            assert!(
                d.post(&[(addr, 128, true)]),
                "rx buffer {i}: the driver kicks (avail_event {})",
                d.avail_event()
            );
            assert!(receive(&mut rx, &mut q, &m, &mut tap, &bad));
            assert!(q.queue.needs_notification(&m).unwrap(), "interrupt wanted");
            assert_eq!(d.take_used(), Some((i as u16, 100)));
            assert_eq!(bad.rx_frames.load(Ordering::Relaxed), i as u64 + 1);
            let mut got = [0u8; 100];
            m.read_slice(&mut got, GuestAddress(addr)).unwrap();
            assert_eq!(got[HDR_LEN..], frames[i][HDR_LEN..]);
            assert_eq!(got[10..12], [1, 0], "num_buffers");
        }
        // The 200-byte frame needs two 128-byte buffers: with one posted, the device takes it,
        // gives it back and waits.
        assert!(d.post(&[(0x3000, 128, true)]), "kicked");
        assert!(!receive(&mut rx, &mut q, &m, &mut tap, &bad));
        assert_eq!(d.take_used(), None);
        assert!(
            d.post(&[(0x4000, 128, true)]),
            "the next buffer is kicked although the device is behind the driver's index (avail_event {})",
            d.avail_event()
        );
        assert!(receive(&mut rx, &mut q, &m, &mut tap, &bad));
        assert_eq!(d.take_used(), Some((2, 128)));
        assert_eq!(d.take_used(), Some((3, 72)));
        assert_eq!(
            m.read_obj::<u16>(GuestAddress(0x3000 + 10)).unwrap(),
            2,
            "num_buffers"
        );
        assert_eq!(rx.pending, 0, "the tap is drained");
    }

    /// A net device running on a datagram socket pair instead of a tap (the queue handler
    /// reads and writes whole frames on it, as on a tap); returns the device and the peer.
    fn running_net(
        m: &GuestMem,
        rx: &Driver,
        tx: &Driver,
        paused: bool,
    ) -> (Net, std::os::unix::net::UnixDatagram) {
        let (ours, peer) = std::os::unix::net::UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let tap = Arc::new(File::from(std::os::fd::OwnedFd::from(ours)));
        let a = Activation {
            mem: m.clone(),
            acked: 0,
            queues: Vec::new(),
            irq: crate::mock::irq(),
            paused,
        };
        let handler = NetQueues {
            rxq: rx.queue(RX),
            txq: tx.queue(TX),
            mem: m.clone(),
            tap: tap.clone(),
            rx: Rx {
                frame: vec![0; MAX_FRAME],
                pending: 0,
                mrg: false,
            },
            txbuf: Vec::new(),
            irq: a.irq.clone(),
            stats: Arc::default(),
        };
        let fds = vec![
            (handler.rxq.notify.as_raw_fd(), false),
            (handler.txq.notify.as_raw_fd(), false),
            (tap.as_raw_fd(), true),
        ];
        let running = Running::start("virtio-net test", fds, &a, handler).unwrap();
        let net = Net {
            tap,
            mac: [2, 0, 0, 0, 0, 1],
            mtu: None,
            running: Some(running),
            stats: Arc::default(),
        };
        (net, peer)
    }

    #[test]
    fn a_frame_held_for_rx_buffers_survives_save_and_restore() {
        let m = mem();
        let mut rxd = Driver::new(&m, 0x8000, 16);
        let txd = Driver::new(&m, 0xa000, 16);
        let (mut net, peer) = running_net(&m, &rxd, &txd, false);
        // A frame arrives while the guest has no receive buffer: the device holds it.
        let frame: Vec<u8> = (0..100u8).collect();
        peer.send(&frame).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while net.running.as_ref().unwrap().lock().rx.pending == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the frame was not read"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        net.pause();
        let saved = net.save_state().unwrap();

        let (mut fresh, _peer2) = running_net(&m, &rxd, &txd, true);
        fresh.restore_state(&saved).unwrap();
        assert_eq!(
            fresh.save_state().unwrap(),
            saved,
            "saved again: the same state"
        );
        drop(net);
        // Resumed, the restored device gives the held frame to the guest's first buffer.
        fresh.resume();
        rxd.post(&[(0x1000, 256, true)]);
        let _ = fresh.running.as_ref().unwrap().lock().rxq.notify.write(1);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let used = loop {
            if let Some(u) = rxd.take_used() {
                break u;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the held frame never came"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        assert_eq!(used, (0, 100));
        let mut got = [0u8; 100];
        m.read_slice(&mut got, GuestAddress(0x1000)).unwrap();
        assert_eq!(got[HDR_LEN..], frame[HDR_LEN..]);
        // A held frame larger than any frame is refused, not copied.
        let mut huge = saved.clone();
        huge["held_frame"] = serde_json::json!(vec![0u8; MAX_FRAME + 1]);
        assert!(fresh.restore_state(&huge).is_err());
    }
}
