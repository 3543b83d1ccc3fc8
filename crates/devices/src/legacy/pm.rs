//! ACPI fixed-hardware power management (ACPI 6.5 §4.8; bhyve `pm.c`): the PM1a event block
//! (status and enable) at 0x400, the PM1a control block at 0x404, the 32-bit PM timer at 0x408
//! (3.579545 MHz), and SMI_CMD at 0xB2 with bhyve's ACPI enable/disable values. The SCI is
//! ISA IRQ 9, level-triggered; the power button (SIGTERM) sets PWRBTN_STS and raises it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use crate::{SuspendReason, VmStop};
use rhyve_base::lifecycle::{DeviceState, Lifecycle, Paused, StateError};
use rhyve_bus::BusDevice;

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

const KIND: &str = "acpi-pm";
const VERSION: u32 = 1;

/// Drives the SCI's level: KVM_IRQ_LINE on ISA IRQ 9 (a recorder in the tests).
type SciLine = Box<dyn Fn(bool) -> std::io::Result<()> + Send>;

pub struct PmState {
    status: u16,
    enable: u16,
    control: u16,
    /// The PM timer has counted `base` plus the time since `start` while running; while
    /// paused it stands at `base` (the guest sees no time pass across a pause or a restore).
    start: Instant,
    base: Duration,
    sci: SciLine,
    ctl: Arc<dyn VmStop>,
    /// The level last driven onto the SCI line.
    sci_level: bool,
    paused: Paused,
}

/// What PM1a holds. The SCI level is not kept apart: it is SCI_EN and (status & enable),
/// saved for the reader's sake and checked against the registers on restore; resume drives it.
#[derive(Debug, Serialize, Deserialize)]
struct PmSaved {
    status: u16,
    enable: u16,
    control: u16,
    sci: bool,
    /// Nanoseconds the PM timer has counted (it reads this times 3.579545 MHz, mod 2^32).
    timer_ns: u64,
}

impl PmState {
    /// The SCI level the registers ask for.
    fn sci_wanted(&self) -> bool {
        self.control & CNT_SCI_EN != 0 && self.status & self.enable != 0
    }

    /// Drives the SCI to the registers' level. While paused the line is left as it is (no new
    /// interrupt); resume brings it up to date.
    fn update_sci(&mut self) {
        if self.paused.get() {
            return;
        }
        let level = self.sci_wanted();
        if level != self.sci_level {
            self.sci_level = level;
            if let Err(e) = (self.sci)(level) {
                log::warn!("SCI: {e}");
            }
        }
    }

    /// How long the PM timer has counted.
    fn counted(&self) -> Duration {
        if self.paused.get() {
            self.base
        } else {
            self.base.saturating_add(self.start.elapsed())
        }
    }

    fn timer(&self) -> u32 {
        // The counter is 32 bits wide and wraps, as ACPI's TMR_VAL_EXT describes. The product
        // cannot saturate: a `Duration` holds under 2^94 ns and the rate is under 2^22 Hz.
        (self.counted().as_nanos().saturating_mul(PM_TIMER_HZ) / 1_000_000_000) as u32
    }
}

impl Lifecycle for PmState {
    fn pause(&mut self) {
        if !self.paused.get() {
            self.base = self.counted();
            self.paused.set(true);
        }
    }

    fn resume(&mut self) {
        if self.paused.get() {
            self.start = Instant::now();
            self.paused.set(false);
        }
        self.update_sci();
    }

    fn reset(&mut self) {
        self.status = 0;
        self.enable = 0;
        self.control = 0;
        self.base = Duration::ZERO;
        self.start = Instant::now();
        self.update_sci();
    }

