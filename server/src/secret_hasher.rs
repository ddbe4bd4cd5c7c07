//! Token secrets at rest: argon2id hashing and verification, always off the
//! RPC thread, a bounded number at once, in memory that is reused.
//!
//! Each hash or verification needs `m_cost` KiB (19 MiB by default). Run on
//! the blocking pool without a bound, a burst of redeems would start hundreds
//! at once; and memory freed by one thread's allocator arena is rarely given
//! back to the OS, so the process would keep the peak. Here at most
//! `concurrency` run at once, minting and verifying alike, each in one of
//! `concurrency` buffers kept for the server's life: memory for argon2 is
//! `concurrency × m_cost`, whatever arrives. The slot and the buffer belong
//! to the computation, not to the caller: a caller that gives up (its
//! connection closed mid-redeem) leaves the computation to finish and hand
//! both back, so cancelled calls cannot add computations or buffers.

use std::sync::{Arc, Mutex};

use argon2::password_hash::phc::{Output, ParamsString, Salt};
use argon2::{Algorithm, Argon2, Block, Params, PasswordHash, Version};
use capsync_shared::{SturdyRef, TokenKind};
use rand::TryRng;
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;
use tokio::task::JoinError;

use crate::error::ServerError;
use crate::ledger::NewToken;

/// Hashes and verifies token secrets with one fixed argon2id cost.
#[derive(Clone, Debug)]
pub struct SecretHasher {
    params: Params,
    /// A hash of a secret nobody holds, verified when a token id is unknown so
    /// that "unknown id" takes as long as "wrong secret".
    decoy_hash: String,
    /// One permit per argon2 computation allowed to run at once.
    running: Arc<Semaphore>,
    /// argon2 working memory, one buffer per running verification, reused.
    memory: Arc<Mutex<Vec<Vec<Block>>>>,
}

impl SecretHasher {
    /// A hasher at this cost, running as many computations at once as there are CPUs.
    pub fn new(memory_kib: u32, iterations: u32) -> Result<Self, argon2::Error> {
        let params = Params::new(memory_kib, iterations, 1, None)?;
        let mut hasher = Self {
            params,
            decoy_hash: String::new(),
            running: Arc::new(Semaphore::new(crate::config::default_argon2_concurrency())),
            memory: Arc::new(Mutex::new(Vec::new())),
        };
        // The decoy's buffer becomes the first of the reused ones.
        let mut memory = Vec::new();
        hasher.decoy_hash = hasher
            .hash_now(SturdyRef::generate(TokenKind::Viewer).secret(), &mut memory)
            .map_err(|_| argon2::Error::OutputTooShort)?;
        hasher.memory().push(memory);
        Ok(hasher)
    }

