//! The PCI root complex (bhyve `pci_emul.c`): devices by bus:slot.function, configuration
//! access through CONF1 (ports 0xCF8/0xCFC-0xCFF) and ECAM (MMIO at 0xE0000000, 1 MiB per bus),
//! BAR allocation, and keeping BAR registrations on the buses in step with the guest's BAR and
//! Command-register writes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::config::{Bar, BarKind, CMD_IO, CMD_MEM, COMMAND, INTR_PIN};
use super::device::PciDevice;
use super::PciAddr;
use rhyve_base::lifecycle::{DeviceState, StateError};
use rhyve_bus::{Bus, BusDevice};
use rhyve_hypervisor::memory::{ECAM_BASE, PCI_MEM32_BASE, PCI_MEM32_END};

/// I/O-port BAR window (bhyve: 0x2000-0x10000).
pub const IO_BAR_BASE: u64 = 0x2000;
pub const IO_BAR_END: u64 = 0x1_0000;
/// ECAM size: 256 buses x 1 MiB.
pub const ECAM_SIZE: u64 = 256 << 20;
/// 64-bit BARs up to this size are placed below 4 GiB, as bhyve does.
pub const MEM64_LOW_MAX: u64 = 128 << 20;
/// Size of the 64-bit BAR window above high RAM.
pub const MEM64_WINDOW_SIZE: u64 = 64 << 30;
/// I/O APIC pins for PCI INTx (KVM's I/O APIC has 24).
pub const INTX_FIRST_PIN: u8 = 16;
pub const INTX_PINS: u8 = 8;
/// INTX_PINS is a power of two: a slot's pin is its low bits.
const INTX_PIN_MASK: u8 = INTX_PINS - 1;

pub type SharedDevice = Arc<Mutex<Box<dyn PciDevice>>>;

fn lock(d: &SharedDevice) -> MutexGuard<'_, Box<dyn PciDevice>> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    #[error("PCI {addr} ({name}): no room for BAR {bar} ({size:#x} bytes) in the {window} window")]
    NoRoom {
        addr: PciAddr,
        name: &'static str,
        bar: usize,
        size: u64,
        window: &'static str,
    },
    #[error("PCI {0}: slot already used")]
    Duplicate(PciAddr),
}

/// Routes a BAR's bus range to its device.
struct BarHandler {
    dev: SharedDevice,
    bar: usize,
}

impl BusDevice for BarHandler {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.dev).bar_read(self.bar, offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.dev).bar_write(self.bar, offset, data);
    }
}

/// Where each BAR is registered now, so a move or decode change can undo it.
type Mapped = BTreeMap<(PciAddr, usize), (BarKind, u64)>;

pub struct PciRoot {
    devices: BTreeMap<PciAddr, SharedDevice>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    mapped: Mutex<Mapped>,
    /// The CONF1 address latch (port 0xCF8).
    conf1: Mutex<u32>,
    mem64_base: u64,
}

impl PciRoot {
    /// `top_of_ram`: end of guest RAM; the 64-bit BAR window starts above it.
    pub fn new(pio: Arc<Bus>, mmio: Arc<Bus>, top_of_ram: u64) -> Self {
        let gib = 1u64 << 30;
        PciRoot {
            devices: BTreeMap::new(),
            pio,
            mmio,
            mapped: Mutex::new(BTreeMap::new()),
            conf1: Mutex::new(0),
            mem64_base: top_of_ram.max(1 << 32).div_ceil(gib).saturating_mul(gib),
        }
    }

    pub fn add(&mut self, addr: PciAddr, dev: Box<dyn PciDevice>) -> Result<(), PciError> {
        if self.devices.contains_key(&addr) {
            return Err(PciError::Duplicate(addr));
        }
        self.devices.insert(addr, Arc::new(Mutex::new(dev)));
        Ok(())
    }

    pub fn device(&self, addr: &PciAddr) -> Option<&SharedDevice> {
        self.devices.get(addr)
    }

    pub fn devices(&self) -> impl Iterator<Item = (&PciAddr, &SharedDevice)> {
        self.devices.iter()
    }

    /// The 64-bit BAR window, for the ACPI tables.
    pub fn mem64_window(&self) -> (u64, u64) {
        (
            self.mem64_base,
            self.mem64_base.saturating_add(MEM64_WINDOW_SIZE),
        )
    }

