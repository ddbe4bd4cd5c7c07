//! kill -9 of the real server process under load, then restart on the same data, several
//! times: every op a client saw acked is there after each restart (ack means durable), and
//! once the clients have resent what was cut, every op is applied exactly once, the cursors
//! have no gaps, and the snapshots are what the reference model computes.
//!
//! Several writers, one share each, stream a generated agent session through a fault proxy
//! (so their address stays put while the server moves to a new port on each restart). Each
//! writer keeps its ops in order and resends a batch until it is acked, as an outbox does.
//! The kill moments are drawn from a seed that is printed; `CAPSYNC_FAULT_SEED` replays it.

mod support;

// Shared with the workspace's integration tests (crate capsync-tests); this binary uses a
// part of each.
#[allow(dead_code)]
#[path = "../../tests/support/model.rs"]
mod model;
#[allow(dead_code)]
#[path = "../../tests/support/proxy.rs"]
mod proxy;
#[allow(dead_code)]
#[path = "../../tests/support/postgres.rs"]
mod test_postgres;
#[allow(dead_code)]
#[path = "../../tests/support/workload.rs"]
mod workload;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use capsync_client::{Batch, OpOutcome, OpSpec, Outbox, SyncOptions, WriterClient, spawn_syncer};
use model::{Model, assert_log_holds_exactly, assert_same_document, check_log, read_log};
use proxy::FaultProxy;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use support::{ServerProcess, run_local};
use tokio::sync::watch;
use workload::AgentSession;

const WRITERS: usize = 4;
const OPS_PER_WRITER: usize = 2_600;
const KILLS: usize = 5;
/// Longest wait for one append before the writer gives the connection up.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// What the writers share with the test body (all on one `LocalSet`).
#[derive(Default)]
struct Progress {
    /// Per writer: the op ids it has seen acked (applied or duplicate).
    acked: RefCell<Vec<HashSet<String>>>,
    /// Appends that failed (connection cut by a kill, or refused while the server was down).
    failed_calls: Cell<u64>,
    /// Ops acked as duplicates: resends of batches the server had applied before a kill.
    duplicates: Cell<u64>,
}

/// One writer: sends `ops` in order in random-sized batches, resending each until it is
/// acked, reconnecting through `addr` whenever the connection fails.
async fn writer(
    w: usize,
    addr: SocketAddr,
    token: String,
    ops: Vec<OpSpec>,
    seed: u64,
    progress: Rc<Progress>,
    acked_total: Rc<watch::Sender<usize>>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut live: Option<(capsync_client::Connection, WriterClient)> = None;
    let mut next = 0;
    while next < ops.len() {
        let size = rng.random_range(1..=40).min(ops.len() - next);
        let batch = Batch::new(format!("w{w}-{next}"), ops[next..next + size].to_vec());
        loop {
            if live.is_none() {
                live = connect(addr, &token).await;
            }
            let Some((_, writer)) = &live else {
                // The server is down: try again shortly.
                tokio::time::sleep(Duration::from_millis(rng.random_range(5..20))).await;
                continue;
            };
            match tokio::time::timeout(CALL_TIMEOUT, writer.append(&batch)).await {
                Ok(Ok(ack)) => {
                    let mut acked = progress.acked.borrow_mut();
                    for (op, result) in batch.ops.iter().zip(&ack.results) {
                        match result.outcome {
                            OpOutcome::Applied(_) => {}
                            OpOutcome::Duplicate(_) => {
                                progress.duplicates.set(progress.duplicates.get() + 1)
                            }
                            ref rejected => panic!("op {} was {rejected:?}", op.op_id),
                        }
                        acked[w].insert(op.op_id.clone());
                    }
                    acked_total.send_modify(|n| *n += size);
                    break;
                }
                Ok(Err(err)) => {
                    assert!(
                        err.is_disconnected()
                            || err.code() == Some(capsync_client::ErrorCode::Overloaded),
                        "only a cut connection may fail an append here: {err}"
                    );
                    progress.failed_calls.set(progress.failed_calls.get() + 1);
                    live = None;
                }
                Err(_) => {
                    progress.failed_calls.set(progress.failed_calls.get() + 1);
                    live = None;
                }
            }
        }
        next += size;
    }
}

async fn connect(
    addr: SocketAddr,
    token: &str,
) -> Option<(capsync_client::Connection, WriterClient)> {
    let conn = capsync_client::connect(addr).await.ok()?;
    let writer = conn.redeem(token).await.ok()?.into_writer().ok()?;
    Some((conn, writer))
}

