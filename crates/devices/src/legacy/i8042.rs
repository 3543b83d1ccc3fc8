//! The i8042 keyboard controller at ports 0x60/0x64 with a PS/2 keyboard and an empty aux port,
//! after bhyve's `atkbdc.c` and `ps2kbd.c` and the IBM PC/AT 8042 (status, CTR, commands).
//!
//! Enough of the controller for Linux's and FreeBSD's probes: the status register, the
//! configuration byte (CTR) and the rest of the 32-byte RAM, the self-tests, enabling and
//! disabling the ports, the output port, the loopback commands 0xD2/0xD3, and the reset pulse
//! (command 0xFE, or any 0xF0-0xFF pulse with bit 0 clear), which ends rhyve with status 0 as
//! in bhyve. The keyboard answers its commands (ACK, BAT, ID 0xAB 0x83) but has no keys, so
//! it never sends on its own; nothing is plugged into the aux port, so a byte sent to it (0xD4)
//! comes back as 0xFE with the timeout bit, as a real controller reports an absent mouse, and
//! Linux's psmouse probe gives up at once. A byte that lands in the output buffer pulses ISA
//! IRQ 1 (keyboard, controller) or IRQ 12 (aux) when the CTR enables that interrupt.
//!
//! As in bhyve, the keyboard answers bytes written to it even while the CTR disables its port;
//! nothing else ever comes from either device, so the two disable bits only have to read back.
//!
//! The controller only ever answers the guest's own accesses, so a paused one has no work to
//! stop; it raises no interrupt while paused all the same, and a restored one raises the
//! interrupt of a byte left waiting at port 0x60 when it resumes.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::Trigger;

use crate::{SuspendReason, VmStop};
use rhyve_base::lifecycle::{DeviceState, Lifecycle, Paused, StateError};
use rhyve_bus::BusDevice;

const KIND: &str = "i8042";
const VERSION: u32 = 1;

/// An interrupt line the controller pulses: `IrqLine` for ISA IRQ 1 and IRQ 12.
pub type Line = Box<dyn Trigger<E = std::io::Error> + Send>;

// Port offsets from `I8042::BASE`.
const DATA: u64 = 0;
const STATUS: u64 = 4;

// Status register (port 0x64 read). Input buffer full (0x02) is never set: writes are taken
// at once.
const STS_OBF: u8 = 0x01; // a byte waits at port 0x60
const STS_SYS: u8 = 0x04; // the CTR's system flag
const STS_CMD: u8 = 0x08; // the last write went to port 0x64
const STS_UNLOCKED: u8 = 0x10; // no key lock: Linux warns "Keylock active" without it
const STS_AUX: u8 = 0x20; // the waiting byte is from the aux port
const STS_TIMEOUT: u8 = 0x40; // the device did not answer

// Controller configuration byte (RAM byte 0).
const CTR_KBDINT: u8 = 0x01;
const CTR_AUXINT: u8 = 0x02;
const CTR_SYS: u8 = 0x04;
const CTR_KBDDIS: u8 = 0x10;
const CTR_AUXDIS: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;
/// What a PC BIOS leaves: translation, system flag, keyboard interrupt, aux port off.
const CTR_INIT: u8 = CTR_XLATE | CTR_AUXDIS | CTR_SYS | CTR_KBDINT;

// Output port (0xD0/0xD1). Bit 0 is the CPU reset line, active low; A20 is always on here.
const OUT_RESET: u8 = 0x01;
const OUT_A20: u8 = 0x02;
const OUT_KBD_FULL: u8 = 0x10;
const OUT_AUX_FULL: u8 = 0x20;

// Keyboard replies.
const ACK: u8 = 0xfa;
const RESEND: u8 = 0xfe;
const BAT_OK: u8 = 0xaa;

/// Bytes the output buffer holds; the first is at port 0x60, the rest queue behind it (the
/// devices' own buffers in hardware). More are dropped: only a guest that never reads gets here.
const QUEUE_LEN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Byte {
    val: u8,
    aux: bool,
    timeout: bool,
}

impl Byte {
    fn from_kbd(val: u8) -> Self {
        Byte {
            val,
            aux: false,
            timeout: false,
        }
    }
    fn from_aux(val: u8) -> Self {
        Byte {
            val,
            aux: true,
            timeout: false,
        }
    }
}

