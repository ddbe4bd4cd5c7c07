//! Lifecycle work against live writers: how long an agent's appends wait while a
//! prune deletes shares in bounded steps and while housekeeping gives the freed
//! pages back in incremental-vacuum steps, against the same appends on a quiet server.
//!
//! One real server (`capsync_server::spawn` on `127.0.0.1:0`, durability FULL,
//! housekeeping every 10 ms with the default 20 ms step budget). Setup: `--shares`
//! shares of `--parts` text parts each, aged 60 days. Then one writer appends
//! batches of 10 ops to its own share (one call in flight) through three phases:
//!
//! - **quiet**: nothing else runs;
//! - **prune**: `Admin.prune` deletes every aged share meanwhile, while
//!   housekeeping's incremental-vacuum steps already give freed pages back;
//! - **vacuum**: the steps that give back whatever pages the prune left free.
//!
//! For each phase: append latency p50, p99 and max, and the ratio of p99 to the
//! quiet p99. The target is that lifecycle work never holds writers for long:
//! the max should stay within a few budgets (20 ms each) plus a commit.
//!
//! ```text
//! cargo bench -p capsync-tests --bench housekeeping
//! cargo bench -p capsync-tests --bench housekeeping -- --shares 40 --parts 1000
//! ```

use std::cell::Cell;
use std::net::TcpListener;
use std::rc::Rc;
use std::time::{Duration, Instant};

use capsync_server::Config;
use capsync_server::clock::Clock;
use capsync_tests::client::{self, Batch, NewShare, PruneOptions, WriterClient};
use capsync_tests::{run_local, session_ops};
use clap::Parser;

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

#[derive(Debug, Parser)]
#[command(about = "Append latency while prune and incremental vacuum run")]
struct Args {
    /// Aged shares the prune deletes.
    #[arg(long, default_value_t = 30)]
    shares: usize,
    /// Text parts in each aged share.
    #[arg(long, default_value_t = 600)]
    parts: usize,
    /// Appends timed in the quiet phase.
    #[arg(long, default_value_t = 300)]
    quiet_batches: usize,
    /// Passed by `cargo bench` to every bench binary; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let args = Args::parse();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = Config::for_tests(dir.path().join("data"));
    config.housekeeping_interval = Duration::from_millis(10);
    // The aged shares are filled with the clock two months back.
    config.clock = Clock::shifted();
    let clock = config.clock.clone();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let server = capsync_server::spawn(listener, config.clone()).expect("server");
    let addr = server.addr();
    let admin_token = std::fs::read_to_string(config.admin_token_path()).expect("admin token");

    run_local(async move {
        let conn = client::connect(addr).await.expect("connect");
        let admin = conn
            .redeem(admin_token.trim())
            .await
            .expect("redeem")
            .into_admin()
            .expect("admin");
        let minted = admin.mint_agent("bench", None).await.expect("mint");
        let agent = conn
            .redeem(&minted.token)
            .await
            .expect("redeem agent")
            .into_agent()
            .expect("agent");
        let new_share = |session: String| NewShare {
            session_id: session,
            project_id: "prj_bench".into(),
            parent_session_id: None,
            title: "bench".into(),
            ..NewShare::default()
        };

        clock.rewind(60 * DAY);
        for i in 0..args.shares {
            let session = format!("ses_old{i}");
            let created = agent
                .create_share(new_share(session.clone()))
                .await
                .expect("share");
            for (chunk, ops) in session_ops(&session, "msg_1", args.parts)
                .chunks(500)
                .enumerate()
            {
                created
                    .writer
                    .append(&Batch::new(format!("fill{chunk}"), ops.to_vec()))
                    .await
                    .expect("fill");
            }
        }
        clock.advance(60 * DAY);
        let live = agent
            .create_share(new_share("ses_live".into()))
            .await
            .expect("live share");
        let writer = live.writer;
        let before = admin.stats().await.expect("stats");
        println!(
            "setup: {} aged shares, {} ops, database {} bytes",
            args.shares, before.ledger_ops, before.db_file_bytes
        );

        let round = Rc::new(Cell::new(0_usize));
        let quiet = appends(&writer, &round, Phase::Count(args.quiet_batches)).await;

        let pruning = Rc::new(Cell::new(true));
        let during_prune = {
            let (writer, round, pruning) = (writer.clone(), round.clone(), pruning.clone());
            tokio::task::spawn_local(async move {
                appends(&writer, &round, Phase::While(pruning)).await
            })
        };
        let started = Instant::now();
        let report = admin
            .prune(&PruneOptions::older_than(30 * DAY), None)
            .await
            .expect("prune");
        let prune_time = started.elapsed();
        pruning.set(false);
        let prune = during_prune.await.expect("appends during prune");
        let freed = admin.stats().await.expect("stats").free_pages;
        println!(
            "prune: {} shares, {} ops, {} bytes in {:.2} s; {} free pages left for housekeeping",
            report.shares.len(),
            report.totals.ops,
            report.totals.bytes,
            prune_time.as_secs_f64(),
            freed
        );

        let vacuuming = Rc::new(Cell::new(true));
        let during_vacuum = {
            let (writer, round, vacuuming) = (writer.clone(), round.clone(), vacuuming.clone());
            tokio::task::spawn_local(async move {
                appends(&writer, &round, Phase::While(vacuuming)).await
            })
        };
        let started = Instant::now();
        loop {
            let stats = admin.stats().await.expect("stats");
            if stats.free_pages == 0 || started.elapsed() > Duration::from_secs(120) {
                println!(
                    "vacuum: {} free pages given back in {:.2} s; database now {} bytes",
                    freed - stats.free_pages,
                    started.elapsed().as_secs_f64(),
                    stats.db_file_bytes
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        vacuuming.set(false);
        let vacuum = during_vacuum.await.expect("appends during vacuum");

        println!();
        println!("phase      appends   p50 ms   p99 ms   max ms   p99/quiet");
        let quiet_p99 = percentile(&quiet, 0.99);
        for (name, samples) in [("quiet", &quiet), ("prune", &prune), ("vacuum", &vacuum)] {
            let p99 = percentile(samples, 0.99);
            println!(
                "{name:<10} {:>7} {:>8.2} {:>8.2} {:>8.2} {:>10.2}",
                samples.len(),
                ms(percentile(samples, 0.5)),
                ms(p99),
                ms(*samples.last().unwrap_or(&Duration::ZERO)),
                ms(p99) / ms(quiet_p99).max(f64::EPSILON)
            );
        }
    });
    server.shutdown().expect("shutdown");
}

/// How long a phase of appends goes on.
enum Phase {
    Count(usize),
    While(Rc<Cell<bool>>),
}

/// Appends batches of 10 ops one at a time; returns their latencies, sorted.
async fn appends(writer: &WriterClient, round: &Cell<usize>, phase: Phase) -> Vec<Duration> {
    let mut samples = Vec::new();
    loop {
        let go_on = match &phase {
            Phase::Count(n) => samples.len() < *n,
            Phase::While(flag) => flag.get(),
        };
        if !go_on {
            break;
        }
        let n = round.get();
        round.set(n + 1);
        let batch = Batch::new(
            format!("b{n}"),
            session_ops("ses_live", &format!("msg_{n}"), 8),
        );
        let started = Instant::now();
        writer.append(&batch).await.expect("append");
        samples.push(started.elapsed());
    }
    samples.sort();
    samples
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
