//! The server process as an outside attacker meets it (issue 9): no peer
//! without a token can exhaust its memory, connection slots, descriptors or
//! log; the answers to full storage, huge cursors and bad addresses are clear.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use capsync_client::{Batch, ErrorCode, OpKind, OpSpec};
use serde_json::{Value, json};

use crate::support::{
    self, BIN, ServerProcess, admin_token, http_get, http_request, metric, raise_open_files,
    run_local,
};

const MIB: u64 = 1024 * 1024;

fn localhost(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// The 8-byte Cap'n Proto frame header announcing one segment of `words` words.
fn announce(words: u32) -> [u8; 8] {
    let mut header = [0u8; 8];
    header[4..].copy_from_slice(&words.to_le_bytes());
    header
}

/// One segment just under 16 MiB, as the issue's attacker sent.
const HUGE_WORDS: u32 = (16 << 17) - 2;

/// A message with a text part, padded to about `bytes`.
fn part_op(id: &str, bytes: usize) -> OpSpec {
    OpSpec::new(
        id,
        OpKind::PartUpsert,
        json!({"id": id, "messageID": "msg_1", "type": "text", "text": "x".repeat(bytes)}),
    )
}

fn setup_ops(session: &str) -> Vec<OpSpec> {
    vec![
        OpSpec::new("session", OpKind::SessionUpsert, json!({"id": session})),
        OpSpec::new(
            "message",
            OpKind::MessageUpsert,
            json!({"id": "msg_1", "role": "assistant"}),
        ),
    ]
}

/// Waits until `socket` is closed by the server (end of stream or reset), at
/// most `limit`; false if it is still open then.
fn closed_within(socket: &mut TcpStream, limit: Duration) -> bool {
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let started = Instant::now();
    let mut byte = [0u8; 64];
    while started.elapsed() < limit {
        match socket.read(&mut byte) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn announced_message_sizes_cost_no_memory_before_or_after_a_redeem() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    // Long enough for the unauthenticated connections to be alive while measured.
    let server = ServerProcess::start_with(
        &data_dir,
        &[
            "--handshake-timeout",
            "60s",
            // All from 127.0.0.1: let them in, to see what they cost.
            "--max-connections-per-address",
            "1024",
        ],
    );
    run_local(async {
        let (_conn, agent) = support::agent(server.addr, &data_dir, "memory").await;
        let created = support::share(&agent, "ses_mem").await;
        let writer = &created.writer;
        writer
            .append(&Batch::new("setup", setup_ops("ses_mem")))
            .await
            .unwrap();
        writer
            .append(&Batch::new("warm", vec![part_op("warm", 1000)]))
            .await
            .unwrap();
        let before = server.rss_bytes();

        // 200 connections that only announce a message just under 16 MiB.
        let mut raw = Vec::new();
        for _ in 0..200 {
            let mut socket = TcpStream::connect(server.addr).unwrap();
            socket.write_all(&announce(HUGE_WORDS)).unwrap();
            raw.push(socket);
        }
        // 100 that redeem a token first, then do the same.
        let mut redeemed = Vec::new();
        for _ in 0..100 {
            let relay = support::relay(server.addr, localhost(1)).await;
            let conn = capsync_client::connect(relay.addr).await.unwrap();
            let viewer = conn
                .redeem(&created.viewer_token.token)
                .await
                .unwrap()
                .into_viewer()
                .unwrap();
            relay.inject.send(announce(HUGE_WORDS).to_vec()).unwrap();
            redeemed.push((relay, conn, viewer));
        }
        // A normal client keeps working meanwhile, writing and reading.
        for i in 0..20 {
            let ack = writer
                .append(&Batch::new(
                    format!("b{i}"),
                    vec![part_op(&format!("p{i}"), 2000)],
                ))
                .await
                .unwrap();
            assert_eq!(ack.applied(), 1);
        }
        // That viewer's connection is stuck behind its own half-sent message:
        // its calls go unanswered (a fresh connection reads fine, below).
        let stuck = tokio::time::timeout(
            std::time::Duration::from_millis(300),
            redeemed[0].2.ops_since(0, 100),
        )
        .await;
        assert!(
            stuck.is_err(),
            "a call behind a half-sent message was answered"
        );
        let conn = capsync_client::connect(server.addr).await.unwrap();
        let viewer = conn
            .redeem(&created.viewer_token.token)
            .await
            .unwrap()
            .into_viewer()
            .unwrap();
        assert_eq!(viewer.ops_since(0, 100).await.unwrap().ops.len(), 23);

        let after = server.rss_bytes();
        let grown = after.saturating_sub(before);
        println!(
            "RSS {} MiB -> {} MiB with 300 announced 16 MiB messages",
            before / MIB,
            after / MIB
        );
        assert!(
            grown < 50 * MIB,
            "RSS grew by {} MiB for announced, unsent messages",
            grown / MIB
        );
        drop(raw);
    });
}

#[test]
fn idle_connections_from_one_address_leave_room_for_others_and_are_closed() {
    raise_open_files(4096);
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let server = ServerProcess::start_with(&data_dir, &["--handshake-timeout", "2s"]);
    let http = server.http();

    // 1,024 connections from 127.0.0.1 that send nothing.
    let mut idle: Vec<TcpStream> = (0..1024)
        .map(|_| TcpStream::connect(server.addr).unwrap())
        .collect();

    // A client on 127.0.0.2 connects and appends all the same.
    run_local(async {
        let relay = support::relay(server.addr, localhost(2)).await;
        let (_conn, agent) = support::agent(relay.addr, &data_dir, "other address").await;
        let created = support::share(&agent, "ses_other").await;
        let ack = created
            .writer
            .append(&Batch::new("setup", setup_ops("ses_other")))
            .await
            .unwrap();
        assert_eq!(ack.applied(), 2);
    });

    // Every idle connection is closed: most at once (no slot for this address),
    // the rest after the handshake timeout.
    for (i, socket) in idle.iter_mut().enumerate() {
        assert!(
            closed_within(socket, Duration::from_secs(30)),
            "idle connection {i} is still open"
        );
    }
    let refused = metric(
        http,
        r#"capsync_connections_refused_total{listener="rpc",reason="address_limit"}"#,
    )
    .unwrap();
    let timed_out = metric(
        http,
        r#"capsync_rpc_connections_ended_total{reason="handshake_timeout"}"#,
    )
    .unwrap();
    // Those that got one of the address's 128 slots were closed by the handshake
    // timeout (slots freed that way were taken again by later ones); all the
    // others were refused at once.
    println!("{refused} refused at the address limit, {timed_out} closed by the handshake timeout");
    assert_eq!(refused + timed_out, 1024.0);
    assert!(refused > 0.0 && timed_out >= 128.0);
}

#[test]
fn running_out_of_descriptors_backs_off_quietly_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    // The server gets 128 descriptors; slots are not what stops it here.
    let mut server = ServerProcess::start_under(
        &["prlimit", "--nofile=128:128"],
        &data_dir,
        &[
            "--max-connections",
            "4096",
            "--max-connections-per-address",
            "4096",
            // Idle connections are what hold the descriptors here.
            "--http-header-timeout",
            "120s",
            "--log-summary-interval",
            "2s",
        ],
    );

    // Open HTTP connections (no token needed) well past the limit, and hold
    // them; connects stop succeeding once the listen queue is full too.
    let mut held = Vec::new();
    for _ in 0..200 {
        match TcpStream::connect_timeout(&server.http(), Duration::from_secs(5)) {
            Ok(socket) => held.push(socket),
            Err(_) => break,
        }
    }
    let fds = std::fs::read_dir(format!("/proc/{}/fd", server.child.id()))
        .unwrap()
        .count();
    println!(
        "held {} connections; the server has {fds} descriptors open",
        held.len()
    );
    // Precondition: the server did run out of descriptors.
    let started = Instant::now();
    loop {
        let line = server.next_log("the accept failure");
        if line["fields"]["listener"] == "http" && line["level"] == "WARN" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30));
    }
    // While they are held, the log grows by a few lines at most.
    let watched = Instant::now();
    let mut lines = Vec::new();
    while watched.elapsed() < Duration::from_secs(5) {
        if let Ok(line) = server.logs.recv_timeout(Duration::from_millis(100)) {
            lines.push(line);
        }
    }
    println!("{} log lines in 5 s while out of descriptors", lines.len());
    assert!(
        lines.len() <= 10,
        "the log grew by {} lines in 5 s: {lines:?}",
        lines.len()
    );
    drop(held);

    // Once they are gone it serves again, HTTP and RPC.
    let started = Instant::now();
    loop {
        if let Ok((200, body)) = http_get(server.http(), localhost(1), "/healthz") {
            assert_eq!(body.trim(), "ok");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the server did not recover"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    run_local(async {
        let (_conn, agent) = support::agent(server.addr, &data_dir, "after").await;
        let created = support::share(&agent, "ses_after").await;
        created
            .writer
            .append(&Batch::new("setup", setup_ops("ses_after")))
            .await
            .unwrap();
    });
    assert!(
        metric(
            server.http(),
            r#"capsync_accept_errors_total{listener="http"}"#
        )
        .unwrap()
            > 0.0
    );
}

