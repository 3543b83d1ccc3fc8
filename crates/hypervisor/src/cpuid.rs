//! CPUID as the guest sees it: KVM's supported set, with the hypervisor bit that makes a guest
//! look for KVM's leaves, the per-vCPU APIC ID, and the sockets/cores/threads topology written
//! into every leaf a guest reads it from: 0x1, 0x4, 0xB and 0x1F (Intel's way), 0x80000001,
//! 0x80000008, 0x8000001D and 0x8000001E (AMD's way).

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// The topology from `-c`: every vCPU is one thread of one core of one socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    pub sockets: u32,
    pub cores: u32,
    pub threads: u32,
}

/// `1 << bits`, saturating instead of overflowing.
fn pow2(bits: u32) -> u32 {
    1u32.checked_shl(bits).unwrap_or(u32::MAX)
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

    /// Where vCPU `id` sits: its socket, core and thread indexes.
    fn position(&self, id: u32) -> (u32, u32, u32) {
        let threads = self.threads.max(1);
        let cores = self.cores.max(1);
        let thread = id % threads;
        let core = (id / threads) % cores;
        let socket = id / threads.saturating_mul(cores);
        (socket, core, thread)
    }

    /// The APIC ID of vCPU `id`: socket, core and thread fields packed as x86 topology expects.
    pub fn apic_id(&self, id: u32) -> u32 {
        let (socket, core, thread) = self.position(id);
        let (tb, cb) = (self.thread_bits(), self.core_bits());
        socket.checked_shl(cb + tb).unwrap_or(0) | core.checked_shl(tb).unwrap_or(0) | thread
    }

    fn place(&self, id: u32) -> Place {
        let (socket, core, _) = self.position(id);
        let smt_bits = self.thread_bits();
        let core_bits = self.core_bits();
        Place {
            apic: self.apic_id(id),
            socket,
            core,
            smt_bits,
            core_bits,
            pkg_bits: smt_bits + core_bits,
            threads_per_core: self.threads.max(1),
            threads_per_pkg: self.threads.max(1).saturating_mul(self.cores.max(1)),
        }
    }
}

/// One vCPU's place in the topology, and the APIC ID field widths that encode it.
struct Place {
    apic: u32,
    socket: u32,
    /// The core's index within its socket.
    core: u32,
    smt_bits: u32,
    core_bits: u32,
    /// APIC ID bits below the socket field: `smt_bits + core_bits`.
    pkg_bits: u32,
    threads_per_core: u32,
    /// Logical processors in a socket (cores x threads), as opposed to the addressable
    /// `1 << pkg_bits`.
    threads_per_pkg: u32,
}

/// The CPU vendor the guest sees. KVM passes the host's leaf 0 through, and the vendor decides
/// which leaves a guest kernel reads its topology from and which vendor MSRs it touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    /// AMD, and Hygon, whose CPUs (and Linux's code for them) follow AMD's.
    Amd,
    Other,
}

impl Vendor {
    pub fn of(cpuid: &CpuId) -> Vendor {
        let Some(e) = find(cpuid.as_slice(), 0, 0) else {
            return Vendor::Other;
        };
        let mut sig = [0u8; 12];
        sig[..4].copy_from_slice(&e.ebx.to_le_bytes());
        sig[4..8].copy_from_slice(&e.edx.to_le_bytes());
        sig[8..].copy_from_slice(&e.ecx.to_le_bytes());
        match &sig {
            b"GenuineIntel" => Vendor::Intel,
            b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
            _ => Vendor::Other,
        }
    }
}

/// KVM's signature leaf: EAX is the highest hypervisor leaf, EBX:ECX:EDX "KVMKVMKVM\0\0\0".
pub const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
/// KVM's paravirtual features (KVM_FEATURE_* in EAX).
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;

/// CPUID.1:EDX.HTT: leaf 1 EBX[23:16] counts the package's logical processors.
const CPUID_HTT: u32 = 1 << 28;
/// CPUID.1:ECX.CX16 (cmpxchg16b).
const CPUID_CX16: u32 = 1 << 13;
/// CPUID.1:ECX bit 31: running under a hypervisor. Linux looks for the 0x40000000 leaves only
/// when it is set; KVM's supported table leaves it to the VMM.
const CPUID_HYPERVISOR: u32 = 1 << 31;
/// CPUID.80000001:ECX.CmpLegacy: the HTT bit means several cores, not hyper-threading.
const CPUID_CMP_LEGACY: u32 = 1 << 1;
/// CPUID.80000001:ECX.TOPOEXT: leaves 0x8000001D and 0x8000001E are valid.
const CPUID_TOPOEXT: u32 = 1 << 22;

const AMD_CACHE_LEAF: u32 = 0x8000_001d;
const AMD_TOPOLOGY_LEAF: u32 = 0x8000_001e;

/// Whether this host's KVM is PVM (a software hypervisor, module kvm_pvm; README.md).
pub fn host_is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// The entry KVM would answer `cpuid(function, index)` with.
fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    entries.iter().find(|e| {
        e.function == function
            && (e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || e.index == index)
    })
}

/// What `patch_entry` writes besides the vCPU's place.
struct Patch {
    vendor: Vendor,
    /// Set CPUID.1:ECX.hypervisor (not on PVM; see `for_vcpu`).
    hypervisor: bool,
    /// Offer AMD's topology extensions (see `amd_topoext`).
    topoext: bool,
}

