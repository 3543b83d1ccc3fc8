//! Snapshots of a paused VM in a directory, and restoring one into a new VM (bhyve `-r`,
//! cloud-hypervisor's `vm.snapshot`). The format (docs/snapshot.md):
//!
//! - `manifest.json`: the format number, the rhyve version that wrote it, the config tree
//!   that built the VM, the guest RAM regions (guest address, size, offset in `memory`), the
//!   vCPU count;
//! - `memory`: guest RAM, region after region, sparse (pages of zeros are holes: untouched
//!   memory costs nothing on disk), written in runs of non-zero pages;
//! - `vcpus.json`: every vCPU's state (registers, special registers, XSAVE, XCRs, debug
//!   registers, LAPIC, MP state, events, the MSRs KVM can save, the TSC among them);
//! - `platform.json`: the in-kernel PICs and I/O APIC, the PIT, the KVM clock;
//! - `devices.json`: every device's versioned state from the lifecycle trait (virtio queues
//!   with their in-flight requests completed by the pause).
//!
//! A snapshot from another format or rhyve version is refused with one line, as are a
//! memory file of the wrong size and a VM whose memory differs from the snapshot's.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use rhyve_base::lifecycle::DeviceState;
use rhyve_config::Config;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::vcpu::VcpuState;
use super::Vm;

/// The snapshot format this rhyve writes and reads.
pub const FORMAT: u32 = 1;
const PAGE: usize = 4096;
/// Guest RAM moves between memory and the file in pieces this large.
const CHUNK: usize = 1 << 20;

#[derive(Debug, Serialize, Deserialize)]
pub struct Region {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub rhyve_version: String,
    /// The config tree's pairs, as `rhyve -o config.dump=true` prints them.
    pub config: Vec<(String, String)>,
    pub memory: Vec<Region>,
    pub vcpus: usize,
    /// Each disk's size and modification time when the snapshot was taken.
    pub disks: Vec<DiskStamp>,
}

/// A disk as the snapshot found it: its config key (`pci.B.S.F.path`), path, size and
/// modification time (nanoseconds since the epoch).
#[derive(Debug, Serialize, Deserialize)]
pub struct DiskStamp {
    pub key: String,
    pub path: String,
    pub size: u64,
    pub mtime_ns: i128,
}

fn stamp(path: &str) -> Result<(u64, i128), String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(io(path))?;
    Ok((
        m.len(),
        i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    ))
}

/// The disks of `cfg` (every `pci.*.path` of a virtio-blk function), stamped now.
fn disk_stamps(cfg: &Config) -> Result<Vec<DiskStamp>, String> {
    let mut out = Vec::new();
    for (key, path) in cfg.pairs() {
        let Some(prefix) = key.strip_suffix(".path").filter(|k| k.starts_with("pci.")) else {
            continue;
        };
        if cfg.get_raw(&format!("{prefix}.device")) != Some("virtio-blk") {
            continue;
        }
        let (size, mtime_ns) = stamp(&path)?;
        out.push(DiskStamp {
            key,
            path,
            size,
            mtime_ns,
        });
    }
    Ok(out)
}

/// Refuses to restore onto disks that are not what the snapshot's guest had: the same file
/// changed since (size or modification time), or another file of another size.
pub fn check_disks(m: &Manifest, cfg: &Config) -> Result<(), String> {
    for d in &m.disks {
        let path = cfg.get_raw(&d.key).unwrap_or(&d.path);
        let (size, mtime_ns) = stamp(path)?;
        if path == d.path && (size, mtime_ns) != (d.size, d.mtime_ns) {
            return Err(format!(
                "disk {path} changed since the snapshot was taken (its guest would see other data than it wrote): restore the disk too, or snapshot again"
            ));
        }
        if size != d.size {
            return Err(format!(
                "disk {path} is {size} bytes, the snapshot's disk {} was {}: give a copy of that disk",
                d.path, d.size
            ));
        }
    }
    Ok(())
}

#[derive(Serialize, Deserialize)]
pub struct Platform {
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
}

