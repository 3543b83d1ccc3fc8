//! 16550 UART for COM1-COM4 (bhyve `uart_emul.c`), on vm-superio's register model.
//!
//! Output is written through as each byte arrives; input is fed from a backend thread into the
//! 64-byte receive FIFO, waiting for the guest to drain it rather than dropping bytes.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use vm_superio::serial::SerialEvents;
use vm_superio::Serial;

use super::uart_backend::{self, Backend, UartIn, UartOut};
use crate::bus::BusDevice;
use crate::devices::IrqLine;

/// Wakes the input thread when the guest has emptied the receive FIFO.
#[derive(Default)]
pub struct RxSpace {
    lock: Mutex<()>,
    cv: Condvar,
}

impl SerialEvents for RxSpace {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _g = self.lock.lock();
        self.cv.notify_all();
    }
}

pub struct Uart {
    serial: Serial<IrqLine, Arc<RxSpace>, UartOut>,
    name: &'static str,
}

impl Uart {
    /// Creates the UART and starts the thread that feeds it from the backend's input.
    pub fn start(name: &'static str, irq: IrqLine, backend: Backend) -> Arc<Mutex<Uart>> {
        let rx = Arc::new(RxSpace::default());
        let uart = Arc::new(Mutex::new(Uart {
            serial: Serial::with_events(irq, rx.clone(), backend.out),
            name,
        }));
        let feed = {
            let uart = uart.clone();
            move |bytes: &[u8]| enqueue(&uart, &rx, bytes)
        };
        let spawn = |f: Box<dyn FnOnce() + Send>| {
            crate::thread::spawn(
                crate::thread::Role::ConsoleBackend,
                format!("{name} input"),
                f,
            )
            .map_err(|e| log::warn!("{name}: no input thread: {e}"))
            .ok();
        };
        match backend.input {
            UartIn::None => {}
            UartIn::Stdin => spawn(Box::new(move || {
                uart_backend::pump(std::io::stdin().lock(), feed)
            })),
            UartIn::File(f) => spawn(Box::new(move || uart_backend::pump(f, feed))),
            UartIn::Tcp { listener, client } => spawn(Box::new(move || {
                uart_backend::serve_tcp(listener, client, feed)
            })),
        }
        uart
    }
}

/// Puts `bytes` into the receive FIFO, waiting for room when the guest is slow to read.
fn enqueue(uart: &Mutex<Uart>, rx: &RxSpace, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        let room = {
            let mut u = uart.lock().unwrap_or_else(|p| p.into_inner());
            let n = u.serial.fifo_capacity().min(bytes.len());
            if n > 0 {
                if let Err(e) = u.serial.enqueue_raw_bytes(&bytes[..n]) {
                    log::debug!("{}: input lost: {e:?}", u.name);
                }
            }
            n
        };
        bytes = &bytes[room..];
        if !bytes.is_empty() {
            let g = rx.lock.lock().unwrap_or_else(|p| p.into_inner());
            // Bounded wait: the guest may have drained the FIFO between the check and here.
            let _ = rx.cv.wait_timeout(g, Duration::from_millis(20));
        }
    }
}

impl BusDevice for Uart {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Registers are byte-wide; a wider access reads the register and zero above it.
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.serial.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            if let Err(e) = self.serial.write(offset as u8, b) {
                log::debug!("{}: write error: {e:?}", self.name);
            }
        }
    }
}
