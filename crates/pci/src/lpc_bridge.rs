//! The LPC (PCI-to-ISA) bridge's PCI function (bhyve `pci_lpc.c`): an Intel PIIX3-like ISA
//! bridge identity. The legacy devices behind it (`-l`) live in `devices::legacy`.

use super::config::ConfigSpace;
use super::device::PciDevice;
use super::hostbridge::IdentityFunction;
use rhyve_config::Config;

pub fn init(
    _ctx: &super::PciInitCtx,
    _cfg: &Config,
    _prefix: &str,
) -> Result<Box<dyn PciDevice>, String> {
    // Class 06/01: ISA bridge; bhyve presents 8086:7000.
    Ok(IdentityFunction::boxed(
        "lpc",
        ConfigSpace::new(0x8086, 0x7000, 0x06, 0x01, 0x00),
    ))
}
