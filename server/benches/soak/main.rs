//! Soak: the real `capsync-server` binary under steady load for a long time,
//! watched from outside every minute: resident memory, open descriptors and
//! latency. A measurement, not a test: it exits 0 whenever it could measure.
//!
//! Two scenarios, each against a fresh server process in a fresh data directory:
//!
//! - **normal**: agents append small batches (new parts, then text deltas to
//!   them; real op ids) to their shares at a steady rate, by default half the
//!   capacity measured first (the same load flat out for `--capacity-seconds`);
//!   viewers follow the shares live, over RPC (`ViewerClient::subscribe`) and
//!   over HTTP (Server-Sent Events), reconnecting now and then; short
//!   connections churn (redeem, one call, disconnect; now and then a new share
//!   link is minted and redeemed). Every ack must apply every op, and every
//!   viewer must see the cursors in order with no gap; at the end each share's
//!   cursor must equal the ops acked and every viewer must reach it.
//! - **hostile**: connections without a token send random bytes, plausible
//!   segment tables with random sizes, truncated frames, and mutated copies of
//!   a real `Gateway.redeem` call with bogus tokens, thousands over the run,
//!   while a viewer with a real token reads the share's state (the probe whose
//!   latency is reported). Nothing they send can write an op or mint a token.
//!
//! Every minute: RSS (and its anonymous part), descriptors, threads, database
//! size, server log lines, latency p50/p99/max (appends; the probe when
//! hostile) and the scenario's counts. At the end, against the targets: RSS
//! growth after warm-up (under 10%); descriptors of the idle server before
//! the load and after its connections closed (no more sockets, pipes or
//! event descriptors); p99 of the last minutes against the first after
//! warm-up (at most 1.5 times, or 2 ms more).
//!
//! ```text
//! cargo bench -p capsync-server --bench soak                          # normal, 30 minutes
//! cargo bench -p capsync-server --bench soak -- --scenario hostile --minutes 15
//! cargo bench -p capsync-server --bench soak -- --scenario both --minutes 5 --rate 2000
//! ```
//!
//! Results and how to read them: `docs/BENCHMARKS.md`.

mod hostile;
mod load;
mod process;
mod report;

use std::cell::Cell;
use std::error::Error;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use futures::future::{join_all, try_join_all};
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;

use load::{Agent, Pace, ShareTokens, ViewerSlot};
use process::{FdKinds, ServerProcess};
use report::{Row, mib, ms, thousands};

pub type BenchResult<T> = Result<T, Box<dyn Error>>;

