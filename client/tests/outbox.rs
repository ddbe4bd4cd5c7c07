//! The outbox on its own (no server): durability, dedupe, deterministic and persistent
//! batches, ack handling, dependencies, refusals and status. Acks are built by hand here;
//! `tests/syncer.rs` runs the same outbox against the real server.

use std::path::{Path, PathBuf};

use capsync_client::outbox::MAX_BATCH_BYTES;
use capsync_client::{
    Ack, Enqueued, OpKind, OpOutcome, OpResult, OpSpec, Outbox, OutboxBatch, OutboxError, Refusal,
    RejectReason, RejectedReason,
};
use capsync_shared::{Cursor, OpId};
use serde_json::json;

fn op(id: &str) -> OpSpec {
    OpSpec::new(id, OpKind::DiffSet, json!({"diffs": [{"file": id}]}))
}

fn dep_op(id: &str, deps: &[&str]) -> OpSpec {
    let mut op = op(id);
    op.depends_on = deps.iter().map(|d| d.to_string()).collect();
    op
}

fn ids(batch: &OutboxBatch) -> Vec<&str> {
    batch.ops.iter().map(|o| o.op_id.as_str()).collect()
}

/// An ack answering `batch` with `outcomes`, in order.
fn ack(batch: &OutboxBatch, cursor: u64, outcomes: Vec<OpOutcome>) -> Ack {
    assert_eq!(batch.ops.len(), outcomes.len());
    Ack {
        cursor: Cursor(cursor),
        results: batch
            .ops
            .iter()
            .zip(outcomes)
            .map(|(op, outcome)| OpResult {
                op_id: OpId(op.op_id.clone()),
                outcome,
            })
            .collect(),
    }
}

/// Every op applied, at cursors following `after`.
fn all_applied(batch: &OutboxBatch, after: u64) -> Ack {
    let outcomes = (1..=batch.ops.len() as u64)
        .map(|i| OpOutcome::Applied(Cursor(after + i)))
        .collect();
    ack(batch, after + batch.ops.len() as u64, outcomes)
}

fn rejected(reason: RejectReason, detail: &str) -> OpOutcome {
    OpOutcome::Rejected {
        reason,
        detail: detail.into(),
    }
}

struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn open(path: &Path) -> Outbox {
    Outbox::open(path).expect("open outbox")
}

#[test]
fn the_handle_can_be_shared_across_threads() {
    fn shareable<T: Clone + Send + Sync + 'static>() {}
    shareable::<Outbox>();
}

#[tokio::test]
async fn an_enqueued_op_is_committed_before_enqueue_returns() {
    let scratch = Scratch::new();
    // Parent directories are created.
    let path = scratch.path("agent/state/outbox.db");
    let outbox = open(&path);
    assert_eq!(outbox.enqueue(op("a")).await.unwrap(), Enqueued::Queued);

    // Another connection, as another process would: the row is committed, in a WAL file.
    let raw = rusqlite::Connection::open(&path).unwrap();
    let (op_id, state): (String, String) = raw
        .query_row("SELECT op_id, state FROM ops", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!((op_id.as_str(), state.as_str()), ("a", "pending"));
    let mode: String = raw
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let version: i64 = raw
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 1);
    drop(raw);

    // A "crash" (drop without anything else) and a reopen: still there.
    drop(outbox);
    let outbox = open(&path);
    assert_eq!(outbox.status().await.unwrap().pending, 1);
}

