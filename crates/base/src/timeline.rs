//! The boot timeline (`-o debug.timeline=PATH`): when each step of a boot happened, as
//! "milliseconds-since-exec event" lines in PATH, for `scripts/boot-timeline.py` to draw as an
//! SVG. Steps come from wherever they happen (main, the vCPU loop, the UART, the virtio
//! transport, the POST port); off, a mark costs one atomic load.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

static ON: AtomicBool = AtomicBool::new(false);
static OUT: Mutex<Option<std::io::BufWriter<std::fs::File>>> = Mutex::new(None);
static START: OnceLock<Instant> = OnceLock::new();
/// Events that are recorded only the first time.
static SEEN: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Where time starts: call first thing in `main` (the closest rhyve sees to its exec).
pub fn start_clock() {
    let _ = START.get_or_init(Instant::now);
}

/// Starts recording into `path`, with the "exec" event at time 0.
pub fn enable(path: &str) -> std::io::Result<()> {
    let f = std::fs::File::create(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("debug.timeline {path}: {e}")))?;
    let mut w = std::io::BufWriter::new(f);
    writeln!(
        w,
        "# ms event (rhyve boot timeline; scripts/boot-timeline.py draws it)"
    )?;
    *OUT.lock().unwrap_or_else(|p| p.into_inner()) = Some(w);
    ON.store(true, Ordering::Release);
    start_clock();
    mark_at(0.0, "exec");
    Ok(())
}

pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

fn mark_at(ms: f64, event: &str) {
    if let Some(w) = OUT.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
        // One line per event, flushed: the timeline survives a VM that never stops cleanly.
        let _ = writeln!(w, "{ms:.3} {event}");
        let _ = w.flush();
    }
}

/// Records `event` now.
pub fn mark(event: &str) {
    if !enabled() {
        return;
    }
    let ms = START
        .get()
        .map(|s| s.elapsed().as_secs_f64() * 1e3)
        .unwrap_or(0.0);
    mark_at(ms, event);
}

/// Records `event` the first time it happens only.
pub fn mark_once(event: &str) {
    if !enabled() {
        return;
    }
    {
        let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
        if seen.iter().any(|s| s == event) {
            return;
        }
        seen.push(event.to_string());
    }
    mark(event);
}
