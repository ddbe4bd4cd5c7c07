//! Per-address limit on failed redeems, so tokens cannot be guessed at line rate.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

/// Counts failed redeems per peer address in fixed windows. Lives on the RPC
/// thread (one per server), so it needs no locking.
#[derive(Debug)]
pub struct RedeemLimiter {
    max_failures: u32,
    window: Duration,
    /// Failures so far in the current window of each address.
    failures: HashMap<IpAddr, (Instant, u32)>,
}

impl RedeemLimiter {
    pub fn new(max_failures: u32, window: Duration) -> Self {
        Self {
            max_failures,
            window,
            failures: HashMap::new(),
        }
    }

    /// Whether `peer` has used up its failures for the current window.
    pub fn is_blocked(&mut self, peer: IpAddr) -> bool {
        let now = Instant::now();
        match self.failures.get(&peer) {
            Some((start, _)) if now.duration_since(*start) >= self.window => {
                self.failures.remove(&peer);
                false
            }
            Some((_, count)) => *count >= self.max_failures,
            None => false,
        }
    }

    pub fn record_failure(&mut self, peer: IpAddr) {
        let now = Instant::now();
        let entry = self.failures.entry(peer).or_insert((now, 0));
        if now.duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        entry.1 += 1;
        // Keep memory bounded under a scan from many addresses: expired windows go.
        if self.failures.len() > 10_000 {
            let window = self.window;
            self.failures
                .retain(|_, (start, _)| now.duration_since(*start) < window);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn blocks_after_the_limit_until_the_window_passes() {
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        let mut limiter = RedeemLimiter::new(3, Duration::from_secs(60));
        for _ in 0..3 {
            assert!(!limiter.is_blocked(peer));
            limiter.record_failure(peer);
        }
        assert!(limiter.is_blocked(peer));
        assert!(!limiter.is_blocked(other), "limits are per address");
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(!limiter.is_blocked(peer));
    }
}
