//! Vendor MSRs rhyve answers itself (bhyve `amd64/xmsr.c`).
//!
//! Only MSRs KVM does not implement reach rhyve (KVM_MSR_EXIT_REASON_UNKNOWN). KVM's common
//! code already answers most of bhyve's list (bhyve's kernel does not): HWCR, NB_CFG, the K7
//! performance counters, SYSCFG, TSEG, OSVW, the patch level / BIOS signature (0x8b),
//! MISC_FEATURE_ENABLES, PLATFORM_INFO; its SVM module answers IC_CFG. What is left here is
//! what Linux 6.1 reads at boot and KVM's common code does not know, because only one vendor
//! module (or none) implements it:
//!
//! - IA32_FEATURE_CONTROL (0x3a): Intel's `init_ia32_feat_ctl` reads it on every CPU. KVM's VMX
//!   module answers it; other vendor modules (PVM's) do not. The answer is bhyve's and a
//!   firmware's: locked, VMX and SGX off, so writes fault as on hardware.
//! - IA32_PLATFORM_ID (0x17): Intel's microcode loader reads it with a plain `rdmsr` (a #GP is
//!   a kernel warning) when the hypervisor CPUID bit is clear, as on PVM. It reads 0.
//! - DE_CFG (0xc0011029): `init_amd` sets its LFENCE-serializing bit. KVM's SVM module answers
//!   it; others do not. The answer is what KVM's is: the bit set, which the host kernel has
//!   done on the physical CPU. Writes are dropped: the guest's chicken bits cannot reach
//!   the hardware.
//!
//! Deliberately not answered, so they keep raising #GP:
//! - LS_CFG (0xc0011020), which bhyve reads as 0: Linux would take a successful read as
//!   leave to mitigate Speculative Store Bypass by writing it, and report SSBD as mitigated
//!   while the writes go nowhere.
//! - FP_CFG (0xc0011028), which Linux (6.1 stable too) sets a Zen1 mitigation bit in: a
//!   dropped write would look applied. Linux uses `msr_set_bit`, whose #GP is silent.
//! - RAPL, PPIN, LBR, uncore and other model-specific MSRs Linux probes with the safe
//!   accessors and does without.

use rhyve_hypervisor::cpuid::Vendor;

pub const MSR_IA32_PLATFORM_ID: u32 = 0x17;
pub const MSR_IA32_FEATURE_CONTROL: u32 = 0x3a;
/// IA32_FEATURE_CONTROL bit 0: locked (bits 1 and 2, VMX inside/outside SMX, clear).
pub const FEATURE_CONTROL_LOCKED: u64 = 1;
pub const MSR_AMD64_DE_CFG: u32 = 0xc001_1029;
/// DE_CFG bit 1: LFENCE is dispatch serializing.
pub const DE_CFG_LFENCE_SERIALIZE: u64 = 1 << 1;

/// The value a read of `index` returns, if rhyve emulates it for this vendor.
pub fn emulate_rdmsr(vendor: Vendor, index: u32) -> Option<u64> {
    match (vendor, index) {
        (Vendor::Intel, MSR_IA32_FEATURE_CONTROL) => Some(FEATURE_CONTROL_LOCKED),
        (Vendor::Intel, MSR_IA32_PLATFORM_ID) => Some(0),
        (Vendor::Amd, MSR_AMD64_DE_CFG) => Some(DE_CFG_LFENCE_SERIALIZE),
        _ => None,
    }
}

/// Whether a write of `value` to `index` is accepted (and dropped) rather than faulting.
pub fn emulate_wrmsr(vendor: Vendor, index: u32, _value: u64) -> bool {
    // IA32_FEATURE_CONTROL is locked and IA32_PLATFORM_ID read-only: both fault.
    matches!((vendor, index), (Vendor::Amd, MSR_AMD64_DE_CFG))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_boot_msrs_get_answers() {
        // Intel: FEATURE_CONTROL locked with VMX off, PLATFORM_ID 0, neither writable.
        assert_eq!(
            emulate_rdmsr(Vendor::Intel, 0x3a),
            Some(FEATURE_CONTROL_LOCKED)
        );
        assert_eq!(emulate_rdmsr(Vendor::Intel, 0x17), Some(0));
        assert!(!emulate_wrmsr(Vendor::Intel, 0x3a, 0x5));
        assert!(!emulate_wrmsr(Vendor::Intel, 0x17, 0));
        // AMD (and Hygon): DE_CFG says LFENCE serializes; Linux's msr_set_bit then need not
        // write, and a write is dropped.
        assert_eq!(
            emulate_rdmsr(Vendor::Amd, 0xc001_1029),
            Some(DE_CFG_LFENCE_SERIALIZE)
        );
        assert!(emulate_wrmsr(Vendor::Amd, 0xc001_1029, 0x202));
    }

    #[test]
    fn other_msrs_are_left_to_fault() {
        // Each vendor's MSRs only for that vendor.
        assert_eq!(emulate_rdmsr(Vendor::Amd, 0x3a), None);
        assert_eq!(emulate_rdmsr(Vendor::Intel, 0xc001_1029), None);
        assert!(!emulate_wrmsr(Vendor::Intel, 0xc001_1029, 2));
        assert_eq!(emulate_rdmsr(Vendor::Other, 0x3a), None);
        // LS_CFG and FP_CFG would fake mitigations; RAPL power unit, PPIN_CTL, LBR TOS.
        for index in [0xc001_1020, 0xc001_1028, 0x606, 0x4e, 0x1c9] {
            assert_eq!(emulate_rdmsr(Vendor::Amd, index), None, "{index:#x}");
            assert_eq!(emulate_rdmsr(Vendor::Intel, index), None, "{index:#x}");
            assert!(!emulate_wrmsr(Vendor::Amd, index, 1 << 9), "{index:#x}");
        }
    }
}
