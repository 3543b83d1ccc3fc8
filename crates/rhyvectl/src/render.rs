//! Turning rhyve's JSON into tables: vm.counters, vm.exit-stats (with percentiles read off the
//! latency histogram) and the live table of `--watch-exits`.
//!
//! The JSON is checked into typed values first ([`parse_counters`], [`parse_exit_stats`]); a
//! field of the wrong shape is an error naming it, never a panic.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde_json::Value;

/// vm.counters: device id -> counter name -> value.
pub type Counters = BTreeMap<String, BTreeMap<String, u64>>;

/// One exit kind's numbers (on one vCPU, or summed over them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KindStats {
    pub count: u64,
    pub total_ns: u64,
    /// `bucket_upper_ns.len() + 1` counts; see [`ExitStats::bucket_upper_ns`].
    pub buckets: Vec<u64>,
}

/// One vCPU's exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuStats {
    pub id: u64,
    pub exits: u64,
    pub kinds: BTreeMap<String, KindStats>,
}

/// vm.exit-stats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitStats {
    /// Bucket i counts times below `bucket_upper_ns[i]` (and at least the bucket before's
    /// bound); the last bucket, one past these, counts times of at least the last bound.
    pub bucket_upper_ns: Vec<u64>,
    pub vcpus: Vec<VcpuStats>,
}

fn uint(v: &Value, what: &dyn Fn() -> String) -> Result<u64, String> {
    v.as_u64()
        .ok_or_else(|| format!("{} is not an unsigned integer: {v}", what()))
}

fn object<'a>(
    v: &'a Value,
    what: &dyn Fn() -> String,
) -> Result<&'a serde_json::Map<String, Value>, String> {
    v.as_object()
        .ok_or_else(|| format!("{} is not an object", what()))
}

fn array<'a>(v: &'a Value, what: &dyn Fn() -> String) -> Result<&'a Vec<Value>, String> {
    v.as_array()
        .ok_or_else(|| format!("{} is not an array", what()))
}

fn field<'a>(
    obj: &'a serde_json::Map<String, Value>,
    name: &str,
    what: &str,
) -> Result<&'a Value, String> {
    obj.get(name)
        .ok_or_else(|| format!("{what} has no \"{name}\""))
}

/// Checks vm.counters' body.
pub fn parse_counters(v: &Value) -> Result<Counters, String> {
    let mut out = Counters::new();
    for (dev, counters) in object(v, &|| "vm.counters".into())? {
        let mut m = BTreeMap::new();
        for (name, value) in object(counters, &|| format!("vm.counters {dev}"))? {
            m.insert(
                name.clone(),
                uint(value, &|| format!("vm.counters {dev}.{name}"))?,
            );
        }
        out.insert(dev.clone(), m);
    }
    Ok(out)
}

