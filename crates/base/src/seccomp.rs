//! Seccomp filters by thread role (`-o sandbox.seccomp=true|false|log`, on by default).
//!
//! Every thread rhyve starts ([`crate::thread::spawn`]) installs its role's filter before its
//! own work begins, and the main thread installs the main role's filter once the VM is built,
//! before the event loop runs (`confine_main`). A filter lists the system calls the role
//! makes (and, for `ioctl` and `prctl`, the requests it makes); anything else:
//! - with `true`, the kernel stops the call and raises SIGSYS; rhyve's handler prints one line
//!   naming the thread, its role and the call's number, then the process dies of SIGSYS;
//! - with `log`, the call goes ahead and the kernel logs it (`dmesg`: `audit: type=1326 ...
//!   comm="vcpu 0" ... syscall=N`), for finding what a filter lacks;
//! - with `false`, no filter is installed.
//!
//! Filters stack: a thread created by a confined thread would be held by both filters. So a
//! confined thread never creates threads itself: [`crate::thread::spawn`] hands the creation
//! to a spawner thread started before any filter, and each new thread carries exactly its own
//! role's filter.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::thread::Role;

/// What a filter does with a call its role does not make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No filters.
    Off,
    /// Report and die of SIGSYS (the default).
    Kill,
    /// Let the call through; the kernel logs it.
    Log,
}

#[cfg(test)]
impl Mode {
    /// A mode by name, for the tests' child processes (rhyve itself reads `sandbox.seccomp`
    /// through the config tree's boolean parser).
    pub fn parse(v: &str) -> Option<Mode> {
        match v.to_ascii_lowercase().as_str() {
            "true" | "on" | "yes" | "1" => Some(Mode::Kill),
            "false" | "off" | "no" | "0" => Some(Mode::Off),
            "log" => Some(Mode::Log),
            _ => None,
        }
    }
}

const OFF: u8 = 0;
const KILL: u8 = 1;
const LOG: u8 = 2;
/// Off until `set_mode`: unit tests and tools that never call it run unconfined.
static MODE: AtomicU8 = AtomicU8::new(OFF);

/// Sets the mode for every filter installed from now on, and installs the SIGSYS reporter.
pub fn set_mode(m: Mode) {
    let v = match m {
        Mode::Off => OFF,
        Mode::Kill => KILL,
        Mode::Log => LOG,
    };
    MODE.store(v, Ordering::SeqCst);
    // The time zone, read now: the RTC's first localtime_r would otherwise open
    // /etc/localtime on a confined vCPU or timer thread.
    // SAFETY: tzset has no preconditions; it runs before any thread uses the time zone.
    unsafe { tzset() };
    if m != Mode::Off {
        prime_heap_shrink();
    }
    if m == Mode::Kill {
        install_reporter();
    }
}

/// The mode filters are installed with.
pub fn mode() -> Mode {
    match MODE.load(Ordering::SeqCst) {
        KILL => Mode::Kill,
        LOG => Mode::Log,
        _ => Mode::Off,
    }
}

/// The roles a filter exists for: each thread role, and the main thread (`None`).
pub fn roles() -> Vec<Option<Role>> {
    vec![
        None,
        Some(Role::Vcpu(0)),
        Some(Role::VirtioWorker),
        Some(Role::BlockIo),
        Some(Role::Timer),
        Some(Role::ConsoleBackend),
        Some(Role::Sampler),
        Some(Role::Api),
    ]
}

/// The name of a filter's role, as the reporter prints it.
pub fn role_name(role: Option<Role>) -> &'static str {
    role.map_or("main", |r| r.as_str())
}

