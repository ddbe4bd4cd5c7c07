//! What the writer does when storage fills up: refuse, keep room for a
//! checkpoint, and notice by itself when space is back.
//!
//! SQLite answers `SQLITE_FULL` when the disk is full, or when the database
//! reaches `--max-database-bytes` (`max_page_count`). The write is rolled
//! back, so nothing acked is ever lost; callers get `storageFull` and retry.
//! On the first one a warning is logged (once per episode) and
//! `capsync_storage_full` turns 1. Then:
//! - **the database size limit:** every later write is simply tried; the first
//!   group that commits work without hitting the limit ends the episode (after
//!   a prune or a deletion made room).
//! - **a full disk, with a reserve** (`--storage-reserve-bytes` of zeros kept in
//!   the data directory): the reserve is deleted and the log checkpointed into
//!   the database at once. A checkpoint must grow the database before it can
//!   reset the log, and without room for that even freeing space later might
//!   not get the database writing again. Appends are then refused unread, so
//!   they cannot eat the room just made, until the reserve fits on the disk
//!   again (tried at most once a second): space is back, the episode ends.
//!   Small bookkeeping writes (tokens, revocations, lifecycle steps) still
//!   run: they need little room, and deletions are what makes room.
//! - **a full disk, without a reserve:** every later write is tried, as for the
//!   size limit.
//!
//! A server that starts where its reserve does not fit (a restart on a full
//! disk) starts holding off, as if the disk had just filled up.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::maintenance;
use crate::metrics::Metrics;

/// Zeros written at a time when making the reserve.
const RESERVE_CHUNK: usize = 1 << 20;

/// How often a full disk is checked for space coming back.
const RECHECK: Duration = Duration::from_secs(1);

/// A write that fails for lack of space while the file system has this much
/// free was stopped by `--max-database-bytes`, not by the disk: one batch needs
/// far less (a message is at most 16 MiB by default; its log frames about as much again).
const DISK_FULL_BELOW: u64 = 64 << 20;

/// Where the storage stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Fine,
    /// Writes fail for lack of space; each is still tried.
    Full,
    /// The disk filled up and the reserve was given up: writes are refused
    /// unread until the reserve fits again.
    FullHoldingOff,
}

/// The writer thread's view of the storage. Lives on that thread.
#[derive(Debug)]
pub(crate) struct StorageWatch {
    state: State,
    reserve: Option<Reserve>,
    /// Whether `--max-database-bytes` is set.
    has_quota: bool,
    /// The database's directory, whose file system is checked for free space.
    dir: PathBuf,
    /// When the disk was last checked for space (while holding off).
    last_check: Option<Instant>,
    metrics: Metrics,
}

impl StorageWatch {
    /// Starts watching; makes the reserve if it is missing, and holds writes
    /// off if it does not fit.
    pub fn new(reserve: Option<Reserve>, has_quota: bool, dir: PathBuf, metrics: Metrics) -> Self {
        let mut watch = Self {
            state: State::Fine,
            reserve,
            has_quota,
            dir,
            last_check: None,
            metrics,
        };
        watch.metrics.set_storage_full(false);
        if let Some(reserve) = &watch.reserve
            && let Err(err) = reserve.make_file()
        {
            watch.state = State::FullHoldingOff;
            watch.last_check = Some(Instant::now());
            watch.metrics.set_storage_full(true);
            tracing::warn!(path = %reserve.path.display(), bytes = reserve.bytes, %err,
                "no room for the storage reserve: writes are refused with `storageFull` until \
                 at least this much is free; they resume by themselves");
        }
        watch
    }

    /// Whether the next group's payload writes (appends) may run. False while
    /// holding off after a full disk, until the reserve fits again; refused
    /// writes are counted.
    pub fn admit(&mut self, writes: usize) -> bool {
        if self.state != State::FullHoldingOff {
            return true;
        }
        let due = self.last_check.is_none_or(|at| at.elapsed() >= RECHECK);
        if due {
            self.last_check = Some(Instant::now());
            if self.reserve.as_ref().is_some_and(Reserve::try_make) {
                self.recovered();
                return true;
            }
        }
        for _ in 0..writes {
            self.metrics.storage_full_refusal();
        }
        false
    }

    /// After each group (or exclusive command): `refused` commands failed for
    /// lack of space; `written` is true when work was committed without that.
    pub fn after_write(&mut self, conn: &Connection, refused: usize, written: bool) {
        if refused > 0 {
            for _ in 0..refused {
                self.metrics.storage_full_refusal();
            }
            if self.state == State::Fine {
                self.became_full(conn);
            }
        } else if written && self.state == State::Full {
            self.recovered();
        }
    }

