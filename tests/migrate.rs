//! `capsync-server migrate`: a SQLite server's ledger moved into PostgreSQL keeps
//! working as it was: every token (and every revoked one stays revoked), every link,
//! cursor and compaction point, and a resent op is still a duplicate. Skips without a
//! PostgreSQL (`CAPSYNC_TEST_POSTGRES`).

use std::time::Duration;

use serde_json::json;

use capsync_client::{ClientError, ErrorCode, OpKind, OpOutcome, OpSpec, Scope};
use capsync_tests::{
    TestServer, admin, agent, ago, batch, message_op, run_local, session_ops, share,
};

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

fn code<T: std::fmt::Debug>(result: Result<T, ClientError>) -> Option<ErrorCode> {
    result.expect_err("expected a failure").code()
}

#[test]
fn a_sqlite_ledger_moved_to_postgres_keeps_every_token_link_cursor_and_duplicate() {
    let mut server = TestServer::start();
    let old_ops = session_ops("ses_m", "msg_1", 4);
    let (admin_token, agent_token, kept, revoked_writer, snapshot) = run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, agent_token) = agent(&conn, &admin).await;
        // A share whose first ops are old enough to be compacted.
        let kept = ago(&server, 40 * DAY, async {
            let created = share(&agent, "ses_m").await;
            created
                .writer
                .append(&batch("old", old_ops.clone()))
                .await
                .unwrap();
            created
        })
        .await;
        // Text streamed into a part is kept apart from it until its next snapshot.
        let streamed = (0..3).map(|n| {
            OpSpec::new(
                format!("delta:{n}"),
                OpKind::PartDelta,
                json!({"partID": "msg_1_p0000", "delta": format!(" streamed {n}")}),
            )
        });
        let mut new_ops = vec![message_op("ses_m", "msg_2", "user")];
        new_ops.extend(streamed);
        kept.writer.append(&batch("new", new_ops)).await.unwrap();
        let compacted = admin.compact_ledger(30 * DAY, false, None).await.unwrap();
        assert!(compacted.ops > 0);
        // A share whose writers were revoked.
        let other = share(&agent, "ses_r").await;
        agent
            .revoke_share(&other.info.state.share_id, Scope::Writers)
            .await
            .unwrap();
        let snapshot = kept.writer.viewer().snapshot().await.unwrap();
        let text = snapshot
            .records
            .iter()
            .find(|r| r.id == "msg_1_p0000")
            .map(|r| serde_json::from_str::<serde_json::Value>(&r.json).unwrap()["text"].clone());
        assert_eq!(
            text,
            Some(json!(
                "text of msg_1_p0000 streamed 0 streamed 1 streamed 2"
            ))
        );
        (
            server.admin_token(),
            agent_token,
            kept,
            other.writer_token.token,
            snapshot,
        )
    });
    server.stop();
    let Some(report) = server.migrate_to_postgres() else {
        return;
    };
    let moved: u64 = report.tables.iter().map(|(_, rows)| rows).sum();
    assert!(moved > 0, "{report:?}");
    server.start_again();

    run_local(async {
        let conn = capsync_client::connect(server.addr()).await.unwrap();
        let admin = conn
            .redeem(&admin_token)
            .await
            .unwrap()
            .into_admin()
            .unwrap();
        assert_eq!(
            admin.list_shares("", 0, false).await.unwrap().shares.len(),
            2
        );
        let agent = conn
            .redeem(&agent_token)
            .await
            .unwrap()
            .into_agent()
            .unwrap();
        assert_eq!(
            agent.list_shares("", 0, false).await.unwrap().shares.len(),
            2
        );

        // The link (the viewer token) reads the same session at the same cursor.
        let viewer = conn
            .redeem(&kept.viewer_token.token)
            .await
            .unwrap()
            .into_viewer()
            .unwrap();
        assert_eq!(viewer.snapshot().await.unwrap(), snapshot);
        // Below the compaction point, a snapshot is still required.
        assert_eq!(
            code(viewer.ops_since(0, 0).await),
            Some(ErrorCode::SnapshotRequired)
        );

        // The writer token works, and an op sent again is a duplicate at its old cursor.
        let writer = conn
            .redeem(&kept.writer_token.token)
            .await
            .unwrap()
            .into_writer()
            .unwrap();
        let again = writer.append(&batch("old", old_ops.clone())).await.unwrap();
        assert_eq!(again.cursor, snapshot.cursor, "nothing applied again");
        assert!(
            again
                .results
                .iter()
                .all(|r| matches!(r.outcome, OpOutcome::Duplicate(_))),
            "{again:?}"
        );
        let next = writer
            .append(&batch("after", vec![message_op("ses_m", "msg_3", "user")]))
            .await
            .unwrap();
        assert_eq!(next.cursor, snapshot.cursor + 1);

        // A revoked token stays revoked.
        assert_eq!(
            code(conn.redeem(&revoked_writer).await),
            Some(ErrorCode::PermissionDenied)
        );
    });
}
