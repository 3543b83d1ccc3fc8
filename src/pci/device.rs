//! The PCI device role (bhyve `struct pci_devemu` callbacks): what every emulation provides.

use super::config::ConfigSpace;

/// A PCI function's emulation. The root handles the generic parts of config space (BAR sizing
/// and moves, Command decode bits); a device overrides only what is special to it.
pub trait PciDevice: Send {
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

    /// The VM is pausing: stop touching guest memory until `resume`.
    fn pause(&mut self) {}
    fn resume(&mut self) {}
}
