//! The main thread's event loop: one epoll set over
//! - with a VM, the VM-stopped event (written when the last vCPU leaves its loop) and a
//!   periodic timer for the "every vCPU halted" check (bhyve's status 2),
//! - the control signals, through a signalfd,
//! - the API's calls-waiting event (`--api-socket`),
//!
//! signals and API calls going to the caller (`src/control_plane.rs`). Nothing here blocks a
//! vCPU.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::control::{SuspendReason, VmControl};

/// The control signals, read from a signalfd. The signals must be blocked in every thread
/// (block them before the first thread starts), or a thread may take them first.
pub struct Signals {
    fd: OwnedFd,
}

impl Signals {
    pub fn new(set: &libc::sigset_t) -> std::io::Result<Signals> {
        // SAFETY: set is a valid, initialised signal set; -1 asks for a new descriptor.
        let fd = unsafe { libc::signalfd(-1, set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: signalfd returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Signals { fd })
    }

    /// The next pending signal's number, if any.
    fn next(&self) -> Option<i32> {
        // SAFETY: signalfd_siginfo is plain data; all-zero is a valid value.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into `info`, which is exactly that large.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        (usize::try_from(n).ok() == Some(size)).then_some(info.ssi_signo as i32)
    }
}

/// How often the halt check looks at the vCPU threads' CPU time.
const INTERVAL: Duration = Duration::from_millis(500);
/// CPU time per interval under which a vCPU thread counts as asleep.
const IDLE: Duration = Duration::from_millis(5);

const STOPPED: u64 = 0;
const TICK: u64 = 1;
const SIGNAL: u64 = 2;
const API: u64 = 3;

/// What the loop hands to its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A control signal arrived.
    Signal(i32),
    /// The API has calls waiting.
    Api,
}

/// What the caller wants after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Leave the loop (the caller changed what it runs: a VM booted, rebooted or deleted, or
    /// rhyve is exiting).
    Return,
}

/// Why [`run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Every vCPU of the VM left its loop.
    VmStopped,
    /// The caller asked to leave.
    Returned,
}

/// Watches for bhyve's "all vCPUs halted" (status 2): when no vCPU thread has used CPU time
/// for a whole interval, the vCPUs are asked whether they are halted for good (a busy VM is
/// never kicked for this).
struct HaltCheck {
    last: Vec<Option<Duration>>,
}

impl HaltCheck {
    fn tick(&mut self, ctl: &VmControl) {
        let now = ctl.vcpu_cpu_times();
        let idle = now.iter().zip(&self.last).all(|(n, l)| match (n, l) {
            (Some(n), Some(l)) => n.saturating_sub(*l) < IDLE,
            _ => true,
        });
        self.last = now;
        if idle && !ctl.is_paused() && ctl.all_halted(INTERVAL) {
            log::info!("every vCPU is halted with interrupts disabled");
            ctl.suspend(SuspendReason::Halt);
        }
    }
}

fn add(epoll: &Epoll, fd: RawFd, token: u64) -> std::io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        fd,
        EpollEvent::new(EventSet::IN, token),
    )
}

/// Runs until every vCPU of `ctl`'s VM has left its loop (with no VM, until the caller
/// asks to leave). Control signals from `signals`, and the API's readiness on `api`, go to
/// `on_event` on this (the main) thread.
pub fn run(
    ctl: Option<&VmControl>,
    signals: Option<&Signals>,
    api: Option<RawFd>,
    on_event: &mut dyn FnMut(Event) -> Flow,
) -> Ended {
    let mut halt = ctl.map(|c| HaltCheck {
        last: c.vcpu_cpu_times(),
    });
    let stopped = || ctl.is_some_and(|c| c.wait_all_stopped(Duration::ZERO));
    let fail = |what: String| {
        // Without the loop the VM would run uncontrolled: stop it, and wait the simple way.
        log::error!("{what}; stopping the VM");
        if let Some(c) = ctl {
            c.suspend(SuspendReason::Error);
            while !c.wait_all_stopped(INTERVAL) {}
        }
        Ended::VmStopped
    };
    let (epoll, _stopped_evt, mut timer) = match setup(ctl, signals, api) {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot set up the main event loop: {e}")),
    };
    let mut events = [EpollEvent::default(); 8];
    while !stopped() {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return fail(format!("main event loop: {e}")),
        };
        for ev in events.iter().take(n) {
            let flow = match ev.data() {
                TICK => {
                    // The count of expirations does not matter; reading it re-arms the event.
                    if let Some(t) = timer.as_mut() {
                        let _ = t.wait();
                    }
                    if let (Some(h), Some(c)) = (halt.as_mut(), ctl) {
                        h.tick(c);
                    }
                    Flow::Continue
                }
                SIGNAL => {
                    let mut flow = Flow::Continue;
                    if let Some(s) = signals {
                        while let Some(sig) = s.next() {
                            if on_event(Event::Signal(sig)) == Flow::Return {
                                flow = Flow::Return;
                            }
                        }
                    }
                    flow
                }
                API => on_event(Event::Api),
                _ => Flow::Continue, // STOPPED: the loop condition sees it.
            };
            if flow == Flow::Return {
                return Ended::Returned;
            }
        }
    }
    Ended::VmStopped
}

/// The epoll set, the stopped event (registered with `ctl`) and the halt-check timer (both
/// only with a VM), the signals and the API.
fn setup(
    ctl: Option<&VmControl>,
    signals: Option<&Signals>,
    api: Option<RawFd>,
) -> std::io::Result<(Epoll, Option<EventFd>, Option<TimerFd>)> {
    let epoll = Epoll::new()?;
    let (mut evt, mut timer) = (None, None);
    if let Some(ctl) = ctl {
        let e = EventFd::new(libc::EFD_NONBLOCK)?;
        ctl.set_stop_notifier(e.try_clone()?);
        add(&epoll, e.as_raw_fd(), STOPPED)?;
        let mut t = TimerFd::new()?;
        t.reset(INTERVAL, Some(INTERVAL))?;
        add(&epoll, t.as_raw_fd(), TICK)?;
        evt = Some(e);
        timer = Some(t);
    }
    if let Some(s) = signals {
        add(&epoll, s.fd.as_raw_fd(), SIGNAL)?;
    }
    if let Some(fd) = api {
        add(&epoll, fd, API)?;
    }
    Ok((epoll, evt, timer))
}
