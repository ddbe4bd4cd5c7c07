//! The syncer draining an outbox into the real server (`support::TestServer` on
//! 127.0.0.1:0): volume, a server restart mid-way, a server that is down at first, revoked
//! and refused tokens, replays, dependencies, rejections and oversized batches.

use crate::support;

use std::future::Future;
use std::time::Duration;

use capsync_client::{
    NewShare, OpKind, OpSpec, Outbox, OutboxError, RecordKind, Scope, SyncError, SyncOptions,
    SyncState, SyncStatus, Syncer, connect, spawn_syncer,
};
use serde_json::json;
use support::{TestServer, run_local};

/// Fails the test instead of hanging it.
async fn within<T>(secs: u64, what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {secs} s"))
}

/// A share and its tokens.
struct Share {
    id: String,
    writer: String,
    viewer: String,
    /// The creating agent's token, to revoke the share with.
    agent: String,
}

async fn share(server: &TestServer, session_id: &str) -> Share {
    let (conn, admin) = support::admin(server).await;
    let minted = admin.mint_agent("syncer test", None).await.unwrap();
    let agent = conn
        .redeem(&minted.token)
        .await
        .unwrap()
        .into_agent()
        .unwrap();
    let created = agent
        .create_share(NewShare {
            session_id: session_id.into(),
            ..NewShare::default()
        })
        .await
        .unwrap();
    conn.disconnect().await.unwrap();
    Share {
        id: created.info.state.share_id,
        writer: created.writer_token.token,
        viewer: created.viewer_token.token,
        agent: minted.token,
    }
}

/// Ops for a session: the session, then per message a `message.upsert`, a text part and
/// `deltas` `part.delta`s appending "<m>.<d> " to it. Deltas are the sharpest check of
/// exactly-once in order: one applied twice, or out of order, shows in the text.
/// Returns the ops and each part's final text.
fn session_ops(
    session: &str,
    messages: std::ops::Range<usize>,
    deltas: usize,
) -> (Vec<OpSpec>, Vec<(String, String)>) {
    let mut ops = vec![OpSpec::new(
        format!("{session}-session"),
        OpKind::SessionUpsert,
        json!({"id": session, "title": "syncer test"}),
    )];
    let mut texts = Vec::new();
    for m in messages {
        let (message, part) = (format!("msg_{m:03}"), format!("prt_{m:03}"));
        ops.push(OpSpec::new(
            format!("{session}-m{m}"),
            OpKind::MessageUpsert,
            json!({"id": message, "role": "assistant"}),
        ));
        ops.push(OpSpec::new(
            format!("{session}-p{m}"),
            OpKind::PartUpsert,
            json!({"id": part, "messageID": message, "type": "text", "text": ""}),
        ));
        let mut text = String::new();
        for d in 0..deltas {
            let delta = format!("{m}.{d} ");
            text.push_str(&delta);
            ops.push(OpSpec::new(
                format!("{session}-p{m}-d{d}"),
                OpKind::PartDelta,
                json!({"partID": part, "delta": delta}),
            ));
        }
        texts.push((part, text));
    }
    (ops, texts)
}

/// Each part's text as the server has it.
async fn part_texts(server: &TestServer, viewer_token: &str) -> Vec<(String, String)> {
    let conn = connect(server.addr()).await.unwrap();
    let viewer = conn
        .redeem(viewer_token)
        .await
        .unwrap()
        .into_viewer()
        .unwrap();
    let snapshot = viewer.snapshot().await.unwrap();
    conn.disconnect().await.unwrap();
    snapshot
        .records
        .iter()
        .filter(|r| r.kind == RecordKind::Part)
        .map(|r| {
            let json: serde_json::Value = serde_json::from_str(&r.json).unwrap();
            (r.id.clone(), json["text"].as_str().unwrap_or("").to_owned())
        })
        .collect()
}

/// The share's cursor on the server.
async fn server_cursor(server: &TestServer, viewer_token: &str) -> u64 {
    let conn = connect(server.addr()).await.unwrap();
    let viewer = conn
        .redeem(viewer_token)
        .await
        .unwrap()
        .into_viewer()
        .unwrap();
    let cursor = viewer.state().await.unwrap().cursor;
    conn.disconnect().await.unwrap();
    cursor
}