/// Checks vm.exit-stats' body: the bounds rise, and every histogram has one bucket more.
pub fn parse_exit_stats(v: &Value) -> Result<ExitStats, String> {
    let top = object(v, &|| "vm.exit-stats".into())?;
    let mut bucket_upper_ns = Vec::new();
    for (i, b) in array(field(top, "bucket_upper_ns", "vm.exit-stats")?, &|| {
        "vm.exit-stats bucket_upper_ns".into()
    })?
    .iter()
    .enumerate()
    {
        let n = uint(b, &|| format!("vm.exit-stats bucket_upper_ns[{i}]"))?;
        if bucket_upper_ns.last().is_some_and(|&last| last >= n) {
            return Err(format!(
                "vm.exit-stats bucket_upper_ns does not rise at [{i}] ({n})"
            ));
        }
        bucket_upper_ns.push(n);
    }
    if bucket_upper_ns.is_empty() {
        return Err("vm.exit-stats bucket_upper_ns is empty".into());
    }
    let want = bucket_upper_ns.len() + 1;
    let mut vcpus = Vec::new();
    for (i, vcpu) in array(field(top, "vcpus", "vm.exit-stats")?, &|| {
        "vm.exit-stats vcpus".into()
    })?
    .iter()
    .enumerate()
    {
        let where_ = format!("vm.exit-stats vcpus[{i}]");
        let obj = object(vcpu, &|| where_.clone())?;
        let id = uint(field(obj, "id", &where_)?, &|| format!("{where_}.id"))?;
        let exits = uint(field(obj, "exits", &where_)?, &|| format!("{where_}.exits"))?;
        let mut kinds = BTreeMap::new();
        for (name, k) in object(field(obj, "kinds", &where_)?, &|| format!("{where_}.kinds"))? {
            let at = format!("{where_}.kinds.{name}");
            let ko = object(k, &|| at.clone())?;
            let count = uint(field(ko, "count", &at)?, &|| format!("{at}.count"))?;
            let total_ns = uint(field(ko, "total_ns", &at)?, &|| format!("{at}.total_ns"))?;
            let raw = array(field(ko, "buckets", &at)?, &|| format!("{at}.buckets"))?;
            if raw.len() != want {
                return Err(format!(
                    "{at}.buckets has {} entries, expected {want} (one more than bucket_upper_ns)",
                    raw.len()
                ));
            }
            let buckets = raw
                .iter()
                .enumerate()
                .map(|(j, b)| uint(b, &|| format!("{at}.buckets[{j}]")))
                .collect::<Result<Vec<_>, _>>()?;
            kinds.insert(
                name.clone(),
                KindStats {
                    count,
                    total_ns,
                    buckets,
                },
            );
        }
        vcpus.push(VcpuStats { id, exits, kinds });
    }
    Ok(ExitStats {
        bucket_upper_ns,
        vcpus,
    })
}

/// Where a percentile falls in the histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Percentile {
    /// No samples.
    Empty,
    /// In the bucket below this bound (ns).
    Below(u64),
    /// In the last bucket: at least this bound (ns).
    AtLeast(u64),
}

impl fmt::Display for Percentile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Percentile::Empty => f.pad("-"),
            Percentile::Below(ns) => f.pad(&format!("<{}", format_ns(*ns as f64))),
            Percentile::AtLeast(ns) => f.pad(&format!(">={}", format_ns(*ns as f64))),
        }
    }
}

/// The bucket holding the `pct`-th percentile (0 < pct <= 100) of the samples in `buckets`:
/// the first bucket where the running count reaches ceil(pct% of all samples).
pub fn percentile(buckets: &[u64], upper_ns: &[u64], pct: u32) -> Percentile {
    let total: u128 = buckets.iter().map(|&b| u128::from(b)).sum();
    if total == 0 {
        return Percentile::Empty;
    }
    let pct = u128::from(pct.clamp(1, 100));
    let rank = (total * pct).div_ceil(100).max(1);
    let mut seen: u128 = 0;
    for (i, &b) in buckets.iter().enumerate() {
        seen += u128::from(b);
        if seen >= rank {
            return match upper_ns.get(i) {
                Some(&u) => Percentile::Below(u),
                None => upper_ns
                    .last()
                    .map_or(Percentile::Empty, |&u| Percentile::AtLeast(u)),
            };
        }
    }
    Percentile::Empty
}

/// A time in ns to three significant digits: `312ns`, `8.19us`, `16.4us`, `1.05ms`, `1.07s`.
pub fn format_ns(ns: f64) -> String {
    if !ns.is_finite() || ns < 0.0 {
        return "-".into();
    }
    if ns < 999.5 {
        return format!("{ns:.0}ns");
    }
    let units = [("us", 1e3), ("ms", 1e6), ("s", 1e9)];
    let mut out = String::new();
    for (i, (unit, scale)) in units.iter().enumerate() {
        let v = ns / scale;
        if v < 999.5 || i == units.len() - 1 {
            out = if v < 9.995 {
                format!("{v:.2}{unit}")
            } else if v < 99.95 {
                format!("{v:.1}{unit}")
            } else {
                format!("{v:.0}{unit}")
            };
            break;
        }
    }
    out
}

