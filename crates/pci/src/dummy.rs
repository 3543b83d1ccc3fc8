//! `dummy`: a test device like bhyve's PCI_EMUL_TEST (`pci_emul.c`): IDs 0x10DD:0x0001, an I/O
//! BAR, a 32-bit and a 64-bit memory BAR, each backed by plain storage the guest can write and
//! read back, so BAR sizing, moves and decode can be checked from a guest; MSI-X with four
//! vectors (table and PBA in BAR 4): writing N to the last dword of the I/O BAR raises vector N;
//! and one MSI vector, raised by a write to the dword before it.

use super::config::{BarKind, ConfigSpace, ConfigSpaceState};
use super::device::PciDevice;
use super::msi::Msi;
use super::msix::{Msix, MsixState};
use super::PciInitCtx;
use rhyve_base::lifecycle::{DeviceState, Lifecycle, Paused, StateError};
use rhyve_config::Config;

pub const IO_SIZE: u64 = 32;
pub const MEM32_SIZE: u64 = 4096;
pub const MEM64_SIZE: u64 = 8192;
/// I/O BAR offset whose write raises the MSI-X vector written.
pub const IO_FIRE: u64 = 0x1c;
/// I/O BAR offset whose write raises the MSI vector.
pub const IO_FIRE_MSI: u64 = 0x18;
const MSIX_BAR: usize = 4;
const MSIX_VECTORS: u16 = 4;
const MSIX_PBA: u32 = 0x800;

pub struct Dummy {
    cfg: ConfigSpace,
    /// Storage behind BAR 0, 1 and 2 (BAR 2 is 64-bit and also uses register 3).
    regs: [Vec<u8>; 3],
    msix: Msix,
    msi: Msi,
    paused: Paused,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct DummyState {
    cfg: ConfigSpaceState,
    regs: [Vec<u8>; 3],
    msix: MsixState,
}

const STATE_VERSION: u32 = 1;

impl Dummy {
    pub fn init(
        ctx: &PciInitCtx,
        _cfg: &Config,
        _prefix: &str,
    ) -> Result<Box<dyn PciDevice>, String> {
        let mut cfg = ConfigSpace::new(0x10dd, 0x0001, 0xff, 0x00, 0x00);
        let e = |e: super::config::ConfigSpaceError| e.to_string();
        cfg.declare_bar(0, BarKind::Io, IO_SIZE).map_err(e)?;
        cfg.declare_bar(1, BarKind::Mem32, MEM32_SIZE).map_err(e)?;
        cfg.declare_bar(2, BarKind::Mem64, MEM64_SIZE).map_err(e)?;
        cfg.declare_bar(MSIX_BAR, BarKind::Mem32, 4096).map_err(e)?;
        cfg.set_interrupt_pin(1, 0);
        let msi = Msi::new(&mut cfg, ctx.router.clone())?;
        let msix = Msix::new(
            &mut cfg,
            MSIX_VECTORS,
            MSIX_BAR,
            0,
            MSIX_PBA,
            ctx.router.clone(),
        )?;
        Ok(Box::new(Dummy {
            cfg,
            regs: [
                vec![0; IO_SIZE as usize],
                vec![0; MEM32_SIZE as usize],
                vec![0; MEM64_SIZE as usize],
            ],
            msix,
            msi,
            paused: Paused::default(),
        }))
    }

    fn window(&mut self, bar: usize, offset: u64, len: usize) -> Option<&mut [u8]> {
        let r = self.regs.get_mut(bar)?;
        let start = usize::try_from(offset).ok()?;
        r.get_mut(start..start.checked_add(len)?)
    }
}

impl Lifecycle for Dummy {
    fn pause(&mut self) {
        self.paused.set(true);
    }
    fn resume(&mut self) {
        self.paused.set(false);
    }
    fn save(&mut self) -> Result<DeviceState, StateError> {
        self.paused.check("dummy")?;
        // The MSI pending bit is copied into config space only on reads: bring it up to date.
        self.msi.update_pending(&mut self.cfg);
        let state = DummyState {
            cfg: self.cfg.save_state(),
            regs: self.regs.clone(),
            msix: self.msix.save_state(),
        };
        DeviceState::new("dummy", STATE_VERSION, &state)
    }
    fn restore(&mut self, s: &DeviceState) -> Result<(), StateError> {
        self.paused.check("dummy")?;
        let st: DummyState = s.parse("dummy", STATE_VERSION)?;
        let bad = |why: String| StateError::Malformed {
            kind: "dummy".into(),
            why,
        };
        if st
            .regs
            .iter()
            .map(Vec::len)
            .ne(self.regs.iter().map(Vec::len))
        {
            return Err(bad("BAR storage of another size".into()));
        }
        self.cfg.restore_state(&st.cfg).map_err(bad)?;
        self.msix.restore_state(&st.msix).map_err(bad)?;
        self.msi.restore(&self.cfg);
        self.regs = st.regs;
        Ok(())
    }
}

impl PciDevice for Dummy {
    fn name(&self) -> &'static str {
        "dummy"
    }
    fn config(&self) -> &ConfigSpace {
        &self.cfg
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.cfg
    }
    fn config_read(&mut self, off: usize, data: &mut [u8]) {
        self.msi.update_pending(&mut self.cfg);
        self.cfg.guest_read(off, data);
    }
    fn config_written(&mut self, _off: usize, _len: usize) {
        self.msix.config_written(&self.cfg);
        self.msi.config_written(&self.cfg);
    }
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar == MSIX_BAR {
            return self.msix.read(offset, data);
        }
        match self.window(bar, offset, data.len()) {
            Some(w) => data.copy_from_slice(w),
            None => data.fill(0xff),
        }
    }
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar == MSIX_BAR {
            return self.msix.write(offset, data);
        }
        if bar == 0 && offset == IO_FIRE_MSI {
            self.msi.vector().trigger();
        }
        if bar == 0 && offset == IO_FIRE {
            if let Some(v) = data.first().and_then(|n| self.msix.vector(usize::from(*n))) {
                // While MSI-X is off a real device would use INTx; the dummy stays silent.
                v.trigger();
            }
        }
        if let Some(w) = self.window(bar, offset, data.len()) {
            w.copy_from_slice(data);
        }
    }
}
