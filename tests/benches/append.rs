//! `appendOps` throughput over loopback, against the limit of raw SQLite on the same disk.
//!
//! For each scenario (N concurrent agents, batches of B ops), three measurements:
//! - **raw**: the same number of ops written with plain rusqlite in this process, one
//!   thread, one transaction per batch of B, into the server's own table shapes (a ledger
//!   row with `UNIQUE (share_id, op_id)`, one materialized part upsert per op, one
//!   share-cursor update per batch), WAL, same `synchronous`. That is the durable work an
//!   append must do, with nothing else: the limit the targets are stated against. Half of
//!   it runs before the server and half after, so both see the same stretch of a noisy
//!   machine;
//! - **server**: a real server (`capsync_server::spawn` on `127.0.0.1:0`, fresh data
//!   directory, durability FULL unless told otherwise) driven by N agents. Each agent has
//!   its own connection and its own share (one agent token, N shares) and keeps
//!   `--in-flight` batches in flight (default 4, the syncer's default), each naming the one
//!   before it (`Batch.after`), as the syncer does with a backlog; every call's latency is
//!   recorded;
//! - **ceiling** (N > 1 only): raw again, but one transaction per round of all N agents'
//!   batches: what a perfect group commit of one batch per agent could do. With one batch
//!   in flight per agent (`--in-flight 1`) no commit can hold more, and the server cannot
//!   beat this; pipelined batches of one agent can share a commit, and then it can.
//!
//! It prints ops/s, calls/s, p50/p99 latency per call, server / raw, ceiling / raw, and
//! the CPU each thread used (client, server RPC thread, ledger writer thread; Linux only).
//! With `RUST_LOG=capsync_server::ledger=debug` the server also logs how many transactions
//! its writer committed for how many commands (the mean group-commit size).
//!
//! Ops are `part.upsert`s with a 300-byte JSON payload and unique op ids, into a share
//! prepared with its session and one message before timing starts.
//!
//! Everything shares the machine: the client (one `LocalSet` on the main thread, since
//! the capnp-rpc client is `!Send`), the server's RPC thread and its ledger writer
//! thread. On 2 cores that is three busy threads on two cores, as in a small deployment
//! with a local agent.
//!
//! With no arguments it runs the default scenarios (including the targets: `1x100` at
//! ≥ 0.85 × raw, and `16x1` at ≥ 10 × raw batch 1, i.e. one durable commit per op, and at
//! ≥ 0.8 × the ceiling)
//! three times each, and summarizes each with the repetition whose ratio is the median.
//! It exits 0 whenever it could measure: it is a measurement, not a test.
//!
//! ```text
//! cargo bench -p capsync-tests --bench append
//! cargo bench -p capsync-tests --bench append -- --scenario 16x1 --repeat 5
//! cargo bench -p capsync-tests --bench append -- --agents 8 --batch 20 --seconds 5
//! cargo bench -p capsync-tests --bench append -- --durability normal --dir /var/tmp
//! ```
//!
//! Results and how to read them: `docs/BENCHMARKS.md`.

use std::collections::VecDeque;
use std::error::Error;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use capsync_server::Config;
use capsync_server::config::DurabilityArg;
use capsync_tests::client::{self, Ack, Batch, Connection, NewShare, OpKind, OpSpec, WriterClient};
use capsync_tests::{run_local, session_ops};
use clap::Parser;
use futures::future::try_join_all;
use rusqlite::{TransactionBehavior, params};
use serde_json::json;

#[path = "append/postgres.rs"]
mod postgres_limit;
#[path = "common/proc_stat.rs"]
mod proc_stat;

use proc_stat::ThreadTicks;

type BenchResult<T> = Result<T, Box<dyn Error>>;

/// Size of each op's JSON payload, like the measurements in ARCHITECTURE.md.
const PAYLOAD_BYTES: usize = 300;

