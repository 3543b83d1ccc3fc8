//! The virtio PCI transport, modern interface only (virtio 1.2 §4.1; bhyve `virtio.c` does the
//! legacy one): vendor capabilities pointing into one 64-bit memory BAR that holds the common
//! configuration, ISR status, device configuration, the notification area and the MSI-X table.
//! Queue notifications are KVM ioeventfds on the notification area, so a guest kick wakes the
//! device's worker thread without a trip through the vCPU's exit handler.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActiveQueue, Intx, VirtioDevice, VirtioIrq, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::hypervisor::irq::IrqRouter;
use crate::pci::config::{BarKind, ConfigSpace, CMD_INTX_DISABLE, INTR_LINE};
use crate::pci::device::PciDevice;
use crate::pci::msix::Msix;
use crate::pci::PciInitCtx;

const VIRTIO_VENDOR: u16 = 0x1af4;
const CAP_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;
const CFG_PCI: u8 = 5;

/// The BAR and its layout.
const BAR: usize = 4;
const COMMON_OFF: u64 = 0x0000;
const COMMON_LEN: u64 = 0x40;
const ISR_OFF: u64 = 0x1000;
const DEVICE_OFF: u64 = 0x2000;
const NOTIFY_OFF: u64 = 0x3000;
const NOTIFY_MULT: u32 = 4;
const MSIX_TABLE_OFF: u32 = 0x4000;
const MSIX_PBA_OFF: u32 = 0x6000;
const BAR_SIZE: u64 = 0x8000;

const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_NEEDS_RESET: u8 = 0x40;
const NO_VECTOR: u16 = 0xffff;

/// Log one in this many bad guest actions of a device.
pub const BAD_INPUT_LOG_EVERY: u64 = 100;

/// Rate limit for a device's complaints about guest input.
pub fn rate_limited(counter: &AtomicU64) -> bool {
    crate::logging::rate_limited(counter, BAD_INPUT_LOG_EVERY)
}

struct QueueState {
    queue: Queue,
    vector: u16,
    notify: EventFd,
}

pub struct VirtioPci {
    cfg: ConfigSpace,
    msix: Msix,
    dev: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    vm: Arc<VmFd>,
    router: Arc<IrqRouter>,
    /// This function's id among the sources of its (possibly shared) INTx pin.
    intx_source: u32,
    device_features: u64,
    dfselect: u32,
    gfselect: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    config_vector: u16,
    queue_select: u16,
    queues: Vec<QueueState>,
    isr: Arc<AtomicU8>,
    /// Set by the device when it can no longer serve its queues (`VirtioIrq::device_failed`).
    needs_reset: Arc<AtomicBool>,
    intx_disabled: Arc<AtomicBool>,
    /// Where the notify ioeventfds are registered (the BAR's address).
    ioevent_base: Option<u64>,
    active: bool,
    pci_cfg_cap: usize,
    bad: AtomicU64,
}

fn new_queue(max: u16) -> Result<Queue, String> {
    Queue::new(max).map_err(|e| format!("virtio queue: {e:?}"))
}

