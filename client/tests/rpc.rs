//! The client library against the real server (started on 127.0.0.1:0 by
//! `support::TestServer`): connect, redeem, every capability wrapper, per-op outcomes,
//! `push_ops`, paging, failures.

use crate::support;

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use capsync_client::{
    Batch, ClientError, ClientOptions, ErrorCode, ForeignReply, NewShare, OpKind, OpOutcome,
    OpSpec, RejectReason, Scope, SessionExport, TimeoutStage, TokenKind, WriterClient, connect,
    connect_with, push_ops,
};
use capsync_shared::Cursor;
use serde_json::json;
use support::peers::HoldingRelay;
use support::{TestServer, run_local};

/// Upper bound on waits that must end much sooner; a test fails rather than hangs.
const GUARD: Duration = Duration::from_secs(30);

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

fn new_share(session_id: &str) -> NewShare {
    NewShare {
        session_id: session_id.into(),
        ..NewShare::default()
    }
}

fn message(id: &str) -> OpSpec {
    OpSpec::new(
        format!("msg:{id}"),
        OpKind::MessageUpsert,
        json!({"id": id, "role": "assistant"}),
    )
}

fn text_part(id: &str, message_id: &str) -> OpSpec {
    OpSpec::new(
        format!("part:{id}"),
        OpKind::PartUpsert,
        json!({"id": id, "messageID": message_id, "type": "text", "text": id}),
    )
}

fn rejection(outcome: &OpOutcome) -> Option<(RejectReason, &str)> {
    match outcome {
        OpOutcome::Rejected { reason, detail } => Some((*reason, detail.as_str())),
        _ => None,
    }
}

