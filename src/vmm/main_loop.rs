//! The main thread's event loop while a VM runs: one epoll set over
//! - the VM-stopped event (written when the last vCPU leaves its loop),
//! - a periodic timer for the "every vCPU halted" check (bhyve's status 2),
//! - the control signals, through a signalfd (their handling is the caller's),
//!
//! with room for more sources (the API socket). Nothing here blocks a vCPU.

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
        if idle && !ctl.pause_requested() && ctl.all_halted(INTERVAL) {
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

/// Runs until every vCPU has left its loop. Signals read from `signals` go to `on_signal`.
pub fn run(ctl: &VmControl, mut signals: Option<(&Signals, &mut dyn FnMut(i32))>) {
    let mut halt = HaltCheck {
        last: ctl.vcpu_cpu_times(),
    };
    let (epoll, _stopped, mut timer) = match setup(ctl, signals.as_ref().map(|s| s.0)) {
        Ok(s) => s,
        Err(e) => {
            // Without the loop the VM would run uncontrolled: stop it, and wait the simple way.
            log::error!("cannot set up the main event loop: {e}; stopping the VM");
            ctl.suspend(SuspendReason::Error);
            while !ctl.wait_all_stopped(INTERVAL) {}
            return;
        }
    };
    let mut events = [EpollEvent::default(); 4];
    while !ctl.wait_all_stopped(Duration::ZERO) {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("main event loop: {e}; stopping the VM");
                ctl.suspend(SuspendReason::Error);
                while !ctl.wait_all_stopped(INTERVAL) {}
                return;
            }
        };
        for ev in events.iter().take(n) {
            match ev.data() {
                TICK => {
                    // The count of expirations does not matter; reading it re-arms the event.
                    let _ = timer.wait();
                    halt.tick(ctl);
                }
                SIGNAL => {
                    if let Some((s, on_signal)) = signals.as_mut() {
                        while let Some(sig) = s.next() {
                            on_signal(sig);
                        }
                    }
                }
                _ => {} // STOPPED: the loop condition sees it.
            }
        }
    }
}

/// The epoll set, the stopped event (registered with `ctl`) and the halt-check timer.
fn setup(ctl: &VmControl, signals: Option<&Signals>) -> std::io::Result<(Epoll, EventFd, TimerFd)> {
    let epoll = Epoll::new()?;
    let evt = EventFd::new(libc::EFD_NONBLOCK)?;
    ctl.set_stop_notifier(evt.try_clone()?);
    add(&epoll, evt.as_raw_fd(), STOPPED)?;
    let mut timer = TimerFd::new()?;
    timer.reset(INTERVAL, Some(INTERVAL))?;
    add(&epoll, timer.as_raw_fd(), TICK)?;
    if let Some(s) = signals {
        add(&epoll, s.fd.as_raw_fd(), SIGNAL)?;
    }
    Ok((epoll, evt, timer))
}
