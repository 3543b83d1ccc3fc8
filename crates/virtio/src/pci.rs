//! The virtio PCI transport, modern interface only (virtio 1.2 §4.1; bhyve `virtio.c` does the
//! legacy one): vendor capabilities pointing into one 64-bit memory BAR that holds the common
//! configuration, ISR status, device configuration, the notification area and the MSI-X table.
//! Queue notifications are KVM ioeventfds on the notification area, so a guest kick wakes the
//! device's worker thread without a trip through the vCPU's exit handler.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use rhyve_hypervisor::memory::GuestMem;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{
    rate_limited, Activation, ActiveQueue, QueuePosition, VirtioDevice, VirtioIrq,
    VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use rhyve_base::lifecycle::{DeviceState, Lifecycle, Paused, StateError};
use rhyve_hypervisor::irq::{IntxLine, IrqRouter};
use rhyve_pci::config::{BarKind, ConfigSpace, ConfigSpaceState, CMD_INTX_DISABLE};
use rhyve_pci::device::PciDevice;
use rhyve_pci::msix::{Msix, MsixState};
use rhyve_pci::PciInitCtx;

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

/// A queue's registers as the driver wrote them (virtio 1.2 §4.1.4.3). Where the queue stands
/// once it runs (its ring indices) is the device's alone: the transport keeps no copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct QueueRegs {
    max_size: u16,
    size: u16,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
    vector: u16,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        QueueRegs {
            max_size,
            size: max_size,
            ready: false,
            desc: 0,
            avail: 0,
            used: 0,
            vector: NO_VECTOR,
        }
    }
}

fn set_half(v: &mut u64, lo: Option<u32>, hi: Option<u32>) {
    if let Some(lo) = lo {
        *v = (*v & !0xffff_ffff) | u64::from(lo);
    }
    if let Some(hi) = hi {
        *v = (*v & 0xffff_ffff) | (u64::from(hi) << 32);
    }
}

struct QueueSlot {
    regs: QueueRegs,
    notify: EventFd,
}

/// The transport's saved state, with the device's inside it.
#[derive(serde::Serialize, serde::Deserialize)]
struct TransportState {
    cfg: ConfigSpaceState,
    msix: MsixState,
    device_features: u64,
    dfselect: u32,
    gfselect: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    config_vector: u16,
    queue_select: u16,
    queues: Vec<QueueRegs>,
    isr: u8,
    needs_reset: bool,
    active: bool,
    /// Where each running queue stands, from the device.
    positions: Vec<QueuePosition>,
    /// The device's own state (`VirtioDevice::save_state`).
    device: serde_json::Value,
}

const STATE_VERSION: u32 = 1;

pub struct VirtioPci {
    cfg: ConfigSpace,
    msix: Msix,
    dev: Box<dyn VirtioDevice>,
    mem: GuestMem,
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
    queues: Vec<QueueSlot>,
    isr: Arc<AtomicU8>,
    /// Set by the device when it can no longer serve its queues (`VirtioIrq::device_failed`).
    needs_reset: Arc<AtomicBool>,
    intx_disabled: Arc<AtomicBool>,
    /// Where the notify ioeventfds are registered (the BAR's address).
    ioevent_base: Option<u64>,
    active: bool,
    pci_cfg_cap: usize,
    bad: AtomicU64,
    paused: Paused,
}

/// Where queue `i`'s notify register lies in the BAR.
fn notify_offset(i: usize) -> u64 {
    (i as u64)
        .saturating_mul(u64::from(NOTIFY_MULT))
        .saturating_add(NOTIFY_OFF)
}

fn new_queue(max: u16) -> Result<Queue, String> {
    Queue::new(max).map_err(|e| format!("virtio queue: {e:?}"))
}