#[tokio::test]
async fn the_same_op_twice_is_already_queued_and_other_content_is_a_conflict() {
    let scratch = Scratch::new();
    let outbox = open(&scratch.path("o.db"));
    let original = OpSpec::new(
        "msg:1",
        OpKind::MessageUpsert,
        json!({"id": "m1", "role": "user", "time": {"created": 1}}),
    );
    assert_eq!(
        outbox.enqueue(original.clone()).await.unwrap(),
        Enqueued::Queued
    );
    assert_eq!(
        outbox.enqueue(original.clone()).await.unwrap(),
        Enqueued::AlreadyQueued
    );
    // Same document, keys written in another order: the same op.
    let reordered: serde_json::Value =
        serde_json::from_str(r#"{"time": {"created": 1}, "role": "user", "id": "m1"}"#).unwrap();
    let same = OpSpec::new("msg:1", OpKind::MessageUpsert, reordered);
    assert_eq!(outbox.enqueue(same).await.unwrap(), Enqueued::AlreadyQueued);

    let mut other_payload = original.clone();
    other_payload.payload = json!({"id": "m1", "role": "assistant"});
    let mut other_kind = original.clone();
    other_kind.kind = OpKind::ModelUpsert;
    let mut other_deps = original.clone();
    other_deps.depends_on = vec!["x".into()];
    for changed in [other_payload, other_kind, other_deps] {
        match outbox.enqueue(changed).await {
            Err(OutboxError::Conflict { op_id }) => assert_eq!(op_id, "msg:1"),
            other => panic!("expected a conflict, got {other:?}"),
        }
    }
    // Still acked ops count as queued: a replay after the ack changes nothing either.
    let batch = outbox.next_batch(10, 0).await.unwrap().unwrap();
    outbox
        .record_ack(&batch, &all_applied(&batch, 0))
        .await
        .unwrap();
    assert_eq!(
        outbox.enqueue(original).await.unwrap(),
        Enqueued::AlreadyQueued
    );
    let status = outbox.status().await.unwrap();
    assert_eq!((status.pending, status.acked), (0, 1));
}

#[tokio::test]
async fn ops_the_server_would_refuse_whole_are_refused_at_enqueue() {
    let scratch = Scratch::new();
    let outbox = open(&scratch.path("o.db"));
    let long = "x".repeat(129);
    let deps: Vec<String> = (0..65).map(|i| format!("d{i}")).collect();
    let too_many = {
        let mut op = op("many");
        op.depends_on = deps;
        op
    };
    let big = OpSpec::new(
        "big",
        OpKind::DiffSet,
        json!({"diffs": ["y".repeat(capsync_client::outbox::MAX_PAYLOAD_BYTES)]}),
    );
    for bad in [
        op(""),
        op(&long),
        dep_op("self", &["self"]),
        dep_op("empty-dep", &[""]),
        too_many,
        big,
    ] {
        let id = bad.op_id.clone();
        match outbox.enqueue(bad).await {
            Err(OutboxError::Invalid(message)) => assert!(!message.is_empty()),
            other => panic!("{id:.20}: expected Invalid, got {other:?}"),
        }
    }
    // 128 bytes is still fine.
    assert_eq!(
        outbox.enqueue(op(&"x".repeat(128))).await.unwrap(),
        Enqueued::Queued
    );
    assert_eq!(outbox.status().await.unwrap().pending, 1);
}

#[tokio::test]
async fn enqueue_all_is_one_all_or_nothing_transaction() {
    let scratch = Scratch::new();
    let outbox = open(&scratch.path("o.db"));
    assert_eq!(outbox.enqueue(op("a")).await.unwrap(), Enqueued::Queued);
    let n = outbox
        .enqueue_all(vec![op("a"), op("b"), op("c"), op("b")])
        .await
        .unwrap();
    assert_eq!(n, 2, "a and the second b were already queued");

    let mut conflicting = op("c");
    conflicting.payload = json!({"diffs": []});
    let err = outbox
        .enqueue_all(vec![op("d"), conflicting, op("e")])
        .await
        .unwrap_err();
    assert!(
        matches!(err, OutboxError::Conflict { ref op_id } if op_id == "c"),
        "{err}"
    );
    assert_eq!(outbox.status().await.unwrap().pending, 3, "d was not kept");
    assert_eq!(outbox.enqueue_all(Vec::new()).await.unwrap(), 0);
}

#[tokio::test]
async fn batches_are_formed_in_enqueue_order_and_deterministically() {
    let scratch = Scratch::new();
    let mut runs = Vec::new();
    for name in ["one.db", "two.db"] {
        let outbox = open(&scratch.path(name));
        outbox
            .enqueue_all((0..7).map(|i| op(&format!("op{i}"))).collect())
            .await
            .unwrap();
        let mut batches = Vec::new();
        let mut cursor = 0;
        while let Some(batch) = outbox.next_batch(3, 0).await.unwrap() {
            outbox
                .record_ack(&batch, &all_applied(&batch, cursor))
                .await
                .unwrap();
            cursor += batch.ops.len() as u64;
            batches.push(batch);
        }
        runs.push(batches);
    }
    assert_eq!(runs[0], runs[1], "same history, same batches");
    let shape: Vec<(&str, Vec<&str>)> = runs[0]
        .iter()
        .map(|b| (b.batch_id.as_str(), ids(b)))
        .collect();
    assert_eq!(
        shape,
        vec![
            ("ob-1-1", vec!["op0", "op1", "op2"]),
            ("ob-4-2", vec!["op3", "op4", "op5"]),
            ("ob-7-3", vec!["op6"]),
        ]
    );
}

/// Pipelining: alongside batches on their way, the next one goes only when full; an op
/// waits for a dependency in a batch that is in flight but not on its way, not for one in
/// a batch on its way (that one reaches the server first); and a batch in flight that is
/// not on its way (after a failure) goes before any new one.
#[tokio::test]
async fn alongside_batches_on_their_way_only_full_batches_go_and_in_order() {
    let scratch = Scratch::new();
    let outbox = open(&scratch.path("o.db"));
    outbox
        .enqueue_all((0..5).map(|i| op(&format!("op{i}"))).collect())
        .await
        .unwrap();
    let first = outbox.next_batch(3, 0).await.unwrap().unwrap();
    assert_eq!(ids(&first), ["op0", "op1", "op2"]);
    let on_way = vec![first.batch_id.clone()];
    // Two pending ops do not fill a batch of 3: they wait for the answer.
    assert_eq!(
        outbox
            .next_batch_alongside(3, 0, on_way.clone())
            .await
            .unwrap(),
        None
    );
    outbox
        .enqueue_all(vec![dep_op("op5", &["op1"]), op("op6")])
        .await
        .unwrap();
    // Now full; op5's dependency is in the batch on its way, so it goes too.
    let second = outbox
        .next_batch_alongside(3, 0, on_way.clone())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ids(&second), ["op3", "op4", "op5"]);
    outbox
        .enqueue_all(vec![dep_op("op7", &["op4"]), op("op8"), op("op9")])
        .await
        .unwrap();
    // Had `second` failed and left the pipeline, it would go again before anything new...
    let again = outbox
        .next_batch_alongside(3, 0, on_way.clone())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.batch_id, second.batch_id);
    // ...and with both on their way, op7 may follow op4.
    let both = vec![first.batch_id.clone(), second.batch_id.clone()];
    let third = outbox
        .next_batch_alongside(3, 0, both)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ids(&third), ["op6", "op7", "op8"]);
    // Without `second` on its way, op9 alone is no full batch, and nothing is sent
    // ahead of the batches in flight.
    assert_eq!(outbox.next_batch(3, 0).await.unwrap().unwrap(), first);
}

