//! QEMU's firmware configuration interface (fw_cfg; docs/fw_cfg.md), which bhyve selects with
//! `lpc.fwcfg=qemu`: how firmware (OVMF, SeaBIOS, qboot) learns the machine it runs on and
//! receives the ACPI tables, the memory map and a kernel to boot.
//!
//! The guest selects an item by writing its 16-bit key to port 0x510 and reads it a byte at a
//! time from port 0x511, or hands the device a DMA descriptor by writing its guest-physical
//! address, big-endian, to 0x514 (high half) and 0x518 (low half; this write starts the
//! transfer). Items 0x20 and up are files, listed by name in the directory (key 0x19).
//!
//! Everything here is driven by the guest: a selector with no item reads as zeros, a DMA
//! descriptor or buffer outside guest RAM fails that transfer (the ERROR bit, as QEMU does),
//! and no length the guest gives is trusted for an allocation or an index.

use std::collections::BTreeMap;

use rhyve_base::lifecycle::{DeviceState, Lifecycle, Paused, StateError};
use rhyve_bus::BusDevice;
use rhyve_hypervisor::memory::GuestMem;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

/// The selector and data ports.
pub const PORT_BASE: u64 = 0x510;
pub const PORT_LEN: u64 = 2;
/// The DMA address register (8 bytes, big-endian).
pub const DMA_BASE: u64 = 0x514;
pub const DMA_LEN: u64 = 8;

/// The item keys QEMU defines that rhyve provides (QEMU's `fw_cfg.h` numbering).
pub mod key {
    pub const SIGNATURE: u16 = 0x00;
    pub const ID: u16 = 0x01;
    pub const UUID: u16 = 0x02;
    pub const RAM_SIZE: u16 = 0x03;
    pub const NOGRAPHIC: u16 = 0x04;
    pub const NB_CPUS: u16 = 0x05;
    pub const KERNEL_ADDR: u16 = 0x07;
    pub const KERNEL_SIZE: u16 = 0x08;
    pub const INITRD_ADDR: u16 = 0x0a;
    pub const INITRD_SIZE: u16 = 0x0b;
    pub const BOOT_MENU: u16 = 0x0e;
    pub const MAX_CPUS: u16 = 0x0f;
    pub const KERNEL_ENTRY: u16 = 0x10;
    pub const KERNEL_DATA: u16 = 0x11;
    pub const INITRD_DATA: u16 = 0x12;
    pub const CMDLINE_ADDR: u16 = 0x13;
    pub const CMDLINE_SIZE: u16 = 0x14;
    pub const CMDLINE_DATA: u16 = 0x15;
    pub const SETUP_ADDR: u16 = 0x16;
    pub const SETUP_SIZE: u16 = 0x17;
    pub const SETUP_DATA: u16 = 0x18;
    pub const FILE_DIR: u16 = 0x19;
    pub const FILE_FIRST: u16 = 0x20;
    /// x86: whether IRQ 0 (the PIT) arrives on I/O APIC pin 2, as the MADT's override says.
    pub const IRQ0_OVERRIDE: u16 = 0x8002;
}

/// The ID item's feature bits: the port interface, and DMA.
const ID_TRADITIONAL: u32 = 1;
const ID_DMA: u32 = 2;
/// What a read of the DMA register returns: "QEMU CFG", big-endian.
const DMA_SIGNATURE: [u8; 8] = *b"QEMU CFG";
/// The DMA descriptor's control bits.
const CTL_ERROR: u32 = 0x01;
const CTL_READ: u32 = 0x02;
const CTL_SKIP: u32 = 0x04;
const CTL_SELECT: u32 = 0x08;
const CTL_WRITE: u32 = 0x10;
/// A directory entry's name field, NUL included.
pub const FILE_NAME_LEN: usize = 56;
/// qboot keeps the addresses of the loader's files in a 20-entry table indexed by directory
/// position; more files than that would overrun it.
pub const MAX_FILES: usize = 20;
/// Zero-fill of a DMA read past an item's end goes in chunks of this size.
const ZERO_CHUNK: usize = 4096;

const KIND: &str = "fw_cfg";
const VERSION: u32 = 1;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FwCfgError {
    #[error("fw_cfg file name '{0}' is empty or longer than 55 bytes")]
    Name(String),
    #[error("fw_cfg file '{0}' is added twice")]
    Duplicate(String),
    #[error("fw_cfg holds at most {MAX_FILES} files (firmware keeps a table that size)")]
    TooMany,
    #[error("fw_cfg item {0:#x} is larger than 4 GiB")]
    TooBig(u16),
}

