//! virtio-rnd: the entropy device (virtio 1.2 §5.4; bhyve `pci_virtio_rnd.c`). One request
//! queue; every writable buffer the driver posts is filled from the host's getrandom(2).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rhyve_hypervisor::memory::GuestMem;
use virtio_queue::QueueT;
use vm_memory::Bytes;

use super::{
    drain, Activation, ActiveQueue, Engine, QueueHandler, Running, VirtioDevice, VirtioIrq,
};
use rhyve_config::Config;

const QUEUE_SIZE: u16 = 256;
/// Most bytes served per request, so one hostile chain cannot stall the queue for long.
const MAX_REQUEST: usize = 64 << 10;

pub struct Rng {
    running: Option<Running<RngQueue>>,
    stats: Arc<RngStats>,
}

/// Requests served and bytes given, since the device was created (the API's `vm.counters`).
#[derive(Default)]
struct RngStats {
    requests: AtomicU64,
    bytes: AtomicU64,
}

impl Rng {
    pub fn new(_cfg: &Config, _prefix: &str) -> Result<Self, String> {
        Ok(Rng {
            running: None,
            stats: Arc::default(),
        })
    }
}

/// The request queue and what serving it needs.
struct RngQueue {
    q: ActiveQueue,
    mem: GuestMem,
    irq: Arc<VirtioIrq>,
    bad: AtomicU64,
    stats: Arc<RngStats>,
}

impl QueueHandler for RngQueue {
    fn handle(&mut self, _token: usize) -> bool {
        drain(&self.q.notify);
        if process(&mut self.q, &self.mem, &self.bad, &self.stats) {
            self.irq.signal_queue(self.q.index);
        }
        true
    }
    fn queues(&self) -> Vec<&ActiveQueue> {
        vec![&self.q]
    }
}

fn getrandom(buf: &mut [u8]) -> bool {
    let mut rest = buf;
    while !rest.is_empty() {
        // SAFETY: the pointer and length describe `rest`, the unfilled tail of `buf`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        let Some(n) = usize::try_from(n).ok().filter(|n| *n > 0) else {
            return false;
        };
        // getrandom(2) fills at most the length it was given.
        rest = rest.get_mut(n..).unwrap_or_default();
    }
    true
}

/// Serves every available request; returns whether the driver must be interrupted.
fn process(q: &mut ActiveQueue, mem: &GuestMem, bad: &AtomicU64, stats: &RngStats) -> bool {
    let mut buf = Vec::new();
    let served = q.serve_all(mem, |queue, chain| {
        let head = chain.head_index();
        let mut written = 0usize;
        for desc in chain {
            if !desc.is_write_only() {
                continue;
            }
            let len = usize::try_from(desc.len())
                .unwrap_or(usize::MAX)
                .min(MAX_REQUEST.saturating_sub(written));
            if len == 0 {
                break;
            }
            buf.resize(len, 0);
            if !getrandom(&mut buf) {
                break;
            }
            if mem.write_slice(&buf, desc.addr()).is_err() {
                if super::rate_limited(bad) {
                    log::warn!(
                        "virtio-rnd: buffer outside guest memory at {:#x}",
                        desc.addr().0
                    );
                }
                break;
            }
            written = written.saturating_add(len);
        }
        stats.requests.fetch_add(1, Ordering::Relaxed);
        stats.bytes.fetch_add(written as u64, Ordering::Relaxed);
        // At most MAX_REQUEST, which fits.
        let written = u32::try_from(written).unwrap_or(u32::MAX);
        if let Err(e) = queue.add_used(mem, head, written) {
            log::warn!("virtio-rnd: add_used: {e}");
        }
        true
    });
    served > 0 && q.queue.needs_notification(mem).unwrap_or(true)
}