    /// After every device's init: multi-function bits, INTx routing, then BARs allocated
    /// largest first (bhyve `init_pci`), placed, decoded and registered.
    pub fn finish_init(&self) -> Result<(), PciError> {
        // Slots with more than one function say so in every function's header type.
        for (addr, dev) in &self.devices {
            let multi = self
                .devices
                .keys()
                .filter(|a| a.bus == addr.bus && a.slot == addr.slot)
                .count()
                > 1;
            let mut d = lock(dev);
            if multi {
                d.config_mut().set_multifunction();
            }
            // INTx: pins A-D swizzled by slot onto I/O APIC pins 16-23.
            let pin = d.config().u8(INTR_PIN);
            if (1..=4).contains(&pin) {
                // pin is 1-4 (checked above); the remainder picks one of 8 pins above 16.
                let swizzle = addr.slot.wrapping_add(pin.saturating_sub(1));
                let line = INTX_FIRST_PIN | (swizzle & INTX_PIN_MASK);
                d.config_mut().set_interrupt_pin(pin, line);
            }
        }
        let mut bars: Vec<(PciAddr, usize, Bar)> = Vec::new();
        for (addr, dev) in &self.devices {
            bars.extend(lock(dev).config().bars().map(|(i, b)| (*addr, i, b)));
        }
        // Largest first, so alignment padding stays small; ties in address order.
        bars.sort_by(|a, b| b.2.size.cmp(&a.2.size).then((a.0, a.1).cmp(&(b.0, b.1))));
        let mut io = IO_BAR_BASE;
        let mut mem32 = PCI_MEM32_BASE;
        let mut mem64 = self.mem64_base;
        for (addr, idx, bar) in bars {
            let (cursor, end, window) = match bar.kind {
                BarKind::Io => (&mut io, IO_BAR_END, "I/O"),
                BarKind::Mem64 if bar.size > MEM64_LOW_MAX => (
                    &mut mem64,
                    self.mem64_base.saturating_add(MEM64_WINDOW_SIZE),
                    "64-bit memory",
                ),
                _ => (&mut mem32, PCI_MEM32_END, "32-bit memory"),
            };
            let base = cursor.div_ceil(bar.size).saturating_mul(bar.size);
            let Some(dev) = self.devices.get(&addr) else {
                continue;
            };
            let name = lock(dev).name();
            if base.saturating_add(bar.size) > end {
                return Err(PciError::NoRoom {
                    addr,
                    name,
                    bar: idx,
                    size: bar.size,
                    window,
                });
            }
            *cursor = base.saturating_add(bar.size);
            let mut d = lock(dev);
            d.config_mut().set_bar_addr(idx, base);
            d.bar_moved(idx, base);
            // bhyve enables decoding of allocated BARs, so guests without firmware can use them.
            let bit = if bar.kind == BarKind::Io {
                CMD_IO
            } else {
                CMD_MEM
            };
            let cmd = d.config().command() | bit;
            d.config_mut().set_u16(COMMAND, cmd);
            log::debug!(
                "PCI {addr} {name}: BAR {idx} {:?} at {base:#x} size {:#x}",
                bar.kind,
                bar.size
            );
        }
        for addr in self.devices.keys() {
            self.sync_bars(*addr);
        }
        Ok(())
    }

    /// Makes the bus registrations of `addr`'s BARs match its BAR registers and Command bits.
    fn sync_bars(&self, addr: PciAddr) {
        let Some(dev) = self.devices.get(&addr) else {
            return;
        };
        let (cmd, bars, name) = {
            let d = lock(dev);
            let bars: Vec<(usize, Bar)> = d.config().bars().collect();
            (d.config().command(), bars, d.name())
        };
        let mut mapped = self.mapped.lock().unwrap_or_else(|p| p.into_inner());
        for (idx, bar) in bars {
            let (bus, enabled) = match bar.kind {
                BarKind::Io => (&self.pio, cmd & CMD_IO != 0),
                _ => (&self.mmio, cmd & CMD_MEM != 0),
            };
            let want = enabled.then_some(bar.addr);
            let have = mapped.get(&(addr, idx)).map(|m| m.1);
            if want == have {
                continue;
            }
            if let Some(old) = have {
                bus.remove(old);
                mapped.remove(&(addr, idx));
            }
            let Some(base) = want else { continue };
            // A BAR being sized holds an address like 0xfffff000; it is not decoded anywhere
            // real, so a clash with another range just leaves it unmapped until moved.
            let handler = Arc::new(Mutex::new(BarHandler {
                dev: dev.clone(),
                bar: idx,
            }));
            match bus.insert(&format!("{name} {addr} BAR{idx}"), base, bar.size, handler) {
                Ok(()) => {
                    mapped.insert((addr, idx), (bar.kind, base));
                }
                Err(e) => log::debug!("PCI {addr} BAR {idx} left unmapped: {e}"),
            }
        }
    }

