//! The block backend every disk emulation shares, as bhyve's `block_if.c` serves virtio-blk,
//! AHCI and NVMe alike: a file or block device opened with bhyve's options (`path`, `ro`,
//! `sectorsize`, `nocache`, `direct`, `nodelete`, `ser`), requests executed on guest buffers
//! (through sector-aligned bounce buffers, which O_DIRECT needs), and a pool of I/O threads
//! that runs them off the device's own thread and hands completions back through an eventfd.
//! A disk emulation parses its own request format into an `Op` and the guest buffers it names.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use rhyve_config::{parse_bool, Config};

/// The unit of offsets and lengths in requests.
pub const SECTOR: u64 = 512;
/// Bytes of the serial number a disk reports.
pub const ID_BYTES: usize = 20;
/// The bounce buffer's size at most: a larger transfer moves through it in pieces of this
/// size, so a guest cannot make the I/O threads allocate without bound.
pub const REQUEST_MAX: u64 = 8 << 20;
/// Largest transfer one request may ask for. A driver that did not accept the device's
/// size and segment limits (OVMF's accepts neither) may send one buffer of up to 1 GiB.
pub const TRANSFER_MAX: u64 = 1 << 30;

/// The backend: an open file plus what the options made of it.
pub struct Disk {
    file: File,
    /// Size in bytes (a whole number of sectors).
    size: u64,
    ro: bool,
    /// `nocache`: O_DIRECT, so transfers go through sector-aligned bounce buffers.
    direct: bool,
    logical: u32,
    physical: u32,
    discard: bool,
    serial: [u8; ID_BYTES],
}

fn opt_bool(cfg: &Config, key: &str) -> Result<bool, String> {
    match cfg.get(key).map_err(|e| e.to_string())? {
        None => Ok(false),
        Some(v) => parse_bool(key, &v).map_err(|e| e.to_string()),
    }
}

impl Disk {
    pub fn open(cfg: &Config, prefix: &str) -> Result<Disk, String> {
        let key = |k: &str| format!("{prefix}.{k}");
        let path = cfg
            .get(&key("path"))
            .map_err(|e| e.to_string())?
            .ok_or("needs a backing file: -s SLOT,virtio-blk,PATH[,ro,...]")?;
        let ro = opt_bool(cfg, &key("ro"))?;
        let nocache = opt_bool(cfg, &key("nocache"))?;
        let sync = opt_bool(cfg, &key("direct"))?;
        let nodelete = opt_bool(cfg, &key("nodelete"))?;
        let (logical, physical) = match cfg.get(&key("sectorsize")).map_err(|e| e.to_string())? {
            None => (512u32, 512u32),
            Some(s) => {
                let (l, p) = s.split_once('/').unwrap_or((&s, &s));
                let parse = |v: &str| {
                    v.parse::<u32>()
                        .ok()
                        .filter(|n| n.is_power_of_two() && (512..=4096).contains(n))
                };
                match (parse(l), parse(p)) {
                    (Some(l), Some(p)) if p >= l => (l, p),
                    _ => {
                        return Err(format!(
                            "sectorsize={s}: want logical[/physical], powers of two from 512 to 4096, physical >= logical"
                        ))
                    }
                }
            }
        };
        let mut flags = 0;
        if nocache {
            flags |= libc::O_DIRECT;
        }
        if sync {
            flags |= libc::O_SYNC;
        }
        let mut file = File::options()
            .read(true)
            .write(!ro)
            .custom_flags(flags)
            .open(&path)
            .map_err(|e| format!("cannot open {path}: {e}"))?;
        let meta = file.metadata().map_err(|e| format!("{path}: {e}"))?;
        let is_file = meta.is_file();
        if !is_file && !meta.file_type().is_block_device() {
            return Err(format!(
                "{path} is neither a regular file nor a block device"
            ));
        }
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|e| format!("{path}: {e}"))?;
        if !size.is_multiple_of(u64::from(logical)) {
            log::warn!("{path}: size {size} is not a multiple of the {logical}-byte sector; the tail is not visible");
        }
        // `logical` is a power of two from 512 to 4096 (checked above): a mask rounds down.
        let size = size & !(u64::from(logical).wrapping_sub(1));
        let serial = match cfg.get(&key("ser")).map_err(|e| e.to_string())? {
            Some(s) => s,
            // A stable serial derived from the path, like bhyve's.
            None => {
                let h = path.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
                });
                format!(
                    "RHYVE-{:04X}-{:04X}-{:04X}",
                    (h >> 32) & 0xffff,
                    (h >> 16) & 0xffff,
                    h & 0xffff
                )
            }
        };
        let mut id = [0u8; ID_BYTES];
        for (d, s) in id.iter_mut().zip(serial.bytes()) {
            *d = s;
        }
        Ok(Disk {
            file,
            size,
            ro,
            direct: nocache,
            logical,
            physical,
            discard: !nodelete && !ro && is_file,
            serial: id,
        })
    }

    /// Size in bytes (a whole number of logical sectors).
    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn read_only(&self) -> bool {
        self.ro
    }
    /// `nocache`: O_DIRECT.
    pub fn direct(&self) -> bool {
        self.direct
    }
    /// (logical, physical) sector sizes.
    pub fn sector_sizes(&self) -> (u32, u32) {
        (self.logical, self.physical)
    }
    /// Whether discards reach the file (a writable regular file without `nodelete`).
    pub fn can_discard(&self) -> bool {
        self.discard
    }
    /// The serial number, NUL-padded.
    pub fn serial(&self) -> &[u8; ID_BYTES] {
        &self.serial
    }
}

