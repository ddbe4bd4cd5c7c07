//! Behaviour only the SQLite backend has, against real database files:
//! migrations and pragmas, what it stores beyond what the seam shows (checked
//! with SQL), and its writer thread (group commit, isolation, shutdown).
//!
//! What every engine owes through the `Backend` seam is the contract suite's
//! ([`crate::ledger::contract`]), run on SQLite by `contract.rs`; this
//! file's [`Fixture`] is the contract's with a handle on the SQLite backend.

use std::collections::{BTreeSet, HashSet};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use capsync_shared::{Cursor, OpKind, ShareId, TokenId, TokenKind};
use futures::FutureExt;
use futures::future::BoxFuture;
use rusqlite::Connection;
use serde_json::json;

use super::contract::{SQLITE, database, options};
use super::schema::{MIGRATIONS, SCHEMA_VERSION, V1_INITIAL};
use super::{Durability, SqliteBackend, SqliteOptions};
use crate::clock::Clock;
use crate::ledger::contract::{
    self, START, applied, authority, batch, delete_share, message, model_op, op, outcomes, part,
    raw_op, session, token,
};
use crate::ledger::{
    AuditEvent, Backend, BatchIn, BatchLink, Ledger, LedgerError, LedgerResult, OpOutcome,
    StorageStats,
};

// ---------------------------------------------------------------------------
// Fixture

/// The contract's fixture (an admin, an agent and one share of that agent, on
/// a manual clock), with a handle on the SQLite backend under its ledger.
pub(super) struct Fixture {
    fx: contract::Fixture,
    /// The backend `fx.backend` holds, for what only SQLite has: its writer
    /// thread, checkpoints, incremental vacuum.
    pub(super) sqlite: Arc<SqliteBackend>,
}

impl Deref for Fixture {
    type Target = contract::Fixture;
    fn deref(&self) -> &contract::Fixture {
        &self.fx
    }
}

impl Fixture {
    pub(super) async fn new() -> Self {
        Self::with_group(64).await
    }

    async fn with_group(max_group_commit: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::manual(START);
        let sqlite = open_backend(&database(dir.path()), &clock, max_group_commit);
        let ledger = shared(&sqlite, &clock);
        let fx = contract::Fixture::over(SQLITE, dir, clock, ledger).await;
        Self { fx, sqlite }
    }

    pub(super) fn path(&self) -> PathBuf {
        database(self.dir.path())
    }

    /// A separate connection to the file, to look at what was stored.
    pub(super) fn raw(&self) -> Connection {
        Connection::open(self.path()).unwrap()
    }

    pub(super) fn count(&self, sql: &str) -> i64 {
        self.raw().query_row(sql, [], |r| r.get(0)).unwrap()
    }

    /// Closes the ledger and opens the same file again.
    pub(super) async fn reopen(self) -> Self {
        let Self { mut fx, sqlite } = self;
        fx.backend.close().await;
        drop(sqlite);
        let sqlite = open_backend(&database(fx.dir.path()), &fx.clock, 64);
        fx.backend = shared(&sqlite, &fx.clock);
        Self { fx, sqlite }
    }
}

fn open_backend(path: &Path, clock: &Clock, max_group_commit: usize) -> Arc<SqliteBackend> {
    let options = SqliteOptions {
        clock: clock.clone(),
        ..options(path.to_path_buf(), max_group_commit)
    };
    Arc::new(SqliteBackend::open(&options).unwrap())
}

/// A ledger over `sqlite` that leaves the caller a handle of its own on it.
fn shared(sqlite: &Arc<SqliteBackend>, clock: &Clock) -> Ledger {
    Ledger {
        backend: Arc::clone(sqlite) as Arc<dyn Backend>,
        clock: clock.clone(),
    }
}

/// Blocks the writer thread inside a command until the returned sender is
/// dropped, so a test can queue commands knowing none of them has run yet.
pub(super) async fn hold_writer(
    backend: &SqliteBackend,
) -> (
    std::sync::mpsc::Sender<()>,
    BoxFuture<'static, LedgerResult<()>>,
) {
    let (entered, is_holding) = tokio::sync::oneshot::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let held = backend.writer.submit(move |_| {
        let _ = entered.send(());
        let _ = released.recv();
        Ok(())
    });
    is_holding.await.unwrap();
    (release, held.boxed())
}

