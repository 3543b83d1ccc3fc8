//! The UEFI variable store as a CFI flash (Intel command set, as QEMU's pflash), for firmware
//! built for QEMU (OVMF) that keeps its variables only in a store that behaves as flash
//! (docs/firmware.md). The store is the user's varfile, mapped shared, so what the guest
//! programs reaches the file.
//!
//! In read-array mode (the state at reset) the store is a read-only KVM slot: reads run at
//! memory speed, writes exit here as commands. In every other mode reads answer the status
//! register or the device ID, so the slot is dropped until the guest returns to read-array
//! mode.
//! The commands: 0x10/0x40 program a byte, 0x20 then 0xD0 erase a block (4 KiB), 0x50 clear
//! status, 0x70 read status, 0x90/0x98 read the ID / query, 0xFF read array.

use std::sync::{Arc, Mutex};

use kvm_bindings::KVM_MEM_READONLY;
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegion;

use crate::memory::{set_slot, MemoryError};

/// The erase block: what OVMF's flash driver erases at a time.
pub const BLOCK_SIZE: u64 = 4096;

const CMD_PROGRAM: u8 = 0x10;
const CMD_PROGRAM_ALT: u8 = 0x40;
const CMD_ERASE: u8 = 0x20;
const CMD_CLEAR_STATUS: u8 = 0x50;
const CMD_READ_STATUS: u8 = 0x70;
const CMD_READ_ID: u8 = 0x90;
const CMD_QUERY: u8 = 0x98;
const CMD_ERASE_CONFIRM: u8 = 0xd0;
const CMD_READ_ARRAY: u8 = 0xff;
/// Status register: ready.
const STATUS_READY: u8 = 0x80;
/// Status register: an erase sequence was broken.
const STATUS_ERASE_ERROR: u8 = 0x30;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    ReadArray,
    /// The next write is the byte to program.
    Program,
    /// The next write must confirm the erase of this offset's block.
    Erase(u64),
    /// Reads answer the status register.
    Status,
    /// Reads answer the manufacturer and device ID.
    Id,
}

struct State {
    mode: Mode,
    status: u8,
    mapped: bool,
    programmed: u64,
    erased: u64,
}

pub struct Flash {
    vm: Arc<VmFd>,
    region: Arc<MmapRegion>,
    base: u64,
    size: u64,
    slot: u32,
    state: Mutex<State>,
}

impl Flash {
    /// The store `region` (all of it) at guest-physical `base`, in KVM slot `slot`.
    pub(crate) fn new(
        vm: Arc<VmFd>,
        region: Arc<MmapRegion>,
        base: u64,
        slot: u32,
    ) -> Result<Flash, MemoryError> {
        let f = Flash {
            vm,
            size: region.size() as u64,
            region,
            base,
            slot,
            state: Mutex::new(State {
                mode: Mode::ReadArray,
                status: STATUS_READY,
                mapped: false,
                programmed: 0,
                erased: 0,
            }),
        };
        f.map(&mut f.lock(), true)?;
        Ok(f)
    }

