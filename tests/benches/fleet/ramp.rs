//! The ramp: each step adds agents (and their viewers) to reach its count, lets them
//! all stream, and measures one window; it stops after the first step over the target.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use capsync_tests::client;
use futures::{StreamExt, TryStreamExt};

use crate::agent::{Agent, Shared, Streaming};
use crate::busy::{Busy, Sampler};
use crate::cpu::{self, Usage};
use crate::disk::{DiskSample, DiskUsage};
use crate::follow::Via;
use crate::report::Summary;
use crate::server::{Commits, ServerProcess, rss_bytes};
use crate::stats::{Delivery, Stats};
use crate::summary::{print_idle_memory, print_step};
use crate::viewer::{Target, Viewer};
use crate::{Args, BenchResult};

/// Agents (or viewers) connecting at once while a step is set up.
const SETUP_CONCURRENCY: usize = 32;
/// How long viewers may take to get the last op once the agents stop.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(120);

/// One step's measurements.
#[derive(Debug)]
pub struct Step {
    pub agents: usize,
    pub viewers: usize,
    /// The measured window.
    pub window: Duration,
    /// Ops per second: fallen due, acked; calls per second.
    pub offered: f64,
    pub acked: f64,
    pub calls: f64,
    /// Call sent → ack.
    pub ack: Summary,
    /// Op due → ack.
    pub age: Summary,
    /// Ack → viewer, per op and viewer.
    pub delivery: Summary,
    pub overloaded: u64,
    /// Ops due and not acked at the window's end, and the oldest one's age.
    pub backlog: usize,
    pub oldest: Duration,
    pub commits: Option<Commits>,
    pub server_rss: Option<u64>,
    pub bench_rss: Option<u64>,
    pub cpu: Option<Usage>,
    /// Wall-time business of the single threads.
    pub busy: Option<Busy>,
    pub disk: DiskUsage,
}

/// Idle memory of the first step's connections, before any traffic.
#[derive(Debug)]
pub struct IdleMemory {
    pub agents: usize,
    pub viewers: usize,
    /// RSS of the server and the bench: before, with the agents, with the viewers too.
    pub server: [Option<u64>; 3],
    pub bench: [Option<u64>; 3],
}

/// What the ramp measured.
#[derive(Debug)]
pub struct Ramp {
    pub idle: Option<IdleMemory>,
    pub steps: Vec<Step>,
}

/// Everything streaming so far.
struct Fleet {
    shared: Shared,
    streaming: Vec<Streaming>,
    /// Each viewer with the agent whose share it follows.
    viewers: Vec<(usize, Viewer)>,
}

pub async fn run(args: &Args, server: &ServerProcess) -> BenchResult<Ramp> {
    let agent_token = mint_agent_token(server).await?;
    let mut fleet = Fleet {
        shared: Shared {
            stats: Rc::new(Stats::default()),
            stop: Rc::new(Cell::new(false)),
        },
        streaming: Vec::new(),
        viewers: Vec::new(),
    };
    let mut steps = Vec::new();
    let mut first_idle = None;
    for (number, &count) in args.steps.iter().enumerate() {
        let setup = Instant::now();
        let idle = grow(args, server, &agent_token, &mut fleet, count, number == 0).await?;
        if let Some(idle) = idle {
            print_idle_memory(&idle);
            first_idle = Some(idle);
        }
        println!(
            "step {}/{}: {count} agents, {} viewers; set up in {:.1}s",
            number + 1,
            args.steps.len(),
            fleet.viewers.len(),
            setup.elapsed().as_secs_f64()
        );
        let step = measure(args, server, &fleet).await;
        print_step(&step);
        fleet.check().await?;
        let over = step.ack.p99 > args.stop_p99;
        steps.push(step);
        if over {
            println!("  ack p99 is over {:?}: the ramp stops here", args.stop_p99);
            break;
        }
    }
    fleet.finish().await?;
    Ok(Ramp {
        idle: first_idle,
        steps,
    })
}

async fn mint_agent_token(server: &ServerProcess) -> BenchResult<String> {
    let conn = client::connect(server.endpoints.rpc).await?;
    let admin = conn.redeem(&server.admin_token).await?.into_admin()?;
    let minted = admin.mint_agent("fleet bench agent", None).await?;
    conn.disconnect().await?;
    Ok(minted.token)
}