#[derive(Debug, Parser)]
#[command(about = "appendOps throughput against raw SQLite (see docs/BENCHMARKS.md)")]
struct Args {
    /// Concurrent agents; with --batch, runs only this one scenario.
    #[arg(long, requires = "batch")]
    agents: Option<usize>,
    /// Ops per appendOps call; with --agents, runs only this one scenario.
    #[arg(long, requires = "agents")]
    batch: Option<usize>,
    /// Ops to measure per scenario, over all agents (default: per scenario, a few seconds' worth).
    #[arg(long, conflicts_with = "seconds")]
    ops: Option<u64>,
    /// Measure each scenario for this long instead of a fixed number of ops.
    #[arg(long)]
    seconds: Option<f64>,
    /// Server durability, and `synchronous` of the raw limit (FULL or NORMAL).
    #[arg(long, value_enum, default_value_t = DurabilityArg::Full)]
    durability: DurabilityArg,
    /// Run only these default scenarios (comma separated): 1x1, 1x100, 4x10, 16x1, 16x10.
    #[arg(long, value_delimiter = ',', conflicts_with = "agents")]
    scenario: Vec<String>,
    /// Repetitions of each scenario; the summary shows the one with the median ratio.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    /// Where the databases go (default: the system temp dir). Must be the disk you
    /// mean to measure: on tmpfs, fsync is free and "durable" means nothing.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Measure on PostgreSQL instead (a `postgres://` URL; each run makes a schema of its
    /// own and drops it): the server with one node and with two, against N raw clients.
    #[arg(long, value_name = "URL")]
    database: Option<String>,
    /// PostgreSQL only: connections per server node (the server's `--database-connections`).
    #[arg(long, default_value_t = capsync_server::config::DEFAULT_DATABASE_CONNECTIONS)]
    database_connections: u32,
    /// Batches each agent keeps in flight, in order on its writer capability
    /// (`Batch.after`), as the syncer does with a backlog; 1 waits for each ack before
    /// sending the next batch.
    #[arg(long, default_value_t = capsync_client::syncer::DEFAULT_MAX_IN_FLIGHT, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    in_flight: usize,
    /// Passed by `cargo bench` to every bench binary; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// N agents, batches of B, and how much to measure.
#[derive(Clone, Debug)]
struct Scenario {
    name: String,
    agents: usize,
    batch: usize,
    budget: Budget,
    /// Batches each agent keeps in flight (`--in-flight`).
    in_flight: usize,
}

/// How long a scenario runs. Warm-up comes on top.
#[derive(Clone, Copy, Debug)]
enum Budget {
    /// This many batches per agent (the raw limit writes agents × that many).
    Batches(u64),
    Time(Duration),
}

impl Scenario {
    fn new(agents: usize, batch: usize, ops: Option<u64>, seconds: Option<f64>) -> Self {
        let per_round = (agents * batch) as u64;
        let budget = match (seconds, ops) {
            (Some(s), _) => Budget::Time(Duration::from_secs_f64(s)),
            (None, Some(ops)) => Budget::Batches(ops.div_ceil(per_round).max(1)),
            (None, None) => Budget::Batches(default_ops(agents, batch).div_ceil(per_round)),
        };
        Self {
            name: format!("{agents}x{batch}"),
            agents,
            batch,
            budget,
            in_flight: 1,
        }
    }

    /// The same shape with half the budget (at least one batch per agent).
    fn halved(&self) -> Self {
        let budget = match self.budget {
            Budget::Batches(n) => Budget::Batches(n.div_ceil(2)),
            Budget::Time(d) => Budget::Time(d / 2),
        };
        Self {
            budget,
            ..self.clone()
        }
    }

    /// Batches per agent sent before timing starts: warms caches, the page cache and
    /// the WAL, and lets every connection reach its steady state.
    fn warmup_batches(&self) -> u64 {
        match self.budget {
            Budget::Batches(n) => (n / 20).max(1),
            Budget::Time(_) => 10,
        }
    }
}

/// Ops per scenario when not told: about a second or two per measurement on a 2-core
/// machine, so the whole default run (three repetitions) takes about 70 s. Batch-1 runs
/// are bounded by the raw limit's one commit per op, so they get fewer ops.
fn default_ops(agents: usize, batch: usize) -> u64 {
    match batch {
        1 if agents <= 2 => 3_000,
        1 => 12_000,
        b if b < 50 => 40_000,
        _ => 100_000,
    }
}

/// The default set: the two targets plus shapes that show the trend in between.
fn default_scenarios(args: &Args) -> Vec<Scenario> {
    [(1, 1), (1, 100), (4, 10), (16, 1), (16, 10)]
        .into_iter()
        .map(|(agents, batch)| Scenario::new(agents, batch, args.ops, args.seconds))
        .collect()
}

fn selected_scenarios(args: &Args) -> BenchResult<Vec<Scenario>> {
    if args.seconds.is_some_and(|s| !(s.is_finite() && s > 0.0)) {
        return Err("--seconds must be a positive number".into());
    }
    if let (Some(agents), Some(batch)) = (args.agents, args.batch) {
        if agents == 0 || batch == 0 {
            return Err("--agents and --batch must be at least 1".into());
        }
        return Ok(vec![Scenario::new(agents, batch, args.ops, args.seconds)]);
    }
    let all = default_scenarios(args);
    if args.scenario.is_empty() {
        return Ok(all);
    }
    args.scenario
        .iter()
        .map(|name| {
            all.iter()
                .find(|s| &s.name == name)
                .cloned()
                .ok_or_else(|| {
                    let known: Vec<_> = all.iter().map(|s| s.name.as_str()).collect();
                    format!("unknown scenario {name:?}; known: {}", known.join(", ")).into()
                })
        })
        .collect()
}

/// A target from the issue: the server at `min_ratio` × the raw limit for this shape.
struct Target {
    agents: usize,
    batch: usize,
    min_ratio: f64,
    /// The ratio is server / ceiling (a perfect group commit), not server / raw.
    of_ceiling: bool,
    claim: &'static str,
}

/// On PostgreSQL the limit is N raw clients at once, one transaction per batch each.
const POSTGRES_TARGETS: [Target; 2] = [
    Target {
        agents: 1,
        batch: 100,
        min_ratio: 0.7,
        of_ceiling: false,
        claim: "PostgreSQL: 1 agent x batch 100 at >= 0.7 x raw (batch 100)",
    },
    Target {
        agents: 16,
        batch: 1,
        min_ratio: 0.7,
        of_ceiling: false,
        claim: "PostgreSQL: 16 agents x batch 1 at >= 0.7 x 16 concurrent raw clients",
    },
];

const TARGETS: [Target; 3] = [
    Target {
        agents: 1,
        batch: 100,
        min_ratio: 0.85,
        of_ceiling: false,
        claim: "1 agent x batch 100 at >= 0.85 x raw (batch 100)",
    },
    Target {
        agents: 16,
        batch: 1,
        min_ratio: 10.0,
        of_ceiling: false,
        claim: "16 agents x batch 1 at >= 10 x raw batch 1 (one durable commit per op)",
    },
    Target {
        agents: 16,
        batch: 1,
        min_ratio: 0.8,
        of_ceiling: true,
        claim: "16 agents x batch 1 at >= 0.8 x the ceiling (16 batches per commit)",
    },
];

// ---------------------------------------------------------------------------------------
// The workload: the same ops, byte for byte, for the server and for the raw limit.
// ---------------------------------------------------------------------------------------

/// Names and padding of the ops one scenario writes.
struct Workload {
    /// Text that pads each payload to `PAYLOAD_BYTES`.
    filler: String,
}

impl Workload {
    fn new() -> Self {
        // Ids are fixed-width, so every payload has the sample's length.
        let bare = serde_json::to_string(&part_payload(0, 0, "")).map_or(0, |s| s.len());
        Self {
            filler: "x".repeat(PAYLOAD_BYTES.saturating_sub(bare)),
        }
    }