impl VirtioPci {
    // The arithmetic here lays out the device's own constants: capability offsets come from
    // `add_capability` (inside the 256-byte config space), the queue count from the device's
    // queue list (a handful), the device type is a small virtio ID: none comes near overflow,
    // and none comes from the guest.
    #[allow(clippy::arithmetic_side_effects)]
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
        cfg.set_u8(rhyve_pci::config::REVISION, 1);
        cfg.set_subsystem(VIRTIO_VENDOR, 0x40);
        cfg.declare_bar(BAR, BarKind::Mem64, BAR_SIZE)
            .map_err(|e| e.to_string())?;
        cfg.set_interrupt_pin(1, 0);
        let maxes = dev.queue_max_sizes();
        let nq = maxes.len() as u64;
        let e = |e: rhyve_pci::config::ConfigSpaceError| e.to_string();
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
            // Checks the maximum the device offers is a size virtio-queue takes.
            new_queue(max)?;
            queues.push(QueueSlot {
                regs: QueueRegs::new(max),
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
            paused: Paused::default(),
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
            q.regs = QueueRegs::new(q.regs.max_size);
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
        let line = self.cfg.intx_gsi().unwrap_or(0);
        if (16..24).contains(&line) {
            let _ = self
                .router
                .set_level(u32::from(line), self.intx_source, false);
        }
    }

    fn selected(&mut self) -> Option<&mut QueueRegs> {
        self.queues
            .get_mut(usize::from(self.queue_select))
            .map(|q| &mut q.regs)
    }

    /// The driver set DRIVER_OK: hand the enabled queues to the device.
    fn activate(&mut self) {
        self.start_device(&[], false);
    }

    /// Starts the device on the enabled queues, each at its position in `at` (where a saved
    /// device's queues stood; the ring's start otherwise), its worker parked if `paused`.
    /// Returns whether it started.
    fn start_device(&mut self, at: &[QueuePosition], paused: bool) -> bool {
        let msix_on = self.msix.enabled();
        let vector = |v: u16| {
            if msix_on && v != NO_VECTOR {
                self.msix.vector(usize::from(v))
            } else {
                None
            }
        };
        let line = self.cfg.intx_gsi().unwrap_or(0);
        let irq = Arc::new(VirtioIrq {
            queue_vectors: self.queues.iter().map(|q| vector(q.regs.vector)).collect(),
            config_vector: vector(self.config_vector),
            isr: self.isr.clone(),
            needs_reset: self.needs_reset.clone(),
            intx: (!msix_on && (16..24).contains(&line)).then(|| IntxLine {
                router: self.router.clone(),
                source: self.intx_source,
                gsi: u32::from(line),
                disabled: self.intx_disabled.clone(),
            }),
        });
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut active = Vec::new();
        for (i, q) in self.queues.iter().enumerate() {
            if !q.regs.ready {
                continue;
            }
            let queue = match self.build_queue(i, &q.regs, event_idx, at) {
                Ok(queue) => queue,
                Err(e) => {
                    if rate_limited(&self.bad) {
                        log::warn!("{}: queue {i}: {e}", self.dev.name());
                    }
                    self.status |= STATUS_NEEDS_RESET;
                    return false;
                }
            };
            let notify = match q.notify.try_clone() {
                Ok(n) => n,
                Err(e) => {
                    log::error!("{}: {e}", self.dev.name());
                    return false;
                }
            };
            active.push(ActiveQueue {
                index: i as u16,
                queue,
                notify,
            });
        }
        let a = Activation {
            mem: self.mem.clone(),
            acked: self.driver_features,
            queues: active,
            irq: irq.clone(),
            paused,
        };
        match self.dev.activate(a) {
            Ok(()) => {
                self.active = true;
                true
            }
            Err(e) => {
                log::warn!("{}: cannot start: {e}", self.dev.name());
                self.status |= STATUS_NEEDS_RESET;
                irq.signal_config();
                false
            }
        }
    }

    /// The device's queue `i` from the driver's registers, at its saved position if `at`
    /// has one.
    fn build_queue(
        &self,
        i: usize,
        r: &QueueRegs,
        event_idx: bool,
        at: &[QueuePosition],
    ) -> Result<Queue, String> {
        let mut q = new_queue(r.max_size)?;
        q.set_size(r.size);
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = split(r.desc);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(r.avail);
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(r.used);
        q.set_used_ring_address(lo, hi);
        q.set_event_idx(event_idx);
        q.set_ready(true);
        if let Some(p) = at.iter().find(|p| usize::from(p.index) == i) {
            q.set_next_avail(p.next_avail);
            q.set_next_used(p.next_used);
        }
        if !q.is_valid(&self.mem) {
            return Err("lies outside guest memory or has a bad size".into());
        }
        Ok(q)
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
            if rhyve_base::timeline::enabled() {
                rhyve_base::timeline::mark(&format!("{}: DRIVER_OK", self.dev.name()));
            }
            self.activate();
        }
    }

