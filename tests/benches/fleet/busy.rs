//! How busy the single threads are in wall time, not only in CPU time: each one's
//! scheduler state sampled every 2 ms from a thread of its own.
//!
//! CPU time alone cannot say that the ledger writer is saturated: while a commit's
//! fsync waits for the disk the thread uses no CPU, yet the next group waits for it.
//! The state can: `R` running or waiting for a core, `D` waiting for the disk, `S` idle
//! (the writer waiting for work, the event loops in `epoll`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// Time between two samples: 500 reads of three small `/proc` files a second, about
/// 1% of a core.
const EVERY: Duration = Duration::from_millis(2);

/// The threads sampled: the bench's client thread, the server's thread, the ledger
/// writer.
#[derive(Clone, Copy, Debug, Default)]
pub struct Busy {
    pub client: States,
    pub server: States,
    pub writer: States,
}

/// One thread's samples by state.
#[derive(Clone, Copy, Debug, Default)]
pub struct States {
    pub running: u32,
    pub disk: u32,
    pub idle: u32,
}

impl States {
    fn total(&self) -> f64 {
        f64::from((self.running + self.disk + self.idle).max(1))
    }

    /// Share of the time not idle: running, waiting for a core or for the disk.
    pub fn busy(&self) -> f64 {
        f64::from(self.running + self.disk) / self.total()
    }

    /// Share of the time waiting for the disk.
    pub fn disk(&self) -> f64 {
        f64::from(self.disk) / self.total()
    }

    fn add(&mut self, state: Option<char>) {
        match state {
            Some('R') => self.running += 1,
            Some('D') => self.disk += 1,
            Some(_) => self.idle += 1,
            None => {}
        }
    }
}

/// A sampler running until [`Sampler::stop`].
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Busy>,
}

impl Sampler {
    /// Samples the server process `server_pid`'s thread and ledger writer (found by
    /// name) and this process's main thread. `None` where `/proc` cannot tell.
    pub fn start(server_pid: u32) -> Option<Self> {
        let client = format!("/proc/self/task/{}/stat", std::process::id());
        let server = find_thread(server_pid, "capsync-server")?;
        let writer = find_thread(server_pid, "capsync-ledger")?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("fleet-sampler".into())
            .spawn(move || {
                let mut busy = Busy::default();
                while !stopping.load(Ordering::Relaxed) {
                    busy.client.add(state(&client));
                    busy.server.add(state(&server));
                    busy.writer.add(state(&writer));
                    std::thread::sleep(EVERY);
                }
                busy
            })
            .ok()?;
        Some(Self { stop, thread })
    }

    pub fn stop(self) -> Option<Busy> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().ok()
    }
}

/// The stat file of the thread of `pid` whose name starts with `prefix`.
fn find_thread(pid: u32, prefix: &str) -> Option<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path())
        .find(|task| {
            std::fs::read_to_string(task.join("comm")).is_ok_and(|name| name.starts_with(prefix))
        })
        .map(|task| task.join("stat").display().to_string())
}

/// The state letter of a thread's stat line ("tid (comm) S …").
fn state(path: &str) -> Option<char> {
    let stat = std::fs::read_to_string(path).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}