/// Whether the server has closed `socket`, without waiting.
fn is_closed(socket: &mut TcpStream) -> bool {
    socket.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 256];
    let closed = match socket.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(err) => err.kind() != std::io::ErrorKind::WouldBlock,
    };
    socket.set_nonblocking(false).unwrap();
    closed
}

#[test]
fn slowloris_connections_are_closed_while_healthz_answers_and_bodies_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let server = ServerProcess::start_with(&data_dir, &["--http-header-timeout", "2s"]);
    let http = server.http();

    // 100 connections that trickle a request's headers, a byte at a time.
    let mut slow: Vec<TcpStream> = (0..100)
        .map(|_| {
            let mut socket = TcpStream::connect(http).unwrap();
            socket
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            socket
        })
        .collect();
    let started = Instant::now();
    let mut open = slow.len();
    let mut answered = 0;
    while open > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{open} slow connections still open after 30 s"
        );
        open = 0;
        for socket in &mut slow {
            if socket.write_all(b"X").is_ok() && !is_closed(socket) {
                open += 1;
            }
        }
        // Meanwhile health checks from elsewhere are answered.
        let (status, body) = http_get(http, localhost(3), "/healthz").unwrap();
        assert_eq!((status, body.trim()), (200, "ok"));
        answered += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    println!(
        "100 slowloris connections closed after {:?} ({answered} health checks answered meanwhile)",
        started.elapsed()
    );

    // A request body over the limit is refused before any handler reads it.
    let big = 1 << 20;
    let (status, _) = http_request(
        http,
        localhost(1),
        &format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: {big}\r\nConnection: close\r\n\r\n"
        ),
    )
    .unwrap();
    assert_eq!(status, 413);
}

