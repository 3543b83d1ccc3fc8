//! Direct Linux boot (`boot.kernel`, `boot.initrd`, `boot.cmdline`) with linux-loader: a bzImage
//! through the 64-bit boot protocol (Documentation/arch/x86/boot.rst: zero page, identity page
//! tables, a flat GDT), or an ELF vmlinux through its PVH entry (xen/pvh.html: hvm_start_info,
//! 32-bit protected mode, paging off) when it has one and the 64-bit entry otherwise. The E820
//! map follows the bhyve memory map: RAM, the legacy BIOS area (MP and ACPI tables) and the
//! ECAM window reserved.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use kvm_bindings::{kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{
    start_info::hvm_memmap_table_entry, start_info::hvm_start_info, Elf, PvhBootCapability,
};
use linux_loader::loader::{load_cmdline, KernelLoader, KernelLoaderResult};
use rhyve_hypervisor::memory::GuestMem;
use vm_memory::{Address, Bytes, GuestAddress};

use rhyve_hypervisor::memory::{MemoryLayout, ECAM_BASE, HIGHMEM_BASE};

/// Guest-physical layout of what the VMM writes for a direct boot (all below 1 MiB).
pub const GDT_ADDR: u64 = 0x500;
pub const PVH_INFO_ADDR: u64 = 0x6000;
pub const PVH_MEMMAP_ADDR: u64 = 0x6040;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const BOOT_STACK: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
/// Four page directories of 2 MiB pages: the first 4 GiB identity-mapped.
pub const PD_ADDR: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x2_0000;
pub const CMDLINE_MAX: usize = 0x1_0000;
/// Where the kernel's protected-mode code goes.
pub const KERNEL_START: u64 = 0x10_0000;
/// Below this is conventional memory; from here to 1 MiB is reserved (EBDA, VGA, BIOS area).
const EBDA_START: u64 = 0x9_fc00;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_BOOT_FLAG: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("boot.kernel {path}: {msg}")]
    Kernel { path: String, msg: String },
    #[error("boot.initrd {path}: {msg}")]
    Initrd { path: String, msg: String },
    #[error("boot.cmdline: {0}")]
    Cmdline(String),
    #[error("direct boot: {0}")]
    Setup(String),
}

/// How the BSP enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// 64-bit boot protocol: long mode, RSI = zero page.
    Linux64 { rip: u64 },
    /// PVH: 32-bit protected mode without paging, EBX = hvm_start_info.
    Pvh { rip: u64 },
}

/// The E820 map for `layout`: (start, length, type).
pub fn e820(layout: &MemoryLayout) -> Vec<(u64, u64, u32)> {
    let mut m = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, KERNEL_START - EBDA_START, E820_RESERVED),
    ];
    if layout.lowmem > KERNEL_START {
        m.push((
            KERNEL_START,
            layout.lowmem.saturating_sub(KERNEL_START),
            E820_RAM,
        ));
    }
    // Linux checks that the MCFG's ECAM window is reserved before using it.
    m.push((ECAM_BASE, rhyve_pci::root::ECAM_SIZE, E820_RESERVED));
    if layout.highmem > 0 {
        m.push((HIGHMEM_BASE, layout.highmem, E820_RAM));
    }
    m
}

fn kernel_err(path: &str) -> impl Fn(String) -> BootError + '_ {
    move |msg| BootError::Kernel {
        path: path.to_string(),
        msg,
    }
}

/// Recognises a kernel image: ELF (vmlinux) or bzImage ("HdrS" at 0x202).
fn kind(file: &mut File) -> std::io::Result<Option<bool>> {
    let mut head = [0u8; 0x210];
    let n = file.read(&mut head)?;
    file.seek(SeekFrom::Start(0))?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(Some(true));
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(Some(false));
    }
    Ok(None)
}

