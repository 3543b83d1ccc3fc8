//! 16550 UART for COM1-COM4 (bhyve `uart_emul.c`), on vm-superio's register model.
//!
//! Output is written through as each byte arrives; input is fed from a backend thread into the
//! 64-byte receive FIFO, waiting for the guest to drain it rather than dropping bytes.
//!
//! A paused UART takes no input: the backend thread waits with the bytes it has read, and the
//! rest stay in the backend (the pipe, terminal or socket), until resume. Nor does it raise an
//! interrupt: one the register model asks for while paused (a restore whose state has an
//! enabled interrupt pending) is held and raised on resume. The backends are configuration:
//! the state is the registers and the receive FIFO.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::{Serial, Trigger};

use super::uart_backend::{self, Backend, UartIn};
use rhyve_base::lifecycle::{DeviceState, Lifecycle, Paused, StateError};
use rhyve_bus::BusDevice;

const KIND: &str = "uart";
const VERSION: u32 = 1;
/// The receive FIFO's size in vm-superio's model.
const FIFO_LEN: usize = 64;

/// Wakes the input thread when the guest has emptied the receive FIFO, or the UART resumes.
#[derive(Default)]
pub struct RxSpace {
    lock: Mutex<()>,
    cv: Condvar,
}

impl RxSpace {
    fn wake(&self) {
        let _g = self.lock.lock();
        self.cv.notify_all();
    }
}

impl SerialEvents for RxSpace {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        self.wake();
    }
}

/// The UART's interrupt line, held shut while the UART is paused: a pulse asked for then is
/// remembered and given on resume.
#[derive(Clone)]
struct Irq {
    line: Arc<dyn Trigger<E = io::Error> + Send + Sync>,
    gate: Arc<Gate>,
}

#[derive(Default)]
struct Gate {
    held: AtomicBool,
    pending: AtomicBool,
}

impl Trigger for Irq {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        if self.gate.held.load(Ordering::SeqCst) {
            self.gate.pending.store(true, Ordering::SeqCst);
            Ok(())
        } else {
            self.line.trigger()
        }
    }
}

type Out = Box<dyn Write + Send>;

pub struct Uart {
    serial: Serial<Irq, Arc<RxSpace>, Out>,
    irq: Irq,
    rx: Arc<RxSpace>,
    name: &'static str,
    paused: Paused,
}

