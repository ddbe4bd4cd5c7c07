//! Behaviour of the SQLite backend through the `Backend` API, against real database files.

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use capsync_shared::{Cursor, Epoch, OpId, OpKind, ShareId, TokenId, TokenKind};
use futures::FutureExt;
use futures::future::BoxFuture;
use rusqlite::Connection;
use serde_json::{Value, json};
use tempfile::TempDir;

use super::schema::{SCHEMA_VERSION, V1_INITIAL};
use super::{Durability, SqliteBackend, SqliteOptions};
use crate::ledger::StorageStats;
use crate::ledger::{
    Ack, AuditEvent, Authority, Backend, BatchIn, Changed, DeleteStep, Ledger, LedgerError,
    LedgerResult, NewShare, NewToken, OpIn, OpOutcome, Operator, Record, RecordKind, RejectReason,
    RevokeScope,
};

const SESSION: &str = "ses_1";
const SHARE: &str = "sh_1";

// ---------------------------------------------------------------------------
// Fixture

/// A database with an admin, an agent and one share created by that agent.
pub(super) struct Fixture {
    /// Keeps the database directory alive for the test.
    dir: TempDir,
    pub(super) backend: Arc<SqliteBackend>,
    pub(super) admin: Authority,
    pub(super) agent: Authority,
    /// `sh_1`, for session `ses_1`.
    pub(super) share: ShareId,
    pub(super) writer: Authority,
    pub(super) viewer: Authority,
}

pub(super) fn options(path: PathBuf, max_group_commit: usize) -> SqliteOptions {
    SqliteOptions {
        durability: Durability::Full,
        read_connections: 2,
        max_group_commit,
        ..SqliteOptions::new(path)
    }
}

/// Deletes a share to the end in small steps, as `crate::lifecycle::delete_share` does.
async fn delete_share(
    backend: &SqliteBackend,
    who: &Authority,
    share: &ShareId,
) -> LedgerResult<()> {
    let op = Operator::Admin(who.clone());
    loop {
        match backend
            .delete_share_step(op.clone(), share.clone(), None, 100)
            .await?
        {
            DeleteStep::More => {}
            DeleteStep::Done => return Ok(()),
            DeleteStep::Changed => unreachable!("no cursor was expected"),
        }
    }
}

impl Fixture {
    pub(super) async fn new() -> Self {
        Self::with_group(64).await
    }

    async fn with_group(max_group_commit: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let backend = Arc::new(
            SqliteBackend::open(&options(dir.path().join("ledger.db"), max_group_commit)).unwrap(),
        );
        backend.replace_admin_token(token("adm")).await.unwrap();
        let admin = authority("adm", TokenKind::Admin, None);
        backend
            .mint_token(admin.clone(), TokenKind::Agent, token("agt"))
            .await
            .unwrap();
        let agent = authority("agt", TokenKind::Agent, None);
        let mut fixture = Self {
            dir,
            backend,
            admin,
            agent: agent.clone(),
            share: ShareId::from(SHARE),
            writer: authority("w-sh_1", TokenKind::Writer, Some((SHARE, 0))),
            viewer: authority("v-sh_1", TokenKind::Viewer, Some((SHARE, 0))),
        };
        let (writer, viewer) = fixture.new_share(&agent, SHARE).await;
        fixture.writer = writer;
        fixture.viewer = viewer;
        fixture
    }

    pub(super) fn path(&self) -> PathBuf {
        self.dir.path().join("ledger.db")
    }

    /// A separate connection to the file, to look at what was stored.
    pub(super) fn raw(&self) -> Connection {
        Connection::open(self.path()).unwrap()
    }

    pub(super) fn count(&self, sql: &str) -> i64 {
        self.raw().query_row(sql, [], |r| r.get(0)).unwrap()
    }

    /// Creates share `id` (session `ses_1`) owned by `agent`; returns its writer and viewer.
    pub(super) async fn new_share(&self, agent: &Authority, id: &str) -> (Authority, Authority) {
        let info = self
            .backend
            .create_share(
                agent.clone(),
                new_share(id),
                token(&format!("w-{id}")),
                token(&format!("v-{id}")),
            )
            .await
            .unwrap();
        assert_eq!(info.state.cursor, Cursor(0));
        assert_eq!(info.owner_token_id, agent.token_id);
        (
            authority(&format!("w-{id}"), TokenKind::Writer, Some((id, 0))),
            authority(&format!("v-{id}"), TokenKind::Viewer, Some((id, 0))),
        )
    }

    pub(super) async fn append(&self, ops: Vec<OpIn>) -> Ack {
        self.backend
            .append(self.writer.clone(), batch(ops))
            .await
            .unwrap()
    }

    async fn cursor(&self) -> Cursor {
        self.backend
            .share_state(self.viewer.clone())
            .await
            .unwrap()
            .cursor
    }

    /// Closes the ledger and opens the same file again.
    pub(super) async fn reopen(mut self) -> Self {
        self.backend.close().await;
        self.backend = Arc::new(SqliteBackend::open(&options(self.path(), 64)).unwrap());
        self
    }

    /// Every record of the share, read in pages of at most `max_bytes`.
    pub(super) async fn snapshot(&self, max_bytes: u32) -> (Vec<Record>, usize) {
        let mut records = Vec::new();
        let mut page = String::new();
        let mut pages = 0;
        let first_cursor = self.cursor().await;
        loop {
            let got = self
                .backend
                .snapshot_page(self.viewer.clone(), page, max_bytes)
                .await
                .unwrap();
            assert_eq!(got.cursor, first_cursor);
            pages += 1;
            assert!(pages < 10_000, "snapshot does not end");
            assert!(
                !got.records.is_empty() || got.next_page.is_empty(),
                "an empty page must be the last"
            );
            records.extend(got.records);
            if got.next_page.is_empty() {
                return (records, pages);
            }
            page = got.next_page;
        }
    }
}

pub(super) fn token(id: &str) -> NewToken {
    NewToken {
        id: TokenId::from(id),
        secret_hash: format!("$argon2id$fake${id}"),
        expires_at: None,
        label: String::new(),
    }
}

pub(super) fn authority(token_id: &str, kind: TokenKind, share: Option<(&str, u32)>) -> Authority {
    Authority {
        token_id: TokenId::from(token_id),
        kind,
        share: share.map(|(id, epoch)| (ShareId::from(id), Epoch(epoch))),
    }
}

fn new_share(id: &str) -> NewShare {
    NewShare {
        share_id: ShareId::from(id),
        session_id: SESSION.into(),
        project_id: "prj".into(),
        parent_session_id: String::new(),
        title: "a session".into(),
    }
}

pub(super) fn op(id: &str, kind: OpKind, payload: Value) -> OpIn {
    raw_op(id, kind, &payload.to_string())
}

fn raw_op(id: &str, kind: OpKind, payload: &str) -> OpIn {
    OpIn {
        op_id: OpId::from(id),
        kind,
        payload: payload.to_owned(),
        depends_on: Vec::new(),
    }
}

fn after(mut op: OpIn, dependencies: &[&str]) -> OpIn {
    op.depends_on = dependencies.iter().map(|d| OpId::from(*d)).collect();
    op
}

pub(super) fn batch(ops: Vec<OpIn>) -> BatchIn {
    BatchIn {
        batch_id: "batch".into(),
        ops,
        expected_cursor: None,
    }
}

pub(super) fn outcomes(ack: &Ack) -> Vec<OpOutcome> {
    ack.results.iter().map(|r| r.outcome.clone()).collect()
}

