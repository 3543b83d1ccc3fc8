//! The vCPU loop (bhyve `vm_loop`): serve the vCPU's mailbox, enter the guest with KVM_RUN,
//! decode the exit, dispatch it through `VMEXIT_HANDLERS`, write the answer back, act on what
//! the handler said.

use std::time::Instant;

use kvm_ioctls::VcpuFd;

use super::control::{Mailbox, SuspendReason};
use super::run_page::{complete, decode, exit_detail, exit_name};
use super::vcpu::{serve_mailbox, Served};
use super::vmexit::{VcpuCtx, VmExitAction, VMEXIT_HANDLERS};

/// Returns when the VM is suspended or on a fatal error; the caller then clears this vCPU
/// from the active cpumask.
pub fn vm_loop(vcpu: &mut VcpuFd, ctx: &VcpuCtx<'_>, mailbox: &Mailbox, run_size: usize) {
    let ctl = &ctx.vm.ctl;
    let stats = ctx.vm.exit_stats.vcpu(ctx.id);
    let mut first = rhyve_base::timeline::enabled();
    loop {
        if ctl.is_suspended() {
            return;
        }
        if mailbox.has_requests() && serve_mailbox(vcpu, ctx, mailbox) == Served::Leave {
            return;
        }
        if first {
            first = false;
            rhyve_base::timeline::mark(&format!("vcpu {}: first KVM_RUN", ctx.id));
        }
        if let Err(e) = vcpu.run() {
            match e.errno() {
                // Kicked (EINTR: the mailbox is served at the top), or KVM asked for a retry.
                libc::EINTR | libc::EAGAIN => {
                    vcpu.set_kvm_immediate_exit(0);
                    continue;
                }
                _ => {
                    eprint!("rhyve: vm_run error on vcpu {}: {e}\r\n", ctx.id);
                    ctl.suspend(SuspendReason::Error);
                    return;
                }
            }
        }
        let exited = Instant::now();
        let run = vcpu.get_kvm_run();
        let reason = run.exit_reason;
        if let Some(p) = &ctx.vm.profile {
            p.count_exit(run);
        }
        let mut exit = decode(run, run_size);
        let action = match VMEXIT_HANDLERS.get(reason as usize).copied().flatten() {
            Some(handler) => handler(ctx, vcpu, &mut exit),
            None => VmExitAction::Unhandled,
        };
        complete(vcpu.get_kvm_run(), run_size, &exit);
        if let Some(s) = stats {
            s.record(
                reason,
                u64::try_from(exited.elapsed().as_nanos()).unwrap_or(u64::MAX),
            );
        }
        match action {
            VmExitAction::Continue => {}
            VmExitAction::Suspend(r) => ctl.suspend(r),
            VmExitAction::Abort => ctl.suspend(SuspendReason::Error),
            VmExitAction::Unhandled => {
                let detail = exit_detail(vcpu.get_kvm_run());
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(u64::MAX);
                eprint!(
                    "rhyve: vm_loop: unhandled exit {} ({reason}) on vcpu {} at rip {rip:#x}{detail}\r\n",
                    exit_name(reason),
                    ctx.id
                );
                ctl.suspend(SuspendReason::Error);
                return;
            }
        }
    }
}
