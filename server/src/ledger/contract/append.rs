//! Contract cases of `append`: cursors, exactly-once dedupe by op id,
//! dependencies, the cursor fence, validation, announcements and concurrency.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use capsync_shared::{Cursor, OpId, OpKind};
use serde_json::json;

use super::{
    Fixture, START, after, applied, batch, logged_ops, message, model_op, op, outcomes, part,
    raw_op, rejection, session,
};
use crate::ledger::{
    BatchIn, BatchLink, Changed, LedgerError, OpOutcome, RecordKind, RejectReason,
};

/// Which token and batch applied each op is stored too; the engines' own tests
/// check that, the seam does not show it.
pub(crate) async fn applied_ops_advance_the_cursor_and_are_logged_with_their_token(fx: Fixture) {
    // The share was created at START; its ops are applied a second later.
    fx.clock.advance(Duration::from_secs(1));
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

    let state = fx.backend.share_state(fx.viewer.clone()).await.unwrap();
    let listed = fx
        .backend
        .list_shares(fx.agent.clone(), String::new(), 10, false)
        .await
        .unwrap();
    let info = listed
        .iter()
        .find(|s| s.state.share_id == fx.share)
        .unwrap();
    let (created, updated) = (info.created_at, info.updated_at);
    assert_eq!(created, START);
    assert_eq!(updated, START + 1000, "the last change is the append");
    assert!(updated >= created);
    assert_eq!(state.updated_at, updated);
    assert_eq!(page.ops[2].applied_at, updated);
    assert!(page.ops.iter().all(|o| o.applied_at == updated));
}

pub(crate) async fn dedupe_is_permanent_across_a_reopen(fx: Fixture) {
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
    assert_eq!(fx.stats().await.ledger_ops, 3);
    let logged = fx.logged_ops().await;
    assert_eq!(logged.len(), 3);
    assert_eq!(logged[1].payload, message("msg_1").to_string());
}