/// What a snapshot wrote.
#[derive(Debug)]
pub struct Saved {
    /// Bytes of guest RAM written (the rest are holes).
    pub memory_bytes: u64,
    pub memory_size: u64,
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> String {
    move |e| format!("{what}: {e}")
}

fn write_json(dir: &Path, name: &str, v: &impl Serialize) -> Result<(), String> {
    let path = dir.join(name);
    let data = serde_json::to_vec(v).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut f = File::create(&path).map_err(io(path.display()))?;
    f.write_all(&data).map_err(io(path.display()))?;
    f.sync_all().map_err(io(path.display()))
}

fn read_json<T: for<'de> Deserialize<'de>>(dir: &Path, name: &str) -> Result<T, String> {
    let path = dir.join(name);
    let data = std::fs::read(&path).map_err(io(path.display()))?;
    serde_json::from_slice(&data)
        .map_err(|e| format!("{}: not a rhyve snapshot file: {e}", path.display()))
}

fn irqchip(vm: &Vm, chip: u32) -> Result<kvm_irqchip, String> {
    let mut c = kvm_irqchip {
        chip_id: chip,
        ..Default::default()
    };
    vm.vm_fd
        .get_irqchip(&mut c)
        .map_err(|e| format!("KVM_GET_IRQCHIP {chip}: {e}"))?;
    Ok(c)
}

/// The guest RAM regions as a snapshot's `memory` file lays them out: one after another.
pub fn regions_of(vm: &Vm) -> Vec<Region> {
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for r in vm.guest_memory().iter() {
        regions.push(Region {
            guest_addr: r.start_addr().0,
            size: r.len(),
            file_offset: offset,
        });
        offset = offset.saturating_add(r.len());
    }
    regions
}

/// Calls `each(guest_addr, bytes)` for every run of non-zero pages of guest RAM (at most
/// [`CHUNK`] bytes each), in address order; returns how many bytes they held. Pages the guest
/// never touched are not resident and read as zeros: a chunk without a resident page is not
/// even read.
pub fn nonzero_runs(
    vm: &Vm,
    mut each: impl FnMut(u64, &[u8]) -> Result<(), String>,
) -> Result<u64, String> {
    let mem = vm.guest_memory();
    let mut written = 0u64;
    let mut buf = vec![0u8; CHUNK];
    let mut resident = vec![0u8; CHUNK / PAGE];
    for host in mem.iter() {
        let (base, size) = (host.start_addr().0, host.len());
        let mut at = 0u64;
        while at < size {
            let n = usize::try_from((size - at).min(CHUNK as u64)).unwrap_or(CHUNK);
            // SAFETY: the range lies inside this live guest RAM mapping (at + n <= its size,
            // both multiples of the page size); mincore only reports residency into
            // `resident`, which has a byte for each of its pages.
            let untouched = unsafe {
                let ptr = host.as_ptr().add(at as usize);
                libc::mincore(ptr.cast(), n, resident.as_mut_ptr()) == 0
                    && resident[..n.div_ceil(PAGE)].iter().all(|b| b & 1 == 0)
            };
            if untouched {
                at += n as u64;
                continue;
            }
            let chunk = &mut buf[..n];
            mem.read_slice(chunk, GuestAddress(base + at))
                .map_err(|e| format!("reading guest RAM at {:#x}: {e}", base + at))?;
            let mut page = 0;
            while page < n {
                let nonzero = |p: usize| chunk[p..(p + PAGE).min(n)].iter().any(|&b| b != 0);
                if !nonzero(page) {
                    page += PAGE;
                    continue;
                }
                let start = page;
                while page < n && nonzero(page) {
                    page += PAGE;
                }
                let end = page.min(n);
                each(base + at + start as u64, &chunk[start..end])?;
                written += (end - start) as u64;
            }
            at += n as u64;
        }
    }
    Ok(written)
}

/// Writes guest RAM to `path`: the regions at their `file_offset`s, only the runs of
/// non-zero pages, each one write (the file is sized first, so the rest stay holes).
fn save_memory(vm: &Vm, path: &Path) -> Result<(Vec<Region>, u64), String> {
    let f = File::create(path).map_err(io(path.display()))?;
    let regions = regions_of(vm);
    let total = regions.iter().map(|r| r.size).sum();
    f.set_len(total).map_err(io(path.display()))?;
    let written = nonzero_runs(vm, |gpa, data| {
        let r = regions
            .iter()
            .find(|r| (r.guest_addr..r.guest_addr.saturating_add(r.size)).contains(&gpa))
            .ok_or_else(|| format!("{gpa:#x} outside guest RAM"))?;
        f.write_all_at(data, r.file_offset + (gpa - r.guest_addr))
            .map_err(io(path.display()))
    })?;
    f.sync_all().map_err(io(path.display()))?;
    Ok((regions, written))
}

/// Everything of a paused VM but its RAM: the vCPUs, the devices, the in-kernel irqchip, PIT
/// and clock (a snapshot's `vcpus.json`, `devices.json` and `platform.json`; what live
/// migration sends once the VM is paused).
#[derive(Serialize, Deserialize)]
pub struct MachineState {
    pub vcpus: Vec<VcpuState>,
    pub devices: Vec<(String, DeviceState)>,
    pub platform: Platform,
}

/// The state of the paused VM `vm`.
pub fn capture(vm: &Vm) -> Result<MachineState, String> {
    Ok(MachineState {
        vcpus: vm.save_vcpus()?,
        devices: vm.save_devices().map_err(|e| e.to_string())?,
        platform: Platform {
            pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm
                .vm_fd
                .get_pit2()
                .map_err(|e| format!("KVM_GET_PIT2: {e}"))?,
            clock: vm
                .vm_fd
                .get_clock()
                .map_err(|e| format!("KVM_GET_CLOCK: {e}"))?,
        },
    })
}

/// The manifest of `vm`, built from `cfg`, as a snapshot of it now would have it.
pub fn manifest_of(vm: &Vm, cfg: &Config, vcpus: usize) -> Result<Manifest, String> {
    Ok(Manifest {
        format: FORMAT,
        rhyve_version: env!("CARGO_PKG_VERSION").into(),
        config: cfg
            .pairs()
            .into_iter()
            .filter(|(k, _)| k != "restore.file" && k != "api.socket")
            .collect(),
        memory: regions_of(vm),
        vcpus,
        disks: disk_stamps(cfg)?,
    })
}

/// Snapshots the paused VM `vm`, built from `cfg`, into `dir` (created if missing; an
/// existing snapshot there is replaced).
pub fn save(vm: &Vm, cfg: &Config, dir: &Path) -> Result<Saved, String> {
    if !vm.control().is_paused() {
        return Err("the VM must be paused for a snapshot (vm.pause first)".into());
    }
    std::fs::create_dir_all(dir).map_err(io(dir.display()))?;
    let state = capture(vm)?;
    let (memory, memory_bytes) = save_memory(vm, &dir.join("memory"))?;
    let memory_size = memory.iter().map(|r| r.size).sum();
    write_json(dir, "vcpus.json", &state.vcpus)?;
    write_json(dir, "devices.json", &state.devices)?;
    write_json(dir, "platform.json", &state.platform)?;
    let manifest = manifest_of(vm, cfg, state.vcpus.len())?;
    // The manifest last: a directory without one is not a snapshot.
    write_json(dir, "manifest.json", &manifest)?;
    Ok(Saved {
        memory_bytes,
        memory_size,
    })
}

/// The manifest of the snapshot in `dir`, checked: this format and this rhyve's version.
pub fn read_manifest(dir: &Path) -> Result<Manifest, String> {
    let m: Manifest = read_json(dir, "manifest.json")?;
    check_manifest(&m).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(m)
}

/// A manifest this rhyve can take: its format and its version.
pub fn check_manifest(m: &Manifest) -> Result<(), String> {
    if m.format != FORMAT {
        return Err(format!(
            "snapshot format {} is not this rhyve's ({FORMAT}); use rhyve {}",
            m.format, m.rhyve_version
        ));
    }
    if m.rhyve_version != env!("CARGO_PKG_VERSION") {
        return Err(format!(
            "from rhyve {}, this is rhyve {}: use the same rhyve on both ends",
            m.rhyve_version,
            env!("CARGO_PKG_VERSION")
        ));
    }
    Ok(())
}

/// Refuses a VM whose guest RAM regions differ from the manifest's.
pub fn check_layout(vm: &Vm, m: &Manifest) -> Result<(), String> {
    let mine: Vec<(u64, u64)> = vm
        .guest_memory()
        .iter()
        .map(|r| (r.start_addr().0, r.len()))
        .collect();
    let theirs: Vec<(u64, u64)> = m.memory.iter().map(|r| (r.guest_addr, r.size)).collect();
    if mine != theirs {
        return Err(format!(
            "the snapshot's guest memory {theirs:x?} differs from this VM's {mine:x?} (same -m as when it was taken)"
        ));
    }
    Ok(())
}

/// The config tree a manifest carries.
pub fn config_of(m: &Manifest) -> Result<Config, String> {
    let mut cfg = Config::new();
    for (k, v) in &m.config {
        cfg.set(k, v).map_err(|e| format!("snapshot config: {e}"))?;
    }
    Ok(cfg)
}

/// Loads guest RAM from `path` (checked against the regions of `m` and of `vm`).
fn load_memory(vm: &Vm, m: &Manifest, path: &Path) -> Result<(), String> {
    let mem = vm.guest_memory();
    check_layout(vm, m)?;
    // The regions lie one after another in the file, as `save_memory` wrote them.
    let mut next = 0u64;
    for r in &m.memory {
        if r.file_offset != next {
            return Err(format!(
                "{}: damaged manifest: memory regions out of place",
                path.display()
            ));
        }
        next = next.saturating_add(r.size);
    }
    let f = File::open(path).map_err(io(path.display()))?;
    let want: u64 = next;
    let have = f.metadata().map_err(io(path.display()))?.len();
    if have != want {
        return Err(format!(
            "{}: {have} bytes, the snapshot's guest memory is {want}: the file is damaged or truncated",
            path.display()
        ));
    }
    // Zero all of RAM at once (MADV_DONTNEED: private anonymous pages read back as zeros and
    // cost nothing until touched), then copy in only the file's data extents: untouched
    // guest memory stays untouched.
    let zeroed = discard_ram(vm);
    let extents = if zeroed {
        data_extents(&f, want)
    } else {
        vec![(0, want)]
    };
    let mut buf = vec![0u8; CHUNK];
    for (start, end) in extents {
        let mut off = start;
        while off < end {
            // The region holding file offset `off`, and how much of it is left.
            let Some(r) = m
                .memory
                .iter()
                .find(|r| (r.file_offset..r.file_offset.saturating_add(r.size)).contains(&off))
            else {
                break;
            };
            let n =
                (end.min(r.file_offset.saturating_add(r.size)) - off).min(CHUNK as u64) as usize;
            let chunk = &mut buf[..n];
            f.read_exact_at(chunk, off).map_err(io(path.display()))?;
            let addr = GuestAddress(r.guest_addr + (off - r.file_offset));
            // A chunk of zeros needs writing only where RAM was not zeroed above.
            if !zeroed || chunk.iter().any(|&b| b != 0) {
                mem.write_slice(chunk, addr)
                    .map_err(|e| format!("guest RAM at {:#x}: {e}", addr.0))?;
            }
            off += n as u64;
        }
    }
    Ok(())
}

/// Makes all of guest RAM read as zeros without touching it (MADV_DONTNEED on its private
/// anonymous mappings); false where the kernel refused (wired memory, `-S`), RAM then as it
/// was. No vCPU may run.
fn discard_ram(vm: &Vm) -> bool {
    vm.guest_memory().iter().all(|r| {
        // SAFETY: the range is exactly this live guest RAM mapping; no vCPU runs yet, and
        // DONTNEED on a private anonymous mapping only makes its pages read as zeros.
        unsafe { libc::madvise(r.as_ptr().cast(), r.len() as usize, libc::MADV_DONTNEED) == 0 }
    })
}

/// Zeroes all of guest RAM of a VM that has not started (what building it wrote there, the
/// kernel, the boot tables): cheaply where `discard_ram` can, else by writing zeros.
pub fn zero_ram(vm: &Vm) -> Result<(), String> {
    if discard_ram(vm) {
        return Ok(());
    }
    let zeros = vec![0u8; CHUNK];
    for r in vm.guest_memory().iter() {
        let mut at = 0u64;
        while at < r.len() {
            let n = (r.len() - at).min(CHUNK as u64) as usize;
            let addr = GuestAddress(r.start_addr().0 + at);
            vm.guest_memory()
                .write_slice(&zeros[..n], addr)
                .map_err(|e| format!("zeroing guest RAM at {:#x}: {e}", addr.0))?;
            at += n as u64;
        }
    }
    Ok(())
}

/// The data extents of `f` (SEEK_DATA/SEEK_HOLE) within `len` bytes; all of it where the
/// file system cannot say.
fn data_extents(f: &File, len: u64) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0i64;
    let len = i64::try_from(len).unwrap_or(i64::MAX);
    while pos < len {
        // SAFETY: lseek on a file descriptor this function borrows; it moves only the offset.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data after pos. Anything else: the file system cannot say.
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO) {
                return vec![(0, len as u64)];
            }
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let hole = if hole < 0 { len } else { hole.min(len) };
        out.push((data as u64, hole as u64));
        pos = hole;
    }
    out
}

