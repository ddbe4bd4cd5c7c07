//! The server under test, in a process of its own: this bench binary started again
//! with `--serve <data dir>`, running `capsync_server::spawn` until its stdin closes.
//!
//! A process apart, rather than a thread of the bench, so its RSS and its threads' CPU
//! are its own: the bench's thousand clients would otherwise sit in the same numbers.
//! It is the same code as `capsync-server serve` (the binary is not built for benches),
//! with the bench's configuration.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use capsync_server::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::follow::Endpoints;
use crate::{Args, BenchResult};

/// The running server process.
pub struct ServerProcess {
    child: Child,
    pub pid: u32,
    pub endpoints: Endpoints,
    pub admin_token: String,
    /// Its data directory.
    pub data: PathBuf,
}

impl ServerProcess {
    /// Starts the server on fresh data in `data` and waits until it is ready.
    pub fn start(data: &Path) -> BenchResult<Self> {
        // The child gets this run's arguments (so the same configuration) plus --serve.
        let args = std::env::args_os().skip(1).filter(|arg| arg != "--bench");
        let mut child = Command::new(std::env::current_exe()?)
            .args(args)
            .arg("--serve")
            .arg(data)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("the server's stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let addrs: Vec<&str> = line.split_whitespace().collect();
        let (Some(&"ready"), Some(rpc), Some(http)) = (addrs.first(), addrs.get(1), addrs.get(2))
        else {
            let _ = child.kill();
            return Err(format!("the server process did not start: {line:?}").into());
        };
        let endpoints = Endpoints {
            rpc: rpc.parse()?,
            http: http.parse()?,
        };
        let config = Config::for_tests(data.to_owned());
        let admin_token = std::fs::read_to_string(config.admin_token_path())?
            .trim()
            .to_owned();
        Ok(Self {
            pid: child.id(),
            child,
            endpoints,
            admin_token,
            data: data.to_owned(),
        })
    }

    /// Closes the server's stdin (it shuts down gracefully) and waits for it.
    pub fn stop(mut self) -> BenchResult<()> {
        drop(self.child.stdin.take());
        let status = self.child.wait()?;
        if !status.success() {
            return Err(format!("the server process ended with {status}").into());
        }
        Ok(())
    }

    /// The server's `/metrics`, as (name with labels, value) lines.
    pub async fn metrics(&self) -> BenchResult<Metrics> {
        let mut stream = TcpStream::connect(self.endpoints.http).await?;
        let request = format!(
            "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.endpoints.http
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
        Ok(Metrics::parse(body))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // Only when the bench fails before `stop`: the server has nothing left to keep.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The child's side: serves until stdin closes.
pub fn serve(args: &Args, data: &Path) -> BenchResult<()> {
    let server = capsync_server::spawn(
        std::net::TcpListener::bind("127.0.0.1:0")?,
        config(args, data),
    )?;
    let http = server.http_addr().ok_or("the server has no HTTP gateway")?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "ready {} {http}", server.addr())?;
    stdout.flush()?;
    // Whatever comes in is ignored; the end of it (the bench closing it, or ending) is
    // the signal to stop.
    std::io::stdin().read_to_end(&mut Vec::new())?;
    server.shutdown()?;
    Ok(())
}

/// The tests' configuration (durability FULL, cheap argon2, HTTP gateway on a free
/// port), with room for every connection of the ramp's largest step, all from
/// 127.0.0.1: one per agent and one per viewer, on either listener, and a few for setup.
pub fn config(args: &Args, data: &Path) -> Config {
    let mut config = Config::for_tests(data.to_owned());
    let needed = args.max_agents() + args.max_viewers() + 64;
    config.max_connections = config.max_connections.max(needed);
    config.max_connections_per_address = config.max_connections_per_address.max(needed);
    if let Some(interval) = args.follow_interval {
        config.follow_interval = interval;
    }
    config
}

/// Lines of the server's `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    lines: Vec<(String, f64)>,
}

/// The commit-latency histogram's name (time from a batch reaching the ledger to its
/// durable commit).
const COMMIT: &str = "capsync_commit_latency_seconds";

impl Metrics {
    fn parse(body: &str) -> Self {
        let lines = body
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let (name, value) = line.rsplit_once(' ')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect();
        Self { lines }
    }

    fn get(&self, name: &str) -> f64 {
        self.lines
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0.0, |(_, v)| *v)
    }

    /// The histogram's cumulative buckets: (upper bound in seconds, count).
    fn commit_buckets(&self) -> Vec<(f64, f64)> {
        let prefix = format!("{COMMIT}_bucket{{le=\"");
        self.lines
            .iter()
            .filter_map(|(name, value)| {
                let le = name.strip_prefix(&prefix)?.strip_suffix("\"}")?;
                Some((le.parse().ok()?, *value))
            })
            .collect()
    }
}

/// The server's commits between two readings of its metrics.
#[derive(Clone, Copy, Debug)]
pub struct Commits {
    /// Batches committed.
    pub batches: f64,
    /// Their mean time from reaching the ledger to durable.
    pub mean: Duration,
    /// The bucket bound the 99th percentile falls under (the buckets double).
    pub p99_under: Option<Duration>,
}

impl Commits {
    pub fn between(before: &Metrics, after: &Metrics) -> Self {
        let batches =
            after.get(&format!("{COMMIT}_count")) - before.get(&format!("{COMMIT}_count"));
        let seconds = after.get(&format!("{COMMIT}_sum")) - before.get(&format!("{COMMIT}_sum"));
        let earlier = before.commit_buckets();
        let p99_under = after
            .commit_buckets()
            .into_iter()
            .find(|&(le, count)| {
                let was = earlier
                    .iter()
                    .find(|(l, _)| *l == le)
                    .map_or(0.0, |(_, c)| *c);
                batches > 0.0 && count - was >= 0.99 * batches
            })
            .and_then(|(le, _)| le.is_finite().then(|| Duration::from_secs_f64(le)));
        Self {
            batches,
            mean: Duration::from_secs_f64(if batches > 0.0 {
                seconds / batches
            } else {
                0.0
            }),
            p99_under,
        }
    }
}

/// A process's resident set, in bytes (Linux: `/proc/<pid>/status`).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