    fn common_read(&mut self, off: u64, data: &mut [u8]) {
        let sel = self.queue_select;
        let q = self.queues.get(usize::from(sel)).map(|q| &q.regs);
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
            0x18 => q.map_or(0, |q| u64::from(q.size)),
            0x1a => q.map_or(NO_VECTOR as u64, |q| u64::from(q.vector)),
            0x1c => q.map_or(0, |q| u64::from(q.ready)),
            0x1e => u64::from(sel),
            0x20 => q.map_or(0, |q| q.desc),
            0x24 => q.map_or(0, |q| q.desc >> 32),
            0x28 => q.map_or(0, |q| q.avail),
            0x2c => q.map_or(0, |q| q.avail >> 32),
            0x30 => q.map_or(0, |q| q.used),
            0x34 => q.map_or(0, |q| q.used >> 32),
            _ => 0,
        };
        for (d, b) in data.iter_mut().zip(v.to_le_bytes()) {
            *d = b;
        }
    }

    fn common_write(&mut self, off: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        for (to, from) in b.iter_mut().zip(data) {
            *to = *from;
        }
        let v = u64::from_le_bytes(b);
        let (v32, v16) = (v as u32, v as u16);
        // Queue registers may not change once the queue is enabled (virtio 1.2 §4.1.4.3.2).
        let locked = self.selected().is_some_and(|q| q.ready);
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
                    if v16.is_power_of_two() && v16 <= q.max_size {
                        q.size = v16;
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
                    q.ready = true;
                }
            }
            0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34 if !locked => {
                let Some(q) = self.selected() else { return };
                let lo = Some(v32);
                let hi = (n == 8).then_some((v >> 32) as u32);
                match off {
                    0x20 => set_half(&mut q.desc, lo, hi),
                    0x24 => set_half(&mut q.desc, None, Some(v32)),
                    0x28 => set_half(&mut q.avail, lo, hi),
                    0x2c => set_half(&mut q.avail, None, Some(v32)),
                    0x30 => set_half(&mut q.used, lo, hi),
                    _ => set_half(&mut q.used, None, Some(v32)),
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
            let off = notify_offset(i);
            if let Some(old) = self.ioevent_base.and_then(|b| b.checked_add(off)) {
                let _ =
                    self.vm
                        .unregister_ioevent(&q.notify, &IoEventAddress::Mmio(old), NoDatamatch);
            }
            // A BAR the guest placed at the very top of the address space has no room for
            // the notify area: the notifications then come as MMIO exits (`bar_access`).
            let Some(at) = base.checked_add(off) else {
                continue;
            };
            if let Err(e) =
                self.vm
                    .register_ioevent(&q.notify, &IoEventAddress::Mmio(at), NoDatamatch)
            {
                log::debug!("{}: notify ioeventfd at {at:#x}: {e}", self.dev.name());
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
        // Each arm's guard puts `o` inside its window, so `o - start` is the offset in it.
        let device_end = DEVICE_OFF.saturating_add(self.dev.config_len() as u64);
        let notify_end = notify_offset(self.queues.len());
        match offset {
            o if (COMMON_OFF..COMMON_OFF + COMMON_LEN).contains(&o) => {
                if write {
                    self.common_write(o.saturating_sub(COMMON_OFF), data);
                } else {
                    self.common_read(o.saturating_sub(COMMON_OFF), data);
                }
            }
            ISR_OFF if !write => {
                // Reading the ISR acknowledges it and lowers INTx.
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    *b = self.isr.swap(0, Ordering::SeqCst);
                }
                self.deassert_intx();
            }
            o if (DEVICE_OFF..device_end).contains(&o) => {
                if write {
                    self.dev.write_config(o.saturating_sub(DEVICE_OFF), data);
                } else {
                    self.dev.read_config(o.saturating_sub(DEVICE_OFF), data);
                }
            }
            o if (NOTIFY_OFF..notify_end).contains(&o) => {
                // Only when the ioeventfd is not in place (e.g. a BAR being moved).
                if write {
                    let i = o
                        .saturating_sub(NOTIFY_OFF)
                        .checked_div(u64::from(NOTIFY_MULT))
                        .unwrap_or(u64::MAX);
                    let i = usize::try_from(i).unwrap_or(usize::MAX);
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
    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.dev.counters()
    }
    fn config(&self) -> &ConfigSpace {
        &self.cfg
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.cfg
    }

    fn config_read(&mut self, off: usize, data: &mut [u8]) {
        // The capability lies inside the 256-byte config space: these sums are small.
        let window = self.pci_cfg_cap.saturating_add(16);
        if off == window && data.len() <= 4 {
            // VIRTIO_PCI_CAP_PCI_CFG: read through to the BAR at the window's offset.
            let bar_off = u64::from(self.cfg.u32(self.pci_cfg_cap.saturating_add(8)));
            if self.cfg.u8(self.pci_cfg_cap.saturating_add(4)) as usize == BAR {
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
        let window = self.pci_cfg_cap.saturating_add(16);
        let bar = self.cfg.u8(self.pci_cfg_cap.saturating_add(4)) as usize;
        if off == window && len <= 4 && bar == BAR {
            let bar_off = u64::from(self.cfg.u32(self.pci_cfg_cap.saturating_add(8)));
            let mut data = self.cfg.u32(window).to_le_bytes();
            if let Some(d) = data.get_mut(..len) {
                self.bar_access(bar_off, d, true);
            }
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
}

impl Lifecycle for VirtioPci {
    fn pause(&mut self) {
        self.dev.pause();
        self.paused.set(true);
    }

    fn resume(&mut self) {
        self.paused.set(false);
        self.dev.resume();
    }

    fn reset(&mut self) {
        VirtioPci::reset(self);
    }

    fn save(&mut self) -> Result<DeviceState, StateError> {
        let kind = self.dev.name();
        self.paused.check(kind)?;
        let bad = |why: String| StateError::Malformed {
            kind: kind.into(),
            why,
        };
        let state = TransportState {
            cfg: self.cfg.save_state(),
            msix: self.msix.save_state(),
            device_features: self.device_features,
            dfselect: self.dfselect,
            gfselect: self.gfselect,
            driver_features: self.driver_features,
            status: self.status,
            config_generation: self.config_generation,
            config_vector: self.config_vector,
            queue_select: self.queue_select,
            queues: self.queues.iter().map(|q| q.regs).collect(),
            isr: self.isr.load(Ordering::SeqCst),
            needs_reset: self.needs_reset.load(Ordering::SeqCst),
            active: self.active,
            positions: self.dev.engine().map(|e| e.positions()).unwrap_or_default(),
            device: self.dev.save_state().map_err(bad)?,
        };
        DeviceState::new(kind, STATE_VERSION, &state)
    }

    /// Into a device built from the same configuration and not yet started by a driver.
    fn restore(&mut self, s: &DeviceState) -> Result<(), StateError> {
        let kind = self.dev.name();
        self.paused.check(kind)?;
        let st: TransportState = s.parse(kind, STATE_VERSION)?;
        let bad = |why: String| StateError::Malformed {
            kind: kind.into(),
            why,
        };
        DeviceState::expect_same(
            kind,
            "device features",
            st.device_features,
            self.device_features,
        )?;
        let maxes: Vec<u16> = st.queues.iter().map(|q| q.max_size).collect();
        let have: Vec<u16> = self.queues.iter().map(|q| q.regs.max_size).collect();
        DeviceState::expect_same(kind, "queue sizes", maxes, have)?;
        if self.active {
            return Err(bad("restored into a device a driver has started".into()));
        }
        self.cfg.restore_state(&st.cfg).map_err(bad)?;
        self.msix.restore_state(&st.msix).map_err(bad)?;
        self.dfselect = st.dfselect;
        self.gfselect = st.gfselect;
        self.driver_features = st.driver_features;
        self.status = st.status;
        self.config_generation = st.config_generation;
        self.config_vector = st.config_vector;
        self.queue_select = st.queue_select;
        for (q, r) in self.queues.iter_mut().zip(&st.queues) {
            q.regs = *r;
        }
        self.isr.store(st.isr, Ordering::SeqCst);
        self.needs_reset.store(st.needs_reset, Ordering::SeqCst);
        let disabled = self.cfg.command() & CMD_INTX_DISABLE != 0;
        self.intx_disabled.store(disabled, Ordering::SeqCst);
        if st.active && !self.start_device(&st.positions, true) {
            return Err(bad("the device did not start on its restored queues".into()));
        }
        self.dev.restore_state(&st.device).map_err(bad)?;
        // A level INTx the saved device was asserting is asserted again.
        let line = self.cfg.intx_gsi().unwrap_or(0);
        if st.isr != 0 && !self.msix.enabled() && !disabled && (16..24).contains(&line) {
            let _ = self
                .router
                .set_level(u32::from(line), self.intx_source, true);
        }
        Ok(())
    }
}

impl Drop for VirtioPci {
    fn drop(&mut self) {
        if self.active {
            self.dev.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
    use super::*;
    use crate::mock::Driver;
    use std::time::{Duration, Instant};
    use vm_memory::{Bytes, GuestAddress};

    /// Real KVM for the MSI-X vectors' irqfds; guest memory the test shares with the device.
    fn ctx() -> PciInitCtx {
        let kvm = kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        vm.create_irq_chip().expect("in-kernel irqchip");
        PciInitCtx {
            router: Arc::new(IrqRouter::new(Arc::new(vm)).expect("IRQ router")),
            mem: GuestMem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap(),
            shadow: None,
        }
    }

    fn wr(d: &mut dyn PciDevice, off: u64, v: u64, len: usize) {
        d.bar_write(BAR, off, &v.to_le_bytes()[..len]);
    }

    fn rd(d: &mut dyn PciDevice, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        d.bar_read(BAR, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    /// Linux's virtio_pci_modern probe, for queue 0 laid out by `drv`: features (VERSION_1 and
    /// EVENT_IDX), FEATURES_OK, the queue's registers, DRIVER_OK.
    fn bring_up(d: &mut dyn PciDevice, drv: &Driver, size: u16) {
        wr(d, COMMON_OFF + 0x14, 1 | 2, 1);
        wr(d, COMMON_OFF + 0x08, 0, 4);
        wr(d, COMMON_OFF + 0x0c, VIRTIO_RING_F_EVENT_IDX, 4);
        wr(d, COMMON_OFF + 0x08, 1, 4);
        wr(d, COMMON_OFF + 0x0c, 1, 4);
        wr(d, COMMON_OFF + 0x14, 1 | 2 | 8, 1);
        wr(d, COMMON_OFF + 0x16, 0, 2);
        wr(d, COMMON_OFF + 0x18, u64::from(size), 2);
        let (desc, avail, used) = drv.rings();
        wr(d, COMMON_OFF + 0x20, desc, 8);
        wr(d, COMMON_OFF + 0x28, avail, 8);
        wr(d, COMMON_OFF + 0x30, used, 8);
        wr(d, COMMON_OFF + 0x1c, 1, 2);
        wr(d, COMMON_OFF + 0x14, 1 | 2 | 8 | 4, 1);
        assert_eq!(rd(d, COMMON_OFF + 0x14, 1), 15, "the device started");
    }

    /// Posts one chain on queue 0, kicks it through the notify area and waits for its used
    /// entry (judged by progress: 20 s for an emulated, busy machine).
    fn request(d: &mut dyn PciDevice, drv: &mut Driver, bufs: &[(u64, u32, bool)]) -> (u16, u32) {
        if drv.post(bufs) {
            wr(d, NOTIFY_OFF, 0, 2);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(u) = drv.take_used() {
                return u;
            }
            assert!(Instant::now() < deadline, "the request was not completed");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Saves a paused transport with its device, restores it into `fresh` (built the same
    /// way), saves again: the two states must be equal.
    fn round_trip(dev: &mut dyn PciDevice, fresh: &mut dyn PciDevice) -> DeviceState {
        let (a, b) = rhyve_base::lifecycle::round_trip(dev, fresh).expect("round trip");
        assert_eq!(a, b, "saving the restored device gives the same state");
        a
    }

    #[test]
    fn a_restored_virtio_rnd_carries_on_where_its_queue_stood() {
        let c = ctx();
        let cfg = rhyve_config::Config::new();
        let make = || VirtioPci::create(&c, Box::new(crate::rng::Rng::new(&cfg, "x").unwrap()));
        let mut dev = make().unwrap();
        assert!(dev.save().is_err(), "no state while running");
        let mut drv = Driver::new(&c.mem, 0x8000, 16);
        bring_up(dev.as_mut(), &drv, 16);
        assert_eq!(
            request(dev.as_mut(), &mut drv, &[(0x1000, 32, true)]),
            (0, 32)
        );
        assert_eq!(
            request(dev.as_mut(), &mut drv, &[(0x1100, 32, true)]),
            (1, 32)
        );

        let mut fresh = make().unwrap();
        let saved = round_trip(dev.as_mut(), fresh.as_mut());
        let st: TransportState = saved.parse("virtio-rnd", STATE_VERSION).unwrap();
        assert!(st.active);
        assert_eq!(
            st.positions,
            vec![QueuePosition {
                index: 0,
                next_avail: 2,
                next_used: 2
            }],
            "the device, not the transport, says where its queue stands"
        );
        // The old device stays paused; the restored one serves the third request at the
        // queue's next entry, and the driver reads back the registers it wrote.
        fresh.resume();
        assert_eq!(rd(fresh.as_mut(), COMMON_OFF + 0x18, 2), 16);
        assert_eq!(rd(fresh.as_mut(), COMMON_OFF + 0x14, 1), 15);
        assert_eq!(
            request(fresh.as_mut(), &mut drv, &[(0x1200, 48, true)]),
            (2, 48)
        );
        let mut b = [0u8; 48];
        c.mem.read_slice(&mut b, GuestAddress(0x1200)).unwrap();
        assert_ne!(b, [0u8; 48], "random bytes written by the restored device");
        // What the device writes into guest memory is dirty-tracked (for live migration):
        // the buffer it fills and the used ring; the driver's own writes are cleared first.
        let used_page = drv.rings().2 & !0xfff;
        drv.post(&[(0x1_2200, 48, true)]);
        rhyve_hypervisor::memory::take_dirty_pages(&c.mem);
        wr(fresh.as_mut(), NOTIFY_OFF, 0, 2);
        let deadline = Instant::now() + Duration::from_secs(20);
        let used = loop {
            if let Some(u) = drv.take_used() {
                break u;
            }
            assert!(Instant::now() < deadline, "the request was not completed");
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_eq!(used, (3, 48));
        let dirty = rhyve_hypervisor::memory::take_dirty_pages(&c.mem);
        assert!(
            dirty.contains(&0x1_2000),
            "the filled buffer's page: {dirty:x?}"
        );
        assert!(
            dirty.contains(&used_page),
            "the used ring's page: {dirty:x?}"
        );
        assert_ne!(b, [0u8; 48], "random bytes written by the restored device");
        // A state of another device or another layout is refused.
        let mut blk_state = saved.clone();
        blk_state.kind = "virtio-blk".into();
        let mut other = make().unwrap();
        other.pause();
        assert!(matches!(
            other.restore(&blk_state),
            Err(StateError::WrongKind { .. })
        ));
    }

    #[test]
    fn a_paused_virtio_blk_completes_its_requests_first_and_restores_on_the_same_disk() {
        let c = ctx();
        let dir = std::env::temp_dir().join(format!("rhyve-blk-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk.img");
        let mut data = vec![0u8; 1 << 20];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 512) as u8;
        }
        std::fs::write(&path, &data).unwrap();
        let mut cfg = rhyve_config::Config::new();
        cfg.set("x.path", path.to_str().unwrap()).unwrap();
        let make = || VirtioPci::create(&c, Box::new(crate::blk::Blk::new(&cfg, "x").unwrap()));
        let mut dev = make().unwrap();
        let mut drv = Driver::new(&c.mem, 0x8000, 16);
        bring_up(dev.as_mut(), &drv, 16);
        // A read of sector 3: header (type 0 = IN, sector), 512-byte buffer, status byte.
        let read = |mem: &GuestMem, sector: u64, at: u64| {
            mem.write_obj(0u32, GuestAddress(at)).unwrap();
            mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
            [
                (at, 16, false),
                (at + 0x100, 512, true),
                (at + 0x400, 1, true),
            ]
        };
        let bufs = read(&c.mem, 3, 0x2000);
        assert_eq!(request(dev.as_mut(), &mut drv, &bufs), (0, 513));
        assert_eq!(c.mem.read_obj::<u8>(GuestAddress(0x2100)).unwrap(), 3);

        // A request kicked just before the pause: when pause returns it is either complete in
        // the used ring or still untouched in the available ring, never half done.
        let bufs = read(&c.mem, 7, 0x3000);
        assert!(drv.post(&bufs));
        wr(dev.as_mut(), NOTIFY_OFF, 0, 2);
        dev.pause();
        let early = drv.take_used();

        let mut fresh = make().unwrap();
        let saved = round_trip(dev.as_mut(), fresh.as_mut());
        let st: TransportState = saved.parse("virtio-blk", STATE_VERSION).unwrap();
        let served = u16::from(early.is_some());
        assert_eq!(st.positions[0].next_used, 1 + served);
        assert_eq!(
            st.positions[0].next_avail,
            1 + served,
            "nothing popped and left in flight"
        );
        // The restored device looks at its queue on resume: a request the saved one had not
        // taken is served without another kick.
        fresh.resume();
        let (head, len) = match early {
            Some(u) => u,
            None => {
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    if let Some(u) = drv.take_used() {
                        break u;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "the untaken request was not served"
                    );
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        };
        assert_eq!((head, len), (3, 513), "the fourth descriptor, read whole");
        assert_eq!(c.mem.read_obj::<u8>(GuestAddress(0x3100)).unwrap(), 7);
        assert_eq!(
            c.mem.read_obj::<u8>(GuestAddress(0x3400)).unwrap(),
            0,
            "S_OK"
        );
        // And it serves the next one as any running device does.
        let bufs = read(&c.mem, 9, 0x4000);
        assert_eq!(request(fresh.as_mut(), &mut drv, &bufs), (6, 513));
        assert_eq!(c.mem.read_obj::<u8>(GuestAddress(0x4100)).unwrap(), 9);
        drop(fresh);
        drop(dev);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
