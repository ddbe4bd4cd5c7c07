//! Moves a SQLite ledger into PostgreSQL (`capsync-server migrate`): every table row
//! for row, so every token, link, cursor and op id works as before, in one PostgreSQL
//! transaction (all of it lands, or none), then a check that both sides hold the same.
//!
//! What is copied as stored: shares (epochs, cursors, compaction points, archived and
//! half-deleted ones), tokens (as hashes, revoked ones included), ledger ops (op ids,
//! cursors, content digests, compacted payloads), the records (with the text deltas
//! appended to parts), the removed ids, and the audit log. What is per process (presence, nodes) is not.

use std::path::Path;

use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{ToSql, Type};
use rusqlite::OpenFlags;
use sha2::{Digest, Sha256};

use super::postgres::PostgresOptions;
use super::sqlite::SqliteOptions;
use super::{LedgerError, LedgerResult};

/// How a column is read from SQLite and written to PostgreSQL.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Text,
    Int,
    /// SQLite's 0 and 1.
    Bool,
    Blob,
}

/// A table: its name, its columns (all of them may be NULL unless the schema says not),
/// and the order rows are copied and compared in.
struct Table {
    name: &'static str,
    columns: &'static [(&'static str, Kind)],
    order: &'static str,
}

use Kind::{Blob, Bool, Int, Text};

/// Parents before children, as the foreign keys need them.
const TABLES: &[Table] = &[
    Table {
        name: "shares",
        columns: &[
            ("id", Text),
            ("session_id", Text),
            ("project_id", Text),
            ("parent_session_id", Text),
            ("title", Text),
            ("owner_token_id", Text),
            ("cursor", Int),
            ("writer_epoch", Int),
            ("viewer_epoch", Int),
            ("created_at", Int),
            ("updated_at", Int),
            ("archived_at", Int),
            ("deleting_at", Int),
            ("compacted_through", Int),
        ],
        order: "id",
    },
    Table {
        name: "tokens",
        columns: &[
            ("id", Text),
            ("kind", Text),
            ("share_id", Text),
            ("epoch", Int),
            ("secret_hash", Text),
            ("label", Text),
            ("expires_at", Int),
            ("revoked_at", Int),
            ("issued_by", Text),
            ("created_at", Int),
        ],
        order: "id",
    },
    Table {
        name: "ops",
        columns: &[
            ("share_id", Text),
            ("cursor", Int),
            ("op_id", Text),
            ("kind", Text),
            ("payload", Text),
            ("token_id", Text),
            ("batch_id", Text),
            ("applied_at", Int),
            ("digest", Blob),
        ],
        order: "share_id, cursor",
    },
    Table {
        name: "sessions",
        columns: &[("share_id", Text), ("updated", Int), ("json", Text)],
        order: "share_id",
    },
    Table {
        name: "messages",
        columns: &[
            ("share_id", Text),
            ("id", Text),
            ("terminal", Bool),
            ("json", Text),
        ],
        order: "share_id, id",
    },
    Table {
        name: "parts",
        columns: &[
            ("share_id", Text),
            ("id", Text),
            ("message_id", Text),
            ("finished", Bool),
            ("json", Text),
        ],
        order: "share_id, id",
    },
    Table {
        name: "part_chunks",
        columns: &[
            ("share_id", Text),
            ("part_id", Text),
            ("field", Text),
            ("seq", Int),
            ("text", Text),
        ],
        order: "share_id, part_id, field, seq",
    },
    Table {
        name: "diffs",
        columns: &[("share_id", Text), ("json", Text)],
        order: "share_id",
    },
    Table {
        name: "models",
        columns: &[("share_id", Text), ("id", Text), ("json", Text)],
        order: "share_id, id",
    },
    Table {
        name: "removed",
        columns: &[("share_id", Text), ("kind", Text), ("id", Text)],
        order: "share_id, kind, id",
    },
    Table {
        name: "audit",
        columns: &[
            ("at", Int),
            ("action", Text),
            ("token_id", Text),
            ("share_id", Text),
            ("outcome", Text),
            ("detail", Text),
        ],
        order: "id",
    },
];

/// One value of a row, as both engines hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Value {
    Null,
    Text(String),
    Int(i64),
    Bool(bool),
    Blob(Vec<u8>),
}

impl Value {
    fn to_sql(&self, kind: Kind) -> Box<dyn ToSql + Sync> {
        match (self, kind) {
            (Value::Null, Text) => Box::new(None::<String>),
            (Value::Null, Int) => Box::new(None::<i64>),
            (Value::Null, Bool) => Box::new(None::<bool>),
            (Value::Null, Blob) => Box::new(None::<Vec<u8>>),
            (Value::Text(text), _) => Box::new(text.clone()),
            (Value::Int(n), _) => Box::new(*n),
            (Value::Bool(b), _) => Box::new(*b),
            (Value::Blob(bytes), _) => Box::new(bytes.clone()),
        }
    }

