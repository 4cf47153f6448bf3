//! Kernel events are stamped with CLOCK_MONOTONIC (bpf_ktime_get_ns), packets with the wall
//! clock (libpcap): the offset between the two, measured tightly and re-measured while running
//! so that an NTP step or slew does not break the join.

use std::sync::{
    Arc,
    atomic::{AtomicI64, Ordering},
};

/// Offset between CLOCK_REALTIME and CLOCK_MONOTONIC.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// realtime_ns - monotonic_ns at the last sample.
    pub offset_ns: i128,
}

fn read(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a timespec to fill.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// CLOCK_MONOTONIC now, in nanoseconds: the clock of bpf_ktime_get_ns().
pub fn now_mono_ns() -> u64 {
    read(libc::CLOCK_MONOTONIC) as u64
}

/// CLOCK_REALTIME now, in nanoseconds: the clock the capture stamps packets with.
pub fn now_wall_ns() -> u64 {
    read(libc::CLOCK_REALTIME) as u64
}

impl Clock {
    /// Reads MONO, REAL, MONO a few times and keeps the tightest bracket, REAL against the
    /// midpoint (the way bpftrace does it): the error is at most half the bracket.
    pub fn sample() -> Self {
        let mut best: Option<(i128, i128)> = None; // (bracket width, offset)
        for _ in 0..5 {
            let before = read(libc::CLOCK_MONOTONIC);
            let real = read(libc::CLOCK_REALTIME);
            let after = read(libc::CLOCK_MONOTONIC);
            let width = after - before;
            let offset = real - (before + width / 2);
            if best.is_none_or(|(w, _)| width < w) {
                best = Some((width, offset));
            }
        }
        Self {
            offset_ns: best.expect("five samples").1,
        }
    }

    pub fn mono_to_wall_ns(&self, mono: u64) -> u64 {
        (mono as i128 + self.offset_ns).max(0) as u64
    }

    pub fn wall_to_mono_ns(&self, wall: u64) -> u64 {
        (wall as i128 - self.offset_ns).max(0) as u64
    }
}

/// The offset shared with the capture thread, refreshed by the main loop about once a second.
#[derive(Clone, Debug)]
pub struct SharedClock(Arc<AtomicI64>);

impl Default for SharedClock {
    fn default() -> Self {
        Self::new()
    }
}

impl SharedClock {
    pub fn new() -> Self {
        Self(Arc::new(AtomicI64::new(Clock::sample().offset_ns as i64)))
    }

    pub fn refresh(&self) {
        self.0
            .store(Clock::sample().offset_ns as i64, Ordering::Relaxed);
    }

    pub fn get(&self) -> Clock {
        Clock {
            offset_ns: self.0.load(Ordering::Relaxed) as i128,
        }
    }
}

/// RFC 3339 in UTC with nanoseconds: `2026-11-24T13:51:42.123456789Z`.
pub fn rfc3339_nanos(wall_ns: u64) -> String {
    Rfc3339(wall_ns).to_string()
}

/// A wall-clock instant (Unix nanoseconds) that prints as RFC 3339 UTC with nanoseconds, and
/// serialises as that string without building it first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rfc3339(pub u64);

impl Rfc3339 {
    /// The 30 bytes of `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`, written digit by digit: every line
    /// carries one or two of these, and `write!` with padded fields was a visible share of the
    /// daemon's CPU. Years past 9999 are out of range for a u64 of nanoseconds anyway.
    pub fn to_bytes(self) -> [u8; 30] {
        let secs = self.0 / 1_000_000_000;
        let mut out = *b"0000-00-00T00:00:00.000000000Z";
        out[..SECOND_PREFIX].copy_from_slice(&second_prefix(secs));
        put_digits(&mut out[20..29], self.0 % 1_000_000_000);
        out
    }

    /// The same as text.
    pub fn as_text(self, buf: &mut [u8; 30]) -> &str {
        *buf = self.to_bytes();
        std::str::from_utf8(buf).expect("ASCII digits")
    }
}

/// `YYYY-MM-DDTHH:MM:SS.`
const SECOND_PREFIX: usize = 20;

/// The date and time of day of a Unix second, remembered for the last second asked: lines
/// written in one second (tens of thousands under churn) share it.
fn second_prefix(secs: u64) -> [u8; SECOND_PREFIX] {
    thread_local! {
        static LAST: std::cell::Cell<(u64, [u8; SECOND_PREFIX])> =
            const { std::cell::Cell::new((u64::MAX, [0; SECOND_PREFIX])) };
    }
    LAST.with(|last| {
        let (cached_secs, cached) = last.get();
        if cached_secs == secs {
            return cached;
        }
        let (days, rem) = (secs / 86_400, secs % 86_400);
        let (y, m, d) = civil_from_days(days as i64);
        let mut out = *b"0000-00-00T00:00:00.";
        put_digits(&mut out[0..4], y as u64);
        put_digits(&mut out[5..7], m.into());
        put_digits(&mut out[8..10], d.into());
        put_digits(&mut out[11..13], rem / 3600);
        put_digits(&mut out[14..16], rem / 60 % 60);
        put_digits(&mut out[17..19], rem % 60);
        last.set((secs, out));
        out
    })
}

/// Writes `value` as decimal digits filling `out` (zero-padded on the left).
fn put_digits(out: &mut [u8], mut value: u64) {
    for slot in out.iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

impl std::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_text(&mut [0; 30]))
    }
}

impl serde::Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339_nanos(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            rfc3339_nanos(951_782_400_000_000_001),
            "2000-02-29T00:00:00.000000001Z"
        );
        assert_eq!(
            rfc3339_nanos(1_795_528_302_123_456_789),
            "2026-11-24T13:51:42.123456789Z"
        );
    }

    /// The remembered second serves only that second: neighbours and going back are exact.
    #[test]
    fn the_remembered_second_is_only_used_for_that_second() {
        let t = 1_795_528_302_000_000_000;
        for (ns, text) in [
            (t + 5, "2026-11-24T13:51:42.000000005Z"),
            (t + 999_999_999, "2026-11-24T13:51:42.999999999Z"),
            (t + 1_000_000_000, "2026-11-24T13:51:43.000000000Z"),
            (t - 1, "2026-11-24T13:51:41.999999999Z"),
            (t + 86_400_000_000_000, "2026-11-25T13:51:42.000000000Z"),
            (t + 7, "2026-11-24T13:51:42.000000007Z"),
        ] {
            assert_eq!(rfc3339_nanos(ns), text);
        }
    }

    #[test]
    fn offset_matches_the_system_clock() {
        let clock = Clock::sample();
        let wall = clock.mono_to_wall_ns(now_mono_ns());
        let system = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        assert!(wall.abs_diff(system) < 50_000_000, "{wall} vs {system}");
        assert_eq!(clock.wall_to_mono_ns(clock.mono_to_wall_ns(12_345)), 12_345);
    }

    #[test]
    fn shared_clock_refreshes() {
        let shared = SharedClock::new();
        let before = shared.get().offset_ns;
        shared.refresh();
        assert!((shared.get().offset_ns - before).abs() < 50_000_000);
    }
}
