//! Live VM-exit statistics, always on: per vCPU and per exit kind, how many exits and how
//! long rhyve took over each, from KVM_RUN returning to the vCPU entering it again, in a
//! log2 histogram (bhyvectl `--get-stats`, with latencies). Each vCPU writes only its own
//! counters (relaxed atomic adds on lines no other vCPU writes), so keeping them costs two
//! clock reads and three adds per exit (BENCHMARKS.md: the exit path with them on against the
//! raw KVM loop). The API serves them (`vm.exit-stats`); `-o debug.exit_stats=true` prints
//! them when the VM ends.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Map, Value};

use super::run_page::{exit_name, NR_EXIT_REASONS};

/// Histogram buckets: bucket 0 counts exits under 256 ns, bucket i (1..=22) those from
/// 2^(i+7) to 2^(i+8) ns, bucket 23 those of 2^30 ns (about a second) or more.
pub const BUCKETS: usize = 24;

/// The bucket of an exit that took `ns`.
pub fn bucket(ns: u64) -> usize {
    let log2 = 63usize.saturating_sub(ns.leading_zeros() as usize);
    if ns < 256 {
        0
    } else {
        log2.saturating_sub(7).min(BUCKETS - 1)
    }
}

/// The upper bounds (exclusive, in ns) of buckets 0 to 22; bucket 23 has none.
pub fn bucket_upper_ns() -> Vec<u64> {
    (0..BUCKETS - 1).map(|i| 1u64 << (i + 8)).collect()
}

#[derive(Default)]
struct Kind {
    count: AtomicU64,
    total_ns: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
}

/// One vCPU's exits by kind.
pub struct VcpuExits {
    kinds: Box<[Kind]>,
}

impl VcpuExits {
    fn new() -> Self {
        VcpuExits {
            kinds: (0..NR_EXIT_REASONS).map(|_| Kind::default()).collect(),
        }
    }

