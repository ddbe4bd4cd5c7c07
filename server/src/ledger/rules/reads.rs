//! Reads under authority: a share's state, its children, listings, and catch-up
//! from the ledger with the cursor rules (a cursor the share never reached, or
//! one below its compaction point, is an error the caller must hear).

use capsync_shared::{Cursor, ShareId, TokenKind};

use super::authority::{self, Access};
use super::part_text;
use super::store::{LedgerTx, ShareRow};
use crate::ledger::{
    Authority, FeedPage, LedgerError, LedgerResult, OpsPage, ShareInfo, ShareState, StoredParts,
};

pub fn share_state(tx: &mut impl LedgerTx, who: &Authority, now: i64) -> LedgerResult<ShareState> {
    Ok(authority::check_share(tx, who, Access::Read, now)?.state())
}

/// The child shares `who`'s share's viewers may read (see [`ShareRow::is_child_of`]).
pub fn child_shares(
    tx: &mut impl LedgerTx,
    who: &Authority,
    now: i64,
) -> LedgerResult<Vec<ShareInfo>> {
    let parent = authority::check_share(tx, who, Access::Read, now)?;
    // The rule decides, whatever the engine's query returned.
    Ok(tx
        .children(&parent)?
        .iter()
        .filter(|child| child.is_child_of(&parent))
        .map(ShareRow::info)
        .collect())
}

/// Shares ordered by id after `after`: every share for an admin, its own for an
/// agent; archived ones only with `include_archived`.
pub fn list_shares(
    tx: &mut impl LedgerTx,
    who: &Authority,
    after: &str,
    limit: u32,
    include_archived: bool,
    now: i64,
) -> LedgerResult<Vec<ShareInfo>> {
    authority::check_admin_or_agent(tx, who, now)?;
    let owner = (who.kind == TokenKind::Agent).then_some(&who.token_id);
    let rows = tx.list_shares(owner, after, limit, include_archived)?;
    Ok(rows.iter().map(ShareRow::info).collect())
}

/// Applied ops with cursor > `after`, at most `limit`, with the cursor they were read at.
pub fn ops_since(
    tx: &mut impl LedgerTx,
    who: &Authority,
    after: Cursor,
    limit: u32,
    now: i64,
) -> LedgerResult<OpsPage> {
    let share = authority::check_share(tx, who, Access::Read, now)?;
    page_after(tx, &share, after, limit)
}

/// [`ops_since`] for the server's own live feed: the same cursor rules, no
/// caller's authority (each follower's is checked on its own; see `crate::follow`).
/// Without `after`, no ops: only the share's state, where a new feed starts.
pub fn feed_ops(
    tx: &mut impl LedgerTx,
    share: &ShareId,
    after: Option<Cursor>,
    limit: u32,
) -> LedgerResult<FeedPage> {
    let share = tx.share(share)?.ok_or(LedgerError::NotFound)?;
    let ops = match after {
        Some(after) => page_after(tx, &share, after, limit)?.ops,
        None => Vec::new(),
    };
    Ok(FeedPage {
        ops,
        state: share.state(),
    })
}

/// The stored JSON of those of `parts` that `share` holds, for the server's own
/// feed like [`feed_ops`].
pub fn feed_parts(
    tx: &mut impl LedgerTx,
    share: &ShareId,
    parts: &[String],
) -> LedgerResult<StoredParts> {
    let row = tx.share(share)?.ok_or(LedgerError::NotFound)?;
    stored_parts(tx, &row, parts)
}

/// The stored JSON of those of `parts` that `who`'s share holds.
pub fn parts(
    tx: &mut impl LedgerTx,
    who: &Authority,
    parts: &[String],
    now: i64,
) -> LedgerResult<StoredParts> {
    let row = authority::check_share(tx, who, Access::Read, now)?;
    stored_parts(tx, &row, parts)
}

fn stored_parts(
    tx: &mut impl LedgerTx,
    share: &ShareRow,
    parts: &[String],
) -> LedgerResult<StoredParts> {
    let mut found = Vec::new();
    for id in parts {
        if let Some(json) = tx.part(&share.id, id)? {
            found.push((id.clone(), json));
        }
    }
    let ids: Vec<&str> = found.iter().map(|(id, _)| id.as_str()).collect();
    let appended = part_text::appended(tx, &share.id, &ids)?;
    let found = found
        .into_iter()
        .map(|(id, json)| appended.fold(&id, json).map(|json| (id, json)))
        .collect::<LedgerResult<_>>()?;
    Ok(StoredParts {
        parts: found,
        cursor: share.cursor,
    })
}

/// The page of `share` after `after`, under the cursor rules.
fn page_after(
    tx: &mut impl LedgerTx,
    share: &ShareRow,
    after: Cursor,
    limit: u32,
) -> LedgerResult<OpsPage> {
    // A cursor the share never reached cannot be "caught up" from: whoever
    // holds it is talking to another (or a restored) server, and must be told.
    if after > share.cursor {
        return Err(LedgerError::CursorAhead {
            asked: after,
            cursor: share.cursor,
        });
    }
    // Below the compaction point payloads are gone: a gap the caller must fill
    // with a snapshot, never one it is handed silently.
    if after < share.compacted_through {
        return Err(LedgerError::SnapshotRequired(share.compacted_through));
    }
    Ok(OpsPage {
        ops: tx.ops_after(&share.id, after, limit)?,
        cursor: share.cursor,
    })
}
