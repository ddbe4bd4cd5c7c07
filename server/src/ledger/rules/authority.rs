//! Who may do what: an [`Authority`] checked against its token and share, inside
//! the transaction that does the work, so a revocation that commits first stops
//! it on every connection (and, with a shared database, on every server).

use capsync_shared::{ShareId, TokenId, TokenKind};

use super::store::{LedgerTx, ShareRow, TokenGrant};
use crate::ledger::{Authority, LedgerError, LedgerResult, Operator};

/// What a share-scoped call needs from its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Appending and minting: writers only.
    Write,
    /// State, snapshots and catch-up: writers and viewers.
    Read,
}

/// Checks that `who`'s token is live and may act as `who.kind`.
///
/// A missing row means the token was deleted with its share (the share-scoped
/// callers check the share first and answer `NotFound` for that), so it reads
/// as revoked.
fn check_token(tx: &mut impl LedgerTx, who: &Authority, now: i64) -> LedgerResult<TokenGrant> {
    check_grant(tx.token_grant(&who.token_id)?, who, now)
}

/// [`check_token`] on the grant read for `who`'s token.
fn check_grant(token: Option<TokenGrant>, who: &Authority, now: i64) -> LedgerResult<TokenGrant> {
    let token = token.ok_or(LedgerError::Revoked)?;
    if token.revoked {
        return Err(LedgerError::Revoked);
    }
    if token.expires_at.is_some_and(|at| at < now) {
        return Err(LedgerError::PermissionDenied);
    }
    // A viewer derived from a writer capability carries the writer's token id;
    // nothing else may claim more (or other) authority than its token grants.
    let compatible = token.kind == who.kind
        || (who.kind == TokenKind::Viewer && token.kind == TokenKind::Writer);
    if !compatible {
        return Err(LedgerError::PermissionDenied);
    }
    Ok(token)
}

/// Checks an admin or agent authority of exactly `kind`.
pub fn check_global(
    tx: &mut impl LedgerTx,
    who: &Authority,
    kind: TokenKind,
    now: i64,
) -> LedgerResult<()> {
    if who.kind != kind {
        return Err(LedgerError::PermissionDenied);
    }
    check_token(tx, who, now).map(|_| ())
}

/// Checks who runs a lifecycle call: an admin's token, or the server itself.
/// An owner may only delete its own shares (see [`check_deleter`]).
pub fn check_operator(tx: &mut impl LedgerTx, op: &Operator, now: i64) -> LedgerResult<()> {
    match op {
        Operator::Admin(who) => check_global(tx, who, TokenKind::Admin, now),
        Operator::Scheduler => Ok(()),
        Operator::Owner(_) => Err(LedgerError::PermissionDenied),
    }
}

/// Checks who deletes a share owned by `owner` (`None`: no such share): an
/// operator, or that owner. Another agent's share is `NotFound`, as for
/// revocations, so an agent learns nothing about shares it does not own.
pub fn check_deleter(
    tx: &mut impl LedgerTx,
    op: &Operator,
    owner: Option<&TokenId>,
    now: i64,
) -> LedgerResult<()> {
    match op {
        Operator::Owner(who) => {
            check_global(tx, who, TokenKind::Agent, now)?;
            match owner {
                Some(owner) if owner != &who.token_id => Err(LedgerError::NotFound),
                _ => Ok(()),
            }
        }
        op => check_operator(tx, op, now),
    }
}

/// Checks an admin or agent authority, whichever it claims to be.
pub fn check_admin_or_agent(tx: &mut impl LedgerTx, who: &Authority, now: i64) -> LedgerResult<()> {
    match who.kind {
        TokenKind::Admin | TokenKind::Agent => check_token(tx, who, now).map(|_| ()),
        TokenKind::Writer | TokenKind::Viewer => Err(LedgerError::PermissionDenied),
    }
}

/// Checks a writer or viewer authority and returns its share as of this
/// transaction. With [`Access::Write`] the share is locked for the rest of the
/// transaction (see [`LedgerTx::lock_share`]): what is read from it, the cursor
/// above all, stays true until the commit.
pub fn check_share(
    tx: &mut impl LedgerTx,
    who: &Authority,
    access: Access,
    now: i64,
) -> LedgerResult<ShareRow> {
    let allowed = match access {
        Access::Write => who.kind == TokenKind::Writer,
        Access::Read => matches!(who.kind, TokenKind::Writer | TokenKind::Viewer),
    };
    if !allowed {
        return Err(LedgerError::PermissionDenied);
    }
    let Some((share_id, epoch)) = &who.share else {
        return Err(LedgerError::PermissionDenied);
    };
    let (share, token) = tx.share_and_grant(share_id, access == Access::Write, &who.token_id)?;
    let share = share.ok_or(LedgerError::NotFound)?;
    let token = check_grant(token, who, now)?;
    // Whose epochs the capability answers to: its own share's, or, for a
    // viewer token reading a child share, its parent's.
    let issued_for = if token.share_id.as_ref() == Some(share_id) {
        share.clone()
    } else {
        parent_for_viewer(tx, &token, access)?
            .filter(|parent| share.is_child_of(parent))
            .ok_or(LedgerError::PermissionDenied)?
    };
    let current = match who.kind {
        TokenKind::Writer => issued_for.writer_epoch,
        _ => issued_for.viewer_epoch,
    };
    if *epoch != current {
        return Err(LedgerError::Revoked);
    }
    Ok(share)
}

/// The share a viewer token was issued for, when it reads another share (a child).
fn parent_for_viewer(
    tx: &mut impl LedgerTx,
    token: &TokenGrant,
    access: Access,
) -> LedgerResult<Option<ShareRow>> {
    match (&token.share_id, access, token.kind) {
        (Some(parent), Access::Read, TokenKind::Viewer) => tx.share(parent),
        _ => Ok(None),
    }
}

/// The share `id` for an admin, or for the agent that owns it; another agent's
/// share is `NotFound` (an agent learns nothing about shares it does not own).
pub fn owned_share(
    tx: &mut impl LedgerTx,
    who: &Authority,
    id: &ShareId,
    now: i64,
) -> LedgerResult<ShareRow> {
    check_admin_or_agent(tx, who, now)?;
    let share = tx.share(id)?.ok_or(LedgerError::NotFound)?;
    if who.kind == TokenKind::Agent && share.owner_token_id != who.token_id {
        return Err(LedgerError::NotFound);
    }
    Ok(share)
}
