//! [`LedgerTx`] over PostgreSQL: the rules' reads and writes as statements in one
//! transaction, with the locks that SQLite's single writer made unnecessary.
//!
//! - `lock_share`: the share row `FOR NO KEY UPDATE`, so appends, revocations and
//!   deletions of one share queue behind each other across every node, while inserts
//!   that only reference the row (its ops, parts, tokens) do not wait.
//! - `lock_session` and `lock_bootstrap`: transaction-scoped advisory locks.

use std::collections::HashMap;

use capsync_shared::{Cursor, Epoch, OpId, OpKind, ShareId, TokenId, TokenKind};
use postgres::types::{FromSql, ToSql};
use postgres::{Row, Statement};

use super::errors::{Failure, classify, corrupt, to_ledger};
use super::pool::Connection;
use super::probe;
use super::tail::{HeldPart, Param, Tail};
use crate::ledger::rules::batch_order::TransactionId;
use crate::ledger::rules::store::{
    ChunkWrite, KeyFrom, LedgerEntry, LedgerTx, MessageStanding, OpFootprint, PartChunk,
    PartStanding, PartTextEnd, Probe, Removable, ShareBeingDeleted, ShareRow, Standing,
    StoredToken, TokenGrant,
};
use crate::ledger::{AuditEvent, LedgerError, LedgerResult, LoggedOp, NewToken, ShareFootprint};

/// Columns of `shares` in the order [`share_row`] reads them.
const SHARE_COLUMNS: &str = "id, session_id, project_id, parent_session_id, title, \
     owner_token_id, cursor, writer_epoch, viewer_epoch, created_at, updated_at, archived_at, \
     compacted_through";

/// The condition every read of `shares` adds: a share whose deletion has begun is gone.
const VISIBLE: &str = "deleting_at IS NULL";

/// Advisory-lock key of the first admin token (see [`LedgerTx::lock_bootstrap`]).
const BOOTSTRAP_LOCK: i64 = 0x6361_7073_796e_6302;

/// Statements prepared on one connection, by their SQL.
pub(super) type Statements = HashMap<String, Statement>;

/// The rules' view of one PostgreSQL transaction.
///
/// What needs no answer waits and goes out together with the next statement, in one
/// round trip (the asynchronous client pipelines requests issued together): `BEGIN`
/// with the first statement, the held-back writes of the [`Tail`] with the next
/// statement or with `COMMIT`. A failure of what went ahead is reported by the
/// statement it went with, first; PostgreSQL has then aborted the transaction anyway.
pub(crate) struct PgTx<'t> {
    connection: &'t mut Connection,
    /// `BEGIN …`, until it is sent with the first statement.
    begin: Option<&'static str>,
    /// What the first failed statement said about the transaction, for the runner.
    failure: Option<Failure>,
    /// Writes held back to go out as one statement (see [`Tail`]).
    tail: Tail,
    transaction: TransactionId,
}

/// How a commit failed.
pub(super) enum Committing {
    /// Before `COMMIT` (a held-back write): the transaction was rolled back.
    Before(postgres::Error),
    /// `COMMIT` itself: the transaction may have committed.
    At(postgres::Error),
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// What goes out ahead of a statement: `BEGIN`, then the tail's statement.
struct Ahead {
    begin: Option<&'static str>,
    tail: Option<(Statement, Vec<Param>)>,
}

impl Ahead {
    /// Sends what is ahead; resolves once PostgreSQL answered it. Polled before the
    /// statement it goes with, so it is sent first.
    async fn send(&self, client: &tokio_postgres::Client) -> Result<(), postgres::Error> {
        let begin = async {
            match self.begin {
                Some(sql) => client.batch_execute(sql).await,
                None => Ok(()),
            }
        };
        let tail = async {
            match &self.tail {
                Some((statement, params)) => {
                    let params: Vec<&(dyn ToSql + Sync)> = params
                        .iter()
                        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
                        .collect();
                    client.execute(statement, &params).await.map(|_| ())
                }
                None => Ok(()),
            }
        };
        let (begun, sent) = futures::join!(begin, tail);
        begun.and(sent)
    }
}

impl<'t> PgTx<'t> {
    /// A transaction that `begin` (`BEGIN …`) opens with its first statement.
    pub(super) fn new(connection: &'t mut Connection, begin: &'static str) -> Self {
        Self {
            connection,
            begin: Some(begin),
            failure: None,
            tail: Tail::default(),
            transaction: TransactionId::next(),
        }
    }

    /// What went wrong in this transaction, if a statement failed.
    pub(super) fn failure(&self) -> Option<Failure> {
        self.failure
    }

    /// Sends what is held back and commits, in one round trip.
    pub(super) fn commit(mut self) -> Result<(), Committing> {
        let ahead = self.take_ahead().map_err(Committing::Before)?;
        if ahead.begin.is_some() && ahead.tail.is_none() {
            // Nothing was read or written: there is no transaction to commit.
            return Ok(());
        }
        let Connection {
            client, runtime, ..
        } = &mut *self.connection;
        let (sent, committed) = runtime
            .block_on(async { futures::join!(ahead.send(client), client.batch_execute("COMMIT")) });
        // After a failure ahead, PostgreSQL answers `COMMIT` with a rollback.
        sent.map_err(Committing::Before)?;
        committed.map_err(Committing::At)
    }

