//! Opens connections with the pragmas the ledger relies on, and brings the schema up to date.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use super::Durability;
use crate::ledger::{LedgerError, LedgerResult};

/// How long a statement waits for a lock held by another connection before giving up with `Busy`.
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The size the write-ahead log is cut back to when a write restarts it after
/// a checkpoint. Without a limit SQLite reuses the file from the start and never
/// shrinks it, so one burst (a VACUUM writes the whole database through the
/// log) would leave a database-sized `-wal` file behind for good. 64 MiB is
/// well above what the automatic checkpoints (every ~4 MiB of log) let it
/// reach in normal work, so everyday writes never pay for truncating it.
const JOURNAL_SIZE_LIMIT_BYTES: i64 = 64 * 1024 * 1024;

/// Where the write connection keeps temporary data (see `open_writer`); a
/// VACUUM moves it to disk for its duration and then sets this back.
pub(super) const WRITER_TEMP_STORE: &str = "MEMORY";

/// Schema versions, in order: `MIGRATIONS[i]` takes `user_version` from `i` to `i + 1`.
/// Append only; never edit a migration that has shipped.
pub(super) const MIGRATIONS: &[&str] = &[
    V1_INITIAL,
    V2_ARCHIVE,
    V3_LIFECYCLE,
    V4_OP_DIGEST,
    V5_OUT_OF_ORDER,
    V6_REMOVED,
    V7_PART_CHUNKS,
];

/// The schema version this build writes.
#[cfg(test)]
pub(super) const SCHEMA_VERSION: usize = MIGRATIONS.len();

pub(super) const V1_INITIAL: &str = r#"
CREATE TABLE shares (
    id                TEXT PRIMARY KEY,
    session_id        TEXT NOT NULL,
    project_id        TEXT NOT NULL,
    parent_session_id TEXT NOT NULL,
    title             TEXT NOT NULL,
    owner_token_id    TEXT NOT NULL,
    cursor            INTEGER NOT NULL DEFAULT 0 CHECK (cursor >= 0),
    writer_epoch      INTEGER NOT NULL DEFAULT 0 CHECK (writer_epoch >= 0),
    viewer_epoch      INTEGER NOT NULL DEFAULT 0 CHECK (viewer_epoch >= 0),
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL
) STRICT;
-- An agent lists the shares it owns, in id order.
CREATE INDEX shares_by_owner ON shares (owner_token_id, id);

CREATE TABLE tokens (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL CHECK (kind IN ('admin', 'agent', 'writer', 'viewer')),
    share_id    TEXT REFERENCES shares (id) ON DELETE CASCADE,
    epoch       INTEGER NOT NULL DEFAULT 0 CHECK (epoch >= 0),
    secret_hash TEXT NOT NULL,
    label       TEXT NOT NULL DEFAULT '',
    expires_at  INTEGER,
    revoked_at  INTEGER,
    issued_by   TEXT,
    created_at  INTEGER NOT NULL,
    CHECK ((share_id IS NOT NULL) = (kind IN ('writer', 'viewer')))
) STRICT;
-- Deleting a share cascades to its tokens: without this index every delete scans all tokens.
CREATE INDEX tokens_by_share ON tokens (share_id);
-- `has_admin_token` and `replace_admin_token` look only at admin tokens.
CREATE INDEX admin_tokens ON tokens (revoked_at) WHERE kind = 'admin';

-- The ledger. UNIQUE (share_id, op_id) is what makes dedupe permanent.
CREATE TABLE ops (
    share_id   TEXT NOT NULL REFERENCES shares (id) ON DELETE CASCADE,
    cursor     INTEGER NOT NULL CHECK (cursor > 0),
    op_id      TEXT NOT NULL,
    kind       TEXT NOT NULL,
    payload    TEXT NOT NULL,
    token_id   TEXT NOT NULL,
    batch_id   TEXT NOT NULL,
    applied_at INTEGER NOT NULL,
    PRIMARY KEY (share_id, cursor),
    UNIQUE (share_id, op_id)
) STRICT;

