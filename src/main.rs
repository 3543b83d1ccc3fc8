//! The `rhyve` command: bhyve(8)'s command line and exit status on Linux KVM.

use std::process::ExitCode;
use std::sync::Arc;

use rhyve::cli::{self, Action, USAGE};
use rhyve::devices::legacy::pm::Pm;
use rhyve::emulations::{self, lpc};
use rhyve::vmm::control::{SuspendReason, VmControl};
use rhyve::vmm::main_loop::Signals;
use rhyve::vmm::Vm;
use rhyve::{logging, term};

/// Status for every error that stops rhyve before or while running the guest (bhyve(8)).
const EXIT_ERROR: u8 = 4;

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    term::restore();
    eprint!("rhyve: {msg}\r\n");
    ExitCode::from(EXIT_ERROR)
}

/// Blocks the signals the main loop turns into VM requests, in this thread and every thread it
/// creates afterwards, so only the main loop's signalfd receives them.
fn block_control_signals() -> libc::sigset_t {
    // SAFETY: sigset operations on a local set, then pthread_sigmask with valid pointers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// SIGTERM presses the ACPI power button (bhyve): a guest that enabled ACPI shuts itself down
/// and powers off (status 1). When nothing can receive the button (ACPI not enabled, or the
/// button event masked), or on a second SIGTERM, rhyve powers the VM off itself. SIGINT, SIGHUP
/// and SIGQUIT stop it as an error (status 4). Either way the vCPUs leave their loops and the
/// terminal is restored on the normal exit path.
fn on_signal(ctl: Arc<VmControl>, pm: Pm) -> impl FnMut(i32) {
    let mut pressed = false;
    move |sig| {
        if sig == libc::SIGTERM {
            if !pressed && pm.power_button() {
                log::info!("SIGTERM: power button pressed");
                pressed = true;
            } else {
                log::info!("SIGTERM: powering off");
                ctl.suspend(SuspendReason::PowerOff);
            }
        } else {
            eprint!("rhyve: stopped by signal {sig}\r\n");
            ctl.suspend(SuspendReason::Error);
        }
    }
}

fn main() -> ExitCode {
    term::install_crash_handlers();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match cli::parse(&args) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    logging::init(parsed.verbosity);
    let cfg = match parsed.action {
        Action::Help => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Action::ListPci => {
            print!("{}", emulations::help_text());
            return ExitCode::SUCCESS;
        }
        Action::ListLpc => {
            print!("{}", lpc::help_text());
            return ExitCode::SUCCESS;
        }
        Action::Run(cfg) => cfg,
    };
    match cfg.get_bool("config.dump", false) {
        Ok(true) => {
            print!("{cfg}");
            return ExitCode::SUCCESS;
        }
        Ok(false) => {}
        Err(e) => return fail(e),
    }

    let sigset = block_control_signals();
    let mut vm = match Vm::create(&cfg) {
        Ok(vm) => vm,
        Err(e) => return fail(e),
    };
    let signals = match Signals::new(&sigset) {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot read signals through a signalfd: {e}")),
    };
    let mut handler = on_signal(vm.control(), vm.pm.clone());
    if let Err(e) = vm.start() {
        vm.wait();
        return fail(e);
    }
    let reason = vm.run(Some((&signals, &mut handler)));
    term::restore();
    log::info!("vm stopped: {reason:?}");
    ExitCode::from(reason.exit_status() as u8)
}