    /// Ends the transaction without committing, if it was begun; a connection that
    /// cannot say so is closed, and the worker opens a new one.
    pub(super) fn rollback(self) {
        if self.begin.is_none() {
            let Connection {
                client, runtime, ..
            } = &mut *self.connection;
            let _ = runtime.block_on(client.batch_execute("ROLLBACK"));
        }
    }

    fn failed(&mut self, error: &postgres::Error) -> LedgerError {
        self.failure.get_or_insert(classify(error));
        to_ledger(error)
    }

    /// A prepared statement for `sql`, from the connection's cache.
    fn statement(&mut self, sql: &str) -> LedgerResult<Statement> {
        self.prepared(sql).map_err(|e| self.failed(&e))
    }

    fn prepared(&mut self, sql: &str) -> Result<Statement, postgres::Error> {
        let Connection {
            client,
            runtime,
            statements,
        } = &mut *self.connection;
        if let Some(statement) = statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = runtime.block_on(client.prepare(sql))?;
        statements.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    /// `BEGIN` if not sent yet and the held-back writes, to send with the next statement.
    fn take_ahead(&mut self) -> Result<Ahead, postgres::Error> {
        let tail = match self.tail.take() {
            Some((sql, params)) => Some((self.prepared(&sql)?, params)),
            None => None,
        };
        Ok(Ahead {
            begin: self.begin.take(),
            tail,
        })
    }

    /// Runs `query` on the statement for `sql`, after what is ahead, in one round trip.
    fn pipelined<T>(
        &mut self,
        sql: &str,
        query: impl AsyncFnOnce(&tokio_postgres::Client, &Statement) -> Result<T, postgres::Error>,
    ) -> LedgerResult<T> {
        let statement = self.statement(sql)?;
        let ahead = self.take_ahead().map_err(|e| self.failed(&e))?;
        let Connection {
            client, runtime, ..
        } = &mut *self.connection;
        let result = runtime.block_on(async {
            let (sent, answered) = futures::join!(ahead.send(client), query(client, &statement));
            sent.and(answered)
        });
        result.map_err(|e| self.failed(&e))
    }

    pub(super) fn rows(&mut self, sql: &str, params: Params<'_>) -> LedgerResult<Vec<Row>> {
        self.pipelined(sql, async |client, statement| {
            client.query(statement, params).await
        })
    }

    pub(super) fn row(&mut self, sql: &str, params: Params<'_>) -> LedgerResult<Option<Row>> {
        self.pipelined(sql, async |client, statement| {
            client.query_opt(statement, params).await
        })
    }

    pub(super) fn exec(&mut self, sql: &str, params: Params<'_>) -> LedgerResult<u64> {
        self.pipelined(sql, async |client, statement| {
            client.execute(statement, params).await
        })
    }

    /// Sends the held-back writes now, before a write that cannot join them.
    fn send_tail(&mut self) -> LedgerResult<()> {
        let ahead = self.take_ahead().map_err(|e| self.failed(&e))?;
        let Connection {
            client, runtime, ..
        } = &mut *self.connection;
        let sent = runtime.block_on(ahead.send(client));
        sent.map_err(|e| self.failed(&e))
    }

    fn share_rows(&mut self, sql: &str, params: Params<'_>) -> LedgerResult<Vec<ShareRow>> {
        self.rows(sql, params)?.iter().map(share_row).collect()
    }

    fn pairs(&mut self, sql: &str, params: Params<'_>) -> LedgerResult<Vec<(String, String)>> {
        self.rows(sql, params)?
            .iter()
            .map(|r| Ok((get(r, 0)?, get(r, 1)?)))
            .collect()
    }

    fn records_by_id(
        &mut self,
        table: &str,
        share: &ShareId,
        from: &KeyFrom<String>,
        limit: u32,
    ) -> LedgerResult<Vec<(String, String)>> {
        let (op, key) = bound(from);
        let sql = format!(
            "SELECT id, json FROM {table} WHERE share_id = $1 AND id {op} $2 ORDER BY id LIMIT $3"
        );
        self.pairs(&sql, &[&share.as_str(), key, &i64::from(limit)])
    }
}

/// A column of `row`, or why it cannot be what the schema says it is.
pub(super) fn get<'a, T: FromSql<'a>>(row: &'a Row, index: usize) -> LedgerResult<T> {
    row.try_get(index)
        .map_err(|e| corrupt(format!("column {index}: {e}")))
}

pub(super) fn cursor(value: i64) -> LedgerResult<Cursor> {
    u64::try_from(value)
        .map(Cursor)
        .map_err(|_| corrupt(format!("cursor {value}")))
}

pub(super) fn cursor_param(cursor: Cursor) -> LedgerResult<i64> {
    i64::try_from(cursor.0)
        .map_err(|_| LedgerError::Storage(format!("cursor {cursor} is out of range")))
}

pub(super) fn epoch(value: i64) -> LedgerResult<Epoch> {
    u32::try_from(value)
        .map(Epoch)
        .map_err(|_| corrupt(format!("epoch {value}")))
}

pub(super) fn count(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// The comparison and key of an ordered read's start.
fn bound<K>(from: &KeyFrom<K>) -> (&'static str, &K) {
    match from {
        KeyFrom::AtLeast(key) => (">=", key),
        KeyFrom::After(key) => (">", key),
    }
}

/// A row selected with [`SHARE_COLUMNS`].
fn share_row(row: &Row) -> LedgerResult<ShareRow> {
    share_row_at(row, 0)
}

/// [`SHARE_COLUMNS`] starting at column `at` of `row`.
fn share_row_at(row: &Row, at: usize) -> LedgerResult<ShareRow> {
    Ok(ShareRow {
        id: ShareId(get(row, at)?),
        session_id: get(row, at + 1)?,
        project_id: get(row, at + 2)?,
        parent_session_id: get(row, at + 3)?,
        title: get(row, at + 4)?,
        owner_token_id: TokenId(get(row, at + 5)?),
        cursor: cursor(get(row, at + 6)?)?,
        writer_epoch: epoch(get(row, at + 7)?)?,
        viewer_epoch: epoch(get(row, at + 8)?)?,
        created_at: get(row, at + 9)?,
        updated_at: get(row, at + 10)?,
        archived_at: get(row, at + 11)?,
        compacted_through: cursor(get(row, at + 12)?)?,
    })
}

/// `kind, share_id, expires_at, revoked` of a token starting at column `at` of
/// `row`, whose kind (read already) is `kind`.
fn token_grant_at(row: &Row, at: usize, kind: &str) -> LedgerResult<TokenGrant> {
    Ok(TokenGrant {
        kind: TokenKind::parse(kind).ok_or_else(|| corrupt(format!("token kind {kind:?}")))?,
        share_id: get::<Option<String>>(row, at + 1)?.map(ShareId),
        expires_at: get(row, at + 2)?,
        revoked: get(row, at + 3)?,
    })
}

impl LedgerTx for PgTx<'_> {
    fn transaction(&self) -> TransactionId {
        self.transaction
    }

    fn share(&mut self, id: &ShareId) -> LedgerResult<Option<ShareRow>> {
        let sql = format!("SELECT {SHARE_COLUMNS} FROM shares WHERE id = $1 AND {VISIBLE}");
        self.row(&sql, &[&id.as_str()])?
            .as_ref()
            .map(share_row)
            .transpose()
    }

    fn lock_share(&mut self, id: &ShareId) -> LedgerResult<Option<ShareRow>> {
        let sql = format!(
            "SELECT {SHARE_COLUMNS} FROM shares WHERE id = $1 AND {VISIBLE} FOR NO KEY UPDATE"
        );
        self.row(&sql, &[&id.as_str()])?
            .as_ref()
            .map(share_row)
            .transpose()
    }

    /// One statement: the share (locked for a write) beside its caller's token grant.
    fn share_and_grant(
        &mut self,
        id: &ShareId,
        lock: bool,
        token: &TokenId,
    ) -> LedgerResult<(Option<ShareRow>, Option<TokenGrant>)> {
        let lock = if lock { "FOR NO KEY UPDATE" } else { "" };
        // The share is read in a subquery of its own so that it can be locked: a
        // locking clause cannot reach the nullable side of an outer join.
        let sql = format!(
            "SELECT t.kind, t.share_id, t.expires_at, t.revoked_at IS NOT NULL, s.*
             FROM (SELECT 1) AS one
             LEFT JOIN tokens t ON t.id = $2
             LEFT JOIN LATERAL (SELECT {SHARE_COLUMNS} FROM shares
                                WHERE id = $1 AND {VISIBLE} {lock}) s ON true"
        );
        let row = self
            .row(&sql, &[&id.as_str(), &token.as_str()])?
            .ok_or_else(|| corrupt("share and grant: no row"))?;
        let grant = get::<Option<String>>(&row, 0)?
            .map(|kind| token_grant_at(&row, 0, &kind))
            .transpose()?;
        let share = get::<Option<String>>(&row, 4)?
            .map(|_| share_row_at(&row, 4))
            .transpose()?;
        Ok((share, grant))
    }

    fn children(&mut self, parent: &ShareRow) -> LedgerResult<Vec<ShareRow>> {
        if parent.session_id.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT {SHARE_COLUMNS} FROM shares
             WHERE parent_session_id = $1 AND owner_token_id = $2 AND id <> $3 AND {VISIBLE}
             ORDER BY session_id, id"
        );
        self.share_rows(
            &sql,
            &[
                &parent.session_id,
                &parent.owner_token_id.as_str(),
                &parent.id.as_str(),
            ],
        )
    }