#[test]
fn a_share_round_trip_through_every_capability() {
    let server = TestServer::start();
    run_local(async {
        let conn = connect(server.addr()).await.unwrap();
        assert_eq!(conn.peer_addr(), server.addr());

        let admin = conn
            .redeem(&server.admin_token())
            .await
            .unwrap()
            .into_admin()
            .unwrap();
        let minted = admin
            .mint_agent("test", Some(4_000_000_000_000))
            .await
            .unwrap();
        assert_eq!(minted.expires_at, Some(4_000_000_000_000));
        assert!(minted.token.starts_with("csagent_"), "{}", minted.token);
        assert!(minted.token.contains(&minted.token_id));

        let agent = conn
            .redeem(&minted.token)
            .await
            .unwrap()
            .into_agent()
            .unwrap();
        assert_eq!(agent.token_id(), minted.token_id);
        assert_eq!(agent.expires_at(), Some(4_000_000_000_000));
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
        assert_eq!(created.info.title, "Sample");
        assert_eq!(created.info.parent_session_id, None);
        assert_eq!(created.info.owner_token_id, minted.token_id);
        assert_eq!(created.info.state.cursor, 0);
        assert_eq!(created.viewer_token.expires_at, Some(5_000_000_000_000));
        assert_eq!(created.writer_token.expires_at, None);
        assert!(created.writer_token.token.starts_with("cswriter_"));
        assert!(created.viewer_token.token.starts_with("csviewer_"));
        let share_id = created.info.state.share_id.clone();
        assert_eq!(created.writer.share_id(), share_id);
        assert_eq!(created.writer.token_id(), created.writer_token.token_id);

        // Push the export twice: everything applies once, then everything is a duplicate.
        let export = sample_export();
        let ops = export.to_ops();
        assert_eq!(ops.len(), 8);
        let mut progress = Vec::new();
        let first = push_ops(&created.writer, &ops, 3, |report| {
            progress.push(report.applied);
        })
        .await
        .unwrap();
        assert_eq!(progress, vec![3, 6, 8]);
        assert_eq!(first.applied, ops.len());
        assert_eq!(first.batches, 3);
        assert_eq!(first.cursor, ops.len() as u64);
        assert!(first.rejected.is_empty());
        assert!(!first.has_errors());
        let again = push_ops(&created.writer, &ops, 3, |_| {}).await.unwrap();
        assert_eq!(again.applied, 0);
        assert_eq!(again.duplicates, ops.len());
        assert_eq!(again.cursor, first.cursor);
        // Nothing to push: the report still carries the share's cursor.
        let nothing = push_ops(&created.writer, &[], 3, |_| {}).await.unwrap();
        assert_eq!((nothing.batches, nothing.cursor), (0, first.cursor));

        // A redeemed writer sees the same share; its state at redeem is current.
        let writer = conn
            .redeem(&created.writer_token.token)
            .await
            .unwrap()
            .into_writer()
            .unwrap();
        assert_eq!(writer.share_id(), share_id);
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
        assert_eq!(viewer.expires_at(), Some(5_000_000_000_000));
        let snapshot = viewer.snapshot().await.unwrap();
        assert_eq!(snapshot.cursor, first.cursor);
        assert_eq!(snapshot.records.len(), 8);
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

        // Ops since a cursor, paged, exactly as they were sent.
        let page = viewer.ops_since(2, 3).await.unwrap();
        assert_eq!(page.cursor, first.cursor);
        let cursors: Vec<u64> = page.ops.iter().map(|op| op.cursor.0).collect();
        assert_eq!(cursors, vec![3, 4, 5]);
        assert!(page.has_more());
        assert_eq!(page.ops[0].op_id.as_str(), ops[2].op_id);
        assert_eq!(page.ops[0].kind, ops[2].kind);
        assert!(page.ops[0].applied_at > 0);
        let payload: serde_json::Value = serde_json::from_str(&page.ops[0].payload).unwrap();
        assert_eq!(payload, ops[2].payload);
        let last = viewer.ops_since(5, 0).await.unwrap();
        assert_eq!(last.ops.len(), 3);
        assert!(!last.has_more());

        // Mint and save.
        let viewer2 = writer.mint_viewer(None).await.unwrap();
        assert!(viewer2.token.starts_with("csviewer_"));
        let saved = writer.save().await.unwrap();
        assert!(saved.token.starts_with("cswriter_"));
        let again = conn.redeem(&saved.token).await.unwrap();
        assert_eq!(again.kind(), TokenKind::Writer);

        // Listing.
        let list = agent.list_shares("", 0, false).await.unwrap();
        assert_eq!(list.shares.len(), 1);
        assert_eq!(list.shares[0].state.cursor, first.cursor);
        assert_eq!(list.next_after, None);
        let list = admin.list_shares("", 0, false).await.unwrap();
        assert_eq!(list.shares[0].state.share_id, share_id);

        // The owner unshares: writers stop working at once.
        let state = agent.revoke_share(&share_id, Scope::Writers).await.unwrap();
        assert_eq!((state.writer_epoch, state.viewer_epoch), (1, 0));
        let err = writer.append(&Batch::new("b", vec![])).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Revoked), "{err}");
        assert!(err.to_string().starts_with("revoked: "), "{err}");
        let err = conn.redeem(&created.writer_token.token).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::PermissionDenied), "{err}");
        // Viewers still work.
        viewer.state().await.unwrap();
        let state = admin.revoke_share(&share_id, Scope::All).await.unwrap();
        assert_eq!((state.writer_epoch, state.viewer_epoch), (2, 1));
        let err = viewer.snapshot().await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Revoked), "{err}");

        conn.disconnect().await.unwrap();
    });
}

