//! Fleet: many agents streaming opencode-like traffic at once, with viewers on a fifth
//! of the shares, ramped until the agents' ack p99 passes 50 ms (issue 14, target 4:
//! 500 streaming agents with 100 viewers at ack p99 ≤ 50 ms).
//!
//! The server runs in a process of its own (this binary again, with `--serve`; see
//! `fleet/server.rs`): `capsync_server::spawn` on `127.0.0.1:0` with the tests'
//! configuration (durability FULL, HTTP gateway on), connection limits raised for the
//! ramp's largest step. Its RSS and its threads' CPU are then apart from the bench's.
//!
//! Each agent has its own RPC connection, redeems the agent token, creates its own
//! share and streams ops on a clock (`fleet/traffic.rs`): per second 30 `part.delta`s,
//! one snapshot (text part, message or tool part, in turn), and every 20 s a new
//! message (`--message-seconds`). It keeps at most one `appendOps` call in flight and sends everything that
//! fell due meanwhile in the next one, as a syncer's outbox does: a slow server shows
//! as longer acks, bigger calls and a backlog, never as fewer ops offered. One share in
//! five (`--viewer-every`) has a viewer on its own connection, RPC subscriptions and
//! SSE streams in turn (`--via`); each checks that every op arrives once and in order.
//!
//! The ramp: steps of `--steps` agents (each step adds agents to reach its count, and
//! their viewers), each `--step-seconds` long, the first `--warmup-seconds` not
//! counted. The ramp stops after the first step whose ack p99 passes `--stop-p99` (50 ms).
//!
//! ```text
//! cargo bench -p capsync-tests --bench fleet
//! cargo bench -p capsync-tests --bench fleet -- --steps 50,100,150 --step-seconds 10
//! cargo bench -p capsync-tests --bench fleet -- --via sse --viewer-every 2
//! cargo bench -p capsync-tests --bench fleet -- --steps 100,200,300,500 --stop-p99 10s
//! ```
//!
//! Exits non-zero only when a viewer missed, repeated or reordered an op, or an op was
//! refused; PASS/FAIL is a verdict. Results and how to read them: `docs/BENCHMARKS.md`.

use std::error::Error;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[path = "fleet/agent.rs"]
mod agent;
#[path = "fleet/busy.rs"]
mod busy;
#[path = "fleet/cpu.rs"]
mod cpu;
#[path = "fleet/disk.rs"]
mod disk;
#[path = "common/event_stream.rs"]
mod event_stream;
#[path = "common/follow.rs"]
mod follow;
#[path = "common/proc_stat.rs"]
mod proc_stat;
#[path = "fleet/ramp.rs"]
mod ramp;
// The subscribe bench's latency percentiles and number formatting; its pair ratios and
// verdicts are not used here.
#[allow(dead_code)]
#[path = "subscribe/report.rs"]
mod report;
#[path = "fleet/saturation.rs"]
mod saturation;
#[path = "fleet/server.rs"]
mod server;
#[path = "fleet/stats.rs"]
mod stats;
#[path = "fleet/summary.rs"]
mod summary;
#[path = "fleet/traffic.rs"]
mod traffic;
#[path = "fleet/viewer.rs"]
mod viewer;

use follow::Via;
use server::ServerProcess;

type BenchResult<T> = Result<T, Box<dyn Error>>;

/// Issue 14's target 4: this many agents...
const TARGET_AGENTS: usize = 500;
/// ...with this many viewers...
const TARGET_VIEWERS: usize = 100;
/// ...at this ack p99 or less.
const TARGET_P99: Duration = Duration::from_millis(50);

#[derive(Debug, Parser)]
#[command(
    about = "Fleet: agents streaming opencode-like traffic, with viewers, ramped until ack p99 passes 50 ms (see docs/BENCHMARKS.md)"
)]
struct Args {
    /// Agents at each step of the ramp, increasing (comma separated). Fine steps first:
    /// a small machine stops early, and its figure should still say something.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "25,50,75,100,150,200,300,400,500,600,800"
    )]
    steps: Vec<usize>,
    /// Seconds each step runs, its warm-up included.
    #[arg(long, default_value_t = 15.0)]
    step_seconds: f64,
    /// Seconds at the start of each step not counted: the new agents' first calls and
    /// the new viewers' first reads.
    #[arg(long, default_value_t = 3.0)]
    warmup_seconds: f64,
    /// The ramp stops after the first step whose ack p99 is over this (the verdicts
    /// stay against the target's 50 ms: a higher value shows what happens past it).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "50ms")]
    stop_p99: Duration,
    /// Seconds between an agent's new messages: its text part grows (about 700 bytes a
    /// second) until the next one.
    #[arg(long, default_value_t = 20.0)]
    message_seconds: f64,
    /// One share in this many has a viewer (5: a fifth of the shares).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    viewer_every: u32,
    /// How the viewers follow, in turn (comma separated): RPC subscriptions, HTTP event
    /// streams.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "rpc,sse")]
    via: Vec<Via>,
    /// The server's `--follow-interval` (default: the server's own).
    #[arg(long, value_parser = humantime::parse_duration)]
    follow_interval: Option<Duration>,
    /// Seeds the agents' phases and deltas.
    #[arg(long, default_value_t = 14)]
    seed: u64,
    /// Where the server's data goes (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Internal: run as the server process, on this data directory.
    #[arg(long, hide = true)]
    serve: Option<PathBuf>,
    /// Passed by `cargo bench` to every bench binary; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

impl Args {
    fn max_agents(&self) -> usize {
        self.steps.iter().copied().max().unwrap_or(0)
    }

    fn viewers_for(&self, agents: usize) -> usize {
        agents.div_ceil(self.viewer_every as usize)
    }

    fn max_viewers(&self) -> usize {
        self.viewers_for(self.max_agents())
    }

    fn has_viewer(&self, agent: usize) -> bool {
        agent.is_multiple_of(self.viewer_every as usize)
    }

    fn step_duration(&self) -> Duration {
        Duration::from_secs_f64(self.step_seconds)
    }

    fn message_every(&self) -> Duration {
        Duration::from_secs_f64(self.message_seconds)
    }

    fn warmup(&self) -> Duration {
        Duration::from_secs_f64(self.warmup_seconds)
    }

    fn check(&self) -> BenchResult<()> {
        if self.steps.is_empty() || self.steps.contains(&0) {
            return Err("--steps needs at least one step, each of at least 1 agent".into());
        }
        if !self.steps.is_sorted_by(|a, b| a < b) {
            return Err("--steps must increase".into());
        }
        if self.warmup_seconds < 0.0 || self.step_seconds <= self.warmup_seconds {
            return Err("--step-seconds must be longer than --warmup-seconds".into());
        }
        if self.message_seconds <= 0.0 {
            return Err("--message-seconds must be more than 0".into());
        }
        if self.via.is_empty() {
            return Err("--via needs rpc, sse or both".into());
        }
        Ok(())
    }
}

fn main() -> BenchResult<()> {
    let args = Args::parse();
    if let Some(data) = &args.serve {
        return server::serve(&args, data);
    }
    args.check()?;
    let dir = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let data = tempfile::Builder::new()
        .prefix("capsync-bench-fleet")
        .tempdir_in(&dir)?;
    let server = ServerProcess::start(data.path())?;
    summary::print_header(&args, &dir, &server::config(&args, data.path()));
    let ramp = capsync_tests::run_local(ramp::run(&args, &server));
    let stopped = server.stop();
    let ramp = ramp?;
    stopped?;
    summary::print_summary(&ramp);
    Ok(())
}
