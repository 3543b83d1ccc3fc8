//! The MSI capability (PCI 3.0 §6.8.1; bhyve `pci_emul.c` `pci_emul_add_msicap`): one vector,
//! 64-bit message address, per-vector masking with a pending bit. Delivered like MSI-X, as an
//! irqfd on a KVM MSI route.

use std::sync::Arc;

use super::config::ConfigSpace;
use rhyve_hypervisor::irq::{IrqRouter, MsiVector};

pub const CAP_ID_MSI: u8 = 0x05;
const CTRL_ENABLE: u16 = 1 << 0;
const CTRL_64BIT: u16 = 1 << 7;
const CTRL_PER_VECTOR_MASK: u16 = 1 << 8;
/// Capability layout with 64-bit addresses and per-vector masking.
const ADDR_LO: usize = 4;
const ADDR_HI: usize = 8;
const DATA: usize = 12;
const MASK: usize = 16;
const PENDING: usize = 20;
const LEN: usize = 24;

pub struct Msi {
    cap: usize,
    vector: Arc<MsiVector>,
    router: Arc<IrqRouter>,
}

impl Msi {
    pub fn new(cfg: &mut ConfigSpace, router: Arc<IrqRouter>) -> Result<Self, String> {
        let cap = cfg
            .add_capability(CAP_ID_MSI, LEN)
            .map_err(|e| e.to_string())?;
        cfg.set_u16(cap.saturating_add(2), CTRL_64BIT | CTRL_PER_VECTOR_MASK);
        // Enable (the single message needs no multiple-message bits), address, data, mask.
        cfg.set_wmask(cap.saturating_add(2), &CTRL_ENABLE.to_le_bytes());
        cfg.set_wmask(cap.saturating_add(ADDR_LO), &0xffff_fffcu32.to_le_bytes());
        cfg.set_wmask(cap.saturating_add(ADDR_HI), &[0xff; 4]);
        cfg.set_wmask(cap.saturating_add(DATA), &[0xff; 2]);
        cfg.set_wmask(cap.saturating_add(MASK), &[0x01, 0, 0, 0]);
        let vector = Arc::new(MsiVector::new(&router).map_err(|e| e.to_string())?);
        Ok(Msi {
            cap,
            vector,
            router,
        })
    }

    pub fn enabled(&self, cfg: &ConfigSpace) -> bool {
        cfg.u16(self.cap.saturating_add(2)) & CTRL_ENABLE != 0
    }

    pub fn vector(&self) -> Arc<MsiVector> {
        self.vector.clone()
    }

    /// Re-reads the capability after a config write: route, enable and mask.
    pub fn config_written(&mut self, cfg: &ConfigSpace) {
        let enabled = self.enabled(cfg);
        if enabled {
            let addr = u64::from(cfg.u32(self.cap.saturating_add(ADDR_LO)))
                | (u64::from(cfg.u32(self.cap.saturating_add(ADDR_HI))) << 32);
            let data = u32::from(cfg.u16(self.cap.saturating_add(DATA)));
            if let Err(e) = self.router.set_msi(self.vector.gsi, Some((addr, data))) {
                log::warn!("MSI: {e}");
            }
        }
        let masked = !enabled || cfg.u32(self.cap.saturating_add(MASK)) & 1 != 0;
        self.vector.set_masked(masked);
    }

    /// After the config space was restored: the vector's route and mask from the restored
    /// registers, and the pending bit they hold (delivered if the vector is unmasked).
    pub fn restore(&mut self, cfg: &ConfigSpace) {
        self.vector.set_masked(true);
        self.vector
            .set_pending(cfg.u32(self.cap.saturating_add(PENDING)) & 1 != 0);
        self.config_written(cfg);
    }

    /// The pending bit lives in config space: refresh it before a guest read.
    pub fn update_pending(&self, cfg: &mut ConfigSpace) {
        cfg.set_u32(
            self.cap.saturating_add(PENDING),
            u32::from(self.vector.is_pending()),
        );
    }
}
