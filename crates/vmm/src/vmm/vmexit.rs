//! The VM-exit handler table (bhyve `amd64/vmexit.c`): which handler serves which KVM exit
//! reason, and the handlers. `vm_loop` (in `vm_loop.rs`) decodes each exit from the run page
//! into an owned `VmExit` (`run_page.rs`), calls the handler with the vCPU itself, and writes
//! the answer back. A handler answers continue, stop the VM (with a bhyve exit status), or
//! abort (status 4); an exit reason with no handler is reported with its name, the vCPU and
//! the guest RIP, and ends rhyve with status 4, as bhyve's `vm_loop` does.

use std::sync::atomic::AtomicU64;

use kvm_bindings::*;
use kvm_ioctls::VcpuFd;

use super::assist::{apply_assist, bitness, describe_insn, emulation_assist};
use super::control::SuspendReason;
use super::run_page::{ExitData, KVM_INTERNAL_ERROR_EMULATION};
use super::VmShared;
use rhyve_base::logging::rate_limited;

pub use super::run_page::{exit_name, NR_EXIT_REASONS};

/// What a handler tells `vm_loop` (bhyve's VMEXIT_CONTINUE / VMEXIT_ABORT / vm_suspend).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExitAction {
    Continue,
    /// Stop every vCPU; the process exits with the reason's status.
    Suspend(SuspendReason),
    /// A fatal error, already reported: stop with status 4.
    Abort,
    /// Nothing can handle this exit: `vm_loop` reports it (exit, vCPU, RIP) and stops (status 4).
    Unhandled,
}

/// One VM exit, decoded from the run page into a value the handler owns (bhyve's
/// `struct vm_exit`). What the handler answers (IN data, an MMIO read, an RDMSR value, #GP or
/// not) it writes here; `vm_loop` puts it back in the run page.
#[derive(Debug)]
pub enum VmExit {
    Inout {
        port: u16,
        size: usize,
        is_in: bool,
        /// `count * size` bytes: string I/O (`rep ins/outs`) comes as several accesses.
        data: ExitData,
    },
    Mmio {
        gpa: u64,
        is_write: bool,
        data: ExitData,
    },
    /// `error` starts at 1 (#GP): a handler that answers sets it to 0.
    Rdmsr {
        index: u32,
        data: u64,
        error: u8,
    },
    Wrmsr {
        index: u32,
        data: u64,
        error: u8,
    },
    SystemEvent {
        kind: u32,
    },
    /// KVM_EXIT_INTERNAL_ERROR; for an emulation failure, the instruction's bytes.
    InternalError {
        suberror: u32,
        insn: [u8; 15],
        len: usize,
    },
    /// KVM_EXIT_SHUTDOWN: a triple fault.
    Shutdown,
    /// An exit with no payload a handler needs (interrupted, ...).
    Plain,
}

/// The per-vCPU context handlers get.
pub struct VcpuCtx<'a> {
    pub id: u32,
    pub vm: &'a VmShared,
}

