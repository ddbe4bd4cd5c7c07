//! The server's one source of "now": the system clock in a running server, a
//! clock a test moves by hand otherwise.
//!
//! Every time the server compares (token expiry, inactivity cutoffs, the time
//! an op was applied, presence windows) is read here, so a test can make a
//! month pass without waiting or writing the database behind the server's back.
//! Several server nodes each read their own system clock; the times they store
//! are as far apart as their clocks are (keep them synchronised, e.g. with NTP).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// A cheap handle to a clock, in Unix milliseconds (the wire's unit).
#[derive(Clone, Default)]
pub struct Clock {
    source: Source,
}

#[derive(Clone, Default)]
enum Source {
    #[default]
    System,
    /// Stands at this time until moved.
    Manual(Arc<AtomicI64>),
    /// The system clock plus this many milliseconds.
    Shifted(Arc<AtomicI64>),
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// A clock that stands at `start_ms` until [`Clock::advance`] or
    /// [`Clock::rewind`] moves it.
    pub fn manual(start_ms: i64) -> Self {
        Self {
            source: Source::Manual(Arc::new(AtomicI64::new(start_ms))),
        }
    }

    /// The system clock, which [`Clock::advance`] and [`Clock::rewind`] shift:
    /// time goes on as usual, from wherever it was moved to.
    pub fn shifted() -> Self {
        Self {
            source: Source::Shifted(Arc::new(AtomicI64::new(0))),
        }
    }

    pub fn now_millis(&self) -> i64 {
        match &self.source {
            Source::System => capsync_shared::now_millis(),
            Source::Manual(ms) => ms.load(Ordering::Acquire),
            Source::Shifted(offset) => {
                capsync_shared::now_millis().saturating_add(offset.load(Ordering::Acquire))
            }
        }
    }

    /// Moves the clock forward by `by` (every handle sees it).
    ///
    /// # Panics
    /// On the system clock, which no one moves.
    pub fn advance(&self, by: Duration) {
        self.shift(millis(by));
    }

    /// Moves the clock back by `by`: what happens next happened `by` earlier.
    ///
    /// # Panics
    /// On the system clock, which no one moves.
    pub fn rewind(&self, by: Duration) {
        self.shift(-millis(by));
    }

    fn shift(&self, ms: i64) {
        let (Source::Manual(value) | Source::Shifted(value)) = &self.source else {
            panic!("only a test's clock can be moved");
        };
        value.fetch_add(ms, Ordering::AcqRel);
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Source::System => f.write_str("Clock::system"),
            Source::Manual(ms) => write!(f, "Clock::manual({})", ms.load(Ordering::Acquire)),
            Source::Shifted(ms) => write!(f, "Clock::shifted({:+})", ms.load(Ordering::Acquire)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced_and_every_handle_sees_it() {
        let clock = Clock::manual(1_000);
        let other = clock.clone();
        assert_eq!(clock.now_millis(), 1_000);
        other.advance(Duration::from_secs(2));
        assert_eq!(clock.now_millis(), 3_000);
    }

    #[test]
    fn a_shifted_clock_runs_from_where_it_was_moved() {
        let clock = Clock::shifted();
        clock.rewind(Duration::from_secs(3600));
        let before = capsync_shared::now_millis() - 3_600_000;
        let now = clock.now_millis();
        assert!(now >= before && now <= capsync_shared::now_millis() - 3_600_000);
        clock.advance(Duration::from_secs(3600));
        assert!(clock.now_millis() >= before + 3_600_000);
    }

    #[test]
    fn the_system_clock_reads_the_time() {
        let before = capsync_shared::now_millis();
        let now = Clock::system().now_millis();
        assert!(now >= before && now <= capsync_shared::now_millis());
    }
}
