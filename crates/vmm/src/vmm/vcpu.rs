//! The vCPU lifecycle (bhyve `bhyve_start_vcpu` / `fbsdrun_addcpu` / `fbsdrun_start_thread`).
//!
//! vCPU 0 is the BSP: with a boot ROM it is reset to the x86 power-on state and starts at the
//! reset vector. Every other vCPU is an AP: KVM's in-kernel LAPIC keeps it in KVM_RUN until the
//! guest sends it INIT and SIPI, so its thread simply enters `vm_loop`. Each vCPU is activated
//! in the VM's cpumask, gets its own thread named `vcpu N`, and clears itself from the cpumask
//! when it leaves the loop.
//!
//! Its states (`RunState`): created (mailbox made, thread not yet in its loop), running,
//! paused (parked outside KVM_RUN, still answering requests), exited. What can be asked of it
//! goes through its mailbox (`control::Request`), served by `serve_mailbox` between two
//! KVM_RUNs: pause and resume, the halt probe, a RIP sample, and saving or restoring its whole
//! state (`VcpuState`).

use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED,
    KVM_MP_STATE_UNINITIALIZED,
};
use kvm_ioctls::VcpuFd;

use super::control::{set_thread_kvm_run, Mailbox, Request, RunState, SuspendReason, VmControl};
use super::vm_loop::vm_loop;
use super::vmexit::VcpuCtx;
use super::VmShared;

/// A vCPU's whole state as KVM holds it: what a snapshot saves and a restore puts back. The
/// parts a KVM may not offer (PVM has no XSAVE area for some guests, say) are optional: saved
/// when KVM gives them, restored when saved.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct VcpuState {
    pub id: u32,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: Option<kvm_xsave>,
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: Option<kvm_debugregs>,
    pub lapic: Option<kvm_lapic_state>,
    pub mp_state: kvm_mp_state,
    pub events: Option<kvm_vcpu_events>,
    /// (index, value) of every MSR asked for that KVM read.
    pub msrs: Vec<(u32, u64)>,
}

/// Reads vCPU `id`'s state: `msrs` lists the MSRs wanted (KVM's list of saveable ones).
fn save_state(vcpu: &VcpuFd, id: u32, msrs: &[u32]) -> Result<VcpuState, String> {
    let e = |what: &str, err: kvm_ioctls::Error| format!("vcpu {id}: {what}: {err}");
    let mut values = Vec::with_capacity(msrs.len());
    // KVM reads MSRs in order and stops at the first it cannot: read in batches, skipping
    // the one that stopped it.
    let mut rest = msrs;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut m =
            Msrs::from_entries(&entries).map_err(|err| format!("vcpu {id}: MSRs: {err:?}"))?;
        let n = vcpu
            .get_msrs(&mut m)
            .map_err(|err| e("KVM_GET_MSRS", err))?;
        values.extend(m.as_slice().iter().take(n).map(|m| (m.index, m.data)));
        rest = rest.get(n.saturating_add(1)..).unwrap_or_default();
    }
    Ok(VcpuState {
        id,
        regs: vcpu.get_regs().map_err(|err| e("KVM_GET_REGS", err))?,
        sregs: vcpu.get_sregs().map_err(|err| e("KVM_GET_SREGS", err))?,
        xsave: vcpu.get_xsave().ok(),
        xcrs: vcpu.get_xcrs().ok(),
        debugregs: vcpu.get_debug_regs().ok(),
        lapic: vcpu.get_lapic().ok(),
        mp_state: vcpu
            .get_mp_state()
            .map_err(|err| e("KVM_GET_MP_STATE", err))?,
        events: vcpu.get_vcpu_events().ok(),
        msrs: values,
    })
}

