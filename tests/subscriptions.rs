//! Live subscriptions (`ShareViewer.subscribe`) against a real server: backlog then live
//! with no gap or repeat, resuming after a disconnect, a stalled listener dropped with
//! `lagged` while the writer and other viewers carry on, revocation, shutdown, snapshot
//! plus subscribe rebuilding the writer's state, and dropping the handle.
//!
//! Nothing here sleeps: every wait is for an event, bounded by [`GUARD`] only so that a
//! broken server fails the test instead of hanging it.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use capsync_client::{
    ClientError, Connection, CreatedShare, EndReason, ErrorCode, LiveEvent, LiveOps, LoggedOp,
    OpSpec, Scope, ViewerClient,
};
use capsync_shared::capsync_capnp::{
    EndReason as WireEndReason, op_listener, subscribe_result, subscription,
};
use capsync_tests::model::{document_difference, read_log};
use capsync_tests::workload::AgentSession;
use capsync_tests::{TestServer, admin, agent, batch, run_local, session_ops, share, text_part_op};
use tokio::sync::Notify;

/// Upper bound on any single wait; far above what a healthy run takes.
const GUARD: Duration = Duration::from_secs(30);

async fn guarded<F: std::future::Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(GUARD, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A share with its session and one message, created by a fresh agent.
async fn setup(server: &TestServer, session: &str) -> (Connection, CreatedShare) {
    let (conn, admin) = admin(server).await;
    let (agent, _) = agent(&conn, &admin).await;
    let created = share(&agent, session).await;
    created
        .writer
        .append(&batch("setup", session_ops(session, "msg_1", 0)))
        .await
        .unwrap();
    (conn, created)
}

/// A viewer redeemed from `token` on its own connection.
async fn redeem_viewer(server: &TestServer, token: &str) -> (Connection, ViewerClient) {
    let conn = capsync_client::connect(server.addr()).await.unwrap();
    let viewer = conn.redeem(token).await.unwrap().into_viewer().unwrap();
    (conn, viewer)
}

/// `count` text parts of message `msg_1`, numbered from `first`.
fn parts(session: &str, first: usize, count: usize) -> Vec<OpSpec> {
    (first..first + count)
        .map(|i| text_part_op(session, "msg_1", &format!("prt_{i:06}")))
        .collect()
}

/// Appends `batches` batches of `size` parts, numbered from `first`; returns the last ack's cursor.
async fn append_parts(
    created: &CreatedShare,
    session: &str,
    first: usize,
    batches: usize,
    size: usize,
) -> u64 {
    let mut cursor = 0;
    for b in 0..batches {
        let start = first + b * size;
        let ack = created
            .writer
            .append(&batch(
                &format!("parts-{start}"),
                parts(session, start, size),
            ))
            .await
            .unwrap();
        assert_eq!(ack.applied(), size);
        cursor = ack.cursor.0;
    }
    cursor
}

/// Events until the op at `cursor` arrived; panics on an `Ended`.
async fn collect_until(live: &mut LiveOps, cursor: u64) -> Vec<LoggedOp> {
    let mut ops: Vec<LoggedOp> = Vec::new();
    while ops.last().map_or(live.cursor(), |op| op.cursor.0) < cursor {
        match guarded("ops", live.next()).await {
            Some(LiveEvent::Ops(page)) => ops.extend(page),
            other => panic!("expected ops up to cursor {cursor}, got {other:?}"),
        }
    }
    ops
}

/// The subscription's next event, which must be its end.
async fn ended(live: &mut LiveOps) -> capsync_client::Ended {
    match guarded("the end of the subscription", live.next()).await {
        Some(LiveEvent::Ended(ended)) => ended,
        other => panic!("expected the subscription to end, got {other:?}"),
    }
}

#[track_caller]
fn assert_contiguous(ops: &[LoggedOp], from: u64, to: u64) {
    let cursors: Vec<u64> = ops.iter().map(|op| op.cursor.0).collect();
    let expected: Vec<u64> = (from..=to).collect();
    assert!(
        cursors == expected,
        "expected cursors {from}..={to} once each, in order; got {} ops: first {:?}, last {:?}",
        cursors.len(),
        cursors.first(),
        cursors.last()
    );
}

/// The same ops, op for op, as the server's log holds them.
#[track_caller]
fn assert_same_as_log(ops: &[LoggedOp], log: &[LoggedOp]) {
    let first = ops.first().map_or(1, |op| op.cursor.0) as usize;
    assert_eq!(ops, &log[first - 1..first - 1 + ops.len()]);
}

capsync_tests::on_each_engine!(
    backlog_then_live_arrives_in_cursor_order_with_no_gap_or_repeat,
    a_viewer_that_resumes_from_its_last_cursor_gets_exactly_the_ops_it_missed,
    a_snapshot_at_c_then_subscribe_c_rebuilds_exactly_the_writers_state,
);

fn backlog_then_live_arrives_in_cursor_order_with_no_gap_or_repeat(server: TestServer) {
    run_local(async {
        let (_conn, created) = setup(&server, "ses_live").await;
        // A backlog of more than one page (the server sends 256 ops per call).
        let backlog = append_parts(&created, "ses_live", 0, 30, 10).await;
        assert_eq!(backlog, 302);

        let (_vconn, viewer) = redeem_viewer(&server, &created.viewer_token.token).await;
        let mut live = viewer.subscribe(0).await.unwrap();
        // Appends race with the backlog being sent and with live delivery.
        let (last, ops) = futures::join!(
            append_parts(&created, "ses_live", 300, 60, 10),
            collect_until(&mut live, 902),
        );
        assert_eq!(last, 902);
        assert_contiguous(&ops, 1, 902);
        assert_same_as_log(&ops, &read_log(&viewer).await);
    });
}

fn a_viewer_that_resumes_from_its_last_cursor_gets_exactly_the_ops_it_missed(server: TestServer) {
    run_local(async {
        let (_conn, created) = setup(&server, "ses_resume").await;
        append_parts(&created, "ses_resume", 0, 5, 10).await;

        let (first_conn, viewer) = redeem_viewer(&server, &created.viewer_token.token).await;
        let mut live = viewer.subscribe(0).await.unwrap();
        let seen = collect_until(&mut live, 52).await;
        assert_contiguous(&seen, 1, 52);
        let last = seen.last().unwrap().cursor.0;

        // The viewer's connection goes away; the writer carries on.
        guarded("disconnect", first_conn.disconnect())
            .await
            .unwrap();
        let gone = ended(&mut live).await;
        assert_eq!(gone.reason, EndReason::Disconnected);
        assert_eq!(gone.cursor, last);
        drop(live);
        let now = append_parts(&created, "ses_resume", 50, 10, 10).await;
        assert_eq!(now, 152);

        let (_second_conn, viewer) = redeem_viewer(&server, &created.viewer_token.token).await;
        let mut live = viewer.subscribe(last).await.unwrap();
        let missed = collect_until(&mut live, now).await;
        assert_contiguous(&missed, last + 1, now);
        assert_same_as_log(&missed, &read_log(&viewer).await);
    });
}

/// What a raw test listener saw.
#[derive(Default)]
struct Seen {
    /// Cursors of each `ops` call, in arrival order.
    calls: RefCell<Vec<Vec<u64>>>,
    ended: RefCell<Option<(WireEndReason, u64, String, Instant)>>,
    /// The server released the listener capability.
    released: Cell<bool>,
    changed: Notify,
}

/// An `OpListener` written against the raw capnp trait: `stall` makes every `ops` call
/// hang forever (a viewer that stopped reading).
struct TestListener {
    seen: Rc<Seen>,
    stall: bool,
}

impl op_listener::Server for TestListener {
    async fn ops(
        self: Rc<Self>,
        params: op_listener::OpsParams,
        _: op_listener::OpsResults,
    ) -> Result<(), capnp::Error> {
        let cursors = params
            .get()?
            .get_ops()?
            .iter()
            .map(|op| op.get_cursor())
            .collect();
        self.seen.calls.borrow_mut().push(cursors);
        self.seen.changed.notify_waiters();
        if self.stall {
            std::future::pending::<()>().await;
        }
        Ok(())
    }

    async fn ended(
        self: Rc<Self>,
        params: op_listener::EndedParams,
        _: op_listener::EndedResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let message = p.get_message()?.to_string().unwrap_or_default();
        *self.seen.ended.borrow_mut() =
            Some((p.get_reason()?, p.get_cursor(), message, Instant::now()));
        self.seen.changed.notify_waiters();
        Ok(())
    }
}

impl Drop for TestListener {
    fn drop(&mut self) {
        self.seen.released.set(true);
        self.seen.changed.notify_waiters();
    }
}

/// Subscribes `listener` through the raw capability; returns the subscription handle.
async fn subscribe_raw(
    viewer: &ViewerClient,
    from: u64,
    stall: bool,
) -> (subscription::Client, Rc<Seen>) {
    let seen = Rc::new(Seen::default());
    let listener: op_listener::Client = capnp_rpc::new_client(TestListener {
        seen: seen.clone(),
        stall,
    });
    let mut request = viewer.capability().subscribe_request();
    request.get().set_from_cursor(from);
    request.get().set_listener(listener);
    let response = request.send().promise.await.unwrap();
    let handle = match response
        .get()
        .unwrap()
        .get_result()
        .unwrap()
        .which()
        .unwrap()
    {
        subscribe_result::Ok(handle) => handle.unwrap(),
        subscribe_result::Failure(f) => panic!("subscribe failed: {:?}", f.unwrap().get_message()),
    };
    (handle, seen)
}

/// Waits until `done` holds for what the listener saw.
async fn wait_for(seen: &Seen, what: &str, done: impl Fn(&Seen) -> bool) {
    guarded(what, async {
        loop {
            let changed = seen.changed.notified();
            if done(seen) {
                return;
            }
            changed.await;
        }
    })
    .await;
}

#[test]
fn a_stalled_listener_is_dropped_as_lagged_while_the_writer_and_other_viewers_carry_on() {
    const WINDOW: usize = 2;
    const TIMEOUT: Duration = Duration::from_secs(3);
    let server = TestServer::start_with(|config| {
        config.subscriber_window = WINDOW;
        config.subscriber_timeout = TIMEOUT;
    });
    run_local(async {
        let (_conn, created) = setup(&server, "ses_stall").await;
        let (_sconn, stalled_viewer) = redeem_viewer(&server, &created.viewer_token.token).await;
        let subscribed = Instant::now();
        let (_stalled, seen) = subscribe_raw(&stalled_viewer, 0, true).await;
        let (_hconn, healthy_viewer) = redeem_viewer(&server, &created.viewer_token.token).await;
        let mut healthy = healthy_viewer.subscribe(0).await.unwrap();

        // 300 ops in 30 commits: many more calls' worth than the stalled window holds.
        let started = Instant::now();
        let (last, received) = futures::join!(
            async {
                let last = append_parts(&created, "ses_stall", 0, 30, 10).await;
                (last, Instant::now())
            },
            collect_until(&mut healthy, 302),
        );
        let (last, writer_done) = last;
        assert_eq!(last, 302);
        assert_contiguous(&received, 1, 302);

        wait_for(&seen, "the stalled listener's end", |s| {
            s.ended.borrow().is_some()
        })
        .await;
        let (reason, cursor, message, ended_at) = seen.ended.borrow().clone().unwrap();
        assert_eq!(reason, WireEndReason::Lagged, "{message}");
        assert_eq!(cursor, 0, "the stalled listener acknowledged nothing");
        // The writer never waited for the stalled listener: it was done before the
        // server gave up on that listener.
        assert!(
            writer_done < ended_at,
            "the writer finished {:?} after start, the stalled listener was dropped {:?} after start",
            writer_done - started,
            ended_at - started
        );
        assert!(
            ended_at - subscribed >= TIMEOUT,
            "dropped before its timeout"
        );
        let calls = seen.calls.borrow().clone();
        assert!(
            !calls.is_empty() && calls.len() <= WINDOW,
            "the stalled listener had {} calls in flight; the window is {WINDOW}",
            calls.len()
        );
        let sent: Vec<u64> = calls.concat();
        assert_eq!(sent, (1..=sent.len() as u64).collect::<Vec<_>>());
        wait_for(&seen, "the stalled listener's release", |s| {
            s.released.get()
        })
        .await;

        // Resuming from the cursor it was given delivers everything.
        let mut resumed = stalled_viewer.subscribe(cursor).await.unwrap();
        assert_contiguous(&collect_until(&mut resumed, 302).await, 1, 302);
    });
}

#[test]
fn revoking_viewers_ends_their_subscriptions_at_once_with_revoked() {
    // With the periodic recheck an hour away, only the revocation's announcement can
    // end the subscriptions within the test's patience.
    let server = TestServer::start_with(|config| {
        config.follow_recheck = std::time::Duration::from_secs(3600)
    });
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let created = share(&agent, "ses_rev").await;
        created
            .writer
            .append(&batch("setup", session_ops("ses_rev", "msg_1", 3)))
            .await
            .unwrap();
        let (_vconn, viewer) = redeem_viewer(&server, &created.viewer_token.token).await;
        let mut live = viewer.subscribe(0).await.unwrap();
        collect_until(&mut live, 5).await;
        // A second link, revoked alone by token id.
        let minted = agent
            .mint_viewer(created.info.state.share_id.as_str(), None)
            .await
            .unwrap();
        let (_v2conn, second) = redeem_viewer(&server, &minted.token).await;
        let mut second_live = second.subscribe(5).await.unwrap();

        admin.revoke_token(&minted.token_id).await.unwrap();
        let end = ended(&mut second_live).await;
        assert_eq!(end.reason, EndReason::Revoked, "{}", end.message);
        assert_eq!(end.cursor, 5);

        admin
            .revoke_share(created.info.state.share_id.as_str(), Scope::Viewers)
            .await
            .unwrap();
        let end = ended(&mut live).await;
        assert_eq!(end.reason, EndReason::Revoked, "{}", end.message);
        assert_eq!(end.cursor, 5);
        assert!(live.next().await.is_none());

        let again = viewer.subscribe(5).await;
        assert!(
            matches!(
                again,
                Err(ClientError::Remote {
                    code: ErrorCode::Revoked,
                    ..
                })
            ),
            "{again:?}"
        );
        // The writer is not affected.
        created
            .writer
            .append(&batch("after", parts("ses_rev", 100, 1)))
            .await
            .unwrap();
    });
}

