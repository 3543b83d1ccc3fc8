//! The legacy platform on the LPC side: COM ports, RTC/CMOS, the i8042 keyboard controller,
//! reset ports, the POST port, and ACPI power management.

pub mod fw_cfg;
pub mod i8042;
pub mod lpc;
pub mod pm;
pub mod post;
pub mod resetctl;
pub mod rtc;
pub mod uart;
pub mod uart_backend;
