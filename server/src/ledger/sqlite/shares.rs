//! Share writes: creation with the first writer and viewer tokens, epoch revocation, archiving.

use capsync_shared::limits::MAX_RECORD_ID_BYTES;
use capsync_shared::{Cursor, Epoch, ShareId, TokenKind};
use rusqlite::{Connection, OptionalExtension, params};

use super::share_rows::{VISIBLE, load_share};
use super::tokens::{self, StoredAs};
use super::tx::SqliteTx;
use crate::ledger::rules::authority;
use crate::ledger::rules::store::ShareRow;
use crate::ledger::{
    Authority, LedgerError, LedgerResult, NewShare, NewToken, RevokeScope, ShareInfo, ShareState,
};

/// Creates a share owned by the agent `issuer`, with its writer and viewer tokens at epoch 0.
pub(super) fn create(
    conn: &Connection,
    issuer: &Authority,
    share: &NewShare,
    writer: &NewToken,
    viewer: &NewToken,
    now: i64,
) -> LedgerResult<ShareInfo> {
    authority::check_global(&mut SqliteTx::new(conn), issuer, TokenKind::Agent, now)?;
    // session.upsert must name this id, so a share with an unusable one could never hold a session.
    if share.session_id.is_empty() || share.session_id.len() > MAX_RECORD_ID_BYTES {
        return Err(LedgerError::InvalidArgument(format!(
            "sessionId must be 1 to {MAX_RECORD_ID_BYTES} bytes"
        )));
    }
    let row = ShareRow {
        id: share.share_id.clone(),
        session_id: share.session_id.clone(),
        project_id: share.project_id.clone(),
        parent_session_id: share.parent_session_id.clone(),
        title: share.title.clone(),
        owner_token_id: issuer.token_id.clone(),
        cursor: Default::default(),
        writer_epoch: Epoch(0),
        viewer_epoch: Epoch(0),
        created_at: now,
        updated_at: now,
        archived_at: None,
        compacted_through: Cursor(0),
    };
    conn.prepare_cached(
        "INSERT INTO shares (id, session_id, project_id, parent_session_id, title,
                             owner_token_id, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
    )?
    .execute(params![
        row.id.as_str(),
        row.session_id,
        row.project_id,
        row.parent_session_id,
        row.title,
        row.owner_token_id.as_str(),
        now,
    ])?;
    for (kind, token) in [(TokenKind::Writer, writer), (TokenKind::Viewer, viewer)] {
        let stored = StoredAs {
            kind,
            share_id: Some(&row.id),
            epoch: Epoch(0),
            issued_by: Some(&issuer.token_id),
        };
        tokens::insert(conn, token, &stored, now)?;
    }
    Ok(row.info())
}

/// [`create`], or the agent's existing share of the same session with
/// `writer` and `viewer` added to it (`true`).
pub(super) fn create_or_join(
    conn: &Connection,
    issuer: &Authority,
    share: &NewShare,
    writer: &NewToken,
    viewer: &NewToken,
    now: i64,
) -> LedgerResult<(ShareInfo, bool)> {
    authority::check_global(&mut SqliteTx::new(conn), issuer, TokenKind::Agent, now)?;
    let existing: Option<String> = conn
        .prepare_cached(&format!(
            "SELECT id FROM shares
             WHERE session_id = ?1 AND owner_token_id = ?2 AND archived_at IS NULL AND {VISIBLE}
             ORDER BY created_at, id LIMIT 1"
        ))?
        .query_row(params![share.session_id, issuer.token_id.as_str()], |r| {
            r.get(0)
        })
        .optional()?;
    let Some(existing) = existing.map(ShareId) else {
        return create(conn, issuer, share, writer, viewer, now).map(|info| (info, false));
    };
    tokens::mint_for_share(conn, issuer, &existing, TokenKind::Writer, writer, now)?;
    tokens::mint_for_share(conn, issuer, &existing, TokenKind::Viewer, viewer, now)?;
    let row = load_share(conn, &existing)?.ok_or(LedgerError::NotFound)?;
    Ok((row.info(), true))
}

/// Bumps the epochs of `scope`. An agent may only revoke shares it owns; any
/// other share is `NotFound`, so agents cannot probe for other agents' shares.
pub(super) fn revoke(
    conn: &Connection,
    who: &Authority,
    share_id: &ShareId,
    scope: RevokeScope,
    now: i64,
) -> LedgerResult<ShareState> {
    authority::check_admin_or_agent(&mut SqliteTx::new(conn), who, now)?;
    let share = load_share(conn, share_id)?.ok_or(LedgerError::NotFound)?;
    if who.kind == TokenKind::Agent && share.owner_token_id != who.token_id {
        return Err(LedgerError::NotFound);
    }
    let (writers, viewers) = match scope {
        RevokeScope::Writers => (1, 0),
        RevokeScope::Viewers => (0, 1),
        RevokeScope::All => (1, 1),
    };
    conn.prepare_cached(
        "UPDATE shares SET writer_epoch = writer_epoch + ?2, viewer_epoch = viewer_epoch + ?3
         WHERE id = ?1",
    )?
    .execute(params![share_id.as_str(), writers, viewers])?;
    let share = load_share(conn, share_id)?.ok_or(LedgerError::NotFound)?;
    Ok(share.state())
}

/// Admin only: archives (or unarchives) a share. Archiving an archived share keeps
/// its first `archived_at`, so a retried call does not move the date.
pub(super) fn set_archived(
    conn: &Connection,
    who: &Authority,
    share_id: &ShareId,
    archived: bool,
    now: i64,
) -> LedgerResult<ShareInfo> {
    authority::check_global(&mut SqliteTx::new(conn), who, TokenKind::Admin, now)?;
    let updated = conn
        .prepare_cached(
            "UPDATE shares SET archived_at = CASE WHEN ?2 THEN coalesce(archived_at, ?3) END
             WHERE id = ?1 AND deleting_at IS NULL",
        )?
        .execute(params![share_id.as_str(), archived, now])?;
    if updated == 0 {
        return Err(LedgerError::NotFound);
    }
    let share = load_share(conn, share_id)?.ok_or(LedgerError::NotFound)?;
    Ok(share.info())
}