fn a_snapshot_at_c_then_subscribe_c_rebuilds_exactly_the_writers_state(server: TestServer) {
    run_local(async {
        let (_conn, created) = {
            let (conn, admin) = admin(&server).await;
            let (agent, _) = agent(&conn, &admin).await;
            let created = share(&agent, "ses_snap").await;
            (conn, created)
        };
        let ops = AgentSession::generate(7, "ses_snap", 900);
        let (head, tail) = ops.split_at(ops.len() / 3);
        for (i, chunk) in head.chunks(20).enumerate() {
            created
                .writer
                .append(&batch(&format!("head-{i}"), chunk.to_vec()))
                .await
                .unwrap();
        }
        let (_vconn, viewer) = redeem_viewer(&server, &created.viewer_token.token).await;

        // The writer streams the rest while the viewer takes its snapshot and subscribes.
        let writer = async {
            let mut cursor = 0;
            for (i, chunk) in tail.chunks(7).enumerate() {
                let ack = created
                    .writer
                    .append(&batch(&format!("tail-{i}"), chunk.to_vec()))
                    .await
                    .unwrap();
                cursor = ack.cursor.0;
                // Let the viewer in between commits.
                tokio::task::yield_now().await;
            }
            cursor
        };
        let reader = async {
            let snapshot = viewer.snapshot().await.unwrap();
            let live = viewer.subscribe(snapshot.cursor).await.unwrap();
            (snapshot, live)
        };
        let (last, (snapshot, mut live)) = futures::join!(writer, reader);
        assert!(last > snapshot.cursor, "the snapshot was taken mid-stream");

        let mut document = snapshot.to_document();
        for op in collect_until(&mut live, last).await {
            assert!(document.apply(&op), "op {} applied once", op.cursor);
        }
        let fresh = viewer.snapshot().await.unwrap();
        assert_eq!(fresh.cursor, last);
        assert_eq!(document.cursor, last);
        if let Some(difference) = document_difference(&document, &fresh.to_document()) {
            panic!("snapshot + subscription differs from a fresh snapshot: {difference}");
        }
    });
}

