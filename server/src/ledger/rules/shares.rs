//! Share lifecycle writes: creation with the first writer and viewer tokens,
//! joining an agent's open share of a session, epoch revocation, archiving.

use capsync_shared::limits::MAX_RECORD_ID_BYTES;
use capsync_shared::{Cursor, Epoch, ShareId, TokenKind};

use super::authority;
use super::store::{LedgerTx, ShareRow, StoredToken};
use super::tokens;
use crate::ledger::{
    Authority, LedgerError, LedgerResult, NewShare, NewToken, RevokeScope, ShareInfo, ShareState,
};

/// Creates a share owned by the agent `issuer`, with its writer and viewer tokens at epoch 0.
pub fn create(
    tx: &mut impl LedgerTx,
    issuer: &Authority,
    share: &NewShare,
    writer: &NewToken,
    viewer: &NewToken,
    now: i64,
) -> LedgerResult<ShareInfo> {
    authority::check_global(tx, issuer, TokenKind::Agent, now)?;
    insert(tx, issuer, share, writer, viewer, now)
}

fn insert(
    tx: &mut impl LedgerTx,
    issuer: &Authority,
    share: &NewShare,
    writer: &NewToken,
    viewer: &NewToken,
    now: i64,
) -> LedgerResult<ShareInfo> {
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
        cursor: Cursor(0),
        writer_epoch: Epoch(0),
        viewer_epoch: Epoch(0),
        created_at: now,
        updated_at: now,
        archived_at: None,
        compacted_through: Cursor(0),
    };
    tx.insert_share(&row)?;
    for (kind, token) in [(TokenKind::Writer, writer), (TokenKind::Viewer, viewer)] {
        let stored = StoredToken {
            kind,
            share_id: Some(&row.id),
            epoch: Epoch(0),
            issued_by: Some(&issuer.token_id),
        };
        tx.insert_token(token, &stored, now)?;
    }
    Ok(row.info())
}

/// [`create`], unless the agent `issuer` already has a visible, unarchived share of
/// the session: then `writer` and `viewer` are added to that one (`true`). The
/// session is locked first, so two calls at once make one share.
pub fn create_or_join(
    tx: &mut impl LedgerTx,
    issuer: &Authority,
    share: &NewShare,
    writer: &NewToken,
    viewer: &NewToken,
    now: i64,
) -> LedgerResult<(ShareInfo, bool)> {
    authority::check_global(tx, issuer, TokenKind::Agent, now)?;
    tx.lock_session(&issuer.token_id, &share.session_id)?;
    let Some(existing) = tx.open_share_of_session(&issuer.token_id, &share.session_id)? else {
        return insert(tx, issuer, share, writer, viewer, now).map(|info| (info, false));
    };
    tokens::mint_for_share(tx, issuer, &existing, TokenKind::Writer, writer, now)?;
    tokens::mint_for_share(tx, issuer, &existing, TokenKind::Viewer, viewer, now)?;
    let row = tx.share(&existing)?.ok_or(LedgerError::NotFound)?;
    Ok((row.info(), true))
}

/// Bumps the epochs of `scope`. An agent may only revoke shares it owns; any
/// other share is `NotFound`, so agents cannot probe for other agents' shares.
pub fn revoke(
    tx: &mut impl LedgerTx,
    who: &Authority,
    share_id: &ShareId,
    scope: RevokeScope,
    now: i64,
) -> LedgerResult<ShareState> {
    authority::owned_share(tx, who, share_id, now)?;
    let share = tx.lock_share(share_id)?.ok_or(LedgerError::NotFound)?;
    let (writers, viewers) = match scope {
        RevokeScope::Writers => (1, 0),
        RevokeScope::Viewers => (0, 1),
        RevokeScope::All => (1, 1),
    };
    let epochs = (
        Epoch(share.writer_epoch.0 + writers),
        Epoch(share.viewer_epoch.0 + viewers),
    );
    tx.set_epochs(share_id, epochs.0, epochs.1)?;
    let share = tx.share(share_id)?.ok_or(LedgerError::NotFound)?;
    Ok(share.state())
}

/// Admin only: archives (or unarchives) a share. Archiving an archived share keeps
/// its first `archived_at`, so a retried call does not move the date.
pub fn set_archived(
    tx: &mut impl LedgerTx,
    who: &Authority,
    share_id: &ShareId,
    archived: bool,
    now: i64,
) -> LedgerResult<ShareInfo> {
    authority::check_global(tx, who, TokenKind::Admin, now)?;
    let share = tx.lock_share(share_id)?.ok_or(LedgerError::NotFound)?;
    let archived_at = archived.then(|| share.archived_at.unwrap_or(now));
    if archived_at != share.archived_at {
        tx.set_archived_at(share_id, archived_at)?;
    }
    let share = tx.share(share_id)?.ok_or(LedgerError::NotFound)?;
    Ok(share.info())
}
