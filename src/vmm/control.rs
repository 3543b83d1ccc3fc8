//! VM-wide run control shared by every vCPU thread, the devices and the main thread: the active
//! cpumask, the suspend request (bhyve `vm_suspend`), pause/resume, and the kick that gets a vCPU
//! out of KVM_RUN.
//!
//! Kick protocol: the kicker first publishes its request (suspend or pause flag), then sends
//! `KICK_SIGNAL` to the vCPU thread. The signal handler sets `immediate_exit` in that thread's
//! `kvm_run`, so a vCPU that checked the flags just before the request still leaves KVM_RUN at
//! once instead of running the guest until its next exit.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;

pub use crate::devices::SuspendReason;

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
}

#[derive(Default)]
struct PauseState {
    requested: bool,
    /// vCPUs currently parked because of the request.
    parked: usize,
}

/// The locks of the control block, in the only order they may be taken (ARCHITECTURE.md,
/// "Lock order"): a thread holding one takes only locks further down this list. Debug builds
/// check it on every lock (`Ranked`), so a test that takes them out of order panics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rank {
    Threads = 0,
    Active = 1,
    Pause = 2,
    HaltReplies = 3,
    SuspendReason = 4,
}

impl Rank {
    const ALL: [Rank; 5] = [
        Rank::Threads,
        Rank::Active,
        Rank::Pause,
        Rank::HaltReplies,
        Rank::SuspendReason,
    ];

    fn name(self) -> &'static str {
        match self {
            Rank::Threads => "VmControl.threads",
            Rank::Active => "VmControl.active",
            Rank::Pause => "VmControl.pause",
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
    pause_requested: AtomicBool,
    pause: Ranked<PauseState>,
    pause_cv: Condvar,
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
            pause_requested: AtomicBool::new(false),
            pause: Ranked::new(Rank::Pause, PauseState::default()),
            pause_cv: Condvar::new(),
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

    /// bhyve `vm_activate_cpu` + `CPU_SET_ATOMIC(vcpuid, &cpumask)`, and the kick registration.
    pub fn activate(&self, id: usize) {
        let mut t = self.threads.lock();
        if t.len() <= id {
            t.resize(id + 1, None);
        }
        // SAFETY: pthread_self has no preconditions.
        t[id] = Some(unsafe { libc::pthread_self() });
        let mut active = self.active.lock();
        active.set(id);
        self.active_count.store(active.count(), Ordering::SeqCst);
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
        // A vCPU that leaves while a pause or a halt check is pending must not be waited for.
        // Notified under each waiter's lock, so a waiter between its check of `active_count`
        // and its wait cannot miss it.
        let _p = self.pause.lock();
        self.pause_cv.notify_all();
        drop(_p);
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
        // Under the pause lock: a vCPU parking (or a pauser waiting) checks `suspended` under
        // it, so it either sees the flag or is already waiting when this wakes it.
        {
            let _p = self.pause.lock();
            self.pause_cv.notify_all();
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

    /// The halt check a vCPU should answer, if one is pending newer than `seen`.
    pub fn halt_check_pending(&self, seen: u64) -> Option<u64> {
        let g = self.halt_gen.load(Ordering::SeqCst);
        (g != seen).then_some(g)
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
        self.kick_all();
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

    pub fn pause_requested(&self) -> bool {
        self.pause_requested.load(Ordering::SeqCst)
    }

    /// Pauses every vCPU: returns once each active vCPU is parked outside KVM_RUN, or an error if
    /// that takes longer than `timeout` (a vCPU stuck in a device handler, say).
    pub fn pause(&self, timeout: Duration) -> Result<(), String> {
        self.pause_requested.store(true, Ordering::SeqCst);
        self.pause.lock().requested = true;
        self.kick_all();
        let deadline = Instant::now() + timeout;
        let mut p = self.pause.lock();
        loop {
            let active = self.active_count.load(Ordering::SeqCst);
            if p.parked >= active || self.is_suspended() {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "only {} of {active} vCPUs paused within {timeout:?}",
                    p.parked
                ));
            }
            p = p.wait_timeout(&self.pause_cv, deadline - now);
        }
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        let mut p = self.pause.lock();
        p.requested = false;
        self.pause_requested.store(false, Ordering::SeqCst);
        self.pause_cv.notify_all();
    }

    /// Called by a vCPU thread that saw the pause request: parks until resume or suspend.
    pub fn park(&self) {
        let mut p = self.pause.lock();
        p.parked += 1;
        self.pause_cv.notify_all();
        while p.requested && !self.is_suspended() {
            p = p.wait(&self.pause_cv);
        }
        p.parked -= 1;
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

impl crate::devices::VmStop for VmControl {
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
    }

    /// A stand-in vCPU thread: parks when a pause is requested, leaves when suspended.
    fn fake_vcpu(c: &std::sync::Arc<VmControl>, id: usize) -> std::thread::JoinHandle<()> {
        let c = c.clone();
        std::thread::spawn(move || {
            c.activate(id);
            while !c.is_suspended() {
                if c.pause_requested() {
                    c.park();
                } else {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            c.deactivate(id);
        })
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
            let _p = c.pause.lock();
            let _a = c.active.lock();
        }));
        assert!(r.is_err(), "active after pause must be refused");
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
