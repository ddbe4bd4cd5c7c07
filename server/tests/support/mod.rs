//! The `capsync-server` binary as a child process, for the tests that need a real process
//! (signals, kill -9, restarts on the same data): JSON logs read line by line, readiness from
//! the "capsync listening" log line.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_capsync-server");

/// A `capsync-server serve` child process with JSON logs read line by line.
pub struct ServerProcess {
    pub child: Child,
    /// The address from the "capsync listening" log line.
    pub addr: SocketAddr,
    /// The process's stderr, one parsed JSON line at a time (`{"raw": …}` if not JSON).
    pub logs: Receiver<Value>,
}

impl ServerProcess {
    /// Starts a server on `127.0.0.1:0` with data in `data_dir` and cheap token hashing, and
    /// returns once it logs that it listens.
    pub fn start(data_dir: &Path) -> Self {
        Self::start_with(data_dir, &[])
    }

    /// [`ServerProcess::start`] with extra `serve` arguments (`--durability normal`, …).
    pub fn start_with(data_dir: &Path, args: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
            // Not the default 7421: tests run many servers at once.
            .args(["--http-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data_dir)
            // Cheap hashing: these tests measure behaviour, not argon2.
            .args(["--argon2-memory-kib", "256", "--argon2-iterations", "1"])
            .args(args)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .expect("start capsync-server");
        let (tx, logs) = channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line).unwrap_or(json!({"raw": line}));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        let mut server = Self {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            logs,
        };
        // Readiness is the log line that carries the bound address.
        let listening = server.wait_for_log("capsync listening");
        server.addr = listening["fields"]["addr"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        server
    }

    pub fn wait_for_log(&mut self, message: &str) -> Value {
        loop {
            let line = self
                .logs
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("no log line {message:?}"));
            if line["fields"]["message"] == message {
                return line;
            }
        }
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        self.child.wait().expect("wait for server")
    }

    /// SIGKILL (kill -9): no drain, no flush, no cleanup. Waits until the process is gone.
    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL the server");
        let status = self.child.wait().expect("wait for server");
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status:?}");
        }
        #[cfg(not(unix))]
        let _ = status;
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs an async test body on a current-thread runtime inside a `LocalSet`, as the
/// capnp-rpc client requires.
pub fn run_local<F: std::future::Future>(body: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&runtime, body)
}

/// The admin token the server wrote to its data directory on first start.
pub fn admin_token(data_dir: &Path) -> String {
    std::fs::read_to_string(data_dir.join("admin.token"))
        .unwrap()
        .trim()
        .to_owned()
}

/// Redeems the admin token of the server at `addr` and mints and redeems an agent.
/// The connection carries both capabilities: keep it while they are used.
pub async fn agent(
    addr: SocketAddr,
    data_dir: &Path,
    label: &str,
) -> (capsync_client::Connection, capsync_client::AgentClient) {
    let conn = capsync_client::connect(addr).await.unwrap();
    let admin = conn
        .redeem(&admin_token(data_dir))
        .await
        .unwrap()
        .into_admin()
        .unwrap();
    let agent_token = admin.mint_agent(label, None).await.unwrap().token;
    let agent = conn
        .redeem(&agent_token)
        .await
        .unwrap()
        .into_agent()
        .unwrap();
    (conn, agent)
}

/// An untitled share for `session_id`.
pub async fn share(
    agent: &capsync_client::AgentClient,
    session_id: &str,
) -> capsync_client::CreatedShare {
    agent
        .create_share(capsync_client::NewShare {
            session_id: session_id.into(),
            project_id: String::new(),
            parent_session_id: None,
            title: String::new(),
            viewer_expires_at: None,
        })
        .await
        .unwrap()
}
