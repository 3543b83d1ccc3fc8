//! rhyve: FreeBSD bhyve's userspace VMM, rebuilt in Rust on Linux KVM.
//!
//! Layers, bottom up (ARCHITECTURE.md has the picture):
//! - `hypervisor`: KVM access (libvmmapi's role): VM, memory map, vCPU setup.
//! - `bus`: port-I/O and MMIO address-range buses.
//! - `devices`: device emulations (`legacy`: the LPC-side platform).
//! - `pci`: PCI root (CONF1, ECAM, BARs, MSI-X), emulation registry, slot parsing.
//! - `virtio`: virtio devices and their PCI transport.
//! - `vmm`: the VM and vCPU lifecycle, `vm_loop` and its exit-handler table.
//! - `emulations`: the device registry (`-s` and `-l` names, keys, option parsers).
//! - `config`: the bhyve_config(5) tree, its known keys and checks.
//! - `cli`: the bhyve(8) command line, into the tree.
//! - `thread`: the one way a thread starts, by role.

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod cli;
pub mod config;
pub mod devices;
pub mod emulations;
pub mod hypervisor;
pub mod logging;
pub mod mptable;
pub mod pci;
pub mod term;
pub mod thread;
pub mod virtio;
pub mod vmm;
