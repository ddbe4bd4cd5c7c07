//! Network faults between a client and the server, through a TCP fault proxy
//! (`capsync_tests::proxy`): responses dropped or truncated after the server applied a
//! batch, requests cut part way, connections cut, traffic delayed or stalled past the
//! client's call timeout.
//!
//! The main run streams a generated agent session of more than 10,000 ops through a durable
//! outbox and its syncer while at least 100 faults hit the connection, then checks the
//! server against a reference model: no op lost, none applied twice, a gapless cursor, the
//! snapshot the model computes, and the outbox's acks equal to the server's log.
//!
//! Randomness comes from one seed, printed at the start; `CAPSYNC_FAULT_SEED=<seed>` replays
//! the same ops and the same fault choices (timing still varies from run to run).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use capsync_client::{
    Connection, OpOutcome, OpSpec, Outbox, SyncOptions, SyncStatus, WriterClient, spawn_syncer,
};
use capsync_tests::model::{
    Model, assert_log_holds_exactly, assert_same_document, model_from_log, read_log,
};
use capsync_tests::proxy::{FaultControl, FaultCounts, FaultProxy};
use capsync_tests::workload::{AgentSession, seed};
use capsync_tests::{TestServer, admin, agent, batch, run_local, session_ops, share};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::sync::watch;

/// Ops in the main run.
const OPS: usize = 10_000;
/// Faults that must break a connection during the main run.
const MIN_FAULTS: u64 = 100;
/// The ops are enqueued in this many chunks; each chunk meets at least one fault.
const CHUNKS: usize = 110;

async fn redeem_writer(addr: std::net::SocketAddr, token: &str) -> (Connection, WriterClient) {
    let conn = capsync_client::connect(addr).await.expect("connect");
    let writer = conn
        .redeem(token)
        .await
        .expect("redeem")
        .into_writer()
        .expect("writer");
    (conn, writer)
}

fn cursors(outcomes: &[OpOutcome]) -> Vec<u64> {
    outcomes
        .iter()
        .map(|o| match o {
            OpOutcome::Applied(c) | OpOutcome::Duplicate(c) => c.0,
            other => panic!("unexpected {other:?}"),
        })
        .collect()
}

/// Arms `fault` before an append whose answer must then never arrive whole, and checks
/// that the server applied the batch anyway and that a resend changes nothing.
fn an_unanswered_batch_is_applied_and_resent_as_duplicates(
    fault: fn(&FaultControl),
    struck: fn(&FaultCounts) -> u64,
) {
    let server = TestServer::start();
    let proxy = FaultProxy::start(server.addr(), 1);
    let faults = proxy.control();
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let created = share(&agent, "ses_drop").await;
        let token = created.writer_token.token.clone();
        let ops = session_ops("ses_drop", "msg_1", 8);

        let (_conn, writer) = redeem_writer(proxy.addr(), &token).await;
        fault(&faults);
        let err = writer
            .append(&batch("b1", ops.clone()))
            .await
            .expect_err("the answer never arrives");
        // A disconnect, whether nothing of the answer arrived or the connection closed
        // inside it (capnp's `PrematureEndOfFile`).
        assert!(err.is_disconnected(), "{err}");
        assert_eq!(struck(&faults.counts()), 1);
        // The server applied the batch before it answered.
        let state = created.writer.state().await.unwrap();
        assert_eq!(
            state.cursor,
            ops.len() as u64,
            "applied although unanswered"
        );

        let (_conn, writer) = redeem_writer(proxy.addr(), &token).await;
        let ack = writer.append(&batch("b1", ops.clone())).await.unwrap();
        assert_eq!(ack.duplicates(), ops.len(), "the resend changes nothing");
        let outcomes: Vec<_> = ack.results.into_iter().map(|r| r.outcome).collect();
        assert_eq!(
            cursors(&outcomes),
            (1..=ops.len() as u64).collect::<Vec<_>>()
        );
        let log = read_log(&created.writer.viewer()).await;
        assert_log_holds_exactly(&log, ops.iter().map(|op| op.op_id.as_str()));
    });
}

#[test]
fn a_response_dropped_after_the_server_applied_the_batch_is_resent_as_duplicates() {
    an_unanswered_batch_is_applied_and_resent_as_duplicates(
        FaultControl::drop_next_response,
        |counts| counts.responses_dropped,
    );
}

