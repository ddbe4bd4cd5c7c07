//! Turning a token string into the authority it carries: the one check both the
//! RPC `Gateway` and the HTTP gateway use.
//!
//! Parse the sturdy ref, find its row, verify the secret with argon2 on the
//! blocking pool (unless the same secret verified recently, see
//! [`VerifiedSecrets`]), then check kind, revocation, expiry and epoch. Every
//! failure gives the caller the same `permissionDenied`; the audit log records
//! which it was. Failures that cost an argon2 computation count against the
//! caller's address and the token id in one [`RedeemLimiter`] shared by both
//! gateways, so guessing over HTTP and RPC at once gains nothing.
//!
//! Everything here is `Send`: the HTTP gateway runs on plain tokio tasks.

use std::net::SocketAddr;
use std::sync::Arc;

use capsync_shared::{ShareId, SturdyRef, TokenId, TokenKind};
use tracing::Level;

use crate::error::ServerError;
use crate::ledger::{AuditEvent, Authority, Ledger, ShareState, StoredToken};
use crate::log_limit::LogLimiter;
use crate::metrics::Metrics;
use crate::net::address_group;
use crate::rate_limit::{Limited, RedeemFailures};
use crate::secret_hasher::SecretHasher;
use crate::verified_secrets::VerifiedSecrets;

/// Which gateway a redeem came through, for the audit line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Rpc,
    Http,
    /// opencode's share client, which calls once a second per shared session:
    /// only refusals are audited, or the audit log would grow by a line per
    /// call while nothing noteworthy happens.
    HttpSync,
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
    /// Failed redeems per address and per token id.
    limiter: Arc<dyn RedeemFailures>,
    verified: Arc<VerifiedSecrets>,
    metrics: Metrics,
    logs: LogLimiter,
}

/// How a redeem ended (`ok`, or why the token was not accepted), for the audit log only.
#[derive(Debug)]
struct Outcome {
    reason: &'static str,
    token_id: Option<TokenId>,
    share_id: Option<ShareId>,
}

impl Outcome {
    fn of(reason: &'static str, stored: Option<&StoredToken>) -> Self {
        Self {
            reason,
            token_id: stored.map(|t| t.id.clone()),
            share_id: stored.and_then(|t| t.share_id.clone()),
        }
    }
}

impl Redeemer {
    pub fn new(
        ledger: Ledger,
        hasher: SecretHasher,
        limiter: Arc<dyn RedeemFailures>,
        metrics: Metrics,
        logs: LogLimiter,
    ) -> Self {
        Self {
            ledger,
            hasher,
            limiter,
            verified: Arc::new(VerifiedSecrets::new()),
            metrics,
            logs,
        }
    }

    /// Checks `token` presented by `peer`. Every failure is the same
    /// `permissionDenied`, or `rateLimited` (with when to retry) once the
    /// failures it would add to are used up; the audit log gets the real reason.
    ///
    /// The check runs to its end even if the caller goes away (a redeem call
    /// cancelled, a connection closed): it costs the server an argon2 hash all
    /// the same, so it must count all the same, or hanging up right after
    /// asking would be a way around every limit.
    pub async fn redeem(
        &self,
        token: &str,
        peer: SocketAddr,
        via: Via,
    ) -> Result<Redeemed, ServerError> {
        let this = self.clone();
        let token = token.to_owned();
        tokio::spawn(async move { this.check(&token, peer, via).await })
            .await
            .unwrap_or_else(|_| Err(ServerError::internal()))
    }

    /// [`redeem`](Self::redeem)'s work.
    async fn check(
        &self,
        token: &str,
        peer: SocketAddr,
        via: Via,
    ) -> Result<Redeemed, ServerError> {
        let sturdy = token.parse::<SturdyRef>().ok();
        let stored = match &sturdy {
            Some(sturdy) => self.ledger.find_token(sturdy.id.clone()).await?,
            None => None,
        };
        let verdict = match (&sturdy, stored) {
            (Some(sturdy), Some(stored)) => self.check_known(sturdy, stored, peer).await?,
            // (No token is found without a parsed sturdy ref.)
            _ => {
                self.check_unknown(sturdy.as_ref(), peer).await?;
                let reason = if sturdy.is_some() {
                    "unknown_token"
                } else {
                    "malformed"
                };
                Err(Outcome::of(reason, None))
            }
        };
        match verdict {
            Ok(redeemed) => {
                if via != Via::HttpSync {
                    self.audit(&Outcome::of("ok", Some(&redeemed.token)), peer, via);
                }
                Ok(redeemed)
            }
            Err(refusal) => {
                self.audit(&refusal, peer, via);
                Err(ServerError::denied())
            }
        }
    }

    /// A malformed token, or one whose id no token has: it fails, after as long
    /// as a wrong secret takes (so ids cannot be told apart by timing while the
    /// address has failures left). Refused unchecked once they are used up.
    async fn check_unknown(
        &self,
        sturdy: Option<&SturdyRef>,
        peer: SocketAddr,
    ) -> Result<(), ServerError> {
        let checked = self.limiter.check_unknown(peer.ip());
        checked.map_err(|limited| self.limited(limited, peer))?;
        self.hasher
            .verify(sturdy.map_or("", |s| s.secret()), None)
            .await;
        let recorded = self.limiter.record_unknown(peer.ip());
        if recorded.address_now_limited {
            self.limiting_started(peer, "malformed or unknown tokens");
        }
        Ok(())
    }