-- Materialized records: the session as the agent last wrote it.
CREATE TABLE sessions (
    share_id TEXT PRIMARY KEY REFERENCES shares (id) ON DELETE CASCADE,
    json     TEXT NOT NULL
) STRICT;

CREATE TABLE messages (
    share_id TEXT NOT NULL REFERENCES shares (id) ON DELETE CASCADE,
    id       TEXT NOT NULL,
    -- Completed or errored: a non-terminal upsert may no longer replace it.
    terminal INTEGER NOT NULL CHECK (terminal IN (0, 1)),
    json     TEXT NOT NULL,
    PRIMARY KEY (share_id, id)
) STRICT;

-- A part belongs to a message of the same share; removing the message (or,
-- through it, the share) removes its parts.
CREATE TABLE parts (
    share_id   TEXT NOT NULL,
    id         TEXT NOT NULL,
    message_id TEXT NOT NULL,
    json       TEXT NOT NULL,
    PRIMARY KEY (share_id, id),
    FOREIGN KEY (share_id, message_id) REFERENCES messages (share_id, id) ON DELETE CASCADE
) STRICT;
-- Snapshots read each message's parts in id order; the cascade from messages uses it too.
CREATE INDEX parts_by_message ON parts (share_id, message_id, id);

-- The session's file diffs, one JSON array per share.
CREATE TABLE diffs (
    share_id TEXT PRIMARY KEY REFERENCES shares (id) ON DELETE CASCADE,
    json     TEXT NOT NULL
) STRICT;

CREATE TABLE models (
    share_id TEXT NOT NULL REFERENCES shares (id) ON DELETE CASCADE,
    id       TEXT NOT NULL,
    json     TEXT NOT NULL,
    PRIMARY KEY (share_id, id)
) STRICT;

-- Deliberately without foreign keys: the audit trail outlives deleted shares and tokens.
CREATE TABLE audit (
    id       INTEGER PRIMARY KEY,
    at       INTEGER NOT NULL,
    action   TEXT NOT NULL,
    token_id TEXT,
    share_id TEXT,
    outcome  TEXT NOT NULL,
    detail   TEXT NOT NULL
) STRICT;
"#;

/// Archiving (issue 5): an archived share is read-only and left out of listings.
/// NULL rather than 0 for "not archived", so `archived_at IS NULL` reads as what it means.
const V2_ARCHIVE: &str = r#"
ALTER TABLE shares ADD COLUMN archived_at INTEGER;
"#;

/// Lifecycle (issue 5): chunked deletion and ledger compaction.
/// - `deleting_at`: set by the first step of a deletion. From then on the share
///   is gone for every caller, while later steps remove its rows a chunk at a time.
/// - `compacted_through`: ops with a cursor up to this one have lost their
///   payload; `opsSince` below it answers "snapshot required".
/// - Prune selects by last change, finds children by parent session id and
///   roots by looking their parent session up.
const V3_LIFECYCLE: &str = r#"
ALTER TABLE shares ADD COLUMN deleting_at INTEGER;
ALTER TABLE shares ADD COLUMN compacted_through INTEGER NOT NULL DEFAULT 0 CHECK (compacted_through >= 0);
CREATE INDEX shares_by_activity ON shares (updated_at);
CREATE INDEX shares_by_parent ON shares (parent_session_id);
CREATE INDEX shares_by_session ON shares (session_id);
"#;

/// Hardening (issue 9): a digest of each op's content as sent (kind, payload,
/// dependencies), so the same op id sent again with other content is refused
/// instead of being answered `duplicate`. It outlives ledger compaction, which
/// drops payloads only. NULL for ops applied before this version: those keep
/// answering `duplicate`, as they always did.
const V4_OP_DIGEST: &str = r#"
ALTER TABLE ops ADD COLUMN digest BLOB;
"#;