    fn list_shares(
        &mut self,
        owner: Option<&TokenId>,
        after: &str,
        limit: u32,
        include_archived: bool,
    ) -> LedgerResult<Vec<ShareRow>> {
        let limit = i64::from(limit);
        match owner {
            None => {
                let sql = format!(
                    "SELECT {SHARE_COLUMNS} FROM shares
                     WHERE id > $1 AND ($3 OR archived_at IS NULL) AND {VISIBLE}
                     ORDER BY id LIMIT $2"
                );
                self.share_rows(&sql, &[&after, &limit, &include_archived])
            }
            Some(owner) => {
                let sql = format!(
                    "SELECT {SHARE_COLUMNS} FROM shares
                     WHERE owner_token_id = $1 AND id > $2 AND ($4 OR archived_at IS NULL)
                       AND {VISIBLE}
                     ORDER BY id LIMIT $3"
                );
                self.share_rows(&sql, &[&owner.as_str(), &after, &limit, &include_archived])
            }
        }
    }

    fn inactive_shares(&mut self, before: i64, archived_only: bool) -> LedgerResult<Vec<ShareRow>> {
        let sql = format!(
            "SELECT {SHARE_COLUMNS} FROM shares
             WHERE {VISIBLE} AND updated_at < $1 AND (NOT $2 OR archived_at IS NOT NULL)
             ORDER BY id"
        );
        self.share_rows(&sql, &[&before, &archived_only])
    }

