//! The LPC (PCI-to-ISA) bridge's PCI function (bhyve `pci_lpc.c`): an Intel PIIX3-like ISA
//! bridge identity. The legacy devices behind it (`-l`) live in `devices::legacy`.

use super::config::ConfigSpace;
use super::device::PciDevice;
use crate::config::Config;

pub struct LpcBridge {
    cfg: ConfigSpace,
}

impl LpcBridge {
    pub fn init(
        _ctx: &super::PciInitCtx,
        _cfg: &Config,
        _prefix: &str,
    ) -> Result<Box<dyn PciDevice>, String> {
        // Class 06/01: ISA bridge; bhyve presents 8086:7000.
        Ok(Box::new(LpcBridge {
            cfg: ConfigSpace::new(0x8086, 0x7000, 0x06, 0x01, 0x00),
        }))
    }
}

impl PciDevice for LpcBridge {
    fn name(&self) -> &'static str {
        "lpc"
    }
    fn config(&self) -> &ConfigSpace {
        &self.cfg
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.cfg
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}