#[test]
fn a_response_cut_part_way_leaves_the_batch_applied_and_a_resend_changes_nothing() {
    an_unanswered_batch_is_applied_and_resent_as_duplicates(
        FaultControl::cut_next_response,
        |counts| counts.responses_cut,
    );
}

#[test]
fn a_request_cut_part_way_applies_once_when_resent() {
    let server = TestServer::start();
    let proxy = FaultProxy::start(server.addr(), 2);
    let faults = proxy.control();
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let created = share(&agent, "ses_cut").await;
        let token = created.writer_token.token.clone();
        let ops = session_ops("ses_cut", "msg_1", 30);

        let (_conn, writer) = redeem_writer(proxy.addr(), &token).await;
        faults.cut_next_request();
        let err = writer
            .append(&batch("b1", ops.clone()))
            .await
            .expect_err("the request never arrives whole");
        assert!(err.is_disconnected(), "{err}");
        assert_eq!(faults.counts().requests_cut, 1);
        let cursor = created.writer.state().await.unwrap().cursor;
        assert!(
            cursor == 0 || cursor == ops.len() as u64,
            "a batch is atomic: {cursor}"
        );

        let (_conn, writer) = redeem_writer(proxy.addr(), &token).await;
        let ack = writer.append(&batch("b1", ops.clone())).await.unwrap();
        assert_eq!(ack.cursor, ops.len() as u64);
        assert_eq!(ack.applied() + ack.duplicates(), ops.len());
        let log = read_log(&created.writer.viewer()).await;
        assert_log_holds_exactly(&log, ops.iter().map(|op| op.op_id.as_str()));
    });
}

#[test]
fn delayed_traffic_arrives_late_in_order_and_cut_connections_fail_their_calls() {
    let server = TestServer::start();
    let proxy = FaultProxy::start(server.addr(), 3);
    let faults = proxy.control();
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let created = share(&agent, "ses_delay").await;
        let token = created.writer_token.token.clone();
        let ops = session_ops("ses_delay", "msg_1", 10);

        let (_conn, writer) = redeem_writer(proxy.addr(), &token).await;
        faults.delay(Duration::from_millis(30));
        let started = Instant::now();
        // Pipelined: both calls are on the wire before either answer.
        let (first, second) = (
            batch("b1", ops[..6].to_vec()),
            batch("b2", ops[6..].to_vec()),
        );
        let (a, b) = futures::join!(writer.append(&first), writer.append(&second));
        assert!(
            started.elapsed() >= Duration::from_millis(60),
            "held both ways"
        );
        assert_eq!(a.unwrap().cursor, 6);
        assert_eq!(b.unwrap().cursor, ops.len() as u64, "in order");
        assert!(faults.counts().chunks_delayed >= 2);
        faults.delay(Duration::ZERO);

        assert_eq!(faults.live_connections(), 1);
        assert_eq!(faults.cut_all(), 1);
        let err = writer.state().await.expect_err("the connection is gone");
        assert!(err.is_disconnected(), "{err}");
        assert_eq!(faults.counts().connections_cut, 1);
    });
}

