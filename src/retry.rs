//! The one place that decides when a failed message is tried again.

use std::time::Duration;

/// Delay before attempt `attempt + 1`, after `attempt` (1-based) failed transiently:
/// `base · 2^(attempt-1)`, capped at `cap`, then jittered into its upper half so that
/// a burst of failures does not come back as a burst.
pub fn next_delay(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let exp = attempt.saturating_sub(1).min(30);
    let full = base.saturating_mul(1 << exp).min(cap);
    let half = full / 2;
    half + half.mul_f64(fastrand::f64())
}

/// Capped exponential delays for in-process retries (reconnects, token fetches).
pub fn reconnect_backoff(max: Duration) -> backon::ExponentialBuilder {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_then_caps_within_jitter() {
        let (base, cap) = (Duration::from_secs(30), Duration::from_secs(3600));
        for attempt in 1..=40 {
            let full = (base * 2u32.pow(attempt.min(31) - 1)).min(cap);
            let d = next_delay(attempt, base, cap);
            assert!(
                d >= full / 2 && d <= full,
                "attempt {attempt}: {d:?} vs {full:?}"
            );
        }
        assert!(next_delay(3, base, cap) >= Duration::from_secs(60));
    }
}