pub struct I8042 {
    /// Controller RAM; byte 0 is the CTR.
    ram: [u8; 32],
    out_port: u8,
    out: VecDeque<Byte>,
    /// What port 0x60 reads once the buffer is empty: the last byte read, as in hardware.
    stale: u8,
    /// The last write was a command (status bit 3).
    cmd_written: bool,
    /// A controller command waiting for its data byte at port 0x60.
    param_for: Option<u8>,
    /// A keyboard command waiting for its parameter (0xED LEDs, 0xF0 scan set, 0xF3 rate).
    kbd_param_for: Option<u8>,
    kbd_set: u8,
    /// The keyboard's last byte, for its resend command.
    kbd_last: u8,
    kbd_irq: Line,
    aux_irq: Line,
    ctl: Arc<dyn VmStop>,
    paused: Paused,
    /// Restored with a byte waiting: its interrupt is raised again on resume.
    repulse: bool,
}

/// The controller's and the keyboard's state: the controller RAM (CTR first), the output port,
/// the bytes queued for port 0x60 (first is the one waiting), what 0x60 reads when empty, the
/// status register's command bit, a command waiting for its data byte, and the keyboard's
/// scan set, pending parameter command and last byte (for resend).
#[derive(Debug, Serialize, Deserialize)]
struct I8042State {
    ram: [u8; 32],
    out_port: u8,
    queued: Vec<Byte>,
    stale: u8,
    cmd_written: bool,
    param_for: Option<u8>,
    kbd_param_for: Option<u8>,
    kbd_set: u8,
    kbd_last: u8,
}

impl I8042 {
    /// Base port of the range the device is inserted at; 0x64 is offset 4.
    pub const BASE: u64 = 0x60;
    pub const LEN: u64 = 5;

    pub fn new(ctl: Arc<dyn VmStop>, kbd_irq: Line, aux_irq: Line) -> Self {
        let mut dev = I8042 {
            ram: [0; 32],
            out_port: 0,
            out: VecDeque::with_capacity(QUEUE_LEN),
            stale: 0,
            cmd_written: false,
            param_for: None,
            kbd_param_for: None,
            kbd_set: 2,
            kbd_last: 0,
            kbd_irq,
            aux_irq,
            ctl,
            paused: Paused::default(),
            repulse: false,
        };
        dev.power_on();
        dev
    }

    /// The state a PC leaves the controller in at power-on.
    fn power_on(&mut self) {
        self.ram = [0; 32];
        self.ram[0] = CTR_INIT;
        self.out_port = OUT_RESET | OUT_A20;
        self.out.clear();
        self.stale = 0;
        self.cmd_written = false;
        self.param_for = None;
        self.kbd_param_for = None;
        self.kbd_set = 2;
        self.kbd_last = 0;
        self.repulse = false;
    }

    fn ctr(&self) -> u8 {
        self.ram[0]
    }

    fn status(&self) -> u8 {
        let mut s = STS_UNLOCKED;
        if self.ctr() & CTR_SYS != 0 {
            s |= STS_SYS;
        }
        if self.cmd_written {
            s |= STS_CMD;
        }
        if let Some(b) = self.out.front() {
            s |= STS_OBF;
            if b.aux {
                s |= STS_AUX;
            }
            if b.timeout {
                s |= STS_TIMEOUT;
            }
        }
        s
    }

    /// Pulses the interrupt of the byte now at port 0x60, if the CTR enables it (and the
    /// device runs).
    fn raise(&self) {
        if self.paused.get() {
            return;
        }
        let Some(b) = self.out.front() else { return };
        let (line, enable, irq) = if b.aux {
            (&self.aux_irq, CTR_AUXINT, 12)
        } else {
            (&self.kbd_irq, CTR_KBDINT, 1)
        };
        if self.ctr() & enable != 0 {
            if let Err(e) = line.trigger() {
                log::warn!("i8042 IRQ {irq}: {e}");
            }
        }
    }

    /// Queues a byte from a device (or the loopback commands) behind any already waiting.
    fn push(&mut self, b: Byte) {
        if self.out.len() >= QUEUE_LEN {
            log::debug!("i8042: output buffer overrun, {:#04x} dropped", b.val);
            return;
        }
        self.out.push_back(b);
        if self.out.len() == 1 {
            self.raise();
        }
    }

    /// A controller command's result goes first, ahead of device bytes (bhyve does the same).
    fn result(&mut self, val: u8) {
        if self.out.len() >= QUEUE_LEN {
            self.out.pop_back();
        }
        self.out.push_front(Byte::from_kbd(val));
        self.raise();
    }

    fn read_data(&mut self) -> u8 {
        if let Some(b) = self.out.pop_front() {
            self.stale = b.val;
            self.raise();
        }
        self.stale
    }

    fn set_ctr(&mut self, v: u8) {
        let newly = v & !self.ctr();
        self.ram[0] = v;
        let waiting = match self.out.front() {
            Some(b) if b.aux => CTR_AUXINT,
            Some(_) => CTR_KBDINT,
            None => 0,
        };
        // The interrupt line follows the buffer: enabling it with a byte waiting raises it.
        if newly & waiting != 0 {
            self.raise();
        }
    }

