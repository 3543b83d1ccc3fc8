//! VM-wide run control shared by every vCPU thread, the devices and the main thread: the active
//! cpumask, the suspend request (bhyve `vm_suspend`), each vCPU's state (created, running,
//! paused, exited) and request mailbox (pause, resume, halt probe, RIP sample, save and restore
//! its state), and the kick that gets a vCPU out of KVM_RUN.
//!
//! Kick protocol: the kicker first publishes its request (the suspend flag, or a request in the
//! vCPU's mailbox), then sends `KICK_SIGNAL` to the vCPU thread. The signal handler sets
//! `immediate_exit` in that thread's `kvm_run`, so a vCPU that looked at its mailbox just
//! before the request still leaves KVM_RUN at once instead of running the guest until its next
//! exit. A paused vCPU is parked on its mailbox and needs no kick: posting wakes it.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::vcpu::VcpuState;

use kvm_bindings::kvm_run;

pub use rhyve_devices::SuspendReason;

/// A set of vCPU ids (bhyve's `cpuset_t`), sized for KVM's largest VM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuSet(Vec<u64>);

impl CpuSet {
    pub fn set(&mut self, id: usize) {
        let (w, b) = (id / 64, id % 64);
        if self.0.len() <= w {
            self.0.resize(w + 1, 0);
        }
        self.0[w] |= 1 << b;
    }
    pub fn clear(&mut self, id: usize) {
        if let Some(word) = self.0.get_mut(id / 64) {
            *word &= !(1 << (id % 64));
        }
    }
    pub fn is_set(&self, id: usize) -> bool {
        self.0
            .get(id / 64)
            .is_some_and(|w| w & (1 << (id % 64)) != 0)
    }
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }
    pub fn count(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }
    /// The ids in the set, in order.
    pub fn ids(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.0.len().saturating_mul(64)).filter(|&id| self.is_set(id))
    }
}

/// Where a vCPU is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Its mailbox exists; its thread has not entered `vm_loop` yet.
    Created,
    /// In `vm_loop`: in KVM_RUN or handling an exit.
    Running,
    /// Parked outside KVM_RUN until `Resume`; it still answers the other requests.
    Paused,
    /// Left `vm_loop` for good.
    Exited,
}

/// What can be asked of a vCPU. It answers from its own thread, between two KVM_RUNs (or
/// while parked), so the request may use the vCPU's fd: registers, MSRs, LAPIC.
pub enum Request {
    /// Park outside KVM_RUN until `Resume`.
    Pause,
    Resume,
    /// Halt check `generation`: answer with `VmControl::report_halt`.
    HaltProbe(u64),
    /// Record a RIP sample (`debug.rip_samples`).
    SampleRip,
    /// Its whole state, with the MSRs listed (only while paused).
    SaveState {
        msrs: Vec<u32>,
        reply: mpsc::Sender<Result<VcpuState, String>>,
    },
    /// Take a saved state (only while paused).
    RestoreState {
        state: Box<VcpuState>,
        reply: mpsc::Sender<Result<(), String>>,
    },
}

struct MailboxInner {
    queue: VecDeque<Request>,
    state: RunState,
}

/// One vCPU's requests and state. `pending` lets the vCPU loop look without the lock.
pub struct Mailbox {
    pending: AtomicBool,
    inner: Ranked<MailboxInner>,
    cv: Condvar,
}

/// Most requests a mailbox holds: a vCPU that stopped answering (stuck in a device handler)
/// does not make its mailbox grow without bound; a post beyond this is refused.
const MAILBOX_MAX: usize = 64;

impl Mailbox {
    fn new() -> Self {
        Mailbox {
            pending: AtomicBool::new(false),
            inner: Ranked::new(
                Rank::Mailbox,
                MailboxInner {
                    queue: VecDeque::new(),
                    state: RunState::Created,
                },
            ),
            cv: Condvar::new(),
        }
    }

    /// Whether requests wait (read by the vCPU loop before each KVM_RUN).
    pub fn has_requests(&self) -> bool {
        self.pending.load(Ordering::SeqCst)
    }