impl VirtioPci {
    pub fn create(
        ctx: &PciInitCtx,
        dev: Box<dyn VirtioDevice>,
    ) -> Result<Box<dyn PciDevice>, String> {
        let (class, subclass) = dev.pci_class();
        let mut cfg = ConfigSpace::new(
            VIRTIO_VENDOR,
            0x1040 + dev.device_type(),
            class,
            subclass,
            0,
        );
        cfg.set_u8(crate::pci::config::REVISION, 1);
        cfg.set_subsystem(VIRTIO_VENDOR, 0x40);
        cfg.declare_bar(BAR, BarKind::Mem64, BAR_SIZE)
            .map_err(|e| e.to_string())?;
        cfg.set_interrupt_pin(1, 0);
        let maxes = dev.queue_max_sizes();
        let nq = maxes.len() as u64;
        let e = |e: crate::pci::config::ConfigSpaceError| e.to_string();
        let add = |cfg: &mut ConfigSpace, kind: u8, off: u64, len: u64, extra: usize| {
            let cap = cfg.add_capability(CAP_VENDOR, 16 + extra).map_err(e)?;
            cfg.set_u8(cap + 2, (16 + extra) as u8);
            cfg.set_u8(cap + 3, kind);
            cfg.set_u8(cap + 4, BAR as u8);
            cfg.set_u32(cap + 8, off as u32);
            cfg.set_u32(cap + 12, len as u32);
            Ok::<usize, String>(cap)
        };
        add(&mut cfg, CFG_COMMON, COMMON_OFF, COMMON_LEN, 0)?;
        let notify = add(
            &mut cfg,
            CFG_NOTIFY,
            NOTIFY_OFF,
            nq * u64::from(NOTIFY_MULT),
            4,
        )?;
        cfg.set_u32(notify + 16, NOTIFY_MULT);
        add(&mut cfg, CFG_ISR, ISR_OFF, 4, 0)?;
        if dev.config_len() > 0 {
            add(&mut cfg, CFG_DEVICE, DEVICE_OFF, dev.config_len() as u64, 0)?;
        }
        // The PCI-configuration access window: bar, offset and length are the driver's to set.
        let pci_cfg_cap = add(&mut cfg, CFG_PCI, 0, 0, 4)?;
        cfg.set_wmask(pci_cfg_cap + 4, &[0xff]);
        cfg.set_wmask(pci_cfg_cap + 8, &[0xff; 8]);
        cfg.set_wmask(pci_cfg_cap + 16, &[0xff; 4]);
        let msix = Msix::new(
            &mut cfg,
            maxes.len() as u16 + 1,
            BAR,
            MSIX_TABLE_OFF,
            MSIX_PBA_OFF,
            ctx.router.clone(),
        )?;
        let mut queues = Vec::new();
        for max in maxes {
            queues.push(QueueState {
                queue: new_queue(max)?,
                vector: NO_VECTOR,
                notify: EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?,
            });
        }
        let device_features = dev.features()
            | VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_F_RING_INDIRECT_DESC;
        Ok(Box::new(VirtioPci {
            cfg,
            msix,
            dev,
            mem: ctx.mem.clone(),
            vm: ctx.router.vm_arc(),
            router: ctx.router.clone(),
            intx_source: ctx.router.level_source(),
            device_features,
            dfselect: 0,
            gfselect: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            config_vector: NO_VECTOR,
            queue_select: 0,
            queues,
            isr: Arc::new(AtomicU8::new(0)),
            needs_reset: Arc::new(AtomicBool::new(false)),
            intx_disabled: Arc::new(AtomicBool::new(false)),
            ioevent_base: None,
            active: false,
            pci_cfg_cap,
            bad: AtomicU64::new(0),
        }))
    }

    fn reset(&mut self) {
        if self.active {
            self.dev.reset();
            self.active = false;
        }
        self.status = 0;
        self.driver_features = 0;
        self.dfselect = 0;
        self.gfselect = 0;
        self.config_vector = NO_VECTOR;
        self.queue_select = 0;
        for q in &mut self.queues {
            q.queue.reset();
            q.vector = NO_VECTOR;
        }
        self.isr.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
        self.deassert_intx();
    }

    /// DEVICE_NEEDS_RESET when the device reported that it stopped serving its queues.
    fn device_failed_bit(&self) -> u8 {
        if self.needs_reset.load(Ordering::SeqCst) {
            STATUS_NEEDS_RESET
        } else {
            0
        }
    }

    fn deassert_intx(&self) {
        let line = self.cfg.u8(INTR_LINE);
        if (16..24).contains(&line) {
            let _ = self
                .router
                .set_level(u32::from(line), self.intx_source, false);
        }
    }

    fn selected(&mut self) -> Option<&mut QueueState> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn activate(&mut self) {
        let msix_on = self.msix.enabled();
        let vector = |v: u16| {
            if msix_on && v != NO_VECTOR {
                self.msix.vector(usize::from(v))
            } else {
                None
            }
        };
        let line = self.cfg.u8(INTR_LINE);
        let irq = Arc::new(VirtioIrq {
            queue_vectors: self.queues.iter().map(|q| vector(q.vector)).collect(),
            config_vector: vector(self.config_vector),
            isr: self.isr.clone(),
            needs_reset: self.needs_reset.clone(),
            intx: (!msix_on && (16..24).contains(&line)).then(|| Intx {
                router: self.router.clone(),
                source: self.intx_source,
                gsi: u32::from(line),
                disabled: self.intx_disabled.clone(),
            }),
        });
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut active = Vec::new();
        for (i, q) in self.queues.iter_mut().enumerate() {
            if !q.queue.ready() {
                continue;
            }
            q.queue.set_event_idx(event_idx);
            if !q.queue.is_valid(&self.mem) {
                if rate_limited(&self.bad) {
                    log::warn!("{}: queue {i} lies outside guest memory", self.dev.name());
                }
                self.status |= STATUS_NEEDS_RESET;
                return;
            }
            let notify = match q.notify.try_clone() {
                Ok(n) => n,
                Err(e) => {
                    log::error!("{}: {e}", self.dev.name());
                    return;
                }
            };
            // The device gets its own copy; the transport's stays for register reads.
            let queue = match Queue::try_from(q.queue.state()) {
                Ok(queue) => queue,
                Err(e) => {
                    log::warn!("{}: queue {i}: {e:?}", self.dev.name());
                    self.status |= STATUS_NEEDS_RESET;
                    return;
                }
            };
            active.push(ActiveQueue {
                index: i as u16,
                queue,
                notify,
            });
        }
        match self
            .dev
            .activate(self.mem.clone(), self.driver_features, active, irq.clone())
        {
            Ok(()) => self.active = true,
            Err(e) => {
                log::warn!("{}: cannot start: {e}", self.dev.name());
                self.status |= STATUS_NEEDS_RESET;
                irq.signal_config();
            }
        }
    }