    /// A token whose id exists: verify its secret (unless it verified before),
    /// then everything else about it.
    async fn check_known(
        &self,
        sturdy: &SturdyRef,
        stored: StoredToken,
        peer: SocketAddr,
    ) -> Result<Result<Redeemed, Outcome>, ServerError> {
        if !self.verified.contains(&stored.id, sturdy.secret()) {
            let checked = self.limiter.check_known(peer.ip(), &stored.id);
            checked.map_err(|limited| self.limited(limited, peer))?;
            let hash = Some(stored.secret_hash.clone());
            if !self.hasher.verify(sturdy.secret(), hash).await {
                let recorded = self
                    .limiter
                    .record_wrong_secret(peer.ip(), stored.id.clone());
                if recorded.address_now_limited {
                    self.limiting_started(peer, "wrong secrets");
                }
                if recorded.token_now_limited {
                    tracing::info!(token_id = %stored.id, %peer,
                        "rate limiting redeems of one token id after repeated wrong secrets");
                }
                return Ok(Err(Outcome::of("bad_secret", Some(&stored))));
            }
            self.verified.insert(&stored.id, sturdy.secret());
        }
        Ok(self.check_standing(sturdy, stored))
    }

    /// Kind, revocation, expiry and epoch of a token whose secret matched. A
    /// failure here is a stale token, not a guess: it counts against nothing.
    fn check_standing(&self, sturdy: &SturdyRef, stored: StoredToken) -> Result<Redeemed, Outcome> {
        if stored.kind != sturdy.kind {
            return Err(Outcome::of("kind_mismatch", Some(&stored)));
        }
        if stored.revoked {
            return Err(Outcome::of("revoked", Some(&stored)));
        }
        if stored
            .expires_at
            .is_some_and(|at| at <= self.ledger.clock().now_millis())
        {
            return Err(Outcome::of("expired", Some(&stored)));
        }
        let state = match stored.kind {
            TokenKind::Admin | TokenKind::Agent => None,
            TokenKind::Writer | TokenKind::Viewer => {
                let Some(state) = stored.share.clone() else {
                    return Err(Outcome::of("share_deleted", Some(&stored)));
                };
                let current = if stored.kind == TokenKind::Writer {
                    state.writer_epoch
                } else {
                    state.viewer_epoch
                };
                if stored.epoch != current {
                    return Err(Outcome::of("revoked_epoch", Some(&stored)));
                }
                Some(state)
            }
        };
        Ok(Redeemed {
            token: stored,
            state,
        })
    }

    /// The answer to a redeem refused unchecked. Counted, and logged in summary
    /// only: every such refusal is an attempt the limiter exists to absorb.
    fn limited(&self, limited: Limited, peer: SocketAddr) -> ServerError {
        self.metrics.redeem_limited(limited.by);
        if self.logs.allow("redeem_rate_limited", Level::INFO) {
            tracing::info!(%peer, by = limited.by, wait = ?limited.wait,
                "redeem refused by the failed-redeem limit (further refusals are summarised)");
        }
        let what = match limited.by {
            "token" => "for this token",
            _ => "from this address",
        };
        ServerError::rate_limited(what, limited.wait)
    }

    /// Logs (once per address per episode) and audits that an address is now limited.
    fn limiting_started(&self, peer: SocketAddr, what: &str) {
        let address = address_group(peer.ip());
        if self.logs.allow("redeem_limit_started", Level::INFO) {
            tracing::info!(%address, "rate limiting redeems from this address after repeated {what}");
        }
        self.ledger.audit(AuditEvent {
            action: "redeem_limit",
            token_id: None,
            share_id: None,
            outcome: "rate_limited".into(),
            detail: format!("address={address} after={what}"),
        });
    }

    /// The audit line of one redeem; `outcome.reason` is `ok` or why it failed.
    fn audit(&self, outcome: &Outcome, peer: SocketAddr, via: Via) {
        let detail = match via {
            Via::Rpc => format!("peer={peer}"),
            Via::Http => format!("peer={peer} via=http"),
            Via::HttpSync => format!("peer={peer} via=opencode"),
        };
        self.ledger.audit(AuditEvent {
            action: "redeem",
            token_id: outcome.token_id.clone(),
            share_id: outcome.share_id.clone(),
            outcome: outcome.reason.to_owned(),
            detail,
        });
    }
}

impl std::fmt::Debug for Redeemer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Redeemer")
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::follow::test_share::TestShare;
    use crate::rate_limit::{LocalRedeemFailures, RedeemLimiter};

    #[tokio::test]
    async fn a_redeem_whose_caller_hangs_up_still_counts() {
        let share = TestShare::new().await;
        let redeemer = Redeemer::new(
            share.ledger.clone(),
            SecretHasher::new(256, 1).unwrap(),
            Arc::new(LocalRedeemFailures::new(RedeemLimiter::new(
                1,
                Duration::from_secs(3600),
            ))),
            Metrics::default(),
            LogLimiter::new(Duration::from_secs(10)),
        );
        let peer = SocketAddr::from(([192, 0, 2, 1], 1));
        // Ask, then hang up before the answer.
        let mut call = Box::pin(redeemer.redeem("garbage", peer, Via::Rpc));
        assert!(futures::poll!(call.as_mut()).is_pending());
        drop(call);
        // The check finishes anyway and its failure counts: the next one is limited.
        let limited = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if redeemer.limiter.check_unknown(peer.ip()).is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        limited
            .await
            .expect("the abandoned failure was never counted");
        let err = redeemer
            .redeem("garbage", peer, Via::Rpc)
            .await
            .unwrap_err();
        assert_eq!(err.code, capsync_shared::ErrorCode::RateLimited);
    }
}
