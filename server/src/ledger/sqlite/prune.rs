//! SQLite's side of prune planning, chunked share deletion and archiving: the
//! queries behind [`LedgerTx`](crate::ledger::rules::store::LedgerTx)'s lifecycle
//! reads and writes; the rules are [`crate::ledger::rules::prune`].

use capsync_shared::{ShareId, TokenId};
use rusqlite::{Connection, OptionalExtension, params};

use super::convert::cursor_column;
use super::errors::corrupt;
use super::share_rows::{SHARE_COLUMNS, VISIBLE, share_from_row};
use crate::ledger::rules::store::{ShareBeingDeleted, ShareRow};
use crate::ledger::{LedgerResult, ShareFootprint};

/// Rows and JSON bytes a share holds, one tagged row per kind of record, each
/// an aggregate over an index range led by `share_id`.
const FOOTPRINT: &str = "
    SELECT 'messages', count(*), coalesce(sum(length(CAST(json AS BLOB))), 0)
        FROM messages WHERE share_id = ?1
    UNION ALL
    SELECT 'parts', count(*), coalesce(sum(length(CAST(json AS BLOB))), 0)
        FROM parts WHERE share_id = ?1
    UNION ALL
    SELECT 'part text', 0, coalesce(sum(length(CAST(text AS BLOB))), 0)
        FROM part_chunks WHERE share_id = ?1
    UNION ALL
    SELECT 'ops', count(*), coalesce(sum(length(CAST(payload AS BLOB))), 0)
        FROM ops WHERE share_id = ?1
    UNION ALL
    SELECT 'tokens', count(*), 0 FROM tokens WHERE share_id = ?1
    UNION ALL
    SELECT 'records', count(*), coalesce(sum(length(CAST(json AS BLOB))), 0) FROM (
        SELECT json FROM sessions WHERE share_id = ?1
        UNION ALL SELECT json FROM models WHERE share_id = ?1
        UNION ALL SELECT json FROM diffs WHERE share_id = ?1)";

/// Tables a deletion empties a chunk at a time, in an order that never leaves a
/// row whose parent is gone: parts' appended text before the parts, parts before their
/// messages, everything before the share. Sessions and diffs hold one row each and go
/// with the share row.
const CHUNKED_TABLES: [&str; 6] = [
    "ops",
    "part_chunks",
    "parts",
    "messages",
    "models",
    "removed",
];

/// What deleting `share_id` removes, from aggregates.
pub(super) fn footprint(conn: &Connection, share_id: &ShareId) -> LedgerResult<ShareFootprint> {
    let mut footprint = ShareFootprint::default();
    let mut stmt = conn.prepare_cached(FOOTPRINT)?;
    let mut rows = stmt.query([share_id.as_str()])?;
    while let Some(row) = rows.next()? {
        let kind: String = row.get(0)?;
        let count = non_negative(row.get(1)?)?;
        footprint.bytes += non_negative(row.get(2)?)?;
        match kind.as_str() {
            "messages" => footprint.messages = count,
            "parts" => footprint.parts = count,
            "ops" => footprint.ops = count,
            "tokens" => footprint.tokens = count,
            // Sessions, models and diffs count in bytes only.
            _ => {}
        }
    }
    Ok(footprint)
}

/// A count or a sum of lengths, which SQLite cannot make negative.
fn non_negative(value: i64) -> LedgerResult<u64> {
    u64::try_from(value).map_err(|_| corrupt(format!("negative count {value}")))
}

/// The share, visible or hidden by a deletion that has begun.
pub(super) fn being_deleted(
    conn: &Connection,
    share_id: &ShareId,
) -> LedgerResult<Option<ShareBeingDeleted>> {
    Ok(conn
        .prepare_cached(
            "SELECT cursor, deleting_at IS NOT NULL, owner_token_id FROM shares WHERE id = ?1",
        )?
        .query_row([share_id.as_str()], |r| {
            Ok(ShareBeingDeleted {
                cursor: cursor_column(r, 0)?,
                hidden: r.get(1)?,
                owner: TokenId(r.get(2)?),
            })
        })
        .optional()?)
}