#[test]
fn per_op_outcomes_and_whole_batch_failures() {
    let server = TestServer::start();
    run_local(async {
        let (conn, admin) = support::admin(&server).await;
        let (agent, _) = support::agent(&conn, &admin).await;
        let writer = agent.create_share(new_share("ses_1")).await.unwrap().writer;

        let batch = Batch::new(
            "b1",
            vec![
                OpSpec::new("s", OpKind::SessionUpsert, json!({"id": "ses_1"})),
                OpSpec::new("bad", OpKind::SessionUpsert, json!({"id": "other"})),
                // The server refuses a delta to a part that does not exist as `invalid`:
                // `missingDependency` is only about `dependsOn`.
                OpSpec::new(
                    "p",
                    OpKind::PartDelta,
                    json!({"partID": "nope", "delta": "x"}),
                ),
                OpSpec {
                    depends_on: vec!["later".into()],
                    ..message("early")
                },
                OpSpec {
                    depends_on: vec!["s".into()],
                    ..OpSpec::new(
                        "m",
                        OpKind::MessageUpsert,
                        json!({"id": "m", "role": "user", "time": {"completed": 5}}),
                    )
                },
                OpSpec::new("s", OpKind::SessionUpsert, json!({"id": "ses_1"})),
                // A completed message does not move back.
                OpSpec::new(
                    "m-again",
                    OpKind::MessageUpsert,
                    json!({"id": "m", "role": "user"}),
                ),
            ],
        );
        let ack = writer.append(&batch).await.unwrap();
        assert_eq!(ack.cursor, 2);
        assert_eq!(ack.results.len(), 7);
        assert_eq!((ack.applied(), ack.duplicates(), ack.rejected()), (2, 1, 4));
        assert_eq!(ack.results[0].outcome, OpOutcome::Applied(Cursor(1)));
        assert_eq!(ack.results[4].outcome, OpOutcome::Applied(Cursor(2)));
        assert_eq!(ack.results[5].outcome, OpOutcome::Duplicate(Cursor(1)));
        assert_eq!(
            rejection(&ack.results[1].outcome),
            Some((
                RejectReason::Invalid,
                "session id other is not this share's session ses_1"
            ))
        );
        let rejections: Vec<_> = ack
            .rejections()
            .map(|(id, reason, _)| (id, reason))
            .collect();
        assert_eq!(
            rejections,
            vec![
                ("bad", RejectReason::Invalid),
                ("p", RejectReason::Invalid),
                ("msg:early", RejectReason::MissingDependency),
                ("m-again", RejectReason::StaleTransition),
            ]
        );
        let (_, detail) = rejection(&ack.results[2].outcome).unwrap();
        assert!(detail.contains("nope"), "{detail}");

        // A stale writer is fenced, and told the current cursor.
        let mut fenced = Batch::new(
            "b2",
            vec![OpSpec::new("x", OpKind::DiffSet, json!({"diffs": []}))],
        );
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
        assert!(err.to_string().ends_with("(current cursor 2)"), "{err}");
        fenced.expected_cursor = Some(2);
        assert_eq!(writer.append(&fenced).await.unwrap().cursor, 3);

        // A malformed batch is refused whole.
        let err = writer
            .append(&Batch::new(
                "b3",
                vec![OpSpec::new("", OpKind::DiffSet, json!([]))],
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::InvalidArgument), "{err}");
        assert_eq!(writer.state().await.unwrap().cursor, 3);
    });
}

