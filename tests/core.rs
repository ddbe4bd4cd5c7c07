//! appendOps semantics through the public client API against a real server:
//! exactly-once per op id, cursor acks, dependencies, fencing, concurrency, restarts.

use std::collections::{BTreeSet, HashSet};

use capsync_client::{ErrorCode, OpKind, OpOutcome, OpSpec, RejectReason};
use capsync_shared::Cursor;
use capsync_tests::{
    TestServer, admin, agent, batch, message_op, run_local, session_ops, share, text_part_op,
};
use serde_json::json;

capsync_tests::on_each_engine!(
    append_then_resend_the_same_batch_changes_nothing,
    a_batch_whose_connection_dropped_after_sending_applies_once_when_resent,
    depends_on_orders_ops_and_missing_dependencies_are_retryable,
    expected_cursor_mismatch_refuses_the_whole_batch,
    pipelined_batches_apply_in_order_and_a_failed_one_is_never_overtaken,
    concurrent_writers_on_one_share_get_a_gapless_cursor_and_apply_each_op_once,
    restart_keeps_tokens_and_the_cursor_continues,
    record_semantics_delta_diffs_and_terminal_messages,
);

fn append_then_resend_the_same_batch_changes_nothing(server: TestServer) {
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let created = share(&agent, "ses_a").await;
        let writer = created.writer;
        let ops = session_ops("ses_a", "msg_1", 3);
        let first = writer.append(&batch("b1", ops.clone())).await.unwrap();
        assert_eq!(first.cursor, 5);
        let applied: Vec<_> = first.results.iter().map(|r| r.outcome.clone()).collect();
        assert_eq!(
            applied,
            (1..=5)
                .map(|c| OpOutcome::Applied(Cursor(c)))
                .collect::<Vec<_>>()
        );

        let viewer = writer.viewer();
        let before = viewer.snapshot().await.unwrap();
        let again = writer.append(&batch("b1", ops.clone())).await.unwrap();
        assert_eq!(again.cursor, 5, "a replay does not move the cursor");
        let dups: Vec<_> = again.results.iter().map(|r| r.outcome.clone()).collect();
        assert_eq!(
            dups,
            (1..=5)
                .map(|c| OpOutcome::Duplicate(Cursor(c)))
                .collect::<Vec<_>>(),
            "each op reports the cursor it was first applied at"
        );
        let after = viewer.snapshot().await.unwrap();
        assert_eq!(before.records, after.records);
        assert_eq!(viewer.ops_since(0, 0).await.unwrap().ops.len(), 5);
    });
}

fn a_batch_whose_connection_dropped_after_sending_applies_once_when_resent(server: TestServer) {
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let created = share(&agent, "ses_drop").await;
        let writer_token = created.writer_token.token.clone();
        let ops = session_ops("ses_drop", "msg_1", 20);

        // Send on a fresh connection, then cut it without waiting for the answer.
        let doomed = capsync_client::connect(server.addr()).await.unwrap();
        let writer = doomed
            .redeem(&writer_token)
            .await
            .unwrap()
            .into_writer()
            .unwrap();
        let pending = {
            let writer = writer.clone();
            let b = batch("b-drop", ops.clone());
            tokio::task::spawn_local(async move { writer.append(&b).await })
        };
        tokio::task::yield_now().await;
        doomed.disconnect().await.ok();
        let lost = pending.await.unwrap();
        // Either outcome of the first attempt is fine; what matters is the resend.
        let first_applied = lost.as_ref().map(|ack| ack.applied()).unwrap_or(0);

        let fresh = capsync_client::connect(server.addr()).await.unwrap();
        let writer = fresh
            .redeem(&writer_token)
            .await
            .unwrap()
            .into_writer()
            .unwrap();
        let ack = writer.append(&batch("b-drop", ops.clone())).await.unwrap();
        assert_eq!(ack.cursor, 22, "every op applied exactly once");
        assert_eq!(ack.applied() + ack.duplicates(), 22);
        assert_eq!(ack.rejected(), 0);
        assert!(first_applied == 0 || ack.duplicates() == 22);
        let logged = writer.viewer().ops_since(0, 0).await.unwrap();
        let ids: HashSet<_> = logged.ops.iter().map(|op| op.op_id.clone()).collect();
        assert_eq!((logged.ops.len(), ids.len()), (22, 22));
    });
}