    fn post(&self, r: Request) -> bool {
        let mut m = self.inner.lock();
        if m.state == RunState::Exited || m.queue.len() >= MAILBOX_MAX {
            return false;
        }
        m.queue.push_back(r);
        self.pending.store(true, Ordering::SeqCst);
        self.cv.notify_all();
        true
    }

    /// The next request, if any (the vCPU thread's side).
    pub fn take(&self) -> Option<Request> {
        let mut m = self.inner.lock();
        let r = m.queue.pop_front();
        self.pending.store(!m.queue.is_empty(), Ordering::SeqCst);
        r
    }

    pub fn state(&self) -> RunState {
        self.inner.lock().state
    }

    /// Moves the vCPU to `state`, waking whoever waits for it.
    pub fn set_state(&self, state: RunState) {
        let mut m = self.inner.lock();
        m.state = state;
        self.cv.notify_all();
    }

    /// Parked: waits for the next request; None once the VM is suspended.
    pub fn wait_request(&self, ctl: &VmControl) -> Option<Request> {
        let mut m = self.inner.lock();
        loop {
            if ctl.is_suspended() {
                return None;
            }
            if let Some(r) = m.queue.pop_front() {
                self.pending.store(!m.queue.is_empty(), Ordering::SeqCst);
                return Some(r);
            }
            m = m.wait(&self.cv);
        }
    }

    /// Waits until the vCPU is in one of `states` (true), or `deadline` passes.
    fn wait_state(&self, states: &[RunState], deadline: Instant, ctl: &VmControl) -> bool {
        let mut m = self.inner.lock();
        loop {
            if states.contains(&m.state) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline || ctl.is_suspended() {
                return false;
            }
            m = m.wait_timeout(&self.cv, deadline - now);
        }
    }

    /// Wakes a parked vCPU (to see a suspend) and whoever waits on its state.
    fn wake(&self) {
        let _m = self.inner.lock();
        self.cv.notify_all();
    }
}

/// The locks of the control block, in the only order they may be taken (ARCHITECTURE.md,
/// "Lock order"): a thread holding one takes only locks further down this list. Debug builds
/// check it on every lock (`Ranked`), so a test that takes them out of order panics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rank {
    Threads = 0,
    Active = 1,
    Mailboxes = 2,
    Mailbox = 3,
    HaltReplies = 4,
    SuspendReason = 5,
}

impl Rank {
    const ALL: [Rank; 6] = [
        Rank::Threads,
        Rank::Active,
        Rank::Mailboxes,
        Rank::Mailbox,
        Rank::HaltReplies,
        Rank::SuspendReason,
    ];

    fn name(self) -> &'static str {
        match self {
            Rank::Threads => "VmControl.threads",
            Rank::Active => "VmControl.active",
            Rank::Mailboxes => "VmControl.mailboxes",
            Rank::Mailbox => "a vCPU's mailbox",
            Rank::HaltReplies => "VmControl.halt_replies",
            Rank::SuspendReason => "VmControl.suspend_reason",
        }
    }
}

thread_local! {
    /// The ranks of the control-block locks this thread holds, one bit each.
    static HELD: Cell<u32> = const { Cell::new(0) };
}

/// A mutex with its place in the lock order.
struct Ranked<T> {
    rank: Rank,
    m: Mutex<T>,
}

/// A held `Ranked` lock; dropping it releases the lock and its rank.
struct RankedGuard<'a, T> {
    rank: Rank,
    g: Option<MutexGuard<'a, T>>,
}

impl<T> Ranked<T> {
    fn new(rank: Rank, v: T) -> Self {
        Ranked {
            rank,
            m: Mutex::new(v),
        }
    }

    fn lock(&self) -> RankedGuard<'_, T> {
        let bit = 1u32 << (self.rank as u32);
        HELD.with(|h| {
            let held = h.get();
            if cfg!(debug_assertions) && held >= bit {
                // Every held rank must be below this one.
                let held_names: Vec<&str> = Rank::ALL
                    .iter()
                    .filter(|r| held & (1 << (**r as u32)) != 0)
                    .map(|r| r.name())
                    .collect();
                panic!(
                    "lock order: taking {} while holding {held_names:?} (ARCHITECTURE.md, \"Lock order\")",
                    self.rank.name()
                );
            }
            h.set(held | bit);
        });
        RankedGuard {
            rank: self.rank,
            g: Some(self.m.lock().unwrap_or_else(|p| p.into_inner())),
        }
    }
}