/// Adds agents up to `count` with their viewers, and starts them streaming. With
/// `idle`, measures what their connections cost in memory before they stream.
async fn grow(
    args: &Args,
    server: &ServerProcess,
    agent_token: &str,
    fleet: &mut Fleet,
    count: usize,
    idle: bool,
) -> BenchResult<Option<IdleMemory>> {
    let rss = || (rss_bytes(server.pid), rss_bytes(std::process::id()));
    let before = rss();
    let first = fleet.streaming.len();
    let agents: Vec<Agent> = futures::stream::iter(first..count)
        .map(|index| {
            Agent::open(
                server.endpoints.rpc,
                agent_token,
                index,
                args.seed.wrapping_mul(1_000_003) ^ index as u64,
                args.message_every(),
            )
        })
        .buffered(SETUP_CONCURRENCY)
        .try_collect()
        .await?;
    let with_agents = rss();
    let deliveries: Vec<Option<Rc<RefCell<Delivery>>>> = agents
        .iter()
        .map(|agent| {
            args.has_viewer(agent.index)
                .then(|| Rc::new(RefCell::new(Delivery::default())))
        })
        .collect();
    let targets: Vec<(usize, Target, Rc<RefCell<Delivery>>, Via)> = agents
        .iter()
        .zip(&deliveries)
        .filter_map(|(agent, delivery)| Some((agent, delivery.clone()?)))
        .enumerate()
        .map(|(n, (agent, delivery))| {
            let via = args.via[(fleet.viewers.len() + n) % args.via.len()];
            let target = Target {
                share_id: agent.share_id.clone(),
                viewer_token: agent.viewer_token.clone(),
                after: agent.cursor,
            };
            (agent.index, target, delivery, via)
        })
        .collect();
    let stats = &fleet.shared.stats;
    let viewers: Vec<(usize, Viewer)> = futures::stream::iter(targets)
        .map(|(index, target, delivery, via)| async move {
            let viewer =
                Viewer::start(via, server.endpoints, &target, delivery, stats.clone()).await?;
            BenchResult::Ok((index, viewer))
        })
        .buffered(SETUP_CONCURRENCY)
        .try_collect()
        .await?;
    let with_viewers = rss();
    let memory = idle.then_some(IdleMemory {
        agents: agents.len(),
        viewers: viewers.len(),
        server: [before.0, with_agents.0, with_viewers.0],
        bench: [before.1, with_agents.1, with_viewers.1],
    });
    fleet.viewers.extend(viewers);
    for (agent, delivery) in agents.into_iter().zip(deliveries) {
        fleet
            .streaming
            .push(agent.stream(fleet.shared.clone(), delivery));
    }
    Ok(memory)
}

/// Lets the step warm up, then measures one window.
async fn measure(args: &Args, server: &ServerProcess, fleet: &Fleet) -> Step {
    tokio::time::sleep(args.warmup()).await;
    let from = Instant::now();
    let until = from + (args.step_duration() - args.warmup());
    fleet.shared.stats.open_window(from, until);
    let cpu = cpu::Sample::take(server.pid);
    let disk = DiskSample::take(server.pid, &server.data);
    let sampler = Sampler::start(server.pid);
    let metrics = server.metrics().await.ok();
    tokio::time::sleep_until(until.into()).await;
    let cpu = cpu.and_then(|sample| sample.usage());
    let busy = sampler.and_then(Sampler::stop);
    let disk = disk.usage(&DiskSample::take(server.pid, &server.data));
    let commits = match (metrics, server.metrics().await.ok()) {
        (Some(before), Some(after)) => Some(Commits::between(&before, &after)),
        _ => None,
    };
    let (backlog, oldest) = fleet.backlog(until);
    let mut window = fleet.shared.stats.take_window();
    let seconds = (until - from).as_secs_f64();
    Step {
        agents: fleet.streaming.len(),
        viewers: fleet.viewers.len(),
        window: until - from,
        offered: window.offered as f64 / seconds,
        acked: window.acked as f64 / seconds,
        calls: window.calls as f64 / seconds,
        ack: window.acks.summary(),
        age: window.ages.summary(),
        delivery: window.deliveries.summary(),
        overloaded: window.overloaded,
        backlog,
        oldest,
        commits,
        server_rss: rss_bytes(server.pid),
        bench_rss: rss_bytes(std::process::id()),
        cpu,
        busy,
        disk,
    }
}

impl Fleet {
    /// Ops due and not acked over every agent, and the oldest one's age at `at`.
    fn backlog(&self, at: Instant) -> (usize, Duration) {
        let ops = self.streaming.iter().map(|s| s.backlog.ops.get()).sum();
        let oldest = self
            .streaming
            .iter()
            .filter_map(|s| s.backlog.oldest.get())
            .min()
            .map_or(Duration::ZERO, |due| at.saturating_duration_since(due));
        (ops, oldest)
    }

    /// Fails the bench if an agent or a viewer has stopped (they only stop on errors
    /// while the ramp runs).
    async fn check(&mut self) -> BenchResult<()> {
        if let Some(agent) = self.streaming.iter_mut().find(|s| s.task.is_finished()) {
            let index = agent.index;
            return match (&mut agent.task).await {
                Ok(Err(err)) => Err(err),
                Ok(Ok(_)) => Err(format!("agent {index} stopped").into()),
                Err(err) => Err(format!("agent {index}'s task failed: {err}").into()),
            };
        }
        if let Some((_, viewer)) = self.viewers.iter_mut().find(|(_, v)| v.failed()) {
            return Err(viewer.why().await.into());
        }
        Ok(())
    }

    /// Stops the agents after their calls in flight, and checks that every viewer gets
    /// every op of its share.
    async fn finish(self) -> BenchResult<()> {
        self.shared.stop.set(true);
        let mut last = vec![0; self.streaming.len()];
        for streaming in self.streaming {
            last[streaming.index] = streaming
                .task
                .await
                .map_err(|err| format!("agent {}'s task failed: {err}", streaming.index))??;
        }
        let viewers = self.viewers.len();
        for (index, mut viewer) in self.viewers {
            viewer.caught_up(last[index], CATCH_UP_LIMIT).await?;
            viewer.close().await?;
        }
        println!("every one of the {viewers} viewers got every op of its share, once and in order");
        Ok(())
    }
}