#[test]
fn push_resends_ops_whose_dependency_comes_later() {
    let server = TestServer::start();
    run_local(async {
        let (conn, admin) = support::admin(&server).await;
        let (agent, _) = support::agent(&conn, &admin).await;
        let writer = agent.create_share(new_share("ses_1")).await.unwrap().writer;

        let ops = vec![
            // Listed before the message it declares a dependency on: resent after it.
            OpSpec {
                depends_on: vec!["msg:m2".into()],
                ..text_part("p2", "m2")
            },
            message("m2"),
            OpSpec::new("bad2", OpKind::SessionUpsert, json!({"id": "zzz"})),
            // The same order without `dependsOn`: the part is kept until its message comes.
            text_part("p3", "m3"),
            message("m3"),
            // A dependency that never comes: given up once a round makes no progress.
            OpSpec {
                depends_on: vec!["ghost".into()],
                ..message("m4")
            },
        ];
        let report = push_ops(&writer, &ops, 10, |_| {}).await.unwrap();
        assert_eq!(report.ops, 6);
        assert_eq!(report.applied, 4, "{report:?}");
        // The first round, the round that applies p2, and one that makes no progress.
        assert_eq!(report.batches, 3, "{report:?}");
        assert_eq!(report.cursor, 4);
        let rejected: Vec<_> = report
            .rejected
            .iter()
            .map(|r| (r.op_id.as_str(), r.reason))
            .collect();
        assert_eq!(
            rejected,
            vec![
                ("bad2", RejectReason::Invalid),
                ("msg:m4", RejectReason::MissingDependency),
            ]
        );
        assert!(report.has_errors());

        // Pushing the same list again: what applied is a duplicate, the rest is refused again.
        let again = push_ops(&writer, &ops, 10, |_| {}).await.unwrap();
        assert_eq!((again.applied, again.duplicates), (0, 4), "{again:?}");
        assert_eq!(again.rejected.len(), 2);
        assert_eq!(again.cursor, 4);
    });
}

#[test]
fn push_splits_batches_the_server_refuses_as_too_large() {
    let server = TestServer::start_with(|config| config.max_ops_per_batch = 2);
    run_local(async {
        let (conn, admin) = support::admin(&server).await;
        let (agent, _) = support::agent(&conn, &admin).await;
        let writer = agent.create_share(new_share("ses_1")).await.unwrap().writer;

        let mut ops = vec![message("m")];
        ops.extend((0..4).map(|i| text_part(&format!("p{i}"), "m")));
        // One append of 5 ops is refused whole...
        let err = writer
            .append(&Batch::new("all", ops.clone()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::TooLarge), "{err}");
        // ...so push_ops halves it until the halves fit: [m p0] [p1] [p2 p3].
        let report = push_ops(&writer, &ops, 100, |_| {}).await.unwrap();
        assert_eq!((report.applied, report.batches), (5, 3), "{report:?}");
        assert_eq!(report.cursor, 5);
        // The ops applied in list order.
        let logged = writer.viewer().ops_since(0, 0).await.unwrap();
        let ids: Vec<&str> = logged.ops.iter().map(|op| op.op_id.as_str()).collect();
        let sent: Vec<&str> = ops.iter().map(|op| op.op_id.as_str()).collect();
        assert_eq!(ids, sent);
    });
}