/// Exits per second, three significant digits or a whole number.
fn format_rate(r: f64) -> String {
    if !r.is_finite() || r < 0.0 {
        "-".into()
    } else if r < 100.0 {
        format!("{r:.1}")
    } else {
        format!("{r:.0}")
    }
}

fn mean(k: &KindStats) -> String {
    if k.count == 0 {
        "-".into()
    } else {
        format_ns(k.total_ns as f64 / k.count as f64)
    }
}

#[derive(Clone, Copy)]
enum Align {
    Left,
    Right,
}

/// Columns two spaces apart, each as wide as its widest cell; no trailing spaces.
fn table(out: &mut String, columns: &[(&str, Align)], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = columns.iter().map(|(h, _)| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let header: Vec<String> = columns.iter().map(|(h, _)| (*h).to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, ((cell, w), (_, align))) in row.iter().zip(&widths).zip(columns).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            match align {
                Align::Left => line.push_str(&format!("{cell:<w$}")),
                Align::Right => line.push_str(&format!("{cell:>w$}")),
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// Kinds busiest first (then by name), as rows are listed.
fn by_count(kinds: &BTreeMap<String, KindStats>) -> Vec<(&String, &KindStats)> {
    let mut v: Vec<_> = kinds.iter().collect();
    v.sort_by(|a, b| b.1.count.cmp(&a.1.count).then_with(|| a.0.cmp(b.0)));
    v
}

/// The device counters table of `--get-stats`.
pub fn render_counters(c: &Counters) -> String {
    let mut out = String::from("device counters:\n");
    let rows: Vec<Vec<String>> = c
        .iter()
        .flat_map(|(dev, m)| {
            m.iter()
                .map(move |(name, v)| vec![dev.clone(), name.clone(), v.to_string()])
        })
        .collect();
    if rows.is_empty() {
        out.push_str("(no devices with counters)\n");
        return out;
    }
    table(
        &mut out,
        &[
            ("DEVICE", Align::Left),
            ("COUNTER", Align::Left),
            ("VALUE", Align::Right),
        ],
        &rows,
    );
    out
}

/// The per-vCPU exit table of `--get-stats`.
pub fn render_exit_stats(s: &ExitStats) -> String {
    let total: u64 = s.vcpus.iter().map(|v| v.exits).fold(0, u64::saturating_add);
    let mut out = format!(
        "exits per vCPU ({} vCPU{}, {total} exits; times are exit handling):\n",
        s.vcpus.len(),
        if s.vcpus.len() == 1 { "" } else { "s" }
    );
    let mut rows = Vec::new();
    for vcpu in &s.vcpus {
        if vcpu.kinds.is_empty() {
            rows.push(vec![
                vcpu.id.to_string(),
                "(none)".into(),
                "0".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        }
        for (name, k) in by_count(&vcpu.kinds) {
            rows.push(vec![
                vcpu.id.to_string(),
                name.clone(),
                k.count.to_string(),
                mean(k),
                percentile(&k.buckets, &s.bucket_upper_ns, 50).to_string(),
                percentile(&k.buckets, &s.bucket_upper_ns, 99).to_string(),
            ]);
        }
    }
    table(
        &mut out,
        &[
            ("VCPU", Align::Left),
            ("KIND", Align::Left),
            ("COUNT", Align::Right),
            ("MEAN", Align::Right),
            ("P50", Align::Right),
            ("P99", Align::Right),
        ],
        &rows,
    );
    out
}

/// The exit kinds summed over all vCPUs (counts, times and buckets added).
pub fn sum_kinds(s: &ExitStats) -> BTreeMap<String, KindStats> {
    let mut out: BTreeMap<String, KindStats> = BTreeMap::new();
    for vcpu in &s.vcpus {
        for (name, k) in &vcpu.kinds {
            let sum = out.entry(name.clone()).or_insert_with(|| KindStats {
                buckets: vec![0; k.buckets.len()],
                ..KindStats::default()
            });
            sum.count = sum.count.saturating_add(k.count);
            sum.total_ns = sum.total_ns.saturating_add(k.total_ns);
            for (a, b) in sum.buckets.iter_mut().zip(&k.buckets) {
                *a = a.saturating_add(*b);
            }
        }
    }
    out
}

/// One frame of `--watch-exits`: `now` summed over vCPUs, with rates against `prev` (the sample
/// `elapsed` before); without one the rates are `-`.
pub fn render_watch(
    s: &ExitStats,
    prev: Option<(&BTreeMap<String, KindStats>, Duration)>,
    sample: u64,
    interval: Duration,
) -> String {
    let now = sum_kinds(s);
    let secs = prev.map(|(_, e)| e.as_secs_f64()).filter(|&e| e > 0.0);
    let rate = |name: &str, count: u64| -> Option<f64> {
        let (p, _) = prev?;
        let before = p.get(name).map_or(0, |k| k.count);
        // A count going down means the statistics restarted (a reset): no rate this time.
        let d = count.checked_sub(before)?;
        Some(d as f64 / secs?)
    };
    let total: u64 = now.values().map(|k| k.count).fold(0, u64::saturating_add);
    let before: u64 = prev.map_or(0, |(p, _)| {
        p.values().map(|k| k.count).fold(0, u64::saturating_add)
    });
    let total_rate = match (prev, secs) {
        (Some(_), Some(e)) => total.checked_sub(before).map(|d| d as f64 / e),
        _ => None,
    };
    let mut out = format!(
        "exits summed over {} vCPU{}, sample {sample} (every {}): {total} exits, {}/s\n",
        s.vcpus.len(),
        if s.vcpus.len() == 1 { "" } else { "s" },
        format_secs(interval),
        total_rate.map_or("-".into(), format_rate),
    );
    let rows: Vec<Vec<String>> = by_count(&now)
        .into_iter()
        .map(|(name, k)| {
            vec![
                name.clone(),
                k.count.to_string(),
                rate(name, k.count).map_or("-".into(), format_rate),
                percentile(&k.buckets, &s.bucket_upper_ns, 50).to_string(),
                percentile(&k.buckets, &s.bucket_upper_ns, 99).to_string(),
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            ("KIND", Align::Left),
            ("TOTAL", Align::Right),
            ("EXITS/S", Align::Right),
            ("P50", Align::Right),
            ("P99", Align::Right),
        ],
        &rows,
    );
    out
}

/// An interval as given: `1s`, `0.25s`.
fn format_secs(d: Duration) -> String {
    let s = format!("{:.3}", d.as_secs_f64());
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}s")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// rhyve's bounds: 256 ns doubling to 2^30 ns.
    fn bounds() -> Vec<u64> {
        (8..=30).map(|s| 1u64 << s).collect()
    }

    fn buckets(pairs: &[(usize, u64)]) -> Vec<u64> {
        let mut b = vec![0; 24];
        for &(i, n) in pairs {
            b[i] = n;
        }
        b
    }

    /// A canned vm.exit-stats: vCPU 0 with IO (1000: 600 <4.1us, 390 <8.19us, 10 <65.5us) and
    /// HLT (200: 150 <1.05ms, 47 <268ms, 3 >=1.07s); vCPU 1 with IO only (10 <8.19us) and MMIO (1 <256ns).
    fn canned() -> Value {
        serde_json::json!({
            "bucket_upper_ns": bounds(),
            "vcpus": [
                {"id": 0, "exits": 1200, "kinds": {
                    "IO": {"count": 1000, "total_ns": 5_000_000,
                           "buckets": buckets(&[(4, 600), (5, 390), (8, 10)])},
                    "HLT": {"count": 200, "total_ns": 2_000_000_000u64,
                            "buckets": buckets(&[(12, 150), (20, 47), (23, 3)])}
                }},
                {"id": 1, "exits": 11, "kinds": {
                    "IO": {"count": 10, "total_ns": 60_000, "buckets": buckets(&[(5, 10)])},
                    "MMIO": {"count": 1, "total_ns": 200, "buckets": buckets(&[(0, 1)])}
                }}
            ]
        })
    }

    #[test]
    fn format_ns_three_digits() {
        let cases: &[(f64, &str)] = &[
            (0.0, "0ns"),
            (256.0, "256ns"),
            (999.0, "999ns"),
            (999.6, "1.00us"),
            (1024.0, "1.02us"),
            (8192.0, "8.19us"),
            (16384.0, "16.4us"),
            (131072.0, "131us"),
            (999_999.0, "1.00ms"),
            (1_048_576.0, "1.05ms"),
            (1_073_741_824.0, "1.07s"),
            (5e12, "5000s"),
            (f64::NAN, "-"),
        ];
        for &(ns, want) in cases {
            assert_eq!(format_ns(ns), want, "{ns}");
        }
    }

    #[test]
    fn percentiles_from_buckets() {
        let u = bounds();
        let io = buckets(&[(4, 600), (5, 390), (8, 10)]);
        // Rank 500 of 1000 is in bucket 4 (< 4096 ns); rank 990 ends bucket 5; 991 spills.
        assert_eq!(percentile(&io, &u, 50), Percentile::Below(4096));
        assert_eq!(percentile(&io, &u, 99), Percentile::Below(8192));
        assert_eq!(percentile(&io, &u, 100), Percentile::Below(65536));
        let spill = buckets(&[(4, 600), (5, 389), (8, 11)]);
        assert_eq!(percentile(&spill, &u, 99), Percentile::Below(65536));
        // The last bucket is open-ended.
        let last = buckets(&[(0, 1), (23, 1)]);
        assert_eq!(percentile(&last, &u, 50), Percentile::Below(256));
        assert_eq!(percentile(&last, &u, 99), Percentile::AtLeast(1 << 30));
        assert_eq!(percentile(&buckets(&[]), &u, 50), Percentile::Empty);
        // One sample: every percentile is its bucket.
        let one = buckets(&[(7, 1)]);
        assert_eq!(percentile(&one, &u, 1), Percentile::Below(32768));
        assert_eq!(percentile(&one, &u, 99), Percentile::Below(32768));
        assert_eq!(Percentile::Below(256).to_string(), "<256ns");
        assert_eq!(Percentile::AtLeast(1 << 30).to_string(), ">=1.07s");
        assert_eq!(Percentile::Empty.to_string(), "-");
        assert_eq!(format!("{:>8}", Percentile::Below(8192)), " <8.19us");
    }

    #[test]
    fn parse_checks_the_shape() {
        let s = parse_exit_stats(&canned()).unwrap();
        assert_eq!(s.bucket_upper_ns.len(), 23);
        assert_eq!(s.vcpus.len(), 2);
        assert_eq!(s.vcpus[0].kinds["HLT"].count, 200);

        let mut bad = canned();
        bad["vcpus"][1]["kinds"]["IO"]["buckets"] = serde_json::json!([1, 2, 3]);
        let e = parse_exit_stats(&bad).unwrap_err();
        assert_eq!(
            e,
            "vm.exit-stats vcpus[1].kinds.IO.buckets has 3 entries, expected 24 (one more than bucket_upper_ns)"
        );
        let mut bad = canned();
        bad["vcpus"][0]["kinds"]["HLT"]["count"] = serde_json::json!(-1);
        assert_eq!(
            parse_exit_stats(&bad).unwrap_err(),
            "vm.exit-stats vcpus[0].kinds.HLT.count is not an unsigned integer: -1"
        );
        let mut bad = canned();
        bad["bucket_upper_ns"][3] = serde_json::json!(10);
        assert!(parse_exit_stats(&bad)
            .unwrap_err()
            .contains("does not rise at [3]"));
        let mut bad = canned();
        bad["vcpus"][0].as_object_mut().unwrap().remove("exits");
        assert_eq!(
            parse_exit_stats(&bad).unwrap_err(),
            "vm.exit-stats vcpus[0] has no \"exits\""
        );
        assert!(parse_exit_stats(&serde_json::json!([])).is_err());
        assert!(
            parse_exit_stats(&serde_json::json!({"bucket_upper_ns": [], "vcpus": []}))
                .unwrap_err()
                .contains("empty")
        );

        let c = parse_counters(&serde_json::json!({"_disk0": {"read_ops": 3}})).unwrap();
        assert_eq!(c["_disk0"]["read_ops"], 3);
        assert_eq!(
            parse_counters(&serde_json::json!({"_disk0": {"read_ops": "3"}})).unwrap_err(),
            "vm.counters _disk0.read_ops is not an unsigned integer: \"3\""
        );
        assert!(parse_counters(&serde_json::json!({"_disk0": 3})).is_err());
    }

    #[test]
    fn exit_stats_table() {
        let s = parse_exit_stats(&canned()).unwrap();
        assert_eq!(
            render_exit_stats(&s),
            "\
exits per vCPU (2 vCPUs, 1211 exits; times are exit handling):
VCPU  KIND  COUNT    MEAN      P50      P99
0     IO     1000  5.00us  <4.10us  <8.19us
0     HLT     200  10.0ms  <1.05ms  >=1.07s
1     IO       10  6.00us  <8.19us  <8.19us
1     MMIO      1   200ns   <256ns   <256ns
"
        );
        // p99 is rank 198 of 200: with 3 HLT exits in the last bucket it falls there; with 1,
        // in the bucket before (< 2^28 ns).
        let mut fewer = s.clone();
        fewer.vcpus[0].kinds.get_mut("HLT").unwrap().buckets =
            buckets(&[(12, 150), (20, 49), (23, 1)]);
        assert!(
            render_exit_stats(&fewer).contains("\n0     HLT     200  10.0ms  <1.05ms   <268ms\n")
        );
    }

    #[test]
    fn counters_table() {
        let c = parse_counters(&serde_json::json!({
            "_net0": {"rx_bytes": 1500, "tx_frames": 2},
            "_disk0": {"read_bytes": 1048576, "read_ops": 256}
        }))
        .unwrap();
        assert_eq!(
            render_counters(&c),
            "\
device counters:
DEVICE  COUNTER       VALUE
_disk0  read_bytes  1048576
_disk0  read_ops        256
_net0   rx_bytes       1500
_net0   tx_frames         2
"
        );
        assert_eq!(
            render_counters(&Counters::new()),
            "device counters:\n(no devices with counters)\n"
        );
    }

    #[test]
    fn watch_frames() {
        let s = parse_exit_stats(&canned()).unwrap();
        let sum = sum_kinds(&s);
        assert_eq!(sum["IO"].count, 1010);
        assert_eq!(sum["IO"].buckets[5], 400);
        let first = render_watch(&s, None, 1, Duration::from_secs(1));
        assert_eq!(
            first,
            "\
exits summed over 2 vCPUs, sample 1 (every 1s): 1211 exits, -/s
KIND  TOTAL  EXITS/S      P50      P99
IO     1010        -  <4.10us  <8.19us
HLT     200        -  <1.05ms  >=1.07s
MMIO      1        -   <256ns   <256ns
"
        );
        // Half a second earlier there were 10 fewer IO exits and no MMIO ones yet.
        let mut prev = sum.clone();
        prev.get_mut("IO").unwrap().count -= 10;
        prev.remove("MMIO");
        let second = render_watch(
            &s,
            Some((&prev, Duration::from_millis(500))),
            2,
            Duration::from_millis(500),
        );
        assert_eq!(
            second,
            "\
exits summed over 2 vCPUs, sample 2 (every 0.5s): 1211 exits, 22.0/s
KIND  TOTAL  EXITS/S      P50      P99
IO     1010     20.0  <4.10us  <8.19us
HLT     200      0.0  <1.05ms  >=1.07s
MMIO      1      2.0   <256ns   <256ns
"
        );
        // Counts that went down (a reset) give no rate rather than a huge one.
        let mut more = sum.clone();
        more.get_mut("HLT").unwrap().count += 5000;
        let third = render_watch(
            &s,
            Some((&more, Duration::from_secs(1))),
            3,
            Duration::from_secs(1),
        );
        assert!(third.contains("\nHLT     200        -"), "{third}");
        assert!(third.contains("1211 exits, -/s"), "{third}");
    }
}
