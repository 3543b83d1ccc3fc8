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

/// Starts `f` on a new thread of `role`, named `name` (Linux keeps the first 15 bytes).
pub fn spawn<F, T>(role: Role, name: impl Into<String>, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let name = name.into();
    log::debug!("starting thread '{name}' ({})", role.as_str());
    std::thread::Builder::new().name(name).spawn(move || {
        ROLE.with(|r| r.set(Some(role)));
        f()
    })
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