/// Each share's op ids in its log, read straight from the server at `addr`.
async fn logged_ids(addr: SocketAddr, tokens: &[String]) -> Vec<HashSet<String>> {
    let conn = capsync_client::connect(addr).await.expect("connect");
    let mut all = Vec::new();
    for token in tokens {
        let viewer = conn
            .redeem(token)
            .await
            .expect("redeem")
            .into_writer()
            .expect("writer")
            .viewer();
        let log = read_log(&viewer).await;
        all.push(check_log(&log).into_iter().collect());
    }
    all
}

async fn start(data_dir: &Path, durability: &'static str) -> ServerProcess {
    let data_dir: PathBuf = data_dir.to_owned();
    tokio::task::spawn_blocking(move || {
        ServerProcess::start_with(&data_dir, &["--durability", durability])
    })
    .await
    .expect("start the server")
}

fn kill9_under_load(durability: &'static str) {
    let seed = workload::seed(&format!("crash ({durability})"));
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    run_local(async {
        let mut server = start(&data_dir, durability).await;
        let proxy = FaultProxy::start(server.addr, seed);
        let faults = proxy.control();

        // Setup, straight to the server: an agent and one share per writer.
        let (conn, agent) = support::agent(server.addr, &data_dir, "crash test").await;
        let mut tokens = Vec::new();
        let mut workloads = Vec::new();
        for w in 0..WRITERS {
            let session_id = format!("ses_crash_{w}");
            let created = support::share(&agent, &session_id).await;
            tokens.push(created.writer_token.token.clone());
            let ops =
                AgentSession::generate(seed.wrapping_add(w as u64), &session_id, OPS_PER_WRITER);
            workloads.push((session_id, ops));
        }
        drop(conn);

        let progress = Rc::new(Progress {
            acked: RefCell::new(vec![HashSet::new(); WRITERS]),
            ..Progress::default()
        });
        let (acked_total, mut acked_watch) = watch::channel(0usize);
        let acked_total = Rc::new(acked_total);
        let total_ops: usize = workloads.iter().map(|(_, ops)| ops.len()).sum();
        let mut tasks = Vec::new();
        for (w, (_, ops)) in workloads.iter().enumerate() {
            tasks.push(tokio::task::spawn_local(writer(
                w,
                proxy.addr(),
                tokens[w].clone(),
                ops.clone(),
                seed ^ (w as u64 + 1),
                progress.clone(),
                acked_total.clone(),
            )));
        }

        // Kill the server at random points of the run, and check what it acked each time.
        let mut rng = StdRng::seed_from_u64(seed);
        let mut verified = 0;
        for kill in 0..KILLS {
            let slice = total_ops / (KILLS + 1);
            let threshold = (kill * slice + rng.random_range(slice / 4..slice)).min(total_ops - 1);
            acked_watch
                .wait_for(|n| *n >= threshold)
                .await
                .expect("writers running");
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..10))).await;
            let acked_before_kill = progress.acked.borrow().clone();
            server.kill9();
            let failed_before = progress.failed_calls.get();
            drop(server);
            server = start(&data_dir, durability).await;
            faults.set_target(server.addr);

            let logged = logged_ids(server.addr, &tokens).await;
            for (w, acked) in acked_before_kill.iter().enumerate() {
                let lost: Vec<_> = acked.difference(&logged[w]).take(5).collect();
                assert!(
                    lost.is_empty(),
                    "kill {kill}: ops acked before the kill are gone after the restart: {lost:?}"
                );
                verified += acked.len();
            }
            eprintln!(
                "kill {kill}: after {threshold} acked ops; {} acked ops verified after the restart; {} appends failed so far (before this restart: {failed_before})",
                acked_before_kill.iter().map(HashSet::len).sum::<usize>(),
                progress.failed_calls.get(),
            );
        }

        for task in tasks {
            task.await.expect("writer");
        }

        // Nothing lost, nothing twice, no gaps, and the records are the model's.
        let conn = capsync_client::connect(server.addr).await.unwrap();
        for (w, (session_id, ops)) in workloads.iter().enumerate() {
            let viewer = conn
                .redeem(&tokens[w])
                .await
                .unwrap()
                .into_writer()
                .unwrap()
                .viewer();
            let log = read_log(&viewer).await;
            assert_log_holds_exactly(&log, ops.iter().map(|op| op.op_id.as_str()));
            let by_id: HashMap<String, OpSpec> = ops
                .iter()
                .map(|op| (op.op_id.clone(), op.clone()))
                .collect();
            let from_log = model::model_from_log(session_id, &log, &by_id);
            let expected = Model::from_ops(session_id, ops);
            assert_eq!(from_log.log(), expected.log(), "ops applied out of order");
            let snapshot = viewer.snapshot().await.unwrap();
            assert_eq!(snapshot.cursor, ops.len() as u64);
            assert_same_document(&snapshot.to_document(), &expected.document());
        }
        let acked: usize = progress.acked.borrow().iter().map(HashSet::len).sum();
        assert_eq!(acked, total_ops, "every op was acked in the end");
        assert!(
            progress.failed_calls.get() > 0,
            "the kills cut appends in flight"
        );
        eprintln!(
            "crash ({durability}): {total_ops} ops, {KILLS} kills, {verified} acked ops verified across restarts, {} appends cut, {} ops acked as duplicates on resend, proxy {:?}",
            progress.failed_calls.get(),
            progress.duplicates.get(),
            faults.counts()
        );
    });
}