/// Puts a saved state back (the order KVM needs: special registers before the general ones
/// and the LAPIC, MSRs after the mode they belong to, pending events last).
fn restore_state(vcpu: &VcpuFd, id: u32, s: &VcpuState) -> Result<(), String> {
    let e = |what: &str, err: kvm_ioctls::Error| format!("vcpu {id}: {what}: {err}");
    if s.id != id {
        return Err(format!("vcpu {id}: given the state of vcpu {}", s.id));
    }
    vcpu.set_sregs(&s.sregs)
        .map_err(|err| e("KVM_SET_SREGS", err))?;
    vcpu.set_regs(&s.regs)
        .map_err(|err| e("KVM_SET_REGS", err))?;
    if let Some(x) = &s.xsave {
        // SAFETY: the area was read from KVM by KVM_GET_XSAVE (a legacy-sized area, which
        // KVM_SET_XSAVE takes as it is).
        unsafe { vcpu.set_xsave(x) }.map_err(|err| e("KVM_SET_XSAVE", err))?;
    }
    // A host without XSAVE reads no XCRs (nr_xcrs 0) and refuses to set any.
    if let Some(x) = s.xcrs.as_ref().filter(|x| x.nr_xcrs > 0) {
        vcpu.set_xcrs(x).map_err(|err| {
            let xcr0 = x.xcrs.first().map_or(0, |r| r.value);
            e(
                &format!("KVM_SET_XCRS (XCR0 {xcr0:#x}, {} XCRs)", x.nr_xcrs),
                err,
            )
        })?;
    }
    if let Some(d) = &s.debugregs {
        vcpu.set_debug_regs(d)
            .map_err(|err| e("KVM_SET_DEBUGREGS", err))?;
    }
    if let Some(l) = &s.lapic {
        vcpu.set_lapic(l).map_err(|err| e("KVM_SET_LAPIC", err))?;
    }
    let entries: Vec<kvm_msr_entry> = s
        .msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let m = Msrs::from_entries(&entries).map_err(|err| format!("vcpu {id}: MSRs: {err:?}"))?;
    let n = vcpu.set_msrs(&m).map_err(|err| e("KVM_SET_MSRS", err))?;
    if n != entries.len() {
        let at = entries.get(n).map_or(0, |m| m.index);
        return Err(format!(
            "vcpu {id}: KVM refused MSR {at:#x} ({n} of {} set)",
            entries.len()
        ));
    }
    vcpu.set_mp_state(s.mp_state)
        .map_err(|err| e("KVM_SET_MP_STATE", err))?;
    if let Some(ev) = &s.events {
        vcpu.set_vcpu_events(ev)
            .map_err(|err| e("KVM_SET_VCPU_EVENTS", err))?;
    }
    Ok(())
}

/// Whether this vCPU can only be woken by another CPU or an NMI: halted with RFLAGS.IF clear,
/// or an AP still waiting for INIT/SIPI. With KVM's in-kernel LAPIC a HLT never exits to
/// userspace, so this is asked after a kick (see `VmControl::all_halted`).
pub fn halted_for_good(vcpu: &VcpuFd, id: u32) -> bool {
    const RFLAGS_IF: u64 = 1 << 9;
    let Ok(mp) = vcpu.get_mp_state() else {
        return false;
    };
    // The registers matter only to a halted vCPU, or to the debug line below.
    let regs = (mp.mp_state == KVM_MP_STATE_HALTED || log::log_enabled!(log::Level::Debug))
        .then(|| vcpu.get_regs().ok())
        .flatten();
    let halted = match mp.mp_state {
        KVM_MP_STATE_UNINITIALIZED | KVM_MP_STATE_INIT_RECEIVED => true,
        KVM_MP_STATE_HALTED => regs.is_some_and(|r| r.rflags & RFLAGS_IF == 0),
        _ => false,
    };
    if let Some(r) = regs {
        log::debug!(
            "vcpu {id} halt check: mp_state {} rip {:#x} rflags {:#x}: {}",
            mp.mp_state,
            r.rip,
            r.rflags,
            if halted { "halted" } else { "live" }
        );
    }
    halted
}

/// What the vCPU loop does after serving its mailbox.
#[derive(Debug, PartialEq, Eq)]
pub enum Served {
    /// Go on into KVM_RUN.
    Run,
    /// The VM was suspended while this vCPU was parked: leave the loop.
    Leave,
}

/// Serves every request waiting in this vCPU's mailbox (called between two KVM_RUNs). A
/// `Pause` parks the vCPU here, answering other requests, until `Resume` or a suspend.
pub fn serve_mailbox(vcpu: &mut VcpuFd, ctx: &VcpuCtx<'_>, mb: &Mailbox) -> Served {
    let ctl = &ctx.vm.ctl;
    while let Some(r) = mb.take() {
        match r {
            Request::Pause => {
                mb.set_state(RunState::Paused);
                loop {
                    match mb.wait_request(ctl) {
                        None => return Served::Leave,
                        Some(Request::Resume) => break,
                        Some(Request::Pause) => {}
                        Some(other) => answer(vcpu, ctx, other, true),
                    }
                }
                mb.set_state(RunState::Running);
            }
            Request::Resume => {}
            other => answer(vcpu, ctx, other, false),
        }
    }
    Served::Run
}