#[tokio::test]
async fn an_unacked_batch_comes_back_identical_until_acked_even_after_a_crash() {
    let scratch = Scratch::new();
    let path = scratch.path("o.db");
    let outbox = open(&path);
    outbox
        .enqueue_all((0..5).map(|i| dep_op(&format!("op{i}"), &[])).collect())
        .await
        .unwrap();
    let first = outbox.next_batch(3, 1_000).await.unwrap().unwrap();
    assert_eq!(ids(&first), ["op0", "op1", "op2"]);
    assert_eq!(first.attempts, 0);

    // Asked again before anything was recorded (the send is in progress, or the process
    // died mid-send): the same batch, not a new one.
    assert_eq!(outbox.next_batch(3, 1_000).await.unwrap().unwrap(), first);

    outbox
        .record_failure(&first, "disconnected", 5_000)
        .await
        .unwrap();
    // Before its retry time nothing is handed out, not even the pending ops behind it:
    // they must not overtake it.
    outbox.enqueue(op("late")).await.unwrap();
    assert_eq!(outbox.next_batch(3, 4_999).await.unwrap(), None);
    let status = outbox.status().await.unwrap();
    assert_eq!(
        (status.in_flight, status.pending, status.next_retry_at),
        (3, 3, Some(5_000))
    );
    assert_eq!(status.last_error.as_deref(), Some("disconnected"));

    // Crash: drop without acking, reopen, and the same batch comes back.
    drop(outbox);
    let outbox = open(&path);
    let again = outbox.next_batch(100, 5_000).await.unwrap().unwrap();
    assert_eq!(again.batch_id, first.batch_id);
    assert_eq!(again.ops, first.ops);
    assert_eq!(again.attempts, 1);

    let summary = outbox
        .record_ack(&again, &all_applied(&again, 0))
        .await
        .unwrap();
    assert_eq!((summary.applied, summary.cursor), (3, 3));
    let next = outbox.next_batch(100, 5_000).await.unwrap().unwrap();
    assert_eq!(ids(&next), ["op3", "op4", "late"]);
    assert_ne!(next.batch_id, first.batch_id);
    assert_eq!(
        outbox.status().await.unwrap().last_error,
        None,
        "an ack clears it"
    );
}