    /// Feeds the value, with its type and length, into a digest.
    fn hash_into(&self, hasher: &mut Sha256) {
        let (tag, bytes): (u8, Vec<u8>) = match self {
            Value::Null => (0, Vec::new()),
            Value::Text(text) => (1, text.as_bytes().to_vec()),
            Value::Int(n) => (2, n.to_le_bytes().to_vec()),
            Value::Bool(b) => (3, vec![u8::from(*b)]),
            Value::Blob(bytes) => (4, bytes.clone()),
        };
        hasher.update([tag]);
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(&bytes);
    }
}

fn pg_type(kind: Kind) -> Type {
    match kind {
        Text => Type::TEXT,
        Int => Type::INT8,
        Bool => Type::BOOL,
        Blob => Type::BYTEA,
    }
}

/// How far the move is, for a progress bar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoveProgress {
    /// The table being copied or checked.
    pub table: &'static str,
    /// Rows copied so far, over all tables.
    pub rows: u64,
    /// Rows to copy, over all tables.
    pub total: u64,
}

/// What was moved: rows per table, in copy order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MoveReport {
    pub tables: Vec<(&'static str, u64)>,
}

/// Rows copied between progress reports.
const REPORT_EVERY: u64 = 1000;

/// Copies the SQLite ledger at `sqlite` (migrated to the current schema first) into the
/// empty PostgreSQL database of `postgres` (its schema created first), then checks that
/// both hold the same rows. Blocking: run it off any async runtime thread.
pub fn move_to_postgres(
    sqlite: &Path,
    postgres: &PostgresOptions,
    progress: &mut dyn FnMut(MoveProgress),
) -> LedgerResult<MoveReport> {
    if !sqlite.exists() {
        return Err(LedgerError::InvalidArgument(format!(
            "no ledger at {}",
            sqlite.display()
        )));
    }
    // Opening migrates it to the current schema; closing checkpoints it.
    let ledger = super::sqlite::open(SqliteOptions::new(sqlite))?;
    futures::executor::block_on(ledger.close());
    drop(ledger);
    // Creates PostgreSQL's schema (and checks that it can be reached).
    let target = super::postgres::open(postgres.clone())?;
    futures::executor::block_on(target.close());
    drop(target);

    let source = rusqlite::Connection::open_with_flags(sqlite, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut client = postgres
        .database
        .connect()
        .map_err(|e| LedgerError::Storage(format!("cannot connect to PostgreSQL: {e}")))?;
    let pg = |what: &str, e: postgres::Error| LedgerError::Storage(format!("{what}: {e}"));

    let mut counts = Vec::new();
    for table in TABLES {
        let n: i64 =
            source.query_row(&format!("SELECT count(*) FROM {}", table.name), [], |r| {
                r.get(0)
            })?;
        counts.push(u64::try_from(n).unwrap_or(0));
    }
    let total = counts.iter().sum();

    let mut tx = client.transaction().map_err(|e| pg("begin", e))?;
    for table in TABLES {
        let row = tx
            .query_one(&format!("SELECT count(*) FROM {}", table.name), &[])
            .map_err(|e| pg("count", e))?;
        if row.get::<_, i64>(0) > 0 {
            return Err(LedgerError::InvalidArgument(format!(
                "the PostgreSQL database already holds a ledger (table {} is not empty): \
                 migrate into an empty one",
                table.name
            )));
        }
    }
    let mut copied = 0;
    let mut report = MoveReport::default();
    for table in TABLES {
        let columns: Vec<&str> = table.columns.iter().map(|(name, _)| *name).collect();
        let types: Vec<Type> = table
            .columns
            .iter()
            .map(|(_, kind)| pg_type(*kind))
            .collect();
        let sink = tx
            .copy_in(&format!(
                "COPY {} ({}) FROM STDIN BINARY",
                table.name,
                columns.join(", ")
            ))
            .map_err(|e| pg("copy", e))?;
        let mut writer = BinaryCopyInWriter::new(sink, &types);
        let mut in_table = 0;
        each_sqlite_row(&source, table, |values| {
            let params: Vec<Box<dyn ToSql + Sync>> = values
                .iter()
                .zip(table.columns)
                .map(|(value, (_, kind))| value.to_sql(*kind))
                .collect();
            let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(AsRef::as_ref).collect();
            writer.write(&refs).map_err(|e| pg(table.name, e))?;
            copied += 1;
            in_table += 1;
            if copied % REPORT_EVERY == 0 {
                progress(MoveProgress {
                    table: table.name,
                    rows: copied,
                    total,
                });
            }
            Ok(())
        })?;
        writer.finish().map_err(|e| pg(table.name, e))?;
        report.tables.push((table.name, in_table));
        progress(MoveProgress {
            table: table.name,
            rows: copied,
            total,
        });
    }
    tx.commit().map_err(|e| pg("commit", e))?;

    verify(&source, &mut client)?;
    Ok(report)
}

/// Parts keep their storage order (their rowids): PostgreSQL's `pos`, reclaim's position,
/// follows it. The audit log keeps its order too.
fn sqlite_order(table: &Table) -> &'static str {
    match table.name {
        "parts" | "audit" => "rowid",
        _ => table.order,
    }
}