    fn unarchived_inactive(&mut self, before: i64, limit: u32) -> LedgerResult<Vec<ShareId>> {
        let sql = format!(
            "SELECT id FROM shares
             WHERE {VISIBLE} AND archived_at IS NULL AND updated_at < $1
             ORDER BY updated_at, id LIMIT $2"
        );
        self.rows(&sql, &[&before, &i64::from(limit)])?
            .iter()
            .map(|r| get(r, 0).map(ShareId))
            .collect()
    }

    fn session_is_shared(&mut self, session_id: &str) -> LedgerResult<bool> {
        let sql = format!("SELECT 1 FROM shares WHERE session_id = $1 AND {VISIBLE} LIMIT 1");
        Ok(self.row(&sql, &[&session_id])?.is_some())
    }

    fn shares_of_parent_session(&mut self, session_id: &str) -> LedgerResult<Vec<ShareRow>> {
        let sql = format!(
            "SELECT {SHARE_COLUMNS} FROM shares WHERE parent_session_id = $1 AND {VISIBLE} ORDER BY id"
        );
        self.share_rows(&sql, &[&session_id])
    }

    fn footprint(&mut self, share: &ShareId) -> LedgerResult<ShareFootprint> {
        let row = self.row(
            "SELECT
                 (SELECT count(*) FROM messages WHERE share_id = $1),
                 (SELECT count(*) FROM parts WHERE share_id = $1),
                 (SELECT count(*) FROM ops WHERE share_id = $1),
                 (SELECT count(*) FROM tokens WHERE share_id = $1),
                 (SELECT coalesce(sum(octet_length(json)), 0) FROM messages WHERE share_id = $1)
                 + (SELECT coalesce(sum(octet_length(json)), 0) FROM parts WHERE share_id = $1)
                 + (SELECT coalesce(sum(octet_length(text)), 0) FROM part_chunks WHERE share_id = $1)
                 + (SELECT coalesce(sum(octet_length(payload)), 0) FROM ops WHERE share_id = $1)
                 + (SELECT coalesce(sum(octet_length(json)), 0) FROM sessions WHERE share_id = $1)
                 + (SELECT coalesce(sum(octet_length(json)), 0) FROM models WHERE share_id = $1)
                 + (SELECT coalesce(sum(octet_length(json)), 0) FROM diffs WHERE share_id = $1)",
            &[&share.as_str()],
        )?;
        let row = row.ok_or_else(|| corrupt("footprint: no row"))?;

        Ok(ShareFootprint {
            messages: count(get(&row, 0)?),
            parts: count(get(&row, 1)?),
            ops: count(get(&row, 2)?),
            tokens: count(get(&row, 3)?),
            bytes: count(get(&row, 4)?),
        })
    }

    fn share_being_deleted(&mut self, share: &ShareId) -> LedgerResult<Option<ShareBeingDeleted>> {
        let row = self.row(
            "SELECT cursor, deleting_at IS NOT NULL, owner_token_id FROM shares WHERE id = $1",
            &[&share.as_str()],
        )?;
        row.map(|r| {
            Ok(ShareBeingDeleted {
                cursor: cursor(get(&r, 0)?)?,
                hidden: get(&r, 1)?,
                owner: TokenId(get(&r, 2)?),
            })
        })
        .transpose()
    }

    fn hide_share(&mut self, share: &ShareId, now: i64) -> LedgerResult<()> {
        self.exec(
            "UPDATE shares SET deleting_at = $2 WHERE id = $1",
            &[&share.as_str(), &now],
        )?;
        self.exec("DELETE FROM tokens WHERE share_id = $1", &[&share.as_str()])?;
        Ok(())
    }