#[test]
fn redeem_failures_and_wrong_kinds() {
    let server = TestServer::start();
    run_local(async {
        let conn = connect(server.addr()).await.unwrap();
        let admin_token = server.admin_token();

        let unknown =
            capsync_shared::SturdyRef::generate(capsync_shared::TokenKind::Admin).expose();
        // Right id, wrong secret.
        let (prefix, _) = admin_token.rsplit_once('_').unwrap();
        let wrong_secret = format!("{prefix}_{}", "0".repeat(64));
        // Right id and secret, another kind.
        let wrong_kind = admin_token.replacen("csadmin_", "cswriter_", 1);
        let mut answers = std::collections::BTreeSet::new();
        for bad in [
            "",
            "nonsense",
            "csadmin_0000000000000000_00",
            &unknown,
            &wrong_secret,
            &wrong_kind,
        ] {
            let err = conn.redeem(bad).await.unwrap_err();
            assert_eq!(
                err.code(),
                Some(ErrorCode::PermissionDenied),
                "{bad:?}: {err}"
            );
            let text = err.to_string();
            assert!(text.starts_with("permission denied"), "{text}");
            assert!(bad.is_empty() || !text.contains(bad), "{text}");
            answers.insert(text);
        }
        // One vague answer whatever the reason (malformed, unknown id, wrong secret or kind).
        assert_eq!(answers.len(), 1, "{answers:?}");

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
fn failed_redeems_are_limited_without_locking_out_valid_tokens() {
    let server = TestServer::start_with(|config| config.redeem_failures = 3);
    run_local(async {
        let conn = connect(server.addr()).await.unwrap();
        for _ in 0..3 {
            let err = conn.redeem("nonsense").await.unwrap_err();
            assert_eq!(err.code(), Some(ErrorCode::PermissionDenied), "{err}");
        }
        // More garbage from this address is turned away unchecked, with when to retry...
        let err = conn.redeem("nonsense").await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::RateLimited), "{err}");
        assert_eq!(err.code_str(), "rateLimited");
        assert!(err.to_string().contains("retry in"), "{err}");
        // ...while a real token from the same address still works.
        conn.redeem(&server.admin_token())
            .await
            .expect("a valid token is not locked out by someone else's failures")
            .into_admin()
            .unwrap();
    });
}

#[test]
fn agents_mint_writer_and_viewer_tokens_for_their_own_shares() {
    let server = TestServer::start();
    run_local(async {
        let (conn, admin) = support::admin(&server).await;
        let (agent, _) = support::agent(&conn, &admin).await;
        let created = agent.create_share(new_share("ses_1")).await.unwrap();
        let share_id = created.info.state.share_id.clone();
        let op = |i: u32| OpSpec::new(format!("d{i}"), OpKind::DiffSet, json!([]));

        // Unshare writers: the live writer and its token stop working.
        agent.revoke_share(&share_id, Scope::Writers).await.unwrap();
        let err = created
            .writer
            .append(&Batch::new("b", vec![op(1)]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Revoked), "{err}");

        // The owner mints a new writer at the new epoch, and it pushes.
        let minted = agent
            .mint_writer(&share_id, Some(4_000_000_000_000))
            .await
            .unwrap();
        assert!(minted.token.starts_with("cswriter_"), "{}", minted.token);
        assert_eq!(minted.expires_at, Some(4_000_000_000_000));
        let writer = conn
            .redeem(&minted.token)
            .await
            .unwrap()
            .into_writer()
            .unwrap();
        assert_eq!(writer.state_at_redeem().writer_epoch, 1);
        assert_eq!(writer.expires_at(), Some(4_000_000_000_000));
        let ack = writer.append(&Batch::new("b", vec![op(1)])).await.unwrap();
        assert_eq!(ack.results[0].outcome, OpOutcome::Applied(Cursor(1)));

        // Same for viewers.
        agent.revoke_share(&share_id, Scope::Viewers).await.unwrap();
        let err = conn.redeem(&created.viewer_token.token).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::PermissionDenied), "{err}");
        let minted = agent.mint_viewer(&share_id, None).await.unwrap();
        assert!(minted.token.starts_with("csviewer_"), "{}", minted.token);
        assert_eq!(minted.expires_at, None);
        let viewer = conn
            .redeem(&minted.token)
            .await
            .unwrap()
            .into_viewer()
            .unwrap();
        assert_eq!(viewer.state().await.unwrap().cursor, 1);

        // Another agent cannot mint for this share, nor can anyone for a share that does not exist.
        let (other, _) = support::agent(&conn, &admin).await;
        for (who, share) in [(&other, share_id.as_str()), (&agent, "sh_nope")] {
            let err = who.mint_writer(share, None).await.unwrap_err();
            assert_eq!(err.code(), Some(ErrorCode::NotFound), "{share}: {err}");
            let err = who.mint_viewer(share, None).await.unwrap_err();
            assert_eq!(err.code(), Some(ErrorCode::NotFound), "{share}: {err}");
        }
        // A negative expiry is the caller's mistake.
        let err = agent.mint_writer(&share_id, Some(-1)).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::InvalidArgument), "{err}");
    });
}