// ---------------------------------------------------------------------------
// Storage and migrations

#[tokio::test]
async fn a_fresh_database_is_migrated_in_wal_with_incremental_auto_vacuum() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing").join("parent").join("ledger.db");
    let backend = SqliteBackend::open(&options(path.clone(), 8)).unwrap();
    backend.replace_admin_token(token("adm")).await.unwrap();
    backend.close().await;

    let raw = Connection::open(&path).unwrap();
    let pragma = |name: &str| -> String {
        raw.query_row(
            &format!("SELECT CAST({name} AS TEXT) FROM pragma_{name}"),
            [],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert_eq!(pragma("user_version"), SCHEMA_VERSION.to_string());
    assert_eq!(pragma("auto_vacuum"), "2", "2 is INCREMENTAL");
    assert_eq!(pragma("journal_mode"), "wal");
    let tables: BTreeSet<String> = raw
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for table in [
        "shares", "tokens", "ops", "sessions", "messages", "parts", "diffs", "models", "audit",
    ] {
        assert!(tables.contains(table), "missing table {table}: {tables:?}");
    }
    drop(raw);

    // Reopening migrates nothing and finds the data.
    let backend = SqliteBackend::open(&options(path.clone(), 8)).unwrap();
    assert!(backend.has_admin_token().await.unwrap());
    backend.close().await;
    let version: i64 = Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION as i64);
}

#[tokio::test]
async fn a_database_from_a_newer_build_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    SqliteBackend::open(&options(path.clone(), 8))
        .unwrap()
        .close()
        .await;
    Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", SCHEMA_VERSION as i64 + 1)
        .unwrap();
    match SqliteBackend::open(&options(path, 8)) {
        Err(LedgerError::Storage(why)) => assert!(why.contains("newer"), "{why}"),
        Err(other) => panic!("unexpected error {other:?}"),
        Ok(_) => panic!("opened a database from the future"),
    }
}

#[tokio::test]
async fn the_write_connection_has_the_requested_durability_and_foreign_keys() {
    for (durability, expected) in [(Durability::Full, 2), (Durability::Normal, 1)] {
        let dir = tempfile::tempdir().unwrap();
        let backend = SqliteBackend::open(&SqliteOptions {
            durability,
            ..options(dir.path().join("ledger.db"), 8)
        })
        .unwrap();
        let (synchronous, foreign_keys) = backend
            .writer
            .submit(|conn| {
                let synchronous: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
                let foreign_keys: i64 = conn.query_row("PRAGMA foreign_keys", [], |r| r.get(0))?;
                Ok((synchronous, foreign_keys))
            })
            .await
            .unwrap();
        assert_eq!(synchronous, expected, "{durability:?}");
        assert_eq!(foreign_keys, 1);
        backend.close().await;
    }
}

#[tokio::test]
async fn a_version_1_database_is_migrated_to_version_2_and_keeps_its_shares() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    {
        // A file exactly as a version-1 build left it, with one share in it.
        let raw = Connection::open(&path).unwrap();
        raw.execute_batch(V1_INITIAL).unwrap();
        raw.pragma_update(None, "user_version", 1).unwrap();
        raw.execute(
            "INSERT INTO shares (id, session_id, project_id, parent_session_id, title,
                                 owner_token_id, created_at, updated_at)
             VALUES ('sh_old', 'ses_old', 'prj', '', 'old', 'agt', 1, 1)",
            [],
        )
        .unwrap();
    }
    let backend = SqliteBackend::open(&options(path.clone(), 8)).unwrap();
    backend.replace_admin_token(token("adm")).await.unwrap();
    let admin = authority("adm", TokenKind::Admin, None);
    let listed = backend
        .list_shares(admin.clone(), String::new(), 10, false)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state.share_id, ShareId::from("sh_old"));
    assert_eq!(
        listed[0].archived_at, None,
        "existing shares start unarchived"
    );
    backend
        .set_archived(admin, ShareId::from("sh_old"), true)
        .await
        .unwrap();
    backend.close().await;
    let version: i64 = Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION as i64);
}