/// Builds vCPU `id`'s CPUID from KVM's supported table.
///
/// KVM's own leaves (0x40000000: "KVMKVMKVM" and the highest hypervisor leaf; 0x40000001: the
/// KVM_FEATURE_* bits, kvm-clock, PV EOI, steal time, PV unhalt, ...) are kept as KVM reports
/// them, and the hypervisor bit is set so that a guest looks for them: without it Linux never
/// detects KVM, calibrates the TSC against the PIT and falls back to the PM timer. bhyve
/// presents its own "bhyve bhyve " signature instead; a Linux guest on KVM needs KVM's, since
/// only KVM implements the paravirtual interfaces those leaves announce.
///
/// On PVM, CX16 is hidden: PVM's instruction emulator stops the VM on `lock cmpxchg16b`, which
/// a guest kernel running in emulated kernel mode executes as soon as it knows it may (the
/// Debian 6.1 kernel does, early). The hypervisor bit is left as PVM's KVM reports it (as
/// before): with it, a stock kernel would turn on every KVM_FEATURE_* in 0x40000001, and some
/// of those are untested under PVM's emulated kernel mode: PV IPIs, PV TLB flush and PV sched
/// yield are VMCALL/VMMCALL hypercalls that PVM's emulator would have to run, and async page
/// faults inject events into a guest kernel that PVM runs in user mode. Until that is tried,
/// PVM guests keep calibrating from `tsc_early_khz` (see `PVM_CMDLINE`).
pub fn for_vcpu(supported: &CpuId, id: u32, topo: &Topology, pvm: bool) -> CpuId {
    let vendor = Vendor::of(supported);
    let mut entries = supported.as_slice().to_vec();
    if pvm {
        for e in entries.iter_mut().filter(|e| e.function == 1) {
            e.ecx &= !CPUID_CX16;
        }
    }
    add_topology_levels(&mut entries);
    let topoext = vendor == Vendor::Amd && amd_topoext(&mut entries, topo);
    let place = topo.place(id);
    let how = Patch {
        vendor,
        hypervisor: !pvm,
        topoext,
    };
    for e in entries.iter_mut() {
        patch_entry(e, &place, &how);
    }
    // Every addition was checked against the limit (`room`), so this cuts nothing; it leaves
    // the size limit, from_entries' only error, unreachable.
    entries.truncate(kvm_bindings::KVM_MAX_CPUID_ENTRIES);
    match CpuId::from_entries(&entries) {
        Ok(cpuid) => cpuid,
        Err(e) => {
            log::error!("CPUID table for vcpu {id}: {e:?}; KVM's table used unpatched");
            supported.clone()
        }
    }
}

/// Room left for entries we add, within what KVM_SET_CPUID2 takes.
fn room(entries: &[kvm_cpuid_entry2]) -> usize {
    kvm_bindings::KVM_MAX_CPUID_ENTRIES.saturating_sub(entries.len())
}

/// The extended-topology leaves need one entry per level; KVM's table may list only some.
fn add_topology_levels(entries: &mut Vec<kvm_cpuid_entry2>) {
    for leaf in [0xbu32, 0x1f] {
        if !entries.iter().any(|e| e.function == leaf) {
            continue;
        }
        for index in 0..3u32 {
            if entries
                .iter()
                .any(|e| e.function == leaf && e.index == index)
            {
                continue;
            }
            if room(entries) == 0 {
                log::warn!("CPUID table full: leaf {leaf:#x} level {index} left out");
                continue;
            }
            entries.push(kvm_cpuid_entry2 {
                function: leaf,
                index,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            });
        }
    }
}

/// Decides whether an AMD guest sees the topology extensions (CPUID.80000001:ECX.TOPOEXT),
/// and makes the leaves they promise exist.
///
/// Linux on AMD reads its package and core numbering from 0x80000008 alone, which cannot
/// tell threads from cores; only with TOPOEXT does it read threads per core (0x8000001E) and
/// leaf 0xB. So TOPOEXT is offered when the host has it (KVM then passes the host's cache
/// leaves 0x8000001D and a zeroed 0x8000001E, both rewritten here), and also when a core has
/// more than one thread: then, on a host without it (the qemu64 CPU model, for one), the cache
/// leaves are built from the legacy 0x80000005/0x80000006 descriptors and 0x80000000 is raised
/// to cover 0x8000001E.
fn amd_topoext(entries: &mut Vec<kvm_cpuid_entry2>, topo: &Topology) -> bool {
    let Some(ext1) = find(entries, 0x8000_0001, 0) else {
        return false;
    };
    let host = ext1.ecx & CPUID_TOPOEXT != 0;
    if !host && topo.threads <= 1 {
        return false;
    }
    if find(entries, 0x8000_0000, 0).is_none() {
        return false;
    }
    let has_caches = entries
        .iter()
        .any(|e| e.function == AMD_CACHE_LEAF && e.eax & 0x1f != 0);
    let caches = if has_caches {
        Vec::new()
    } else {
        amd_caches_from_legacy(entries)
    };
    let add_topology = find(entries, AMD_TOPOLOGY_LEAF, 0).is_none();
    if caches.len() + usize::from(add_topology) > room(entries) {
        log::warn!("CPUID table full: AMD topology extensions left as the host has them");
        return host;
    }
    if !has_caches {
        entries.retain(|e| e.function != AMD_CACHE_LEAF);
        entries.extend(caches);
    }
    if add_topology {
        entries.push(kvm_cpuid_entry2 {
            function: AMD_TOPOLOGY_LEAF,
            ..Default::default()
        });
    }
    true
}