/// Snapshots that arrive out of order (issue 10; see `capsync_shared::model::progress`):
/// - `parts.finished`, `sessions.updated`: how far along the stored record is,
///   so an older snapshot is refused without parsing the stored JSON. Filled
///   here as `progress` defines them (a session's `time.updated` only when it
///   is an integer: anything else orders nothing, as before).
/// - Parts no longer need their message: one that arrives first is kept and
///   joins it when it comes. They belong to their share instead, and removing
///   a message removes its parts explicitly.
/// - A model is keyed `providerID/id`, as opencode names models, so the same
///   model id from two providers is two records.
const V5_OUT_OF_ORDER: &str = r#"
CREATE TABLE parts_v5 (
    share_id   TEXT NOT NULL REFERENCES shares (id) ON DELETE CASCADE,
    id         TEXT NOT NULL,
    message_id TEXT NOT NULL,
    finished   INTEGER NOT NULL CHECK (finished IN (0, 1)),
    json       TEXT NOT NULL,
    PRIMARY KEY (share_id, id)
) STRICT;
INSERT INTO parts_v5 (rowid, share_id, id, message_id, finished, json)
SELECT rowid, share_id, id, message_id,
    CASE json_extract(json, '$.type')
        WHEN 'tool' THEN coalesce(json_extract(json, '$.state.status') IN ('completed', 'error'), 0)
        WHEN 'text' THEN coalesce(json_type(json, '$.time.end') IN ('integer', 'real'), 0)
        WHEN 'reasoning' THEN coalesce(json_type(json, '$.time.end') IN ('integer', 'real'), 0)
        ELSE 0
    END,
    json
FROM parts;
DROP TABLE parts;
ALTER TABLE parts_v5 RENAME TO parts;
CREATE INDEX parts_by_message ON parts (share_id, message_id, id);

ALTER TABLE sessions ADD COLUMN updated INTEGER;
UPDATE sessions SET updated = json_extract(json, '$.time.updated')
WHERE json_type(json, '$.time.updated') = 'integer';

UPDATE OR IGNORE models SET id = json_extract(json, '$.providerID') || '/' || id
WHERE json_type(json, '$.providerID') = 'text' AND json_extract(json, '$.providerID') <> '';
"#;

/// Removed is final (see `rules::records`): the ids of the messages and parts a share has
/// removed, so a snapshot taken before the removal and arriving after it (another writer of
/// the share, a retry) cannot bring the record back. `kind` is `message` or `part`.
const V6_REMOVED: &str = r#"
CREATE TABLE removed (
    share_id TEXT NOT NULL REFERENCES shares (id) ON DELETE CASCADE,
    kind     TEXT NOT NULL CHECK (kind IN ('message', 'part')),
    id       TEXT NOT NULL,
    PRIMARY KEY (share_id, kind, id)
) STRICT;
"#;

/// Streamed text at constant cost (issue 14; see `rules::part_text`): what `part.delta`s
/// append to a field of a part, in chunks of about a KiB, instead of rewriting the part.
/// `seq` numbers a field's chunks from 0. A part's snapshot drops its chunks; removing the
/// part removes them (the cascade). Parts stored before this version have none: their
/// deltas were written into their JSON.
const V7_PART_CHUNKS: &str = r#"
CREATE TABLE part_chunks (
    share_id TEXT NOT NULL,
    part_id  TEXT NOT NULL,
    field    TEXT NOT NULL,
    seq      INTEGER NOT NULL CHECK (seq >= 0),
    text     TEXT NOT NULL,
    PRIMARY KEY (share_id, part_id, field, seq),
    FOREIGN KEY (share_id, part_id) REFERENCES parts (share_id, id) ON DELETE CASCADE
) STRICT;
"#;

