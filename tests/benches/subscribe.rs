//! Live subscriptions: delivery latency to many subscribers, and what a stalled
//! subscriber costs the writer.
//!
//! One real server (`capsync_server::spawn` on `127.0.0.1:0`, a fresh data directory,
//! durability FULL, default subscriber window and timeout) and, in this process on one
//! `LocalSet`, the clients:
//!
//! - **latency**: 1 writer appending batches of B ops (one call in flight, as an agent
//!   does) to one share, and S subscribers (`ShareViewer.subscribe` through
//!   [`ViewerClient::subscribe`]), each on its own connection. For every op and every
//!   subscriber, the time from the writer receiving the batch's ack to the subscriber's
//!   `LiveOps::next` yielding the op. Both ends are in this process, so one clock. The
//!   ack is the writer's view of "committed"; a subscriber can see an op before the
//!   writer's ack arrives (both leave the server after the commit), which counts as 0
//!   and is reported separately.
//! - **throughput**: the same writer on a fresh share, alone, then with one stalled
//!   subscriber (an `OpListener` whose `ops` never returns), back to back (in turns
//!   first and second), `--repeat` times. Each pair's ratio compares two runs that saw the same stretch of a noisy
//!   machine; the median of those ratios is the cost of a stalled subscriber (target: at
//!   least 0.9). Each run is shorter than the subscriber timeout, so the stalled
//!   subscriber stays stalled (its window full) for the whole run.
//!
//! Ops are `part.upsert`s with a 300-byte payload, as in the append benchmark.
//!
//! ```text
//! cargo bench -p capsync-tests --bench subscribe
//! cargo bench -p capsync-tests --bench subscribe -- --subscribers 20 --batch 1 --batches 3000
//! ```
//!
//! Results and how to read them: `docs/BENCHMARKS.md`.

use std::cell::RefCell;
use std::error::Error;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use capsync_server::Config;
use capsync_shared::capsync_capnp::{op_listener, subscribe_result, subscription};
use capsync_tests::client::{
    self, Batch, Connection, LiveEvent, NewShare, OpKind, OpSpec, ViewerClient, WriterClient,
};
use capsync_tests::{run_local, session_ops};
use clap::Parser;
use serde_json::json;

type BenchResult<T> = Result<T, Box<dyn Error>>;

/// Size of each op's JSON payload, as in the append benchmark.
const PAYLOAD_BYTES: usize = 300;
/// Batches sent before anything is timed.
const WARMUP_BATCHES: u64 = 50;
/// The throughput target: the writer with one stalled subscriber, against none.
const TARGET_RATIO: f64 = 0.9;

#[derive(Debug, Parser)]
#[command(
    about = "Live subscriptions: delivery latency and stalled-subscriber cost (see docs/BENCHMARKS.md)"
)]
struct Args {
    /// Subscribers of the latency run, each on its own connection.
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// Ops per appendOps call.
    #[arg(long, default_value_t = 10)]
    batch: usize,
    /// Batches the latency run measures.
    #[arg(long, default_value_t = 1000)]
    batches: u64,
    /// Batches each throughput run measures (keep a run shorter than the subscriber
    /// timeout, 10s, or the stalled subscriber is dropped part-way).
    #[arg(long, default_value_t = 1000)]
    throughput_batches: u64,
    /// Throughput runs of each kind (alone, with a stalled subscriber), alternating.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    /// Where the server's data goes (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Passed by `cargo bench` to every bench binary; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> BenchResult<()> {
    let args = Args::parse();
    if args.batch == 0 || args.batches == 0 || args.throughput_batches == 0 {
        return Err("--batch, --batches and --throughput-batches must be at least 1".into());
    }
    let dir = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let data = tempfile::Builder::new()
        .prefix("capsync-bench-subscribe")
        .tempdir_in(&dir)?;
    let config = Config::for_tests(data.path().join("data"));
    let (window, timeout) = (config.subscriber_window, config.subscriber_timeout);
    print_header(&args, &dir, window, timeout);
    let server = capsync_server::spawn(TcpListener::bind("127.0.0.1:0")?, config.clone())?;
    let admin_token = std::fs::read_to_string(config.admin_token_path())?;
    let result = run_local(run(server.addr(), admin_token.trim(), &args, timeout));
    server.shutdown()?;
    result
}