pub(super) fn applied(cursors: &[u64]) -> Vec<OpOutcome> {
    cursors
        .iter()
        .map(|c| OpOutcome::Applied(Cursor(*c)))
        .collect()
}

/// The detail of a rejection with `reason`, or a panic.
pub(super) fn rejection(outcome: &OpOutcome, reason: RejectReason) -> String {
    match outcome {
        OpOutcome::Rejected { reason: r, detail } if *r == reason => detail.clone(),
        other => panic!("expected a {reason:?} rejection, got {other:?}"),
    }
}

fn session() -> Value {
    json!({"id": SESSION, "title": "t"})
}

pub(super) fn message(id: &str) -> Value {
    json!({"id": id, "role": "assistant", "sessionID": SESSION, "time": {"created": 1}})
}

pub(super) fn completed_message(id: &str) -> Value {
    json!({"id": id, "role": "assistant", "time": {"created": 1, "completed": 2}})
}

pub(super) fn part(id: &str, message_id: &str) -> Value {
    json!({"id": id, "messageID": message_id, "sessionID": SESSION, "type": "text", "text": "Hel"})
}

pub(super) fn model_op(id: &str) -> OpIn {
    op(id, OpKind::ModelUpsert, json!({"id": id}))
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

// ---------------------------------------------------------------------------
// appendOps

#[tokio::test]
async fn applied_ops_advance_the_cursor_and_are_logged_with_their_token() {
    let fx = Fixture::new().await;
    let ack = fx
        .append(vec![
            op("o1", OpKind::SessionUpsert, session()),
            op("o2", OpKind::MessageUpsert, message("msg_1")),
            op("o3", OpKind::PartUpsert, part("prt_1", "msg_1")),
        ])
        .await;
    assert_eq!(ack.cursor, Cursor(3));
    assert_eq!(outcomes(&ack), applied(&[1, 2, 3]));
    let ids: Vec<&str> = ack.results.iter().map(|r| r.op_id.as_str()).collect();
    assert_eq!(ids, ["o1", "o2", "o3"]);

    let page = fx
        .backend
        .ops_since(fx.viewer.clone(), Cursor(0), 100)
        .await
        .unwrap();
    assert_eq!(page.cursor, Cursor(3));
    let logged: Vec<(u64, &str, OpKind)> = page
        .ops
        .iter()
        .map(|o| (o.cursor.0, o.op_id.as_str(), o.kind))
        .collect();
    assert_eq!(
        logged,
        [
            (1, "o1", OpKind::SessionUpsert),
            (2, "o2", OpKind::MessageUpsert),
            (3, "o3", OpKind::PartUpsert)
        ]
    );
    assert_eq!(page.ops[0].payload, session().to_string());
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
    assert!(updated >= created);
    assert_eq!(page.ops[2].applied_at, updated);
}

#[tokio::test]
async fn dedupe_is_permanent_across_a_reopen() {
    let fx = Fixture::new().await;
    let ops = vec![
        model_op("o1"),
        op("o2", OpKind::MessageUpsert, message("msg_1")),
        op("o3", OpKind::PartUpsert, part("prt_1", "msg_1")),
    ];
    let first = fx.append(ops.clone()).await;
    assert_eq!(outcomes(&first), applied(&[1, 2, 3]));

    let fx = fx.reopen().await;
    let replay = fx.append(ops).await;
    assert_eq!(replay.cursor, Cursor(3));
    assert_eq!(
        outcomes(&replay),
        [1, 2, 3].map(|c| OpOutcome::Duplicate(Cursor(c)))
    );
    // The op id decides: other content under it is refused, the first stays.
    let changed = fx
        .append(vec![raw_op("o2", OpKind::MessageUpsert, "not even json")])
        .await;
    let detail = rejection(&changed.results[0].outcome, RejectReason::OpIdReused);
    assert!(
        detail.contains("o2") && detail.contains("cursor 2"),
        "{detail}"
    );
    assert_eq!(fx.cursor().await, Cursor(3));
    assert_eq!(fx.count("SELECT count(*) FROM ops"), 3);
}

#[tokio::test]
async fn an_op_id_sent_again_with_other_content_is_refused_not_a_duplicate() {
    let fx = Fixture::new().await;
    let first = op("m", OpKind::MessageUpsert, message("msg_1"));
    fx.append(vec![model_op("base"), first.clone()]).await;
    let other_payload = op("m", OpKind::MessageUpsert, message("msg_2"));
    let other_kind = raw_op("m", OpKind::ModelUpsert, &first.payload);
    let other_deps = after(first.clone(), &["base"]);
    let ack = fx
        .append(vec![first.clone(), other_payload, other_kind, other_deps])
        .await;
    assert_eq!(ack.results[0].outcome, OpOutcome::Duplicate(Cursor(2)));
    for result in &ack.results[1..] {
        rejection(&result.outcome, RejectReason::OpIdReused);
    }
    // Within one batch too: the second use of an id applied by the batch.
    let ack = fx
        .append(vec![
            model_op("x"),
            raw_op("x", OpKind::ModelUpsert, r#"{"id":"other"}"#),
        ])
        .await;
    assert_eq!(ack.results[0].outcome, OpOutcome::Applied(Cursor(3)));
    rejection(&ack.results[1].outcome, RejectReason::OpIdReused);
    // The record is the first op's, untouched.
    let (records, _) = fx.snapshot(1 << 20).await;
    assert!(records.iter().any(|r| r.id == "msg_1"));
    assert!(!records.iter().any(|r| r.id == "msg_2"));
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

#[tokio::test]
async fn a_repeated_op_id_in_one_batch_is_a_duplicate_of_the_first() {
    let fx = Fixture::new().await;
    let ack = fx
        .append(vec![model_op("o1"), model_op("o2"), model_op("o1")])
        .await;
    assert_eq!(
        outcomes(&ack),
        [
            OpOutcome::Applied(Cursor(1)),
            OpOutcome::Applied(Cursor(2)),
            OpOutcome::Duplicate(Cursor(1))
        ]
    );
    assert_eq!(ack.cursor, Cursor(2));
}

#[tokio::test]
async fn dependencies_must_be_applied_in_this_share() {
    let fx = Fixture::new().await;
    // Earlier in the same batch counts.
    let ack = fx
        .append(vec![model_op("a"), after(model_op("b"), &["a"])])
        .await;
    assert_eq!(outcomes(&ack), applied(&[1, 2]));

    // Missing: rejected and not recorded, so a later retry can apply it.
    let ack = fx
        .append(vec![after(model_op("c"), &["a", "zzz"]), model_op("d")])
        .await;
    let detail = rejection(&ack.results[0].outcome, RejectReason::MissingDependency);
    assert!(detail.contains("zzz"), "{detail}");
    assert_eq!(ack.results[1].outcome, OpOutcome::Applied(Cursor(3)));
    assert_eq!(ack.cursor, Cursor(3));

    // A dependency on an op rejected earlier in the batch is still missing.
    let ack = fx
        .append(vec![
            raw_op("bad", OpKind::ModelUpsert, "[]"),
            after(model_op("e"), &["bad"]),
        ])
        .await;
    rejection(&ack.results[0].outcome, RejectReason::Invalid);
    rejection(&ack.results[1].outcome, RejectReason::MissingDependency);

    // Dependencies live in their share only.
    let (other, _) = fx.new_share(&fx.agent, "sh_2").await;
    let ack = fx
        .backend
        .append(other, batch(vec![after(model_op("x"), &["a"])]))
        .await
        .unwrap();
    rejection(&ack.results[0].outcome, RejectReason::MissingDependency);

    let ack = fx
        .append(vec![model_op("zzz"), after(model_op("c"), &["a", "zzz"])])
        .await;
    assert_eq!(outcomes(&ack), applied(&[4, 5]));

    let ack = fx.append(vec![after(model_op("self"), &["self"])]).await;
    let detail = rejection(&ack.results[0].outcome, RejectReason::Invalid);
    assert!(detail.contains("itself"), "{detail}");
    assert_eq!(fx.cursor().await, Cursor(5));
    assert_eq!(
        fx.count("SELECT count(*) FROM ops WHERE op_id IN ('bad', 'e', 'self')"),
        0
    );
}

#[tokio::test]
async fn a_stale_expected_cursor_refuses_the_whole_batch() {
    let fx = Fixture::new().await;
    fx.append(vec![model_op("o1"), model_op("o2")]).await;
    let stale = BatchIn {
        expected_cursor: Some(Cursor(1)),
        ..batch(vec![model_op("o3")])
    };
    match fx.backend.append(fx.writer.clone(), stale).await {
        Err(LedgerError::CursorConflict(current)) => assert_eq!(current, Cursor(2)),
        other => panic!("expected a cursor conflict, got {other:?}"),
    }
    assert_eq!(fx.cursor().await, Cursor(2));
    assert_eq!(fx.count("SELECT count(*) FROM ops"), 2);
    assert_eq!(fx.count("SELECT count(*) FROM models"), 2);

    let current = BatchIn {
        expected_cursor: Some(Cursor(2)),
        ..batch(vec![model_op("o3")])
    };
    let ack = fx.backend.append(fx.writer.clone(), current).await.unwrap();
    assert_eq!(outcomes(&ack), applied(&[3]));
}

#[tokio::test]
async fn invalid_payloads_are_rejected_and_leave_no_trace() {
    let fx = Fixture::new().await;
    fx.append(vec![
        op("m", OpKind::MessageUpsert, message("msg_1")),
        op("p", OpKind::PartUpsert, part("prt_1", "msg_1")),
        op(
            "p2",
            OpKind::PartUpsert,
            json!({"id": "prt_n", "messageID": "msg_1", "type": "tool", "state": {"x": 1}}),
        ),
    ])
    .await;
    let long_id = "x".repeat(capsync_shared::limits::MAX_RECORD_ID_BYTES + 1);
    let cases: Vec<(OpKind, String, &str)> = vec![
        (OpKind::ModelUpsert, "{nope".into(), "not valid JSON"),
        (OpKind::ModelUpsert, "[1, 2]".into(), "not a JSON object"),
        (OpKind::ModelUpsert, json!({"id": ""}).to_string(), "empty"),
        (
            OpKind::ModelUpsert,
            json!({"id": long_id}).to_string(),
            "longer than",
        ),
        (
            OpKind::SessionUpsert,
            json!({"id": "ses_2"}).to_string(),
            "not this share's session",
        ),
        (
            OpKind::MessageUpsert,
            json!({"id": "msg_2"}).to_string(),
            "role",
        ),
        (
            OpKind::MessageUpsert,
            json!({"id": "msg_2", "role": "user", "sessionID": "ses_9"}).to_string(),
            "sessionID ses_9",
        ),
        (
            OpKind::MessageRemove,
            json!({"role": "user"}).to_string(),
            "messageID",
        ),
        (
            OpKind::PartUpsert,
            json!({"id": "prt_2", "messageID": "msg_1"}).to_string(),
            "type",
        ),
        (OpKind::PartRemove, json!({}).to_string(), "partID"),
        (
            OpKind::PartDelta,
            json!({"partID": "prt_404", "delta": "x"}).to_string(),
            "part prt_404 does not exist",
        ),
        (
            OpKind::PartDelta,
            json!({"partID": "prt_1"}).to_string(),
            "delta",
        ),
        (
            OpKind::PartDelta,
            json!({"partID": "prt_n", "delta": "x", "field": "state"}).to_string(),
            "field \"state\" is not a string",
        ),
        (
            OpKind::PartDelta,
            json!({"partID": "prt_1", "delta": "x", "field": "messageID"}).to_string(),
            "cannot change",
        ),
        (
            OpKind::DiffSet,
            json!({"diffs": [1]}).to_string(),
            "not a JSON object",
        ),
        (
            OpKind::DiffSet,
            json!({"files": []}).to_string(),
            "diff.set needs",
        ),
    ];
    for (i, (kind, payload, expected)) in cases.iter().enumerate() {
        let id = format!("bad{i}");
        let ack = fx
            .append(vec![
                raw_op(&id, *kind, payload),
                model_op(&format!("ok{i}")),
            ])
            .await;
        let detail = rejection(&ack.results[0].outcome, RejectReason::Invalid);
        assert!(
            detail.contains(expected),
            "{kind} {payload}: {detail:?} lacks {expected:?}"
        );
        assert!(!detail.to_lowercase().contains("sql"), "{detail}");
        // The valid op after it still applies, right after the previous one.
        assert_eq!(
            ack.results[1].outcome,
            OpOutcome::Applied(Cursor(4 + i as u64))
        );
    }
    assert_eq!(
        fx.count("SELECT count(*) FROM ops WHERE op_id LIKE 'bad%'"),
        0
    );
    // Nothing the rejected ops would have touched changed.
    let stored: String = fx
        .raw()
        .query_row("SELECT json FROM parts WHERE id = 'prt_1'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(stored, part("prt_1", "msg_1").to_string());
    assert_eq!(fx.count("SELECT count(*) FROM sessions"), 0);
    assert_eq!(fx.count("SELECT count(*) FROM diffs"), 0);
}

#[tokio::test]
async fn completed_or_errored_messages_do_not_move_back() {
    let fx = Fixture::new().await;
    let ack = fx
        .append(vec![
            op("m1", OpKind::MessageUpsert, message("msg_1")),
            op("m2", OpKind::MessageUpsert, completed_message("msg_1")),
            op("m3", OpKind::MessageUpsert, message("msg_1")),
            // Terminal to terminal is fine.
            op(
                "m4",
                OpKind::MessageUpsert,
                json!({"id": "msg_1", "role": "assistant", "time": {"completed": 3}, "error": {"name": "Aborted"}}),
            ),
            op(
                "e1",
                OpKind::MessageUpsert,
                json!({"id": "msg_2", "role": "assistant", "error": {"name": "X"}}),
            ),
            op("e2", OpKind::MessageUpsert, message("msg_2")),
        ])
        .await;
    let results = outcomes(&ack);
    assert_eq!(results[..2], applied(&[1, 2]));
    rejection(&results[2], RejectReason::StaleTransition);
    assert_eq!(results[3], OpOutcome::Applied(Cursor(3)));
    assert_eq!(results[4], OpOutcome::Applied(Cursor(4)));
    let detail = rejection(&results[5], RejectReason::StaleTransition);
    assert!(detail.contains("msg_2"), "{detail}");
    let stored: String = fx
        .raw()
        .query_row("SELECT json FROM messages WHERE id = 'msg_1'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert!(stored.contains("Aborted"));
    // A message removed and sent again starts over.
    let ack = fx
        .append(vec![
            op("r", OpKind::MessageRemove, json!({"messageID": "msg_1"})),
            op("m5", OpKind::MessageUpsert, message("msg_1")),
        ])
        .await;
    assert_eq!(outcomes(&ack), applied(&[5, 6]));
}

#[tokio::test]
async fn parts_follow_their_message_and_are_removed_with_it() {
    let fx = Fixture::new().await;
    let ack = fx
        .append(vec![
            op("m1", OpKind::MessageUpsert, message("msg_1")),
            op("m2", OpKind::MessageUpsert, message("msg_2")),
            op("p1", OpKind::PartUpsert, part("prt_1", "msg_1")),
            op("p2", OpKind::PartUpsert, part("prt_2", "msg_1")),
            // prt_1 moves to msg_2.
            op("p3", OpKind::PartUpsert, part("prt_1", "msg_2")),
        ])
        .await;
    assert_eq!(outcomes(&ack), applied(&[1, 2, 3, 4, 5]));
    let parts = |fx: &Fixture| -> Vec<(String, String)> {
        fx.raw()
            .prepare("SELECT id, message_id FROM parts ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    assert_eq!(
        parts(&fx),
        [
            ("prt_1".into(), "msg_2".into()),
            ("prt_2".into(), "msg_1".into())
        ]
    );

    let ack = fx
        .append(vec![
            op("r1", OpKind::MessageRemove, json!({"id": "msg_2"})),
            op("r2", OpKind::PartRemove, json!({"partID": "prt_2"})),
            // Removing what is not there applies, and changes nothing.
            op("r3", OpKind::PartRemove, json!({"id": "prt_404"})),
            op("r4", OpKind::MessageRemove, json!({"messageID": "msg_404"})),
        ])
        .await;
    assert_eq!(outcomes(&ack), applied(&[6, 7, 8, 9]));
    assert!(parts(&fx).is_empty());
    assert_eq!(fx.count("SELECT count(*) FROM messages"), 1);
}

#[tokio::test]
async fn part_deltas_append_durably() {
    let fx = Fixture::new().await;
    let ack = fx
        .append(vec![
            op("m", OpKind::MessageUpsert, message("msg_1")),
            op("p", OpKind::PartUpsert, part("prt_1", "msg_1")),
            op(
                "d1",
                OpKind::PartDelta,
                json!({"partID": "prt_1", "delta": "lo"}),
            ),
            op(
                "d2",
                OpKind::PartDelta,
                json!({"id": "prt_1", "delta": ", wörld", "field": "text"}),
            ),
            op(
                "d3",
                OpKind::PartDelta,
                json!({"partID": "prt_1", "delta": "hmm", "field": "reasoning"}),
            ),
        ])
        .await;
    assert_eq!(outcomes(&ack), applied(&[1, 2, 3, 4, 5]));
    let fx = fx.reopen().await;
    let (records, _) = fx.snapshot(1 << 20).await;
    let part = records.iter().find(|r| r.kind == RecordKind::Part).unwrap();
    let value: Value = serde_json::from_str(&part.json).unwrap();
    assert_eq!(value["text"], "Hello, wörld");
    assert_eq!(value["reasoning"], "hmm");
    assert_eq!(value["type"], "text");
    assert_eq!(value["messageID"], "msg_1");
    // A retried delta is a duplicate: the text does not grow twice.
    let ack = fx
        .append(vec![op(
            "d1",
            OpKind::PartDelta,
            json!({"partID": "prt_1", "delta": "lo"}),
        )])
        .await;
    assert_eq!(outcomes(&ack), [OpOutcome::Duplicate(Cursor(3))]);
}

#[tokio::test]
async fn an_append_whose_caller_stops_waiting_is_still_announced() {
    let fx = Fixture::new().await;
    let mut changes = fx.backend.changes();
    // The command is queued when the call is made; the caller then gives up at once,
    // as a cancelled RPC call or a dropped connection does.
    drop(fx.backend.append(
        fx.writer.clone(),
        batch(vec![op("d1", OpKind::DiffSet, json!([]))]),
    ));
    let changed = tokio::time::timeout(std::time::Duration::from_secs(60), changes.recv())
        .await
        .expect("announced after the commit")
        .expect("a change");
    assert!(
        matches!(changed, Changed::Share(ref id) if *id == fx.share),
        "{changed:?}"
    );
    assert_eq!(fx.cursor().await, Cursor(1), "and committed");
}

#[tokio::test]
async fn a_delta_to_a_finished_part_is_stale_and_adds_nothing() {
    let fx = Fixture::new().await;
    let finished = json!({"id": "prt_1", "messageID": "msg_1", "type": "text",
                          "text": "Hello", "time": {"start": 1, "end": 2}});
    let ack = fx
        .append(vec![
            op("m", OpKind::MessageUpsert, message("msg_1")),
            op("p", OpKind::PartUpsert, finished),
            op(
                "late",
                OpKind::PartDelta,
                json!({"partID": "prt_1", "delta": "lo"}),
            ),
        ])
        .await;
    assert_eq!(outcomes(&ack)[..2], applied(&[1, 2]));
    let detail = rejection(&ack.results[2].outcome, RejectReason::StaleTransition);
    assert!(detail.contains("finished"), "{detail}");
    let (records, _) = fx.snapshot(1 << 20).await;
    let part = records.iter().find(|r| r.kind == RecordKind::Part).unwrap();
    let value: Value = serde_json::from_str(&part.json).unwrap();
    assert_eq!(value["text"], "Hello");
}

#[tokio::test]
async fn diff_set_replaces_the_whole_list() {
    let fx = Fixture::new().await;
    fx.append(vec![op(
        "d1",
        OpKind::DiffSet,
        json!({"diffs": [{"file": "a.rs"}, {"file": "b.rs"}]}),
    )])
    .await;
    fx.append(vec![op("d2", OpKind::DiffSet, json!([{"file": "c.rs"}]))])
        .await;
    let (records, _) = fx.snapshot(1 << 20).await;
    let diffs: Vec<&Record> = records
        .iter()
        .filter(|r| r.kind == RecordKind::Diffs)
        .collect();
    assert_eq!(diffs.len(), 1);
    assert_eq!(diffs[0].json, r#"[{"file":"c.rs"}]"#);
    fx.append(vec![op("d3", OpKind::DiffSet, json!({"diffs": []}))])
        .await;
    let stored: String = fx
        .raw()
        .query_row("SELECT json FROM diffs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(stored, "[]");
}

#[tokio::test]
async fn upserts_replace_their_record_and_keep_the_agents_text() {
    let fx = Fixture::new().await;
    let first = r#"{"id": "ses_1",  "title": "first"}"#;
    let second = r#"{"id":"ses_1","title":"second"}"#;
    fx.append(vec![
        raw_op("s1", OpKind::SessionUpsert, first),
        raw_op("md1", OpKind::ModelUpsert, r#"{"id":"gpt","v":1}"#),
        raw_op("md2", OpKind::ModelUpsert, r#"{"id":"gpt","v":2}"#),
    ])
    .await;
    let (records, _) = fx.snapshot(1 << 20).await;
    assert_eq!(records[0].json, first);
    assert_eq!(records[1].json, r#"{"id":"gpt","v":2}"#);
    fx.append(vec![raw_op("s2", OpKind::SessionUpsert, second)])
        .await;
    let (records, _) = fx.snapshot(1 << 20).await;
    assert_eq!(records[0].kind, RecordKind::Session);
    assert_eq!(records[0].json, second);
    assert_eq!(records.len(), 2);
}

// ---------------------------------------------------------------------------
// Authority

#[tokio::test]
async fn revoking_writers_fences_the_old_epoch_only() {
    let fx = Fixture::new().await;
    fx.append(vec![model_op("o1")]).await;
    let state = fx
        .backend
        .revoke_share(fx.agent.clone(), fx.share.clone(), RevokeScope::Writers)
        .await
        .unwrap();
    assert_eq!(
        (state.writer_epoch, state.viewer_epoch),
        (Epoch(1), Epoch(0))
    );
    assert_eq!(state.cursor, Cursor(1));

    let old = fx
        .backend
        .append(fx.writer.clone(), batch(vec![model_op("o2")]));
    assert!(matches!(old.await, Err(LedgerError::Revoked)));
    let mint = fx
        .backend
        .mint_token(fx.writer.clone(), TokenKind::Viewer, token("v2"));
    assert!(matches!(mint.await, Err(LedgerError::Revoked)));

    let current = authority("w-sh_1", TokenKind::Writer, Some((SHARE, 1)));
    let ack = fx
        .backend
        .append(current, batch(vec![model_op("o2")]))
        .await
        .unwrap();
    assert_eq!(outcomes(&ack), applied(&[2]));
    // Viewers were not touched.
    assert_eq!(fx.cursor().await, Cursor(2));
}

#[tokio::test]
async fn revoking_viewers_leaves_writers_working() {
    let fx = Fixture::new().await;
    // A viewer derived from the writer capability carries the writer's token id.
    let derived = authority("w-sh_1", TokenKind::Viewer, Some((SHARE, 0)));
    fx.backend.share_state(derived.clone()).await.unwrap();
    let state = fx
        .backend
        .revoke_share(fx.admin.clone(), fx.share.clone(), RevokeScope::Viewers)
        .await
        .unwrap();
    assert_eq!(
        (state.writer_epoch, state.viewer_epoch),
        (Epoch(0), Epoch(1))
    );

    for viewer in [fx.viewer.clone(), derived] {
        let state = fx.backend.share_state(viewer.clone()).await;
        assert!(matches!(state, Err(LedgerError::Revoked)), "{state:?}");
        let ops = fx.backend.ops_since(viewer.clone(), Cursor(0), 10).await;
        assert!(matches!(ops, Err(LedgerError::Revoked)));
        let page = fx.backend.snapshot_page(viewer, String::new(), 100).await;
        assert!(matches!(page, Err(LedgerError::Revoked)));
    }
    let ack = fx.append(vec![model_op("o1")]).await;
    assert_eq!(outcomes(&ack), applied(&[1]));
    let renewed = authority("v-sh_1", TokenKind::Viewer, Some((SHARE, 1)));
    assert_eq!(
        fx.backend.share_state(renewed).await.unwrap().cursor,
        Cursor(1)
    );

    let state = fx
        .backend
        .revoke_share(fx.agent.clone(), fx.share.clone(), RevokeScope::All)
        .await
        .unwrap();
    assert_eq!(
        (state.writer_epoch, state.viewer_epoch),
        (Epoch(1), Epoch(2))
    );
}

#[tokio::test]
async fn each_call_accepts_only_its_kinds_of_authority() {
    let fx = Fixture::new().await;
    let denied =
        |r: &dyn std::fmt::Debug, ok: bool| assert!(ok, "expected PermissionDenied: {r:?}");
    let b = || batch(vec![model_op("o")]);

    let r = fx.backend.append(fx.viewer.clone(), b()).await;
    denied(&r, matches!(r, Err(LedgerError::PermissionDenied)));
    let r = fx.backend.append(fx.agent.clone(), b()).await;
    denied(&r, matches!(r, Err(LedgerError::PermissionDenied)));
    // Claiming more than the token grants.
    let forged = authority("v-sh_1", TokenKind::Writer, Some((SHARE, 0)));
    let r = fx.backend.append(forged, b()).await;
    denied(&r, matches!(r, Err(LedgerError::PermissionDenied)));
    let forged = authority("agt", TokenKind::Admin, None);
    let r = fx
        .backend
        .mint_token(forged, TokenKind::Agent, token("x1"))
        .await;
    denied(&r, matches!(r, Err(LedgerError::PermissionDenied)));
    // A token of one share does not open another.
    let (_, _) = fx.new_share(&fx.agent, "sh_2").await;
    let cross = authority("w-sh_1", TokenKind::Writer, Some(("sh_2", 0)));
    let r = fx.backend.append(cross, b()).await;
    denied(&r, matches!(r, Err(LedgerError::PermissionDenied)));

    // Minting only goes down the chain.
    for (issuer, kind) in [
        (fx.admin.clone(), TokenKind::Admin),
        (fx.admin.clone(), TokenKind::Writer),
        (fx.agent.clone(), TokenKind::Agent),
        (fx.agent.clone(), TokenKind::Writer),
        (fx.writer.clone(), TokenKind::Agent),
        (fx.viewer.clone(), TokenKind::Viewer),
        (fx.viewer.clone(), TokenKind::Writer),
    ] {
        let r = fx.backend.mint_token(issuer, kind, token("x2")).await;
        denied(&r, matches!(r, Err(LedgerError::PermissionDenied)));
    }
    let r = fx
        .backend
        .create_share(
            fx.admin.clone(),
            new_share("sh_3"),
            token("w3"),
            token("v3"),
        )
        .await;
    denied(&r, matches!(r, Err(LedgerError::PermissionDenied)));
    let r = fx
        .backend
        .list_shares(fx.writer.clone(), String::new(), 10, false)
        .await;
    denied(&r, matches!(r, Err(LedgerError::PermissionDenied)));
    let r = fx
        .backend
        .revoke_share(fx.writer.clone(), fx.share.clone(), RevokeScope::All)
        .await;
    denied(&r, matches!(r, Err(LedgerError::PermissionDenied)));
    let r = fx
        .backend
        .revoke_token(fx.agent.clone(), TokenId::from("w-sh_1"))
        .await;
    denied(&r, matches!(r, Err(LedgerError::PermissionDenied)));
    let r = delete_share(&fx.backend, &fx.agent, &fx.share).await;
    denied(&r, matches!(r, Err(LedgerError::PermissionDenied)));
    let r = fx.backend.share_state(fx.admin.clone()).await;
    denied(&r, matches!(r, Err(LedgerError::PermissionDenied)));

    // None of it left a row behind.
    assert_eq!(
        fx.count("SELECT count(*) FROM tokens WHERE id LIKE 'x%'"),
        0
    );
    assert_eq!(fx.count("SELECT count(*) FROM ops"), 0);
    // Writers read too.
    fx.backend.share_state(fx.writer.clone()).await.unwrap();
    fx.backend
        .ops_since(fx.writer.clone(), Cursor(0), 10)
        .await
        .unwrap();
}

#[tokio::test]
async fn revoked_expired_and_unknown_tokens_grant_nothing() {
    let fx = Fixture::new().await;
    // A saved writer that has already expired.
    let expired = NewToken {
        expires_at: Some(1),
        ..token("w-old")
    };
    fx.backend
        .mint_token(fx.writer.clone(), TokenKind::Writer, expired)
        .await
        .unwrap();
    let old = authority("w-old", TokenKind::Writer, Some((SHARE, 0)));
    let r = fx.backend.append(old, batch(vec![model_op("o")])).await;
    assert!(matches!(r, Err(LedgerError::PermissionDenied)), "{r:?}");

    let unknown = authority("nobody", TokenKind::Writer, Some((SHARE, 0)));
    let r = fx.backend.share_state(unknown).await;
    assert!(matches!(r, Err(LedgerError::Revoked)), "{r:?}");
    let gone = authority("w-sh_9", TokenKind::Writer, Some(("sh_9", 0)));
    let r = fx.backend.share_state(gone).await;
    assert!(matches!(r, Err(LedgerError::NotFound)), "{r:?}");

    fx.backend
        .revoke_token(fx.admin.clone(), TokenId::from("w-sh_1"))
        .await
        .unwrap();
    // Idempotent, and the first revocation time is kept.
    fx.backend
        .revoke_token(fx.admin.clone(), TokenId::from("w-sh_1"))
        .await
        .unwrap();
    let r = fx
        .backend
        .append(fx.writer.clone(), batch(vec![model_op("o")]))
        .await;
    assert!(matches!(r, Err(LedgerError::Revoked)), "{r:?}");
    // The viewer token of the same share is its own row.
    fx.backend.share_state(fx.viewer.clone()).await.unwrap();
    let found = fx
        .backend
        .find_token(TokenId::from("w-sh_1"))
        .await
        .unwrap()
        .unwrap();
    assert!(found.revoked);

    let r = fx
        .backend
        .revoke_token(fx.admin.clone(), TokenId::from("nobody"))
        .await;
    assert!(matches!(r, Err(LedgerError::NotFound)), "{r:?}");
    // Revoking the agent stops it creating shares.
    fx.backend
        .revoke_token(fx.admin.clone(), TokenId::from("agt"))
        .await
        .unwrap();
    let r = fx
        .backend
        .create_share(
            fx.agent.clone(),
            new_share("sh_5"),
            token("w5"),
            token("v5"),
        )
        .await;
    assert!(matches!(r, Err(LedgerError::Revoked)), "{r:?}");
}

#[tokio::test]
async fn minted_tokens_follow_the_chain_and_the_current_epochs() {
    let fx = Fixture::new().await;
    fx.backend
        .revoke_share(fx.agent.clone(), fx.share.clone(), RevokeScope::Viewers)
        .await
        .unwrap();
    let saved = fx
        .backend
        .mint_token(fx.writer.clone(), TokenKind::Writer, token("w-saved"))
        .await
        .unwrap();
    assert_eq!(saved.kind, TokenKind::Writer);
    assert_eq!(saved.share_id, Some(fx.share.clone()));
    assert_eq!(saved.epoch, Epoch(0));
    let viewer = fx
        .backend
        .mint_token(
            fx.writer.clone(),
            TokenKind::Viewer,
            NewToken {
                expires_at: Some(i64::MAX),
                ..token("v-new")
            },
        )
        .await
        .unwrap();
    assert_eq!(viewer.epoch, Epoch(1));

    let found = fx
        .backend
        .find_token(TokenId::from("v-new"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.kind, TokenKind::Viewer);
    assert_eq!(found.epoch, Epoch(1));
    assert_eq!(found.expires_at, Some(i64::MAX));
    assert_eq!(found.secret_hash, "$argon2id$fake$v-new");
    assert!(!found.revoked);
    let state = found.share.unwrap();
    assert_eq!(
        (state.share_id, state.viewer_epoch),
        (fx.share.clone(), Epoch(1))
    );
    assert_eq!(
        fx.count("SELECT count(*) FROM tokens WHERE id = 'v-new' AND issued_by = 'w-sh_1'"),
        1
    );

    let agent = fx
        .backend
        .find_token(TokenId::from("agt"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (agent.kind, agent.share_id, agent.share),
        (TokenKind::Agent, None, None)
    );
    assert!(
        fx.backend
            .find_token(TokenId::from("nobody"))
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn replacing_the_admin_token_revokes_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let backend = SqliteBackend::open(&options(dir.path().join("l.db"), 8)).unwrap();
    assert!(!backend.has_admin_token().await.unwrap());
    backend
        .replace_admin_token(NewToken {
            expires_at: Some(1),
            ..token("adm-expired")
        })
        .await
        .unwrap();
    assert!(!backend.has_admin_token().await.unwrap(), "expired");
    backend.replace_admin_token(token("adm1")).await.unwrap();
    assert!(backend.has_admin_token().await.unwrap());
    backend.replace_admin_token(token("adm2")).await.unwrap();
    let old = authority("adm1", TokenKind::Admin, None);
    let r = backend.list_shares(old, String::new(), 10, false).await;
    assert!(matches!(r, Err(LedgerError::Revoked)), "{r:?}");
    let new = authority("adm2", TokenKind::Admin, None);
    assert!(
        backend
            .list_shares(new, String::new(), 10, false)
            .await
            .unwrap()
            .is_empty()
    );
    backend.close().await;
}

#[tokio::test]
async fn create_share_refuses_unusable_session_ids() {
    let fx = Fixture::new().await;
    for session_id in [String::new(), "s".repeat(257)] {
        let r = fx
            .backend
            .create_share(
                fx.agent.clone(),
                NewShare {
                    session_id,
                    ..new_share("sh_bad")
                },
                token("wb"),
                token("vb"),
            )
            .await;
        assert!(matches!(r, Err(LedgerError::InvalidArgument(_))), "{r:?}");
    }
    assert_eq!(
        fx.count("SELECT count(*) FROM shares WHERE id = 'sh_bad'"),
        0
    );
}

#[tokio::test]
async fn agents_list_and_revoke_only_their_own_shares() {
    let fx = Fixture::new().await;
    fx.backend
        .mint_token(fx.admin.clone(), TokenKind::Agent, token("agt2"))
        .await
        .unwrap();
    let other_agent = authority("agt2", TokenKind::Agent, None);
    fx.new_share(&fx.agent, "sh_3").await;
    fx.new_share(&other_agent, "sh_2").await;
    fx.new_share(&other_agent, "sh_4").await;

    let ids = |shares: Vec<crate::ledger::ShareInfo>| -> Vec<String> {
        shares.into_iter().map(|s| s.state.share_id.0).collect()
    };
    let all = fx
        .backend
        .list_shares(fx.admin.clone(), String::new(), 100, false)
        .await
        .unwrap();
    assert_eq!(ids(all), ["sh_1", "sh_2", "sh_3", "sh_4"]);
    let page = fx
        .backend
        .list_shares(fx.admin.clone(), "sh_1".into(), 2, false)
        .await
        .unwrap();
    assert_eq!(ids(page), ["sh_2", "sh_3"]);
    let mine = fx
        .backend
        .list_shares(fx.agent.clone(), String::new(), 100, false)
        .await
        .unwrap();
    assert_eq!(mine[0].session_id, SESSION);
    assert_eq!(mine[0].title, "a session");
    assert_eq!(mine[0].owner_token_id, fx.agent.token_id);
    assert_eq!(ids(mine), ["sh_1", "sh_3"]);
    let theirs = fx
        .backend
        .list_shares(other_agent.clone(), "sh_2".into(), 100, false)
        .await
        .unwrap();
    assert_eq!(ids(theirs), ["sh_4"]);

    // Someone else's share looks exactly like a missing one.
    for share in ["sh_2", "sh_404"] {
        let r = fx
            .backend
            .revoke_share(fx.agent.clone(), ShareId::from(share), RevokeScope::All)
            .await;
        assert!(matches!(r, Err(LedgerError::NotFound)), "{share}: {r:?}");
    }
    let r = fx
        .backend
        .revoke_share(fx.admin.clone(), ShareId::from("sh_404"), RevokeScope::All)
        .await;
    assert!(matches!(r, Err(LedgerError::NotFound)), "{r:?}");
    let state = fx
        .backend
        .revoke_share(
            fx.admin.clone(),
            ShareId::from("sh_2"),
            RevokeScope::Writers,
        )
        .await
        .unwrap();
    assert_eq!(state.writer_epoch, Epoch(1));
}

#[tokio::test]
async fn deleting_a_share_cascades_to_everything_it_owns() {
    let fx = Fixture::new().await;
    let (other_writer, other_viewer) = fx.new_share(&fx.agent, "sh_2").await;
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

    let r = fx
        .backend
        .append(fx.writer.clone(), batch(vec![model_op("x")]))
        .await;
    assert!(matches!(r, Err(LedgerError::NotFound)), "{r:?}");
    assert!(
        fx.backend
            .find_token(TokenId::from("w-sh_1"))
            .await
            .unwrap()
            .is_none()
    );
    let r = delete_share(&fx.backend, &fx.admin, &fx.share).await;
    assert!(matches!(r, Err(LedgerError::NotFound)), "{r:?}");
    fx.backend.share_state(other_viewer).await.unwrap();
}

// ---------------------------------------------------------------------------
// Reads

#[tokio::test]
async fn snapshot_pages_return_every_record_once_in_order() {
    let fx = Fixture::new().await;
    // Sent out of order on purpose.
    let mut ops = vec![
        op("s", OpKind::SessionUpsert, session()),
        model_op("mdl_c"),
        model_op("mdl_a"),
        op(
            "d",
            OpKind::DiffSet,
            json!([{"file": "x.rs", "patch": "+1"}]),
        ),
        model_op("mdl_b"),
    ];
    for message_id in ["msg_3", "msg_1", "msg_4", "msg_2"] {
        ops.push(op(
            &format!("op-{message_id}"),
            OpKind::MessageUpsert,
            message(message_id),
        ));
    }
    for (part_id, message_id) in [
        ("prt_c", "msg_1"),
        ("prt_a", "msg_1"),
        ("prt_b", "msg_1"),
        ("prt_e", "msg_3"),
        ("prt_d", "msg_3"),
        ("prt_f", "msg_4"),
    ] {
        ops.push(op(
            &format!("op-{part_id}"),
            OpKind::PartUpsert,
            part(part_id, message_id),
        ));
    }
    let count = ops.len();
    fx.append(ops).await;

    let expected: Vec<(RecordKind, &str, &str)> = vec![
        (RecordKind::Session, "", ""),
        (RecordKind::Model, "mdl_a", ""),
        (RecordKind::Model, "mdl_b", ""),
        (RecordKind::Model, "mdl_c", ""),
        (RecordKind::Diffs, "", ""),
        (RecordKind::Message, "msg_1", ""),
        (RecordKind::Part, "prt_a", "msg_1"),
        (RecordKind::Part, "prt_b", "msg_1"),
        (RecordKind::Part, "prt_c", "msg_1"),
        (RecordKind::Message, "msg_2", ""),
        (RecordKind::Message, "msg_3", ""),
        (RecordKind::Part, "prt_d", "msg_3"),
        (RecordKind::Part, "prt_e", "msg_3"),
        (RecordKind::Message, "msg_4", ""),
        (RecordKind::Part, "prt_f", "msg_4"),
    ];
    assert_eq!(expected.len(), count);
    let (whole, pages) = fx.snapshot(1 << 20).await;
    assert_eq!(pages, 1);
    let keys: Vec<(RecordKind, &str, &str)> = whole
        .iter()
        .map(|r| (r.kind, r.id.as_str(), r.message_id.as_str()))
        .collect();
    assert_eq!(keys, expected);

    // Smaller pages cut the same sequence, each record exactly once.
    let largest = whole.iter().map(|r| r.json.len()).max().unwrap();
    for max_bytes in [0, 1, 60, 150, largest as u32, 400, 1000] {
        let (records, pages) = fx.snapshot(max_bytes).await;
        assert_eq!(records, whole, "max_bytes {max_bytes}");
        if max_bytes <= 1 {
            assert_eq!(pages, count, "one record per page");
        }
    }
    let (_, pages) = fx.snapshot(150).await;
    assert!(pages > 3, "150-byte pages: {pages}");

    let r = fx
        .backend
        .snapshot_page(fx.viewer.clone(), "garbage".into(), 100)
        .await;
    assert!(matches!(r, Err(LedgerError::InvalidArgument(_))), "{r:?}");
}

#[tokio::test]
async fn a_snapshot_resumes_where_it_stopped_even_if_records_changed() {
    let fx = Fixture::new().await;
    fx.append(vec![
        op("m1", OpKind::MessageUpsert, message("msg_1")),
        op("p1", OpKind::PartUpsert, part("prt_1", "msg_1")),
        op("p2", OpKind::PartUpsert, part("prt_2", "msg_1")),
        op("m2", OpKind::MessageUpsert, message("msg_2")),
    ])
    .await;
    // One record per page: msg_1, then prt_1.
    let first = fx
        .backend
        .snapshot_page(fx.viewer.clone(), String::new(), 1)
        .await
        .unwrap();
    assert_eq!(first.records[0].id, "msg_1");
    let second = fx
        .backend
        .snapshot_page(fx.viewer.clone(), first.next_page, 1)
        .await
        .unwrap();
    assert_eq!(second.records[0].id, "prt_1");
    // The message we are in the middle of disappears.
    fx.append(vec![op("r", OpKind::MessageRemove, json!({"id": "msg_1"}))])
        .await;
    let third = fx
        .backend
        .snapshot_page(fx.viewer.clone(), second.next_page, 1000)
        .await
        .unwrap();
    assert_eq!(third.cursor, Cursor(5), "a changed cursor tells the reader");
    let ids: Vec<&str> = third.records.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["msg_2"]);
    assert!(third.next_page.is_empty());
}

#[tokio::test]
async fn an_empty_share_has_an_empty_snapshot() {
    let fx = Fixture::new().await;
    let page = fx
        .backend
        .snapshot_page(fx.viewer.clone(), String::new(), 100)
        .await
        .unwrap();
    assert!(page.records.is_empty());
    assert!(page.next_page.is_empty());
    assert_eq!(page.cursor, Cursor(0));
}

#[tokio::test]
async fn ops_since_pages_through_the_ledger_in_cursor_order() {
    let fx = Fixture::new().await;
    let ops: Vec<OpIn> = (0..25).map(|i| model_op(&format!("o{i:02}"))).collect();
    fx.append(ops).await;
    let mut seen = Vec::new();
    let mut after = Cursor(0);
    loop {
        let page = fx
            .backend
            .ops_since(fx.viewer.clone(), after, 10)
            .await
            .unwrap();
        assert_eq!(page.cursor, Cursor(25));
        assert!(page.ops.len() <= 10);
        let Some(last) = page.ops.last() else { break };
        after = last.cursor;
        seen.extend(page.ops.into_iter().map(|o| (o.cursor.0, o.op_id.0)));
    }
    let expected: Vec<(u64, String)> = (0..25).map(|i| (i + 1, format!("o{i:02}"))).collect();
    assert_eq!(seen, expected);
}

// ---------------------------------------------------------------------------
// The writer: group commit, isolation, shutdown

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_queued_during_a_commit_share_the_next_transaction() {
    let fx = Fixture::new().await;
    let stats = Arc::clone(fx.backend.writer.stats());
    let (tasks, per_task) = (5, 10);
    let (release, held) = hold_writer(&fx.backend).await;
    let transactions_before = stats.transactions();

    // Every task queues its appends, then waits at the barrier: once the test
    // passes it, all 50 are in the queue and none has run.
    let barrier = Arc::new(tokio::sync::Barrier::new(tasks + 1));
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let backend = Arc::clone(&fx.backend);
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

#[tokio::test]
async fn a_group_never_exceeds_max_group_commit() {
    let fx = Fixture::with_group(8).await;
    let stats = Arc::clone(fx.backend.writer.stats());
    let (release, held) = hold_writer(&fx.backend).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_apply_each_op_exactly_once() {
    let fx = Fixture::new().await;
    let stats = Arc::clone(fx.backend.writer.stats());
    let commands_before = stats.commands();
    let handles: Vec<_> = (0..5)
        .map(|t| {
            let backend = Arc::clone(&fx.backend);
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
    let stats = Arc::clone(fx.backend.writer.stats());
    let (release, held) = hold_writer(&fx.backend).await;
    let before = stats.transactions();
    let a = fx
        .backend
        .append(fx.writer.clone(), batch(vec![model_op("a")]));
    // Writes, then fails: its write must not survive.
    let doomed = fx.backend.writer.submit(|conn| {
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
    assert!(at > 0);
}

#[tokio::test]
async fn close_finishes_queued_work_then_refuses_everything() {
    let fx = Fixture::new().await;
    let (release, held) = hold_writer(&fx.backend).await;
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
        dir: _dir,
        backend,
        writer,
        viewer,
        ..
    } = fx;
    let mut stopped = backend.writer.stopped();
    let pending = backend.append(writer, batch(vec![model_op("o1")]));
    let backend = Arc::into_inner(backend).expect("the only handle");
    drop(Ledger::new(backend, crate::clock::Clock::system()));
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
        .backend
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

// ---------------------------------------------------------------------------
// Archive and stats (issue 5)

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
async fn an_archived_share_is_hidden_read_only_and_still_viewable() {
    let fx = Fixture::new().await;
    fx.append(vec![op("o1", OpKind::SessionUpsert, session())])
        .await;
    let (_, _) = fx.new_share(&fx.agent, "sh_2").await;

    let info = fx
        .backend
        .set_archived(fx.admin.clone(), fx.share.clone(), true)
        .await
        .unwrap();
    let archived_at = info.archived_at.expect("archived");
    // Archiving again keeps the first date: a retry does not move it.
    let again = fx
        .backend
        .set_archived(fx.admin.clone(), fx.share.clone(), true)
        .await
        .unwrap();
    assert_eq!(again.archived_at, Some(archived_at));

    let ids = |list: Vec<crate::ledger::ShareInfo>| -> Vec<String> {
        list.into_iter().map(|s| s.state.share_id.0).collect()
    };
    for who in [fx.admin.clone(), fx.agent.clone()] {
        let hidden = fx
            .backend
            .list_shares(who.clone(), String::new(), 10, false)
            .await
            .unwrap();
        assert_eq!(ids(hidden), ["sh_2"]);
        let all = fx
            .backend
            .list_shares(who, String::new(), 10, true)
            .await
            .unwrap();
        assert_eq!(ids(all), ["sh_1", "sh_2"]);
    }

    // Appends are refused, and nothing is written.
    let refused = fx
        .backend
        .append(
            fx.writer.clone(),
            batch(vec![op("o2", OpKind::ModelUpsert, json!({"id": "m"}))]),
        )
        .await;
    match refused {
        Err(LedgerError::InvalidArgument(why)) => {
            assert_eq!(why, "share is archived; unarchive it to append");
        }
        other => panic!("expected invalid argument, got {other:?}"),
    }
    assert_eq!(fx.count("SELECT count(*) FROM ops"), 1);

    // Viewers still read it.
    let state = fx.backend.share_state(fx.viewer.clone()).await.unwrap();
    assert_eq!(state.cursor, Cursor(1));
    let page = fx
        .backend
        .snapshot_page(fx.viewer.clone(), String::new(), 1 << 20)
        .await
        .unwrap();
    assert_eq!(page.records.len(), 1);
    let ops = fx
        .backend
        .ops_since(fx.viewer.clone(), Cursor(0), 10)
        .await
        .unwrap();
    assert_eq!(ops.ops.len(), 1);

    // Only an admin archives; unarchiving restores appends.
    assert!(matches!(
        fx.backend
            .set_archived(fx.agent.clone(), fx.share.clone(), false)
            .await,
        Err(LedgerError::PermissionDenied)
    ));
    assert!(matches!(
        fx.backend
            .set_archived(fx.admin.clone(), ShareId::from("sh_none"), true)
            .await,
        Err(LedgerError::NotFound)
    ));
    let info = fx
        .backend
        .set_archived(fx.admin.clone(), fx.share.clone(), false)
        .await
        .unwrap();
    assert_eq!(info.archived_at, None);
    let ack = fx.append(vec![model_op("m2")]).await;
    assert_eq!(outcomes(&ack), applied(&[2]));
}

#[tokio::test]
async fn stats_count_a_known_dataset() {
    let fx = Fixture::new().await;
    let ops = vec![
        op("o1", OpKind::SessionUpsert, session()),
        op("o2", OpKind::MessageUpsert, message("m1")),
        op("o3", OpKind::PartUpsert, part("p1", "m1")),
        op("o4", OpKind::PartUpsert, part("p2", "m1")),
        op("o5", OpKind::MessageUpsert, message("m2")),
    ];
    let payload_bytes: usize = ops.iter().map(|o| o.payload.len()).sum();
    assert_eq!(outcomes(&fx.append(ops).await), applied(&[1, 2, 3, 4, 5]));
    // A child share (sub-agent session), archived.
    let mut child = new_share("sh_child");
    child.parent_session_id = SESSION.into();
    fx.backend
        .create_share(fx.agent.clone(), child, token("w-c"), token("v-c"))
        .await
        .unwrap();
    fx.backend
        .set_archived(fx.admin.clone(), ShareId::from("sh_child"), true)
        .await
        .unwrap();

    let stats = fx.backend.stats(fx.admin.clone()).await.unwrap();
    assert_eq!(stats.root_shares, 1);
    assert_eq!(stats.child_shares, 1);
    assert_eq!(stats.archived_shares, 1);
    assert_eq!(stats.messages, 2);
    assert_eq!(stats.parts, 2);
    assert_eq!(stats.ledger_ops, 5);
    assert_eq!(stats.ledger_payload_bytes, payload_bytes as u64);
    let StorageStats::Sqlite(sqlite) = &stats.storage;
    assert!(sqlite.page_size >= 512);
    assert!(sqlite.page_count > 0);
    let on_disk = std::fs::metadata(fx.path()).unwrap().len();
    assert_eq!(sqlite.db_file_bytes, on_disk);
    assert!(
        sqlite.wal_file_bytes > 0,
        "writes since the last checkpoint are in the WAL"
    );

    // The counts follow deletions; only admins may ask.
    delete_share(&fx.backend, &fx.admin, &fx.share)
        .await
        .unwrap();
    assert!(matches!(
        fx.backend.stats(fx.agent.clone()).await,
        Err(LedgerError::PermissionDenied)
    ));
    let after = fx.backend.stats(fx.admin.clone()).await.unwrap();
    assert_eq!((after.messages, after.parts, after.ledger_ops), (0, 0, 0));
    assert_eq!(after.root_shares, 0);
}
