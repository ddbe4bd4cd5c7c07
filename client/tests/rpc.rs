//! The client library's RPC plumbing against an in-memory fake server: connect, redeem,
//! every capability wrapper, failures, paging. Behaviour of the real server is tested in
//! the workspace's `tests/` crate.

#[path = "support/fake_server.rs"]
mod fake_server;

use capsync_client::{
    Batch, ClientError, ErrorCode, NewShare, OpKind, OpOutcome, OpSpec, RejectReason, Scope,
    SessionExport, TokenKind, connect, push_ops,
};
use serde_json::json;

fn run_local<F: std::future::Future>(body: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&runtime, body)
}

fn sample_export() -> SessionExport {
    SessionExport::from_value(&json!({
        "info": {"id": "ses_1", "title": "Sample"},
        "models": [{"id": "model-a"}],
        "diffs": [{"file": "a.rs"}],
        "messages": [
            {"info": {"id": "msg_1", "role": "user"},
             "parts": [{"id": "prt_1", "type": "text", "text": "hi"}]},
            {"info": {"id": "msg_2", "role": "assistant"},
             "parts": [{"id": "prt_2", "type": "text", "text": "hello"},
                       {"id": "prt_3", "type": "tool", "tool": "bash", "state": {"status": "completed"}}]}
        ]
    }))
    .unwrap()
}

#[test]
fn a_share_round_trip_through_every_capability() {
    run_local(async {
        let (addr, world) = fake_server::start_local().await;
        let admin_token = world.borrow().admin_token.clone();
        let conn = connect(addr).await.unwrap();

        let admin = conn
            .redeem(&admin_token)
            .await
            .unwrap()
            .into_admin()
            .unwrap();
        let minted = admin
            .mint_agent("test", Some(4_000_000_000_000))
            .await
            .unwrap();
        assert_eq!(minted.expires_at, Some(4_000_000_000_000));
        assert!(minted.token.contains(&minted.token_id));

        let agent = conn
            .redeem(&minted.token)
            .await
            .unwrap()
            .into_agent()
            .unwrap();
        assert_eq!(agent.token_id(), minted.token_id);
        let created = agent
            .create_share(NewShare {
                session_id: "ses_1".into(),
                title: "Sample".into(),
                viewer_expires_at: Some(5_000_000_000_000),
                ..NewShare::default()
            })
            .await
            .unwrap();
        assert_eq!(created.info.session_id, "ses_1");
        assert_eq!(created.info.parent_session_id, None);
        assert_eq!(created.info.owner_token_id, minted.token_id);
        assert_eq!(created.viewer_token.expires_at, Some(5_000_000_000_000));
        assert_eq!(created.writer_token.expires_at, None);
        let share_id = created.info.state.share_id.clone();
        assert_eq!(created.writer.share_id(), share_id);
        assert_eq!(created.writer.token_id(), created.writer_token.token_id);

        // Push the export twice: everything applies once, then everything is a duplicate.
        let export = sample_export();
        let ops = export.to_ops();
        let first = push_ops(&created.writer, &ops, 3, |_| {}).await.unwrap();
        assert_eq!(first.applied, ops.len());
        assert_eq!(first.batches, 3);
        assert_eq!(first.cursor, ops.len() as u64);
        assert!(first.rejected.is_empty());
        let again = push_ops(&created.writer, &ops, 3, |_| {}).await.unwrap();
        assert_eq!(again.applied, 0);
        assert_eq!(again.duplicates, ops.len());
        assert_eq!(again.cursor, first.cursor);

        // A redeemed writer sees the same share; its state at redeem is current.
        let writer = conn
            .redeem(&created.writer_token.token)
            .await
            .unwrap()
            .into_writer()
            .unwrap();
        assert_eq!(writer.state_at_redeem().cursor, first.cursor);
        assert_eq!(writer.state().await.unwrap(), *writer.state_at_redeem());

        // The viewer token reads the same state the export describes.
        let viewer = conn
            .redeem(&created.viewer_token.token)
            .await
            .unwrap()
            .into_viewer()
            .unwrap();
        assert_eq!(
            viewer.token_id(),
            Some(created.viewer_token.token_id.as_str())
        );
        let snapshot = viewer.snapshot().await.unwrap();
        assert_eq!(snapshot.cursor, first.cursor);
        let document = snapshot.to_document();
        assert!(
            document.same_content(&export.to_document()),
            "{:#}\n!=\n{:#}",
            document.to_json(),
            export.to_document().to_json()
        );
        assert_eq!(document.messages[1].parts.len(), 2);

        // The writer's derived viewer reads the same.
        let derived = writer.viewer();
        assert_eq!(derived.token_id(), None);
        assert_eq!(derived.snapshot().await.unwrap(), snapshot);

        // Ops since a cursor, paged.
        let page = viewer.ops_since(2, 3).await.unwrap();
        assert_eq!(page.cursor, first.cursor);
        let cursors: Vec<u64> = page.ops.iter().map(|op| op.cursor).collect();
        assert_eq!(cursors, vec![3, 4, 5]);
        assert!(page.has_more());
        assert_eq!(page.ops[0].op_id, ops[2].op_id);
        assert_eq!(page.ops[0].kind, ops[2].kind);
        let payload: serde_json::Value = serde_json::from_str(&page.ops[0].payload).unwrap();
        assert_eq!(payload, ops[2].payload);

        // Mint and save.
        let viewer2 = writer.mint_viewer(None).await.unwrap();
        assert!(viewer2.token.starts_with("csviewer_"));
        let saved = writer.save().await.unwrap();
        let again = conn.redeem(&saved.token).await.unwrap();
        assert_eq!(again.kind(), TokenKind::Writer);

        // Listing.
        let list = agent.list_shares("", 0).await.unwrap();
        assert_eq!(list.shares.len(), 1);
        assert_eq!(list.next_after, None);
        let list = admin.list_shares("", 0).await.unwrap();
        assert_eq!(list.shares[0].state.share_id, share_id);

        // The owner unshares: writers stop working at once.
        let state = agent.revoke_share(&share_id, Scope::Writers).await.unwrap();
        assert_eq!(state.writer_epoch, 1);
        let err = writer.append(&Batch::new("b", vec![])).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Revoked), "{err}");
        assert_eq!(err.to_string(), "revoked: writer revoked");
        // Viewers still work.
        viewer.state().await.unwrap();
        let state = admin.revoke_share(&share_id, Scope::All).await.unwrap();
        assert_eq!((state.writer_epoch, state.viewer_epoch), (2, 1));
        let err = viewer.snapshot().await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Revoked));

        conn.disconnect().await.unwrap();
    });
}