/// The items a VM's fw_cfg holds, assembled before the device starts.
#[derive(Default)]
pub struct FwCfgBuilder {
    items: BTreeMap<u16, Vec<u8>>,
    files: Vec<(String, Vec<u8>)>,
}

impl FwCfgBuilder {
    /// The signature, the ID (port and DMA interfaces) and the items every machine has.
    pub fn new() -> Self {
        let mut b = FwCfgBuilder::default();
        b.items.insert(key::SIGNATURE, b"QEMU".to_vec());
        b.items
            .insert(key::ID, (ID_TRADITIONAL | ID_DMA).to_le_bytes().to_vec());
        b.items.insert(key::UUID, vec![0; 16]);
        b.items.insert(key::NOGRAPHIC, 1u16.to_le_bytes().to_vec());
        b.items.insert(key::BOOT_MENU, 0u16.to_le_bytes().to_vec());
        b
    }

    /// Sets a numbered item (replacing one of the same key).
    pub fn item(&mut self, key: u16, data: Vec<u8>) -> &mut Self {
        self.items.insert(key, data);
        self
    }

    /// Adds a named file.
    pub fn file(&mut self, name: &str, data: Vec<u8>) -> Result<&mut Self, FwCfgError> {
        if name.is_empty() || name.len() >= FILE_NAME_LEN || name.contains('\0') {
            return Err(FwCfgError::Name(name.into()));
        }
        if self.files.iter().any(|(n, _)| n == name) {
            return Err(FwCfgError::Duplicate(name.into()));
        }
        if self.files.len() >= MAX_FILES {
            return Err(FwCfgError::TooMany);
        }
        self.files.push((name.into(), data));
        Ok(self)
    }

    /// The device, with the file directory built (files sorted by name, as QEMU lists them).
    pub fn build(mut self, mem: GuestMem) -> Result<FwCfg, FwCfgError> {
        self.files.sort_by(|a, b| a.0.cmp(&b.0));
        // At most MAX_FILES entries: the count and each selector fit their fields.
        let mut dir = (self.files.len() as u32).to_be_bytes().to_vec();
        for (i, (name, data)) in self.files.into_iter().enumerate() {
            let select = key::FILE_FIRST.saturating_add(i as u16);
            let size = u32::try_from(data.len()).map_err(|_| FwCfgError::TooBig(select))?;
            dir.extend_from_slice(&size.to_be_bytes());
            dir.extend_from_slice(&select.to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut field = [0u8; FILE_NAME_LEN];
            for (d, s) in field.iter_mut().zip(name.as_bytes()) {
                *d = *s;
            }
            dir.extend_from_slice(&field);
            self.items.insert(select, data);
        }
        self.items.insert(key::FILE_DIR, dir);
        for (k, v) in &self.items {
            if u32::try_from(v.len()).is_err() {
                return Err(FwCfgError::TooBig(*k));
            }
        }
        Ok(FwCfg {
            items: self.items,
            selected: key::SIGNATURE,
            offset: 0,
            dma_high: 0,
            mem,
            paused: Paused::default(),
        })
    }
}

/// The fw_cfg device: its items and where the guest's reading stands.
pub struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    selected: u16,
    offset: u32,
    dma_high: u32,
    mem: GuestMem,
    paused: Paused,
}

/// What the device holds beyond its (configured) items.
#[derive(Debug, Serialize, Deserialize)]
struct FwCfgState {
    selected: u16,
    offset: u32,
    dma_high: u32,
}

impl FwCfg {
    fn select(&mut self, key: u16) {
        log::trace!("fw_cfg: select {key:#x}");
        self.selected = key;
        self.offset = 0;
    }

    /// The selected item's bytes from the current offset (empty past its end or for a key
    /// with no item).
    fn remaining(&self) -> &[u8] {
        self.items
            .get(&self.selected)
            .and_then(|v| v.get(self.offset as usize..))
            .unwrap_or_default()
    }

    fn read_data(&mut self, data: &mut [u8]) {
        let have = self.remaining();
        let n = have.len().min(data.len());
        for (d, s) in data
            .iter_mut()
            .zip(have.iter().chain(std::iter::repeat(&0)))
        {
            *d = *s;
        }
        // n <= data.len(), at most 8 bytes.
        self.offset = self.offset.saturating_add(n as u32);
    }