#[test]
fn create_share_can_join_the_agents_existing_share_of_a_session() {
    let server = TestServer::start();
    run_local(async {
        let (conn, admin) = support::admin(&server).await;
        let (agent, _) = support::agent(&conn, &admin).await;
        let join = |session: &str| NewShare {
            join_existing: true,
            ..new_share(session)
        };
        let first = agent.create_share(join("ses_1")).await.unwrap();
        assert!(!first.joined, "nothing to join yet");
        let share_id = first.info.state.share_id.clone();
        let again = agent.create_share(join("ses_1")).await.unwrap();
        assert!(again.joined);
        assert_eq!(again.info.state.share_id, share_id);
        assert_ne!(again.writer_token.token, first.writer_token.token);

        // Both writer tokens (and both live writers) write to the one share.
        let op = |i: u32| OpSpec::new(format!("d{i}"), OpKind::DiffSet, json!([]));
        first
            .writer
            .append(&Batch::new("a", vec![op(1)]))
            .await
            .unwrap();
        let redeemed = conn
            .redeem(&again.writer_token.token)
            .await
            .unwrap()
            .into_writer()
            .unwrap();
        let ack = redeemed
            .append(&Batch::new("b", vec![op(2)]))
            .await
            .unwrap();
        assert_eq!(ack.results[0].outcome, OpOutcome::Applied(Cursor(2)));

        // Without joining, a second share; another agent never joins this agent's share.
        let separate = agent.create_share(new_share("ses_1")).await.unwrap();
        assert_ne!(separate.info.state.share_id, share_id);
        let (other, _) = support::agent(&conn, &admin).await;
        let theirs = other.create_share(join("ses_1")).await.unwrap();
        assert!(!theirs.joined);
        assert_ne!(theirs.info.state.share_id, share_id);

        // An archived share is not joined: the session gets a new one.
        let archived = agent.create_share(join("ses_2")).await.unwrap();
        let archived_id = archived.info.state.share_id;
        admin.archive_share(&archived_id).await.unwrap();
        let after_archive = agent.create_share(join("ses_2")).await.unwrap();
        assert!(!after_archive.joined);
        assert_ne!(after_archive.info.state.share_id, archived_id);
    });
}

#[test]
fn snapshot_pages_report_the_cursor_they_were_read_at() {
    let server = TestServer::start();
    run_local(async {
        let (conn, admin) = support::admin(&server).await;
        let (agent, _) = support::agent(&conn, &admin).await;
        let writer = agent.create_share(new_share("ses_1")).await.unwrap().writer;
        push_ops(&writer, &sample_export().to_ops(), 0, |_| {})
            .await
            .unwrap();
        let viewer = writer.viewer();

        // A one-byte budget: every page holds exactly one record (the first always fits).
        let first = viewer.snapshot_page("", 1).await.unwrap();
        assert_eq!((first.cursor, first.records.len()), (8, 1));
        let next = first.next_page.clone().expect("more pages");

        // The share changes between pages: the next page says so by its cursor, which is
        // what makes `snapshot()` start over.
        writer
            .append(&Batch::new("b", vec![text_part("prt_4", "msg_2")]))
            .await
            .unwrap();
        let second = viewer.snapshot_page(&next, 1).await.unwrap();
        assert_eq!((second.cursor, second.records.len()), (9, 1));

        // Read whole, page by page, the snapshot is consistent at the new cursor.
        let paged = viewer.snapshot_with(1).await.unwrap();
        assert_eq!((paged.cursor, paged.records.len()), (9, 9));
        assert_eq!(paged, viewer.snapshot().await.unwrap());

        let err = viewer.snapshot_page("garbage", 0).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::InvalidArgument), "{err}");
    });
}

/// Appends one new part per batch to message `msg_1` until `stop` is set; returns how many.
async fn append_parts_until(writer: WriterClient, stop: Rc<Cell<bool>>) -> usize {
    let mut appended = 0;
    while !stop.get() {
        let part = text_part(&format!("live_{appended:05}"), "msg_1");
        let ack = writer
            .append(&Batch::new(format!("live-{appended}"), vec![part]))
            .await
            .unwrap();
        assert_eq!(ack.applied(), 1);
        appended += 1;
    }
    appended
}