    fn delete_share_rows(&mut self, share: &ShareId, max_rows: u32) -> LedgerResult<bool> {
        // Parts' appended text before the parts (a key chunk of it takes whole parts'
        // text: a little over the budget), parts before their messages, everything
        // before the share; sessions and
        // diffs hold one row each and go with the share row.
        const CHUNKED: [(&str, &str); 6] = [
            ("ops", "cursor"),
            ("part_chunks", "part_id"),
            ("parts", "id"),
            ("messages", "id"),
            ("models", "id"),
            ("removed", "id"),
        ];
        let mut budget = i64::from(max_rows.max(1));
        for (table, key) in CHUNKED {
            let sql = format!(
                "DELETE FROM {table} WHERE share_id = $1 AND {key} IN
                     (SELECT {key} FROM {table} WHERE share_id = $1 LIMIT $2)"
            );
            let deleted = self.exec(&sql, &[&share.as_str(), &budget])?;
            budget = budget.saturating_sub(i64::try_from(deleted).unwrap_or(i64::MAX));
            if budget <= 0 {
                return Ok(false);
            }
        }
        self.exec("DELETE FROM shares WHERE id = $1", &[&share.as_str()])?;
        Ok(true)
    }

    fn hidden_shares(&mut self) -> LedgerResult<Vec<ShareId>> {
        self.rows(
            "SELECT id FROM shares WHERE deleting_at IS NOT NULL ORDER BY id",
            &[],
        )?
        .iter()
        .map(|r| get(r, 0).map(ShareId))
        .collect()
    }

    fn visible_share_count(&mut self) -> LedgerResult<u64> {
        let sql = format!("SELECT count(*) FROM shares WHERE {VISIBLE}");
        let row = self
            .row(&sql, &[])?
            .ok_or_else(|| corrupt("count: no row"))?;
        Ok(count(get(&row, 0)?))
    }

    fn next_share(&mut self, from: &KeyFrom<String>) -> LedgerResult<Option<(ShareId, Cursor)>> {
        let (op, key) = bound(from);
        let sql = format!(
            "SELECT id, compacted_through FROM shares
             WHERE {VISIBLE} AND id {op} $1 ORDER BY id LIMIT 1"
        );
        self.row(&sql, &[key])?
            .map(|r| Ok((ShareId(get(&r, 0)?), cursor(get(&r, 1)?)?)))
            .transpose()
    }

    fn op_footprints(
        &mut self,
        share: &ShareId,
        after: Cursor,
        limit: u32,
    ) -> LedgerResult<Vec<OpFootprint>> {
        self.rows(
            "SELECT cursor, applied_at, octet_length(payload) FROM ops
             WHERE share_id = $1 AND cursor > $2 ORDER BY cursor LIMIT $3",
            &[&share.as_str(), &cursor_param(after)?, &i64::from(limit)],
        )?
        .iter()
        .map(|r| {
            Ok(OpFootprint {
                cursor: cursor(get(r, 0)?)?,
                applied_at: get(r, 1)?,
                payload_bytes: u64::try_from(get::<i32>(r, 2)?).unwrap_or(0),
            })
        })
        .collect()
    }

    fn drop_payloads(
        &mut self,
        share: &ShareId,
        after: Cursor,
        through: Cursor,
    ) -> LedgerResult<()> {
        let (after, through) = (cursor_param(after)?, cursor_param(through)?);
        self.exec(
            "UPDATE ops SET payload = '' WHERE share_id = $1 AND cursor > $2 AND cursor <= $3",
            &[&share.as_str(), &after, &through],
        )?;
        self.exec(
            "UPDATE shares SET compacted_through = $2 WHERE id = $1",
            &[&share.as_str(), &through],
        )?;
        Ok(())
    }

    fn open_share_of_session(
        &mut self,
        owner: &TokenId,
        session_id: &str,
    ) -> LedgerResult<Option<ShareId>> {
        let sql = format!(
            "SELECT id FROM shares
             WHERE session_id = $1 AND owner_token_id = $2 AND archived_at IS NULL AND {VISIBLE}
             ORDER BY created_at, id LIMIT 1"
        );
        self.row(&sql, &[&session_id, &owner.as_str()])?
            .map(|r| get(&r, 0).map(ShareId))
            .transpose()
    }

    /// Concurrent creates of one session by one owner, on any node, take turns.
    fn lock_session(&mut self, owner: &TokenId, session_id: &str) -> LedgerResult<()> {
        self.exec(
            "SELECT pg_advisory_xact_lock(hashtextextended($1::text || '/' || $2::text, 0))",
            &[&owner.as_str(), &session_id],
        )?;
        Ok(())
    }

    fn insert_share(&mut self, share: &ShareRow) -> LedgerResult<()> {
        self.exec(
            "INSERT INTO shares (id, session_id, project_id, parent_session_id, title,
                                 owner_token_id, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &share.id.as_str(),
                &share.session_id,
                &share.project_id,
                &share.parent_session_id,
                &share.title,
                &share.owner_token_id.as_str(),
                &share.created_at,
                &share.updated_at,
            ],
        )?;
        Ok(())
    }

