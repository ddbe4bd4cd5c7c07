//! Fan-out: one writer on one share, alone and with S followers of that share, in
//! back-to-back pairs; and how long each commit takes to reach the followers.

use std::time::{Duration, Instant};

use crate::cpu::{CpuSplit, ThreadCpu};
use crate::follow::Via;
use crate::follower::Follower;
use crate::report::{Latencies, Pairs, TARGET_P99, TARGET_RATIO, Verdict, ms, order, thousands};
use crate::writer::{AckTimes, BenchWriter, create_shares};
use crate::{Args, Bench, BenchResult, CATCH_UP_LIMIT, WARMUP_BATCHES};

struct Run {
    ops: u64,
    elapsed: Duration,
    /// Each call's round trip.
    acks: Latencies,
    /// With followers: ack -> arrival, every op of the timed part, every follower.
    deliveries: Option<Latencies>,
    cpu: Option<CpuSplit>,
}

impl Run {
    fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
}

pub async fn run(bench: &Bench, args: &Args, via: Via) -> BenchResult<Vec<Verdict>> {
    let followers = args.subscribers;
    println!(
        "fanout via {}: 1 writer (batch {}, {} batches or {}s a run, after {WARMUP_BATCHES} warm-up) on one share, alone and with {followers} followers (each on its own connection)",
        via.name(),
        args.batch,
        args.batches,
        args.run_seconds
    );
    let addr = bench.endpoints.rpc;
    let share = create_shares(addr, &bench.agent_token, 0..1, 1)
        .await?
        .remove(0);
    let mut writer = BenchWriter::open(addr, share, bench.workload.clone()).await?;
    let mut pairs = Pairs::default();
    let mut deliveries = Latencies::default();
    for rep in 1..=args.repeat {
        let mut pair = [0.0; 2];
        for with in order(rep) {
            let mut run = run_once(bench, args, via, &mut writer, with).await?;
            let label = if with {
                format!("{followers} followers")
            } else {
                "alone".to_owned()
            };
            let mut line = format!(
                "  rep {rep}/{}  {label:<14} {:>8} ops/s ({} ops in {:.1}s)  ack {}",
                args.repeat,
                thousands(run.ops_per_sec()),
                thousands(run.ops as f64),
                run.elapsed.as_secs_f64(),
                run.acks.summary().short()
            );
            if let Some(delivered) = run.deliveries.as_mut() {
                let summary = delivered.summary();
                line += &format!(
                    "; commit->follower {}, max {:.2} ms ({} deliveries)",
                    summary.short(),
                    ms(summary.max),
                    thousands(summary.count as f64)
                );
                deliveries.append(delivered);
            }
            println!("{line}");
            if let Some(cpu) = run.cpu {
                println!("      {}", cpu.line(run.elapsed));
            }
            pair[usize::from(with)] = run.ops_per_sec();
        }
        pairs.push(pair[0], pair[1]);
    }
    writer.disconnect().await?;

    let ratio = pairs.median_ratio();
    let latency = deliveries.summary();
    let name = format!("fanout {}", via.name());
    let verdicts = vec![
        Verdict::new(
            format!("{name}: writer with {followers} followers >= {TARGET_RATIO} x alone"),
            format!("median ratio {ratio:.2} (pairs {})", pairs.ratio_list()),
            ratio >= TARGET_RATIO,
        ),
        Verdict::new(
            format!(
                "{name}: commit->follower p99 <= {} ms with {followers} followers",
                TARGET_P99.as_millis()
            ),
            format!(
                "p99 {:.2} ms (p50 {:.2} ms, max {:.2} ms)",
                ms(latency.p99),
                ms(latency.p50),
                ms(latency.max)
            ),
            latency.p99 <= TARGET_P99,
        ),
    ];
    println!(
        "  writer throughput, median of {}: alone {} ops/s, with {followers} followers {} ops/s",
        args.repeat,
        thousands(pairs.median_alone()),
        thousands(pairs.median_with())
    );
    println!(
        "  ratio with / alone, median of the pairs ({}): {ratio:.2} (target >= {TARGET_RATIO}): {}",
        pairs.ratio_list(),
        verdicts[0].word()
    );
    println!(
        "  commit (writer's ack) -> follower, {} deliveries over the runs with followers: {}",
        thousands(latency.count as f64),
        latency.long()
    );
    println!(
        "  p99 target <= {} ms: {}",
        TARGET_P99.as_millis(),
        verdicts[1].word()
    );
    println!(
        "  every follower got every op exactly once, in order ({} runs x {followers} followers)",
        args.repeat
    );
    println!();
    Ok(verdicts)
}

async fn run_once(
    bench: &Bench,
    args: &Args,
    via: Via,
    writer: &mut BenchWriter,
    with_followers: bool,
) -> BenchResult<Run> {
    let mut followers = if with_followers {
        let from = (&writer.share, writer.cursor);
        Follower::start_all(
            via,
            bench.endpoints,
            std::iter::repeat_n(from, args.subscribers),
        )
        .await?
    } else {
        Vec::new()
    };
    // The warm-up also gets every follower's first wake-up and read out of the way.
    writer.push(args.batch, WARMUP_BATCHES).await?;
    let cpu_before = ThreadCpu::sample();
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.run_seconds);
    let acks = writer
        .push_until(args.batch, args.batches, Some(deadline))
        .await?;
    let elapsed = started.elapsed();
    let cpu = ThreadCpu::since(cpu_before.as_ref());

    let mut round_trips = Latencies::default();
    for ack in &acks {
        round_trips.push(ack.acked - ack.sent);
    }
    let deliveries = if with_followers {
        let acked = AckTimes::new(&acks);
        let mut deliveries = Latencies::default();
        for follower in &mut followers {
            follower.caught_up(writer.cursor, CATCH_UP_LIMIT).await?;
            follower.latencies(&acked, &mut deliveries);
        }
        Follower::close_all(followers).await?;
        Some(deliveries)
    } else {
        None
    };
    Ok(Run {
        ops: acks.iter().map(|ack| ack.last + 1 - ack.first).sum(),
        elapsed,
        acks: round_trips,
        deliveries,
        cpu,
    })
}