impl VirtioDevice for Rng {
    fn name(&self) -> &'static str {
        "virtio-rnd"
    }
    fn device_type(&self) -> u16 {
        4
    }
    fn pci_class(&self) -> (u8, u8) {
        (0xff, 0x00)
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        0
    }

    fn activate(&mut self, mut a: Activation) -> Result<(), String> {
        let Some(q) = a.queues.pop() else {
            return Err("virtio-rnd: the driver enabled no queue".into());
        };
        let fds = vec![(std::os::fd::AsRawFd::as_raw_fd(&q.notify), false)];
        let handler = RngQueue {
            q,
            mem: a.mem.clone(),
            irq: a.irq.clone(),
            bad: AtomicU64::new(0),
            stats: self.stats.clone(),
        };
        self.running = Some(Running::start("virtio-rnd", fds, &a, handler)?);
        Ok(())
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("bytes", self.stats.bytes.load(Ordering::Relaxed)),
            ("requests", self.stats.requests.load(Ordering::Relaxed)),
        ]
    }

    fn engine(&self) -> Option<&dyn Engine> {
        self.running.as_ref().map(|r| r as &dyn Engine)
    }

    fn stop(&mut self) {
        self.running = None;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
    use super::*;
    use crate::mock::Driver;
    use virtio_queue::desc::{split::Descriptor as Desc, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestAddress};

    #[test]
    fn fills_writable_buffers_and_skips_bad_ones() {
        let m = GuestMem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let vq = MockSplitQueue::create(&m, GuestAddress(0x8000), 16);
        // Chain 0: one 64-byte writable buffer. Chain 1: readable only. Chain 2: outside RAM.
        let descs = [
            (0x1000u64, 64u32, 2u16),
            (0x2000, 64, 0),
            (0xfff_0000, 64, 2),
        ];
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
            notify: vmm_sys_util::eventfd::EventFd::new(0).unwrap(),
        };
        let stats = RngStats::default();
        assert!(process(&mut q, &m, &AtomicU64::new(0), &stats));
        // Three requests, 64 bytes given (vm.counters).
        assert_eq!(stats.requests.load(Ordering::Relaxed), 3);
        assert_eq!(stats.bytes.load(Ordering::Relaxed), 64);
        let used_len = |i: u64| {
            m.read_obj::<u32>(vq.used_addr().unchecked_add(4 + 8 * i + 4))
                .unwrap()
        };
        assert_eq!(
            m.read_obj::<u16>(vq.used_addr().unchecked_add(2)).unwrap(),
            3
        );
        assert_eq!(used_len(0), 64);
        assert_eq!(used_len(1), 0, "readable buffers get nothing");
        assert_eq!(
            used_len(2),
            0,
            "a buffer outside RAM gets nothing, and no panic"
        );
        let mut b = [0u8; 64];
        m.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_ne!(b, [0u8; 64]);
    }

    /// Linux's virtio-rng posts one buffer, kicks, waits for it, and posts the next: with
    /// EVENT_IDX each kick is sent only if the device moved avail_event past the last one.
    #[test]
    fn with_event_idx_every_request_is_kicked_and_completed() {
        let m = GuestMem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mut d = Driver::new(&m, 0x8000, 16);
        let mut q = d.queue(0);
        let bad = AtomicU64::new(0);
        let stats = RngStats::default();
        for i in 0..3u16 {
            let addr = 0x1000 + 0x100 * u64::from(i);
            assert!(
                d.post(&[(addr, 32, true)]),
                "request {i}: the driver kicks (avail_event {})",
                d.avail_event()
            );
            assert!(
                process(&mut q, &m, &bad, &stats),
                "request {i}: the driver asked for an interrupt"
            );
            assert_eq!(d.avail_event(), i + 1, "the next request will be kicked");
            assert_eq!(d.take_used(), Some((i, 32)), "request {i} completed");
        }
        // Two requests behind one kick, served together; a driver whose used_event is ahead
        // gets no interrupt.
        assert!(d.post(&[(0x2000, 16, true)]));
        assert!(
            !d.post(&[(0x2100, 16, true)]),
            "no second kick before the device has looked"
        );
        d.set_used_event(10);
        assert!(!process(&mut q, &m, &bad, &stats), "used_event not reached");
        assert_eq!(d.avail_event(), 5);
        assert_eq!(d.take_used(), Some((3, 16)));
        assert_eq!(d.take_used(), Some((4, 16)));
        assert!(
            d.post(&[(0x2200, 16, true)]),
            "the next one is kicked again"
        );
        assert!(process(&mut q, &m, &bad, &stats));
        assert_eq!(d.take_used(), Some((5, 16)));
        assert_eq!(stats.requests.load(Ordering::Relaxed), 6);
        assert_eq!(stats.bytes.load(Ordering::Relaxed), 3 * 32 + 3 * 16);
    }
}
