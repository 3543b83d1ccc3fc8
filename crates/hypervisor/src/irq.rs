//! The VM's interrupts, every kind in one place: the routing table (KVM_SET_GSI_ROUTING),
//! MSI/MSI-X vectors delivered through irqfd (`MsiVector`), PCI INTx lines that functions may
//! share (`IntxLine`, the wired-OR in `SharedLevels`), and edge-triggered ISA lines
//! (`IrqLine`: the COM ports, the RTC, the i8042).
//!
//! KVM replaces the whole table on every update, so the router keeps it: the default
//! irqchip routes (GSI 0-15 to the PIC and I/O APIC, 16-23 to the I/O APIC only, as KVM's own
//! default table), plus one MSI route per allocated GSI (24 and up). A device's MSI/MSI-X
//! vector is an eventfd bound to its GSI with irqfd, so raising it never exits to userspace.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

/// GSIs below this are the I/O APIC's pins.
pub const FIRST_MSI_GSI: u32 = 24;
/// KVM's routing table limit on this host (4096 GSIs measured on PVM).
pub const MAX_GSI: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    #[error("out of interrupt routes (KVM allows {MAX_GSI} GSIs)")]
    Exhausted,
    #[error("KVM interrupt routing: {0}")]
    Kvm(kvm_ioctls::Error),
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MsiRoute {
    addr: u64,
    data: u32,
}

struct Table {
    next_gsi: u32,
    free: Vec<u32>,
    msi: BTreeMap<u32, Option<MsiRoute>>,
}

pub struct IrqRouter {
    vm: Arc<VmFd>,
    table: Mutex<Table>,
    /// Level-triggered pins several sources may drive (PCI INTx on pins 16-23).
    levels: Mutex<SharedLevels>,
    next_source: AtomicU32,
}

/// The wired-OR of level-triggered interrupt lines: a pin is high while any of its sources
/// drives it. Without it, one PCI function lowering a shared pin (its driver read its ISR)
/// would drop the interrupt another function on that pin still asserts.
#[derive(Default)]
pub struct SharedLevels {
    high: BTreeMap<u32, BTreeSet<u32>>,
}

impl SharedLevels {
    /// Records that `source` drives `gsi` to `level`; returns the pin's resulting level.
    pub fn set(&mut self, gsi: u32, source: u32, level: bool) -> bool {
        let drivers = self.high.entry(gsi).or_default();
        if level {
            drivers.insert(source);
        } else {
            drivers.remove(&source);
        }
        !drivers.is_empty()
    }
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

impl IrqRouter {
    /// Creates the router and installs its routing table (needs the irqchip).
    pub fn new(vm: Arc<VmFd>) -> Result<Self, IrqError> {
        let r = IrqRouter {
            vm,
            table: Mutex::new(Table {
                next_gsi: FIRST_MSI_GSI,
                free: Vec::new(),
                msi: BTreeMap::new(),
            }),
            levels: Mutex::new(SharedLevels::default()),
            next_source: AtomicU32::new(0),
        };
        r.commit(&r.table.lock().unwrap_or_else(|p| p.into_inner()))?;
        Ok(r)
    }

    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    pub fn vm_arc(&self) -> Arc<VmFd> {
        self.vm.clone()
    }

    /// A new source id for `set_level` (one per PCI function that may drive an INTx pin).
    pub fn level_source(&self) -> u32 {
        self.next_source.fetch_add(1, Ordering::Relaxed)
    }

    /// `source` drives the level-triggered pin `gsi` high or low; the pin follows the OR of
    /// all its sources (KVM_IRQ_LINE). Raising is passed on even when the pin is already high,
    /// so an interrupt the guest has acknowledged but whose cause remains is delivered again.
    pub fn set_level(&self, gsi: u32, source: u32, level: bool) -> Result<(), IrqError> {
        let mut l = self.levels.lock().unwrap_or_else(|p| p.into_inner());
        let pin = l.set(gsi, source, level);
        if !level && pin {
            // Another source still drives the pin: it stays high.
            return Ok(());
        }
        self.vm.set_irq_line(gsi, pin).map_err(IrqError::Kvm)
    }

    /// Reserves a GSI for an MSI vector (no route until `set_msi`).
    pub fn alloc_gsi(&self) -> Result<u32, IrqError> {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let gsi = match t.free.pop() {
            Some(g) => g,
            None if t.next_gsi < MAX_GSI => {
                t.next_gsi += 1;
                t.next_gsi - 1
            }
            None => return Err(IrqError::Exhausted),
        };
        t.msi.insert(gsi, None);
        Ok(gsi)
    }

    /// Points `gsi` at an MSI message (None: no route, the vector is silent).
    pub fn set_msi(&self, gsi: u32, msg: Option<(u64, u32)>) -> Result<(), IrqError> {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let route = msg.map(|(addr, data)| MsiRoute { addr, data });
        if t.msi.get(&gsi) == Some(&route) {
            return Ok(());
        }
        t.msi.insert(gsi, route);
        self.commit(&t)
    }

