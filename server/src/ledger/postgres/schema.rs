//! The PostgreSQL schema and its versioned migrations, applied at start.
//!
//! The tables mirror SQLite's (the same rows and columns, the same keys), with what
//! PostgreSQL needs of its own: ids compare as bytes (`COLLATE "C"`, as the contract
//! suite requires), parts carry a `pos` for reclaim's positions (SQLite uses its
//! rowids), and integers are `BIGINT`.

use postgres::Client;

use super::errors::storage;
use crate::ledger::LedgerResult;

/// Schema versions, in order: `MIGRATIONS[i]` takes the schema from version `i` to `i + 1`.
/// Append only; never edit a migration that has shipped.
const MIGRATIONS: &[&str] = &[V1_INITIAL, V2_NODES, V3_PART_CHUNKS];

/// Lock key of migrations (`pg_advisory_xact_lock`): nodes starting at once on one
/// database migrate one after the other, and the second finds nothing left to do.
const MIGRATION_LOCK: i64 = 0x6361_7073_796e_6301;

/// The whole schema as of SQLite's version 6.
const V1_INITIAL: &str = r#"
CREATE TABLE shares (
    id                TEXT COLLATE "C" PRIMARY KEY,
    session_id        TEXT COLLATE "C" NOT NULL,
    project_id        TEXT COLLATE "C" NOT NULL,
    parent_session_id TEXT COLLATE "C" NOT NULL,
    title             TEXT NOT NULL,
    owner_token_id    TEXT COLLATE "C" NOT NULL,
    cursor            BIGINT NOT NULL DEFAULT 0 CHECK (cursor >= 0),
    writer_epoch      BIGINT NOT NULL DEFAULT 0 CHECK (writer_epoch >= 0),
    viewer_epoch      BIGINT NOT NULL DEFAULT 0 CHECK (viewer_epoch >= 0),
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL,
    archived_at       BIGINT,
    deleting_at       BIGINT,
    compacted_through BIGINT NOT NULL DEFAULT 0 CHECK (compacted_through >= 0)
);
CREATE INDEX shares_by_owner ON shares (owner_token_id, id);
CREATE INDEX shares_by_activity ON shares (updated_at);
CREATE INDEX shares_by_parent ON shares (parent_session_id);
CREATE INDEX shares_by_session ON shares (session_id);

CREATE TABLE tokens (
    id          TEXT COLLATE "C" PRIMARY KEY,
    kind        TEXT NOT NULL CHECK (kind IN ('admin', 'agent', 'writer', 'viewer')),
    share_id    TEXT COLLATE "C" REFERENCES shares (id) ON DELETE CASCADE,
    epoch       BIGINT NOT NULL DEFAULT 0 CHECK (epoch >= 0),
    secret_hash TEXT NOT NULL,
    label       TEXT NOT NULL DEFAULT '',
    expires_at  BIGINT,
    revoked_at  BIGINT,
    issued_by   TEXT COLLATE "C",
    created_at  BIGINT NOT NULL,
    CHECK ((share_id IS NOT NULL) = (kind IN ('writer', 'viewer')))
);
CREATE INDEX tokens_by_share ON tokens (share_id);
CREATE INDEX admin_tokens ON tokens (revoked_at) WHERE kind = 'admin';

CREATE TABLE ops (
    share_id   TEXT COLLATE "C" NOT NULL REFERENCES shares (id) ON DELETE CASCADE,
    cursor     BIGINT NOT NULL CHECK (cursor > 0),
    op_id      TEXT COLLATE "C" NOT NULL,
    kind       TEXT NOT NULL,
    payload    TEXT NOT NULL,
    token_id   TEXT COLLATE "C" NOT NULL,
    batch_id   TEXT NOT NULL,
    applied_at BIGINT NOT NULL,
    digest     BYTEA,
    PRIMARY KEY (share_id, cursor),
    UNIQUE (share_id, op_id)
);

CREATE TABLE sessions (
    share_id TEXT COLLATE "C" PRIMARY KEY REFERENCES shares (id) ON DELETE CASCADE,
    updated  BIGINT,
    json     TEXT NOT NULL
);

CREATE TABLE messages (
    share_id TEXT COLLATE "C" NOT NULL REFERENCES shares (id) ON DELETE CASCADE,
    id       TEXT COLLATE "C" NOT NULL,
    terminal BOOLEAN NOT NULL,
    json     TEXT NOT NULL,
    PRIMARY KEY (share_id, id)
);

CREATE TABLE parts (
    share_id   TEXT COLLATE "C" NOT NULL REFERENCES shares (id) ON DELETE CASCADE,
    id         TEXT COLLATE "C" NOT NULL,
    message_id TEXT COLLATE "C" NOT NULL,
    finished   BOOLEAN NOT NULL,
    json       TEXT NOT NULL,
    -- Reclaim's position: increasing in the order parts were first stored.
    pos        BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    PRIMARY KEY (share_id, id)
);
CREATE INDEX parts_by_message ON parts (share_id, message_id, id);