    /// At most `concurrency` (at least one) computations at once.
    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.running = Arc::new(Semaphore::new(concurrency.max(1)));
        self
    }

    fn argon2(&self) -> Argon2<'static> {
        Argon2::new(Algorithm::Argon2id, Version::V0x13, self.params.clone())
    }

    /// The PHC string of `secret` with a fresh salt, computed in `memory`.
    /// Blocking: CPU-heavy.
    fn hash_now(&self, secret: &str, memory: &mut Vec<Block>) -> Result<String, ServerError> {
        let mut salt = [0u8; 16];
        rand::rngs::SysRng
            .try_fill_bytes(&mut salt)
            .map_err(|_| ServerError::internal())?;
        self.hash_with_salt(secret, &salt, memory).map_err(|err| {
            tracing::error!(%err, "argon2 hashing failed");
            ServerError::internal()
        })
    }

    /// What the argon2 crate's `hash_password_with_salt` gives, but in
    /// `memory` (grown if needed) instead of 19 MiB allocated per call.
    fn hash_with_salt(
        &self,
        secret: &str,
        salt: &[u8],
        memory: &mut Vec<Block>,
    ) -> Result<String, String> {
        let blocks = self.params.block_count();
        if memory.len() < blocks {
            memory.resize(blocks, Block::new());
        }
        let len = self
            .params
            .output_len()
            .unwrap_or(Params::DEFAULT_OUTPUT_LEN);
        let mut out = [0u8; Output::MAX_LENGTH];
        let out = out.get_mut(..len).ok_or("output length")?;
        self.argon2()
            .hash_password_into_with_memory(secret.as_bytes(), salt, out, &mut memory[..blocks])
            .map_err(|err| err.to_string())?;
        let phc = PasswordHash {
            algorithm: Algorithm::Argon2id.ident(),
            version: Some(Version::V0x13.into()),
            params: ParamsString::try_from(&self.params).map_err(|err| err.to_string())?,
            salt: Some(Salt::new(salt).map_err(|err| err.to_string())?),
            hash: Some(Output::new(out).map_err(|err| err.to_string())?),
        };
        Ok(phc.to_string())
    }

    /// Runs `work` on the blocking pool in one of the reused buffers, once one
    /// of the `concurrency` slots is free. The slot and the buffer go with the
    /// work into the blocking task and come back when it is done, even if the
    /// caller stopped waiting: otherwise every cancelled redeem would free its
    /// slot at once, and lose its buffer, while its computation ran on.
    async fn compute<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Vec<Block>) -> T + Send + 'static,
    ) -> Result<T, JoinError> {
        // (The semaphore is never closed.)
        let slot = self.running.clone().acquire_owned().await.ok();
        let pool = self.memory.clone();
        tokio::task::spawn_blocking(move || {
            let mut memory = lock(&pool).pop().unwrap_or_default();
            let done = work(&mut memory);
            lock(&pool).push(memory);
            drop(slot);
            done
        })
        .await
    }

    /// Whether `secret` matches `phc`, in constant time, computed in `memory`
    /// (grown if the hash's cost needs more). Blocking: CPU-heavy. A malformed
    /// stored hash never matches.
    fn verify_now(secret: &str, phc: &str, memory: &mut Vec<Block>) -> bool {
        let Ok(hash) = PasswordHash::new(phc) else {
            return false;
        };
        let (Ok(params), Ok(algorithm)) = (
            Params::try_from(&hash),
            Algorithm::try_from(hash.algorithm.as_str()),
        ) else {
            return false;
        };
        let version = match hash.version.map(Version::try_from).transpose() {
            Ok(version) => version.unwrap_or_default(),
            Err(_) => return false,
        };
        let (Some(salt), Some(expected)) = (&hash.salt, &hash.hash) else {
            return false;
        };
        let expected = expected.as_ref();
        let mut computed = [0u8; 64];
        let Some(out) = computed.get_mut(..expected.len()) else {
            return false;
        };
        let blocks = params.block_count();
        if memory.len() < blocks {
            memory.resize(blocks, Block::new());
        }
        let argon2 = Argon2::new(algorithm, version, params);
        if argon2
            .hash_password_into_with_memory(
                secret.as_bytes(),
                salt.as_ref(),
                out,
                &mut memory[..blocks],
            )
            .is_err()
        {
            return false;
        }
        out.ct_eq(expected).into()
    }

    /// A new token of `kind` and the row to store for it, hashed on the blocking pool.
    pub async fn mint(
        &self,
        kind: TokenKind,
        expires_at: Option<i64>,
        label: String,
    ) -> Result<(SturdyRef, NewToken), ServerError> {
        let token = SturdyRef::generate(kind);
        let secret = token.secret().to_owned();
        let hasher = self.clone();
        let secret_hash = self
            .compute(move |memory| hasher.hash_now(&secret, memory))
            .await
            .map_err(|_| ServerError::internal())??;
        let row = NewToken {
            id: token.id.clone(),
            secret_hash,
            expires_at,
            label,
        };
        Ok((token, row))
    }

    /// Verifies on the blocking pool, waiting for a free slot first. `None` for
    /// the hash verifies against the decoy, so the caller spends the same time
    /// and always gets `false`.
    pub async fn verify(&self, secret: &str, phc: Option<String>) -> bool {
        let secret = secret.to_owned();
        let decoy = self.decoy_hash.clone();
        self.compute(move |memory| match phc {
            Some(phc) => Self::verify_now(&secret, &phc, memory),
            None => {
                Self::verify_now(&secret, &decoy, memory);
                false
            }
        })
        .await
        .unwrap_or(false)
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, Vec<Vec<Block>>> {
        lock(&self.memory)
    }

    /// Whether the argon2 crate's own verifier accepts `secret` for `phc`, for tests.
    #[cfg(test)]
    fn reference_verify(&self, secret: &str, phc: &str) -> bool {
        use argon2::PasswordVerifier;
        PasswordHash::new(phc).is_ok_and(|hash| {
            self.argon2()
                .verify_password(secret.as_bytes(), &hash)
                .is_ok()
        })
    }
}