    fn command(&mut self, cmd: u8) {
        self.cmd_written = true;
        self.param_for = None;
        match cmd {
            // RAM byte reads and writes: the command's low 5 bits index the 32 bytes, so the
            // byte is always there.
            0x20..=0x3f => {
                let v = self.ram.get(usize::from(cmd & 0x1f)).copied();
                self.result(v.unwrap_or(0xff));
            }
            c if takes_param(c) => self.param_for = Some(c),
            0xa7 => self.ram[0] |= CTR_AUXDIS,
            0xa8 => self.ram[0] &= !CTR_AUXDIS,
            // Interface tests: 0 is "no error"; the aux interface exists even with no mouse.
            0xa9 | 0xab => self.result(0x00),
            0xaa => self.result(0x55),
            0xad => self.ram[0] |= CTR_KBDDIS,
            0xae => self.ram[0] &= !CTR_KBDDIS,
            0xc0 => self.result(0x80), // input port: keyboard not inhibited
            0xd0 => {
                let mut v = self.out_port & !(OUT_KBD_FULL | OUT_AUX_FULL);
                if let Some(b) = self.out.front() {
                    v |= if b.aux { OUT_AUX_FULL } else { OUT_KBD_FULL };
                }
                self.result(v);
            }
            // Pulse output port bits 0-3 where the command's are clear; bit 0 is reset.
            0xf0..=0xff => {
                if cmd & OUT_RESET == 0 {
                    log::info!("guest reset through the i8042 (port 0x64)");
                    self.ctl.stop(SuspendReason::Reset);
                }
            }
            _ => log::debug!("i8042: command {cmd:#04x} ignored"),
        }
    }

    fn write_data(&mut self, v: u8) {
        self.cmd_written = false;
        match self.param_for.take() {
            Some(0x60) => self.set_ctr(v),
            Some(c @ 0x61..=0x7f) => {
                if let Some(r) = self.ram.get_mut(usize::from(c & 0x1f)) {
                    *r = v;
                }
            }
            // Bit 0 low would hold the CPU in reset; as in bhyve only the pulses reset.
            Some(0xd1) => self.out_port = v,
            Some(0xd2) => self.push(Byte::from_kbd(v)),
            Some(0xd3) => self.push(Byte::from_aux(v)),
            // Nothing on the aux port: the controller times out and reports 0xFE.
            Some(0xd4) => self.push(Byte {
                val: RESEND,
                aux: true,
                timeout: true,
            }),
            Some(_) => {} // `command` sets no other
            None => self.keyboard(v),
        }
    }

    /// A byte from the keyboard; translated to set 1 when the CTR says so. Only the bytes this
    /// keyboard sends need the table: its ID's 0x83 and the set numbers (ACK, BAT pass as is).
    fn kbd_send(&mut self, v: u8) {
        self.kbd_last = v;
        let v = match v {
            0x01 if self.ctr() & CTR_XLATE != 0 => 0x43,
            0x02 | 0x83 if self.ctr() & CTR_XLATE != 0 => 0x41,
            0x03 if self.ctr() & CTR_XLATE != 0 => 0x3f,
            v => v,
        };
        self.push(Byte::from_kbd(v));
    }

    /// A byte for the keyboard (ps2kbd.c's command set).
    fn keyboard(&mut self, v: u8) {
        if let Some(cmd) = self.kbd_param_for.take() {
            match (cmd, v) {
                (0xf0, 0) => {
                    self.kbd_send(ACK);
                    self.kbd_send(self.kbd_set);
                }
                (0xf0, 1..=3) => {
                    self.kbd_set = v;
                    self.kbd_send(ACK);
                }
                (0xf0, _) => self.kbd_send(RESEND),
                _ => self.kbd_send(ACK), // LED state, typematic rate: nothing to show
            }
            return;
        }
        match v {
            0xed | 0xf0 | 0xf3 => {
                self.kbd_param_for = Some(v);
                self.kbd_send(ACK);
            }
            0xee => self.kbd_send(0xee), // echo
            0xf2 => {
                self.kbd_send(ACK);
                self.kbd_send(0xab);
                self.kbd_send(0x83);
            }
            // Enable, disable, defaults, and the set 3 key-type commands.
            0xf4..=0xfd => self.kbd_send(ACK),
            0xfe => self.kbd_send(self.kbd_last),
            0xff => {
                self.kbd_set = 2;
                self.kbd_send(ACK);
                self.kbd_send(BAT_OK);
            }
            _ => self.kbd_send(RESEND),
        }
    }
}

/// A controller command that takes a data byte at port 0x60 (`command` sets no other).
fn takes_param(cmd: u8) -> bool {
    matches!(cmd, 0x60..=0x7f | 0xd1..=0xd4)
}

