//! Counts for the `summary` line: lines per event kind, joins, losses per source, and the
//! close-to-wire latency distribution (a log-linear histogram: bounded memory, ~1.6% error).

use std::collections::BTreeMap;

use serde::Serialize;

/// Sub-buckets per power of two: 64 gives a relative error under 1/64.
const SUB_BUCKET_BITS: u32 = 6;
const SUB_BUCKETS: u64 = 1 << SUB_BUCKET_BITS;

/// A histogram of non-negative nanosecond values.
#[derive(Clone, Debug, Default)]
pub struct Histogram {
    buckets: BTreeMap<u32, u64>,
    count: u64,
    max: u64,
}

impl Histogram {
    pub fn record(&mut self, value: u64) {
        *self.buckets.entry(bucket_of(value)).or_default() += 1;
        self.count += 1;
        self.max = self.max.max(value);
    }

    pub fn max(&self) -> Option<u64> {
        (self.count > 0).then_some(self.max)
    }

    /// The value at quantile `q` (0..=1), as the lower bound of its bucket (never above max).
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (&bucket, &n) in &self.buckets {
            seen += n;
            if seen >= rank {
                return Some(lower_bound(bucket).min(self.max));
            }
        }
        Some(self.max)
    }
}

fn bucket_of(value: u64) -> u32 {
    if value < SUB_BUCKETS {
        return value as u32;
    }
    let magnitude = 63 - value.leading_zeros(); // >= SUB_BUCKET_BITS
    let shift = magnitude - SUB_BUCKET_BITS;
    let sub = (value >> shift) & (SUB_BUCKETS - 1);
    ((shift + 1) << SUB_BUCKET_BITS) | sub as u32
}

fn lower_bound(bucket: u32) -> u64 {
    let group = bucket >> SUB_BUCKET_BITS;
    let sub = (bucket as u64) & (SUB_BUCKETS - 1);
    if group == 0 {
        return sub;
    }
    let shift = group - 1;
    (SUB_BUCKETS | sub) << shift
}

/// Losses by where they happened.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Lost {
    pub ringbuf: u64,
    pub capture: u64,
    pub output: u64,
    /// Program runs the kernel skipped: another BPF program was running on that CPU.
    pub hooks: u64,
    /// Socket events the programs dropped because the owner table (sized at start-up) had no
    /// room for their socket.
    pub owner_table: u64,
}

impl Lost {
    /// The sources by name, in the order `by_source` gives them (a source's place is its
    /// number for the output's `lost` lines).
    pub const SOURCES: [&str; 5] = ["ringbuf", "capture", "output", "hooks", "owner_table"];

    /// Each source's count, in the order of SOURCES.
    pub fn by_source(&self) -> [u64; Self::SOURCES.len()] {
        [
            self.ringbuf,
            self.capture,
            self.output,
            self.hooks,
            self.owner_table,
        ]
    }

    /// The same, to update.
    pub fn by_source_mut(&mut self) -> [&mut u64; Self::SOURCES.len()] {
        [
            &mut self.ringbuf,
            &mut self.capture,
            &mut self.output,
            &mut self.hooks,
            &mut self.owner_table,
        ]
    }
}

#[derive(Serialize)]
pub struct Percentiles {
    pub p50: Option<u64>,
    pub p99: Option<u64>,
    pub max: Option<u64>,
}

/// What the kernel programs counted (from the per-CPU COUNTERS map).
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct KernelCounts {
    /// Events written to the ring buffer.
    pub emitted: u64,
    /// Events dropped in the kernel by --pid/--port (they never reached userspace).
    pub filtered: u64,
    /// Sockets whose owner could not be recorded because the owner table was full.
    pub owner_table_full: u64,
    /// FIN/RST packets the capture's kernel filter passed to the daemon.
    pub captured: u64,
    /// Closes held in the kernel for their RST that the programs never released; the daemon
    /// took them out of the map and wrote them (never expected: a teardown path they do not
    /// know). Counted by the daemon, not the programs.
    pub held_closes_rescued: u64,
}

