//! virtio devices (virtio 1.2), transport-agnostic (the role of bhyve's `virtio.c`): the
//! `VirtioDevice` trait each device implements, the interrupt a device raises, and the worker
//! thread that serves a device's queues off the vCPU threads. `pci.rs` is the PCI transport.

pub mod blk;
pub mod console;
pub mod net;
pub mod pci;
pub mod rng;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use kvm_ioctls::VmFd;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::hypervisor::irq::MsiVector;

/// Feature bits every device offers through the transport.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
pub const VIRTIO_F_RING_INDIRECT_DESC: u64 = 1 << 28;

/// A queue the driver has set up, handed to the device when it starts.
pub struct ActiveQueue {
    pub index: u16,
    pub queue: Queue,
    /// Signalled by KVM (ioeventfd) when the guest notifies this queue.
    pub notify: EventFd,
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
    /// The driver set DRIVER_OK: start serving `queues` with `acked` features.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked: u64,
        queues: Vec<ActiveQueue>,
        irq: Arc<VirtioIrq>,
    ) -> Result<(), String>;
    /// The device's worker thread, while it is active.
    fn worker_slot(&mut self) -> &mut Option<Worker>;
    /// The driver reset the device: stop serving queues and forget them.
    fn reset(&mut self) {
        if let Some(mut w) = self.worker_slot().take() {
            w.stop();
        }
    }
    /// Stop touching guest memory and queues until `resume` (bhyve `pe_pause`).
    fn pause(&mut self) {
        if let Some(w) = self.worker_slot() {
            w.pause();
        }
    }
    fn resume(&mut self) {
        if let Some(w) = self.worker_slot() {
            w.resume();
        }
    }
}

/// An INTx line for a device without MSI-X: level-triggered on its I/O APIC pin.
pub struct Intx {
    pub vm: Arc<VmFd>,
    pub gsi: u32,
    /// The Command register's INTx-disable bit.
    pub disabled: Arc<AtomicBool>,
}

/// How a device interrupts the driver: an MSI-X vector per queue (and for config changes), or
/// ISR bits plus INTx when MSI-X is off (virtio 1.2 §4.1.4.5).
pub struct VirtioIrq {
    pub queue_vectors: Vec<Option<Arc<MsiVector>>>,
    pub config_vector: Option<Arc<MsiVector>>,
    pub isr: Arc<AtomicU8>,
    pub intx: Option<Intx>,
}

pub const ISR_QUEUE: u8 = 1;
pub const ISR_CONFIG: u8 = 2;

impl VirtioIrq {
    fn intx(&self, bit: u8) {
        self.isr.fetch_or(bit, Ordering::SeqCst);
        if let Some(l) = &self.intx {
            if !l.disabled.load(Ordering::SeqCst) {
                if let Err(e) = l.vm.set_irq_line(l.gsi, true) {
                    log::warn!("INTx {}: {e}", l.gsi);
                }
            }
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
}

/// A device's worker thread: waits on its queues' notify eventfds (and any extra fds) with
/// epoll and calls the handler with the index of what fired, until stopped.
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
    pub fn spawn<F>(name: String, fds: Vec<i32>, handler: F) -> Result<Worker, String>
    where
        F: FnMut(usize) -> bool + Send + 'static,
    {
        let fds = fds.into_iter().map(|fd| (fd, false)).collect();
        Self::spawn_with(name, fds, handler)
    }

    /// Like `spawn`, with each fd marked edge-triggered or not (a tap the device drains only
    /// while the guest has buffers must be edge-triggered, or the thread would spin).
    pub fn spawn_with<F>(
        name: String,
        fds: Vec<(i32, bool)>,
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
            state: Mutex::new((false, false)),
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
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let mut events = vec![EpollEvent::default(); fds.len() + 1];
                loop {
                    let n = match epoll.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            log::error!("virtio worker: epoll: {e}");
                            return;
                        }
                    };
                    for ev in &events[..n] {
                        if ev.data() == KILL_TOKEN {
                            return;
                        }
                        if ev.data() == PAUSE_TOKEN {
                            let _ = thread_pause.evt.read();
                            // Park until resumed; events meanwhile stay queued in epoll.
                            let mut st =
                                thread_pause.state.lock().unwrap_or_else(|p| p.into_inner());
                            st.1 = true;
                            thread_pause.cv.notify_all();
                            while st.0 {
                                st = thread_pause.cv.wait(st).unwrap_or_else(|p| p.into_inner());
                            }
                            st.1 = false;
                            continue;
                        }
                        if !handler(ev.data() as usize) {
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
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !st.1 {
            let now = std::time::Instant::now();
            if now >= deadline {
                log::warn!("virtio worker did not pause within 5 s");
                return;
            }
            st = self
                .pause
                .cv
                .wait_timeout(st, deadline - now)
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

#[cfg(test)]
mod tests {
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
        let mut w = Worker::spawn("test".into(), vec![fd], move |_| {
            let _ = probe.read();
            c.fetch_add(1, Ordering::SeqCst);
            true
        })
        .unwrap();
        evt.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        w.pause();
        evt.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "nothing handled while paused"
        );
        w.resume();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "the queued event is handled on resume"
        );
        w.stop();
    }
}