#[tokio::test]
async fn a_version_4_database_gains_progress_columns_and_parts_without_their_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    {
        // A file as a version-4 build left it: one share with a session, a
        // finished and an unfinished part of each ordered type, and a model.
        let mut raw = Connection::open(&path).unwrap();
        let tx = raw.transaction().unwrap();
        for sql in &MIGRATIONS[..4] {
            tx.execute_batch(sql).unwrap();
        }
        tx.pragma_update(None, "user_version", 4).unwrap();
        tx.execute_batch(
            r#"
            INSERT INTO shares (id, session_id, project_id, parent_session_id, title,
                                owner_token_id, created_at, updated_at)
                VALUES ('sh_1', 'ses_1', 'prj', '', 't', 'agt', 1, 1);
            INSERT INTO sessions VALUES ('sh_1', '{"id":"ses_1","time":{"updated":42}}');
            INSERT INTO messages VALUES ('sh_1', 'msg_1', 0, '{"id":"msg_1","role":"user"}');
            INSERT INTO parts VALUES
                ('sh_1', 'p_done', 'msg_1', '{"id":"p_done","type":"tool","state":{"status":"completed"}}'),
                ('sh_1', 'p_run', 'msg_1', '{"id":"p_run","type":"tool","state":{"status":"running"}}'),
                ('sh_1', 'p_end', 'msg_1', '{"id":"p_end","type":"text","time":{"end":3}}'),
                ('sh_1', 'p_open', 'msg_1', '{"id":"p_open","type":"reasoning","time":{}}'),
                ('sh_1', 'p_step', 'msg_1', '{"id":"p_step","type":"step-finish","time":{"end":3}}');
            INSERT INTO models VALUES
                ('sh_1', 'x', '{"id":"x","providerID":"openrouter"}'),
                ('sh_1', 'y', '{"id":"y"}');
            "#,
        )
        .unwrap();
        tx.commit().unwrap();
    }
    let backend = SqliteBackend::open(&options(path.clone(), 8)).unwrap();
    backend.close().await;

    let raw = Connection::open(&path).unwrap();
    let version: i64 = raw
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION as i64);
    let finished: Vec<(String, bool)> = raw
        .prepare("SELECT id, finished FROM parts ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let expected = [
        ("p_done", true),
        ("p_end", true),
        ("p_open", false),
        ("p_run", false),
        ("p_step", false),
    ]
    .map(|(id, done)| (id.to_owned(), done));
    assert_eq!(finished, expected);
    let updated: Option<i64> = raw
        .query_row("SELECT updated FROM sessions", [], |r| r.get(0))
        .unwrap();
    assert_eq!(updated, Some(42));
    let models: Vec<String> = raw
        .prepare("SELECT id FROM models ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(models, ["openrouter/x", "y"]);

    // Parts now belong to their share: deleting it still takes them.
    raw.pragma_update(None, "foreign_keys", "ON").unwrap();
    raw.execute("DELETE FROM shares WHERE id = 'sh_1'", [])
        .unwrap();
    let left: i64 = raw
        .query_row("SELECT count(*) FROM parts", [], |r| r.get(0))
        .unwrap();
    assert_eq!(left, 0);
}

// ---------------------------------------------------------------------------
// What SQLite stores beyond what the seam shows

