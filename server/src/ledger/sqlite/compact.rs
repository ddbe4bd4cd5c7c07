//! SQLite's side of ledger compaction: the queries behind `LedgerTx`'s
//! compaction reads and writes; the rules are [`crate::ledger::rules::compact`].

use capsync_shared::{Cursor, ShareId};
use rusqlite::{Connection, OptionalExtension, params};

use super::convert::{cursor_column, cursor_param};
use crate::ledger::LedgerResult;
use crate::ledger::rules::store::{KeyFrom, OpFootprint};

/// Shares not being deleted.
pub(super) fn visible_shares(conn: &Connection) -> LedgerResult<u64> {
    let count: i64 = conn
        .prepare_cached("SELECT count(*) FROM shares WHERE deleting_at IS NULL")?
        .query_row([], |r| r.get(0))?;
    Ok(u64::try_from(count).unwrap_or(0))
}

/// The first visible share from `from` in id order, with its compaction point.
pub(super) fn next_share(
    conn: &Connection,
    from: &KeyFrom<String>,
) -> LedgerResult<Option<(ShareId, Cursor)>> {
    let (sql, key) = match from {
        KeyFrom::AtLeast(key) => (
            "SELECT id, compacted_through FROM shares
             WHERE deleting_at IS NULL AND id >= ?1 ORDER BY id LIMIT 1",
            key,
        ),
        KeyFrom::After(key) => (
            "SELECT id, compacted_through FROM shares
             WHERE deleting_at IS NULL AND id > ?1 ORDER BY id LIMIT 1",
            key,
        ),
    };
    Ok(conn
        .prepare_cached(sql)?
        .query_row([key], |r| {
            Ok((ShareId::from(r.get::<_, String>(0)?), cursor_column(r, 1)?))
        })
        .optional()?)
}

/// Cursor, applied time and payload size of the ops after `after`, in cursor order.
pub(super) fn op_footprints(
    conn: &Connection,
    share: &ShareId,
    after: Cursor,
    limit: u32,
) -> LedgerResult<Vec<OpFootprint>> {
    let mut statement = conn.prepare_cached(
        "SELECT cursor, applied_at, length(CAST(payload AS BLOB)) FROM ops
         WHERE share_id = ?1 AND cursor > ?2 ORDER BY cursor LIMIT ?3",
    )?;
    let rows = statement.query_map(params![share.as_str(), cursor_param(after)?, limit], |r| {
        Ok(OpFootprint {
            cursor: cursor_column(r, 0)?,
            applied_at: r.get(1)?,
            payload_bytes: u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Empties the payloads of the ops in `(after, through]` and moves the share's
/// compaction point to `through`.
pub(super) fn drop_payloads(
    conn: &Connection,
    share: &ShareId,
    after: Cursor,
    through: Cursor,
) -> LedgerResult<()> {
    let (after, through) = (cursor_param(after)?, cursor_param(through)?);
    conn.prepare_cached(
        "UPDATE ops SET payload = '' WHERE share_id = ?1 AND cursor > ?2 AND cursor <= ?3",
    )?
    .execute(params![share.as_str(), after, through])?;
    conn.prepare_cached("UPDATE shares SET compacted_through = ?2 WHERE id = ?1")?
        .execute(params![share.as_str(), through])?;
    Ok(())
}