/// What a request asks of the disk. Offsets and lengths are bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Read into the guest buffers, from `offset`.
    Read { offset: u64 },
    /// Write the guest buffers, at `offset`.
    Write { offset: u64 },
    /// Make every completed write durable.
    Flush,
    /// Let go of the (offset, length) ranges: holes punched in the file.
    Discard(Vec<(u64, u64)>),
    /// Zero the (offset, length) ranges.
    WriteZeroes(Vec<(u64, u64)>),
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockError {
    /// Outside the disk, not whole sectors, larger than `TRANSFER_MAX`, or buffers outside
    /// guest memory.
    Invalid,
    /// A write to a read-only disk.
    ReadOnly,
    /// Not something this disk does (a discard on a block device or with `nodelete`).
    Unsupported,
    /// The host's I/O failed.
    Io,
}

/// A sector-aligned buffer (O_DIRECT needs aligned memory).
struct Bounce {
    ptr: *mut u8,
    len: usize,
    layout: std::alloc::Layout,
}

impl Bounce {
    fn new(len: usize) -> Option<Bounce> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), 4096).ok()?;
        // SAFETY: the layout has non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        (!ptr.is_null()).then_some(Bounce { ptr, len, layout })
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live allocation of `len` (<= layout size) initialised bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// Guest memory as the backend needs it: buffers read and written by guest address (any
/// vm-memory `GuestMemory`, dirty-tracked or not), shared with the I/O threads.
pub trait GuestBuffers: Bytes<GuestAddress> + Clone + Send + Sync + 'static {}
impl<M: Bytes<GuestAddress> + Clone + Send + Sync + 'static> GuestBuffers for M {}

/// Fills `b` from the guest buffers `segs` (`gather`), or spreads `b` over them, starting at
/// `cursor` (segment index, offset in it), which moves past what was copied.
fn copy_segments<M: GuestBuffers>(
    mem: &M,
    segs: &[(GuestAddress, u32)],
    cursor: &mut (usize, u32),
    b: &mut [u8],
    gather: bool,
) -> Result<(), BlockError> {
    let mut done = 0usize;
    while done < b.len() {
        let &(addr, len) = segs.get(cursor.0).ok_or(BlockError::Invalid)?;
        let left = len.saturating_sub(cursor.1) as usize;
        if left == 0 {
            *cursor = (cursor.0.saturating_add(1), 0);
            continue;
        }
        let n = left.min(b.len().saturating_sub(done));
        let part = b
            .get_mut(done..done.saturating_add(n))
            .ok_or(BlockError::Invalid)?;
        let at = addr
            .checked_add(u64::from(cursor.1))
            .ok_or(BlockError::Invalid)?;
        if gather {
            mem.read_slice(part, at)
        } else {
            mem.write_slice(part, at)
        }
        .map_err(|_| BlockError::Invalid)?;
        done = done.saturating_add(n);
        // n <= left = len - offset, so this stays within the segment.
        cursor.1 = cursor.1.saturating_add(n as u32);
    }
    Ok(())
}