/// One cache as AMD's legacy descriptors give it.
struct LegacyCache {
    /// 0x8000001D cache type: 1 data, 2 instruction, 3 unified.
    kind: u32,
    level: u32,
    size_kib: u32,
    /// Ways of associativity; `None` for fully associative.
    ways: Option<u32>,
    line: u32,
}

impl LegacyCache {
    /// An L1 descriptor (0x80000005 ECX or EDX): size in KiB, ways (0xff: fully), line size.
    fn l1(kind: u32, reg: u32) -> Option<LegacyCache> {
        let ways = match (reg >> 16) & 0xff {
            0 => return None,
            0xff => None,
            n => Some(n),
        };
        Some(LegacyCache {
            kind,
            level: 1,
            size_kib: reg >> 24,
            ways,
            line: reg & 0xff,
        })
    }

    /// An L2 or L3 descriptor's 4-bit associativity code.
    fn ways(code: u32) -> Option<Option<u32>> {
        let ways = match code {
            1..=4 => code,
            5 => 6,
            6 => 8,
            8 => 16,
            0xa => 32,
            0xb => 48,
            0xc => 64,
            0xd => 96,
            0xe => 128,
            0xf => return Some(None),
            // 0: no such cache; 9: described by 0x8000001D only; 7: reserved.
            _ => return None,
        };
        Some(Some(ways))
    }

    /// The 0x8000001D entry at `index` for this cache, sharing left for `patch_entry`.
    fn entry(&self, index: u32) -> Option<kvm_cpuid_entry2> {
        const SELF_INITIALIZING: u32 = 1 << 8;
        const FULLY_ASSOCIATIVE: u32 = 1 << 9;
        let size = u64::from(self.size_kib) * 1024;
        let line = u64::from(self.line);
        if size == 0 || line == 0 {
            return None;
        }
        let (ways, fully) = match self.ways {
            Some(w) => (u64::from(w), 0),
            None => (size / line, FULLY_ASSOCIATIVE),
        };
        let sets = size.checked_div(line.checked_mul(ways)?)?;
        // EBX holds line size - 1 in 12 bits and ways - 1 in 10; ECX sets - 1.
        if sets == 0 || ways == 0 || ways > 1024 || line > 4096 {
            return None;
        }
        Some(kvm_cpuid_entry2 {
            function: AMD_CACHE_LEAF,
            index,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax: self.kind | (self.level << 5) | SELF_INITIALIZING | fully,
            ebx: u32::try_from((line - 1) | ((ways - 1) << 22)).ok()?,
            ecx: u32::try_from(sets - 1).ok()?,
            ..Default::default()
        })
    }
}

/// The host's caches in the 0x8000001D format, from the legacy leaves 0x80000005 (L1 data and
/// instruction) and 0x80000006 (L2, L3); a cache they do not describe is left out. An index
/// past the last has no entry, which KVM answers with zeros: the null cache type ending the
/// guest's walk.
fn amd_caches_from_legacy(entries: &[kvm_cpuid_entry2]) -> Vec<kvm_cpuid_entry2> {
    let mut caches = Vec::new();
    if let Some(l1) = find(entries, 0x8000_0005, 0) {
        caches.push(LegacyCache::l1(1, l1.ecx));
        caches.push(LegacyCache::l1(2, l1.edx));
    }
    if let Some(l23) = find(entries, 0x8000_0006, 0) {
        caches.push(
            LegacyCache::ways((l23.ecx >> 12) & 0xf).map(|ways| LegacyCache {
                kind: 3,
                level: 2,
                size_kib: l23.ecx >> 16,
                ways,
                line: l23.ecx & 0xff,
            }),
        );
        caches.push(
            LegacyCache::ways((l23.edx >> 12) & 0xf).map(|ways| LegacyCache {
                kind: 3,
                level: 3,
                // In 512 KiB units.
                size_kib: (l23.edx >> 18) * 512,
                ways,
                line: l23.edx & 0xff,
            }),
        );
    }
    let mut out = Vec::new();
    for cache in caches.into_iter().flatten() {
        let index = u32::try_from(out.len()).unwrap_or(u32::MAX);
        if let Some(e) = cache.entry(index) {
            out.push(e);
        }
    }
    out
}

