//! The MSI-X capability (PCI 3.0 §6.8.2; bhyve `pci_emul.c` msix helpers): the capability
//! registers, the vector table and pending-bit array inside a BAR, per-vector and function
//! masks. Each vector is an `MsiVector` (irqfd + KVM MSI route), so a device raises it without
//! a VM exit, from any thread.

use std::sync::Arc;

use super::config::ConfigSpace;
use rhyve_hypervisor::irq::{IrqRouter, MsiVector};

pub const CAP_ID_MSIX: u8 = 0x11;
const CTRL_ENABLE: u16 = 1 << 15;
const CTRL_FUNC_MASK: u16 = 1 << 14;
const ENTRY_SIZE: u64 = 16;
const VECTOR_CTRL_MASK: u32 = 1;

/// The guest's MSI-X settings: the table as written, the pending bits, enable and function
/// mask (the capability's place and the table's BAR come from the device's configuration).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MsixState {
    pub entries: Vec<[u32; 4]>,
    pub pending: Vec<bool>,
    pub enabled: bool,
    pub func_masked: bool,
}

pub struct Msix {
    cap: usize,
    bar: usize,
    table_off: u64,
    pba_off: u64,
    /// Address low, address high, data, vector control; as the guest wrote them.
    entries: Vec<[u32; 4]>,
    vectors: Vec<Arc<MsiVector>>,
    router: Arc<IrqRouter>,
    enabled: bool,
    func_masked: bool,
}

impl Msix {
    /// Bytes the table and PBA need for `n` vectors, each rounded to 8 bytes.
    pub fn table_bytes(n: u16) -> u64 {
        u64::from(n) * ENTRY_SIZE
    }

    pub fn pba_bytes(n: u16) -> u64 {
        u64::from(n).div_ceil(64).saturating_mul(8)
    }

