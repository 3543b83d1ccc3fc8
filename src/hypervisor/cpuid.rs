//! CPUID as the guest sees it: KVM's supported set, with the per-vCPU APIC ID and the
//! sockets/cores/threads topology written into leaves 0x1, 0x4, 0xB and 0x1F.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// The topology from `-c`: every vCPU is one thread of one core of one socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    pub sockets: u32,
    pub cores: u32,
    pub threads: u32,
}

impl Topology {
    /// bhyve's default for `-c N`: N single-core, single-thread sockets.
    pub fn flat(cpus: u32) -> Self {
        Topology {
            sockets: cpus,
            cores: 1,
            threads: 1,
        }
    }

    fn bits(n: u32) -> u32 {
        // ceil(log2(n)) for n >= 1.
        32 - n.saturating_sub(1).leading_zeros()
    }

    pub fn thread_bits(&self) -> u32 {
        Self::bits(self.threads)
    }

    pub fn core_bits(&self) -> u32 {
        Self::bits(self.cores)
    }

    /// The APIC ID of vCPU `id`: socket, core and thread fields packed as x86 topology expects.
    pub fn apic_id(&self, id: u32) -> u32 {
        let thread = id % self.threads;
        let core = (id / self.threads) % self.cores;
        let socket = id / (self.threads * self.cores);
        (socket << (self.core_bits() + self.thread_bits())) | (core << self.thread_bits()) | thread
    }
}

const CPUID_HTT: u32 = 1 << 28;

/// CPUID.1:ECX.CX16 (cmpxchg16b).
const CPUID_CX16: u32 = 1 << 13;

/// Whether this host's KVM is PVM (a software hypervisor; DESIGN.md §3).
pub fn host_is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// Builds vCPU `id`'s CPUID from KVM's supported table. On PVM, CX16 is hidden: PVM's
/// instruction emulator stops the VM on `lock cmpxchg16b`, which a guest kernel running in
/// emulated kernel mode executes as soon as it knows it may (the Debian 6.1 kernel does, early).
pub fn for_vcpu(supported: &CpuId, id: u32, topo: &Topology, pvm: bool) -> CpuId {
    let mut cpuid = supported.clone();
    if pvm {
        for e in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == 1) {
            e.ecx &= !CPUID_CX16;
        }
    }
    // The extended-topology leaves need one entry per level; KVM's table may list only some.
    for leaf in [0xbu32, 0x1f] {
        if !cpuid.as_slice().iter().any(|e| e.function == leaf) {
            continue;
        }
        for index in 0..3u32 {
            if !cpuid
                .as_slice()
                .iter()
                .any(|e| e.function == leaf && e.index == index)
            {
                let e = kvm_cpuid_entry2 {
                    function: leaf,
                    index,
                    flags: kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                    ..Default::default()
                };
                if cpuid.push(e).is_err() {
                    log::warn!("CPUID table full: leaf {leaf:#x} level {index} left out");
                }
            }
        }
    }
    let apic = topo.apic_id(id);
    let smt_bits = topo.thread_bits();
    let pkg_bits = topo.core_bits() + smt_bits;
    let per_pkg = 1u32 << pkg_bits;
    for e in cpuid.as_mut_slice().iter_mut() {
        patch_entry(e, apic, topo, smt_bits, pkg_bits, per_pkg);
    }
    cpuid
}

fn patch_entry(
    e: &mut kvm_cpuid_entry2,
    apic: u32,
    topo: &Topology,
    smt_bits: u32,
    pkg_bits: u32,
    per_pkg: u32,
) {
    match e.function {
        0x1 => {
            e.ebx = (e.ebx & 0x0000_ffff) | (apic << 24) | ((per_pkg.min(255)) << 16);
            if per_pkg > 1 {
                e.edx |= CPUID_HTT;
            } else {
                e.edx &= !CPUID_HTT;
            }
        }
        0x4 => {
            // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1.
            let cores_m1 = (1u32 << topo.core_bits()) - 1;
            let level = (e.eax >> 5) & 0x7;
            let sharing = if level >= 3 { per_pkg } else { 1 << smt_bits };
            e.eax =
                (e.eax & 0x3fff) | ((sharing - 1).min(0xfff) << 14) | (cores_m1.min(0x3f) << 26);
        }
        0xb | 0x1f => {
            // Extended topology: level 0 is SMT, level 1 is core, then the invalid level.
            let (shift, count, kind) = match e.index {
                0 => (smt_bits, topo.threads, 1),
                1 => (pkg_bits, topo.threads * topo.cores, 2),
                _ => (0, 0, 0),
            };
            e.eax = shift;
            e.ebx = count;
            e.ecx = (e.index & 0xff) | (kind << 8);
            e.edx = apic;
        }
        0x8000_001e => {
            // AMD: extended APIC ID, core ID and threads per core, node 0.
            let threads = topo.threads.max(1);
            e.eax = apic;
            e.ebx = ((apic >> smt_bits) & 0xff) | ((threads - 1).min(0xff) << 8);
            e.ecx = 0;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apic_ids_pack_topology() {
        let flat = Topology::flat(4);
        assert_eq!(
            (0..4).map(|i| flat.apic_id(i)).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        // 2 sockets x 3 cores x 2 threads: core field is 2 bits, thread field 1 bit.
        let t = Topology {
            sockets: 2,
            cores: 3,
            threads: 2,
        };
        assert_eq!(t.thread_bits(), 1);
        assert_eq!(t.core_bits(), 2);
        let ids: Vec<u32> = (0..12).map(|i| t.apic_id(i)).collect();
        assert_eq!(ids, [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]);
    }

    #[test]
    fn leaves_carry_the_apic_id() {
        let mut e1 = kvm_cpuid_entry2 {
            function: 1,
            ebx: 0x0000_0800,
            ..Default::default()
        };
        let t = Topology {
            sockets: 1,
            cores: 2,
            threads: 2,
        };
        patch_entry(&mut e1, 3, &t, 1, 2, 4);
        assert_eq!(e1.ebx >> 24, 3);
        assert_eq!((e1.ebx >> 16) & 0xff, 4);
        assert_ne!(e1.edx & CPUID_HTT, 0);
        let mut eb = kvm_cpuid_entry2 {
            function: 0xb,
            index: 1,
            ..Default::default()
        };
        patch_entry(&mut eb, 3, &t, 1, 2, 4);
        assert_eq!((eb.eax, eb.ebx, eb.ecx, eb.edx), (2, 4, 0x201, 3));
    }
}
