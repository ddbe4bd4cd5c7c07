//! Tokens along the attenuation chain: admin → agent, writer → writer | viewer,
//! an agent (or admin) → its share's writers and viewers; each share token at
//! the current epoch of its scope, so revoking the scope ends it.

use capsync_shared::{Epoch, ShareId, TokenId, TokenKind};

use super::authority::{self, Access};
use super::store::{LedgerTx, StoredToken};
use crate::ledger::{Authority, LedgerError, LedgerResult, Minted, NewToken};

/// Stores `token` as a `kind` token issued by `issuer`, if the chain
/// Admin → Agent, Writer → Writer | Viewer allows it.
pub fn mint(
    tx: &mut impl LedgerTx,
    issuer: &Authority,
    kind: TokenKind,
    token: &NewToken,
    now: i64,
) -> LedgerResult<Minted> {
    let stored = match (issuer.kind, kind) {
        (TokenKind::Admin, TokenKind::Agent) => {
            authority::check_global(tx, issuer, TokenKind::Admin, now)?;
            StoredToken {
                kind,
                share_id: None,
                epoch: Epoch(0),
                issued_by: Some(&issuer.token_id),
            }
        }
        (TokenKind::Writer, TokenKind::Writer | TokenKind::Viewer) => {
            let share = authority::check_share(tx, issuer, Access::Write, now)?;
            // The issuer's epoch was just checked to be the current writer epoch,
            // so a saved writer lives exactly as long as the capability it saves.
            let epoch = match kind {
                TokenKind::Writer => share.writer_epoch,
                _ => share.viewer_epoch,
            };
            return store(tx, token, kind, Some(share.id), epoch, issuer, now);
        }
        _ => return Err(LedgerError::PermissionDenied),
    };
    tx.insert_token(token, &stored, now)?;
    Ok(minted(&stored))
}

/// Stores a writer or viewer token for `share_id`, issued by its owning agent or
/// an admin, at the share's current epoch of the token's scope.
pub fn mint_for_share(
    tx: &mut impl LedgerTx,
    issuer: &Authority,
    share_id: &ShareId,
    kind: TokenKind,
    token: &NewToken,
    now: i64,
) -> LedgerResult<Minted> {
    let share = authority::owned_share(tx, issuer, share_id, now)?;
    let epoch = match kind {
        TokenKind::Writer => share.writer_epoch,
        TokenKind::Viewer => share.viewer_epoch,
        TokenKind::Admin | TokenKind::Agent => return Err(LedgerError::PermissionDenied),
    };
    store(tx, token, kind, Some(share.id), epoch, issuer, now)
}

fn store(
    tx: &mut impl LedgerTx,
    token: &NewToken,
    kind: TokenKind,
    share_id: Option<ShareId>,
    epoch: Epoch,
    issuer: &Authority,
    now: i64,
) -> LedgerResult<Minted> {
    let stored = StoredToken {
        kind,
        share_id: share_id.as_ref(),
        epoch,
        issued_by: Some(&issuer.token_id),
    };
    tx.insert_token(token, &stored, now)?;
    Ok(minted(&stored))
}

fn minted(stored: &StoredToken<'_>) -> Minted {
    Minted {
        kind: stored.kind,
        share_id: stored.share_id.cloned(),
        epoch: stored.epoch,
    }
}

/// Revokes every admin token and stores `token` as the only live one.
pub fn replace_admin(tx: &mut impl LedgerTx, token: &NewToken, now: i64) -> LedgerResult<()> {
    tx.revoke_admin_tokens(now)?;
    let stored = StoredToken {
        kind: TokenKind::Admin,
        share_id: None,
        epoch: Epoch(0),
        issued_by: None,
    };
    tx.insert_token(token, &stored, now)
}

/// Stores `token` as the admin token unless a live one exists; `true` if stored.
pub fn create_first_admin(
    tx: &mut impl LedgerTx,
    token: &NewToken,
    now: i64,
) -> LedgerResult<bool> {
    tx.lock_bootstrap()?;
    if tx.has_live_admin_token(now)? {
        return Ok(false);
    }
    let stored = StoredToken {
        kind: TokenKind::Admin,
        share_id: None,
        epoch: Epoch(0),
        issued_by: None,
    };
    tx.insert_token(token, &stored, now)?;
    Ok(true)
}

/// Admin only. Revoking an already revoked token keeps its first revocation time.
pub fn revoke(
    tx: &mut impl LedgerTx,
    who: &Authority,
    token_id: &TokenId,
    now: i64,
) -> LedgerResult<()> {
    authority::check_global(tx, who, TokenKind::Admin, now)?;
    if !tx.revoke_token(token_id, now)? {
        return Err(LedgerError::NotFound);
    }
    Ok(())
}
