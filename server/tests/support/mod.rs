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
    /// The HTTP gateway's address, from its own log line (`None` with `--http-listen off`).
    pub http_addr: Option<SocketAddr>,
    /// The log lines up to and including the listening lines.
    pub startup_logs: Vec<Value>,
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
        Self::start_under(&[], data_dir, args)
    }

    /// [`ServerProcess::start_with`], run by `wrapper` (a command and its
    /// arguments, such as `prlimit --nofile=256:256`) when it is not empty.
    pub fn start_under(wrapper: &[&str], data_dir: &Path, args: &[&str]) -> Self {
        let mut command = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut command = Command::new(program);
                command.args(wrapper_args).arg(BIN);
                command
            }
            None => Command::new(BIN),
        };
        let mut child = command
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
            http_addr: None,
            startup_logs: Vec::new(),
            logs,
        };
        // Readiness is the log lines that carry the bound addresses (in either order).
        let http_off = args.windows(2).any(|w| w == ["--http-listen", "off"]);
        let address = |line: &Value| -> SocketAddr {
            line["fields"]["addr"].as_str().unwrap().parse().unwrap()
        };
        let mut rpc = None;
        while rpc.is_none() || (server.http_addr.is_none() && !http_off) {
            let line = server.next_log("the listening log lines");
            server.startup_logs.push(line.clone());
            match line["fields"]["message"].as_str() {
                Some("capsync listening") => rpc = Some(address(&line)),
                Some("share pages and HTTP API listening") => {
                    server.http_addr = Some(address(&line))
                }
                _ => {}
            }
        }
        server.addr = rpc.unwrap();
        server
    }

    /// The next log line, waiting at most a minute.
    pub fn next_log(&mut self, waiting_for: &str) -> Value {
        self.logs
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no log line: {waiting_for}"))
    }

    /// The HTTP gateway's address.
    pub fn http(&self) -> SocketAddr {
        self.http_addr.expect("the HTTP gateway is on")
    }

    /// Log lines received so far and not yet read.
    pub fn drain_logs(&mut self) -> Vec<Value> {
        self.logs.try_iter().collect()
    }

    /// The process's resident memory now, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/<pid>/status");
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status");
        kib * 1024
    }

    pub fn wait_for_log(&mut self, message: &str) -> Value {
        loop {
            let line = self.next_log(message);
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
            ..capsync_client::NewShare::default()
        })
        .await
        .unwrap()
}

/// A plain HTTP/1.1 GET (or any request line and headers) from `source`,
/// answered with `(status, body)`: for addresses other than 127.0.0.1, which
/// HTTP client libraries do not bind to.
pub fn http_request(
    addr: SocketAddr,
    source: std::net::IpAddr,
    head: &str,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect(&addr.into())?;
    let mut stream: std::net::TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(head.as_bytes())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

/// `GET path` from `source`, closing the connection after.
pub fn http_get(
    addr: SocketAddr,
    source: std::net::IpAddr,
    path: &str,
) -> std::io::Result<(u16, String)> {
    http_request(
        addr,
        source,
        &format!("GET {path} HTTP/1.1\r\nHost: capsync\r\nConnection: close\r\n\r\n"),
    )
}

/// The value of one sample in the server's `/metrics`, e.g.
/// `capsync_storage_full` or `capsync_connections_refused_total{listener="rpc",reason="address_limit"}`.
pub fn metric(http: SocketAddr, sample: &str) -> Option<f64> {
    let (status, body) = http_get(http, [127, 0, 0, 1].into(), "/metrics").ok()?;
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// A relay for one RPC connection: a client connects to `addr`, and the relay
/// connects to the server from `source` and copies both ways. Bytes sent on
/// `inject` reach the server as if the client had sent them, in between its
/// own messages.
pub struct Relay {
    pub addr: SocketAddr,
    pub inject: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
}

/// Starts a [`Relay`] to `upstream` on the current tokio runtime.
pub async fn relay(upstream: SocketAddr, source: std::net::IpAddr) -> Relay {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (inject, mut injected) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(source, 0)).unwrap();
        let Ok(server) = socket.connect(upstream).await else {
            return;
        };
        let (mut client_read, mut client_write) = client.into_split();
        let (mut server_read, mut server_write) = server.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
            let _ = client_write.shutdown().await;
        });
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            tokio::select! {
                read = client_read.read(&mut buf) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => if server_write.write_all(&buf[..n]).await.is_err() { break },
                },
                Some(bytes) = injected.recv() => {
                    if server_write.write_all(&bytes).await.is_err() { break }
                }
            }
        }
    });
    Relay { addr, inject }
}

/// Raises this process's soft limit on open files to at least `at_least` (up
/// to the hard limit), for tests that hold many sockets.
pub fn raise_open_files(at_least: u64) {
    let status = Command::new("prlimit")
        .args([
            "--pid",
            &std::process::id().to_string(),
            &format!("--nofile={at_least}:"),
        ])
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        eprintln!("note: could not raise the open-files limit to {at_least} (prlimit)");
    }
}
