//! Guest physical memory by the bhyve amd64 map (README.md, ARCHITECTURE.md), and the KVM memory slots for it.
//!
//! RAM is anonymous `MAP_NORESERVE` memory (vm-memory), so a large `-m` costs nothing until the
//! guest touches it. The boot ROM is a private copy mapped read-only; its variable store is the
//! user's file mapped shared, so the guest's writes to it persist.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use crate::flash::Flash;
use crate::shadow::{self, Shadow};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Guest RAM as every device sees it. Each region carries a dirty bitmap (one bit per 4 KiB
/// page) that every write through vm-memory sets, so what devices write into guest memory
/// (virtio rings and buffers, disk reads, the boot loader) can be found again without a pass
/// through every device; KVM's own dirty log covers what the vCPUs write.
pub type GuestMem = GuestMemoryMmap<AtomicBitmap>;

/// RAM below 4 GiB ends at the latest here; the 32-bit PCI hole follows.
pub const LOWMEM_LIMIT: u64 = 0xc000_0000;
/// 32-bit PCI BAR window.
pub const PCI_MEM32_BASE: u64 = 0xc000_0000;
pub const PCI_MEM32_END: u64 = 0xe000_0000;
/// PCI ECAM (256 MiB: buses 0-255).
pub const ECAM_BASE: u64 = 0xe000_0000;
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// RAM above the PCI hole starts here.
pub const HIGHMEM_BASE: u64 = 1 << 32;
/// The boot ROM (and its variable store) may occupy at most this much below 4 GiB.
pub const BOOTROM_MAX: u64 = 16 << 20;
pub const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memory size {0:#x} is not a multiple of 4 KiB")]
    Unaligned(u64),
    #[error("memory size must be at least 1 MiB")]
    TooSmall,
    #[error("cannot allocate {size} bytes of guest memory: {err}")]
    Alloc { size: u64, err: String },
    #[error("cannot map guest memory at {gpa:#x} into KVM: {err}")]
    Slot { gpa: u64, err: kvm_ioctls::Error },
    #[error("boot ROM {path}: {msg}")]
    Rom { path: String, msg: String },
    #[error("-S: cannot wire {size} bytes of guest memory: {err} (raise the locked-memory limit, ulimit -l, or run without -S)")]
    Wire { size: u64, err: std::io::Error },
}

/// Where RAM goes for a given `-m` size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryLayout {
    pub lowmem: u64,
    pub highmem: u64,
}

impl MemoryLayout {
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if !size.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::Unaligned(size));
        }
        if size < (1 << 20) {
            return Err(MemoryError::TooSmall);
        }
        let lowmem = size.min(LOWMEM_LIMIT);
        Ok(MemoryLayout {
            lowmem,
            highmem: size - lowmem,
        })
    }

    pub fn ranges(&self) -> Vec<(GuestAddress, usize)> {
        let mut r = vec![(GuestAddress(0), self.lowmem as usize)];
        if self.highmem > 0 {
            r.push((GuestAddress(HIGHMEM_BASE), self.highmem as usize));
        }
        r
    }
}

/// Guest RAM plus the KVM slot counter for further regions (ROM, variable store).
pub struct GuestRam {
    pub mem: GuestMem,
    pub layout: MemoryLayout,
    next_slot: u32,
    /// ROM and variable-store mappings; they must outlive the VM.
    extra: Vec<Arc<MmapRegion>>,
    /// The boot ROM's copy and its size, once mapped.
    rom: Option<(Arc<MmapRegion>, u64)>,
    /// With a PAM-routed BIOS area, low RAM is split around 0xC0000-0xFFFFF: the slot of
    /// its part from 1 MiB up.
    low_split: Option<u32>,
    /// The PAM-routed BIOS area, when the chipset has one.
    shadow: Option<Arc<Shadow>>,
    /// The variable store as a CFI flash, when the firmware wants one.
    flash: Option<Arc<Flash>>,
}

/// Registers `size` bytes at host address `host` as guest-physical `gpa` in slot `slot`.
///
/// # Safety
/// `host..host+size` must stay mapped for as long as the VM can run.
pub(crate) unsafe fn set_slot(
    vm: &VmFd,
    slot: u32,
    gpa: u64,
    host: *mut u8,
    size: u64,
    flags: u32,
) -> Result<(), MemoryError> {
    let region = kvm_userspace_memory_region {
        slot,
        flags,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: host as u64,
    };
    // SAFETY: the caller guarantees the mapping outlives the VM.
    unsafe { vm.set_user_memory_region(region) }.map_err(|err| MemoryError::Slot { gpa, err })
}