#[test]
fn per_op_outcomes_and_whole_batch_failures() {
    run_local(async {
        let (addr, world) = fake_server::start_local().await;
        let admin_token = world.borrow().admin_token.clone();
        let conn = connect(addr).await.unwrap();
        let admin = conn
            .redeem(&admin_token)
            .await
            .unwrap()
            .into_admin()
            .unwrap();
        let agent_token = admin.mint_agent("", None).await.unwrap().token;
        let agent = conn
            .redeem(&agent_token)
            .await
            .unwrap()
            .into_agent()
            .unwrap();
        let share = agent
            .create_share(NewShare {
                session_id: "ses_1".into(),
                ..NewShare::default()
            })
            .await
            .unwrap();
        let writer = share.writer;

        let batch = Batch::new(
            "b1",
            vec![
                OpSpec::new("s", OpKind::SessionUpsert, json!({"id": "ses_1"})),
                OpSpec::new("bad", OpKind::SessionUpsert, json!({"id": "other"})),
                OpSpec::new(
                    "p",
                    OpKind::PartUpsert,
                    json!({"id": "p", "messageID": "nope"}),
                ),
                OpSpec {
                    depends_on: vec!["s".into()],
                    ..OpSpec::new("m", OpKind::MessageUpsert, json!({"id": "m"}))
                },
                OpSpec::new("s", OpKind::SessionUpsert, json!({"id": "ses_1"})),
            ],
        );
        let ack = writer.append(&batch).await.unwrap();
        assert_eq!(ack.cursor, 2);
        assert_eq!((ack.applied(), ack.duplicates(), ack.rejected()), (2, 1, 2));
        assert_eq!(ack.results[0].outcome, OpOutcome::Applied(1));
        assert_eq!(ack.results[4].outcome, OpOutcome::Duplicate(1));
        assert!(matches!(
            ack.results[1].outcome,
            OpOutcome::Rejected {
                reason: RejectReason::Invalid,
                ..
            }
        ));
        let rejections: Vec<_> = ack
            .rejections()
            .map(|(id, reason, _)| (id, reason))
            .collect();
        assert_eq!(
            rejections,
            vec![
                ("bad", RejectReason::Invalid),
                ("p", RejectReason::MissingDependency)
            ]
        );

        // A stale writer is fenced, and told the current cursor.
        let mut fenced = Batch::new("b2", vec![OpSpec::new("x", OpKind::DiffSet, json!([]))]);
        fenced.expected_cursor = Some(1);
        let err = writer.append(&fenced).await.unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Remote {
                    code: ErrorCode::CursorConflict,
                    cursor: 2,
                    ..
                }
            ),
            "{err:?}"
        );
        fenced.expected_cursor = Some(2);
        assert_eq!(writer.append(&fenced).await.unwrap().cursor, 3);

        // push_ops resends ops whose dependency came later in the list.
        let out_of_order = vec![
            OpSpec::new(
                "p2",
                OpKind::PartUpsert,
                json!({"id": "p2", "messageID": "m2"}),
            ),
            OpSpec::new("m2", OpKind::MessageUpsert, json!({"id": "m2"})),
            OpSpec::new("bad2", OpKind::SessionUpsert, json!({"id": "zzz"})),
        ];
        let report = push_ops(&writer, &out_of_order, 10, |_| {}).await.unwrap();
        assert_eq!(report.applied, 2);
        assert_eq!(report.batches, 2);
        assert_eq!(report.rejected.len(), 1);
        assert_eq!(report.rejected[0].op_id, "bad2");
        assert!(report.has_errors());
    });
}

