//! virtio-rnd: the entropy device (virtio 1.2 §5.4; bhyve `pci_virtio_rnd.c`). One request
//! queue; every writable buffer the driver posts is filled from the host's getrandom(2).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::{drain, ActiveQueue, VirtioDevice, VirtioIrq, Worker};
use crate::config::Config;

const QUEUE_SIZE: u16 = 256;
/// Most bytes served per request, so one hostile chain cannot stall the queue for long.
const MAX_REQUEST: usize = 64 << 10;

pub struct Rng {
    worker: Option<Worker>,
}

impl Rng {
    pub fn new(_cfg: &Config, _prefix: &str) -> Result<Self, String> {
        Ok(Rng { worker: None })
    }
}

fn getrandom(buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n <= 0 {
            return false;
        }
        done += n as usize;
    }
    true
}

/// Serves every available request; returns whether the driver must be interrupted.
fn process(q: &mut ActiveQueue, mem: &GuestMemoryMmap, bad: &AtomicU64) -> bool {
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
                if super::pci::rate_limited(bad) {
                    log::warn!(
                        "virtio-rnd: buffer outside guest memory at {:#x}",
                        desc.addr().0
                    );
                }
                break;
            }
            written = written.saturating_add(len);
        }
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

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _acked: u64,
        mut queues: Vec<ActiveQueue>,
        irq: Arc<VirtioIrq>,
    ) -> Result<(), String> {
        let Some(mut q) = queues.pop() else {
            return Err("virtio-rnd: the driver enabled no queue".into());
        };
        let fds = vec![std::os::fd::AsRawFd::as_raw_fd(&q.notify)];
        let bad = AtomicU64::new(0);
        let fail = irq.clone();
        self.worker = Some(Worker::spawn("virtio-rnd".into(), fds, fail, move |_| {
            drain(&q.notify);
            if process(&mut q, &mem, &bad) {
                irq.signal_queue(q.index);
            }
            true
        })?);
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
    use virtio_queue::desc::{split::Descriptor as Desc, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestAddress};

    #[test]
    fn fills_writable_buffers_and_skips_bad_ones() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
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
        assert!(process(&mut q, &m, &AtomicU64::new(0)));
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
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mut d = Driver::new(&m, 0x8000, 16);
        let mut q = d.queue(0);
        let bad = AtomicU64::new(0);
        for i in 0..3u16 {
            let addr = 0x1000 + 0x100 * u64::from(i);
            assert!(
                d.post(&[(addr, 32, true)]),
                "request {i}: the driver kicks (avail_event {})",
                d.avail_event()
            );
            assert!(
                process(&mut q, &m, &bad),
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
        assert!(!process(&mut q, &m, &bad), "used_event not reached");
        assert_eq!(d.avail_event(), 5);
        assert_eq!(d.take_used(), Some((3, 16)));
        assert_eq!(d.take_used(), Some((4, 16)));
        assert!(
            d.post(&[(0x2200, 16, true)]),
            "the next one is kicked again"
        );
        assert!(process(&mut q, &m, &bad));
        assert_eq!(d.take_used(), Some((5, 16)));
    }
}
