//! The real capsync server for the client's tests, on `127.0.0.1:0` in a temporary data
//! directory. Tests talk to it through the public client API (or the `capsync` binary),
//! never to a stand-in: one implementation of the protocol, so it cannot drift.
//!
//! The listener is bound before the server starts and `capsync_server::spawn` returns only
//! once the server is ready, so no test sleeps for readiness. (The workspace's `tests/` crate has a fuller fixture;
//! it depends on this crate, so this crate cannot depend on it.)
#![allow(dead_code)] // each test binary uses its own subset

use std::net::{SocketAddr, TcpListener};

use capsync_client::{AdminClient, AgentClient, Connection, connect};
use capsync_server::{Config, ServerHandle};

/// A running server and the data directory it owns. Dropping it shuts the server down,
/// then deletes the directory.
pub struct TestServer {
    handle: Option<ServerHandle>,
    config: Config,
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
        let handle = capsync_server::spawn(listener, config.clone()).expect("server starts");
        Self {
            handle: Some(handle),
            config,
            _dir: dir,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.handle.as_ref().expect("server running").addr()
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