#[tokio::test]
async fn applied_ops_are_stored_with_their_token_batch_and_times() {
    let fx = Fixture::new().await;
    fx.clock.advance(std::time::Duration::from_secs(1));
    fx.append(vec![
        op("o1", OpKind::SessionUpsert, session()),
        op("o2", OpKind::MessageUpsert, message("msg_1")),
        op("o3", OpKind::PartUpsert, part("prt_1", "msg_1")),
    ])
    .await;
    assert_eq!(
        fx.count("SELECT count(*) FROM ops WHERE token_id = 'w-sh_1' AND batch_id = 'batch'"),
        3
    );
    let (created, updated): (i64, i64) = fx
        .raw()
        .query_row(
            "SELECT created_at, updated_at FROM shares WHERE id = 'sh_1'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((created, updated), (START, START + 1000));
    assert_eq!(
        fx.count(&format!(
            "SELECT count(*) FROM ops WHERE applied_at = {}",
            START + 1000
        )),
        3
    );
}

#[tokio::test]
async fn minted_tokens_are_stored_with_who_issued_them() {
    let fx = Fixture::new().await;
    fx.backend
        .mint_token(fx.writer.clone(), TokenKind::Viewer, token("v-new"))
        .await
        .unwrap();
    assert_eq!(
        fx.count("SELECT count(*) FROM tokens WHERE id = 'v-new' AND issued_by = 'w-sh_1'"),
        1
    );
    assert_eq!(
        fx.count("SELECT count(*) FROM tokens WHERE id = 'agt' AND issued_by = 'adm'"),
        1
    );
    assert_eq!(
        fx.count("SELECT count(*) FROM tokens WHERE id = 'adm' AND issued_by IS NULL"),
        1
    );
}

/// The contract's `deleting_a_share_cascades_to_everything_it_owns` checks
/// what the seam shows; here, every table, the audit trail and the foreign keys.
#[tokio::test]
async fn a_deleted_share_leaves_no_row_but_its_audit_lines() {
    let fx = Fixture::new().await;
    let (other_writer, _) = fx.new_share(&fx.agent, "sh_2").await;
    let populate = || {
        vec![
            op("s", OpKind::SessionUpsert, session()),
            model_op("md"),
            op("d", OpKind::DiffSet, json!([{"file": "a"}])),
            op("m", OpKind::MessageUpsert, message("msg_1")),
            op("p", OpKind::PartUpsert, part("prt_1", "msg_1")),
        ]
    };
    fx.append(populate()).await;
    fx.backend
        .append(other_writer.clone(), batch(populate()))
        .await
        .unwrap();
    fx.backend
        .mint_token(fx.writer.clone(), TokenKind::Viewer, token("v-extra"))
        .await
        .unwrap();
    fx.backend.audit(AuditEvent {
        action: "append",
        token_id: Some(fx.writer.token_id.clone()),
        share_id: Some(fx.share.clone()),
        outcome: "ok".into(),
        detail: "127.0.0.1".into(),
    });

    delete_share(&fx.backend, &fx.admin, &fx.share)
        .await
        .unwrap();
    for table in [
        "shares", "tokens", "ops", "sessions", "messages", "parts", "diffs", "models",
    ] {
        let column = if table == "shares" { "id" } else { "share_id" };
        assert_eq!(
            fx.count(&format!(
                "SELECT count(*) FROM {table} WHERE {column} = 'sh_1'"
            )),
            0,
            "{table}"
        );
        let remaining = match table {
            "ops" => 5,
            "tokens" => 2,
            _ => 1,
        };
        assert_eq!(
            fx.count(&format!(
                "SELECT count(*) FROM {table} WHERE {column} = 'sh_2'"
            )),
            remaining,
            "{table} of the other share"
        );
    }
    // Admin and agent tokens do not belong to a share.
    assert_eq!(
        fx.count("SELECT count(*) FROM tokens WHERE share_id IS NULL"),
        2
    );
    // The audit trail outlives the share.
    assert!(fx.count("SELECT count(*) FROM audit WHERE share_id = 'sh_1'") > 0);
    assert_eq!(fx.count("SELECT count(*) FROM pragma_foreign_key_check"), 0);
}

/// The contract's `stats_count_a_known_dataset` checks the counts; here, what
/// SQLite says of its files.
#[tokio::test]
async fn stats_describe_the_database_files() {
    let fx = Fixture::new().await;
    fx.append(vec![
        op("o1", OpKind::SessionUpsert, session()),
        op("o2", OpKind::MessageUpsert, message("m1")),
    ])
    .await;
    let stats = fx.stats().await;
    let StorageStats::Sqlite(sqlite) = &stats.storage else {
        panic!("not SQLite's stats: {:?}", stats.storage)
    };
    assert!(sqlite.page_size >= 512);
    assert!(sqlite.page_count > 0);
    let on_disk = std::fs::metadata(fx.path()).unwrap().len();
    assert_eq!(sqlite.db_file_bytes, on_disk);
    assert!(
        sqlite.wal_file_bytes > 0,
        "writes since the last checkpoint are in the WAL"
    );
}
#[tokio::test]
async fn ops_from_before_digests_stay_plain_duplicates() {
    let fx = Fixture::new().await;
    fx.append(vec![model_op("old")]).await;
    // As a database migrated from schema version 3 has it.
    fx.raw()
        .execute("UPDATE ops SET digest = NULL", [])
        .unwrap();
    let ack = fx
        .append(vec![raw_op(
            "old",
            OpKind::ModelUpsert,
            r#"{"id":"changed"}"#,
        )])
        .await;
    assert_eq!(outcomes(&ack), [OpOutcome::Duplicate(Cursor(1))]);
}

// ---------------------------------------------------------------------------
// The writer: group commit, isolation, shutdown

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_queued_during_a_commit_share_the_next_transaction() {
    let fx = Fixture::new().await;
    let stats = Arc::clone(fx.sqlite.writer.stats());
    let (tasks, per_task) = (5, 10);
    let (release, held) = hold_writer(&fx.sqlite).await;
    let transactions_before = stats.transactions();

    // Every task queues its appends, then waits at the barrier: once the test
    // passes it, all 50 are in the queue and none has run.
    let barrier = Arc::new(tokio::sync::Barrier::new(tasks + 1));
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let backend = Arc::clone(&fx.sqlite);
            let writer = fx.writer.clone();
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                let pending: Vec<_> = (0..per_task)
                    .map(|i| {
                        backend.append(writer.clone(), batch(vec![model_op(&format!("t{t}-{i}"))]))
                    })
                    .collect();
                barrier.wait().await;
                futures::future::join_all(pending).await
            })
        })
        .collect();
    barrier.wait().await;
    drop(release);
    held.await.unwrap();

    let mut cursors = BTreeSet::new();
    for handle in handles {
        for ack in handle.await.unwrap() {
            let ack = ack.unwrap();
            let [OpOutcome::Applied(at)] = outcomes(&ack)[..] else {
                panic!("{ack:?}")
            };
            // Each batch's ack reports the cursor right after its own op.
            assert_eq!(ack.cursor, at);
            assert!(cursors.insert(at.0));
        }
    }
    assert_eq!(cursors, (1..=50).collect());
    assert_eq!(fx.cursor().await, Cursor(50));
    // The held command's transaction, then one for all 50 batches.
    assert_eq!(stats.transactions() - transactions_before, 2);
}