/// Quick retries, so failure paths finish fast.
fn options(server: &TestServer, token: &str) -> SyncOptions {
    let mut options = SyncOptions::new(server.addr().to_string(), token);
    options.backoff_initial = Duration::from_millis(20);
    options.backoff_max = Duration::from_millis(500);
    options.call_timeout = Duration::from_secs(20);
    options
}

fn in_order_from_one(ops: &[OpSpec]) -> Vec<(String, u64)> {
    ops.iter()
        .enumerate()
        .map(|(i, op)| (op.op_id.clone(), i as u64 + 1))
        .collect()
}

async fn idle(syncer: &Syncer) -> SyncStatus {
    within(120, "wait_idle", syncer.wait_idle())
        .await
        .expect("the syncer stays healthy")
}

#[test]
fn drains_1500_ops_exactly_once_and_in_order() {
    let server = TestServer::start();
    let scratch = tempfile::tempdir().unwrap();
    run_local(async {
        let share = share(&server, "ses_volume").await;
        let (ops, texts) = session_ops("ses_volume", 0..10, 148);
        assert_eq!(ops.len(), 1501);
        let outbox = Outbox::open(scratch.path().join("outbox.db")).unwrap();
        outbox.enqueue_all(ops[..700].to_vec()).await.unwrap();
        let syncer = spawn_syncer(outbox.clone(), options(&server, &share.writer));
        // The rest arrives while the syncer is busy; enqueues wake it.
        for chunk in ops[700..].chunks(50) {
            outbox.enqueue_all(chunk.to_vec()).await.unwrap();
        }
        let status = idle(&syncer).await;
        assert_eq!(status.state, SyncState::Idle);
        assert_eq!(status.share_id.as_deref(), Some(share.id.as_str()));
        assert!(syncer.fatal().is_none());
        assert_eq!(
            (
                status.acked,
                status.pending,
                status.in_flight,
                status.waiting,
                status.rejected
            ),
            (1501, 0, 0, 0, 0)
        );
        assert_eq!(status.last_acked_cursor, Some(1501));
        assert_eq!((status.retries, status.last_error.as_deref()), (0, None));

        assert_eq!(outbox.acked().await.unwrap(), in_order_from_one(&ops));
        assert_eq!(part_texts(&server, &share.viewer).await, texts);
        let outbox_status = outbox.status().await.unwrap();
        assert_eq!(outbox_status.share_id.as_deref(), Some(share.id.as_str()));
        assert_eq!(outbox_status.server, Some(server.addr().to_string()));

        let stopped = within(10, "stop", syncer.stop()).await;
        assert_eq!(stopped.acked, 1501);
    });
}

#[test]
fn a_server_restart_mid_way_is_survived_without_losing_or_repeating_an_op() {
    let server = TestServer::start();
    let scratch = tempfile::tempdir().unwrap();
    run_local(async move {
        let mut server = server;
        let share = share(&server, "ses_restart").await;
        let (ops, mut texts) = session_ops("ses_restart", 0..5, 200);
        let outbox = Outbox::open(scratch.path().join("outbox.db")).unwrap();
        outbox.enqueue_all(ops.clone()).await.unwrap();
        let mut opts = options(&server, &share.writer);
        opts.batch_size = 20;
        let syncer = spawn_syncer(outbox.clone(), opts);

        let mut progress = syncer.watch();
        within(60, "first acks", progress.wait_for(|s| s.acked >= 200))
            .await
            .unwrap();
        // Restart on the blocking pool: the syncer keeps running on this thread meanwhile,
        // and meets the shutdown (`overloaded`, then a dropped connection).
        server = tokio::task::spawn_blocking(move || {
            server.restart();
            server
        })
        .await
        .unwrap();

        // Ops enqueued after the restart can only reach the new server instance, so the
        // syncer must have reconnected and redeemed again.
        let (more, more_texts) = session_ops("ses_restart", 5..7, 100);
        let more = more[1..].to_vec(); // the session op is already queued
        outbox.enqueue_all(more.clone()).await.unwrap();
        texts.extend(more_texts);

        let status = idle(&syncer).await;
        let all: Vec<OpSpec> = ops.iter().chain(&more).cloned().collect();
        assert_eq!(status.acked, all.len() as u64);
        assert_eq!(status.last_acked_cursor, Some(all.len() as u64));
        assert!(status.retries >= 1, "the restart cost at least one attempt");
        assert_eq!(status.last_error, None, "cleared by the acks since");
        assert_eq!(outbox.acked().await.unwrap(), in_order_from_one(&all));
        assert_eq!(
            server_cursor(&server, &share.viewer).await,
            all.len() as u64
        );
        assert_eq!(part_texts(&server, &share.viewer).await, texts);
        within(10, "stop", syncer.stop()).await;
    });
}