#[tokio::test]
async fn an_ack_settles_every_op_and_the_cursor_in_one_transaction() {
    let scratch = Scratch::new();
    let outbox = open(&scratch.path("o.db"));
    outbox
        .enqueue_all(vec![
            op("new"),
            op("seen"),
            op("bad"),
            op("old"),
            dep_op("early", &["elsewhere"]),
        ])
        .await
        .unwrap();
    let batch = outbox.next_batch(10, 0).await.unwrap().unwrap();
    let before = outbox.status().await.unwrap();

    // Refused, changing nothing: wrong length, wrong op id, and (mid-way, after the first
    // op was already updated) a cursor SQLite cannot hold.
    let mut short = all_applied(&batch, 10);
    short.results.pop();
    let mut renamed = all_applied(&batch, 10);
    renamed.results[2].op_id = "other".into();
    let mut overflow = all_applied(&batch, 10);
    overflow.results[3].outcome = OpOutcome::Applied(Cursor(u64::MAX));
    for bad in [short, renamed, overflow] {
        let err = outbox.record_ack(&batch, &bad).await.unwrap_err();
        assert!(matches!(err, OutboxError::Invalid(_)), "{err}");
        assert_eq!(outbox.status().await.unwrap(), before, "nothing changed");
    }

    let answer = ack(
        &batch,
        12,
        vec![
            OpOutcome::Applied(Cursor(12)),
            OpOutcome::Duplicate(Cursor(3)),
            rejected(RejectReason::Invalid, "payload is not a JSON object"),
            rejected(
                RejectReason::StaleTransition,
                "message m1 is already completed",
            ),
            rejected(
                RejectReason::MissingDependency,
                "depends on op elsewhere, which is not applied in this share",
            ),
        ],
    );
    let summary = outbox.record_ack(&batch, &answer).await.unwrap();
    assert_eq!(
        (
            summary.applied,
            summary.duplicates,
            summary.rejected,
            summary.waiting,
            summary.cursor
        ),
        (1, 1, 2, 1, 12)
    );
    let status = outbox.status().await.unwrap();
    assert_eq!(
        (
            status.pending,
            status.in_flight,
            status.waiting,
            status.acked,
            status.rejected,
            status.last_cursor
        ),
        (0, 0, 1, 2, 2, Some(12))
    );
    assert_eq!(
        outbox.acked().await.unwrap(),
        vec![("seen".to_string(), 3), ("new".to_string(), 12)],
        "in cursor order"
    );
    let rejections: Vec<(String, RejectedReason)> = outbox
        .rejected()
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.op_id, r.reason))
        .collect();
    assert_eq!(
        rejections,
        [
            ("bad".to_string(), RejectedReason::Invalid),
            ("old".to_string(), RejectedReason::StaleTransition)
        ]
    );
    // The batch is done: a second ack of it is refused, and nothing is left to send
    // ("early" waits for an op this outbox does not have).
    assert!(matches!(
        outbox.record_ack(&batch, &answer).await,
        Err(OutboxError::Invalid(_))
    ));
    assert_eq!(outbox.next_batch(10, 0).await.unwrap(), None);
}

