//! How long to wait after a failed attempt: exponential, capped, with jitter, and never
//! less than the server asked for.

use std::time::Duration;

/// The most a server's retry hint (`Failure.retryAfterMs`) can make a client wait: a
/// larger hint (a server bug, a clock gone wrong) is cut down to this.
pub(crate) const RETRY_AFTER_CAP: Duration = Duration::from_secs(300);

/// Consecutive failures and the delays they earn.
///
/// "Equal jitter": after the n-th consecutive failure the wait is between half of and all
/// of `min(initial * 2^n, max)`. The fixed half guarantees a pause (so a dead server is not
/// hammered); the random half spreads agents that lost the same server at the same moment,
/// so they do not all come back in lockstep when it restarts.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    /// Failures since the last success.
    failures: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            failures: 0,
        }
    }

    /// The wait before the next attempt; counts one more failure. `retry_after` is the
    /// server's hint, if the failure carried one ([`crate::ClientError::retry_after`]): the
    /// wait is at least that (up to [`RETRY_AFTER_CAP`]), even beyond the usual cap.
    pub fn next_delay(&mut self, retry_after: Option<Duration>) -> Duration {
        let delay = delay(self.initial, self.max, self.failures, rand::random::<f64>());
        self.failures = self.failures.saturating_add(1);
        at_least_the_hint(delay, retry_after)
    }

    /// After a success: the next failure waits about `initial` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// `delay`, raised to the server's hint (itself capped at [`RETRY_AFTER_CAP`]).
pub(super) fn at_least_the_hint(delay: Duration, retry_after: Option<Duration>) -> Duration {
    match retry_after {
        Some(hint) => delay.max(hint.min(RETRY_AFTER_CAP)),
        None => delay,
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
        let first: Vec<Duration> = (0..5).map(|_| backoff.next_delay(None)).collect();
        for (n, d) in first.iter().enumerate() {
            let ceiling = delay(100 * MS, 30_000 * MS, n as u32, 1.0);
            assert!(*d >= ceiling / 2 && *d <= ceiling, "{n}: {d:?}");
        }
        backoff.reset();
        let again = backoff.next_delay(None);
        assert!(again >= 50 * MS && again <= 100 * MS, "{again:?}");
    }

    #[test]
    fn a_server_hint_is_a_lower_bound_up_to_its_cap() {
        let (initial, max) = (100 * MS, 30_000 * MS);
        // A hint above the computed wait (and above the backoff's own cap) wins.
        assert_eq!(at_least_the_hint(150 * MS, Some(6_000 * MS)), 6_000 * MS);
        assert_eq!(at_least_the_hint(max, Some(60_000 * MS)), 60_000 * MS);
        // Below it, the backoff's wait stands.
        assert_eq!(at_least_the_hint(800 * MS, Some(200 * MS)), 800 * MS);
        assert_eq!(at_least_the_hint(800 * MS, None), 800 * MS);
        // An absurd hint is cut down.
        assert_eq!(
            at_least_the_hint(800 * MS, Some(Duration::from_secs(86_400 * 365))),
            RETRY_AFTER_CAP
        );
        // The hint does not reset the doubling: the failure still counts.
        let mut backoff = Backoff::new(initial, max);
        assert_eq!(backoff.next_delay(Some(5_000 * MS)), 5_000 * MS);
        let next = backoff.next_delay(None);
        assert!(next >= 100 * MS && next <= 200 * MS, "{next:?}");
    }

    /// What the syncer and `capsync follow` sleep after a hinted failure: under a paused
    /// clock, exactly the hint, although the backoff alone would wait at most 200ms.
    #[tokio::test(start_paused = true)]
    async fn sleeping_after_a_hint_takes_at_least_the_hint() {
        let mut backoff = Backoff::new(100 * MS, 200 * MS);
        let start = tokio::time::Instant::now();
        tokio::time::sleep(backoff.next_delay(Some(6_000 * MS))).await;
        let waited = start.elapsed();
        assert!(waited >= 6_000 * MS && waited <= 6_001 * MS, "{waited:?}");
        let again = tokio::time::Instant::now();
        tokio::time::sleep(backoff.next_delay(None)).await;
        assert!(again.elapsed() <= 201 * MS, "{:?}", again.elapsed());
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
            let d = backoff.next_delay(None);
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
