//! The POST diagnostic port 0x80: firmware writes progress codes here and Linux uses it as an
//! I/O delay. Accepted silently, as bhyve does; with `debug.boot_timer` the first write is
//! timestamped, which the start-up benchmark uses to see the guest's first instruction.

use rhyve_base::lifecycle::{DeviceState, Lifecycle, Paused, StateError};
use rhyve_bus::BusDevice;
use serde::{Deserialize, Serialize};

const KIND: &str = "post";
const VERSION: u32 = 1;

pub struct PostPort {
    last: u8,
    /// Configuration (`debug.boot_timer`, consumed by the first write), not state.
    boot_timer: bool,
    paused: Paused,
}

/// What the port holds: the last code written, which reads back.
#[derive(Debug, Serialize, Deserialize)]
struct PostState {
    last: u8,
}

impl PostPort {
    pub fn new(boot_timer: bool) -> Self {
        PostPort {
            last: 0,
            boot_timer,
            paused: Paused::default(),
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
    // A monotonic clock is never negative and its seconds fit many centuries of nanoseconds;
    // saturating keeps a broken clock from wrapping.
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// The port makes no work of its own: pausing only guards `save` and `restore`.
impl Lifecycle for PostPort {
    fn pause(&mut self) {
        self.paused.set(true);
    }

    fn resume(&mut self) {
        self.paused.set(false);
    }

    fn reset(&mut self) {
        self.last = 0;
    }

    fn save(&mut self) -> Result<DeviceState, StateError> {
        self.paused.check(KIND)?;
        DeviceState::new(KIND, VERSION, &PostState { last: self.last })
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), StateError> {
        self.paused.check(KIND)?;
        let s: PostState = state.parse(KIND, VERSION)?;
        self.last = s.last;
        Ok(())
    }
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
            rhyve_base::timeline::mark_once("port 0x80: first write");
            log::trace!("POST code {b:#04x}");
            self.last = b;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
    use super::*;
    use rhyve_base::lifecycle::round_trip;

    fn inb(p: &mut PostPort) -> u8 {
        let mut d = [0xa5u8];
        p.read(0, &mut d);
        d[0]
    }

    #[test]
    fn post_code_survives_a_round_trip() {
        let mut p = PostPort::new(false);
        p.write(0, &[0x5a]);
        let mut fresh = PostPort::new(false);
        let (saved, again) = round_trip(&mut p, &mut fresh).unwrap();
        assert_eq!(saved, again);
        assert_eq!(saved.kind, "post");
        assert_eq!(inb(&mut fresh), 0x5a);
        assert_eq!(inb(&mut fresh), inb(&mut p));
        fresh.resume();
        fresh.write(0, &[0x11]);
        assert_eq!(inb(&mut fresh), 0x11);
    }

    #[test]
    fn post_save_while_running_is_refused() {
        let mut p = PostPort::new(false);
        assert_eq!(p.save(), Err(StateError::NotPaused("post".into())));
        p.pause();
        let s = p.save().unwrap();
        p.resume();
        assert_eq!(p.restore(&s), Err(StateError::NotPaused("post".into())));
    }
}
