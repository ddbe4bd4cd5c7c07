//! What the bench prints: the header, each step as it ends, then the ramp as a table
//! with the verdicts and what saturated first.

use std::path::Path;
use std::time::Duration;

use capsync_server::Config;

use crate::cpu::machine_cores;
use crate::disk::DiskUsage;
use crate::ramp::{IdleMemory, Ramp, Step};
use crate::report::{ms, pass_fail, thousands};
use crate::saturation;
use crate::traffic::{DELTAS_PER_SEC, SNAPSHOT_EVERY, ops_per_sec};
use crate::{Args, TARGET_AGENTS, TARGET_P99, TARGET_VIEWERS};

pub fn print_header(args: &Args, dir: &Path, config: &Config) {
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into());
    let vias: Vec<&str> = args.via.iter().map(|via| via.name()).collect();
    println!("capsync fleet benchmark");
    println!(
        "  machine:  {} cores, load average {load} at start",
        machine_cores()
    );
    println!(
        "  server:   a process of its own; data in {} (durability FULL); follow interval {:?}; at most {} connections ({} per address)",
        dir.display(),
        config.follow_interval,
        config.max_connections,
        config.max_connections_per_address
    );
    println!(
        "  agents:   each its own connection and share; per second {DELTAS_PER_SEC} part.delta, a snapshot every {SNAPSHOT_EVERY:?}, a new message every {:?} ({:.2} ops/s); one call in flight, batching what fell due",
        args.message_every(),
        ops_per_sec(args.message_every())
    );
    println!(
        "  viewers:  one share in {}, each its own connection, via {} in turn",
        args.viewer_every,
        vias.join(", ")
    );
    println!(
        "  ramp:     {:?} agents, {}s a step ({}s not counted); stops after the first step with ack p99 > {:?}",
        args.steps, args.step_seconds, args.warmup_seconds, args.stop_p99
    );
    println!();
}

pub fn print_idle_memory(idle: &IdleMemory) {
    let per = |rss: &[Option<u64>; 3], from: usize, n: usize| match (rss[from], rss[from + 1]) {
        (Some(before), Some(after)) if n > 0 => {
            format!(
                "{:+.1} KiB",
                (after as f64 - before as f64) / 1024.0 / n as f64
            )
        }
        _ => "?".to_owned(),
    };
    println!(
        "idle connections (the first step's {} agents, then its {} viewers, before any traffic), RSS per connection (server before them: {}):",
        idle.agents,
        idle.viewers,
        mib(idle.server[0])
    );
    println!(
        "  server process: {} per agent (connection, share, session written), {} per viewer",
        per(&idle.server, 0, idle.agents),
        per(&idle.server, 1, idle.viewers)
    );
    println!(
        "  bench process (the clients): {} per agent, {} per viewer",
        per(&idle.bench, 0, idle.agents),
        per(&idle.bench, 1, idle.viewers)
    );
}

pub fn print_step(step: &Step) {
    println!(
        "  ops/s: offered {}, acked {} in {} calls/s ({:.1} ops a call); refused as overloaded: {}",
        thousands(step.offered),
        thousands(step.acked),
        thousands(step.calls),
        step.acked / step.calls.max(f64::MIN_POSITIVE),
        step.overloaded
    );
    println!(
        "  ack (call sent -> ack): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; op age at ack (due -> ack): p50 {:.2} ms, p99 {:.2} ms",
        ms(step.ack.p50),
        ms(step.ack.p99),
        ms(step.ack.max),
        ms(step.age.p50),
        ms(step.age.p99)
    );
    println!(
        "  backlog at the end: {} ops due and not acked, the oldest due {:.0} ms before",
        step.backlog,
        ms(step.oldest)
    );
    println!(
        "  commit -> viewer ({} deliveries): {}",
        step.delivery.count,
        step.delivery.long()
    );
    if let Some(commits) = step.commits {
        println!(
            "  server commits: {} batches/s, ledger queue -> durable mean {:.2} ms, p99 under {}",
            thousands(commits.batches / step.window.as_secs_f64()),
            ms(commits.mean),
            commits
                .p99_under
                .map_or("?".to_owned(), |d| format!("{:.2} ms", ms(d)))
        );
    }
    println!(
        "  RSS: server {}, bench {}",
        mib(step.server_rss),
        mib(step.bench_rss)
    );
    if let Some(cpu) = step.cpu {
        println!("  {}", cpu.line());
    }
    if let Some(busy) = step.busy {
        println!(
            "  busy (wall time, state sampled every 2 ms): ledger writer {:.0}% (waiting for the disk {:.0}%), server thread {:.0}%, bench client {:.0}%",
            100.0 * busy.writer.busy(),
            100.0 * busy.writer.disk(),
            100.0 * busy.server.busy(),
            100.0 * busy.client.busy()
        );
    }
    println!("  disk: {}", disk_line(&step.disk));
}

