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
