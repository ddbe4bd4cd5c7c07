//! What one stalled subscriber (its `OpListener.ops` never returns) costs a writer:
//! pairs of runs alone and with it, each shorter than the subscriber timeout so it
//! stays stalled, its window full, for the whole run.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use capsync_shared::capsync_capnp::{op_listener, subscribe_result, subscription};
use capsync_tests::client::{self, ViewerClient};

use crate::cpu::{CpuSplit, ThreadCpu};
use crate::report::{Pairs, TARGET_RATIO, Verdict, order, thousands};
use crate::writer::{BenchWriter, create_shares};
use crate::{Args, Bench, BenchResult, WARMUP_BATCHES};

struct Run {
    ops: u64,
    elapsed: Duration,
    /// With a stalled subscriber: the `ops` calls it holds unanswered at the end.
    stalled_calls: Option<usize>,
    cpu: Option<CpuSplit>,
}

impl Run {
    fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
}

pub async fn run(bench: &Bench, args: &Args) -> BenchResult<Vec<Verdict>> {
    println!(
        "stalled: 1 writer (batch {}, {} batches a run) on a fresh share per run, alone and with 1 stalled subscriber",
        args.batch, args.throughput_batches
    );
    let mut pairs = Pairs::default();
    let mut index = 0;
    for rep in 1..=args.repeat {
        let mut pair = [0.0; 2];
        for with_stalled in order(rep) {
            index += 1;
            let run = run_once(bench, args, index, with_stalled).await?;
            if run.elapsed >= bench.subscriber_timeout {
                println!(
                    "  note: this run took {:.1}s, longer than the subscriber timeout; lower --throughput-batches",
                    run.elapsed.as_secs_f64()
                );
            }
            println!(
                "  rep {rep}/{}: {:<22} {:>8} ops/s{}",
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
            if let Some(cpu) = run.cpu {
                println!("      {}", cpu.line(run.elapsed));
            }
            pair[usize::from(with_stalled)] = run.ops_per_sec();
        }
        pairs.push(pair[0], pair[1]);
    }
    let ratio = pairs.median_ratio();
    let verdict = Verdict::new(
        format!("stalled: writer with 1 stalled subscriber >= {TARGET_RATIO} x alone"),
        format!("median ratio {ratio:.2} (pairs {})", pairs.ratio_list()),
        ratio >= TARGET_RATIO,
    );
    println!(
        "  writer throughput, median of {}: alone {} ops/s, with 1 stalled subscriber {} ops/s",
        args.repeat,
        thousands(pairs.median_alone()),
        thousands(pairs.median_with())
    );
    println!(
        "  ratio stalled / alone, median of the pairs ({}): {ratio:.2} (target >= {TARGET_RATIO}): {}",
        pairs.ratio_list(),
        verdict.word()
    );
    println!();
    Ok(vec![verdict])
}

async fn run_once(
    bench: &Bench,
    args: &Args,
    index: usize,
    with_stalled: bool,
) -> BenchResult<Run> {
    let addr = bench.endpoints.rpc;
    let share = create_shares(addr, &bench.agent_token, index..index + 1, 1)
        .await?
        .remove(0);
    let mut writer = BenchWriter::open(addr, share, bench.workload.clone()).await?;
    let stalled = if with_stalled {
        let conn = client::connect(addr).await?;
        let viewer = conn
            .redeem(&writer.share.viewer_token)
            .await?
            .into_viewer()?;
        let (handle, calls) = stall(&viewer).await?;
        Some((conn, handle, calls))
    } else {
        None
    };
    writer.push(args.batch, WARMUP_BATCHES).await?;
    let cpu_before = ThreadCpu::sample();
    let started = Instant::now();
    writer.push(args.batch, args.throughput_batches).await?;
    let elapsed = started.elapsed();
    let cpu = ThreadCpu::since(cpu_before.as_ref());
    let stalled_calls = stalled.as_ref().map(|(_, _, calls)| *calls.borrow());
    if let Some((conn, handle, _)) = stalled {
        drop(handle);
        conn.disconnect().await?;
    }
    writer.disconnect().await?;
    Ok(Run {
        ops: args.throughput_batches * args.batch as u64,
        elapsed,
        stalled_calls,
        cpu,
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
