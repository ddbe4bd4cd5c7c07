//! Spread: N shares, each with one agent appending single ops (one call in flight, a
//! connection each), in timed runs without followers and with one follower per share.
//!
//! The same shares and agents serve every run: only the followers come and go, so the
//! runs differ in nothing else, and a thousand shares are set up once. The store grows
//! run by run, so after a first run not counted the runs alternate alone, with
//! followers, alone, …, and each run with followers is compared with the mean of the two
//! runs alone around it.

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};

use crate::cpu::{CpuSplit, ThreadCpu};
use crate::follow::Via;
use crate::follower::Follower;
use crate::report::{Latencies, Pairs, TARGET_RATIO, Verdict, thousands};
use crate::writer::{Ack, AckTimes, BenchWriter, create_shares};
use crate::{Args, Bench, BenchResult, CATCH_UP_LIMIT};

/// Agent connections that create the shares (each then gets its own to write on).
const CREATING_CONNECTIONS: usize = 4;
/// Agents connecting and writing their share's session at once while setting up.
const SETUP_CONCURRENCY: usize = 64;
/// Every run starts with this long not counted: the first calls of a thousand agents
/// (and the followers' first reads) all at once.
const WARMUP: Duration = Duration::from_secs(1);

struct Run {
    ops: u64,
    window: Duration,
    /// Round trips of the calls acked in the window.
    acks: Latencies,
    /// With followers: ack -> arrival for the ops acked in the window.
    deliveries: Option<Latencies>,
    /// How long connecting and subscribing every follower took.
    followers_setup: Option<Duration>,
    cpu: Option<CpuSplit>,
}

impl Run {
    fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.window.as_secs_f64()
    }
}

pub async fn run(bench: &Bench, args: &Args, via: Via) -> BenchResult<Vec<Verdict>> {
    let n = args.shares;
    println!(
        "spread via {}: {n} shares, each with 1 agent (batch 1, one call in flight, own connection); runs of {}s after {}s not counted, alone and with 1 follower per share (own connection)",
        via.name(),
        args.seconds,
        WARMUP.as_secs_f64()
    );
    let setup = Instant::now();
    let addr = bench.endpoints.rpc;
    let shares = create_shares(addr, &bench.agent_token, 0..n, CREATING_CONNECTIONS).await?;
    let mut agents: Vec<BenchWriter> = futures::stream::iter(shares)
        .map(|share| BenchWriter::open(addr, share, bench.workload.clone()))
        .buffered(SETUP_CONCURRENCY)
        .try_collect()
        .await?;
    println!(
        "  set up {n} shares and their agents' connections in {:.1}s",
        setup.elapsed().as_secs_f64()
    );

    // The store grows with every run, so every run is a little slower than the one
    // before (and the first, on a fresh store, much faster). One run is not counted,
    // and each run with followers is set against the mean of the runs alone just before
    // and just after it: a steady drift cancels out.
    let warmup = run_once(bench, args, via, &mut agents, false).await?;
    println!(
        "  warm-up, not counted: alone {:>8} ops/s",
        thousands(warmup.ops_per_sec())
    );
    let mut pairs = Pairs::default();
    let mut acks = [Latencies::default(), Latencies::default()];
    let mut deliveries = Latencies::default();
    let mut report = |rep: u32, mut run: Run, with: bool| {
        let label = if with {
            format!("{n} followers")
        } else {
            "alone".to_owned()
        };
        let mut line = format!(
            "  rep {rep}/{}  {label:<15} {:>8} ops/s  ack {}",
            args.repeat,
            thousands(run.ops_per_sec()),
            run.acks.summary().short()
        );
        if let Some(delivered) = run.deliveries.as_mut() {
            line += &format!(
                "; commit->follower {} ({} deliveries)",
                delivered.summary().short(),
                thousands(delivered.len() as f64)
            );
            deliveries.append(delivered);
        }
        if let Some(took) = run.followers_setup {
            line += &format!("; followers set up in {:.1}s", took.as_secs_f64());
        }
        println!("{line}");
        if let Some(cpu) = run.cpu {
            println!("      {}", cpu.line(run.window));
        }
        acks[usize::from(with)].append(&mut run.acks);
        run.ops_per_sec()
    };
    let first = run_once(bench, args, via, &mut agents, false).await?;
    let mut alone_before = report(0, first, false);
    for rep in 1..=args.repeat {
        let followed = run_once(bench, args, via, &mut agents, true).await?;
        let with = report(rep, followed, true);
        let alone = run_once(bench, args, via, &mut agents, false).await?;
        let alone_after = report(rep, alone, false);
        pairs.push((alone_before + alone_after) / 2.0, with);
        alone_before = alone_after;
    }
    for agent in agents {
        agent.disconnect().await?;
    }

    let ratio = pairs.median_ratio();
    let verdict = Verdict::new(
        format!(
            "spread {}: {n} agents with 1 follower each >= {TARGET_RATIO} x without",
            via.name()
        ),
        format!("median ratio {ratio:.2} (pairs {})", pairs.ratio_list()),
        ratio >= TARGET_RATIO,
    );
    println!(
        "  aggregate throughput, median of {}: alone {} ops/s, with {n} followers {} ops/s",
        args.repeat,
        thousands(pairs.median_alone()),
        thousands(pairs.median_with())
    );
    println!(
        "  ratio with / alone, median of the pairs ({}): {ratio:.2} (target >= {TARGET_RATIO}): {}",
        pairs.ratio_list(),
        verdict.word()
    );
    println!(
        "  agents' acks over all runs: alone {}; with followers {}",
        acks[0].summary().short(),
        acks[1].summary().short()
    );
    println!(
        "  commit (agent's ack) -> follower, {} deliveries over the runs with followers: {}",
        thousands(deliveries.len() as f64),
        deliveries.summary().long()
    );
    println!(
        "  every follower got every op exactly once, in order ({} runs x {n} followers)",
        args.repeat
    );
    println!();
    Ok(vec![verdict])
}

