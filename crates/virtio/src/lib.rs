//! virtio devices (virtio 1.2), transport-agnostic (the role of bhyve's `virtio.c`): the
//! `VirtioDevice` trait each device implements, the interrupt a device raises, the running
//! part of a device (`Running`: its queues and what it holds between events, in a
//! `QueueHandler` the device owns, served by a worker thread off the vCPU threads), and the
//! loops that take chains off a queue with notifications re-armed (`ActiveQueue::serve_all`,
//! `serve_rx`). `pci.rs` is the PCI transport.

pub mod blk;
pub mod console;
pub mod net;
pub mod pci;
pub mod rng;

use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use rhyve_hypervisor::memory::GuestMem;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use rhyve_hypervisor::irq::{IntxLine, MsiVector};

/// Feature bits every device offers through the transport.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
pub const VIRTIO_F_RING_INDIRECT_DESC: u64 = 1 << 28;

/// Log one in this many bad guest actions of a device.
pub const BAD_INPUT_LOG_EVERY: u64 = 100;

/// Rate limit for a device's complaints about guest input.
pub fn rate_limited(counter: &AtomicU64) -> bool {
    rhyve_base::logging::rate_limited(counter, BAD_INPUT_LOG_EVERY)
}

/// A queue the driver has set up, handed to the device when it starts.
pub struct ActiveQueue {
    pub index: u16,
    pub queue: Queue,
    /// Signalled by KVM (ioeventfd) when the guest notifies this queue.
    pub notify: EventFd,
}

/// Most chains one `serve_all` call takes before it lets the worker see to its other events
/// (stop, pause, other queues) and comes back: a driver may add chains as fast as they go.
const SERVE_BUDGET: usize = 1024;
/// Most times `serve_rx` runs again because the driver added buffers while it re-armed,
/// before it lets the worker see to its other events and comes back.
const REARM_ROUNDS: usize = 16;

// Event suppression (virtio 1.2 §2.7.7, §2.7.10). With VIRTIO_F_EVENT_IDX, which Linux always
// negotiates, the driver kicks only when its avail index passes the used ring's avail_event,
// and nothing moves avail_event but the device: a device that does not write it after serving
// a queue gets exactly one kick, ever. Every loop that takes chains off a queue ends here.
impl ActiveQueue {
    /// Takes every chain the driver has made available and hands each to `handle`, which puts
    /// it in the used ring (now or later) and returns false to stop serving at once. With the
    /// driver's notifications off while it runs, then on again (avail_event = where it stopped),
    /// and a second look for chains that raced with turning them on: the driver's next chain
    /// is kicked, none is left unseen. Returns how many chains `handle` got.
    pub fn serve_all<'m, F>(&mut self, mem: &'m GuestMem, mut handle: F) -> usize
    where
        F: FnMut(&mut Queue, DescriptorChain<&'m GuestMem>) -> bool,
    {
        let mut handled = 0usize;
        let mut first = true;
        loop {
            let _ = self.queue.disable_notification(mem);
            let before = handled;
            while let Some(chain) = self.queue.pop_descriptor_chain(mem) {
                handled = handled.saturating_add(1);
                if !handle(&mut self.queue, chain) {
                    return handled;
                }
                if handled >= SERVE_BUDGET {
                    self.come_back();
                    return handled;
                }
            }
            let more = self.queue.enable_notification(mem).unwrap_or(false);
            // A second pass that finds nothing although the index says there is more means an
            // index the queue cannot have (more than its size ahead): notifications stay on and
            // the device waits for the next kick instead of spinning on it.
            if !more || (!first && handled == before) {
                return handled;
            }
            first = false;
        }
    }

    /// Serves a queue the device fills only when it has data for it (a receive queue): `fill`
    /// moves what the device holds into the driver's buffers and returns true if it stopped
    /// because they ran out while it still holds data. Then the driver is asked to kick when
    /// it adds a buffer, and `fill` runs again if it already has.
    pub fn serve_rx<F>(&mut self, mem: &GuestMem, mut fill: F)
    where
        F: FnMut(&mut Queue) -> bool,
    {
        for _ in 0..REARM_ROUNDS {
            if !fill(&mut self.queue) || !self.want_buffers(mem) {
                return;
            }
        }
        self.come_back();
    }

    /// Asks the driver to notify the device when it makes one more buffer available than it
    /// has now; returns whether it has made more available since `fill` last looked. With
    /// EVENT_IDX avail_event is set to the driver's own avail index, not to the device's next
    /// one (what `enable_notification` writes): chains the device popped and gave back (a
    /// frame that needs more buffers than there are) lie between the two, and the driver kicks
    /// only when its index moves past avail_event.
    fn want_buffers(&mut self, mem: &GuestMem) -> bool {
        let Ok(seen) = self.queue.avail_idx(mem, Ordering::Acquire) else {
            return false;
        };
        if self.queue.event_idx_enabled() {
            // avail_event follows the used ring's flags, idx and `size` 8-byte entries (§2.7.8).
            let at = u64::from(self.queue.size())
                .checked_mul(8)
                .and_then(|n| n.checked_add(4))
                .and_then(|n| GuestAddress(self.queue.used_ring()).checked_add(n));
            let Some(at) = at else { return false };
            if mem.store(seen.0.to_le(), at, Ordering::Relaxed).is_err() {
                return false;
            }
        } else {
            // Clears VIRTQ_USED_F_NO_NOTIFY. Its answer compares the driver's index with the
            // device's next one, which is behind it when chains were given back: not used.
            let _ = self.queue.enable_notification(mem);
        }
        // The driver reads avail_event after publishing its index; the device reads the index
        // after publishing avail_event: one of the two sees the other's write.
        fence(Ordering::SeqCst);
        self.queue
            .avail_idx(mem, Ordering::Acquire)
            .is_ok_and(|now| now != seen)
    }

    /// Makes the worker call the handler for this queue again after it has seen to its other
    /// events, as a kick from the driver would.
    fn come_back(&self) {
        let _ = self.notify.write(1);
    }
}