fn depends_on_orders_ops_and_missing_dependencies_are_retryable(server: TestServer) {
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let writer = share(&agent, "ses_dep").await.writer;
        writer
            .append(&batch("setup", session_ops("ses_dep", "msg_1", 0)))
            .await
            .unwrap();

        let mut a = text_part_op("ses_dep", "msg_1", "prt_a");
        a.op_id = "a".into();
        let mut b = text_part_op("ses_dep", "msg_1", "prt_b");
        b.op_id = "b".into();
        b.depends_on = vec!["a".into()];
        let mut c = text_part_op("ses_dep", "msg_1", "prt_c");
        c.op_id = "c".into();
        c.depends_on = vec!["d".into()];
        let ack = writer
            .append(&batch("deps", vec![a, b, c.clone()]))
            .await
            .unwrap();
        assert_eq!(ack.results[0].outcome, OpOutcome::Applied(Cursor(3)));
        assert_eq!(
            ack.results[1].outcome,
            OpOutcome::Applied(Cursor(4)),
            "b's dependency came earlier in the batch"
        );
        assert!(matches!(
            ack.results[2].outcome,
            OpOutcome::Rejected {
                reason: RejectReason::MissingDependency,
                ..
            }
        ));
        assert_eq!(ack.cursor, 4, "a rejected op does not advance the cursor");

        let mut d = text_part_op("ses_dep", "msg_1", "prt_d");
        d.op_id = "d".into();
        writer.append(&batch("d", vec![d])).await.unwrap();
        let retry = writer.append(&batch("deps-retry", vec![c])).await.unwrap();
        assert_eq!(
            retry.results[0].outcome,
            OpOutcome::Applied(Cursor(6)),
            "c applies once d is in"
        );
    });
}

fn expected_cursor_mismatch_refuses_the_whole_batch(server: TestServer) {
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let writer = share(&agent, "ses_fence").await.writer;
        writer
            .append(&batch("b1", session_ops("ses_fence", "msg_1", 1)))
            .await
            .unwrap();

        let mut stale = batch("stale", vec![text_part_op("ses_fence", "msg_1", "prt_x")]);
        stale.expected_cursor = Some(1);
        let err = writer.append(&stale).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::CursorConflict));
        match err {
            capsync_client::ClientError::Remote { cursor, .. } => assert_eq!(cursor, 3),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(writer.state().await.unwrap().cursor, 3, "nothing applied");

        stale.expected_cursor = Some(3);
        let ack = writer.append(&stale).await.unwrap();
        assert_eq!(ack.cursor, 4);
    });
}

/// `Batch.after`: batches in flight together on one writer capability apply in the
/// order sent, and when one fails, those sent after it are refused with nothing applied
/// (so resending them in order keeps the order).
fn pipelined_batches_apply_in_order_and_a_failed_one_is_never_overtaken(server: TestServer) {
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let created = share(&agent, "ses_pipe").await;
        let writer = conn
            .redeem(&created.writer_token.token)
            .await
            .unwrap()
            .into_writer()
            .unwrap();
        assert!(writer.orders_pipelined_batches());
        let part = |n: u32| text_part_op("ses_pipe", "msg_1", &format!("prt_{n}"));
        let first = batch("b1", session_ops("ses_pipe", "msg_1", 0));
        let second = batch("b2", vec![part(1), part(2)]).after("b1");
        let third = batch("b3", vec![part(3)]).after("b2");
        let (a, b, c) = futures::join!(
            writer.append(&first),
            writer.append(&second),
            writer.append(&third)
        );
        assert_eq!(
            [a.unwrap().cursor, b.unwrap().cursor, c.unwrap().cursor],
            [2, 4, 5]
        );

        // The first of three is refused whole: the two after it apply nothing.
        let mut fenced = batch("b4", vec![part(4)]);
        fenced.expected_cursor = Some(1);
        let fourth = batch("b5", vec![part(5)]).after("b4");
        let fifth = batch("b6", vec![part(6)]).after("b5");
        let (a, b, c) = futures::join!(
            writer.append(&fenced),
            writer.append(&fourth),
            writer.append(&fifth)
        );
        assert_eq!(a.unwrap_err().code(), Some(ErrorCode::CursorConflict));
        assert_eq!(b.unwrap_err().code(), Some(ErrorCode::OutOfOrder));
        assert_eq!(c.unwrap_err().code(), Some(ErrorCode::OutOfOrder));
        assert_eq!(writer.state().await.unwrap().cursor, 5, "nothing applied");

        // Sent again in order, they apply in order; an `after` that is not the call
        // just before is out of order too.
        fenced.expected_cursor = None;
        let (a, b) = futures::join!(writer.append(&fenced), writer.append(&fourth));
        assert_eq!([a.unwrap().cursor, b.unwrap().cursor], [6, 7]);
        let stray = batch("b7", vec![part(7)]).after("b4");
        let err = writer.append(&stray).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::OutOfOrder));
        assert_eq!(writer.state().await.unwrap().cursor, 7);

        // A batch refused before it reaches the ledger (an empty op id) takes the one
        // sent after it down too.
        let unreadable = batch(
            "b8",
            vec![OpSpec {
                op_id: String::new(),
                ..part(8)
            }],
        );
        let next = batch("b9", vec![part(9)]).after("b8");
        let (a, b) = futures::join!(writer.append(&unreadable), writer.append(&next));
        let refused = a.unwrap_err();
        assert_eq!(refused.code(), Some(ErrorCode::InvalidArgument));
        assert!(
            refused.to_string().contains("opId must be"),
            "the server's: {refused}"
        );
        assert_eq!(b.unwrap_err().code(), Some(ErrorCode::OutOfOrder));
        assert_eq!(writer.state().await.unwrap().cursor, 7, "nothing applied");
    });
}