    fn recovered(&mut self) {
        self.state = State::Fine;
        self.metrics.set_storage_full(false);
        tracing::info!("storage available again: writes are accepted");
        if let Some(reserve) = &self.reserve {
            reserve.make();
        }
    }

    fn became_full(&mut self, conn: &Connection) {
        self.metrics.set_storage_full(true);
        if self.at_quota() {
            self.state = State::Full;
            tracing::warn!(
                "the database reached --max-database-bytes: writes are refused with \
                 `storageFull` until a prune or a deletion makes room"
            );
            return;
        }
        let released = self.reserve.as_ref().is_some_and(Reserve::release);
        if !released {
            self.state = State::Full;
            tracing::warn!(
                "storage is full: writes are refused with `storageFull` (nothing acked is \
                 lost) until space is freed; they resume by themselves"
            );
            return;
        }
        self.state = State::FullHoldingOff;
        self.last_check = Some(Instant::now());
        let bytes = self.reserve.as_ref().map_or(0, |r| r.bytes);
        tracing::warn!(
            reserve_bytes = bytes,
            "storage is full: writes are refused with `storageFull` (nothing acked is lost) \
             until at least the reserve's size is free again; they resume by themselves"
        );
        match maintenance::truncate_log(conn) {
            Ok(checkpoint) if !checkpoint.busy => {
                tracing::info!("released the storage reserve and checkpointed the log")
            }
            Ok(_) => tracing::warn!(
                "released the storage reserve; a reader kept the log from being checkpointed"
            ),
            Err(err) => tracing::warn!(%err, "released the storage reserve; the checkpoint failed"),
        }
    }

    /// Whether the size limit, rather than the disk, refused the write: a
    /// failed write cannot say which, but the file system's free space can.
    fn at_quota(&self) -> bool {
        self.has_quota && free_bytes(&self.dir).is_some_and(|free| free >= DISK_FULL_BELOW)
    }
}

/// A file of zeros that holds disk space for when the disk fills up.
#[derive(Debug)]
pub(crate) struct Reserve {
    path: PathBuf,
    bytes: u64,
}

impl Reserve {
    /// The reserve at `path` (made by [`StorageWatch::new`]).
    pub fn new(path: PathBuf, bytes: u64) -> Self {
        Self { path, bytes }
    }

    /// Makes the reserve file unless it is there already, warning if there is
    /// no room for it. Written, not just sized: a sparse file holds no space.
    pub fn make(&self) {
        if let Err(err) = self.make_file() {
            tracing::warn!(path = %self.path.display(), %err,
                "could not set aside the storage reserve; will try again when space is back");
        }
    }

    /// Whether the reserve is (now) in place; quietly false if it does not fit.
    fn try_make(&self) -> bool {
        self.make_file().is_ok()
    }

    fn make_file(&self) -> std::io::Result<()> {
        match std::fs::metadata(&self.path) {
            Ok(meta) if meta.len() >= self.bytes => return Ok(()),
            _ => {}
        }
        write_zeros(&self.path, self.bytes).inspect_err(|_| {
            let _ = std::fs::remove_file(&self.path);
        })
    }

    /// Deletes the reserve file; whether there was one.
    fn release(&self) -> bool {
        std::fs::remove_file(&self.path).is_ok()
    }
}

/// Bytes an unprivileged process may still write on `dir`'s file system.
fn free_bytes(dir: &Path) -> Option<u64> {
    let stats = rustix::fs::statvfs(dir).ok()?;
    Some(stats.f_bavail.saturating_mul(stats.f_frsize))
}

fn write_zeros(path: &Path, bytes: u64) -> std::io::Result<()> {
    let mut file = private_file(path)?;
    let chunk = vec![0u8; RESERVE_CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(RESERVE_CHUNK as u64) as usize;
        file.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    file.sync_all()
}

/// Creates (or truncates) `path`, readable and writable by the owner only.
pub(crate) fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_made_released_and_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reserve");
        let reserve = Reserve::new(path.clone(), 3 * RESERVE_CHUNK as u64 + 5);
        reserve.make();
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            3 * RESERVE_CHUNK as u64 + 5
        );
        assert!(reserve.release());
        assert!(!path.exists());
        assert!(!reserve.release(), "nothing left to release");
        assert!(reserve.try_make());
        assert!(path.exists());
    }
}