#[test]
fn snapshots_start_over_while_a_writer_keeps_appending() {
    // `normal` durability: acks do not wait for fsync, so the writer appends far faster
    // than one snapshot attempt (dozens of one-record pages) takes.
    let server = TestServer::start_with(|config| {
        config.durability = capsync_server::config::DurabilityArg::Normal;
    });
    run_local(async {
        let (conn, admin) = support::admin(&server).await;
        let (agent, _) = support::agent(&conn, &admin).await;
        let created = agent.create_share(new_share("ses_1")).await.unwrap();
        let mut ops = sample_export().to_ops();
        ops.extend((0..60).map(|i| text_part(&format!("base_{i:03}"), "msg_1")));
        push_ops(&created.writer, &ops, 0, |_| {}).await.unwrap();
        let base_cursor = ops.len() as u64;

        // The reader has its own connection, like a viewer elsewhere.
        let reader_conn = connect(server.addr()).await.unwrap();
        let viewer = reader_conn
            .redeem(&created.viewer_token.token)
            .await
            .unwrap()
            .into_viewer()
            .unwrap();

        let stop = Rc::new(Cell::new(false));
        let appender =
            tokio::task::spawn_local(append_parts_until(created.writer.clone(), stop.clone()));
        // Let the writer get going before reading.
        while viewer.state().await.unwrap().cursor == base_cursor {
            tokio::task::yield_now().await;
        }

        // Every attempt sees the cursor move between its pages: a clear error, not a torn
        // snapshot.
        let err = viewer.snapshot_with(1).await.unwrap_err();
        assert!(
            matches!(err, ClientError::SnapshotUnstable { attempts: 4 }),
            "{err:?}"
        );
        assert_eq!(err.code_str(), "snapshotUnstable");

        // Whatever a snapshot returns while the writer runs is whole: a page-sized budget
        // that fits it all reads at one cursor, and every part applied up to it is there.
        let snapshot = viewer.snapshot().await.unwrap();
        let live_parts = snapshot
            .records
            .iter()
            .filter(|r| r.id.starts_with("live_"))
            .count() as u64;
        assert_eq!(live_parts, snapshot.cursor - base_cursor);

        stop.set(true);
        let appended = appender.await.unwrap() as u64;
        // Once the writer stops, one-record pages fit together again.
        let settled = viewer.snapshot_with(1).await.unwrap();
        assert_eq!(settled.cursor, base_cursor + appended);
        assert_eq!(settled.records.len() as u64, 8 + 60 + appended);
        assert_eq!(settled, viewer.snapshot().await.unwrap());
    });
}

#[test]
fn calls_after_disconnect_fail_as_disconnected() {
    let server = TestServer::start();
    run_local(async {
        let (conn, admin) = support::admin(&server).await;
        admin.list_shares("", 0, false).await.unwrap();
        conn.disconnect().await.unwrap();
        let err = admin.list_shares("", 0, false).await.unwrap_err();
        assert!(err.is_disconnected(), "{err:?}");
        assert_eq!(err.code(), None);
        assert_eq!(err.code_str(), "disconnected");
    });
}