    fn set_epochs(&mut self, share: &ShareId, writers: Epoch, viewers: Epoch) -> LedgerResult<()> {
        self.exec(
            "UPDATE shares SET writer_epoch = $2, viewer_epoch = $3 WHERE id = $1",
            &[
                &share.as_str(),
                &i64::from(writers.0),
                &i64::from(viewers.0),
            ],
        )?;
        Ok(())
    }

    fn set_archived_at(&mut self, share: &ShareId, archived_at: Option<i64>) -> LedgerResult<()> {
        self.exec(
            "UPDATE shares SET archived_at = $2 WHERE id = $1",
            &[&share.as_str(), &archived_at],
        )?;
        Ok(())
    }

    fn token_grant(&mut self, id: &TokenId) -> LedgerResult<Option<TokenGrant>> {
        let row = self.row(
            "SELECT kind, share_id, expires_at, revoked_at IS NOT NULL FROM tokens WHERE id = $1",
            &[&id.as_str()],
        )?;
        row.map(|r| token_grant_at(&r, 0, &get::<String>(&r, 0)?))
            .transpose()
    }

    fn insert_token(
        &mut self,
        token: &NewToken,
        stored: &StoredToken<'_>,
        now: i64,
    ) -> LedgerResult<()> {
        self.exec(
            "INSERT INTO tokens
                 (id, kind, share_id, epoch, secret_hash, label, expires_at, issued_by, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            &[
                &token.id.as_str(),
                &stored.kind.as_str(),
                &stored.share_id.map(ShareId::as_str),
                &i64::from(stored.epoch.0),
                &token.secret_hash,
                &token.label,
                &token.expires_at,
                &stored.issued_by.map(TokenId::as_str),
                &now,
            ],
        )?;
        Ok(())
    }

    fn revoke_token(&mut self, id: &TokenId, now: i64) -> LedgerResult<bool> {
        let changed = self.exec(
            "UPDATE tokens SET revoked_at = coalesce(revoked_at, $2) WHERE id = $1",
            &[&id.as_str(), &now],
        )?;
        Ok(changed > 0)
    }

    fn revoke_admin_tokens(&mut self, now: i64) -> LedgerResult<()> {
        self.exec(
            "UPDATE tokens SET revoked_at = $1 WHERE kind = 'admin' AND revoked_at IS NULL",
            &[&now],
        )?;
        Ok(())
    }

    fn has_live_admin_token(&mut self, now: i64) -> LedgerResult<bool> {
        Ok(self
            .row(
                "SELECT 1 FROM tokens
                 WHERE kind = 'admin' AND revoked_at IS NULL
                   AND (expires_at IS NULL OR expires_at >= $1)
                 LIMIT 1",
                &[&now],
            )?
            .is_some())
    }

    /// Nodes starting at once on one database create one admin token between them.
    fn lock_bootstrap(&mut self) -> LedgerResult<()> {
        self.exec("SELECT pg_advisory_xact_lock($1)", &[&BOOTSTRAP_LOCK])?;
        Ok(())
    }

    /// One statement: the claim, and beside it what the op's record rule reads (a
    /// read of other tables, which the claim in the same statement does not change).
    fn claim_op_and_probe(
        &mut self,
        share: &ShareId,
        entry: &LedgerEntry<'_>,
        probe: Probe<'_>,
    ) -> LedgerResult<Option<Standing>> {
        let (columns, ids) = probe::columns(probe, 10);
        let sql = format!(
            "WITH claimed AS (
                 INSERT INTO ops (share_id, cursor, op_id, kind, payload, token_id, batch_id,
                                  applied_at, digest)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                 ON CONFLICT (share_id, op_id) DO NOTHING RETURNING 1)
             SELECT EXISTS (SELECT 1 FROM claimed){}{columns}",
            if columns.is_empty() { "" } else { ", " }
        );
        let (cursor, kind) = (cursor_param(entry.cursor)?, entry.kind.as_str());
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![
            &share.0,
            &cursor,
            &entry.op_id.0,
            &kind,
            &entry.payload,
            &entry.token_id.0,
            &entry.batch_id,
            &entry.applied_at,
            &entry.digest,
        ];
        params.extend(ids.iter().map(|id| id as &(dyn ToSql + Sync)));
        let row = self
            .row(&sql, &params)?
            .ok_or_else(|| corrupt("claim: no row"))?;
        if !get::<bool>(&row, 0)? {
            return Ok(None);
        }
        probe::standing(&row, 1, probe).map(Some)
    }

