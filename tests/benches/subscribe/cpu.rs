//! Where the CPU goes during a run: the bench's own clients against each of the
//! server's threads (Linux only), since all of them share the machine's cores.

use std::time::Duration;

use crate::proc_stat::{ThreadTicks, machine_ticks, ticks_to_duration};

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

/// Per-thread CPU counters of this process and the machine's busy ticks (elsewhere
/// than Linux the split is simply not printed).
#[derive(Debug)]
pub struct ThreadCpu {
    threads: ThreadTicks,
    /// Busy ticks of the whole machine, all cores together.
    machine: Option<u64>,
}

impl ThreadCpu {
    pub fn sample() -> Option<Self> {
        Some(Self {
            threads: ThreadTicks::sample()?,
            machine: machine_ticks().map(|ticks| ticks.busy),
        })
    }

    /// CPU used per kind of thread since `before`.
    pub fn since(before: Option<&Self>) -> Option<CpuSplit> {
        let (before, after) = (before?, Self::sample()?);
        let times = after.threads.since(&before.threads);
        // A thread of ours that ended during the window counts here: the server's
        // blocking threads idle out after 10 s, so rarely within a run.
        let elsewhere = match (before.machine, after.machine) {
            (Some(start), Some(end)) => Some(ticks_to_duration(
                end.saturating_sub(start).saturating_sub(times.ticks),
            )),
            _ => None,
        };
        Some(CpuSplit {
            client: times.client,
            server: times.server,
            writer: times.writer,
            other: times.other,
            elsewhere,
        })
    }
}