/// How often `/proc` is read; a minute's row has the fewest and most descriptors of these.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Flat-out load before the capacity is measured, not counted.
const CAPACITY_WARMUP: Duration = Duration::from_secs(2);
/// How long viewers get, once the agents stop, to reach the shares' last cursors.
const CATCH_UP: Duration = Duration::from_secs(60);
/// How long the server gets to close connections its peers closed.
const IDLE_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Parser)]
#[command(
    about = "Soak: the capsync-server process under long steady load (see docs/BENCHMARKS.md)"
)]
struct Args {
    /// Which load to run (each on a fresh server).
    #[arg(long, value_enum, default_value_t = Scenario::Normal)]
    scenario: Scenario,
    /// Minutes of each scenario (after the capacity measurement).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    minutes: u32,
    /// Minutes left out of the growth and p99 comparisons.
    #[arg(long, default_value_t = 3)]
    warmup_minutes: u32,
    /// Ops per second over all agents (default: half the capacity measured first).
    #[arg(long)]
    rate: Option<f64>,
    /// How long to run the load flat out to measure capacity.
    #[arg(long, default_value_t = 10)]
    capacity_seconds: u64,
    /// Agents, each with its own connection and share.
    #[arg(long, default_value_t = 8)]
    agents: usize,
    /// Ops per appendOps call.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Viewers subscribed over RPC (spread over the shares).
    #[arg(long, default_value_t = 8)]
    rpc_viewers: usize,
    /// Viewers following over HTTP Server-Sent Events.
    #[arg(long, default_value_t = 4)]
    sse_viewers: usize,
    /// Short connections started per second (redeem, one call, disconnect).
    #[arg(long, default_value_t = 4.0)]
    churn: f64,
    /// Hostile connections in progress at once.
    #[arg(long, default_value_t = 32)]
    hostile_workers: usize,
    /// The server's `--redeem-failures` (default: the server's own for normal;
    /// 1,000,000 for hostile, so that every bogus redeem costs a token check).
    #[arg(long)]
    redeem_failures: Option<u32>,
    /// The server's `--max-connections-per-address`: all load comes from 127.0.0.1.
    #[arg(long, default_value_t = 1024)]
    max_connections_per_address: usize,
    /// Cheap argon2 on the server (256 KiB, 1 pass) instead of its defaults.
    #[arg(long)]
    cheap_argon2: bool,
    /// More arguments for `capsync-server serve`, e.g. `--server-arg=--argon2-concurrency=1`.
    #[arg(long, allow_hyphen_values = true)]
    server_arg: Vec<String>,
    /// The server binary to run (default: the one this bench was built with),
    /// e.g. an older build to compare with.
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Seed of the random choices (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Where the data directories go (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Passed by `cargo bench` to every bench binary; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Normal,
    Hostile,
    Both,
}

fn main() -> BenchResult<()> {
    let args = Args::parse();
    if args.agents == 0 || args.batch == 0 {
        return Err("--agents and --batch must be at least 1".into());
    }
    if args.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        return Err("--rate must be a positive number".into());
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    });
    let dir = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    print_header(&args, seed);
    if matches!(args.scenario, Scenario::Normal | Scenario::Both) {
        normal(&args, &dir, seed)?;
    }
    if matches!(args.scenario, Scenario::Hostile | Scenario::Both) {
        hostile(&args, &dir, seed)?;
    }
    Ok(())
}

fn print_header(args: &Args, seed: u64) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("capsync soak benchmark");
    println!(
        "  machine: {cores} cores, load average {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let binary = args
        .server_bin
        .as_deref()
        .unwrap_or(std::path::Path::new(process::BIN));
    println!("  server:  {}", binary.display());
    println!(
        "  {} minute(s) per scenario, warm-up {} minute(s), seed {seed}",
        args.minutes, args.warmup_minutes
    );
    println!();
}

/// The server's arguments common to both scenarios.
fn server_args(args: &Args, redeem_failures: Option<u32>) -> Vec<String> {
    let mut out = vec![
        "--max-connections-per-address".to_owned(),
        args.max_connections_per_address.to_string(),
    ];
    if let Some(failures) = redeem_failures {
        out.extend(["--redeem-failures".to_owned(), failures.to_string()]);
    }
    if args.cheap_argon2 {
        out.extend(["--argon2-memory-kib", "256", "--argon2-iterations", "1"].map(str::to_owned));
    }
    out.extend(args.server_arg.iter().cloned());
    out
}

fn start_server(
    args: &Args,
    dir: &std::path::Path,
    server_args: &[String],
) -> BenchResult<(tempfile::TempDir, ServerProcess)> {
    let data = tempfile::Builder::new()
        .prefix("capsync-soak")
        .tempdir_in(dir)?;
    let binary = args
        .server_bin
        .clone()
        .unwrap_or_else(|| PathBuf::from(process::BIN));
    let server = ServerProcess::start(&binary, &data.path().join("data"), server_args)?;
    println!("  serve {}", server_args.join(" "));
    println!(
        "  server pid {}, rpc {}, http {}, data {}",
        server.pid(),
        server.addr,
        server.http,
        server.data_dir.display()
    );
    Ok((data, server))
}

/// Runs `body` on a current-thread runtime inside a `LocalSet`, as the
/// capnp-rpc client requires.
fn run_local<F: std::future::Future>(body: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    tokio::task::LocalSet::new().block_on(&runtime, body)
}

