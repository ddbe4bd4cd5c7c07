//! Limits on what failed redeems may cost, without locking out honest use.
//!
//! Every token check that cannot succeed costs the server an argon2id hash
//! (about 19 MiB and tens of milliseconds), so failures are what is limited,
//! each in the bucket of what it tells about the caller:
//! - a malformed token or an unknown token id: in its address's *unknown*
//!   bucket. Refusing more of those never refuses a real token.
//! - a wrong secret for a token id that exists: in that token id's bucket (from
//!   every address together), which is what keeps guessing against a known id
//!   slow, and in its address's *wrong-secret* bucket, which keeps one address
//!   from spraying guesses over many known ids.
//!
//! A stale token (revoked, expired, of an old epoch) carries the right secret:
//! it fails without counting against anything. A mistyped or stale token
//! therefore never stops a valid one from the same address. Each bucket holds
//! `max_failures` and drains one failure every `window / max_failures`; a
//! refused caller is told how long until the next attempt is let through.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use capsync_shared::TokenId;
use tokio::time::Instant;

use crate::net::address_group;

/// Buckets kept per kind before the idle ones are swept.
const SWEEP_ABOVE: usize = 10_000;

/// Which limit refused a redeem, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limited {
    /// `address` or `token`: the `by` label of `capsync_redeems_limited_total`.
    pub by: &'static str,
    /// Until the next attempt is let through.
    pub wait: Duration,
}

/// Failure buckets for one kind of key.
#[derive(Debug)]
struct Buckets<K> {
    capacity: u32,
    /// How long one failure takes to drain.
    drain: Duration,
    /// Failures still in the bucket and when that was last computed.
    levels: HashMap<K, (f64, Instant)>,
}

impl<K: Hash + Eq> Buckets<K> {
    fn new(capacity: u32, window: Duration) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            drain: (window / capacity).max(Duration::from_millis(1)),
            levels: HashMap::new(),
        }
    }

    /// The failures in `key`'s bucket now.
    fn level(&self, key: &K, now: Instant) -> f64 {
        self.levels.get(key).map_or(0.0, |(level, at)| {
            let drained = now.duration_since(*at).as_secs_f64() / self.drain.as_secs_f64();
            (level - drained).max(0.0)
        })
    }

    /// How long until `key` may fail again, if its bucket is full.
    fn wait(&self, key: &K, now: Instant) -> Option<Duration> {
        let over = self.level(key, now) - f64::from(self.capacity - 1);
        (over > 0.0).then(|| self.drain.mul_f64(over))
    }

    /// Adds a failure; true if the bucket is full from now on.
    fn record(&mut self, key: K, now: Instant) -> bool {
        let level = self.level(&key, now) + 1.0;
        self.levels.insert(key, (level, now));
        if self.levels.len() > SWEEP_ABOVE {
            let drain = self.drain.as_secs_f64();
            self.levels
                .retain(|_, (level, at)| *level > now.duration_since(*at).as_secs_f64() / drain);
        }
        level >= f64::from(self.capacity)
    }
}

/// What a limiter decided when a failure was recorded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recorded {
    /// This failure filled a bucket of the caller's address: log that once.
    pub address_now_limited: bool,
    /// This failure filled the token id's bucket.
    pub token_now_limited: bool,
}

/// The failure buckets of one server, for both gateways.
#[derive(Debug)]
pub struct RedeemLimiter {
    unknown_by_address: Buckets<IpAddr>,
    wrong_secret_by_address: Buckets<IpAddr>,
    wrong_secret_by_token: Buckets<TokenId>,
}

impl RedeemLimiter {
    /// At most `max_failures` of each kind per `window`, refilling evenly.
    pub fn new(max_failures: u32, window: Duration) -> Self {
        Self {
            unknown_by_address: Buckets::new(max_failures, window),
            wrong_secret_by_address: Buckets::new(max_failures, window),
            wrong_secret_by_token: Buckets::new(max_failures, window),
        }
    }

    /// Before checking a token whose id is unknown (or that is malformed).
    pub fn check_unknown(&self, peer: IpAddr) -> Result<(), Limited> {
        let now = Instant::now();
        match self.unknown_by_address.wait(&address_group(peer), now) {
            Some(wait) => Err(Limited {
                by: "address",
                wait,
            }),
            None => Ok(()),
        }
    }

    /// Before verifying the secret of an existing token `id`.
    pub fn check_known(&self, peer: IpAddr, id: &TokenId) -> Result<(), Limited> {
        let now = Instant::now();
        if let Some(wait) = self.wrong_secret_by_token.wait(id, now) {
            return Err(Limited { by: "token", wait });
        }
        match self.wrong_secret_by_address.wait(&address_group(peer), now) {
            Some(wait) => Err(Limited {
                by: "address",
                wait,
            }),
            None => Ok(()),
        }
    }

    /// A malformed token or an unknown id from `peer`.
    pub fn record_unknown(&mut self, peer: IpAddr) -> Recorded {
        let now = Instant::now();
        Recorded {
            address_now_limited: self.unknown_by_address.record(address_group(peer), now),
            token_now_limited: false,
        }
    }

