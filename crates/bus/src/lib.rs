//! Address-range buses for port I/O and MMIO (bhyve `inout.c` / `mem.c`).
//!
//! A bus maps non-overlapping `[base, base+len)` ranges to devices. Lookups take the bus's read
//! lock and then the device's mutex (lock order: bus before device, never the reverse); ranges
//! change only when the guest moves a BAR, so the write lock is rare.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device reachable on a bus. `offset` is relative to the range the device was inserted at.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("{name} at {base:#x}+{len:#x} overlaps {other} at {obase:#x}+{olen:#x}")]
    Overlap {
        name: String,
        base: u64,
        len: u64,
        other: String,
        obase: u64,
        olen: u64,
    },
    #[error("{name}: empty or wrapping range {base:#x}+{len:#x}")]
    BadRange { name: String, base: u64, len: u64 },
}

struct Entry {
    len: u64,
    name: String,
    dev: Arc<Mutex<dyn BusDevice>>,
}

#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &self,
        name: &str,
        base: u64,
        len: u64,
        dev: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        let end = match base.checked_add(len) {
            Some(e) if len > 0 => e,
            _ => {
                return Err(BusError::BadRange {
                    name: name.into(),
                    base,
                    len,
                })
            }
        };
        let mut ranges = self.ranges.write().unwrap_or_else(|p| p.into_inner());
        // The nearest range starting below `end` is the only one that can overlap.
        if let Some((&obase, e)) = ranges.range(..end).next_back() {
            if obase + e.len > base {
                return Err(BusError::Overlap {
                    name: name.into(),
                    base,
                    len,
                    other: e.name.clone(),
                    obase,
                    olen: e.len,
                });
            }
        }
        ranges.insert(
            base,
            Entry {
                len,
                name: name.into(),
                dev,
            },
        );
        Ok(())
    }

    /// Removes every range. The devices reach the buses back (the PCI root's CONF1 and ECAM
    /// windows hold the root, which holds the buses): a VM being dropped clears its buses so
    /// its devices, their threads and the guest memory they map go with it.
    pub fn clear(&self) {
        let old = std::mem::take(&mut *self.ranges.write().unwrap_or_else(|p| p.into_inner()));
        drop(old);
    }

    /// Removes the range starting at `base`; returns whether there was one.
    pub fn remove(&self, base: u64) -> bool {
        let mut ranges = self.ranges.write().unwrap_or_else(|p| p.into_inner());
        ranges.remove(&base).is_some()
    }

    fn find(&self, addr: u64) -> Option<(u64, Arc<Mutex<dyn BusDevice>>)> {
        let ranges = self.ranges.read().unwrap_or_else(|p| p.into_inner());
        let (&base, e) = ranges.range(..=addr).next_back()?;
        (addr - base < e.len).then(|| (addr - base, e.dev.clone()))
    }

    /// Reads from the device at `addr`; false if no device claims it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                dev.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read(off, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`; false if no device claims it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                dev.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u8, Vec<(u64, u8)>);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.1.push((offset, data[0]));
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlaps() {
        let bus = Bus::new();
        let a = Arc::new(Mutex::new(Reg(0x10, vec![])));
        bus.insert("a", 0x3f8, 8, a.clone()).unwrap();
        bus.insert("b", 0x400, 1, Arc::new(Mutex::new(Reg(0x20, vec![]))))
            .unwrap();
        let mut d = [0u8; 1];
        assert!(bus.read(0x3f8, &mut d));
        assert_eq!(d[0], 0x10);
        assert!(bus.read(0x3ff, &mut d));
        assert_eq!(d[0], 0x17);
        assert!(!bus.read(0x3f7, &mut d));
        assert!(!bus.read(0x401, &mut d));
        assert!(bus.write(0x3fa, &[9]));
        assert_eq!(a.lock().unwrap().1, vec![(2, 9)]);
        let dev = Arc::new(Mutex::new(Reg(0, vec![])));
        for (base, len) in [(0x3f0, 9), (0x3ff, 1), (0x3f9, 1), (0x3f0, 0x20)] {
            assert!(
                matches!(
                    bus.insert("x", base, len, dev.clone()),
                    Err(BusError::Overlap { .. })
                ),
                "{base:#x}+{len}"
            );
        }
        assert!(bus.insert("z", 0, 0, dev.clone()).is_err());
        assert!(bus.insert("w", u64::MAX, 2, dev.clone()).is_err());
        bus.insert("adjacent", 0x3f0, 8, dev).unwrap();
        assert!(bus.remove(0x3f8));
        assert!(!bus.read(0x3f8, &mut d));
    }
}