thread_local! {
    static CONFINED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the calling thread runs under a filter (so it must not create threads itself).
pub fn confined() -> bool {
    CONFINED.with(|c| c.get())
}

/// Installs `role`'s filter (`None`: the main thread's) on the calling thread, unless the mode
/// is off. An error means the thread runs unconfined; callers stop rhyve on it.
pub fn confine(role: Option<Role>) -> Result<(), String> {
    let mismatch = match mode() {
        Mode::Off => return Ok(()),
        Mode::Kill => SeccompAction::Trap,
        Mode::Log => SeccompAction::Log,
    };
    let prog = program(role, mismatch)?;
    seccompiler::apply_filter(&prog).map_err(|e| {
        format!(
            "cannot install the {} seccomp filter: {e} (-o sandbox.seccomp=false runs without one)",
            role_name(role)
        )
    })?;
    CONFINED.with(|c| c.set(true));
    Ok(())
}

/// Compiles `role`'s filter with `mismatch` for calls outside it.
pub fn program(role: Option<Role>, mismatch: SeccompAction) -> Result<BpfProgram, String> {
    let filter = SeccompFilter::new(
        rules(role),
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| format!("the {} seccomp filter: {e}", role_name(role)))?;
    BpfProgram::try_from(filter).map_err(|e| format!("the {} seccomp filter: {e}", role_name(role)))
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// A rule matching when argument `arg` (32 bits) masked with `mask` equals `value`.
fn arg_is(arg: u8, mask: u64, value: u64) -> SeccompRule {
    // Both only fail for an argument index above 5 or an empty condition list.
    #[allow(clippy::expect_used)]
    SeccompRule::new(vec![SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(mask),
        value,
    )
    .expect("argument index below 6")])
    .expect("one condition")
}

fn allow(r: &mut Rules, calls: &[libc::c_long]) {
    for c in calls {
        r.insert(*c, vec![]);
    }
}

/// Adds conditional rules for `call` (unless it is already allowed outright).
fn allow_if(r: &mut Rules, call: libc::c_long, rules: Vec<SeccompRule>) {
    let e = r.entry(call).or_insert_with(|| rules.clone());
    if !e.is_empty() {
        for x in rules {
            if !e.contains(&x) {
                e.push(x);
            }
        }
    }
}

/// `ioctl` requests by number.
fn ioctls(r: &mut Rules, reqs: &[u64]) {
    allow_if(
        r,
        libc::SYS_ioctl,
        reqs.iter().map(|n| arg_is(1, 0xffff_ffff, *n)).collect(),
    );
}

/// `ioctl` requests of a whole type (the request's bits 8-15: 0xAE is KVM's).
fn ioctl_type(r: &mut Rules, ty: u64) {
    allow_if(r, libc::SYS_ioctl, vec![arg_is(1, 0xff00, ty << 8)]);
}

const KVMIO: u64 = 0xAE;
/// The terminal and non-blocking requests any thread may make (the terminal is restored on
/// every exit path): TCGETS, TCSETS, TCSETSW, TCSETSF, TIOCGWINSZ, FIONREAD, FIONBIO.
const TTY: &[u64] = &[0x5401, 0x5402, 0x5403, 0x5404, 0x5413, 0x541B, 0x5421];
/// What raises a guest interrupt: KVM_IRQ_LINE, KVM_IRQ_LINE_STATUS, KVM_SET_GSI_ROUTING,
/// KVM_SIGNAL_MSI.
const KVM_IRQ: &[u64] = &[0x4008_AE61, 0xC008_AE67, 0x4008_AE6A, 0x4020_AEA5];
/// TUNSETOFFLOAD and TUNSETVNETHDRSZ: virtio-net's activation, on the vCPU that wrote
/// DRIVER_OK.
const TUN_ACTIVATE: &[u64] = &[0x4004_54D0, 0x4004_54D8];
const PR_SET_NAME: u64 = 15;
const PR_GET_NAME: u64 = 16;

/// What every thread does: memory, locks, signals, time, its own name, reading and writing
/// the descriptors it was given, waiting on them, and ending.
fn base() -> Rules {
    let mut r = Rules::new();
    allow(
        &mut r,
        &[
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_readv,
            libc::SYS_writev,
            libc::SYS_close,
            libc::SYS_futex,
            libc::SYS_mmap,
            libc::SYS_munmap,
            libc::SYS_mprotect,
            libc::SYS_madvise,
            libc::SYS_mremap,
            libc::SYS_brk,
            libc::SYS_rt_sigprocmask,
            libc::SYS_rt_sigreturn,
            libc::SYS_rt_sigaction,
            libc::SYS_sigaltstack,
            libc::SYS_sched_getaffinity,
            libc::SYS_sched_yield,
            libc::SYS_gettid,
            libc::SYS_getpid,
            libc::SYS_tgkill,
            libc::SYS_clock_gettime,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_exit,
            libc::SYS_exit_group,
            libc::SYS_restart_syscall,
            libc::SYS_rseq,
            libc::SYS_set_robust_list,
            libc::SYS_getrandom,
            libc::SYS_fcntl,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            libc::SYS_statx,
            libc::SYS_lseek,
        ],
    );
    allow_if(
        &mut r,
        libc::SYS_prctl,
        vec![
            arg_is(0, 0xffff_ffff, PR_SET_NAME),
            arg_is(0, 0xffff_ffff, PR_GET_NAME),
        ],
    );
    ioctls(&mut r, TTY);
    r
}

/// Socket I/O on descriptors a thread was handed (a console's or the API's clients).
const SOCKET_IO: &[libc::c_long] = &[
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
];

/// The filter rules of `role` (`None`: the main thread).
pub fn rules(role: Option<Role>) -> Rules {
    let mut r = base();
    match role {
        Some(Role::Vcpu(_)) => {
            // Runs the guest and its exits; device activation on DRIVER_OK (eventfds, an
            // epoll set, virtio-net's offloads); pinning (-p).
            ioctl_type(&mut r, KVMIO);
            ioctls(&mut r, TUN_ACTIVATE);
            allow(
                &mut r,
                &[
                    libc::SYS_eventfd2,
                    libc::SYS_epoll_create1,
                    libc::SYS_sched_setaffinity,
                    libc::SYS_dup,
                    // A UART's output to a TCP client; a flash's variable store.
                    libc::SYS_sendto,
                    libc::SYS_sendmsg,
                    libc::SYS_msync,
                ],
            );
        }
        Some(Role::VirtioWorker) => {
            // Serves rings: taps and console sockets it was handed, interrupts.
            ioctls(&mut r, KVM_IRQ);
            allow(&mut r, SOCKET_IO);
            allow(&mut r, &[libc::SYS_eventfd2, libc::SYS_epoll_create1]);
        }
        Some(Role::BlockIo) => {
            allow(
                &mut r,
                &[
                    libc::SYS_pread64,
                    libc::SYS_pwrite64,
                    libc::SYS_preadv,
                    libc::SYS_pwritev,
                    libc::SYS_preadv2,
                    libc::SYS_pwritev2,
                    libc::SYS_fsync,
                    libc::SYS_fdatasync,
                    libc::SYS_fallocate,
                ],
            );
            // BLKDISCARD, BLKZEROOUT, BLKGETSIZE64 (host block devices as disks).
            ioctls(&mut r, &[0x1277, 0x127F, 0x8008_1272]);
        }
        Some(Role::Timer) => {
            ioctls(&mut r, KVM_IRQ);
            allow(
                &mut r,
                &[libc::SYS_timerfd_settime, libc::SYS_timerfd_gettime],
            );
        }
        Some(Role::ConsoleBackend) => {
            ioctls(&mut r, KVM_IRQ);
            allow(&mut r, SOCKET_IO);
        }
        Some(Role::Sampler) => {
            ioctl_type(&mut r, KVMIO);
        }
        Some(Role::Api) => {
            allow(&mut r, SOCKET_IO);
        }
        None => {
            // Builds, rebuilds and restores VMs, takes snapshots, migrates, answers signals:
            // files, sockets, KVM and taps. Never: executing programs, tracing, mounting,
            // namespaces, modules, changing credentials.
            allow(&mut r, MAIN);
            allow(&mut r, SOCKET_IO);
            r.insert(libc::SYS_ioctl, vec![]);
            r.insert(libc::SYS_prctl, vec![]);
        }
    }
    r
}

/// What the main thread may do beyond `base` and `SOCKET_IO`.
const MAIN: &[libc::c_long] = &[
    libc::SYS_openat,
    libc::SYS_open,
    libc::SYS_creat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_chmod,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getcwd,
    libc::SYS_getdents64,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_flock,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_sendfile,
    libc::SYS_copy_file_range,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_connect,
    libc::SYS_setsockopt,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_signalfd4,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_tid_address,
    libc::SYS_sched_setaffinity,
    libc::SYS_prlimit64,
    libc::SYS_getrlimit,
    libc::SYS_mincore,
    libc::SYS_msync,
    libc::SYS_mlock,
    libc::SYS_munlock,
    libc::SYS_mlockall,
    libc::SYS_memfd_create,
    libc::SYS_uname,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getppid,
    libc::SYS_kill,
    libc::SYS_wait4,
    libc::SYS_clock_getres,
    libc::SYS_arch_prctl,
];

extern "C" {
    fn tzset();
}

/// Makes glibc's malloc shrink a thread arena's heap once, while nothing is confined yet.
/// The first such shrink in a process opens /proc/sys/vm/overcommit_memory (glibc caches the
/// answer); left to chance, it happens on whichever confined thread first frees a few hundred
/// KiB from its own arena, and the filter stops rhyve there. A new thread is given an arena of
/// its own (the main thread keeps the main one), so its blocks come from a thread heap.
fn prime_heap_shrink() {
    let t = std::thread::Builder::new()
        .name("malloc prime".into())
        .spawn(shrink_arena_heap);
    if let Ok(h) = t {
        let _ = h.join();
    }
}

/// Allocates and frees blocks below malloc's mmap threshold (128 KiB) that together pass its
/// trim threshold (128 KiB), so the calling thread's arena heap shrinks; returns their size.
fn shrink_arena_heap() -> usize {
    let blocks: Vec<Vec<u8>> = (0..4).map(|_| vec![1u8; 60 << 10]).collect();
    std::hint::black_box(&blocks).iter().map(Vec::len).sum()
}

/// Installs the SIGSYS handler that reports a forbidden call.
fn install_reporter() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        // SAFETY: a zeroed sigaction with a handler that only makes async-signal-safe calls
        // (prctl, write, sigaction, tgkill); the pointers passed are valid for the call.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = report as *const () as libc::sighandler_t;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut());
        }
    });
}

