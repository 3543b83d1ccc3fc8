//! virtio-blk: a disk backed by a host file or block device (virtio 1.2 §5.2; bhyve
//! `pci_virtio_block.c` and `block_if.c` options: path, ro, sectorsize, nocache, direct,
//! nodelete, ser). The device's worker pops requests and hands them to a pool of I/O threads,
//! so several are in flight; completions come back to the worker, which owns the queue.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rhyve_hypervisor::memory::GuestMem;
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use super::rate_limited;
use super::{Activation, ActiveQueue, Engine, QueueHandler, Running, VirtioDevice, VirtioIrq};
use rhyve_block::{BlockError, Disk, Op, Pool, ID_BYTES, SECTOR};
use rhyve_config::Config;

const QUEUE_SIZE: u16 = 256;
/// Pool size: requests that can be in flight at once.
const IO_THREADS: usize = 4;
/// Largest data segment accepted, and segments per request.
const SIZE_MAX: u32 = 1 << 20;
const SEG_MAX: u32 = 126;

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
const CONFIG_LEN: usize = 60;
/// Most sectors one discard or write-zeroes range may name (the config space says it).
const MAX_RANGE_SECTORS: u32 = u32::MAX / SECTOR as u32;

/// What the disk offers the driver.
fn features(disk: &Disk) -> u64 {
    let mut f = F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_TOPOLOGY;
    if disk.read_only() {
        f |= F_RO;
    } else {
        f |= F_WRITE_ZEROES;
        if disk.can_discard() {
            f |= F_DISCARD;
        }
    }
    f
}

/// The device configuration (virtio 1.2 §5.2.4): capacity, limits, topology, discard.
fn config(disk: &Disk) -> [u8; CONFIG_LEN] {
    let (logical, physical) = disk.sector_sizes();
    let mut c = [0u8; CONFIG_LEN];
    c[0..8].copy_from_slice(&(disk.size() / SECTOR).to_le_bytes());
    c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
    c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
    c[20..24].copy_from_slice(&logical.to_le_bytes());
    c[24] = physical.checked_div(logical).unwrap_or(1).trailing_zeros() as u8;
    c[26..28].copy_from_slice(&1u16.to_le_bytes());
    c[34..36].copy_from_slice(&1u16.to_le_bytes());
    let max_sectors = MAX_RANGE_SECTORS.to_le_bytes();
    c[36..40].copy_from_slice(&max_sectors);
    c[40..44].copy_from_slice(&1u32.to_le_bytes());
    c[44..48].copy_from_slice(
        &logical
            .checked_div(SECTOR as u32)
            .unwrap_or(1)
            .to_le_bytes(),
    );
    c[48..52].copy_from_slice(&max_sectors);
    c[52..56].copy_from_slice(&1u32.to_le_bytes());
    c[56] = u8::from(disk.can_discard());
    c
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

/// Splits a chain into header, data segments and status; None for a malformed chain.
///
/// `acked` is what the driver accepted: the size and segment limits hold only if it accepted
/// them (a driver that did not, such as OVMF's, may send a single large buffer).
fn parse(chain: DescriptorChain<&GuestMem>, mem: &GuestMem, acked: u64) -> Option<Request> {
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
        if d.is_write_only() != writes_guest || (acked & F_SIZE_MAX != 0 && d.len() > SIZE_MAX) {
            return None;
        }
        segs.push((d.addr(), d.len()));
    }
    if acked & F_SEG_MAX != 0 && segs.len() > SEG_MAX as usize {
        return None;
    }
    // The status byte is the last byte of the last descriptor.
    let status = last
        .addr()
        .checked_add(u64::from(last.len()).checked_sub(1)?)?;
    Some(Request {
        head,
        kind,
        sector,
        segs,
        status,
    })
}

/// Ranges a DISCARD or WRITE_ZEROES request may carry (the config space says one).
const RANGES_MAX: usize = 1;
/// `virtio_blk_discard_write_zeroes.flags`: the only flag, and only for WRITE_ZEROES.
const WZ_FLAG_UNMAP: u32 = 1;