/// Where a running queue stands: the part of a queue's state that only the device knows (the
/// transport holds the driver's register values: size, addresses, ready).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueuePosition {
    pub index: u16,
    pub next_avail: u16,
    pub next_used: u16,
}

/// What a device is given when the driver sets DRIVER_OK (or when a saved device is restored).
pub struct Activation {
    pub mem: GuestMem,
    /// The features the driver accepted.
    pub acked: u64,
    /// The queues the driver enabled (a restored device's at their saved positions).
    pub queues: Vec<ActiveQueue>,
    pub irq: Arc<VirtioIrq>,
    /// Start with the worker parked until `resume`: a device restored into a paused VM.
    pub paused: bool,
}

/// A device's queues and whatever it holds between events, served by its worker thread. It is
/// a named value the device owns (through `Running`), not state captured in a closure: the
/// device can test it, inspect it while paused and save where its queues stand.
pub trait QueueHandler: Send + 'static {
    /// One of the device's fds fired (`token` = its index in the fds given to `Running::start`).
    /// Returns false when the device can no longer serve (its backend went away).
    fn handle(&mut self, token: usize) -> bool;
    /// The queues it serves.
    fn queues(&self) -> Vec<&ActiveQueue>;
}

/// What the transport needs from a device's running part, whatever its handler.
pub trait Engine: Send {
    /// Parks the worker between events; returns once it is parked.
    fn pause(&self);
    /// Unparks it. If completions were made while it was parked, or it was restored, it
    /// interrupts the driver for every queue (a spurious interrupt costs a driver one look at
    /// its rings; a missing one leaves it waiting) and looks at every queue once.
    fn resume(&self);
    /// Where each queue stands (valid while paused).
    fn positions(&self) -> Vec<QueuePosition>;
    /// Asks for the interrupt `resume` gives.
    fn owe_interrupts(&self);
}

