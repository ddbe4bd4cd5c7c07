//! How long to wait after a failed attempt: exponential, capped, with jitter.

use std::time::Duration;

/// Consecutive failures and the delays they earn.
///
/// "Equal jitter": after the n-th consecutive failure the wait is between half of and all
/// of `min(initial * 2^n, max)`. The fixed half guarantees a pause (so a dead server is not
/// hammered); the random half spreads agents that lost the same server at the same moment,
/// so they do not all come back in lockstep when it restarts.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    /// Failures since the last success.
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            failures: 0,
        }
    }

    /// The wait before the next attempt; counts one more failure.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = delay(self.initial, self.max, self.failures, rand::random::<f64>());
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// After a success: the next failure waits about `initial` again.
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

/// The wait after `failures` earlier consecutive failures, for a `jitter` in `[0, 1]`.
pub(super) fn delay(initial: Duration, max: Duration, failures: u32, jitter: f64) -> Duration {
    let factor = 1u32.checked_shl(failures).unwrap_or(u32::MAX);
    let ceiling = initial.checked_mul(factor).unwrap_or(max).min(max);
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let half = ceiling / 2;
    half + (ceiling - half).mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_from_the_initial_delay_up_to_the_cap() {
        let (initial, max) = (100 * MS, 30_000 * MS);
        let ceilings: Vec<Duration> = (0..12).map(|n| delay(initial, max, n, 1.0)).collect();
        assert_eq!(
            ceilings,
            [
                100, 200, 400, 800, 1600, 3200, 6400, 12_800, 25_600, 30_000, 30_000, 30_000
            ]
            .map(|ms| ms * MS)
        );
        // Far past the point where 2^n overflows: still the cap, no panic.
        assert_eq!(delay(initial, max, 40, 1.0), max);
        assert_eq!(delay(initial, max, u32::MAX, 0.0), max / 2);
    }

    #[test]
    fn jitter_stays_between_half_and_all_of_the_step() {
        let (initial, max) = (100 * MS, 30_000 * MS);
        for failures in 0..12 {
            let ceiling = delay(initial, max, failures, 1.0);
            assert_eq!(delay(initial, max, failures, 0.0), ceiling / 2);
            assert_eq!(delay(initial, max, failures, 0.5), ceiling * 3 / 4);
            // Out-of-range and NaN jitter is clamped, never a panic.
            assert_eq!(delay(initial, max, failures, 7.0), ceiling);
            assert_eq!(delay(initial, max, failures, f64::NAN), ceiling / 2);
        }
    }

    #[test]
    fn a_success_starts_over() {
        let mut backoff = Backoff::new(100 * MS, 30_000 * MS);
        let first: Vec<Duration> = (0..5).map(|_| backoff.next_delay()).collect();
        for (n, d) in first.iter().enumerate() {
            let ceiling = delay(100 * MS, 30_000 * MS, n as u32, 1.0);
            assert!(*d >= ceiling / 2 && *d <= ceiling, "{n}: {d:?}");
        }
        backoff.reset();
        let again = backoff.next_delay();
        assert!(again >= 50 * MS && again <= 100 * MS, "{again:?}");
    }

    #[test]
    fn a_cap_below_the_initial_delay_wins() {
        assert_eq!(delay(5_000 * MS, 1_000 * MS, 0, 1.0), 1_000 * MS);
    }

    /// The delays are what the syncer sleeps: under a paused clock, sleeping each one
    /// advances time by their sum (rounded up to the timer's millisecond per sleep),
    /// whatever the jitter drew.
    #[tokio::test(start_paused = true)]
    async fn sleeping_the_delays_takes_exactly_their_sum() {
        let mut backoff = Backoff::new(100 * MS, 1_000 * MS);
        let start = tokio::time::Instant::now();
        let mut total = Duration::ZERO;
        for _ in 0..8 {
            let d = backoff.next_delay();
            total += d;
            tokio::time::sleep(d).await;
        }
        let elapsed = start.elapsed();
        assert!(
            elapsed >= total && elapsed <= total + 8 * MS,
            "{elapsed:?} vs {total:?}"
        );
        // 50..100, 100..200, 200..400, 400..800, then four at the 500..1000 cap.
        assert!(total >= 2_750 * MS && total <= 5_500 * MS, "{total:?}");
    }
}