/// Calls `each` with every row of `table` in SQLite, in copy order.
fn each_sqlite_row(
    source: &rusqlite::Connection,
    table: &Table,
    mut each: impl FnMut(Vec<Value>) -> LedgerResult<()>,
) -> LedgerResult<()> {
    let columns: Vec<&str> = table.columns.iter().map(|(name, _)| *name).collect();
    let mut statement = source.prepare(&format!(
        "SELECT {} FROM {} ORDER BY {}",
        columns.join(", "),
        table.name,
        sqlite_order(table)
    ))?;
    let mut rows = statement.query([])?;
    while let Some(row) = rows.next()? {
        each(sqlite_values(row, table)?)?;
    }
    Ok(())
}

fn sqlite_values(row: &rusqlite::Row<'_>, table: &Table) -> LedgerResult<Vec<Value>> {
    use rusqlite::types::ValueRef;
    let mut values = Vec::with_capacity(table.columns.len());
    for (i, (name, kind)) in table.columns.iter().enumerate() {
        let value = match (row.get_ref(i)?, kind) {
            (ValueRef::Null, _) => Value::Null,
            (ValueRef::Text(text), Text) => Value::Text(
                String::from_utf8(text.to_vec())
                    .map_err(|_| bad(table, name, "text that is not UTF-8"))?,
            ),
            (ValueRef::Integer(n), Int) => Value::Int(n),
            (ValueRef::Integer(n), Bool) => Value::Bool(n != 0),
            (ValueRef::Blob(bytes), Blob) => Value::Blob(bytes.to_vec()),
            (other, _) => return Err(bad(table, name, &format!("{:?}", other.data_type()))),
        };
        values.push(value);
    }
    Ok(values)
}

fn bad(table: &Table, column: &str, what: &str) -> LedgerError {
    LedgerError::Storage(format!(
        "{}.{column} holds {what}, which the schema does not allow",
        table.name
    ))
}

/// Compares row counts and a digest of every row, table by table, in key order.
fn verify(source: &rusqlite::Connection, client: &mut postgres::Client) -> LedgerResult<()> {
    for table in TABLES {
        let columns: Vec<&str> = table.columns.iter().map(|(name, _)| *name).collect();
        let mut from_sqlite = Sha256::new();
        let mut sqlite_rows = 0u64;
        each_sqlite_row(source, table, |values| {
            for value in values {
                value.hash_into(&mut from_sqlite);
            }
            sqlite_rows += 1;
            Ok(())
        })?;
        let pg_order = match table.name {
            "parts" => "pos",
            _ => table.order,
        };
        let mut from_postgres = Sha256::new();
        let mut postgres_rows = 0u64;
        let rows = client
            .query(
                &format!(
                    "SELECT {} FROM {} ORDER BY {}",
                    columns.join(", "),
                    table.name,
                    pg_order
                ),
                &[],
            )
            .map_err(|e| LedgerError::Storage(format!("verify {}: {e}", table.name)))?;
        for row in &rows {
            for (i, (_, kind)) in table.columns.iter().enumerate() {
                let value = match kind {
                    Text => row.get::<_, Option<String>>(i).map(Value::Text),
                    Int => row.get::<_, Option<i64>>(i).map(Value::Int),
                    Bool => row.get::<_, Option<bool>>(i).map(Value::Bool),
                    Blob => row.get::<_, Option<Vec<u8>>>(i).map(Value::Blob),
                }
                .unwrap_or(Value::Null);
                value.hash_into(&mut from_postgres);
            }
            postgres_rows += 1;
        }
        if sqlite_rows != postgres_rows || from_sqlite.finalize() != from_postgres.finalize() {
            return Err(LedgerError::Storage(format!(
                "verification failed: table {} holds {sqlite_rows} rows in SQLite and \
                 {postgres_rows} in PostgreSQL, or other content",
                table.name
            )));
        }
    }
    Ok(())
}