#[test]
fn a_server_that_is_down_at_first_is_waited_for_with_backoff() {
    let mut server = TestServer::start();
    let scratch = tempfile::tempdir().unwrap();
    let share = run_local(share(&server, "ses_down"));
    server.stop();
    run_local(async {
        let (ops, texts) = session_ops("ses_down", 0..2, 10);
        let outbox = Outbox::open(scratch.path().join("outbox.db")).unwrap();
        outbox.enqueue_all(ops.clone()).await.unwrap();
        let syncer = spawn_syncer(outbox.clone(), options(&server, &share.writer));
        let mut progress = syncer.watch();
        let backing_off = within(
            60,
            "backoff",
            progress.wait_for(|s| s.retries >= 3 && matches!(s.state, SyncState::Backoff { .. })),
        )
        .await
        .unwrap()
        .clone();
        assert!(
            backing_off
                .last_error
                .as_deref()
                .unwrap_or("")
                .contains("connect"),
            "{backing_off:?}"
        );
        assert_eq!(backing_off.pending, ops.len() as u64);
        let outbox_error = outbox.status().await.unwrap().last_error;
        assert!(outbox_error.is_some_and(|e| e.contains("connect")));

        server.start_again();
        let status = idle(&syncer).await;
        assert_eq!(status.acked, ops.len() as u64);
        assert_eq!(part_texts(&server, &share.viewer).await, texts);
        within(10, "stop", syncer.stop()).await;
    });
}

#[test]
fn a_revoked_writer_stops_the_syncer_for_good_with_a_clear_error() {
    let server = TestServer::start();
    let scratch = tempfile::tempdir().unwrap();
    run_local(async {
        let share = share(&server, "ses_revoked").await;
        let (ops, _) = session_ops("ses_revoked", 0..2, 5);
        let outbox = Outbox::open(scratch.path().join("outbox.db")).unwrap();
        outbox.enqueue_all(ops[..6].to_vec()).await.unwrap();
        let syncer = spawn_syncer(outbox.clone(), options(&server, &share.writer));
        assert_eq!(idle(&syncer).await.acked, 6);

        // The owner revokes the writers; the syncer's live capability dies with them.
        let conn = connect(server.addr()).await.unwrap();
        let agent = conn
            .redeem(&share.agent)
            .await
            .unwrap()
            .into_agent()
            .unwrap();
        agent.revoke_share(&share.id, Scope::Writers).await.unwrap();
        conn.disconnect().await.unwrap();

        let mut progress = syncer.watch();
        outbox.enqueue_all(ops[6..].to_vec()).await.unwrap();
        // Whoever sees the `Stopped` status finds the error in `fatal` at once.
        let stopped = within(
            60,
            "the stop",
            progress.wait_for(|s| matches!(s.state, SyncState::Stopped { .. })),
        )
        .await;
        drop(stopped.expect("the syncer stops with a status"));
        assert!(
            matches!(syncer.fatal(), Some(SyncError::Revoked(_))),
            "{:?}",
            syncer.fatal()
        );
        let err = within(60, "wait_idle", syncer.wait_idle())
            .await
            .expect_err("a revoked token is fatal");
        let SyncError::Revoked(message) = &err else {
            panic!("expected Revoked, got {err:?}");
        };
        assert!(
            message.contains("revoked") && message.contains("mint a new one"),
            "{message}"
        );
        let status = syncer.status();
        assert_eq!(
            status.state,
            SyncState::Stopped {
                error: message.clone()
            }
        );
        assert_eq!(status.last_error.as_deref(), Some(message.as_str()));
        assert_eq!(status.retries, 0, "a dead capability is never retried");
        assert_eq!(status.in_flight + status.pending, (ops.len() - 6) as u64);
        // The task is gone: no further status, hence no further attempt, can ever come.
        while progress.changed().await.is_ok() {}
        assert_eq!(syncer.status().retries, 0);
        assert!(matches!(syncer.fatal(), Some(SyncError::Revoked(_))));
        // A later `capsync outbox status` sees why the ops are stuck.
        let outbox_status = outbox.status().await.unwrap();
        assert!(
            outbox_status
                .last_error
                .is_some_and(|e| e.contains("revoked"))
        );
        assert_eq!(within(10, "stop", syncer.stop()).await.retries, 0);

        // Redeeming the revoked token fails as "not accepted": also fatal, no retries.
        let fresh = Outbox::open(scratch.path().join("fresh.db")).unwrap();
        fresh.enqueue(ops[0].clone()).await.unwrap();
        let again = spawn_syncer(fresh.clone(), options(&server, &share.writer));
        let err = within(60, "wait_idle", again.wait_idle())
            .await
            .unwrap_err();
        assert!(matches!(err, SyncError::PermissionDenied(_)), "{err:?}");
        assert!(err.to_string().contains("not accepted"), "{err}");
        assert_eq!(again.status().retries, 0);
        again.stop().await;

        // A viewer token is not a writer token.
        let viewer = spawn_syncer(fresh, options(&server, &share.viewer));
        let err = within(60, "wait_idle", viewer.wait_idle())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, SyncError::Stopped(m) if m.contains("writer token")),
            "{err:?}"
        );
        viewer.stop().await;
    });
}