CREATE TABLE diffs (
    share_id TEXT COLLATE "C" PRIMARY KEY REFERENCES shares (id) ON DELETE CASCADE,
    json     TEXT NOT NULL
);

CREATE TABLE models (
    share_id TEXT COLLATE "C" NOT NULL REFERENCES shares (id) ON DELETE CASCADE,
    id       TEXT COLLATE "C" NOT NULL,
    json     TEXT NOT NULL,
    PRIMARY KEY (share_id, id)
);

CREATE TABLE removed (
    share_id TEXT COLLATE "C" NOT NULL REFERENCES shares (id) ON DELETE CASCADE,
    kind     TEXT NOT NULL CHECK (kind IN ('message', 'part')),
    id       TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (share_id, kind, id)
);

-- Deliberately without foreign keys: the audit trail outlives deleted shares and tokens.
CREATE TABLE audit (
    id       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at       BIGINT NOT NULL,
    action   TEXT NOT NULL,
    token_id TEXT,
    share_id TEXT,
    outcome  TEXT NOT NULL,
    detail   TEXT NOT NULL
);
"#;

/// Several nodes (see `crate::node::postgres`): each live server process and its
/// heartbeat, and the writers connected to each node, by share. A node's rows go with
/// it (`ON DELETE CASCADE`) once its heartbeat is long stale.
const V2_NODES: &str = r#"
CREATE TABLE nodes (
    id           TEXT COLLATE "C" PRIMARY KEY,
    heartbeat_at BIGINT NOT NULL
);

CREATE TABLE presence (
    node_id         TEXT COLLATE "C" NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    share_id        TEXT COLLATE "C" NOT NULL,
    writers         BIGINT NOT NULL CHECK (writers >= 0),
    last_disconnect BIGINT,
    last_sync       BIGINT,
    PRIMARY KEY (node_id, share_id)
);
CREATE INDEX presence_by_share ON presence (share_id);
"#;

/// Streamed text at constant cost (issue 14; see `rules::part_text`): what `part.delta`s
/// append to a field of a part, in chunks of about a KiB, instead of rewriting the part.
/// A part's snapshot drops its chunks; removing the part removes them (the cascade).
const V3_PART_CHUNKS: &str = r#"
CREATE TABLE part_chunks (
    share_id TEXT COLLATE "C" NOT NULL,
    part_id  TEXT COLLATE "C" NOT NULL,
    field    TEXT COLLATE "C" NOT NULL,
    seq      BIGINT NOT NULL CHECK (seq >= 0),
    text     TEXT NOT NULL,
    PRIMARY KEY (share_id, part_id, field, seq),
    FOREIGN KEY (share_id, part_id) REFERENCES parts (share_id, id) ON DELETE CASCADE
);
"#;

/// Brings the schema up to date: each pending migration in its own transaction,
/// under a lock every node takes, so two nodes starting at once cannot both run one.
pub(super) fn migrate(client: &mut Client) -> LedgerResult<()> {
    client
        .batch_execute(
            // Quietly: "already exists, skipping" on every start is not news.
            "SET client_min_messages = warning;
             CREATE TABLE IF NOT EXISTS capsync_schema (
                 version BIGINT NOT NULL,
                 only_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row)
             );
             INSERT INTO capsync_schema (version) VALUES (0) ON CONFLICT DO NOTHING;
             RESET client_min_messages;",
        )
        .or_else(|e| {
            // Two nodes creating the version table at once: one of them loses the race
            // on the catalog and finds the table there when it looks again.
            if e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION) {
                Ok(())
            } else {
                Err(e)
            }
        })
        .map_err(|e| storage("cannot create the schema version table", &e))?;
    loop {
        let mut tx = client
            .transaction()
            .map_err(|e| storage("cannot begin a migration", &e))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .map_err(|e| storage("cannot take the migration lock", &e))?;
        let current: i64 = tx
            .query_one("SELECT version FROM capsync_schema", &[])
            .map_err(|e| storage("cannot read the schema version", &e))?
            .get(0);
        let Some(sql) = crate::ledger::migrations::next(current, MIGRATIONS)? else {
            return Ok(());
        };
        let next = current + 1;
        tx.batch_execute(sql)
            .and_then(|()| {
                tx.execute("UPDATE capsync_schema SET version = $1", &[&next])
                    .map(drop)
            })
            .and_then(|()| tx.commit())
            .map_err(|e| storage(&format!("migration to version {next} failed"), &e))?;
        tracing::info!(version = next, "ledger schema migrated");
    }
}
