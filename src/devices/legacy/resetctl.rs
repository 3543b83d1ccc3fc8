//! The reset control register at port 0xCF9 (bhyve `pm.c` `reset_handler`): a write with the
//! reset bit (0x04) set resets the system, which ends rhyve with status 0 as in bhyve.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::devices::{SuspendReason, VmStop};

const RST_CPU: u8 = 0x04;

pub struct ResetControl {
    value: u8,
    ctl: Arc<dyn VmStop>,
}

impl ResetControl {
    pub fn new(ctl: Arc<dyn VmStop>) -> Self {
        ResetControl { value: 0, ctl }
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