/// Running totals for the summary.
#[derive(Default)]
pub struct Stats {
    pub lines: BTreeMap<&'static str, u64>,
    /// Events that wanted a wire packet and got one / did not.
    pub joined: u64,
    pub unjoined: u64,
    pub lost: Lost,
    pub close_to_wire: Histogram,
    pub kernel: KernelCounts,
    /// The tracer's own cost when the run stopped, while its ring buffer and capture ring were
    /// still mapped (they are most of its resident memory: measured after they are gone, the
    /// summary said half of what `ps` showed during the run).
    pub own_cost_at_stop: Option<OwnCost>,
}

impl Stats {
    pub fn count_line(&mut self, event: &'static str) {
        *self.lines.entry(event).or_default() += 1;
    }

    pub fn percentiles(&self) -> Percentiles {
        Percentiles {
            p50: self.close_to_wire.quantile(0.50),
            p99: self.close_to_wire.quantile(0.99),
            max: self.close_to_wire.max(),
        }
    }
}

/// What the tracer itself cost, for the summary: its CPU time (user and system, every thread),
/// its peak resident memory, as the kernel accounts them (getrusage, /proc's VmHWM), and its resident memory
/// now: the peak is usually set at start-up (loading the programs parses the kernel's BTF), so
/// only the current value shows whether memory grew over a long run.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct OwnCost {
    pub cpu_s: f64,
    pub peak_rss_mib: f64,
    pub rss_mib: f64,
}

impl OwnCost {
    /// For a log line: milliseconds of CPU, KiB of memory.
    pub fn now() -> Self {
        let usage = OwnUsage::now();
        Self {
            cpu_s: round3(usage.cpu_s),
            peak_rss_mib: round3(usage.peak_rss_bytes as f64 / (1024.0 * 1024.0)),
            rss_mib: round3(usage.rss_bytes as f64 / (1024.0 * 1024.0)),
        }
    }
}

/// The same, unrounded, in the units Prometheus wants.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OwnUsage {
    pub cpu_s: f64,
    pub peak_rss_bytes: u64,
    pub rss_bytes: u64,
}

impl OwnUsage {
    pub fn now() -> Self {
        // SAFETY: getrusage fills the struct it is given.
        let usage = unsafe {
            let mut usage = std::mem::zeroed::<libc::rusage>();
            if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
                return Self::default();
            }
            usage
        };
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Self {
            cpu_s: secs(usage.ru_utime) + secs(usage.ru_stime),
            // ru_maxrss is in KiB on Linux. It comes from the kernel's per-CPU approximate
            // counters, which may lag /proc's VmHWM (summed exactly since 6.x) by a few pages:
            // the larger of the two, so the summary never reports less than `ps` showed.
            peak_rss_bytes: (usage.ru_maxrss as u64 * 1024).max(peak_resident_bytes().unwrap_or(0)),
            rss_bytes: resident_bytes().unwrap_or(0),
        }
    }
}

/// The process's resident memory now (/proc/self/statm's second field, in pages).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf with a valid name.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// The process's peak resident memory as /proc/self/status's VmHWM (in KiB) says.
fn peak_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    let kib: u64 = kib.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// Three decimals: milliseconds of CPU, KiB of memory; more would be noise in a log line.
fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_values_are_exact() {
        for v in 0..SUB_BUCKETS {
            assert_eq!(lower_bound(bucket_of(v)), v);
        }
    }

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for v in (1..10_000_000u64).step_by(997) {
            let b = bucket_of(v);
            assert!(b >= last, "bucket order at {v}");
            last = b;
            let low = lower_bound(b);
            assert!(low <= v, "{low} <= {v}");
            assert!(
                (v - low) as f64 <= v as f64 / 64.0 + 1.0,
                "error at {v}: {low}"
            );
        }
        let top = lower_bound(bucket_of(u64::MAX));
        assert!(
            top > u64::MAX - u64::MAX / 32,
            "the largest value lands in the last bucket: {top}"
        );
    }

    #[test]
    fn quantiles() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile(0.5), None);
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5).unwrap();
        assert!((490_000..=500_000).contains(&p50), "{p50}");
        let p99 = h.quantile(0.99).unwrap();
        assert!((975_000..=990_000).contains(&p99), "{p99}");
        assert_eq!(h.max(), Some(1_000_000));
        assert_eq!(h.count, 1000);
    }

    #[test]
    fn one_value() {
        let mut h = Histogram::default();
        h.record(14_000);
        assert_eq!(h.max(), Some(14_000));
        let p = h.quantile(0.99).unwrap();
        assert!((13_700..=14_000).contains(&p), "{p}");
    }
}
