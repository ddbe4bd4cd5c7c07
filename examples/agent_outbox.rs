//! How a coding agent embeds capsync: a durable outbox that every change goes
//! into, and a syncer that drains it to the server in the background — across a
//! server restart, and until the share's writers are revoked.
//!
//!     cargo run -p capsync-examples --example agent_outbox
//!
//! It starts its own server (in a temp dir) so it runs as it is; a real agent
//! points `SyncOptions::new` at its capsync server and keeps the outbox file in
//! its own state directory.

use capsync_client::{NewShare, OpKind, OpSpec, Outbox, Scope, SyncOptions, spawn_syncer};
use serde_json::json;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const SESSION: &str = "ses_demo";
const MESSAGE: &str = "msg_002";

fn main() -> Result<()> {
    let data = tempfile::tempdir()?;
    let config = capsync_server::Config::for_tests(data.path().join("server"));
    let server =
        capsync_server::spawn(std::net::TcpListener::bind("127.0.0.1:0")?, config.clone())?;
    let addr = server.addr();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let server = tokio::task::LocalSet::new().block_on(&runtime, async move {
        // Setup an operator does once: an agent token, then a share for this session.
        let conn = capsync_client::connect(addr).await?;
        let admin_token = std::fs::read_to_string(config.admin_token_path())?;
        let admin = conn.redeem(admin_token.trim()).await?.into_admin()?;
        let agent_token = admin.mint_agent("demo agent", None).await?.token;
        let agent = conn.redeem(&agent_token).await?.into_agent()?;
        let share = agent
            .create_share(NewShare {
                session_id: SESSION.into(),
                project_id: "prj_demo".into(),
                parent_session_id: None,
                title: "Outbox demo".into(),
                ..NewShare::default()
            })
            .await?;
        let share_id = share.info.state.share_id.clone();

        // The agent's side: every change goes into the outbox first. `enqueue`
        // returns once the op is on disk, so a crash of the agent loses nothing.
        let outbox = Outbox::open(data.path().join("agent/outbox.db"))?;
        let syncer = spawn_syncer(
            outbox.clone(),
            SyncOptions::new(addr.to_string(), share.writer_token.token.clone()),
        );
        outbox.enqueue_all(turn_start()).await?;
        let status = syncer.wait_idle().await?;
        println!(
            "first turn synced: {} ops acked, cursor {:?}",
            status.acked, status.last_acked_cursor
        );

        // The server goes away. The agent keeps working; its ops wait in the outbox.
        server.shutdown()?;
        outbox.enqueue_all(streamed_answer()).await?;
        println!(
            "server down: {} ops waiting in the outbox",
            outbox.status().await?.pending
        );

        // Back on the same address: the syncer reconnects, redeems its token
        // again and sends what waited, each op exactly once.
        let server = capsync_server::spawn(std::net::TcpListener::bind(addr)?, config.clone())?;
        let status = syncer.wait_idle().await?;
        println!(
            "after the restart: {} ops acked, cursor {:?}, {} retries",
            status.acked, status.last_acked_cursor, status.retries
        );

        let conn = capsync_client::connect(addr).await?;
        let viewer = conn
            .redeem(&share.viewer_token.token)
            .await?
            .into_viewer()?;
        let document = viewer.snapshot().await?.to_document();
        let answer = document.messages[1]
            .parts
            .iter()
            .find(|part| part["type"] == "text")
            .map(|part| part["text"].clone())
            .unwrap_or_default();
        println!("a viewer reads the streamed answer: {answer}");

        // The owner revokes the writers: the syncer stops for good, with a clear
        // error, instead of retrying a dead capability.
        let agent = conn.redeem(&agent_token).await?.into_agent()?;
        agent.revoke_share(&share_id, Scope::Writers).await?;
        outbox
            .enqueue(OpSpec::new(
                "late-op",
                OpKind::ModelUpsert,
                json!({"id": "m1"}),
            ))
            .await?;
        match syncer.wait_idle().await {
            Err(err) => println!("after revocation the syncer stopped: {err}"),
            Ok(_) => println!("after revocation the syncer is still running (unexpected)"),
        }
        syncer.stop().await;
        Ok::<_, Box<dyn std::error::Error>>(server)
    })?;
    server.shutdown()?;
    Ok(())
}

/// The start of a turn: the session, the user's message, the assistant's empty answer.
fn turn_start() -> Vec<OpSpec> {
    vec![
        OpSpec::new(
            "session-1",
            OpKind::SessionUpsert,
            json!({"id": SESSION, "title": "Outbox demo"}),
        ),
        OpSpec::new(
            "msg_001-1",
            OpKind::MessageUpsert,
            json!({"id": "msg_001", "sessionID": SESSION, "role": "user", "time": {"created": 1}}),
        ),
        OpSpec::new(
            "prt_001-1",
            OpKind::PartUpsert,
            json!({"id": "prt_001", "messageID": "msg_001", "sessionID": SESSION, "type": "text", "text": "Why is the build red?"}),
        ),
        OpSpec::new(
            "msg_002-1",
            OpKind::MessageUpsert,
            json!({"id": MESSAGE, "sessionID": SESSION, "role": "assistant", "time": {"created": 2}}),
        ),
    ]
}

/// The answer as an agent streams it: a tool call, text deltas, then completion.
fn streamed_answer() -> Vec<OpSpec> {
    let part = |n: u32, state: &str, body: serde_json::Value| {
        OpSpec::new(
            format!("prt_tool-{n}"),
            OpKind::PartUpsert,
            json!({
                "id": "prt_tool", "messageID": MESSAGE, "sessionID": SESSION, "type": "tool",
                "tool": "bash", "callID": "call_1", "state": {"status": state, "input": {"command": "cargo test"}, "output": body},
            }),
        )
    };
    let mut ops = vec![
        part(1, "running", json!(null)),
        part(2, "completed", json!("test result: FAILED. 1 failed")),
        OpSpec::new(
            "prt_text-1",
            OpKind::PartUpsert,
            json!({"id": "prt_text", "messageID": MESSAGE, "sessionID": SESSION, "type": "text", "text": ""}),
        ),
    ];
    for (n, chunk) in [
        "The build is red because ",
        "`parse_config` rejects ",
        "an empty file.",
    ]
    .iter()
    .enumerate()
    {
        ops.push(OpSpec::new(
            format!("prt_text-delta-{n}"),
            OpKind::PartDelta,
            json!({"partID": "prt_text", "messageID": MESSAGE, "delta": chunk}),
        ));
    }
    ops.push(OpSpec::new("msg_002-2", OpKind::MessageUpsert,
        json!({"id": MESSAGE, "sessionID": SESSION, "role": "assistant", "time": {"created": 2, "completed": 3}})));
    ops
}
