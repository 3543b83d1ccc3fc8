//! `vm_loop` and the VM-exit handler table (bhyve `amd64/vmexit.c`, `bhyverun.c`).
//!
//! Each vCPU thread runs `vm_loop`: enter the guest with KVM_RUN; when it exits, look the exit
//! reason up in `VMEXIT_HANDLERS`; the handler answers continue, stop the VM (with a bhyve exit
//! status), or abort (status 4). An exit reason with no handler is reported with its name, the
//! vCPU and the guest RIP, and ends rhyve with status 4, as bhyve's `vm_loop` does.

use std::sync::atomic::AtomicU64;

use kvm_bindings::*;
use kvm_ioctls::VcpuFd;

use super::control::SuspendReason;
use super::VmShared;
use crate::logging::rate_limited;

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
    /// Finish an instruction KVM could not emulate; `vm_loop` applies it to the vCPU.
    Assist(Assist),
}

/// What to do for an instruction PVM's emulator gave up on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assist {
    /// Step over it (`fwait`: no x87 exception can be pending here).
    Skip(u8),
    /// `clac`/`stac`: set RFLAGS.AC, then step over it.
    SetAc(bool, u8),
    /// `int3`: step over it and deliver #BP, as the CPU would (a trap: the saved RIP is the
    /// next instruction). Linux's live code patching relies on it.
    Breakpoint(u8),
}

/// One VM exit, decoded from `kvm_run`: the `struct vm_exit` a handler receives.
pub enum VmExit<'a> {
    Inout {
        port: u16,
        size: usize,
        is_in: bool,
        /// `count * size` bytes: string I/O (`rep ins/outs`) comes as several accesses.
        data: &'a mut [u8],
    },
    Mmio {
        gpa: u64,
        is_write: bool,
        data: &'a mut [u8],
    },
    Rdmsr {
        index: u32,
        data: &'a mut u64,
        error: &'a mut u8,
        /// For IA32_APIC_BASE (filtered on PVM hosts), KVM's own value of it.
        kvm_value: Option<u64>,
    },
    Wrmsr {
        index: u32,
        data: u64,
        error: &'a mut u8,
    },
    SystemEvent {
        kind: u32,
    },
    /// KVM_EXIT_INTERNAL_ERROR; for an emulation failure, the instruction's bytes and the
    /// code size (16, 32 or 64) to decode them with.
    InternalError {
        suberror: u32,
        insn: [u8; 15],
        len: usize,
        bitness: u32,
    },
    /// KVM_EXIT_SHUTDOWN (a triple fault): the vCPU's state when it happened, for the report.
    Shutdown {
        state: String,
    },
    /// An exit with no payload a handler needs (interrupted, ...).
    Plain,
}

/// The per-vCPU context handlers get.
pub struct VcpuCtx<'a> {
    pub id: u32,
    pub vm: &'a VmShared,
}

pub type VmExitHandler = fn(&VcpuCtx<'_>, &mut VmExit<'_>) -> VmExitAction;

/// Size of the handler table: every KVM exit reason rhyve can name.
pub const NR_EXIT_REASONS: usize = 40;

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

