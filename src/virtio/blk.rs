//! virtio-blk: a disk backed by a host file or block device (virtio 1.2 §5.2; bhyve
//! `pci_virtio_block.c` and `block_if.c` options: path, ro, sectorsize, nocache, direct,
//! nodelete, ser). The device's worker pops requests and hands them to a pool of I/O threads,
//! so several are in flight; completions come back to the worker, which owns the queue.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::pci::rate_limited;
use super::{drain, ActiveQueue, VirtioDevice, VirtioIrq, Worker};
use crate::config::{parse_bool, Config};

const QUEUE_SIZE: u16 = 256;
const SECTOR: u64 = 512;
/// Pool size: requests that can be in flight at once.
const IO_THREADS: usize = 4;
/// Largest data segment accepted, and segments per request.
const SIZE_MAX: u32 = 1 << 20;
const SEG_MAX: u32 = 126;
/// Largest transfer one request may ask for: the bounce buffer is this big at most, so a
/// guest cannot make the I/O threads allocate without bound.
const REQUEST_MAX: u64 = 8 << 20;

const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_TOPOLOGY: u64 = 1 << 10;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const ID_BYTES: usize = 20;
const CONFIG_LEN: usize = 60;

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
        let size = size / u64::from(logical) * u64::from(logical);
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

    fn features(&self) -> u64 {
        let mut f = F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_TOPOLOGY;
        if self.ro {
            f |= F_RO;
        } else {
            f |= F_WRITE_ZEROES;
            if self.discard {
                f |= F_DISCARD;
            }
        }
        f
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..8].copy_from_slice(&(self.size / SECTOR).to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&self.logical.to_le_bytes());
        c[24] = (self.physical / self.logical).trailing_zeros() as u8;
        c[26..28].copy_from_slice(&1u16.to_le_bytes());
        c[34..36].copy_from_slice(&1u16.to_le_bytes());
        let max_sectors = (u32::MAX / SECTOR as u32).to_le_bytes();
        c[36..40].copy_from_slice(&max_sectors);
        c[40..44].copy_from_slice(&1u32.to_le_bytes());
        c[44..48].copy_from_slice(&(self.logical / SECTOR as u32).to_le_bytes());
        c[48..52].copy_from_slice(&max_sectors);
        c[52..56].copy_from_slice(&1u32.to_le_bytes());
        c[56] = u8::from(self.discard);
        c
    }
}

/// A parsed request, ready for an I/O thread.
struct Request {
    head: u16,
    kind: u32,
    sector: u64,
    /// Data segments in guest memory, in order.
    segs: Vec<(GuestAddress, u32)>,
    status: GuestAddress,
}

/// A finished request: what goes in the used ring.
struct Done {
    head: u16,
    status: GuestAddress,
    status_code: u8,
    /// Bytes written into guest buffers (including the status byte).
    len: u32,
}

