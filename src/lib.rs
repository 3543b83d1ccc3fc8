//! rhyve: FreeBSD bhyve's userspace VMM, rebuilt in Rust on Linux KVM.
//!
//! A workspace of crates, one per layer (ARCHITECTURE.md has the picture and which crate may
//! use which), re-exported here under the module names they had before the split:
//! - `hypervisor` (rhyve-hypervisor): KVM access (libvmmapi's role): VM, memory map, vCPU setup.
//! - `bus` (rhyve-bus): port-I/O and MMIO address-range buses.
//! - `devices` (rhyve-devices): the LPC-side legacy platform devices.
//! - `pci` (rhyve-pci): PCI root (CONF1, ECAM, BARs, MSI-X), config space, bridges.
//! - `block` (rhyve-block): the block backend disk emulations share (bhyve's `block_if.c`).
//! - `virtio` (rhyve-virtio): virtio devices and their PCI transport.
//! - `acpi`, `mptable`, `boot` (rhyve-platform): platform tables and the Linux loaders.
//! - `emulations`, `vmm` (rhyve-vmm): the device registry; the VM and vCPU lifecycle,
//!   `vm_loop` and its exit-handler table.
//! - `config` (rhyve-config): the bhyve_config(5) tree, its known keys and checks.
//! - `logging`, `term`, `thread`, `lifecycle` (rhyve-base): logging, the terminal, threads by
//!   role, the device lifecycle and saved state.
//! - `api` (rhyve-api): the control API's HTTP server on a unix socket.
//! - `cli`, `api_config`, `control_plane` (this crate): the bhyve(8) command line into the
//!   tree, cloud-hypervisor's VmConfig into the tree, and the main thread's control loop.

pub mod api_config;
pub mod cli;
pub mod control_plane;

pub use rhyve_api as api;

pub use rhyve_base::{lifecycle, logging, seccomp, term, thread, timeline};
pub use rhyve_block as block;
pub use rhyve_bus as bus;
pub use rhyve_config as config;
pub use rhyve_devices as devices;
pub use rhyve_hypervisor as hypervisor;
pub use rhyve_pci as pci;
pub use rhyve_platform::{acpi, boot, mptable};
pub use rhyve_virtio as virtio;
pub use rhyve_vmm::{emulations, vmm};