fn disk_line(disk: &DiskUsage) -> String {
    let mut parts = Vec::new();
    if let Some(rate) = disk.server_write_rate {
        parts.push(format!("server writes {:.1} MB/s", rate / 1_000_000.0));
    }
    if let Some(utilisation) = disk.utilisation {
        parts.push(format!("device busy {:.0}%", 100.0 * utilisation));
    }
    if let Some(writes) = disk.writes_per_sec {
        parts.push(format!("{} writes/s", thousands(writes)));
    }
    match (disk.flushes_per_sec, disk.flush_mean) {
        (Some(flushes), Some(mean)) if flushes >= 1.0 => parts.push(format!(
            "{} cache flushes/s of {:.2} ms",
            thousands(flushes),
            ms(mean)
        )),
        // fsync reaches the device as writes only (no write cache to flush), or the
        // kernel does not count flushes.
        (Some(_), _) => parts.push("no cache flushes".to_owned()),
        _ => {}
    }
    if parts.is_empty() {
        "?".to_owned()
    } else {
        parts.join(", ")
    }
}

pub fn print_summary(ramp: &Ramp) {
    let steps = &ramp.steps;
    let baseline = ramp.idle.as_ref().and_then(|idle| idle.server[0]);
    println!();
    println!(
        "Ramp ({}s windows):",
        steps.first().map_or(0.0, |s| s.window.as_secs_f64())
    );
    println!(
        "  agents viewers  offered/s  acked/s  ack p50  ack p99  age p99  view p50  view p99  server RSS  /agent  client  server  writer  blocking  others  steal"
    );
    for step in steps {
        let cpu = |f: fn(&crate::cpu::Usage) -> Option<Duration>| {
            step.cpu
                .and_then(|u| f(&u).map(|d| format!("{:.2}", u.cores(d))))
                .unwrap_or_else(|| "?".into())
        };
        println!(
            "  {:>6} {:>7} {:>10} {:>8} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>9.1} {:>11} {:>7} {:>7} {:>7} {:>7} {:>9} {:>7} {:>6}",
            step.agents,
            step.viewers,
            thousands(step.offered),
            thousands(step.acked),
            ms(step.ack.p50),
            ms(step.ack.p99),
            ms(step.age.p99),
            ms(step.delivery.p50),
            ms(step.delivery.p99),
            mib(step.server_rss),
            per_agent(step, baseline),
            cpu(|u| Some(u.client)),
            cpu(|u| Some(u.server)),
            cpu(|u| Some(u.writer)),
            cpu(|u| Some(u.blocking)),
            cpu(|u| u.elsewhere),
            cpu(|u| u.steal),
        );
    }
    println!(
        "  (latencies in ms; /agent: the server's RSS over its RSS before the first agent, per agent, viewers included; cpu in cores: bench client thread, server thread, ledger writer, server blocking pool, other processes, stolen by the host)"
    );
    println!();
    print_verdicts(steps);
}

fn print_verdicts(steps: &[Step]) {
    let target = TARGET_P99;
    let within: Vec<&Step> = steps.iter().filter(|s| s.ack.p99 <= target).collect();
    println!("Verdicts:");
    match within.last() {
        Some(best) => println!(
            "  largest step with ack p99 <= {target:?}: {} agents, {} viewers (ack p99 {:.2} ms, {} ops/s acked)",
            best.agents,
            best.viewers,
            ms(best.ack.p99),
            thousands(best.acked)
        ),
        None => println!("  no step had ack p99 <= {target:?}"),
    }
    let at_target = steps
        .iter()
        .find(|s| s.agents >= TARGET_AGENTS && s.viewers >= TARGET_VIEWERS);
    let (pass, measured) = match at_target {
        Some(step) => (
            step.ack.p99 <= target,
            format!(
                "{} agents, {} viewers: ack p99 {:.2} ms",
                step.agents,
                step.viewers,
                ms(step.ack.p99)
            ),
        ),
        None => (
            false,
            format!(
                "not reached: the ramp stopped at {} agents",
                steps.last().map_or(0, |s| s.agents)
            ),
        ),
    };
    println!(
        "  {TARGET_AGENTS} agents with {TARGET_VIEWERS} viewers at ack p99 <= {target:?}: {}  ({measured})",
        pass_fail(pass)
    );
    // The first step over the target, or the last one when none was: the most loaded.
    let limit = steps.iter().find(|s| s.ack.p99 > target).or(steps.last());
    if let Some(step) = limit {
        println!(
            "  saturated first (at {} agents, ack p99 {:.2} ms): {}",
            step.agents,
            ms(step.ack.p99),
            saturation::describe(step)
        );
    }
}

/// The server's RSS growth per agent since before the first agent, in KiB.
fn per_agent(step: &Step, baseline: Option<u64>) -> String {
    match (step.server_rss, baseline) {
        (Some(rss), Some(base)) => format!(
            "{:.0} KiB",
            (rss as f64 - base as f64) / 1024.0 / step.agents as f64
        ),
        _ => "?".to_owned(),
    }
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("?".to_owned(), |b| {
        format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
    })
}
