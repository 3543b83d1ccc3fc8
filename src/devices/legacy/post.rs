//! The POST diagnostic port 0x80: firmware writes progress codes here and Linux uses it as an
//! I/O delay. Accepted silently, as bhyve does; with `debug.boot_timer` the first write is
//! timestamped, which the start-up benchmark uses to see the guest's first instruction.

use crate::bus::BusDevice;

pub struct PostPort {
    last: u8,
    boot_timer: bool,
}

impl PostPort {
    pub fn new(boot_timer: bool) -> Self {
        PostPort {
            last: 0,
            boot_timer,
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds: comparable across processes on one host.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is valid writable storage for clock_gettime.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl BusDevice for PostPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.last;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if self.boot_timer {
            self.boot_timer = false;
            eprintln!(
                "rhyve: boot-timer: first guest write to port 0x80 at monotonic {} ns",
                monotonic_ns()
            );
        }
        if let Some(&b) = data.first() {
            log::trace!("POST code {b:#04x}");
            self.last = b;
        }
    }
}
