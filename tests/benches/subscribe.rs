//! Live subscriptions: what following a share costs its writers, and how fast a commit
//! reaches the followers (issue 14, target 1).
//!
//! Each scenario, for each way of following, gets a real server of its own
//! (`capsync_server::spawn` on `127.0.0.1:0` with its HTTP gateway, a fresh data
//! directory, durability FULL, default subscriber window and timeout, connection limits
//! raised for the bench's thousands of connections from one address). The clients run
//! in this process on one `LocalSet`. A follower is either an RPC subscription
//! (`ShareViewer.subscribe` through `LiveOps`) or an HTTP Server-Sent-Event stream
//! (`GET /api/shares/{share}/events?after=N`, the viewer token as a bearer), each on a
//! connection of its own (`--via rpc,sse`, both by default).
//!
//! - **fanout**: 1 writer appending batches of `--batch` ops, one call in flight, to one
//!   share. Pairs of runs back to back (`--repeat`, which goes first alternating): the
//!   writer alone, and the writer with `--subscribers` followers of the share,
//!   subscribed from its cursor before a warm-up. A run sends `--batches` batches, or
//!   stops at `--run-seconds`, whichever comes first. Per pair the ratio of the two
//!   throughputs; the verdict is their median (target ≥ 0.9). Over every op and
//!   follower of the runs with followers: the time from the writer receiving the ack
//!   to the follower's stream yielding the op (target p99 ≤ 20 ms). Both ends are in
//!   this process, so one clock; an op can reach a follower before its ack reaches the
//!   writer, which counts as 0 and is reported apart.
//! - **spread**: `--shares` shares, each with one agent appending single ops (one call
//!   in flight, its own connection). Timed runs of `--seconds` after 1 s not counted,
//!   in pairs: without followers, and with one follower per share. Aggregate ops/s, its
//!   median ratio (target ≥ 0.9), the agents' ack latency, and commit to follower.
//! - **stalled**: the fanout writer on a fresh share per run, alone and with one
//!   subscriber whose `OpListener.ops` never returns (target ≥ 0.9 of alone).
//!
//! Every follower is checked to get every op exactly once and in cursor order; the
//! bench fails otherwise. Ops are `part.upsert`s with a 300-byte payload, as in the
//! append benchmark. Each run also prints where the CPU went (this process's client
//! thread against the server's threads): on a small machine the bench's own followers
//! compete with the server they measure.
//!
//! ```text
//! cargo bench -p capsync-tests --bench subscribe
//! cargo bench -p capsync-tests --bench subscribe -- --scenario fanout,spread --via rpc,sse --repeat 3
//! cargo bench -p capsync-tests --bench subscribe -- --scenario spread --via sse --shares 200 --seconds 3
//! cargo bench -p capsync-tests --bench subscribe -- --scenario stalled --repeat 5
//! ```
//!
//! Results and how to read them: `docs/BENCHMARKS.md`.

use std::error::Error;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use capsync_server::Config;
use capsync_tests::client;
use capsync_tests::run_local;
use clap::{Parser, ValueEnum};

#[path = "subscribe/cpu.rs"]
mod cpu;
#[path = "common/event_stream.rs"]
mod event_stream;
#[path = "subscribe/fanout.rs"]
mod fanout;
#[path = "common/follow.rs"]
mod follow;
#[path = "subscribe/follower.rs"]
mod follower;
#[path = "common/proc_stat.rs"]
mod proc_stat;
#[path = "subscribe/report.rs"]
mod report;
#[path = "subscribe/spread.rs"]
mod spread;
#[path = "subscribe/stalled.rs"]
mod stalled;
#[path = "subscribe/writer.rs"]
mod writer;

use follow::{Endpoints, Via};
use report::Verdict;
use writer::{PAYLOAD_BYTES, Workload};

type BenchResult<T> = Result<T, Box<dyn Error>>;

/// Batches sent before anything is timed (fanout, stalled).
const WARMUP_BATCHES: u64 = 50;
/// How long followers may take to get the last op once the writers stop, before the
/// bench gives up on them.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Fanout,
    Spread,
    Stalled,
}

#[derive(Debug, Parser)]
#[command(
    about = "Live subscriptions: fan-out cost and latency, over RPC and SSE (see docs/BENCHMARKS.md)"
)]
struct Args {
    /// Scenarios to run, in this order (comma separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "fanout,spread,stalled"
    )]
    scenario: Vec<Scenario>,
    /// How the followers of fanout and spread follow (comma separated): RPC
    /// subscriptions, HTTP event streams.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "rpc,sse")]
    via: Vec<Via>,
    /// fanout: followers of the one share, each on its own connection.
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// fanout, stalled: ops per appendOps call.
    #[arg(long, default_value_t = 10)]
    batch: usize,
    /// fanout: batches each run measures (3,000 of 10: 3 s at 10k ops/s).
    #[arg(long, default_value_t = 3000)]
    batches: u64,
    /// fanout: a run stops after this many seconds even if it has not sent every batch
    /// (with followers it can be many times slower than alone).
    #[arg(long, default_value_t = 8.0)]
    run_seconds: f64,
    /// spread: shares, each with one agent (and, in the runs with followers, one follower).
    #[arg(long, default_value_t = 1000)]
    shares: usize,
    /// spread: seconds each run measures.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// stalled: batches each run measures (keep a run shorter than the subscriber
    /// timeout, 10s, or the stalled subscriber is dropped part-way).
    #[arg(long, default_value_t = 1000)]
    throughput_batches: u64,
    /// The server's `--follow-interval` (default: the server's own).
    #[arg(long, value_parser = humantime::parse_duration)]
    follow_interval: Option<Duration>,
    /// Pairs of runs (without, with), alternating which goes first.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    /// Where the servers' data goes (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Passed by `cargo bench` to every bench binary; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// What every scenario runs against.