#[test]
fn bad_input_and_refusals_are_summarised_while_security_events_are_logged() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut server = ServerProcess::start_with(
        &data_dir,
        &[
            "--max-connections-per-address",
            "10",
            "--log-summary-interval",
            "60s",
        ],
    );
    server.drain_logs();
    // 300 connections that send garbage (a segment table no message has)...
    for _ in 0..300 {
        let mut socket = TcpStream::connect(server.addr).unwrap();
        socket.write_all(&[0xff; 16]).unwrap();
        assert!(closed_within(&mut socket, Duration::from_secs(10)));
    }
    // ...and 300 more than the address may hold at once.
    let held: Vec<TcpStream> = (0..310)
        .map(|_| TcpStream::connect(server.addr).unwrap())
        .collect();
    let mut one = held.into_iter().last().unwrap();
    assert!(closed_within(&mut one, Duration::from_secs(10)));
    // Let the server finish logging whatever it logs for them.
    let metrics_ready = Instant::now();
    while metric(
        server.http(),
        r#"capsync_connections_refused_total{listener="rpc",reason="address_limit"}"#,
    ) < Some(300.0)
    {
        assert!(metrics_ready.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
    }
    let lines = server.drain_logs();
    println!("{} log lines for 600 bad connections", lines.len());
    assert!(
        lines.len() <= 6,
        "{} log lines for 600 bad connections: {lines:#?}",
        lines.len()
    );
    drop(one);

    // Security-relevant actions are logged at info, without secrets.
    let admin = admin_token(&data_dir);
    run_local(async {
        let (_conn, agent) = support::agent(server.addr, &data_dir, "audit").await;
        let created = support::share(&agent, "ses_audit").await;
        let share = created.info.state.share_id.clone();
        agent
            .revoke_share(&share, capsync_client::Scope::Viewers)
            .await
            .unwrap();
        let conn = capsync_client::connect(server.addr).await.unwrap();
        let admin = conn.redeem(&admin).await.unwrap().into_admin().unwrap();
        admin.archive_share(&share).await.unwrap();
        admin.vacuum().await.unwrap();
        admin.delete_share(&share).await.unwrap();
    });
    let expected = [
        "mint",
        "revoke_share",
        "archive_share",
        "vacuum",
        "delete_share",
    ];
    let mut seen = Vec::new();
    let started = Instant::now();
    while !expected.iter().all(|a| seen.iter().any(|s| s == a))
        && started.elapsed() < Duration::from_secs(30)
    {
        if let Ok(line) = server.logs.recv_timeout(Duration::from_millis(100)) {
            let text = line.to_string();
            assert!(!text.contains(&admin), "a secret reached the log");
            if line["level"] == "INFO"
                && let Some(action) = line["fields"]["action"].as_str()
            {
                seen.push(action.to_owned());
            }
        }
    }
    for action in expected {
        assert!(
            seen.iter().any(|a| a == action),
            "{action} not logged: {seen:?}"
        );
    }
}

