//! Where a guest's time goes, measured by the VMM (bhyve's `bhyvectl --get-stats`, plus a
//! sampling profiler): VM exits counted by kind (`-o debug.exit_stats=true`, a table on stderr
//! when the VM ends) and guest RIPs sampled from the vCPU threads (`-o debug.rip_samples=PATH`,
//! `debug.rip_sample_hz`, default 100). A sampler thread sets each vCPU's sample request and
//! kicks it; the vCPU thread, out of KVM_RUN, records its RIP, CPL and run state.
//! Off by default: the counting costs a few atomic adds per exit when on.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::*;
use kvm_ioctls::VcpuFd;

use super::control::VmControl;
use super::run_page::{exit_name, NR_EXIT_REASONS};

/// Exit counts and RIP samples of one VM.
pub struct Profile {
    exits: Option<ExitCounts>,
    samples: Option<Sampler>,
}

struct ExitCounts {
    by_reason: [AtomicU64; NR_EXIT_REASONS],
    /// I/O exits by port.
    ports: Box<[AtomicU64]>,
    /// MMIO exits by 4 KiB page.
    mmio: Mutex<HashMap<u64, u64>>,
    /// Emulation failures rhyve finished (int3, fwait, clac/stac).
    assists: AtomicU64,
}

struct Sampler {
    hz: u32,
    out: Mutex<std::io::BufWriter<std::fs::File>>,
    start: Instant,
}

/// A vCPU's state in a sample: `R` running guest code, `H` halted (waiting for an
/// interrupt), `W` an AP waiting for INIT/SIPI.
fn run_state(mp_state: Option<u32>) -> char {
    match mp_state {
        Some(KVM_MP_STATE_HALTED) => 'H',
        Some(KVM_MP_STATE_UNINITIALIZED | KVM_MP_STATE_INIT_RECEIVED) => 'W',
        _ => 'R',
    }
}

impl Profile {
    /// A profile, or `None` when neither part is asked for.
    pub fn new(exit_stats: bool, samples: Option<(&str, u32)>) -> std::io::Result<Option<Self>> {
        let exits = exit_stats.then(|| ExitCounts {
            by_reason: std::array::from_fn(|_| AtomicU64::new(0)),
            ports: (0..=u16::MAX).map(|_| AtomicU64::new(0)).collect(),
            mmio: Mutex::new(HashMap::new()),
            assists: AtomicU64::new(0),
        });
        let samples = match samples {
            Some((path, hz)) => {
                let f = std::fs::File::create(path)
                    .map_err(|e| std::io::Error::new(e.kind(), format!("creating {path}: {e}")))?;
                let mut out = std::io::BufWriter::new(f);
                writeln!(
                    out,
                    "# seconds vcpu cpl rip state(R running, H halted, W waiting for SIPI)"
                )?;
                Some(Sampler {
                    hz,
                    out: Mutex::new(out),
                    start: Instant::now(),
                })
            }
            None => None,
        };
        Ok((exits.is_some() || samples.is_some()).then_some(Profile { exits, samples }))
    }

    /// Counts one exit (called by `vm_loop` before dispatching it).
    pub fn count_exit(&self, run: &kvm_run) {
        let Some(c) = &self.exits else { return };
        let reason = run.exit_reason;
        if let Some(n) = c.by_reason.get(reason as usize) {
            n.fetch_add(1, Ordering::Relaxed);
        }
        match reason {
            KVM_EXIT_IO => {
                // SAFETY: the exit reason says the `io` member of the union is the valid one.
                let port = unsafe { run.__bindgen_anon_1.io.port };
                c.ports[usize::from(port)].fetch_add(1, Ordering::Relaxed);
            }
            KVM_EXIT_MMIO => {
                // SAFETY: the exit reason says the `mmio` member of the union is the valid one.
                let gpa = unsafe { run.__bindgen_anon_1.mmio.phys_addr };
                let mut m = c.mmio.lock().unwrap_or_else(|p| p.into_inner());
                *m.entry(gpa & !0xfff).or_default() += 1;
            }
            _ => {}
        }
    }