/// A device's running part: the handler it shares with its worker thread (which takes the
/// handler's lock for each event; the device takes it only while the worker is parked or to
/// hand it something).
pub struct Running<H> {
    handler: Arc<Mutex<H>>,
    irq: Arc<VirtioIrq>,
    owed: AtomicBool,
    worker: Worker,
}

impl<H: QueueHandler> Running<H> {
    /// Starts the worker thread `name` on `fds` (token = index; true = edge-triggered).
    pub fn start(
        name: &str,
        fds: Vec<(i32, bool)>,
        a: &Activation,
        handler: H,
    ) -> Result<Self, String> {
        let handler = Arc::new(Mutex::new(handler));
        let h = handler.clone();
        let worker = Worker::spawn_with(name.into(), fds, a.irq.clone(), a.paused, move |t| {
            h.lock().unwrap_or_else(|p| p.into_inner()).handle(t)
        })?;
        Ok(Running {
            handler,
            irq: a.irq.clone(),
            owed: AtomicBool::new(a.paused),
            worker,
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, H> {
        self.handler.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<H: QueueHandler> Engine for Running<H> {
    fn pause(&self) {
        self.worker.pause();
    }

    fn resume(&self) {
        if self.owed.swap(false, Ordering::SeqCst) {
            let h = self.lock();
            for q in h.queues() {
                self.irq.signal_queue(q.index);
                // And a look at each queue, as if kicked: a restored device's transport has
                // new notify eventfds, so a kick the saved one had not read is not lost.
                q.come_back();
            }
        }
        self.worker.resume();
    }

    fn positions(&self) -> Vec<QueuePosition> {
        self.lock()
            .queues()
            .iter()
            .map(|q| QueuePosition {
                index: q.index,
                next_avail: q.queue.next_avail(),
                next_used: q.queue.next_used(),
            })
            .collect()
    }

    fn owe_interrupts(&self) {
        self.owed.store(true, Ordering::SeqCst);
    }
}

/// What a virtio device implements; the transport does the rest (bhyve `struct virtio_consts`
/// and its callbacks).
pub trait VirtioDevice: Send {
    /// The `-s` emulation name.
    fn name(&self) -> &'static str;
    /// virtio device ID (1 net, 2 block, 3 console, 4 entropy, ...).
    fn device_type(&self) -> u16;
    /// PCI class, subclass.
    fn pci_class(&self) -> (u8, u8);
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Device-specific feature bits (the transport adds VERSION_1 and the ring features).
    fn features(&self) -> u64;
    fn config_len(&self) -> usize {
        0
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK: start serving the queues (a `Running` of its handler).
    /// I/O counters since the device was created (bytes and requests), by name.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    fn activate(&mut self, a: Activation) -> Result<(), String>;
    /// The running part, while active.
    fn engine(&self) -> Option<&dyn Engine>;
    /// Stop serving queues and forget them (its `Running` dropped: the worker stopped).
    fn stop(&mut self);
    /// The driver reset the device.
    fn reset(&mut self) {
        self.stop();
    }
    /// Stop touching guest memory and queues until `resume` (bhyve `pe_pause`); work in flight
    /// is completed into the rings first.
    fn pause(&mut self) {
        if let Some(e) = self.engine() {
            e.pause();
        }
    }
    fn resume(&mut self) {
        if let Some(e) = self.engine() {
            e.resume();
        }
    }
    /// The device's own state beyond its queues and configuration (held data, pending
    /// messages); called only while paused. None by default.
    fn save_state(&self) -> Result<serde_json::Value, String> {
        Ok(serde_json::Value::Null)
    }
    /// Takes what `save_state` gave, after `activate` (with `paused`) when the device was
    /// active.
    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        if state.is_null() {
            Ok(())
        } else {
            Err(format!("{}: unexpected device state", self.name()))
        }
    }
}

/// How a device interrupts the driver: an MSI-X vector per queue (and for config changes), or
/// ISR bits plus INTx when MSI-X is off (virtio 1.2 §4.1.4.5).
pub struct VirtioIrq {
    pub queue_vectors: Vec<Option<Arc<MsiVector>>>,
    pub config_vector: Option<Arc<MsiVector>>,
    pub isr: Arc<AtomicU8>,
    pub intx: Option<IntxLine>,
    /// Set when the device can no longer serve its queues; the transport then reports
    /// DEVICE_NEEDS_RESET in the device status until the driver resets the device.
    pub needs_reset: Arc<AtomicBool>,
}

pub const ISR_QUEUE: u8 = 1;
pub const ISR_CONFIG: u8 = 2;

impl VirtioIrq {
    fn intx(&self, bit: u8) {
        self.isr.fetch_or(bit, Ordering::SeqCst);
        if let Some(l) = &self.intx {
            l.assert();
        }
    }

    pub fn signal_queue(&self, index: u16) {
        match self
            .queue_vectors
            .get(usize::from(index))
            .and_then(|v| v.as_ref())
        {
            Some(v) => v.trigger(),
            None => self.intx(ISR_QUEUE),
        }
    }

    pub fn signal_config(&self) {
        match &self.config_vector {
            Some(v) => v.trigger(),
            None => self.intx(ISR_CONFIG),
        }
    }

    /// The device stopped serving its queues (its worker ended on an error): DEVICE_NEEDS_RESET
    /// goes into the status the driver reads, and a configuration-change interrupt tells it
    /// (virtio 1.2 §2.1.2), instead of a device that silently stops answering.
    pub fn device_failed(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.signal_config();
    }
}

/// A device's worker thread: waits on its queues' notify eventfds (and any extra fds) with
/// epoll and calls the handler with the index of what fired, until stopped. A worker that ends
/// on its own (an epoll error, or the handler returning false because its backend is gone)
/// marks the device as needing a reset (`VirtioIrq::device_failed`).
pub struct Worker {
    kill: EventFd,
    pause: Arc<PauseCtl>,
    handle: Option<JoinHandle<()>>,
}

/// Pause handshake between `Worker::pause` and the worker thread.
struct PauseCtl {
    evt: EventFd,
    /// (pause requested, thread parked)
    state: Mutex<(bool, bool)>,
    cv: Condvar,
}

/// Tokens the handler never sees.
const KILL_TOKEN: u64 = u64::MAX;
const PAUSE_TOKEN: u64 = u64::MAX - 1;

impl Worker {
    /// Starts a thread named `name` watching `fds` (token = index in `fds`), level-triggered.
    pub fn spawn<F>(
        name: String,
        fds: Vec<i32>,
        irq: Arc<VirtioIrq>,
        handler: F,
    ) -> Result<Worker, String>
    where
        F: FnMut(usize) -> bool + Send + 'static,
    {
        let fds = fds.into_iter().map(|fd| (fd, false)).collect();
        Self::spawn_with(name, fds, irq, false, handler)
    }

    /// Like `spawn`, with each fd marked edge-triggered or not (a tap the device drains only
    /// while the guest has buffers must be edge-triggered, or the thread would spin), and
    /// started parked (until `resume`) if `paused`.
    pub fn spawn_with<F>(
        name: String,
        fds: Vec<(i32, bool)>,
        irq: Arc<VirtioIrq>,
        paused: bool,
        mut handler: F,
    ) -> Result<Worker, String>
    where
        F: FnMut(usize) -> bool + Send + 'static,
    {
        let kill = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
        let epoll = Epoll::new().map_err(|e| e.to_string())?;
        for (i, (fd, edge)) in fds.iter().enumerate() {
            let set = if *edge {
                EventSet::IN | EventSet::EDGE_TRIGGERED
            } else {
                EventSet::IN
            };
            epoll
                .ctl(ControlOperation::Add, *fd, EpollEvent::new(set, i as u64))
                .map_err(|e| e.to_string())?;
        }
        epoll
            .ctl(
                ControlOperation::Add,
                kill.as_raw_fd(),
                EpollEvent::new(EventSet::IN, KILL_TOKEN),
            )
            .map_err(|e| e.to_string())?;
        let pause = Arc::new(PauseCtl {
            evt: EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?,
            state: Mutex::new((paused, false)),
            cv: Condvar::new(),
        });
        epoll
            .ctl(
                ControlOperation::Add,
                pause.evt.as_raw_fd(),
                EpollEvent::new(EventSet::IN, PAUSE_TOKEN),
            )
            .map_err(|e| e.to_string())?;
        let thread_pause = pause.clone();
        let thread_name = name.clone();
        let handle =
            rhyve_base::thread::spawn(rhyve_base::thread::Role::VirtioWorker, name, move || {
                let failed = |why: &str| {
                    log::error!("{thread_name}: {why}; the device needs a reset");
                    irq.device_failed();
                };
                let mut events = vec![EpollEvent::default(); fds.len().saturating_add(1)];
                // Parks while a pause is requested; events meanwhile stay queued in epoll.
                let park = || {
                    let mut st = thread_pause.state.lock().unwrap_or_else(|p| p.into_inner());
                    st.1 = true;
                    thread_pause.cv.notify_all();
                    while st.0 {
                        st = thread_pause.cv.wait(st).unwrap_or_else(|p| p.into_inner());
                    }
                    st.1 = false;
                };
                // Started paused: parked before the first event is looked at.
                park();
                loop {
                    let n = match epoll.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            failed(&format!("epoll: {e}"));
                            return;
                        }
                    };
                    for ev in events.get(..n).unwrap_or_default() {
                        if ev.data() == KILL_TOKEN {
                            return;
                        }
                        if ev.data() == PAUSE_TOKEN {
                            let _ = thread_pause.evt.read();
                            park();
                            continue;
                        }
                        if !handler(ev.data() as usize) {
                            failed("its backend stopped");
                            return;
                        }
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(Worker {
            kill,
            pause,
            handle: Some(handle),
        })
    }

    /// Parks the thread between events; returns once it is parked (or after 5 s).
    pub fn pause(&self) {
        let mut st = self.pause.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0 = true;
        let _ = self.pause.evt.write(1);
        const LIMIT: std::time::Duration = std::time::Duration::from_secs(5);
        let start = std::time::Instant::now();
        while !st.1 {
            let Some(left) = LIMIT.checked_sub(start.elapsed()).filter(|d| !d.is_zero()) else {
                log::warn!("virtio worker did not pause within 5 s");
                return;
            };
            st = self
                .pause
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    pub fn resume(&self) {
        let mut st = self.pause.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0 = false;
        self.pause.cv.notify_all();
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        self.resume();
        let _ = self.kill.write(1);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Copies the part of a device's configuration structure `config` that a guest read of
/// `data.len()` bytes at `offset` covers; bytes past its end read as zero.
pub fn read_config_window(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, d) in data.iter_mut().enumerate() {
        *d = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

/// Reads and clears an eventfd's counter; returns how many notifications it had collected.
pub fn drain(evt: &EventFd) -> u64 {
    evt.read().unwrap_or(0)
}

/// The driver's side of a split virtqueue for device tests, behaving as Linux's virtio_ring
/// does with EVENT_IDX negotiated: it notifies the device only when avail_event asks for it
/// (`vring_need_event`), and after taking each used entry asks for an interrupt at the next
/// one (used_event = its last used index). It lays the rings out itself: virtio-queue's
/// `MockSplitQueue` places the used ring over the end of the available ring (it sizes that in
/// entries, not bytes), where used_event lives.
#[cfg(test)]
pub(crate) mod mock {
    #![allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
    use super::*;
    use virtio_queue::desc::{split::Descriptor as Desc, RawDescriptor};

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    pub struct Driver<'a> {
        mem: &'a GuestMem,
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
        next_desc: u16,
        avail_idx: u16,
        last_used: u16,
        /// Polls its used ring and wants no interrupts (Linux's control-out queue).
        polled: bool,
    }

    impl<'a> Driver<'a> {
        /// A queue of `size` entries laid out from `base` (zeroed, as Linux allocates it).
        pub fn new(mem: &'a GuestMem, base: u64, size: u16) -> Self {
            let n = u64::from(size);
            let avail = base + 16 * n;
            let used = (avail + 6 + 2 * n + 3) & !3;
            let end = used + 6 + 8 * n;
            let zeros = vec![0u8; (end - base) as usize];
            mem.write_slice(&zeros, GuestAddress(base)).unwrap();
            Driver {
                mem,
                size,
                desc: base,
                avail,
                used,
                next_desc: 0,
                avail_idx: 0,
                last_used: 0,
                polled: false,
            }
        }

        /// Wants no interrupts for this queue: used_event is left where the device will not
        /// reach it soon.
        pub fn polled(mut self) -> Self {
            self.polled = true;
            self.set_used_event(u16::MAX);
            self
        }

        /// The device's side of the queue, EVENT_IDX negotiated, as the transport hands it over.
        pub fn queue(&self, index: u16) -> ActiveQueue {
            let mut queue = Queue::new(self.size).unwrap();
            let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
            let (lo, hi) = split(self.desc);
            queue.set_desc_table_address(lo, hi);
            let (lo, hi) = split(self.avail);
            queue.set_avail_ring_address(lo, hi);
            let (lo, hi) = split(self.used);
            queue.set_used_ring_address(lo, hi);
            queue.set_ready(true);
            queue.set_event_idx(true);
            assert!(queue.is_valid(self.mem));
            ActiveQueue {
                index,
                queue,
                notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            }
        }

        /// Makes one chain of (address, length, device-writable) buffers available; returns
        /// whether the driver notifies the device for it. Descriptors are reused in turn, so
        /// no more than `size` may be outstanding.
        pub fn post(&mut self, bufs: &[(u64, u32, bool)]) -> bool {
            let head = self.next_desc;
            for (i, &(addr, len, write)) in bufs.iter().enumerate() {
                let at = self.next_desc;
                self.next_desc = (self.next_desc + 1) % self.size;
                let mut flags = if write { WRITE } else { 0 };
                let mut next = 0;
                if i + 1 < bufs.len() {
                    flags |= NEXT;
                    next = self.next_desc;
                }
                let d = RawDescriptor::from(Desc::new(addr, len, flags, next));
                let a = self.desc + 16 * u64::from(at);
                self.mem.write_obj(d, GuestAddress(a)).unwrap();
            }
            let old = self.avail_idx;
            let slot = self.avail + 4 + 2 * u64::from(old % self.size);
            self.mem.write_obj(head, GuestAddress(slot)).unwrap();
            let new = old.wrapping_add(1);
            self.avail_idx = new;
            self.mem
                .write_obj(new, GuestAddress(self.avail + 2))
                .unwrap();
            let event = self.avail_event();
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        }

        /// Guest addresses of the descriptor table, available ring and used ring.
        pub fn rings(&self) -> (u64, u64, u64) {
            (self.desc, self.avail, self.used)
        }

        /// What the device last wrote to avail_event.
        pub fn avail_event(&self) -> u16 {
            let at = self.used + 4 + 8 * u64::from(self.size);
            self.mem.read_obj(GuestAddress(at)).unwrap()
        }

        /// The index the device must pass before it interrupts the driver.
        pub fn set_used_event(&self, idx: u16) {
            let at = self.avail + 4 + 2 * u64::from(self.size);
            self.mem.write_obj(idx, GuestAddress(at)).unwrap();
        }

        /// The next used entry (head, length), if the device has put one in the used ring.
        pub fn take_used(&mut self) -> Option<(u16, u32)> {
            let idx: u16 = self.mem.read_obj(GuestAddress(self.used + 2)).unwrap();
            if idx == self.last_used {
                return None;
            }
            let e = self.used + 4 + 8 * u64::from(self.last_used % self.size);
            let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
            self.last_used = self.last_used.wrapping_add(1);
            if !self.polled {
                self.set_used_event(self.last_used);
            }
            Some((u16::try_from(id).unwrap(), len))
        }

        /// The guest address descriptor `head` points at.
        pub fn buffer(&self, head: u16) -> u64 {
            let raw: RawDescriptor = self
                .mem
                .read_obj(GuestAddress(self.desc + 16 * u64::from(head)))
                .unwrap();
            Desc::from(raw).addr().raw_value()
        }
    }

    /// Interrupts with neither MSI-X nor an INTx line: what they raise shows in `isr`.
    pub fn irq() -> Arc<VirtioIrq> {
        Arc::new(VirtioIrq {
            queue_vectors: Vec::new(),
            config_vector: None,
            isr: Arc::new(AtomicU8::new(0)),
            intx: None,
            needs_reset: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Whether an interrupt was raised since the last call (reading the ISR clears it).
    pub fn interrupted(irq: &VirtioIrq) -> bool {
        irq.isr.swap(0, Ordering::SeqCst) & ISR_QUEUE != 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    #[test]
    fn a_paused_worker_handles_nothing_until_resumed() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let fd = evt.as_raw_fd();
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let probe = evt.try_clone().unwrap();
        let mut w = Worker::spawn("test".into(), vec![fd], mock::irq(), move |_| {
            let _ = probe.read();
            c.fetch_add(1, Ordering::SeqCst);
            true
        })
        .unwrap();
        // Judged by progress, with a generous bound: an emulated, shared machine may take
        // far longer than the usual microseconds to run the worker.
        let reaches = |n: usize| {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while calls.load(Ordering::SeqCst) < n && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            calls.load(Ordering::SeqCst)
        };
        evt.write(1).unwrap();
        assert_eq!(reaches(1), 1);
        w.pause();
        evt.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "nothing handled while paused"
        );
        w.resume();
        assert_eq!(reaches(2), 2, "the queued event is handled on resume");
        w.stop();
    }

    #[test]
    fn a_worker_whose_backend_stops_marks_the_device_as_needing_a_reset() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = mock::irq();
        // The handler stands for a device whose backend went away (blk's pool closed).
        let mut w =
            Worker::spawn("test".into(), vec![evt.as_raw_fd()], irq.clone(), |_| false).unwrap();
        evt.write(1).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !irq.needs_reset.load(Ordering::SeqCst) {
            assert!(
                std::time::Instant::now() < deadline,
                "the worker stopped without saying the device needs a reset"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_ne!(
            irq.isr.load(Ordering::SeqCst) & ISR_CONFIG,
            0,
            "the driver is told with a configuration-change interrupt"
        );
        w.stop();
        // A worker stopped on purpose (reset, shutdown) is no failure.
        let irq = mock::irq();
        let mut w =
            Worker::spawn("test".into(), vec![evt.as_raw_fd()], irq.clone(), |_| true).unwrap();
        w.stop();
        assert!(!irq.needs_reset.load(Ordering::SeqCst));
    }

    fn mem() -> GuestMem {
        GuestMem::from_ranges(&[(vm_memory::GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn serve_all_gives_up_on_an_avail_index_the_queue_cannot_have() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let m = mem();
            let mut d = mock::Driver::new(&m, 0x8000, 16);
            let mut q = d.queue(0);
            d.post(&[(0x1000, 16, true)]);
            // 100 chains ahead of the device in a 16-entry queue.
            let avail_idx = 0x8000 + 16 * 16 + 2;
            m.write_obj(100u16, vm_memory::GuestAddress(avail_idx))
                .unwrap();
            let _ = tx.send(q.serve_all(&m, |_, _| true));
        });
        let served = rx.recv_timeout(Duration::from_secs(5));
        assert_eq!(served, Ok(0), "nothing served, and no endless loop");
    }

    #[test]
    fn serve_all_comes_back_later_for_a_driver_that_never_stops() {
        let m = mem();
        let mut d = mock::Driver::new(&m, 0x8000, 16);
        let mut q = d.queue(0);
        assert!(d.post(&[(0x1000, 16, true)]));
        let served = q.serve_all(&m, |queue, chain| {
            queue.add_used(&m, chain.head_index(), 0).unwrap();
            d.post(&[(0x1000, 16, true)]);
            true
        });
        assert_eq!(served, SERVE_BUDGET);
        assert_eq!(drain(&q.notify), 1, "the worker is told to come back");
    }
}
