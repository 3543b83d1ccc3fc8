//! The i8042 keyboard controller at ports 0x60/0x64 (bhyve `atkbdc.c`), as far as guests use it
//! without a keyboard: the 0xFE "pulse reset line" command, which ends rhyve with status 0.
//! vm-superio's model answers reads with an idle, empty controller.

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use crate::bus::BusDevice;
use crate::vmm::control::{SuspendReason, VmControl};

/// Turns the controller's reset line into a VM reset request.
pub struct ResetLine(Arc<VmControl>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        log::info!("guest reset through the i8042 (port 0x64)");
        self.0.suspend(SuspendReason::Reset);
        Ok(())
    }
}

pub struct I8042(I8042Device<ResetLine>);

impl I8042 {
    /// Base port of the range the device is inserted at; 0x64 is offset 4.
    pub const BASE: u64 = 0x60;
    pub const LEN: u64 = 5;

    pub fn new(ctl: Arc<VmControl>) -> Self {
        I8042(I8042Device::new(ResetLine(ctl)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.0.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            let _ = self.0.write(offset as u8, b);
        }
    }
}
