//! Hypervisor access over kvm-ioctls: the role bhyve's libvmmapi plays on FreeBSD.
//!
//! Creating the VM and its in-kernel devices, mapping guest memory by the bhyve memory map,
//! and preparing vCPUs (CPUID with per-vCPU APIC IDs, the x86 reset state).

pub mod cpuid;
pub mod flash;
pub mod irq;
pub mod memory;
pub mod shadow;

use kvm_bindings::{kvm_enable_cap, kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

pub use memory::{GuestRam, MemoryLayout};

/// Identity-map page and TSS for VT-x real-mode support: the 4 pages just below 0xFF000000,
/// which the bhyve map leaves free (the boot ROM region starts at 0xFF000000 at the lowest).
pub const IDENTITY_MAP_ADDR: u64 = 0xfeff_c000;
pub const TSS_ADDR: u64 = 0xfeff_d000;

/// KVM_CAP_X86_USER_SPACE_MSR: exits to userspace for MSRs KVM does not know.
const KVM_CAP_X86_USER_SPACE_MSR: u32 = 188;
const KVM_MSR_EXIT_REASON_UNKNOWN: u64 = 1 << 1;
const KVM_MSR_EXIT_REASON_FILTER: u64 = 1 << 2;
/// IA32_APIC_BASE.
pub const MSR_APIC_BASE: u32 = 0x1b;

#[derive(Debug, thiserror::Error)]
pub enum HvError {
    #[error("cannot open /dev/kvm: {0} (rhyve needs KVM: load the kvm module and make /dev/kvm readable and writable by this user)")]
    OpenKvm(std::io::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    #[error("KVM lacks {0}, which rhyve needs")]
    MissingCap(&'static str),
    #[error("{cpus} vCPUs asked for, but this host's KVM allows at most {max}")]
    TooManyVcpus { cpus: u32, max: u32 },
    #[error("{what}: {err}")]
    Kvm {
        what: &'static str,
        err: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> HvError {
    move |err| HvError::Kvm { what, err }
}

/// Opens /dev/kvm and checks what rhyve cannot run without.
pub fn open() -> Result<Kvm, HvError> {
    let kvm = Kvm::new().map_err(|e| HvError::OpenKvm(e.into()))?;
    let api = kvm.get_api_version();
    if api != 12 {
        return Err(HvError::ApiVersion(api));
    }
    for (cap, name) in [
        (Cap::Irqchip, "an in-kernel irqchip (KVM_CAP_IRQCHIP)"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(HvError::MissingCap(name));
        }
    }
    Ok(kvm)
}

/// The most vCPUs this host's KVM allows in one VM.
pub fn max_vcpus(kvm: &Kvm) -> u32 {
    kvm.get_max_vcpus() as u32
}

/// Creates the VM, without its in-kernel devices: guest memory should be mapped first (see
/// `create_irqchip`).
pub fn create_vm(kvm: &Kvm, cpus: u32) -> Result<VmFd, HvError> {
    let max = max_vcpus(kvm);
    if cpus > max {
        return Err(HvError::TooManyVcpus { cpus, max });
    }
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    // Only VT-x uses these; other KVM back ends (AMD, PVM) may refuse, which is harmless.
    if let Err(e) = vm.set_identity_map_address(IDENTITY_MAP_ADDR) {
        log::debug!("KVM_SET_IDENTITY_MAP_ADDR: {e} (ignored)");
    }
    if let Err(e) = vm.set_tss_address(TSS_ADDR as usize) {
        log::debug!("KVM_SET_TSS_ADDR: {e} (ignored)");
    }
    Ok(vm)
}

/// bhyve's platform in the kernel: I/O APIC + PIC + LAPICs, and the PIT; plus MSR exits.
///
/// Call it after every memory slot is mapped: on this project's PVM hosts the first slot added
/// after the irqchip exists costs a fixed ~7 ms (measured: BENCHMARKS.md), against ~15 us
/// before it. It must come before the vCPUs are created, as KVM requires.
pub fn create_irqchip(vm: &VmFd, pvm: bool) -> Result<(), HvError> {
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    // Unknown MSRs come to rhyve, which injects #GP or ignores them per x86.strictmsr (-w).
    // On PVM, reads of IA32_APIC_BASE come too: PVM answers them with 0, so a guest would think
    // it has no local APIC; rhyve answers with the architectural value.
    let reasons = KVM_MSR_EXIT_REASON_UNKNOWN | if pvm { KVM_MSR_EXIT_REASON_FILTER } else { 0 };
    let cap = kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        args: [reasons, 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap)
        .map_err(kvm_err("KVM_CAP_X86_USER_SPACE_MSR"))?;
    if pvm {
        // A 0 bit denies (here: sends to rhyve) the read of that MSR.
        let range = kvm_ioctls::MsrFilterRange {
            flags: kvm_ioctls::MsrFilterRangeFlags::READ,
            base: MSR_APIC_BASE,
            msr_count: 1,
            bitmap: &[0],
        };
        vm.set_msr_filter(kvm_ioctls::MsrFilterDefaultAction::ALLOW, &[range])
            .map_err(kvm_err("KVM_X86_SET_MSR_FILTER"))?;
    }
    Ok(())
}

/// Puts a vCPU in the x86 power-on state (bhyve `vcpu_reset`): real mode, CS selector 0xF000
/// with base 0xFFFF0000, IP 0xFFF0, so the first fetch is at 0xFFFFFFF0, the ROM's reset vector.
pub fn vcpu_reset(vcpu: &VcpuFd) -> Result<(), HvError> {
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    sregs.cs.selector = 0xf000;
    sregs.cs.base = 0xffff_0000;
    sregs.cs.limit = 0xffff;
    for seg in [
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        seg.selector = 0;
        seg.base = 0;
        seg.limit = 0xffff;
    }
    sregs.cr0 = 0x6000_0010; // CD | NW | ET, as after RESET
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    let regs = kvm_bindings::kvm_regs {
        rip: 0xfff0,
        rflags: 0x2,
        // EDX holds the processor signature after RESET.
        rdx: 0x600,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
    Ok(())
}

/// Creates vCPU `id` with its CPUID table.
pub fn create_vcpu(vm: &VmFd, id: u32, cpuid: &kvm_bindings::CpuId) -> Result<VcpuFd, HvError> {
    let vcpu = vm
        .create_vcpu(id as u64)
        .map_err(kvm_err("KVM_CREATE_VCPU"))?;
    vcpu.set_cpuid2(cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    Ok(vcpu)
}

/// A vCPU's MSR as KVM holds it (KVM_GET_MSRS), if KVM answers.
pub fn get_msr(vcpu: &VcpuFd, index: u32) -> Option<u64> {
    let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .ok()?;
    match vcpu.get_msrs(&mut msrs) {
        Ok(1) => msrs.as_slice().first().map(|e| e.data),
        _ => None,
    }
}