    fn save(&mut self) -> Result<DeviceState, StateError> {
        self.paused.check(KIND)?;
        let saved = PmSaved {
            status: self.status,
            enable: self.enable,
            control: self.control,
            sci: self.sci_wanted(),
            timer_ns: u64::try_from(self.base.as_nanos()).unwrap_or(u64::MAX),
        };
        DeviceState::new(KIND, VERSION, &saved)
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), StateError> {
        self.paused.check(KIND)?;
        let s: PmSaved = state.parse(KIND, VERSION)?;
        let malformed = |why: String| StateError::Malformed {
            kind: KIND.into(),
            why,
        };
        if s.status & !(STS_TMR | STS_PWRBTN | STS_WAK) != 0 {
            return Err(malformed(format!(
                "PM1a_STS {:#06x} has bits this device never sets",
                s.status
            )));
        }
        if s.control & CNT_SLP_EN != 0 {
            return Err(malformed("PM1a_CNT has the write-only SLP_EN set".into()));
        }
        let sci = s.control & CNT_SCI_EN != 0 && s.status & s.enable != 0;
        DeviceState::expect_same(KIND, "SCI level", s.sci, sci)?;
        self.status = s.status;
        self.enable = s.enable;
        self.control = s.control;
        self.base = Duration::from_nanos(s.timer_ns);
        Ok(())
    }
}