    /// Counts an emulation failure rhyve finished.
    pub fn count_assist(&self) {
        if let Some(c) = &self.exits {
            c.assists.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records a sample of vCPU `id` (its answer to `Request::SampleRip`).
    pub fn sample(&self, id: u32, vcpu: &VcpuFd) {
        let Some(s) = &self.samples else { return };
        let (Ok(regs), Ok(sregs)) = (vcpu.get_regs(), vcpu.get_sregs()) else {
            return;
        };
        let state = run_state(vcpu.get_mp_state().ok().map(|m| m.mp_state));
        let cpl = sregs.cs.selector & 3;
        let t = s.start.elapsed().as_secs_f64();
        let mut out = s.out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(out, "{t:.4} {id} {cpl} {:#x} {state}", regs.rip);
    }

    /// Starts the sampler thread, if samples are asked for: every 1/hz s it asks each vCPU for
    /// a sample and kicks them all. It ends when the VM is suspended.
    pub fn start_sampler(self: &Arc<Self>, ctl: Arc<VmControl>) -> std::io::Result<()> {
        let Some(hz) = self.samples.as_ref().map(|s| s.hz) else {
            return Ok(());
        };
        let period = Duration::from_secs(1) / hz;
        rhyve_base::thread::spawn(
            rhyve_base::thread::Role::Sampler,
            "rip sampler",
            move || {
                while !ctl.is_suspended() {
                    std::thread::sleep(period);
                    ctl.request_samples();
                }
            },
        )?;
        Ok(())
    }

    /// Flushes the samples and returns the exit table (empty when not counting).
    pub fn finish(&self) -> String {
        if let Some(s) = &self.samples {
            let _ = s.out.lock().unwrap_or_else(|p| p.into_inner()).flush();
        }
        let Some(c) = &self.exits else {
            return String::new();
        };
        let mut t = String::from("rhyve: VM exits by kind\r\n");
        let total: u64 = c.by_reason.iter().map(|n| n.load(Ordering::Relaxed)).sum();
        let _ = write!(t, "  {:<28} {total:>12}\r\n", "total");
        for (reason, n) in c.by_reason.iter().enumerate() {
            let n = n.load(Ordering::Relaxed);
            if n > 0 {
                let _ = write!(t, "  {:<28} {n:>12}\r\n", exit_name(reason as u32));
            }
        }
        let assists = c.assists.load(Ordering::Relaxed);
        if assists > 0 {
            let _ = write!(t, "  {:<28} {assists:>12}\r\n", "(emulation assists)");
        }
        let mut ports: Vec<(usize, u64)> = c
            .ports
            .iter()
            .enumerate()
            .map(|(p, n)| (p, n.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect();
        ports.sort_by_key(|p| std::cmp::Reverse(p.1));
        for (port, n) in ports.iter().take(12) {
            let _ = write!(t, "    I/O port {port:#06x}          {n:>12}\r\n");
        }
        let mut pages: Vec<(u64, u64)> = c
            .mmio
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(a, n)| (*a, *n))
            .collect();
        pages.sort_by_key(|p| std::cmp::Reverse(p.1));
        for (page, n) in pages.iter().take(12) {
            let _ = write!(t, "    MMIO page {page:#012x}   {n:>12}\r\n");
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_counted_by_reason_port_and_page() {
        let p = Profile::new(true, None)
            .expect("profile")
            .expect("asked for");
        // SAFETY: kvm_run is plain data; all zeroes is a valid value.
        let mut run: kvm_run = unsafe { std::mem::zeroed() };
        run.exit_reason = KVM_EXIT_IO;
        run.__bindgen_anon_1.io.port = 0x3f8;
        p.count_exit(&run);
        p.count_exit(&run);
        run.exit_reason = KVM_EXIT_MMIO;
        run.__bindgen_anon_1.mmio.phys_addr = 0xc000_1234;
        p.count_exit(&run);
        p.count_assist();
        let t = p.finish();
        assert!(
            t.contains("total                                   3"),
            "{t}"
        );
        assert!(
            t.contains("KVM_EXIT_IO                             2"),
            "{t}"
        );
        assert!(
            t.contains("KVM_EXIT_MMIO                           1"),
            "{t}"
        );
        assert!(t.contains("I/O port 0x03f8                     2"), "{t}");
        assert!(t.contains("MMIO page 0x00c0001000              1"), "{t}");
        assert!(
            t.contains("(emulation assists)                     1"),
            "{t}"
        );
        assert!(Profile::new(false, None).expect("none").is_none());
        assert_eq!(run_state(Some(KVM_MP_STATE_RUNNABLE)), 'R');
        assert_eq!(run_state(Some(KVM_MP_STATE_HALTED)), 'H');
        assert_eq!(run_state(Some(KVM_MP_STATE_UNINITIALIZED)), 'W');
        assert_eq!(run_state(None), 'R');
    }
}