#[test]
fn a_replay_from_a_second_outbox_is_all_duplicates_at_the_same_cursors() {
    let server = TestServer::start();
    let scratch = tempfile::tempdir().unwrap();
    run_local(async {
        let share = share(&server, "ses_replay").await;
        let (ops, texts) = session_ops("ses_replay", 0..3, 100);
        let first = Outbox::open(scratch.path().join("first.db")).unwrap();
        first.enqueue_all(ops.clone()).await.unwrap();
        let syncer = spawn_syncer(first.clone(), options(&server, &share.writer));
        idle(&syncer).await;
        syncer.stop().await;

        // Another outbox file with the same ops, as after losing the first one: every op
        // comes back `duplicate` with the cursor it was applied at, and nothing moves.
        let second = Outbox::open(scratch.path().join("second.db")).unwrap();
        second.enqueue_all(ops.clone()).await.unwrap();
        let syncer = spawn_syncer(second.clone(), options(&server, &share.writer));
        let status = idle(&syncer).await;
        syncer.stop().await;
        assert_eq!(status.acked, ops.len() as u64);
        assert_eq!(status.last_acked_cursor, Some(ops.len() as u64));
        assert_eq!(second.acked().await.unwrap(), first.acked().await.unwrap());
        assert_eq!(second.acked().await.unwrap(), in_order_from_one(&ops));
        assert_eq!(
            server_cursor(&server, &share.viewer).await,
            ops.len() as u64
        );
        assert_eq!(part_texts(&server, &share.viewer).await, texts);
    });
}

#[test]
fn missing_dependencies_wait_and_invalid_ops_are_reported() {
    let server = TestServer::start();
    let scratch = tempfile::tempdir().unwrap();
    run_local(async {
        let share = share(&server, "ses_deps").await;
        let outbox = Outbox::open(scratch.path().join("outbox.db")).unwrap();
        let session = OpSpec::new(
            "session",
            OpKind::SessionUpsert,
            json!({"id": "ses_deps", "title": "deps"}),
        );
        // A part whose message op is not in the outbox (yet): the server holds it back.
        let mut part = OpSpec::new(
            "part",
            OpKind::PartUpsert,
            json!({"id": "prt_1", "messageID": "msg_1", "type": "text", "text": "hi"}),
        );
        part.depends_on = vec!["message".into()];
        // A message without a role can never apply.
        let broken = OpSpec::new("broken", OpKind::MessageUpsert, json!({"id": "msg_x"}));
        outbox
            .enqueue_all(vec![session, part, broken])
            .await
            .unwrap();
        let syncer = spawn_syncer(outbox.clone(), options(&server, &share.writer));
        let status = idle(&syncer).await;
        assert_eq!(
            (
                status.acked,
                status.waiting,
                status.rejected,
                status.pending
            ),
            (1, 1, 1, 0)
        );
        let rejected = outbox.rejected().await.unwrap();
        assert_eq!(rejected.len(), 1);
        assert_eq!(
            (rejected[0].op_id.as_str(), rejected[0].reason.as_str()),
            ("broken", "invalid")
        );
        assert!(rejected[0].detail.contains("role"), "{:?}", rejected[0]);

        // The message arrives: once it is acked, the part goes too.
        outbox
            .enqueue(OpSpec::new(
                "message",
                OpKind::MessageUpsert,
                json!({"id": "msg_1", "role": "user"}),
            ))
            .await
            .unwrap();
        let status = idle(&syncer).await;
        assert_eq!((status.acked, status.waiting, status.rejected), (3, 0, 1));
        let acked: Vec<String> = outbox
            .acked()
            .await
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(acked, ["session", "message", "part"]);
        assert_eq!(
            part_texts(&server, &share.viewer).await,
            [("prt_1".to_string(), "hi".to_string())]
        );
        syncer.stop().await;
    });
}

