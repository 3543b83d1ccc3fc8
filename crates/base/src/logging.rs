//! A minimal stderr logger: quiet by default (warnings and errors), `-v` for info, `-vv` for
//! debug, `-vvv` for trace. `RHYVE_LOG=debug` works too, for tests that cannot pass flags.

use std::sync::atomic::{AtomicU64, Ordering};

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &Record) {
        if self.enabled(r.metadata()) {
            let lvl = match r.level() {
                Level::Error => "error",
                Level::Warn => "warning",
                Level::Info => "info",
                Level::Debug => "debug",
                Level::Trace => "trace",
            };
            // In raw terminal mode a bare \n would not return the carriage.
            eprint!("rhyve: {lvl}: {}\r\n", r.args());
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

pub fn init(verbosity: u8) {
    let from_env = std::env::var("RHYVE_LOG")
        .ok()
        .and_then(|v| v.parse::<LevelFilter>().ok());
    let level = from_env.unwrap_or(match verbosity {
        0 => LevelFilter::Warn,
        1 => LevelFilter::Info,
        2 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    });
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

/// True for one call in `every` on `counter`: log guest-caused problems at a rate limit, so a
/// guest cannot flood the log.
pub fn rate_limited(counter: &AtomicU64, every: u64) -> bool {
    counter
        .fetch_add(1, Ordering::Relaxed)
        .is_multiple_of(every)
}