impl GuestRam {
    /// Allocates RAM for `layout` and maps it into the VM.
    pub fn new(vm: &VmFd, layout: MemoryLayout) -> Result<Self, MemoryError> {
        let mem = GuestMem::from_ranges(&layout.ranges()).map_err(|e| MemoryError::Alloc {
            size: layout.lowmem + layout.highmem,
            err: e.to_string(),
        })?;
        let ram = GuestRam {
            next_slot: mem.num_regions() as u32,
            mem,
            layout,
            extra: Vec::new(),
            rom: None,
            low_split: None,
            shadow: None,
            flash: None,
        };
        ram.map_ram(vm, 0)?;
        Ok(ram)
    }

    /// Registers every RAM region in its slot (0.. in region order) with `flags`: at start-up,
    /// and again to turn KVM's dirty log on or off.
    fn map_ram(&self, vm: &VmFd, flags: u32) -> Result<(), MemoryError> {
        for (slot, gpa, host, size) in self.ram_slots() {
            // SAFETY: the pieces lie in the regions of `self.mem`, which GuestRam owns for the
            // VM's lifetime; registering a slot again only changes its flags.
            unsafe { set_slot(vm, slot, gpa, host, size, flags)? };
        }
        Ok(())
    }

    /// RAM's KVM slots: (slot, guest-physical base, host address, size). One per region,
    /// except that with a shadow area low RAM is two, below 0xC0000 and from 1 MiB up.
    fn ram_slots(&self) -> Vec<(u32, u64, *mut u8, u64)> {
        let mut v = Vec::new();
        for (slot, region) in (0u32..).zip(self.mem.iter()) {
            let (gpa, host, len) = (region.start_addr().0, region.as_ptr(), region.len());
            match self.low_split {
                Some(upper) if gpa == 0 && len > shadow::BASE => {
                    v.push((slot, 0, host, shadow::BASE));
                    if len > shadow::END {
                        // SAFETY: END < len, so the offset stays inside the region.
                        let above = unsafe { host.add(shadow::END as usize) };
                        v.push((upper, shadow::END, above, len - shadow::END));
                    }
                }
                _ => v.push((slot, gpa, host, len)),
            }
        }
        v
    }

    /// Routes 0xC0000-0xFFFFF through PAM modes (an i440fx host bridge's; `shadow.rs`),
    /// starting with the ROM alias: low RAM's slot is split around the area. Needs the boot
    /// ROM mapped first; call before the vCPUs run.
    pub fn enable_shadow(&mut self, vm: &Arc<VmFd>) -> Result<Arc<Shadow>, MemoryError> {
        let (rom, rom_size) = self.rom.clone().ok_or_else(|| MemoryError::Rom {
            path: "(none)".into(),
            msg: "the PAM shadow area needs a boot ROM (-l bootrom)".into(),
        })?;
        if self.layout.lowmem < shadow::END {
            return Err(MemoryError::TooSmall);
        }
        // Slot 0 changes size: KVM wants it deleted first.
        // SAFETY: size 0 deletes the slot; no memory is referenced.
        unsafe { set_slot(vm, 0, 0, std::ptr::null_mut(), 0, 0)? };
        self.low_split = Some(self.next_slot);
        self.next_slot += 1;
        self.map_ram(vm, 0)?;
        let s = Arc::new(Shadow::new(
            vm.clone(),
            self.mem.clone(),
            rom,
            rom_size,
            self.next_slot,
        )?);
        self.next_slot += Shadow::SLOTS;
        self.shadow = Some(s.clone());
        Ok(s)
    }

