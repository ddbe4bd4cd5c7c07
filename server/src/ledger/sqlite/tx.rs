//! [`LedgerTx`] over SQLite: the rules' reads and writes as statements on the
//! connection whose transaction is open (the writer's group transaction, or a
//! pooled reader's read transaction).

use capsync_shared::{Cursor, Epoch, OpId, OpKind, ShareId, TokenId, TokenKind};
use rusqlite::{Connection, OptionalExtension, params};

use super::convert::{cursor_column, cursor_param};
use super::errors::corrupt;
use super::share_rows::{self, SHARE_COLUMNS, VISIBLE, share_from_row};
use super::{compact, prune};
use crate::ledger::rules::batch_order::TransactionId;
use crate::ledger::rules::store::{
    ChunkWrite, KeyFrom, LedgerEntry, LedgerTx, MessageStanding, OpFootprint, PartChunk,
    PartStanding, PartTextEnd, Probe, Removable, ShareBeingDeleted, ShareRow, Standing,
    StoredToken, TokenGrant,
};
use crate::ledger::{AuditEvent, LedgerResult, LoggedOp, NewToken, ShareFootprint};

/// The comparison and key of an ordered read's start.
fn bound<K>(from: &KeyFrom<K>) -> (&'static str, &K) {
    match from {
        KeyFrom::AtLeast(key) => (">=", key),
        KeyFrom::After(key) => (">", key),
    }
}

