//! Where the CPU goes during a step, thread by thread (Linux only): the server
//! process's threads, the bench's client thread, and every other process. All of them
//! share the machine's cores, so this is what says what saturates first.
//!
//! As the subscribe bench's `cpu.rs`, but over two processes: the server runs in a
//! process of its own here.

use std::time::{Duration, Instant};

use crate::proc_stat::{MachineTicks, machine_ticks, thread_stat, ticks_to_duration};

/// A kind of thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// The bench's main thread: its `LocalSet` runs every agent and viewer.
    Client,
    /// Any other thread of the bench process.
    BenchOther,
    /// The server's thread (`capsync-server-…`): RPC, the HTTP gateway, live streams.
    Server,
    /// The ledger's writer thread: commits (their fsyncs wait off the CPU).
    Writer,
    /// The rest of the server process: its blocking pool (ledger reads, feeds'
    /// rendering, argon2) and its idle main thread.
    Blocking,
}

/// CPU counters of both processes' threads at one moment.
#[derive(Debug)]
pub struct Sample {
    at: Instant,
    server_pid: u32,
    /// (tid, role, user + system ticks).
    threads: Vec<(u32, Role, u64)>,
    /// Busy and stolen ticks of the whole machine, all cores together.
    machine: Option<MachineTicks>,
}

impl Sample {
    pub fn take(server_pid: u32) -> Option<Self> {
        let mut threads = threads_of(std::process::id(), |is_main, _| {
            if is_main {
                Role::Client
            } else {
                Role::BenchOther
            }
        })?;
        threads.extend(threads_of(server_pid, |_, comm| {
            // Names set by the server, cut to 15 bytes by the kernel.
            if comm.starts_with("capsync-server") {
                Role::Server
            } else if comm.starts_with("capsync-ledger") {
                Role::Writer
            } else {
                Role::Blocking
            }
        })?);
        Some(Self {
            at: Instant::now(),
            server_pid,
            threads,
            machine: machine_ticks(),
        })
    }

    /// CPU used since `self` (threads born since count from zero).
    pub fn usage(&self) -> Option<Usage> {
        let now = Self::take(self.server_pid)?;
        let wall = now.at - self.at;
        let mut usage = Usage {
            wall,
            ..Usage::default()
        };
        let mut ours = 0;
        for &(tid, role, ticks) in &now.threads {
            let earlier = self.threads.iter().find(|t| t.0 == tid).map_or(0, |t| t.2);
            let used = ticks.saturating_sub(earlier);
            ours += used;
            let used = ticks_to_duration(used);
            match role {
                Role::Client => usage.client += used,
                Role::BenchOther => usage.bench_other += used,
                Role::Server => usage.server += used,
                Role::Writer => usage.writer += used,
                Role::Blocking => {
                    usage.blocking += used;
                    usage.busiest_blocking = usage.busiest_blocking.max(used);
                }
            }
        }
        // A thread that ended during the window counts as another process's: the
        // server's blocking threads idle out after 10 s, so rarely within a step.
        if let (Some(start), Some(end)) = (self.machine, now.machine) {
            let busy = end.busy.saturating_sub(start.busy);
            usage.machine = Some(ticks_to_duration(busy));
            usage.elsewhere = Some(ticks_to_duration(busy.saturating_sub(ours)));
            usage.steal = Some(ticks_to_duration(end.steal.saturating_sub(start.steal)));
        }
        Some(usage)
    }
}

/// CPU time per kind of thread over a step's window.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub wall: Duration,
    pub client: Duration,
    pub bench_other: Duration,
    pub server: Duration,
    pub writer: Duration,
    pub blocking: Duration,
    /// The blocking pool's busiest single thread.
    pub busiest_blocking: Duration,
    /// Every other process on the machine (from `/proc/stat`).
    pub elsewhere: Option<Duration>,
    /// The whole machine.
    pub machine: Option<Duration>,
    /// Time the host gave the machine's virtual cores to someone else while they had
    /// work (`steal` in `/proc/stat`): a thread then waits though no core here is busy.
    pub steal: Option<Duration>,
}

impl Usage {
    /// CPU seconds per wall second.
    pub fn cores(&self, cpu: Duration) -> f64 {
        cpu.as_secs_f64() / self.wall.as_secs_f64()
    }

    pub fn line(&self) -> String {
        let c = |d: Duration| self.cores(d);
        let machine = match (self.elsewhere, self.machine, self.steal) {
            (Some(elsewhere), Some(machine), Some(steal)) => format!(
                "; other processes {:.2}; machine {:.2} of {}; stolen by the host {:.2}",
                c(elsewhere),
                c(machine),
                machine_cores(),
                c(steal)
            ),
            _ => String::new(),
        };
        format!(
            "cpu (cores): bench client {:.2} (+{:.2} other bench threads); server thread {:.2}, ledger writer {:.2}, blocking pool {:.2} (busiest thread {:.2}){machine}",
            c(self.client),
            c(self.bench_other),
            c(self.server),
            c(self.writer),
            c(self.blocking),
            c(self.busiest_blocking),
        )
    }
}

pub fn machine_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A process's threads with their roles, from `/proc/<pid>/task`.
fn threads_of(pid: u32, role: impl Fn(bool, &str) -> Role) -> Option<Vec<(u32, Role, u64)>> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    Some(
        tasks
            .filter_map(|entry| {
                let tid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
                let (comm, ticks) = thread_stat(Some(pid), tid)?;
                Some((tid, role(tid == pid, &comm), ticks))
            })
            .collect(),
    )
}
