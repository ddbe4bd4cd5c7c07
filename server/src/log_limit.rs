//! Log lines an attacker cannot multiply: repeated events of one kind are
//! summarised, so no input makes the log grow faster than a fixed rate.
//!
//! The first event of a kind in each interval is logged in full by the caller;
//! the rest are only counted, and [`LogLimiter::flush`] (run every interval by
//! the server) writes one line per kind with the count. Whatever a peer does,
//! each kind costs at most two lines per interval.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Level;

/// Counts repeated events per kind. Cheap to clone, `Send`.
#[derive(Clone, Debug)]
pub struct LogLimiter {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    interval: Duration,
    windows: Mutex<HashMap<&'static str, Window>>,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    /// Events counted but not logged since the window started.
    suppressed: u64,
    /// The level the kind's events are logged at; its summary uses the same.
    level: Level,
}

impl LogLimiter {
    pub fn new(interval: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                interval: interval.max(Duration::from_millis(1)),
                windows: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Whether to log this event of `kind` in full: true for the first one in
    /// an interval, false (and counted for the summary) for the rest.
    pub fn allow(&self, kind: &'static str, level: Level) -> bool {
        let now = Instant::now();
        let mut windows = self.windows();
        match windows.get_mut(kind) {
            Some(window) if now.duration_since(window.started) < self.inner.interval => {
                window.suppressed += 1;
                false
            }
            Some(window) => {
                // The last window's count is reported by `flush`; a new window
                // that starts before it ran keeps counting on top of it.
                window.started = now;
                true
            }
            None => {
                windows.insert(
                    kind,
                    Window {
                        started: now,
                        suppressed: 0,
                        level,
                    },
                );
                true
            }
        }
    }

    /// Logs one line for each kind whose events were counted but not logged,
    /// and resets the counts.
    pub fn flush(&self) {
        let interval = humantime::format_duration(self.inner.interval);
        let mut windows = self.windows();
        for (kind, window) in windows.iter_mut() {
            let count = std::mem::take(&mut window.suppressed);
            if count == 0 {
                continue;
            }
            match window.level {
                Level::ERROR => {
                    tracing::error!(
                        event = kind,
                        count,
                        "{count} more `{kind}` events in the last {interval}"
                    )
                }
                Level::WARN => {
                    tracing::warn!(
                        event = kind,
                        count,
                        "{count} more `{kind}` events in the last {interval}"
                    )
                }
                Level::INFO => {
                    tracing::info!(
                        event = kind,
                        count,
                        "{count} more `{kind}` events in the last {interval}"
                    )
                }
                _ => {
                    tracing::debug!(
                        event = kind,
                        count,
                        "{count} more `{kind}` events in the last {interval}"
                    )
                }
            }
        }
        // Kinds quiet for a whole interval are forgotten, so the map stays small.
        let now = Instant::now();
        let interval = self.inner.interval;
        windows.retain(|_, w| now.duration_since(w.started) < interval * 2);
    }

    /// Runs [`flush`](Self::flush) every interval until `stop`, then once more.
    pub fn spawn_flusher(&self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let limiter = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(limiter.inner.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => limiter.flush(),
                    () = stop.cancelled() => break,
                }
            }
            limiter.flush();
        })
    }

    fn windows(&self) -> std::sync::MutexGuard<'_, HashMap<&'static str, Window>> {
        // Counts are advisory: a panic elsewhere must not silence logging.
        self.inner.windows.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Events of `kind` counted and not yet summarised.
    #[cfg(test)]
    fn suppressed(&self, kind: &'static str) -> u64 {
        self.windows().get(kind).map_or(0, |w| w.suppressed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_full_line_per_interval_and_a_count_for_the_rest() {
        let logs = LogLimiter::new(Duration::from_secs(10));
        assert!(logs.allow("refused", Level::WARN));
        for _ in 0..1000 {
            assert!(!logs.allow("refused", Level::WARN));
        }
        assert!(logs.allow("other", Level::INFO), "kinds are counted apart");
        assert_eq!(logs.suppressed("refused"), 1000);
        logs.flush();
        assert_eq!(logs.suppressed("refused"), 0);
        assert!(!logs.allow("refused", Level::WARN), "same interval");
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(logs.allow("refused", Level::WARN), "a new interval");
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_kinds_are_forgotten() {
        let logs = LogLimiter::new(Duration::from_secs(10));
        assert!(logs.allow("refused", Level::WARN));
        tokio::time::advance(Duration::from_secs(25)).await;
        logs.flush();
        assert!(logs.windows().is_empty());
    }
}