struct Bench {
    endpoints: Endpoints,
    agent_token: String,
    subscriber_timeout: Duration,
    workload: Rc<Workload>,
}

fn main() -> BenchResult<()> {
    let args = Args::parse();
    if args.batch == 0 || args.batches == 0 || args.throughput_batches == 0 {
        return Err("--batch, --batches and --throughput-batches must be at least 1".into());
    }
    if args.subscribers == 0 || args.shares == 0 || args.seconds <= 0.0 || args.run_seconds <= 0.0 {
        return Err(
            "--subscribers, --shares, --seconds and --run-seconds must be more than 0".into(),
        );
    }
    let dir = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    print_header(&args, &dir, &config(&args, dir.join("unused")));
    let mut verdicts = Vec::new();
    for &scenario in &args.scenario {
        let vias: &[Via] = match scenario {
            Scenario::Fanout | Scenario::Spread => &args.via,
            // Its subscriber is RPC by nature (an `OpListener` that never answers).
            Scenario::Stalled => &[Via::Rpc],
        };
        for &via in vias {
            verdicts.extend(on_fresh_server(
                &args,
                &dir,
                async |bench: &Bench| match scenario {
                    Scenario::Fanout => fanout::run(bench, &args, via).await,
                    Scenario::Spread => spread::run(bench, &args, via).await,
                    Scenario::Stalled => stalled::run(bench, &args).await,
                },
            )?);
        }
    }
    report::print_verdicts(&verdicts);
    Ok(())
}

/// The bench's server configuration: the tests' (cheap argon2), with room for every
/// connection the bench opens, all from 127.0.0.1.
fn config(args: &Args, data: PathBuf) -> Config {
    let mut config = Config::for_tests(data);
    // spread opens an agent and a follower connection per share, fanout one per
    // follower; a few more for setup. The HTTP gateway's stream limit is the same number.
    let needed = 2 * args.shares.max(args.subscribers) + 64;
    config.max_connections = config.max_connections.max(needed);
    config.max_connections_per_address = config.max_connections_per_address.max(needed);
    if let Some(interval) = args.follow_interval {
        config.follow_interval = interval;
    }
    config
}

/// Runs `body` against a server of its own, in a fresh data directory.
fn on_fresh_server(
    args: &Args,
    dir: &Path,
    body: impl AsyncFnOnce(&Bench) -> BenchResult<Vec<Verdict>>,
) -> BenchResult<Vec<Verdict>> {
    let data = tempfile::Builder::new()
        .prefix("capsync-bench-subscribe")
        .tempdir_in(dir)?;
    let config = config(args, data.path().join("data"));
    let server = capsync_server::spawn(TcpListener::bind("127.0.0.1:0")?, config.clone())?;
    let endpoints = Endpoints {
        rpc: server.addr(),
        http: server.http_addr().ok_or("the server has no HTTP gateway")?,
    };
    let admin_token = std::fs::read_to_string(config.admin_token_path())?;
    let result = run_local(async {
        let agent_token = {
            let conn = client::connect(endpoints.rpc).await?;
            let admin = conn.redeem(admin_token.trim()).await?.into_admin()?;
            let minted = admin.mint_agent("bench agent", None).await?;
            conn.disconnect().await?;
            minted.token
        };
        let bench = Bench {
            endpoints,
            agent_token,
            subscriber_timeout: config.subscriber_timeout,
            workload: Rc::new(Workload::new()),
        };
        body(&bench).await
    });
    server.shutdown()?;
    result
}

fn print_header(args: &Args, dir: &Path, config: &Config) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into());
    println!("capsync subscription benchmark");
    println!("  machine:     {cores} cores, load average {load} at start");
    println!("  data:        {} (durability FULL)", dir.display());
    println!(
        "  server:      subscriber window {} calls, timeout {:?}, follow interval {:?}; at most {} connections ({} per address) and live streams",
        config.subscriber_window,
        config.subscriber_timeout,
        config.follow_interval,
        config.max_connections,
        config.max_connections_per_address
    );
    println!(
        "  ops:         part.upsert, {PAYLOAD_BYTES}-byte payload; {} pairs of runs per scenario",
        args.repeat
    );
    println!();
}
