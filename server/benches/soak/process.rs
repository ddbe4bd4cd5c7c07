//! The `capsync-server` binary as a child process, measured from the outside:
//! resident memory and descriptors from `/proc`, `/metrics` over plain HTTP,
//! and its JSON log counted line by line.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_capsync-server");

/// Server warnings and errors echoed to the bench's stderr; the rest are counted.
const SHOWN_WARNINGS: u64 = 20;

/// A `capsync-server serve` child on `127.0.0.1:0` (both listeners).
pub struct ServerProcess {
    child: Child,
    pub addr: SocketAddr,
    pub http: SocketAddr,
    pub data_dir: PathBuf,
    /// Log lines, warnings and errors so far: the log's volume is part of what
    /// a soak watches (repeated events are meant to be summarised).
    pub log: Arc<LogCounts>,
    /// Until the listening lines have been read; then only the counters are kept.
    startup: Option<Receiver<Value>>,
}

/// Counters the log-reading thread keeps.
#[derive(Debug, Default)]
pub struct LogCounts {
    pub lines: AtomicU64,
    pub warnings: AtomicU64,
    pub errors: AtomicU64,
}

impl LogCounts {
    pub fn get(&self) -> (u64, u64, u64) {
        (
            self.lines.load(Ordering::Relaxed),
            self.warnings.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }
}

impl ServerProcess {
    /// Starts the server with data in `data_dir` and `args` after `serve`, and
    /// returns once it has logged both listening addresses.
    pub fn start(binary: &Path, data_dir: &Path, args: &[String]) -> std::io::Result<Self> {
        let mut child = Command::new(binary)
            .args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
            .args(["--http-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data_dir)
            .args(args)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()?;
        let log = Arc::new(LogCounts::default());
        let (tx, rx) = channel();
        let stderr = child.stderr.take().expect("piped stderr");
        let counts = log.clone();
        std::thread::spawn(move || {
            let mut startup = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let value: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                counts.lines.fetch_add(1, Ordering::Relaxed);
                match value["level"].as_str() {
                    Some("WARN") => counts.warnings.fetch_add(1, Ordering::Relaxed),
                    Some("ERROR") => counts.errors.fetch_add(1, Ordering::Relaxed),
                    _ => 0,
                };
                let (_, warnings, errors) = counts.get();
                let serious = matches!(value["level"].as_str(), Some("WARN" | "ERROR"));
                // Rare by design, so worth seeing as they happen; but not a flood.
                if serious && warnings + errors <= SHOWN_WARNINGS {
                    eprintln!("server log: {line}");
                }
                // Only the first lines are wanted; after that the channel would grow.
                if let Some(tx) = &startup
                    && tx.send(value).is_err()
                {
                    startup = None;
                }
            }
        });
        let mut server = Self {
            child,
            addr: "0.0.0.0:0".parse().expect("address"),
            http: "0.0.0.0:0".parse().expect("address"),
            data_dir: data_dir.to_owned(),
            log,
            startup: Some(rx),
        };
        server.wait_until_listening()?;
        Ok(server)
    }

    fn wait_until_listening(&mut self) -> std::io::Result<()> {
        let rx = self.startup.take().expect("startup logs");
        let (mut rpc, mut http) = (None, None);
        while rpc.is_none() || http.is_none() {
            let line = rx.recv_timeout(Duration::from_secs(60)).map_err(|_| {
                std::io::Error::other("the server did not log its listening addresses")
            })?;
            let addr = || line["fields"]["addr"].as_str()?.parse::<SocketAddr>().ok();
            match line["fields"]["message"].as_str() {
                Some("capsync listening") => rpc = addr(),
                Some("share pages and HTTP API listening") => http = addr(),
                _ => {}
            }
        }
        (self.addr, self.http) = (rpc.expect("rpc"), http.expect("http"));
        // Dropping the receiver tells the reading thread to stop forwarding.
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn admin_token(&self) -> std::io::Result<String> {
        Ok(std::fs::read_to_string(self.data_dir.join("admin.token"))?
            .trim()
            .to_owned())
    }

    /// What `/proc` says about the process now.
    pub fn sample(&self) -> Option<ProcSample> {
        ProcSample::of(self.pid())
    }

    pub fn fd_kinds(&self) -> FdKinds {
        FdKinds::of(self.pid()).unwrap_or_default()
    }

    /// Bytes of the database, its write-ahead log and its shared memory.
    pub fn database_bytes(&self) -> u64 {
        ["capsync.db", "capsync.db-wal", "capsync.db-shm"]
            .iter()
            .filter_map(|name| std::fs::metadata(self.data_dir.join(name)).ok())
            .map(|meta| meta.len())
            .sum()
    }

    /// SIGTERM, then waits (at most a minute) for the exit; true on a clean exit.
    pub fn terminate(&mut self) -> bool {
        let sent = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        if !sent {
            return false;
        }
        for _ in 0..600 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Memory, descriptors and threads of a process at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcSample {
    /// `VmRSS`, `RssAnon` and `RssFile` (bytes): anonymous memory is the heap;
    /// file-backed is mostly the binary's own pages.
    pub rss: u64,
    pub anon: u64,
    pub file: u64,
    pub fds: u64,
    pub threads: u64,
}

/// Open descriptors by kind. Sockets and the rest (pipes, event and timer
/// descriptors) are what a leaked connection or task would leave behind;
/// files are the database's, opened by each SQLite connection as it first
/// needs them, so they grow to a fixed number after start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FdKinds {
    pub sockets: u64,
    pub files: u64,
    pub other: u64,
}

impl FdKinds {
    pub fn of(pid: u32) -> Option<Self> {
        let mut kinds = Self::default();
        for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()? {
            // A descriptor closed since the listing has no link: not counted.
            let Ok(target) = std::fs::read_link(entry.ok()?.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            if target.starts_with("socket:") {
                kinds.sockets += 1;
            } else if target.starts_with('/') {
                kinds.files += 1;
            } else {
                kinds.other += 1;
            }
        }
        Some(kinds)
    }
}

impl ProcSample {
    pub fn of(pid: u32) -> Option<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| -> Option<u64> {
            let rest = status.lines().find_map(|l| l.strip_prefix(name))?;
            rest.trim().trim_end_matches("kB").trim().parse().ok()
        };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
        Some(Self {
            rss: field("VmRSS:")? * 1024,
            anon: field("RssAnon:").unwrap_or(0) * 1024,
            file: field("RssFile:").unwrap_or(0) * 1024,
            fds,
            threads: field("Threads:").unwrap_or(0),
        })
    }
}

/// The samples of the server's `/metrics` whose names start with `prefix`,
/// as `(name with labels, value)`; empty if it does not answer.
pub fn metrics(http: SocketAddr, prefix: &str) -> Vec<(String, f64)> {
    let Ok(body) = http_get(http, "/metrics") else {
        return Vec::new();
    };
    body.lines()
        .filter(|line| line.starts_with(prefix))
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// A plain HTTP/1.1 GET with `Connection: close`; the body as text. Blocking,
/// and used once a minute at most.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: capsync\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    Ok(text
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .to_owned())
}
