//! The outbox file: connection pragmas and versioned migrations (`PRAGMA user_version`).
//!
//! Tables (version 1):
//! - `meta`: one row; the share this outbox feeds, the last cursor and error the syncer saw.
//! - `ops`: one row per op, in enqueue order (`seq`), with its state
//!   (`pending` → `inFlight` → `acked`, or `rejected`; `waiting` after `missingDependency`).
//! - `op_deps`: each op's `dependsOn`, in order, indexed by the op id depended on so an ack
//!   can release the ops waiting for it.
//! - `batches`: every batch ever formed, with attempts, next retry time and last error.
//! - `batch_ops`: which ops a batch carries and in which order. Persisted so a retry, even
//!   after a crash, sends exactly the ops of the first attempt in the same order.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior};

use super::OutboxError;

/// How long a statement waits for another process's lock (a `status` from the CLI while a
/// syncer writes) before failing with `Busy`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Schema versions, in order: `MIGRATIONS[i]` takes `user_version` from `i` to `i + 1`.
/// Append only; never edit a migration that has shipped.
const MIGRATIONS: &[&str] = &[V1_INITIAL];

/// The schema version this build writes.
pub(super) const SCHEMA_VERSION: usize = MIGRATIONS.len();

const V1_INITIAL: &str = r#"
-- Exactly one row. No secrets: the writer token stays in the syncer's memory.
CREATE TABLE meta (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    share_id    TEXT,
    server      TEXT,
    -- The share's cursor as the server last reported it (ack, redeem or state).
    last_cursor INTEGER CHECK (last_cursor >= 0),
    last_error  TEXT
) STRICT;
INSERT INTO meta (id) VALUES (1);

CREATE TABLE ops (
    -- Enqueue order. AUTOINCREMENT: a seq is never reused, and batch ids name seqs.
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    op_id       TEXT NOT NULL UNIQUE,
    kind        TEXT NOT NULL,
    -- The payload as JSON text, exactly as it goes on the wire.
    payload     TEXT NOT NULL,
    -- Roughly the op's size on the wire, so batches can be bounded in bytes.
    bytes       INTEGER NOT NULL CHECK (bytes >= 0),
    state       TEXT NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'inFlight', 'waiting', 'acked', 'rejected')),
    -- The batch it is (or was last) sent in.
    batch       INTEGER REFERENCES batches (id),
    -- Acked: 'applied' or 'duplicate', and the cursor the server applied it at.
    outcome     TEXT CHECK (outcome IN ('applied', 'duplicate')),
    cursor      INTEGER CHECK (cursor > 0),
    -- Rejected or waiting: the server's reason and detail.
    reason      TEXT,
    detail      TEXT,
    enqueued_at INTEGER NOT NULL,
    -- When it was acked or rejected.
    settled_at  INTEGER
) STRICT;
-- Batch formation scans pending ops in seq order; status counts group by state.
CREATE INDEX ops_by_state ON ops (state, seq);

CREATE TABLE op_deps (
    seq       INTEGER NOT NULL REFERENCES ops (seq),
    position  INTEGER NOT NULL,
    dep_op_id TEXT NOT NULL,
    PRIMARY KEY (seq, position)
) STRICT, WITHOUT ROWID;
-- An ack releases the ops waiting for the acked op id.
CREATE INDEX op_deps_by_dep ON op_deps (dep_op_id);

CREATE TABLE batches (
    -- Creation order; part of the batch id.
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id      TEXT NOT NULL UNIQUE,
    -- seq of its first op: in-flight batches are sent oldest first.
    first_seq     INTEGER NOT NULL,
    -- 'split' when the server refused it as too large and it was replaced by two halves.
    state         TEXT NOT NULL DEFAULT 'inFlight' CHECK (state IN ('inFlight', 'done', 'split')),
    attempts      INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    -- Unix ms; 0 = as soon as possible.
    next_retry_at INTEGER NOT NULL DEFAULT 0,
    last_error    TEXT,
    created_at    INTEGER NOT NULL,
    done_at       INTEGER
) STRICT;
CREATE INDEX batches_in_flight ON batches (first_seq, id) WHERE state = 'inFlight';

CREATE TABLE batch_ops (
    batch    INTEGER NOT NULL REFERENCES batches (id),
    position INTEGER NOT NULL,
    seq      INTEGER NOT NULL REFERENCES ops (seq),
    PRIMARY KEY (batch, position)
) STRICT, WITHOUT ROWID;
"#;

/// Opens (creating it and its directory if needed) the outbox file and migrates it.
pub(super) fn open(path: &Path) -> Result<Connection, OutboxError> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)?;
    }
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // auto_vacuum only takes effect before the first table exists; a later issue may
    // compact acked rows, and then the file should be able to shrink.
    let fresh: bool = conn.query_row("SELECT count(*) = 0 FROM sqlite_schema", [], |r| r.get(0))?;
    if fresh {
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    }
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(OutboxError::invalid(format!(
            "the outbox {} cannot use WAL (journal_mode is {mode})",
            path.display()
        )));
    }
    // `enqueue` promises the op survives a power loss once it returns.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    migrate(&mut conn, path)?;
    Ok(conn)
}

/// Applies each pending migration in its own transaction.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), OutboxError> {
    loop {
        // Read the version inside the write transaction, so two processes opening the
        // same new file cannot both run a migration.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let applied = usize::try_from(current).unwrap_or(usize::MAX);
        if applied > SCHEMA_VERSION {
            return Err(OutboxError::invalid(format!(
                "the outbox {} has schema version {current}, newer than this build's {SCHEMA_VERSION}; use a newer capsync",
                path.display()
            )));
        }
        let Some(sql) = MIGRATIONS.get(applied) else {
            return Ok(());
        };
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", current + 1)?;
        tx.commit()?;
        tracing::debug!(version = current + 1, path = %path.display(), "outbox schema migrated");
    }
}