#[test]
fn dropping_the_subscription_handle_stops_the_server_calling_the_listener() {
    let server = TestServer::start();
    run_local(async {
        let (_conn, created) = setup(&server, "ses_drop").await;
        let (_vconn, viewer) = redeem_viewer(&server, &created.viewer_token.token).await;
        let (handle, seen) = subscribe_raw(&viewer, 0, false).await;
        wait_for(&seen, "the first ops", |s| !s.calls.borrow().is_empty()).await;

        drop(handle);
        // The server lets go of the listener: it can never be called again.
        wait_for(&seen, "the listener's release", |s| s.released.get()).await;
        let calls = seen.calls.borrow().len();
        append_parts(&created, "ses_drop", 0, 3, 5).await;
        assert_eq!(seen.calls.borrow().len(), calls);
        assert!(
            seen.ended.borrow().is_none(),
            "a dropped subscription gets no goodbye"
        );
    });
}

#[test]
fn shutdown_ends_subscriptions_with_shutdown_and_the_cursor() {
    let mut server = TestServer::start();
    run_local(async {
        let (_conn, created) = setup(&server, "ses_down").await;
        let last = append_parts(&created, "ses_down", 0, 2, 10).await;
        let (_vconn, viewer) = redeem_viewer(&server, &created.viewer_token.token).await;
        let mut live = viewer.subscribe(0).await.unwrap();
        collect_until(&mut live, last).await;

        // Shutdown waits for each subscription's goodbye, so this thread must keep
        // answering while the server stops.
        let stopping = tokio::task::spawn_blocking(move || {
            server.stop();
            server
        });
        let end = ended(&mut live).await;
        assert_eq!(end.reason, EndReason::Shutdown, "{}", end.message);
        assert_eq!(end.cursor, last);
        drop(guarded("the server to stop", stopping).await.unwrap());
    });
}