/// Executes `op` on the guest buffers `segs` (in order); returns the bytes written into guest
/// memory. Every range is checked against the disk before anything is done. A transfer larger
/// than the bounce buffer moves in pieces: a write whose later buffer lies outside guest
/// memory fails after its earlier pieces reached the disk (the guest is told it failed).
pub fn execute<M: GuestBuffers>(
    disk: &Disk,
    mem: &M,
    op: &Op,
    segs: &[(GuestAddress, u32)],
) -> Result<u32, BlockError> {
    match op {
        Op::Read { offset } | Op::Write { offset } => {
            let write = matches!(op, Op::Write { .. });
            let total = segs
                .iter()
                .try_fold(0u64, |acc, s| acc.checked_add(u64::from(s.1)))
                .ok_or(BlockError::Invalid)?;
            let in_disk = offset
                .checked_add(total)
                .is_some_and(|end| end <= disk.size);
            if !in_disk || !total.is_multiple_of(SECTOR) || total > TRANSFER_MAX {
                return Err(BlockError::Invalid);
            }
            if write && disk.ro {
                return Err(BlockError::ReadOnly);
            }
            // At most TRANSFER_MAX (checked above), which fits both.
            let done = u32::try_from(total).map_err(|_| BlockError::Invalid)?;
            let chunk = usize::try_from(total.min(REQUEST_MAX)).map_err(|_| BlockError::Invalid)?;
            let mut buf = Bounce::new(chunk).ok_or(BlockError::Io)?;
            // Where the next chunk starts in the guest's buffers: segment index, offset in it.
            let mut cursor = (0usize, 0u32);
            let mut at = 0u64;
            while at < total {
                let n = total.saturating_sub(at).min(REQUEST_MAX) as usize;
                let b = buf.as_mut().get_mut(..n).ok_or(BlockError::Invalid)?;
                let pos = offset.checked_add(at).ok_or(BlockError::Invalid)?;
                if write {
                    copy_segments(mem, segs, &mut cursor, b, true)?;
                    disk.file.write_all_at(b, pos).map_err(|_| BlockError::Io)?;
                } else {
                    disk.file
                        .read_exact_at(b, pos)
                        .map_err(|_| BlockError::Io)?;
                    copy_segments(mem, segs, &mut cursor, b, false)?;
                }
                at = at.saturating_add(n as u64);
            }
            Ok(if write { 0 } else { done })
        }
        // The guest was told the data is durable: it must reach the disk.
        Op::Flush => disk
            .file
            .sync_data()
            .map(|()| 0)
            .map_err(|_| BlockError::Io),
        Op::Discard(ranges) | Op::WriteZeroes(ranges) => {
            let discard = matches!(op, Op::Discard(_));
            if disk.ro || (discard && !disk.discard) {
                return Err(BlockError::Unsupported);
            }
            let fits = |&(o, l): &(u64, u64)| o.checked_add(l).is_some_and(|e| e <= disk.size);
            if !ranges.iter().all(fits) {
                return Err(BlockError::Invalid);
            }
            let mode = if discard {
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            } else {
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            };
            for &(o, l) in ranges {
                if fallocate(&disk.file, mode, o, l) {
                    continue;
                }
                if discard {
                    return Err(BlockError::Unsupported);
                }
                // No ZERO_RANGE here (a block device): write zeros. Every range was checked to
                // end inside the disk, so nothing below can overflow.
                let zeros = vec![0u8; 64 << 10];
                let end = o.saturating_add(l);
                let mut at = o;
                while at < end {
                    let left = end.saturating_sub(at);
                    let n = usize::try_from(left.min(zeros.len() as u64)).unwrap_or(0);
                    let chunk = zeros.get(..n).unwrap_or_default();
                    disk.file
                        .write_all_at(chunk, at)
                        .map_err(|_| BlockError::Io)?;
                    at = at.saturating_add(n as u64);
                }
            }
            Ok(0)
        }
    }
}

fn fallocate(file: &File, mode: i32, off: u64, len: u64) -> bool {
    let (Ok(off), Ok(len)) = (i64::try_from(off), i64::try_from(len)) else {
        return false;
    };
    // SAFETY: fallocate on an open descriptor with plain integer arguments.
    unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) == 0 }
}

struct Job<T> {
    op: Op,
    segs: Vec<(GuestAddress, u32)>,
    tag: T,
}

/// A finished request: the tag it was submitted with and its result.
pub type Done<T> = (T, Result<u32, BlockError>);

/// I/O threads executing requests for one disk. A request is submitted with a tag (the
/// emulation's own reference to it: a descriptor head, a command slot); its completion comes
/// back with the tag through `take_done`, and `done_fd` becomes readable.
pub struct Pool<T> {
    jobs: Option<Sender<Job<T>>>,
    threads: Vec<JoinHandle<()>>,
    done: Arc<Mutex<Vec<Done<T>>>>,
    done_evt: EventFd,
    inflight: Arc<AtomicUsize>,
}