    /// A wrong secret for the existing token `id`, from `peer`.
    pub fn record_wrong_secret(&mut self, peer: IpAddr, id: TokenId) -> Recorded {
        let now = Instant::now();
        Recorded {
            address_now_limited: self
                .wrong_secret_by_address
                .record(address_group(peer), now),
            token_now_limited: self.wrong_secret_by_token.record(id, now),
        }
    }
}

/// Where failed redeems are counted, by address and by token id. One
/// process counts in its own memory ([`LocalRedeemFailures`]); see
/// [`crate::node`] for what several processes serving one database do.
pub trait RedeemFailures: Send + Sync + 'static {
    /// Before checking a token whose id is unknown (or that is malformed).
    fn check_unknown(&self, peer: IpAddr) -> Result<(), Limited>;
    /// Before verifying the secret of an existing token `id`.
    fn check_known(&self, peer: IpAddr, id: &TokenId) -> Result<(), Limited>;
    /// A malformed token or an unknown id from `peer`.
    fn record_unknown(&self, peer: IpAddr) -> Recorded;
    /// A wrong secret for the existing token `id`, from `peer`.
    fn record_wrong_secret(&self, peer: IpAddr, id: TokenId) -> Recorded;
}

/// [`RedeemLimiter`]'s buckets in this process's memory, behind a std mutex:
/// both gateways share them, and no lock is held across an await.
#[derive(Debug)]
pub struct LocalRedeemFailures(Mutex<RedeemLimiter>);

impl LocalRedeemFailures {
    pub fn new(limiter: RedeemLimiter) -> Self {
        Self(Mutex::new(limiter))
    }

    fn buckets(&self) -> std::sync::MutexGuard<'_, RedeemLimiter> {
        // A panic while holding it cannot leave the counts inconsistent enough to matter.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl RedeemFailures for LocalRedeemFailures {
    fn check_unknown(&self, peer: IpAddr) -> Result<(), Limited> {
        self.buckets().check_unknown(peer)
    }

    fn check_known(&self, peer: IpAddr, id: &TokenId) -> Result<(), Limited> {
        self.buckets().check_known(peer, id)
    }

    fn record_unknown(&self, peer: IpAddr) -> Recorded {
        self.buckets().record_unknown(peer)
    }

    fn record_wrong_secret(&self, peer: IpAddr, id: TokenId) -> Recorded {
        self.buckets().record_wrong_secret(peer, id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_tokens_fill_their_address_bucket_only() {
        let mut limiter = RedeemLimiter::new(3, Duration::from_secs(60));
        let peer = ip("127.0.0.1");
        let known = TokenId::from("0123456789abcdef");
        for i in 0..3 {
            limiter.check_unknown(peer).unwrap();
            let recorded = limiter.record_unknown(peer);
            assert_eq!(recorded.address_now_limited, i == 2, "failure {i}");
        }
        let limited = limiter.check_unknown(peer).unwrap_err();
        assert_eq!(limited.by, "address");
        assert_eq!(
            limited.wait,
            Duration::from_secs(20),
            "one failure drains in 60s/3"
        );
        assert!(
            limiter.check_unknown(ip("127.0.0.2")).is_ok(),
            "per address"
        );
        // A real token from the same address is still checked.
        assert!(limiter.check_known(peer, &known).is_ok());

        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(limiter.check_unknown(peer).is_ok(), "one failure drained");
        limiter.record_unknown(peer);
        assert!(limiter.check_unknown(peer).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn wrong_secrets_fill_the_token_and_the_address_buckets() {
        let mut limiter = RedeemLimiter::new(2, Duration::from_secs(10));
        let target = TokenId::from("aaaaaaaaaaaaaaaa");
        let other = TokenId::from("bbbbbbbbbbbbbbbb");
        // Guesses at one id from many addresses: the id's bucket stops them.
        limiter.record_wrong_secret(ip("10.0.0.1"), target.clone());
        let recorded = limiter.record_wrong_secret(ip("10.0.0.2"), target.clone());
        assert!(recorded.token_now_limited);
        assert!(!recorded.address_now_limited);
        let limited = limiter.check_known(ip("10.0.0.3"), &target).unwrap_err();
        assert_eq!(limited.by, "token");
        assert!(limiter.check_known(ip("10.0.0.3"), &other).is_ok());

        // Guesses from one address over many ids: its bucket stops them.
        limiter.record_wrong_secret(ip("10.0.0.9"), TokenId::from("c1"));
        limiter.record_wrong_secret(ip("10.0.0.9"), TokenId::from("c2"));
        let limited = limiter.check_known(ip("10.0.0.9"), &other).unwrap_err();
        assert_eq!(limited.by, "address");
        assert!(
            limiter.check_unknown(ip("10.0.0.9")).is_ok(),
            "the kinds are counted apart"
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(limiter.check_known(ip("10.0.0.9"), &other).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_buckets_are_swept() {
        let mut limiter = RedeemLimiter::new(1, Duration::from_secs(1));
        for i in 0..=SWEEP_ABOVE as u32 {
            limiter.record_unknown(IpAddr::from(i.to_be_bytes()));
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        limiter.record_unknown(ip("192.0.2.1"));
        assert_eq!(limiter.unknown_by_address.levels.len(), 1);
    }
}
