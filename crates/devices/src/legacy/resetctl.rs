//! The reset control register at port 0xCF9 (bhyve `pm.c` `reset_handler`): a write with the
//! reset bit (0x04) set resets the system, which ends rhyve with status 0 as in bhyve.

use std::sync::Arc;

use crate::{SuspendReason, VmStop};
use rhyve_base::lifecycle::{DeviceState, Lifecycle, Paused, StateError};
use rhyve_bus::BusDevice;
use serde::{Deserialize, Serialize};

const RST_CPU: u8 = 0x04;
const KIND: &str = "reset-control";
const VERSION: u32 = 1;

pub struct ResetControl {
    value: u8,
    ctl: Arc<dyn VmStop>,
    paused: Paused,
}

/// The register's value as it reads back (the reset bit is never kept).
#[derive(Debug, Serialize, Deserialize)]
struct ResetControlState {
    value: u8,
}

impl ResetControl {
    pub fn new(ctl: Arc<dyn VmStop>) -> Self {
        ResetControl {
            value: 0,
            ctl,
            paused: Paused::default(),
        }
    }
}

/// The register makes no work of its own: pausing only guards `save` and `restore`.
impl Lifecycle for ResetControl {
    fn pause(&mut self) {
        self.paused.set(true);
    }

    fn resume(&mut self) {
        self.paused.set(false);
    }

    fn reset(&mut self) {
        self.value = 0;
    }

    fn save(&mut self) -> Result<DeviceState, StateError> {
        self.paused.check(KIND)?;
        DeviceState::new(KIND, VERSION, &ResetControlState { value: self.value })
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), StateError> {
        self.paused.check(KIND)?;
        let s: ResetControlState = state.parse(KIND, VERSION)?;
        // The register never holds the reset bit; a state with it set was not saved here.
        if s.value & RST_CPU != 0 {
            return Err(StateError::Malformed {
                kind: KIND.into(),
                why: format!("value {:#04x} has the reset bit set", s.value),
            });
        }
        self.value = s.value;
        Ok(())
    }
}

impl BusDevice for ResetControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if let Some(b) = data.first_mut() {
            *b = self.value;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        // Only byte writes reach the register; 0xCF8 as a dword is the PCI address port.
        if let [v] = data {
            self.value = *v & !RST_CPU;
            if *v & RST_CPU != 0 {
                log::info!("guest reset through port 0xcf9");
                self.ctl.stop(SuspendReason::Reset);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
    use super::*;
    use crate::StopRecorder;
    use rhyve_base::lifecycle::round_trip;

    fn inb(r: &mut ResetControl) -> u8 {
        let mut d = [0u8];
        r.read(0, &mut d);
        d[0]
    }

    #[test]
    fn reset_control_value_survives_a_round_trip() {
        let ctl = Arc::new(StopRecorder::default());
        let mut r = ResetControl::new(ctl.clone());
        r.write(0, &[0x0a]);
        assert_eq!(inb(&mut r), 0x0a);
        let ctl2 = Arc::new(StopRecorder::default());
        let mut fresh = ResetControl::new(ctl2.clone());
        let (saved, again) = round_trip(&mut r, &mut fresh).unwrap();
        assert_eq!(saved, again);
        assert_eq!(inb(&mut fresh), 0x0a);
        assert_eq!(inb(&mut fresh), inb(&mut r));
        // The restored register still resets the VM it belongs to.
        fresh.resume();
        fresh.write(0, &[0x06]);
        assert_eq!(ctl2.suspend_reason(), Some(SuspendReason::Reset));
        assert!(!ctl.is_suspended());
        assert_eq!(inb(&mut fresh), 0x02);
        // A state with the reset bit is refused.
        let mut bad = saved;
        bad.data = serde_json::json!({ "value": 0x04 });
        fresh.pause();
        assert!(matches!(
            fresh.restore(&bad),
            Err(StateError::Malformed { .. })
        ));
    }

    #[test]
    fn reset_control_save_while_running_is_refused() {
        let mut r = ResetControl::new(Arc::new(StopRecorder::default()));
        assert_eq!(r.save(), Err(StateError::NotPaused("reset-control".into())));
    }
}