/// Restores the snapshot in `dir` (its manifest `m`) into `vm`, built from the snapshot's
/// config and not started: loads guest RAM, starts the vCPUs parked, sets the in-kernel
/// irqchip, PIT and clock, every device's state and every vCPU's. The VM is left paused; the
/// caller resumes it.
pub fn restore(vm: &mut Vm, dir: &Path, m: &Manifest) -> Result<(), String> {
    let state = MachineState {
        vcpus: read_json(dir, "vcpus.json")?,
        devices: read_json(dir, "devices.json")?,
        platform: read_json(dir, "platform.json")?,
    };
    if state.vcpus.len() != m.vcpus {
        return Err(format!(
            "{}: {} vCPU states for {} vCPUs",
            dir.display(),
            state.vcpus.len(),
            m.vcpus
        ));
    }
    load_memory(vm, m, &dir.join("memory"))?;
    apply(vm, state)
}

/// Starts the vCPUs of `vm` (built, not started, its RAM in place) parked, and sets the
/// in-kernel irqchip, PIT and clock, every device's state and every vCPU's from `state`. The
/// VM is left paused.
pub fn apply(vm: &mut Vm, state: MachineState) -> Result<(), String> {
    // Paused before it starts: every vCPU parks before its first KVM_RUN.
    vm.pause()?;
    vm.start().map_err(|e| e.to_string())?;
    let ctl = vm.control();
    ctl.pause(Duration::from_secs(10))?;
    let platform = &state.platform;
    for chip in [&platform.pic_master, &platform.pic_slave, &platform.ioapic] {
        vm.vm_fd
            .set_irqchip(chip)
            .map_err(|e| format!("KVM_SET_IRQCHIP {}: {e}", chip.chip_id))?;
    }
    vm.vm_fd
        .set_pit2(&platform.pit)
        .map_err(|e| format!("KVM_SET_PIT2: {e}"))?;
    let clock = kvm_clock_data {
        clock: platform.clock.clock,
        ..Default::default()
    };
    vm.vm_fd
        .set_clock(&clock)
        .map_err(|e| format!("KVM_SET_CLOCK: {e}"))?;
    vm.restore_devices(&state.devices)
        .map_err(|e| e.to_string())?;
    for (id, s) in state.vcpus.into_iter().enumerate() {
        ctl.restore_vcpu(id, s, Duration::from_secs(10))
            .map_err(|e| format!("vCPU {id}: {e}"))?;
    }
    Ok(())
}
