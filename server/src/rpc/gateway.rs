//! `Gateway`: the bootstrap capability. It holds no authority; it redeems sturdy refs.

use std::net::SocketAddr;
use std::rc::Rc;

use capsync_shared::capsync_capnp::{gateway, redeemed};
use capsync_shared::{ShareId, SturdyRef, TokenKind, now_millis};

use super::admin::AdminImpl;
use super::agent::AgentImpl;
use super::context::Context;
use super::viewer::ViewerImpl;
use super::wire;
use super::writer::WriterImpl;
use crate::error::ServerError;
use crate::ledger::{AuditEvent, Authority, ShareState, StoredToken};

/// One per connection: knows the peer, for rate limiting and the audit log.
pub struct GatewayImpl {
    ctx: Rc<Context>,
    peer: SocketAddr,
}

impl GatewayImpl {
    pub fn new(ctx: Rc<Context>, peer: SocketAddr) -> Self {
        Self { ctx, peer }
    }

    /// Checks a token. Every failure gives the caller the same `permissionDenied`;
    /// the audit log gets the real reason.
    async fn check(&self, token: &str) -> Result<(StoredToken, Option<ShareState>), ServerError> {
        let peer = self.peer.ip();
        if self.ctx.limiter.borrow_mut().is_blocked(peer) {
            self.audit(None, None, "rate_limited");
            return Err(ServerError::new(
                capsync_shared::ErrorCode::RateLimited,
                "too many failed redeems from this address; try again later",
            ));
        }
        let failure = |reason: &str, stored: Option<&StoredToken>| {
            self.ctx.limiter.borrow_mut().record_failure(peer);
            self.audit(
                stored.map(|t| t.id.clone()),
                stored.and_then(|t| t.share_id.clone()),
                reason,
            );
            ServerError::denied()
        };
        let Ok(sturdy) = token.parse::<SturdyRef>() else {
            // Spend the verification time anyway: a malformed token must not answer faster.
            self.ctx.hasher.verify("", None).await;
            return Err(failure("malformed", None));
        };
        let stored = self.ctx.ledger.find_token(sturdy.id.clone()).await?;
        let hash = stored.as_ref().map(|t| t.secret_hash.clone());
        if !self.ctx.hasher.verify(sturdy.secret(), hash).await {
            let reason = if stored.is_some() {
                "bad_secret"
            } else {
                "unknown_token"
            };
            return Err(failure(reason, stored.as_ref()));
        }
        let Some(stored) = stored else {
            return Err(failure("unknown_token", None));
        };
        if stored.kind != sturdy.kind {
            return Err(failure("kind_mismatch", Some(&stored)));
        }
        if stored.revoked {
            return Err(failure("revoked", Some(&stored)));
        }
        if stored.expires_at.is_some_and(|at| at <= now_millis()) {
            return Err(failure("expired", Some(&stored)));
        }
        let state = match stored.kind {
            TokenKind::Admin | TokenKind::Agent => None,
            TokenKind::Writer | TokenKind::Viewer => {
                let Some(state) = stored.share.clone() else {
                    return Err(failure("share_deleted", Some(&stored)));
                };
                let current = if stored.kind == TokenKind::Writer {
                    state.writer_epoch
                } else {
                    state.viewer_epoch
                };
                if stored.epoch != current {
                    return Err(failure("revoked_epoch", Some(&stored)));
                }
                Some(state)
            }
        };
        self.audit(Some(stored.id.clone()), stored.share_id.clone(), "ok");
        Ok((stored, state))
    }

    fn audit(
        &self,
        token_id: Option<capsync_shared::TokenId>,
        share_id: Option<ShareId>,
        outcome: &str,
    ) {
        self.ctx.audit(AuditEvent {
            action: "redeem",
            token_id,
            share_id,
            outcome: outcome.to_owned(),
            detail: format!("peer={}", self.peer),
        });
    }
}

fn authority(stored: &StoredToken, state: Option<&ShareState>) -> Authority {
    Authority {
        token_id: stored.id.clone(),
        kind: stored.kind,
        share: state.map(|s| (s.share_id.clone(), stored.epoch)),
    }
}

fn fill_capability(
    ctx: &Rc<Context>,
    stored: &StoredToken,
    state: Option<&ShareState>,
    mut out: redeemed::capability::Builder<'_>,
) {
    let auth = authority(stored, state);
    match stored.kind {
        TokenKind::Admin => out.set_admin(capnp_rpc::new_client(AdminImpl::new(ctx.clone(), auth))),
        TokenKind::Agent => out.set_agent(capnp_rpc::new_client(AgentImpl::new(ctx.clone(), auth))),
        TokenKind::Writer => out.set_writer(capnp_rpc::new_client(WriterImpl::new(
            ctx.clone(),
            auth,
            stored.expires_at,
        ))),
        TokenKind::Viewer => {
            out.set_viewer(capnp_rpc::new_client(ViewerImpl::new(ctx.clone(), auth)))
        }
    }
}

impl gateway::Server for GatewayImpl {
    async fn redeem(
        self: Rc<Self>,
        params: gateway::RedeemParams,
        mut results: gateway::RedeemResults,
    ) -> Result<(), capnp::Error> {
        let token = wire::text(params.get()?.get_token());
        let outcome = match token {
            Ok(token) => self.check(&token).await,
            Err(err) => Err(err),
        };
        let result = results.get().init_result();
        match outcome {
            Ok((stored, state)) => {
                let mut ok = result.init_ok();
                fill_capability(
                    &self.ctx,
                    &stored,
                    state.as_ref(),
                    ok.reborrow().init_capability(),
                );
                ok.set_token_id(stored.id.as_str());
                ok.set_expires_at(stored.expires_at.unwrap_or(0));
                if let Some(state) = &state {
                    wire::fill_state(state, ok.init_state());
                }
            }
            Err(err) => err.fill(result.init_failure()),
        }
        Ok(())
    }
}