impl<'a, T> RankedGuard<'a, T> {
    fn inner(&mut self) -> MutexGuard<'a, T> {
        self.g.take().expect("guard present outside a wait")
    }

    /// `Condvar::wait_timeout` on this lock; the rank stays held (the thread takes no other
    /// lock while it sleeps).
    fn wait_timeout(mut self, cv: &Condvar, d: Duration) -> Self {
        let g = self.inner();
        self.g = Some(cv.wait_timeout(g, d).unwrap_or_else(|e| e.into_inner()).0);
        self
    }

    fn wait(mut self, cv: &Condvar) -> Self {
        let g = self.inner();
        self.g = Some(cv.wait(g).unwrap_or_else(|e| e.into_inner()));
        self
    }
}

impl<T> std::ops::Deref for RankedGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.g.as_deref().expect("guard present outside a wait")
    }
}

impl<T> std::ops::DerefMut for RankedGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.g.as_deref_mut().expect("guard present outside a wait")
    }
}

impl<T> Drop for RankedGuard<'_, T> {
    fn drop(&mut self) {
        drop(self.g.take());
        let bit = 1u32 << (self.rank as u32);
        HELD.with(|h| h.set(h.get() & !bit));
    }
}

/// The control block. Its locks are taken in `Rank` order only; no lock here is held while
/// taking a bus or device lock.
pub struct VmControl {
    suspend_reason: Ranked<Option<SuspendReason>>,
    suspended: AtomicBool,
    /// Set between `pause` and `resume` (the halt check stays quiet meanwhile).
    paused: AtomicBool,
    /// Each vCPU's mailbox, by id.
    mailboxes: Ranked<Vec<Option<Arc<Mailbox>>>>,
    /// The active cpumask: vCPUs activated and still in their loop.
    active: Ranked<CpuSet>,
    active_cv: Condvar,
    /// How many vCPUs `active` holds, written under its lock: read by waiters that hold a lock
    /// ranked after `active` (pause, halt replies), which may not take it.
    active_count: AtomicUsize,
    /// pthread ids of running vCPU threads, for the kick. An entry is cleared under this lock
    /// before its thread exits, so a kick never targets a thread that is gone.
    threads: Ranked<Vec<Option<libc::pthread_t>>>,
    /// Halt check: a generation number vCPUs answer once each, and their answers.
    halt_gen: AtomicU64,
    halt_replies: Ranked<(u64, Vec<bool>)>,
    halt_cv: Condvar,
    /// Written when the last vCPU leaves its loop: the main event loop waits on it. Taken with
    /// no other lock held.
    stop_notifier: std::sync::Mutex<Option<vmm_sys_util::eventfd::EventFd>>,
}

impl Default for VmControl {
    fn default() -> Self {
        Self::new()
    }
}

impl VmControl {
    pub fn new() -> Self {
        install_kick_handler();
        VmControl {
            suspend_reason: Ranked::new(Rank::SuspendReason, None),
            suspended: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            mailboxes: Ranked::new(Rank::Mailboxes, Vec::new()),
            active: Ranked::new(Rank::Active, CpuSet::default()),
            active_cv: Condvar::new(),
            active_count: AtomicUsize::new(0),
            threads: Ranked::new(Rank::Threads, Vec::new()),
            halt_gen: AtomicU64::new(0),
            halt_replies: Ranked::new(Rank::HaltReplies, (0, Vec::new())),
            halt_cv: Condvar::new(),
            stop_notifier: std::sync::Mutex::new(None),
        }
    }

    /// vCPU `id`'s mailbox, made (in state `Created`) the first time it is asked for.
    pub fn mailbox(&self, id: usize) -> Arc<Mailbox> {
        let mut m = self.mailboxes.lock();
        if m.len() <= id {
            m.resize(id + 1, None);
        }
        m[id]
            .get_or_insert_with(|| Arc::new(Mailbox::new()))
            .clone()
    }