impl<T: Send + 'static> Pool<T> {
    /// Starts `n` threads named `NAME ioN` for `disk`, serving guest memory `mem`.
    pub fn start<M: GuestBuffers>(
        name: &str,
        disk: Arc<Disk>,
        mem: &M,
        n: usize,
    ) -> std::io::Result<Self> {
        let (tx, rx) = channel::<Job<T>>();
        let rx = Arc::new(Mutex::new(rx));
        let done: Arc<Mutex<Vec<Done<T>>>> = Arc::new(Mutex::new(Vec::new()));
        let done_evt = EventFd::new(libc::EFD_NONBLOCK)?;
        let inflight = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let rx: Arc<Mutex<Receiver<Job<T>>>> = rx.clone();
            let (disk, mem, done) = (disk.clone(), mem.clone(), done.clone());
            let inflight = inflight.clone();
            let evt = done_evt.try_clone()?;
            let h = rhyve_base::thread::spawn(
                rhyve_base::thread::Role::BlockIo,
                format!("{name} io{i}"),
                move || loop {
                    let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok(j) = job else { return };
                    let result = execute(&disk, &mem, &j.op, &j.segs);
                    done.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((j.tag, result));
                    inflight.fetch_sub(1, Ordering::SeqCst);
                    let _ = evt.write(1);
                },
            )?;
            threads.push(h);
        }
        Ok(Pool {
            jobs: Some(tx),
            threads,
            done,
            done_evt,
            inflight,
        })
    }

    /// Hands a request to the pool; false if the pool has stopped.
    pub fn submit(&self, op: Op, segs: Vec<(GuestAddress, u32)>, tag: T) -> bool {
        let Some(jobs) = &self.jobs else {
            return false;
        };
        self.inflight.fetch_add(1, Ordering::SeqCst);
        if jobs.send(Job { op, segs, tag }).is_err() {
            self.inflight.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Completions since the last call (and the eventfd's count cleared).
    pub fn take_done(&self) -> Vec<Done<T>> {
        let _ = self.done_evt.read();
        std::mem::take(&mut *self.done.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Readable when completions are waiting.
    pub fn done_fd(&self) -> RawFd {
        self.done_evt.as_raw_fd()
    }

    /// Requests submitted and not yet finished.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::SeqCst)
    }

    /// Waits until nothing is in flight; false if that takes longer than `timeout`.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let start = Instant::now();
        while self.inflight() > 0 {
            if start.elapsed() >= timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }
}

/// Closing the job channel ends the threads once their requests finish.
impl<T> Drop for Pool<T> {
    fn drop(&mut self) {
        self.jobs = None;
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn disk(tag: &str, opts: &[(&str, &str)]) -> (Arc<Disk>, std::path::PathBuf) {
        let p = std::env::temp_dir().join(format!("rhyve-block-{tag}-{}", std::process::id()));
        std::fs::write(&p, vec![0u8; 64 << 10]).unwrap();
        let mut c = Config::new();
        c.set("d.path", p.to_str().unwrap()).unwrap();
        for (k, v) in opts {
            c.set(&format!("d.{k}"), v).unwrap();
        }
        (Arc::new(Disk::open(&c, "d").unwrap()), p)
    }

    fn wait_done<T: Send + 'static>(pool: &Pool<T>, n: usize) -> Vec<Done<T>> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut got = Vec::new();
        while got.len() < n {
            assert!(Instant::now() < deadline, "the pool did not finish");
            got.extend(pool.take_done());
            std::thread::sleep(Duration::from_millis(1));
        }
        got
    }

    #[test]
    fn a_transfer_larger_than_the_bounce_buffer_moves_in_pieces_across_uneven_segments() {
        let p = std::env::temp_dir().join(format!("rhyve-block-big-{}", std::process::id()));
        let size = 3 * REQUEST_MAX as usize;
        let data: Vec<u8> = (0..size).map(|i| (i / 512 % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let mut c = Config::new();
        c.set("d.path", p.to_str().unwrap()).unwrap();
        let d = Disk::open(&c, "d").unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        // 20.5 MiB in three segments whose edges fall inside the 8 MiB pieces.
        let total = 20 * (1 << 20) + 512;
        let segs = vec![
            (GuestAddress(0x10_0000), 5 * (1 << 20)),
            (GuestAddress(0x100_0000), 13 * (1 << 20) + 512),
            (GuestAddress(0x200_0000), 2 * (1 << 20)),
        ];
        let n = execute(&d, &mem, &Op::Read { offset: 512 }, &segs).unwrap();
        assert_eq!(n as usize, total);
        let mut at = 512usize;
        for &(addr, len) in &segs {
            let mut got = vec![0u8; len as usize];
            mem.read_slice(&mut got, addr).unwrap();
            assert!(
                got == data[at..at + len as usize],
                "segment at {addr:?} differs"
            );
            at += len as usize;
        }
        // Written back one sector further on: the file holds the same bytes shifted.
        assert_eq!(execute(&d, &mem, &Op::Write { offset: 1024 }, &segs), Ok(0));
        let back = std::fs::read(&p).unwrap();
        assert!(back[1024..1024 + total] == data[512..512 + total]);
        std::fs::remove_file(&p).unwrap();
        // Over TRANSFER_MAX, inside a (sparse) disk larger than that: only the cap refuses it.
        std::fs::File::create(&p)
            .unwrap()
            .set_len(4 * TRANSFER_MAX)
            .unwrap();
        let d = Disk::open(&c, "d").unwrap();
        let too_big = vec![(GuestAddress(0), (TRANSFER_MAX + SECTOR) as u32)];
        assert_eq!(
            execute(&d, &mem, &Op::Read { offset: 0 }, &too_big),
            Err(BlockError::Invalid)
        );
        let below_cap = vec![(GuestAddress(0), (64 << 20) as u32)];
        assert!(
            execute(&d, &mem, &Op::Read { offset: 0 }, &below_cap).is_ok(),
            "the same disk serves a large read below the cap"
        );
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn the_pool_runs_requests_on_guest_buffers_and_hands_back_tagged_results() {
        let (d, p) = disk("pool", &[]);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        mem.write_slice(&[0xab; 1024], GuestAddress(0x1000))
            .unwrap();
        let pool: Pool<u32> = Pool::start("test", d.clone(), &mem, 2).unwrap();
        // Two segments written at sector 4, then read back into another buffer.
        let segs = vec![(GuestAddress(0x1000), 512), (GuestAddress(0x1200), 512)];
        assert!(pool.submit(Op::Write { offset: 2048 }, segs, 7));
        assert_eq!(wait_done(&pool, 1), vec![(7, Ok(0))]);
        assert!(pool.submit(
            Op::Read { offset: 2048 },
            vec![(GuestAddress(0x8000), 1024)],
            8
        ));
        assert!(pool.submit(Op::Flush, Vec::new(), 9));
        let mut done = wait_done(&pool, 2);
        done.sort_by_key(|d| d.0);
        assert_eq!(done, vec![(8, Ok(1024)), (9, Ok(0))]);
        let mut back = [0u8; 1024];
        mem.read_slice(&mut back, GuestAddress(0x8000)).unwrap();
        assert_eq!(back, [0xab; 1024]);
        assert!(pool.wait_idle(Duration::from_secs(5)));
        assert_eq!(pool.inflight(), 0);
        // Refused before any I/O: past the end, not whole sectors, a buffer outside guest
        // memory, a range that wraps.
        let bad = [
            (Op::Read { offset: 64 << 10 }, vec![(GuestAddress(0), 512)]),
            (Op::Write { offset: 0 }, vec![(GuestAddress(0), 100)]),
            (
                Op::Read { offset: 0 },
                vec![(GuestAddress(0xfff_0000), 512)],
            ),
            (
                Op::Read {
                    offset: u64::MAX - 100,
                },
                vec![(GuestAddress(0), 512)],
            ),
            (Op::WriteZeroes(vec![(u64::MAX, 2)]), Vec::new()),
        ];
        for (i, (op, segs)) in bad.into_iter().enumerate() {
            assert_eq!(
                execute(&d, &mem, &op, &segs),
                Err(BlockError::Invalid),
                "case {i}"
            );
        }
        drop(pool);
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn read_only_disks_refuse_writes_discards_and_zeroes() {
        let (d, p) = disk("ro", &[("ro", "true")]);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let segs = [(GuestAddress(0), 512)];
        assert_eq!(
            execute(&d, &mem, &Op::Write { offset: 0 }, &segs),
            Err(BlockError::ReadOnly)
        );
        assert_eq!(
            execute(&d, &mem, &Op::Discard(vec![(0, 512)]), &[]),
            Err(BlockError::Unsupported)
        );
        assert_eq!(
            execute(&d, &mem, &Op::WriteZeroes(vec![(0, 512)]), &[]),
            Err(BlockError::Unsupported)
        );
        assert_eq!(execute(&d, &mem, &Op::Read { offset: 0 }, &segs), Ok(512));
        let _ = std::fs::remove_file(p);
    }
}
