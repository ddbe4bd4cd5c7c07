//! Turning a token string into the authority it carries: the one check both the
//! RPC `Gateway` and the HTTP gateway use.
//!
//! Parse the sturdy ref, find its row, verify the secret with argon2 on the
//! blocking pool, then check kind, revocation, expiry and epoch. Every failure
//! gives the caller the same `permissionDenied`; the audit log records which it
//! was. Failed redeems count against the caller's address in one limiter shared
//! by both gateways, so guessing over HTTP and RPC at once gains nothing.
//!
//! Everything here is `Send`: the HTTP gateway runs on plain tokio tasks.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use capsync_shared::{ErrorCode, ShareId, SturdyRef, TokenId, TokenKind, now_millis};

use crate::auth::SecretHasher;
use crate::error::ServerError;
use crate::ledger::{AuditEvent, Authority, Ledger, ShareState, StoredToken};
use crate::rate_limit::RedeemLimiter;

/// Which gateway a redeem came through, for the audit line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Rpc,
    Http,
}

/// A token that passed every check, with its share's state at that moment.
#[derive(Clone, Debug)]
pub struct Redeemed {
    pub token: StoredToken,
    /// For writer and viewer tokens: the share's state; `None` for admin and agent.
    pub state: Option<ShareState>,
}

impl Redeemed {
    /// The authority a capability redeemed from this token holds.
    pub fn authority(&self) -> Authority {
        Authority {
            token_id: self.token.id.clone(),
            kind: self.token.kind,
            share: self
                .state
                .as_ref()
                .map(|s| (s.share_id.clone(), self.token.epoch)),
        }
    }
}

/// Checks tokens. Cheap to clone; one per server, shared by both gateways.
#[derive(Clone)]
pub struct Redeemer {
    ledger: Ledger,
    hasher: SecretHasher,
    /// Failed redeems per address. A std mutex: it is never held across an await.
    limiter: Arc<Mutex<RedeemLimiter>>,
}

impl Redeemer {
    pub fn new(ledger: Ledger, hasher: SecretHasher, limiter: RedeemLimiter) -> Self {
        Self {
            ledger,
            hasher,
            limiter: Arc::new(Mutex::new(limiter)),
        }
    }

    /// Checks `token` presented by `peer`. Every failure is the same
    /// `permissionDenied` (or `rateLimited` once the address used up its
    /// failures); the audit log gets the real reason.
    pub async fn redeem(
        &self,
        token: &str,
        peer: SocketAddr,
        via: Via,
    ) -> Result<Redeemed, ServerError> {
        let audit = |stored: Option<&StoredToken>, outcome: &str| {
            self.audit(
                stored.map(|t| t.id.clone()),
                stored.and_then(|t| t.share_id.clone()),
                outcome,
                peer,
                via,
            );
        };
        if self.limiter().is_blocked(peer.ip()) {
            audit(None, "rate_limited");
            return Err(ServerError::new(
                ErrorCode::RateLimited,
                "too many failed redeems from this address; try again later",
            ));
        }
        match self.check(token).await? {
            Ok(redeemed) => {
                audit(Some(&redeemed.token), "ok");
                Ok(redeemed)
            }
            Err((reason, stored)) => {
                self.limiter().record_failure(peer.ip());
                audit(stored.as_ref(), reason);
                Err(ServerError::denied())
            }
        }
    }

    fn limiter(&self) -> std::sync::MutexGuard<'_, RedeemLimiter> {
        // A panic while holding it cannot leave the counts inconsistent enough to matter.
        self.limiter.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The verdict: the redeemed token, or why not (for the audit log only).
    /// The outer error is a storage failure, not a verdict.
    async fn check(
        &self,
        token: &str,
    ) -> Result<Result<Redeemed, (&'static str, Option<StoredToken>)>, ServerError> {
        let Ok(sturdy) = token.parse::<SturdyRef>() else {
            // Spend the verification time anyway: a malformed token must not answer faster.
            self.hasher.verify("", None).await;
            return Ok(Err(("malformed", None)));
        };
        let stored = self.ledger.find_token(sturdy.id.clone()).await?;
        let hash = stored.as_ref().map(|t| t.secret_hash.clone());
        if !self.hasher.verify(sturdy.secret(), hash).await {
            let reason = if stored.is_some() {
                "bad_secret"
            } else {
                "unknown_token"
            };
            return Ok(Err((reason, stored)));
        }
        let Some(stored) = stored else {
            return Ok(Err(("unknown_token", None)));
        };
        if stored.kind != sturdy.kind {
            return Ok(Err(("kind_mismatch", Some(stored))));
        }
        if stored.revoked {
            return Ok(Err(("revoked", Some(stored))));
        }
        if stored.expires_at.is_some_and(|at| at <= now_millis()) {
            return Ok(Err(("expired", Some(stored))));
        }
        let state = match stored.kind {
            TokenKind::Admin | TokenKind::Agent => None,
            TokenKind::Writer | TokenKind::Viewer => {
                let Some(state) = stored.share.clone() else {
                    return Ok(Err(("share_deleted", Some(stored))));
                };
                let current = if stored.kind == TokenKind::Writer {
                    state.writer_epoch
                } else {
                    state.viewer_epoch
                };
                if stored.epoch != current {
                    return Ok(Err(("revoked_epoch", Some(stored))));
                }
                Some(state)
            }
        };
        Ok(Ok(Redeemed {
            token: stored,
            state,
        }))
    }

    fn audit(
        &self,
        token_id: Option<TokenId>,
        share_id: Option<ShareId>,
        outcome: &str,
        peer: SocketAddr,
        via: Via,
    ) {
        let detail = match via {
            Via::Rpc => format!("peer={peer}"),
            Via::Http => format!("peer={peer} via=http"),
        };
        self.ledger.audit(AuditEvent {
            action: "redeem",
            token_id,
            share_id,
            outcome: outcome.to_owned(),
            detail,
        });
    }
}

impl std::fmt::Debug for Redeemer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Redeemer")
    }
}