pub(crate) async fn an_op_id_sent_again_with_other_content_is_refused_not_a_duplicate(fx: Fixture) {
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

pub(crate) async fn a_repeated_op_id_in_one_batch_is_a_duplicate_of_the_first(fx: Fixture) {
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

pub(crate) async fn dependencies_must_be_applied_in_this_share(fx: Fixture) {
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
    let (other, other_viewer) = fx.new_share(&fx.agent, "sh_2").await;
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
    // None of the refused ops is in either share's ledger.
    let ids: Vec<String> = fx
        .logged_ops()
        .await
        .into_iter()
        .map(|o| o.op_id.0)
        .collect();
    assert_eq!(ids, ["a", "b", "d", "zzz", "c"]);
    assert!(logged_ops(&fx.backend, &other_viewer).await.is_empty());
    assert_eq!(fx.stats().await.ledger_ops, 5);
}

pub(crate) async fn a_stale_expected_cursor_refuses_the_whole_batch(fx: Fixture) {
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
    assert_eq!(fx.stats().await.ledger_ops, 2);
    let (records, _) = fx.snapshot(1 << 20).await;
    let models: Vec<&str> = records
        .iter()
        .filter(|r| r.kind == RecordKind::Model)
        .map(|r| r.id.as_str())
        .collect();
    assert_eq!(models, ["o1", "o2"]);

    let current = BatchIn {
        expected_cursor: Some(Cursor(2)),
        ..batch(vec![model_op("o3")])
    };
    let ack = fx.backend.append(fx.writer.clone(), current).await.unwrap();
    assert_eq!(outcomes(&ack), applied(&[3]));
}

/// `BatchIn::follows`: batches queued together, each following the one before, apply
/// in order; when one is refused, those following it are refused with nothing applied.
pub(crate) async fn a_pipelined_batch_applies_only_if_the_batch_before_it_did(fx: Fixture) {
    let chained = |id: &str, ops, before: Option<&Arc<BatchLink>>| {
        let link = BatchLink::new();
        let batch = BatchIn {
            batch_id: id.into(),
            follows: before.cloned(),
            link: Some(Arc::clone(&link)),
            ..batch(ops)
        };
        (batch, link)
    };
    // Queued at once, none waiting for the one before: all apply, in order.
    let (first, l1) = chained("b1", vec![model_op("o1")], None);
    let (second, l2) = chained("b2", vec![model_op("o2"), model_op("o3")], Some(&l1));
    let (third, _) = chained("b3", vec![model_op("o4")], Some(&l2));
    let (a, b, c) = futures::join!(
        fx.backend.append(fx.writer.clone(), first),
        fx.backend.append(fx.writer.clone(), second),
        fx.backend.append(fx.writer.clone(), third),
    );
    assert_eq!(outcomes(&a.unwrap()), applied(&[1]));
    assert_eq!(outcomes(&b.unwrap()), applied(&[2, 3]));
    assert_eq!(outcomes(&c.unwrap()), applied(&[4]));

    // The first is refused whole (a stale fence): the two following it apply nothing.
    let (mut fenced, l4) = chained("b4", vec![model_op("o5")], None);
    fenced.expected_cursor = Some(Cursor(1));
    let (fifth, l5) = chained("b5", vec![model_op("o6")], Some(&l4));
    let (sixth, _) = chained("b6", vec![model_op("o7")], Some(&l5));
    let (a, b, c) = futures::join!(
        fx.backend.append(fx.writer.clone(), fenced),
        fx.backend.append(fx.writer.clone(), fifth),
        fx.backend.append(fx.writer.clone(), sixth),
    );
    assert!(matches!(a, Err(LedgerError::CursorConflict(_))), "{a:?}");
    assert!(matches!(b, Err(LedgerError::OutOfOrder)), "{b:?}");
    assert!(matches!(c, Err(LedgerError::OutOfOrder)), "{c:?}");
    // A batch that never reached the ledger (refused before it) leaves its link
    // unwritten: the one following it is refused too.
    let (after_unsent, _) = chained("b7", vec![model_op("o8")], Some(&BatchLink::new()));
    let refused = fx.backend.append(fx.writer.clone(), after_unsent).await;
    assert!(
        matches!(refused, Err(LedgerError::OutOfOrder)),
        "{refused:?}"
    );
    assert_eq!(fx.cursor().await, Cursor(4), "nothing of them applied");

    // A batch following one that committed earlier applies.
    let (later, _) = chained("b8", vec![model_op("o5")], Some(&l2));
    let ack = fx.backend.append(fx.writer.clone(), later).await.unwrap();
    assert_eq!(outcomes(&ack), applied(&[5]));
}

pub(crate) async fn invalid_payloads_are_rejected_and_leave_no_trace(fx: Fixture) {
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
    let (records_before, _) = fx.snapshot(1 << 20).await;
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
    let logged = fx.logged_ops().await;
    assert!(
        !logged.iter().any(|o| o.op_id.as_str().starts_with("bad")),
        "{logged:?}"
    );
    assert_eq!(logged.len(), 3 + cases.len());
    // Nothing the rejected ops would have touched changed.
    let (records, _) = fx.snapshot(1 << 20).await;
    let stored = records.iter().find(|r| r.id == "prt_1").unwrap();
    assert_eq!(stored.json, part("prt_1", "msg_1").to_string());
    assert!(!records.iter().any(|r| r.kind == RecordKind::Session));
    assert!(!records.iter().any(|r| r.kind == RecordKind::Diffs));
    // Only the valid models were added.
    let others: Vec<_> = records
        .into_iter()
        .filter(|r| r.kind != RecordKind::Model)
        .collect();
    assert_eq!(others, records_before);
}

pub(crate) async fn an_append_whose_caller_stops_waiting_is_still_announced(fx: Fixture) {
    let mut changes = fx.backend.changes();
    // The command is queued when the call is made; the caller then gives up at once,
    // as a cancelled RPC call or a dropped connection does.
    drop(fx.backend.append(
        fx.writer.clone(),
        batch(vec![op("d1", OpKind::DiffSet, json!([]))]),
    ));
    let changed = tokio::time::timeout(Duration::from_secs(60), changes.recv())
        .await
        .expect("announced after the commit")
        .expect("a change");
    assert!(
        matches!(changed, Changed::Ops { ref share, applied: Some(ref ops) } if *share == fx.share && ops.len() == 1),
        "{changed:?}"
    );
    assert_eq!(fx.cursor().await, Cursor(1), "and committed");
}

/// Run on a multi-threaded runtime: five tasks each send every op twice, in
/// two batches at once, so appends to one share race each other.
pub(crate) async fn concurrent_writers_apply_each_op_exactly_once(fx: Fixture) {
    let handles: Vec<_> = (0..5)
        .map(|t| {
            let backend = fx.backend.clone();
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
    assert_eq!(fx.stats().await.ledger_ops, 50);
    // Every cursor from 1 to 50 once, each op once.
    let logged = fx.logged_ops().await;
    let cursors: Vec<u64> = logged.iter().map(|o| o.cursor.0).collect();
    assert_eq!(cursors, (1..=50).collect::<Vec<_>>());
    let ids: BTreeSet<&str> = logged.iter().map(|o| o.op_id.as_str()).collect();
    assert_eq!(ids.len(), 50);
}

/// Found by the `op_payload` fuzz target (see `sqlite/fuzz.rs`): such a part
/// used to be stored, and the next `part.delta` on it found stored JSON it
/// cannot read and failed its whole batch as an internal error, on every retry.
pub(crate) async fn a_part_the_full_parse_refuses_is_not_stored_and_cannot_poison_its_deltas(
    fx: Fixture,
) {
    let message = r#"{"id":"msg_1","role":"user"}"#;
    for (part, delta) in [
        (
            r#"["prt_1","msg_1","text"]"#,
            r#"{"partID":"prt_1","delta":"x"}"#,
        ),
        (
            r#"{"id":"prt_2","messageID":"msg_1","type":"text","n":1e999}"#,
            r#"{"partID":"prt_2","delta":"x"}"#,
        ),
    ] {
        let ack = fx
            .backend
            .append(
                fx.writer.clone(),
                batch(vec![
                    raw_op(&format!("m-{part}"), OpKind::MessageUpsert, message),
                    raw_op(&format!("p-{part}"), OpKind::PartUpsert, part),
                    raw_op(&format!("d-{part}"), OpKind::PartDelta, delta),
                ]),
            )
            .await
            .unwrap_or_else(|e| panic!("a batch with part {part} failed: {e}"));
        for result in &ack.results[1..] {
            assert!(
                matches!(
                    result.outcome,
                    OpOutcome::Rejected {
                        reason: RejectReason::Invalid,
                        ..
                    }
                ),
                "{part}: {:?}",
                result.outcome
            );
        }
    }
    let parts = fx.stats().await.parts;
    assert_eq!(parts, 0, "no part was stored");
    let ids: Vec<OpId> = fx.logged_ops().await.into_iter().map(|o| o.op_id).collect();
    assert_eq!(ids.len(), 2, "only the message upserts: {ids:?}");
}