#[tokio::test]
async fn a_missing_dependency_holds_the_op_until_that_op_is_acked() {
    let scratch = Scratch::new();
    let outbox = open(&scratch.path("o.db"));
    // The part is queued before its message, and its dependency is not in the outbox yet,
    // so nothing holds it back: the server decides.
    outbox.enqueue(dep_op("part", &["msg"])).await.unwrap();
    let first = outbox.next_batch(10, 0).await.unwrap().unwrap();
    assert_eq!(ids(&first), ["part"]);
    outbox
        .record_ack(
            &first,
            &ack(
                &first,
                0,
                vec![rejected(
                    RejectReason::MissingDependency,
                    "depends on op msg",
                )],
            ),
        )
        .await
        .unwrap();
    assert_eq!(outbox.next_batch(10, 0).await.unwrap(), None, "held");
    let status = outbox.status().await.unwrap();
    assert_eq!((status.pending, status.waiting), (0, 1));

    // The message arrives; the held part does not ride along before the message is acked.
    let changed = outbox.changed();
    let notified = changed.notified();
    outbox.enqueue(op("msg")).await.unwrap();
    notified.await; // an enqueue wakes a syncer
    let second = outbox.next_batch(10, 0).await.unwrap().unwrap();
    assert_eq!(ids(&second), ["msg"]);
    outbox
        .record_ack(&second, &all_applied(&second, 0))
        .await
        .unwrap();

    // Acking the message released the part.
    let third = outbox.next_batch(10, 0).await.unwrap().unwrap();
    assert_eq!(ids(&third), ["part"]);
    assert_eq!(third.ops[0].depends_on, ["msg"]);
    outbox
        .record_ack(&third, &all_applied(&third, 1))
        .await
        .unwrap();
    let status = outbox.status().await.unwrap();
    assert_eq!((status.waiting, status.acked), (0, 2));
}

#[tokio::test]
async fn dependencies_still_queued_here_go_first() {
    let scratch = Scratch::new();
    let outbox = open(&scratch.path("o.db"));
    outbox
        .enqueue_all(vec![
            dep_op("child", &["parent"]), // its dependency comes later: held back
            op("parent"),
            dep_op("sibling", &["parent"]), // its dependency is earlier in the batch: fine
            dep_op("external", &["not-here"]), // not in this outbox: the server decides
        ])
        .await
        .unwrap();
    let batch = outbox.next_batch(10, 0).await.unwrap().unwrap();
    assert_eq!(ids(&batch), ["parent", "sibling", "external"]);
    outbox
        .record_ack(&batch, &all_applied(&batch, 0))
        .await
        .unwrap();
    let batch = outbox.next_batch(10, 0).await.unwrap().unwrap();
    assert_eq!(ids(&batch), ["child"]);
}

#[tokio::test]
async fn a_dependency_cycle_does_not_stall_the_outbox() {
    let scratch = Scratch::new();
    let outbox = open(&scratch.path("o.db"));
    outbox
        .enqueue_all(vec![dep_op("a", &["b"]), dep_op("b", &["a"])])
        .await
        .unwrap();
    let batch = outbox.next_batch(10, 0).await.unwrap().unwrap();
    assert_eq!(
        ids(&batch),
        ["a"],
        "the oldest goes alone; the server settles it"
    );
    let missing = rejected(RejectReason::MissingDependency, "depends on op b");
    outbox
        .record_ack(&batch, &ack(&batch, 0, vec![missing.clone()]))
        .await
        .unwrap();
    // "a" now waits, so it no longer holds "b" back.
    let batch = outbox.next_batch(10, 0).await.unwrap().unwrap();
    assert_eq!(ids(&batch), ["b"]);
    outbox
        .record_ack(&batch, &ack(&batch, 0, vec![missing]))
        .await
        .unwrap();
    assert_eq!(outbox.next_batch(10, 0).await.unwrap(), None);
    assert_eq!(outbox.status().await.unwrap().waiting, 2);
}

