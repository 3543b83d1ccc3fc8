//! The `rhyve` command: bhyve(8)'s command line and exit status on Linux KVM, and
//! cloud-hypervisor's control API on a unix socket (`--api-socket`).

use std::path::Path;
use std::process::ExitCode;

use rhyve::api::Api;
use rhyve::cli::{self, Action, USAGE};
use rhyve::control_plane::Controller;
use rhyve::emulations::{self, lpc};
use rhyve::vmm::main_loop::Signals;
use rhyve::{logging, seccomp, term, timeline};

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

fn main() -> ExitCode {
    timeline::start_clock();
    term::install_crash_handlers();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match cli::parse(&args) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    logging::init(parsed.verbosity);
    let (cfg, serve_only) = match parsed.action {
        Action::Help => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Action::Version => {
            println!("rhyve {}", env!("CARGO_PKG_VERSION"));
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
        Action::Run(cfg) => (cfg, false),
        Action::Serve(cfg) => (cfg, true),
    };
    match cfg.get_bool("config.dump", false) {
        Ok(true) => {
            print!("{cfg}");
            return ExitCode::SUCCESS;
        }
        Ok(false) => {}
        Err(e) => return fail(e),
    }

    if let Some(path) = cfg.get_raw("debug.timeline") {
        if let Err(e) = timeline::enable(path) {
            return fail(e);
        }
    }
    let sigset = block_control_signals();
    // After the signals are blocked: the spawner thread, like every other, must not take them.
    // `log`, or a boolean spelt as every other key's (the schema has checked the value).
    let seccomp = match cfg.get_raw("sandbox.seccomp") {
        Some("log") => seccomp::Mode::Log,
        _ => match cfg.get_bool("sandbox.seccomp", true) {
            Ok(true) => seccomp::Mode::Kill,
            Ok(false) => seccomp::Mode::Off,
            Err(e) => return fail(e),
        },
    };
    if seccomp != seccomp::Mode::Off {
        if let Err(e) = rhyve::thread::start_spawner() {
            return fail(format!("cannot start the thread spawner: {e}"));
        }
    }
    seccomp::set_mode(seccomp);
    let signals = match Signals::new(&sigset) {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot read signals through a signalfd: {e}")),
    };
    let api = match cfg.get_raw("api.socket") {
        Some(path) => match Api::start(Path::new(path)) {
            Ok(a) => Some(a),
            Err(e) => return fail(e),
        },
        None => None,
    };
    let mut ctl = Controller::new(api, (!serve_only).then_some(cfg));
    if !serve_only {
        if let Err(e) = ctl.boot() {
            return fail(e);
        }
    }
    // The main thread's own filter, once the VM is built: what runs from here on (the event
    // loop, API requests, reboots, snapshots, migration) stays inside it.
    if let Err(e) = seccomp::confine(None) {
        return fail(e);
    }
    let status = ctl.run(&signals);
    term::restore();
    ExitCode::from(status)
}