/// Pipelined batches (each following the one before) queued together commit in one
/// transaction: a writer's batches need not wait for each other's commits.
#[tokio::test]
async fn pipelined_batches_queued_together_share_one_transaction() {
    let fx = Fixture::new().await;
    let stats = Arc::clone(fx.sqlite.writer.stats());
    let (release, held) = hold_writer(&fx.sqlite).await;
    let before = stats.transactions();
    let mut before_link = None;
    let pending: Vec<_> = (0..4)
        .map(|i| {
            let link = BatchLink::new();
            let batch = BatchIn {
                follows: before_link.replace(Arc::clone(&link)),
                link: Some(link),
                ..batch(vec![model_op(&format!("o{i}"))])
            };
            fx.backend.append(fx.writer.clone(), batch)
        })
        .collect();
    drop(release);
    held.await.unwrap();
    let cursors: Vec<u64> = futures::future::join_all(pending)
        .await
        .into_iter()
        .map(|ack| ack.unwrap().cursor.0)
        .collect();
    assert_eq!(cursors, [1, 2, 3, 4]);
    assert_eq!(
        stats.transactions() - before,
        1 + 1,
        "the held command's, then one"
    );
}

/// A batch written in a group whose transaction then failed did not apply: the batch
/// following it, in the next group, is refused.
#[tokio::test]
async fn a_batch_following_one_whose_group_failed_is_refused() {
    let fx = Fixture::with_group(2).await;
    let (release, held) = hold_writer(&fx.sqlite).await;
    let first_link = BatchLink::new();
    let first = BatchIn {
        link: Some(Arc::clone(&first_link)),
        ..batch(vec![model_op("o1")])
    };
    let second = BatchIn {
        follows: Some(first_link),
        link: Some(BatchLink::new()),
        ..batch(vec![model_op("o2")])
    };
    let first = fx.backend.append(fx.writer.clone(), first);
    // Shares the first batch's group (of two) and ends its transaction under it.
    let breaker = fx.sqlite.writer.submit(|conn| {
        conn.execute_batch("ROLLBACK")?;
        Ok(())
    });
    let second = fx.backend.append(fx.writer.clone(), second);
    drop(release);
    held.await.unwrap();
    assert!(first.await.is_err(), "its group was rolled back");
    assert!(breaker.await.is_err());
    let second = second.await;
    assert!(matches!(second, Err(LedgerError::OutOfOrder)), "{second:?}");
    assert_eq!(fx.cursor().await, Cursor(0));
}