#[test]
fn batches_over_the_server_limits_are_split_and_an_op_over_them_is_rejected() {
    let server = TestServer::start_with(|config| {
        config.max_ops_per_batch = 8;
        config.max_op_bytes = 2048;
    });
    let scratch = tempfile::tempdir().unwrap();
    run_local(async {
        let share = share(&server, "ses_limits").await;
        let (mut ops, _) = session_ops("ses_limits", 0..1, 37);
        ops.insert(
            20,
            OpSpec::new(
                "huge-model",
                OpKind::ModelUpsert,
                json!({"id": "m", "blob": "x".repeat(3000)}),
            ),
        );
        let outbox = Outbox::open(scratch.path().join("outbox.db")).unwrap();
        outbox.enqueue_all(ops.clone()).await.unwrap();
        let mut opts = options(&server, &share.writer);
        opts.batch_size = 50;
        let syncer = spawn_syncer(outbox.clone(), opts);
        let status = idle(&syncer).await;
        assert_eq!((status.acked, status.rejected), (40, 1));
        assert_eq!(status.retries, 0, "a refusal is not a failed attempt");
        let rejected = outbox.rejected().await.unwrap();
        assert_eq!(
            (rejected[0].op_id.as_str(), rejected[0].reason.as_str()),
            ("huge-model", "tooLarge")
        );
        assert!(rejected[0].detail.contains("2048"), "{:?}", rejected[0]);
        // Order held across the splits.
        let acked: Vec<String> = outbox
            .acked()
            .await
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let expected: Vec<String> = ops
            .iter()
            .map(|o| o.op_id.clone())
            .filter(|id| id != "huge-model")
            .collect();
        assert_eq!(acked, expected);
        syncer.stop().await;
    });
}

/// A backlog goes out several batches at a time, and when one of them is refused whole
/// (here: more ops than the server takes per batch), those sent after it apply nothing
/// until it is split and sent: every op lands once, in order, with no failed attempt.
#[test]
fn a_backlog_is_pipelined_and_a_batch_refused_whole_keeps_its_place() {
    let server = TestServer::start_with(|config| config.max_ops_per_batch = 30);
    let scratch = tempfile::tempdir().unwrap();
    run_local(async {
        let share = share(&server, "ses_pipe").await;
        let (ops, texts) = session_ops("ses_pipe", 0..4, 80);
        let outbox = Outbox::open(scratch.path().join("outbox.db")).unwrap();
        outbox.enqueue_all(ops.clone()).await.unwrap();
        let mut opts = options(&server, &share.writer);
        opts.batch_size = 25;
        let syncer = spawn_syncer(outbox.clone(), opts);
        // The most calls seen in flight at once.
        let most = std::rc::Rc::new(std::cell::Cell::new(0));
        let mut watch = syncer.watch();
        let seen = std::rc::Rc::clone(&most);
        let watcher = tokio::task::spawn_local(async move {
            while watch.changed().await.is_ok() {
                seen.set(seen.get().max(watch.borrow().calls_in_flight));
            }
        });
        // Batches of 25 fit; then of 40, which the server refuses whole.
        let status = idle(&syncer).await;
        assert_eq!((status.acked, status.retries), (ops.len() as u64, 0));
        let mut opts = options(&server, &share.writer);
        opts.batch_size = 40;
        syncer.stop().await;
        let (more, more_texts) = session_ops("ses_pipe", 4..8, 80);
        let more: Vec<OpSpec> = more.into_iter().filter(|op| !ops.contains(op)).collect();
        outbox.enqueue_all(more.clone()).await.unwrap();
        let syncer = spawn_syncer(outbox.clone(), opts);
        let status = idle(&syncer).await;
        let all: Vec<OpSpec> = ops.iter().chain(&more).cloned().collect();
        assert_eq!((status.acked, status.rejected), (all.len() as u64, 0));
        assert_eq!(status.retries, 0, "a refusal is not a failed attempt");
        assert_eq!(outbox.acked().await.unwrap(), in_order_from_one(&all));
        let mut expected = texts;
        expected.extend(more_texts);
        expected.sort();
        expected.dedup();
        let mut stored = part_texts(&server, &share.viewer).await;
        stored.sort();
        assert_eq!(stored, expected);
        syncer.stop().await;
        watcher.abort();
        assert!(
            most.get() >= 2,
            "batches were pipelined: at most {}",
            most.get()
        );
    });
}