/// Hides the share from every call and deletes its tokens.
pub(super) fn hide(conn: &Connection, share_id: &ShareId, now: i64) -> LedgerResult<()> {
    conn.prepare_cached("UPDATE shares SET deleting_at = ?2 WHERE id = ?1")?
        .execute(params![share_id.as_str(), now])?;
    conn.prepare_cached("DELETE FROM tokens WHERE share_id = ?1")?
        .execute([share_id.as_str()])?;
    Ok(())
}

/// Deletes at most `max_rows` rows of a hidden share, a table at a time; when
/// none are left, the share row, whose cascade then only meets its single
/// session and diffs rows (`true`).
pub(super) fn delete_rows(
    conn: &Connection,
    share_id: &ShareId,
    max_rows: u32,
) -> LedgerResult<bool> {
    let mut budget = max_rows.max(1);
    for table in CHUNKED_TABLES {
        let deleted = conn
            .prepare_cached(&format!(
                "DELETE FROM {table} WHERE rowid IN
                     (SELECT rowid FROM {table} WHERE share_id = ?1 LIMIT ?2)"
            ))?
            .execute(params![share_id.as_str(), budget])?;
        budget = budget.saturating_sub(u32::try_from(deleted).unwrap_or(u32::MAX));
        if budget == 0 {
            return Ok(false);
        }
    }
    conn.prepare_cached("DELETE FROM shares WHERE id = ?1")?
        .execute([share_id.as_str()])?;
    Ok(true)
}

/// Shares whose deletion began but did not finish, by id.
pub(super) fn hidden(conn: &Connection) -> LedgerResult<Vec<ShareId>> {
    Ok(conn
        .prepare_cached("SELECT id FROM shares WHERE deleting_at IS NOT NULL ORDER BY id")?
        .query_map([], |r| r.get(0).map(ShareId))?
        .collect::<Result<Vec<_>, _>>()?)
}

/// Ids of visible, unarchived shares last changed before `before`, oldest first.
pub(super) fn unarchived_inactive(
    conn: &Connection,
    before: i64,
    limit: u32,
) -> LedgerResult<Vec<ShareId>> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT id FROM shares
             WHERE {VISIBLE} AND archived_at IS NULL AND updated_at < ?1
             ORDER BY updated_at, id LIMIT ?2"
        ))?
        .query_map(params![before, limit], |r| r.get(0).map(ShareId))?
        .collect::<Result<Vec<_>, _>>()?)
}

/// Visible shares last changed before `before` (archived ones only, if asked).
pub(super) fn inactive(
    conn: &Connection,
    before: i64,
    archived_only: bool,
) -> LedgerResult<Vec<ShareRow>> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {SHARE_COLUMNS} FROM shares
             WHERE {VISIBLE} AND updated_at < ?1 AND (NOT ?2 OR archived_at IS NOT NULL)
             ORDER BY id"
        ))?
        .query_map(params![before, archived_only], share_from_row)?
        .collect::<Result<Vec<_>, _>>()?)
}

/// Whether a visible share holds `session_id`.
pub(super) fn session_is_shared(conn: &Connection, session_id: &str) -> LedgerResult<bool> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT 1 FROM shares WHERE session_id = ?1 AND {VISIBLE}"
        ))?
        .exists([session_id])?)
}

/// Visible shares whose parent session is `session_id`.
pub(super) fn of_parent_session(
    conn: &Connection,
    session_id: &str,
) -> LedgerResult<Vec<ShareRow>> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {SHARE_COLUMNS} FROM shares WHERE parent_session_id = ?1 AND {VISIBLE} ORDER BY id"
        ))?
        .query_map([session_id], share_from_row)?
        .collect::<Result<Vec<_>, _>>()?)
}