    /// Adds the capability for `n` vectors whose table is at `table_off` and PBA at `pba_off`
    /// inside BAR `bar` (which the device declares and routes to `read`/`write`).
    pub fn new(
        cfg: &mut ConfigSpace,
        n: u16,
        bar: usize,
        table_off: u32,
        pba_off: u32,
        router: Arc<IrqRouter>,
    ) -> Result<Self, String> {
        if n == 0
            || n > 2048
            || bar > 5
            || !table_off.is_multiple_of(8)
            || !pba_off.is_multiple_of(8)
        {
            return Err(format!("bad MSI-X layout: {n} vectors in BAR {bar}"));
        }
        let cap = cfg
            .add_capability(CAP_ID_MSIX, 12)
            .map_err(|e| e.to_string())?;
        cfg.set_u16(cap.saturating_add(2), n.saturating_sub(1));
        cfg.set_wmask(
            cap.saturating_add(2),
            &(CTRL_ENABLE | CTRL_FUNC_MASK).to_le_bytes(),
        );
        cfg.set_u32(cap.saturating_add(4), table_off | bar as u32);
        cfg.set_u32(cap.saturating_add(8), pba_off | bar as u32);
        let mut vectors = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            vectors.push(Arc::new(
                MsiVector::new(&router).map_err(|e| e.to_string())?,
            ));
        }
        Ok(Msix {
            cap,
            bar,
            table_off: u64::from(table_off),
            pba_off: u64::from(pba_off),
            entries: vec![[0, 0, 0, VECTOR_CTRL_MASK]; usize::from(n)],
            vectors,
            router,
            enabled: false,
            func_masked: false,
        })
    }

    pub fn save_state(&self) -> MsixState {
        MsixState {
            entries: self.entries.clone(),
            pending: self.vectors.iter().map(|v| v.is_pending()).collect(),
            enabled: self.enabled,
            func_masked: self.func_masked,
        }
    }

    /// Takes a saved state and re-routes every vector; a pending vector the state leaves
    /// unmasked is delivered.
    pub fn restore_state(&mut self, s: &MsixState) -> Result<(), String> {
        if s.entries.len() != self.entries.len() || s.pending.len() != self.vectors.len() {
            return Err(format!(
                "{} MSI-X vectors saved, this device has {}",
                s.entries.len(),
                self.entries.len()
            ));
        }
        self.entries.clone_from(&s.entries);
        self.enabled = s.enabled;
        self.func_masked = s.func_masked;
        for (v, p) in self.vectors.iter().zip(&s.pending) {
            v.set_masked(true);
            v.set_pending(*p);
        }
        for i in 0..self.entries.len() {
            self.refresh(i);
        }
        Ok(())
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn vector(&self, i: usize) -> Option<Arc<MsiVector>> {
        self.vectors.get(i).cloned()
    }

    pub fn len(&self) -> usize {
        self.vectors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    /// Re-reads Message Control after a config write.
    pub fn config_written(&mut self, cfg: &ConfigSpace) {
        let ctrl = cfg.u16(self.cap.saturating_add(2));
        let (en, fm) = (ctrl & CTRL_ENABLE != 0, ctrl & CTRL_FUNC_MASK != 0);
        if (en, fm) != (self.enabled, self.func_masked) {
            self.enabled = en;
            self.func_masked = fm;
            for i in 0..self.entries.len() {
                self.refresh(i);
            }
        }
    }

    /// Brings vector `i`'s KVM route and mask in line with the guest's settings.
    fn refresh(&mut self, i: usize) {
        let (Some(e), Some(v)) = (self.entries.get(i), self.vectors.get(i)) else {
            return;
        };
        let masked = !self.enabled || self.func_masked || e[3] & VECTOR_CTRL_MASK != 0;
        if !masked {
            let addr = u64::from(e[0]) | (u64::from(e[1]) << 32);
            if let Err(err) = self.router.set_msi(v.gsi, Some((addr, e[2]))) {
                log::warn!("MSI-X vector {i}: {err}");
            }
        }
        v.set_masked(masked);
    }

    /// Whether `offset` in BAR `bar` belongs to the table or PBA.
    pub fn claims(&self, bar: usize, offset: u64) -> bool {
        let n = self.entries.len() as u16;
        bar == self.bar
            && ((self.table_off..self.table_off.saturating_add(Self::table_bytes(n)))
                .contains(&offset)
                || (self.pba_off..self.pba_off.saturating_add(Self::pba_bytes(n)))
                    .contains(&offset))
    }

    /// A guest read in the table or PBA; 4- and 8-byte aligned accesses, others read ones.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if !matches!(data.len(), 4 | 8) || !offset.is_multiple_of(4) {
            return;
        }
        let n = self.entries.len() as u16;
        for (k, chunk) in data.chunks_mut(4).enumerate() {
            let off = offset.saturating_add((k as u64).saturating_mul(4));
            let word = if off >= self.table_off
                && off < self.table_off.saturating_add(Self::table_bytes(n))
            {
                let rel = off.saturating_sub(self.table_off);
                self.entries
                    .get((rel / ENTRY_SIZE) as usize)
                    .and_then(|e| e.get(((rel % ENTRY_SIZE) / 4) as usize).copied())
            } else if off >= self.pba_off && off < self.pba_off.saturating_add(Self::pba_bytes(n)) {
                // Inside the PBA (checked above): a handful of bytes, 8 vectors each.
                let first = usize::try_from(off.saturating_sub(self.pba_off).saturating_mul(8))
                    .unwrap_or(usize::MAX);
                let mut w = 0u32;
                for b in 0..32 {
                    if self
                        .vectors
                        .get(first.saturating_add(b))
                        .is_some_and(|v| v.is_pending())
                    {
                        w |= 1 << b;
                    }
                }
                Some(w)
            } else {
                None
            };
            if let Some(w) = word {
                chunk.copy_from_slice(&w.to_le_bytes());
            }
        }
    }

    /// A guest write in the table (the PBA is read-only). An 8-byte write lands whole before
    /// the entry's route is brought up to date, so an unmasked entry is never routed to half
    /// of a new address.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if !matches!(data.len(), 4 | 8) || !offset.is_multiple_of(4) || offset < self.table_off {
            return;
        }
        let mut touched: Option<usize> = None;
        for (k, chunk) in data.chunks(4).enumerate() {
            // offset >= table_off (checked above).
            let rel = offset
                .saturating_sub(self.table_off)
                .saturating_add((k as u64).saturating_mul(4));
            let i = usize::try_from(rel / ENTRY_SIZE).unwrap_or(usize::MAX);
            let word = ((rel % ENTRY_SIZE) / 4) as usize;
            let Some(w) = self.entries.get_mut(i).and_then(|e| e.get_mut(word)) else {
                break;
            };
            let mut b = [0u8; 4];
            b.copy_from_slice(chunk);
            *w = u32::from_le_bytes(b);
            if let Some(t) = touched.filter(|&t| t != i) {
                // An 8-byte write that straddles two entries (word 3 of one, word 0 of the
                // next): the first is complete.
                self.refresh(t);
            }
            touched = Some(i);
        }
        if let Some(i) = touched {
            self.refresh(i);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
    use super::*;

    /// MSI-X needs a VM for its routes and irqfds: these tests use real KVM.
    fn router() -> Arc<IrqRouter> {
        let kvm = kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm");
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        Arc::new(IrqRouter::new(Arc::new(vm)).unwrap())
    }

    #[test]
    fn table_pba_and_masks() {
        let mut cfg = ConfigSpace::new(1, 1, 0, 0, 0);
        let mut x = Msix::new(&mut cfg, 3, 2, 0, 0x800, router()).unwrap();
        assert_eq!(x.len(), 3);
        assert!(x.claims(2, 0) && x.claims(2, 0x2c) && x.claims(2, 0x800));
        assert!(!x.claims(2, 0x30) && !x.claims(1, 0) && !x.claims(2, 0x808));
        // Entries start masked; vector control reads back 1.
        let mut d = [0u8; 4];
        x.read(12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1);
        // Program entry 1 (8-byte write of the address), unmask it.
        x.write(16, &0xfee0_0000u64.to_le_bytes());
        x.write(24, &0x41u32.to_le_bytes());
        x.write(28, &0u32.to_le_bytes());
        let mut q = [0u8; 8];
        x.read(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xfee0_0000);
        // MSI-X still disabled: a trigger is pending, visible in the PBA.
        x.vector(1).unwrap().trigger();
        x.read(0x800, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0b10);
        // Enable through the capability: the pending message is delivered, the bit clears.
        let cap = usize::from(cfg.u8(crate::config::CAP_PTR));
        cfg.guest_write(cap + 3, &[0x80]);
        x.config_written(&cfg);
        assert!(x.enabled());
        x.read(0x800, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0);
        // Bad accesses: odd sizes and offsets read all ones and write nothing.
        let mut b = [0u8; 2];
        x.read(16, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        x.write(17, &[1, 2, 3, 4]);
        x.write(0x1000, &[1, 2, 3, 4]);
        x.read(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xfee0_0000);
    }
}