fn concurrent_writers_on_one_share_get_a_gapless_cursor_and_apply_each_op_once(server: TestServer) {
    const WRITERS: usize = 8;
    const BATCHES: usize = 25;
    const OPS: usize = 4;
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let created = share(&agent, "ses_many").await;
        created
            .writer
            .append(&batch("setup", session_ops("ses_many", "msg_1", 0)))
            .await
            .unwrap();
        let token = created.writer_token.token.clone();
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let token = token.clone();
            let addr = server.addr();
            tasks.push(tokio::task::spawn_local(async move {
                let conn = capsync_client::connect(addr).await.unwrap();
                let writer = conn.redeem(&token).await.unwrap().into_writer().unwrap();
                let mut cursors = Vec::new();
                for b in 0..BATCHES {
                    let ops = (0..OPS)
                        .map(|i| text_part_op("ses_many", "msg_1", &format!("prt_{w}_{b}_{i}")))
                        .collect();
                    let batch_id = format!("w{w}-b{b}");
                    let ack = writer
                        .append(&capsync_tests::batch(&batch_id, ops))
                        .await
                        .unwrap();
                    let mine: Vec<u64> = ack
                        .results
                        .iter()
                        .map(|r| match r.outcome {
                            OpOutcome::Applied(c) => c.0,
                            ref other => panic!("unexpected {other:?}"),
                        })
                        .collect();
                    // A batch is atomic: its ops take consecutive cursors.
                    assert!(mine.windows(2).all(|w| w[1] == w[0] + 1), "{mine:?}");
                    cursors.extend(mine);
                }
                cursors
            }));
        }
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        let total = WRITERS * BATCHES * OPS;
        let unique: BTreeSet<u64> = all.iter().copied().collect();
        assert_eq!(all.len(), total);
        assert_eq!(
            unique,
            (3..3 + total as u64).collect(),
            "cursors are gapless and unique"
        );

        let viewer = created.writer.viewer();
        let mut after = 0;
        let mut seen = HashSet::new();
        loop {
            let page = viewer.ops_since(after, 500).await.unwrap();
            for op in &page.ops {
                assert_eq!(
                    op.cursor,
                    after + 1,
                    "ops come back in cursor order without gaps"
                );
                after = op.cursor.0;
                assert!(
                    seen.insert(op.op_id.clone()),
                    "op {} logged twice",
                    op.op_id
                );
            }
            if !page.has_more() {
                break;
            }
        }
        assert_eq!(after, 2 + total as u64);
    });
}

fn restart_keeps_tokens_and_the_cursor_continues(mut server: TestServer) {
    let (writer_token, viewer_token) = run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let created = share(&agent, "ses_restart").await;
        let ack = created
            .writer
            .append(&batch("b1", session_ops("ses_restart", "msg_1", 2)))
            .await
            .unwrap();
        assert_eq!(ack.cursor, 4);
        (created.writer_token.token, created.viewer_token.token)
    });
    server.restart();
    run_local(async {
        let conn = capsync_client::connect(server.addr()).await.unwrap();
        let writer = conn
            .redeem(&writer_token)
            .await
            .unwrap()
            .into_writer()
            .unwrap();
        assert_eq!(writer.state_at_redeem().cursor, 4);
        let replay = writer
            .append(&batch("b1", session_ops("ses_restart", "msg_1", 2)))
            .await
            .unwrap();
        assert_eq!(
            (replay.cursor.0, replay.duplicates()),
            (4, 4),
            "dedupe survives a restart"
        );
        let ack = writer
            .append(&batch(
                "b2",
                vec![text_part_op("ses_restart", "msg_1", "prt_new")],
            ))
            .await
            .unwrap();
        assert_eq!(ack.results[0].outcome, OpOutcome::Applied(Cursor(5)));
        let viewer = conn
            .redeem(&viewer_token)
            .await
            .unwrap()
            .into_viewer()
            .unwrap();
        assert_eq!(viewer.state().await.unwrap().cursor, 5);
    });
}