#[tokio::test]
async fn batches_stay_under_the_byte_budget() {
    let scratch = Scratch::new();
    let outbox = open(&scratch.path("o.db"));
    let chunk = "z".repeat(MAX_BATCH_BYTES / 3);
    let huge = "h".repeat(MAX_BATCH_BYTES + 1);
    let sized = |id: &str, text: &str| OpSpec::new(id, OpKind::DiffSet, json!([text]));
    outbox
        .enqueue_all(vec![
            sized("a", &chunk),
            sized("b", &chunk),
            sized("c", &chunk),
            sized("huge", &huge),
            sized("d", "small"),
        ])
        .await
        .unwrap();
    let mut shapes = Vec::new();
    let mut cursor = 0;
    while let Some(batch) = outbox.next_batch(100, 0).await.unwrap() {
        shapes.push(ids(&batch).join(","));
        outbox
            .record_ack(&batch, &all_applied(&batch, cursor))
            .await
            .unwrap();
        cursor += batch.ops.len() as u64;
    }
    // Three thirds plus framing exceed the budget; an op over it goes alone.
    assert_eq!(shapes, ["a,b", "c", "huge", "d"]);
}

#[tokio::test]
async fn a_batch_refused_whole_is_split_and_a_single_op_rejected() {
    let scratch = Scratch::new();
    let outbox = open(&scratch.path("o.db"));
    outbox
        .enqueue_all((0..5).map(|i| op(&format!("op{i}"))).collect())
        .await
        .unwrap();
    let batch = outbox.next_batch(5, 0).await.unwrap().unwrap();
    let refusal = outbox
        .record_refusal(
            &batch,
            RejectedReason::TooLarge,
            "batch has 5 ops; the limit is 2 per batch",
        )
        .await
        .unwrap();
    let Refusal::Split { first, second } = refusal else {
        panic!("expected a split, got {refusal:?}");
    };
    let half = outbox.next_batch(5, 0).await.unwrap().unwrap();
    assert_eq!(
        (half.batch_id.as_str(), ids(&half)),
        (first.as_str(), vec!["op0", "op1"])
    );
    // Until acked, the first half keeps coming back; the second waits behind it.
    assert_eq!(outbox.next_batch(5, 0).await.unwrap().unwrap(), half);
    outbox
        .record_ack(&half, &all_applied(&half, 0))
        .await
        .unwrap();
    let rest = outbox.next_batch(5, 0).await.unwrap().unwrap();
    assert_eq!(
        (rest.batch_id.as_str(), ids(&rest)),
        (second.as_str(), vec!["op2", "op3", "op4"])
    );

    // Split down to one op that is still too large: that op is rejected for good.
    let Refusal::Split { .. } = outbox
        .record_refusal(&rest, RejectedReason::TooLarge, "too big")
        .await
        .unwrap()
    else {
        panic!("three ops split");
    };
    let one = outbox.next_batch(5, 0).await.unwrap().unwrap();
    assert_eq!(ids(&one), ["op2"]);
    assert_eq!(
        outbox
            .record_refusal(
                &one,
                RejectedReason::TooLarge,
                "op op2 has a 2000000-byte payload"
            )
            .await
            .unwrap(),
        Refusal::Rejected {
            op_id: "op2".into()
        }
    );
    let rejected = outbox.rejected().await.unwrap();
    assert_eq!(rejected.len(), 1);
    assert_eq!(
        (rejected[0].reason, rejected[0].detail.as_str()),
        (
            RejectedReason::TooLarge,
            "op op2 has a 2000000-byte payload"
        )
    );
    let last = outbox.next_batch(5, 0).await.unwrap().unwrap();
    assert_eq!(ids(&last), ["op3", "op4"]);
}

