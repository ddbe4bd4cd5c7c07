//! Reclaiming compacted tool output, ledger compaction, the automatic lifecycle
//! and housekeeping (issue 5), through the client API against a real server.

use std::time::{Duration, Instant};

use capsync_client::{ClientError, ErrorCode, OpKind, OpSpec, ProgressUpdate, RecordKind};
use capsync_tests::{
    TestServer, admin, agent, ago, batch, capsync, child_share, database_check, message_op,
    run_local, session_ops, share, viewer_of,
};
use serde_json::{Value, json};

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// A completed bash tool part with a long output and an attachment; compacted
/// (at `compacted`) or not.
fn tool_part(session: &str, message: &str, id: &str, compacted: Option<i64>) -> Value {
    let mut time = json!({"start": 1, "end": 2});
    if let Some(at) = compacted {
        time["compacted"] = at.into();
    }
    json!({
        "id": id, "messageID": message, "sessionID": session, "type": "tool",
        "callID": format!("call_{id}"), "tool": "bash",
        "state": {
            "status": "completed",
            "input": {"command": "cargo test"},
            "output": "test result: ok. ".repeat(500),
            "title": "cargo test",
            "metadata": {"exit": 0},
            "time": time,
            "attachments": [{"type": "file", "mime": "text/plain", "url": "data:text/plain;base64,aGVsbG8="}],
        },
    })
}

fn part_op(op_id: &str, part: Value) -> OpSpec {
    OpSpec::new(op_id, OpKind::PartUpsert, part)
}

/// The stored JSON of every part, by part id.
async fn stored_parts(viewer: &capsync_client::ViewerClient) -> Vec<(String, Value)> {
    viewer
        .snapshot()
        .await
        .unwrap()
        .records
        .into_iter()
        .filter(|r| r.kind == RecordKind::Part)
        .map(|r| (r.id.clone(), serde_json::from_str(&r.json).unwrap()))
        .collect()
}

#[test]
fn a_retroactive_reclaim_clears_only_compacted_tool_parts() {
    // Written with reclaim off, as a server before this setting would have.
    let server = TestServer::start_with(|config| config.reclaim = false);
    let (session, message) = ("ses_tools", "msg_1");
    let sent = [
        ("prt_a", tool_part(session, message, "prt_a", Some(10))),
        ("prt_b", tool_part(session, message, "prt_b", None)),
        (
            "prt_c",
            json!({"id": "prt_c", "messageID": message, "sessionID": session, "type": "text", "text": "compacted"}),
        ),
    ];
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let created = share(&agent, session).await;
        let mut ops = session_ops(session, message, 0);
        ops.extend(sent.iter().map(|(id, part)| part_op(id, part.clone())));
        created.writer.append(&batch("b1", ops)).await.unwrap();
        let viewer = viewer_of(&conn, &created).await;
        assert_eq!(stored_parts(&viewer).await.len(), 3);
        let stats = admin.stats().await.unwrap();
        assert!(stats.reclaimable_output_bytes > 8000, "{stats:?}");

        let progress = std::rc::Rc::new(std::cell::RefCell::new(Vec::<ProgressUpdate>::new()));
        let seen = progress.clone();
        let dry = admin
            .reclaim(true, Some(Box::new(move |p| seen.borrow_mut().push(p))))
            .await
            .unwrap();
        assert_eq!((dry.parts_scanned, dry.parts_cleared), (1, 1));
        assert!(dry.bytes_reclaimed > 8000);
        assert_eq!(
            progress.borrow().last().map(|p| p.stage.as_str()),
            Some("reclaim")
        );
        // Nothing changed in the dry run.
        assert_eq!(
            admin.stats().await.unwrap().reclaimable_output_bytes,
            stats.reclaimable_output_bytes
        );

        let real = admin.reclaim(false, None).await.unwrap();
        assert_eq!(
            (real.parts_scanned, real.parts_cleared, real.bytes_reclaimed),
            (dry.parts_scanned, dry.parts_cleared, dry.bytes_reclaimed)
        );
        let parts = stored_parts(&viewer).await;
        let by_id = |id: &str| parts.iter().find(|(p, _)| p == id).unwrap().1.clone();
        // The compacted tool part lost output and attachments, and nothing else.
        let mut expected = sent[0].1.clone();
        expected["state"]["output"] = "".into();
        expected["state"]["attachments"] = json!([]);
        assert_eq!(by_id("prt_a"), expected);
        assert_eq!(
            by_id("prt_b"),
            sent[1].1,
            "an uncompacted tool part is untouched"
        );
        assert_eq!(by_id("prt_c"), sent[2].1, "a text part is untouched");
        assert_eq!(admin.stats().await.unwrap().reclaimable_output_bytes, 0);
        let again = admin.reclaim(false, None).await.unwrap();
        assert_eq!((again.parts_cleared, again.bytes_reclaimed), (0, 0));
    });
}