async fn run(
    addr: SocketAddr,
    admin_token: &str,
    args: &Args,
    timeout: Duration,
) -> BenchResult<()> {
    let agent_token = {
        let conn = client::connect(addr).await?;
        let admin = conn.redeem(admin_token).await?.into_admin()?;
        let minted = admin.mint_agent("bench agent", None).await?;
        conn.disconnect().await?;
        minted.token
    };
    let workload = Workload::new();

    let latency = latency_run(addr, &agent_token, args, &workload).await?;
    latency.print(args);

    let mut alone = Vec::new();
    let mut stalled = Vec::new();
    let mut ratios = Vec::new();
    let mut share = 0;
    for rep in 1..=args.repeat {
        // Which goes first alternates, so neither always writes into the bigger database.
        let order = if rep % 2 == 1 {
            [false, true]
        } else {
            [true, false]
        };
        let mut pair = [0.0; 2];
        for with_stalled in order {
            share += 1;
            let run =
                throughput_run(addr, &agent_token, args, &workload, share, with_stalled).await?;
            if run.elapsed >= timeout {
                println!(
                    "  note: this run took {:.1}s, longer than the subscriber timeout; lower --throughput-batches",
                    run.elapsed.as_secs_f64()
                );
            }
            println!(
                "  throughput rep {rep}/{}: {:<22} {:>8} ops/s{}",
                args.repeat,
                if with_stalled {
                    "1 stalled subscriber"
                } else {
                    "no subscriber"
                },
                thousands(run.ops_per_sec()),
                run.stalled_calls
                    .map(|calls| format!(
                        " (the stalled subscriber holds {calls} unanswered calls)"
                    ))
                    .unwrap_or_default(),
            );
            pair[usize::from(with_stalled)] = run.ops_per_sec();
        }
        alone.push(pair[0]);
        stalled.push(pair[1]);
        ratios.push(pair[1] / pair[0]);
    }
    let pairs: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
    let ratio = median(&mut ratios);
    println!();
    println!(
        "writer throughput, median of {}: alone {} ops/s, with 1 stalled subscriber {} ops/s",
        args.repeat,
        thousands(median(&mut alone)),
        thousands(median(&mut stalled))
    );
    println!(
        "ratio stalled / alone, median of the pairs ({}): {ratio:.2} (target >= {TARGET_RATIO}): {}",
        pairs.join(", "),
        if ratio >= TARGET_RATIO {
            "PASS"
        } else {
            "FAIL"
        }
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Latency: 1 writer, S subscribers
// ---------------------------------------------------------------------------------------

/// What the latency run measured.
struct Latency {
    /// One per (op, subscriber), from the writer's ack to `LiveOps::next`; 0 when the op
    /// reached the subscriber before the ack reached the writer.
    samples: Vec<Duration>,
    /// Deliveries that arrived before the writer's ack.
    before_ack: usize,
    writer_ops_per_sec: f64,
    /// From the first measured ack to the last subscriber receiving the last op.
    span: Duration,
}

impl Latency {
    fn print(&self, args: &Args) {
        let mut sorted = self.samples.clone();
        sorted.sort_unstable();
        println!(
            "latency: 1 writer (batch {}, {} batches), {} subscribers on their own connections",
            args.batch, args.batches, args.subscribers
        );
        println!(
            "  commit (writer's ack) -> subscriber, {} deliveries: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            thousands(sorted.len() as f64),
            ms(percentile(&sorted, 50.0)),
            ms(percentile(&sorted, 90.0)),
            ms(percentile(&sorted, 99.0)),
            ms(sorted.last().copied().unwrap_or_default()),
        );
        println!(
            "  {:.1}% of deliveries reached the subscriber before the ack reached the writer (counted as 0)",
            100.0 * self.before_ack as f64 / sorted.len().max(1) as f64
        );
        println!(
            "  writer meanwhile: {} ops/s; every subscriber had every op {:.2} s after the first ack",
            thousands(self.writer_ops_per_sec),
            self.span.as_secs_f64()
        );
        println!();
    }
}

async fn latency_run(
    addr: SocketAddr,
    agent_token: &str,
    args: &Args,
    workload: &Workload,
) -> BenchResult<Latency> {
    let mut writer = BenchWriter::start(addr, agent_token, 0, workload).await?;
    let start = writer.cursor;
    let measured_from = start + WARMUP_BATCHES * args.batch as u64 + 1;
    let last = start + (WARMUP_BATCHES + args.batches) * args.batch as u64;

    // Every subscriber on its own connection, subscribed before the first batch.
    let mut connections = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..args.subscribers {
        let conn = client::connect(addr).await?;
        let viewer = conn.redeem(&writer.viewer_token).await?.into_viewer()?;
        let mut live = viewer.subscribe(start).await?;
        connections.push(conn);
        // (first cursor, last cursor, when) per page.
        let arrivals = Rc::new(RefCell::new(Vec::new()));
        let record = arrivals.clone();
        let task = tokio::task::spawn_local(async move {
            while let Some(event) = live.next().await {
                match event {
                    LiveEvent::Ops(ops) => {
                        let now = Instant::now();
                        let (first, end) = (ops[0].cursor.0, ops[ops.len() - 1].cursor.0);
                        record.borrow_mut().push((first, end, now));
                        if end >= last {
                            return Ok(());
                        }
                    }
                    LiveEvent::Ended(ended) => {
                        return Err(format!(
                            "a subscriber ended at cursor {}: {} {}",
                            ended.cursor, ended.reason, ended.message
                        ));
                    }
                }
            }
            Err("a subscription ended without a reason".to_owned())
        });
        tasks.push((task, arrivals));
    }

    writer.push(args.batch, WARMUP_BATCHES).await?;
    let started = Instant::now();
    let acks = writer.push(args.batch, args.batches).await?;
    let writer_elapsed = started.elapsed();
    let mut done = Vec::new();
    for (task, arrivals) in tasks {
        tokio::time::timeout(Duration::from_secs(120), task)
            .await??
            .map_err(|e| e.to_string())?;
        done.push(arrivals);
    }
    let span = started.elapsed();

    // The ack time of every measured cursor.
    let mut acked_at = vec![None; (last - measured_from + 1) as usize];
    for (end, at) in &acks {
        let first = end + 1 - args.batch as u64;
        for cursor in first.max(measured_from)..=*end {
            acked_at[(cursor - measured_from) as usize] = Some(*at);
        }
    }
    let mut samples = Vec::with_capacity(acked_at.len() * args.subscribers);
    let mut before_ack = 0;
    for arrivals in done {
        for &(first, end, at) in arrivals.borrow().iter() {
            for cursor in first.max(measured_from)..=end {
                let acked = acked_at[(cursor - measured_from) as usize]
                    .ok_or("a measured cursor has no ack time")?;
                match at.checked_duration_since(acked) {
                    Some(latency) => samples.push(latency),
                    None => {
                        before_ack += 1;
                        samples.push(Duration::ZERO);
                    }
                }
            }
        }
    }
    for conn in connections {
        conn.disconnect().await?;
    }
    writer.conn.disconnect().await?;
    Ok(Latency {
        samples,
        before_ack,
        writer_ops_per_sec: (args.batches * args.batch as u64) as f64
            / writer_elapsed.as_secs_f64(),
        span,
    })
}

// ---------------------------------------------------------------------------------------
// Throughput: alone, and with one stalled subscriber
// ---------------------------------------------------------------------------------------

struct Throughput {
    ops: u64,
    elapsed: Duration,
    /// With a stalled subscriber: the `ops` calls it holds unanswered at the end.
    stalled_calls: Option<usize>,
}

impl Throughput {
    fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
}

async fn throughput_run(
    addr: SocketAddr,
    agent_token: &str,
    args: &Args,
    workload: &Workload,
    index: usize,
    with_stalled: bool,
) -> BenchResult<Throughput> {
    let mut writer = BenchWriter::start(addr, agent_token, index, workload).await?;
    let stalled = if with_stalled {
        let conn = client::connect(addr).await?;
        let viewer = conn.redeem(&writer.viewer_token).await?.into_viewer()?;
        let (handle, calls) = stall(&viewer).await?;
        Some((conn, handle, calls))
    } else {
        None
    };
    writer.push(args.batch, WARMUP_BATCHES).await?;
    let started = Instant::now();
    writer.push(args.batch, args.throughput_batches).await?;
    let elapsed = started.elapsed();
    let stalled_calls = stalled.as_ref().map(|(_, _, calls)| *calls.borrow());
    if let Some((conn, handle, _)) = stalled {
        drop(handle);
        conn.disconnect().await?;
    }
    writer.conn.disconnect().await?;
    Ok(Throughput {
        ops: args.throughput_batches * args.batch as u64,
        elapsed,
        stalled_calls,
    })
}

/// An `OpListener` that never answers `ops`: a viewer that stopped reading.
struct StalledListener {
    calls: Rc<RefCell<usize>>,
}

impl op_listener::Server for StalledListener {
    async fn ops(
        self: Rc<Self>,
        _: op_listener::OpsParams,
        _: op_listener::OpsResults,
    ) -> Result<(), capnp::Error> {
        *self.calls.borrow_mut() += 1;
        std::future::pending().await
    }

    async fn ended(
        self: Rc<Self>,
        _: op_listener::EndedParams,
        _: op_listener::EndedResults,
    ) -> Result<(), capnp::Error> {
        Ok(())
    }
}

/// Subscribes a stalled listener from cursor 0; returns the handle and its call count.
async fn stall(viewer: &ViewerClient) -> BenchResult<(subscription::Client, Rc<RefCell<usize>>)> {
    let calls = Rc::new(RefCell::new(0));
    let listener: op_listener::Client = capnp_rpc::new_client(StalledListener {
        calls: calls.clone(),
    });
    let mut request = viewer.capability().subscribe_request();
    request.get().set_from_cursor(0);
    request.get().set_listener(listener);
    let response = request.send().promise.await?;
    match response.get()?.get_result()?.which()? {
        subscribe_result::Ok(handle) => Ok((handle?, calls)),
        subscribe_result::Failure(f) => {
            Err(format!("subscribe failed: {:?}", f?.get_message()?.to_str()).into())
        }
    }
}

// ---------------------------------------------------------------------------------------
// The writer and its ops
// ---------------------------------------------------------------------------------------

/// One agent's writer on its own share and connection, one batch in flight.
struct BenchWriter<'a> {
    index: usize,
    conn: Connection,
    writer: WriterClient,
    viewer_token: String,
    /// The share's cursor after the last ack.
    cursor: u64,
    next_seq: u64,
    workload: &'a Workload,
}

impl<'a> BenchWriter<'a> {
    async fn start(
        addr: SocketAddr,
        agent_token: &str,
        index: usize,
        workload: &'a Workload,
    ) -> BenchResult<Self> {
        let conn = client::connect(addr).await?;
        let agent = conn.redeem(agent_token).await?.into_agent()?;
        let created = agent
            .create_share(NewShare {
                session_id: session_id(index),
                project_id: "prj_test".into(),
                parent_session_id: None,
                title: format!("subscribe bench {index}"),
                ..NewShare::default()
            })
            .await?;
        let setup = Batch::new(
            format!("setup-{index}"),
            session_ops(&session_id(index), &message_id(index), 0),
        );
        let ack = created.writer.append(&setup).await?;
        Ok(Self {
            index,
            conn,
            writer: created.writer,
            viewer_token: created.viewer_token.token,
            cursor: ack.cursor.0,
            next_seq: 0,
            workload,
        })
    }

    /// Sends `batches` batches of `size`, one after the other; returns (cursor of the
    /// batch's last op, when its ack arrived) per batch.
    async fn push(&mut self, size: usize, batches: u64) -> BenchResult<Vec<(u64, Instant)>> {
        let mut acks = Vec::with_capacity(batches as usize);
        for _ in 0..batches {
            let first = self.next_seq;
            self.next_seq += size as u64;
            let ops = (first..self.next_seq)
                .map(|seq| self.workload.op(self.index, seq))
                .collect();
            let batch = Batch::new(format!("b-{}-{first}", self.index), ops);
            let ack = self.writer.append(&batch).await?;
            let at = Instant::now();
            if ack.applied() != size || ack.cursor.0 != self.cursor + size as u64 {
                return Err(format!("unexpected ack: {ack:?}").into());
            }
            self.cursor = ack.cursor.0;
            acks.push((ack.cursor.0, at));
        }
        Ok(acks)
    }
}

/// Pads every payload to `PAYLOAD_BYTES`.
struct Workload {
    filler: String,
}

impl Workload {
    fn new() -> Self {
        let bare = part_payload(0, 0, "").to_string().len();
        Self {
            filler: "x".repeat(PAYLOAD_BYTES.saturating_sub(bare)),
        }
    }

    fn op(&self, index: usize, seq: u64) -> OpSpec {
        OpSpec::new(
            format!("part:{}", part_id(index, seq)),
            OpKind::PartUpsert,
            part_payload(index, seq, &self.filler),
        )
    }
}

fn session_id(index: usize) -> String {
    format!("ses_sub_{index:03}")
}

fn message_id(index: usize) -> String {
    format!("msg_sub_{index:03}")
}

fn part_id(index: usize, seq: u64) -> String {
    format!("prt_{index:03}_{seq:010}")
}

fn part_payload(index: usize, seq: u64, text: &str) -> serde_json::Value {
    json!({
        "id": part_id(index, seq),
        "messageID": message_id(index),
        "sessionID": session_id(index),
        "type": "text",
        "text": text,
    })
}

// ---------------------------------------------------------------------------------------
// Printing
// ---------------------------------------------------------------------------------------

fn print_header(args: &Args, dir: &std::path::Path, window: usize, timeout: Duration) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into());
    println!("capsync subscription benchmark");
    println!("  machine:     {cores} cores, load average {load} at start");
    println!("  data:        {} (durability FULL)", dir.display());
    println!(
        "  subscribers: window {window} calls, timeout {:?}; payload {PAYLOAD_BYTES} bytes, batch {}",
        timeout, args.batch
    );
    println!();
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// 12345.6 -> "12,346".
fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
