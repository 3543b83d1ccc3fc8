//! The x86 platform tables (ACPI, MP table) and the Linux boot loaders.

pub mod acpi;
pub mod boot;
pub mod mptable;
