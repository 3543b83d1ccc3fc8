//! The host terminal: raw mode for a `stdio` COM port, restored on every way out of rhyve
//! (normal exit, error exit, fatal signal, panic).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

static SAVED: OnceLock<libc::termios> = OnceLock::new();
static RAW: AtomicBool = AtomicBool::new(false);

/// Puts stdin in raw mode if it is a terminal, so keystrokes (Ctrl-C included) go to the guest.
pub fn enable_raw_stdin() {
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(0) } != 1 {
        return;
    }
    // SAFETY: an all-zero termios is valid storage for tcgetattr to fill.
    let mut tio: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd 0 is a terminal and tio is valid storage.
    if unsafe { libc::tcgetattr(0, &mut tio) } != 0 {
        return;
    }
    let _ = SAVED.set(tio);
    let mut raw = tio;
    // SAFETY: raw is a valid termios value.
    unsafe { libc::cfmakeraw(&mut raw) };
    // SAFETY: fd 0 is a terminal and raw is a valid termios.
    if unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) } == 0 {
        RAW.store(true, Ordering::SeqCst);
    }
}

/// Restores the terminal if rhyve changed it. Async-signal-safe: only tcsetattr on saved state.
pub fn restore() {
    if RAW.swap(false, Ordering::SeqCst) {
        if let Some(tio) = SAVED.get() {
            // SAFETY: tio is the state tcgetattr returned for fd 0.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, tio) };
        }
    }
}

extern "C" fn fatal_signal(sig: libc::c_int) {
    restore();
    // SAFETY: resetting to the default action and re-raising is async-signal-safe; the process
    // then dies of the same signal, as it would have without this handler.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// Makes crashes restore the terminal too.
pub fn install_crash_handlers() {
    for sig in [
        libc::SIGSEGV,
        libc::SIGBUS,
        libc::SIGILL,
        libc::SIGFPE,
        libc::SIGABRT,
    ] {
        // SAFETY: installing a handler that only calls async-signal-safe functions.
        unsafe { libc::signal(sig, fatal_signal as *const () as libc::sighandler_t) };
    }
    // A panic on any thread (a vCPU, a device worker) is a rhyve defect: the VM cannot be
    // trusted to go on, so the process ends with bhyve's "error" status, 4, instead of
    // aborting (release builds) or losing one thread silently (debug builds).
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore();
        prev(info);
        eprint!("rhyve: internal error (a bug in rhyve: please report the message above); exiting with status 4\r\n");
        // SAFETY: _exit ends the process at once, without running other threads' destructors
        // (which could meet state the panicking thread left half-changed).
        unsafe { libc::_exit(4) };
    }));
}
