//! SQLite's own reads: token lookup for redeeming, the admin-token check, and stats.

use capsync_shared::{Epoch, ShareId, TokenId, TokenKind};
use std::path::Path;

use rusqlite::{Connection, OptionalExtension};

use super::convert::cursor_column;
use super::errors::corrupt;
use super::tx::SqliteTx;
use crate::ledger::rules::authority;
use crate::ledger::{
    Authority, LedgerResult, ShareState, SqliteStats, Stats, StorageStats, StoredToken,
};

/// The token row with its share's current state; no authority needed.
pub(super) fn find_token(conn: &Connection, id: &TokenId) -> LedgerResult<Option<StoredToken>> {
    let row = conn
        .prepare_cached(
            "SELECT t.kind, t.share_id, t.epoch, t.secret_hash, t.expires_at,
                    t.revoked_at IS NOT NULL, s.id, s.cursor, s.writer_epoch, s.viewer_epoch,
                    s.updated_at
             FROM tokens t LEFT JOIN shares s ON s.id = t.share_id AND s.deleting_at IS NULL
             WHERE t.id = ?1",
        )?
        .query_row([id.as_str()], |r| {
            let share = match r.get::<_, Option<String>>(6)? {
                Some(share_id) => Some(ShareState {
                    share_id: ShareId(share_id),
                    cursor: cursor_column(r, 7)?,
                    writer_epoch: Epoch(r.get(8)?),
                    viewer_epoch: Epoch(r.get(9)?),
                    updated_at: r.get(10)?,
                }),
                None => None,
            };
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, u32>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<i64>>(4)?,
                r.get::<_, bool>(5)?,
                share,
            ))
        })
        .optional()?;
    let Some((kind, share_id, epoch, secret_hash, expires_at, revoked, share)) = row else {
        return Ok(None);
    };
    Ok(Some(StoredToken {
        id: id.clone(),
        kind: TokenKind::parse(&kind).ok_or_else(|| corrupt(format!("token kind {kind:?}")))?,
        share_id: share_id.map(ShareId),
        epoch: Epoch(epoch),
        secret_hash,
        expires_at,
        revoked,
        share,
    }))
}

/// Admin only: sizes from the pragmas and the files, counts from aggregates.
/// Every number is one statement's answer; nothing here loads rows into memory.
pub(super) fn stats(
    conn: &Connection,
    who: &Authority,
    db_path: &Path,
    now: i64,
) -> LedgerResult<Stats> {
    authority::check_global(&mut SqliteTx::new(conn), who, TokenKind::Admin, now)?;
    let pragma = |name: &str| -> LedgerResult<u64> {
        let value: i64 = conn.pragma_query_value(None, name, |r| r.get(0))?;
        Ok(u64::try_from(value).unwrap_or(0))
    };
    let (page_size, page_count, free_pages) = (
        pragma("page_size")?,
        pragma("page_count")?,
        pragma("freelist_count")?,
    );
    // Cursors have no gaps, so a share's compaction point is also the number
    // of its ops that lost their payload.
    let (root_shares, child_shares, archived_shares, compacted_ops) = conn
        .prepare_cached(
            "SELECT coalesce(sum(parent_session_id = ''), 0),
                    coalesce(sum(parent_session_id <> ''), 0),
                    coalesce(sum(archived_at IS NOT NULL), 0),
                    coalesce(sum(compacted_through), 0)
             FROM shares WHERE deleting_at IS NULL",
        )?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .map(|(a, b, c, d): (i64, i64, i64, i64)| (count(a), count(b), count(c), count(d)))?;
    let single = |sql: &str| -> LedgerResult<u64> {
        Ok(count(
            conn.prepare_cached(sql)?.query_row([], |r| r.get(0))?,
        ))
    };
    let (ledger_ops, ledger_payload_bytes) = conn
        .prepare_cached(
            "SELECT count(*), coalesce(sum(length(CAST(payload AS BLOB))), 0) FROM ops",
        )?
        .query_row([], |r| Ok((count(r.get(0)?), count(r.get(1)?))))?;
    Ok(Stats {
        storage: StorageStats::Sqlite(SqliteStats {
            db_file_bytes: file_size(db_path),
            wal_file_bytes: file_size(&wal_path(db_path)),
            page_size,
            page_count,
            free_pages,
        }),
        root_shares,
        child_shares,
        archived_shares,
        messages: single("SELECT count(*) FROM messages")?,
        parts: single("SELECT count(*) FROM parts")?,
        ledger_ops,
        ledger_payload_bytes,
        compacted_ops,
        reclaimable_output_bytes: single(RECLAIMABLE_OUTPUT_BYTES)?,
    })
}

/// What a reclaim pass would clear: output and attachments still held by tool
/// parts marked compacted (the JSON text of each, so about the bytes saved).
const RECLAIMABLE_OUTPUT_BYTES: &str = "
    SELECT coalesce(sum(
        coalesce(length(CAST(json_extract(json, '$.state.output') AS BLOB)), 0)
        + CASE WHEN coalesce(json_array_length(json, '$.state.attachments'), 0) > 0
               THEN length(CAST(json_extract(json, '$.state.attachments') AS BLOB)) ELSE 0 END), 0)
    FROM parts
    WHERE json_extract(json, '$.type') = 'tool'
      AND json_extract(json, '$.state.time.compacted') IS NOT NULL";

/// A count or sum from SQLite (never negative here) as `u64`.
fn count(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// SQLite names the log after the database: `<path>-wal`.
pub(super) fn wal_path(db_path: &Path) -> std::path::PathBuf {
    let mut name = db_path.as_os_str().to_owned();
    name.push("-wal");
    name.into()
}

/// A missing file (no WAL right after a checkpoint on close) counts as empty.
pub(super) fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}