    /// Counts one exit of KVM exit reason `reason` that took `ns`.
    pub fn record(&self, reason: u32, ns: u64) {
        let Some(k) = self.kinds.get(reason as usize) else {
            return;
        };
        k.count.fetch_add(1, Ordering::Relaxed);
        k.total_ns.fetch_add(ns, Ordering::Relaxed);
        if let Some(b) = k.buckets.get(bucket(ns)) {
            b.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The kinds seen, as (name without KVM_EXIT_, count, total ns, buckets).
    fn seen(&self) -> Vec<(&'static str, u64, u64, Vec<u64>)> {
        self.kinds
            .iter()
            .enumerate()
            .filter_map(|(i, k)| {
                let count = k.count.load(Ordering::Relaxed);
                (count > 0).then(|| {
                    let name = exit_name(i as u32);
                    let buckets = k
                        .buckets
                        .iter()
                        .map(|b| b.load(Ordering::Relaxed))
                        .collect();
                    (
                        name.strip_prefix("KVM_EXIT_").unwrap_or(name),
                        count,
                        k.total_ns.load(Ordering::Relaxed),
                        buckets,
                    )
                })
            })
            .collect()
    }
}

/// Every vCPU's exit statistics, by vCPU id.
pub struct ExitStats {
    vcpus: Vec<VcpuExits>,
}

/// The upper bound of the bucket that holds the `pct` percentile of `buckets`, in ns, or
/// `None` when it falls in the open last bucket.
pub fn percentile(buckets: &[u64], pct: u64) -> Option<u64> {
    let total: u64 = buckets.iter().sum();
    let want = total.saturating_mul(pct).div_ceil(100).max(1);
    let mut seen = 0u64;
    let upper = bucket_upper_ns();
    for (i, n) in buckets.iter().enumerate() {
        seen = seen.saturating_add(*n);
        if seen >= want {
            return upper.get(i).copied();
        }
    }
    None
}

fn show_ns(ns: Option<u64>) -> String {
    match ns {
        None => ">=1.07s".into(),
        Some(n) if n < 1_000 => format!("<{n}ns"),
        Some(n) if n < 1_000_000 => format!("<{:.1}us", n as f64 / 1e3),
        Some(n) => format!("<{:.1}ms", n as f64 / 1e6),
    }
}

impl ExitStats {
    pub fn new(vcpus: u32) -> Self {
        ExitStats {
            vcpus: (0..vcpus).map(|_| VcpuExits::new()).collect(),
        }
    }

    /// vCPU `id`'s counters.
    pub fn vcpu(&self, id: u32) -> Option<&VcpuExits> {
        self.vcpus.get(id as usize)
    }

    /// The API's `vm.exit-stats` document (docs/api/openapi.yaml, ExitStats).
    pub fn to_json(&self) -> Value {
        let vcpus: Vec<Value> = self
            .vcpus
            .iter()
            .enumerate()
            .map(|(id, v)| {
                let mut kinds = Map::new();
                let mut exits = 0u64;
                for (name, count, total_ns, buckets) in v.seen() {
                    exits = exits.saturating_add(count);
                    kinds.insert(
                        name.to_string(),
                        json!({"count": count, "total_ns": total_ns, "buckets": buckets}),
                    );
                }
                json!({"id": id, "exits": exits, "kinds": kinds})
            })
            .collect();
        json!({"bucket_upper_ns": bucket_upper_ns(), "vcpus": vcpus})
    }

    /// A table for stderr: per vCPU and kind, the count, mean, p50 and p99.
    pub fn table(&self) -> String {
        let mut out = String::from(
            "exit latency (KVM_RUN return to re-entry), per vCPU:\n  vcpu  kind                    count      mean       p50       p99\n",
        );
        for (id, v) in self.vcpus.iter().enumerate() {
            for (name, count, total_ns, buckets) in v.seen() {
                let mean = total_ns / count.max(1);
                let _ = writeln!(
                    out,
                    "  {id:>4}  {name:<20} {count:>8} {:>9} {:>9} {:>9}",
                    format!("{:.1}us", mean as f64 / 1e3),
                    show_ns(percentile(&buckets, 50)),
                    show_ns(percentile(&buckets, 99)),
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_land_in_log2_buckets_and_percentiles_read_them() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(255), 0);
        assert_eq!(bucket(256), 1);
        assert_eq!(bucket(511), 1);
        assert_eq!(bucket(512), 2);
        assert_eq!(bucket((1 << 30) - 1), 22);
        assert_eq!(bucket(1 << 30), 23);
        assert_eq!(bucket(u64::MAX), 23);
        assert_eq!(bucket_upper_ns().len(), BUCKETS - 1);
        let s = ExitStats::new(2);
        let v = s.vcpu(1).expect("vcpu 1");
        for _ in 0..98 {
            v.record(2, 300); // KVM_EXIT_IO, bucket 1
        }
        v.record(2, 5000); // bucket 5: [4096, 8192)
        v.record(2, 2 << 30); // the open bucket
        v.record(5, 100); // KVM_EXIT_HLT
        v.record(9999, 1); // no such reason: ignored
        assert!(s.vcpu(2).is_none());
        let j = s.to_json();
        assert_eq!(j["vcpus"][0]["exits"], 0);
        assert_eq!(j["vcpus"][1]["exits"], 101);
        let io = &j["vcpus"][1]["kinds"]["IO"];
        assert_eq!(io["count"], 100);
        assert_eq!(io["buckets"][1], 98);
        assert_eq!(io["buckets"][5], 1);
        assert_eq!(io["buckets"][23], 1);
        assert_eq!(j["vcpus"][1]["kinds"]["HLT"]["buckets"][0], 1);
        let b: Vec<u64> = serde_json::from_value(io["buckets"].clone()).expect("buckets");
        assert_eq!(percentile(&b, 50), Some(512));
        assert_eq!(percentile(&b, 99), Some(8192));
        assert_eq!(percentile(&b, 100), None);
        let t = s.table();
        assert!(
            t.contains("IO") && t.contains("<512ns") && t.contains("<8.2us"),
            "{t}"
        );
    }
}