/// Writes `bytes` at `at` in `buf`, as far as it fits; returns the new end.
fn put(buf: &mut [u8], at: usize, bytes: &[u8]) -> usize {
    let mut n = at;
    for b in bytes {
        let Some(slot) = buf.get_mut(n) else { break };
        *slot = *b;
        n += 1;
    }
    n
}

/// The SIGSYS handler: one line naming the thread, its role and the call, then death by
/// SIGSYS. No allocation, no locks.
extern "C" fn report(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let mut buf = [0u8; 320];
    let mut comm = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes and a NUL into a 17-byte buffer.
    unsafe { libc::prctl(libc::PR_GET_NAME, comm.as_mut_ptr()) };
    let comm_len = comm.iter().position(|b| *b == 0).unwrap_or(16);
    // The SIGSYS fields follow the 16-byte header: the call's address (8 bytes), then its
    // number (a 32-bit int).
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a whole siginfo_t (128 bytes) for SA_SIGINFO handlers;
        // bytes 24..28 of a SIGSYS siginfo hold si_syscall.
        unsafe { std::ptr::read_unaligned((info as *const u8).add(24) as *const i32) }
    };
    let role = role_name(crate::thread::current());
    let mut n = put(&mut buf, 0, b"rhyve: seccomp: thread '");
    n = put(&mut buf, n, comm.get(..comm_len).unwrap_or_default());
    n = put(&mut buf, n, b"' (");
    n = put(&mut buf, n, role.as_bytes());
    n = put(&mut buf, n, b" role) made system call ");
    let mut digits = [0u8; 12];
    let mut d = digits.len();
    let mut v = nr.unsigned_abs();
    loop {
        d -= 1;
        if let Some(slot) = digits.get_mut(d) {
            *slot = b'0' + (v % 10) as u8;
        }
        v /= 10;
        if v == 0 || d == 0 {
            break;
        }
    }
    if nr < 0 {
        n = put(&mut buf, n, b"-");
    }
    n = put(&mut buf, n, digits.get(d..).unwrap_or_default());
    n = put(
        &mut buf,
        n,
        b", which its filter forbids: stopping (a rhyve defect: please report it; \
          -o sandbox.seccomp=log logs such calls instead)\r\n",
    );
    // SAFETY: write, sigaction, getpid, gettid and tgkill are async-signal-safe; `buf` holds
    // `n` bytes. SIGSYS is blocked while this handler runs, so the signal raised here is
    // delivered with the default action (terminate) once it returns.
    unsafe {
        libc::write(2, buf.as_ptr() as *const libc::c_void, n);
        libc::signal(libc::SIGSYS, libc::SIG_DFL);
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::gettid(),
            libc::SIGSYS,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::Command;

    const CHILD: &str = "RHYVE_SECCOMP_CHILD";

    /// The call each role's thread attempts: executing a program (main), opening a file (every
    /// other role). Harmless when let through: the path does not exist.
    fn forbidden(role: Option<Role>) -> libc::c_long {
        if role.is_none() {
            libc::SYS_execve
        } else {
            libc::SYS_openat
        }
    }

    fn attempt(role: Option<Role>) -> libc::c_long {
        let path = c"/nonexistent/rhyve-seccomp-test";
        // SAFETY: a NUL-terminated path and null argument vectors; the path does not exist,
        // so neither call does anything but fail.
        unsafe {
            match forbidden(role) {
                libc::SYS_execve => libc::syscall(
                    libc::SYS_execve,
                    path.as_ptr(),
                    std::ptr::null::<*const libc::c_char>(),
                    std::ptr::null::<*const libc::c_char>(),
                ),
                n => libc::syscall(n, libc::AT_FDCWD, path.as_ptr(), libc::O_RDONLY),
            }
        }
    }

    /// Runs in a child process only (the parent tests below set `RHYVE_SECCOMP_CHILD` to
    /// `ROLE-INDEX:MODE`): confines one thread as that role, makes an allowed call and then
    /// the forbidden one.
    #[test]
    fn child() {
        let Ok(spec) = std::env::var(CHILD) else {
            return;
        };
        let (i, m) = spec.split_once(':').expect("INDEX:MODE");
        let role = roles()[i.parse::<usize>().expect("an index")];
        let lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: setrlimit with a valid struct: no core file from the SIGSYS death.
        unsafe { libc::setrlimit(libc::RLIMIT_CORE, &lim) };
        crate::thread::start_spawner().expect("spawner");
        set_mode(Mode::parse(m).expect("a mode"));
        let body = move || {
            // SAFETY: getppid has no preconditions.
            let allowed = unsafe { libc::syscall(libc::SYS_getpid) };
            assert!(allowed > 0, "getpid is allowed for every role");
            if role == Some(Role::Vcpu(0)) {
                // A thread started by a confined thread carries its own role's filter only:
                // a block I/O thread may pread, which a vCPU may not.
                let h = crate::thread::spawn(Role::BlockIo, "child io", || {
                    let mut b = [0u8; 1];
                    // SAFETY: a one-byte buffer; fd -1 makes the call fail with EBADF.
                    unsafe { libc::pread(-1, b.as_mut_ptr() as *mut libc::c_void, 1, 0) }
                })
                .expect("spawn from a confined thread");
                assert_eq!(h.join().expect("join"), -1);
                println!("a block I/O thread started by a vCPU made its pread");
            }
            let r = attempt(role);
            println!("the forbidden call returned {r}");
        };
        match role {
            None => {
                confine(None).expect("confine main");
                body();
            }
            Some(r) => crate::thread::spawn(r, "child", body)
                .expect("spawn")
                .join()
                .expect("join"),
        }
    }

    /// Runs in a child process only (`RHYVE_SECCOMP_MANY` set): many confined block I/O
    /// threads alive at once, each allocating and freeing a few MiB in small blocks. Each
    /// thread's blocks come from its own malloc arena; when the freed blocks leave more than
    /// the trim threshold at the top of an arena's heap, glibc shrinks that heap, and the
    /// first time it does in a process it opens /proc/sys/vm/overcommit_memory (a block I/O
    /// thread was caught doing that in a SeaBIOS boot).
    #[test]
    fn many_threads_child() {
        if std::env::var_os("RHYVE_SECCOMP_MANY").is_none() {
            return;
        }
        crate::thread::start_spawner().expect("spawner");
        set_mode(Mode::Kill);
        let n = 24;
        let gate = std::sync::Arc::new(std::sync::Barrier::new(n));
        let hs: Vec<_> = (0..n)
            .map(|i| {
                let gate = gate.clone();
                crate::thread::spawn(Role::BlockIo, format!("many {i}"), move || {
                    gate.wait();
                    let total = shrink_arena_heap() + i;
                    gate.wait();
                    total
                })
                .expect("spawn")
            })
            .collect();
        let total: usize = hs.into_iter().map(|h| h.join().expect("join")).sum();
        println!("{n} confined threads allocated {total} bytes");
    }

    #[test]
    fn many_confined_threads_allocate_without_opening_files() {
        let out = run_test_child("many_threads_child", "RHYVE_SECCOMP_MANY", "1");
        let outs = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && outs.contains("24 confined threads allocated"),
            "{:?} {outs} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs this binary's test `seccomp::tests::NAME` alone in a child process, with `key`
    /// set to `value`.
    fn run_test_child(name: &str, key: &str, value: &str) -> std::process::Output {
        Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", &format!("seccomp::tests::{name}"), "--nocapture"])
            .env(key, value)
            .output()
            .expect("run the child")
    }

    fn run_child(i: usize, mode: &str) -> std::process::Output {
        run_test_child("child", CHILD, &format!("{i}:{mode}"))
    }

    #[test]
    fn each_role_dies_of_sigsys_naming_itself_on_a_call_outside_its_filter() {
        for (i, role) in roles().into_iter().enumerate() {
            let nr = forbidden(role);
            assert!(
                !rules(role).contains_key(&nr),
                "{} allows call {nr}",
                role_name(role)
            );
            let out = run_child(i, "true");
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.signal(),
                Some(libc::SIGSYS),
                "{}: {:?}, stderr {err}",
                role_name(role),
                out.status
            );
            let line = format!("({} role) made system call {nr}, which", role_name(role));
            assert!(err.contains(&line), "{}: {err}", role_name(role));
            let outs = String::from_utf8_lossy(&out.stdout);
            assert!(!outs.contains("forbidden call returned"), "{outs}");
            if role == Some(Role::Vcpu(0)) {
                assert!(outs.contains("made its pread"), "{outs} {err}");
            }
        }
    }

    #[test]
    fn log_mode_lets_a_forbidden_call_through_and_false_installs_nothing() {
        for mode in ["log", "false"] {
            for (i, role) in roles().into_iter().enumerate() {
                let out = run_child(i, mode);
                let outs = String::from_utf8_lossy(&out.stdout);
                assert!(
                    out.status.success() && outs.contains("the forbidden call returned -1"),
                    "{mode} {}: {:?} {outs} {}",
                    role_name(role),
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }

    #[test]
    fn every_filter_compiles_and_mode_values_parse() {
        for role in roles() {
            program(role, SeccompAction::Trap).expect("compiles");
        }
        assert_eq!(Mode::parse("true"), Some(Mode::Kill));
        assert_eq!(Mode::parse("log"), Some(Mode::Log));
        assert_eq!(Mode::parse("off"), Some(Mode::Off));
        assert_eq!(Mode::parse("sometimes"), None);
    }
}