    /// Every vCPU's mailbox, taken out of the list lock.
    fn all_mailboxes(&self) -> Vec<Arc<Mailbox>> {
        self.mailboxes.lock().iter().flatten().cloned().collect()
    }

    /// vCPU `id`'s state; None for a vCPU this VM does not have.
    pub fn vcpu_state(&self, id: usize) -> Option<RunState> {
        let mb = self.mailboxes.lock().get(id).cloned().flatten()?;
        Some(mb.state())
    }

    /// bhyve `vm_activate_cpu` + `CPU_SET_ATOMIC(vcpuid, &cpumask)`, and the kick registration.
    /// The vCPU's mailbox says `Running` from here.
    pub fn activate(&self, id: usize) {
        let mb = self.mailbox(id);
        let mut t = self.threads.lock();
        if t.len() <= id {
            t.resize(id + 1, None);
        }
        // SAFETY: pthread_self has no preconditions.
        t[id] = Some(unsafe { libc::pthread_self() });
        let mut active = self.active.lock();
        active.set(id);
        self.active_count.store(active.count(), Ordering::SeqCst);
        drop(active);
        drop(t);
        mb.set_state(RunState::Running);
    }

    /// A vCPU leaving its loop clears itself from the cpumask (bhyve `vmexit_suspend`).
    pub fn deactivate(&self, id: usize) {
        let mut t = self.threads.lock();
        if let Some(slot) = t.get_mut(id) {
            *slot = None;
        }
        let mut active = self.active.lock();
        active.clear(id);
        self.active_count.store(active.count(), Ordering::SeqCst);
        self.active_cv.notify_all();
        drop(active);
        drop(t);
        // A vCPU that leaves while a pause, a request or a halt check is pending must not be
        // waited for. Notified under each waiter's lock, so a waiter between its check and its
        // wait cannot miss it.
        self.mailbox(id).set_state(RunState::Exited);
        let _h = self.halt_replies.lock();
        self.halt_cv.notify_all();
        drop(_h);
        if self.active_count.load(Ordering::SeqCst) == 0 {
            let n = self.stop_notifier.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(evt) = n.as_ref() {
                let _ = evt.write(1);
            }
        }
    }

    /// `evt` is written when the last vCPU leaves its loop (and whenever one leaves after
    /// that). Register it before checking whether vCPUs are still running, so a stop in
    /// between is not missed.
    pub fn set_stop_notifier(&self, evt: vmm_sys_util::eventfd::EventFd) {
        *self.stop_notifier.lock().unwrap_or_else(|p| p.into_inner()) = Some(evt);
    }

    pub fn active_cpus(&self) -> CpuSet {
        self.active.lock().clone()
    }

    /// Requests that the VM stop; the first reason wins (bhyve `vm_suspend` returns EALREADY).
    pub fn suspend(&self, reason: SuspendReason) {
        {
            let mut r = self.suspend_reason.lock();
            if r.is_none() {
                *r = Some(reason);
                log::debug!("vm suspend requested: {reason:?}");
            }
        }
        self.suspended.store(true, Ordering::SeqCst);
        // Under each mailbox's lock: a vCPU parking (or a pauser waiting) checks `suspended`
        // under it, so it either sees the flag or is already waiting when this wakes it.
        for mb in self.all_mailboxes() {
            mb.wake();
        }
        self.kick_all();
    }

    pub fn is_suspended(&self) -> bool {
        self.suspended.load(Ordering::SeqCst)
    }

    pub fn suspend_reason(&self) -> Option<SuspendReason> {
        *self.suspend_reason.lock()
    }