/// A register block for the port bus: name, base port, length, device.
pub type PortBlock = (&'static str, u64, u64, Arc<Mutex<dyn BusDevice>>);

/// Shared by the three register blocks and by the power button.
#[derive(Clone)]
pub struct Pm(Arc<Mutex<PmState>>);

impl Pm {
    pub fn new(vm: Arc<VmFd>, ctl: Arc<dyn VmStop>) -> Self {
        let sci: SciLine = Box::new(move |level| {
            vm.set_irq_line(SCI_IRQ, level)
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
        });
        Self::with_sci(sci, ctl)
    }

    fn with_sci(sci: SciLine, ctl: Arc<dyn VmStop>) -> Self {
        Pm(Arc::new(Mutex::new(PmState {
            status: 0,
            enable: 0,
            control: 0,
            start: Instant::now(),
            base: Duration::ZERO,
            sci,
            ctl,
            sci_level: false,
            paused: Paused::default(),
        })))
    }

    /// The state all four register blocks share, for pausing, saving and restoring it.
    pub fn lifecycle(&self) -> Arc<Mutex<dyn Lifecycle>> {
        self.0.clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PmState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Presses the power button. Returns false when nothing can receive it: the guest has not
    /// enabled ACPI (SCI_EN clear) or not enabled the button event. While the VM is paused the
    /// press is latched in PM1a_STS and its SCI raised on resume.
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

/// The first byte an access at `offset` touches in a register block of `n` bytes. The bus only
/// hands over offsets inside the block; a larger one is taken as the block's last byte.
fn first_byte(offset: u64, n: usize) -> usize {
    usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(n.saturating_sub(1))
}

/// A read at `offset` of the little-endian register block `block`: its bytes from there, and
/// zero past its end.
fn fetch<const N: usize>(block: [u8; N], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let from = block.iter().skip(first_byte(offset, N));
    for (d, &b) in data.iter_mut().zip(from) {
        *d = b;
    }
}

/// A write at `offset` of a register block of `N` bytes, widened to the whole block: the bytes
/// written, and a mask of the ones the access covers. Bytes past the block's end are dropped.
fn place<const N: usize>(offset: u64, data: &[u8]) -> ([u8; N], [u8; N]) {
    let mut val = [0u8; N];
    let mut mask = [0u8; N];
    let lanes = val
        .iter_mut()
        .zip(mask.iter_mut())
        .skip(first_byte(offset, N));
    for ((v, m), &b) in lanes.zip(data) {
        *v = b;
        *m = 0xff;
    }
    (val, mask)
}

/// PM1a_STS (offset 0, write 1 to clear) and PM1a_EN (offset 2).
struct Pm1Event(Pm);

impl BusDevice for Pm1Event {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let s = self.0.state();
        let v = u32::from(s.status) | (u32::from(s.enable) << 16);
        fetch(v.to_le_bytes(), offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut s = self.0.state();
        // Widen the access to the 32-bit block, then split it into its two registers.
        let (v, mask) = place::<4>(offset, data);
        let (v, mask) = (u32::from_le_bytes(v), u32::from_le_bytes(mask));
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
        fetch(s.control.to_le_bytes(), offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut s = self.0.state();
        let (v, mask) = place::<2>(offset, data);
        let (v, mask) = (u16::from_le_bytes(v), u16::from_le_bytes(mask));
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
        fetch(self.0.state().timer().to_le_bytes(), offset, data);
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

#[cfg(test)]
mod tests {
    #![allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
    use super::*;
    use crate::StopRecorder;
    use rhyve_base::lifecycle::round_trip;

    /// The little-endian value of an access's bytes (at most four).
    fn get(data: &[u8]) -> u32 {
        let mut b = [0u8; 4];
        for (d, s) in b.iter_mut().zip(data) {
            *d = *s;
        }
        u32::from_le_bytes(b)
    }

    /// A PM block whose SCI levels are recorded, and its four register blocks by base port.
    struct Bench {
        pm: Pm,
        levels: Arc<Mutex<Vec<bool>>>,
        ctl: Arc<StopRecorder>,
        blocks: Vec<(u64, Arc<Mutex<dyn BusDevice>>)>,
    }

    fn bench() -> Bench {
        let levels = Arc::new(Mutex::new(Vec::new()));
        let rec = levels.clone();
        let sci: SciLine = Box::new(move |l| {
            rec.lock().unwrap().push(l);
            Ok(())
        });
        let ctl = Arc::new(StopRecorder::default());
        let pm = Pm::with_sci(sci, ctl.clone());
        let blocks = pm
            .devices()
            .into_iter()
            .map(|(_, base, _, dev)| (base, dev))
            .collect();
        Bench {
            pm,
            levels,
            ctl,
            blocks,
        }
    }

    impl Bench {
        fn block(&self, port: u64) -> Arc<Mutex<dyn BusDevice>> {
            self.blocks
                .iter()
                .find(|(b, _)| *b == port)
                .map(|(_, d)| d.clone())
                .unwrap()
        }
        fn rd(&self, port: u64, off: u64, len: usize) -> u32 {
            let mut d = vec![0xa5u8; len];
            self.block(port).lock().unwrap().read(off, &mut d);
            get(&d)
        }
        fn wr(&self, port: u64, off: u64, len: usize, v: u32) {
            let d: Vec<u8> = (0..len).map(|i| (v >> (8 * i)) as u8).collect();
            self.block(port).lock().unwrap().write(off, &d);
        }
        fn levels(&self) -> Vec<bool> {
            std::mem::take(&mut *self.levels.lock().unwrap())
        }
        fn lc(&self) -> std::sync::MutexGuard<'_, PmState> {
            self.pm.state()
        }
        /// What the guest reads from every register (the timer included).
        fn registers(&self) -> Vec<u32> {
            vec![
                self.rd(PM1A_EVT, 0, 4),
                self.rd(PM1A_EVT, 2, 2),
                self.rd(PM1A_CNT, 0, 2),
                self.rd(PM_TMR, 0, 4),
                self.rd(SMI_CMD, 0, 1),
            ]
        }
    }

    #[test]
    fn pm_round_trip_keeps_registers_timer_and_sci() {
        let a = bench();
        // The OS takes ACPI over, enables the power button event, and picks a sleep type.
        a.wr(SMI_CMD, 0, 1, u32::from(ACPI_ENABLE));
        a.wr(PM1A_EVT, 2, 2, u32::from(STS_PWRBTN));
        a.wr(PM1A_CNT, 0, 2, u32::from(CNT_SCI_EN | (3 << 10)));
        assert!(a.pm.power_button());
        assert_eq!(a.levels(), [true]);
        std::thread::sleep(Duration::from_millis(5));
        let b = bench();
        let (saved, again) = round_trip(&mut *a.lc(), &mut *b.lc()).unwrap();
        assert_eq!(saved, again);
        assert_eq!(saved.kind, "acpi-pm");
        // Both paused: the timers stand at the same count, which is not zero.
        let regs = a.registers();
        assert_eq!(b.registers(), regs);
        assert_ne!(regs[3], 0, "the PM timer had counted");
        assert_eq!(
            regs[..3],
            [
                u32::from(STS_PWRBTN) | (u32::from(STS_PWRBTN) << 16),
                u32::from(STS_PWRBTN),
                u32::from(CNT_SCI_EN | (3 << 10)),
            ]
        );
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            b.rd(PM_TMR, 0, 4),
            regs[3],
            "a paused PM timer stands still"
        );
        // The restored SCI is raised once the device runs again, not before.
        assert_eq!(b.levels(), [false; 0]);
        b.lc().resume();
        a.lc().resume();
        assert_eq!(b.levels(), [true]);
        assert_eq!(a.levels(), [false; 0], "the original's line was already up");
        assert!(b.rd(PM_TMR, 0, 4) >= regs[3]);
        // Both acknowledge the button the same way, and the SCI drops.
        for x in [&a, &b] {
            x.wr(PM1A_EVT, 0, 2, u32::from(STS_PWRBTN));
            assert_eq!(x.rd(PM1A_EVT, 0, 2), 0);
            assert_eq!(x.levels(), [false]);
        }
        // The restored control block still powers off its own VM.
        b.wr(PM1A_CNT, 0, 2, u32::from(CNT_SLP_EN | (SLP_TYP_S5 << 10)));
        assert_eq!(b.ctl.suspend_reason(), Some(SuspendReason::PowerOff));
        assert!(!a.ctl.is_suspended());
    }

    #[test]
    fn pm_power_button_while_paused_waits_for_resume() {
        let a = bench();
        a.wr(SMI_CMD, 0, 1, u32::from(ACPI_ENABLE));
        a.wr(PM1A_EVT, 2, 2, u32::from(STS_PWRBTN));
        a.lc().pause();
        assert!(a.pm.power_button());
        assert_eq!(a.levels(), [false; 0], "no SCI while paused");
        a.lc().resume();
        assert_eq!(a.levels(), [true]);
    }

    #[test]
    fn pm_save_while_running_is_refused() {
        let a = bench();
        assert_eq!(a.lc().save(), Err(StateError::NotPaused("acpi-pm".into())));
        a.lc().pause();
        let mut s = a.lc().save().unwrap();
        a.lc().resume();
        assert_eq!(
            a.lc().restore(&s),
            Err(StateError::NotPaused("acpi-pm".into()))
        );
        // A state whose SCI does not follow from its registers is refused.
        a.lc().pause();
        s.data["sci"] = serde_json::json!(true);
        assert!(matches!(
            a.lc().restore(&s),
            Err(StateError::Malformed { .. })
        ));
    }

    /// An access wider than the register block reads zero above it and drops the bytes past
    /// it; the byte shifts once overflowed (a panic, or a wrap onto byte 0 in a release build).
    #[test]
    fn pm_wide_access_stays_in_its_block() {
        let a = bench();
        a.wr(PM1A_EVT, 2, 2, u32::from(STS_PWRBTN));
        for port in [PM1A_EVT, PM1A_CNT, PM_TMR] {
            let mut d = [0xa5u8; 8];
            a.block(port).lock().unwrap().read(0, &mut d);
            assert_eq!(d[4..], [0; 4], "port {port:#x}");
        }
        let mut d = [0xa5u8; 8];
        a.block(PM1A_EVT).lock().unwrap().read(0, &mut d);
        assert_eq!(d[..4], [0, 0, 0, 1]);
        // Bytes 4-7 of the write have no register: the enable register keeps its value.
        a.block(PM1A_EVT)
            .lock()
            .unwrap()
            .write(2, &[0, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(a.rd(PM1A_EVT, 2, 2), u32::from(STS_PWRBTN));
        a.block(PM1A_CNT)
            .lock()
            .unwrap()
            .write(0, &[1, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(a.rd(PM1A_CNT, 0, 2), u32::from(CNT_SCI_EN));
        assert!(!a.ctl.is_suspended());
    }
}
