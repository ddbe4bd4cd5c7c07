//! What the disk under the server's data did during a step (Linux only): the server
//! process's writes, and the device's busy time and flushes from `/proc/diskstats`
//! (the device is shared: another process's writes count there too).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Counters at one moment.
#[derive(Clone, Debug)]
pub struct DiskSample {
    at: Instant,
    /// Bytes the server process caused to be written to storage (`/proc/<pid>/io`).
    server_written: Option<u64>,
    device: Option<DeviceCounters>,
}

#[derive(Clone, Copy, Debug)]
struct DeviceCounters {
    /// Milliseconds with I/O in flight (`iostat`'s %util).
    busy_ms: u64,
    writes: u64,
    /// Flush requests (fsync's cache flushes) and the time spent on them; 0 on
    /// kernels before 5.5, which do not count them.
    flushes: u64,
    flush_ms: u64,
}

/// Between two samples.
#[derive(Clone, Copy, Debug)]
pub struct DiskUsage {
    /// The server process's writes, bytes per second.
    pub server_write_rate: Option<f64>,
    /// Share of the time the device had I/O in flight.
    pub utilisation: Option<f64>,
    pub writes_per_sec: Option<f64>,
    pub flushes_per_sec: Option<f64>,
    /// Mean time of a flush request.
    pub flush_mean: Option<Duration>,
}

impl DiskSample {
    pub fn take(server_pid: u32, data: &Path) -> Self {
        Self {
            at: Instant::now(),
            server_written: written_by(server_pid),
            device: device_of(data).and_then(counters),
        }
    }

    pub fn usage(&self, later: &Self) -> DiskUsage {
        let seconds = (later.at - self.at).as_secs_f64();
        let per_sec = |a: u64, b: u64| b.saturating_sub(a) as f64 / seconds;
        let device = self.device.zip(later.device);
        DiskUsage {
            server_write_rate: self
                .server_written
                .zip(later.server_written)
                .map(|(a, b)| per_sec(a, b)),
            utilisation: device.map(|(a, b)| per_sec(a.busy_ms, b.busy_ms) / 1000.0),
            writes_per_sec: device.map(|(a, b)| per_sec(a.writes, b.writes)),
            flushes_per_sec: device
                .filter(|(a, b)| b.flushes > a.flushes)
                .map(|(a, b)| per_sec(a.flushes, b.flushes)),
            flush_mean: device.filter(|(a, b)| b.flushes > a.flushes).map(|(a, b)| {
                Duration::from_secs_f64(
                    (b.flush_ms - a.flush_ms) as f64 / 1000.0 / (b.flushes - a.flushes) as f64,
                )
            }),
        }
    }
}

fn written_by(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|line| line.strip_prefix("write_bytes:"))?
        .trim()
        .parse()
        .ok()
}

/// The (major, minor) of the device holding `path`.
fn device_of(path: &Path) -> Option<(u64, u64)> {
    let dev = std::fs::metadata(path).ok()?.dev();
    // glibc's gnu_dev_major and gnu_dev_minor.
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    Some((major, minor))
}

/// The device's line of `/proc/diskstats`: "major minor name" then the counters.
fn counters((major, minor): (u64, u64)) -> Option<DeviceCounters> {
    let stats = std::fs::read_to_string("/proc/diskstats").ok()?;
    stats.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.first()?.parse::<u64>().ok()? != major
            || fields.get(1)?.parse::<u64>().ok()? != minor
        {
            return None;
        }
        let at = |i: usize| fields.get(3 + i).and_then(|f| f.parse::<u64>().ok());
        Some(DeviceCounters {
            writes: at(4)?,
            busy_ms: at(9)?,
            flushes: at(14).unwrap_or(0),
            flush_ms: at(15).unwrap_or(0),
        })
    })
}