fn lock(pool: &Mutex<Vec<Vec<Block>>>) -> std::sync::MutexGuard<'_, Vec<Vec<Block>>> {
    // Buffers are plain scratch memory: a panic elsewhere cannot spoil them.
    pool.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn minted_secret_verifies_and_others_do_not() {
        let hasher = SecretHasher::new(256, 1).unwrap();
        let (token, row) = hasher
            .mint(TokenKind::Writer, None, String::new())
            .await
            .unwrap();
        assert!(row.secret_hash.starts_with("$argon2id$"));
        assert!(!row.secret_hash.contains(token.secret()));
        assert!(
            hasher
                .verify(token.secret(), Some(row.secret_hash.clone()))
                .await
        );
        assert!(hasher.reference_verify(token.secret(), &row.secret_hash));
        let other = SturdyRef::generate(TokenKind::Writer);
        assert!(!hasher.verify(other.secret(), Some(row.secret_hash)).await);
        assert!(!hasher.verify(token.secret(), None).await);
        assert!(!hasher.verify(token.secret(), Some("garbage".into())).await);
    }

    #[tokio::test]
    async fn hashes_made_at_another_cost_still_verify() {
        let old = SecretHasher::new(512, 2).unwrap();
        let new = SecretHasher::new(256, 1).unwrap().with_concurrency(1);
        let (token, row) = old
            .mint(TokenKind::Viewer, None, String::new())
            .await
            .unwrap();
        // The new hasher's buffer grows to the old hash's cost, then serves both.
        assert!(
            new.verify(token.secret(), Some(row.secret_hash.clone()))
                .await
        );
        let (second, second_row) = new
            .mint(TokenKind::Viewer, None, String::new())
            .await
            .unwrap();
        assert!(
            new.verify(second.secret(), Some(second_row.secret_hash))
                .await
        );
        assert!(!new.verify(second.secret(), Some(row.secret_hash)).await);
        assert_eq!(new.memory().len(), 1, "one buffer, reused");
    }

    #[test]
    fn hashes_are_the_argon2_crates_own() {
        use argon2::PasswordHasher;
        let hasher = SecretHasher::new(256, 2).unwrap();
        let salt = [7u8; 16];
        let ours = hasher
            .hash_with_salt("s3cret", &salt, &mut Vec::new())
            .unwrap();
        let theirs = hasher
            .argon2()
            .hash_password_with_salt(b"s3cret", &salt)
            .unwrap()
            .to_string();
        assert_eq!(ours, theirs);
    }

    #[tokio::test]
    async fn a_check_whose_caller_gives_up_keeps_its_slot_and_buffer_until_done() {
        // Costly enough to be still running when its caller has gone.
        let hasher = SecretHasher::new(8 * 1024, 4).unwrap().with_concurrency(1);
        let mut check = Box::pin(hasher.verify("guess", None));
        assert!(futures::poll!(check.as_mut()).is_pending());
        assert_eq!(hasher.running.available_permits(), 0, "it started");
        // A redeem whose connection closed: its future is dropped.
        drop(check);
        assert_eq!(
            hasher.running.available_permits(),
            0,
            "its slot was free while it still computed"
        );
        // The next one runs once it is done, in the same buffer.
        let _slot = hasher.running.acquire().await.unwrap();
        assert_eq!(hasher.memory().len(), 1, "its buffer came back");
    }

    #[tokio::test]
    async fn at_most_the_configured_number_run_at_once() {
        let hasher = SecretHasher::new(256, 1).unwrap().with_concurrency(2);
        let (token, row) = hasher
            .mint(TokenKind::Viewer, None, String::new())
            .await
            .unwrap();
        let checks = (0..16).map(|_| hasher.verify(token.secret(), Some(row.secret_hash.clone())));
        let results = futures::future::join_all(checks).await;
        assert!(results.into_iter().all(|ok| ok));
        assert!(
            hasher.memory().len() <= 2,
            "{} buffers",
            hasher.memory().len()
        );
    }
}
