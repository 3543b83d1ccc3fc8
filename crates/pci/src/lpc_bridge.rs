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

/// Where rhyve's ACPI PM block sits (`devices::legacy::pm::PM1A_EVT`; the vmm checks the two
/// agree).
pub const ACPI_PM_BASE: u16 = 0x400;
/// PIIX4 PM's PMBA (PM base address, bit 0 says I/O space) and PMREGMISC (bit 0: the PM
/// block decodes) registers.
pub const PIIX4_PMBA: usize = 0x40;
pub const PIIX4_PMREGMISC: usize = 0x80;

/// The PIIX4's power-management function (8086:7113), as QEMU's pc machine has it at 0:1.3,
/// for firmware that finds the ACPI PM block through it: OVMF reads the PM timer's port from
/// PMBA on an i440fx, and hangs in its first delay without it. rhyve's PM block does not
/// move: PMBA holds its base and PMREGMISC says it is on, both read-only, so firmware takes
/// it as already set up (OVMF checks PMREGMISC first) and uses the block rhyve's FADT
/// describes. On slot 1 without a function 0, enumeration (SeaBIOS's, Linux's) does not see
/// it; OVMF reads it directly.
pub fn init_piix4_pm(
    _ctx: &super::PciInitCtx,
    _cfg: &Config,
    _prefix: &str,
) -> Result<Box<dyn PciDevice>, String> {
    // Class 06/80: other bridge, as the PIIX4 PM function reports.
    let mut cfg = ConfigSpace::new(0x8086, 0x7113, 0x06, 0x80, 0x00);
    cfg.set_u32(PIIX4_PMBA, u32::from(ACPI_PM_BASE) | 1);
    cfg.set_u8(PIIX4_PMREGMISC, 1);
    Ok(IdentityFunction::boxed("piix4-pm", cfg))
}