    fn op(&self, agent: usize, seq: u64) -> OpSpec {
        OpSpec::new(
            op_id(agent, seq),
            OpKind::PartUpsert,
            part_payload(agent, seq, &self.filler),
        )
    }

    /// The payload exactly as the client puts it on the wire (and the server stores it).
    fn payload_text(&self, agent: usize, seq: u64) -> String {
        part_payload(agent, seq, &self.filler).to_string()
    }
}

fn session_id(agent: usize) -> String {
    format!("ses_bench_{agent:03}")
}

fn message_id(agent: usize) -> String {
    format!("msg_bench_{agent:03}")
}

fn part_id(agent: usize, seq: u64) -> String {
    format!("prt_{agent:03}_{seq:010}")
}

fn op_id(agent: usize, seq: u64) -> String {
    format!("part:{}", part_id(agent, seq))
}

fn part_payload(agent: usize, seq: u64, text: &str) -> serde_json::Value {
    json!({
        "id": part_id(agent, seq),
        "messageID": message_id(agent),
        "sessionID": session_id(agent),
        "type": "text",
        "text": text,
    })
}

// ---------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------

/// What one side (server or raw) achieved in one run.
#[derive(Clone, Debug)]
struct Measurement {
    ops: u64,
    batches: u64,
    elapsed: Duration,
    /// Per appendOps call (server) or per transaction (raw).
    p50: Duration,
    p99: Duration,
    /// CPU time each kind of thread used while measuring (Linux only).
    cpu: Option<CpuSplit>,
}

impl Measurement {
    fn new(
        ops: u64,
        batches: u64,
        elapsed: Duration,
        mut latencies: Vec<Duration>,
        cpu: Option<CpuSplit>,
    ) -> Self {
        latencies.sort_unstable();
        Self {
            ops,
            batches,
            elapsed,
            p50: percentile(&latencies, 50.0),
            p99: percentile(&latencies, 99.0),
            cpu,
        }
    }

    /// Two runs as one: totals added, percentiles of the two averaged (an approximation
    /// good enough for the raw limit's transaction times, which are only informative).
    fn combine(&self, other: &Self) -> Self {
        let cpu = match (self.cpu, other.cpu) {
            (Some(a), Some(b)) => Some(a.plus(&b)),
            _ => None,
        };
        Self {
            ops: self.ops + other.ops,
            batches: self.batches + other.batches,
            elapsed: self.elapsed + other.elapsed,
            p50: (self.p50 + other.p50) / 2,
            p99: (self.p99 + other.p99) / 2,
            cpu,
        }
    }

    fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    fn batches_per_sec(&self) -> f64 {
        self.batches as f64 / self.elapsed.as_secs_f64()
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One repetition of one scenario: the limit and the server, back to back.
#[derive(Clone, Debug)]
struct Run {
    /// Raw, one transaction per batch: the limit the targets are stated against.
    raw: Measurement,
    /// Raw, one transaction per round of all agents' batches: the best any group
    /// commit could do (only for more than one agent).
    ceiling: Option<Measurement>,
    server: Measurement,
    /// PostgreSQL only: the same agents spread over two nodes on one database.
    two_nodes: Option<Measurement>,
}

impl Run {
    fn ratio(&self) -> f64 {
        self.server.ops_per_sec() / self.raw.ops_per_sec()
    }

    /// Ceiling / raw: the most that grouping N agents' batches can gain here.
    fn ceiling_ratio(&self) -> Option<f64> {
        let ceiling = self.ceiling.as_ref()?;
        Some(ceiling.ops_per_sec() / self.raw.ops_per_sec())
    }
}

// ---------------------------------------------------------------------------------------
// The server side
// ---------------------------------------------------------------------------------------

/// Starts a fresh server under `dir`, drives the scenario through it, stops it.
fn measure_server(
    scenario: &Scenario,
    durability: DurabilityArg,
    dir: &Path,
) -> BenchResult<Measurement> {
    let data = tempfile::Builder::new()
        .prefix("capsync-bench-server")
        .tempdir_in(dir)?;
    // Cheap argon2: redeeming tokens is not what is measured.
    let mut config = Config::for_tests(data.path().join("data"));
    config.durability = durability;
    // Every agent has a connection of its own, all from 127.0.0.1.
    let needed = scenario.agents + 64;
    config.max_connections = config.max_connections.max(needed);
    config.max_connections_per_address = config.max_connections_per_address.max(needed);
    let server = capsync_server::spawn(TcpListener::bind("127.0.0.1:0")?, config.clone())?;
    let admin_token = std::fs::read_to_string(config.admin_token_path())?;
    let measured = run_local(drive(&[server.addr()], admin_token.trim(), scenario));
    server.shutdown()?;
    measured
}

/// The client side of one server run, on the current thread's `LocalSet`: agent `i`
/// talks to the node at `addrs[i % addrs.len()]` (one address for one server).
async fn drive(
    addrs: &[SocketAddr],
    admin_token: &str,
    scenario: &Scenario,
) -> BenchResult<Measurement> {
    let workload = Workload::new();
    let agent_token = mint_agent_token(addrs[0], admin_token).await?;
    let mut agents = try_join_all(
        (0..scenario.agents).map(|i| BenchAgent::start(addrs[i % addrs.len()], &agent_token, i)),
    )
    .await?;

    let warmup = Budget::Batches(scenario.warmup_batches());
    try_join_all(
        agents
            .iter_mut()
            .map(|a| a.push(scenario.batch, scenario.in_flight, warmup, &workload)),
    )
    .await?;

    let cpu_before = ThreadCpu::sample();
    let started = Instant::now();
    let latencies = try_join_all(agents.iter_mut().map(|a| {
        a.push(
            scenario.batch,
            scenario.in_flight,
            scenario.budget,
            &workload,
        )
    }))
    .await?;
    let elapsed = started.elapsed();
    let cpu = ThreadCpu::since(cpu_before);

    for agent in agents {
        agent.conn.disconnect().await?;
    }
    let latencies = latencies.concat();
    let calls = latencies.len() as u64;
    let ops = calls * scenario.batch as u64;
    Ok(Measurement::new(ops, calls, elapsed, latencies, cpu))
}

/// Redeems the admin token and mints the one agent token all agents share.
async fn mint_agent_token(addr: SocketAddr, admin_token: &str) -> BenchResult<String> {
    let conn = client::connect(addr).await?;
    let admin = conn.redeem(admin_token).await?.into_admin()?;
    let minted = admin.mint_agent("bench agent", None).await?;
    conn.disconnect().await?;
    Ok(minted.token)
}

/// One agent: its own connection and share, batches in flight in order.
struct BenchAgent {
    index: usize,
    conn: Connection,
    writer: WriterClient,
    /// Sequence number of the next op; op ids stay unique across warm-up and measurement.
    next_seq: u64,
    /// The batch sent last, which the next one follows (`Batch.after`).
    last_batch: Option<String>,
}

impl BenchAgent {
    /// Connects, creates the agent's share and writes its session and message.
    async fn start(addr: SocketAddr, agent_token: &str, index: usize) -> BenchResult<Self> {
        let conn = client::connect(addr).await?;
        let agent = conn.redeem(agent_token).await?.into_agent()?;
        let created = agent
            .create_share(NewShare {
                session_id: session_id(index),
                project_id: "prj_test".into(),
                parent_session_id: None,
                title: format!("bench agent {index}"),
                ..NewShare::default()
            })
            .await?;
        let writer = created.writer;
        let setup = Batch::new(
            format!("setup-{index}"),
            session_ops(&session_id(index), &message_id(index), 0),
        );
        expect_all_applied(&writer.append(&setup).await?, setup.ops.len())?;
        Ok(Self {
            index,
            conn,
            writer,
            next_seq: 0,
            last_batch: None,
        })
    }

    /// Sends batches, `in_flight` at a time, until `budget` is spent; returns each call's
    /// latency (from its send to its ack).
    async fn push(
        &mut self,
        batch_size: usize,
        in_flight: usize,
        budget: Budget,
        workload: &Workload,
    ) -> BenchResult<Vec<Duration>> {
        let (limit, deadline) = match budget {
            Budget::Batches(n) => (n, None),
            Budget::Time(d) => (u64::MAX, Some(Instant::now() + d)),
        };
        let mut latencies = Vec::new();
        let mut calls = VecDeque::new();
        let mut sent = 0u64;
        loop {
            while calls.len() < in_flight
                && sent < limit
                && deadline.is_none_or(|d| Instant::now() < d)
            {
                let mut batch = self.next_batch(batch_size, workload);
                batch.after = self.last_batch.replace(batch.batch_id.clone());
                let answer = self.writer.send_append(&batch)?;
                calls.push_back((Instant::now(), batch.ops.len(), Box::pin(answer)));
                sent += 1;
            }
            let Some((at, ops, answer)) = calls.pop_front() else {
                return Ok(latencies);
            };
            let ack = answer.await?;
            latencies.push(at.elapsed());
            // A rejected op costs the server less than an applied one: count only real work.
            expect_all_applied(&ack, ops)?;
        }
    }

    fn next_batch(&mut self, size: usize, workload: &Workload) -> Batch {
        let first = self.next_seq;
        self.next_seq += size as u64;
        let ops = (first..self.next_seq)
            .map(|seq| workload.op(self.index, seq))
            .collect();
        Batch::new(format!("b-{}-{first}", self.index), ops)
    }
}

fn expect_all_applied(ack: &Ack, sent: usize) -> BenchResult<()> {
    if ack.applied() == sent {
        return Ok(());
    }
    let why: Vec<String> = ack
        .rejections()
        .take(3)
        .map(|(op, reason, detail)| format!("{op}: {reason} ({detail})"))
        .collect();
    Err(format!(
        "only {} of {sent} ops applied ({} duplicates); {}",
        ack.applied(),
        ack.duplicates(),
        why.join("; ")
    )
    .into())
}

// ---------------------------------------------------------------------------------------
// The raw limit
// ---------------------------------------------------------------------------------------

/// The server's tables for shares, messages, parts and the ledger, same columns,
/// keys and constraints (tokens and the other record tables are left out: an append
/// of parts does not write them).
const RAW_SCHEMA: &str = r#"
CREATE TABLE shares (
    id                TEXT PRIMARY KEY,
    session_id        TEXT NOT NULL,
    cursor            INTEGER NOT NULL DEFAULT 0 CHECK (cursor >= 0),
    updated_at        INTEGER NOT NULL
) STRICT;
CREATE TABLE ops (
    share_id   TEXT NOT NULL REFERENCES shares (id) ON DELETE CASCADE,
    cursor     INTEGER NOT NULL CHECK (cursor > 0),
    op_id      TEXT NOT NULL,
    kind       TEXT NOT NULL,
    payload    TEXT NOT NULL,
    token_id   TEXT NOT NULL,
    batch_id   TEXT NOT NULL,
    applied_at INTEGER NOT NULL,
    PRIMARY KEY (share_id, cursor),
    UNIQUE (share_id, op_id)
) STRICT;
CREATE TABLE messages (
    share_id TEXT NOT NULL REFERENCES shares (id) ON DELETE CASCADE,
    id       TEXT NOT NULL,
    terminal INTEGER NOT NULL CHECK (terminal IN (0, 1)),
    json     TEXT NOT NULL,
    PRIMARY KEY (share_id, id)
) STRICT;
CREATE TABLE parts (
    share_id   TEXT NOT NULL,
    id         TEXT NOT NULL,
    message_id TEXT NOT NULL,
    json       TEXT NOT NULL,
    PRIMARY KEY (share_id, id),
    FOREIGN KEY (share_id, message_id) REFERENCES messages (share_id, id) ON DELETE CASCADE
) STRICT;
CREATE INDEX parts_by_message ON parts (share_id, message_id, id);
"#;

/// Writes the scenario's ops with plain rusqlite on this thread, `batches_per_txn`
/// batches per transaction, taking the agents' shares in turn.
///
/// With 1 it is the limit the server is compared with (one commit per batch). With
/// N = agents it is what a perfect group commit could do: every agent's batch in
/// every commit, at no cost for RPC, validation or waiting. With one batch in flight
/// per agent no commit can hold more, so this is the ceiling for N agents (pipelined
/// batches of one agent may share a commit, which can beat it).
fn measure_raw(
    scenario: &Scenario,
    batches_per_txn: usize,
    durability: DurabilityArg,
    dir: &Path,
) -> BenchResult<Measurement> {
    let data = tempfile::Builder::new()
        .prefix("capsync-bench-raw")
        .tempdir_in(dir)?;
    let mut raw = RawLedger::open(&data.path().join("raw.db"), durability, scenario.agents)?;
    let workload = Workload::new();
    let per_txn = batches_per_txn as u64;

    let warmup = (scenario.warmup_batches() * scenario.agents as u64).div_ceil(per_txn);
    for _ in 0..warmup {
        raw.write_next_txn(batches_per_txn, scenario.batch, &workload)?;
    }

    let (limit, deadline) = match scenario.budget {
        Budget::Batches(n) => ((n * scenario.agents as u64).div_ceil(per_txn), None),
        Budget::Time(d) => (u64::MAX, Some(Instant::now() + d)),
    };
    let mut latencies = Vec::new();
    let cpu_before = ThreadCpu::sample();
    let started = Instant::now();
    while (latencies.len() as u64) < limit && deadline.is_none_or(|d| Instant::now() < d) {
        latencies.push(raw.write_next_txn(batches_per_txn, scenario.batch, &workload)?);
    }
    let elapsed = started.elapsed();
    let cpu = ThreadCpu::since(cpu_before);
    let batches = latencies.len() as u64 * per_txn;
    let ops = batches * scenario.batch as u64;
    Ok(Measurement::new(ops, batches, elapsed, latencies, cpu))
}

/// A bare ledger database and where each share's next op goes.
struct RawLedger {
    conn: rusqlite::Connection,
    /// Per share: the cursor and the next op sequence number.
    shares: Vec<(u64, u64)>,
    /// The share whose turn it is.
    turn: usize,
}

/// One batch for one share, ready to write.
struct RawBatch {
    share: String,
    message: String,
    batch_id: String,
    /// The share's cursor before this batch.
    cursor: u64,
    /// (op id, part id, payload) per op.
    ops: Vec<(String, String, String)>,
}

impl RawLedger {
    /// Opens with the server's pragmas and seeds one share with one message per agent.
    fn open(path: &Path, durability: DurabilityArg, shares: usize) -> BenchResult<Self> {
        let conn = rusqlite::Connection::open(path)?;
        // Same settings as the server's write connection (schema.rs).
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        let synchronous = match durability {
            DurabilityArg::Full => "FULL",
            DurabilityArg::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", synchronous)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(RAW_SCHEMA)?;
        for agent in 0..shares {
            conn.execute(
                "INSERT INTO shares (id, session_id, updated_at) VALUES (?1, ?2, 0)",
                params![share_name(agent), session_id(agent)],
            )?;
            conn.execute(
                "INSERT INTO messages (share_id, id, terminal, json) VALUES (?1, ?2, 0, '{}')",
                params![share_name(agent), message_id(agent)],
            )?;
        }
        Ok(Self {
            conn,
            shares: vec![(0, 0); shares],
            turn: 0,
        })
    }

    /// Writes the next `batches` batches in one transaction; returns the transaction's time.
    fn write_next_txn(
        &mut self,
        batches: usize,
        size: usize,
        workload: &Workload,
    ) -> BenchResult<Duration> {
        // Payloads are built before the clock starts: the server gets them ready-made.
        let planned: Vec<RawBatch> = (0..batches)
            .map(|_| self.next_batch(size, workload))
            .collect();
        let started = Instant::now();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = capsync_shared::now_millis();
        for batch in &planned {
            write_batch(&tx, batch, now)?;
        }
        tx.commit()?;
        Ok(started.elapsed())
    }

    /// The next batch of the share whose turn it is.
    fn next_batch(&mut self, size: usize, workload: &Workload) -> RawBatch {
        let agent = self.turn;
        self.turn = (self.turn + 1) % self.shares.len();
        let (cursor, seq) = self.shares[agent];
        self.shares[agent] = (cursor + size as u64, seq + size as u64);
        RawBatch {
            share: share_name(agent),
            message: message_id(agent),
            batch_id: format!("b-{agent}-{seq}"),
            cursor,
            ops: (seq..seq + size as u64)
                .map(|s| {
                    let payload = workload.payload_text(agent, s);
                    (op_id(agent, s), part_id(agent, s), payload)
                })
                .collect(),
        }
    }
}

/// What the server writes for an applied batch: per op a ledger row and a part
/// upsert, then the share's cursor.
fn write_batch(tx: &rusqlite::Transaction<'_>, batch: &RawBatch, now: i64) -> rusqlite::Result<()> {
    let mut ledger = tx.prepare_cached(
        "INSERT OR IGNORE INTO ops
         (share_id, cursor, op_id, kind, payload, token_id, batch_id, applied_at)
         VALUES (?1, ?2, ?3, 'part.upsert', ?4, 'tok_bench', ?5, ?6)",
    )?;
    let mut part = tx.prepare_cached(
        "INSERT INTO parts (share_id, id, message_id, json) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (share_id, id) DO UPDATE
         SET message_id = excluded.message_id, json = excluded.json",
    )?;
    let mut cursor = batch.cursor as i64;
    for (op, part_id, payload) in &batch.ops {
        cursor += 1;
        ledger.execute(params![
            batch.share,
            cursor,
            op,
            payload,
            batch.batch_id,
            now
        ])?;
        part.execute(params![batch.share, part_id, batch.message, payload])?;
    }
    tx.prepare_cached("UPDATE shares SET cursor = ?2, updated_at = ?3 WHERE id = ?1")?
        .execute(params![batch.share, cursor, now])?;
    Ok(())
}

fn share_name(agent: usize) -> String {
    format!("sh_bench_{agent:03}")
}

// ---------------------------------------------------------------------------------------
// Where the CPU goes
// ---------------------------------------------------------------------------------------

/// CPU time (user + system) per kind of thread over a measured window.
#[derive(Clone, Copy, Debug, Default)]
struct CpuSplit {
    /// The main thread: the client's `LocalSet`, or the raw limit's writes.
    client: Duration,
    /// The server's RPC thread (`capsync-server-…`): capnp, validation, acks.
    rpc: Duration,
    /// The ledger's writer thread: SQLite, and waiting for nothing else.
    writer: Duration,
    /// Everything else (blocking pools for reads and argon2).
    other: Duration,
}

impl CpuSplit {
    fn plus(&self, other: &Self) -> Self {
        Self {
            client: self.client + other.client,
            rpc: self.rpc + other.rpc,
            writer: self.writer + other.writer,
            other: self.other + other.other,
        }
    }

    fn total(&self) -> Duration {
        self.client + self.rpc + self.writer + self.other
    }
}

/// Per-thread CPU counters of this process (Linux only; elsewhere the split is simply
/// not printed).
struct ThreadCpu(ThreadTicks);

impl ThreadCpu {
    fn sample() -> Option<Self> {
        ThreadTicks::sample().map(Self)
    }

    /// CPU used per kind of thread since `before`.
    fn since(before: Option<Self>) -> Option<CpuSplit> {
        let (before, after) = (before?, Self::sample()?);
        let times = after.0.since(&before.0);
        Some(CpuSplit {
            client: times.client,
            rpc: times.server,
            writer: times.writer,
            other: times.other,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------

fn print_header(args: &Args, dir: &Path) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = cpu_model().unwrap_or_else(|| "unknown CPU".into());
    let fs = filesystem_of(dir).unwrap_or_else(|| "unknown".into());
    println!("capsync appendOps benchmark");
    println!("  machine:    {cores} cores, {cpu}");
    println!("  databases:  {} (filesystem: {fs})", dir.display());
    println!(
        "  durability: {:?} (server and raw), payload {PAYLOAD_BYTES} bytes, {} repetition(s)",
        args.durability, args.repeat
    );
    println!(
        "  agents:     {} batch(es) in flight each, in order on their capability (--in-flight)",
        args.in_flight
    );
    if fs == "tmpfs" || fs == "ramfs" {
        println!(
            "  WARNING: {fs} does not sync to disk; durable numbers are meaningless here (use --dir)"
        );
    }
    println!();
}

fn print_run(scenario: &Scenario, rep: u32, repeat: u32, run: &Run) {
    println!(
        "{:>6} rep {rep}/{repeat}: raw {:>9} ops/s (txn p50 {:.2} ms, p99 {:.2} ms) | server {:>9} ops/s, {:>8} calls/s, p50 {:.2} ms, p99 {:.2} ms | ratio {:.2}",
        scenario.name,
        thousands(run.raw.ops_per_sec()),
        ms(run.raw.p50),
        ms(run.raw.p99),
        thousands(run.server.ops_per_sec()),
        thousands(run.server.batches_per_sec()),
        ms(run.server.p50),
        ms(run.server.p99),
        run.ratio(),
    );
    let indent = " ".repeat(18);
    if let (Some(ceiling), Some(multiple)) = (&run.ceiling, run.ceiling_ratio()) {
        println!(
            "{indent}ceiling (raw, {} batches per commit): {} ops/s = {multiple:.2} x raw",
            scenario.agents,
            thousands(ceiling.ops_per_sec()),
        );
    }
    if let Some(two) = &run.two_nodes {
        println!(
            "{indent}two nodes: {} ops/s, p50 {:.2} ms, p99 {:.2} ms = {:.2} x one node",
            thousands(two.ops_per_sec()),
            ms(two.p50),
            ms(two.p99),
            two.ops_per_sec() / run.server.ops_per_sec(),
        );
    }
    if let Some(cpu) = run.server.cpu {
        println!(
            "{indent}{}",
            cpu_line("server run", &cpu, run.server.elapsed)
        );
    }
    if let Some(cpu) = run.raw.cpu {
        println!("{indent}{}", cpu_line("raw run", &cpu, run.raw.elapsed));
    }
}

/// CPU per thread kind in cores (CPU seconds / wall seconds), e.g. `client 0.45`.
fn cpu_line(what: &str, cpu: &CpuSplit, wall: Duration) -> String {
    let cores = |d: Duration| d.as_secs_f64() / wall.as_secs_f64();
    format!(
        "{what} cpu (cores): client {:.2}, server rpc {:.2}, writer {:.2}, other {:.2} = {:.2}",
        cores(cpu.client),
        cores(cpu.rpc),
        cores(cpu.writer),
        cores(cpu.other),
        cores(cpu.total()),
    )
}

/// A Markdown table, ready to paste into docs/BENCHMARKS.md.
fn print_summary(results: &[(Scenario, Vec<Run>)]) {
    println!();
    println!(
        "Summary (per scenario, the repetition with the median ratio; ratio range over all repetitions):"
    );
    println!();
    println!(
        "| scenario | agents | batch | ops | server ops/s | calls/s | p50 ms | p99 ms | raw ops/s (same batch) | server / raw | range | ceiling / raw |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (scenario, runs) in results {
        let median = median_run(runs);
        let (lo, hi) = ratio_range(runs);
        let ceiling = median
            .ceiling_ratio()
            .map_or_else(|| "—".to_owned(), |r| format!("{r:.2}"));
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {} | {:.2} | {lo:.2}–{hi:.2} | {ceiling} |",
            scenario.name,
            scenario.agents,
            scenario.batch,
            median.server.ops,
            thousands(median.server.ops_per_sec()),
            thousands(median.server.batches_per_sec()),
            ms(median.server.p50),
            ms(median.server.p99),
            thousands(median.raw.ops_per_sec()),
            median.ratio(),
        );
    }
}

/// PostgreSQL: one node against two on the same database, for the median repetition.
fn print_nodes_summary(results: &[(Scenario, Vec<Run>)]) {
    println!();
    println!("One node and two nodes on one PostgreSQL (the repetition with the median ratio):");
    println!();
    println!("| scenario | one node ops/s | p99 ms | two nodes ops/s | p99 ms | two / one |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (scenario, runs) in results {
        let median = median_run(runs);
        let Some(two) = &median.two_nodes else {
            continue;
        };
        println!(
            "| {} | {} | {:.2} | {} | {:.2} | {:.2} |",
            scenario.name,
            thousands(median.server.ops_per_sec()),
            ms(median.server.p99),
            thousands(two.ops_per_sec()),
            ms(two.p99),
            two.ops_per_sec() / median.server.ops_per_sec(),
        );
    }
}

fn print_verdicts(results: &[(Scenario, Vec<Run>)], targets: &[Target]) {
    println!();
    println!("Targets (median ratio):");
    for target in targets {
        let found = results
            .iter()
            .find(|(s, _)| s.agents == target.agents && s.batch == target.batch);
        let Some((_, runs)) = found else {
            println!("  ----  {}: not run", target.claim);
            continue;
        };
        let median = median_run(runs);
        let ratio = if target.of_ceiling {
            let Some(ceiling) = median.ceiling_ratio() else {
                println!("  ----  {}: no ceiling measured", target.claim);
                continue;
            };
            median.ratio() / ceiling
        } else {
            median.ratio()
        };
        let verdict = if ratio >= target.min_ratio {
            "PASS"
        } else {
            "FAIL"
        };
        println!("  {verdict}  {}: measured {ratio:.2}", target.claim);
        if let Some(ceiling) = median.ceiling_ratio()
            && !target.of_ceiling
        {
            let reach = if ceiling < target.min_ratio {
                "below the target: no group commit of one batch per agent can meet it here"
            } else {
                "the target is within reach of a perfect group commit"
            };
            println!(
                "        ceiling here (raw, {} batches per commit) is {ceiling:.2} x raw: {reach}",
                target.agents
            );
        }
    }
}

fn median_run(runs: &[Run]) -> &Run {
    let mut sorted: Vec<&Run> = runs.iter().collect();
    sorted.sort_by(|a, b| a.ratio().total_cmp(&b.ratio()));
    sorted[(sorted.len() - 1) / 2]
}

fn ratio_range(runs: &[Run]) -> (f64, f64) {
    runs.iter()
        .map(Run::ratio)
        .fold((f64::MAX, f64::MIN), |(lo, hi), r| (lo.min(r), hi.max(r)))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `12345.6` → `"12,346"`.
fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, model)| model.trim().to_owned())
}

/// The filesystem type `path` lives on (Linux only): the longest matching mount point.
fn filesystem_of(path: &Path) -> Option<String> {
    let path = path.canonicalize().ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_device, point, kind) = (fields.next()?, fields.next()?, fields.next()?);
            path.starts_with(point)
                .then(|| (point.len(), kind.to_owned()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, kind)| kind)
}

// ---------------------------------------------------------------------------------------

/// Server logs go to stderr when `RUST_LOG` is set, e.g. `RUST_LOG=capsync_server=debug`
/// shows `ledger writer stopped transactions=… commands=…` after each server run:
/// commands / transactions is the mean group-commit size (setup and warm-up included).
fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
}

fn main() -> BenchResult<()> {
    let args = Args::parse();
    init_logging();
    let mut scenarios = selected_scenarios(&args)?;
    for scenario in &mut scenarios {
        scenario.in_flight = args.in_flight;
    }
    let dir = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    if let Some(url) = &args.database {
        return run_on_postgres(&args, url, scenarios);
    }
    print_header(&args, &dir);

    let mut results = Vec::new();
    for scenario in scenarios {
        let mut runs = Vec::new();
        for rep in 1..=args.repeat {
            // Half the raw ops before the server and half after, each on a fresh
            // database: on a shared, noisy machine the limit then sees the same
            // stretch of noise as the server it is compared with.
            let half = scenario.halved();
            let before = measure_raw(&half, 1, args.durability, &dir)?;
            let server = measure_server(&scenario, args.durability, &dir)?;
            let after = measure_raw(&half, 1, args.durability, &dir)?;
            let ceiling = (scenario.agents > 1)
                .then(|| measure_raw(&half, scenario.agents, args.durability, &dir))
                .transpose()?;
            let run = Run {
                raw: before.combine(&after),
                ceiling,
                server,
                two_nodes: None,
            };
            print_run(&scenario, rep, args.repeat, &run);
            runs.push(run);
        }
        results.push((scenario, runs));
    }
    print_summary(&results);
    print_verdicts(&results, &TARGETS);
    Ok(())
}

/// The scenarios on PostgreSQL: per repetition, half the raw limit, the server on one
/// node, the server on two nodes, the other half of the raw limit.
fn run_on_postgres(args: &Args, url: &str, scenarios: Vec<Scenario>) -> BenchResult<()> {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("capsync appendOps benchmark on PostgreSQL");
    println!(
        "  machine:    {cores} cores, {}",
        cpu_model().unwrap_or_default()
    );
    println!("  postgres:   {}", postgres_limit::settings(url)?);
    println!(
        "  payload {PAYLOAD_BYTES} bytes, {} repetition(s); the raw limit is N clients at once; \
         {} connections per node",
        args.repeat, args.database_connections
    );
    println!();
    let mut results = Vec::new();
    for scenario in scenarios {
        let mut runs = Vec::new();
        for rep in 1..=args.repeat {
            let half = scenario.halved();
            let before = postgres_limit::measure_raw(&half, url)?;
            let connections = args.database_connections;
            let server = postgres_limit::measure_server(&scenario, url, 1, connections)?;
            let two_nodes = postgres_limit::measure_server(&scenario, url, 2, connections)?;
            let after = postgres_limit::measure_raw(&half, url)?;
            let run = Run {
                raw: before.combine(&after),
                ceiling: None,
                server,
                two_nodes: Some(two_nodes),
            };
            print_run(&scenario, rep, args.repeat, &run);
            runs.push(run);
        }
        results.push((scenario, runs));
    }
    print_summary(&results);
    print_nodes_summary(&results);
    print_verdicts(&results, &POSTGRES_TARGETS);
    Ok(())
}