    fn commit(&self, t: &Table) -> Result<(), IrqError> {
        let mut entries: Vec<kvm_irq_routing_entry> = Vec::with_capacity(48 + t.msi.len());
        // ISA IRQs reach the PICs on their own pins and the I/O APIC on the same-numbered pin,
        // except the PIT's IRQ 0, which arrives on I/O APIC pin 2 (the MADT says so with an
        // interrupt source override; PIC pin 2 is the cascade). Pins 16-23 are PCI INTx.
        for gsi in 0..24u32 {
            if gsi < 16 && gsi != 2 {
                let chip = if gsi < 8 {
                    KVM_IRQCHIP_PIC_MASTER
                } else {
                    KVM_IRQCHIP_PIC_SLAVE
                };
                entries.push(irqchip_entry(gsi, chip, gsi % 8));
            }
            match gsi {
                0 => entries.push(irqchip_entry(0, KVM_IRQCHIP_IOAPIC, 2)),
                2 => {}
                _ => entries.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi)),
            }
        }
        for (&gsi, route) in &t.msi {
            let Some(r) = route else { continue };
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = r.addr as u32;
            e.u.msi.address_hi = (r.addr >> 32) as u32;
            e.u.msi.data = r.data;
            entries.push(e);
        }
        let mut routing = KvmIrqRouting::new(entries.len()).map_err(|_| IrqError::Exhausted)?;
        routing.as_mut_slice().copy_from_slice(&entries);
        self.vm.set_gsi_routing(&routing).map_err(IrqError::Kvm)
    }
}

/// An edge-triggered ISA interrupt line, delivered by KVM's irqfd to the in-kernel PIC and
/// I/O APIC, so raising it from any thread costs one eventfd write and no vCPU exit.
pub struct IrqLine {
    evt: EventFd,
    pub gsi: u32,
}

impl IrqLine {
    pub fn new(vm: &VmFd, gsi: u32) -> std::io::Result<Self> {
        let evt = EventFd::new(libc::EFD_NONBLOCK)?;
        vm.register_irqfd(&evt, gsi)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        Ok(IrqLine { evt, gsi })
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.evt.write(1)
    }
}

/// A PCI function's INTx: level-triggered on its I/O APIC pin, which other functions may share
/// (the router ORs their levels).
pub struct IntxLine {
    pub router: Arc<IrqRouter>,
    /// This function's id among the pin's sources.
    pub source: u32,
    pub gsi: u32,
    /// The Command register's INTx-disable bit.
    pub disabled: Arc<AtomicBool>,
}

impl IntxLine {
    /// Drives the pin high for this function, unless the driver disabled INTx.
    pub fn assert(&self) {
        if self.disabled.load(Ordering::SeqCst) {
            return;
        }
        if let Err(e) = self.router.set_level(self.gsi, self.source, true) {
            log::warn!("INTx {}: {e}", self.gsi);
        }
    }
}

/// One MSI or MSI-X vector: an irqfd-bound eventfd plus the mask/pending state the PCI
/// capability controls. Cheap to raise from any thread.
pub struct MsiVector {
    pub gsi: u32,
    evt: EventFd,
    masked: AtomicBool,
    pending: AtomicBool,
}

impl MsiVector {
    pub fn new(router: &IrqRouter) -> Result<Self, IrqError> {
        let gsi = router.alloc_gsi()?;
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(IrqError::EventFd)?;
        router
            .vm()
            .register_irqfd(&evt, gsi)
            .map_err(IrqError::Kvm)?;
        Ok(MsiVector {
            gsi,
            evt,
            masked: AtomicBool::new(true),
            pending: AtomicBool::new(false),
        })
    }

    /// Raises the vector, or records it as pending while masked (PCI 3.0 §6.8.3.5).
    ///
    /// Lock-free against `set_masked` on another thread: after recording a pending message
    /// the mask is read again, so an unmask that ran between the first read and the record
    /// (and found nothing pending) cannot leave the message pending with the vector unmasked.
    /// Whichever side takes the pending bit sends the one message.
    pub fn trigger(&self) {
        self.trigger_with(|| {});
    }

    /// `trigger`, running `between` after the first mask read: where another thread's
    /// `set_masked` may run (the tests use it to run one there).
    fn trigger_with(&self, between: impl FnOnce()) {
        let masked = self.masked.load(Ordering::SeqCst);
        between();
        if masked {
            self.pending.store(true, Ordering::SeqCst);
            if self.masked.load(Ordering::SeqCst) || !self.pending.swap(false, Ordering::SeqCst) {
                return;
            }
        }
        self.send();
    }

    fn send(&self) {
        if let Err(e) = self.evt.write(1) {
            log::warn!("MSI GSI {}: {e}", self.gsi);
        }
    }

