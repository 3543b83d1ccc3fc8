//! A function's PCI configuration space (PCI Local Bus 3.0 ch. 6; bhyve `pci_emul.c` cfg
//! helpers): 256 bytes with per-bit write masks, the six BAR registers with sizing, and the
//! capability list.

/// Standard header offsets.
pub const VENDOR_ID: usize = 0x00;
pub const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION: usize = 0x08;
pub const PROG_IF: usize = 0x09;
pub const SUBCLASS: usize = 0x0a;
pub const CLASS: usize = 0x0b;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYS_VENDOR: usize = 0x2c;
pub const SUBSYS_ID: usize = 0x2e;
pub const CAP_PTR: usize = 0x34;
pub const INTR_LINE: usize = 0x3c;
pub const INTR_PIN: usize = 0x3d;

pub const CMD_IO: u16 = 1 << 0;
pub const CMD_MEM: u16 = 1 << 1;
pub const CMD_BUS_MASTER: u16 = 1 << 2;
pub const CMD_INTX_DISABLE: u16 = 1 << 10;
pub const STATUS_CAP_LIST: u16 = 1 << 4;
pub const STATUS_INTX: u16 = 1 << 3;

pub const NUM_BARS: usize = 6;

/// What a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Mem32,
    /// A 64-bit memory BAR; the next BAR register holds its upper half.
    Mem64,
}

/// One BAR as declared by the device and placed by the allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    pub kind: BarKind,
    /// A power of two: at least 4 bytes for I/O, 4 KiB... for memory (we round small ones up).
    pub size: u64,
    /// Where the guest (or the allocator) placed it.
    pub addr: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigSpaceError {
    #[error("BAR {0} is not a valid BAR index")]
    BadIndex(usize),
    #[error("BAR {0} is already declared")]
    InUse(usize),
    #[error("BAR size {0:#x} is not a power of two")]
    BadSize(u64),
    #[error("no room for a {0}-byte capability")]
    NoRoom(usize),
}

/// What a function's config space holds that the guest or the allocator changed: the
/// registers and where each BAR is. Write masks, BAR sizes and the capability layout come from
/// the device's configuration; a state saved with other BARs is refused.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ConfigSpaceState {
    pub regs: Vec<u8>,
    /// (size, address) of each declared BAR, by index.
    pub bars: Vec<Option<(u64, u64)>>,
}

/// The config-space offset of BAR register `idx` (BARs are indexed 0-5).
fn bar_reg(idx: usize) -> usize {
    idx.min(NUM_BARS).saturating_mul(4).saturating_add(BAR0)
}

/// The config space of one function.
pub struct ConfigSpace {
    regs: [u8; 256],
    /// Bits the guest may change.
    wmask: [u8; 256],
    bars: [Option<Bar>; NUM_BARS],
    /// Where the next capability goes.
    next_cap: usize,
    last_cap: Option<usize>,
    /// The I/O APIC pin this function's INTx is wired to (set with the pin at init). The
    /// Interrupt Line register starts with it, but it is the guest's to write (firmware
    /// writes its own numbering there) and changes no wiring.
    intx_gsi: Option<u8>,
}

impl ConfigSpace {
    /// A type-0 header with the given IDs and class code.
    pub fn new(vendor: u16, device: u16, class: u8, subclass: u8, prog_if: u8) -> Self {
        let mut c = ConfigSpace {
            regs: [0; 256],
            wmask: [0; 256],
            bars: [None; NUM_BARS],
            next_cap: 0x40,
            last_cap: None,
            intx_gsi: None,
        };
        c.set_u16(VENDOR_ID, vendor);
        c.set_u16(DEVICE_ID, device);
        c.regs[CLASS] = class;
        c.regs[SUBCLASS] = subclass;
        c.regs[PROG_IF] = prog_if;
        // Command: I/O, memory, bus master and INTx-disable are the guest's to set.
        let cmd_mask = CMD_IO | CMD_MEM | CMD_BUS_MASTER | CMD_INTX_DISABLE;
        c.wmask[COMMAND..COMMAND + 2].copy_from_slice(&cmd_mask.to_le_bytes());
        c.wmask[INTR_LINE] = 0xff;
        c
    }

    pub fn save_state(&self) -> ConfigSpaceState {
        ConfigSpaceState {
            regs: self.regs.to_vec(),
            bars: self
                .bars
                .iter()
                .map(|b| b.map(|b| (b.size, b.addr)))
                .collect(),
        }
    }

