//! Token secrets that verified recently, so presenting one again costs no argon2.
//!
//! A token whose secret matched its stored hash once will match it forever
//! (the hash of a token id never changes), so a reconnecting agent, a page
//! that reloads, or someone retrying a revoked link need not pay, nor make the
//! server pay, for argon2 again. Revocation, expiry and epochs are still
//! checked against the database on every redeem: only the hash comparison is
//! remembered. What is kept is a SHA-256 of the secret keyed with a random
//! per-process key, never the secret, and never on disk.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use capsync_shared::TokenId;
use rand::TryRng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Entries kept; the oldest go first.
const CAPACITY: usize = 10_000;

/// Recently verified secrets, by token id. `Send + Sync`.
#[derive(Debug)]
pub struct VerifiedSecrets {
    /// Random per process: a digest is useless outside it.
    key: [u8; 32],
    entries: Mutex<Entries>,
}

#[derive(Debug, Default)]
struct Entries {
    digests: HashMap<TokenId, [u8; 32]>,
    /// Ids in the order they were added, for eviction.
    order: VecDeque<TokenId>,
}

impl VerifiedSecrets {
    pub fn new() -> Self {
        let mut key = [0u8; 32];
        // Without OS randomness the server cannot mint tokens either; a zero
        // key would still keep the cache correct, just not secret.
        if rand::rngs::SysRng.try_fill_bytes(&mut key).is_err() {
            tracing::error!("no OS randomness for the verified-secrets key");
        }
        Self {
            key,
            entries: Mutex::new(Entries::default()),
        }
    }

    fn digest(&self, id: &TokenId, secret: &str) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(self.key);
        hasher.update(id.as_str().as_bytes());
        hasher.update([0]);
        hasher.update(secret.as_bytes());
        hasher.finalize().into()
    }

    /// Whether `secret` verified for `id` before (compared in constant time).
    pub fn contains(&self, id: &TokenId, secret: &str) -> bool {
        let digest = self.digest(id, secret);
        self.entries()
            .digests
            .get(id)
            .is_some_and(|known| known.ct_eq(&digest).into())
    }

    /// Remembers that `secret` verified for `id`.
    pub fn insert(&self, id: &TokenId, secret: &str) {
        let digest = self.digest(id, secret);
        let mut entries = self.entries();
        if entries.digests.insert(id.clone(), digest).is_none() {
            entries.order.push_back(id.clone());
        }
        while entries.order.len() > CAPACITY {
            if let Some(oldest) = entries.order.pop_front() {
                entries.digests.remove(&oldest);
            }
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for VerifiedSecrets {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knows_exactly_the_secrets_it_was_told() {
        let cache = VerifiedSecrets::new();
        let id = TokenId::from("0123456789abcdef");
        assert!(!cache.contains(&id, "secret"));
        cache.insert(&id, "secret");
        assert!(cache.contains(&id, "secret"));
        assert!(!cache.contains(&id, "secreT"));
        assert!(!cache.contains(&TokenId::from("other"), "secret"));
    }

    #[test]
    fn stays_bounded() {
        let cache = VerifiedSecrets::new();
        for i in 0..CAPACITY + 10 {
            cache.insert(&TokenId(format!("id{i}")), "s");
        }
        assert_eq!(cache.entries().digests.len(), CAPACITY);
        assert!(
            !cache.contains(&TokenId::from("id0"), "s"),
            "the oldest went first"
        );
        assert!(cache.contains(&TokenId(format!("id{}", CAPACITY + 9)), "s"));
    }
}