/// The byte ranges of a DISCARD or WRITE_ZEROES request, all checked against the disk before
/// any is acted on: its data is whole 16-byte {sector u64, num_sectors u32, flags u32}
/// entries, at most RANGES_MAX of them, each inside the disk. Err is the status to answer.
fn ranges(
    mem: &GuestMem,
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

/// What a virtio-blk request asks of the shared block backend; Err is the status to answer at
/// once (no disk I/O needed, or a request the backend must not see).
fn op(disk: &Disk, mem: &GuestMem, r: &Request) -> Result<Op, u8> {
    let offset = r.sector.checked_mul(SECTOR).ok_or(S_IOERR);
    match r.kind {
        T_IN => Ok(Op::Read { offset: offset? }),
        T_OUT => Ok(Op::Write { offset: offset? }),
        T_FLUSH => Ok(Op::Flush),
        T_DISCARD | T_WRITE_ZEROES => {
            if disk.read_only() || (r.kind == T_DISCARD && !disk.can_discard()) {
                return Err(S_UNSUPP);
            }
            let ranges = ranges(mem, &r.segs, r.kind, disk.size())?;
            Ok(if r.kind == T_DISCARD {
                Op::Discard(ranges)
            } else {
                Op::WriteZeroes(ranges)
            })
        }
        _ => Err(S_UNSUPP),
    }
}

/// The status byte for the backend's answer.
fn status(result: Result<u32, BlockError>) -> (u8, u32) {
    match result {
        Ok(n) => (S_OK, n),
        Err(BlockError::Unsupported) => (S_UNSUPP, 0),
        Err(BlockError::Invalid | BlockError::ReadOnly | BlockError::Io) => (S_IOERR, 0),
    }
}

/// GET_ID: the serial number, written into the guest's buffers; no disk I/O.
fn get_id(disk: &Disk, mem: &GuestMem, r: &Request) -> (u8, u32) {
    let serial: &[u8] = disk.serial();
    let mut left = serial;
    let mut n = 0u32;
    for (addr, len) in &r.segs {
        let (part, rest) = left.split_at((*len as usize).min(left.len()));
        if mem.write_slice(part, *addr).is_err() {
            return (S_IOERR, n);
        }
        left = rest;
        // At most ID_BYTES in all.
        n = n.saturating_add(part.len() as u32);
    }
    debug_assert!(n as usize <= ID_BYTES);
    (S_OK, n)
}

/// Executes one request on this thread; returns (status, bytes written to the guest). The
/// worker sends disk I/O to the pool instead; tests use this.
#[cfg(test)]
fn execute(disk: &Disk, mem: &GuestMem, r: &Request) -> (u8, u32) {
    if r.kind == T_GET_ID {
        return get_id(disk, mem, r);
    }
    match op(disk, mem, r) {
        Ok(op) => status(rhyve_block::execute(disk, mem, &op, &r.segs)),
        Err(s) => (s, 0),
    }
}

/// Requests served and queue notifications received (for the benchmark's notify ratio), and
/// the reads and writes handed to the disk (the API's `vm.counters`).
#[derive(Default)]
pub struct BlkStats {
    pub requests: AtomicU64,
    pub notifies: AtomicU64,
    pub read_ops: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_ops: AtomicU64,
    pub write_bytes: AtomicU64,
}

impl BlkStats {
    /// Counts a read or write about to be done.
    fn count(&self, op: &Op, segs: &[(GuestAddress, u32)]) {
        let bytes = segs
            .iter()
            .fold(0u64, |n, (_, l)| n.saturating_add(u64::from(*l)));
        let (ops, total) = match op {
            Op::Read { .. } => (&self.read_ops, &self.read_bytes),
            Op::Write { .. } => (&self.write_ops, &self.write_bytes),
            _ => return,
        };
        ops.fetch_add(1, Ordering::Relaxed);
        total.fetch_add(bytes, Ordering::Relaxed);
    }
}

pub struct Blk {
    disk: Arc<Disk>,
    stats: Arc<BlkStats>,
    running: Option<Running<BlkQueue>>,
}

/// The request queue and the shared block backend's I/O pool, whose completions come back
/// tagged with the chain's head and status byte.
struct BlkQueue {
    q: ActiveQueue,
    mem: GuestMem,
    irq: Arc<VirtioIrq>,
    disk: Arc<Disk>,
    pool: Pool<(u16, GuestAddress)>,
    stats: Arc<BlkStats>,
    bad: AtomicU64,
    /// The features the driver accepted.
    acked: u64,
}

/// Token of the pool's completion eventfd (0 is the queue's notify).
const DONE_TOKEN: usize = 1;

impl BlkQueue {
    /// Takes every available request to the pool; false if the pool is gone.
    fn submit(&mut self) -> bool {
        let (mem, disk, pool, bad, stats, acked) = (
            &self.mem,
            &self.disk,
            &self.pool,
            &self.bad,
            &self.stats,
            self.acked,
        );
        stats
            .notifies
            .fetch_add(super::drain(&self.q.notify), Ordering::Relaxed);
        let mut alive = true;
        let mut used_any = false;
        self.q.serve_all(mem, |queue, chain| {
            let head = chain.head_index();
            stats.requests.fetch_add(1, Ordering::Relaxed);
            let Some(r) = parse(chain, mem, acked) else {
                if rate_limited(bad) {
                    log::warn!("virtio-blk: malformed request (descriptor {head}) failed");
                }
                // No usable status byte: complete it empty.
                let _ = queue.add_used(mem, head, 0);
                used_any = true;
                return true;
            };
            // Answered here, without the pool: GET_ID and requests refused as they stand.
            let answer = if r.kind == T_GET_ID {
                Some(get_id(disk, mem, &r))
            } else {
                match op(disk, mem, &r) {
                    Ok(op) => {
                        stats.count(&op, &r.segs);
                        if !pool.submit(op, r.segs, (r.head, r.status)) {
                            alive = false;
                            return false;
                        }
                        None
                    }
                    Err(s) => Some((s, 0)),
                }
            };
            if let Some((code, len)) = answer {
                let _ = mem.write_obj(code, r.status);
                let _ = queue.add_used(mem, r.head, len.saturating_add(1));
                used_any = true;
            }
            true
        });
        if used_any {
            self.interrupt();
        }
        alive
    }

    /// Puts what the pool finished in the used ring; returns whether there was any.
    fn complete(&mut self) -> bool {
        let finished = self.pool.take_done();
        let any = !finished.is_empty();
        for ((head, status_at), result) in finished {
            let (code, len) = status(result);
            let _ = self.mem.write_obj(code, status_at);
            let _ = self
                .q
                .queue
                .add_used(&self.mem, head, len.saturating_add(1));
        }
        any
    }

    fn interrupt(&mut self) {
        if self.q.queue.needs_notification(&self.mem).unwrap_or(true) {
            self.irq.signal_queue(self.q.index);
        }
    }
}

impl QueueHandler for BlkQueue {
    fn handle(&mut self, token: usize) -> bool {
        if token == DONE_TOKEN {
            if self.complete() {
                self.interrupt();
            }
            true
        } else {
            self.submit()
        }
    }
    fn queues(&self) -> Vec<&ActiveQueue> {
        vec![&self.q]
    }
}

impl Blk {
    pub fn new(cfg: &Config, prefix: &str) -> Result<Self, String> {
        let disk = Disk::open(cfg, prefix)?;
        if disk.direct() {
            log::info!("virtio-blk: nocache: O_DIRECT with aligned bounce buffers");
        }
        Ok(Blk {
            disk: Arc::new(disk),
            stats: Arc::new(BlkStats::default()),
            running: None,
        })
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
        features(&self.disk)
    }
    fn config_len(&self) -> usize {
        CONFIG_LEN
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_window(&config(&self.disk), offset, data);
    }

    fn activate(&mut self, mut a: Activation) -> Result<(), String> {
        let Some(q) = a.queues.pop() else {
            return Err("virtio-blk: the driver enabled no queue".into());
        };
        let pool = Pool::start("virtio-blk", self.disk.clone(), &a.mem, IO_THREADS)
            .map_err(|e| e.to_string())?;
        let fds = vec![(q.notify.as_raw_fd(), false), (pool.done_fd(), false)];
        let handler = BlkQueue {
            q,
            mem: a.mem.clone(),
            irq: a.irq.clone(),
            disk: self.disk.clone(),
            pool,
            stats: self.stats.clone(),
            bad: AtomicU64::new(0),
            acked: a.acked,
        };
        self.running = Some(Running::start("virtio-blk", fds, &a, handler)?);
        Ok(())
    }

    fn engine(&self) -> Option<&dyn Engine> {
        self.running.as_ref().map(|r| r as &dyn Engine)
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = &self.stats;
        vec![
            ("read_bytes", s.read_bytes.load(Ordering::Relaxed)),
            ("write_bytes", s.write_bytes.load(Ordering::Relaxed)),
            ("read_ops", s.read_ops.load(Ordering::Relaxed)),
            ("write_ops", s.write_ops.load(Ordering::Relaxed)),
        ]
    }

    /// Parks the worker (no new requests), waits for the pool to finish what it has, and puts
    /// those completions in the used ring, so nothing is in flight while paused; the driver's
    /// interrupt for them comes on resume.
    fn pause(&mut self) {
        let Some(r) = &self.running else { return };
        r.pause();
        let mut h = r.lock();
        if !h.pool.wait_idle(std::time::Duration::from_secs(5)) {
            log::warn!("virtio-blk: requests still in flight after 5 s of pausing");
        }
        if h.complete() {
            drop(h);
            r.owe_interrupts();
        }
    }

    fn stop(&mut self) {
        // Stops the worker; dropping its handler drops the pool, whose threads end once their
        // requests finish.
        if self.running.take().is_some() {
            let (r, n) = (
                self.stats.requests.swap(0, Ordering::Relaxed),
                self.stats.notifies.swap(0, Ordering::Relaxed),
            );
            log::info!(
                "virtio-blk: {r} requests, {n} queue notifications ({:.3} per request)",
                n as f64 / r.max(1) as f64
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
    use super::*;
    use virtio_queue::desc::{split::Descriptor as Desc, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    fn mem() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
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
    fn chain(m: &GuestMem, descs: &[(u64, u32, u16)]) -> Queue {
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

    fn header(m: &GuestMem, kind: u32, sector: u64) {
        m.write_obj(kind, GuestAddress(0x1000)).unwrap();
        m.write_obj(0u32, GuestAddress(0x1004)).unwrap();
        m.write_obj(sector, GuestAddress(0x1008)).unwrap();
    }

    fn run(m: &GuestMem, d: &Disk, descs: &[(u64, u32, u16)]) -> Option<(u8, u32)> {
        let mut q = chain(m, descs);
        let c = q.pop_descriptor_chain(m)?;
        let r = parse(c, m, F_SIZE_MAX | F_SEG_MAX)?;
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
        // More than the bounce buffer (REQUEST_MAX) in one request: it moves in pieces. Nine
        // 1 MiB segments over the same (valid) guest memory.
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
        assert_eq!(run(&m, &disk_big, &big), Some((S_OK, 9 << 20)));
        // More than TRANSFER_MAX, from a driver that did not accept the size limit (so one
        // descriptor may be that large), in guest memory and inside a (sparse) disk: only the
        // cap refuses it, before any buffer is allocated.
        let mb = GuestMem::from_ranges(&[(GuestAddress(0), (2 << 30) + (1 << 20))]).unwrap();
        header(&mb, T_IN, 0);
        let huge = [
            (0x1000, 16, NEXT),
            (0x10_0000, 1 << 30, NEXT | WRITE),
            (0x10_0000 + (1 << 30), 1 << 30, NEXT | WRITE),
            (0x3000, 1, WRITE),
        ];
        std::fs::File::create(&big_path)
            .unwrap()
            .set_len(4 << 30)
            .unwrap();
        let mut c = Config::new();
        c.set("pci.0.4.0.path", big_path.to_str().unwrap()).unwrap();
        let disk_huge = Disk::open(&c, "pci.0.4.0").unwrap();
        let mut q = chain(&mb, &huge);
        let c = q.pop_descriptor_chain(&mb).expect("offered");
        let r = parse(c, &mb, 0).expect("no limits were accepted");
        assert_eq!(execute(&disk_huge, &mb, &r), (S_IOERR, 0));
        // With the limits accepted, a descriptor over SIZE_MAX is malformed.
        let mut q = chain(&mb, &huge);
        let c = q.pop_descriptor_chain(&mb).expect("offered");
        assert!(parse(c, &mb, F_SIZE_MAX).is_none());
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
        assert!(parse(c, &m, F_SIZE_MAX | F_SEG_MAX).is_none());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn read_only_disks_refuse_writes() {
        let m = mem();
        let (d, path) = disk("ro", true);
        assert_ne!(features(&d) & F_RO, 0);
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
    fn range(m: &GuestMem, sector: u64, count: u32, flags: u32) {
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
