//! Rhyve's threads by role, logging, terminal handling, and the device lifecycle every device
//! implements.

pub mod lifecycle;
pub mod logging;
pub mod seccomp;
pub mod term;
pub mod thread;
pub mod timeline;
