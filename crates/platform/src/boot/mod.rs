//! Boot payloads other than a firmware ROM: direct Linux kernel boot.

pub mod bzimage;
pub mod linux;