/// Splits a chain into header, data segments and status; None for a malformed chain.
fn parse(chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> Option<Request> {
    let head = chain.head_index();
    let descs: Vec<_> = chain.collect();
    let (first, rest) = descs.split_first()?;
    let (last, data) = rest.split_last()?;
    if first.is_write_only() || first.len() < 16 || !last.is_write_only() || last.len() < 1 {
        return None;
    }
    let kind: u32 = mem.read_obj(first.addr()).ok()?;
    let sector: u64 = mem.read_obj(first.addr().checked_add(8)?).ok()?;
    let writes_guest = kind == T_IN || kind == T_GET_ID;
    let mut segs = Vec::with_capacity(data.len());
    for d in data {
        // Data direction must match the request type; sizes are bounded.
        if d.is_write_only() != writes_guest || d.len() > SIZE_MAX {
            return None;
        }
        segs.push((d.addr(), d.len()));
    }
    if segs.len() > SEG_MAX as usize {
        return None;
    }
    // The status byte is the last byte of the last descriptor.
    let status = last.addr().checked_add(u64::from(last.len()) - 1)?;
    Some(Request {
        head,
        kind,
        sector,
        segs,
        status,
    })
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

fn fallocate(file: &File, mode: i32, off: u64, len: u64) -> bool {
    // SAFETY: fallocate on an open descriptor with plain integer arguments.
    unsafe { libc::fallocate(file.as_raw_fd(), mode, off as i64, len as i64) == 0 }
}

/// Ranges a DISCARD or WRITE_ZEROES request may carry (the config space says one).
const RANGES_MAX: usize = 1;
/// `virtio_blk_discard_write_zeroes.flags`: the only flag, and only for WRITE_ZEROES.
const WZ_FLAG_UNMAP: u32 = 1;

/// The byte ranges of a DISCARD or WRITE_ZEROES request, all checked against the disk before
/// any is acted on: its data is whole 16-byte {sector u64, num_sectors u32, flags u32}
/// entries, at most RANGES_MAX of them, each inside the disk. Err is the status to answer.
fn ranges(
    mem: &GuestMemoryMmap,
    segs: &[(GuestAddress, u32)],
    kind: u32,
    disk_size: u64,
) -> Result<Vec<(u64, u64)>, u8> {
    const ENTRY: usize = 16;
    let total = segs
        .iter()
        .try_fold(0usize, |acc, s| acc.checked_add(s.1 as usize))
        .ok_or(S_IOERR)?;
    if total == 0 || total % ENTRY != 0 || total / ENTRY > RANGES_MAX {
        return Err(S_IOERR);
    }
    let mut data = vec![0u8; total];
    let mut at = 0usize;
    for (addr, len) in segs {
        let end = at.checked_add(*len as usize).ok_or(S_IOERR)?;
        let dst = data.get_mut(at..end).ok_or(S_IOERR)?;
        mem.read_slice(dst, *addr).map_err(|_| S_IOERR)?;
        at = end;
    }
    let allowed = if kind == T_WRITE_ZEROES {
        WZ_FLAG_UNMAP
    } else {
        0
    };
    data.chunks_exact(ENTRY)
        .map(|e| {
            let field = |r: std::ops::Range<usize>| e.get(r).ok_or(S_IOERR);
            let sector = u64::from_le_bytes(field(0..8)?.try_into().map_err(|_| S_IOERR)?);
            let count = u32::from_le_bytes(field(8..12)?.try_into().map_err(|_| S_IOERR)?);
            let flags = u32::from_le_bytes(field(12..16)?.try_into().map_err(|_| S_IOERR)?);
            if flags & !allowed != 0 {
                return Err(S_UNSUPP);
            }
            let off = sector.checked_mul(SECTOR).ok_or(S_IOERR)?;
            let len = u64::from(count).checked_mul(SECTOR).ok_or(S_IOERR)?;
            match off.checked_add(len) {
                Some(end) if end <= disk_size => Ok((off, len)),
                _ => Err(S_IOERR),
            }
        })
        .collect()
}

/// Executes one request against the disk; returns (status, bytes written to the guest).
fn execute(disk: &Disk, mem: &GuestMemoryMmap, r: &Request) -> (u8, u32) {
    let total: u64 = r.segs.iter().map(|s| u64::from(s.1)).sum();
    let off = r.sector.checked_mul(SECTOR);
    let in_range = |len: u64| {
        off.and_then(|o| o.checked_add(len))
            .is_some_and(|end| end <= disk.size)
    };
    match r.kind {
        T_IN | T_OUT => {
            if !in_range(total) || !total.is_multiple_of(SECTOR) || total > REQUEST_MAX {
                return (S_IOERR, 0);
            }
            if r.kind == T_OUT && disk.ro {
                return (S_IOERR, 0);
            }
            let Some(mut buf) = Bounce::new(total as usize) else {
                return (S_IOERR, 0);
            };
            let b = buf.as_mut();
            let base = off.unwrap_or(0);
            if r.kind == T_IN {
                if disk.file.read_exact_at(b, base).is_err() {
                    return (S_IOERR, 0);
                }
                let mut at = 0usize;
                for (addr, len) in &r.segs {
                    let l = *len as usize;
                    if mem.write_slice(&b[at..at + l], *addr).is_err() {
                        return (S_IOERR, 0);
                    }
                    at += l;
                }
                (S_OK, total as u32)
            } else {
                let mut at = 0usize;
                for (addr, len) in &r.segs {
                    let l = *len as usize;
                    if mem.read_slice(&mut b[at..at + l], *addr).is_err() {
                        return (S_IOERR, 0);
                    }
                    at += l;
                }
                match disk.file.write_all_at(b, base) {
                    Ok(()) => (S_OK, 0),
                    Err(_) => (S_IOERR, 0),
                }
            }
        }
        // The guest was told the data is durable: it must reach the disk.
        T_FLUSH => match disk.file.sync_data() {
            Ok(()) => (S_OK, 0),
            Err(_) => (S_IOERR, 0),
        },
        T_GET_ID => {
            let mut left = ID_BYTES;
            let mut n = 0u32;
            for (addr, len) in &r.segs {
                let l = (*len as usize).min(left);
                if mem
                    .write_slice(&disk.serial[ID_BYTES - left..ID_BYTES - left + l], *addr)
                    .is_err()
                {
                    return (S_IOERR, n);
                }
                left -= l;
                n += l as u32;
            }
            (S_OK, n)
        }
        T_DISCARD | T_WRITE_ZEROES => {
            if disk.ro || (r.kind == T_DISCARD && !disk.discard) {
                return (S_UNSUPP, 0);
            }
            let ranges = match ranges(mem, &r.segs, r.kind, disk.size) {
                Ok(v) => v,
                Err(status) => return (status, 0),
            };
            let mode = if r.kind == T_DISCARD {
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            } else {
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            };
            for (o, l) in ranges {
                if fallocate(&disk.file, mode, o, l) {
                    continue;
                }
                if r.kind == T_DISCARD {
                    return (S_UNSUPP, 0);
                }
                // No ZERO_RANGE here (a block device): write zeros. `ranges` checked that
                // o + l is within the disk, so nothing below can overflow.
                let zeros = vec![0u8; 64 << 10];
                let mut at = o;
                while at < o + l {
                    let n = (o + l - at).min(zeros.len() as u64) as usize;
                    if disk.file.write_all_at(&zeros[..n], at).is_err() {
                        return (S_IOERR, 0);
                    }
                    at += n as u64;
                }
            }
            (S_OK, 0)
        }
        _ => (S_UNSUPP, 0),
    }
}

/// Requests served and queue notifications received, for the benchmark's notify ratio.
#[derive(Default)]
pub struct BlkStats {
    pub requests: AtomicU64,
    pub notifies: AtomicU64,
}

pub struct Blk {
    disk: Arc<Disk>,
    stats: Arc<BlkStats>,
    /// Requests handed to the pool and not yet finished.
    inflight: Arc<AtomicUsize>,
    worker: Option<Worker>,
    pool: Vec<JoinHandle<()>>,
    jobs: Option<Sender<Request>>,
}

impl Blk {
    pub fn new(cfg: &Config, prefix: &str) -> Result<Self, String> {
        let disk = Disk::open(cfg, prefix)?;
        if disk.direct {
            log::info!("virtio-blk: nocache: O_DIRECT with aligned bounce buffers");
        }
        Ok(Blk {
            disk: Arc::new(disk),
            stats: Arc::new(BlkStats::default()),
            inflight: Arc::new(AtomicUsize::new(0)),
            worker: None,
            pool: Vec::new(),
            jobs: None,
        })
    }

    fn start_pool(
        &mut self,
        mem: &GuestMemoryMmap,
        done: Arc<Mutex<Vec<Done>>>,
        done_evt: &EventFd,
    ) -> Result<Sender<Request>, String> {
        let (tx, rx) = channel::<Request>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..IO_THREADS {
            let rx: Arc<Mutex<Receiver<Request>>> = rx.clone();
            let (disk, mem, done) = (self.disk.clone(), mem.clone(), done.clone());
            let inflight = self.inflight.clone();
            let evt = done_evt.try_clone().map_err(|e| e.to_string())?;
            let h = crate::thread::spawn(
                crate::thread::Role::BlockIo,
                format!("virtio-blk io{i}"),
                move || loop {
                    let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok(r) = job else { return };
                    let (status_code, len) = execute(&disk, &mem, &r);
                    done.lock().unwrap_or_else(|p| p.into_inner()).push(Done {
                        head: r.head,
                        status: r.status,
                        status_code,
                        len,
                    });
                    inflight.fetch_sub(1, Ordering::SeqCst);
                    let _ = evt.write(1);
                },
            )
            .map_err(|e| e.to_string())?;
            self.pool.push(h);
        }
        Ok(tx)
    }
}

impl VirtioDevice for Blk {
    fn name(&self) -> &'static str {
        "virtio-blk"
    }
    fn device_type(&self) -> u16 {
        2
    }
    fn pci_class(&self) -> (u8, u8) {
        (0x01, 0x80)
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        self.disk.features()
    }
    fn config_len(&self) -> usize {
        CONFIG_LEN
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_window(&self.disk.config(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _acked: u64,
        mut queues: Vec<ActiveQueue>,
        irq: Arc<VirtioIrq>,
    ) -> Result<(), String> {
        let Some(mut q) = queues.pop() else {
            return Err("virtio-blk: the driver enabled no queue".into());
        };
        let done = Arc::new(Mutex::new(Vec::new()));
        let done_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
        let jobs = self.start_pool(&mem, done.clone(), &done_evt)?;
        self.jobs = Some(jobs.clone());
        let fds = vec![q.notify.as_raw_fd(), done_evt.as_raw_fd()];
        let bad = AtomicU64::new(0);
        let stats = self.stats.clone();
        let inflight = self.inflight.clone();
        let fail = irq.clone();
        self.worker = Some(Worker::spawn(
            "virtio-blk".into(),
            fds,
            fail,
            move |token| {
                let mut used_any = false;
                if token == 0 {
                    stats
                        .notifies
                        .fetch_add(drain(&q.notify), Ordering::Relaxed);
                    let mut alive = true;
                    q.serve_all(&mem, |queue, chain| {
                        let head = chain.head_index();
                        stats.requests.fetch_add(1, Ordering::Relaxed);
                        match parse(chain, &mem) {
                            Some(r) => {
                                inflight.fetch_add(1, Ordering::SeqCst);
                                if jobs.send(r).is_err() {
                                    alive = false;
                                    return false;
                                }
                            }
                            None => {
                                if rate_limited(&bad) {
                                    log::warn!(
                                        "virtio-blk: malformed request (descriptor {head}) failed"
                                    );
                                }
                                // No usable status byte: complete it empty.
                                let _ = queue.add_used(&mem, head, 0);
                                used_any = true;
                            }
                        }
                        true
                    });
                    if !alive {
                        return false;
                    }
                } else {
                    drain(&done_evt);
                    let finished =
                        std::mem::take(&mut *done.lock().unwrap_or_else(|p| p.into_inner()));
                    for d in finished {
                        let _ = mem.write_obj(d.status_code, d.status);
                        let _ = q.queue.add_used(&mem, d.head, d.len + 1);
                        used_any = true;
                    }
                }
                if used_any && q.queue.needs_notification(&mem).unwrap_or(true) {
                    irq.signal_queue(q.index);
                }
                true
            },
        )?);
        Ok(())
    }

    /// Parks the worker (no new requests), then waits for the pool to finish what it has.
    fn pause(&mut self) {
        if let Some(w) = &self.worker {
            w.pause();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while self.inflight.load(Ordering::SeqCst) > 0 {
            if std::time::Instant::now() >= deadline {
                log::warn!("virtio-blk: requests still in flight after 5 s of pausing");
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    fn worker_slot(&mut self) -> &mut Option<Worker> {
        &mut self.worker
    }

    fn reset(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.stop();
            let (r, n) = (
                self.stats.requests.swap(0, Ordering::Relaxed),
                self.stats.notifies.swap(0, Ordering::Relaxed),
            );
            log::info!(
                "virtio-blk: {r} requests, {n} queue notifications ({:.3} per request)",
                n as f64 / r.max(1) as f64
            );
        }
        // Closing the job channel ends the pool threads once in-flight requests finish.
        self.jobs = None;
        for h in self.pool.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as Desc, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn disk(tag: &str, ro: bool) -> (Disk, std::path::PathBuf) {
        let p = std::env::temp_dir().join(format!("rhyve-blk-{tag}-{}.img", std::process::id()));
        std::fs::write(&p, vec![0x5au8; 64 << 10]).unwrap();
        let mut c = Config::new();
        c.set("pci.0.4.0.path", p.to_str().unwrap()).unwrap();
        if ro {
            c.set("pci.0.4.0.ro", "true").unwrap();
        }
        (Disk::open(&c, "pci.0.4.0").unwrap(), p)
    }

    /// Puts `descs` in the table as one chain at index 0 and makes it available.
    fn chain(m: &GuestMemoryMmap, descs: &[(u64, u32, u16)]) -> Queue {
        let vq = MockSplitQueue::create(m, GuestAddress(0x8000), 16);
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let next = if flags & NEXT != 0 { i as u16 + 1 } else { 0 };
            let d = RawDescriptor::from(Desc::new(addr, len, flags, next));
            vq.desc_table().store(i as u16, d).unwrap();
        }
        vq.avail().ring().ref_at(0).unwrap().store(0);
        vq.avail().idx().store(1);
        vq.create_queue().unwrap()
    }

    fn header(m: &GuestMemoryMmap, kind: u32, sector: u64) {
        m.write_obj(kind, GuestAddress(0x1000)).unwrap();
        m.write_obj(0u32, GuestAddress(0x1004)).unwrap();
        m.write_obj(sector, GuestAddress(0x1008)).unwrap();
    }

    fn run(m: &GuestMemoryMmap, d: &Disk, descs: &[(u64, u32, u16)]) -> Option<(u8, u32)> {
        let mut q = chain(m, descs);
        let c = q.pop_descriptor_chain(m)?;
        let r = parse(c, m)?;
        Some(execute(d, m, &r))
    }

    #[test]
    fn write_then_read_round_trips_and_flush_syncs() {
        let m = mem();
        let (d, path) = disk("rw", false);
        m.write_slice(&[7u8; 1024], GuestAddress(0x2000)).unwrap();
        header(&m, T_OUT, 3);
        let descs = [(0x1000, 16, NEXT), (0x2000, 1024, NEXT), (0x3000, 1, WRITE)];
        assert_eq!(run(&m, &d, &descs), Some((S_OK, 0)));
        header(&m, T_IN, 3);
        let descs = [
            (0x1000, 16, NEXT),
            (0x4000, 512, NEXT | WRITE),
            (0x4200, 512, NEXT | WRITE),
            (0x3000, 1, WRITE),
        ];
        assert_eq!(run(&m, &d, &descs), Some((S_OK, 1024)));
        let mut back = [0u8; 1024];
        m.read_slice(&mut back, GuestAddress(0x4000)).unwrap();
        assert_eq!(back, [7u8; 1024]);
        header(&m, T_FLUSH, 0);
        assert_eq!(
            run(&m, &d, &[(0x1000, 16, NEXT), (0x3000, 1, WRITE)]),
            Some((S_OK, 0))
        );
        let file = std::fs::read(&path).unwrap();
        assert_eq!(&file[3 * 512..5 * 512], &[7u8; 1024][..]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn hostile_requests_fail_cleanly() {
        let m = mem();
        let (d, path) = disk("hostile", false);
        header(&m, T_IN, 0);
        // Header the device would write: malformed.
        assert_eq!(
            run(&m, &d, &[(0x1000, 16, NEXT | WRITE), (0x3000, 1, WRITE)]),
            None
        );
        // No status descriptor.
        assert_eq!(run(&m, &d, &[(0x1000, 16, 0)]), None);
        // Status descriptor the device may not write.
        assert_eq!(run(&m, &d, &[(0x1000, 16, NEXT), (0x3000, 1, 0)]), None);
        // Data in the wrong direction for a read.
        assert_eq!(
            run(
                &m,
                &d,
                &[(0x1000, 16, NEXT), (0x4000, 512, NEXT), (0x3000, 1, WRITE)]
            ),
            None
        );
        // A data buffer outside guest memory: IOERR, nothing touched.
        let outside = [
            (0x1000, 16, NEXT),
            (0xfff_0000, 512, NEXT | WRITE),
            (0x3000, 1, WRITE),
        ];
        assert_eq!(run(&m, &d, &outside), Some((S_IOERR, 0)));
        // Sector numbers that overflow or run past the end.
        header(&m, T_IN, u64::MAX);
        let read = [
            (0x1000, 16, NEXT),
            (0x4000, 512, NEXT | WRITE),
            (0x3000, 1, WRITE),
        ];
        assert_eq!(run(&m, &d, &read), Some((S_IOERR, 0)));
        header(&m, T_IN, 128);
        assert_eq!(
            run(&m, &d, &read),
            Some((S_IOERR, 0)),
            "one past the 64 KiB disk"
        );
        // A transfer that is not whole sectors.
        header(&m, T_IN, 0);
        let partial = [
            (0x1000, 16, NEXT),
            (0x4000, 100, NEXT | WRITE),
            (0x3000, 1, WRITE),
        ];
        assert_eq!(run(&m, &d, &partial), Some((S_IOERR, 0)));
        // More than REQUEST_MAX in one request: refused before any buffer is allocated. Nine
        // 1 MiB segments over the same (valid) guest memory: only the size cap can fail it.
        let (disk_big, big_path) = {
            let p = std::env::temp_dir().join(format!("rhyve-blk-big-{}.img", std::process::id()));
            std::fs::File::create(&p)
                .unwrap()
                .set_len(64 << 20)
                .unwrap();
            let mut c = Config::new();
            c.set("pci.0.4.0.path", p.to_str().unwrap()).unwrap();
            (Disk::open(&c, "pci.0.4.0").unwrap(), p)
        };
        let mut big = vec![(0x1000u64, 16u32, NEXT)];
        for _ in 0..9 {
            big.push((0, 1 << 20, NEXT | WRITE));
        }
        big.push((0x3000, 1, WRITE));
        header(&m, T_IN, 0);
        assert_eq!(run(&m, &disk_big, &big), Some((S_IOERR, 0)));
        std::fs::remove_file(big_path).unwrap();
        // An unknown request type.
        header(&m, 99, 0);
        assert_eq!(
            run(&m, &d, &[(0x1000, 16, NEXT), (0x3000, 1, WRITE)]),
            Some((S_UNSUPP, 0))
        );
        // A descriptor that chains to itself: iteration stops at the queue size and the
        // request is rejected (its last descriptor is not a writable status byte).
        header(&m, T_IN, 0);
        let vq = MockSplitQueue::create(&m, GuestAddress(0x8000), 16);
        let looped = RawDescriptor::from(Desc::new(0x1000, 16, NEXT, 0));
        vq.desc_table().store(0, looped).unwrap();
        vq.avail().ring().ref_at(0).unwrap().store(0);
        vq.avail().idx().store(1);
        let mut q: Queue = vq.create_queue().unwrap();
        let c = q
            .pop_descriptor_chain(&m)
            .expect("the looping chain is offered");
        assert!(parse(c, &m).is_none());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn read_only_disks_refuse_writes() {
        let m = mem();
        let (d, path) = disk("ro", true);
        assert_ne!(d.features() & F_RO, 0);
        header(&m, T_OUT, 0);
        let w = [(0x1000, 16, NEXT), (0x2000, 512, NEXT), (0x3000, 1, WRITE)];
        assert_eq!(run(&m, &d, &w), Some((S_IOERR, 0)));
        header(&m, T_WRITE_ZEROES, 0);
        assert_eq!(
            run(
                &m,
                &d,
                &[(0x1000, 16, NEXT), (0x2000, 16, NEXT), (0x3000, 1, WRITE)]
            ),
            Some((S_UNSUPP, 0))
        );
        assert!(std::fs::read(&path).unwrap().iter().all(|b| *b == 0x5a));
        std::fs::remove_file(path).unwrap();
    }
    /// One {sector, num_sectors, flags} entry at 0x2000.
    fn range(m: &GuestMemoryMmap, sector: u64, count: u32, flags: u32) {
        m.write_obj(sector, GuestAddress(0x2000)).unwrap();
        m.write_obj(count, GuestAddress(0x2008)).unwrap();
        m.write_obj(flags, GuestAddress(0x200c)).unwrap();
    }

    #[test]
    fn discard_and_write_zeroes_reach_the_file_and_hostile_ranges_fail_with_nothing_changed() {
        let m = mem();
        let (d, path) = disk("dwz", false);
        let ok = [(0x1000, 16, NEXT), (0x2000, 16, NEXT), (0x3000, 1, WRITE)];
        // Write-zeroes of sectors 2..4 (with the unmap flag), then a discard of sector 8.
        header(&m, T_WRITE_ZEROES, 0);
        range(&m, 2, 2, WZ_FLAG_UNMAP);
        assert_eq!(run(&m, &d, &ok), Some((S_OK, 0)));
        header(&m, T_DISCARD, 0);
        range(&m, 8, 1, 0);
        assert_eq!(run(&m, &d, &ok), Some((S_OK, 0)));
        let data = std::fs::read(&path).unwrap();
        let zero = |r: std::ops::Range<usize>| data[r].iter().all(|b| *b == 0);
        assert!(
            zero(1024..2048) && zero(4096..4608),
            "zeroed and discarded sectors"
        );
        assert!(data[..1024]
            .iter()
            .chain(&data[2048..4096])
            .all(|b| *b == 0x5a));
        let before = std::fs::read(&path).unwrap();
        for kind in [T_DISCARD, T_WRITE_ZEROES] {
            header(&m, kind, 0);
            range(&m, 0, 1, 0);
            // A segment whose end wraps the address space (the old code panicked in debug
            // builds and, wrapped in release builds, answered OK having done nothing).
            let wraps = [
                (0x1000, 16, NEXT),
                (u64::MAX - 7, 16, NEXT),
                (0x3000, 1, WRITE),
            ];
            assert_eq!(run(&m, &d, &wraps), Some((S_IOERR, 0)), "kind {kind}");
            // No entry at all, and a partial entry: malformed, not OK.
            let empty = [(0x1000, 16, NEXT), (0x3000, 1, WRITE)];
            assert_eq!(run(&m, &d, &empty), Some((S_IOERR, 0)), "kind {kind}");
            let partial = [(0x1000, 16, NEXT), (0x2000, 8, NEXT), (0x3000, 1, WRITE)];
            assert_eq!(run(&m, &d, &partial), Some((S_IOERR, 0)), "kind {kind}");
            // More entries than the config space allows.
            let two = [(0x1000, 16, NEXT), (0x2000, 32, NEXT), (0x3000, 1, WRITE)];
            assert_eq!(run(&m, &d, &two), Some((S_IOERR, 0)), "kind {kind}");
            // Past the end of the 64 KiB disk, and a sector number that overflows.
            range(&m, 127, 2, 0);
            assert_eq!(run(&m, &d, &ok), Some((S_IOERR, 0)), "kind {kind}");
            range(&m, u64::MAX / 256, 1, 0);
            assert_eq!(run(&m, &d, &ok), Some((S_IOERR, 0)), "kind {kind}");
            // Unknown flags (and unmap on a discard).
            range(&m, 0, 1, 0x8000_0000);
            assert_eq!(run(&m, &d, &ok), Some((S_UNSUPP, 0)), "kind {kind}");
        }
        header(&m, T_DISCARD, 0);
        range(&m, 0, 1, WZ_FLAG_UNMAP);
        assert_eq!(run(&m, &d, &ok), Some((S_UNSUPP, 0)));
        assert_eq!(std::fs::read(&path).unwrap(), before, "nothing changed");
        std::fs::remove_file(path).unwrap();
    }
}
