//! MC146818 RTC and CMOS RAM at ports 0x70-0x71 (bhyve `rtc.c` with the kernel's `vrtc.c`).
//!
//! The clock is read from the host on every access, plus an offset the guest sets by writing
//! the time registers; local time or UTC per `rtc.use_localtime` (-u). The memory-size bytes
//! firmware reads (base, extended, above 16 MiB and above 4 GiB) are filled in from the layout.
//! Periodic, alarm and update-ended interrupts come from a timer thread (`start_timer`) and go
//! out on ISA IRQ 8 when register C's IRQF goes from clear to set; reading C clears it.
//!
//! Pausing stops the interrupts: the timer thread raises nothing while the device is paused,
//! and the periodic, alarm and update-ended events that fall due meanwhile are dropped, as on
//! a machine whose clock interrupts are stopped (register C gains no flags either). On resume
//! the periodic interrupt starts a fresh period and the once-a-second events realign to the
//! host's second. The time itself is the host's clock plus the guest's offset, so it does not
//! stand still across a pause or a save and restore: like a battery-backed RTC, it reads the
//! real time afterwards.

use std::io;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_superio::Trigger;

use rhyve_base::lifecycle::{DeviceState, Lifecycle, Paused, StateError};
use rhyve_bus::BusDevice;
use rhyve_hypervisor::MemoryLayout;

const SEC: usize = 0x00;
const MIN: usize = 0x02;
const HOUR: usize = 0x04;
const DOW: usize = 0x06;
const DAY: usize = 0x07;
const MONTH: usize = 0x08;
const YEAR: usize = 0x09;
const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
const CENTURY: usize = 0x32;

const B_SET: u8 = 0x80;
const B_PIE: u8 = 0x40;
const B_AIE: u8 = 0x20;
const B_UIE: u8 = 0x10;
const C_IRQF: u8 = 0x80;
const C_PF: u8 = 0x40;
const C_AF: u8 = 0x20;
const C_UF: u8 = 0x10;
const SEC_ALARM: usize = 0x01;
const MIN_ALARM: usize = 0x03;
const HOUR_ALARM: usize = 0x05;
const B_DM_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const D_VRT: u8 = 0x80;
const NVRAM_LEN: usize = 128;
/// Bounds the guest clock's offset from the host's, in seconds (see `restore`).
const MAX_OFFSET: u64 = 1_000_000_000_000;

const KIND: &str = "rtc";
const VERSION: u32 = 1;

/// IRQ 8: an `IrqLine` in the VM, a counter in the tests.
type Line = Box<dyn Trigger<E = io::Error> + Send>;

/// Broken-down time, as the RTC registers hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tm {
    sec: u32,
    min: u32,
    hour: u32,
    wday: u32, // 0 = Sunday
    mday: u32,
    mon: u32, // 1-12
    year: i64,
}

impl Tm {
    /// The day of the week as the RTC counts it, 1 = Sunday.
    // `wday` is `rem_euclid(7)` of the day count, so at most 6.
    #[allow(clippy::arithmetic_side_effects)]
    fn dow(&self) -> u32 {
        self.wday + 1
    }
}

pub struct Rtc {
    index: usize,
    nvram: [u8; NVRAM_LEN],
    localtime: bool,
    /// Guest time minus host time, in seconds.
    offset: i64,
    /// IRQ 8, when a timer thread drives interrupts.
    irq: Option<Line>,
    /// Wakes the timer thread when the rate, the enables or the paused state change.
    changed: Arc<Condvar>,
    paused: Paused,
    /// Restored with IRQF set: the interrupt is raised again on resume, since the one the
    /// saved device raised may never have reached this VM's interrupt controller.
    repulse: bool,
}

/// The RTC's state: the index register, the whole CMOS RAM, and the guest's clock offset.
/// The RAM holds the time registers (what the guest is editing while SET is on), the alarm,
/// and registers A-D: the periodic rate, the interrupt enables and the pending flags (IRQF,
/// PF, AF, UF), which is all of the interrupt state. `localtime` is configuration, checked.
#[derive(Debug, Serialize, Deserialize)]
struct RtcState {
    index: u8,
    nvram: Vec<u8>,
    offset: i64,
    localtime: bool,
}