    /// Turns KVM's dirty log on or off for every RAM slot: with it on, `take_vcpu_dirty`
    /// finds the pages the vCPUs wrote.
    pub fn log_dirty(&self, vm: &VmFd, on: bool) -> Result<(), MemoryError> {
        self.map_ram(vm, if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 })
    }

    /// The guest-physical addresses of the pages the vCPUs wrote since the last call (or since
    /// `log_dirty(true)`), in order; KVM clears its log as it is read.
    pub fn take_vcpu_dirty(&self, vm: &VmFd) -> Result<Vec<u64>, MemoryError> {
        let mut pages = Vec::new();
        for (slot, base, _, size) in self.ram_slots() {
            let bitmap = vm
                .get_dirty_log(slot, size as usize)
                .map_err(|err| MemoryError::Slot { gpa: base, err })?;
            push_bits(&mut pages, base, &bitmap);
        }
        if let Some(s) = &self.shadow {
            pages.extend(s.ram_pages());
            pages.sort_unstable();
        }
        Ok(pages)
    }

    /// Maps the boot ROM so it ends at 4 GiB, and its variable store just below it
    /// (bhyve `bootrom_loadrom`). Returns the ROM's guest-physical base.
    ///
    /// With `flash` the variable store is a CFI flash (`flash.rs`), as firmware built for QEMU
    /// wants it; otherwise it is writable memory, as bhyve's firmware wants it.
    pub fn map_bootrom(
        &mut self,
        vm: &Arc<VmFd>,
        rom_path: &str,
        vars_path: Option<&str>,
        flash: bool,
    ) -> Result<u64, MemoryError> {
        let rom_err = |path: &str, msg: String| MemoryError::Rom {
            path: path.into(),
            msg,
        };
        let rom = std::fs::read(rom_path).map_err(|e| rom_err(rom_path, e.to_string()))?;
        let rom_size = rom.len() as u64;
        check_rom_size(rom_size).map_err(|m| rom_err(rom_path, m))?;
        let vars = match vars_path {
            Some(p) => {
                let f = File::options()
                    .read(true)
                    .write(true)
                    .open(p)
                    .map_err(|e| rom_err(p, format!("cannot open variable store: {e}")))?;
                let size = f.metadata().map_err(|e| rom_err(p, e.to_string()))?.size();
                if size == 0 || size % PAGE_SIZE != 0 {
                    return Err(rom_err(
                        p,
                        format!("variable store size {size} is not a non-zero multiple of 4096"),
                    ));
                }
                Some((f, size))
            }
            None => None,
        };
        let vars_size = vars.as_ref().map_or(0, |v| v.1);
        if rom_size + vars_size > BOOTROM_MAX {
            return Err(rom_err(
                rom_path,
                format!(
                    "ROM ({rom_size} bytes) and variable store ({vars_size} bytes) exceed the {} MiB boot ROM region",
                    BOOTROM_MAX >> 20
                ),
            ));
        }
        let alloc = |e: vm_memory::mmap::MmapRegionError| MemoryError::Alloc {
            size: rom_size,
            err: e.to_string(),
        };
        let region = MmapRegion::new(rom_size as usize).map_err(alloc)?;
        // SAFETY: the region was just created with exactly rom.len() writable bytes.
        unsafe { std::ptr::copy_nonoverlapping(rom.as_ptr(), region.as_ptr(), rom.len()) };
        let rom_base = HIGHMEM_BASE - rom_size;
        // SAFETY: the region is kept in `self.extra` for the VM's lifetime.
        unsafe {
            set_slot(
                vm,
                self.next_slot,
                rom_base,
                region.as_ptr(),
                rom_size,
                KVM_MEM_READONLY,
            )?
        };
        self.next_slot += 1;
        let region = Arc::new(region);
        self.rom = Some((region.clone(), rom_size));
        self.extra.push(region);
        if let Some((f, size)) = vars {
            let region = Arc::new(
                MmapRegion::from_file(FileOffset::new(f, 0), size as usize).map_err(alloc)?,
            );
            let base = rom_base - size;
            if flash {
                let f = Flash::new(vm.clone(), region.clone(), base, self.next_slot)?;
                self.flash = Some(Arc::new(f));
            } else {
                // SAFETY: the region is kept in `self.extra` for the VM's lifetime.
                unsafe { set_slot(vm, self.next_slot, base, region.as_ptr(), size, 0)? };
            }
            self.next_slot += 1;
            self.extra.push(region);
        }
        Ok(rom_base)
    }

    /// The variable store's flash, when `map_bootrom` made one.
    pub fn flash(&self) -> Option<Arc<Flash>> {
        self.flash.clone()
    }

    /// bhyve `-S` (`memory.wired`): every RAM page is faulted in now and locked, so the guest
    /// never waits for the host to find or swap in one of its pages. Needs a locked-memory
    /// limit (`ulimit -l`) at least the RAM size, or CAP_IPC_LOCK.
    pub fn wire(&self) -> Result<(), MemoryError> {
        for region in self.mem.iter() {
            let size = region.len();
            // SAFETY: mlock only changes the residency of this live mapping, which `mem` owns.
            if unsafe { libc::mlock(region.as_ptr().cast(), size as usize) } != 0 {
                return Err(MemoryError::Wire {
                    size,
                    err: std::io::Error::last_os_error(),
                });
            }
        }
        Ok(())
    }

    /// Leaves guest RAM out of rhyve's core dumps (bhyve does unless `-C`,
    /// `memory.guest_in_core`): a crash then neither writes gigabytes nor leaks the guest's
    /// data into a file. Best effort: a kernel that refuses only makes the dump larger.
    pub fn exclude_from_core(&self) {
        for region in self.mem.iter() {
            // SAFETY: MADV_DONTDUMP only changes what a core dump of this live mapping holds.
            let r = unsafe {
                libc::madvise(
                    region.as_ptr().cast(),
                    region.len() as usize,
                    libc::MADV_DONTDUMP,
                )
            };
            if r != 0 {
                log::debug!(
                    "guest RAM stays in core dumps: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }

    /// Flushes the variable store to its file (called when the VM stops).
    pub fn sync(&self) {
        for r in &self.extra {
            if r.file_offset().is_some() {
                // SAFETY: the region is a live shared file mapping of exactly this length.
                unsafe { libc::msync(r.as_ptr().cast(), r.size(), libc::MS_SYNC) };
            }
        }
    }
}

/// bhyve's rules for a boot ROM: whole pages, and no more than the boot ROM region.
pub fn check_rom_size(size: u64) -> Result<(), String> {
    if size == 0 {
        return Err("the ROM file is empty".into());
    }
    if !size.is_multiple_of(PAGE_SIZE) {
        return Err(format!(
            "ROM size {size} is not a multiple of the page size ({PAGE_SIZE})"
        ));
    }
    if size > BOOTROM_MAX {
        return Err(format!(
            "ROM size {size} is too large (at most {} MiB)",
            BOOTROM_MAX >> 20
        ));
    }
    Ok(())
}

/// The guest-physical addresses of the 4 KiB pages written through vm-memory (by devices,
/// the boot loader, rhyve's tables) since the last call, in order; reading clears the bits.
/// With KVM's dirty log for what the vCPUs write, this is every page that changed: what live
/// migration sends again.
pub fn take_dirty_pages(mem: &GuestMem) -> Vec<u64> {
    let mut pages = Vec::new();
    for region in mem.iter() {
        let base = region.start_addr().0;
        // The mapping's own bitmap (the region trait's `bitmap()` gives a slice view of it).
        let map: &vm_memory::mmap::MmapRegion<AtomicBitmap> = region;
        push_bits(&mut pages, base, &map.bitmap().get_and_reset());
    }
    pages
}

/// Appends the address of each page whose bit is set in `bitmap` (bit i of word w: page
/// 64w+i after `base`).
fn push_bits(pages: &mut Vec<u64>, base: u64, bitmap: &[u64]) {
    for (w, &word) in bitmap.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let b = u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            let page = (w as u64).saturating_mul(64).saturating_add(b);
            pages.push(base.saturating_add(page.saturating_mul(PAGE_SIZE)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn writes_through_vm_memory_mark_their_pages_dirty_until_taken() {
        let l = MemoryLayout::new(LOWMEM_LIMIT + (8 << 20)).unwrap();
        let mem = GuestMem::from_ranges(&l.ranges()).unwrap();
        assert!(take_dirty_pages(&mem).is_empty(), "nothing written yet");
        mem.write_obj(7u32, GuestAddress(0x1ffe)).unwrap();
        mem.write_slice(&[1u8; 5000], GuestAddress(0x10_0000))
            .unwrap();
        mem.write_obj(1u8, GuestAddress(HIGHMEM_BASE + 0x3000))
            .unwrap();
        let mut b = [0u8; 16];
        mem.read_slice(&mut b, GuestAddress(0x5000)).unwrap();
        assert_eq!(
            take_dirty_pages(&mem),
            vec![0x1000, 0x2000, 0x10_0000, 0x10_1000, HIGHMEM_BASE + 0x3000],
            "a write straddling a page boundary dirties both; a read dirties nothing"
        );
        assert!(take_dirty_pages(&mem).is_empty(), "taking clears");
    }

    #[test]
    fn layout_splits_at_the_pci_hole() {
        let l = MemoryLayout::new(256 << 20).unwrap();
        assert_eq!((l.lowmem, l.highmem), (256 << 20, 0));
        assert_eq!(l.ranges().len(), 1);
        let l = MemoryLayout::new(16 << 30).unwrap();
        assert_eq!(l.lowmem, LOWMEM_LIMIT);
        assert_eq!(l.highmem, (16 << 30) - LOWMEM_LIMIT);
        assert_eq!(l.ranges()[1].0, GuestAddress(HIGHMEM_BASE));
        assert!(MemoryLayout::new(1000).is_err());
        assert!(MemoryLayout::new(4096).is_err());
    }

    #[test]
    fn rom_sizes() {
        assert!(check_rom_size(64 << 10).is_ok());
        assert!(check_rom_size(16 << 20).is_ok());
        assert!(check_rom_size(0).unwrap_err().contains("empty"));
        assert!(check_rom_size(1000).unwrap_err().contains("multiple"));
        assert!(check_rom_size(32 << 20).unwrap_err().contains("too large"));
    }
}
