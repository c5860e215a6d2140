//! The one backoff of the controller: exponential, capped, with jitter in the upper half; used for
//! a failing instance's passes (from 1 s), the finalizer's retries and a token write's retries
//! within a pass (from 200 ms). The jitter's source is a test seam (a simulation's seeded
//! generator).

use std::time::Duration;

/// Doubling delays from `first`, capped at `max`.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The delay after `failures` failures in a row (the first failure waits about `first`),
    /// jittered into the upper half.
    pub fn delay(&self, failures: u32) -> Duration {
        let base = self
            .first
            .saturating_mul(1u32 << failures.saturating_sub(1).min(16));
        base.min(self.max).mul_f64(0.5 + 0.5 * jitter_fraction())
    }
}

/// Exponential backoff from 1 s, capped, with full jitter in the upper half.
pub fn backoff_delay(failures: u32, max: Duration) -> Duration {
    Backoff {
        first: Duration::from_secs(1),
        max,
    }
    .delay(failures)
}

/// Test seam: where jitter comes from in a deterministic simulation (set once per process).
static JITTER_SOURCE: std::sync::OnceLock<fn() -> f64> = std::sync::OnceLock::new();

/// Test seam: makes jitter come from `source` (a simulation's seeded generator).
pub fn set_jitter_source(source: fn() -> f64) {
    let _ = JITTER_SOURCE.set(source);
}

/// A number in [0, 1) from the system's random hasher seed (no extra dependency for jitter).
pub(super) fn jitter_fraction() -> f64 {
    if let Some(source) = JITTER_SOURCE.get() {
        return source();
    }
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(jiff::Timestamp::now().as_nanosecond() as u64);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let max = Duration::from_secs(300);
        for n in 1..40 {
            let d = backoff_delay(n, max);
            let base = Duration::from_secs(1)
                .saturating_mul(1u32 << (n - 1).min(16))
                .min(max);
            assert!(d >= base / 2 && d <= base, "n={n} d={d:?}");
        }
        let samples: std::collections::HashSet<_> =
            (0..20).map(|_| backoff_delay(10, max)).collect();
        assert!(samples.len() > 1, "jitter varies the delay");
    }
}
