//! The one way rhyve starts a thread: by role.
//!
//! Every thread rhyve creates says what it is for, so what a thread of that role may do
//! can be decided in one place: its name (what `ps -L`, `top -H` and `/proc/PID/task/*/comm`
//! show) is derived here, the role is readable from inside the thread ([`current`]), and a
//! per-role confinement (a seccomp filter, say) has exactly one place to attach: the start of
//! [`spawn`]'s closure, before the thread's own work touches guest data.
//!
//! The main thread is not spawned here; it runs the VM's event loop (`vmm::Vm::wait`).

use std::cell::Cell;
use std::io;
use std::sync::mpsc::Sender;
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

/// What a thread does. ARCHITECTURE.md lists the threads of a running VM by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Runs vCPU N's `vm_loop`.
    Vcpu(u32),
    /// A virtio device's queue worker: waits on its queue notifiers and serves the rings.
    VirtioWorker,
    /// A virtio-blk pool thread: does one request's disk I/O at a time.
    BlockIo,
    /// A device's clock (the RTC's periodic and update interrupts).
    Timer,
    /// Moves bytes between a console's host side (stdin, a TCP or unix socket) and its device.
    ConsoleBackend,
    /// The `debug.rip_samples` sampler.
    Sampler,
    /// The control API's HTTP server (`--api-socket`): parses requests, hands them to the
    /// main thread, writes the answers; never touches guest memory or a vCPU.
    Api,
}

impl Role {
    /// Short name of the role, as logged.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Vcpu(_) => "vcpu",
            Role::VirtioWorker => "virtio worker",
            Role::BlockIo => "block I/O",
            Role::Timer => "timer",
            Role::ConsoleBackend => "console backend",
            Role::Sampler => "sampler",
            Role::Api => "api",
        }
    }
}

thread_local! {
    static ROLE: Cell<Option<Role>> = const { Cell::new(None) };
}

/// The role of the calling thread; `None` for the main thread and threads rhyve did not start.
pub fn current() -> Option<Role> {
    ROLE.with(|r| r.get())
}

/// Starts `f` on a new thread of `role`, named `name` (Linux keeps the first 15 bytes). The
/// thread installs its role's seccomp filter ([`crate::seccomp`]) before `f` runs; a thread
/// that cannot be confined ends rhyve with status 4. A confined caller's thread is created by
/// the spawner thread, so that it carries its own filter only.
pub fn spawn<F, T>(role: Role, name: impl Into<String>, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let name = name.into();
    log::debug!("starting thread '{name}' ({})", role.as_str());
    let builder = std::thread::Builder::new().name(name.clone());
    let body = move || {
        ROLE.with(|r| r.set(Some(role)));
        if let Err(e) = crate::seccomp::confine(Some(role)) {
            crate::term::restore();
            eprint!("rhyve: thread '{name}': {e}\r\n");
            // SAFETY: _exit ends the process without running other threads' destructors.
            unsafe { libc::_exit(4) };
        }
        f()
    };
    if !crate::seccomp::confined() {
        return builder.spawn(body);
    }
    let Some(spawner) = SPAWNER.get() else {
        return Err(io::Error::other(
            "a confined thread cannot start threads and no spawner runs",
        ));
    };
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = tx.send(builder.spawn(body));
    });
    spawner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(job)
        .map_err(|_| io::Error::other("the spawner thread has ended"))?;
    rx.recv()
        .map_err(|_| io::Error::other("the spawner thread has ended"))?
}

type Job = Box<dyn FnOnce() + Send>;
static SPAWNER: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();

/// Starts the spawner: an unconfined thread that only creates the threads confined threads
/// ask for (a thread inherits its creator's seccomp filter). Call before any filter is
/// installed; later calls do nothing.
pub fn start_spawner() -> io::Result<()> {
    if SPAWNER.get().is_some() {
        return Ok(());
    }
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("spawner".into())
        .spawn(move || {
            for job in rx {
                job();
            }
        })?;
    let _ = SPAWNER.set(Mutex::new(tx));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spawned_thread_knows_its_role_and_carries_its_name() {
        assert_eq!(current(), None, "the test thread was not spawned by role");
        let h = spawn(Role::Vcpu(3), "vcpu 3", || {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            let comm =
                std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).unwrap_or_default();
            (current(), comm.trim().to_string())
        })
        .expect("spawn");
        let (role, comm) = h.join().expect("join");
        assert_eq!(role, Some(Role::Vcpu(3)));
        assert_eq!(comm, "vcpu 3");
        let h = spawn(Role::BlockIo, "a name longer than fifteen bytes", current).expect("spawn");
        assert_eq!(h.join().expect("join"), Some(Role::BlockIo));
    }
}
