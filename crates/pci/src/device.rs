//! The PCI device role (bhyve `struct pci_devemu` callbacks): what every emulation provides.

use super::config::ConfigSpace;
use rhyve_base::lifecycle::Lifecycle;

/// A PCI function's emulation. The root handles the generic parts of config space (BAR sizing
/// and moves, Command decode bits); a device overrides only what is special to it. Pause,
/// resume, reset and the saved state come from [`Lifecycle`] (bhyve `pe_pause`, `pe_resume`,
/// `pe_snapshot`).
pub trait PciDevice: Lifecycle {
    /// The emulation name (`-s` name), for messages.
    fn name(&self) -> &'static str;

    fn config(&self) -> &ConfigSpace;
    fn config_mut(&mut self) -> &mut ConfigSpace;

    /// A guest config read (bhyve `pe_cfgread`); the default reads the register file.
    fn config_read(&mut self, off: usize, data: &mut [u8]) {
        self.config().guest_read(off, data);
    }

    /// Called after a guest config write has landed in the register file (bhyve `pe_cfgwrite`
    /// runs instead; here the masks have already applied), e.g. to act on MSI-X enable.
    fn config_written(&mut self, _off: usize, _len: usize) {}

    /// A guest access inside BAR `bar` at `offset` (bhyve `pe_barread`/`pe_barwrite`).
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);

    /// The guest (or the allocator) placed BAR `bar` at `addr` (bhyve `pe_baraddr`).
    fn bar_moved(&mut self, _bar: usize, _addr: u64) {}

    /// The device's I/O counters (bytes and operations since it was created), by name, for
    /// the API's `vm.counters`; none by default.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}