#[tokio::test]
async fn an_outbox_feeds_one_share() {
    let scratch = Scratch::new();
    let path = scratch.path("o.db");
    let outbox = open(&path);
    assert_eq!(outbox.status().await.unwrap().share_id, None);
    outbox.bind("sh_a", "127.0.0.1:1").await.unwrap();
    outbox.bind("sh_a", "127.0.0.1:2").await.unwrap();
    drop(outbox);
    let outbox = open(&path);
    match outbox.bind("sh_b", "127.0.0.1:2").await {
        Err(OutboxError::WrongShare { bound, requested }) => {
            assert_eq!((bound.as_str(), requested.as_str()), ("sh_a", "sh_b"));
        }
        other => panic!("expected WrongShare, got {other:?}"),
    }
    outbox.record_cursor(41).await.unwrap();
    let status = outbox.status().await.unwrap();
    assert_eq!(status.share_id.as_deref(), Some("sh_a"));
    assert_eq!(status.server.as_deref(), Some("127.0.0.1:2"));
    assert_eq!(status.last_cursor, Some(41));
    // The status serializes as the CLI prints it with --json.
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(json["shareId"], "sh_a");
    assert_eq!(json["lastCursor"], 41);
    assert_eq!(json["inFlight"], 0);
}

#[test]
fn a_file_from_a_newer_build_is_refused() {
    let scratch = Scratch::new();
    let path = scratch.path("o.db");
    drop(open(&path));
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.pragma_update(None, "user_version", 99).unwrap();
    drop(raw);
    let err = Outbox::open(&path).unwrap_err();
    assert!(err.to_string().contains("newer"), "{err}");
}

/// A model of the server and random faults around the outbox: every op ends applied exactly
/// once or waiting for a dependency that can never be applied; batches are identical on
/// every retry; ops are applied after their dependencies; and ops without dependencies reach
/// the server in enqueue order.
mod model {
    use std::collections::{BTreeMap, HashMap, HashSet};

    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    struct Case {
        /// For each op (in enqueue order): indexes of the ops it depends on, and whether
        /// it also depends on an op that exists nowhere.
        deps: Vec<(Vec<usize>, bool)>,
        max_ops: usize,
        /// One per step: 0 = fine, 1 = request lost, 2 = response lost, 3 = crash after
        /// the server applied, 4 = crash before sending.
        faults: Vec<u8>,
    }

