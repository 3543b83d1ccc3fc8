//! The legacy BIOS area 0xC0000-0xFFFFF as an i440fx's PAM registers route it (docs/firmware.md).
//!
//! On a PC the area is either the boot ROM (its last 128 KiB show through at 0xE0000-0xFFFFF,
//! the "isa-bios" alias) or RAM, chosen per segment by the host bridge's Programmable
//! Attribute Map: reads and writes each go to RAM or to the ROM/PCI side. BIOS firmware
//! (SeaBIOS, qboot) starts in the ROM alias, turns the area to RAM, copies itself there and
//! write-protects the copy. Here each segment's mode becomes KVM memory slots:
//! - read RAM, write RAM: the RAM pages, writable;
//! - read RAM, write ROM side: the RAM pages, read-only (writes exit and are dropped);
//! - read ROM side: the ROM alias read-only where the ROM covers the segment, else no slot
//!   (reads exit and see 0xff); writes exit, and reach RAM only in write-only mode, through
//!   [`Shadow::write`].
//!
//! vCPU writes into shadow RAM are not in KVM's dirty log (the slots change with the guest's
//! PAM writes); [`Shadow::ram_pages`] lists the pages that may have changed, for migration.

use std::sync::{Arc, Mutex};

use kvm_bindings::KVM_MEM_READONLY;
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::memory::{set_slot, GuestMem, MemoryError, PAGE_SIZE};

/// The area the PAM registers control.
pub const BASE: u64 = 0xc_0000;
pub const END: u64 = 0x10_0000;
/// How much of the ROM's end shows through below 1 MiB (QEMU's isa-bios alias).
pub const ROM_ALIAS_MAX: u64 = 128 << 10;
/// Segments: 0 is 0xF0000-0xFFFFF (64 KiB, PAM0's high nibble), 1-12 the 16 KiB pieces of
/// 0xC0000-0xEFFFF in address order (PAM1's low nibble first).
pub const SEGMENTS: usize = 13;

/// Where one segment's reads and writes go (the two PAM bits: 1 read enable, 2 write enable).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PamMode {
    /// Both to the ROM/PCI side: the state at reset.
    #[default]
    Off,
    ReadOnly,
    WriteOnly,
    ReadWrite,
}

impl PamMode {
    /// The mode a PAM nibble's two low bits select.
    pub fn from_bits(bits: u8) -> PamMode {
        match bits & 3 {
            0 => PamMode::Off,
            1 => PamMode::ReadOnly,
            2 => PamMode::WriteOnly,
            _ => PamMode::ReadWrite,
        }
    }
    fn reads_ram(self) -> bool {
        matches!(self, PamMode::ReadOnly | PamMode::ReadWrite)
    }
    fn writes_ram(self) -> bool {
        matches!(self, PamMode::WriteOnly | PamMode::ReadWrite)
    }
}

/// Segment `i`'s guest-physical range (start, length).
pub fn segment(i: usize) -> (u64, u64) {
    if i == 0 {
        (0xf_0000, 0x1_0000)
    } else {
        (BASE + (i as u64 - 1) * 0x4000, 0x4000)
    }
}

/// The segment holding guest-physical `gpa`, if it is in the area.
fn segment_of(gpa: u64) -> Option<usize> {
    match gpa {
        0xf_0000..END => Some(0),
        BASE..0xf_0000 => Some(((gpa - BASE) / 0x4000) as usize + 1),
        _ => None,
    }
}

struct State {
    modes: [PamMode; SEGMENTS],
    /// Slots currently registered (a prefix of the reserved ones).
    used: u32,
    /// Segments that wrote RAM under an earlier routing since `ram_pages` last ran: their
    /// pages may have changed even if they are read-only now.
    wrote: [bool; SEGMENTS],
}

/// The shadow area of one VM: its RAM, the ROM alias and the KVM slots reserved for it.
pub struct Shadow {
    vm: Arc<VmFd>,
    /// Guest RAM (kept mapped by this clone for as long as the slots may point into it).
    mem: GuestMem,
    /// The boot ROM's private copy and its size.
    rom: Arc<MmapRegion>,
    rom_size: u64,
    first_slot: u32,
    state: Mutex<State>,
}