    fn write_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v;
        if v & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            // Only a subset of what we offered, and never without VERSION_1 (modern only).
            let ok = self.driver_features & !self.device_features == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                v &= !STATUS_FEATURES_OK;
            }
        }
        let newly_ok = v & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        self.status = v;
        if newly_ok && v & STATUS_FEATURES_OK != 0 && !self.active {
            self.activate();
        }
    }

    fn common_read(&mut self, off: u64, data: &mut [u8]) {
        let sel = self.queue_select;
        let q = self.queues.get(usize::from(sel));
        let v: u64 = match off {
            0x00 => u64::from(self.dfselect),
            0x04 => match self.dfselect {
                0 => self.device_features & 0xffff_ffff,
                1 => self.device_features >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.gfselect),
            0x0c => match self.gfselect {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(self.config_vector),
            0x12 => self.queues.len() as u64,
            0x14 => u64::from(self.status | self.device_failed_bit()),
            0x15 => u64::from(self.config_generation),
            0x16 => u64::from(sel),
            0x18 => q.map_or(0, |q| u64::from(q.queue.size())),
            0x1a => q.map_or(NO_VECTOR as u64, |q| u64::from(q.vector)),
            0x1c => q.map_or(0, |q| u64::from(q.queue.ready())),
            0x1e => u64::from(sel),
            0x20 => q.map_or(0, |q| q.queue.desc_table()),
            0x24 => q.map_or(0, |q| q.queue.desc_table() >> 32),
            0x28 => q.map_or(0, |q| q.queue.avail_ring()),
            0x2c => q.map_or(0, |q| q.queue.avail_ring() >> 32),
            0x30 => q.map_or(0, |q| q.queue.used_ring()),
            0x34 => q.map_or(0, |q| q.queue.used_ring() >> 32),
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn common_write(&mut self, off: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(b);
        let (v32, v16) = (v as u32, v as u16);
        // Queue registers may not change once the queue is enabled (virtio 1.2 §4.1.4.3.2).
        let locked = self.selected().is_some_and(|q| q.queue.ready());
        match off {
            0x00 => self.dfselect = v32,
            0x08 => self.gfselect = v32,
            0x0c if self.status & STATUS_FEATURES_OK == 0 => match self.gfselect {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v32),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v32) << 32)
                }
                _ => {}
            },
            0x10 => {
                self.config_vector = if usize::from(v16) < self.msix.len() {
                    v16
                } else {
                    NO_VECTOR
                }
            }
            0x14 => self.write_status(v as u8),
            0x16 => self.queue_select = v16,
            0x18 if !locked => {
                if let Some(q) = self.selected() {
                    // The size must be a power of two no larger than the maximum.
                    if v16.is_power_of_two() && v16 <= q.queue.max_size() {
                        q.queue.set_size(v16);
                    }
                }
            }
            0x1a => {
                let ok = usize::from(v16) < self.msix.len();
                if let Some(q) = self.selected() {
                    q.vector = if ok { v16 } else { NO_VECTOR };
                }
            }
            0x1c if v16 == 1 => {
                if let Some(q) = self.selected() {
                    q.queue.set_ready(true);
                }
            }
            0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34 if !locked => {
                let Some(q) = self.selected() else { return };
                let lo = Some(v32);
                let hi = (n == 8).then_some((v >> 32) as u32);
                match off {
                    0x20 => q.queue.set_desc_table_address(lo, hi),
                    0x24 => q.queue.set_desc_table_address(None, Some(v32)),
                    0x28 => q.queue.set_avail_ring_address(lo, hi),
                    0x2c => q.queue.set_avail_ring_address(None, Some(v32)),
                    0x30 => q.queue.set_used_ring_address(lo, hi),
                    _ => q.queue.set_used_ring_address(None, Some(v32)),
                }
            }
            _ => {
                if rate_limited(&self.bad) {
                    log::debug!(
                        "{}: ignored common-config write at {off:#x}",
                        self.dev.name()
                    );
                }
            }
        }
    }

    /// Moves the queue notify ioeventfds to the BAR's new address.
    fn place_ioevents(&mut self, base: u64) {
        if self.ioevent_base == Some(base) {
            return;
        }
        for (i, q) in self.queues.iter().enumerate() {
            let off = NOTIFY_OFF + i as u64 * u64::from(NOTIFY_MULT);
            if let Some(old) = self.ioevent_base {
                let _ = self.vm.unregister_ioevent(
                    &q.notify,
                    &IoEventAddress::Mmio(old + off),
                    NoDatamatch,
                );
            }
            if let Err(e) =
                self.vm
                    .register_ioevent(&q.notify, &IoEventAddress::Mmio(base + off), NoDatamatch)
            {
                log::debug!(
                    "{}: notify ioeventfd at {:#x}: {e}",
                    self.dev.name(),
                    base + off
                );
            }
        }
        self.ioevent_base = Some(base);
    }

    fn bar_access(&mut self, offset: u64, data: &mut [u8], write: bool) {
        if self.msix.claims(BAR, offset) {
            if write {
                self.msix.write(offset, data);
            } else {
                self.msix.read(offset, data);
            }
            return;
        }
        match offset {
            o if (COMMON_OFF..COMMON_OFF + COMMON_LEN).contains(&o) => {
                if write {
                    self.common_write(o - COMMON_OFF, data);
                } else {
                    self.common_read(o - COMMON_OFF, data);
                }
            }
            ISR_OFF if !write => {
                // Reading the ISR acknowledges it and lowers INTx.
                data.fill(0);
                data[0] = self.isr.swap(0, Ordering::SeqCst);
                self.deassert_intx();
            }
            o if (DEVICE_OFF..DEVICE_OFF + self.dev.config_len() as u64).contains(&o) => {
                if write {
                    self.dev.write_config(o - DEVICE_OFF, data);
                } else {
                    self.dev.read_config(o - DEVICE_OFF, data);
                }
            }
            o if (NOTIFY_OFF..NOTIFY_OFF + self.queues.len() as u64 * u64::from(NOTIFY_MULT))
                .contains(&o) =>
            {
                // Only when the ioeventfd is not in place (e.g. a BAR being moved).
                if write {
                    let i = ((o - NOTIFY_OFF) / u64::from(NOTIFY_MULT)) as usize;
                    if let Some(q) = self.queues.get(i) {
                        let _ = q.notify.write(1);
                    }
                } else {
                    data.fill(0);
                }
            }
            _ => {
                if !write {
                    data.fill(0);
                }
            }
        }
    }
}