#[tokio::test]
async fn a_group_never_exceeds_max_group_commit() {
    let fx = Fixture::with_group(8).await;
    let stats = Arc::clone(fx.sqlite.writer.stats());
    let (release, held) = hold_writer(&fx.sqlite).await;
    let before = stats.transactions();
    let pending: Vec<_> = (0..40)
        .map(|i| {
            fx.backend
                .append(fx.writer.clone(), batch(vec![model_op(&format!("o{i}"))]))
        })
        .collect();
    drop(release);
    held.await.unwrap();
    for ack in futures::future::join_all(pending).await {
        ack.unwrap();
    }
    // 1 for the held command, then 40 batches in groups of 8.
    assert_eq!(stats.transactions() - before, 1 + 5);
    assert_eq!(fx.cursor().await, Cursor(40));
}

/// The contract's case of the same name checks what every engine owes; here,
/// that each append was one command of the writer thread, and the rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_are_one_writer_command_each() {
    let fx = Fixture::new().await;
    let stats = Arc::clone(fx.sqlite.writer.stats());
    let commands_before = stats.commands();
    let handles: Vec<_> = (0..5)
        .map(|t| {
            let backend = Arc::clone(&fx.sqlite);
            let writer = fx.writer.clone();
            tokio::spawn(async move {
                let mut acks = Vec::new();
                for i in 0..10 {
                    // Each op is sent twice, by two different batches.
                    let id = format!("t{t}-{i}");
                    let first = backend.append(writer.clone(), batch(vec![model_op(&id)]));
                    let retry = backend.append(writer.clone(), batch(vec![model_op(&id)]));
                    let (first, retry) = futures::join!(first, retry);
                    acks.push((first.unwrap(), retry.unwrap()));
                }
                acks
            })
        })
        .collect();
    let mut applied_at = HashSet::new();
    for handle in handles {
        let mut last = Cursor(0);
        for (first, retry) in handle.await.unwrap() {
            let OpOutcome::Applied(at) = first.results[0].outcome else {
                panic!("{first:?}")
            };
            assert_eq!(retry.results[0].outcome, OpOutcome::Duplicate(at));
            assert!(at > last, "a task's own appends apply in order");
            last = at;
            assert!(applied_at.insert(at));
        }
    }
    assert_eq!(applied_at.len(), 50);
    assert_eq!(fx.cursor().await, Cursor(50));
    assert_eq!(fx.count("SELECT count(*) FROM ops"), 50);
    assert_eq!(
        fx.count("SELECT count(DISTINCT cursor) FROM ops WHERE cursor BETWEEN 1 AND 50"),
        50
    );
    assert_eq!(stats.commands() - commands_before, 100);
}

#[tokio::test]
async fn a_failing_command_rolls_back_alone() {
    let fx = Fixture::new().await;
    let stats = Arc::clone(fx.sqlite.writer.stats());
    let (release, held) = hold_writer(&fx.sqlite).await;
    let before = stats.transactions();
    let a = fx
        .backend
        .append(fx.writer.clone(), batch(vec![model_op("a")]));
    // Writes, then fails: its write must not survive.
    let doomed = fx.sqlite.writer.submit(|conn| {
        conn.execute(
            "INSERT INTO audit (at, action, outcome, detail) VALUES (0, 'doomed', '', '')",
            [],
        )?;
        conn.execute("INSERT INTO no_such_table VALUES (1)", [])?;
        Ok(())
    });
    let b = fx
        .backend
        .append(fx.writer.clone(), batch(vec![model_op("b")]));
    drop(release);
    held.await.unwrap();
    let (a, doomed, b) = futures::join!(a, doomed, b);
    assert_eq!(outcomes(&a.unwrap()), applied(&[1]));
    assert!(matches!(doomed, Err(LedgerError::Storage(_))), "{doomed:?}");
    assert_eq!(outcomes(&b.unwrap()), applied(&[2]));
    assert_eq!(
        fx.count("SELECT count(*) FROM audit WHERE action = 'doomed'"),
        0
    );
    // All three were in one transaction.
    assert_eq!(stats.transactions() - before, 2);
}