impl Lifecycle for I8042 {
    fn pause(&mut self) {
        self.paused.set(true);
    }

    fn resume(&mut self) {
        self.paused.set(false);
        if std::mem::take(&mut self.repulse) {
            self.raise();
        }
    }

    fn reset(&mut self) {
        self.power_on();
    }

    fn save(&mut self) -> Result<DeviceState, StateError> {
        self.paused.check(KIND)?;
        let st = I8042State {
            ram: self.ram,
            out_port: self.out_port,
            queued: self.out.iter().copied().collect(),
            stale: self.stale,
            cmd_written: self.cmd_written,
            param_for: self.param_for,
            kbd_param_for: self.kbd_param_for,
            kbd_set: self.kbd_set,
            kbd_last: self.kbd_last,
        };
        DeviceState::new(KIND, VERSION, &st)
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), StateError> {
        self.paused.check(KIND)?;
        let st: I8042State = state.parse(KIND, VERSION)?;
        let malformed = |why: String| StateError::Malformed {
            kind: KIND.into(),
            why,
        };
        if st.queued.len() > QUEUE_LEN {
            return Err(malformed(format!(
                "{} bytes queued, more than the {QUEUE_LEN} the controller holds",
                st.queued.len()
            )));
        }
        if let Some(c) = st.param_for.filter(|&c| !takes_param(c)) {
            return Err(malformed(format!("command {c:#04x} takes no data byte")));
        }
        if let Some(c) = st
            .kbd_param_for
            .filter(|c| !matches!(c, 0xed | 0xf0 | 0xf3))
        {
            return Err(malformed(format!(
                "keyboard command {c:#04x} takes no parameter"
            )));
        }
        if !(1..=3).contains(&st.kbd_set) {
            return Err(malformed(format!("scan code set {}", st.kbd_set)));
        }
        self.ram = st.ram;
        self.out_port = st.out_port;
        self.out.clear();
        self.out.extend(st.queued);
        self.stale = st.stale;
        self.cmd_written = st.cmd_written;
        self.param_for = st.param_for;
        self.kbd_param_for = st.kbd_param_for;
        self.kbd_set = st.kbd_set;
        self.kbd_last = st.kbd_last;
        self.repulse = !self.out.is_empty();
        Ok(())
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(b) = data.first_mut() else { return };
        *b = match offset {
            DATA => self.read_data(),
            STATUS => self.status(),
            _ => 0,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            DATA => self.write_data(v),
            STATUS => self.command(v),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
    use super::*;
    use crate::StopRecorder;
    use rhyve_base::lifecycle::round_trip;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts pulses, standing in for an irqfd.
    #[derive(Clone, Default)]
    struct Count(Arc<AtomicUsize>);

    impl Trigger for Count {
        type E = std::io::Error;
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    impl Count {
        fn take(&self) -> usize {
            self.0.swap(0, Ordering::SeqCst)
        }
    }

    /// Linux's I8042_CTL_TIMEOUT: how often it polls the status register before giving up.
    const POLLS: usize = 10_000;
    const WCTR: u8 = 0x60;
    const RCTR: u8 = 0x20;

    struct Kbc {
        dev: I8042,
        irq1: Count,
        irq12: Count,
        ctl: Arc<StopRecorder>,
    }

    fn kbc() -> Kbc {
        let (irq1, irq12) = (Count::default(), Count::default());
        let ctl = Arc::new(StopRecorder::default());
        let dev = I8042::new(ctl.clone(), Box::new(irq1.clone()), Box::new(irq12.clone()));
        Kbc {
            dev,
            irq1,
            irq12,
            ctl,
        }
    }

    impl Kbc {
        fn inb(&mut self, off: u64) -> u8 {
            let mut d = [0xa5u8];
            self.dev.read(off, &mut d);
            d[0]
        }
        fn outb(&mut self, off: u64, v: u8) {
            self.dev.write(off, &[v]);
        }
        fn status(&mut self) -> u8 {
            self.inb(STATUS)
        }
        /// i8042_wait_write, then the byte to port 0x60.
        fn write_data(&mut self, v: u8) {
            assert!(
                (0..POLLS).any(|_| self.status() & 0x02 == 0),
                "input buffer never empties"
            );
            self.outb(DATA, v);
        }
        /// i8042_wait_read, then port 0x60: the status the byte came with, and the byte.
        fn wait_read(&mut self) -> Option<(u8, u8)> {
            let st = (0..POLLS)
                .map(|_| self.status())
                .find(|s| s & STS_OBF != 0)?;
            Some((st, self.inb(DATA)))
        }
        /// __i8042_command: the command, its parameters, then `results` bytes read by polling.
        fn command(&mut self, cmd: u8, params: &[u8], results: usize) -> Result<Vec<u8>, String> {
            assert_eq!(self.status() & 0x02, 0);
            self.outb(STATUS, cmd);
            for &p in params {
                self.write_data(p);
            }
            (0..results)
                .map(|_| {
                    let (st, v) = self
                        .wait_read()
                        .ok_or(format!("command {cmd:#04x}: no answer"))?;
                    if cmd == 0xd3 && st & STS_AUX == 0 {
                        return Err("loopback answer not from aux".into());
                    }
                    Ok(v)
                })
                .collect()
        }
        /// i8042_flush: drains the output buffer; Linux gives up (no controller) after 16.
        fn flush(&mut self) -> usize {
            let mut n = 0;
            while self.status() & STS_OBF != 0 && n <= 16 {
                self.inb(DATA);
                n += 1;
            }
            n
        }
        /// What i8042_interrupt sees for each pulse of `irq`: one byte per interrupt.
        fn interrupts(&mut self, aux: bool) -> Vec<(u8, u8)> {
            let mut got = Vec::new();
            loop {
                let pulses = if aux {
                    self.irq12.take()
                } else {
                    self.irq1.take()
                };
                if pulses == 0 {
                    return got;
                }
                assert_eq!(pulses, 1, "one pulse per byte");
                let st = self.status();
                assert_ne!(st & STS_OBF, 0, "interrupt without data");
                got.push((st, self.inb(DATA)));
            }
        }
        /// A ps2_command on the keyboard port: each byte to port 0x60, answers by IRQ 1.
        fn kbd(&mut self, bytes: &[u8]) -> Vec<u8> {
            let mut got = Vec::new();
            for &b in bytes {
                self.write_data(b);
                for (st, v) in self.interrupts(false) {
                    assert_eq!(st & (STS_AUX | STS_TIMEOUT), 0, "keyboard byte {v:#04x}");
                    got.push(v);
                }
            }
            got
        }
        /// Linux's i8042_controller_init up to the CTR write: returns the CTR it would write.
        fn linux_controller_init(&mut self) -> u8 {
            let a = self.command(RCTR, &[], 1).expect("Can't read CTR")[0];
            let b = self.command(RCTR, &[], 1).expect("Can't read CTR")[0];
            assert_eq!(a, b, "Unable to get stable CTR read");
            assert_ne!(self.status() & STS_UNLOCKED, 0, "Warning: Keylock active");
            let ctr = (a | CTR_KBDDIS) & !CTR_KBDINT;
            self.command(WCTR, &[ctr], 0).unwrap();
            assert_eq!(self.flush(), 0);
            // The BIOS-like initial CTR has the keyboard interrupt on, so the first reads
            // pulsed IRQ 1, which Linux has not requested yet (the line is masked).
            assert_eq!(self.irq1.take(), 2);
            ctr
        }
    }

    #[test]
    fn controller_check_finds_an_idle_controller() {
        let mut k = kbc();
        let st = k.status();
        assert_ne!(st, 0xff, "no controller");
        assert_eq!(st & (STS_OBF | 0x02), 0);
        assert_eq!(k.flush(), 0);
    }

    #[test]
    fn ctr_reads_back_what_linux_writes() {
        let mut k = kbc();
        let initial = k.command(RCTR, &[], 1).expect("Can't read CTR")[0];
        k.irq1.take();
        assert_eq!(initial, CTR_INIT);
        assert_ne!(initial & CTR_XLATE, 0, "translated, as a BIOS leaves it");
        let ctr = k.linux_controller_init();
        assert_eq!(k.command(RCTR, &[], 1).unwrap(), [ctr]);
        assert_ne!(k.status() & STS_SYS, 0);
        k.command(WCTR, &[ctr & !CTR_SYS], 0).unwrap();
        assert_eq!(k.status() & STS_SYS, 0);
        assert_eq!(k.status() & STS_CMD, 0, "the last write was data");
        k.outb(STATUS, 0xa7);
        assert_ne!(k.status() & STS_CMD, 0);
    }

    #[test]
    fn selftest_and_interface_tests_pass() {
        let mut k = kbc();
        assert_eq!(k.command(0xaa, &[], 1).unwrap(), [0x55]);
        assert_eq!(k.command(0xab, &[], 1).unwrap(), [0x00]);
        assert_eq!(k.command(0xa9, &[], 1).unwrap(), [0x00]);
        // Controller answers come as keyboard data.
        k.outb(STATUS, 0xaa);
        assert_eq!(k.status() & (STS_OBF | STS_AUX), STS_OBF);
    }

    #[test]
    fn check_aux_finds_the_aux_port_and_its_irq() {
        let mut k = kbc();
        let mut ctr = k.linux_controller_init();
        assert_eq!(k.flush(), 0);
        // Loopback (I8042_CMD_AUX_LOOP), answered as aux data.
        assert_eq!(k.command(0xd3, &[0x5a], 1).unwrap(), [0x5a]);
        // i8042_toggle_aux: the CTR's aux-disable bit follows 0xA7 and 0xA8.
        k.command(0xa7, &[], 0).unwrap();
        assert_ne!(k.command(RCTR, &[], 1).unwrap()[0] & CTR_AUXDIS, 0);
        k.command(0xa8, &[], 0).unwrap();
        assert_eq!(k.command(RCTR, &[], 1).unwrap()[0] & CTR_AUXDIS, 0);
        // The IRQ test: aux interrupt on, then a looped byte that is left for the handler.
        ctr = (ctr & !CTR_AUXDIS) | CTR_AUXINT;
        k.command(WCTR, &[ctr], 0).unwrap();
        assert_eq!(k.irq12.take(), 0);
        k.command(0xd3, &[0xa5], 0).unwrap();
        assert_eq!(
            k.interrupts(true),
            [(STS_UNLOCKED | STS_SYS | STS_AUX | STS_OBF, 0xa5)]
        );
        assert_eq!(k.irq1.take(), 0);
        ctr = (ctr | CTR_AUXDIS) & !CTR_AUXINT;
        k.command(WCTR, &[ctr], 0).unwrap();
        // i8042_check_mux: a plain loopback is no active multiplexer (third byte unchanged).
        for b in [0xf0, 0x56, 0xa4] {
            assert_eq!(k.command(0xd3, &[b], 1).unwrap(), [b]);
        }
        assert_eq!(k.irq12.take(), 0, "aux interrupt off again");
    }

    #[test]
    fn atkbd_probe_is_acked_and_reads_the_keyboard_id() {
        let mut k = kbc();
        let ctr = k.linux_controller_init();
        // i8042_enable_kbd_port.
        k.command(WCTR, &[(ctr & !CTR_KBDDIS) | CTR_KBDINT], 0)
            .unwrap();
        assert_eq!(k.irq1.take(), 0);
        // atkbd_probe: GETID (translated: 0x83 reads 0x41), then deactivate.
        assert_eq!(k.kbd(&[0xf2]), [ACK, 0xab, 0x41]);
        assert_eq!(k.kbd(&[0xf5]), [ACK]);
        // atkbd_reset_state: LEDs off, fastest repeat; atkbd_activate; then a LED change.
        assert_eq!(k.kbd(&[0xed, 0x00]), [ACK, ACK]);
        assert_eq!(k.kbd(&[0xf3, 0x00]), [ACK, ACK]);
        assert_eq!(k.kbd(&[0xf4]), [ACK]);
        assert_eq!(k.kbd(&[0xed, 0x02]), [ACK, ACK]);
        // Reset with self-test, echo, resend, and NAK for what a keyboard does not know.
        assert_eq!(k.kbd(&[0xff]), [ACK, BAT_OK]);
        assert_eq!(k.kbd(&[0xee]), [0xee]);
        assert_eq!(k.kbd(&[0xfe]), [0xee]);
        assert_eq!(k.kbd(&[0xea]), [RESEND]);
        assert_eq!(k.irq12.take(), 0);
    }

    #[test]
    fn untranslated_keyboard_reports_set_2_codes() {
        let mut k = kbc();
        let ctr = k.linux_controller_init() & !CTR_XLATE;
        k.command(WCTR, &[(ctr & !CTR_KBDDIS) | CTR_KBDINT], 0)
            .unwrap();
        assert_eq!(k.kbd(&[0xf2]), [ACK, 0xab, 0x83]);
        assert_eq!(k.kbd(&[0xf0, 0x00]), [ACK, ACK, 2]);
        assert_eq!(k.kbd(&[0xf0, 0x03]), [ACK, ACK]);
        assert_eq!(k.kbd(&[0xf0, 0x00]), [ACK, ACK, 3]);
        assert_eq!(k.kbd(&[0xf0, 0x07]), [ACK, RESEND]);
    }

    #[test]
    fn keyboard_answers_polled_with_interrupts_off() {
        // FreeBSD's atkbd probe polls with the keyboard interrupt disabled.
        let mut k = kbc();
        let ctr = k.linux_controller_init();
        k.write_data(0xff);
        assert_eq!(k.wait_read(), Some((STS_UNLOCKED | STS_SYS | STS_OBF, ACK)));
        assert_eq!(k.wait_read().map(|r| r.1), Some(BAT_OK));
        assert_eq!(k.wait_read(), None);
        assert_eq!(k.irq1.take(), 0);
        // A byte left waiting raises IRQ 1 when the CTR turns the interrupt on.
        k.write_data(0xf4);
        k.command(WCTR, &[ctr | CTR_KBDINT], 0).unwrap();
        assert_eq!(
            k.interrupts(false),
            [(STS_UNLOCKED | STS_SYS | STS_OBF, ACK)]
        );
        // A command's answer raises it too, and goes before bytes from the keyboard.
        k.write_data(0xee);
        assert_eq!(k.irq1.take(), 1);
        assert_eq!(k.command(RCTR, &[], 1).unwrap(), [ctr | CTR_KBDINT]);
        // One pulse for the answer, one as the keyboard byte is back at port 0x60.
        assert_eq!(k.irq1.take(), 2);
        let st = STS_UNLOCKED | STS_CMD | STS_SYS | STS_OBF;
        assert_eq!(k.wait_read(), Some((st, 0xee)));
        assert_eq!(k.irq1.take(), 0);
    }

    #[test]
    fn aux_port_reports_no_mouse_at_once() {
        let mut k = kbc();
        let ctr = k.linux_controller_init();
        k.command(WCTR, &[(ctr & !CTR_AUXDIS) | CTR_AUXINT], 0)
            .unwrap();
        // psmouse_probe's GETID through I8042_CMD_AUX_SEND: 0xFE with the timeout bit.
        k.command(0xd4, &[0xf2], 0).unwrap();
        let want = STS_UNLOCKED | STS_SYS | STS_TIMEOUT | STS_AUX | STS_OBF;
        assert_eq!(k.interrupts(true), [(want, RESEND)]);
        assert_eq!(k.status() & (STS_TIMEOUT | STS_AUX | STS_OBF), 0);
    }

    #[test]
    fn output_port_and_controller_ram() {
        let mut k = kbc();
        assert_eq!(k.command(0xd0, &[], 1).unwrap(), [OUT_RESET | OUT_A20]);
        k.command(0xd1, &[0xdf], 0).unwrap(); // A20 on, as Linux's boot code writes it
        assert!(!k.ctl.is_suspended());
        k.command(0xd2, &[0x12], 0).unwrap();
        k.outb(STATUS, 0xd0);
        // The answer goes first; the looped keyboard byte still waits behind it.
        assert_eq!(k.wait_read().map(|r| r.1), Some(0xdf));
        let st = STS_UNLOCKED | STS_CMD | STS_SYS | STS_OBF;
        assert_eq!(k.wait_read(), Some((st, 0x12)));
        k.command(0x7f, &[0x99], 0).unwrap();
        assert_eq!(k.command(0x3f, &[], 1).unwrap(), [0x99]);
        assert_eq!(k.command(0xc0, &[], 1).unwrap(), [0x80]);
        // Reads with nothing waiting repeat the last byte.
        assert_eq!(k.inb(DATA), 0x80);
    }

    #[test]
    fn pulse_reset_line_resets_the_vm() {
        let mut k = kbc();
        for cmd in [0xff, 0xf1, 0xfd] {
            k.outb(STATUS, cmd);
        }
        assert!(
            !k.ctl.is_suspended(),
            "bit 0 set in the pulse mask: no reset"
        );
        k.outb(STATUS, 0xfe);
        assert_eq!(k.ctl.suspend_reason(), Some(SuspendReason::Reset));
        assert_eq!(SuspendReason::Reset.exit_status(), 0);
        let mut k = kbc();
        k.outb(STATUS, 0xf0);
        assert_eq!(k.ctl.suspend_reason(), Some(SuspendReason::Reset));
    }

    #[test]
    fn any_guest_access_is_safe() {
        let mut k = kbc();
        for cmd in 0..=255u8 {
            for v in [0x00, 0x01, 0x7f, 0x80, 0xd4, 0xf0, 0xff] {
                k.outb(STATUS, cmd);
                k.outb(DATA, v);
                k.outb(DATA, v);
                k.outb(DATA, cmd);
            }
            assert!(k.dev.out.len() <= QUEUE_LEN);
            k.inb(DATA);
        }
        for off in 0..8 {
            for len in [0, 1, 2, 4, 8] {
                let mut d = vec![0x5a; len];
                k.dev.read(off, &mut d);
                k.dev.write(off, &d);
            }
        }
        let mut d = [0x5a; 4];
        k.dev.read(1, &mut d);
        assert_eq!(d, [0; 4], "port 0x61-0x63 read as before");
        k.flush();
        assert_eq!(k.status() & STS_OBF, 0);
    }

    /// Guest accesses that show the whole state: the status, every byte queued (with the
    /// status it comes with), the CTR and a RAM byte, the output port, the keyboard's scan set,
    /// its resend, and what port 0x60 reads once empty.
    fn script(k: &mut Kbc) -> Vec<u8> {
        let mut got = vec![k.status()];
        // Completes whatever command or keyboard parameter was left waiting.
        k.outb(DATA, 0x03);
        while let Some((st, v)) = k.wait_read() {
            got.extend([st, v]);
        }
        for cmd in [RCTR, 0x3f, 0xd0] {
            got.extend(k.command(cmd, &[], 1).unwrap());
        }
        k.outb(DATA, 0xf0);
        k.outb(DATA, 0x00);
        k.outb(DATA, 0xfe);
        while let Some((st, v)) = k.wait_read() {
            got.extend([st, v]);
        }
        got.push(k.inb(DATA));
        got.push(k.status());
        got
    }

    /// A controller left mid-conversation: custom CTR, RAM byte and output port, scan set 1,
    /// a command waiting for its data byte, and three looped bytes nobody has read.
    fn busy_kbc() -> Kbc {
        let mut k = kbc();
        let ctr = k.linux_controller_init();
        k.command(WCTR, &[(ctr & !(CTR_KBDDIS | CTR_XLATE)) | CTR_KBDINT], 0)
            .unwrap();
        k.command(0x7f, &[0x99], 0).unwrap();
        k.command(0xd1, &[0xdf], 0).unwrap();
        assert_eq!(k.kbd(&[0xf0, 0x01]), [ACK, ACK]);
        k.irq1.take();
        for b in [0x11, 0x22] {
            k.command(0xd2, &[b], 0).unwrap();
        }
        k.command(0xd3, &[0x33], 0).unwrap();
        // WCTR with its data byte still to come.
        k.outb(STATUS, WCTR);
        // The first looped byte raised IRQ 1 as it arrived.
        assert_eq!(k.irq1.take(), 1);
        k
    }

    #[test]
    fn i8042_round_trip_keeps_controller_keyboard_and_queue() {
        let mut k = busy_kbc();
        let mut twin = busy_kbc();
        let mut fresh = kbc();
        let (saved, again) = round_trip(&mut k.dev, &mut fresh.dev).unwrap();
        assert_eq!(saved, again);
        assert_eq!(saved.kind, "i8042");
        assert_eq!(fresh.irq1.take(), 0, "nothing raised while paused");
        k.dev.resume();
        fresh.dev.resume();
        // The restored controller raises IRQ 1 for the byte waiting; the original does not
        // raise it twice.
        assert_eq!(fresh.irq1.take(), 1);
        assert_eq!(k.irq1.take(), 0);
        let want = script(&mut k);
        assert_eq!(script(&mut fresh), want);
        assert_eq!(script(&mut twin), want, "the script is deterministic");
        // And what it shows is the state set up above, not a power-on controller's.
        assert_ne!(script(&mut kbc()), want);
        let obf = STS_UNLOCKED | STS_OBF;
        #[rustfmt::skip]
        assert_eq!(
            want,
            [
                // Status with WCTR waiting for its byte; the byte (0x03) ends it.
                obf | STS_CMD | STS_SYS,
                // The queue: two keyboard loopback bytes, one aux.
                obf, 0x11, obf, 0x22, obf | STS_AUX, 0x33,
                // CTR (the 0x03 just written), RAM byte 31, output port.
                0x03, 0x99, 0xcf,
                // Scan set query: ACK, ACK, set 1; then resend repeats the 1.
                obf, ACK, obf, ACK, obf, 0x01, obf, 0x01,
                // Port 0x60 once empty, and the status.
                0x01, STS_UNLOCKED,
            ]
        );
    }

    #[test]
    fn i8042_refuses_other_states() {
        let mut k = busy_kbc();
        assert_eq!(k.dev.save(), Err(StateError::NotPaused("i8042".into())));
        k.dev.pause();
        let s = k.dev.save().unwrap();
        let mut f = kbc();
        assert_eq!(
            f.dev.restore(&s),
            Err(StateError::NotPaused("i8042".into()))
        );
        f.dev.pause();
        let mut long = s.clone();
        long.data["queued"] = serde_json::json!(vec![
            serde_json::json!({"val": 1, "aux": false, "timeout": false});
            QUEUE_LEN + 1
        ]);
        assert!(matches!(
            f.dev.restore(&long),
            Err(StateError::Malformed { .. })
        ));
        let mut bad = s.clone();
        bad.data["param_for"] = serde_json::json!(0xaa);
        assert!(matches!(
            f.dev.restore(&bad),
            Err(StateError::Malformed { .. })
        ));
        let mut other = s;
        other.kind = "uart".into();
        assert!(matches!(
            f.dev.restore(&other),
            Err(StateError::WrongKind { .. })
        ));
    }

    #[test]
    fn i8042_reset_is_power_on() {
        let mut k = busy_kbc();
        k.dev.reset();
        assert_eq!(script(&mut k), script(&mut kbc()));
    }
}