#[test]
fn redeem_failures_and_wrong_kinds() {
    run_local(async {
        let (addr, world) = fake_server::start_local().await;
        let admin_token = world.borrow().admin_token.clone();
        let conn = connect(addr).await.unwrap();

        for bad in ["", "nonsense", "csadmin_0000000000000000_00"] {
            let err = conn.redeem(bad).await.unwrap_err();
            assert_eq!(
                err.code(),
                Some(ErrorCode::PermissionDenied),
                "{bad:?}: {err}"
            );
        }

        let err = conn
            .redeem(&admin_token)
            .await
            .unwrap()
            .into_viewer()
            .unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::WrongKind {
                    expected: TokenKind::Viewer,
                    got: TokenKind::Admin
                }
            ),
            "{err:?}"
        );
        assert!(!err.to_string().contains(&admin_token));
        // Admin is not a reader either.
        let err = conn
            .redeem(&admin_token)
            .await
            .unwrap()
            .into_reader()
            .unwrap_err();
        assert!(matches!(err, ClientError::WrongKind { .. }));
    });
}

#[test]
fn snapshots_start_over_when_the_share_changes_between_pages() {
    run_local(async {
        let (addr, world) = fake_server::start_local().await;
        let admin_token = world.borrow().admin_token.clone();
        let conn = connect(addr).await.unwrap();
        let admin = conn
            .redeem(&admin_token)
            .await
            .unwrap()
            .into_admin()
            .unwrap();
        let agent_token = admin.mint_agent("", None).await.unwrap().token;
        let agent = conn
            .redeem(&agent_token)
            .await
            .unwrap()
            .into_agent()
            .unwrap();
        let share = agent
            .create_share(NewShare {
                session_id: "ses_1".into(),
                ..NewShare::default()
            })
            .await
            .unwrap();
        push_ops(&share.writer, &sample_export().to_ops(), 0, |_| {})
            .await
            .unwrap();
        let viewer = share.writer.viewer();

        // Pages are one record each here, so paging is exercised.
        let first = viewer.snapshot_page("", 0).await.unwrap();
        assert_eq!(first.records.len(), 1);
        assert!(first.next_page.is_some());

        // Two changes during reading: the third attempt succeeds at the newer cursor.
        let before = viewer.state().await.unwrap().cursor;
        world.borrow_mut().churn = 2;
        let snapshot = viewer.snapshot().await.unwrap();
        assert_eq!(snapshot.cursor, before + 2);
        assert_eq!(snapshot.records.len(), 8);

        // A share that never holds still gives up with a clear error.
        world.borrow_mut().churn = 100;
        let err = viewer.snapshot().await.unwrap_err();
        assert!(
            matches!(err, ClientError::SnapshotUnstable { attempts: 4 }),
            "{err:?}"
        );
    });
}

#[test]
fn calls_after_disconnect_fail_as_disconnected() {
    run_local(async {
        let (addr, world) = fake_server::start_local().await;
        let admin_token = world.borrow().admin_token.clone();
        let conn = connect(addr).await.unwrap();
        let admin = conn
            .redeem(&admin_token)
            .await
            .unwrap()
            .into_admin()
            .unwrap();
        conn.disconnect().await.unwrap();
        let err = admin.list_shares("", 0).await.unwrap_err();
        assert!(err.is_disconnected(), "{err:?}");
        assert_eq!(err.code(), None);
    });
}

#[test]
fn connecting_to_nothing_names_the_address() {
    run_local(async {
        // Bind then drop, so the port is very likely closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = connect(("127.0.0.1", port)).await.unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with(&format!("could not connect to 127.0.0.1:{port}")),
            "{err}"
        );
    });
}
