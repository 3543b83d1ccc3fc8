//! The vCPU lifecycle (bhyve `bhyve_start_vcpu` / `fbsdrun_addcpu` / `fbsdrun_start_thread`).
//!
//! vCPU 0 is the BSP: with a boot ROM it is reset to the x86 power-on state and starts at the
//! reset vector. Every other vCPU is an AP: KVM's in-kernel LAPIC keeps it in KVM_RUN until the
//! guest sends it INIT and SIPI, so its thread simply enters `vm_loop`. Each vCPU is activated
//! in the VM's cpumask, gets its own thread named `vcpu N`, and clears itself from the cpumask
//! when it leaves the loop.

use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_ioctls::VcpuFd;

use super::control::{set_thread_kvm_run, SuspendReason, VmControl};
use super::vmexit::{vm_loop, VcpuCtx};
use super::VmShared;

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
    let handle = crate::thread::spawn(
        crate::thread::Role::Vcpu(id),
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
            vm_loop(&mut fd, &ctx, run_size);
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