    /// Runs the DMA descriptor at `addr` and writes its control word back (0 when done, the
    /// ERROR bit when the transfer failed).
    fn dma(&mut self, addr: u64) {
        let mut desc = [0u8; 16];
        if self.mem.read_slice(&mut desc, GuestAddress(addr)).is_err() {
            log::debug!("fw_cfg: DMA descriptor at {addr:#x} is outside guest RAM");
            return;
        }
        let be32 = |b: &[u8]| b.try_into().map(u32::from_be_bytes).unwrap_or(0);
        let control = be32(desc.get(0..4).unwrap_or_default());
        let length = be32(desc.get(4..8).unwrap_or_default());
        let target = desc
            .get(8..16)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0);
        let ok = self.transfer(control, length, target);
        log::trace!("fw_cfg: DMA control {control:#x} length {length} to {target:#x}: ok {ok}");
        let done: u32 = if ok { 0 } else { CTL_ERROR };
        if self
            .mem
            .write_slice(&done.to_be_bytes(), GuestAddress(addr))
            .is_err()
        {
            log::debug!("fw_cfg: DMA descriptor at {addr:#x} cannot be written back");
        }
    }

    /// One descriptor's work; false is the ERROR bit.
    fn transfer(&mut self, control: u32, length: u32, target: u64) -> bool {
        if control & CTL_SELECT != 0 {
            self.select((control >> 16) as u16);
        }
        if control & CTL_WRITE != 0 {
            // No item is writable.
            return false;
        }
        if control & CTL_READ != 0 {
            let have = self.remaining();
            let n = have.len().min(length as usize);
            if self
                .mem
                .write_slice(have.get(..n).unwrap_or_default(), GuestAddress(target))
                .is_err()
            {
                return false;
            }
            // Past the item's end a read gives zeros, as it does through the data port.
            let mut at = target.checked_add(n as u64);
            let mut left = (length as usize).saturating_sub(n);
            let zeros = [0u8; ZERO_CHUNK];
            while left > 0 {
                let chunk = left.min(ZERO_CHUNK);
                let Some(a) = at else { return false };
                if self
                    .mem
                    .write_slice(zeros.get(..chunk).unwrap_or_default(), GuestAddress(a))
                    .is_err()
                {
                    return false;
                }
                at = a.checked_add(chunk as u64);
                left = left.saturating_sub(chunk);
            }
            self.advance(length);
        } else if control & CTL_SKIP != 0 {
            self.advance(length);
        }
        true
    }

    fn advance(&mut self, by: u32) {
        let len = self.items.get(&self.selected).map_or(0, |v| v.len() as u32);
        self.offset = self.offset.saturating_add(by).min(len);
    }
}

/// The selector and data ports (`PORT_BASE`, two bytes).
impl BusDevice for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            1 => self.read_data(data),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // The selector is a 16-bit little-endian write to the first port.
        if let (0, [lo, hi]) = (offset, data) {
            self.select(u16::from_le_bytes([*lo, *hi]));
        }
    }
}

/// The DMA address register (`DMA_BASE`, eight bytes, big-endian), a separate range so the
/// two decode independently.
pub struct FwCfgDma(pub std::sync::Arc<std::sync::Mutex<FwCfg>>);

impl BusDevice for FwCfgDma {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = (offset as usize).saturating_add(i);
            *b = DMA_SIGNATURE.get(at).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut dev = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match (offset, data.len()) {
            (0, 4) => {
                dev.dma_high = data.try_into().map(u32::from_be_bytes).unwrap_or(0);
            }
            (4, 4) => {
                let low = data.try_into().map(u32::from_be_bytes).unwrap_or(0);
                let addr = (u64::from(dev.dma_high) << 32) | u64::from(low);
                dev.dma_high = 0;
                dev.dma(addr);
            }
            (0, 8) => {
                let addr = data.try_into().map(u64::from_be_bytes).unwrap_or(0);
                dev.dma_high = 0;
                dev.dma(addr);
            }
            _ => log::debug!(
                "fw_cfg: {}-byte DMA register write at +{offset} ignored",
                data.len()
            ),
        }
    }
}