#[test]
fn a_server_that_shuts_down_disconnects_its_clients() {
    let server = TestServer::start();
    run_local(async {
        let (_conn, admin) = support::admin(&server).await;
        admin.list_shares("", 0, false).await.unwrap();
        let addr = server.addr();
        // Shut down on another thread: this one must keep polling the connection.
        let stopped = std::thread::spawn(move || drop(server));
        while !stopped.is_finished() {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        stopped.join().unwrap();
        let err = admin.list_shares("", 0, false).await.unwrap_err();
        assert!(err.is_disconnected(), "{err:?}");
        let err = connect(addr).await.unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
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
        assert_eq!(err.code_str(), "connect");
        assert!(
            err.to_string()
                .starts_with(&format!("could not connect to 127.0.0.1:{port}")),
            "{err}"
        );
    });
}

#[test]
fn a_port_that_is_not_capsync_says_so() {
    let server = TestServer::start();
    run_local(async {
        // The server's own share-page port: the likeliest mistake. The first call says so.
        let http = server.http_addr();
        let conn = connect(http).await.unwrap();
        let err = conn.redeem(&server.admin_token()).await.unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::NotCapsync {
                    reply: ForeignReply::Http,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.code_str(), "notCapsync");
        assert_eq!(
            err.to_string(),
            format!(
                "{http} is not a capsync RPC port (it answered with HTTP: probably the share-page/HTTP port; the RPC port is 7420 by default)"
            )
        );

        // Something else entirely.
        let ssh = support::peers::foreign_listener(b"SSH-2.0-OpenSSH_9.6\r\n");
        let conn = connect(ssh).await.unwrap();
        let err = conn.redeem(&server.admin_token()).await.unwrap_err();
        assert!(
            matches!(err, ClientError::NotCapsync { reply: ForeignReply::NotCapnp(first), .. } if &first == b"SSH-"),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .ends_with("(it answered with bytes that are not Cap'n Proto: \"SSH-\")"),
            "{err}"
        );

        // The RPC port itself is fine.
        let (conn, admin) = support::admin(&server).await;
        admin.stats().await.unwrap();
        conn.disconnect().await.unwrap();
    });
}

#[test]
fn a_server_that_never_answers_times_the_handshake_out() {
    // Bound and never accepted from: the kernel completes the TCP handshake into the
    // listen queue, and then nothing ever answers (a server too busy to accept).
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    run_local(async {
        let options = ClientOptions {
            connect_timeout: Duration::from_millis(200),
            ..ClientOptions::default()
        };
        let conn = connect_with(addr, &options).await.unwrap();
        let token = capsync_shared::SturdyRef::generate(TokenKind::Viewer).expose();
        let err = tokio::time::timeout(GUARD, conn.redeem(&token))
            .await
            .expect("the connect timeout must fire")
            .unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Timeout {
                    stage: TimeoutStage::Connect,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.code_str(), "timeout");
        assert!(
            err.to_string()
                .starts_with(&format!("timed out after 200ms connecting to {addr}")),
            "{err}"
        );
    });
}

#[test]
fn a_server_that_stops_answering_times_calls_and_redeems_out() {
    let server = TestServer::start();
    let limit = Duration::from_millis(200);
    run_local(async {
        // Answers the handshake and the redeem, then nothing.
        let relay = HoldingRelay::start(server.addr(), 2);
        let conn = connect(relay.addr()).await.unwrap();
        let admin = conn
            .redeem(&server.admin_token())
            .await
            .unwrap()
            .into_admin()
            .unwrap();
        let err = tokio::time::timeout(GUARD, conn.with_call_timeout(limit, admin.stats()))
            .await
            .expect("the call timeout must fire")
            .unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Timeout {
                    stage: TimeoutStage::Call,
                    ..
                }
            ),
            "{err:?}"
        );
        let relay_addr = relay.addr();
        assert_eq!(
            err.to_string(),
            format!("timed out after 200ms waiting for the server at {relay_addr} to answer")
        );

        // Answers the bootstrap only: the redeem has the connect timeout.
        let relay = HoldingRelay::start(server.addr(), 1);
        let options = ClientOptions {
            connect_timeout: limit,
            ..ClientOptions::default()
        };
        let conn = connect_with(relay.addr(), &options).await.unwrap();
        let err = tokio::time::timeout(GUARD, conn.redeem(&server.admin_token()))
            .await
            .expect("the redeem must time out")
            .unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Timeout {
                    stage: TimeoutStage::Redeem,
                    ..
                }
            ),
            "{err:?}"
        );

        // Straight to the server, the same limit is no trouble.
        let (conn, admin) = support::admin(&server).await;
        conn.with_call_timeout(limit, admin.stats()).await.unwrap();
        conn.disconnect().await.unwrap();
    });
}