/// Opens the write connection, creating the database (and its directory) if
/// needed, and applies pending migrations.
pub(super) fn open_writer(path: &Path, durability: Durability) -> LedgerResult<Connection> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent).map_err(|e| {
            LedgerError::Storage(format!("cannot create directory {}: {e}", parent.display()))
        })?;
    }
    restrict_access(path)?;
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;

    // auto_vacuum only takes effect if set before the first table exists; later
    // it would need a full VACUUM. Switching to WAL below does not create a table.
    let fresh: bool = conn.query_row("SELECT count(*) = 0 FROM sqlite_schema", [], |r| r.get(0))?;
    if fresh {
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    }
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(LedgerError::Storage(format!(
            "the database cannot use WAL (journal_mode is {mode})"
        )));
    }
    let synchronous = match durability {
        Durability::Full => "FULL",
        Durability::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", synchronous)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT_BYTES)?;
    // Each queued command runs in a savepoint; past 64 KiB of changed pages
    // SQLite spills a savepoint's journal to a temp file, which cost ~40% of the
    // writer's CPU on 100-op batches (docs/BENCHMARKS.md). Keep it in memory.
    conn.pragma_update(None, "temp_store", WRITER_TEMP_STORE)?;
    migrate(&mut conn)?;
    Ok(conn)
}

/// Makes the database readable by its owner only: created empty with mode
/// 0600 if missing (SQLite gives its `-wal` and `-shm` files the database's
/// mode), tightened to 0600 (with those files) if it exists.
fn restrict_access(path: &Path) -> LedgerResult<()> {
    let cannot = |e: std::io::Error| {
        LedgerError::Storage(format!("cannot restrict access to {}: {e}", path.display()))
    };
    if !path.exists() {
        super::storage::private_file(path).map_err(cannot)?;
        return Ok(());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for file in [
            path.to_path_buf(),
            super::reads::wal_path(path),
            shm_path(path),
        ] {
            match std::fs::metadata(&file) {
                Ok(meta) if meta.permissions().mode() & 0o077 != 0 => {
                    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
                        .map_err(cannot)?;
                    tracing::info!(file = %file.display(), "made readable by its owner only");
                }
                _ => {}
            }
        }
    }
    Ok(())
}

fn shm_path(db_path: &Path) -> std::path::PathBuf {
    let mut name = db_path.as_os_str().to_owned();
    name.push("-shm");
    name.into()
}

/// Caps the database at `bytes` (`max_page_count`). A database already larger
/// keeps its size and takes no more pages.
pub(super) fn limit_size(conn: &Connection, bytes: u64) -> LedgerResult<()> {
    let page_size: i64 = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
    let pages = (bytes / u64::try_from(page_size).unwrap_or(4096)).max(1);
    let pages = i64::try_from(pages).unwrap_or(i64::MAX);
    let set: i64 = conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| {
        r.get(0)
    })?;
    if set > pages {
        tracing::warn!(
            limit_bytes = bytes,
            size_bytes = set.saturating_mul(page_size),
            "the database is already larger than --max-database-bytes: it takes no more data"
        );
    }
    Ok(())
}

/// Opens a read-only connection to a database `open_writer` has already set up.
pub(super) fn open_reader(path: &Path) -> LedgerResult<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

/// Applies each pending migration in its own transaction.
fn migrate(conn: &mut Connection) -> LedgerResult<()> {
    loop {
        // The version is read inside the write transaction, so two processes
        // opening the same new file cannot both run the same migration.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let Some(sql) = crate::ledger::migrations::next(current, MIGRATIONS)? else {
            return Ok(());
        };
        let next = current + 1;
        tx.execute_batch(sql)
            .and_then(|()| tx.pragma_update(None, "user_version", next))
            .and_then(|()| tx.commit())
            .map_err(|e| {
                LedgerError::Storage(format!("migration to version {next} failed: {e}"))
            })?;
        tracing::info!(version = next, "ledger schema migrated");
    }
}