#[test]
fn subscribing_past_the_shares_cursor_is_refused() {
    let server = TestServer::start();
    run_local(async {
        let (_conn, created) = setup(&server, "ses_past").await;
        let viewer = created.writer.viewer();
        let refused = viewer.subscribe(3).await;
        assert!(
            matches!(
                refused,
                Err(ClientError::Remote {
                    code: ErrorCode::InvalidArgument,
                    ..
                })
            ),
            "{refused:?}"
        );
        // A viewer derived from the writer follows like any other.
        let mut live = viewer.subscribe(2).await.unwrap();
        append_parts(&created, "ses_past", 0, 1, 3).await;
        let ops = collect_until(&mut live, 5).await;
        assert_contiguous(&ops, 3, 5);
        let by_id: HashMap<_, _> = ops
            .iter()
            .map(|op| (op.op_id.as_str(), op.cursor))
            .collect();
        assert_eq!(by_id.len(), 3);
    });
}

#[test]
fn presence_tells_viewers_whether_a_writer_is_connected() {
    // With no grace period, a writer's departure makes running tool calls interrupted at once.
    let server =
        TestServer::start_with(|config| config.interrupted_after = std::time::Duration::ZERO);
    run_local(async {
        let (conn, admin) = capsync_tests::admin(&server).await;
        let (agent, _) = capsync_tests::agent(&conn, &admin).await;
        let created = capsync_tests::share(&agent, "ses_presence").await;
        let viewer = conn
            .redeem(&created.viewer_token.token)
            .await
            .unwrap()
            .into_viewer()
            .unwrap();

        let before = viewer.presence().await.unwrap();
        assert!(
            before.writer_connected,
            "createShare's writer is live: {before:?}"
        );
        assert_eq!((before.last_change, before.interrupted), (None, false));

        created
            .writer
            .append(&capsync_tests::batch(
                "b1",
                capsync_tests::session_ops("ses_presence", "msg_1", 1),
            ))
            .await
            .unwrap();
        let changed = viewer.presence().await.unwrap();
        assert!(changed.last_change.is_some(), "{changed:?}");

        // Only this connection held writers; once it and its writer are gone, none is.
        let capsync_client::CreatedShare { writer, .. } = created;
        drop(writer);
        let mut gone = viewer.presence().await.unwrap();
        for _ in 0..100 {
            if !gone.writer_connected {
                break;
            }
            // The release of the dropped capability travels over the connection.
            tokio::task::yield_now().await;
            gone = viewer.presence().await.unwrap();
        }
        assert!(!gone.writer_connected, "{gone:?}");
        assert!(
            gone.writer_gone_since.is_some() && gone.interrupted,
            "{gone:?}"
        );

        admin
            .revoke_share(viewer.share_id(), capsync_client::Scope::Viewers)
            .await
            .unwrap();
        let err = viewer.presence().await.unwrap_err();
        assert_eq!(err.code(), Some(capsync_client::ErrorCode::Revoked));
    });
}