#[test]
fn with_reclaim_on_a_part_marked_compacted_is_stored_without_its_output() {
    let server = TestServer::start();
    let (session, message) = ("ses_tools", "msg_1");
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let created = share(&agent, session).await;
        let mut ops = session_ops(session, message, 0);
        ops.push(part_op(
            "prt_b:open",
            tool_part(session, message, "prt_b", None),
        ));
        ops.push(part_op(
            "prt_b:compact",
            tool_part(session, message, "prt_b", Some(99)),
        ));
        created.writer.append(&batch("b1", ops)).await.unwrap();
        let viewer = viewer_of(&conn, &created).await;
        let parts = stored_parts(&viewer).await;
        assert_eq!(parts[0].1["state"]["output"], "");
        assert_eq!(parts[0].1["state"]["attachments"], json!([]));
        assert_eq!(
            parts[0].1["state"]["input"],
            json!({"command": "cargo test"})
        );
        // The ledger keeps the cleared version too, so replaying ops shows the same.
        let ops = viewer.ops_since(0, 0).await.unwrap().ops;
        let last: Value = serde_json::from_str(&ops.last().unwrap().payload).unwrap();
        assert_eq!(last, parts[0].1);
        assert_eq!(admin.stats().await.unwrap().reclaimable_output_bytes, 0);
    });
}

#[test]
fn compaction_keeps_op_ids_and_sends_viewers_below_it_to_a_snapshot() {
    let server = TestServer::start();
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let old_ops = session_ops("ses_c", "msg_1", 4);
        let created = ago(&server, 40 * DAY, async {
            let created = share(&agent, "ses_c").await;
            created
                .writer
                .append(&batch("old", old_ops.clone()))
                .await
                .unwrap();
            created
        })
        .await;
        created
            .writer
            .append(&batch("new", vec![message_op("ses_c", "msg_2", "user")]))
            .await
            .unwrap();

        let dry = admin.compact_ledger(30 * DAY, true, None).await.unwrap();
        let real = admin.compact_ledger(30 * DAY, false, None).await.unwrap();
        assert_eq!(
            (dry.shares, dry.ops, dry.bytes),
            (real.shares, real.ops, real.bytes)
        );
        assert_eq!((real.shares, real.ops), (1, 6));
        assert!(real.bytes > 0);
        assert_eq!(admin.stats().await.unwrap().compacted_ops, 6);

        let viewer = viewer_of(&conn, &created).await;
        match viewer.ops_since(2, 0).await {
            Err(ClientError::Remote { code, cursor, .. }) => {
                assert_eq!(code, ErrorCode::SnapshotRequired);
                assert_eq!(cursor, 6, "the compaction point");
            }
            other => panic!("expected snapshotRequired, got {other:?}"),
        }
        let tail = viewer.ops_since(6, 0).await.unwrap();
        assert_eq!(tail.ops.len(), 1);
        assert_eq!(tail.ops[0].op_id, "msg:msg_2");
        match viewer.subscribe(0).await {
            Err(err) => assert_eq!(err.code(), Some(ErrorCode::SnapshotRequired)),
            Ok(_) => panic!("subscribing below the compaction point must fail"),
        }
        // A client that resumes from an old cursor gets a snapshot and goes on.
        let resumed = viewer.resume(3).await.unwrap();
        assert!(resumed.rebased.is_some());
        // The snapshot still holds everything; dedupe still knows the old ops.
        // session, two messages, four parts
        assert_eq!(viewer.snapshot().await.unwrap().records.len(), 7);
        let retry = created
            .writer
            .append(&batch("old-again", old_ops))
            .await
            .unwrap();
        assert_eq!(retry.applied(), 0, "compacted ops are still deduplicated");
        assert_eq!(retry.cursor, 7);
    });
}