#[tokio::test]
async fn audit_lines_are_written_with_the_next_transaction() {
    let fx = Fixture::new().await;
    fx.backend.audit(AuditEvent {
        action: "redeem",
        token_id: Some(TokenId::from("nobody")),
        share_id: None,
        outcome: "unknown_token".into(),
        detail: "10.0.0.1:5000".into(),
    });
    // Queued after the audit line, so committed with it or after it.
    fx.append(vec![model_op("o")]).await;
    let (action, token_id, share_id, outcome, detail, at): (
        String,
        Option<String>,
        Option<String>,
        String,
        String,
        i64,
    ) = fx
        .raw()
        .query_row(
            "SELECT action, token_id, share_id, outcome, detail, at FROM audit WHERE action = 'redeem'",
            [],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            },
        )
        .unwrap();
    assert_eq!(
        (
            action.as_str(),
            token_id.as_deref(),
            share_id,
            outcome.as_str(),
            detail.as_str()
        ),
        (
            "redeem",
            Some("nobody"),
            None,
            "unknown_token",
            "10.0.0.1:5000"
        )
    );
    assert_eq!(at, START, "stamped by the ledger's clock");
}

#[tokio::test]
async fn close_finishes_queued_work_then_refuses_everything() {
    let fx = Fixture::new().await;
    let (release, held) = hold_writer(&fx.sqlite).await;
    let queued = fx
        .backend
        .append(fx.writer.clone(), batch(vec![model_op("o1")]));
    fx.backend.audit(AuditEvent {
        action: "queued",
        token_id: None,
        share_id: None,
        outcome: "ok".into(),
        detail: String::new(),
    });
    let closed = fx.backend.close();
    let late = fx
        .backend
        .append(fx.writer.clone(), batch(vec![model_op("o2")]));
    assert!(matches!(late.await, Err(LedgerError::Closed)));
    let late_read = fx.backend.share_state(fx.viewer.clone()).await;
    assert!(matches!(late_read, Err(LedgerError::Closed)));
    // Must not panic or block.
    fx.backend.audit(AuditEvent {
        action: "late",
        token_id: None,
        share_id: None,
        outcome: "ok".into(),
        detail: String::new(),
    });

    drop(release);
    held.await.unwrap();
    assert_eq!(outcomes(&queued.await.unwrap()), applied(&[1]));
    closed.await;
    // A second close is harmless and returns at once.
    fx.backend.close().await;
    assert!(matches!(
        fx.backend.has_admin_token().await,
        Err(LedgerError::Closed)
    ));

    assert_eq!(
        fx.count("SELECT count(*) FROM audit WHERE action = 'queued'"),
        1
    );
    assert_eq!(
        fx.count("SELECT count(*) FROM audit WHERE action = 'late'"),
        0
    );
    let fx = fx.reopen().await;
    assert_eq!(fx.cursor().await, Cursor(1));
}

#[tokio::test]
async fn dropping_the_last_handle_stops_the_writer_after_queued_work() {
    let fx = Fixture::new().await;
    let path = fx.path();
    let Fixture {
        fx,
        sqlite: backend,
    } = fx;
    let contract::Fixture {
        dir: _dir,
        backend: ledger,
        writer,
        viewer,
        ..
    } = fx;
    drop(ledger);
    let mut stopped = backend.writer.stopped();
    let pending = backend.append(writer, batch(vec![model_op("o1")]));
    let backend = Arc::into_inner(backend).expect("the only handle");
    drop(Ledger::new(backend, Clock::system()));
    assert_eq!(outcomes(&pending.await.unwrap()), applied(&[1]));
    stopped.wait_for(|stopped| *stopped).await.unwrap();

    let ledger = super::open(options(path, 8)).unwrap();
    assert_eq!(ledger.share_state(viewer).await.unwrap().cursor, Cursor(1));
    ledger.close().await;
}

#[tokio::test]
async fn a_command_that_panics_fails_alone_and_the_writer_keeps_going() {
    let fx = Fixture::new().await;
    let before = fx.cursor().await;
    let panicked = fx
        .sqlite
        .writer
        .submit(|conn| -> LedgerResult<()> {
            conn.execute("UPDATE shares SET title = 'changed by a buggy command'", [])?;
            panic!("a bug in a ledger command");
        })
        .await;
    assert!(
        matches!(panicked, Err(LedgerError::Storage(_))),
        "{panicked:?}"
    );
    assert_eq!(
        fx.count("SELECT count(*) FROM shares WHERE title = 'changed by a buggy command'"),
        0,
        "the panicking command's write was rolled back"
    );
    let ack = fx.append(vec![model_op("after-the-panic")]).await;
    assert_eq!(
        ack.cursor,
        Cursor(before.0 + 1),
        "the writer thread still works"
    );
}
