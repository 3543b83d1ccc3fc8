//! MC146818 RTC and CMOS RAM at ports 0x70-0x71 (bhyve `rtc.c` with the kernel's `vrtc.c`).
//!
//! The clock is read from the host on every access, plus an offset the guest sets by writing
//! the time registers; local time or UTC per `rtc.use_localtime` (-u). The memory-size bytes
//! firmware reads (base, extended, above 16 MiB and above 4 GiB) are filled in from the layout.
//! Periodic, alarm and update-ended interrupts come from a timer thread (`start_timer`) and go
//! out on ISA IRQ 8 when register C's IRQF goes from clear to set; reading C clears it.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::bus::BusDevice;
use crate::hypervisor::MemoryLayout;

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

pub struct Rtc {
    index: usize,
    nvram: [u8; 128],
    localtime: bool,
    /// Guest time minus host time, in seconds.
    offset: i64,
    /// IRQ 8, when a timer thread drives interrupts.
    irq: Option<crate::devices::IrqLine>,
    /// Wakes the timer thread when the rate or the enables change.
    changed: Arc<Condvar>,
}

fn to_bcd(v: u32) -> u8 {
    (((v / 10) << 4) | (v % 10)) as u8
}

fn from_bcd(v: u8) -> u32 {
    u32::from(v >> 4) * 10 + u32::from(v & 0xf)
}

fn host_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
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

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

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
            let v = v.min(0xffff);
            nv[at] = v as u8;
            nv[at + 1] = (v >> 8) as u8;
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
        nvram[0x5b] = high as u8;
        nvram[0x5c] = (high >> 8) as u8;
        nvram[0x5d] = (high >> 16) as u8;
        // Number of CPUs minus one, where SeaBIOS looks for it.
        nvram[0x5f] = cpus.saturating_sub(1).min(255) as u8;
        Rtc {
            index: 0,
            nvram,
            localtime,
            offset: 0,
            irq: None,
            changed: Arc::new(Condvar::new()),
        }
    }

    /// Sets flags in register C; raises IRQ 8 if an enabled one makes IRQF go from 0 to 1.
    fn flag(&mut self, flags: u8) {
        let c = self.nvram[REG_C] | flags;
        let enabled = (self.nvram[REG_B] & (B_PIE | B_AIE | B_UIE)) & c;
        let fire = enabled != 0 && self.nvram[REG_C] & C_IRQF == 0;
        self.nvram[REG_C] = if enabled != 0 { c | C_IRQF } else { c };
        if fire {
            if let Some(irq) = &self.irq {
                if let Err(e) = vm_superio::Trigger::trigger(irq) {
                    log::warn!("RTC IRQ 8: {e}");
                }
            }
        }
    }

    /// The periodic interrupt's period (register A rate select), if on.
    fn period(&self) -> Option<Duration> {
        let rate = u32::from(self.nvram[REG_A] & 0x0f);
        if self.nvram[REG_B] & B_PIE == 0 || rate == 0 {
            return None;
        }
        // 32.768 kHz time base: rates 1 and 2 behave as 8 and 9.
        let rate = if rate < 3 { rate + 7 } else { rate };
        Some(Duration::from_nanos(1_000_000_000 >> (15 - (rate - 1))))
    }

    fn alarm_matches(&self, tm: &Tm) -> bool {
        // An alarm byte with the top two bits set matches any value.
        let hit = |reg: usize, v: u32, hour: bool| {
            let a = self.nvram[reg];
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
        now + zone + self.offset
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
            h12 + 12
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
                DOW => self.encode(tm.wday + 1),
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
            _ => self.nvram[idx],
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
                    self.nvram[DOW] = self.encode(tm.wday + 1);
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
            _ => self.nvram[idx] = v,
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
            year: i64::from(self.decode(self.nvram[CENTURY])) * 100
                + i64::from(self.decode(self.nvram[YEAR]) % 100),
        };
        let now = host_now();
        let zone = if self.localtime { local_offset(now) } else { 0 };
        self.offset = secs_from_tm(&tm) - (now + zone);
    }
}

/// Drives the RTC's interrupts: periodic at the rate register A selects, update-ended and
/// alarm once a second (on the host's second boundary). Sleeps on the RTC's condvar, so a
/// rate or enable change takes effect at once.
pub fn start_timer(rtc: Arc<Mutex<Rtc>>, irq: crate::devices::IrqLine) -> std::io::Result<()> {
    let changed = {
        let mut r = rtc.lock().unwrap_or_else(|p| p.into_inner());
        r.irq = Some(irq);
        r.changed.clone()
    };
    crate::thread::spawn(crate::thread::Role::Timer, "rtc", move || {
        let mut next_periodic: Option<Instant> = None;
        let mut next_second =
            Instant::now() + Duration::from_nanos(1_000_000_000 - u64::from(now_subsec_nanos()));
        loop {
            let mut r = rtc.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            match (r.period(), next_periodic) {
                (Some(p), Some(t)) if now >= t => {
                    r.flag(C_PF);
                    next_periodic = Some(t + p);
                    // Do not try to catch up after a long stall: skip missed periods.
                    if next_periodic.is_some_and(|n| n < now) {
                        next_periodic = Some(now + p);
                    }
                }
                (Some(p), None) => next_periodic = Some(now + p),
                (None, _) => next_periodic = None,
                _ => {}
            }
            if now >= next_second {
                r.second_tick();
                next_second += Duration::from_secs(1);
            }
            let wake = next_periodic.map_or(next_second, |p| p.min(next_second));
            let timeout = wake.saturating_duration_since(Instant::now());
            let _ = changed.wait_timeout(r, timeout);
        }
    })?;
    Ok(())
}

fn now_subsec_nanos() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
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
    use super::*;

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
}