    /// Takes a saved state; refuses one whose register file or BAR layout is not this one's.
    pub fn restore_state(&mut self, s: &ConfigSpaceState) -> Result<(), String> {
        let regs: [u8; 256] = s
            .regs
            .as_slice()
            .try_into()
            .map_err(|_| format!("{} config-space bytes, not 256", s.regs.len()))?;
        let sizes: Vec<Option<u64>> = s.bars.iter().map(|b| b.map(|b| b.0)).collect();
        let have: Vec<Option<u64>> = self.bars.iter().map(|b| b.map(|b| b.size)).collect();
        if sizes != have {
            return Err(format!("BAR sizes {sizes:x?}, this device has {have:x?}"));
        }
        self.regs = regs;
        for (bar, saved) in self.bars.iter_mut().zip(&s.bars) {
            if let (Some(bar), Some((_, addr))) = (bar.as_mut(), saved) {
                bar.addr = *addr;
            }
        }
        Ok(())
    }

    pub fn u8(&self, off: usize) -> u8 {
        self.regs.get(off).copied().unwrap_or(0xff)
    }

    pub fn u16(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.u8(off), self.u8(off.saturating_add(1))])
    }

    pub fn u32(&self, off: usize) -> u32 {
        u32::from_le_bytes([
            self.u8(off),
            self.u8(off.saturating_add(1)),
            self.u8(off.saturating_add(2)),
            self.u8(off.saturating_add(3)),
        ])
    }

    /// Device-side writes: ignore the guest write mask.
    pub fn set_u8(&mut self, off: usize, v: u8) {
        if let Some(r) = self.regs.get_mut(off) {
            *r = v;
        }
    }

    pub fn set_u16(&mut self, off: usize, v: u16) {
        for (i, b) in v.to_le_bytes().into_iter().enumerate() {
            self.set_u8(off.saturating_add(i), b);
        }
    }

    pub fn set_u32(&mut self, off: usize, v: u32) {
        for (i, b) in v.to_le_bytes().into_iter().enumerate() {
            self.set_u8(off.saturating_add(i), b);
        }
    }

    /// Marks bits at `off` as guest-writable.
    pub fn set_wmask(&mut self, off: usize, mask: &[u8]) {
        for (i, m) in mask.iter().enumerate() {
            if let Some(w) = self.wmask.get_mut(off.saturating_add(i)) {
                *w = *m;
            }
        }
    }

    pub fn command(&self) -> u16 {
        self.u16(COMMAND)
    }

    pub fn set_interrupt_pin(&mut self, pin: u8, line: u8) {
        self.regs[INTR_PIN] = pin;
        self.regs[INTR_LINE] = line;
        self.intx_gsi = Some(line);
    }

    /// The I/O APIC pin INTx is wired to, whatever the guest wrote into Interrupt Line.
    pub fn intx_gsi(&self) -> Option<u8> {
        self.intx_gsi
    }

    pub fn set_subsystem(&mut self, vendor: u16, id: u16) {
        self.set_u16(SUBSYS_VENDOR, vendor);
        self.set_u16(SUBSYS_ID, id);
    }

    pub fn set_multifunction(&mut self) {
        self.regs[HEADER_TYPE] |= 0x80;
    }

    /// Declares BAR `idx` (bhyve `pci_emul_alloc_bar`, first half: the allocator places it).
    pub fn declare_bar(
        &mut self,
        idx: usize,
        kind: BarKind,
        size: u64,
    ) -> Result<(), ConfigSpaceError> {
        let last = if kind == BarKind::Mem64 {
            idx.saturating_add(1)
        } else {
            idx
        };
        if last >= NUM_BARS {
            return Err(ConfigSpaceError::BadIndex(idx));
        }
        let upper_half_of_prev = idx
            .checked_sub(1)
            .and_then(|p| self.bar(p))
            .is_some_and(|b| b.kind == BarKind::Mem64);
        if self.bar(idx).is_some()
            || upper_half_of_prev
            || (kind == BarKind::Mem64 && self.bar(idx.saturating_add(1)).is_some())
        {
            return Err(ConfigSpaceError::InUse(idx));
        }
        if !size.is_power_of_two() {
            return Err(ConfigSpaceError::BadSize(size));
        }
        let min = if kind == BarKind::Io { 4 } else { 16 };
        let size = size.max(min);
        let Some(slot) = self.bars.get_mut(idx) else {
            return Err(ConfigSpaceError::BadIndex(idx));
        };
        *slot = Some(Bar {
            kind,
            size,
            addr: 0,
        });
        let mask = !(size.saturating_sub(1));
        let (flags, lo_mask) = match kind {
            BarKind::Io => (0x1u32, (mask as u32) & 0xffff_fffc),
            BarKind::Mem32 => (0x0, (mask as u32) & 0xffff_fff0),
            BarKind::Mem64 => (0x4, (mask as u32) & 0xffff_fff0),
        };
        let off = bar_reg(idx);
        self.set_u32(off, flags);
        self.set_wmask(off, &lo_mask.to_le_bytes());
        if kind == BarKind::Mem64 {
            self.set_wmask(off.saturating_add(4), &((mask >> 32) as u32).to_le_bytes());
        }
        Ok(())
    }

    pub fn bar(&self, idx: usize) -> Option<Bar> {
        self.bars.get(idx).copied().flatten()
    }

    pub fn bars(&self) -> impl Iterator<Item = (usize, Bar)> + '_ {
        self.bars
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.map(|b| (i, b)))
    }

    /// The address the BAR registers hold now.
    fn bar_register_addr(&self, idx: usize, kind: BarKind) -> u64 {
        let off = bar_reg(idx);
        match kind {
            BarKind::Io => u64::from(self.u32(off) & 0xffff_fffc),
            BarKind::Mem32 => u64::from(self.u32(off) & 0xffff_fff0),
            BarKind::Mem64 => {
                u64::from(self.u32(off) & 0xffff_fff0)
                    | (u64::from(self.u32(off.saturating_add(4))) << 32)
            }
        }
    }

    /// Places BAR `idx` at `addr` (allocator, or the guest through a BAR write).
    pub fn set_bar_addr(&mut self, idx: usize, addr: u64) {
        let Some(bar) = self.bars.get_mut(idx).and_then(|b| b.as_mut()) else {
            return;
        };
        bar.addr = addr & !(bar.size.saturating_sub(1));
        let kind = bar.kind;
        let a = bar.addr;
        let off = bar_reg(idx);
        let flags = self.u32(off) & if kind == BarKind::Io { 0x3 } else { 0xf };
        let mask = if kind == BarKind::Io {
            0xffff_fffc
        } else {
            0xffff_fff0
        };
        self.set_u32(off, (a as u32 & mask) | flags);
        if kind == BarKind::Mem64 {
            self.set_u32(off.saturating_add(4), (a >> 32) as u32);
        }
    }

    /// Which BAR, if any, has a register at config offset `off`.
    fn bar_at(&self, off: usize) -> Option<usize> {
        if !(BAR0..BAR0 + NUM_BARS * 4).contains(&off) {
            return None;
        }
        let i = off.saturating_sub(BAR0) / 4;
        match (self.bar(i), i.checked_sub(1).and_then(|p| self.bar(p))) {
            (Some(_), _) => Some(i),
            (None, Some(prev)) if prev.kind == BarKind::Mem64 => Some(i.saturating_sub(1)),
            _ => None,
        }
    }

    /// A guest write of `data` at `off`, through the write masks. Returns the BARs whose
    /// address changed, so the caller can move their bus registrations.
    pub fn guest_write(&mut self, off: usize, data: &[u8]) -> Vec<usize> {
        let bars_before: Vec<(usize, u64)> = self.bars().map(|(i, b)| (i, b.addr)).collect();
        for (i, &v) in data.iter().enumerate() {
            let o = off.saturating_add(i);
            let (Some(r), Some(m)) = (self.regs.get_mut(o), self.wmask.get(o)) else {
                break;
            };
            *r = (*r & !m) | (v & m);
        }
        let touched: Vec<usize> = (off..off.saturating_add(data.len()))
            .filter_map(|o| self.bar_at(o))
            .collect();
        let mut moved = Vec::new();
        for (i, old) in bars_before {
            if !touched.contains(&i) {
                continue;
            }
            let Some(bar) = self.bar(i) else { continue };
            let new = self.bar_register_addr(i, bar.kind);
            if new != old {
                if let Some(b) = self.bars.get_mut(i).and_then(|b| b.as_mut()) {
                    b.addr = new;
                }
                moved.push(i);
            }
        }
        moved
    }

    /// Guest read of `data.len()` bytes at `off`.
    pub fn guest_read(&self, off: usize, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = self.u8(off.saturating_add(i));
        }
    }

    /// Appends a capability of `len` bytes with ID `id`; returns its offset. The next-pointer
    /// chain and the status bit are maintained here.
    pub fn add_capability(&mut self, id: u8, len: usize) -> Result<usize, ConfigSpaceError> {
        let off = (self.next_cap.saturating_add(3)) & !3;
        if off.saturating_add(len) > 256 || len < 2 {
            return Err(ConfigSpaceError::NoRoom(len));
        }
        self.set_u8(off, id);
        self.set_u8(off.saturating_add(1), 0);
        match self.last_cap {
            Some(prev) => self.set_u8(prev.saturating_add(1), off as u8),
            None => self.set_u8(CAP_PTR, off as u8),
        }
        let status = self.u16(STATUS) | STATUS_CAP_LIST;
        self.set_u16(STATUS, status);
        self.last_cap = Some(off);
        self.next_cap = off.saturating_add(len);
        Ok(off)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn header_and_write_masks() {
        let mut c = ConfigSpace::new(0x1af4, 0x1042, 0x01, 0x00, 0x00);
        assert_eq!(c.u32(0), 0x1042_1af4);
        // IDs are read-only.
        c.guest_write(VENDOR_ID, &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(c.u32(0), 0x1042_1af4);
        // Command: only the defined bits stick.
        c.guest_write(COMMAND, &[0xff, 0xff]);
        assert_eq!(
            c.command(),
            CMD_IO | CMD_MEM | CMD_BUS_MASTER | CMD_INTX_DISABLE
        );
        c.set_interrupt_pin(1, 17);
        c.guest_write(INTR_LINE, &[11]);
        assert_eq!(c.u8(INTR_LINE), 11);
        assert_eq!(
            c.intx_gsi(),
            Some(17),
            "firmware's Interrupt Line numbering changes no wiring"
        );
        // Out of range reads are all ones, writes vanish.
        assert_eq!(c.u8(300), 0xff);
        c.guest_write(254, &[1, 2, 3, 4]);
    }

    #[test]
    fn bar_sizing_and_moves() {
        let mut c = ConfigSpace::new(1, 2, 0, 0, 0);
        c.declare_bar(0, BarKind::Io, 32).unwrap();
        c.declare_bar(1, BarKind::Mem32, 4096).unwrap();
        c.declare_bar(2, BarKind::Mem64, 1 << 20).unwrap();
        assert_eq!(
            c.declare_bar(3, BarKind::Io, 4),
            Err(ConfigSpaceError::InUse(3))
        );
        assert_eq!(
            c.declare_bar(5, BarKind::Mem64, 4096),
            Err(ConfigSpaceError::BadIndex(5))
        );
        assert_eq!(
            c.declare_bar(4, BarKind::Io, 24),
            Err(ConfigSpaceError::BadSize(24))
        );
        c.set_bar_addr(0, 0x2000);
        c.set_bar_addr(1, 0xc000_0000);
        c.set_bar_addr(2, 0x1_2340_0000);
        assert_eq!(c.u32(BAR0), 0x2001);
        assert_eq!(c.u32(BAR0 + 4), 0xc000_0000);
        assert_eq!(c.u32(BAR0 + 8), 0x2340_0004);
        assert_eq!(c.u32(BAR0 + 12), 1);
        // Sizing: all ones reads back the size mask with the type bits.
        let moved = c.guest_write(BAR0, &[0xff; 4]);
        assert_eq!(c.u32(BAR0), 0xffff_ffe1);
        assert_eq!(moved, vec![0]);
        c.guest_write(BAR0 + 4, &[0xff; 4]);
        assert_eq!(c.u32(BAR0 + 4), 0xffff_f000);
        c.guest_write(BAR0 + 8, &[0xff; 4]);
        c.guest_write(BAR0 + 12, &[0xff; 4]);
        assert_eq!(c.u32(BAR0 + 8), 0xfff0_0004);
        assert_eq!(c.u32(BAR0 + 12), 0xffff_ffff);
        // A move: the new address is reported, aligned to the size.
        let moved = c.guest_write(BAR0 + 4, &0xd000_0123u32.to_le_bytes());
        assert_eq!(moved, vec![1]);
        assert_eq!(c.bar(1).unwrap().addr, 0xd000_0000);
        // Writing the upper half of a 64-bit BAR moves BAR 2.
        c.guest_write(BAR0 + 8, &0x4000_0000u32.to_le_bytes());
        let moved = c.guest_write(BAR0 + 12, &2u32.to_le_bytes());
        assert_eq!(moved, vec![2]);
        assert_eq!(c.bar(2).unwrap().addr, 0x2_4000_0000);
        // Unused BAR registers stay zero.
        c.guest_write(BAR0 + 16, &[0xff; 4]);
        assert_eq!(c.u32(BAR0 + 16), 0);
    }

    #[test]
    fn capability_chain() {
        let mut c = ConfigSpace::new(1, 2, 0, 0, 0);
        let a = c.add_capability(0x05, 14).unwrap();
        let b = c.add_capability(0x11, 12).unwrap();
        assert_eq!(c.u8(CAP_PTR) as usize, a);
        assert_eq!(c.u8(a + 1) as usize, b);
        assert_eq!(c.u8(b + 1), 0);
        assert_ne!(c.u16(STATUS) & STATUS_CAP_LIST, 0);
        assert!(c.add_capability(0x09, 300).is_err());
    }
}