#[test]
fn opsince_and_subscribe_beyond_the_cursor_are_invalid_arguments_without_an_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut server = ServerProcess::start(&data_dir);
    run_local(async {
        let (_conn, agent) = support::agent(server.addr, &data_dir, "cursors").await;
        let created = support::share(&agent, "ses_cursor").await;
        created
            .writer
            .append(&Batch::new("setup", setup_ops("ses_cursor")))
            .await
            .unwrap();
        let viewer = created.writer.viewer();
        for after in [3, 1 << 40, 1 << 63, u64::MAX] {
            let err = viewer.ops_since(after, 10).await.unwrap_err();
            assert_eq!(
                err.code(),
                Some(ErrorCode::InvalidArgument),
                "{after}: {err}"
            );
            assert!(
                err.to_string().contains("beyond the share's cursor 2"),
                "{err}"
            );
            let err = viewer.subscribe(after).await.err().unwrap();
            assert_eq!(
                err.code(),
                Some(ErrorCode::InvalidArgument),
                "{after}: {err}"
            );
        }
        // At the cursor: an empty page, and a live subscription.
        assert!(viewer.ops_since(2, 10).await.unwrap().ops.is_empty());
        assert!(viewer.subscribe(2).await.is_ok());
    });
    let errors: Vec<Value> = server
        .drain_logs()
        .into_iter()
        .filter(|line| line["level"] == "ERROR")
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
}