    fn cases() -> impl Strategy<Value = Case> {
        (1usize..30)
            .prop_flat_map(|n| {
                // Dependencies point at ops in a hidden order (a DAG), then enqueue order
                // is a shuffle of it, so ops often come before their dependencies.
                let deps = proptest::collection::vec(
                    (proptest::collection::vec(0usize..n, 0..3), proptest::bool::weighted(0.1)),
                    n,
                );
                (deps, Just((0..n).collect::<Vec<_>>()).prop_shuffle())
            })
            .prop_flat_map(|(deps, order)| {
                let n = deps.len();
                // Keep only edges that go back in the hidden order.
                let rank: HashMap<usize, usize> =
                    order.iter().enumerate().map(|(r, &i)| (i, r)).collect();
                let deps: Vec<(Vec<usize>, bool)> = deps
                    .into_iter()
                    .enumerate()
                    .map(|(i, (ds, ext))| {
                        let mut ds: Vec<usize> =
                            ds.into_iter().filter(|&d| rank[&d] < rank[&i]).collect();
                        ds.dedup();
                        (ds, ext)
                    })
                    .collect();
                (
                    Just(deps),
                    1usize..=n.max(1),
                    proptest::collection::vec(
                        prop_oneof![6 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8), 1 => Just(3u8), 1 => Just(4u8)],
                        0..200,
                    ),
                )
            })
            .prop_map(|(deps, max_ops, faults)| Case {
                deps,
                max_ops,
                faults,
            })
    }

    fn op_id(i: usize) -> String {
        format!("op{i}")
    }

    /// The server's side: the ledger, in apply order.
    #[derive(Default)]
    struct Server {
        applied: BTreeMap<String, u64>,
        order: Vec<String>,
    }

    impl Server {
        fn append(&mut self, batch: &OutboxBatch) -> Ack {
            let results = batch
                .ops
                .iter()
                .map(|op| {
                    let outcome = if let Some(&at) = self.applied.get(&op.op_id) {
                        OpOutcome::Duplicate(Cursor(at))
                    } else if op.depends_on.iter().any(|d| !self.applied.contains_key(d)) {
                        rejected(RejectReason::MissingDependency, "missing")
                    } else {
                        let at = self.order.len() as u64 + 1;
                        self.applied.insert(op.op_id.clone(), at);
                        self.order.push(op.op_id.clone());
                        OpOutcome::Applied(Cursor(at))
                    };
                    OpResult {
                        op_id: OpId(op.op_id.clone()),
                        outcome,
                    }
                })
                .collect();
            Ack {
                cursor: Cursor(self.order.len() as u64),
                results,
            }
        }
    }

    async fn run(case: Case) {
        let scratch = Scratch::new();
        let path = scratch.path("o.db");
        let mut outbox = open(&path);
        let ops: Vec<OpSpec> = case
            .deps
            .iter()
            .enumerate()
            .map(|(i, (ds, ext))| {
                let mut deps: Vec<String> = ds.iter().map(|&d| op_id(d)).collect();
                if *ext {
                    deps.push("nowhere".into());
                }
                let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
                dep_op(&op_id(i), &deps)
            })
            .collect();
        outbox.enqueue_all(ops.clone()).await.unwrap();

        let mut server = Server::default();
        let mut seen: HashMap<String, Vec<String>> = HashMap::new();
        let mut faults = case.faults.iter().copied();
        let mut now = 0i64;
        let mut steps = 0;
        while let Some(batch) = outbox.next_batch(case.max_ops, now).await.unwrap() {
            steps += 1;
            assert!(steps < 10_000, "no progress");
            let members: Vec<String> = batch.ops.iter().map(|o| o.op_id.clone()).collect();
            let first = seen
                .entry(batch.batch_id.clone())
                .or_insert(members.clone());
            assert_eq!(
                *first, members,
                "batch {} changed on a retry",
                batch.batch_id
            );
            now += 10;
            match faults.next().unwrap_or(0) {
                0 => {
                    let ack = server.append(&batch);
                    outbox.record_ack(&batch, &ack).await.unwrap();
                }
                1 => outbox
                    .record_failure(&batch, "lost", now + 5)
                    .await
                    .unwrap(),
                2 => {
                    server.append(&batch);
                    outbox
                        .record_failure(&batch, "lost", now + 5)
                        .await
                        .unwrap();
                }
                3 => {
                    server.append(&batch);
                    drop(outbox);
                    outbox = open(&path);
                }
                _ => {
                    drop(outbox);
                    outbox = open(&path);
                }
            }
            now += 10;
        }

        // Which ops can ever apply: those whose dependencies (transitively) all can.
        let mut can: HashSet<usize> = HashSet::new();
        loop {
            let before = can.len();
            for (i, (ds, ext)) in case.deps.iter().enumerate() {
                if !ext && ds.iter().all(|d| can.contains(d)) {
                    can.insert(i);
                }
            }
            if can.len() == before {
                break;
            }
        }
        let expected: BTreeMap<String, u64> = server.applied.clone();
        assert_eq!(
            expected.keys().cloned().collect::<HashSet<_>>(),
            can.iter().map(|&i| op_id(i)).collect::<HashSet<_>>(),
            "exactly the applicable ops were applied"
        );
        let acked: BTreeMap<String, u64> = outbox.acked().await.unwrap().into_iter().collect();
        assert_eq!(acked, expected, "the outbox agrees with the ledger");
        let status = outbox.status().await.unwrap();
        assert_eq!(status.pending + status.in_flight + status.rejected, 0);
        assert_eq!(status.waiting as usize, case.deps.len() - can.len());
        assert_eq!(status.last_cursor.unwrap_or(0), server.order.len() as u64);

        // Ops without dependencies were applied in enqueue order.
        let free: Vec<String> = server
            .order
            .iter()
            .filter(|id| {
                let i: usize = id[2..].parse().unwrap();
                case.deps[i].0.is_empty() && !case.deps[i].1
            })
            .cloned()
            .collect();
        let mut sorted = free.clone();
        sorted.sort_by_key(|id| id[2..].parse::<usize>().unwrap());
        assert_eq!(free, sorted);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn every_op_is_applied_once_whatever_fails(case in cases()) {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .block_on(run(case));
        }
    }
}