// ---------------------------------------------------------------------------------------
// The minute reporter
// ---------------------------------------------------------------------------------------

/// What a scenario hands the reporter at the end of each minute: the minute's
/// latency samples and its own columns.
type TakeMinute<'a> = Box<dyn FnMut() -> (Vec<Duration>, Vec<(&'static str, String)>) + 'a>;

/// Samples the server every [`SAMPLE_EVERY`] from `start` and prints a row per
/// minute for `minutes` minutes, starting with minute 0 (before the load).
async fn report_minutes(
    server: &ServerProcess,
    start: Instant,
    minutes: u32,
    what: &str,
    mut take: TakeMinute<'_>,
) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut log_before = server.log.get().0;
    let row_now = |minute, fds: (u64, u64), latency, extra, log_lines| {
        let proc = server.sample().unwrap_or_default();
        Row {
            minute,
            proc,
            fds_min: fds.0.min(proc.fds),
            fds_max: fds.1.max(proc.fds),
            db_bytes: server.database_bytes(),
            log_lines,
            latency,
            extra,
        }
    };
    let (latency, extra) = take();
    let zero = row_now(0, (u64::MAX, 0), sorted(latency), extra, 0);
    report::print_header(what, &zero);
    report::print_row(&zero);
    rows.push(zero);
    let per_minute = (60 / SAMPLE_EVERY.as_secs()) as u32;
    for minute in 1..=minutes {
        let mut fds = (u64::MAX, 0);
        for tick in 1..=per_minute {
            let at = start + SAMPLE_EVERY * ((minute - 1) * per_minute + tick);
            sleep_until(at).await;
            if tick < per_minute
                && let Some(sample) = server.sample()
            {
                fds = (fds.0.min(sample.fds), fds.1.max(sample.fds));
            }
        }
        let (latency, extra) = take();
        let log_now = server.log.get().0;
        let row = row_now(minute, fds, sorted(latency), extra, log_now - log_before);
        log_before = log_now;
        report::print_row(&row);
        rows.push(row);
    }
    rows
}

fn sorted(mut samples: Vec<Duration>) -> Vec<Duration> {
    samples.sort_unstable();
    samples
}