/// Sums the `applied=` and `duplicate=` counts of the server's audit lines for appends
/// to `share_id`, once they account for `ops` applied ops. Audit lines are written
/// after the work they describe (never holding it up), so the last ones may still be
/// on their way: a few seconds at most.
fn audited_appends(server: &TestServer, share_id: &str, ops: u64) -> (u64, u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (mut applied, mut duplicates) = (0, 0);
        for detail in server.audit_details("append", share_id) {
            for field in detail.split(' ') {
                if let Some(n) = field.strip_prefix("applied=") {
                    applied += n.parse::<u64>().unwrap();
                } else if let Some(n) = field.strip_prefix("duplicate=") {
                    duplicates += n.parse::<u64>().unwrap();
                }
            }
        }
        if applied >= ops || std::time::Instant::now() > deadline {
            return (applied, duplicates);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// How long the syncer waits for one call in the main run; stalls last longer.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// Most stalls (traffic held past the call timeout) per run: each costs over a second.
const MAX_STALLS: u64 = 3;

/// Arms a random fault every few milliseconds until told to stop, with a seeded RNG: a
/// dropped or truncated response, a cut request, every connection cut, a short delay, or
/// rarely a stall longer than the syncer's call timeout. After three faults without the
/// syncer getting an ack through it holds off until one does, so faults cannot outpace the
/// syncer's attempts and starve it. Returns the number of stalls.
async fn inject_faults(
    faults: FaultControl,
    seed: u64,
    mut stop: watch::Receiver<bool>,
    progress: watch::Receiver<SyncStatus>,
) -> u64 {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut delayed = false;
    let mut stalls = 0;
    let mut last_acked = 0;
    let mut unanswered = 0;
    loop {
        let pause = Duration::from_millis(rng.random_range(5..60));
        if tokio::time::timeout(pause, stop.changed()).await.is_ok() {
            break;
        }
        let acked = progress.borrow().acked;
        if acked > last_acked {
            (last_acked, unanswered) = (acked, 0);
        }
        if unanswered >= 3 {
            continue;
        }
        unanswered += 1;
        match rng.random_range(0..100) {
            0..30 => faults.drop_next_response(),
            30..55 => faults.cut_next_request(),
            55..70 => faults.cut_next_response(),
            70..82 => {
                faults.cut_all();
            }
            82..84 if stalls < MAX_STALLS => {
                // Everything in flight times out on the client side, and arrives late.
                stalls += 1;
                faults.delay(CALL_TIMEOUT + Duration::from_millis(300));
                let _ = tokio::time::timeout(CALL_TIMEOUT * 2, stop.changed()).await;
                faults.delay(Duration::ZERO);
                delayed = false;
            }
            _ if delayed => {
                faults.delay(Duration::ZERO);
                delayed = false;
            }
            _ => {
                faults.delay(Duration::from_millis(rng.random_range(1..15)));
                delayed = true;
            }
        }
    }
    faults.heal();
    stalls
}

capsync_tests::on_each_engine!(
    ten_thousand_ops_through_a_hundred_faults_arrive_exactly_once_and_match_the_model
);

fn ten_thousand_ops_through_a_hundred_faults_arrive_exactly_once_and_match_the_model(
    server: TestServer,
) {
    let seed = seed("faults");
    let session_id = "ses_faults";
    let ops = AgentSession::generate(seed, session_id, OPS);
    let proxy = FaultProxy::start(server.addr(), seed);
    let faults = proxy.control();
    let started = Instant::now();
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let created = share(&agent, session_id).await;
        let share_id = created.writer.share_id().to_owned();

        let outbox = Outbox::open(server.scratch_dir().join("outbox.db")).expect("outbox");
        outbox
            .bind(&share_id, &proxy.addr().to_string())
            .await
            .expect("bind");
        let mut options =
            SyncOptions::new(proxy.addr().to_string(), created.writer_token.token.clone());
        options.batch_size = 64;
        options.backoff_initial = Duration::from_millis(5);
        options.backoff_max = Duration::from_millis(50);
        options.call_timeout = CALL_TIMEOUT;
        let syncer = spawn_syncer(outbox.clone(), options);
        // The most appendOps calls seen in flight at once: the faults must meet pipelined
        // batches, not only one at a time.
        let most_in_flight = std::rc::Rc::new(std::cell::Cell::new(0));
        let pipelining = {
            let most = std::rc::Rc::clone(&most_in_flight);
            let mut status = syncer.watch();
            tokio::task::spawn_local(async move {
                while status.changed().await.is_ok() {
                    most.set(most.get().max(status.borrow().calls_in_flight));
                }
            })
        };

        let (stop, stopped) = watch::channel(false);
        let injector = tokio::task::spawn_local(inject_faults(
            faults.clone(),
            seed ^ 0xF00D,
            stopped,
            syncer.watch(),
        ));

        // The agent produces the session in chunks. Before each chunk a fault is armed that
        // the syncer's next request meets, and the next chunk waits until it has struck, so
        // the run sees at least one fault per chunk besides the injector's.
        let mut rng = StdRng::seed_from_u64(seed);
        let chunk = ops.len().div_ceil(CHUNKS);
        for part in ops.chunks(chunk) {
            let before = faults.counts().disruptive();
            if rng.random_bool(0.5) {
                faults.drop_next_response();
            } else {
                faults.cut_next_request();
            }
            outbox.enqueue_all(part.to_vec()).await.expect("enqueue");
            let deadline = Instant::now() + Duration::from_secs(30);
            while faults.counts().disruptive() == before {
                assert!(
                    Instant::now() < deadline,
                    "no fault struck within 30 s; syncer {:?}; faults {:?}",
                    syncer.status(),
                    faults.counts()
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let enqueued_after = started.elapsed();
        let Ok(idle) = tokio::time::timeout(Duration::from_secs(120), syncer.wait_idle()).await
        else {
            panic!(
                "the syncer did not drain the outbox within 120 s: {:?}; outbox {:?}; faults {:?}",
                syncer.status(),
                outbox.status().await,
                faults.counts()
            );
        };
        let idle = idle.expect("the syncer ends idle, not failed");
        stop.send(true).unwrap();
        let stalls = injector.await.unwrap();
        let status = syncer.stop().await;
        pipelining.abort();
        let counts = faults.counts();
        assert!(
            most_in_flight.get() >= 2,
            "batches were pipelined: at most {} in flight",
            most_in_flight.get()
        );

        // The client side: everything acked, nothing pending or refused.
        assert_eq!(
            (idle.pending, idle.in_flight, idle.waiting, idle.rejected),
            (0, 0, 0, 0),
            "{idle:?}"
        );
        assert_eq!(status.acked, ops.len() as u64, "{status:?}");
        assert_eq!(status.last_acked_cursor, Some(ops.len() as u64));
        assert!(outbox.rejected().await.unwrap().is_empty());
        let queued = outbox.status().await.unwrap();
        assert_eq!(
            (queued.pending, queued.in_flight, queued.rejected),
            (0, 0, 0)
        );

        // The server side, read directly (not through the proxy).
        let (_conn, writer) = redeem_writer(server.addr(), &created.writer_token.token).await;
        let viewer = writer.viewer();
        let log = read_log(&viewer).await;
        // No op lost, none applied twice, cursors 1..=N without gaps.
        assert_log_holds_exactly(&log, ops.iter().map(|op| op.op_id.as_str()));
        // Applied in the order the agent enqueued them, each valid where it applied.
        let by_id: HashMap<String, OpSpec> = ops
            .iter()
            .map(|op| (op.op_id.clone(), op.clone()))
            .collect();
        let from_log = model_from_log(session_id, &log, &by_id);
        let expected = Model::from_ops(session_id, &ops);
        assert_eq!(from_log.log(), expected.log(), "ops applied out of order");
        let snapshot = viewer.snapshot().await.unwrap();
        assert_eq!(snapshot.cursor, ops.len() as u64);
        assert_same_document(&snapshot.to_document(), &expected.document());
        // The same state read in many small pages.
        let paged = viewer.snapshot_with(2048).await.unwrap();
        assert_eq!(paged, snapshot, "small snapshot pages fit together");

        // What the outbox recorded as acked is exactly the server's log, cursor for cursor.
        let acked: HashSet<(String, u64)> = outbox.acked().await.unwrap().into_iter().collect();
        let logged: HashSet<(String, u64)> = log
            .iter()
            .map(|op| (op.op_id.0.clone(), op.cursor.0))
            .collect();
        assert_eq!(acked.len(), ops.len());
        assert!(
            acked == logged,
            "the outbox's acks differ from the server's log"
        );

        // The server's own accounting (its audit log of appends): every op applied once
        // in total, and resends of batches whose answer was lost found duplicates.
        let (applied, duplicates) = audited_appends(&server, &share_id, ops.len() as u64);
        assert_eq!(applied, ops.len() as u64, "ops applied over all appends");
        assert!(
            duplicates > 0,
            "some resent batches had been applied already"
        );

        assert!(
            counts.disruptive() >= MIN_FAULTS,
            "only {} faults struck: {counts:?}",
            counts.disruptive()
        );
        eprintln!(
            "faults: seed={seed}: {} ops in {:.1?} (all enqueued after {enqueued_after:.1?}); faults {counts:?} ({} disruptive); {stalls} stalls past the call timeout; syncer retries {}; server saw {duplicates} duplicate ops",
            ops.len(),
            started.elapsed(),
            counts.disruptive(),
            status.retries
        );
    });
}