    /// A configuration access (bhyve `pci_cfgrw`): reads of absent functions and of extended
    /// space (offset 256 and up) return all ones; writes there are dropped.
    pub fn config_access(&self, addr: PciAddr, off: usize, data: &mut [u8], write: bool) {
        let Some(dev) = self.devices.get(&addr) else {
            if !write {
                data.fill(0xff);
            }
            return;
        };
        if off.saturating_add(data.len()) > 256 {
            if !write {
                data.fill(0xff);
            }
            return;
        }
        if !write {
            lock(dev).config_read(off, data);
            return;
        }
        let changed = {
            let mut d = lock(dev);
            let cmd_before = d.config().command();
            let moved = d.config_mut().guest_write(off, data);
            for &i in &moved {
                if let Some(b) = d.config().bar(i) {
                    d.bar_moved(i, b.addr);
                }
            }
            d.config_written(off, data.len());
            !moved.is_empty() || d.config().command() != cmd_before
        };
        // Bus updates happen without the device lock held (lock order: ARCHITECTURE.md).
        if changed {
            self.sync_bars(addr);
        }
    }

    /// Pause/resume hooks of every device (bhyve `pe_pause`/`pe_resume`).
    pub fn pause_all(&self) {
        for dev in self.devices.values() {
            lock(dev).pause();
        }
    }

    pub fn resume_all(&self) {
        for dev in self.devices.values() {
            lock(dev).resume();
        }
    }

    /// Every function's saved state by address (`bus:slot.func`), and the root's own (the CONF1
    /// address latch) under `root`. Every device must be paused.
    pub fn save_all(&self) -> Result<Vec<(String, DeviceState)>, StateError> {
        let latch = *self.conf1.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = vec![(
            ROOT_KEY.to_string(),
            DeviceState::new(ROOT_KIND, ROOT_VERSION, &latch)?,
        )];
        for (addr, dev) in &self.devices {
            out.push((addr.to_string(), lock(dev).save()?));
        }
        Ok(out)
    }

    /// Restores what `save_all` produced into this root's devices (built from the same
    /// configuration), then moves every BAR's bus registration (and the device's own view, e.g.
    /// virtio's notify ioeventfds) to the restored addresses. A state for a function this root
    /// does not have, or a function without one, is refused.
    pub fn restore_all(&self, states: &[(String, DeviceState)]) -> Result<(), StateError> {
        let bad = |why: String| StateError::Malformed {
            kind: "pci".into(),
            why,
        };
        let find = |key: &str| {
            states
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, s)| s)
                .ok_or_else(|| bad(format!("no saved state for PCI {key}")))
        };
        for (key, _) in states {
            let known = key == ROOT_KEY || self.devices.keys().any(|a| a.to_string() == *key);
            if !known {
                return Err(bad(format!(
                    "a state for PCI {key}, which this VM does not have"
                )));
            }
        }
        let latch: u32 = find(ROOT_KEY)?.parse(ROOT_KIND, ROOT_VERSION)?;
        for (addr, dev) in &self.devices {
            let state = find(&addr.to_string())?;
            let mut d = lock(dev);
            d.restore(state)?;
            let bars: Vec<(usize, u64)> = d.config().bars().map(|(i, b)| (i, b.addr)).collect();
            for (i, at) in bars {
                d.bar_moved(i, at);
            }
        }
        *self.conf1.lock().unwrap_or_else(|p| p.into_inner()) = latch;
        for addr in self.devices.keys() {
            self.sync_bars(*addr);
        }
        Ok(())
    }
}

const ROOT_KEY: &str = "root";
const ROOT_KIND: &str = "pci-root";
const ROOT_VERSION: u32 = 1;

/// Port 0xCF8: the CONF1 address register. Only 32-bit accesses reach it, as on real chipsets;
/// a byte at 0xCF9 is the reset control register.
pub struct Conf1Address(pub Arc<PciRoot>);

