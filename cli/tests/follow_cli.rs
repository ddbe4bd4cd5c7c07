//! `capsync follow` (the real binary) against the real server: the snapshot, then each op
//! printed once and in order as it commits, across a server restart, until the viewers
//! are revoked; the readable form, where streamed text continues its line; and what it
//! says on stderr while the connection is down.

use crate::support;

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use capsync_client::{Batch, Connection, OpKind, OpSpec, Scope, WriterClient, connect};
use serde_json::{Value, json};
use support::{TestServer, admin, run_local};
use tokio::sync::mpsc;

/// Upper bound on any single wait; far above what a healthy run takes.
const GUARD: Duration = Duration::from_secs(30);

/// A running `capsync follow`, killed if the test ends early.
struct Follow {
    child: Child,
    /// Its stdout, line by line, read on a thread of its own.
    lines: mpsc::UnboundedReceiver<String>,
    /// Its stderr, likewise.
    errors: mpsc::UnboundedReceiver<String>,
}

/// Sends each line `from` gives to the returned receiver, from a thread of its own.
fn line_reader(from: impl std::io::Read + Send + 'static) -> mpsc::UnboundedReceiver<String> {
    let (tx, lines) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    lines
}

impl Follow {
    fn spawn(server: &TestServer, token: &str, args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_capsync"))
            .arg("follow")
            .args(args)
            .env_remove("CAPSYNC_TOKEN_FILE")
            .env("CAPSYNC_TOKEN", token)
            .env("CAPSYNC_SERVER", server.addr().to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn capsync follow");
        let lines = line_reader(child.stdout.take().unwrap());
        let errors = line_reader(child.stderr.take().unwrap());
        Self {
            child,
            lines,
            errors,
        }
    }

    async fn line(&mut self) -> String {
        tokio::time::timeout(GUARD, self.lines.recv())
            .await
            .expect("timed out waiting for a line from capsync follow")
            .expect("capsync follow closed its output")
    }

    /// The next line on stderr.
    async fn error_line(&mut self) -> String {
        tokio::time::timeout(GUARD, self.errors.recv())
            .await
            .expect("timed out waiting for a line on capsync follow's stderr")
            .expect("capsync follow closed its stderr")
    }

    /// Every stderr line still to come, once the process has closed it.
    async fn error_rest(&mut self) -> Vec<String> {
        let mut rest = Vec::new();
        while let Some(line) = tokio::time::timeout(GUARD, self.errors.recv())
            .await
            .expect("timed out waiting for capsync follow to close its stderr")
        {
            rest.push(line);
        }
        rest
    }

    /// Every line still to come, once the process has closed its output.
    async fn rest(&mut self) -> Vec<String> {
        let mut rest = Vec::new();
        while let Some(line) = tokio::time::timeout(GUARD, self.lines.recv())
            .await
            .expect("timed out waiting for capsync follow to close its output")
        {
            rest.push(line);
        }
        rest
    }

    /// The next `n` lines as JSON.
    async fn json_lines(&mut self, n: usize) -> Vec<Value> {
        let mut lines = Vec::with_capacity(n);
        for _ in 0..n {
            let line = self.line().await;
            lines.push(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}")));
        }
        lines
    }
}

impl Drop for Follow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A share for `session`: (share id, writer token, viewer token, agent token).
async fn new_share(server: &TestServer, session: &str) -> (String, String, String, String) {
    let (conn, admin) = admin(server).await;
    let minted = admin.mint_agent("follow", None).await.unwrap();
    let agent = conn
        .redeem(&minted.token)
        .await
        .unwrap()
        .into_agent()
        .unwrap();
    let created = agent
        .create_share(capsync_client::NewShare {
            session_id: session.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    conn.disconnect().await.unwrap();
    (
        created.info.state.share_id,
        created.writer_token.token,
        created.viewer_token.token,
        minted.token,
    )
}

async fn writer(server: &TestServer, token: &str) -> (Connection, WriterClient) {
    let conn = connect(server.addr()).await.unwrap();
    let writer = conn.redeem(token).await.unwrap().into_writer().unwrap();
    (conn, writer)
}

fn session_op(session: &str) -> OpSpec {
    OpSpec::new(
        format!("{session}-session"),
        OpKind::SessionUpsert,
        json!({"id": session, "title": "follow me"}),
    )
}

fn message_op(session: &str, id: &str) -> OpSpec {
    OpSpec::new(
        format!("{id}-v1"),
        OpKind::MessageUpsert,
        json!({"id": id, "sessionID": session, "role": "assistant", "modelID": "m"}),
    )
}

fn text_op(session: &str, message: &str, id: &str, text: &str) -> OpSpec {
    OpSpec::new(
        format!("{id}-{}", text.len()),
        OpKind::PartUpsert,
        json!({"id": id, "messageID": message, "sessionID": session, "type": "text", "text": text}),
    )
}

fn delta_op(id: &str, n: usize, delta: &str) -> OpSpec {
    OpSpec::new(
        format!("{id}-delta-{n}"),
        OpKind::PartDelta,
        json!({"partID": id, "delta": delta}),
    )
}

async fn append(writer: &WriterClient, id: &str, ops: Vec<OpSpec>) -> u64 {
    let count = ops.len();
    let ack = writer.append(&Batch::new(id, ops)).await.unwrap();
    assert_eq!(ack.applied(), count, "{ack:?}");
    ack.cursor.0
}

/// `deltas` deltas to part `prt_1`, numbered from `first`.
fn deltas(first: usize, count: usize) -> Vec<OpSpec> {
    (first..first + count)
        .map(|n| delta_op("prt_1", n, &format!("{n} ")))
        .collect()
}

#[test]
fn follow_prints_every_op_once_in_order_across_a_restart_until_revoked() {
    let mut server = TestServer::start();
    let (share_id, writer_token, viewer_token, agent_token) =
        run_local(new_share(&server, "ses_follow"));
    let mut follow = None;
    let cursor = run_local(async {
        let (_conn, writer) = writer(&server, &writer_token).await;
        let setup = vec![
            session_op("ses_follow"),
            message_op("ses_follow", "msg_1"),
            text_op("ses_follow", "msg_1", "prt_1", ""),
        ];
        assert_eq!(append(&writer, "setup", setup).await, 3);

        let follow = follow.insert(Follow::spawn(&server, &viewer_token, &["--json"]));
        let snapshot = follow.json_lines(1).await.remove(0);
        assert_eq!(snapshot["cursor"], 3, "{snapshot}");
        assert_eq!(snapshot["session"]["title"], "follow me");

        for b in 0..5 {
            append(&writer, &format!("live-{b}"), deltas(b * 4, 4)).await;
        }
        let ops = follow.json_lines(20).await;
        let cursors: Vec<u64> = ops
            .iter()
            .map(|op| op["cursor"].as_u64().unwrap())
            .collect();
        assert_eq!(cursors, (4..=23).collect::<Vec<_>>());
        assert_eq!(ops[0]["kind"], "part.delta");
        assert_eq!(ops[0]["payload"]["delta"], "0 ");
        23
    });

    // The server goes away and comes back on the same address: follow reconnects.
    server.restart();
    run_local(async {
        let follow = follow.as_mut().unwrap();
        let (_conn, writer) = writer(&server, &writer_token).await;
        for b in 5..10 {
            append(&writer, &format!("after-{b}"), deltas(b * 4, 4)).await;
        }
        let ops = follow.json_lines(20).await;
        let cursors: Vec<u64> = ops
            .iter()
            .map(|op| op["cursor"].as_u64().unwrap())
            .collect();
        assert_eq!(cursors, (cursor + 1..=cursor + 20).collect::<Vec<_>>());

        // The owner revokes the viewer links: follow says so and exits 1.
        let conn = connect(server.addr()).await.unwrap();
        let agent = conn
            .redeem(&agent_token)
            .await
            .unwrap()
            .into_agent()
            .unwrap();
        agent.revoke_share(&share_id, Scope::Viewers).await.unwrap();
        // Nothing more on stdout but the error, on one line: no op was printed twice.
        let rest = follow.rest().await;
        assert_eq!(rest.len(), 1, "{rest:?}");
        let error: Value = serde_json::from_str(&rest[0]).unwrap();
        assert_eq!(error["error"]["code"], "revoked", "{error}");
    });
    let mut follow = follow.take().unwrap();
    let status = follow.child.wait().unwrap();
    let stderr = run_local(follow.error_rest()).join("\n");
    assert_eq!(status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("revoked"), "{stderr}");
}

#[test]
fn follow_says_once_that_the_connection_is_lost_and_again_when_it_is_back() {
    let mut server = TestServer::start();
    let (_, writer_token, viewer_token, _) = run_local(new_share(&server, "ses_status"));
    let mut follow = None;
    run_local(async {
        let (_conn, writer) = writer(&server, &writer_token).await;
        let setup = vec![
            session_op("ses_status"),
            message_op("ses_status", "msg_1"),
            text_op("ses_status", "msg_1", "prt_1", "Before"),
        ];
        append(&writer, "setup", setup).await;
        // Readable output: with --json, stderr stays quiet.
        let follow = follow.insert(Follow::spawn(&server, &viewer_token, &[]));
        while follow.line().await != "  Before" {}
    });
    let follow = follow.as_mut().unwrap();

    server.stop();
    let lost = run_local(follow.error_line());
    assert!(
        lost.starts_with("connection lost: ") && lost.ends_with("; retrying"),
        "{lost}"
    );
    // While the server is away, something on its port takes each attempt and hangs up.
    // Three of them, then the server comes back.
    let squatter = server.bind_again();
    let (taken, attempts) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for _ in 0..3 {
            let Ok((stream, _)) = squatter.accept() else {
                return;
            };
            drop(stream);
        }
        // Closed before the server binds the port again.
        drop(squatter);
        let _ = taken.send(());
    });
    attempts
        .recv_timeout(GUARD)
        .expect("capsync follow kept trying to reconnect");
    server.start_again();

    run_local(async {
        // One line for the whole outage, however many attempts it took.
        let back = follow.error_line().await;
        let attempts: u32 = back
            .strip_prefix("reconnected after ")
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("not a reconnect line: {back}"));
        assert!(attempts >= 4, "three attempts were hung up on: {back}");
        assert!(back.ends_with("s)"), "{back}");

        // And it follows again.
        let (_conn, writer) = writer(&server, &writer_token).await;
        let tool = OpSpec::new(
            "tool-after",
            OpKind::PartUpsert,
            json!({"id": "prt_2", "messageID": "msg_1", "sessionID": "ses_status", "type": "tool", "tool": "bash", "state": {"status": "completed", "title": "after the restart"}}),
        );
        append(&writer, "after", vec![tool]).await;
        while follow.line().await != "  [tool bash: completed] after the restart" {}
    });
    let _ = follow.child.kill();
    let _ = follow.child.wait();
    let rest = run_local(follow.error_rest());
    assert!(rest.is_empty(), "nothing more on stderr: {rest:?}");
}