/// The items are configuration, rebuilt from the VM's config; what is saved is how far the
/// guest has read.
impl Lifecycle for FwCfg {
    fn pause(&mut self) {
        self.paused.set(true);
    }

    fn resume(&mut self) {
        self.paused.set(false);
    }

    fn reset(&mut self) {
        self.select(key::SIGNATURE);
        self.dma_high = 0;
    }

    fn save(&mut self) -> Result<DeviceState, StateError> {
        self.paused.check(KIND)?;
        DeviceState::new(
            KIND,
            VERSION,
            &FwCfgState {
                selected: self.selected,
                offset: self.offset,
                dma_high: self.dma_high,
            },
        )
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), StateError> {
        self.paused.check(KIND)?;
        let s: FwCfgState = state.parse(KIND, VERSION)?;
        self.selected = s.selected;
        self.offset = s.offset;
        self.dma_high = s.dma_high;
        Ok(())
    }
}

/// QEMU's ACPI linker/loader script (`etc/table-loader`): 128-byte commands telling firmware
/// to allocate a file in guest memory, patch a pointer in one file by another file's address,
/// and recompute a checksum.
#[derive(Default)]
pub struct TableLoader {
    script: Vec<u8>,
}

/// Where firmware places an allocated file: anywhere in RAM, or in the F-segment (the RSDP,
/// so that the legacy scan finds it).
#[derive(Clone, Copy)]
pub enum Zone {
    High = 1,
    Fseg = 2,
}

const CMD_LEN: usize = 128;

impl TableLoader {
    fn command(&mut self, cmd: u32, body: &[&[u8]]) {
        let mut c = cmd.to_le_bytes().to_vec();
        for part in body {
            c.extend_from_slice(part);
        }
        c.resize(CMD_LEN, 0);
        self.script.extend_from_slice(&c);
    }

    fn name(file: &str) -> [u8; FILE_NAME_LEN] {
        let mut f = [0u8; FILE_NAME_LEN];
        for (d, s) in f.iter_mut().take(FILE_NAME_LEN - 1).zip(file.as_bytes()) {
            *d = *s;
        }
        f
    }

    /// Allocate `file` (aligned to `align`) in `zone` and read it there.
    pub fn allocate(&mut self, file: &str, align: u32, zone: Zone) {
        self.command(1, &[&Self::name(file), &align.to_le_bytes(), &[zone as u8]]);
    }

    /// Add `src`'s address to the `size`-byte little-endian value at `offset` in `dest`.
    pub fn add_pointer(&mut self, dest: &str, src: &str, offset: u32, size: u8) {
        self.command(
            2,
            &[
                &Self::name(dest),
                &Self::name(src),
                &offset.to_le_bytes(),
                &[size],
            ],
        );
    }

    /// Make bytes `start..start+len` of `file` sum to zero through the byte at `offset`.
    pub fn add_checksum(&mut self, file: &str, offset: u32, start: u32, len: u32) {
        self.command(
            3,
            &[
                &Self::name(file),
                &offset.to_le_bytes(),
                &start.to_le_bytes(),
                &len.to_le_bytes(),
            ],
        );
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.script
    }
}

/// The `etc/e820` file: 20-byte entries (address, length, type).
pub fn e820_file(ranges: &[(u64, u64, u32)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ranges.len().saturating_mul(20));
    for &(addr, len, kind) in ranges {
        out.extend_from_slice(&addr.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
    }
    out
}

/// E820 entry types: usable RAM, and reserved (the PCI ECAM window, so that Linux uses it).
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// A bzImage split as QEMU hands it over: the real-mode setup (boot sector and setup
/// sectors) and the protected-mode kernel after it.
pub fn split_bzimage(image: &[u8]) -> Option<(&[u8], &[u8])> {
    // "HdrS" at 0x202 marks a boot protocol 2.00+ header.
    if image.get(0x202..0x206) != Some(b"HdrS".as_slice()) {
        return None;
    }
    let sects = match image.get(0x1f1).copied()? {
        0 => 4,
        n => n,
    };
    let setup = (usize::from(sects).checked_add(1)?).checked_mul(512)?;
    if setup >= image.len() {
        return None;
    }
    Some(image.split_at(setup))
}

/// Where a firmware loading a kernel from fw_cfg puts its pieces, as QEMU places them for a
/// boot protocol 2.02+ kernel loaded high: the setup at 0x10000, the command line at 0x20000,
/// the kernel at 1 MiB.
const SETUP_ADDR: u32 = 0x1_0000;
const CMDLINE_ADDR: u32 = 0x2_0000;
const KERNEL_ADDR: u32 = 0x10_0000;
/// Kept free below the top of low RAM for the firmware's own tables (QEMU leaves 160 KiB).
const FIRMWARE_RESERVE: u64 = 0x2_8000;

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(d) = buf.get_mut(at..at.saturating_add(bytes.len())) {
        d.copy_from_slice(bytes);
    }
}

