//! The vCPU's run page (`kvm_run`): an exit decoded into an owned `VmExit`, and the handler's
//! answer (IN data, an MMIO read, an RDMSR value, an MSR access's #GP) written back before the
//! next KVM_RUN. Nothing else reads or writes the run page's union.

use kvm_bindings::*;

use super::vmexit::VmExit;

pub const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
const KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: u64 = 1;

/// The bytes of a port or MMIO access. One access (at most 8 bytes) is held inline, so the
/// common exit allocates nothing; string I/O (`rep ins/outs`, `count` accesses) goes on the
/// heap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitData {
    Inline { bytes: [u8; 8], len: u8 },
    Heap(Vec<u8>),
}

impl ExitData {
    pub fn from_slice(data: &[u8]) -> Self {
        match u8::try_from(data.len()) {
            Ok(len) if data.len() <= 8 => {
                let mut bytes = [0u8; 8];
                if let Some(b) = bytes.get_mut(..data.len()) {
                    b.copy_from_slice(data);
                }
                ExitData::Inline { bytes, len }
            }
            _ => ExitData::Heap(data.to_vec()),
        }
    }
}

impl std::ops::Deref for ExitData {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ExitData::Inline { bytes, len } => bytes.get(..usize::from(*len)).unwrap_or_default(),
            ExitData::Heap(v) => v,
        }
    }
}

impl std::ops::DerefMut for ExitData {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            ExitData::Inline { bytes, len } => {
                bytes.get_mut(..usize::from(*len)).unwrap_or_default()
            }
            ExitData::Heap(v) => v,
        }
    }
}

/// Where in the run page an I/O exit's data lies, if the kernel's offset and length fit in the
/// mapping (`run_size` bytes).
fn io_window(io: &kvm_run__bindgen_ty_1__bindgen_ty_4, run_size: usize) -> Option<(usize, usize)> {
    let len = usize::from(io.size).checked_mul(io.count as usize)?;
    let off = io.data_offset as usize;
    (off.checked_add(len)? <= run_size).then_some((off, len))
}

/// Decodes the exit in `run` (its mapping is `run_size` bytes, which bounds the I/O data area
/// the kernel points into).
pub fn decode(run: &kvm_run, run_size: usize) -> VmExit {
    match run.exit_reason {
        KVM_EXIT_IO => {
            // SAFETY: the exit reason says the `io` member of the union is the valid one.
            let io = unsafe { run.__bindgen_anon_1.io };
            let Some((off, len)) = io_window(&io, run_size) else {
                return VmExit::Plain;
            };
            // SAFETY: [off, off+len) lies inside the kvm_run mapping (io_window checked it),
            // which the kernel does not touch while the vCPU is out of KVM_RUN.
            let data = unsafe {
                std::slice::from_raw_parts((run as *const kvm_run).cast::<u8>().add(off), len)
            };
            VmExit::Inout {
                port: io.port,
                size: usize::from(io.size),
                is_in: u32::from(io.direction) == KVM_EXIT_IO_IN,
                data: ExitData::from_slice(data),
            }
        }
        KVM_EXIT_MMIO => {
            // SAFETY: the exit reason says the `mmio` member of the union is the valid one.
            let mmio = unsafe { run.__bindgen_anon_1.mmio };
            let len = (mmio.len as usize).min(mmio.data.len());
            VmExit::Mmio {
                gpa: mmio.phys_addr,
                is_write: mmio.is_write != 0,
                data: ExitData::from_slice(mmio.data.get(..len).unwrap_or_default()),
            }
        }
        KVM_EXIT_X86_RDMSR => {
            // SAFETY: the exit reason says the `msr` member of the union is the valid one.
            let msr = unsafe { run.__bindgen_anon_1.msr };
            VmExit::Rdmsr {
                index: msr.index,
                data: 0,
                error: 1,
            }
        }
        KVM_EXIT_X86_WRMSR => {
            // SAFETY: the exit reason says the `msr` member of the union is the valid one.
            let msr = unsafe { run.__bindgen_anon_1.msr };
            VmExit::Wrmsr {
                index: msr.index,
                data: msr.data,
                error: 1,
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
                if let (Some(to), Some(from)) = (insn.get_mut(..len), bytes.get(..len)) {
                    to.copy_from_slice(from);
                }
            }
            VmExit::InternalError {
                suberror: ef.suberror,
                insn,
                len,
            }
        }
        KVM_EXIT_SHUTDOWN => VmExit::Shutdown,
        _ => VmExit::Plain,
    }
}

/// Writes the handler's answer back into the run page: what an IN or an MMIO read returns, an
/// RDMSR's value, whether an MSR access raises #GP.
pub fn complete(run: &mut kvm_run, run_size: usize, exit: &VmExit) {
    match exit {
        VmExit::Inout {
            is_in: true, data, ..
        } if run.exit_reason == KVM_EXIT_IO => {
            // SAFETY: the exit reason says the `io` member of the union is the valid one.
            let io = unsafe { run.__bindgen_anon_1.io };
            let Some((off, len)) = io_window(&io, run_size) else {
                return;
            };
            let n = len.min(data.len());
            // SAFETY: [off, off+n) lies inside the kvm_run mapping (io_window checked it); the
            // vCPU is out of KVM_RUN, so nothing else writes it.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    data.as_ptr(),
                    (run as *mut kvm_run).cast::<u8>().add(off),
                    n,
                );
            }
        }
        VmExit::Mmio {
            is_write: false,
            data,
            ..
        } if run.exit_reason == KVM_EXIT_MMIO => {
            // SAFETY: the exit reason says the `mmio` member of the union is the valid one.
            let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
            let n = data.len().min(mmio.data.len());
            if let (Some(to), Some(from)) = (mmio.data.get_mut(..n), data.get(..n)) {
                to.copy_from_slice(from);
            }
        }
        VmExit::Rdmsr { data, error, .. } if run.exit_reason == KVM_EXIT_X86_RDMSR => {
            // SAFETY: the exit reason says the `msr` member of the union is the valid one.
            let msr = unsafe { &mut run.__bindgen_anon_1.msr };
            msr.data = *data;
            msr.error = *error;
        }
        VmExit::Wrmsr { error, .. } if run.exit_reason == KVM_EXIT_X86_WRMSR => {
            // SAFETY: the exit reason says the `msr` member of the union is the valid one.
            let msr = unsafe { &mut run.__bindgen_anon_1.msr };
            msr.error = *error;
        }
        _ => {}
    }
}

/// Size of the handler table: every KVM exit reason rhyve can name.
pub const NR_EXIT_REASONS: usize = 40;

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

/// Extra detail for an exit nobody handles: KVM's own diagnostic words.
pub fn exit_detail(run: &kvm_run) -> String {
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