impl BusDevice for Conf1Address {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        let v = *self.0.conf1.lock().unwrap_or_else(|p| p.into_inner());
        if data.len() == 4 {
            data.copy_from_slice(&v.to_le_bytes());
        } else {
            data.fill(0xff);
        }
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Ok(b) = <[u8; 4]>::try_from(data) {
            *self.0.conf1.lock().unwrap_or_else(|p| p.into_inner()) = u32::from_le_bytes(b);
        }
    }
}

/// Ports 0xCFC-0xCFF: the CONF1 data window for the latched address.
pub struct Conf1Data(pub Arc<PciRoot>);

impl Conf1Data {
    fn target(&self, offset: u64) -> Option<(PciAddr, usize)> {
        let a = *self.0.conf1.lock().unwrap_or_else(|p| p.into_inner());
        if a & 0x8000_0000 == 0 {
            return None;
        }
        let addr = PciAddr {
            bus: (a >> 16) as u8,
            slot: ((a >> 11) & 0x1f) as u8,
            func: ((a >> 8) & 0x7) as u8,
        };
        Some((addr, ((a & 0xfc) as usize).saturating_add(offset as usize)))
    }
}

impl BusDevice for Conf1Data {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.target(offset) {
            Some((addr, off)) => self.0.config_access(addr, off, data, false),
            None => data.fill(0xff),
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((addr, off)) = self.target(offset) {
            let mut buf = data.to_vec();
            self.0.config_access(addr, off, &mut buf, true);
        }
    }
}

/// ECAM: memory-mapped configuration space at 0xE0000000 (described by ACPI MCFG).
pub struct Ecam(pub Arc<PciRoot>);

impl Ecam {
    pub const BASE: u64 = ECAM_BASE;

    fn target(offset: u64) -> (PciAddr, usize) {
        let addr = PciAddr {
            bus: (offset >> 20) as u8,
            slot: ((offset >> 15) & 0x1f) as u8,
            func: ((offset >> 12) & 0x7) as u8,
        };
        (addr, (offset & 0xfff) as usize)
    }
}

