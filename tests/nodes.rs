//! Several server processes on one PostgreSQL database: what one node commits, the
//! others see at once (live followers, revocations), and writers on different nodes
//! share one gap-free cursor. Each test skips without a PostgreSQL
//! (`CAPSYNC_TEST_POSTGRES`; `REQUIRE_POSTGRES=1` makes that a failure).

use std::collections::HashSet;
use std::time::Duration;

use capsync_client::{
    Connection, CreatedShare, ErrorCode, LiveEvent, LiveOps, LoggedOp, OpOutcome, Scope,
};
use capsync_tests::{Engine, TestServer, agent, batch, run_local, share, text_part_op};

/// Upper bound on any single wait; far above what a healthy run takes.
const GUARD: Duration = Duration::from_secs(30);

/// Two nodes on one fresh schema; followers recheck only every hour, so whatever
/// reaches them in time came through the database's notifications.
fn two_nodes() -> Option<(TestServer, TestServer)> {
    let first = TestServer::start_on_with(Engine::Postgres, |config| {
        config.follow_recheck = Duration::from_secs(3600);
    })?;
    let second = first.another_node();
    Some((first, second))
}

/// A connection to `node` holding the deployment's admin token (the first node wrote it).
async fn admin_on(node: &TestServer, token: &str) -> (Connection, capsync_client::AdminClient) {
    let conn = capsync_client::connect(node.addr()).await.unwrap();
    let admin = conn.redeem(token).await.unwrap().into_admin().unwrap();
    (conn, admin)
}

/// A connection to `node` and what `token` redeems to there.
async fn redeem_on(node: &TestServer, token: &str) -> (Connection, capsync_client::Redeemed) {
    let conn = capsync_client::connect(node.addr()).await.unwrap();
    let redeemed = conn.redeem(token).await.unwrap();
    (conn, redeemed)
}

async fn next_ops(live: &mut LiveOps) -> Vec<LoggedOp> {
    match tokio::time::timeout(GUARD, live.next()).await {
        Ok(Some(LiveEvent::Ops(ops))) => ops,
        other => panic!("expected ops, got {other:?}"),
    }
}

#[test]
fn an_append_on_one_node_reaches_a_follower_on_another_live() {
    let Some((a, b)) = two_nodes() else {
        return;
    };
    run_local(async {
        let (conn_a, admin_a) = admin_on(&a, &a.admin_token()).await;
        let (agent_a, _) = agent(&conn_a, &admin_a).await;
        let created = share(&agent_a, "ses_nodes").await;
        let (_conn_b, redeemed) = redeem_on(&b, &created.viewer_token.token).await;
        let viewer_b = redeemed.into_viewer().unwrap();
        let mut live = viewer_b.subscribe(0).await.unwrap();
        for round in 1..=3u64 {
            let ack = created
                .writer
                .append(&batch(
                    &format!("b{round}"),
                    vec![text_part_op("ses_nodes", "msg_1", &format!("prt_{round}"))],
                ))
                .await
                .unwrap();
            assert_eq!(ack.cursor, round);
            let ops = next_ops(&mut live).await;
            assert_eq!(ops.last().map(|op| op.cursor.0), Some(round));
        }
    });
}

#[test]
fn revoking_writers_on_one_node_stops_a_live_writer_on_another_at_its_next_call() {
    let Some((a, b)) = two_nodes() else {
        return;
    };
    run_local(async {
        let (conn_a, admin_a) = admin_on(&a, &a.admin_token()).await;
        let (agent_a, agent_token) = agent(&conn_a, &admin_a).await;
        let created: CreatedShare = share(&agent_a, "ses_revoke").await;
        let append = |id: &str| {
            batch(
                id,
                vec![text_part_op("ses_revoke", "msg_1", &format!("prt_{id}"))],
            )
        };
        created.writer.append(&append("before")).await.unwrap();

        // The share's owner revokes its writers through the other node.
        let (_conn_b, redeemed) = redeem_on(&b, &agent_token).await;
        let agent_b = redeemed.into_agent().unwrap();
        agent_b
            .revoke_share(&created.info.state.share_id, Scope::Writers)
            .await
            .unwrap();

        let refused = created.writer.append(&append("after")).await;
        assert_eq!(
            refused.expect_err("revoked").code(),
            Some(ErrorCode::Revoked)
        );
    });
}