fn to_bcd(v: u32) -> u8 {
    (((v / 10) << 4) | (v % 10)) as u8
}

// Both digits are at most 15, so the value is at most 165.
#[allow(clippy::arithmetic_side_effects)]
fn from_bcd(v: u8) -> u32 {
    u32::from(v >> 4) * 10 + u32::from(v & 0xf)
}

fn host_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Seconds east of UTC of the host's local time zone at `t`.
fn local_offset(t: i64) -> i64 {
    let tt = t as libc::time_t;
    // SAFETY: an all-zero tm is valid output storage; localtime_r only writes into it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call; localtime_r is thread-safe.
    let ok = unsafe { !libc::localtime_r(&tt, &mut tm).is_null() };
    if ok {
        tm.tm_gmtoff
    } else {
        0
    }
}

/// Days since 1970-01-01 to civil date (proleptic Gregorian).
// Only `tm_from_secs` calls this, with a second count divided by 86400, so |z| < 2^47 and no
// intermediate comes near i64's range; `doe` is 0..146097 and `mp` 0..12, so the casts to
// u32 and the month arithmetic are exact.
#[allow(clippy::arithmetic_side_effects)]
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

// Only `secs_from_tm` calls this, for `commit_time`: a year of at most 25599 (`year_from`),
// a month 1-12 and a day 1-31, so no step comes near i64's range.
#[allow(clippy::arithmetic_side_effects)]
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

// `days` is at most i64::MAX / 86400, so adding 4 cannot overflow.
#[allow(clippy::arithmetic_side_effects)]
fn tm_from_secs(t: i64) -> Tm {
    let days = t.div_euclid(86_400);
    let rem = t.rem_euclid(86_400) as u32;
    let (year, mon, mday) = civil_from_days(days);
    Tm {
        sec: rem % 60,
        min: (rem / 60) % 60,
        hour: rem / 3600,
        wday: (days + 4).rem_euclid(7) as u32,
        mday,
        mon,
        year,
    }
}

// Outside the tests only `commit_time` calls this, with its fields clamped and a year of at
// most 25599 (`year_from`): under 10^7 days, so under 10^12 seconds.
#[allow(clippy::arithmetic_side_effects)]
fn secs_from_tm(tm: &Tm) -> i64 {
    days_from_civil(tm.year, tm.mon, tm.mday) * 86_400
        + i64::from(tm.hour) * 3600
        + i64::from(tm.min) * 60
        + i64::from(tm.sec)
}

impl Rtc {
    pub fn new(layout: &MemoryLayout, localtime: bool, cpus: u32) -> Self {
        let mut nvram = [0u8; 128];
        nvram[REG_A] = 0x26; // 32.768 kHz time base, 1024 Hz rate
        nvram[REG_B] = B_24H;
        nvram[REG_D] = D_VRT;
        const MB: u64 = 1 << 20;
        let put16 = |nv: &mut [u8; 128], at: usize, v: u64| {
            let v = v.min(0xffff) as u16;
            for (d, b) in nv.iter_mut().skip(at).zip(v.to_le_bytes()) {
                *d = b;
            }
        };
        // Base memory in KiB.
        put16(&mut nvram, 0x15, 640);
        // Extended memory between 1 MiB and 64 MiB, in KiB.
        let ext = layout.lowmem.clamp(MB, 64 * MB).saturating_sub(MB) / 1024;
        put16(&mut nvram, 0x17, ext);
        put16(&mut nvram, 0x30, ext);
        // Memory between 16 MiB and the top of low memory, in 64 KiB units.
        put16(
            &mut nvram,
            0x34,
            layout.lowmem.saturating_sub(16 * MB) / 65536,
        );
        // Memory above 4 GiB, in 64 KiB units (24 bits).
        let high = (layout.highmem / 65536).min(0xff_ffff);
        for (d, b) in nvram
            .iter_mut()
            .skip(0x5b)
            .zip(high.to_le_bytes().into_iter().take(3))
        {
            *d = b;
        }
        // Number of CPUs minus one, where SeaBIOS looks for it.
        nvram[0x5f] = cpus.saturating_sub(1).min(255) as u8;
        Rtc {
            index: 0,
            nvram,
            localtime,
            offset: 0,
            irq: None,
            changed: Arc::new(Condvar::new()),
            paused: Paused::default(),
            repulse: false,
        }
    }

