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
use std::sync::Arc;
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
    /// The driver reset the device: stop serving queues and forget them.
    fn reset(&mut self);
    fn pause(&mut self) {}
    fn resume(&mut self) {}
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
    handle: Option<JoinHandle<()>>,
}

/// Index the handler sees for the kill event; never passed to it.
const KILL_TOKEN: u64 = u64::MAX;

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
                        if !handler(ev.data() as usize) {
                            return;
                        }
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(Worker {
            kill,
            handle: Some(handle),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
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

/// Reads and clears an eventfd's counter; returns how many notifications it had collected.
pub fn drain(evt: &EventFd) -> u64 {
    evt.read().unwrap_or(0)
}
