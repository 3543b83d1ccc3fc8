//! Device emulations. `legacy` holds the LPC-side platform devices (bhyve's `-l` world); PCI
//! devices arrive with the PCI issue.

pub mod legacy;

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

/// An edge-triggered ISA interrupt line, delivered by KVM's irqfd to the in-kernel PIC and
/// I/O APIC, so raising it from any thread costs one eventfd write and no vCPU exit.
pub struct IrqLine {
    evt: EventFd,
    pub gsi: u32,
}

impl IrqLine {
    pub fn new(vm: &VmFd, gsi: u32) -> std::io::Result<Self> {
        let evt = EventFd::new(libc::EFD_NONBLOCK)?;
        vm.register_irqfd(&evt, gsi)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        Ok(IrqLine { evt, gsi })
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.evt.write(1)
    }
}