/// KVM's name for an exit reason, for diagnostics.
pub fn exit_name(reason: u32) -> &'static str {
    const NAMES: [&str; NR_EXIT_REASONS] = [
        "KVM_EXIT_UNKNOWN",
        "KVM_EXIT_EXCEPTION",
        "KVM_EXIT_IO",
        "KVM_EXIT_HYPERCALL",
        "KVM_EXIT_DEBUG",
        "KVM_EXIT_HLT",
        "KVM_EXIT_MMIO",
        "KVM_EXIT_IRQ_WINDOW_OPEN",
        "KVM_EXIT_SHUTDOWN",
        "KVM_EXIT_FAIL_ENTRY",
        "KVM_EXIT_INTR",
        "KVM_EXIT_SET_TPR",
        "KVM_EXIT_TPR_ACCESS",
        "KVM_EXIT_S390_SIEIC",
        "KVM_EXIT_S390_RESET",
        "KVM_EXIT_DCR",
        "KVM_EXIT_NMI",
        "KVM_EXIT_INTERNAL_ERROR",
        "KVM_EXIT_OSI",
        "KVM_EXIT_PAPR_HCALL",
        "KVM_EXIT_S390_UCONTROL",
        "KVM_EXIT_WATCHDOG",
        "KVM_EXIT_S390_TSCH",
        "KVM_EXIT_EPR",
        "KVM_EXIT_SYSTEM_EVENT",
        "KVM_EXIT_S390_STSI",
        "KVM_EXIT_IOAPIC_EOI",
        "KVM_EXIT_HYPERV",
        "KVM_EXIT_ARM_NISV",
        "KVM_EXIT_X86_RDMSR",
        "KVM_EXIT_X86_WRMSR",
        "KVM_EXIT_DIRTY_RING_FULL",
        "KVM_EXIT_AP_RESET_HOLD",
        "KVM_EXIT_X86_BUS_LOCK",
        "KVM_EXIT_XEN",
        "KVM_EXIT_RISCV_SBI",
        "KVM_EXIT_RISCV_CSR",
        "KVM_EXIT_NOTIFY",
        "KVM_EXIT_LOONGARCH_IOCSR",
        "KVM_EXIT_MEMORY_FAULT",
    ];
    NAMES
        .get(reason as usize)
        .copied()
        .unwrap_or("(unknown to rhyve)")
}

/// The exit's data did not decode as its reason says (a kvm_run the kernel filled oddly):
/// stop rather than guess.
fn mismatched(ctx: &VcpuCtx<'_>) -> VmExitAction {
    eprint!(
        "rhyve: vcpu {}: VM exit data does not match its exit reason; stopping\r\n",
        ctx.id
    );
    VmExitAction::Abort
}