    fn pulse(&self) {
        if let Some(irq) = &self.irq {
            if let Err(e) = irq.trigger() {
                log::warn!("RTC IRQ 8: {e}");
            }
        }
    }

    /// Sets flags in register C; raises IRQ 8 if an enabled one makes IRQF go from 0 to 1.
    /// While paused the event is dropped (the timer thread does not call this then anyway).
    fn flag(&mut self, flags: u8) {
        if self.paused.get() {
            return;
        }
        let c = self.nvram[REG_C] | flags;
        let enabled = (self.nvram[REG_B] & (B_PIE | B_AIE | B_UIE)) & c;
        let fire = enabled != 0 && self.nvram[REG_C] & C_IRQF == 0;
        self.nvram[REG_C] = if enabled != 0 { c | C_IRQF } else { c };
        if fire {
            self.pulse();
        }
    }

    /// The periodic interrupt's period (register A rate select), if on.
    fn period(&self) -> Option<Duration> {
        let rate = u32::from(self.nvram[REG_A] & 0x0f);
        if self.nvram[REG_B] & B_PIE == 0 || rate == 0 {
            return None;
        }
        // 32.768 kHz time base: rates 1 and 2 behave as 8 and 9. Rate r (3-15, four bits)
        // is 65536 >> r Hz, a period of 2^(r-16) s.
        let rate = match rate {
            1 => 8,
            2 => 9,
            r => r,
        };
        let shift = 16u32.checked_sub(rate)?;
        Some(Duration::from_nanos(1_000_000_000u64.checked_shr(shift)?))
    }

    fn alarm_matches(&self, tm: &Tm) -> bool {
        // An alarm byte with the top two bits set matches any value.
        let hit = |reg: usize, v: u32, hour: bool| {
            let a = self.nvram.get(reg).copied().unwrap_or(0xff);
            a & 0xc0 == 0xc0
                || u32::from(if hour {
                    self.decode_hour(a) as u8
                } else {
                    self.decode(a) as u8
                }) == v
        };
        hit(SEC_ALARM, tm.sec, false)
            && hit(MIN_ALARM, tm.min, false)
            && hit(HOUR_ALARM, tm.hour, true)
    }

    /// Once a second: update-ended, and the alarm if it matches.
    fn second_tick(&mut self) {
        let mut f = C_UF;
        if self.alarm_matches(&tm_from_secs(self.guest_secs())) {
            f |= C_AF;
        }
        self.flag(f);
    }

    fn guest_secs(&self) -> i64 {
        let now = host_now();
        let zone = if self.localtime { local_offset(now) } else { 0 };
        // The offset is bounded (`MAX_OFFSET`), the host's clock and zone are not ours to
        // trust: saturate rather than wrap.
        now.saturating_add(zone).saturating_add(self.offset)
    }