#[test]
fn writers_on_two_nodes_share_one_gap_free_cursor_and_apply_each_op_once() {
    const BATCHES: usize = 40;
    let Some((a, b)) = two_nodes() else {
        return;
    };
    run_local(async {
        let (conn_a, admin_a) = admin_on(&a, &a.admin_token()).await;
        let (agent_a, _) = agent(&conn_a, &admin_a).await;
        let created = share(&agent_a, "ses_both").await;
        let (_conn_b, redeemed) = redeem_on(&b, &created.writer_token.token).await;
        let writer_b = redeemed.into_writer().unwrap();
        // Each op is sent through both nodes at once: one applies it, the other
        // finds it a duplicate at the same cursor.
        let mut cursors = HashSet::new();
        for i in 0..BATCHES {
            let ops = batch(
                &format!("b{i}"),
                vec![text_part_op("ses_both", "msg_1", &format!("prt_{i:03}"))],
            );
            let (via_a, via_b) = futures::join!(created.writer.append(&ops), writer_b.append(&ops));
            let (via_a, via_b) = (via_a.unwrap(), via_b.unwrap());
            let outcomes = [&via_a.results[0].outcome, &via_b.results[0].outcome];
            let applied: Vec<u64> = outcomes
                .iter()
                .filter_map(|o| match o {
                    OpOutcome::Applied(at) => Some(at.0),
                    _ => None,
                })
                .collect();
            assert_eq!(applied.len(), 1, "applied exactly once: {outcomes:?}");
            let at = applied[0];
            assert!(
                outcomes.iter().all(
                    |o| matches!(o, OpOutcome::Applied(c) | OpOutcome::Duplicate(c) if c.0 == at)
                ),
                "{outcomes:?}"
            );
            assert!(cursors.insert(at), "cursor {at} given twice");
        }
        let expected: HashSet<u64> = (1..=BATCHES as u64).collect();
        assert_eq!(cursors, expected, "gap-free");
        let viewer = writer_b.viewer();
        let logged = viewer.ops_since(0, 0).await.unwrap().ops;
        assert_eq!(logged.len(), BATCHES);
    });
}

