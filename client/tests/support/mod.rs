//! The client's and the CLI's test helpers on top of the workspace's one test kit
//! (`capsync_tests`): the real capsync server on `127.0.0.1:0`, tokens and shares.
//! Tests talk to it through the public client API (or the `capsync` binary), never
//! to a stand-in: one implementation of the protocol, so it cannot drift.
#![allow(dead_code, unused_imports)] // each test binary uses its own subset

pub mod peers;

use capsync_client::connect;
pub use capsync_tests::{TestServer, admin, agent, run_local};

// ---- helpers for the `capsync sync` tests (sync_cli.rs, client_kill.rs) ----

/// A share for `session_id`, created by a fresh agent: (share id, writer token, agent token).
pub async fn writer_share(server: &TestServer, session_id: &str) -> (String, String, String) {
    let (conn, admin) = admin(server).await;
    let (agent, agent_token) = agent(&conn, &admin).await;
    let created = agent
        .create_share(capsync_client::NewShare {
            session_id: session_id.to_owned(),
            ..Default::default()
        })
        .await
        .expect("create share");
    conn.disconnect().await.expect("disconnect");
    (
        created.info.state.share_id,
        created.writer_token.token,
        agent_token,
    )
}

/// Every op applied to the share `token` (writer or viewer) reads, in cursor order.
pub async fn share_log(server: &TestServer, token: &str) -> Vec<capsync_client::LoggedOp> {
    let conn = connect(server.addr()).await.expect("connect");
    let reader = conn
        .redeem(token)
        .await
        .expect("redeem")
        .into_reader()
        .expect("reader");
    let mut ops = Vec::new();
    loop {
        let after = ops
            .last()
            .map_or(0, |op: &capsync_client::LoggedOp| op.cursor.0);
        let page = reader.ops_since(after, 0).await.expect("opsSince");
        let more = page.has_more();
        ops.extend(page.ops);
        if !more {
            break;
        }
    }
    conn.disconnect().await.expect("disconnect");
    ops
}

/// JSON Lines ops for session `session_id`: its `session.upsert`, then `messages` messages,
/// each a `message.upsert`, a text `part.upsert` and `deltas` `part.delta`s appending
/// "<m>.<d> " to the part's text. Also the text each part `prt_<m>` ends with.
pub fn session_op_lines(
    session_id: &str,
    messages: usize,
    deltas: usize,
) -> (Vec<String>, Vec<(String, String)>) {
    let line = |op_id: String, kind: &str, payload: serde_json::Value| {
        serde_json::json!({"opId": op_id, "kind": kind, "payload": payload}).to_string()
    };
    let mut lines = vec![line(
        format!("{session_id}-session"),
        "session.upsert",
        serde_json::json!({"id": session_id, "title": "sync test"}),
    )];
    let mut texts = Vec::new();
    for m in 0..messages {
        let (message, part) = (format!("msg_{m}"), format!("prt_{m}"));
        lines.push(line(
            format!("{session_id}-m{m}"),
            "message.upsert",
            serde_json::json!({"id": message, "role": "assistant"}),
        ));
        lines.push(line(
            format!("{session_id}-p{m}"),
            "part.upsert",
            serde_json::json!({"id": part, "messageID": message, "type": "text", "text": ""}),
        ));
        let mut text = String::new();
        for d in 0..deltas {
            let delta = format!("{m}.{d} ");
            text.push_str(&delta);
            lines.push(line(
                format!("{session_id}-p{m}-d{d}"),
                "part.delta",
                serde_json::json!({"partID": part, "delta": delta}),
            ));
        }
        texts.push((part, text));
    }
    (lines, texts)
}
