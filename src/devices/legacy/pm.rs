//! ACPI fixed-hardware power management (ACPI 6.5 §4.8; bhyve `pm.c`): the PM1a event block
//! (status and enable) at 0x400, the PM1a control block at 0x404, the 32-bit PM timer at 0x408
//! (3.579545 MHz), and SMI_CMD at 0xB2 with bhyve's ACPI enable/disable values. The SCI is
//! ISA IRQ 9, level-triggered; the power button (SIGTERM) sets PWRBTN_STS and raises it.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_ioctls::VmFd;

use crate::bus::BusDevice;
use crate::devices::{SuspendReason, VmStop};

pub const PM1A_EVT: u64 = 0x400;
pub const PM1A_CNT: u64 = 0x404;
pub const PM_TMR: u64 = 0x408;
pub const SMI_CMD: u64 = 0xb2;
pub const ACPI_ENABLE: u8 = 0xa0;
pub const ACPI_DISABLE: u8 = 0xa1;
pub const SCI_IRQ: u32 = 9;
/// The SLP_TYP value the DSDT's `_S5` names.
pub const SLP_TYP_S5: u16 = 5;
const PM_TIMER_HZ: u128 = 3_579_545;

const STS_TMR: u16 = 1 << 0;
const STS_PWRBTN: u16 = 1 << 8;
const STS_WAK: u16 = 1 << 15;
const CNT_SCI_EN: u16 = 1 << 0;
const CNT_SLP_EN: u16 = 1 << 13;

pub struct PmState {
    status: u16,
    enable: u16,
    control: u16,
    start: Instant,
    vm: Arc<VmFd>,
    ctl: Arc<dyn VmStop>,
    sci_level: bool,
}

impl PmState {
    fn update_sci(&mut self) {
        let level = self.control & CNT_SCI_EN != 0 && self.status & self.enable != 0;
        if level != self.sci_level {
            self.sci_level = level;
            if let Err(e) = self.vm.set_irq_line(SCI_IRQ, level) {
                log::warn!("SCI: {e}");
            }
        }
    }

    fn timer(&self) -> u32 {
        (self.start.elapsed().as_nanos() * PM_TIMER_HZ / 1_000_000_000) as u32
    }
}

/// A register block for the port bus: name, base port, length, device.
pub type PortBlock = (&'static str, u64, u64, Arc<Mutex<dyn BusDevice>>);

/// Shared by the three register blocks and by the power button.
#[derive(Clone)]
pub struct Pm(Arc<Mutex<PmState>>);

impl Pm {
    pub fn new(vm: Arc<VmFd>, ctl: Arc<dyn VmStop>) -> Self {
        Pm(Arc::new(Mutex::new(PmState {
            status: 0,
            enable: 0,
            control: 0,
            start: Instant::now(),
            vm,
            ctl,
            sci_level: false,
        })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PmState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Presses the power button. Returns false when nothing can receive it: the guest has not
    /// enabled ACPI (SCI_EN clear) or not enabled the button event.
    pub fn power_button(&self) -> bool {
        let mut s = self.state();
        s.status |= STS_PWRBTN;
        s.update_sci();
        s.control & CNT_SCI_EN != 0 && s.enable & STS_PWRBTN != 0
    }

    pub fn acpi_enabled(&self) -> bool {
        self.state().control & CNT_SCI_EN != 0
    }

    /// The bus devices.
    pub fn devices(&self) -> Vec<PortBlock> {
        vec![
            (
                "pm1a event",
                PM1A_EVT,
                4,
                Arc::new(Mutex::new(Pm1Event(self.clone()))),
            ),
            (
                "pm1a control",
                PM1A_CNT,
                2,
                Arc::new(Mutex::new(Pm1Control(self.clone()))),
            ),
            (
                "pm timer",
                PM_TMR,
                4,
                Arc::new(Mutex::new(PmTimer(self.clone()))),
            ),
            (
                "smi command",
                SMI_CMD,
                1,
                Arc::new(Mutex::new(SmiCmd(self.clone()))),
            ),
        ]
    }
}

fn put(data: &mut [u8], v: u32) {
    for (i, d) in data.iter_mut().enumerate() {
        *d = (v >> (8 * i)) as u8;
    }
}

fn get(data: &[u8]) -> u32 {
    data.iter()
        .enumerate()
        .fold(0, |v, (i, b)| v | (u32::from(*b) << (8 * i)))
}

/// PM1a_STS (offset 0, write 1 to clear) and PM1a_EN (offset 2).
struct Pm1Event(Pm);

impl BusDevice for Pm1Event {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let s = self.0.state();
        let v = u32::from(s.status) | (u32::from(s.enable) << 16);
        put(data, v >> (8 * offset.min(3)));
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut s = self.0.state();
        // Widen the access to the 32-bit block, then split it into its two registers.
        let v = get(data) << (8 * offset.min(3));
        let mask = (((1u64 << (8 * data.len().min(4))) - 1) as u32) << (8 * offset.min(3));
        if mask & 0xffff != 0 {
            s.status &= !((v & mask & 0xffff) as u16 & (STS_TMR | STS_PWRBTN | STS_WAK));
        }
        if mask & 0xffff_0000 != 0 {
            let en_mask = (mask >> 16) as u16;
            s.enable = (s.enable & !en_mask) | ((v >> 16) as u16 & en_mask);
        }
        s.update_sci();
    }
}

/// PM1a_CNT: SCI_EN, and SLP_TYP/SLP_EN (S5 powers off).
struct Pm1Control(Pm);

impl BusDevice for Pm1Control {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let s = self.0.state();
        put(data, u32::from(s.control) >> (8 * offset.min(1)));
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut s = self.0.state();
        let v = (get(data) << (8 * offset.min(1))) as u16;
        let mask =
            ((((1u32 << (8 * data.len().min(2))) - 1) << (8 * offset.min(1))) & 0xffff) as u16;
        // SLP_EN is write-only; SCI_EN is kept as the guest leaves it.
        s.control = (s.control & !mask) | (v & mask & !CNT_SLP_EN);
        if v & mask & CNT_SLP_EN != 0 {
            let typ = (v >> 10) & 7;
            if typ == SLP_TYP_S5 {
                log::info!("guest powered off (S5 through PM1a_CNT)");
                s.ctl.stop(SuspendReason::PowerOff);
            } else {
                log::info!(
                    "guest asked for sleep state SLP_TYP {typ}, which rhyve does not support"
                );
            }
        }
        s.update_sci();
    }
}

struct PmTimer(Pm);

impl BusDevice for PmTimer {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        put(data, self.0.state().timer() >> (8 * offset.min(3)));
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// SMI_CMD: the OS writes ACPI_ENABLE to take over the fixed hardware (SCI_EN set).
struct SmiCmd(Pm);

impl BusDevice for SmiCmd {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        let mut s = self.0.state();
        match data.first() {
            Some(&ACPI_ENABLE) => s.control |= CNT_SCI_EN,
            Some(&ACPI_DISABLE) => s.control &= !CNT_SCI_EN,
            _ => {}
        }
        s.update_sci();
    }
}