/// The same with the client as an agent runs it: a durable outbox drained by its syncer.
/// After each kill, every op the outbox recorded as acked is in the restarted server's log
/// at the cursor the ack named.
#[test]
fn kill_9_under_load_loses_nothing_the_outbox_saw_acked() {
    const OPS: usize = 6_000;
    let seed = workload::seed("crash (outbox)");
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let session_id = "ses_crash_outbox";
    let ops = AgentSession::generate(seed, session_id, OPS);
    run_local(async {
        let mut server = start(&data_dir, "full").await;
        let proxy = FaultProxy::start(server.addr, seed);
        let faults = proxy.control();
        let (conn, agent) = support::agent(server.addr, &data_dir, "crash test").await;
        let created = support::share(&agent, session_id).await;
        drop(conn);
        let token = created.writer_token.token.clone();

        let outbox = Outbox::open(dir.path().join("outbox.db")).expect("outbox");
        outbox
            .bind(created.writer.share_id(), &proxy.addr().to_string())
            .await
            .unwrap();
        outbox.enqueue_all(ops.clone()).await.unwrap();
        let syncer = spawn_syncer(
            outbox.clone(),
            syncer_options(proxy.addr().to_string(), &token),
        );
        let mut progress = syncer.watch();

        let mut rng = StdRng::seed_from_u64(seed);
        let slice = (OPS / (KILLS + 1)) as u64;
        for kill in 0..KILLS as u64 {
            let threshold = kill * slice + rng.random_range(slice / 4..slice);
            progress
                .wait_for(|s| s.acked >= threshold)
                .await
                .expect("syncer running");
            // Somewhere in the next batch's round trip.
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..10))).await;
            server.kill9();
            let acked = outbox.acked().await.unwrap();
            drop(server);
            server = start(&data_dir, "full").await;
            faults.set_target(server.addr);
            let (_conn, writer) = connect(server.addr, &token).await.expect("redeem");
            let logged: HashMap<String, u64> = read_log(&writer.viewer())
                .await
                .into_iter()
                .map(|op| (op.op_id.0, op.cursor.0))
                .collect();
            for (op_id, cursor) in &acked {
                assert_eq!(
                    logged.get(op_id),
                    Some(cursor),
                    "kill {kill}: op {op_id}, acked at cursor {cursor}, after the restart"
                );
            }
            eprintln!(
                "kill {kill}: {} acked ops verified after the restart",
                acked.len()
            );
        }

        let idle = tokio::time::timeout(Duration::from_secs(60), syncer.wait_idle())
            .await
            .expect("the syncer drains the outbox")
            .expect("the syncer ends idle");
        assert_eq!((idle.pending, idle.in_flight, idle.rejected), (0, 0, 0));
        let status = syncer.stop().await;
        let (_conn, writer) = connect(server.addr, &token).await.expect("redeem");
        let viewer = writer.viewer();
        let log = read_log(&viewer).await;
        assert_log_holds_exactly(&log, ops.iter().map(|op| op.op_id.as_str()));
        let expected = Model::from_ops(session_id, &ops);
        let logged: Vec<String> = log.iter().map(|op| op.op_id.0.clone()).collect();
        assert_eq!(logged, expected.log(), "ops applied out of order");
        assert_same_document(
            &viewer.snapshot().await.unwrap().to_document(),
            &expected.document(),
        );
        let acked: HashSet<(String, u64)> = outbox.acked().await.unwrap().into_iter().collect();
        let logged: HashSet<(String, u64)> = log
            .into_iter()
            .map(|op| (op.op_id.0, op.cursor.0))
            .collect();
        assert!(
            acked == logged,
            "the outbox's acks differ from the server's log"
        );
        eprintln!(
            "crash (outbox): {} ops, {KILLS} kills, syncer retries {}, proxy {:?}",
            ops.len(),
            status.retries,
            faults.counts()
        );
    });
}