#[test]
fn an_outbox_never_feeds_a_second_share() {
    let server = TestServer::start();
    let scratch = tempfile::tempdir().unwrap();
    run_local(async {
        let first = share(&server, "ses_one").await;
        let second = share(&server, "ses_two").await;
        let outbox = Outbox::open(scratch.path().join("outbox.db")).unwrap();
        let syncer = spawn_syncer(outbox.clone(), options(&server, &first.writer));
        idle(&syncer).await;
        syncer.stop().await;
        outbox
            .enqueue(OpSpec::new(
                "s",
                OpKind::SessionUpsert,
                json!({"id": "ses_one"}),
            ))
            .await
            .unwrap();

        let wrong = spawn_syncer(outbox.clone(), options(&server, &second.writer));
        let err = within(60, "wait_idle", wrong.wait_idle())
            .await
            .unwrap_err();
        match &err {
            SyncError::Outbox(OutboxError::WrongShare { bound, requested }) => {
                assert_eq!((bound, requested), (&first.id, &second.id));
            }
            other => panic!("expected WrongShare, got {other:?}"),
        }
        assert!(matches!(wrong.status().state, SyncState::Stopped { .. }));
        assert!(matches!(
            wrong.fatal(),
            Some(SyncError::Outbox(OutboxError::WrongShare { .. }))
        ));
        // The outbox was never bound to the token's share, so the syncer has none.
        assert_eq!(wrong.status().share_id, None);
        wrong.stop().await;
        assert_eq!(
            outbox.status().await.unwrap().pending,
            1,
            "nothing was sent"
        );
    });
}

#[test]
fn one_syncer_at_a_time_per_outbox() {
    let server = TestServer::start();
    let scratch = tempfile::tempdir().unwrap();
    run_local(async {
        let share = share(&server, "ses_lock").await;
        let path = scratch.path().join("outbox.db");
        let outbox = Outbox::open(&path).unwrap();
        let first = spawn_syncer(outbox.clone(), options(&server, &share.writer));
        idle(&first).await;

        // Another handle on the same file, as another process would have.
        let second = spawn_syncer(
            Outbox::open(&path).unwrap(),
            options(&server, &share.writer),
        );
        let err = within(60, "wait_idle", second.wait_idle())
            .await
            .unwrap_err();
        assert!(matches!(err, SyncError::Busy(_)), "{err:?}");
        assert!(err.to_string().contains("another syncer"), "{err}");
        assert!(matches!(second.fatal(), Some(SyncError::Busy(_))));
        second.stop().await;

        // Once the first stops, its lock is gone.
        first.stop().await;
        let third = spawn_syncer(outbox.clone(), options(&server, &share.writer));
        outbox
            .enqueue(OpSpec::new(
                "s",
                OpKind::SessionUpsert,
                json!({"id": "ses_lock"}),
            ))
            .await
            .unwrap();
        assert_eq!(idle(&third).await.acked, 1);
        third.stop().await;
    });
}