#[test]
fn an_append_cancelled_at_once_is_applied_announced_and_counted() {
    use futures::FutureExt as _;
    // With the periodic recheck an hour away, only the commit's own announcement can
    // wake the follower within the test's patience.
    let server = TestServer::start_with(|config| config.follow_recheck = Duration::from_secs(3600));
    run_local(async {
        let (_conn, created) = setup(&server, "ses_cancel").await;
        let (_vconn, viewer) = redeem_viewer(&server, &created.viewer_token.token).await;
        let at = viewer.state().await.unwrap().cursor;
        let mut live = viewer.subscribe(at).await.unwrap();
        let applied_before = server.metric("capsync_ops_applied_total");

        // A writer sends a batch and gives up on the call at once, as a call timeout
        // does: the request goes out, then the cancellation right behind it.
        let wconn = capsync_client::connect(server.addr()).await.unwrap();
        let writer = wconn
            .redeem(&created.writer_token.token)
            .await
            .unwrap()
            .into_writer()
            .unwrap();
        let cancelled = batch("cancelled", parts("ses_cancel", 0, 1));
        assert!(
            writer.append(&cancelled).now_or_never().is_none(),
            "the call waits for its answer"
        );

        let ops = collect_until(&mut live, at + 1).await;
        assert_eq!(ops[0].op_id.as_str(), cancelled.ops[0].op_id, "{ops:?}");
        // Counted as applied, once the append's own task has the ack.
        let counted = guarded("the commit counted", async {
            loop {
                if server.metric("capsync_ops_applied_total") == applied_before + 1.0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        counted.await;
    });
}