#[test]
fn the_automatic_lifecycle_archives_inactive_shares_and_drops_old_children() {
    let server = TestServer::start_with(|config| {
        config.lifecycle_interval = Duration::from_millis(50);
        config.auto_archive_after = "30d".parse().unwrap();
        config.child_retention = "7d".parse().unwrap();
    });
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let idle = ago(&server, 31 * DAY, share(&agent, "ses_idle")).await;
        let busy = share(&agent, "ses_busy").await;
        let old_child = ago(
            &server,
            8 * DAY,
            child_share(&agent, "ses_kid_old", "prj_x", Some("ses_busy")),
        )
        .await;
        let new_child = child_share(&agent, "ses_kid_new", "prj_x", Some("ses_busy")).await;

        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let all = admin.list_shares("", 0, true).await.unwrap().shares;
            let archived: Vec<&str> = all
                .iter()
                .filter(|s| s.archived_at.is_some())
                .map(|s| s.state.share_id.as_str())
                .collect();
            let child_gone = all
                .iter()
                .all(|s| s.state.share_id != old_child.info.state.share_id);
            if archived == [idle.info.state.share_id.as_str()] && child_gone {
                break;
            }
            assert!(Instant::now() < deadline, "lifecycle did not act: {all:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            old_child.writer.state().await.unwrap_err().code(),
            Some(ErrorCode::NotFound)
        );
        busy.writer.state().await.unwrap();
        new_child.writer.state().await.unwrap();
        database_check(&server).unwrap();
    });
}

#[test]
fn housekeeping_truncates_the_log_after_load_without_any_admin_action() {
    let server = TestServer::start_with(|config| {
        config.housekeeping_interval = Duration::from_millis(30);
    });
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let created = share(&agent, "ses_load").await;
        for round in 0..20 {
            created
                .writer
                .append(&batch(
                    &format!("b{round}"),
                    session_ops("ses_load", &format!("msg_{round}"), 50),
                ))
                .await
                .unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if admin.stats().await.unwrap().wal_file_bytes == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "the log was never truncated");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

#[test]
fn the_cli_compacts_and_reclaims_with_json_reports() {
    let server = TestServer::start();
    run_local(async {
        let token = server.admin_token();
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        ago(&server, 3 * DAY, async {
            let created = share(&agent, "ses_cli").await;
            created
                .writer
                .append(&batch("b", session_ops("ses_cli", "msg_1", 3)))
                .await
                .unwrap();
        })
        .await;
        let compact = capsync(
            &server,
            &token,
            &["--json", "admin", "compact", "--older-than", "2d"],
        )
        .await;
        assert_eq!(compact.code, 0, "{}", compact.stderr);
        let report: Value = serde_json::from_str(&compact.stdout).unwrap();
        assert_eq!(report["ops"], 5);
        assert_eq!(report["dryRun"], false);
        let reclaim = capsync(
            &server,
            &token,
            &["--json", "admin", "reclaim", "--dry-run"],
        )
        .await;
        assert_eq!(reclaim.code, 0, "{}", reclaim.stderr);
        let report: Value = serde_json::from_str(&reclaim.stdout).unwrap();
        assert_eq!(report["partsCleared"], 0);
        let stats = capsync(&server, &token, &["--json", "admin", "stats"]).await;
        let stats: Value = serde_json::from_str(&stats.stdout).unwrap();
        assert_eq!(stats["compactedOps"], 5);
    });
}