    pub fn base(&self) -> u64 {
        self.base
    }
    pub fn size(&self) -> u64 {
        self.size
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Maps the store read-only (read-array mode) or drops the slot (reads exit).
    fn map(&self, st: &mut State, on: bool) -> Result<(), MemoryError> {
        if st.mapped == on {
            return Ok(());
        }
        let size = if on { self.size } else { 0 };
        // SAFETY: the region is the varfile's shared mapping of exactly `size` bytes, owned
        // (through the Arc) by this Flash, which lives as long as the VM's devices; size 0
        // deletes the slot.
        unsafe {
            set_slot(
                &self.vm,
                self.slot,
                self.base,
                self.region.as_ptr(),
                size,
                KVM_MEM_READONLY,
            )?
        };
        st.mapped = on;
        Ok(())
    }

    fn set_mode(&self, st: &mut State, mode: Mode) {
        st.mode = mode;
        // Only read-array mode reads the array; the others answer the status or the ID, so
        // one program sequence (0x10, byte, 0x10, byte, ..., 0xFF) drops and restores the
        // slot once, not per byte.
        if let Err(e) = self.map(st, mode == Mode::ReadArray) {
            log::error!("flash: cannot change the variable store's mapping: {e}");
        }
    }

    /// A guest write at `offset` into the store: a command, or the byte a program command
    /// asked for. Wider writes carry their command in the low byte.
    pub fn write(&self, offset: u64, data: &[u8]) {
        let Some(&cmd) = data.first() else { return };
        let mut st = self.lock();
        match st.mode {
            Mode::Program => {
                let stored = (0u64..)
                    .zip(data)
                    .filter(|&(k, &b)| self.store(offset.saturating_add(k), b))
                    .count();
                st.programmed = st.programmed.saturating_add(stored as u64);
                st.status |= STATUS_READY;
                self.set_mode(&mut st, Mode::Status);
            }
            Mode::Erase(at) => {
                if cmd == CMD_ERASE_CONFIRM {
                    self.erase(at);
                    st.erased = st.erased.saturating_add(1);
                    st.status |= STATUS_READY;
                } else {
                    st.status |= STATUS_ERASE_ERROR;
                }
                self.set_mode(&mut st, Mode::Status);
            }
            _ => match cmd {
                CMD_PROGRAM | CMD_PROGRAM_ALT => self.set_mode(&mut st, Mode::Program),
                CMD_ERASE => self.set_mode(&mut st, Mode::Erase(offset)),
                CMD_CLEAR_STATUS => {
                    st.status = 0;
                    self.set_mode(&mut st, Mode::ReadArray);
                }
                CMD_READ_STATUS => self.set_mode(&mut st, Mode::Status),
                CMD_READ_ID | CMD_QUERY => self.set_mode(&mut st, Mode::Id),
                CMD_READ_ARRAY => self.set_mode(&mut st, Mode::ReadArray),
                other => {
                    log::debug!("flash: unknown command {other:#x} at {offset:#x}");
                    self.set_mode(&mut st, Mode::ReadArray);
                }
            },
        }
    }

    /// A guest read that exited (the store is unmapped outside read-array mode).
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let st = self.lock();
        match st.mode {
            Mode::Status | Mode::Program | Mode::Erase(_) => data.fill(st.status),
            // Intel's manufacturer code at 0, a device code at 1.
            Mode::Id => {
                for (k, b) in (0u64..).zip(data.iter_mut()) {
                    *b = match offset.saturating_add(k) & 1 {
                        0 => 0x89,
                        _ => 0x18,
                    };
                }
            }
            _ => {
                for (k, b) in (0u64..).zip(data.iter_mut()) {
                    *b = self.load(offset.saturating_add(k));
                }
            }
        }
    }

    fn load(&self, off: u64) -> u8 {
        if off >= self.size {
            return 0xff;
        }
        // SAFETY: off < size, the mapping's length; the mapping lives as long as self. The
        // guest maps the same bytes, hence the volatile access.
        unsafe { self.region.as_ptr().add(off as usize).read_volatile() }
    }

    /// Programs one byte; false if `off` is outside the store.
    fn store(&self, off: u64, b: u8) -> bool {
        if off >= self.size {
            return false;
        }
        // SAFETY: off < size, the mapping's length; only this Flash writes the store (the
        // guest's slot is read-only), volatile because the guest maps the same bytes.
        unsafe { self.region.as_ptr().add(off as usize).write_volatile(b) };
        true
    }

    fn erase(&self, at: u64) {
        let start = at - at % BLOCK_SIZE;
        let end = start.saturating_add(BLOCK_SIZE).min(self.size);
        for off in start..end {
            self.store(off, 0xff);
        }
    }

    /// The command state, for a snapshot: the mode (0 read array, 1 program, 2 erase, 3
    /// status, 4 ID), the offset an erase waits to confirm, and the status register.
    pub fn state(&self) -> (u8, u64, u8) {
        let st = self.lock();
        let (mode, at) = match st.mode {
            Mode::ReadArray => (0, 0),
            Mode::Program => (1, 0),
            Mode::Erase(at) => (2, at),
            Mode::Status => (3, 0),
            Mode::Id => (4, 0),
        };
        (mode, at, st.status)
    }

    /// Puts the command state `state` gave back (a restored VM's), with the mapping its mode
    /// has.
    pub fn set_state(&self, mode: u8, erase_at: u64, status: u8) -> Result<(), String> {
        let mode = match mode {
            0 => Mode::ReadArray,
            1 => Mode::Program,
            2 if erase_at < self.size => Mode::Erase(erase_at),
            3 => Mode::Status,
            4 => Mode::Id,
            m => {
                return Err(format!(
                    "flash: mode {m} (erase at {erase_at:#x}) is not one"
                ))
            }
        };
        let mut st = self.lock();
        st.status = status;
        st.mode = mode;
        self.map(&mut st, mode == Mode::ReadArray)
            .map_err(|e| e.to_string())
    }