    /// Waits up to `timeout` for every vCPU to leave its loop; true once the cpumask is empty.
    pub fn wait_all_stopped(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut active = self.active.lock();
        while !active.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            active = active.wait_timeout(&self.active_cv, deadline - now);
        }
        true
    }

    /// Sends the kick signal to every running vCPU thread.
    pub fn kick_all(&self) {
        let t = self.threads.lock();
        for tid in t.iter().flatten() {
            // SAFETY: the id belongs to a live vCPU thread: entries are cleared under this lock
            // before their thread exits. The signal has a handler installed by `VmControl::new`.
            unsafe { libc::pthread_kill(*tid, kick_signal()) };
        }
    }

    /// CPU time consumed so far by each running vCPU thread (None for a vCPU that has left).
    pub fn vcpu_cpu_times(&self) -> Vec<Option<Duration>> {
        let t = self.threads.lock();
        t.iter()
            .map(|tid| {
                let tid = (*tid)?;
                let mut clock: libc::clockid_t = 0;
                // SAFETY: tid is a live vCPU thread (entries are cleared under this lock before
                // the thread exits); clock and ts are valid output storage.
                unsafe {
                    if libc::pthread_getcpuclockid(tid, &mut clock) != 0 {
                        return None;
                    }
                    let mut ts = libc::timespec {
                        tv_sec: 0,
                        tv_nsec: 0,
                    };
                    if libc::clock_gettime(clock, &mut ts) != 0 {
                        return None;
                    }
                    Some(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
                }
            })
            .collect()
    }

    /// Posts `r` to vCPU `id` and kicks it out of KVM_RUN to read it; false if it has left
    /// (or stopped reading its mailbox).
    pub fn post(&self, id: usize, r: Request) -> bool {
        let Some(mb) = self.mailboxes.lock().get(id).cloned().flatten() else {
            return false;
        };
        if !mb.post(r) {
            return false;
        }
        let t = self.threads.lock();
        if let Some(Some(tid)) = t.get(id) {
            // SAFETY: as in `kick_all`: a live vCPU thread, with the kick handler installed.
            unsafe { libc::pthread_kill(*tid, kick_signal()) };
        }
        true
    }

    /// Posts what `make` builds to every vCPU, then kicks them all.
    fn post_all(&self, make: impl Fn() -> Request) {
        for mb in self.all_mailboxes() {
            mb.post(make());
        }
        self.kick_all();
    }

    /// Asks every vCPU for a RIP sample.
    pub fn request_samples(&self) {
        self.post_all(|| Request::SampleRip);
    }

    /// Asks vCPU `id` (paused) for its state, waiting up to `timeout` for the answer.
    pub fn save_vcpu(
        &self,
        id: usize,
        msrs: Vec<u32>,
        timeout: Duration,
    ) -> Result<VcpuState, String> {
        let (reply, rx) = mpsc::channel();
        if !self.post(id, Request::SaveState { msrs, reply }) {
            return Err(format!("vcpu {id} is not running"));
        }
        rx.recv_timeout(timeout)
            .map_err(|_| format!("vcpu {id} did not answer within {timeout:?}"))?
    }

    /// Gives vCPU `id` (paused) a saved state, waiting up to `timeout` for it to be taken.
    pub fn restore_vcpu(
        &self,
        id: usize,
        state: VcpuState,
        timeout: Duration,
    ) -> Result<(), String> {
        let (reply, rx) = mpsc::channel();
        let r = Request::RestoreState {
            state: Box::new(state),
            reply,
        };
        if !self.post(id, r) {
            return Err(format!("vcpu {id} is not running"));
        }
        rx.recv_timeout(timeout)
            .map_err(|_| format!("vcpu {id} did not answer within {timeout:?}"))?
    }

    /// A vCPU's answer to halt check `generation`.
    pub fn report_halt(&self, generation: u64, halted: bool) {
        let mut r = self.halt_replies.lock();
        if r.0 == generation {
            r.1.push(halted);
            self.halt_cv.notify_all();
        }
    }

    /// Asks every active vCPU whether it is halted with interrupts disabled (or waiting for a
    /// SIPI that nobody can send). True only if all say so within `timeout`: bhyve's
    /// "all vCPUs halted" that ends the VM with status 2.
    pub fn all_halted(&self, timeout: Duration) -> bool {
        let generation = {
            let mut r = self.halt_replies.lock();
            let g = self.halt_gen.fetch_add(1, Ordering::SeqCst) + 1;
            *r = (g, Vec::new());
            g
        };
        self.post_all(|| Request::HaltProbe(generation));
        let deadline = Instant::now() + timeout;
        let mut r = self.halt_replies.lock();
        loop {
            let active = self.active_count.load(Ordering::SeqCst);
            if r.0 != generation || self.is_suspended() || active == 0 {
                return false;
            }
            if r.1.len() >= active {
                return r.1.iter().all(|h| *h);
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            r = r.wait_timeout(&self.halt_cv, deadline - now);
        }
    }

    /// Whether the VM is paused (between `pause` and `resume`).
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Pauses every vCPU: returns once each is parked outside KVM_RUN (or has left), or an
    /// error if that takes longer than `timeout` (a vCPU stuck in a device handler, say).
    pub fn pause(&self, timeout: Duration) -> Result<(), String> {
        self.paused.store(true, Ordering::SeqCst);
        self.post_all(|| Request::Pause);
        let deadline = Instant::now() + timeout;
        let done = [RunState::Paused, RunState::Exited];
        let mut late = Vec::new();
        for (id, mb) in self.mailboxes.lock().iter().enumerate() {
            if let Some(mb) = mb {
                late.push((id, mb.clone()));
            }
        }
        let late: Vec<usize> = late
            .into_iter()
            .filter(|(_, mb)| !mb.wait_state(&done, deadline, self) && !self.is_suspended())
            .map(|(id, _)| id)
            .collect();
        if late.is_empty() {
            Ok(())
        } else {
            Err(format!("vcpus {late:?} did not pause within {timeout:?}"))
        }
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        for mb in self.all_mailboxes() {
            mb.post(Request::Resume);
        }
    }
}

/// The signal that kicks a vCPU out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run`, for the kick handler. A const-initialised Cell of a raw pointer:
    /// no lazy initialisation and no destructor, so reading it from a signal handler is sound.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Registers the calling vCPU thread's `kvm_run` with the kick handler.
pub fn set_thread_kvm_run(run: *mut kvm_run) {
    KVM_RUN.with(|c| c.set(run));
}

extern "C" fn kick_handler(_sig: libc::c_int) {
    let run = KVM_RUN.with(|c| c.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's kvm_run mapping, registered by its vCPU thread
        // and valid until the thread clears it before dropping the vCPU fd. A volatile byte
        // store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

fn install_kick_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: an all-zero sigaction is valid; we fill the handler field and install it.
        // No SA_RESTART: KVM_RUN must return EINTR when kicked.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = kick_handler as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        }
    });
}

