//! VM and vCPU lifecycle, vm_loop and its exit table, the device registry.

pub mod emulations;
pub mod vmm;