/// Waits (at most [`IDLE_WAIT`]) for the server to close the run's
/// connections; its descriptors then.
fn idle_fds(server: &ServerProcess, before: FdKinds) -> report::IdleFds {
    let deadline = std::time::Instant::now() + IDLE_WAIT;
    loop {
        let now = server.fd_kinds();
        let settled = now.sockets + now.other <= before.sockets + before.other;
        if settled || std::time::Instant::now() > deadline {
            return report::IdleFds { before, after: now };
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn print_verdict(
    rows: &[Row],
    warmup: u32,
    what: &str,
    idle: report::IdleFds,
    problems: Option<u64>,
) {
    println!();
    println!("Targets (warm-up: minutes 1-{warmup} left out):");
    let verdict = report::verdict(rows, warmup, what, idle);
    for line in &verdict.lines {
        println!("{line}");
    }
    match problems {
        Some(0) | None => println!("  overall: {}", if verdict.pass { "PASS" } else { "FAIL" }),
        Some(n) => println!(
            "  overall: INVALID: {n} wrong result(s) during the run (see the problems above); the numbers do not describe a working server"
        ),
    }
}

fn print_server_end(server: &mut ServerProcess, scenario: &str) {
    let last = server.sample().unwrap_or_default();
    let (lines, warnings, errors) = server.log.get();
    let samples = process::metrics(server.http, "capsync_");
    let interesting = [
        "capsync_rpc_connections_total",
        "capsync_rpc_connections_ended_total",
        "capsync_connections_refused_total",
        "capsync_redeems_limited_total",
        "capsync_ops_applied_total",
    ];
    println!();
    println!("Server at the end of the {scenario} run:");
    println!(
        "  RSS {:.1} MiB (anon {:.1}, file {:.1}), {} descriptors, {} threads, database {:.1} MiB",
        mib(last.rss),
        mib(last.anon),
        mib(last.file),
        last.fds,
        last.threads,
        mib(server.database_bytes()),
    );
    println!("  log: {lines} lines, {warnings} warnings, {errors} errors");
    for (name, value) in samples
        .iter()
        .filter(|(name, _)| interesting.iter().any(|i| name.starts_with(i)))
    {
        println!("  {name} {value}");
    }
    let clean = server.terminate();
    println!(
        "  SIGTERM: {}",
        if clean {
            "clean exit"
        } else {
            "did not exit cleanly"
        }
    );
}

// ---------------------------------------------------------------------------------------
// Normal
// ---------------------------------------------------------------------------------------

fn normal(args: &Args, dir: &std::path::Path, seed: u64) -> BenchResult<()> {
    println!("== normal: agents appending, viewers following, connections churning ==");
    let (_data, mut server) = start_server(args, dir, &server_args(args, args.redeem_failures))?;
    let before = server.fd_kinds();
    let stats = Rc::new(load::Stats::default());
    // The client runtime ends with it, closing every connection of the run.
    let outcome = run_local(normal_load(args, &server, stats.clone(), seed))?;
    let idle = idle_fds(&server, before);
    print_verdict(
        &outcome.rows,
        args.warmup_minutes,
        "append",
        idle,
        Some(stats.problems()),
    );
    print_server_end(&mut server, "normal");
    Ok(())
}

struct NormalOutcome {
    rows: Vec<Row>,
}

async fn normal_load(
    args: &Args,
    server: &ServerProcess,
    stats: Rc<load::Stats>,
    seed: u64,
) -> BenchResult<NormalOutcome> {
    let agent_token = {
        let conn = capsync_client::connect(server.addr).await?;
        let admin = conn.redeem(&server.admin_token()?).await?.into_admin()?;
        let minted = admin.mint_agent("soak agent", None).await?;
        conn.disconnect().await?;
        minted.token
    };
    let mut agents =
        try_join_all((0..args.agents).map(|i| Agent::start(server.addr, &agent_token, i))).await?;
    let shares: Rc<Vec<ShareTokens>> = Rc::new(agents.iter().map(|a| a.tokens.clone()).collect());
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    let mut slots = Vec::new();
    for i in 0..args.rpc_viewers + args.sse_viewers {
        let share = i % args.agents;
        let slot = Rc::new(ViewerSlot {
            share,
            cursor: Cell::new(0),
        });
        slots.push(slot.clone());
        let (stats, stop, seed) = (stats.clone(), stop.clone(), seed ^ (i as u64 + 1) << 20);
        let task = if i < args.rpc_viewers {
            let token = shares[share].viewer.clone();
            tokio::task::spawn_local(load::rpc_viewer(
                server.addr,
                token,
                slot,
                stats,
                stop,
                seed,
            ))
        } else {
            let tokens = shares[share].clone();
            tokio::task::spawn_local(load::sse_viewer(
                server.http,
                tokens,
                slot,
                stats,
                stop,
                seed,
            ))
        };
        tasks.push(task);
    }
    tasks.push(tokio::task::spawn_local(load::churn(
        server.addr,
        server.http,
        shares.clone(),
        args.churn,
        stats.clone(),
        stop.clone(),
        seed,
    )));
    println!(
        "  load: {} agents x batches of {} ops; {} RPC + {} SSE viewers; {} churning connections/s",
        args.agents, args.batch, args.rpc_viewers, args.sse_viewers, args.churn
    );

    let rate = match args.rate {
        Some(rate) => {
            println!("  rate: {} ops/s (given)", thousands(rate));
            rate
        }
        None => {
            flat_out(&mut agents, args.batch, CAPACITY_WARMUP, &stats).await;
            stats.take_minute();
            let seconds = Duration::from_secs(args.capacity_seconds.max(1));
            flat_out(&mut agents, args.batch, seconds, &stats).await;
            let measured = stats.take_minute();
            let capacity = measured.ops_acked as f64 / seconds.as_secs_f64();
            let mut latencies = measured.append_latencies;
            latencies.sort_unstable();
            println!(
                "  capacity: {} ops/s flat out over {}s (append p50 {:.2} ms, p99 {:.2} ms; {} deliveries to viewers)",
                thousands(capacity),
                seconds.as_secs(),
                ms(report::percentile(&latencies, 50.0)),
                ms(report::percentile(&latencies, 99.0)),
                thousands((measured.rpc_delivered + measured.sse_delivered) as f64),
            );
            println!("  rate: {} ops/s (half of it)", thousands(capacity / 2.0));
            capacity / 2.0
        }
    };
    let period = Duration::from_secs_f64((args.batch * args.agents) as f64 / rate);
    println!(
        "  each agent sends {} ops every {:.2} ms",
        args.batch,
        ms(period)
    );
    println!();

    stats.take_minute();
    let start = Instant::now();
    let until = start + Duration::from_secs(60 * u64::from(args.minutes));
    let take: TakeMinute<'_> = Box::new(|| {
        let m = stats.take_minute();
        let churn = sorted(m.churn_latencies);
        let extra = vec![
            ("ops acked", thousands(m.ops_acked as f64)),
            ("ops/s", thousands(m.ops_acked as f64 / 60.0)),
            (
                "deliveries rpc+sse",
                thousands((m.rpc_delivered + m.sse_delivered) as f64),
            ),
            ("churn ok", m.churn_ok.to_string()),
            (
                "churn p99 ms",
                format!("{:.1}", ms(report::percentile(&churn, 99.0))),
            ),
            ("reconnects", m.viewer_reconnects.to_string()),
            ("problems", stats.problems().to_string()),
        ];
        (m.append_latencies, extra)
    });
    let (rows, _) = tokio::join!(
        report_minutes(server, start, args.minutes, "append", take),
        join_all(
            agents
                .iter_mut()
                .map(|a| a.run(Pace::Every(period), args.batch, until, &stats))
        )
    );

    // Every acked op is in its share, and every viewer gets to the end.
    let mut total_acked = 0;
    for (i, agent) in agents.iter().enumerate() {
        let cursor = agent.server_cursor().await?;
        total_acked += agent.acked;
        if cursor != agent.acked {
            stats.problem(format!(
                "share {i}: cursor {cursor} on the server, {} ops acked",
                agent.acked
            ));
        }
    }
    let caught_up_by = Instant::now() + CATCH_UP;
    let behind = loop {
        let behind: Vec<String> = slots
            .iter()
            .filter(|s| s.cursor.get() < agents[s.share].acked)
            .map(|s| {
                format!(
                    "share {} at {} of {}",
                    s.share,
                    s.cursor.get(),
                    agents[s.share].acked
                )
            })
            .collect();
        if behind.is_empty() || Instant::now() > caught_up_by {
            break behind;
        }
        sleep(Duration::from_millis(200)).await;
    };
    for viewer in &behind {
        stats.problem(format!(
            "a viewer did not catch up within {CATCH_UP:?}: {viewer}"
        ));
    }
    stop.cancel();
    join_all(tasks).await;
    let totals: u64 = rows.iter().map(|r| r.latency.len() as u64).sum();
    println!();
    println!(
        "Checked: {} ops acked over {} shares (cursors match), {} appends timed; {} of {} viewers reached the last cursor; {} wrong result(s)",
        thousands(total_acked as f64),
        agents.len(),
        thousands(totals as f64),
        slots.len() - behind.len(),
        slots.len(),
        stats.problems()
    );
    Ok(NormalOutcome { rows })
}

/// All agents appending as fast as their acks come back, for `how_long`.
async fn flat_out(agents: &mut [Agent], batch: usize, how_long: Duration, stats: &load::Stats) {
    let until = Instant::now() + how_long;
    join_all(
        agents
            .iter_mut()
            .map(|a| a.run(Pace::FlatOut, batch, until, stats)),
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// Hostile
// ---------------------------------------------------------------------------------------

fn hostile(args: &Args, dir: &std::path::Path, seed: u64) -> BenchResult<()> {
    println!("== hostile: connections without a token sending fuzzed frames ==");
    let failures = args.redeem_failures.unwrap_or(1_000_000);
    let (_data, mut server) = start_server(args, dir, &server_args(args, Some(failures)))?;
    let before = server.fd_kinds();
    let stats = Rc::new(hostile::Stats::default());
    let rows = run_local(hostile_load(args, &server, stats.clone(), seed))?;
    let idle = idle_fds(&server, before);
    println!();
    println!(
        "Hostile connections: {} in {} minute(s)",
        thousands(stats.total_connections.get() as f64),
        args.minutes
    );
    print_verdict(&rows, args.warmup_minutes, "probe", idle, None);
    print_server_end(&mut server, "hostile");
    print_written(&server.data_dir.join("capsync.db"));
    Ok(())
}

async fn hostile_load(
    args: &Args,
    server: &ServerProcess,
    stats: Rc<hostile::Stats>,
    seed: u64,
) -> BenchResult<Vec<Row>> {
    // The only writes of the run: an agent, one share with its session, its tokens.
    let conn = capsync_client::connect(server.addr).await?;
    let admin = conn.redeem(&server.admin_token()?).await?.into_admin()?;
    let agent_token = admin.mint_agent("soak agent", None).await?.token;
    let agent = Agent::start(server.addr, &agent_token, 0).await?;
    let viewer = conn.redeem(&agent.tokens.viewer).await?.into_viewer()?;
    let known_id = viewer.token_id().unwrap_or_default().to_owned();
    let template = Rc::new(hostile::record_redeem(server.addr, &known_id).await?);
    println!(
        "  load: {} workers, each one hostile connection after another; a probe reads state every 200 ms",
        args.hostile_workers
    );
    println!();

    let start = Instant::now();
    let until = start + Duration::from_secs(60 * u64::from(args.minutes));
    let workers: Vec<_> = (0..args.hostile_workers)
        .map(|i| {
            tokio::task::spawn_local(hostile::worker(
                server.addr,
                template.clone(),
                stats.clone(),
                until,
                seed ^ (i as u64 + 1) << 32,
            ))
        })
        .collect();
    let probe = tokio::task::spawn_local(hostile::probe(viewer, stats.clone(), until));
    let take: TakeMinute<'_> = Box::new(|| {
        let m = stats.take_minute();
        let extra = vec![
            ("conns", thousands(m.connections as f64)),
            (
                "total conns",
                thousands(stats.total_connections.get() as f64),
            ),
            ("KiB sent", thousands(m.bytes_sent as f64 / 1024.0)),
            ("closed", m.closed.to_string()),
            ("answered", m.answered.to_string()),
            ("denied", m.denied.to_string()),
            ("rate limited", m.rate_limited.to_string()),
            ("silent", m.silent.to_string()),
            ("connect errors", m.connect_errors.to_string()),
            ("probe fails", m.probe_failures.to_string()),
        ];
        (m.probe_latencies, extra)
    });
    let rows = report_minutes(server, start, args.minutes, "probe", take).await;
    join_all(workers).await;
    let _ = probe.await;
    drop(agent);
    conn.disconnect().await?;
    Ok(rows)
}

/// What the database holds after the hostile run: ops and tokens come from
/// the setup only; failed redeems leave audit lines.
fn print_written(database: &std::path::Path) {
    let Ok(db) =
        rusqlite::Connection::open_with_flags(database, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return;
    };
    let count = |table: &str| -> String {
        db.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| {
            r.get::<_, i64>(0)
        })
        .map_or_else(|err| err.to_string(), |n| thousands(n as f64))
    };
    println!(
        "  database after the run: {} ops, {} tokens, {} audit lines",
        count("ops"),
        count("tokens"),
        count("audit")
    );
}
