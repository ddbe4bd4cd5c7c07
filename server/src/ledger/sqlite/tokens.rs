//! Token writes: minting along the attenuation chain, replacing the admin token, revoking one token.

use capsync_shared::{Epoch, ShareId, TokenId, TokenKind};
use rusqlite::{Connection, params};

use super::share_rows::load_share;
use super::tx::SqliteTx;
use crate::ledger::rules::authority::{self, Access};
use crate::ledger::{Authority, LedgerError, LedgerResult, Minted, NewToken};

/// Stores `token` as a `kind` token issued by `issuer`, if the chain
/// Admin → Agent, Writer → Writer | Viewer allows it.
pub(super) fn mint(
    conn: &Connection,
    issuer: &Authority,
    kind: TokenKind,
    token: &NewToken,
    now: i64,
) -> LedgerResult<Minted> {
    match (issuer.kind, kind) {
        (TokenKind::Admin, TokenKind::Agent) => {
            authority::check_global(&mut SqliteTx::new(conn), issuer, TokenKind::Admin, now)?;
            let stored = StoredAs {
                kind,
                share_id: None,
                epoch: Epoch(0),
                issued_by: Some(&issuer.token_id),
            };
            insert(conn, token, &stored, now)?;
            Ok(stored.minted())
        }
        (TokenKind::Writer, TokenKind::Writer | TokenKind::Viewer) => {
            let share =
                authority::check_share(&mut SqliteTx::new(conn), issuer, Access::Write, now)?;
            // The issuer's epoch was just checked to be the current writer epoch,
            // so a saved writer lives exactly as long as the capability it saves.
            let epoch = match kind {
                TokenKind::Writer => share.writer_epoch,
                _ => share.viewer_epoch,
            };
            let stored = StoredAs {
                kind,
                share_id: Some(&share.id),
                epoch,
                issued_by: Some(&issuer.token_id),
            };
            insert(conn, token, &stored, now)?;
            Ok(stored.minted())
        }
        _ => Err(LedgerError::PermissionDenied),
    }
}

/// Stores a writer or viewer token for `share_id`, issued by its owning agent or
/// an admin, at the share's current epoch of the token's scope.
pub(super) fn mint_for_share(
    conn: &Connection,
    issuer: &Authority,
    share_id: &ShareId,
    kind: TokenKind,
    token: &NewToken,
    now: i64,
) -> LedgerResult<Minted> {
    authority::check_admin_or_agent(&mut SqliteTx::new(conn), issuer, now)?;
    let share = load_share(conn, share_id)?.ok_or(LedgerError::NotFound)?;
    if issuer.kind == TokenKind::Agent && share.owner_token_id != issuer.token_id {
        return Err(LedgerError::NotFound);
    }
    let epoch = match kind {
        TokenKind::Writer => share.writer_epoch,
        TokenKind::Viewer => share.viewer_epoch,
        TokenKind::Admin | TokenKind::Agent => return Err(LedgerError::PermissionDenied),
    };
    let stored = StoredAs {
        kind,
        share_id: Some(&share.id),
        epoch,
        issued_by: Some(&issuer.token_id),
    };
    insert(conn, token, &stored, now)?;
    Ok(stored.minted())
}

/// Revokes every admin token and stores `token` as the only live one.
pub(super) fn replace_admin(conn: &Connection, token: &NewToken, now: i64) -> LedgerResult<()> {
    conn.prepare_cached(
        "UPDATE tokens SET revoked_at = ?1 WHERE kind = 'admin' AND revoked_at IS NULL",
    )?
    .execute([now])?;
    let stored = StoredAs {
        kind: TokenKind::Admin,
        share_id: None,
        epoch: Epoch(0),
        issued_by: None,
    };
    insert(conn, token, &stored, now)
}

/// Admin only. Revoking an already revoked token keeps its first revocation time.
pub(super) fn revoke(
    conn: &Connection,
    who: &Authority,
    token_id: &TokenId,
    now: i64,
) -> LedgerResult<()> {
    authority::check_global(&mut SqliteTx::new(conn), who, TokenKind::Admin, now)?;
    let changed = conn
        .prepare_cached("UPDATE tokens SET revoked_at = coalesce(revoked_at, ?2) WHERE id = ?1")?
        .execute(params![token_id.as_str(), now])?;
    if changed == 0 {
        return Err(LedgerError::NotFound);
    }
    Ok(())
}

/// Where a new token row sits in the attenuation chain.
pub(super) struct StoredAs<'a> {
    pub kind: TokenKind,
    /// Set for writer and viewer tokens.
    pub share_id: Option<&'a ShareId>,
    /// The share's epoch of the token's scope when it was minted.
    pub epoch: Epoch,
    /// Who minted it, for the audit trail; `None` for the bootstrap admin token.
    pub issued_by: Option<&'a TokenId>,
}

impl StoredAs<'_> {
    fn minted(&self) -> Minted {
        Minted {
            kind: self.kind,
            share_id: self.share_id.cloned(),
            epoch: self.epoch,
        }
    }
}

pub(super) fn insert(
    conn: &Connection,
    token: &NewToken,
    stored: &StoredAs<'_>,
    now: i64,
) -> LedgerResult<()> {
    conn.prepare_cached(
        "INSERT INTO tokens
             (id, kind, share_id, epoch, secret_hash, label, expires_at, issued_by, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        token.id.as_str(),
        stored.kind.as_str(),
        stored.share_id.map(ShareId::as_str),
        stored.epoch.0,
        token.secret_hash,
        token.label,
        token.expires_at,
        stored.issued_by.map(TokenId::as_str),
        now,
    ])?;
    Ok(())
}