/// vm-superio's `SerialState`, field for field: the divisor latch, IER, IIR, LCR, LSR, MCR,
/// MSR, the scratch register, and the bytes in the receive FIFO.
#[derive(Debug, Serialize, Deserialize)]
struct UartState {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

impl From<SerialState> for UartState {
    fn from(s: SerialState) -> Self {
        UartState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<UartState> for SerialState {
    fn from(s: UartState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl Uart {
    /// Creates the UART and starts the thread that feeds it from the backend's input.
    pub fn start(
        name: &'static str,
        irq: impl Trigger<E = io::Error> + Send + Sync + 'static,
        backend: Backend,
    ) -> Arc<Mutex<Uart>> {
        let rx = Arc::new(RxSpace::default());
        let irq = Irq {
            line: Arc::new(irq),
            gate: Arc::default(),
        };
        let uart = Arc::new(Mutex::new(Uart {
            serial: Serial::with_events(irq.clone(), rx.clone(), Box::new(backend.out)),
            irq,
            rx: rx.clone(),
            name,
            paused: Paused::default(),
        }));
        let feed = {
            let (uart, rx) = (uart.clone(), rx.clone());
            move |bytes: &[u8]| enqueue(&uart, &rx, bytes)
        };
        let spawn = |f: Box<dyn FnOnce() + Send>| {
            rhyve_base::thread::spawn(
                rhyve_base::thread::Role::ConsoleBackend,
                format!("{name} input"),
                f,
            )
            .map_err(|e| log::warn!("{name}: no input thread: {e}"))
            .ok();
        };
        match backend.input {
            UartIn::None => {}
            UartIn::Stdin => {
                // The stdin thread outlives this UART: it holds it weakly.
                let (weak, rx) = (Arc::downgrade(&uart), rx.clone());
                uart_backend::feed_stdin(Box::new(move |bytes| {
                    if let Some(u) = weak.upgrade() {
                        enqueue(&u, &rx, bytes);
                    }
                }))
            }
            UartIn::File(f) => spawn(Box::new(move || uart_backend::pump(f, feed))),
            UartIn::Tcp { listener, client } => spawn(Box::new(move || {
                uart_backend::serve_tcp(listener, client, feed)
            })),
        }
        uart
    }

    /// Replaces the register model by one built from `state`, keeping the output backend.
    fn rebuild(&mut self, state: &SerialState) -> Result<(), StateError> {
        let mut serial = Serial::from_state(
            state,
            self.irq.clone(),
            self.rx.clone(),
            Box::new(io::sink()) as Out,
        )
        .map_err(|e| StateError::Malformed {
            kind: KIND.into(),
            why: format!("{}: {e}", self.name),
        })?;
        std::mem::swap(serial.writer_mut(), self.serial.writer_mut());
        self.serial = serial;
        Ok(())
    }
}

/// Puts `bytes` into the receive FIFO, waiting for room when the guest is slow to read, or
/// for resume while the UART is paused.
fn enqueue(uart: &Mutex<Uart>, rx: &RxSpace, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        let rest: &[u8] = {
            let mut u = uart.lock().unwrap_or_else(|p| p.into_inner());
            let n = if u.paused.get() {
                0
            } else {
                u.serial.fifo_capacity().min(bytes.len())
            };
            // `n` is at most `bytes.len()`, so the split always succeeds.
            let (now, later) = bytes.split_at_checked(n).unwrap_or((bytes, &[]));
            if !now.is_empty() {
                if let Err(e) = u.serial.enqueue_raw_bytes(now) {
                    log::debug!("{}: input lost: {e:?}", u.name);
                }
            }
            later
        };
        bytes = rest;
        if !bytes.is_empty() {
            let g = rx.lock.lock().unwrap_or_else(|p| p.into_inner());
            // Bounded wait: the guest may have drained the FIFO, or the UART resumed, between
            // the check and here.
            let _ = rx.cv.wait_timeout(g, Duration::from_millis(20));
        }
    }
}

impl Lifecycle for Uart {
    fn pause(&mut self) {
        self.paused.set(true);
        self.irq.gate.held.store(true, Ordering::SeqCst);
    }

    fn resume(&mut self) {
        self.paused.set(false);
        self.irq.gate.held.store(false, Ordering::SeqCst);
        if self.irq.gate.pending.swap(false, Ordering::SeqCst) {
            if let Err(e) = self.irq.line.trigger() {
                log::warn!("{}: interrupt: {e}", self.name);
            }
        }
        self.rx.wake();
    }

    fn reset(&mut self) {
        if let Err(e) = self.rebuild(&SerialState::default()) {
            log::warn!("{}: reset: {e}", self.name);
        }
    }

    fn save(&mut self) -> Result<DeviceState, StateError> {
        self.paused.check(KIND)?;
        DeviceState::new(KIND, VERSION, &UartState::from(self.serial.state()))
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), StateError> {
        self.paused.check(KIND)?;
        let st: UartState = state.parse(KIND, VERSION)?;
        if st.in_buffer.len() > FIFO_LEN {
            return Err(StateError::Malformed {
                kind: KIND.into(),
                why: format!(
                    "{} bytes in a receive FIFO of {FIFO_LEN}",
                    st.in_buffer.len()
                ),
            });
        }
        self.rebuild(&st.into())
    }
}

impl BusDevice for Uart {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Registers are byte-wide; a wider access reads the register and zero above it.
        data.fill(0);
        if let Some(b) = data.first_mut() {
            // The bus hands over offsets inside the 8-port window; one too large for a byte
            // reads all ones rather than truncating onto a register.
            *b = u8::try_from(offset).map_or(0xff, |r| self.serial.read(r));
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // As in `read`, an offset too large for a byte is dropped, not truncated.
        let (Some(&b), Ok(reg)) = (data.first(), u8::try_from(offset)) else {
            return;
        };
        if let Err(e) = self.serial.write(reg, b) {
            log::debug!("{}: write error: {e:?}", self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
    use super::*;
    use crate::PulseCount;
    use rhyve_base::lifecycle::round_trip;
    use std::fs::File;
    use std::io::Read;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;
    use std::time::Instant;
    use uart_backend::UartOut;

    const THR: u64 = 0;
    const DLL: u64 = 0;
    const DLM: u64 = 1;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const MCR: u64 = 4;
    const LSR: u64 = 5;
    const MSR: u64 = 6;
    const SCR: u64 = 7;
    const LSR_DR: u8 = 0x01;

    fn inb(u: &Mutex<Uart>, off: u64) -> u8 {
        let mut d = [0xa5u8];
        u.lock().unwrap().read(off, &mut d);
        d[0]
    }

    fn outb(u: &Mutex<Uart>, off: u64, v: u8) {
        u.lock().unwrap().write(off, &[v]);
    }

    fn file(s: UnixStream) -> File {
        File::from(OwnedFd::from(s))
    }

    /// A UART whose output goes to a socket the test reads, with `input` as its input.
    fn uart(input: UartIn) -> (Arc<Mutex<Uart>>, PulseCount, UnixStream) {
        let (out, peer) = UnixStream::pair().unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let irq = PulseCount::default();
        let backend = Backend {
            out: UartOut::File(file(out)),
            input,
        };
        (Uart::start("com1", irq.clone(), backend), irq, peer)
    }

    /// Everything the guest can read, in an order that leaves both devices alike: LCR, the
    /// divisor latch, IER, IIR, LSR, MCR, MSR, SCR, then the receive FIFO until LSR says it
    /// is empty, and IIR and LSR once more.
    fn guest_view(u: &Mutex<Uart>) -> Vec<u8> {
        let lcr = inb(u, LCR);
        outb(u, LCR, lcr | 0x80);
        let mut v = vec![lcr, inb(u, DLL), inb(u, DLM)];
        outb(u, LCR, lcr);
        v.extend([IER, IIR, LSR, MCR, MSR, SCR].map(|r| inb(u, r)));
        for _ in 0..=FIFO_LEN {
            if inb(u, LSR) & LSR_DR == 0 {
                break;
            }
            v.push(inb(u, THR));
        }
        v.extend([inb(u, IIR), inb(u, LSR)]);
        v
    }

    /// Divisor 1, 8N1, a scratch byte, "abc" received through loopback, and the receive
    /// interrupt enabled and pending.
    fn program(u: &Mutex<Uart>) {
        outb(u, LCR, 0x80);
        outb(u, DLL, 0x01);
        outb(u, DLM, 0x00);
        outb(u, LCR, 0x03);
        outb(u, SCR, 0x5a);
        outb(u, MCR, 0x10 | 0x0b);
        for b in *b"abc" {
            outb(u, THR, b);
        }
        outb(u, MCR, 0x0b);
        outb(u, IER, 0x01);
    }

    #[test]
    fn uart_round_trip_keeps_registers_and_fifo() {
        let (u, irq, out) = uart(UartIn::None);
        program(&u);
        assert_eq!(irq.take(), 1, "receive interrupt");
        let (twin, _, _) = uart(UartIn::None);
        program(&twin);
        let (fresh, irq2, out2) = uart(UartIn::None);
        let (saved, again) =
            round_trip(&mut *u.lock().unwrap(), &mut *fresh.lock().unwrap()).unwrap();
        assert_eq!(saved, again);
        assert_eq!(saved.kind, "uart");
        assert_eq!(saved.data["in_buffer"], serde_json::json!(b"abc"));
        assert_eq!(irq2.take(), 0, "nothing raised while paused");
        u.lock().unwrap().resume();
        fresh.lock().unwrap().resume();
        // The restored UART raises its pending receive interrupt on resume; the original,
        // only paused, raises nothing again.
        assert_eq!(irq2.take(), 1);
        assert_eq!(irq.take(), 0);

        let want = guest_view(&u);
        assert_eq!(guest_view(&fresh), want);
        assert_eq!(guest_view(&twin), want, "the view is deterministic");
        assert_ne!(guest_view(&uart(UartIn::None).0), want);
        // LCR, divisor, IER, IIR (receive data, FIFOs on), LSR (data ready, THR empty),
        // MCR, MSR, SCR, the FIFO, then IIR and LSR with nothing left.
        assert_eq!(want[..3], [0x03, 0x01, 0x00]);
        assert_eq!(want[3..6], [0x01, 0xc4, 0x61]);
        assert_eq!(want[6], 0x0b);
        assert_eq!(want[8..], [0x5a, b'a', b'b', b'c', 0xc1, 0x60]);
        // Output goes to the restored UART's own backend.
        outb(&fresh, THR, b'Z');
        let mut got = [0u8];
        (&out2).read_exact(&mut got).unwrap();
        assert_eq!(got, *b"Z");
        out.set_nonblocking(true).unwrap();
        assert!((&out).read(&mut got).is_err(), "nothing on the original's");
    }

    #[test]
    fn uart_save_while_running_is_refused() {
        let (u, _, _) = uart(UartIn::None);
        let mut u = u.lock().unwrap();
        assert_eq!(u.save(), Err(StateError::NotPaused("uart".into())));
        u.pause();
        let mut s = u.save().unwrap();
        s.data["in_buffer"] = serde_json::json!(vec![0u8; FIFO_LEN + 1]);
        assert!(matches!(u.restore(&s), Err(StateError::Malformed { .. })));
        u.resume();
        assert_eq!(u.restore(&s), Err(StateError::NotPaused("uart".into())));
    }

    /// Reads the receive FIFO until `n` bytes came or two seconds passed.
    fn receive(u: &Mutex<Uart>, n: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let until = Instant::now() + Duration::from_secs(2);
        while got.len() < n && Instant::now() < until {
            if inb(u, LSR) & LSR_DR != 0 {
                got.push(inb(u, THR));
            } else {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        got
    }

    #[test]
    fn paused_uart_takes_no_input() {
        let (input, mut host) = UnixStream::pair().unwrap();
        let (u, irq, _out) = uart(UartIn::File(file(input)));
        outb(&u, IER, 0x01);
        // Running: input arrives and raises the receive interrupt.
        host.write_all(b"x").unwrap();
        assert_eq!(receive(&u, 1), b"x");
        assert!(irq.take() >= 1);
        u.lock().unwrap().pause();
        host.write_all(b"hi").unwrap();
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(inb(&u, LSR) & LSR_DR, 0, "input taken while paused");
        assert_eq!(irq.take(), 0, "interrupt raised while paused");
        u.lock().unwrap().resume();
        assert_eq!(receive(&u, 2), b"hi");
        assert!(irq.take() >= 1, "no receive interrupt after resume");
    }
}