    /// Masks or unmasks; unmasking delivers a pending message.
    pub fn set_masked(&self, masked: bool) {
        self.masked.store(masked, Ordering::SeqCst);
        if !masked && self.pending.swap(false, Ordering::SeqCst) {
            self.send();
        }
    }

    pub fn is_pending(&self) -> bool {
        self.pending.load(Ordering::SeqCst)
    }

    /// Sets the pending bit without sending (a restored MSI-X pending-bit array); the next
    /// unmask delivers it.
    pub fn set_pending(&self, pending: bool) {
        self.pending.store(pending, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_irqchip;

    fn unbound_vector() -> MsiVector {
        // Not bound to KVM: an irqfd would consume the count the tests read.
        MsiVector {
            gsi: FIRST_MSI_GSI,
            evt: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            masked: AtomicBool::new(true),
            pending: AtomicBool::new(false),
        }
    }

    /// The unmask lands between the trigger's mask read and its pending record (the race,
    /// made deterministic): the message must still go out, not stay pending on an unmasked
    /// vector until the guest happens to mask and unmask it again.
    #[test]
    fn an_unmask_inside_a_trigger_does_not_strand_the_message() {
        let v = unbound_vector();
        v.trigger_with(|| v.set_masked(false));
        assert_eq!(v.evt.read().ok(), Some(1), "the message was not sent");
        assert!(!v.is_pending(), "left pending on an unmasked vector");
        // Masked throughout: pending, not sent.
        v.set_masked(true);
        v.trigger_with(|| {});
        assert!(v.is_pending() && v.evt.read().is_err());
        v.set_masked(false);
        assert_eq!(
            v.evt.read().ok(),
            Some(1),
            "unmask sends the pending message"
        );
        assert!(!v.is_pending());
    }

    /// A trigger racing an unmask on real threads: the message is sent exactly once and
    /// nothing stays pending (the window is a few instructions wide, so this alone rarely
    /// catches the race the test above makes certain).
    #[test]
    fn a_trigger_racing_an_unmask_is_delivered_once() {
        use std::sync::Barrier;
        let v = Arc::new(unbound_vector());
        let rounds = 5_000;
        let go = Arc::new(Barrier::new(2));
        let (v2, go2) = (v.clone(), go.clone());
        let unmasker = std::thread::spawn(move || {
            for _ in 0..rounds {
                go2.wait();
                v2.set_masked(false);
                go2.wait();
            }
        });
        let mut lost = 0;
        for _ in 0..rounds {
            go.wait();
            v.trigger();
            go.wait();
            // Both done: exactly one message, nothing pending.
            let sent = v.evt.read().unwrap_or(0);
            assert!(sent <= 1, "one trigger sent {sent} messages");
            if sent == 0 {
                assert!(v.is_pending(), "a message neither sent nor pending");
                lost += 1;
                v.pending.store(false, Ordering::SeqCst);
            }
            v.set_masked(true);
        }
        unmasker.join().expect("unmasker thread");
        assert_eq!(
            lost, 0,
            "{lost} of {rounds} triggers left pending on an unmasked vector"
        );
    }

    #[test]
    fn a_shared_pin_stays_high_while_any_source_drives_it() {
        let mut l = SharedLevels::default();
        assert!(l.set(20, 0, true));
        assert!(l.set(20, 1, true));
        assert!(l.set(20, 1, false), "source 0 still drives pin 20");
        assert!(l.set(20, 1, false), "lowering twice changes nothing");
        assert!(!l.set(21, 0, false), "pins are independent");
        assert!(!l.set(20, 0, false), "the last source lowered it");
    }

    #[test]
    fn the_ioapic_sees_a_shared_pin_high_until_its_last_source_lowers_it() {
        let kvm = kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm");
        let vm = Arc::new(kvm.create_vm().expect("create a VM"));
        vm.create_irq_chip().expect("in-kernel irqchip");
        let r = IrqRouter::new(vm.clone()).expect("routing table");
        let high = || {
            let mut c = kvm_irqchip {
                chip_id: KVM_IRQCHIP_IOAPIC,
                ..Default::default()
            };
            vm.get_irqchip(&mut c).expect("KVM_GET_IRQCHIP");
            // SAFETY: chip_id selects the I/O APIC member of the union, which KVM filled.
            let irr = unsafe { c.chip.ioapic.irr };
            irr & (1 << 20) != 0
        };
        let (a, b) = (r.level_source(), r.level_source());
        assert_ne!(a, b);
        r.set_level(20, a, true).unwrap();
        r.set_level(20, b, true).unwrap();
        assert!(high());
        // b's driver read its ISR: a still asserts the shared pin (slots 4 and 12 share pin 20).
        r.set_level(20, b, false).unwrap();
        assert!(high(), "one function lowered a pin another still drives");
        r.set_level(20, a, false).unwrap();
        assert!(!high());
    }
}