/// The kernel items QEMU gives firmware for `-kernel`: the bzImage's setup (its header
/// filled in as a boot loader does: command-line pointer, loader type, heap, initrd place),
/// the protected-mode kernel, the initrd and the command line (NUL-terminated), each with its
/// size and load address. `lowmem` is the RAM below the PCI hole; the initrd goes as high
/// under it (and under the kernel's own limit) as it fits.
pub fn add_linux(
    b: &mut FwCfgBuilder,
    image: &[u8],
    initrd: Option<Vec<u8>>,
    cmdline: &str,
    lowmem: u64,
) -> Result<(), String> {
    let (setup, kernel) =
        split_bzimage(image).ok_or("firmware boots a bzImage from fw_cfg, and this is not one")?;
    let mut setup = setup.to_vec();
    let u16_at = |o: usize| {
        setup
            .get(o..o.saturating_add(2))
            .and_then(|b| b.try_into().ok())
            .map_or(0, u16::from_le_bytes)
    };
    let protocol = u16_at(0x206);
    let loaded_high = setup.get(0x211).is_some_and(|f| f & 1 != 0);
    if protocol < 0x202 || !loaded_high {
        return Err(format!(
            "boot protocol {}.{:02} (or a kernel not loaded high) is too old to boot from fw_cfg",
            protocol >> 8,
            protocol & 0xff
        ));
    }
    let mut line = cmdline.as_bytes().to_vec();
    line.push(0);
    // The command line lives from 0x20000 up to the kernel at 1 MiB.
    if line.len() > (KERNEL_ADDR - CMDLINE_ADDR) as usize {
        return Err(format!(
            "the kernel command line ({} bytes) is too long",
            line.len()
        ));
    }
    let initrd_max = if protocol >= 0x203 {
        setup
            .get(0x22c..0x230)
            .and_then(|b| b.try_into().ok())
            .map_or(0x37ff_ffff, u32::from_le_bytes)
    } else {
        0x37ff_ffff
    };
    let initrd_max = u64::from(initrd_max).min(lowmem.saturating_sub(FIRMWARE_RESERVE + 1));
    let len32 = |what: &str, d: &[u8]| {
        u32::try_from(d.len()).map_err(|_| format!("the {what} is larger than 4 GiB"))
    };
    let (initrd_addr, initrd_len) = match &initrd {
        Some(d) => {
            let len = len32("initrd", d)?;
            let top = initrd_max
                .checked_sub(u64::from(len))
                .filter(|a| *a > u64::from(KERNEL_ADDR).saturating_add(kernel.len() as u64))
                .ok_or_else(|| {
                    format!("the initrd ({len} bytes) does not fit below {initrd_max:#x} above the kernel: give the guest more memory")
                })?;
            // Below 4 GiB by the clamp above.
            ((top & !0xfff) as u32, len)
        }
        None => (0, 0),
    };
    put(&mut setup, 0x228, &CMDLINE_ADDR.to_le_bytes());
    put(&mut setup, 0x210, &[0xb0]);
    if let Some(f) = setup.get_mut(0x211) {
        *f |= 0x80; // CAN_USE_HEAP
    }
    let heap_end = (CMDLINE_ADDR - SETUP_ADDR - 0x200) as u16;
    put(&mut setup, 0x224, &heap_end.to_le_bytes());
    put(&mut setup, 0x218, &initrd_addr.to_le_bytes());
    put(&mut setup, 0x21c, &initrd_len.to_le_bytes());
    let le = |v: u32| v.to_le_bytes().to_vec();
    b.item(key::SETUP_ADDR, le(SETUP_ADDR))
        .item(key::SETUP_SIZE, le(len32("setup", &setup)?))
        .item(key::SETUP_DATA, setup)
        .item(key::KERNEL_ADDR, le(KERNEL_ADDR))
        .item(key::KERNEL_SIZE, le(len32("kernel", kernel)?))
        .item(key::KERNEL_DATA, kernel.to_vec())
        .item(key::CMDLINE_ADDR, le(CMDLINE_ADDR))
        .item(key::CMDLINE_SIZE, le(len32("command line", &line)?))
        .item(key::CMDLINE_DATA, line);
    if let Some(d) = initrd {
        b.item(key::INITRD_ADDR, le(initrd_addr))
            .item(key::INITRD_SIZE, le(initrd_len))
            .item(key::INITRD_DATA, d);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
    use super::*;
    use rhyve_base::lifecycle::round_trip;
    use std::sync::{Arc, Mutex};

    fn mem() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn device() -> FwCfg {
        let mut b = FwCfgBuilder::new();
        b.item(key::NB_CPUS, 2u16.to_le_bytes().to_vec());
        b.file("etc/e820", e820_file(&[(0, 0x8000_0000, E820_RAM)]))
            .unwrap();
        b.file("bootorder", Vec::new()).unwrap();
        b.file("etc/boot-fail-wait", 5000u32.to_le_bytes().to_vec())
            .unwrap();
        b.build(mem()).unwrap()
    }

    fn select(d: &mut FwCfg, k: u16) {
        d.write(0, &k.to_le_bytes());
    }

    fn read(d: &mut FwCfg, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                let mut b = [0xa5u8];
                d.read(1, &mut b);
                b[0]
            })
            .collect()
    }

    /// The directory as firmware parses it: (size, select, name).
    fn directory(d: &mut FwCfg) -> Vec<(u32, u16, String)> {
        select(d, key::FILE_DIR);
        let n = u32::from_be_bytes(read(d, 4).try_into().unwrap());
        (0..n)
            .map(|_| {
                let e = read(d, 64);
                let name = e[8..].iter().take_while(|b| **b != 0).copied().collect();
                (
                    u32::from_be_bytes(e[0..4].try_into().unwrap()),
                    u16::from_be_bytes(e[4..6].try_into().unwrap()),
                    String::from_utf8(name).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn signature_id_and_items_read_through_the_data_port() {
        let mut d = device();
        select(&mut d, key::SIGNATURE);
        assert_eq!(read(&mut d, 4), b"QEMU");
        // Past the end: zeros, and the offset stays put.
        assert_eq!(read(&mut d, 2), [0, 0]);
        select(&mut d, key::ID);
        assert_eq!(read(&mut d, 4), 3u32.to_le_bytes());
        select(&mut d, key::NB_CPUS);
        assert_eq!(read(&mut d, 2), 2u16.to_le_bytes());
        // A key with no item reads as zeros.
        select(&mut d, 0x7777);
        assert_eq!(read(&mut d, 3), [0, 0, 0]);
        // A one-byte write to the selector port is not a selection.
        select(&mut d, key::SIGNATURE);
        d.write(0, &[key::ID as u8]);
        assert_eq!(read(&mut d, 1), b"Q");
    }

    #[test]
    fn the_directory_lists_files_sorted_with_their_sizes() {
        let mut d = device();
        let dir = directory(&mut d);
        assert_eq!(
            dir,
            vec![
                (0, 0x20, "bootorder".into()),
                (4, 0x21, "etc/boot-fail-wait".into()),
                (20, 0x22, "etc/e820".into()),
            ]
        );
        select(&mut d, 0x22);
        let e = read(&mut d, 20);
        assert_eq!(
            u64::from_le_bytes(e[8..16].try_into().unwrap()),
            0x8000_0000
        );
        assert_eq!(u32::from_le_bytes(e[16..20].try_into().unwrap()), 1);
    }

    #[test]
    fn file_names_and_counts_are_checked() {
        let mut b = FwCfgBuilder::new();
        assert_eq!(
            b.file(&"x".repeat(56), vec![]).err(),
            Some(FwCfgError::Name("x".repeat(56)))
        );
        assert!(b.file(&"x".repeat(55), vec![]).is_ok());
        assert_eq!(
            b.file(&"x".repeat(55), vec![]).err(),
            Some(FwCfgError::Duplicate("x".repeat(55)))
        );
        for i in 1..MAX_FILES {
            b.file(&format!("f{i}"), vec![]).unwrap();
        }
        assert_eq!(b.file("one-more", vec![]).err(), Some(FwCfgError::TooMany));
    }

    fn dma_device() -> (Arc<Mutex<FwCfg>>, FwCfgDma, GuestMem) {
        let d = device();
        let m = d.mem.clone();
        let d = Arc::new(Mutex::new(d));
        (d.clone(), FwCfgDma(d), m)
    }

    fn descriptor(m: &GuestMem, at: u64, control: u32, len: u32, target: u64) {
        let mut desc = control.to_be_bytes().to_vec();
        desc.extend_from_slice(&len.to_be_bytes());
        desc.extend_from_slice(&target.to_be_bytes());
        m.write_slice(&desc, GuestAddress(at)).unwrap();
    }

    fn control(m: &GuestMem, at: u64) -> u32 {
        let mut c = [0u8; 4];
        m.read_slice(&mut c, GuestAddress(at)).unwrap();
        u32::from_be_bytes(c)
    }

    fn kick(dma: &mut FwCfgDma, at: u64) {
        dma.write(0, &((at >> 32) as u32).to_be_bytes());
        dma.write(4, &(at as u32).to_be_bytes());
    }

    #[test]
    fn dma_selects_reads_skips_and_zero_fills() {
        let (_, mut dma, m) = dma_device();
        let mut sig = [0u8; 8];
        dma.read(0, &mut sig);
        assert_eq!(&sig, b"QEMU CFG");
        // Select + read the signature into 0x2000, with 4 bytes beyond its end.
        m.write_slice(&[0xff; 8], GuestAddress(0x2000)).unwrap();
        descriptor(
            &m,
            0x1000,
            (u32::from(key::SIGNATURE) << 16) | CTL_SELECT | CTL_READ,
            8,
            0x2000,
        );
        kick(&mut dma, 0x1000);
        assert_eq!(control(&m, 0x1000), 0);
        let mut got = [0u8; 8];
        m.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
        assert_eq!(&got, b"QEMU\0\0\0\0");
        // Skip 8 bytes of e820, then read the length field (a 64-bit register write).
        descriptor(&m, 0x1000, (0x22 << 16) | CTL_SELECT | CTL_SKIP, 8, 0);
        kick(&mut dma, 0x1000);
        descriptor(&m, 0x1000, CTL_READ, 8, 0x3000);
        dma.write(0, &0x1000u64.to_be_bytes());
        assert_eq!(control(&m, 0x1000), 0);
        let mut len = [0u8; 8];
        m.read_slice(&mut len, GuestAddress(0x3000)).unwrap();
        assert_eq!(u64::from_le_bytes(len), 0x8000_0000);
    }

    #[test]
    fn bad_dma_is_an_error_for_that_transfer_only() {
        let (dev, mut dma, m) = dma_device();
        // A target outside RAM, a huge length, a write: each sets ERROR.
        for (ctl, len, target) in [
            (CTL_READ | CTL_SELECT, 4, 0x10_0000_0000u64),
            (CTL_READ | CTL_SELECT, u32::MAX, 0x4000),
            (CTL_WRITE | CTL_SELECT, 4, 0x4000),
            (CTL_READ | CTL_SELECT, 16, u64::MAX - 3),
        ] {
            descriptor(&m, 0x1000, ctl, len, target);
            kick(&mut dma, 0x1000);
            assert_eq!(
                control(&m, 0x1000),
                CTL_ERROR,
                "{ctl:#x} {len:#x} {target:#x}"
            );
        }
        // A descriptor outside RAM: nothing happens, nothing panics.
        kick(&mut dma, 0xffff_ffff_ffff_fff0);
        kick(&mut dma, 0x10_0000);
        // The device still works.
        let mut d = dev.lock().unwrap();
        select(&mut d, key::SIGNATURE);
        assert_eq!(read(&mut d, 4), b"QEMU");
    }

    #[test]
    fn the_read_position_survives_a_round_trip() {
        let mut d = device();
        select(&mut d, key::SIGNATURE);
        read(&mut d, 2);
        let mut fresh = device();
        let (saved, again) = round_trip(&mut d, &mut fresh).unwrap();
        assert_eq!(saved, again);
        fresh.resume();
        assert_eq!(read(&mut fresh, 2), b"MU");
    }

    #[test]
    fn loader_commands_are_128_bytes_each() {
        let mut l = TableLoader::default();
        l.allocate("etc/acpi/rsdp", 16, Zone::Fseg);
        l.add_pointer("etc/acpi/rsdp", "etc/acpi/tables", 16, 4);
        l.add_checksum("etc/acpi/rsdp", 8, 0, 20);
        let s = l.into_bytes();
        assert_eq!(s.len(), 3 * 128);
        assert_eq!(&s[0..4], 1u32.to_le_bytes());
        assert_eq!(&s[4..17], b"etc/acpi/rsdp");
        assert_eq!(&s[60..64], 16u32.to_le_bytes());
        assert_eq!(s[64], 2);
        assert_eq!(&s[128..132], 2u32.to_le_bytes());
        assert_eq!(&s[128 + 60..128 + 75], b"etc/acpi/tables");
        assert_eq!(&s[128 + 116..128 + 120], 16u32.to_le_bytes());
        assert_eq!(s[128 + 120], 4);
        assert_eq!(
            &s[256 + 60..256 + 72],
            [8, 0, 0, 0, 0, 0, 0, 0, 20, 0, 0, 0]
        );
    }

    fn item(d: &mut FwCfg, k: u16, n: usize) -> Vec<u8> {
        select(d, k);
        read(d, n)
    }

    fn u32_item(d: &mut FwCfg, k: u16) -> u32 {
        u32::from_le_bytes(item(d, k, 4).try_into().unwrap())
    }

    #[test]
    fn a_kernel_is_handed_over_with_its_header_filled_in() {
        let mut img = vec![0u8; 64 << 10];
        img[0x1f1] = 3;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        img[0x211] = 1;
        img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        let mut b = FwCfgBuilder::new();
        add_linux(
            &mut b,
            &img,
            Some(vec![7; 10_000]),
            "console=ttyS0",
            256 << 20,
        )
        .unwrap();
        let mut d = b.build(mem()).unwrap();
        assert_eq!(u32_item(&mut d, key::SETUP_ADDR), 0x1_0000);
        assert_eq!(u32_item(&mut d, key::SETUP_SIZE), 2048);
        assert_eq!(u32_item(&mut d, key::KERNEL_ADDR), 0x10_0000);
        assert_eq!(u32_item(&mut d, key::KERNEL_SIZE), (64 << 10) - 2048);
        assert_eq!(u32_item(&mut d, key::CMDLINE_SIZE), 14);
        assert_eq!(item(&mut d, key::CMDLINE_DATA, 14), b"console=ttyS0\0");
        let setup = item(&mut d, key::SETUP_DATA, 2048);
        let at = |o: usize| u32::from_le_bytes(setup[o..o + 4].try_into().unwrap());
        assert_eq!(at(0x228), 0x2_0000, "command line pointer");
        assert_eq!((setup[0x210], setup[0x211]), (0xb0, 0x81));
        // The initrd: page-aligned, at the top of RAM less the firmware's reserve.
        let initrd = u32_item(&mut d, key::INITRD_ADDR);
        assert_eq!((at(0x218), at(0x21c)), (initrd, 10_000));
        assert_eq!(initrd % 4096, 0);
        assert!(u64::from(initrd) + 10_000 < (256 << 20) - FIRMWARE_RESERVE);
        assert!(u64::from(initrd) + 10_000 + 4096 > (256 << 20) - FIRMWARE_RESERVE);
        // Too little RAM for the initrd, an old protocol, a non-bzImage: refused.
        let mut b = FwCfgBuilder::new();
        let e = add_linux(&mut b, &img, Some(vec![0; 4 << 20]), "", 4 << 20).unwrap_err();
        assert!(e.contains("more memory"), "{e}");
        img[0x206..0x208].copy_from_slice(&0x201u16.to_le_bytes());
        assert!(add_linux(&mut b, &img, None, "", 256 << 20)
            .unwrap_err()
            .contains("too old"));
        assert!(add_linux(&mut b, b"\x7fELF", None, "", 256 << 20).is_err());
    }

    #[test]
    fn a_bzimage_splits_after_its_setup_sectors() {
        let mut img = vec![0u8; 8192];
        img[0x1f1] = 3;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        let (setup, kernel) = split_bzimage(&img).unwrap();
        assert_eq!((setup.len(), kernel.len()), (2048, 8192 - 2048));
        img[0x1f1] = 0;
        assert_eq!(split_bzimage(&img).unwrap().0.len(), 2560);
        img[0x1f1] = 0xff;
        assert!(split_bzimage(&img).is_none(), "setup longer than the file");
        assert!(split_bzimage(b"ELF").is_none());
    }
}