/// A handler gets the vCPU's context, the vCPU itself (to read registers or MSRs, or finish an
/// instruction) and the exit.
pub type VmExitHandler = fn(&VcpuCtx<'_>, &mut VcpuFd, &mut VmExit) -> VmExitAction;

/// The exit-handler table, indexed by KVM exit reason: the one place that says which handler
/// serves which exit. A reason with `None` ends the VM with status 4.
pub static VMEXIT_HANDLERS: [Option<VmExitHandler>; NR_EXIT_REASONS] = {
    let mut t: [Option<VmExitHandler>; NR_EXIT_REASONS] = [None; NR_EXIT_REASONS];
    t[KVM_EXIT_IO as usize] = Some(vmexit_inout);
    t[KVM_EXIT_MMIO as usize] = Some(vmexit_mmio);
    t[KVM_EXIT_X86_RDMSR as usize] = Some(vmexit_rdmsr);
    t[KVM_EXIT_X86_WRMSR as usize] = Some(vmexit_wrmsr);
    t[KVM_EXIT_SHUTDOWN as usize] = Some(vmexit_shutdown);
    t[KVM_EXIT_SYSTEM_EVENT as usize] = Some(vmexit_system_event);
    t[KVM_EXIT_INTR as usize] = Some(vmexit_intr);
    t[KVM_EXIT_INTERNAL_ERROR as usize] = Some(vmexit_internal_error);
    t
};

/// The exit's data did not decode as its reason says (a kvm_run the kernel filled oddly):
/// stop rather than guess.
fn mismatched(ctx: &VcpuCtx<'_>) -> VmExitAction {
    eprint!(
        "rhyve: vcpu {}: VM exit data does not match its exit reason; stopping\r\n",
        ctx.id
    );
    VmExitAction::Abort
}

fn vmexit_inout(ctx: &VcpuCtx<'_>, _vcpu: &mut VcpuFd, exit: &mut VmExit) -> VmExitAction {
    static UNASSIGNED: AtomicU64 = AtomicU64::new(0);
    let VmExit::Inout {
        port,
        size,
        is_in,
        data,
    } = exit
    else {
        return mismatched(ctx);
    };
    let (port, size, is_in) = (*port, (*size).max(1), *is_in);
    for chunk in data.chunks_mut(size) {
        let handled = if is_in {
            ctx.vm.pio.read(u64::from(port), chunk)
        } else {
            ctx.vm.pio.write(u64::from(port), chunk)
        };
        if handled {
            continue;
        }
        let dir = if is_in { "in" } else { "out" };
        let width = match size {
            1 => 'b',
            2 => 'w',
            _ => 'l',
        };
        if ctx.vm.strictio {
            eprint!(
                "rhyve: unhandled {dir}{width} at port {port:#x} on vcpu {} (strict I/O, -e): stopping\r\n",
                ctx.id
            );
            return VmExitAction::Abort;
        }
        if rate_limited(&UNASSIGNED, 1000) {
            log::debug!(
                "unassigned {dir}{width} at port {port:#x} on vcpu {}",
                ctx.id
            );
        }
        // Nothing decodes the address: the bus floats high, and writes go nowhere.
        if is_in {
            chunk.fill(0xff);
        }
    }
    VmExitAction::Continue
}

fn vmexit_mmio(ctx: &VcpuCtx<'_>, _vcpu: &mut VcpuFd, exit: &mut VmExit) -> VmExitAction {
    static UNASSIGNED: AtomicU64 = AtomicU64::new(0);
    let VmExit::Mmio {
        gpa,
        is_write,
        data,
    } = exit
    else {
        return mismatched(ctx);
    };
    let handled = if *is_write {
        ctx.vm.mmio.write(*gpa, data)
    } else {
        ctx.vm.mmio.read(*gpa, data)
    };
    if !handled {
        if rate_limited(&UNASSIGNED, 1000) {
            log::debug!(
                "unassigned MMIO {} at {gpa:#x} ({} bytes) on vcpu {}",
                if *is_write { "write" } else { "read" },
                data.len(),
                ctx.id
            );
        }
        if !*is_write {
            data.fill(0xff);
        }
    }
    VmExitAction::Continue
}

/// Where a #GP for an MSR nobody implements is logged: `-v`. A guest kernel probes such MSRs
/// routinely, with accessors that expect the #GP (Linux: perf's LBR and RAPL probes, PPIN,
/// chicken bits for other CPU models), so at the default level they only looked like faults.
const UNKNOWN_MSR_LOG: log::Level = log::Level::Info;

/// Only MSRs KVM does not implement come here (KVM_MSR_EXIT_REASON_UNKNOWN); rhyve answers a
/// few vendor MSRs itself (`xmsr`) and raises #GP for the rest, unless `-w`.
fn vmexit_rdmsr(ctx: &VcpuCtx<'_>, vcpu: &mut VcpuFd, exit: &mut VmExit) -> VmExitAction {
    static LOGGED: AtomicU64 = AtomicU64::new(0);
    let VmExit::Rdmsr { index, data, error } = exit else {
        return mismatched(ctx);
    };
    if *index == rhyve_hypervisor::MSR_APIC_BASE {
        // Filtered on PVM hosts (see create_irqchip), whose guest read gives 0: KVM's own
        // value (x2APIC mode included once the guest sets it), or if KVM will not say, the
        // reset value: the default LAPIC address, enabled, with the BSP flag on vCPU 0.
        const ENABLE: u64 = 1 << 11;
        const BSP: u64 = 1 << 8;
        *data = rhyve_hypervisor::get_msr(vcpu, *index).unwrap_or(
            rhyve_hypervisor::memory::LAPIC_BASE | ENABLE | if ctx.id == 0 { BSP } else { 0 },
        );
        *error = 0;
        return VmExitAction::Continue;
    }
    if let Some(value) = super::xmsr::emulate_rdmsr(ctx.vm.vendor, *index) {
        *data = value;
        *error = 0;
        return VmExitAction::Continue;
    }
    if ctx.vm.strictmsr {
        if rate_limited(&LOGGED, 100) {
            log::log!(
                UNKNOWN_MSR_LOG,
                "rdmsr of unimplemented MSR {index:#x} on vcpu {}: #GP injected (-w ignores it)",
                ctx.id
            );
        }
        *error = 1;
    } else {
        *data = 0;
        *error = 0;
    }
    VmExitAction::Continue
}

fn vmexit_wrmsr(ctx: &VcpuCtx<'_>, _vcpu: &mut VcpuFd, exit: &mut VmExit) -> VmExitAction {
    static LOGGED: AtomicU64 = AtomicU64::new(0);
    let VmExit::Wrmsr { index, data, error } = exit else {
        return mismatched(ctx);
    };
    if super::xmsr::emulate_wrmsr(ctx.vm.vendor, *index, *data) {
        *error = 0;
        return VmExitAction::Continue;
    }
    if ctx.vm.strictmsr {
        if rate_limited(&LOGGED, 100) {
            log::log!(
                UNKNOWN_MSR_LOG,
                "wrmsr {data:#x} to unimplemented MSR {index:#x} on vcpu {}: #GP injected (-w ignores it)",
                ctx.id
            );
        }
        *error = 1;
    } else {
        *error = 0;
    }
    VmExitAction::Continue
}

/// KVM reports a triple fault as a shutdown exit. The vCPU's state goes to stderr: a triple
/// fault is the guest's end, and the registers are the only evidence of why.
fn vmexit_shutdown(ctx: &VcpuCtx<'_>, vcpu: &mut VcpuFd, _exit: &mut VmExit) -> VmExitAction {
    eprint!(
        "rhyve: vcpu {}: triple fault: {}\r\n",
        ctx.id,
        fault_state(vcpu)
    );
    VmExitAction::Suspend(SuspendReason::TripleFault)
}

/// The state a triple fault leaves: where the vCPU was, its mode and tables, and the event
/// KVM was delivering (the fault that could not be delivered is usually the last one).
fn fault_state(vcpu: &VcpuFd) -> String {
    let mut out = String::new();
    if let Ok(r) = vcpu.get_regs() {
        out += &format!(
            "rip {:#x} rsp {:#x} rflags {:#x} rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x} rsi {:#x} rdi {:#x} rbp {:#x}",
            r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp
        );
    }
    if let Ok(s) = vcpu.get_sregs() {
        out += &format!(
            "; cs {:#x} (l {} dpl {}) ss {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} idt {:#x}/{:#x} gdt {:#x}/{:#x} tr {:#x} base {:#x}",
            s.cs.selector, s.cs.l, s.cs.dpl, s.ss.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer,
            s.idt.base, s.idt.limit, s.gdt.base, s.gdt.limit, s.tr.selector, s.tr.base
        );
    }
    if let Ok(e) = vcpu.get_vcpu_events() {
        out += &format!(
            "; exception injected {} pending {} nr {} error {:#x} (has {}); interrupt injected {} nr {}; nmi injected {} pending {}",
            e.exception.injected, e.exception.pending, e.exception.nr, e.exception.error_code,
            e.exception.has_error_code, e.interrupt.injected, e.interrupt.nr,
            e.nmi.injected, e.nmi.pending
        );
    }
    out
}

fn vmexit_system_event(ctx: &VcpuCtx<'_>, _vcpu: &mut VcpuFd, exit: &mut VmExit) -> VmExitAction {
    let VmExit::SystemEvent { kind } = exit else {
        return mismatched(ctx);
    };
    let reason = match *kind {
        KVM_SYSTEM_EVENT_SHUTDOWN => SuspendReason::PowerOff,
        KVM_SYSTEM_EVENT_RESET => SuspendReason::Reset,
        other => {
            eprint!(
                "rhyve: vcpu {}: system event {other} (crash): stopping\r\n",
                ctx.id
            );
            SuspendReason::Error
        }
    };
    VmExitAction::Suspend(reason)
}

/// KVM could not emulate an instruction: on PVM hosts rhyve finishes the few a stock Linux
/// kernel needs (`assist.rs`); anything else is reported as the instruction it is.
fn vmexit_internal_error(ctx: &VcpuCtx<'_>, vcpu: &mut VcpuFd, exit: &mut VmExit) -> VmExitAction {
    static ASSISTS: AtomicU64 = AtomicU64::new(0);
    let VmExit::InternalError {
        suberror,
        insn,
        len,
    } = exit
    else {
        return mismatched(ctx);
    };
    if *suberror != KVM_INTERNAL_ERROR_EMULATION {
        return VmExitAction::Unhandled;
    }
    let insn = insn.get(..*len).unwrap_or_default();
    let bits = bitness(vcpu);
    let Some(a) = emulation_assist(insn, bits) else {
        eprint!(
            "rhyve: vcpu {}: KVM cannot emulate {} in {bits}-bit code, nor can rhyve\r\n",
            ctx.id,
            describe_insn(insn, bits)
        );
        return VmExitAction::Unhandled;
    };
    if rate_limited(&ASSISTS, 10_000) {
        log::debug!("vcpu {}: emulation assist {a:?}", ctx.id);
    }
    if let Some(p) = &ctx.vm.profile {
        p.count_assist();
    }
    match apply_assist(vcpu, a) {
        Ok(()) => VmExitAction::Continue,
        Err(e) => {
            eprint!("rhyve: vcpu {}: cannot apply {a:?}: {e}\r\n", ctx.id);
            VmExitAction::Abort
        }
    }
}

/// The vCPU was kicked out of KVM_RUN; `vm_loop` looks at its mailbox and the suspend flag next.
fn vmexit_intr(_ctx: &VcpuCtx<'_>, _vcpu: &mut VcpuFd, _exit: &mut VmExit) -> VmExitAction {
    VmExitAction::Continue
}

#[cfg(test)]
mod tests {
    use super::*;
    use rhyve_hypervisor::cpuid::Vendor;
    use std::sync::{Arc, Mutex};

    fn shared(vendor: Vendor, strictmsr: bool) -> VmShared {
        VmShared {
            ctl: Arc::new(super::super::control::VmControl::new()),
            pio: Arc::new(rhyve_bus::Bus::new()),
            mmio: Arc::new(rhyve_bus::Bus::new()),
            strictio: false,
            strictmsr,
            profile: None,
            exit_stats: Arc::new(super::super::exit_stats::ExitStats::new(1)),
            vendor,
        }
    }

    /// A vCPU for handlers that may use one (these MSRs never reach it).
    fn vcpu() -> VcpuFd {
        let kvm = kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        vm.create_vcpu(0).expect("KVM_CREATE_VCPU")
    }

    fn rdmsr(vm: &VmShared, index: u32) -> (u64, u8) {
        let mut exit = VmExit::Rdmsr {
            index,
            data: 0xdead,
            error: 1,
        };
        let action = vmexit_rdmsr(&VcpuCtx { id: 1, vm }, &mut vcpu(), &mut exit);
        assert_eq!(action, VmExitAction::Continue);
        let VmExit::Rdmsr { data, error, .. } = exit else {
            unreachable!()
        };
        (data, error)
    }

    fn wrmsr(vm: &VmShared, index: u32, data: u64) -> u8 {
        let mut exit = VmExit::Wrmsr {
            index,
            data,
            error: 1,
        };
        let action = vmexit_wrmsr(&VcpuCtx { id: 1, vm }, &mut vcpu(), &mut exit);
        assert_eq!(action, VmExitAction::Continue);
        let VmExit::Wrmsr { error, .. } = exit else {
            unreachable!()
        };
        error
    }

    /// Records what rhyve logs, for the one test that looks (lib tests install no logger).
    struct Capture;
    static RECORDS: Mutex<Vec<(log::Level, String)>> = Mutex::new(Vec::new());
    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }
        fn log(&self, r: &log::Record) {
            RECORDS
                .lock()
                .unwrap()
                .push((r.level(), r.args().to_string()));
        }
        fn flush(&self) {}
    }
    static CAPTURE: Capture = Capture;

    #[test]
    fn vendor_msrs_are_answered_and_unknown_ones_fault_quietly() {
        log::set_logger(&CAPTURE).expect("no other logger in lib tests");
        log::set_max_level(log::LevelFilter::Trace);

        let msr_logs = || {
            RECORDS
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, m)| m.contains("MSR"))
                .count()
        };
        let intel = shared(Vendor::Intel, true);
        assert_eq!(
            rdmsr(&intel, 0x3a),
            (1, 0),
            "IA32_FEATURE_CONTROL: locked, VMX off"
        );
        assert_eq!(rdmsr(&intel, 0x17), (0, 0), "IA32_PLATFORM_ID");
        let amd = shared(Vendor::Amd, true);
        assert_eq!(
            rdmsr(&amd, 0xc001_1029),
            (2, 0),
            "DE_CFG: LFENCE serializing"
        );
        assert_eq!(wrmsr(&amd, 0xc001_1029, 2), 0);
        assert_eq!(msr_logs(), 0, "emulated MSRs are quiet");
        assert_eq!(wrmsr(&intel, 0x3a, 0x5), 1, "a locked MSR faults");
        // The other vendor's MSR, and LS_CFG, fault.
        assert_eq!(rdmsr(&amd, 0x3a).1, 1);
        assert_eq!(rdmsr(&amd, 0xc001_1020).1, 1);
        // Enough faults that the rate limit lets some through to the log.
        for _ in 0..300 {
            assert_eq!(rdmsr(&intel, 0xc0de_0001).1, 1);
            assert_eq!(wrmsr(&intel, 0xc0de_0002, 7), 1);
        }
        // -w: unknown MSRs read 0 and take writes; the emulated ones keep their answers.
        let lax = shared(Vendor::Intel, false);
        assert_eq!(rdmsr(&lax, 0xc0de_0003), (0, 0));
        assert_eq!(wrmsr(&lax, 0xc0de_0004, 1), 0);
        assert_eq!(rdmsr(&lax, 0x3a), (1, 0));

        let records = RECORDS.lock().unwrap();
        let ours: Vec<_> = records
            .iter()
            .filter(|(_, m)| m.contains("MSR 0xc0de000"))
            .collect();
        assert!(
            ours.iter().any(|(_, m)| m.contains("0xc0de0001"))
                && ours.iter().any(|(_, m)| m.contains("0xc0de0002")),
            "unknown MSRs are still logged: {ours:?}"
        );
        assert!(
            ours.iter().all(|(l, _)| *l > log::Level::Warn),
            "not at the default level: {ours:?}"
        );
    }
}
