//! Share operations that both `Admin` and `Agent` offer (the ledger scopes an
//! agent to the shares it owns): listing, revoking, minting share tokens.

use capsync_shared::capsync_capnp::{mint_result, share_list_result, share_state_result};
use capsync_shared::limits::{DEFAULT_LIST_PAGE, MAX_LIST_PAGE};
use capsync_shared::{ShareId, TokenKind};

use super::answer::answer;
use super::context::Context;
use super::wire;
use crate::error::ServerError;
use crate::ledger::{AuditEvent, Authority};

/// The audit outcome of a result: "ok" or the error code.
pub fn outcome<T>(result: &Result<T, ServerError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(err) => err.code.as_str(),
    }
}

/// The share's current state, for writers and viewers alike.
pub async fn state(ctx: &Context, auth: &Authority, out: share_state_result::Builder<'_>) {
    match ctx.ledger.share_state(auth.clone()).await {
        Ok(state) => wire::fill_state(&state, out.init_ok()),
        Err(err) => ServerError::from(err).fill(out.init_failure()),
    }
}

/// Lists the shares `auth` may see, one page, into `out`.
pub async fn list(
    ctx: &Context,
    auth: &Authority,
    after: capnp::Result<capnp::text::Reader<'_>>,
    limit: u32,
    include_archived: bool,
    out: share_list_result::Builder<'_>,
) {
    let limit = list_limit(limit);
    let listed = async {
        let after = wire::text(after)?;
        // One more than the page, to know whether another page follows.
        let mut shares = ctx
            .ledger
            .list_shares(auth.clone(), after, limit + 1, include_archived)
            .await?;
        let more = shares.len() > limit as usize;
        shares.truncate(limit as usize);
        Ok::<_, ServerError>((shares, more))
    }
    .await;
    answer!(out, listed, |(shares, more): (Vec<_>, _), ok| {
        wire::fill_list(&shares, more, ok)
    });
}

/// A listing's page size: 0 means the default, and anything above the cap is capped.
pub(super) fn list_limit(requested: u32) -> u32 {
    match requested {
        0 => DEFAULT_LIST_PAGE,
        n => n.min(MAX_LIST_PAGE),
    }
}

/// Bumps a share's epochs, audits it, and writes the new state into `out`.
pub async fn revoke(
    ctx: &Context,
    auth: &Authority,
    share_id: capnp::Result<capnp::text::Reader<'_>>,
    scope: Result<capsync_shared::capsync_capnp::Scope, capnp::NotInSchema>,
    out: share_state_result::Builder<'_>,
) {
    let share_id = wire::text(share_id).map(ShareId);
    let revoked = async {
        let scope = wire::scope(scope)?;
        let share_id = share_id.clone()?;
        Ok::<_, ServerError>(
            ctx.ledger
                .revoke_share(auth.clone(), share_id, scope)
                .await?,
        )
    }
    .await;
    ctx.audit(AuditEvent {
        action: "revoke_share",
        token_id: Some(auth.token_id.clone()),
        share_id: share_id.ok(),
        outcome: outcome(&revoked).to_owned(),
        detail: String::new(),
    });
    answer!(out, revoked, |state, ok| wire::fill_state(&state, ok));
}

/// Mints a writer or viewer token for a share the caller owns (or any, for an admin).
pub async fn mint(
    ctx: &Context,
    auth: &Authority,
    share_id: capnp::Result<capnp::text::Reader<'_>>,
    expires_at: i64,
    kind: TokenKind,
    out: mint_result::Builder<'_>,
) {
    let share_id = wire::text(share_id).map(ShareId);
    let minted = async {
        let share_id = share_id.clone()?;
        let expires_at =
            wire::optional_time(expires_at, "expiresAt", ctx.ledger.clock().now_millis())?;
        let (token, row) = ctx.hasher.mint(kind, expires_at, String::new()).await?;
        ctx.ledger
            .mint_for_share(auth.clone(), share_id, kind, row)
            .await?;
        Ok::<_, ServerError>((token, expires_at))
    }
    .await;
    ctx.audit(AuditEvent {
        action: "mint",
        token_id: Some(auth.token_id.clone()),
        share_id: share_id.ok(),
        outcome: outcome(&minted).to_owned(),
        detail: match &minted {
            Ok((token, _)) => format!("new_{kind}={}", token.id),
            Err(_) => String::new(),
        },
    });
    match minted {
        Ok((token, expires_at)) => wire::fill_minted(
            &token.expose(),
            token.id.as_str(),
            expires_at,
            out.init_ok(),
        ),
        Err(err) => err.fill(out.init_failure()),
    }
}