fn vmexit_inout(ctx: &VcpuCtx<'_>, exit: &mut VmExit<'_>) -> VmExitAction {
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

fn vmexit_mmio(ctx: &VcpuCtx<'_>, exit: &mut VmExit<'_>) -> VmExitAction {
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
fn vmexit_rdmsr(ctx: &VcpuCtx<'_>, exit: &mut VmExit<'_>) -> VmExitAction {
    static LOGGED: AtomicU64 = AtomicU64::new(0);
    let VmExit::Rdmsr {
        index,
        data,
        error,
        kvm_value,
    } = exit
    else {
        return mismatched(ctx);
    };
    if *index == crate::hypervisor::MSR_APIC_BASE {
        // Filtered on PVM hosts (see create_irqchip), whose guest read gives 0: KVM's own
        // value (x2APIC mode included once the guest sets it), or if KVM will not say, the
        // reset value: the default LAPIC address, enabled, with the BSP flag on vCPU 0.
        const ENABLE: u64 = 1 << 11;
        const BSP: u64 = 1 << 8;
        **data = kvm_value.unwrap_or(
            crate::hypervisor::memory::LAPIC_BASE | ENABLE | if ctx.id == 0 { BSP } else { 0 },
        );
        **error = 0;
        return VmExitAction::Continue;
    }
    if let Some(value) = super::xmsr::emulate_rdmsr(ctx.vm.vendor, *index) {
        **data = value;
        **error = 0;
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
        **error = 1;
    } else {
        **data = 0;
        **error = 0;
    }
    VmExitAction::Continue
}

fn vmexit_wrmsr(ctx: &VcpuCtx<'_>, exit: &mut VmExit<'_>) -> VmExitAction {
    static LOGGED: AtomicU64 = AtomicU64::new(0);
    let VmExit::Wrmsr { index, data, error } = exit else {
        return mismatched(ctx);
    };
    if super::xmsr::emulate_wrmsr(ctx.vm.vendor, *index, *data) {
        **error = 0;
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
        **error = 1;
    } else {
        **error = 0;
    }
    VmExitAction::Continue
}

/// KVM reports a triple fault as a shutdown exit. The vCPU's state goes to stderr: a triple
/// fault is the guest's end, and the registers are the only evidence of why.
fn vmexit_shutdown(ctx: &VcpuCtx<'_>, exit: &mut VmExit<'_>) -> VmExitAction {
    let state = match exit {
        VmExit::Shutdown { state } => state.as_str(),
        _ => "",
    };
    eprint!("rhyve: vcpu {}: triple fault: {state}\r\n", ctx.id);
    VmExitAction::Suspend(SuspendReason::TripleFault)
}

fn vmexit_system_event(ctx: &VcpuCtx<'_>, exit: &mut VmExit<'_>) -> VmExitAction {
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

const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
const KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: u64 = 1;

/// Decodes the first instruction of `insn` (iced-x86) in a `bitness`-bit code segment; `None`
/// when the bytes do not hold a whole valid instruction.
pub fn decode_insn(insn: &[u8], bitness: u32) -> Option<iced_x86::Instruction> {
    use iced_x86::{Decoder, DecoderOptions};
    let mut d = Decoder::try_new(bitness, insn, DecoderOptions::NONE).ok()?;
    let i = d.decode();
    (!i.is_invalid()).then_some(i)
}

/// The instruction as an assembler would write it (AT&T syntax, as objdump shows Linux code).
pub fn describe_insn(insn: &[u8], bitness: u32) -> String {
    use iced_x86::{Formatter, GasFormatter};
    let bytes: Vec<String> = insn.iter().map(|b| format!("{b:02x}")).collect();
    match decode_insn(insn, bitness) {
        Some(i) => {
            let mut text = String::new();
            GasFormatter::new().format(&i, &mut text);
            format!("`{text}` ({})", bytes[..i.len().min(bytes.len())].join(" "))
        }
        None if insn.is_empty() => "no instruction bytes given by KVM".to_string(),
        None => format!("undecodable bytes {}", bytes.join(" ")),
    }
}

/// Decides how to finish an instruction KVM's emulator could not (only the few a stock Linux
/// kernel needs on PVM hosts; prefixes are allowed, as the CPU allows them); anything else is
/// unhandled.
pub fn emulation_assist(insn: &[u8], bitness: u32) -> Option<Assist> {
    use iced_x86::Mnemonic;
    let i = decode_insn(insn, bitness)?;
    let len = u8::try_from(i.len()).ok()?;
    match i.mnemonic() {
        Mnemonic::Int3 => Some(Assist::Breakpoint(len)),
        Mnemonic::Wait => Some(Assist::Skip(len)),
        Mnemonic::Clac => Some(Assist::SetAc(false, len)),
        Mnemonic::Stac => Some(Assist::SetAc(true, len)),
        _ => None,
    }
}

fn vmexit_internal_error(ctx: &VcpuCtx<'_>, exit: &mut VmExit<'_>) -> VmExitAction {
    static ASSISTS: AtomicU64 = AtomicU64::new(0);
    let VmExit::InternalError {
        suberror,
        insn,
        len,
        bitness,
    } = exit
    else {
        return mismatched(ctx);
    };
    if *suberror != KVM_INTERNAL_ERROR_EMULATION {
        return VmExitAction::Unhandled;
    }
    let insn = &insn[..*len];
    match emulation_assist(insn, *bitness) {
        Some(a) => {
            if rate_limited(&ASSISTS, 10_000) {
                log::debug!("vcpu {}: emulation assist {a:?}", ctx.id);
            }
            VmExitAction::Assist(a)
        }
        None => {
            eprint!(
                "rhyve: vcpu {}: KVM cannot emulate {} in {bitness}-bit code, nor can rhyve\r\n",
                ctx.id,
                describe_insn(insn, *bitness)
            );
            VmExitAction::Unhandled
        }
    }
}

/// Applies an emulation assist to the vCPU's registers (and events, for #BP).
fn apply_assist(vcpu: &VcpuFd, a: Assist) -> Result<(), kvm_ioctls::Error> {
    const RFLAGS_AC: u64 = 1 << 18;
    const BP_VECTOR: u8 = 3;
    let mut regs = vcpu.get_regs()?;
    let len = match a {
        Assist::Skip(n) | Assist::Breakpoint(n) => n,
        Assist::SetAc(on, n) => {
            if on {
                regs.rflags |= RFLAGS_AC;
            } else {
                regs.rflags &= !RFLAGS_AC;
            }
            n
        }
    };
    regs.rip = regs.rip.wrapping_add(u64::from(len));
    vcpu.set_regs(&regs)?;
    if let Assist::Breakpoint(_) = a {
        let mut ev = vcpu.get_vcpu_events()?;
        ev.exception.injected = 1;
        ev.exception.nr = BP_VECTOR;
        ev.exception.has_error_code = 0;
        ev.exception.error_code = 0;
        vcpu.set_vcpu_events(&ev)?;
    }
    Ok(())
}

/// The vCPU was kicked out of KVM_RUN; `vm_loop` looks at the suspend and pause flags next.
fn vmexit_intr(_ctx: &VcpuCtx<'_>, _exit: &mut VmExit<'_>) -> VmExitAction {
    VmExitAction::Continue
}

/// Decodes the exit in `run`. `run_size` is the size of the `kvm_run` mapping, which bounds
/// the I/O data area the kernel points into.
fn decode(run: &mut kvm_run, run_size: usize, extras: ExitExtras) -> VmExit<'_> {
    match run.exit_reason {
        KVM_EXIT_IO => {
            // SAFETY: the exit reason says the `io` member of the union is the valid one.
            let io = unsafe { run.__bindgen_anon_1.io };
            let size = usize::from(io.size);
            let len = size.saturating_mul(io.count as usize);
            let off = io.data_offset as usize;
            if off.checked_add(len).is_none_or(|end| end > run_size) {
                return VmExit::Plain;
            }
            // SAFETY: [off, off+len) lies inside the kvm_run mapping (checked above), which the
            // kernel does not touch while the vCPU is out of KVM_RUN; the slice borrows `run`.
            let data = unsafe {
                std::slice::from_raw_parts_mut((run as *mut kvm_run).cast::<u8>().add(off), len)
            };
            VmExit::Inout {
                port: io.port,
                size,
                is_in: u32::from(io.direction) == KVM_EXIT_IO_IN,
                data,
            }
        }
        KVM_EXIT_MMIO => {
            // SAFETY: the exit reason says the `mmio` member of the union is the valid one.
            let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
            let len = (mmio.len as usize).min(mmio.data.len());
            VmExit::Mmio {
                gpa: mmio.phys_addr,
                is_write: mmio.is_write != 0,
                data: &mut mmio.data[..len],
            }
        }
        KVM_EXIT_X86_RDMSR => {
            // SAFETY: the exit reason says the `msr` member of the union is the valid one.
            let msr = unsafe { &mut run.__bindgen_anon_1.msr };
            VmExit::Rdmsr {
                index: msr.index,
                data: &mut msr.data,
                error: &mut msr.error,
                kvm_value: extras.msr_value,
            }
        }
        KVM_EXIT_X86_WRMSR => {
            // SAFETY: the exit reason says the `msr` member of the union is the valid one.
            let msr = unsafe { &mut run.__bindgen_anon_1.msr };
            VmExit::Wrmsr {
                index: msr.index,
                data: msr.data,
                error: &mut msr.error,
            }
        }
        KVM_EXIT_SYSTEM_EVENT => {
            // SAFETY: the exit reason says the `system_event` member is the valid one.
            let kind = unsafe { run.__bindgen_anon_1.system_event.type_ };
            VmExit::SystemEvent { kind }
        }
        KVM_EXIT_INTERNAL_ERROR => {
            // SAFETY: the exit reason says the `emulation_failure` member (the layout KVM
            // uses for every internal error) is the valid one.
            let ef = unsafe { run.__bindgen_anon_1.emulation_failure };
            let mut insn = [0u8; 15];
            let mut len = 0;
            if ef.suberror == KVM_INTERNAL_ERROR_EMULATION
                && ef.ndata >= 2
                && ef.flags & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES != 0
            {
                // SAFETY: the flag says the instruction bytes are present.
                let (n, bytes) = unsafe {
                    (
                        ef.__bindgen_anon_1.__bindgen_anon_1.insn_size,
                        ef.__bindgen_anon_1.__bindgen_anon_1.insn_bytes,
                    )
                };
                len = usize::from(n).min(insn.len());
                insn[..len].copy_from_slice(&bytes[..len]);
            }
            VmExit::InternalError {
                suberror: ef.suberror,
                insn,
                len,
                bitness: extras.bitness,
            }
        }
        KVM_EXIT_SHUTDOWN => VmExit::Shutdown {
            state: extras.fault_state.unwrap_or_default(),
        },
        _ => VmExit::Plain,
    }
}

/// Extra detail for an exit nobody handles: KVM's own diagnostic words.
fn exit_detail(run: &kvm_run) -> String {
    match run.exit_reason {
        KVM_EXIT_INTERNAL_ERROR => {
            // SAFETY: the exit reason says the `internal` member of the union is the valid one.
            let internal = unsafe { run.__bindgen_anon_1.internal };
            let n = (internal.ndata as usize).min(internal.data.len());
            let words: Vec<String> = internal.data[..n]
                .iter()
                .map(|w| format!("{w:#x}"))
                .collect();
            format!(", suberror {} [{}]", internal.suberror, words.join(" "))
        }
        KVM_EXIT_FAIL_ENTRY => {
            // SAFETY: the exit reason says the `fail_entry` member of the union is the valid one.
            let fe = unsafe { run.__bindgen_anon_1.fail_entry };
            format!(", hardware reason {:#x}", fe.hardware_entry_failure_reason)
        }
        _ => String::new(),
    }
}

/// What a handler needs from the vCPU beyond `kvm_run`. Fetched before the exit is decoded
/// (the decoded exit borrows `kvm_run` from the vCPU), and only for the exits that use it.
struct ExitExtras {
    /// For an emulation failure: the code size (64, 32 or 16) to decode its bytes with.
    bitness: u32,
    /// For a (PVM-filtered) IA32_APIC_BASE read: KVM's own value of it.
    msr_value: Option<u64>,
    /// For a triple fault: the vCPU's registers, descriptor tables and pending events.
    fault_state: Option<String>,
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

fn exit_extras(vcpu: &mut VcpuFd) -> ExitExtras {
    let run = vcpu.get_kvm_run();
    let (reason, msr_index) = match run.exit_reason {
        // SAFETY: the exit reason says the `msr` member of the union is the valid one.
        KVM_EXIT_X86_RDMSR => (run.exit_reason, unsafe { run.__bindgen_anon_1.msr.index }),
        r => (r, 0),
    };
    let bitness = if reason == KVM_EXIT_INTERNAL_ERROR {
        match vcpu.get_sregs() {
            Ok(s) if s.cs.l != 0 => 64,
            Ok(s) if s.cs.db != 0 => 32,
            Ok(_) => 16,
            Err(_) => 64,
        }
    } else {
        64
    };
    let msr_value = (reason == KVM_EXIT_X86_RDMSR && msr_index == crate::hypervisor::MSR_APIC_BASE)
        .then(|| crate::hypervisor::get_msr(vcpu, msr_index))
        .flatten();
    let fault_state = (reason == KVM_EXIT_SHUTDOWN).then(|| fault_state(vcpu));
    ExitExtras {
        bitness,
        msr_value,
        fault_state,
    }
}

/// Whether this vCPU can only be woken by another CPU or an NMI: halted with RFLAGS.IF clear,
/// or an AP still waiting for INIT/SIPI. With KVM's in-kernel LAPIC a HLT never exits to
/// userspace, so this is asked after a kick (see `VmControl::all_halted`).
fn halted_for_good(vcpu: &VcpuFd, id: u32) -> bool {
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

/// The vCPU loop (bhyve `vm_loop`). Returns when the VM is suspended or on a fatal error; the
/// caller then clears this vCPU from the active cpumask.
pub fn vm_loop(vcpu: &mut VcpuFd, ctx: &VcpuCtx<'_>, run_size: usize) {
    let ctl = &ctx.vm.ctl;
    let mut halt_seen = 0;
    loop {
        if ctl.is_suspended() {
            return;
        }
        if let Some(generation) = ctl.halt_check_pending(halt_seen) {
            halt_seen = generation;
            ctl.report_halt(generation, halted_for_good(vcpu, ctx.id));
        }
        if ctl.pause_requested() {
            ctl.park();
            continue;
        }
        if let Err(e) = vcpu.run() {
            match e.errno() {
                // Kicked (EINTR), or KVM asked for a retry.
                libc::EINTR | libc::EAGAIN => {
                    vcpu.set_kvm_immediate_exit(0);
                    if let Some(p) = &ctx.vm.profile {
                        p.sample_if_requested(ctx.id, vcpu);
                    }
                    continue;
                }
                _ => {
                    eprint!("rhyve: vm_run error on vcpu {}: {e}\r\n", ctx.id);
                    ctl.suspend(SuspendReason::Error);
                    return;
                }
            }
        }
        let reason = vcpu.get_kvm_run().exit_reason;
        if let Some(p) = &ctx.vm.profile {
            p.count_exit(vcpu.get_kvm_run());
        }
        let extras = exit_extras(vcpu);
        let run = vcpu.get_kvm_run();
        let action = match VMEXIT_HANDLERS.get(reason as usize).copied().flatten() {
            Some(handler) => handler(ctx, &mut decode(run, run_size, extras)),
            None => VmExitAction::Unhandled,
        };
        match action {
            VmExitAction::Continue => {}
            VmExitAction::Suspend(r) => ctl.suspend(r),
            VmExitAction::Abort => ctl.suspend(SuspendReason::Error),
            VmExitAction::Assist(a) => {
                if let Some(p) = &ctx.vm.profile {
                    p.count_assist();
                }
                if let Err(e) = apply_assist(vcpu, a) {
                    eprint!("rhyve: vcpu {}: cannot apply {a:?}: {e}\r\n", ctx.id);
                    ctl.suspend(SuspendReason::Error);
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::cpuid::Vendor;
    use std::sync::{Arc, Mutex};

    fn shared(vendor: Vendor, strictmsr: bool) -> VmShared {
        VmShared {
            ctl: Arc::new(super::super::control::VmControl::new()),
            pio: Arc::new(crate::bus::Bus::new()),
            mmio: Arc::new(crate::bus::Bus::new()),
            strictio: false,
            strictmsr,
            profile: None,
            vendor,
        }
    }

    fn rdmsr(vm: &VmShared, index: u32) -> (u64, u8) {
        let (mut data, mut error) = (0xdead_u64, 0xff_u8);
        let action = vmexit_rdmsr(
            &VcpuCtx { id: 1, vm },
            &mut VmExit::Rdmsr {
                index,
                data: &mut data,
                error: &mut error,
                kvm_value: None,
            },
        );
        assert_eq!(action, VmExitAction::Continue);
        (data, error)
    }

    fn wrmsr(vm: &VmShared, index: u32, data: u64) -> u8 {
        let mut error = 0xff_u8;
        let action = vmexit_wrmsr(
            &VcpuCtx { id: 1, vm },
            &mut VmExit::Wrmsr {
                index,
                data,
                error: &mut error,
            },
        );
        assert_eq!(action, VmExitAction::Continue);
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

    #[test]
    fn emulation_assists_cover_exactly_the_known_instructions() {
        assert_eq!(
            emulation_assist(&[0xcc, 0x90], 64),
            Some(Assist::Breakpoint(1))
        );
        assert_eq!(emulation_assist(&[0x9b], 64), Some(Assist::Skip(1)));
        assert_eq!(emulation_assist(&[0x9b], 16), Some(Assist::Skip(1)));
        assert_eq!(
            emulation_assist(&[0x0f, 0x01, 0xca], 64),
            Some(Assist::SetAc(false, 3))
        );
        assert_eq!(
            emulation_assist(&[0x0f, 0x01, 0xcb, 0xc3], 32),
            Some(Assist::SetAc(true, 3))
        );
        // A prefixed int3 is still int3, and its length counts the prefix.
        assert_eq!(
            emulation_assist(&[0x3e, 0xcc], 64),
            Some(Assist::Breakpoint(2))
        );
        // iret, xrstor, lock cmpxchg16b, int 0x80, a truncated clac, nothing: not ours.
        for insn in [
            &[0xcf][..],
            &[0x48, 0x0f, 0xae, 0x2f],
            &[0xf0, 0x48, 0x0f, 0xc7, 0x4d, 0x20],
            &[0xcd, 0x80],
            &[0x0f, 0x01],
            &[],
        ] {
            assert_eq!(emulation_assist(insn, 64), None, "{insn:x?}");
        }
    }

    #[test]
    fn undecodable_or_unemulated_instructions_are_described_for_the_user() {
        assert_eq!(describe_insn(&[0xcf], 32), "`iret` (cf)");
        assert_eq!(describe_insn(&[0x48, 0xcf, 0x90], 64), "`iretq` (48 cf)");
        assert_eq!(describe_insn(&[0x0f, 0x01], 64), "undecodable bytes 0f 01");
        assert_eq!(describe_insn(&[], 64), "no instruction bytes given by KVM");
    }
}
