//! virtio-net over a Linux tap (virtio 1.2 §5.1; bhyve `pci_virtio_net.c` with `net_backends.c`):
//! one rx and one tx queue, the 12-byte virtio-net header passed through to the tap
//! (IFF_VNET_HDR), checksum and TSO offloads negotiated with the tap, mergeable rx buffers.
//! rx and tx run on the device's worker thread, never on a vCPU.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryMmap};

use super::pci::rate_limited;
use super::{drain, ActiveQueue, VirtioDevice, VirtioIrq, Worker};
use crate::config::{parse_u64, Config};

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
        req.name[..backend.len()].copy_from_slice(backend.as_bytes());
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
    worker: Option<Worker>,
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
            worker: None,
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
    fn deliver(&mut self, q: &mut Queue, mem: &GuestMemoryMmap, bad: &AtomicU64) -> bool {
        let frame = &mut self.frame[..self.pending];
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
                let n = (d.len() as usize).min(frame.len() - off);
                if mem.write_slice(&frame[off..off + n], d.addr()).is_err() {
                    if rate_limited(bad) {
                        log::warn!("virtio-net: rx buffer outside guest memory");
                    }
                    break;
                }
                if first_hdr.is_none() && off == 0 && n >= HDR_LEN {
                    first_hdr = Some(d.addr());
                }
                off += n;
                written += n as u32;
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
    mem: &GuestMemoryMmap,
    tap: &mut impl Read,
    bad: &AtomicU64,
) -> bool {
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
        if !rx.deliver(queue, mem, bad) {
            log::trace!("virtio-net: no rx buffer, frame held");
            return true;
        }
        delivered = true;
    });
    delivered
}

/// Sends every frame the guest queued for transmission to the tap; returns whether it
/// completed any.
fn transmit(
    q: &mut ActiveQueue,
    mem: &GuestMemoryMmap,
    tap: &File,
    buf: &mut Vec<u8>,
    bad: &AtomicU64,
) -> bool {
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
            buf.resize(start + n, 0);
            if mem.read_slice(&mut buf[start..], d.addr()).is_err() {
                ok = false;
                break;
            }
        }
        if ok && buf.len() > HDR_LEN {
            if let Err(e) = (&*tap).write(buf) {
                if rate_limited(bad) {
                    log::warn!("virtio-net: tap write: {e}");
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

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked: u64,
        queues: Vec<ActiveQueue>,
        irq: Arc<VirtioIrq>,
    ) -> Result<(), String> {
        let mut rxq = None;
        let mut txq = None;
        for q in queues {
            match q.index {
                RX => rxq = Some(q),
                TX => txq = Some(q),
                _ => {}
            }
        }
        let (Some(mut rxq), Some(mut txq)) = (rxq, txq) else {
            return Err("virtio-net: the driver must enable the rx and tx queues".into());
        };
        // Offloads the guest accepts on rx are what the tap may hand us.
        let mut off: libc::c_uint = 0;
        if acked & F_GUEST_CSUM != 0 {
            off |= TUN_F_CSUM;
            if acked & F_GUEST_TSO4 != 0 {
                off |= TUN_F_TSO4;
            }
            if acked & F_GUEST_TSO6 != 0 {
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
        let tap = self.tap.clone();
        let fds = vec![
            (rxq.notify.as_raw_fd(), false),
            (txq.notify.as_raw_fd(), false),
            (tap.as_raw_fd(), true),
        ];
        let mut rx = Rx {
            frame: vec![0; MAX_FRAME],
            pending: 0,
            mrg: acked & F_MRG_RXBUF != 0,
        };
        let mut txbuf = Vec::with_capacity(MAX_FRAME);
        let bad = AtomicU64::new(0);
        let fail = irq.clone();
        self.worker = Some(Worker::spawn_with(
            "virtio-net".into(),
            fds,
            fail,
            move |token| {
                match token {
                    0 | 2 => {
                        if token == 0 {
                            drain(&rxq.notify);
                        }
                        if receive(&mut rx, &mut rxq, &mem, &mut &*tap, &bad)
                            && rxq.queue.needs_notification(&mem).unwrap_or(true)
                        {
                            irq.signal_queue(RX);
                        }
                    }
                    _ => {
                        drain(&txq.notify);
                        if transmit(&mut txq, &mem, &tap, &mut txbuf, &bad)
                            && txq.queue.needs_notification(&mem).unwrap_or(true)
                        {
                            irq.signal_queue(TX);
                        }
                    }
                }
                true
            },
        )?);
        Ok(())
    }

    fn worker_slot(&mut self) -> &mut Option<Worker> {
        &mut self.worker
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::mock::Driver;
    use std::collections::VecDeque;
    use virtio_queue::desc::{split::Descriptor as Desc, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestAddress};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// A queue whose chains are single descriptors (addr, len, flags).
    fn queue<'a>(
        m: &'a GuestMemoryMmap,
        descs: &[(u64, u32, u16)],
    ) -> (MockSplitQueue<'a, GuestMemoryMmap>, ActiveQueue) {
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
        assert!(transmit(&mut q, &m, &tap, &mut buf, &AtomicU64::new(0)));
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
        let bad = AtomicU64::new(0);
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
        let bad = AtomicU64::new(0);
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
}
