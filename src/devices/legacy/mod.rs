//! The legacy platform on the LPC side: COM ports, RTC/CMOS, reset ports, the POST port.

pub mod i8042;
pub mod lpc;
pub mod post;
pub mod resetctl;
pub mod rtc;
pub mod uart;
pub mod uart_backend;