    fn encode(&self, v: u32) -> u8 {
        if self.nvram[REG_B] & B_DM_BINARY != 0 {
            v as u8
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u32 {
        if self.nvram[REG_B] & B_DM_BINARY != 0 {
            u32::from(v)
        } else {
            from_bcd(v)
        }
    }

    fn encode_hour(&self, h: u32) -> u8 {
        if self.nvram[REG_B] & B_24H != 0 {
            return self.encode(h);
        }
        let pm = h >= 12;
        let h12 = match h % 12 {
            0 => 12,
            x => x,
        };
        self.encode(h12) | if pm { 0x80 } else { 0 }
    }

    fn decode_hour(&self, v: u8) -> u32 {
        if self.nvram[REG_B] & B_24H != 0 {
            return self.decode(v);
        }
        let h12 = self.decode(v & 0x7f) % 12;
        if v & 0x80 != 0 {
            // `h12` is a remainder of 12, so the sum is at most 23.
            #[allow(clippy::arithmetic_side_effects)]
            let h24 = h12 + 12;
            h24
        } else {
            h12
        }
    }

    fn read_reg(&mut self, idx: usize) -> u8 {
        // While SET is on the guest is writing the time: show what it wrote.
        let frozen = self.nvram[REG_B] & B_SET != 0;
        if !frozen && matches!(idx, SEC | MIN | HOUR | DOW | DAY | MONTH | YEAR | CENTURY) {
            let tm = tm_from_secs(self.guest_secs());
            return match idx {
                SEC => self.encode(tm.sec),
                MIN => self.encode(tm.min),
                HOUR => self.encode_hour(tm.hour),
                DOW => self.encode(tm.dow()),
                DAY => self.encode(tm.mday),
                MONTH => self.encode(tm.mon),
                YEAR => self.encode(tm.year.rem_euclid(100) as u32),
                _ => self.encode(tm.year.div_euclid(100) as u32),
            };
        }
        match idx {
            // Update-in-progress is never reported: the time is computed on each read.
            REG_A => self.nvram[REG_A] & 0x7f,
            // Reading C acknowledges every pending interrupt.
            REG_C => std::mem::take(&mut self.nvram[REG_C]),
            // The index is masked to 7 bits (and checked on restore); past the RAM reads ones.
            _ => self.nvram.get(idx).copied().unwrap_or(0xff),
        }
    }

    fn write_reg(&mut self, idx: usize, v: u8) {
        match idx {
            REG_B => {
                let was_set = self.nvram[REG_B] & B_SET != 0;
                if v & B_SET != 0 && !was_set {
                    // Freeze the current time into the registers for the guest to edit.
                    let tm = tm_from_secs(self.guest_secs());
                    self.nvram[SEC] = self.encode(tm.sec);
                    self.nvram[MIN] = self.encode(tm.min);
                    self.nvram[HOUR] = self.encode_hour(tm.hour);
                    self.nvram[DOW] = self.encode(tm.dow());
                    self.nvram[DAY] = self.encode(tm.mday);
                    self.nvram[MONTH] = self.encode(tm.mon);
                    self.nvram[YEAR] = self.encode(tm.year.rem_euclid(100) as u32);
                    self.nvram[CENTURY] = self.encode(tm.year.div_euclid(100) as u32);
                }
                self.nvram[REG_B] = v;
                if v & B_SET == 0 && was_set {
                    self.commit_time();
                }
                self.changed.notify_all();
            }
            REG_C | REG_D => {} // read-only
            REG_A => {
                self.nvram[REG_A] = v & 0x7f;
                self.changed.notify_all();
            }
            _ => {
                // As in `read_reg`: an index past the RAM drops the write.
                if let Some(b) = self.nvram.get_mut(idx) {
                    *b = v;
                }
            }
        }
    }

    /// The guest finished setting the clock: keep the difference to the host clock.
    fn commit_time(&mut self) {
        let tm = Tm {
            sec: self.decode(self.nvram[SEC]).min(59),
            min: self.decode(self.nvram[MIN]).min(59),
            hour: self.decode_hour(self.nvram[HOUR]).min(23),
            wday: 0,
            mday: self.decode(self.nvram[DAY]).clamp(1, 31),
            mon: self.decode(self.nvram[MONTH]).clamp(1, 12),
            year: year_from(
                self.decode(self.nvram[CENTURY]),
                self.decode(self.nvram[YEAR]),
            ),
        };
        let now = host_now();
        let zone = if self.localtime { local_offset(now) } else { 0 };
        // The guest's time is within years 0-25599 (`year_from`); saturating keeps an absurd
        // host clock from wrapping the offset.
        self.offset = secs_from_tm(&tm).saturating_sub(now.saturating_add(zone));
    }
}

/// The year the century and year registers name, decoded (each at most 255 in binary mode).
// At most 255 * 100 + 99: nowhere near i64's range.
#[allow(clippy::arithmetic_side_effects)]
fn year_from(century: u32, yy: u32) -> i64 {
    i64::from(century) * 100 + i64::from(yy % 100)
}

/// Drives the RTC's interrupts: periodic at the rate register A selects, update-ended and
/// alarm once a second (on the host's second boundary). Sleeps on the RTC's condvar, so a
/// rate or enable change takes effect at once. While the RTC is paused it raises nothing and
/// keeps no count of what it missed (see the module comment). The thread holds the RTC weakly
/// and ends once the device is gone.
pub fn start_timer(
    rtc: Arc<Mutex<Rtc>>,
    irq: impl Trigger<E = io::Error> + Send + 'static,
) -> io::Result<()> {
    let changed = {
        let mut r = rtc.lock().unwrap_or_else(|p| p.into_inner());
        r.irq = Some(Box::new(irq));
        r.changed.clone()
    };
    let rtc = Arc::downgrade(&rtc);
    rhyve_base::thread::spawn(rhyve_base::thread::Role::Timer, "rtc", move || {
        timer_loop(&rtc, &changed)
    })?;
    Ok(())
}

/// The next host second boundary.
fn next_host_second() -> Instant {
    let now = Instant::now();
    let rest = Duration::from_nanos(1_000_000_000u64.saturating_sub(u64::from(now_subsec_nanos())));
    // A monotonic clock a second from its end of range: tick now rather than panic.
    now.checked_add(rest).unwrap_or(now)
}

fn timer_loop(rtc: &Weak<Mutex<Rtc>>, changed: &Condvar) {
    // How long a paused timer sleeps between checks that its device still exists; resume
    // wakes it at once.
    const PAUSED_NAP: Duration = Duration::from_secs(1);
    let mut next_periodic: Option<Instant> = None;
    let mut next_second = next_host_second();
    let mut was_paused = false;
    loop {
        let Some(rtc) = rtc.upgrade() else { return };
        let mut r = rtc.lock().unwrap_or_else(|p| p.into_inner());
        if r.paused.get() {
            // Missed events are dropped: no period is carried over a pause.
            next_periodic = None;
            was_paused = true;
            let _ = changed.wait_timeout(r, PAUSED_NAP);
            continue;
        }
        if was_paused {
            was_paused = false;
            next_second = next_host_second();
        }
        let now = Instant::now();
        match (r.period(), next_periodic) {
            (Some(p), Some(t)) if now >= t => {
                r.flag(C_PF);
                // Do not try to catch up after a long stall: skip missed periods. (An Instant
                // past the clock's range leaves the period unarmed, waiting for the second.)
                next_periodic = t
                    .checked_add(p)
                    .filter(|&n| n >= now)
                    .or_else(|| now.checked_add(p));
            }
            (Some(p), None) => next_periodic = now.checked_add(p),
            (None, _) => next_periodic = None,
            _ => {}
        }
        if now >= next_second {
            r.second_tick();
            next_second = next_second
                .checked_add(Duration::from_secs(1))
                .unwrap_or_else(next_host_second);
        }
        let wake = next_periodic.map_or(next_second, |p| p.min(next_second));
        let timeout = wake.saturating_duration_since(Instant::now());
        let _ = changed.wait_timeout(r, timeout);
    }
}

fn now_subsec_nanos() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

impl Lifecycle for Rtc {
    fn pause(&mut self) {
        self.paused.set(true);
        self.changed.notify_all();
    }

    fn resume(&mut self) {
        self.paused.set(false);
        if std::mem::take(&mut self.repulse) && self.nvram[REG_C] & C_IRQF != 0 {
            self.pulse();
        }
        self.changed.notify_all();
    }

    /// The MC146818's RESET pin: the interrupt enables and flags clear; the time, the rate
    /// and the CMOS RAM stay (they are battery backed).
    fn reset(&mut self) {
        self.nvram[REG_B] &= !(B_PIE | B_AIE | B_UIE);
        self.nvram[REG_C] = 0;
        self.repulse = false;
        self.changed.notify_all();
    }

    fn save(&mut self) -> Result<DeviceState, StateError> {
        self.paused.check(KIND)?;
        let st = RtcState {
            index: self.index as u8,
            nvram: self.nvram.to_vec(),
            offset: self.offset,
            localtime: self.localtime,
        };
        DeviceState::new(KIND, VERSION, &st)
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), StateError> {
        self.paused.check(KIND)?;
        let st: RtcState = state.parse(KIND, VERSION)?;
        DeviceState::expect_same(KIND, "rtc.use_localtime", st.localtime, self.localtime)?;
        let malformed = |why: String| StateError::Malformed {
            kind: KIND.into(),
            why,
        };
        let nvram: [u8; NVRAM_LEN] = st.nvram.as_slice().try_into().map_err(|_| {
            malformed(format!(
                "{} bytes of CMOS RAM, not {NVRAM_LEN}",
                st.nvram.len()
            ))
        })?;
        if usize::from(st.index) >= NVRAM_LEN {
            return Err(malformed(format!("index {:#x} past the RAM", st.index)));
        }
        // The guest can set years 0 to 9999 only, some 3.2e11 s around now; a larger offset
        // was not saved by an RTC (and would overflow the clock arithmetic).
        if st.offset.unsigned_abs() > MAX_OFFSET {
            return Err(malformed(format!("clock offset {} s", st.offset)));
        }
        self.index = usize::from(st.index);
        self.nvram = nvram;
        // Register A's top bit (update in progress) is never stored.
        self.nvram[REG_A] &= 0x7f;
        self.offset = st.offset;
        self.repulse = self.nvram[REG_C] & C_IRQF != 0;
        self.changed.notify_all();
        Ok(())
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let v = match offset {
            0 => self.index as u8,
            _ => self.read_reg(self.index),
        };
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            // Bit 7 of the index port is the NMI mask, not part of the index.
            0 => self.index = usize::from(v & 0x7f),
            _ => self.write_reg(self.index, v),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
    use super::*;
    use rhyve_base::lifecycle::round_trip;

    fn rd(r: &mut Rtc, idx: u8) -> u8 {
        let mut d = [0u8];
        r.write(0, &[idx]);
        r.read(1, &mut d);
        d[0]
    }

    fn wr(r: &mut Rtc, idx: u8, v: u8) {
        r.write(0, &[idx]);
        r.write(1, &[v]);
    }

    #[test]
    fn civil_date_round_trip() {
        for t in [0i64, 951_782_400, 1_700_000_000, 4_102_444_800, -86_400] {
            assert_eq!(secs_from_tm(&tm_from_secs(t)), t);
        }
        let tm = tm_from_secs(951_782_400); // 2000-02-29 00:00:00, a Tuesday
        assert_eq!((tm.year, tm.mon, tm.mday, tm.wday), (2000, 2, 29, 2));
    }

    #[test]
    fn memory_fields() {
        let l = MemoryLayout::new(6 << 30).unwrap();
        let mut r = Rtc::new(&l, false, 4);
        assert_eq!(
            u16::from_le_bytes([rd(&mut r, 0x15), rd(&mut r, 0x16)]),
            640
        );
        assert_eq!(
            u16::from_le_bytes([rd(&mut r, 0x30), rd(&mut r, 0x31)]),
            63 * 1024
        );
        // 3 GiB low - 16 MiB, in 64 KiB units.
        assert_eq!(
            u16::from_le_bytes([rd(&mut r, 0x34), rd(&mut r, 0x35)]),
            ((0xc000_0000u64 - (16 << 20)) / 65536) as u16
        );
        let high = u32::from_le_bytes([rd(&mut r, 0x5b), rd(&mut r, 0x5c), rd(&mut r, 0x5d), 0]);
        assert_eq!(u64::from(high), ((6u64 << 30) - 0xc000_0000) / 65536);
        assert_eq!(rd(&mut r, 0x5f), 3);
    }

    #[test]
    fn utc_time_in_bcd_and_binary() {
        let l = MemoryLayout::new(256 << 20).unwrap();
        let mut r = Rtc::new(&l, false, 1);
        let now = tm_from_secs(host_now());
        let hour = from_bcd(rd(&mut r, HOUR as u8));
        let min = from_bcd(rd(&mut r, MIN as u8));
        let year = from_bcd(rd(&mut r, CENTURY as u8)) * 100 + from_bcd(rd(&mut r, YEAR as u8));
        assert_eq!(i64::from(year), now.year);
        let got = hour * 60 + min;
        let want = now.hour * 60 + now.min;
        assert!(
            got.abs_diff(want) <= 1 || got.abs_diff(want) == 1439,
            "{got} vs {want}"
        );
        wr(&mut r, REG_B as u8, B_24H | B_DM_BINARY);
        assert_eq!(u32::from(rd(&mut r, MONTH as u8)), now.mon);
        assert_eq!(rd(&mut r, REG_D as u8), D_VRT);
    }

    #[test]
    fn guest_sets_the_clock() {
        let l = MemoryLayout::new(256 << 20).unwrap();
        let mut r = Rtc::new(&l, false, 1);
        wr(&mut r, REG_B as u8, B_SET | B_24H);
        wr(&mut r, YEAR as u8, 0x99);
        wr(&mut r, CENTURY as u8, 0x19);
        wr(&mut r, MONTH as u8, 0x12);
        wr(&mut r, DAY as u8, 0x31);
        wr(&mut r, HOUR as u8, 0x23);
        wr(&mut r, MIN as u8, 0x59);
        wr(&mut r, SEC as u8, 0x30);
        wr(&mut r, REG_B as u8, B_24H);
        assert_eq!(rd(&mut r, YEAR as u8), 0x99);
        assert_eq!(rd(&mut r, CENTURY as u8), 0x19);
        assert_eq!(rd(&mut r, MONTH as u8), 0x12);
        // 12-hour mode: 23h is 11 PM.
        wr(&mut r, REG_B as u8, 0);
        assert_eq!(rd(&mut r, HOUR as u8), 0x80 | 0x11);
    }

    fn rtc() -> Rtc {
        Rtc::new(&MemoryLayout::new(256 << 20).unwrap(), false, 1)
    }

    /// What the guest reads back from the registers that do not move within a minute (all but
    /// the seconds), the index register first. Reading C acknowledges it, on both devices alike.
    fn guest_view(r: &mut Rtc) -> Vec<u8> {
        let mut idx = [0u8];
        r.read(0, &mut idx);
        let mut v = vec![idx[0]];
        v.extend(
            (0..NVRAM_LEN as u8)
                .filter(|&i| i != SEC as u8)
                .map(|i| rd(r, i)),
        );
        v
    }

    #[test]
    fn rtc_round_trip_keeps_clock_cmos_and_pending_interrupt() {
        let mut r = rtc();
        let irq = crate::PulseCount::default();
        r.irq = Some(Box::new(irq.clone()));
        // The guest sets the clock to 1999-06-15 12:00:00 (a minute with no rollover in it).
        wr(&mut r, REG_B as u8, B_SET | B_24H);
        for (reg, v) in [
            (CENTURY, 0x19),
            (YEAR, 0x99),
            (MONTH, 0x06),
            (DAY, 0x15),
            (HOUR, 0x12),
            (MIN, 0x00),
            (SEC, 0x00),
        ] {
            wr(&mut r, reg as u8, v);
        }
        wr(&mut r, REG_B as u8, B_24H);
        // An alarm, a 256 Hz periodic rate, both enabled; CMOS bytes of its own.
        wr(&mut r, SEC_ALARM as u8, 0xc0);
        wr(&mut r, MIN_ALARM as u8, 0x30);
        wr(&mut r, HOUR_ALARM as u8, 0x07);
        wr(&mut r, REG_A as u8, 0x28);
        wr(&mut r, REG_B as u8, B_24H | B_PIE | B_AIE);
        for i in 0x40..0x48u8 {
            wr(&mut r, i, i ^ 0xa5);
        }
        // A periodic interrupt the guest has not acknowledged yet (as the timer raises it).
        r.flag(C_PF);
        assert_eq!(irq.take(), 1);
        r.write(0, &[0x45]);

        let mut fresh = rtc();
        let irq2 = crate::PulseCount::default();
        fresh.irq = Some(Box::new(irq2.clone()));
        let (saved, again) = round_trip(&mut r, &mut fresh).unwrap();
        assert_eq!(saved, again);
        assert_eq!(saved.kind, "rtc");
        // Still paused: nothing raised by the restore.
        assert_eq!(irq2.take(), 0);
        // On resume the restored device raises the interrupt still pending in register C.
        fresh.resume();
        r.resume();
        assert_eq!(irq2.take(), 1);
        assert_eq!(irq.take(), 0, "a plain pause raises nothing again");

        let want = guest_view(&mut r);
        assert_eq!(guest_view(&mut fresh), want);
        assert_eq!(want[0], 0x45, "index register");
        // The view is the index, then registers 1-127 (seconds, at 0, left out): reg N at N.
        let at = |reg: usize| want[reg];
        assert_eq!(at(YEAR), 0x99);
        assert_eq!(at(CENTURY), 0x19);
        assert_eq!(at(HOUR), 0x12);
        assert_eq!(at(REG_A), 0x28);
        assert_eq!(at(REG_C), C_IRQF | C_PF);
        assert_eq!(at(0x47), 0x47 ^ 0xa5);
        // Register C was acknowledged by the read: the next periodic event raises IRQ 8 again.
        for (dev, line) in [(&mut r, &irq), (&mut fresh, &irq2)] {
            assert_eq!(rd(dev, REG_C as u8), 0);
            dev.flag(C_PF);
            assert_eq!(line.take(), 1);
        }
    }

    #[test]
    fn rtc_refuses_other_states() {
        let mut r = rtc();
        assert_eq!(r.save(), Err(StateError::NotPaused("rtc".into())));
        r.pause();
        let s = r.save().unwrap();
        // Saved with local time, restored into a UTC RTC.
        let mut local = Rtc::new(&MemoryLayout::new(256 << 20).unwrap(), true, 1);
        local.pause();
        assert!(matches!(
            local.restore(&s),
            Err(StateError::Malformed { .. })
        ));
        let mut short = s.clone();
        short.data["nvram"] = serde_json::json!([0, 1, 2]);
        assert!(matches!(
            r.restore(&short),
            Err(StateError::Malformed { .. })
        ));
        let mut far = s.clone();
        far.data["offset"] = serde_json::json!(i64::MAX);
        assert!(matches!(r.restore(&far), Err(StateError::Malformed { .. })));
        let mut newer = s.clone();
        newer.version = 2;
        assert!(matches!(r.restore(&newer), Err(StateError::Version { .. })));
        r.resume();
        assert_eq!(r.restore(&s), Err(StateError::NotPaused("rtc".into())));
    }

    /// Polls until `f` holds, for up to two seconds.
    fn eventually(mut f: impl FnMut() -> bool) -> bool {
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    #[test]
    fn paused_rtc_raises_no_periodic_interrupt() {
        let rtc = Arc::new(Mutex::new(rtc()));
        let irq = crate::PulseCount::default();
        start_timer(rtc.clone(), irq.clone()).unwrap();
        let lock = || rtc.lock().unwrap();
        // 1024 Hz periodic interrupt; the guest acknowledges each by reading C.
        wr(&mut lock(), REG_A as u8, 0x26);
        wr(&mut lock(), REG_B as u8, B_24H | B_PIE);
        let mut seen = 0;
        assert!(
            eventually(|| {
                seen += irq.take();
                rd(&mut lock(), REG_C as u8);
                seen >= 3
            }),
            "no periodic interrupts while running"
        );
        lock().pause();
        rd(&mut lock(), REG_C as u8);
        irq.take();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(irq.take(), 0, "IRQ 8 raised while paused");
        assert_eq!(rd(&mut lock(), REG_C as u8), 0, "flags set while paused");
        lock().resume();
        assert!(
            eventually(|| irq.take() > 0),
            "no periodic interrupt after resume"
        );
        assert_ne!(rd(&mut lock(), REG_C as u8) & (C_IRQF | C_PF), 0);
    }
}