#[test]
fn readable_follow_streams_text_on_its_line_and_stops_at_until() {
    let server = TestServer::start();
    let (_, writer_token, viewer_token, _) = run_local(new_share(&server, "ses_text"));
    run_local(async {
        let (_conn, writer) = writer(&server, &writer_token).await;
        let setup = vec![
            session_op("ses_text"),
            message_op("ses_text", "msg_1"),
            text_op("ses_text", "msg_1", "prt_1", "Hello"),
        ];
        assert_eq!(append(&writer, "setup", setup).await, 3);

        let mut follow = Follow::spawn(&server, &viewer_token, &["--until", "7"]);
        // The snapshot ends with the message as it stands.
        loop {
            if follow.line().await == "  Hello" {
                break;
            }
        }
        append(
            &writer,
            "stream",
            vec![
                delta_op("prt_1", 0, ", wor"),
                delta_op("prt_1", 1, "ld"),
                // The agent's final upsert repeats the text: nothing new to print.
                text_op("ses_text", "msg_1", "prt_1", "Hello, world"),
                OpSpec::new(
                    "tool-1",
                    OpKind::PartUpsert,
                    json!({"id": "prt_2", "messageID": "msg_1", "sessionID": "ses_text", "type": "tool", "tool": "bash", "state": {"status": "completed", "title": "cargo test"}}),
                ),
            ],
        )
        .await;
        let status = tokio::task::spawn_blocking(move || {
            let status = follow.child.wait().unwrap();
            (status, follow)
        });
        let (status, mut follow) = tokio::time::timeout(GUARD, status).await.unwrap().unwrap();
        assert!(status.success(), "{status:?}");
        assert_eq!(
            follow.rest().await,
            ["  , world", "  [tool bash: completed] cargo test"]
        );
    });
}