    /// Bytes programmed and blocks erased since the VM started.
    pub fn counters(&self) -> (u64, u64) {
        let st = self.lock();
        (st.programmed, st.erased)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use vm_memory::FileOffset;

    /// A flash over a real varfile in a real VM (KVM checks the slot changes).
    fn flash(tag: &str, size: usize) -> (Flash, std::path::PathBuf) {
        let p = std::env::temp_dir().join(format!("rhyve-flash-{tag}-{}", std::process::id()));
        std::fs::write(&p, vec![0x8du8; size]).unwrap();
        let f = File::options().read(true).write(true).open(&p).unwrap();
        let region = MmapRegion::from_file(FileOffset::new(f, 0), size).unwrap();
        let kvm = kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm");
        let vm = Arc::new(kvm.create_vm().expect("KVM_CREATE_VM"));
        let base = (1u64 << 32) - 0x40_0000;
        (Flash::new(vm, Arc::new(region), base, 3).unwrap(), p)
    }

    fn byte(f: &Flash, off: u64) -> u8 {
        let mut b = [0u8];
        f.read(off, &mut b);
        b[0]
    }

    #[test]
    fn ovmfs_probe_finds_flash_and_programmed_and_erased_bytes_reach_the_file() {
        let (f, p) = flash("probe", 0x8000);
        // OVMF's probe: clear status leaves read-array mode (the byte reads as before, not as
        // the command), then read status answers the cleared status.
        f.write(0x10, &[CMD_CLEAR_STATUS]);
        assert_eq!(byte(&f, 0x10), 0x8d, "clear status left read-array mode");
        f.write(0x10, &[CMD_READ_STATUS]);
        assert_eq!(byte(&f, 0x10), 0x00, "cleared status");
        f.write(0x10, &[CMD_READ_ARRAY]);
        // Program two bytes as OVMF does (0x10, byte, 0x10, byte, then read array).
        f.write(0x1234, &[CMD_PROGRAM]);
        f.write(0x1234, &[0x42]);
        assert_eq!(byte(&f, 0), STATUS_READY, "status while programming");
        f.write(0x1235, &[CMD_PROGRAM]);
        f.write(0x1235, &[0x43]);
        f.write(0x1235, &[CMD_READ_ARRAY]);
        assert_eq!((byte(&f, 0x1234), byte(&f, 0x1235)), (0x42, 0x43));
        // Erase the block holding 0x2010: 0x2000-0x2fff become 0xff, the rest stays.
        f.write(0x2010, &[CMD_ERASE]);
        f.write(0x2010, &[CMD_ERASE_CONFIRM]);
        f.write(0x2010, &[CMD_READ_ARRAY]);
        assert_eq!(
            (
                byte(&f, 0x1fff),
                byte(&f, 0x2000),
                byte(&f, 0x2fff),
                byte(&f, 0x3000)
            ),
            (0x8d, 0xff, 0xff, 0x8d)
        );
        // An erase not confirmed erases nothing and says so in the status.
        f.write(0x3000, &[CMD_ERASE]);
        f.write(0x3000, &[0x00]);
        assert_eq!(byte(&f, 0x3000) & STATUS_ERASE_ERROR, STATUS_ERASE_ERROR);
        f.write(0x3000, &[CMD_READ_ARRAY]);
        assert_eq!(byte(&f, 0x3000), 0x8d);
        // Out of range reads and programs do nothing harmful.
        f.write(0x8000, &[CMD_PROGRAM]);
        f.write(0x8000, &[0x11]);
        f.write(0x8000, &[CMD_READ_ARRAY]);
        assert_eq!(byte(&f, 0x9000), 0xff);
        assert_eq!(
            f.counters(),
            (2, 1),
            "the byte outside the store is not counted"
        );
        // A snapshot between a program command and its byte restores into the same place: the
        // next write is data, not a command.
        f.write(0x4000, &[CMD_PROGRAM]);
        let (mode, at, status) = f.state();
        f.write(0x4000, &[CMD_READ_ARRAY]);
        f.set_state(mode, at, status).unwrap();
        f.write(0x4000, &[0x20]);
        f.write(0x4000, &[CMD_READ_ARRAY]);
        assert_eq!(
            byte(&f, 0x4000),
            0x20,
            "the restored program command took its byte"
        );
        assert!(f.set_state(9, 0, 0).is_err());
        // The varfile holds what was programmed: the next boot sees it.
        drop(f);
        let file = std::fs::read(&p).unwrap();
        assert_eq!(
            (file[0x1234], file[0x1235], file[0x2000], file[0x3000]),
            (0x42, 0x43, 0xff, 0x8d)
        );
        std::fs::remove_file(p).unwrap();
    }
}