fn patch_entry(e: &mut kvm_cpuid_entry2, p: &Place, how: &Patch) {
    // Addressable IDs per package and per core: the APIC ID field widths, as leaf 1, leaf 4
    // and the cache sharing counts express them (a guest derives shifts from them).
    let per_pkg = pow2(p.pkg_bits);
    let per_core = pow2(p.smt_bits);
    let amd = how.vendor == Vendor::Amd;
    match e.function {
        0x1 => {
            e.ebx = (e.ebx & 0x0000_ffff) | ((p.apic & 0xff) << 24) | (per_pkg.min(255) << 16);
            if per_pkg > 1 {
                e.edx |= CPUID_HTT;
            } else {
                e.edx &= !CPUID_HTT;
            }
            if how.hypervisor {
                e.ecx |= CPUID_HYPERVISOR;
            }
        }
        0x4 => {
            // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1.
            let cores_m1 = pow2(p.core_bits).saturating_sub(1);
            let level = (e.eax >> 5) & 0x7;
            let sharing = if level >= 3 { per_pkg } else { per_core };
            e.eax = (e.eax & 0x3fff)
                | (sharing.saturating_sub(1).min(0xfff) << 14)
                | (cores_m1.min(0x3f) << 26);
        }
        0xb | 0x1f => {
            // Extended topology: level 0 is SMT, level 1 is core, then the invalid level.
            let (shift, count, kind) = match e.index {
                0 => (p.smt_bits, p.threads_per_core, 1),
                1 => (p.pkg_bits, p.threads_per_pkg, 2),
                _ => (0, 0, 0),
            };
            e.eax = shift;
            e.ebx = count.min(0xffff);
            e.ecx = (e.index & 0xff) | (kind << 8);
            e.edx = p.apic;
        }
        0x8000_0000 if amd && how.topoext => {
            e.eax = e.eax.max(AMD_TOPOLOGY_LEAF);
        }
        0x8000_0001 if amd => {
            // CmpLegacy with more than one thread per package, as AMD's multi-core parts
            // report: the HTT bit then counts cores, and Linux skips its Intel-style HT
            // detection. The host's value says nothing about the guest's topology.
            if p.threads_per_pkg > 1 {
                e.ecx |= CPUID_CMP_LEGACY;
            } else {
                e.ecx &= !CPUID_CMP_LEGACY;
            }
            if how.topoext {
                e.ecx |= CPUID_TOPOEXT;
            } else {
                e.ecx &= !CPUID_TOPOEXT;
            }
        }
        0x8000_0008 if amd => {
            // ECX[7:0] NC: threads per package - 1; ECX[15:12] ApicIdCoreIdSize: APIC ID bits
            // below the socket field. Linux takes the package ID as the APIC ID shifted right
            // by ApicIdCoreIdSize, so KVM's (the host's) values would put every vCPU into one
            // package.
            let nc = p.threads_per_pkg.saturating_sub(1).min(0xff);
            e.ecx = (e.ecx & !0xf0ff) | (p.pkg_bits.min(0xf) << 12) | nc;
        }
        // EAX[25:14]: threads sharing this cache - 1; L1 and L2 per core, L3 per socket. A
        // null cache type ends the list and stays as it is.
        AMD_CACHE_LEAF if amd && e.eax & 0x1f != 0 => {
            let level = (e.eax >> 5) & 0x7;
            let sharing = if level >= 3 { per_pkg } else { per_core };
            e.eax = (e.eax & !(0xfff << 14)) | (sharing.saturating_sub(1).min(0xfff) << 14);
        }
        AMD_TOPOLOGY_LEAF => {
            // AMD: EAX extended APIC ID; EBX core ID within the socket and threads per core
            // - 1; ECX node ID, one node per socket.
            e.eax = p.apic;
            e.ebx = (p.core & 0xff) | (p.threads_per_core.saturating_sub(1).min(0xff) << 8);
            e.ecx = p.socket & 0xff;
            e.edx = 0;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(s: &[u8; 4]) -> u32 {
        u32::from_le_bytes(*s)
    }

    fn ent(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        let indexed = matches!(function, 4 | 7 | 0xb | 0xd | 0x1f | 0x8000_001d);
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if indexed {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    /// KVM_CPUID_FEATURES EAX as a host KVM reports it: clocksource, nop io delay,
    /// clocksource2, async PF, steal time, PV EOI, PV unhalt, PV TLB flush, async PF vmexit,
    /// PV send IPI, poll control, PV sched yield, async PF int, stable clock bit (24).
    const KVM_FEATURES: u32 = 0x0100_7efb;

    fn kvm_leaves() -> [kvm_cpuid_entry2; 2] {
        [
            ent(
                KVM_CPUID_SIGNATURE,
                0,
                [
                    KVM_CPUID_FEATURES,
                    sig(b"KVMK"),
                    sig(b"VMKV"),
                    sig(b"M\0\0\0"),
                ],
            ),
            ent(KVM_CPUID_FEATURES, 0, [KVM_FEATURES, 0, 0, 0]),
        ]
    }

    /// What KVM_GET_SUPPORTED_CPUID gives on a two-socket Xeon (20 cores, 40 threads each).
    fn intel_host() -> CpuId {
        let mut v = vec![
            ent(0, 0, [0x16, sig(b"Genu"), sig(b"ntel"), sig(b"ineI")]),
            ent(1, 0, [0x0005_0654, 0x0028_0800, 0x7ffa_fbff, 0x178b_fbff]),
            ent(4, 0, [0x7c00_4121, 0x01c0_003f, 0x3f, 0]),
            ent(4, 1, [0x7c00_4122, 0x01c0_003f, 0x3f, 0]),
            ent(4, 2, [0x7c00_4143, 0x03c0_003f, 0x3ff, 0]),
            ent(4, 3, [0x7c04_c163, 0x0280_003f, 0xdfff, 4]),
            ent(4, 4, [0, 0, 0, 0]),
            ent(0xb, 0, [1, 2, 0x100, 0]),
            ent(0xb, 1, [6, 40, 0x201, 0]),
            ent(0xb, 2, [0, 0, 2, 0]),
            ent(0x8000_0000, 0, [0x8000_0008, 0, 0, 0]),
            ent(0x8000_0001, 0, [0, 0, 0x121, 0x2c10_0800]),
            ent(0x8000_0008, 0, [0x3030, 0, 0, 0]),
        ];
        v.extend(kvm_leaves());
        CpuId::from_entries(&v).unwrap()
    }

    /// The reported case: KVM in an outer guest with QEMU's qemu64,+svm,+npt (family 0xf,
    /// no TOPOEXT, legacy cache leaves) and 4 vCPUs: KVM passes that guest's 0x80000008
    /// (NC 3, ApicIdCoreIdSize 2) and CmpLegacy through.
    fn amd_qemu64_host() -> CpuId {
        let mut v = vec![
            ent(0, 0, [0xd, sig(b"Auth"), sig(b"cAMD"), sig(b"enti")]),
            ent(1, 0, [0x0006_0fb1, 0x0004_0800, 0x0080_2001, 0x178b_fbff]),
            ent(0xb, 0, [0, 1, 0x100, 0]),
            ent(0xb, 1, [2, 4, 0x201, 0]),
            ent(0xb, 2, [0, 0, 2, 0]),
            ent(0x8000_0000, 0, [0x8000_000a, 0, 0, 0]),
            ent(0x8000_0001, 0, [0x0006_0fb1, 0, 0x67, 0x2193_fbff]),
            // L1d and L1i 64 KiB 2-way, 64-byte lines; L2 512 KiB 16-way; L3 16 MiB 16-way.
            ent(
                0x8000_0005,
                0,
                [0x01ff_01ff, 0x01ff_01ff, 0x4002_0140, 0x4002_0140],
            ),
            ent(0x8000_0006, 0, [0, 0x4200_4200, 0x0200_8140, 0x0080_8140]),
            ent(0x8000_0008, 0, [0x3028, 0, 0x2003, 0]),
            ent(0x8000_000a, 0, [1, 0x10, 0, 0x0001_00bd]),
        ];
        v.extend(kvm_leaves());
        CpuId::from_entries(&v).unwrap()
    }

    /// KVM on a Zen 3 EPYC (family 0x19, 64 cores, 128 threads): TOPOEXT, the host's cache
    /// leaves 0x8000001D (L3 shared by 16 threads), 0x8000001E zeroed by KVM.
    fn amd_zen_host() -> CpuId {
        let mut v = vec![
            ent(0, 0, [0x10, sig(b"Auth"), sig(b"cAMD"), sig(b"enti")]),
            ent(1, 0, [0x00a0_0f11, 0x0080_0800, 0x7ef8_320b, 0x178b_fbff]),
            ent(0xb, 0, [1, 2, 0x100, 0]),
            ent(0xb, 1, [7, 128, 0x201, 0]),
            ent(0xb, 2, [0, 0, 2, 0]),
            ent(0x8000_0000, 0, [0x8000_0021, 0, 0, 0]),
            ent(0x8000_0001, 0, [0x00a0_0f11, 0, 0x0040_0067, 0x2fd3_fbff]),
            ent(
                0x8000_0005,
                0,
                [0xff40_ff40, 0xff40_ff40, 0x2008_0140, 0x2008_0140],
            ),
            ent(
                0x8000_0006,
                0,
                [0x4800_0000, 0x6800_0000, 0x0200_6140, 0x0100_9140],
            ),
            ent(0x8000_0008, 0, [0x3030, 0, 0x707f, 0]),
            ent(0x8000_001d, 0, [0x4121, 0x01c0_003f, 0x3f, 0]),
            ent(0x8000_001d, 1, [0x4122, 0x01c0_003f, 0x3f, 0]),
            ent(0x8000_001d, 2, [0x4143, 0x01c0_003f, 0x3ff, 2]),
            ent(0x8000_001d, 3, [0x0003_c163, 0x03c0_003f, 0x7fff, 1]),
            ent(0x8000_001d, 4, [0, 0, 0, 0]),
            ent(0x8000_001e, 0, [0, 0, 0, 0]),
        ];
        v.extend(kvm_leaves());
        CpuId::from_entries(&v).unwrap()
    }

    /// `cpuid(function, index)` as KVM answers it from `t`: zeros where no entry matches.
    fn cpuid(t: &CpuId, function: u32, index: u32) -> [u32; 4] {
        find(t.as_slice(), function, index).map_or([0; 4], |e| [e.eax, e.ebx, e.ecx, e.edx])
    }

    fn count_order(n: u32) -> u32 {
        Topology::bits(n.max(1))
    }

    /// What Linux 6.1 derives for one CPU (struct cpuinfo_x86 and smp_num_siblings).
    #[derive(Debug, Clone, Copy, Default)]
    struct LinuxCpu {
        apicid: u32,
        pkg: u32,
        die: u32,
        core: u32,
        llc: u32,
        smp_num_siblings: u32,
        max_cores: u32,
        topoext: bool,
    }

    struct ExtTopology {
        apicid: u32,
        pkg: u32,
        core: u32,
        smt: u32,
        max_cores: u32,
    }

    /// topology.c detect_extended_topology(): leaf 0x1f, else 0xb, if its SMT level is valid.
    fn detect_extended_topology(t: &CpuId) -> Option<ExtTopology> {
        let level = cpuid(t, 0, 0)[0];
        let valid = |leaf: u32| {
            let r = cpuid(t, leaf, 0);
            level >= leaf && r[1] & 0xffff != 0 && (r[2] >> 8) & 0xff == 1
        };
        let leaf = [0x1f, 0xb].into_iter().find(|&l| valid(l))?;
        let r = cpuid(t, leaf, 0);
        let apicid = r[3];
        let smt = r[1] & 0xffff;
        let ht_width = r[0] & 0x1f;
        let mut pkg_width = ht_width;
        let mut core_siblings = smt;
        for sub in 1..8 {
            let r = cpuid(t, leaf, sub);
            let kind = (r[2] >> 8) & 0xff;
            if kind == 2 {
                core_siblings = r[1] & 0xffff;
            }
            if kind == 0 {
                break;
            }
            pkg_width = r[0] & 0x1f;
        }
        let core_select = !u32::MAX.checked_shl(pkg_width).unwrap_or(0) >> ht_width;
        Some(ExtTopology {
            apicid,
            pkg: apicid.checked_shr(pkg_width).unwrap_or(0),
            core: (apicid >> ht_width) & core_select,
            smt,
            max_cores: core_siblings / smt,
        })
    }

    fn family_model(eax: u32) -> (u32, u32) {
        let base = (eax >> 8) & 0xf;
        let family = if base == 0xf {
            base + ((eax >> 20) & 0xff)
        } else {
            base
        };
        let mut model = (eax >> 4) & 0xf;
        if family >= 6 {
            model |= ((eax >> 16) & 0xf) << 4;
        }
        (family, model)
    }

    /// common.c detect_ht(), run on x86-64 after the vendor's init.
    fn detect_ht(c: &mut LinuxCpu, t: &CpuId, cmp_legacy: bool, xtopology: bool) {
        let l1 = cpuid(t, 1, 0);
        if l1[3] & CPUID_HTT == 0 || cmp_legacy || xtopology {
            return;
        }
        c.smp_num_siblings = (l1[1] >> 16) & 0xff;
        c.pkg = c.apicid >> count_order(c.smp_num_siblings);
        c.smp_num_siblings /= c.max_cores.max(1);
        let core_bits = count_order(c.max_cores);
        c.core = (c.apicid >> count_order(c.smp_num_siblings)) & (pow2(core_bits) - 1);
    }

    /// amd.c: early_init_amd_mc, the TOPOEXT sibling count, amd_detect_cmp, amd_get_topology
    /// with cacheinfo_amd_init_llc_id, then detect_ht.
    fn linux_amd(t: &CpuId) -> LinuxCpu {
        let l1 = cpuid(t, 1, 0);
        let (family, model) = family_model(l1[0]);
        let xlevel = cpuid(t, 0x8000_0000, 0)[0];
        let ext1 = if xlevel >= 0x8000_0001 {
            cpuid(t, 0x8000_0001, 0)[2]
        } else {
            0
        };
        let topoext = ext1 & CPUID_TOPOEXT != 0;
        let cmp_legacy = ext1 & CPUID_CMP_LEGACY != 0;
        let mut c = LinuxCpu {
            apicid: l1[1] >> 24,
            smp_num_siblings: 1,
            max_cores: 1,
            topoext,
            ..Default::default()
        };
        let mut coreid_bits = 0;
        if xlevel >= 0x8000_0008 {
            let ecx = cpuid(t, 0x8000_0008, 0)[2];
            c.max_cores = (ecx & 0xff) + 1;
            coreid_bits = (ecx >> 12) & 0xf;
            if coreid_bits == 0 {
                while pow2(coreid_bits) < c.max_cores {
                    coreid_bits += 1;
                }
            }
        }
        if topoext {
            c.smp_num_siblings = ((cpuid(t, 0x8000_001e, 0)[1] >> 8) & 0xff) + 1;
        }
        c.core = c.apicid & (pow2(coreid_bits) - 1);
        c.pkg = c.apicid >> coreid_bits;
        c.die = c.pkg;
        c.llc = c.pkg;
        if topoext {
            let r = cpuid(t, 0x8000_001e, 0);
            c.die = r[2] & 0xff;
            if family >= 0x17 {
                c.core = r[1] & 0xff;
                if c.smp_num_siblings > 1 {
                    c.max_cores /= c.smp_num_siblings;
                }
            }
            if let Some(x) = detect_extended_topology(t) {
                c.apicid = x.apicid;
                c.pkg = x.pkg;
                c.core = x.core;
                c.smp_num_siblings = x.smt;
                c.max_cores = x.max_cores;
            }
            if cpuid(t, 0x8000_0006, 0)[3] != 0 {
                if family < 0x17 {
                    c.llc = c.die;
                } else if family == 0x17 && model <= 0x1f {
                    c.llc = c.apicid >> 3;
                } else {
                    let leaves = (0..16)
                        .find(|&i| cpuid(t, 0x8000_001d, i)[0] & 0x1f == 0)
                        .unwrap_or(16);
                    let eax = cpuid(t, 0x8000_001d, leaves.wrapping_sub(1))[0];
                    if eax != 0 {
                        c.llc = c.apicid >> count_order(((eax >> 14) & 0xfff) + 1);
                    }
                }
            }
        }
        detect_ht(&mut c, t, cmp_legacy, false);
        c
    }

    /// intel.c: detect_extended_topology_early/detect_extended_topology, else
    /// detect_num_cpu_cores (leaf 4), then detect_ht.
    fn linux_intel(t: &CpuId) -> LinuxCpu {
        let l1 = cpuid(t, 1, 0);
        let mut c = LinuxCpu {
            apicid: l1[1] >> 24,
            pkg: l1[1] >> 24,
            smp_num_siblings: 1,
            max_cores: 1,
            ..Default::default()
        };
        let ext = detect_extended_topology(t);
        let xtopology = ext.is_some();
        match ext {
            Some(x) => {
                c.apicid = x.apicid;
                c.pkg = x.pkg;
                c.core = x.core;
                c.smp_num_siblings = x.smt;
                c.max_cores = x.max_cores;
            }
            None => {
                let eax = cpuid(t, 4, 0)[0];
                if eax & 0x1f != 0 {
                    c.max_cores = (eax >> 26) + 1;
                }
            }
        }
        detect_ht(&mut c, t, false, xtopology);
        // cacheinfo.c init_intel_cacheinfo(): the LLC ID drops the APIC ID bits of the threads
        // sharing the last cache leaf 4 lists.
        let last = (0..16)
            .take_while(|&i| cpuid(t, 4, i)[0] & 0x1f != 0)
            .last();
        c.llc = match last {
            Some(i) => c.apicid >> count_order(((cpuid(t, 4, i)[0] >> 14) & 0xfff) + 1),
            None => c.pkg,
        };
        c
    }

    /// /proc/cpuinfo's view of one CPU, after smpboot.c set_cpu_sibling_map().
    #[derive(Debug, PartialEq, Eq)]
    struct Seen {
        physical_id: u32,
        core_id: u32,
        /// "siblings": CPUs in the package.
        siblings: usize,
        /// "cpu cores": cores in the package.
        cpu_cores: usize,
        threads_per_core: usize,
        /// CPUs sharing this one's last-level cache (cpu_llc_shared_mask).
        llc_shared: usize,
    }

    fn linux_sees(tables: &[CpuId]) -> Vec<Seen> {
        let cpus: Vec<LinuxCpu> = tables
            .iter()
            .map(|t| match Vendor::of(t) {
                Vendor::Amd => linux_amd(t),
                _ => linux_intel(t),
            })
            .collect();
        let boot = cpus[0];
        let has_smt = boot.smp_num_siblings > 1;
        let has_mp = has_smt || boot.max_cores > 1;
        let smt = |a: usize, b: usize| {
            let (c, o) = (&cpus[a], &cpus[b]);
            a == b
                || has_smt
                    && c.pkg == o.pkg
                    && c.die == o.die
                    && (!boot.topoext || c.llc == o.llc)
                    && c.core == o.core
        };
        let pkg = |a: usize, b: usize| a == b || has_mp && cpus[a].pkg == cpus[b].pkg;
        let llc = |a: usize, b: usize| a == b || has_mp && cpus[a].llc == cpus[b].llc;
        let n = cpus.len();
        (0..n)
            .map(|i| Seen {
                physical_id: cpus[i].pkg,
                core_id: cpus[i].core,
                siblings: (0..n).filter(|&j| pkg(i, j)).count(),
                cpu_cores: (0..n)
                    .filter(|&j| pkg(i, j) && (0..j).all(|k| !smt(j, k)))
                    .count(),
                threads_per_core: (0..n).filter(|&j| smt(i, j)).count(),
                llc_shared: (0..n).filter(|&j| llc(i, j)).count(),
            })
            .collect()
    }

    const TOPOLOGIES: [(u32, u32, u32); 6] = [
        (1, 4, 1),
        (2, 2, 1),
        (2, 2, 2),
        (4, 1, 1),
        (1, 3, 2),
        (2, 3, 1),
    ];

    fn assert_linux_sees_the_request(host: &CpuId, name: &str) {
        for (sockets, cores, threads) in TOPOLOGIES {
            let topo = Topology {
                sockets,
                cores,
                threads,
            };
            let n = sockets * cores * threads;
            let tables: Vec<CpuId> = (0..n).map(|id| for_vcpu(host, id, &topo, false)).collect();
            for (id, seen) in (0..n).zip(linux_sees(&tables)) {
                let (socket, core, _) = topo.position(id);
                let want = Seen {
                    physical_id: socket,
                    core_id: core,
                    siblings: (cores * threads) as usize,
                    cpu_cores: cores as usize,
                    threads_per_core: threads as usize,
                    // The L3 is the socket's.
                    llc_shared: (cores * threads) as usize,
                };
                assert_eq!(seen, want, "{name} host, {topo:?}, vcpu {id}");
            }
        }
    }

    #[test]
    fn linux_sees_the_requested_topology_on_intel() {
        assert_linux_sees_the_request(&intel_host(), "Intel");
    }

    #[test]
    fn linux_sees_the_requested_topology_on_amd_without_topoext() {
        assert_linux_sees_the_request(&amd_qemu64_host(), "AMD qemu64");
    }

    #[test]
    fn linux_sees_the_requested_topology_on_amd_with_topoext() {
        assert_linux_sees_the_request(&amd_zen_host(), "AMD Zen");
    }

    #[test]
    fn amd_topology_leaves_follow_the_apic_ids() {
        let topo = Topology {
            sockets: 2,
            cores: 2,
            threads: 1,
        };
        // vCPU 3: socket 1, core 1, APIC ID 3.
        let t = for_vcpu(&amd_qemu64_host(), 3, &topo, false);
        let ecx8 = cpuid(&t, 0x8000_0008, 0)[2];
        assert_eq!((ecx8 & 0xff, (ecx8 >> 12) & 0xf), (1, 1));
        let ext1 = cpuid(&t, 0x8000_0001, 0)[2];
        assert_ne!(ext1 & CPUID_CMP_LEGACY, 0);
        // One thread per core: no reason to invent TOPOEXT on a host without it.
        assert_eq!(ext1 & CPUID_TOPOEXT, 0);
        let l1 = cpuid(&t, 1, 0);
        assert_eq!((l1[1] >> 24, (l1[1] >> 16) & 0xff), (3, 2));
        assert_ne!(l1[3] & CPUID_HTT, 0);

        // Flat (bhyve's default): one thread per socket, nothing multi-core left set.
        let t = for_vcpu(&amd_qemu64_host(), 1, &Topology::flat(2), false);
        assert_eq!(cpuid(&t, 0x8000_0008, 0)[2] & 0xf0ff, 0);
        assert_eq!(cpuid(&t, 0x8000_0001, 0)[2] & CPUID_CMP_LEGACY, 0);
        assert_eq!(cpuid(&t, 1, 0)[3] & CPUID_HTT, 0);

        // Zen host, 2x2x2, vCPU 6: socket 1, core 1, thread 0, APIC ID 6.
        let topo = Topology {
            sockets: 2,
            cores: 2,
            threads: 2,
        };
        let t = for_vcpu(&amd_zen_host(), 6, &topo, false);
        assert_eq!(cpuid(&t, 0x8000_001e, 0), [6, 0x101, 1, 0]);
        // L1d shared by the core's 2 threads, L3 by the socket's 4.
        assert_eq!((cpuid(&t, 0x8000_001d, 0)[0] >> 14) & 0xfff, 1);
        assert_eq!((cpuid(&t, 0x8000_001d, 3)[0] >> 14) & 0xfff, 3);
        assert_eq!(
            cpuid(&t, 0x8000_001d, 3)[1],
            0x03c0_003f,
            "host geometry kept"
        );
    }

    #[test]
    fn smt_on_an_amd_host_without_topoext_gets_synthesized_cache_leaves() {
        let topo = Topology {
            sockets: 1,
            cores: 2,
            threads: 2,
        };
        let t = for_vcpu(&amd_qemu64_host(), 1, &topo, false);
        assert_ne!(cpuid(&t, 0x8000_0001, 0)[2] & CPUID_TOPOEXT, 0);
        assert!(cpuid(&t, 0x8000_0000, 0)[0] >= 0x8000_001e);
        assert_eq!(cpuid(&t, 0x8000_001e, 0), [1, 0x100, 0, 0]);
        // (type, level, sharing - 1, size in bytes) per 0x8000001D index, as Linux reads it.
        let caches: Vec<(u32, u32, u32, u32)> = (0..5)
            .map(|i| cpuid(&t, 0x8000_001d, i))
            .take_while(|r| r[0] & 0x1f != 0)
            .map(|[a, b, c, _]| {
                let size =
                    ((b & 0xfff) + 1) * (((b >> 12) & 0x3ff) + 1) * ((b >> 22) + 1) * (c + 1);
                (a & 0x1f, (a >> 5) & 7, (a >> 14) & 0xfff, size)
            })
            .collect();
        assert_eq!(
            caches,
            [
                (1, 1, 1, 64 << 10),
                (2, 1, 1, 64 << 10),
                (3, 2, 1, 512 << 10),
                (3, 3, 3, 16 << 20),
            ]
        );
    }

    #[test]
    fn kvm_leaves_are_kept_and_announced() {
        for host in [intel_host(), amd_qemu64_host(), amd_zen_host()] {
            let t = for_vcpu(&host, 0, &Topology::flat(1), false);
            let s = cpuid(&t, KVM_CPUID_SIGNATURE, 0);
            let mut signature = Vec::new();
            for r in &s[1..] {
                signature.extend_from_slice(&r.to_le_bytes());
            }
            assert_eq!(signature, b"KVMKVMKVM\0\0\0");
            assert_eq!(s[0], KVM_CPUID_FEATURES, "highest hypervisor leaf");
            assert_eq!(cpuid(&t, KVM_CPUID_FEATURES, 0)[0], KVM_FEATURES);
            assert_ne!(cpuid(&t, 1, 0)[2] & CPUID_HYPERVISOR, 0, "hypervisor bit");
        }
    }

    #[test]
    fn pvm_keeps_its_cpuid_but_loses_cx16() {
        let host = intel_host();
        let t = for_vcpu(&host, 0, &Topology::flat(1), true);
        assert_eq!(cpuid(&t, 1, 0)[2] & CPUID_HYPERVISOR, 0);
        assert_eq!(cpuid(&t, 1, 0)[2] & CPUID_CX16, 0);
        assert_eq!(
            cpuid(&t, KVM_CPUID_FEATURES, 0),
            cpuid(&host, KVM_CPUID_FEATURES, 0)
        );
    }

    #[test]
    fn vendor_comes_from_leaf_0() {
        assert_eq!(Vendor::of(&intel_host()), Vendor::Intel);
        assert_eq!(Vendor::of(&amd_zen_host()), Vendor::Amd);
        let hygon =
            CpuId::from_entries(&[ent(0, 0, [0xd, sig(b"Hygo"), sig(b"uine"), sig(b"nGen")])])
                .unwrap();
        assert_eq!(Vendor::of(&hygon), Vendor::Amd);
        assert_eq!(Vendor::of(&CpuId::new(0).unwrap()), Vendor::Other);
    }

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
        let how = Patch {
            vendor: Vendor::Intel,
            hypervisor: true,
            topoext: false,
        };
        let place = t.place(3);
        patch_entry(&mut e1, &place, &how);
        assert_eq!(e1.ebx >> 24, 3);
        assert_eq!((e1.ebx >> 16) & 0xff, 4);
        assert_ne!(e1.edx & CPUID_HTT, 0);
        let mut eb = kvm_cpuid_entry2 {
            function: 0xb,
            index: 1,
            ..Default::default()
        };
        patch_entry(&mut eb, &place, &how);
        assert_eq!((eb.eax, eb.ebx, eb.ecx, eb.edx), (2, 4, 0x201, 3));
    }
}