/// Answers one request other than pause and resume.
fn answer(vcpu: &mut VcpuFd, ctx: &VcpuCtx<'_>, r: Request, paused: bool) {
    let not_paused = || format!("vcpu {}: running; pause the VM first", ctx.id);
    match r {
        Request::HaltProbe(generation) => {
            let halted = halted_for_good(vcpu, ctx.id);
            ctx.vm.ctl.report_halt(generation, halted);
        }
        Request::SampleRip => {
            if let Some(p) = &ctx.vm.profile {
                p.sample(ctx.id, vcpu);
            }
        }
        Request::SaveState { msrs, reply } => {
            let s = if paused {
                save_state(vcpu, ctx.id, &msrs)
            } else {
                Err(not_paused())
            };
            let _ = reply.send(s);
        }
        Request::RestoreState { state, reply } => {
            let s = if paused {
                restore_state(vcpu, ctx.id, &state)
            } else {
                Err(not_paused())
            };
            let _ = reply.send(s);
        }
        Request::Pause | Request::Resume => {}
    }
}

/// Everything a vCPU thread owns.
pub struct VcpuSpec {
    pub id: u32,
    pub fd: VcpuFd,
    /// Host CPUs to pin this vCPU's thread to (`-p`), if any.
    pub cpuset: Option<Vec<usize>>,
}

fn pin_current_thread(cpus: &[usize]) -> Result<(), String> {
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: c < CPU_SETSIZE was checked when the config was parsed.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: set is a valid cpu_set_t of the size passed; 0 means the calling thread.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().to_string())
    }
}

/// Takes a vCPU out of the cpumask when its thread ends, by returning or by unwinding from a
/// panic: a vCPU that stayed in the mask would keep `Vm::wait` waiting for ever. A panic
/// also stops the VM (status 4, bhyve's "error").
struct LeaveOnDrop<'a> {
    ctl: &'a VmControl,
    id: u32,
}

impl Drop for LeaveOnDrop<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprint!(
                "rhyve: vcpu {}: internal error (see the panic above); stopping the VM\r\n",
                self.id
            );
            self.ctl.suspend(SuspendReason::Error);
        }
        set_thread_kvm_run(std::ptr::null_mut());
        self.ctl.deactivate(self.id as usize);
    }
}

/// Starts the thread of one vCPU (bhyve `fbsdrun_addcpu`). The vCPU is activated in the cpumask
/// before this returns, so the main thread never sees an empty mask while vCPUs are starting.
pub fn start_vcpu(
    vm: Arc<VmShared>,
    spec: VcpuSpec,
    run_size: usize,
) -> std::io::Result<JoinHandle<()>> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let id = spec.id;
    // Made before the thread starts: the vCPU is `Created` until it enters its loop. A VM
    // paused before it started (a restore) has its vCPUs park before their first KVM_RUN.
    let mailbox = vm.ctl.mailbox(id as usize);
    if vm.ctl.is_paused() {
        vm.ctl.post(id as usize, Request::Pause);
    }
    let handle = rhyve_base::thread::spawn(
        rhyve_base::thread::Role::Vcpu(id),
        format!("vcpu {id}"),
        move || {
            let VcpuSpec { id, mut fd, cpuset } = spec;
            set_thread_kvm_run(fd.get_kvm_run());
            vm.ctl.activate(id as usize);
            let _leave = LeaveOnDrop { ctl: &vm.ctl, id };
            let _ = tx.send(());
            if let Some(cpus) = &cpuset {
                if let Err(e) = pin_current_thread(cpus) {
                    eprint!("rhyve: cannot pin vcpu {id} to host CPUs {cpus:?}: {e}\r\n");
                    vm.ctl.suspend(SuspendReason::Error);
                }
            }
            let ctx = VcpuCtx { id, vm: &vm };
            vm_loop(&mut fd, &ctx, &mailbox, run_size);
            if log::log_enabled!(log::Level::Debug) {
                if let (Ok(r), Ok(s)) = (fd.get_regs(), fd.get_sregs()) {
                    log::debug!(
                        "vcpu {id} left vm_loop at cs {:#x} rip {:#x} (rax {:#x} rcx {:#x} rsp {:#x})",
                        s.cs.selector, r.rip, r.rax, r.rcx, r.rsp
                    );
                }
            }
        },
    )?;
    // Wait for activation; if the thread died first the channel is closed and we go on.
    let _ = rx.recv();
    log::debug!("vcpu {id} started");
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_vcpu_thread_that_panics_leaves_the_cpumask_and_stops_the_vm_with_an_error() {
        let ctl = Arc::new(VmControl::new());
        let c = ctl.clone();
        let t = std::thread::spawn(move || {
            c.activate(0);
            let _leave = LeaveOnDrop { ctl: &c, id: 0 };
            panic!("a defect in an exit handler");
        });
        assert!(t.join().is_err(), "the thread panicked");
        assert!(
            ctl.wait_all_stopped(Duration::from_secs(5)),
            "Vm::wait would wait for ever"
        );
        assert_eq!(ctl.suspend_reason(), Some(SuspendReason::Error));
    }
}