/// Loads the kernel, initrd and command line into guest memory and writes the boot
/// structures. Returns how the BSP must start.
pub fn load(
    mem: &GuestMem,
    layout: &MemoryLayout,
    kernel: &str,
    initrd: Option<&str>,
    cmdline: &str,
    unpack_bzimage: bool,
) -> Result<Entry, BootError> {
    let kerr = kernel_err(kernel);
    let mut file = File::open(kernel).map_err(|e| kerr(e.to_string()))?;
    let mut is_elf = kind(&mut file)
        .map_err(|e| kerr(e.to_string()))?
        .ok_or_else(|| kerr("is neither an ELF vmlinux nor a bzImage".into()))?;
    let unpacked = if !is_elf && unpack_bzimage {
        load_unpacked(mem, kernel, &mut file)?
    } else {
        None
    };
    let res: KernelLoaderResult = match unpacked {
        Some(r) => {
            is_elf = true;
            r
        }
        None if is_elf => Elf::load(mem, None, &mut file, Some(GuestAddress(KERNEL_START)))
            .map_err(|e| kerr(format!("cannot load it: {e}")))?,
        None => BzImage::load(mem, None, &mut file, Some(GuestAddress(KERNEL_START)))
            .map_err(|e| kerr(format!("cannot load it: {e}")))?,
    };

    let mut cl = linux_loader::cmdline::Cmdline::new(CMDLINE_MAX)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    if !cmdline.is_empty() {
        cl.insert_str(cmdline)
            .map_err(|e| BootError::Cmdline(e.to_string()))?;
    }
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_len = cl.as_cstring().map(|c| c.as_bytes().len()).unwrap_or(0);

    // The initrd goes as high in low memory as the kernel allows, page aligned.
    let max_addr = res
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|m| *m != 0)
        .unwrap_or(0x37ff_ffff)
        .min(layout.lowmem.saturating_sub(1));
    let initrd_loc = match initrd {
        None => None,
        Some(p) => {
            let ierr = |msg: String| BootError::Initrd {
                path: p.to_string(),
                msg,
            };
            let data = std::fs::read(p).map_err(|e| ierr(e.to_string()))?;
            let size = data.len() as u64;
            let end = res.kernel_load.raw_value().saturating_add(res.kernel_end);
            let at = (max_addr.saturating_add(1))
                .checked_sub(size)
                .map(|a| a & !0xfff)
                .filter(|a| *a >= end)
                .ok_or_else(|| {
                    ierr(format!(
                        "{size} bytes do not fit in guest memory below {:#x}",
                        max_addr.saturating_add(1)
                    ))
                })?;
            mem.write_slice(&data, GuestAddress(at))
                .map_err(|e| ierr(e.to_string()))?;
            Some((at, size))
        }
    };

    let map = e820(layout);
    let pvh = match res.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) if is_elf => Some(addr.raw_value()),
        _ => None,
    };
    if let Some(rip) = pvh {
        write_pvh(mem, &map, initrd_loc)?;
        return Ok(Entry::Pvh { rip });
    }
    let mut params = boot_params::default();
    match res.setup_header {
        Some(hdr) => params.hdr = hdr,
        None => {
            // An ELF without PVH: the fields a bzImage would have carried.
            params.hdr.boot_flag = KERNEL_BOOT_FLAG;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
        }
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((at, size)) = initrd_loc {
        params.hdr.ramdisk_image = at as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    if map.len() > params.e820_table.len() {
        return Err(BootError::Setup("too many E820 entries".into()));
    }
    for (slot, (addr, size, type_)) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMem>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(|e| BootError::Setup(e.to_string()))?;
    // A bzImage's 64-bit entry is 0x200 into its protected-mode code; an ELF's is its entry.
    let rip = if is_elf {
        res.kernel_load.raw_value()
    } else {
        res.kernel_load.raw_value().saturating_add(0x200)
    };
    Ok(Entry::Linux64 { rip })
}

/// Loads the kernel ELF inside the bzImage `file` when rhyve can unpack it and it has a PVH
/// note (then no decompressor runs in the guest); `None` leaves the bzImage to boot as one.
/// `file` is left at its start.
fn load_unpacked(
    mem: &GuestMem,
    kernel: &str,
    file: &mut File,
) -> Result<Option<KernelLoaderResult>, BootError> {
    let kerr = kernel_err(kernel);
    let mut image = Vec::new();
    file.read_to_end(&mut image)
        .and_then(|_| file.seek(SeekFrom::Start(0)))
        .map_err(|e| kerr(e.to_string()))?;
    let Some(elf) =
        super::bzimage::unpack(&image).map_err(|e| kerr(format!("cannot unpack: {e}")))?
    else {
        log::info!("{kernel}: payload compressor not unpacked by rhyve; booting the bzImage");
        return Ok(None);
    };
    let r = Elf::load(
        mem,
        None,
        &mut std::io::Cursor::new(&elf),
        Some(GuestAddress(KERNEL_START)),
    )
    .map_err(|e| kerr(format!("cannot load its unpacked ELF: {e}")))?;
    if let PvhBootCapability::PvhEntryPresent(_) = r.pvh_boot_cap {
        log::info!(
            "{kernel}: unpacked its {} MiB kernel ELF; entering it through PVH",
            elf.len() >> 20
        );
        Ok(Some(r))
    } else {
        log::info!("{kernel}: its kernel ELF has no PVH note; booting the bzImage");
        Ok(None)
    }
}

fn write_pvh(
    mem: &GuestMem,
    map: &[(u64, u64, u32)],
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *type_,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut modules = Vec::new();
    if let Some((at, size)) = initrd {
        modules.push(linux_loader::loader::elf::start_info::hvm_modlist_entry {
            paddr: at,
            size,
            ..Default::default()
        });
    }
    // A handful of memory-map entries (the E820 map): far from overflowing.
    let memmap_bytes = memmap
        .len()
        .saturating_mul(std::mem::size_of::<hvm_memmap_table_entry>());
    let modlist_addr = PVH_MEMMAP_ADDR.saturating_add(memmap_bytes as u64);
    if !modules.is_empty() {
        info.nr_modules = modules.len() as u32;
        info.modlist_paddr = modlist_addr;
    }
    let mut params = BootParams::new::<hvm_start_info>(&info, GuestAddress(PVH_INFO_ADDR));
    params.set_sections::<hvm_memmap_table_entry>(&memmap, GuestAddress(PVH_MEMMAP_ADDR));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(modlist_addr));
    }
    PvhBootConfigurator::write_bootparams::<GuestMem>(&params, mem)
        .map_err(|e| BootError::Setup(e.to_string()))
}

