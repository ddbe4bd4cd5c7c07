//! CPU time as Linux's `/proc` counts it, for the benchmarks' per-thread and
//! whole-machine CPU accounting: a thread's ticks, and the machine's. Each bench
//! includes it (`#[path]`) and uses what it needs.
#![allow(dead_code)]

use std::time::Duration;

/// `USER_HZ`: what `/proc` counts CPU time in on every Linux target.
pub const TICKS_PER_SEC: u64 = 100;

pub fn ticks_to_duration(ticks: u64) -> Duration {
    Duration::from_secs_f64(ticks as f64 / TICKS_PER_SEC as f64)
}

/// The whole machine's ticks so far.
#[derive(Clone, Copy, Debug)]
pub struct MachineTicks {
    /// Everything but idle and iowait.
    pub busy: u64,
    /// Time this machine (a VM) wanted a core and the host gave it to another.
    pub steal: u64,
}

/// From the first line of `/proc/stat`.
pub fn machine_ticks() -> Option<MachineTicks> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq (guest time is already in user; steal
    // is time this machine did not get, counted apart).
    let total: u64 = ticks.iter().take(7).sum();
    Some(MachineTicks {
        busy: total - ticks.get(3)? - ticks.get(4)?,
        steal: *ticks.get(7)?,
    })
}

/// A thread's name and its user + system ticks; `pid` `None` is this process.
pub fn thread_stat(pid: Option<u32>, tid: u32) -> Option<(String, u64)> {
    let process = pid.map_or_else(|| "self".to_owned(), |pid| pid.to_string());
    let stat = std::fs::read_to_string(format!("/proc/{process}/task/{tid}/stat")).ok()?;
    // "tid (comm) state ppid …": comm may hold spaces, so split at the last ')'.
    let (head, tail) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_owned();
    let fields: Vec<&str> = tail.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `tail` starts at field 3.
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, user + system))
}

/// What a thread of a bench that runs the server in its own process does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The main thread: the bench's clients.
    Client,
    /// The server's thread (`capsync-server-…`): RPC, the HTTP gateway, live streams.
    Server,
    /// The ledger's writer thread: the commits.
    Writer,
    /// Everything else: the server's blocking pool (ledger reads, argon2).
    Other,
}

impl Role {
    /// Thread names are set by the server (`capsync-server-<addr>`,
    /// `capsync-ledger-writer`) and cut to 15 bytes by the kernel.
    fn of(is_main: bool, comm: &str) -> Self {
        if is_main {
            Self::Client
        } else if comm.starts_with("capsync-server") {
            Self::Server
        } else if comm.starts_with("capsync-ledger") {
            Self::Writer
        } else {
            Self::Other
        }
    }
}

/// CPU time (user + system) per [`Role`] over a window.
#[derive(Clone, Copy, Debug, Default)]
pub struct RoleTimes {
    pub client: Duration,
    pub server: Duration,
    pub writer: Duration,
    pub other: Duration,
    /// All of them, in ticks.
    pub ticks: u64,
}

/// This process's threads with their role and CPU ticks, from
/// `/proc/self/task/*/stat` (Linux only). Resolution is one clock tick (10 ms), fine
/// over windows of seconds.
#[derive(Debug)]
pub struct ThreadTicks(Vec<(u32, Role, u64)>);

impl ThreadTicks {
    pub fn sample() -> Option<Self> {
        let main = std::process::id();
        let tasks = std::fs::read_dir("/proc/self/task").ok()?;
        let threads = tasks
            .filter_map(|entry| {
                let tid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
                let (comm, ticks) = thread_stat(None, tid)?;
                Some((tid, Role::of(tid == main, &comm), ticks))
            })
            .collect();
        Some(Self(threads))
    }

    /// CPU used per role from `before` to this sample (threads born since count
    /// from zero).
    pub fn since(&self, before: &Self) -> RoleTimes {
        let mut times = RoleTimes::default();
        for &(tid, role, ticks) in &self.0 {
            let earlier = before.0.iter().find(|t| t.0 == tid).map_or(0, |t| t.2);
            let used = ticks.saturating_sub(earlier);
            times.ticks += used;
            *match role {
                Role::Client => &mut times.client,
                Role::Server => &mut times.server,
                Role::Writer => &mut times.writer,
                Role::Other => &mut times.other,
            } += ticks_to_duration(used);
        }
        times
    }
}