#[test]
fn the_rpc_port_opens_only_once_the_server_is_ready() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &addr.to_string(),
            "--http-listen",
            "off",
        ])
        .arg("--data-dir")
        .arg(&data_dir)
        // The default cost: minting the first admin token takes a while.
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    // The moment the port accepts, the admin token is on disk and the database migrated.
    loop {
        if TcpStream::connect(addr).is_ok() {
            assert!(
                data_dir.join("admin.token").exists(),
                "the port accepted before the admin token was written"
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "never listened"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(unix)]
#[test]
fn the_data_directory_and_database_are_the_owners_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    let mut server = ServerProcess::start(&data_dir);
    assert_eq!(mode(&data_dir), 0o700);
    for file in [
        "capsync.db",
        "capsync.db-wal",
        "capsync.db-shm",
        "admin.token",
        "lock",
    ] {
        assert_eq!(mode(&data_dir.join(file)), 0o600, "{file}");
    }
    assert!(server.terminate().success());
    drop(server);
    // An older install's world-readable files are tightened at the next start.
    std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let db = data_dir.join("capsync.db");
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let _server = ServerProcess::start(&data_dir);
    assert_eq!(mode(&data_dir), 0o700);
    assert_eq!(mode(&db), 0o600);
}

/// Appends one `bytes`-sized part per batch to `writer` until the server
/// answers with anything but an ack (at most `limit` batches): the op ids it
/// acked, and that answer.
async fn fill(
    writer: &capsync_client::WriterClient,
    prefix: &str,
    bytes: usize,
    limit: usize,
) -> (Vec<String>, capsync_client::ClientError) {
    let mut acked = Vec::new();
    for i in 0..limit {
        let id = format!("{prefix}{i}");
        match writer
            .append(&Batch::new(id.clone(), vec![part_op(&id, bytes)]))
            .await
        {
            Ok(ack) => {
                assert_eq!(ack.applied(), 1);
                acked.push(id);
            }
            Err(err) => return (acked, err),
        }
    }
    panic!("{limit} batches of {bytes} bytes never filled the storage");
}

/// Every op id in the share (through a fresh connection).
async fn logged_op_ids(addr: SocketAddr, viewer_token: &str) -> std::collections::HashSet<String> {
    let conn = capsync_client::connect(addr).await.unwrap();
    let viewer = conn
        .redeem(viewer_token)
        .await
        .unwrap()
        .into_viewer()
        .unwrap();
    let mut ids = std::collections::HashSet::new();
    let mut after = 0;
    loop {
        let page = viewer.ops_since(after, 5000).await.unwrap();
        for op in &page.ops {
            after = op.cursor.0;
            ids.insert(op.op_id.0.clone());
        }
        if !page.has_more() {
            return ids;
        }
    }
}

/// Log lines (read so far) whose message contains `text`.
fn count_logged(lines: &[Value], text: &str) -> usize {
    lines
        .iter()
        .filter(|line| {
            line["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(text))
        })
        .count()
}

#[test]
fn a_database_at_its_size_limit_refuses_writes_clearly_and_takes_them_again_once_there_is_room() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut server = ServerProcess::start_with(&data_dir, &["--max-database-bytes", "2097152"]);
    let http = server.http();
    run_local(async {
        let (conn, agent) = support::agent(server.addr, &data_dir, "quota").await;
        // Another share that takes room, to delete later.
        let other = support::share(&agent, "ses_other").await;
        other
            .writer
            .append(&Batch::new("setup", setup_ops("ses_other")))
            .await
            .unwrap();
        for i in 0..16 {
            other
                .writer
                .append(&Batch::new(
                    format!("o{i}"),
                    vec![part_op(&format!("o{i}"), 16 << 10)],
                ))
                .await
                .unwrap();
        }

        let created = support::share(&agent, "ses_quota").await;
        created
            .writer
            .append(&Batch::new("setup", setup_ops("ses_quota")))
            .await
            .unwrap();
        let (acked, err) = fill(&created.writer, "q", 16 << 10, 500).await;
        assert_eq!(err.code(), Some(ErrorCode::StorageFull), "{err}");
        assert!(err.to_string().contains("storage is full"), "{err}");
        assert!(err.retry_after().is_some(), "a hint for when to retry");
        for i in 0..10 {
            let again = created
                .writer
                .append(&Batch::new(
                    format!("again{i}"),
                    vec![part_op(&format!("again{i}"), 16 << 10)],
                ))
                .await
                .unwrap_err();
            assert_eq!(again.code(), Some(ErrorCode::StorageFull), "{again}");
        }
        assert_eq!(metric(http, "capsync_storage_full"), Some(1.0));
        assert!(metric(http, "capsync_storage_full_refusals_total").unwrap() >= 11.0);
        // Nothing acked is lost, nothing refused is there.
        let logged = logged_op_ids(server.addr, &created.viewer_token.token).await;
        assert_eq!(logged.len(), acked.len() + 2);
        assert!(acked.iter().all(|id| logged.contains(id)));

        // Deleting the other share makes room: writes are taken again by themselves.
        let admin = conn
            .redeem(&admin_token(&data_dir))
            .await
            .unwrap()
            .into_admin()
            .unwrap();
        admin
            .delete_share(&other.info.state.share_id)
            .await
            .unwrap();
        let ack = created
            .writer
            .append(&Batch::new("after", vec![part_op("after", 16 << 10)]))
            .await
            .unwrap();
        assert_eq!(ack.applied(), 1);
        assert_eq!(metric(http, "capsync_storage_full"), Some(0.0));
    });
    let lines = server.drain_logs();
    assert_eq!(
        count_logged(&lines, "reached --max-database-bytes"),
        1,
        "warned once: {lines:#?}"
    );
    assert_eq!(count_logged(&lines, "storage available again"), 1);
}

/// A small file system of the test's own, to fill up: the directory in
/// `CAPSYNC_DISK_FULL_DIR` (an empty tmpfs mounted for it, as `.ci/run` does),
/// or else a tmpfs this test mounts (which needs root) and unmounts after.
struct SmallDisk {
    dir: std::path::PathBuf,
    mounted_here: bool,
}

impl SmallDisk {
    fn get(scratch: &std::path::Path) -> Option<Self> {
        if let Some(dir) = std::env::var_os("CAPSYNC_DISK_FULL_DIR") {
            let dir = std::path::PathBuf::from(dir).join(format!("run-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            return Some(Self {
                dir,
                mounted_here: false,
            });
        }
        let dir = scratch.join("disk");
        std::fs::create_dir_all(&dir).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=24m,mode=0755", "tmpfs"])
            .arg(&dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(Self {
            dir,
            mounted_here: true,
        })
    }

    /// Bytes still free on it.
    fn free(&self) -> u64 {
        let stats = rustix::fs::statvfs(&self.dir).unwrap();
        stats.f_bavail * stats.f_frsize
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        if self.mounted_here {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Writes `path` until the file system has no room left.
fn fill_disk(path: &std::path::Path) {
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![9u8; 64 << 10];
    while file.write_all(&chunk).is_ok() {}
    let small = [9u8; 512];
    while file.write_all(&small).is_ok() {}
}

#[test]
fn a_full_disk_refuses_writes_clearly_loses_nothing_and_recovers_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::get(dir.path()) else {
        if std::env::var_os("REQUIRE_DISK_FULL").is_some() {
            panic!(
                "REQUIRE_DISK_FULL is set, but there is no small disk: set CAPSYNC_DISK_FULL_DIR \
                 to an empty tmpfs, or run as root"
            );
        }
        eprintln!(
            "skipped: the disk-full test needs a small file system of its own \
             (CAPSYNC_DISK_FULL_DIR, or root to mount a tmpfs); REQUIRE_DISK_FULL=1 makes this a failure"
        );
        return;
    };
    let data_dir = disk.dir.join("data");
    let args = ["--storage-reserve-bytes", "4194304"];
    let mut server = ServerProcess::start_with(&data_dir, &args);
    assert_eq!(
        std::fs::metadata(data_dir.join("reserve")).unwrap().len(),
        4 << 20
    );
    // Leave about 8 MiB for the database and its log.
    let filler = disk.free().saturating_sub(8 << 20);
    std::fs::write(disk.dir.join("filler"), vec![7u8; filler as usize]).unwrap();

    let (writer_token, viewer_token, mut acked) = run_local(async {
        let (_conn, agent) = support::agent(server.addr, &data_dir, "disk").await;
        let created = support::share(&agent, "ses_disk").await;
        created
            .writer
            .append(&Batch::new("setup", setup_ops("ses_disk")))
            .await
            .unwrap();
        let (acked, err) = fill(&created.writer, "d", 32 << 10, 2000).await;
        assert_eq!(err.code(), Some(ErrorCode::StorageFull), "{err}");
        assert!(err.to_string().contains("storage is full"), "{err}");
        // Something else takes the room the reserve and the checkpoint gave back.
        fill_disk(&disk.dir.join("filler2"));
        for i in 0..20 {
            let again = created
                .writer
                .append(&Batch::new(
                    format!("x{i}"),
                    vec![part_op(&format!("x{i}"), 32 << 10)],
                ))
                .await
                .unwrap_err();
            assert_eq!(again.code(), Some(ErrorCode::StorageFull), "{again}");
        }
        (
            created.writer_token.token.clone(),
            created.viewer_token.token.clone(),
            acked,
        )
    });
    println!(
        "{} parts of 32 KiB acked before the disk was full",
        acked.len()
    );
    assert!(
        !data_dir.join("reserve").exists(),
        "the reserve was given up"
    );
    assert_eq!(metric(server.http(), "capsync_storage_full"), Some(1.0));
    let lines = server.drain_logs();
    assert_eq!(
        count_logged(&lines, "storage is full: writes are refused"),
        1,
        "{lines:#?}"
    );

    // A restart on a full disk (whatever the server's exit freed is taken
    // too): it starts, serves reads, and refuses appends while its reserve
    // does not fit.
    assert!(server.terminate().success());
    drop(server);
    fill_disk(&disk.dir.join("filler3"));
    let mut server = ServerProcess::start_with(&data_dir, &args);
    assert!(
        server.startup_logs.iter().any(|l| l["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("no room for the storage reserve"))),
        "{:#?}",
        server.startup_logs
    );
    assert_eq!(metric(server.http(), "capsync_storage_full"), Some(1.0));
    run_local(async {
        let logged = logged_op_ids(server.addr, &viewer_token).await;
        assert!(
            acked.iter().all(|id| logged.contains(id)),
            "an acked op was lost"
        );
        assert_eq!(logged.len(), acked.len() + 2);
        let conn = capsync_client::connect(server.addr).await.unwrap();
        let writer = conn
            .redeem(&writer_token)
            .await
            .unwrap()
            .into_writer()
            .unwrap();
        let err = writer
            .append(&Batch::new("r", vec![part_op("r", 32 << 10)]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::StorageFull), "{err}");

        // Space comes back: writes resume by themselves (within a retry or two).
        for name in ["filler", "filler2", "filler3"] {
            std::fs::remove_file(disk.dir.join(name)).unwrap();
        }
        let started = Instant::now();
        loop {
            match writer
                .append(&Batch::new("r", vec![part_op("r", 32 << 10)]))
                .await
            {
                Ok(ack) => {
                    assert_eq!(ack.applied(), 1);
                    acked.push("r".into());
                    break;
                }
                Err(err) => {
                    assert_eq!(err.code(), Some(ErrorCode::StorageFull), "{err}");
                    assert!(
                        started.elapsed() < Duration::from_secs(30),
                        "never recovered"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        let logged = logged_op_ids(server.addr, &viewer_token).await;
        assert_eq!(logged.len(), acked.len() + 2);
    });
    assert_eq!(metric(server.http(), "capsync_storage_full"), Some(0.0));
    assert!(data_dir.join("reserve").exists(), "the reserve is back");
    let lines = server.drain_logs();
    assert_eq!(
        count_logged(&lines, "storage available again"),
        1,
        "{lines:#?}"
    );
    drop(server);
}

#[test]
fn a_flood_of_appends_is_refused_with_overloaded_not_queued_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let server = ServerProcess::start_with(
        &data_dir,
        &["--write-queue", "8", "--write-queue-bytes", "1048576"],
    );
    run_local(async {
        let (_conn, agent) = support::agent(server.addr, &data_dir, "flood").await;
        let created = support::share(&agent, "ses_flood").await;
        created
            .writer
            .append(&Batch::new("setup", setup_ops("ses_flood")))
            .await
            .unwrap();
        let before = server.rss_bytes();
        // 20 connections with 50 appends of 128 KiB each in flight: 125 MiB at once.
        let mut writers = Vec::new();
        for w in 0..20 {
            let conn = capsync_client::connect(server.addr).await.unwrap();
            let writer = conn
                .redeem(&created.writer_token.token)
                .await
                .unwrap()
                .into_writer()
                .unwrap();
            writers.push(tokio::task::spawn_local(async move {
                let _conn = conn;
                let appends = (0..50).map(|i| {
                    let id = format!("w{w}-{i}");
                    let batch = Batch::new(id.clone(), vec![part_op(&id, 128 << 10)]);
                    let writer = writer.clone();
                    async move { (id, writer.append(&batch).await) }
                });
                futures::future::join_all(appends).await
            }));
        }
        let (mut acked, mut overloaded) = (Vec::new(), 0);
        for writer in writers {
            for (id, result) in writer.await.unwrap() {
                match result {
                    Ok(ack) => {
                        assert_eq!(ack.applied(), 1);
                        acked.push(id);
                    }
                    Err(err) => {
                        assert_eq!(err.code(), Some(ErrorCode::Overloaded), "{err}");
                        overloaded += 1;
                    }
                }
            }
        }
        let grown = server.rss_bytes().saturating_sub(before);
        println!(
            "{} acked, {overloaded} overloaded; RSS grew by {} MiB",
            acked.len(),
            grown / MIB
        );
        assert!(overloaded > 0, "the queue bound was never reached");
        assert!(grown < 100 * MIB, "RSS grew by {} MiB", grown / MIB);
        // Every acked op is there, and nothing that was refused.
        let logged = logged_op_ids(server.addr, &created.viewer_token.token).await;
        assert_eq!(logged.len(), acked.len() + 2);
        assert!(acked.iter().all(|id| logged.contains(id)));
    });
}
