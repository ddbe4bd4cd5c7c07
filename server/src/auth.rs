//! Token secrets at rest: argon2id hashing and verification, always off the RPC thread.

use argon2::{Algorithm, Argon2, Params, PasswordHash, PasswordHasher, PasswordVerifier, Version};
use capsync_shared::{SturdyRef, TokenKind};
use rand::TryRng;

use crate::error::ServerError;
use crate::ledger::NewToken;

/// Hashes and verifies token secrets with one fixed argon2id cost.
#[derive(Clone, Debug)]
pub struct SecretHasher {
    params: Params,
    /// A hash of a secret nobody holds, verified when a token id is unknown so
    /// that "unknown id" takes as long as "wrong secret".
    decoy_hash: String,
}

impl SecretHasher {
    pub fn new(memory_kib: u32, iterations: u32) -> Result<Self, argon2::Error> {
        let params = Params::new(memory_kib, iterations, 1, None)?;
        let mut hasher = Self {
            params,
            decoy_hash: String::new(),
        };
        hasher.decoy_hash = hasher
            .hash_now(SturdyRef::generate(TokenKind::Viewer).secret())
            .map_err(|_| argon2::Error::OutputTooShort)?;
        Ok(hasher)
    }

    fn argon2(&self) -> Argon2<'static> {
        Argon2::new(Algorithm::Argon2id, Version::V0x13, self.params.clone())
    }

    /// The PHC string of `secret` with a fresh salt. Blocking: CPU-heavy.
    fn hash_now(&self, secret: &str) -> Result<String, ServerError> {
        let mut salt = [0u8; 16];
        rand::rngs::SysRng
            .try_fill_bytes(&mut salt)
            .map_err(|_| ServerError::internal())?;
        self.argon2()
            .hash_password_with_salt(secret.as_bytes(), &salt)
            .map(|hash| hash.to_string())
            .map_err(|err| {
                tracing::error!(%err, "argon2 hashing failed");
                ServerError::internal()
            })
    }

    /// Whether `secret` matches `phc`, in constant time. Blocking: CPU-heavy.
    /// A malformed stored hash never matches.
    fn verify_now(&self, secret: &str, phc: &str) -> bool {
        match PasswordHash::new(phc) {
            Ok(parsed) => self
                .argon2()
                .verify_password(secret.as_bytes(), &parsed)
                .is_ok(),
            Err(_) => false,
        }
    }

    /// A new token of `kind` and the row to store for it, hashed on the blocking pool.
    pub async fn mint(
        &self,
        kind: TokenKind,
        expires_at: Option<i64>,
        label: String,
    ) -> Result<(SturdyRef, NewToken), ServerError> {
        let token = SturdyRef::generate(kind);
        let hasher = self.clone();
        let secret = token.secret().to_owned();
        let secret_hash = tokio::task::spawn_blocking(move || hasher.hash_now(&secret))
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

    /// Verifies on the blocking pool. `None` for the hash verifies against the
    /// decoy, so the caller spends the same time and always gets `false`.
    pub async fn verify(&self, secret: &str, phc: Option<String>) -> bool {
        let hasher = self.clone();
        let secret = secret.to_owned();
        tokio::task::spawn_blocking(move || match phc {
            Some(phc) => hasher.verify_now(&secret, &phc),
            None => {
                hasher.verify_now(&secret, &hasher.decoy_hash);
                false
            }
        })
        .await
        .unwrap_or(false)
    }
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
        let other = SturdyRef::generate(TokenKind::Writer);
        assert!(!hasher.verify(other.secret(), Some(row.secret_hash)).await);
        assert!(!hasher.verify(token.secret(), None).await);
        assert!(!hasher.verify(token.secret(), Some("garbage".into())).await);
    }
}
