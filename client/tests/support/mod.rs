//! The real capsync server for the client's tests, on `127.0.0.1:0` in a temporary data
//! directory. Tests talk to it through the public client API (or the `capsync` binary),
//! never to a stand-in: one implementation of the protocol, so it cannot drift.
//!
//! The listener is bound before the server starts and `capsync_server::spawn` returns only
//! once the server is ready, so no test sleeps for readiness. (The workspace's `tests/` crate has a fuller fixture;
//! it depends on this crate, so this crate cannot depend on it.)
#![allow(dead_code)] // each test binary uses its own subset

pub mod peers;

use std::net::{SocketAddr, TcpListener};

use capsync_client::{AdminClient, AgentClient, Connection, connect};
use capsync_server::{Config, ServerHandle};

/// A running server and the data directory it owns. Dropping it shuts the server down,
/// then deletes the directory.
pub struct TestServer {
    handle: Option<ServerHandle>,
    config: Config,
    /// Kept across [`TestServer::restart`], so clients that know only the address (a
    /// syncer) find the server again.
    addr: SocketAddr,
    /// Deleted when the fixture drops (after the server stopped: field order).
    _dir: tempfile::TempDir,
}

impl TestServer {
    /// A server with the test defaults (cheap argon2).
    pub fn start() -> Self {
        Self::start_with(|_| {})
    }

    /// A server whose config `adjust` may change (limits, durability, ...).
    pub fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config::for_tests(dir.path().join("data"));
        adjust(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let handle = capsync_server::spawn(listener, config.clone()).expect("server starts");
        Self {
            handle: Some(handle),
            config,
            addr,
            _dir: dir,
        }
    }

    /// The address; the same after a restart.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Graceful shutdown (drain, disconnect, flush), keeping the data directory. Blocks
    /// until the server is down: call it from `spawn_blocking` while clients of this
    /// thread's `LocalSet` must keep running.
    pub fn stop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.shutdown().expect("clean shutdown");
        }
    }

    /// Starts a stopped server again on the same data and the same address (the listener
    /// is bound before the server thread starts, so clients can connect at once).
    pub fn start_again(&mut self) {
        let listener = self.bind_again();
        self.handle =
            Some(capsync_server::spawn(listener, self.config.clone()).expect("server restarts"));
    }

    /// Binds the stopped server's address: what [`TestServer::start_again`] listens
    /// on, or something else that takes the port meanwhile. A client reconnecting
    /// meanwhile can, rarely, connect to itself on the free port (Linux TCP
    /// self-connect: its ephemeral port equals the port it dials); it lets go as soon
    /// as it sees its own bytes, so a conflict is retried for a moment.
    pub fn bind_again(&self) -> TcpListener {
        assert!(self.handle.is_none(), "the server is still running");
        let mut attempts = 0;
        loop {
            // std sets SO_REUSEADDR, so the old connections' TIME_WAIT does not block the port.
            match TcpListener::bind(self.addr) {
                Ok(listener) => return listener,
                Err(err) if err.kind() == std::io::ErrorKind::AddrInUse && attempts < 100 => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(err) => panic!("bind the same address again: {err}"),
            }
        }
    }

    /// [`TestServer::stop`], then [`TestServer::start_again`].
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// The server's HTTP gateway (share pages): not an RPC port.
    pub fn http_addr(&self) -> SocketAddr {
        self.handle
            .as_ref()
            .and_then(ServerHandle::http_addr)
            .expect("the test server runs its HTTP gateway")
    }

    /// The admin token the server wrote to its data directory on first start.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.config.admin_token_path())
            .expect("admin token file")
            .trim()
            .to_owned()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            // Not while unwinding from a failed assertion: a second panic would abort.
            let stopped = handle.shutdown();
            if !std::thread::panicking() {
                stopped.expect("clean shutdown");
            }
        }
    }
}

/// Runs an async test body on a current-thread runtime inside a `LocalSet`, as the
/// capnp-rpc client requires.
pub fn run_local<F: std::future::Future>(body: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    tokio::task::LocalSet::new().block_on(&runtime, body)
}

/// A connection to `server` with its admin capability.
pub async fn admin(server: &TestServer) -> (Connection, AdminClient) {
    let conn = connect(server.addr()).await.expect("connect");
    let admin = conn
        .redeem(&server.admin_token())
        .await
        .expect("redeem admin token")
        .into_admin()
        .expect("admin capability");
    (conn, admin)
}

/// A fresh agent token minted by `admin`, redeemed on `conn`.
pub async fn agent(conn: &Connection, admin: &AdminClient) -> AgentClient {
    let minted = admin.mint_agent("test", None).await.expect("mint agent");
    conn.redeem(&minted.token)
        .await
        .expect("redeem agent token")
        .into_agent()
        .expect("agent capability")
}

// ---- helpers for the `capsync sync` tests (sync_cli.rs, client_kill.rs) ----

/// A share for `session_id`, created by a fresh agent: (share id, writer token, agent token).
pub async fn writer_share(server: &TestServer, session_id: &str) -> (String, String, String) {
    let (conn, admin) = admin(server).await;
    let minted = admin
        .mint_agent("sync-test", None)
        .await
        .expect("mint agent");
    let agent = conn
        .redeem(&minted.token)
        .await
        .expect("redeem agent token")
        .into_agent()
        .expect("agent capability");
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
        minted.token,
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