#[test]
fn kill_9_under_load_loses_no_acked_op_with_full_durability() {
    kill9_under_load("full");
}

#[test]
fn kill_9_under_load_loses_no_acked_op_with_normal_durability() {
    kill9_under_load("normal");
}

/// The syncer options of these tests: quick retries, and a call given up after 10 s.
fn syncer_options(servers: String, token: &str) -> SyncOptions {
    let mut options = SyncOptions::new(servers, token.to_owned());
    options.batch_size = 50;
    options.backoff_initial = Duration::from_millis(5);
    options.backoff_max = Duration::from_millis(50);
    options.call_timeout = Duration::from_secs(10);
    options
}

/// Two server processes on one PostgreSQL; a syncer given both addresses streams through
/// the first, which is killed with SIGKILL mid-stream: the syncer moves to the second,
/// and every op is in the share once.
#[test]
fn a_node_killed_mid_stream_leaves_the_syncer_on_the_other_with_every_op_once() {
    const OPS: usize = 3_000;
    let Some(url) = test_postgres::url_or_skip() else {
        return;
    };
    let schema = test_postgres::TestSchema::create(&url);
    let database = schema.server_url();
    let seed = workload::seed("crash (failover)");
    let dir = tempfile::tempdir().unwrap();
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    let session_id = "ses_crash_failover";
    let ops = AgentSession::generate(seed, session_id, OPS);
    let mut node_a = ServerProcess::start_with(&dir_a, &["--database", &database]);
    let node_b = ServerProcess::start_with(&dir_b, &["--database", &database]);
    run_local(async {
        // The first node made the admin token.
        let (conn, agent) = support::agent(node_a.addr, &dir_a, "failover test").await;
        let created = support::share(&agent, session_id).await;
        drop(conn);
        let token = created.writer_token.token.clone();

        let outbox = Outbox::open(dir.path().join("outbox.db")).expect("outbox");
        let syncer = spawn_syncer(
            outbox.clone(),
            syncer_options(format!("{},{}", node_a.addr, node_b.addr), &token),
        );
        let mut progress = syncer.watch();
        outbox.enqueue_all(ops.clone()).await.unwrap();

        let mut rng = StdRng::seed_from_u64(seed);
        let threshold = rng.random_range(OPS as u64 / 8..OPS as u64 / 2);
        progress
            .wait_for(|s| s.acked >= threshold)
            .await
            .expect("syncer running");
        // Somewhere in the next batch's round trip.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..10))).await;
        node_a.kill9();

        let idle = tokio::time::timeout(Duration::from_secs(60), syncer.wait_idle())
            .await
            .expect("the syncer drains the outbox through node B")
            .expect("the syncer ends idle");
        assert_eq!((idle.pending, idle.in_flight, idle.rejected), (0, 0, 0));
        let status = syncer.stop().await;
        let (_conn, writer) = connect(node_b.addr, &token).await.expect("redeem on B");
        let log = read_log(&writer.viewer()).await;
        assert_log_holds_exactly(&log, ops.iter().map(|op| op.op_id.as_str()));
        let acked: HashSet<(String, u64)> = outbox.acked().await.unwrap().into_iter().collect();
        let logged: HashSet<(String, u64)> = log
            .into_iter()
            .map(|op| (op.op_id.0, op.cursor.0))
            .collect();
        assert!(acked == logged, "the outbox's acks differ from the log");
        eprintln!(
            "crash (failover): {OPS} ops, node A killed after {threshold} acked, syncer retries {}",
            status.retries
        );
    });
    drop(node_b);
}