    fn probe(&mut self, share: &ShareId, probe: Probe<'_>) -> LedgerResult<Standing> {
        let (columns, ids) = probe::columns(probe, 2);
        if columns.is_empty() {
            return Ok(Standing::Nothing);
        }
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&share.0];
        params.extend(ids.iter().map(|id| id as &(dyn ToSql + Sync)));
        let row = self
            .row(&format!("SELECT {columns}"), &params)?
            .ok_or_else(|| corrupt("probe: no row"))?;
        probe::standing(&row, 0, probe)
    }

    fn release_op(&mut self, share: &ShareId, at: Cursor) -> LedgerResult<()> {
        self.exec(
            "DELETE FROM ops WHERE share_id = $1 AND cursor = $2",
            &[&share.as_str(), &cursor_param(at)?],
        )?;
        Ok(())
    }

    fn logged_op(
        &mut self,
        share: &ShareId,
        op_id: &OpId,
    ) -> LedgerResult<Option<(Cursor, Option<Vec<u8>>)>> {
        self.row(
            "SELECT cursor, digest FROM ops WHERE share_id = $1 AND op_id = $2",
            &[&share.as_str(), &op_id.as_str()],
        )?
        .map(|r| Ok((cursor(get(&r, 0)?)?, get(&r, 1)?)))
        .transpose()
    }

    fn ops_after(
        &mut self,
        share: &ShareId,
        after: Cursor,
        limit: u32,
    ) -> LedgerResult<Vec<LoggedOp>> {
        self.rows(
            "SELECT cursor, op_id, kind, payload, applied_at FROM ops
             WHERE share_id = $1 AND cursor > $2 ORDER BY cursor LIMIT $3",
            &[&share.as_str(), &cursor_param(after)?, &i64::from(limit)],
        )?
        .iter()
        .map(|r| {
            let kind: String = get(r, 2)?;
            Ok(LoggedOp {
                cursor: cursor(get(r, 0)?)?,
                op_id: OpId(get(r, 1)?),
                kind: kind
                    .parse::<OpKind>()
                    .map_err(|_| corrupt(format!("op kind {kind:?}")))?,
                payload: get(r, 3)?,
                applied_at: get(r, 4)?,
            })
        })
        .collect()
    }

    /// Held back for the [`Tail`]: the last write of an append.
    fn set_cursor(&mut self, share: &ShareId, at: Cursor, updated_at: i64) -> LedgerResult<()> {
        if self.tail.has_cursor() {
            self.send_tail()?;
        }
        self.tail
            .set_cursor(share.as_str(), cursor_param(at)?, updated_at);
        Ok(())
    }

    fn session_updated(&mut self, share: &ShareId) -> LedgerResult<Option<Option<i64>>> {
        match self.probe(share, Probe::Session)? {
            Standing::Session(updated) => Ok(updated),
            _ => Err(corrupt("session: another answer")),
        }
    }

    fn put_session(
        &mut self,
        share: &ShareId,
        updated: Option<i64>,
        json: &str,
    ) -> LedgerResult<()> {
        self.exec(
            "INSERT INTO sessions (share_id, updated, json) VALUES ($1, $2, $3)
             ON CONFLICT (share_id) DO UPDATE SET updated = excluded.updated, json = excluded.json",
            &[&share.as_str(), &updated, &json],
        )?;
        Ok(())
    }

    fn message_standing(&mut self, share: &ShareId, id: &str) -> LedgerResult<MessageStanding> {
        match self.probe(share, Probe::Message(id))? {
            Standing::Message(standing) => Ok(standing),
            _ => Err(corrupt("message standing: another answer")),
        }
    }

    fn put_message(
        &mut self,
        share: &ShareId,
        id: &str,
        terminal: bool,
        json: &str,
    ) -> LedgerResult<()> {
        self.exec(
            "INSERT INTO messages (share_id, id, terminal, json) VALUES ($1, $2, $3, $4)
             ON CONFLICT (share_id, id) DO UPDATE
             SET terminal = excluded.terminal, json = excluded.json",
            &[&share.as_str(), &id, &terminal, &json],
        )?;
        Ok(())
    }

    fn remove_message(&mut self, share: &ShareId, id: &str) -> LedgerResult<()> {
        self.exec(
            "DELETE FROM parts WHERE share_id = $1 AND message_id = $2",
            &[&share.as_str(), &id],
        )?;
        self.exec(
            "DELETE FROM messages WHERE share_id = $1 AND id = $2",
            &[&share.as_str(), &id],
        )?;
        Ok(())
    }

    fn part_standing(
        &mut self,
        share: &ShareId,
        id: &str,
        message_id: &str,
    ) -> LedgerResult<PartStanding> {
        match self.probe(share, Probe::Part { id, message_id })? {
            Standing::Part(standing) => Ok(standing),
            _ => Err(corrupt("part standing: another answer")),
        }
    }

    fn part(&mut self, share: &ShareId, id: &str) -> LedgerResult<Option<String>> {
        self.row(
            "SELECT json FROM parts WHERE share_id = $1 AND id = $2",
            &[&share.as_str(), &id],
        )?
        .map(|r| get(&r, 0))
        .transpose()
    }

    fn part_text_end(
        &mut self,
        share: &ShareId,
        id: &str,
        field: &str,
    ) -> LedgerResult<Option<PartTextEnd>> {
        match self.probe(share, Probe::PartText { id, field })? {
            Standing::PartText(end) => Ok(end),
            _ => Err(corrupt("part text end: another answer")),
        }
    }

    /// Held back for the [`Tail`]: the last op's part goes with the append's last writes.
    fn put_part(
        &mut self,
        share: &ShareId,
        id: &str,
        message_id: &str,
        finished: bool,
        json: &str,
    ) -> LedgerResult<()> {
        if self.tail.has_part() {
            self.send_tail()?;
        }
        self.tail.put_part(HeldPart {
            share: share.0.clone(),
            id: id.to_owned(),
            message_id: message_id.to_owned(),
            finished,
            json: json.to_owned(),
        });
        Ok(())
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
                 VALUES ($1, $2, $3, $4, $5)",
                seq,
            ),
            ChunkWrite::Extend(seq) => (
                "UPDATE part_chunks SET text = text || $5
                 WHERE share_id = $1 AND part_id = $2 AND field = $3 AND seq = $4",
                seq,
            ),
        };
        self.exec(sql, &[&share.as_str(), &id, &field, &seq, &text])?;
        Ok(())
    }

    fn part_chunks(&mut self, share: &ShareId, parts: &[&str]) -> LedgerResult<Vec<PartChunk>> {
        if parts.is_empty() {
            return Ok(Vec::new());
        }
        self.rows(
            "SELECT part_id, field, text FROM part_chunks
             WHERE share_id = $1 AND part_id = ANY($2)
             ORDER BY part_id, field, seq",
            &[&share.as_str(), &parts],
        )?
        .iter()
        .map(|r| {
            Ok(PartChunk {
                part_id: get(r, 0)?,
                field: get(r, 1)?,
                text: get(r, 2)?,
            })
        })
        .collect()
    }

    fn remove_part(&mut self, share: &ShareId, id: &str) -> LedgerResult<()> {
        self.exec(
            "DELETE FROM parts WHERE share_id = $1 AND id = $2",
            &[&share.as_str(), &id],
        )?;
        Ok(())
    }

    fn put_diffs(&mut self, share: &ShareId, json: &str) -> LedgerResult<()> {
        self.exec(
            "INSERT INTO diffs (share_id, json) VALUES ($1, $2)
             ON CONFLICT (share_id) DO UPDATE SET json = excluded.json",
            &[&share.as_str(), &json],
        )?;
        Ok(())
    }

    fn mark_removed(&mut self, share: &ShareId, kind: Removable, id: &str) -> LedgerResult<()> {
        self.exec(
            "INSERT INTO removed (share_id, kind, id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            &[&share.as_str(), &kind.as_str(), &id],
        )?;
        Ok(())
    }

    fn session_json(&mut self, share: &ShareId) -> LedgerResult<Option<String>> {
        self.row(
            "SELECT json FROM sessions WHERE share_id = $1",
            &[&share.as_str()],
        )?
        .map(|r| get(&r, 0))
        .transpose()
    }

    fn diffs_json(&mut self, share: &ShareId) -> LedgerResult<Option<String>> {
        self.row(
            "SELECT json FROM diffs WHERE share_id = $1",
            &[&share.as_str()],
        )?
        .map(|r| get(&r, 0))
        .transpose()
    }

    fn models_from(
        &mut self,
        share: &ShareId,
        from: &KeyFrom<String>,
        limit: u32,
    ) -> LedgerResult<Vec<(String, String)>> {
        self.records_by_id("models", share, from, limit)
    }

    fn messages_from(
        &mut self,
        share: &ShareId,
        from: &KeyFrom<String>,
        limit: u32,
    ) -> LedgerResult<Vec<(String, String)>> {
        self.records_by_id("messages", share, from, limit)
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
             WHERE share_id = $1 AND message_id = $2 AND id {op} $3 ORDER BY id LIMIT $4"
        );
        self.pairs(
            &sql,
            &[&share.as_str(), &message_id, key, &i64::from(limit)],
        )
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
             WHERE p.share_id = $1 AND (p.message_id, p.id) {op} ($2, $3)
               AND NOT EXISTS (SELECT 1 FROM messages m
                               WHERE m.share_id = p.share_id AND m.id = p.message_id)
             ORDER BY p.message_id, p.id LIMIT $4"
        );
        self.rows(
            &sql,
            &[&share.as_str(), message_id, part_id, &i64::from(limit)],
        )?
        .iter()
        .map(|r| Ok((get(r, 0)?, get(r, 1)?, get(r, 2)?)))
        .collect()
    }

    fn put_model(&mut self, share: &ShareId, id: &str, json: &str) -> LedgerResult<()> {
        self.exec(
            "INSERT INTO models (share_id, id, json) VALUES ($1, $2, $3)
             ON CONFLICT (share_id, id) DO UPDATE SET json = excluded.json",
            &[&share.as_str(), &id, &json],
        )?;
        Ok(())
    }

    /// Held back for the [`Tail`]: an audit line answers nothing to the rules.
    fn audit(&mut self, event: &AuditEvent, at: i64) -> LedgerResult<()> {
        if self.tail.has_audit() {
            self.send_tail()?;
        }
        self.tail.audit(event, at);
        Ok(())
    }
}
