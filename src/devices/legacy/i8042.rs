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

use std::collections::VecDeque;
use std::sync::Arc;

use vm_superio::Trigger;

use crate::bus::BusDevice;
use crate::devices::{SuspendReason, VmStop};

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

#[derive(Debug, Clone, Copy)]
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
}

impl I8042 {
    /// Base port of the range the device is inserted at; 0x64 is offset 4.
    pub const BASE: u64 = 0x60;
    pub const LEN: u64 = 5;

    pub fn new(ctl: Arc<dyn VmStop>, kbd_irq: Line, aux_irq: Line) -> Self {
        let mut ram = [0; 32];
        ram[0] = CTR_INIT;
        I8042 {
            ram,
            out_port: OUT_RESET | OUT_A20,
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
        }
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

    /// Pulses the interrupt of the byte now at port 0x60, if the CTR enables it.
    fn raise(&self) {
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
            // RAM byte reads and writes: the command's low 5 bits index the 32 bytes.
            0x20..=0x3f => self.result(self.ram[usize::from(cmd & 0x1f)]),
            0x60..=0x7f | 0xd1..=0xd4 => self.param_for = Some(cmd),
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
            Some(c @ 0x61..=0x7f) => self.ram[usize::from(c & 0x1f)] = v,
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
    use super::*;
    use crate::devices::StopRecorder;
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
}