fn record_semantics_delta_diffs_and_terminal_messages(server: TestServer) {
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let writer = share(&agent, "ses_rec").await.writer;
        writer
            .append(&batch("setup", session_ops("ses_rec", "msg_1", 1)))
            .await
            .unwrap();
        let part = "msg_1_p0000";
        let delta = |id: &str, text: &str| {
            OpSpec::new(
                id,
                OpKind::PartDelta,
                json!({"partID": part, "messageID": "msg_1", "delta": text}),
            )
        };
        let diffs = |id: &str, files: &[&str]| {
            let list: Vec<_> = files
                .iter()
                .map(|f| json!({"file": f, "additions": 1, "deletions": 0}))
                .collect();
            OpSpec::new(id, OpKind::DiffSet, json!({"diffs": list}))
        };
        let completed = OpSpec::new(
            "msg_1:done",
            OpKind::MessageUpsert,
            json!({"id": "msg_1", "sessionID": "ses_rec", "role": "assistant", "time": {"created": 1, "completed": 2}}),
        );
        let mut stale = message_op("ses_rec", "msg_1", "assistant");
        stale.op_id = "msg_1:stale".into();
        let ack = writer
            .append(&batch(
                "b2",
                vec![
                    delta("d1", " and more"),
                    delta("d2", "!"),
                    diffs("diff1", &["a.rs", "b.rs"]),
                    diffs("diff2", &["c.rs"]),
                    completed,
                    stale,
                ],
            ))
            .await
            .unwrap();
        assert!(
            matches!(
                ack.results[5].outcome,
                OpOutcome::Rejected {
                    reason: RejectReason::StaleTransition,
                    ..
                }
            ),
            "{:?}",
            ack.results[5]
        );
        // A replay of the delta must not append twice.
        writer
            .append(&batch("b2-replay", vec![delta("d1", " and more")]))
            .await
            .unwrap();

        let doc = writer.viewer().snapshot().await.unwrap().to_document();
        let text = doc.messages[0].parts[0]["text"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(text, format!("text of {part} and more!"));
        assert_eq!(
            doc.diffs,
            Some(json!([{"file": "c.rs", "additions": 1, "deletions": 0}]))
        );
        assert_eq!(doc.messages[0].info["time"]["completed"], 2);
    });
}

#[test]
fn a_large_session_snapshots_in_bounded_pages_that_add_up_to_the_whole() {
    let server = TestServer::start();
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let writer = share(&agent, "ses_big").await.writer;
        let mut ops = session_ops("ses_big", "msg_1", 0);
        ops.push(message_op("ses_big", "msg_2", "user"));
        for m in ["msg_1", "msg_2"] {
            for i in 0..150 {
                let mut part = text_part_op("ses_big", m, &format!("{m}_prt_{i:03}"));
                part.payload["text"] = json!("y".repeat(500));
                ops.push(part);
            }
        }
        for chunk in ops.chunks(100) {
            writer
                .append(&batch(&format!("b{}", chunk[0].op_id), chunk.to_vec()))
                .await
                .unwrap();
        }
        let viewer = writer.viewer();
        let mut page_token = String::new();
        let mut pages = 0;
        let mut records = Vec::new();
        loop {
            let page = viewer.snapshot_page(&page_token, 16 * 1024).await.unwrap();
            pages += 1;
            let bytes: usize = page.records.iter().map(|r| r.json.len()).sum();
            assert!(
                bytes <= 16 * 1024 + 1024,
                "a page stays near its byte budget ({bytes})"
            );
            records.extend(page.records);
            match page.next_page {
                Some(next) => page_token = next,
                None => break,
            }
        }
        assert!(pages > 5, "{pages} pages");
        // session + 2 messages + 300 parts, each exactly once, messages before their parts.
        assert_eq!(records.len(), 303);
        let ids: HashSet<_> = records.iter().map(|r| (r.kind, r.id.clone())).collect();
        assert_eq!(ids.len(), 303);
        let doc = viewer.snapshot().await.unwrap().to_document();
        assert_eq!(doc.messages.len(), 2);
        assert!(doc.messages.iter().all(|m| m.parts.len() == 150));
    });
}