fn seg(selector: u16, type_: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the flat GDT and (for the 64-bit entry) the identity page tables.
// Only constants here: the GDT's four entries and the identity page tables of the first
// 4 GiB at fixed low addresses (GDT_ADDR, PML4_ADDR, PDPT_ADDR, PD_ADDR).
#[allow(clippy::arithmetic_side_effects)]
pub fn write_boot_tables(mem: &GuestMem, entry: Entry) -> Result<(), BootError> {
    let err = |e: vm_memory::GuestMemoryError| BootError::Setup(e.to_string());
    // Null, 64-bit code (0x08), data (0x10), 32-bit code (0x18).
    let gdt: [u64; 4] = [
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00cf_9b00_0000_ffff,
    ];
    for (i, d) in gdt.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(err)?;
    }
    if let Entry::Linux64 { .. } = entry {
        mem.write_obj(PDPT_ADDR | 0x3, GuestAddress(PML4_ADDR))
            .map_err(err)?;
        for g in 0..4u64 {
            let pd = PD_ADDR + g * 0x1000;
            mem.write_obj(pd | 0x3, GuestAddress(PDPT_ADDR + 8 * g))
                .map_err(err)?;
            for i in 0..512u64 {
                let page = (g << 30) | (i << 21);
                // Present, writable, 2 MiB page.
                mem.write_obj(page | 0x83, GuestAddress(pd + 8 * i))
                    .map_err(err)?;
            }
        }
    }
    Ok(())
}