/// A node killed with SIGKILL while a writer is connected to it: a viewer on the other
/// node sees the writer go once the dead node's heartbeat is `--node-timeout` old.
#[test]
fn a_killed_nodes_writers_stop_counting_as_connected_on_the_other_node() {
    let Some(url) = test_postgres::url_or_skip() else {
        return;
    };
    let schema = test_postgres::TestSchema::create(&url);
    let database = schema.server_url();
    let dir = tempfile::tempdir().unwrap();
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    let args = [
        "--database",
        &database,
        "--node-heartbeat",
        "100ms",
        "--node-timeout",
        "1s",
    ];
    let mut node_a = ServerProcess::start_with(&dir_a, &args);
    let node_b = ServerProcess::start_with(&dir_b, &args);
    run_local(async {
        let (_conn_a, agent) = support::agent(node_a.addr, &dir_a, "presence test").await;
        // Its writer capability stays live on node A.
        let created = support::share(&agent, "ses_presence_kill").await;
        let conn_b = capsync_client::connect(node_b.addr).await.unwrap();
        let viewer = conn_b
            .redeem(&created.viewer_token.token)
            .await
            .unwrap()
            .into_viewer()
            .unwrap();
        let presence_until = |wanted: bool| {
            let viewer = viewer.clone();
            async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                loop {
                    let presence = viewer.presence().await.unwrap();
                    if presence.writer_connected == wanted {
                        return presence;
                    }
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "writer_connected never became {wanted}: {presence:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        presence_until(true).await;
        node_a.kill9();
        let gone = presence_until(false).await;
        assert!(gone.writer_gone_since.is_some(), "{gone:?}");
    });
    drop(node_b);
}

/// PostgreSQL crashes and restarts while a syncer streams into a server on it: calls
/// fail as retryable meanwhile, the server reconnects by itself, no acked op is lost
/// and every op is in the share once.
#[test]
fn postgres_restarted_under_load_loses_no_acked_op_and_the_server_recovers() {
    const OPS: usize = 3_000;
    // Wanted only where the PostgreSQL tests run.
    if test_postgres::url_or_skip().is_none() {
        return;
    }
    let seed = workload::seed("crash (postgres restart)");
    let dir = tempfile::tempdir().unwrap();
    let postgres = test_postgres::PrivatePostgres::start(dir.path().join("pg"), None);
    let data_dir = dir.path().join("data");
    let server = ServerProcess::start_with(&data_dir, &["--database", &postgres.url]);
    let session_id = "ses_crash_pg_restart";
    let ops = AgentSession::generate(seed, session_id, OPS);
    run_local(async {
        let (conn, agent) = support::agent(server.addr, &data_dir, "restart test").await;
        let created = support::share(&agent, session_id).await;
        drop(conn);
        let token = created.writer_token.token.clone();
        let outbox = Outbox::open(dir.path().join("outbox.db")).expect("outbox");
        let syncer = spawn_syncer(
            outbox.clone(),
            syncer_options(server.addr.to_string(), &token),
        );
        let mut progress = syncer.watch();
        outbox.enqueue_all(ops.clone()).await.unwrap();

        let mut rng = StdRng::seed_from_u64(seed);
        let threshold = rng.random_range(OPS as u64 / 8..OPS as u64 / 2);
        progress
            .wait_for(|s| s.acked >= threshold)
            .await
            .expect("syncer running");
        let acked_before = outbox.acked().await.unwrap();
        // From another thread, while the syncer goes on sending.
        let cluster = postgres.dir().to_path_buf();
        tokio::task::spawn_blocking(move || test_postgres::PrivatePostgres::restart(&cluster))
            .await
            .unwrap();

        let idle = tokio::time::timeout(Duration::from_secs(60), syncer.wait_idle())
            .await
            .expect("the syncer drains the outbox after the restart")
            .expect("the syncer ends idle");
        assert_eq!(
            (idle.pending, idle.in_flight, idle.rejected),
            (0, 0, 0),
            "{:?}",
            outbox.rejected().await.unwrap().first()
        );
        let status = syncer.stop().await;
        let (_conn, writer) = connect(server.addr, &token).await.expect("redeem");
        let log = read_log(&writer.viewer()).await;
        let logged: HashMap<String, u64> = log
            .iter()
            .map(|op| (op.op_id.0.clone(), op.cursor.0))
            .collect();
        for (op_id, cursor) in &acked_before {
            assert_eq!(logged.get(op_id), Some(cursor), "acked op {op_id} survives");
        }
        assert_log_holds_exactly(&log, ops.iter().map(|op| op.op_id.as_str()));
        eprintln!(
            "crash (postgres restart): {OPS} ops, restarted after {} acked, syncer retries {}",
            acked_before.len(),
            status.retries
        );
    });
    drop(server);
}
