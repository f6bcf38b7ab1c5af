//! The clock the traced threads stamp records with, and the conversion of its ticks to
//! `CLOCK_MONOTONIC` nanoseconds.
//!
//! Reading the TSC costs a few nanoseconds where `clock_gettime` costs twenty or more, so the
//! hot path stamps raw ticks and the recorder converts them afterwards. That is only sound
//! when the TSC runs at one rate on every CPU and never stops (`constant_tsc` and
//! `nonstop_tsc`); elsewhere the records carry `CLOCK_MONOTONIC` nanoseconds directly.
//!
//! The conversion is the straight line through two (ticks, ns) samples the recorder takes far
//! apart (at its start and at its end), computed in 128-bit integers so that no rounding
//! accumulates over a long trace.

use serde::{Deserialize, Serialize};

/// Where record times come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Clock {
    /// The time-stamp counter (`rdtsc`): ticks at a constant rate.
    #[serde(rename = "tsc")]
    Tsc,
    /// `CLOCK_MONOTONIC` nanoseconds.
    #[serde(rename = "ns")]
    MonotonicNs,
}

impl Clock {
    /// The TSC when this machine's TSC is usable across CPUs and sleep states (x86-64 with
    /// `constant_tsc` and `nonstop_tsc` in `/proc/cpuinfo`), else `CLOCK_MONOTONIC`.
    ///
    /// It reads `/proc/cpuinfo`: call it once at startup, not on a hot path.
    pub fn detect() -> Clock {
        if cfg!(target_arch = "x86_64") {
            if let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") {
                if tsc_is_stable(&info) {
                    return Clock::Tsc;
                }
            }
        }
        Clock::MonotonicNs
    }

    /// The current time in this clock's ticks.
    ///
    /// On the traced program's hot path: allocates nothing, takes no lock and is
    /// async-signal-safe (`rdtsc`, or `clock_gettime` through the vDSO).
    #[inline(always)]
    pub fn now(self) -> u64 {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `rdtsc` has no preconditions on x86-64; it only reads the counter.
            // (`unused_unsafe`: newer compilers declare the intrinsic safe.)
            #[allow(unused_unsafe)]
            Clock::Tsc => unsafe { core::arch::x86_64::_rdtsc() },
            _ => monotonic_ns(),
        }
    }

    /// The name in trace files: `tsc` or `ns`.
    pub fn name(self) -> &'static str {
        match self {
            Clock::Tsc => "tsc",
            Clock::MonotonicNs => "ns",
        }
    }

    /// The number stored in a ring file's header.
    pub(crate) fn to_raw(self) -> u32 {
        match self {
            Clock::Tsc => 1,
            Clock::MonotonicNs => 2,
        }
    }

    /// The clock a ring file's header number stands for.
    pub(crate) fn from_raw(raw: u32) -> Option<Clock> {
        match raw {
            1 => Some(Clock::Tsc),
            2 => Some(Clock::MonotonicNs),
            _ => None,
        }
    }
}

/// Whether the first `flags` line of a `/proc/cpuinfo` text names both `constant_tsc` and
/// `nonstop_tsc`.
fn tsc_is_stable(cpuinfo: &str) -> bool {
    let Some(flags) = cpuinfo.lines().find(|l| l.starts_with("flags")) else { return false };
    let has = |flag: &str| flags.split_whitespace().any(|f| f == flag);
    has("constant_tsc") && has("nonstop_tsc")
}

/// `CLOCK_MONOTONIC` now, in nanoseconds: async-signal-safe, and never the C library's
/// `clock_gettime`, which the traced program's own probes may be on (the hot path stamps
/// records inside the program's calls): the vDSO's `__vdso_clock_gettime` called directly
/// (vdso(7)) through the gate light detours' proofs know (`dynprobe_text::raw`), leaving
/// `errno` alone.
#[inline(always)]
pub fn monotonic_ns() -> u64 {
    dynprobe_text::raw::monotonic_ns()
}

/// Converts a clock's ticks to `CLOCK_MONOTONIC` nanoseconds: the line through the samples
/// (`t0`, `ns0`) and (`t1`, `ns1`).
///
/// ```
/// use dynprobe_events::clock::{Calibration, Clock};
/// // A 3 GHz TSC: 3 ticks a nanosecond.
/// let cal = Calibration { kind: Clock::Tsc, t0: 3_000, ns0: 1_000, t1: 3_003_000, ns1: 1_001_000 };
/// assert_eq!(cal.to_ns(6_000), 2_000);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Calibration {
    /// The clock the ticks come from; for [`Clock::MonotonicNs`] the conversion is the
    /// identity and the samples are only kept for the record.
    pub kind: Clock,
    /// Ticks of the first sample.
    pub t0: u64,
    /// `CLOCK_MONOTONIC` ns of the first sample.
    pub ns0: u64,
    /// Ticks of the second sample.
    pub t1: u64,
    /// `CLOCK_MONOTONIC` ns of the second sample.
    pub ns1: u64,
}