/// Asks `viewer` for presence until `wanted` holds for it (presence crosses nodes at
/// the pace of their publishing, a second or so).
async fn presence_until(
    viewer: &capsync_client::ViewerClient,
    what: &str,
    wanted: impl Fn(&capsync_client::Presence) -> bool,
) -> capsync_client::Presence {
    let deadline = tokio::time::Instant::now() + GUARD;
    loop {
        let presence = viewer.presence().await.unwrap();
        if wanted(&presence) {
            return presence;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited {GUARD:?} for {what}: {presence:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn a_writer_on_one_node_shows_as_connected_on_another_until_it_leaves() {
    let Some((a, b)) = two_nodes() else {
        return;
    };
    run_local(async {
        let (conn_a, admin_a) = admin_on(&a, &a.admin_token()).await;
        let (agent_a, _) = agent(&conn_a, &admin_a).await;
        // Its writer capability is live on node A.
        let created = share(&agent_a, "ses_present").await;
        let (_conn_b, redeemed) = redeem_on(&b, &created.viewer_token.token).await;
        let viewer_b = redeemed.into_viewer().unwrap();
        presence_until(&viewer_b, "node A's writer on node B", |p| {
            p.writer_connected
        })
        .await;

        let CreatedShare { writer, .. } = created;
        drop(writer);
        let gone = presence_until(&viewer_b, "the writer's departure on node B", |p| {
            !p.writer_connected
        })
        .await;
        assert!(gone.writer_gone_since.is_some(), "{gone:?}");
    });
}

#[test]
fn one_node_at_a_time_leads_the_lifecycle_and_another_takes_over_when_it_goes() {
    use capsync_server::node::Leadership as _;
    use capsync_server::node::postgres::AdvisoryLead;
    let Some(url) = capsync_tests::postgres::url_or_skip() else {
        return;
    };
    let schema = capsync_tests::postgres::TestSchema::create(&url);
    let database =
        capsync_server::ledger::postgres::Database::new(&schema.server_url(), None).unwrap();
    run_local(async {
        let first = AdvisoryLead::start(database.clone()).unwrap();
        let second = AdvisoryLead::start(database.clone()).unwrap();
        assert!(first.lead().await, "the first to ask leads");
        assert!(!second.lead().await, "while it does, no other node leads");
        assert!(first.lead().await, "and it goes on leading");
        // The first node goes: its connection, and with it the lock.
        drop(first);
        let deadline = tokio::time::Instant::now() + GUARD;
        while !second.lead().await {
            assert!(tokio::time::Instant::now() < deadline, "nobody took over");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

#[test]
fn the_first_node_makes_the_admin_token_and_a_rotation_through_the_database_reaches_every_node() {
    let Some((a, b)) = two_nodes() else {
        return;
    };
    assert!(
        !b.data_dir().join("admin.token").exists(),
        "the second node found the first one's token and made none"
    );
    let old = a.admin_token();
    // `capsync-server admin-token --rotate --database …` from a data directory of its own.
    let elsewhere = tempfile::tempdir().unwrap();
    let config = capsync_server::Config {
        data_dir: elsewhere.path().to_owned(),
        ..a.config().clone()
    };
    let path = config.admin_token_path();
    let new = run_local(async {
        let ledger = capsync_server::server::open_ledger(&config, &Default::default()).unwrap();
        let hasher = capsync_server::server::hasher(&config).unwrap();
        capsync_server::admin_token::rotate(&ledger, &hasher, &path)
            .await
            .unwrap();
        ledger.close().await;
        std::fs::read_to_string(&path).unwrap().trim().to_owned()
    });
    assert_ne!(new, old);
    run_local(async {
        for node in [&a, &b] {
            let conn = capsync_client::connect(node.addr()).await.unwrap();
            let refused = conn
                .redeem(&old)
                .await
                .expect_err("the old token is revoked");
            assert_eq!(refused.code(), Some(ErrorCode::PermissionDenied));
            conn.redeem(&new).await.unwrap().into_admin().unwrap();
        }
    });
}

#[test]
fn while_the_database_is_unreachable_appends_are_refused_as_retryable_and_the_server_recovers_alone()
 {
    use capsync_tests::proxy::FaultProxy;
    // A port nothing listens on: where "the database" goes while it is down.
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut proxy = None;
    let Some(server) = TestServer::start_on_with(Engine::Postgres, |config| {
        // The server reaches PostgreSQL through a proxy the test can cut.
        let url = config.database.clone().unwrap();
        let parsed: postgres::Config = url.expose().parse().unwrap();
        let postgres::config::Host::Tcp(host) = &parsed.get_hosts()[0] else {
            panic!("the tests' PostgreSQL is reached over TCP")
        };
        let real = std::net::SocketAddr::new(host.parse().unwrap(), parsed.get_ports()[0]);
        let started = FaultProxy::start(real, 1);
        let through = url
            .expose()
            .replace(&real.to_string(), &started.addr().to_string());
        config.database = Some(through.parse().unwrap());
        proxy = Some((started, real));
    }) else {
        return;
    };
    let (proxy, real) = proxy.unwrap();
    let faults = proxy.control();
    run_local(async {
        let (conn, admin) = capsync_tests::admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let created = share(&agent, "ses_outage").await;
        let append = |id: &str| {
            batch(
                id,
                vec![text_part_op("ses_outage", "msg_1", &format!("prt_{id}"))],
            )
        };
        assert_eq!(
            created.writer.append(&append("up")).await.unwrap().cursor,
            1
        );

        // PostgreSQL goes away: every connection cut, new ones refused.
        faults.set_target(nowhere);
        faults.cut_all();
        let refused = created.writer.append(&append("down")).await;
        let code = refused.expect_err("no database").code();
        assert_eq!(code, Some(ErrorCode::Overloaded), "retryable");
        assert_eq!(server.metric("capsync_writes_overloaded_total"), 1.0);

        // Back: the next call finds it again, with no restart.
        faults.set_target(real);
        let ack = created.writer.append(&append("down")).await.unwrap();
        assert_eq!(ack.cursor, 2, "the refused batch was not stored");
        let ack = created.writer.append(&append("again")).await.unwrap();
        assert_eq!(ack.cursor, 3);
    });
}

#[test]
fn a_syncer_whose_node_dies_mid_stream_moves_to_the_next_and_loses_and_repeats_nothing() {
    use capsync_client::{Outbox, SyncOptions, spawn_syncer};
    use capsync_tests::model::{assert_log_holds_exactly, read_log};
    use capsync_tests::proxy::FaultProxy;
    use capsync_tests::workload::AgentSession;
    const OPS: usize = 600;
    let Some((a, b)) = two_nodes() else {
        return;
    };
    // Node A is reached through a proxy: cutting it (every connection, and every new one
    // refused) is node A dying, as the client sees it.
    let proxy = FaultProxy::start(a.addr(), 7);
    let faults = proxy.control();
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    run_local(async {
        let (conn, admin) = admin_on(&a, &a.admin_token()).await;
        let (agent_a, _) = agent(&conn, &admin).await;
        let created = share(&agent_a, "ses_failover").await;
        let ops = AgentSession::generate(11, "ses_failover", OPS);

        let outbox = Outbox::open(a.scratch_dir().join("failover-outbox.db")).unwrap();
        let servers = format!("{},{}", proxy.addr(), b.addr());
        let mut options = SyncOptions::new(servers, created.writer_token.token.clone());
        options.batch_size = 20;
        options.backoff_initial = Duration::from_millis(5);
        options.backoff_max = Duration::from_millis(50);
        let syncer = spawn_syncer(outbox.clone(), options);

        let (first, rest) = ops.split_at(OPS / 2);
        outbox.enqueue_all(first.to_vec()).await.unwrap();
        // Node A dies while the syncer streams through it.
        let deadline = tokio::time::Instant::now() + GUARD;
        while syncer.status().acked == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "nothing acked via A"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        faults.set_target(nowhere);
        faults.cut_all();
        outbox.enqueue_all(rest.to_vec()).await.unwrap();
        let idle = tokio::time::timeout(GUARD, syncer.wait_idle())
            .await
            .expect("the syncer drains through node B")
            .expect("idle, not failed");
        assert_eq!((idle.pending, idle.in_flight, idle.rejected), (0, 0, 0));
        syncer.stop().await;

        // Read on node B: every op once, cursors without gaps.
        let (_conn_b, redeemed) = redeem_on(&b, &created.viewer_token.token).await;
        let viewer = redeemed.into_viewer().unwrap();
        let log = read_log(&viewer).await;
        assert_log_holds_exactly(&log, ops.iter().map(|op| op.op_id.as_str()));
        let bound = outbox.status().await.unwrap();
        assert_eq!(
            bound.server.as_deref(),
            Some(b.addr().to_string().as_str()),
            "the outbox records the server it moved to"
        );
    });
}
