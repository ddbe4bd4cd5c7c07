//! What the writer does when storage fills up: refuse, make room for a
//! checkpoint, and notice by itself when space is back.
//!
//! SQLite answers `SQLITE_FULL` when the disk is full, or when the database
//! reaches `--max-database-bytes` (`max_page_count`). The write is rolled
//! back, so nothing acked is ever lost; callers get `storageFull` and retry.
//! On the first one:
//! - a warning is logged once and `capsync_storage_full` turns 1;
//! - if the disk (not the quota) is full, the reserve file (`--storage-reserve-bytes`
//!   of zeros kept in the data directory) is deleted and the log checkpointed
//!   into the database right away. A checkpoint must grow the database before
//!   it can reset the log: without room for that, freeing a little space
//!   later might not be enough for the database to start writing again.
//!
//! Every later write is simply tried: the first group that commits work
//! without hitting the limit ends the episode (logged, gauge back to 0), and
//! the reserve is made again if there is room for it.

use std::io::Write;
use std::path::{Path, PathBuf};

use rusqlite::Connection;

use super::maintenance;
use crate::metrics::Metrics;

/// Zeros written at a time when making the reserve.
const RESERVE_CHUNK: usize = 1 << 20;

/// The writer thread's view of the storage. Lives on that thread.
#[derive(Debug)]
pub(crate) struct StorageWatch {
    /// Whether writes are failing for lack of space now.
    full: bool,
    reserve: Option<Reserve>,
    /// `max_page_count` when `--max-database-bytes` is set.
    quota_pages: Option<u64>,
    metrics: Metrics,
}

impl StorageWatch {
    pub fn new(reserve: Option<Reserve>, quota_pages: Option<u64>, metrics: Metrics) -> Self {
        metrics.set_storage_full(false);
        Self {
            full: false,
            reserve,
            quota_pages,
            metrics,
        }
    }

    /// After each group (or exclusive command): `refused` commands failed for
    /// lack of space; `written` is true when work was committed without that.
    pub fn after_write(&mut self, conn: &Connection, refused: usize, written: bool) {
        if refused > 0 {
            for _ in 0..refused {
                self.metrics.storage_full_refusal();
            }
            if !self.full {
                self.became_full(conn);
            }
        } else if written && self.full {
            self.full = false;
            self.metrics.set_storage_full(false);
            tracing::info!("storage available again: writes are accepted");
            if let Some(reserve) = &self.reserve {
                reserve.make();
            }
        }
    }

    fn became_full(&mut self, conn: &Connection) {
        self.full = true;
        self.metrics.set_storage_full(true);
        if self.at_quota(conn) {
            tracing::warn!(
                "the database reached --max-database-bytes: writes are refused with \
                 `storageFull` until a prune (or vacuum) makes room"
            );
            return;
        }
        tracing::warn!(
            "storage is full: writes are refused with `storageFull` (nothing acked is lost) \
             until space is freed; they resume by themselves"
        );
        if let Some(reserve) = &self.reserve
            && reserve.release()
        {
            match maintenance::truncate_log(conn) {
                Ok(checkpoint) if !checkpoint.busy => {
                    tracing::info!("released the storage reserve and checkpointed the log")
                }
                Ok(_) => tracing::warn!(
                    "released the storage reserve; a reader kept the log from being checkpointed"
                ),
                Err(err) => {
                    tracing::warn!(%err, "released the storage reserve; the checkpoint failed")
                }
            }
        }
    }

    /// Whether the database is at its `--max-database-bytes` size.
    fn at_quota(&self, conn: &Connection) -> bool {
        let Some(quota) = self.quota_pages else {
            return false;
        };
        let pages: i64 = conn
            .pragma_query_value(None, "page_count", |r| r.get(0))
            .unwrap_or(0);
        u64::try_from(pages).is_ok_and(|pages| pages >= quota)
    }
}

/// A file of zeros that holds disk space for when the disk fills up.
#[derive(Debug)]
pub(crate) struct Reserve {
    path: PathBuf,
    bytes: u64,
}

impl Reserve {
    /// The reserve at `path`, made now if it is missing (and there is room).
    pub fn new(path: PathBuf, bytes: u64) -> Self {
        let reserve = Self { path, bytes };
        reserve.make();
        reserve
    }

    /// Makes the reserve file unless it is there already. Written, not just
    /// sized: a sparse file would hold no space at all.
    pub fn make(&self) {
        match std::fs::metadata(&self.path) {
            Ok(meta) if meta.len() >= self.bytes => return,
            _ => {}
        }
        if let Err(err) = write_zeros(&self.path, self.bytes) {
            let _ = std::fs::remove_file(&self.path);
            tracing::warn!(path = %self.path.display(), %err,
                "could not set aside the storage reserve; will try again when space is back");
        }
    }

    /// Deletes the reserve file; whether there was one.
    fn release(&self) -> bool {
        std::fs::remove_file(&self.path).is_ok()
    }
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
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            3 * RESERVE_CHUNK as u64 + 5
        );
        assert!(reserve.release());
        assert!(!path.exists());
        assert!(!reserve.release(), "nothing left to release");
        reserve.make();
        assert!(path.exists());
    }
}