/// Puts the BSP at the kernel entry in the state its boot protocol requires.
pub fn setup_bsp(vcpu: &VcpuFd, entry: Entry) -> Result<(), BootError> {
    let kvm = |e: kvm_ioctls::Error| BootError::Setup(e.to_string());
    let mut sregs = vcpu.get_sregs().map_err(kvm)?;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    let data = seg(0x10, 0x3, 0, 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        Entry::Linux64 { rip } => {
            sregs.cs = seg(0x08, 0xb, 1, 0);
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 |= 0x20; // PAE
            sregs.cr0 = 0x8000_0011; // PG, ET, PE
            sregs.efer |= 0x500; // LME, LMA
            regs.rip = rip;
            regs.rsi = ZERO_PAGE_ADDR;
            regs.rsp = BOOT_STACK;
            regs.rbp = BOOT_STACK;
        }
        Entry::Pvh { rip } => {
            sregs.cs = seg(0x18, 0xb, 0, 1);
            sregs.cr0 = 0x11; // ET, PE
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = rip;
            regs.rbx = PVH_INFO_ADDR;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm)?;
    vcpu.set_regs(&regs).map_err(kvm)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn e820_follows_the_memory_map() {
        let l = MemoryLayout::new(256 << 20).unwrap();
        assert_eq!(
            e820(&l),
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x60400, E820_RESERVED),
                (0x10_0000, (256 << 20) - 0x10_0000, E820_RAM),
                (0xe000_0000, 256 << 20, E820_RESERVED),
            ]
        );
        let l = MemoryLayout::new(6 << 30).unwrap();
        let m = e820(&l);
        assert_eq!(m[2], (0x10_0000, 0xc000_0000 - 0x10_0000, E820_RAM));
        assert_eq!(m[4], (1 << 32, (6u64 << 30) - 0xc000_0000, E820_RAM));
        // No RAM range overlaps a reserved one or another RAM range.
        for (i, a) in m.iter().enumerate() {
            for b in &m[i + 1..] {
                assert!(a.0 + a.1 <= b.0, "{a:x?} overlaps {b:x?}");
            }
        }
    }

    #[test]
    fn page_tables_identity_map_4_gib_and_the_gdt_is_flat() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem, Entry::Linux64 { rip: 0 }).unwrap();
        let r = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
        assert_eq!(r(PML4_ADDR), PDPT_ADDR | 3);
        for g in 0..4 {
            assert_eq!(r(PDPT_ADDR + 8 * g), (PD_ADDR + 0x1000 * g) | 3);
        }
        // The last 2 MiB page below 4 GiB maps to itself.
        assert_eq!(r(PD_ADDR + 3 * 0x1000 + 8 * 511), 0xffe0_0000 | 0x83);
        assert_eq!(
            r(GDT_ADDR + 8),
            0x00af_9b00_0000_ffff,
            "64-bit code segment"
        );
        assert_eq!(r(GDT_ADDR + 16), 0x00cf_9300_0000_ffff, "data segment");
    }

    #[test]
    fn bad_kernels_are_refused_clearly() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let l = MemoryLayout::new(64 << 20).unwrap();
        let dir = std::env::temp_dir().join(format!("rhyve-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk");
        std::fs::write(&junk, vec![0x90u8; 4096]).unwrap();
        let e = load(&mem, &l, junk.to_str().unwrap(), None, "", true).unwrap_err();
        assert!(
            e.to_string()
                .contains("neither an ELF vmlinux nor a bzImage"),
            "{e}"
        );
        let e = load(&mem, &l, "/nonexistent/vmlinuz", None, "", true).unwrap_err();
        assert!(e.to_string().contains("No such file"), "{e}");
        // A truncated bzImage: the header says more than the file holds.
        let mut bz = vec![0u8; 0x400];
        bz[0x1f1] = 4; // setup sectors
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x206] = 0x0f;
        bz[0x207] = 0x02; // protocol 2.15
        bz[0x211] = 1; // loaded high
        let bzp = dir.join("bz");
        std::fs::write(&bzp, &bz).unwrap();
        let e = load(&mem, &l, bzp.to_str().unwrap(), None, "", false).unwrap_err();
        assert!(e.to_string().contains("cannot load it"), "{e}");
        // Unpacking it (PVM's default) finds the same truncation in the payload fields.
        let e = load(&mem, &l, bzp.to_str().unwrap(), None, "", true).unwrap_err();
        assert!(
            e.to_string()
                .contains("cannot unpack: payload (0 bytes at 0x0) runs past the end"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