impl Shadow {
    /// Slots `first_slot..first_slot+SEGMENTS` are this area's; RAM must leave
    /// `BASE..END` unmapped in KVM. Starts with every segment `Off` (the ROM alias).
    pub(crate) fn new(
        vm: Arc<VmFd>,
        mem: GuestMem,
        rom: Arc<MmapRegion>,
        rom_size: u64,
        first_slot: u32,
    ) -> Result<Shadow, MemoryError> {
        let s = Shadow {
            vm,
            mem,
            rom,
            rom_size,
            first_slot,
            state: Mutex::new(State {
                modes: [PamMode::Off; SEGMENTS],
                used: 0,
                wrote: [false; SEGMENTS],
            }),
        };
        s.route([PamMode::Off; SEGMENTS])?;
        Ok(s)
    }

    /// How many KVM slots the area may need.
    pub const SLOTS: u32 = SEGMENTS as u32;

    /// The current modes.
    pub fn modes(&self) -> [PamMode; SEGMENTS] {
        self.lock().modes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where segment `i` is backed in KVM under `mode`: (host address, flags), or None for
    /// no slot (accesses exit).
    fn backing(&self, i: usize, mode: PamMode) -> Option<(u64, u32)> {
        let (base, len) = segment(i);
        if mode.reads_ram() {
            let host = self.mem.get_host_address(GuestAddress(base)).ok()? as u64;
            let flags = if mode.writes_ram() {
                0
            } else {
                KVM_MEM_READONLY
            };
            return Some((host, flags));
        }
        // The ROM side: the alias covers the last min(ROM, 128 KiB) below 1 MiB.
        let alias = self.rom_size.min(ROM_ALIAS_MAX);
        if base < END - alias {
            return None;
        }
        let off = self.rom_size - (END - base);
        (off + len <= self.rom_size).then(|| (self.rom.as_ptr() as u64 + off, KVM_MEM_READONLY))
    }

    /// Routes the area as `modes` says, replacing the slots of the previous routing; nothing
    /// changes if the modes do not (firmware writes the registers a byte at a time).
    pub fn set(&self, modes: [PamMode; SEGMENTS]) -> Result<(), MemoryError> {
        if self.lock().modes == modes {
            return Ok(());
        }
        self.route(modes)
    }

    fn route(&self, modes: [PamMode; SEGMENTS]) -> Result<(), MemoryError> {
        let mut st = self.lock();
        for i in 0..SEGMENTS {
            if st.modes[i].writes_ram() {
                st.wrote[i] = true;
            }
        }
        // Segments in address order (1..=12, then 0), merged where their backing continues.
        let order = (1..SEGMENTS).chain(std::iter::once(0));
        let mut runs: Vec<(u64, u64, u64, u32)> = Vec::new(); // gpa, len, host, flags
        for i in order {
            let (gpa, len) = segment(i);
            let Some((host, flags)) = self.backing(i, modes[i]) else {
                continue;
            };
            match runs.last_mut() {
                Some(r) if r.0 + r.1 == gpa && r.2 + r.1 == host && r.3 == flags => r.1 += len,
                _ => runs.push((gpa, len, host, flags)),
            }
        }
        for k in 0..st.used {
            // Size 0 deletes the slot.
            self.region(self.first_slot + k, 0, 0, 0, 0)?;
        }
        st.used = 0;
        for (k, &(gpa, len, host, flags)) in (0u32..).zip(runs.iter()) {
            self.region(self.first_slot + k, gpa, len, host, flags)?;
            st.used = k + 1;
        }
        st.modes = modes;
        Ok(())
    }

    fn region(
        &self,
        slot: u32,
        gpa: u64,
        size: u64,
        host: u64,
        flags: u32,
    ) -> Result<(), MemoryError> {
        // SAFETY: `host..host+size` lies in guest RAM (kept mapped by `self.mem`) or in the ROM
        // copy (kept by `self.rom`), both owned by this Shadow, which the VM's devices hold
        // for as long as the VM runs; size 0 deletes the slot.
        unsafe { set_slot(&self.vm, slot, gpa, host as *mut u8, size, flags) }
    }

    /// A vCPU write that exited inside the area (its segment reads the ROM side or is
    /// read-only): it reaches RAM only where the segment's mode writes RAM.
    pub fn write(&self, gpa: u64, data: &[u8]) {
        let st = self.lock();
        for (k, b) in (0u64..).zip(data) {
            let a = gpa.saturating_add(k);
            if segment_of(a).is_some_and(|i| st.modes[i].writes_ram()) {
                let _ = self.mem.write_obj(*b, GuestAddress(a));
            }
        }
    }

    /// A vCPU read that exited inside the area: the ROM alias, or 0xff where nothing is.
    pub fn read(&self, gpa: u64, data: &mut [u8]) {
        let alias = self.rom_size.min(ROM_ALIAS_MAX);
        for (k, b) in (0u64..).zip(data.iter_mut()) {
            let a = gpa.saturating_add(k);
            *b = 0xff;
            if (END - alias..END).contains(&a) {
                let off = (self.rom_size - (END - a)) as usize;
                // SAFETY: `off` < rom_size, the ROM copy's length; the copy is never written
                // after it was loaded.
                *b = unsafe { *self.rom.as_ptr().add(off) };
            }
        }
    }

    /// The pages of shadow RAM the vCPUs may have written since the last call: every page of
    /// a segment that writes RAM now or did under a routing since (their writes bypass KVM's
    /// dirty log).
    pub fn ram_pages(&self) -> Vec<u64> {
        let mut st = self.lock();
        let wrote = std::mem::replace(&mut st.wrote, [false; SEGMENTS]);
        let mut pages: Vec<u64> = (0..SEGMENTS)
            .filter(|&i| st.modes[i].writes_ram() || wrote[i])
            .flat_map(|i| {
                let (base, len) = segment(i);
                (base..base + len).step_by(PAGE_SIZE as usize)
            })
            .collect();
        pages.sort_unstable();
        pages
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shadow area over 2 MiB of RAM and a 128 KiB ROM whose bytes are their offset's
    /// high byte, in a real VM (KVM checks every slot change).
    fn shadow() -> (Shadow, GuestMem) {
        let kvm = kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm");
        let vm = Arc::new(kvm.create_vm().expect("KVM_CREATE_VM"));
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let size = 128 << 10;
        let rom = MmapRegion::new(size).unwrap();
        for off in 0..size {
            // SAFETY: off < size, the new region's length.
            unsafe { rom.as_ptr().add(off).write((off >> 8) as u8) };
        }
        let s = Shadow::new(vm, mem.clone(), Arc::new(rom), size as u64, 1).unwrap();
        (s, mem)
    }

    #[test]
    fn exits_read_the_rom_alias_and_write_ram_only_where_the_mode_says() {
        let (s, mem) = shadow();
        // The ROM's last 128 KiB at 0xE0000: offset 0x1_2345 of the ROM at 0xF2345.
        let mut b = [0u8; 2];
        s.read(0xf_2345, &mut b);
        assert_eq!(b, [0x23, 0x23]);
        s.write(0xf_0000, &[0xaa]);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0xf_0000)).unwrap(),
            0,
            "Off drops writes"
        );
        let mut m = [PamMode::Off; SEGMENTS];
        m[0] = PamMode::WriteOnly;
        s.set(m).unwrap();
        s.write(0xf_0000, &[0xaa]);
        s.write(0xe_0000, &[0xbb]);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0xf_0000)).unwrap(),
            0xaa,
            "write-only writes RAM"
        );
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0xe_0000)).unwrap(),
            0,
            "another segment is Off"
        );
        assert_eq!(
            s.ram_pages().len(),
            16,
            "the 64 KiB segment that writes RAM"
        );
        // Locked again: its pages are still sent once, as they may have changed meanwhile.
        m[0] = PamMode::ReadOnly;
        s.set(m).unwrap();
        assert_eq!(s.ram_pages().len(), 16);
        assert!(s.ram_pages().is_empty(), "nothing writes RAM any more");
        // Every mode in every segment maps.
        for mode in [
            PamMode::ReadWrite,
            PamMode::ReadOnly,
            PamMode::WriteOnly,
            PamMode::Off,
        ] {
            s.set([mode; SEGMENTS]).unwrap();
            assert_eq!(s.modes(), [mode; SEGMENTS]);
        }
    }

    #[test]
    fn segments_tile_the_area_and_addresses_find_theirs() {
        let mut covered: Vec<(u64, u64)> = (0..SEGMENTS).map(segment).collect();
        covered.sort_unstable();
        let mut at = BASE;
        for (b, l) in covered {
            assert_eq!(b, at);
            at += l;
        }
        assert_eq!(at, END);
        assert_eq!(segment_of(0xc_0000), Some(1));
        assert_eq!(segment_of(0xc_4000), Some(2));
        assert_eq!(segment_of(0xe_fffff), None);
        assert_eq!(segment_of(0xe_ffff), Some(12));
        assert_eq!(segment_of(0xf_8000), Some(0));
        assert_eq!(segment_of(0xb_ffff), None);
        assert_eq!(segment_of(END), None);
        assert_eq!(PamMode::from_bits(0x33 >> 4), PamMode::ReadWrite);
        assert_eq!(PamMode::from_bits(0x1), PamMode::ReadOnly);
        assert_eq!(PamMode::from_bits(0x6), PamMode::WriteOnly);
    }
}