impl rhyve_devices::VmStop for VmControl {
    fn stop(&self, reason: SuspendReason) {
        self.suspend(reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuset_basics() {
        let mut s = CpuSet::default();
        assert!(s.is_empty());
        s.set(0);
        s.set(70);
        s.set(1023);
        assert!(s.is_set(70) && s.is_set(0) && !s.is_set(1));
        assert_eq!(s.count(), 3);
        s.clear(70);
        s.clear(5000);
        assert_eq!(s.count(), 2);
        assert_eq!(s.ids().collect::<Vec<_>>(), vec![0, 1023]);
    }

    /// A stand-in vCPU thread: serves its mailbox as `vm_loop` does (parks on Pause until
    /// Resume), answers halt probes "not halted", leaves when suspended.
    fn fake_vcpu(c: &std::sync::Arc<VmControl>, id: usize) -> std::thread::JoinHandle<()> {
        let c = c.clone();
        std::thread::spawn(move || {
            let mb = c.mailbox(id);
            c.activate(id);
            'run: while !c.is_suspended() {
                while let Some(r) = mb.take() {
                    if let Request::Pause = r {
                        mb.set_state(RunState::Paused);
                        loop {
                            match mb.wait_request(&c) {
                                None => break 'run,
                                Some(Request::Resume) => break,
                                Some(Request::HaltProbe(g)) => c.report_halt(g, false),
                                Some(_) => {}
                            }
                        }
                        mb.set_state(RunState::Running);
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            c.deactivate(id);
        })
    }

    #[test]
    fn a_vcpu_goes_created_running_paused_running_exited() {
        let c = std::sync::Arc::new(VmControl::new());
        assert_eq!(c.vcpu_state(0), None);
        let mb = c.mailbox(0);
        assert_eq!(c.vcpu_state(0), Some(RunState::Created));
        let t = fake_vcpu(&c, 0);
        let deadline = Instant::now() + Duration::from_secs(20);
        while c.vcpu_state(0) != Some(RunState::Running) {
            assert!(Instant::now() < deadline, "never running");
            std::thread::sleep(Duration::from_millis(1));
        }
        c.pause(Duration::from_secs(20)).expect("the vCPU parks");
        assert_eq!(c.vcpu_state(0), Some(RunState::Paused));
        assert!(c.is_paused());
        c.resume();
        let deadline = Instant::now() + Duration::from_secs(20);
        while c.vcpu_state(0) != Some(RunState::Running) {
            assert!(Instant::now() < deadline, "never resumed");
            std::thread::sleep(Duration::from_millis(1));
        }
        // A paused vCPU is woken by a suspend and leaves.
        c.pause(Duration::from_secs(20)).expect("parks again");
        c.suspend(SuspendReason::PowerOff);
        t.join().expect("the fake vCPU thread ends");
        assert_eq!(c.vcpu_state(0), Some(RunState::Exited));
        assert!(
            !c.post(0, Request::SampleRip),
            "an exited vCPU takes no requests"
        );
        assert!(!mb.has_requests());
        // A vCPU that does not read its mailbox cannot make it grow without bound.
        let stuck = c.mailbox(1);
        let taken = (0..MAILBOX_MAX + 10)
            .filter(|_| c.post(1, Request::SampleRip))
            .count();
        assert_eq!(taken, MAILBOX_MAX);
        assert!(stuck.has_requests());
    }

    #[test]
    fn pause_halt_check_and_suspend_keep_the_lock_order() {
        // Debug builds check the order on every lock: pause() used to read the cpumask while
        // holding the pause lock, and the halt check while holding its replies' lock.
        let c = std::sync::Arc::new(VmControl::new());
        let t = fake_vcpu(&c, 0);
        let deadline = Instant::now() + Duration::from_secs(20);
        while c.active_cpus().count() != 1 {
            assert!(Instant::now() < deadline, "the fake vCPU never activated");
            std::thread::sleep(Duration::from_millis(1));
        }
        c.pause(Duration::from_secs(20)).expect("the vCPU parks");
        c.resume();
        // The fake vCPU never answers halt checks: not halted.
        assert!(!c.all_halted(Duration::from_millis(20)));
        c.suspend(SuspendReason::PowerOff);
        t.join().expect("the fake vCPU thread ends");
        assert!(c.wait_all_stopped(Duration::from_secs(5)));
        assert_eq!(c.active_count.load(Ordering::SeqCst), 0);
    }

    #[test]
    #[cfg(debug_assertions)]
    fn taking_a_lock_out_of_order_panics_in_debug_builds() {
        let c = VmControl::new();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _p = c.mailboxes.lock();
            let _a = c.active.lock();
        }));
        assert!(r.is_err(), "active after mailboxes must be refused");
        // The ranks of the guards dropped by the unwind are released.
        let _t = c.threads.lock();
        let _a = c.active.lock();
    }

    #[test]
    fn first_suspend_reason_wins() {
        let c = VmControl::new();
        assert_eq!(c.suspend_reason(), None);
        c.suspend(SuspendReason::TripleFault);
        c.suspend(SuspendReason::Reset);
        assert_eq!(c.suspend_reason(), Some(SuspendReason::TripleFault));
        assert!(c.is_suspended());
        for (r, s) in [
            (SuspendReason::Reset, 0),
            (SuspendReason::PowerOff, 1),
            (SuspendReason::Halt, 2),
            (SuspendReason::TripleFault, 3),
            (SuspendReason::Error, 4),
        ] {
            assert_eq!(r.exit_status(), s);
        }
    }
}