impl Calibration {
    /// A calibration from one sample (the rate is unknown until a second one is added with
    /// [`Calibration::with_end`]: until then one tick counts as one nanosecond).
    pub fn start(kind: Clock, (t0, ns0): (u64, u64)) -> Calibration {
        Calibration { kind, t0, ns0, t1: t0, ns1: ns0 }
    }

    /// This calibration with its second sample replaced by `(t1, ns1)`.
    pub fn with_end(self, (t1, ns1): (u64, u64)) -> Calibration {
        Calibration { t1, ns1, ..self }
    }

    /// `ticks` in `CLOCK_MONOTONIC` nanoseconds (saturating at 0 and `u64::MAX`).
    pub fn to_ns(&self, ticks: u64) -> u64 {
        if self.kind == Clock::MonotonicNs {
            return ticks;
        }
        let dt = self.t1 as i128 - self.t0 as i128;
        let dns = self.ns1 as i128 - self.ns0 as i128;
        let offset = ticks as i128 - self.t0 as i128;
        // With samples too close to tell a rate (or taken backwards), one tick per ns is the
        // least surprising answer: the order of events is still right.
        let scaled = if dt > 0 && dns > 0 { offset * dns / dt } else { offset };
        (self.ns0 as i128 + scaled).clamp(0, u64::MAX as i128) as u64
    }
}

/// One (ticks, `CLOCK_MONOTONIC` ns) sample of `clock`, taken so that the two readings are
/// as close in time as this machine allows: the tick reading is bracketed by two ns readings,
/// the tightest of a few tries wins, and its midpoint is the ns value.
pub fn sample(clock: Clock) -> (u64, u64) {
    let mut best = (0, 0);
    let mut best_spread = u64::MAX;
    for _ in 0..8 {
        let before = monotonic_ns();
        let ticks = clock.now();
        let after = monotonic_ns();
        let spread = after.saturating_sub(before);
        if spread < best_spread {
            best_spread = spread;
            best = (ticks, before + spread / 2);
        }
    }
    if clock == Clock::MonotonicNs {
        // The ticks are nanoseconds themselves: pair them with themselves.
        best.1 = best.0;
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo_flags_decide_the_tsc() {
        let line = |flags: &str| format!("processor\t: 0\nflags\t\t: fpu {flags} sse\nbugs\t\t:\n");
        assert!(tsc_is_stable(&line("tsc constant_tsc nonstop_tsc")));
        assert!(!tsc_is_stable(&line("tsc constant_tsc")));
        assert!(!tsc_is_stable(&line("tsc nonstop_tsc")));
        // A flag that merely contains the name does not count.
        assert!(!tsc_is_stable(&line("xconstant_tsc nonstop_tsc")));
        assert!(!tsc_is_stable("processor\t: 0\n"));
    }

    #[test]
    fn monotonic_calibration_is_the_identity() {
        let cal = Calibration { kind: Clock::MonotonicNs, t0: 5, ns0: 999, t1: 7, ns1: 12345 };
        for t in [0, 1, 5, 1 << 40, u64::MAX] {
            assert_eq!(cal.to_ns(t), t);
        }
    }

    #[test]
    fn tsc_calibration_is_exact_over_long_spans() {
        // 2.5 ticks per ns, samples an hour apart: a float would drift here, u128 does not.
        let hour = 3_600_000_000_000u64;
        let cal =
            Calibration { kind: Clock::Tsc, t0: 10_000, ns0: 7_000, t1: 10_000 + hour / 2 * 5, ns1: 7_000 + hour };
        assert_eq!(cal.to_ns(10_000), 7_000);
        assert_eq!(cal.to_ns(10_005), 7_002);
        assert_eq!(cal.to_ns(10_000 + hour / 2 * 5), 7_000 + hour);
        // Beyond the samples the line goes on, and before them too, down to 0.
        assert_eq!(cal.to_ns(10_000 + hour * 5), 7_000 + 2 * hour);
        assert_eq!(cal.to_ns(5_000), 5_000);
        assert_eq!(cal.to_ns(0), 3_000);
        let early = Calibration { ns0: 1, ..cal };
        assert_eq!(early.to_ns(0), 0, "saturates at 0");
    }

    #[test]
    fn one_sample_counts_ticks_as_ns() {
        let cal = Calibration::start(Clock::Tsc, (100, 1_000));
        assert_eq!(cal.to_ns(150), 1_050);
        let cal = cal.with_end((300, 1_100));
        assert_eq!(cal.to_ns(150), 1_025);
    }

    #[test]
    fn detected_clock_moves_forward_and_matches_monotonic() {
        let clock = Clock::detect();
        let first = sample(clock);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let t = clock.now();
        let ns = monotonic_ns();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let cal = Calibration::start(clock, first).with_end(sample(clock));
        assert!(cal.t1 > cal.t0 && cal.ns1 > cal.ns0);
        // The converted mid reading lands within a millisecond of the real one.
        let converted = cal.to_ns(t);
        assert!(converted.abs_diff(ns) < 1_000_000, "{clock:?}: converted {converted} vs {ns}");
    }
}