async fn run_once(
    bench: &Bench,
    args: &Args,
    via: Via,
    agents: &mut [BenchWriter],
    with_followers: bool,
) -> BenchResult<Run> {
    let (mut followers, followers_setup) = if with_followers {
        let started = Instant::now();
        let targets = agents.iter().map(|agent| (&agent.share, agent.cursor));
        let followers = Follower::start_all(via, bench.endpoints, targets).await?;
        (followers, Some(started.elapsed()))
    } else {
        (Vec::new(), None)
    };

    let window = Duration::from_secs_f64(args.seconds);
    let from = Instant::now() + WARMUP;
    let until = from + window;
    let cpu = async {
        tokio::time::sleep_until(from.into()).await;
        let before = ThreadCpu::sample();
        tokio::time::sleep_until(until.into()).await;
        ThreadCpu::since(before.as_ref())
    };
    let pushes = futures::future::try_join_all(
        agents
            .iter_mut()
            .map(|agent| agent.push_until(1, u64::MAX, Some(until))),
    );
    let (pushed, cpu) = tokio::join!(pushes, cpu);

    // Only what was acked inside the window counts, for throughput and latency alike.
    let mut round_trips = Latencies::default();
    let mut ops = 0;
    let in_window: Vec<AckTimes> = pushed?
        .iter()
        .map(|acks| {
            let inside: Vec<Ack> = acks
                .iter()
                .filter(|ack| ack.acked >= from && ack.acked < until)
                .copied()
                .collect();
            for ack in &inside {
                ops += ack.last + 1 - ack.first;
                round_trips.push(ack.acked - ack.sent);
            }
            AckTimes::new(&inside)
        })
        .collect();

    let deliveries = if with_followers {
        let mut deliveries = Latencies::default();
        for ((follower, agent), acked) in followers.iter_mut().zip(&*agents).zip(&in_window) {
            follower.caught_up(agent.cursor, CATCH_UP_LIMIT).await?;
            follower.latencies(acked, &mut deliveries);
        }
        Follower::close_all(followers).await?;
        Some(deliveries)
    } else {
        None
    };
    Ok(Run {
        ops,
        window,
        acks: round_trips,
        deliveries,
        followers_setup,
        cpu,
    })
}