impl PciDevice for VirtioPci {
    fn name(&self) -> &'static str {
        self.dev.name()
    }
    fn config(&self) -> &ConfigSpace {
        &self.cfg
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.cfg
    }

    fn config_read(&mut self, off: usize, data: &mut [u8]) {
        let window = self.pci_cfg_cap + 16;
        if off == window && data.len() <= 4 {
            // VIRTIO_PCI_CAP_PCI_CFG: read through to the BAR at the window's offset.
            let bar_off = u64::from(self.cfg.u32(self.pci_cfg_cap + 8));
            if self.cfg.u8(self.pci_cfg_cap + 4) as usize == BAR {
                return self.bar_access(bar_off, data, false);
            }
        }
        self.cfg.guest_read(off, data);
    }

    fn config_written(&mut self, off: usize, len: usize) {
        self.msix.config_written(&self.cfg);
        let disabled = self.cfg.command() & CMD_INTX_DISABLE != 0;
        self.intx_disabled.store(disabled, Ordering::SeqCst);
        if disabled {
            self.deassert_intx();
        }
        let window = self.pci_cfg_cap + 16;
        if off == window && len <= 4 && self.cfg.u8(self.pci_cfg_cap + 4) as usize == BAR {
            let bar_off = u64::from(self.cfg.u32(self.pci_cfg_cap + 8));
            let mut data = self.cfg.u32(window).to_le_bytes();
            self.bar_access(bar_off, &mut data[..len], true);
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar == BAR {
            self.bar_access(offset, data, false);
        } else {
            data.fill(0xff);
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar == BAR {
            let mut d = data.to_vec();
            self.bar_access(offset, &mut d, true);
        }
    }

    fn bar_moved(&mut self, bar: usize, addr: u64) {
        if bar == BAR && addr != 0 {
            self.place_ioevents(addr);
        }
    }

    fn pause(&mut self) {
        self.dev.pause();
    }

    fn resume(&mut self) {
        self.dev.resume();
    }
}

impl Drop for VirtioPci {
    fn drop(&mut self) {
        if self.active {
            self.dev.reset();
        }
    }
}