#[test]
fn a_server_that_never_answers_is_timed_out_and_retried() {
    // Accepts connections (the kernel completes the handshake into the backlog) and never
    // says a word: every redeem times out.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let scratch = tempfile::tempdir().unwrap();
    run_local(async {
        let outbox = Outbox::open(scratch.path().join("outbox.db")).unwrap();
        outbox
            .enqueue(OpSpec::new("a", OpKind::DiffSet, json!([])))
            .await
            .unwrap();
        let addr = silent.local_addr().unwrap().to_string();
        // Either limit bounds the handshake: the connect timeout, or a shorter call timeout.
        let mut by_connect = SyncOptions::new(addr.clone(), "cswriter_x");
        by_connect.connection.connect_timeout = Duration::from_millis(100);
        let mut by_call = SyncOptions::new(addr.clone(), "cswriter_x");
        by_call.call_timeout = Duration::from_millis(100);
        for mut opts in [by_connect, by_call] {
            opts.backoff_initial = Duration::from_millis(10);
            opts.backoff_max = Duration::from_millis(20);
            let syncer = spawn_syncer(outbox.clone(), opts);
            let mut progress = syncer.watch();
            let status = within(60, "retries", progress.wait_for(|s| s.retries >= 2))
                .await
                .unwrap()
                .clone();
            let error = status.last_error.as_deref().unwrap_or("");
            assert!(
                error.starts_with(&format!("timed out after 100ms connecting to {addr}")),
                "{status:?}"
            );
            assert_eq!(status.pending, 1);
            let stopped = within(10, "stop", syncer.stop()).await;
            assert!(stopped.retries >= 2);
            assert_eq!(outbox.status().await.unwrap().pending, 1, "still queued");
        }
    });
}

#[test]
fn a_server_address_that_is_not_an_rpc_port_stops_the_syncer_with_the_reason() {
    let server = TestServer::start();
    let scratch = tempfile::tempdir().unwrap();
    let share = run_local(share(&server, "ses_wrong_port"));
    run_local(async {
        let outbox = Outbox::open(scratch.path().join("outbox.db")).unwrap();
        outbox
            .enqueue(OpSpec::new("a", OpKind::DiffSet, json!([])))
            .await
            .unwrap();
        let cases = [
            // The share page's port answers in HTTP: retrying will not change that.
            (
                server.http_addr().to_string(),
                "is not a capsync RPC port (it answered with HTTP",
            ),
            // Not an address at all: said before anything is sent.
            (
                format!("http://{}/s/{}", server.http_addr(), share.id),
                "the server address: this is a web address",
            ),
            ("localhost".to_owned(), "needs a port"),
        ];
        for (server_arg, expected) in cases {
            let mut opts = options(&server, &share.writer);
            opts.server = server_arg;
            let syncer = spawn_syncer(outbox.clone(), opts);
            let error = within(30, "the syncer stops", syncer.wait_idle())
                .await
                .unwrap_err();
            let SyncError::Stopped(message) = &error else {
                panic!("{error:?}");
            };
            assert!(message.contains(expected), "{message}");
            assert!(!message.contains(&share.writer), "{message}");
            assert_eq!(syncer.stop().await.pending, 1, "still queued");
        }
    });
}

#[test]
fn a_rate_limited_redeem_is_retried_no_sooner_than_the_server_asks() {
    let server = TestServer::start_with(|config| config.redeem_failures = 1);
    let scratch = tempfile::tempdir().unwrap();
    // A writer token nobody has: its first redeem fails and uses up this address's
    // allowance, so the syncer's are refused with `rateLimited` and when to retry.
    let unknown = capsync_shared::SturdyRef::generate(capsync_shared::TokenKind::Writer).expose();
    run_local(async {
        let conn = connect(server.addr()).await.unwrap();
        let err = conn.redeem(&unknown).await.unwrap_err();
        assert_eq!(
            err.code(),
            Some(capsync_client::ErrorCode::PermissionDenied)
        );
        conn.disconnect().await.unwrap();

        let outbox = Outbox::open(scratch.path().join("outbox.db")).unwrap();
        outbox
            .enqueue(OpSpec::new("a", OpKind::DiffSet, json!([])))
            .await
            .unwrap();
        // Backoff alone would wait at most 500ms.
        let syncer = spawn_syncer(outbox.clone(), options(&server, &unknown));
        let mut progress = syncer.watch();
        let status = within(
            30,
            "backoff",
            progress.wait_for(|s| matches!(s.state, SyncState::Backoff { .. })),
        )
        .await
        .unwrap()
        .clone();
        let SyncState::Backoff { retry_in_ms } = status.state else {
            unreachable!()
        };
        let error = status.last_error.as_deref().unwrap_or("");
        assert!(error.starts_with("rate limited:"), "{status:?}");
        assert!(
            retry_in_ms >= 1_000,
            "the server's retryAfterMs is the least wait, not the 500ms cap: {status:?}"
        );
        assert!(syncer.fatal().is_none(), "rateLimited is retried");
        within(10, "stop", syncer.stop()).await;
    });
}