/// `(id, json)` of a share's rows of `table` (models or messages) in id order,
/// from `from`, at most `limit`.
fn records_by_id(
    conn: &Connection,
    table: &str,
    share: &ShareId,
    from: &KeyFrom<String>,
    limit: u32,
) -> LedgerResult<Vec<(String, String)>> {
    let (op, key) = bound(from);
    let sql = format!(
        "SELECT id, json FROM {table} WHERE share_id = ?1 AND id {op} ?2 ORDER BY id LIMIT ?3"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params![share.as_str(), key, limit], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The rules' view of one SQLite transaction.
pub(crate) struct SqliteTx<'c> {
    conn: &'c Connection,
    /// The group transaction a write runs in, which its group's other writes share.
    transaction: TransactionId,
}

impl<'c> SqliteTx<'c> {
    /// A transaction of its own (a read, or work outside the writer's groups).
    pub fn new(conn: &'c Connection) -> Self {
        Self::in_transaction(conn, TransactionId::next())
    }

    /// Work in `transaction`, which other work may share (the writer's group).
    pub fn in_transaction(conn: &'c Connection, transaction: TransactionId) -> Self {
        Self { conn, transaction }
    }
}

impl LedgerTx for SqliteTx<'_> {
    fn transaction(&self) -> TransactionId {
        self.transaction
    }

    fn share(&mut self, id: &ShareId) -> LedgerResult<Option<ShareRow>> {
        share_rows::load_share(self.conn, id)
    }

    /// One writer thread runs every write transaction, one at a time: reading
    /// the row is all the locking a share needs.
    fn lock_share(&mut self, id: &ShareId) -> LedgerResult<Option<ShareRow>> {
        share_rows::load_share(self.conn, id)
    }

    fn children(&mut self, parent: &ShareRow) -> LedgerResult<Vec<ShareRow>> {
        if parent.session_id.is_empty() {
            return Ok(Vec::new());
        }
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {SHARE_COLUMNS} FROM shares
             WHERE parent_session_id = ?1 AND owner_token_id = ?2 AND id <> ?3 AND {VISIBLE}
             ORDER BY session_id, id"
        ))?;
        let rows = stmt.query_map(
            params![
                parent.session_id,
                parent.owner_token_id.as_str(),
                parent.id.as_str()
            ],
            share_from_row,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn list_shares(
        &mut self,
        owner: Option<&TokenId>,
        after: &str,
        limit: u32,
        include_archived: bool,
    ) -> LedgerResult<Vec<ShareRow>> {
        let rows = match owner {
            None => self
                .conn
                .prepare_cached(&format!(
                    "SELECT {SHARE_COLUMNS} FROM shares
                     WHERE id > ?1 AND (?3 OR archived_at IS NULL) AND {VISIBLE}
                     ORDER BY id LIMIT ?2"
                ))?
                .query_map(params![after, limit, include_archived], share_from_row)?
                .collect::<Result<Vec<_>, _>>()?,
            Some(owner) => self
                .conn
                .prepare_cached(&format!(
                    "SELECT {SHARE_COLUMNS} FROM shares
                     WHERE owner_token_id = ?1 AND id > ?2 AND (?4 OR archived_at IS NULL)
                       AND {VISIBLE}
                     ORDER BY id LIMIT ?3"
                ))?
                .query_map(
                    params![owner.as_str(), after, limit, include_archived],
                    share_from_row,
                )?
                .collect::<Result<Vec<_>, _>>()?,
        };
        Ok(rows)
    }

    fn inactive_shares(&mut self, before: i64, archived_only: bool) -> LedgerResult<Vec<ShareRow>> {
        prune::inactive(self.conn, before, archived_only)
    }

    fn unarchived_inactive(&mut self, before: i64, limit: u32) -> LedgerResult<Vec<ShareId>> {
        prune::unarchived_inactive(self.conn, before, limit)
    }

    fn session_is_shared(&mut self, session_id: &str) -> LedgerResult<bool> {
        prune::session_is_shared(self.conn, session_id)
    }

    fn shares_of_parent_session(&mut self, session_id: &str) -> LedgerResult<Vec<ShareRow>> {
        prune::of_parent_session(self.conn, session_id)
    }

    fn footprint(&mut self, share: &ShareId) -> LedgerResult<ShareFootprint> {
        prune::footprint(self.conn, share)
    }

    fn share_being_deleted(&mut self, share: &ShareId) -> LedgerResult<Option<ShareBeingDeleted>> {
        prune::being_deleted(self.conn, share)
    }

    fn hide_share(&mut self, share: &ShareId, now: i64) -> LedgerResult<()> {
        prune::hide(self.conn, share, now)
    }

    fn delete_share_rows(&mut self, share: &ShareId, max_rows: u32) -> LedgerResult<bool> {
        prune::delete_rows(self.conn, share, max_rows)
    }

    fn hidden_shares(&mut self) -> LedgerResult<Vec<ShareId>> {
        prune::hidden(self.conn)
    }

    fn visible_share_count(&mut self) -> LedgerResult<u64> {
        compact::visible_shares(self.conn)
    }

    fn next_share(&mut self, from: &KeyFrom<String>) -> LedgerResult<Option<(ShareId, Cursor)>> {
        compact::next_share(self.conn, from)
    }

    fn op_footprints(
        &mut self,
        share: &ShareId,
        after: Cursor,
        limit: u32,
    ) -> LedgerResult<Vec<OpFootprint>> {
        compact::op_footprints(self.conn, share, after, limit)
    }

    fn drop_payloads(
        &mut self,
        share: &ShareId,
        after: Cursor,
        through: Cursor,
    ) -> LedgerResult<()> {
        compact::drop_payloads(self.conn, share, after, through)
    }

    fn open_share_of_session(
        &mut self,
        owner: &TokenId,
        session_id: &str,
    ) -> LedgerResult<Option<ShareId>> {
        Ok(self
            .conn
            .prepare_cached(&format!(
                "SELECT id FROM shares
                 WHERE session_id = ?1 AND owner_token_id = ?2 AND archived_at IS NULL AND {VISIBLE}
                 ORDER BY created_at, id LIMIT 1"
            ))?
            .query_row(params![session_id, owner.as_str()], |r| r.get(0))
            .optional()?
            .map(ShareId))
    }

    /// Write transactions run one at a time on the writer thread: nothing to lock.
    fn lock_session(&mut self, _owner: &TokenId, _session_id: &str) -> LedgerResult<()> {
        Ok(())
    }

    fn insert_share(&mut self, share: &ShareRow) -> LedgerResult<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO shares (id, session_id, project_id, parent_session_id, title,
                                     owner_token_id, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                share.id.as_str(),
                share.session_id,
                share.project_id,
                share.parent_session_id,
                share.title,
                share.owner_token_id.as_str(),
                share.created_at,
                share.updated_at,
            ])?;
        Ok(())
    }

    fn set_epochs(&mut self, share: &ShareId, writers: Epoch, viewers: Epoch) -> LedgerResult<()> {
        self.conn
            .prepare_cached("UPDATE shares SET writer_epoch = ?2, viewer_epoch = ?3 WHERE id = ?1")?
            .execute(params![share.as_str(), writers.0, viewers.0])?;
        Ok(())
    }

    fn set_archived_at(&mut self, share: &ShareId, archived_at: Option<i64>) -> LedgerResult<()> {
        self.conn
            .prepare_cached("UPDATE shares SET archived_at = ?2 WHERE id = ?1")?
            .execute(params![share.as_str(), archived_at])?;
        Ok(())
    }

    fn insert_token(
        &mut self,
        token: &NewToken,
        stored: &StoredToken<'_>,
        now: i64,
    ) -> LedgerResult<()> {
        self.conn
            .prepare_cached(
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

    fn revoke_token(&mut self, id: &TokenId, now: i64) -> LedgerResult<bool> {
        let changed = self
            .conn
            .prepare_cached(
                "UPDATE tokens SET revoked_at = coalesce(revoked_at, ?2) WHERE id = ?1",
            )?
            .execute(params![id.as_str(), now])?;
        Ok(changed > 0)
    }

    fn revoke_admin_tokens(&mut self, now: i64) -> LedgerResult<()> {
        self.conn
            .prepare_cached(
                "UPDATE tokens SET revoked_at = ?1 WHERE kind = 'admin' AND revoked_at IS NULL",
            )?
            .execute([now])?;
        Ok(())
    }

    fn has_live_admin_token(&mut self, now: i64) -> LedgerResult<bool> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT 1 FROM tokens
                 WHERE kind = 'admin' AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at >= ?1)",
            )?
            .exists([now])?)
    }

    /// Write transactions run one at a time on the writer thread: nothing to lock.
    fn lock_bootstrap(&mut self) -> LedgerResult<()> {
        Ok(())
    }

    fn token_grant(&mut self, id: &TokenId) -> LedgerResult<Option<TokenGrant>> {
        let row = self
            .conn
            .prepare_cached(
                "SELECT kind, share_id, expires_at, revoked_at IS NOT NULL FROM tokens WHERE id = ?1",
            )?
            .query_row([id.as_str()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, Option<i64>>(2)?,
                    r.get::<_, bool>(3)?,
                ))
            })
            .optional()?;
        row.map(|(kind, share_id, expires_at, revoked)| {
            Ok(TokenGrant {
                kind: TokenKind::parse(&kind)
                    .ok_or_else(|| corrupt(format!("token kind {kind:?}")))?,
                share_id: share_id.map(ShareId),
                expires_at,
                revoked,
            })
        })
        .transpose()
    }

    fn claim_op_and_probe(
        &mut self,
        share: &ShareId,
        entry: &LedgerEntry<'_>,
        probe: Probe<'_>,
    ) -> LedgerResult<Option<Standing>> {
        let inserted = self
            .conn
            .prepare_cached(
                "INSERT INTO ops (share_id, cursor, op_id, kind, payload, token_id, batch_id, applied_at, digest)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (share_id, op_id) DO NOTHING",
            )?
            .execute(params![
                share.as_str(),
                cursor_param(entry.cursor)?,
                entry.op_id.as_str(),
                entry.kind.as_str(),
                entry.payload,
                entry.token_id.as_str(),
                entry.batch_id,
                entry.applied_at,
                entry.digest,
            ])?;
        if inserted == 0 {
            return Ok(None);
        }
        self.probe(share, probe).map(Some)
    }

    fn release_op(&mut self, share: &ShareId, cursor: Cursor) -> LedgerResult<()> {
        self.conn
            .prepare_cached("DELETE FROM ops WHERE share_id = ?1 AND cursor = ?2")?
            .execute(params![share.as_str(), cursor_param(cursor)?])?;
        Ok(())
    }

    fn logged_op(
        &mut self,
        share: &ShareId,
        op_id: &OpId,
    ) -> LedgerResult<Option<(Cursor, Option<Vec<u8>>)>> {
        Ok(self
            .conn
            .prepare_cached("SELECT cursor, digest FROM ops WHERE share_id = ?1 AND op_id = ?2")?
            .query_row(params![share.as_str(), op_id.as_str()], |r| {
                Ok((cursor_column(r, 0)?, r.get(1)?))
            })
            .optional()?)
    }

    fn ops_after(
        &mut self,
        share: &ShareId,
        after: Cursor,
        limit: u32,
    ) -> LedgerResult<Vec<LoggedOp>> {
        self.conn
            .prepare_cached(
                "SELECT cursor, op_id, kind, payload, applied_at FROM ops
                 WHERE share_id = ?1 AND cursor > ?2 ORDER BY cursor LIMIT ?3",
            )?
            .query_map(params![share.as_str(), cursor_param(after)?, limit], |r| {
                Ok((
                    cursor_column(r, 0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })?
            .map(|row| {
                let (cursor, op_id, kind, payload, applied_at) = row?;
                Ok(LoggedOp {
                    cursor,
                    op_id: OpId(op_id),
                    kind: kind
                        .parse::<OpKind>()
                        .map_err(|_| corrupt(format!("op kind {kind:?}")))?,
                    payload,
                    applied_at,
                })
            })
            .collect()
    }

    fn set_cursor(&mut self, share: &ShareId, cursor: Cursor, updated_at: i64) -> LedgerResult<()> {
        self.conn
            .prepare_cached("UPDATE shares SET cursor = ?2, updated_at = ?3 WHERE id = ?1")?
            .execute(params![share.as_str(), cursor_param(cursor)?, updated_at])?;
        Ok(())
    }

    fn session_updated(&mut self, share: &ShareId) -> LedgerResult<Option<Option<i64>>> {
        Ok(self
            .conn
            .prepare_cached("SELECT updated FROM sessions WHERE share_id = ?1")?
            .query_row([share.as_str()], |r| r.get(0))
            .optional()?)
    }

    fn put_session(
        &mut self,
        share: &ShareId,
        updated: Option<i64>,
        json: &str,
    ) -> LedgerResult<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO sessions (share_id, updated, json) VALUES (?1, ?2, ?3)
                 ON CONFLICT (share_id) DO UPDATE
                 SET updated = excluded.updated, json = excluded.json",
            )?
            .execute(params![share.as_str(), updated, json])?;
        Ok(())
    }

    fn message_standing(&mut self, share: &ShareId, id: &str) -> LedgerResult<MessageStanding> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM removed
                                WHERE share_id = ?1 AND kind = 'message' AND id = ?2),
                        (SELECT terminal FROM messages WHERE share_id = ?1 AND id = ?2)",
            )?
            .query_row(params![share.as_str(), id], |r| {
                Ok(MessageStanding {
                    removed: r.get(0)?,
                    terminal: r.get(1)?,
                })
            })?)
    }

    fn put_message(
        &mut self,
        share: &ShareId,
        id: &str,
        terminal: bool,
        json: &str,
    ) -> LedgerResult<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO messages (share_id, id, terminal, json) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (share_id, id) DO UPDATE
                 SET terminal = excluded.terminal, json = excluded.json",
            )?
            .execute(params![share.as_str(), id, terminal, json])?;
        Ok(())
    }

    fn remove_message(&mut self, share: &ShareId, id: &str) -> LedgerResult<()> {
        self.conn
            .prepare_cached("DELETE FROM parts WHERE share_id = ?1 AND message_id = ?2")?
            .execute(params![share.as_str(), id])?;
        self.conn
            .prepare_cached("DELETE FROM messages WHERE share_id = ?1 AND id = ?2")?
            .execute(params![share.as_str(), id])?;
        Ok(())
    }

    fn part_standing(
        &mut self,
        share: &ShareId,
        id: &str,
        message_id: &str,
    ) -> LedgerResult<PartStanding> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM removed
                                WHERE share_id = ?1 AND kind = 'part' AND id = ?2),
                        EXISTS (SELECT 1 FROM removed
                                WHERE share_id = ?1 AND kind = 'message' AND id = ?3),
                        (SELECT finished FROM parts WHERE share_id = ?1 AND id = ?2)",
            )?
            .query_row(params![share.as_str(), id, message_id], |r| {
                Ok(PartStanding {
                    removed: r.get(0)?,
                    message_removed: r.get(1)?,
                    finished: r.get(2)?,
                })
            })?)
    }

    fn part(&mut self, share: &ShareId, id: &str) -> LedgerResult<Option<String>> {
        Ok(self
            .conn
            .prepare_cached("SELECT json FROM parts WHERE share_id = ?1 AND id = ?2")?
            .query_row(params![share.as_str(), id], |r| r.get(0))
            .optional()?)
    }

    fn put_part(
        &mut self,
        share: &ShareId,
        id: &str,
        message_id: &str,
        finished: bool,
        json: &str,
    ) -> LedgerResult<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO parts (share_id, id, message_id, finished, json)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (share_id, id) DO UPDATE
                 SET message_id = excluded.message_id, finished = excluded.finished,
                     json = excluded.json",
            )?
            .execute(params![share.as_str(), id, message_id, finished, json])?;
        // The snapshot holds the whole text: what deltas appended before it is in it.
        self.conn
            .prepare_cached("DELETE FROM part_chunks WHERE share_id = ?1 AND part_id = ?2")?
            .execute(params![share.as_str(), id])?;
        Ok(())
    }

    fn part_text_end(
        &mut self,
        share: &ShareId,
        id: &str,
        field: &str,
    ) -> LedgerResult<Option<PartTextEnd>> {
        let finished: Option<bool> = self
            .conn
            .prepare_cached("SELECT finished FROM parts WHERE share_id = ?1 AND id = ?2")?
            .query_row(params![share.as_str(), id], |r| r.get(0))
            .optional()?;
        let Some(finished) = finished else {
            return Ok(None);
        };
        let last_chunk = self
            .conn
            .prepare_cached(
                "SELECT seq, length(CAST(text AS BLOB)) FROM part_chunks
                 WHERE share_id = ?1 AND part_id = ?2 AND field = ?3
                 ORDER BY seq DESC LIMIT 1",
            )?
            .query_row(params![share.as_str(), id, field], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        Ok(Some(PartTextEnd {
            finished,
            last_chunk,
        }))
    }

    fn write_part_chunk(
        &mut self,
        share: &ShareId,
        id: &str,
        field: &str,
        chunk: ChunkWrite,
        text: &str,
    ) -> LedgerResult<()> {
        let (sql, seq) = match chunk {
            ChunkWrite::Start(seq) => (
                "INSERT INTO part_chunks (share_id, part_id, field, seq, text)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                seq,
            ),
            ChunkWrite::Extend(seq) => (
                "UPDATE part_chunks SET text = text || ?5
                 WHERE share_id = ?1 AND part_id = ?2 AND field = ?3 AND seq = ?4",
                seq,
            ),
        };
        self.conn
            .prepare_cached(sql)?
            .execute(params![share.as_str(), id, field, seq, text])?;
        Ok(())
    }

    fn part_chunks(&mut self, share: &ShareId, parts: &[&str]) -> LedgerResult<Vec<PartChunk>> {
        let mut chunks = Vec::new();
        let mut stmt = self.conn.prepare_cached(
            "SELECT field, text FROM part_chunks
             WHERE share_id = ?1 AND part_id = ?2 ORDER BY field, seq",
        )?;
        let mut ids = parts.to_vec();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            let rows = stmt.query_map(params![share.as_str(), id], |r| {
                Ok(PartChunk {
                    part_id: id.to_owned(),
                    field: r.get(0)?,
                    text: r.get(1)?,
                })
            })?;
            for chunk in rows {
                chunks.push(chunk?);
            }
        }
        Ok(chunks)
    }

    fn remove_part(&mut self, share: &ShareId, id: &str) -> LedgerResult<()> {
        self.conn
            .prepare_cached("DELETE FROM parts WHERE share_id = ?1 AND id = ?2")?
            .execute(params![share.as_str(), id])?;
        Ok(())
    }

    fn mark_removed(&mut self, share: &ShareId, kind: Removable, id: &str) -> LedgerResult<()> {
        self.conn
            .prepare_cached(
                "INSERT OR IGNORE INTO removed (share_id, kind, id) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![share.as_str(), kind.as_str(), id])?;
        Ok(())
    }

    fn put_diffs(&mut self, share: &ShareId, json: &str) -> LedgerResult<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO diffs (share_id, json) VALUES (?1, ?2)
                 ON CONFLICT (share_id) DO UPDATE SET json = excluded.json",
            )?
            .execute(params![share.as_str(), json])?;
        Ok(())
    }

    fn session_json(&mut self, share: &ShareId) -> LedgerResult<Option<String>> {
        Ok(self
            .conn
            .prepare_cached("SELECT json FROM sessions WHERE share_id = ?1")?
            .query_row([share.as_str()], |r| r.get(0))
            .optional()?)
    }

    fn diffs_json(&mut self, share: &ShareId) -> LedgerResult<Option<String>> {
        Ok(self
            .conn
            .prepare_cached("SELECT json FROM diffs WHERE share_id = ?1")?
            .query_row([share.as_str()], |r| r.get(0))
            .optional()?)
    }

    fn models_from(
        &mut self,
        share: &ShareId,
        from: &KeyFrom<String>,
        limit: u32,
    ) -> LedgerResult<Vec<(String, String)>> {
        records_by_id(self.conn, "models", share, from, limit)
    }

    fn messages_from(
        &mut self,
        share: &ShareId,
        from: &KeyFrom<String>,
        limit: u32,
    ) -> LedgerResult<Vec<(String, String)>> {
        records_by_id(self.conn, "messages", share, from, limit)
    }

    fn parts_from(
        &mut self,
        share: &ShareId,
        message_id: &str,
        from: &KeyFrom<String>,
        limit: u32,
    ) -> LedgerResult<Vec<(String, String)>> {
        let (op, key) = bound(from);
        let sql = format!(
            "SELECT id, json FROM parts
             WHERE share_id = ?1 AND message_id = ?2 AND id {op} ?3 ORDER BY id LIMIT ?4"
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(params![share.as_str(), message_id, key, limit], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn orphan_parts_from(
        &mut self,
        share: &ShareId,
        from: &KeyFrom<(String, String)>,
        limit: u32,
    ) -> LedgerResult<Vec<(String, String, String)>> {
        let (op, (message_id, part_id)) = bound(from);
        let sql = format!(
            "SELECT p.message_id, p.id, p.json FROM parts p
             WHERE p.share_id = ?1 AND (p.message_id, p.id) {op} (?2, ?3)
               AND NOT EXISTS (SELECT 1 FROM messages m
                               WHERE m.share_id = p.share_id AND m.id = p.message_id)
             ORDER BY p.message_id, p.id LIMIT ?4"
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(params![share.as_str(), message_id, part_id, limit], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn put_model(&mut self, share: &ShareId, id: &str, json: &str) -> LedgerResult<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO models (share_id, id, json) VALUES (?1, ?2, ?3)
                 ON CONFLICT (share_id, id) DO UPDATE SET json = excluded.json",
            )?
            .execute(params![share.as_str(), id, json])?;
        Ok(())
    }

    fn audit(&mut self, event: &AuditEvent, at: i64) -> LedgerResult<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO audit (at, action, token_id, share_id, outcome, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                at,
                event.action,
                event.token_id.as_ref().map(|t| t.as_str()),
                event.share_id.as_ref().map(|s| s.as_str()),
                event.outcome,
                event.detail,
            ])?;
        Ok(())
    }
}
