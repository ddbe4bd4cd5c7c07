//! Where the CPU goes during a run: the bench's own clients against each of the
//! server's threads (Linux only), since all of them share the machine's cores.

use std::time::Duration;

use crate::proc_stat::{machine_ticks, thread_stat, ticks_to_duration};

/// CPU time (user + system) per kind of thread over a measured window.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuSplit {
    /// The main thread: the bench's `LocalSet` with every writer and follower. On a
    /// small machine this competes with the server, so it is the first thing to look
    /// at when a ratio is low.
    client: Duration,
    /// The server's thread (`capsync-server-…`): RPC, the HTTP gateway, live streams.
    server: Duration,
    /// The ledger's writer thread: the commits.
    writer: Duration,
    /// Everything else: the server's blocking pool (ledger reads, argon2).
    other: Duration,
    /// Every other process on the machine (from `/proc/stat`): on a shared machine,
    /// whoever else was busy during the run.
    elsewhere: Option<Duration>,
}

impl CpuSplit {
    fn total(&self) -> Duration {
        self.client + self.server + self.writer + self.other
    }

    /// CPU per thread kind in cores (CPU seconds / wall seconds).
    pub fn line(&self, wall: Duration) -> String {
        let cores = |d: Duration| d.as_secs_f64() / wall.as_secs_f64();
        let elsewhere = self
            .elsewhere
            .map(|d| format!("; other processes {:.2}", cores(d)))
            .unwrap_or_default();
        format!(
            "cpu (cores): bench client {:.2}, server {:.2}, ledger writer {:.2}, reads+other {:.2} = {:.2}{elsewhere}",
            cores(self.client),
            cores(self.server),
            cores(self.writer),
            cores(self.other),
            cores(self.total()),
        )
    }
}

/// Per-thread CPU counters of this process, from `/proc/self/task/*/stat` (elsewhere
/// than Linux the split is simply not printed). Resolution is one clock tick (10 ms),
/// fine over windows of seconds.
#[derive(Debug)]
pub struct ThreadCpu {
    threads: Vec<(u32, Role, u64)>,
    /// Busy ticks of the whole machine, all cores together.
    machine: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Client,
    Server,
    Writer,
    Other,
}

impl ThreadCpu {
    pub fn sample() -> Option<Self> {
        let main = std::process::id();
        let tasks = std::fs::read_dir("/proc/self/task").ok()?;
        let threads = tasks
            .filter_map(|entry| {
                let tid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
                let (comm, ticks) = thread_stat(None, tid)?;
                Some((tid, role(tid == main, &comm), ticks))
            })
            .collect();
        Some(Self {
            threads,
            machine: machine_ticks().map(|ticks| ticks.busy),
        })
    }

    /// CPU used per role since `before` (threads born since count from zero).
    pub fn since(before: Option<&Self>) -> Option<CpuSplit> {
        let (before, after) = (before?, Self::sample()?);
        let mut split = CpuSplit::default();
        let mut ours = 0;
        for (tid, role, ticks) in after.threads {
            let earlier = before
                .threads
                .iter()
                .find(|t| t.0 == tid)
                .map_or(0, |t| t.2);
            ours += ticks.saturating_sub(earlier);
            let used = ticks_to_duration(ticks.saturating_sub(earlier));
            *match role {
                Role::Client => &mut split.client,
                Role::Server => &mut split.server,
                Role::Writer => &mut split.writer,
                Role::Other => &mut split.other,
            } += used;
        }
        // A thread of ours that ended during the window counts here: the server's
        // blocking threads idle out after 10 s, so rarely within a run.
        split.elsewhere = match (before.machine, after.machine) {
            (Some(start), Some(end)) => Some(ticks_to_duration(
                end.saturating_sub(start).saturating_sub(ours),
            )),
            _ => None,
        };
        Some(split)
    }
}

/// Thread names are set by the server (`capsync-server-<addr>`, `capsync-ledger-writer`)
/// and cut to 15 bytes by the kernel.
fn role(is_main: bool, comm: &str) -> Role {
    if is_main {
        Role::Client
    } else if comm.starts_with("capsync-server") {
        Role::Server
    } else if comm.starts_with("capsync-ledger") {
        Role::Writer
    } else {
        Role::Other
    }
}