impl BusDevice for Ecam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (addr, off) = Self::target(offset);
        self.0.config_access(addr, off, data, false);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let (addr, off) = Self::target(offset);
        let mut buf = data.to_vec();
        self.0.config_access(addr, off, &mut buf, true);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
    use super::*;
    use crate::config::{ConfigSpace, BAR0};

    /// A device with the given BARs, backed by 64 KiB of storage (no KVM needed).
    struct TestDev(ConfigSpace, Vec<u8>);

    impl rhyve_base::lifecycle::Lifecycle for TestDev {
        fn save(&mut self) -> Result<DeviceState, StateError> {
            DeviceState::new("test", 1, &self.0.save_state())
        }
        fn restore(&mut self, s: &DeviceState) -> Result<(), StateError> {
            self.0
                .restore_state(&s.parse("test", 1)?)
                .map_err(|why| StateError::Malformed {
                    kind: "test".into(),
                    why,
                })
        }
    }

    impl PciDevice for TestDev {
        fn name(&self) -> &'static str {
            "test"
        }
        fn config(&self) -> &ConfigSpace {
            &self.0
        }
        fn config_mut(&mut self) -> &mut ConfigSpace {
            &mut self.0
        }
        fn bar_read(&mut self, _: usize, off: u64, d: &mut [u8]) {
            let o = off as usize % 65000;
            d.copy_from_slice(&self.1[o..o + d.len()]);
        }
        fn bar_write(&mut self, _: usize, off: u64, d: &[u8]) {
            let o = off as usize % 65000;
            self.1[o..o + d.len()].copy_from_slice(d);
        }
    }

    fn dev(bars: &[(usize, BarKind, u64)]) -> Box<dyn PciDevice> {
        let mut c = ConfigSpace::new(0x10dd, 1, 0, 0, 0);
        for &(i, k, s) in bars {
            c.declare_bar(i, k, s).unwrap();
        }
        Box::new(TestDev(c, vec![0; 65536]))
    }

    fn root_with(slots: &[u8]) -> (PciRoot, Arc<Bus>, Arc<Bus>) {
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let mut root = PciRoot::new(pio.clone(), mmio.clone(), 256 << 20);
        for &slot in slots {
            let addr = PciAddr {
                bus: 0,
                slot,
                func: 0,
            };
            // BARs like the dummy device's: 32 bytes of I/O, 4 KiB MEM32, 8 KiB MEM64.
            let d = dev(&[
                (0, BarKind::Io, 32),
                (1, BarKind::Mem32, 4096),
                (2, BarKind::Mem64, 8192),
            ]);
            root.add(addr, d).unwrap();
        }
        (root, pio, mmio)
    }

    fn cfg_read32(root: &PciRoot, slot: u8, off: usize) -> u32 {
        let mut d = [0u8; 4];
        root.config_access(
            PciAddr {
                bus: 0,
                slot,
                func: 0,
            },
            off,
            &mut d,
            false,
        );
        u32::from_le_bytes(d)
    }

    fn cfg_write32(root: &PciRoot, slot: u8, off: usize, v: u32) {
        let mut d = v.to_le_bytes();
        root.config_access(
            PciAddr {
                bus: 0,
                slot,
                func: 0,
            },
            off,
            &mut d,
            true,
        );
    }

    #[test]
    fn bars_are_allocated_largest_first_and_registered() {
        let (root, pio, mmio) = root_with(&[3, 4]);
        root.finish_init().unwrap();
        // Two 8 KiB 64-bit BARs come first, then the two 4 KiB ones, each naturally aligned.
        let b2_3 = u64::from(cfg_read32(&root, 3, BAR0 + 8) & !0xf);
        let b2_4 = u64::from(cfg_read32(&root, 4, BAR0 + 8) & !0xf);
        let b1_3 = u64::from(cfg_read32(&root, 3, BAR0 + 4) & !0xf);
        let b1_4 = u64::from(cfg_read32(&root, 4, BAR0 + 4) & !0xf);
        assert_eq!((b2_3, b2_4), (0xc000_0000, 0xc000_2000));
        assert_eq!((b1_3, b1_4), (0xc000_4000, 0xc000_5000));
        let io3 = u64::from(cfg_read32(&root, 3, BAR0) & !3);
        assert_eq!(io3, IO_BAR_BASE);
        // Decoding was enabled and the BARs answer on the buses.
        assert!(mmio.write(b1_4 + 8, &[0xab]));
        let mut d = [0u8];
        assert!(mmio.read(b1_4 + 8, &mut d));
        assert_eq!(d[0], 0xab);
        assert!(pio.write(io3 + 1, &[7]));
        // Absent functions and extended space read all ones.
        assert_eq!(cfg_read32(&root, 9, 0), 0xffff_ffff);
        assert_eq!(cfg_read32(&root, 3, 0x100), 0xffff_ffff);
    }

    #[test]
    fn functions_sharing_a_slot_say_multifunction() {
        let (mut root, _, _) = root_with(&[3]);
        root.add(
            PciAddr {
                bus: 0,
                slot: 3,
                func: 2,
            },
            dev(&[]),
        )
        .unwrap();
        root.finish_init().unwrap();
        let header = |slot, func| {
            let mut d = [0u8];
            root.config_access(
                PciAddr { bus: 0, slot, func },
                crate::config::HEADER_TYPE,
                &mut d,
                false,
            );
            d[0]
        };
        assert_eq!(header(3, 0) & 0x80, 0x80);
        assert_eq!(header(3, 2) & 0x80, 0x80);
        let (root1, _, _) = root_with(&[4]);
        root1.finish_init().unwrap();
        let mut d = [0u8];
        root1.config_access(
            PciAddr {
                bus: 0,
                slot: 4,
                func: 0,
            },
            crate::config::HEADER_TYPE,
            &mut d,
            false,
        );
        assert_eq!(d[0] & 0x80, 0, "a lone function is not multi-function");
        assert!(matches!(
            root.add(
                PciAddr {
                    bus: 0,
                    slot: 3,
                    func: 2
                },
                dev(&[])
            ),
            Err(PciError::Duplicate(_))
        ));
    }

    #[test]
    fn bar_moves_and_decode_follow_guest_writes() {
        let (root, _pio, mmio) = root_with(&[3]);
        root.finish_init().unwrap();
        let old = u64::from(cfg_read32(&root, 3, BAR0 + 4) & !0xf);
        cfg_write32(&root, 3, BAR0 + 4, 0xd000_0000);
        let mut d = [0u8; 4];
        assert!(!mmio.read(old, &mut d), "old range unregistered");
        assert!(mmio.read(0xd000_0000, &mut d), "new range registered");
        // Sizing while decode is on parks the BAR at an unusable address; restoring works.
        cfg_write32(&root, 3, BAR0 + 4, 0xffff_ffff);
        assert_eq!(cfg_read32(&root, 3, BAR0 + 4), 0xffff_f000);
        cfg_write32(&root, 3, BAR0 + 4, 0xd000_0000);
        assert!(mmio.read(0xd000_0000, &mut d));
        // Memory decode off: unmapped; on: mapped again.
        let cmd = cfg_read32(&root, 3, COMMAND) & 0xffff;
        cfg_write32(&root, 3, COMMAND, cmd & !u32::from(CMD_MEM));
        assert!(!mmio.read(0xd000_0000, &mut d));
        cfg_write32(&root, 3, COMMAND, cmd);
        assert!(mmio.read(0xd000_0000, &mut d));
    }

    #[test]
    fn large_bars_go_above_ram_and_overflow_is_an_error() {
        // A 256 MiB 64-bit BAR exceeds the below-4G limit: it lands in the 64-bit window.
        let (mut root, _, mmio) = root_with(&[]);
        root.add(
            PciAddr {
                bus: 0,
                slot: 2,
                func: 0,
            },
            dev(&[(0, BarKind::Mem64, 256 << 20)]),
        )
        .unwrap();
        root.finish_init().unwrap();
        let (lo, hi) = (cfg_read32(&root, 2, BAR0), cfg_read32(&root, 2, BAR0 + 4));
        let addr = u64::from(lo & !0xf) | (u64::from(hi) << 32);
        assert_eq!(addr, root.mem64_window().0);
        assert!(addr >= 1 << 32);
        let mut d = [0u8];
        assert!(mmio.read(addr + 5, &mut d));
        // A 1 GiB 32-bit BAR cannot fit the 512 MiB window below 4 GiB.
        let (mut root, _, _) = root_with(&[]);
        root.add(
            PciAddr {
                bus: 0,
                slot: 2,
                func: 0,
            },
            dev(&[(0, BarKind::Mem32, 1 << 30)]),
        )
        .unwrap();
        let e = root.finish_init().unwrap_err();
        assert!(
            matches!(
                e,
                PciError::NoRoom {
                    window: "32-bit memory",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("no room for BAR 0"));
    }

    #[test]
    fn a_restored_root_decodes_its_bars_where_the_saved_guest_had_moved_them() {
        let (root, _pio, mmio) = root_with(&[3, 4]);
        root.finish_init().unwrap();
        cfg_write32(&root, 3, BAR0 + 4, 0xd000_0000);
        let cmd = cfg_read32(&root, 4, COMMAND) & 0xffff;
        cfg_write32(&root, 4, COMMAND, cmd & !u32::from(CMD_MEM));
        // The CONF1 latch is the root's own state.
        *root.conf1.lock().unwrap() = 0x8000_1810;
        let saved = root.save_all().unwrap();

        let (fresh, _fpio, fmmio) = root_with(&[3, 4]);
        fresh.finish_init().unwrap();
        let allocated = u64::from(cfg_read32(&fresh, 3, BAR0 + 4) & !0xf);
        fresh.restore_all(&saved).unwrap();
        let mut d = [0u8; 4];
        assert!(
            fmmio.read(0xd000_0000, &mut d),
            "slot 3 BAR 1 decodes where it was moved"
        );
        assert!(
            !fmmio.read(allocated, &mut d),
            "and not where the allocator put it"
        );
        let b1_4 = u64::from(cfg_read32(&fresh, 4, BAR0 + 4) & !0xf);
        assert!(
            !fmmio.read(b1_4, &mut d),
            "slot 4's memory decode stays off"
        );
        assert!(mmio.read(0xd000_0000, &mut d));
        assert_eq!(*fresh.conf1.lock().unwrap(), 0x8000_1810);
        assert_eq!(
            fresh.save_all().unwrap(),
            saved,
            "saving again gives the same state"
        );

        // A VM without slot 4 refuses a state that has it; one with more slots refuses too.
        let (other, _, _) = root_with(&[3]);
        let e = other.restore_all(&saved).unwrap_err();
        assert!(e.to_string().contains("0:4.0"), "{e}");
        let (more, _, _) = root_with(&[3, 4, 5]);
        let e = more.restore_all(&saved).unwrap_err();
        assert!(
            e.to_string().contains("no saved state for PCI 0:5.0"),
            "{e}"
        );
    }
}
