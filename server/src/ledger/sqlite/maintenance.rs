//! SQLite's own upkeep: vacuum, incremental vacuum and checkpoints, run by the
//! writer thread, and the adaptive step size that keeps each within its budget.
//!
//! `vacuum` and `checkpoint` are exclusive writer commands (autocommit: neither
//! can run inside a transaction); `incremental_vacuum` is an ordinary one.

use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::reads::{file_size, wal_path};
use super::schema::{BUSY_TIMEOUT, WRITER_TEMP_STORE};
use super::tx::SqliteTx;
use crate::ledger::rules::authority;
use crate::ledger::{LedgerError, LedgerResult, Operator, VacuumReport};

/// Incremental-vacuum steps start this small and adapt to the time budget.
pub(super) const FIRST_VACUUM_PAGES: u32 = 64;
const MAX_VACUUM_PAGES: u32 = 1 << 16;
/// Longest one upkeep round may keep stepping before it waits for the next one.
pub(super) const UPKEEP_ROUND: Duration = Duration::from_secs(2);

/// What one incremental-vacuum step did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IncrementalVacuum {
    /// Pages given back to the file system by this step.
    pub freed_pages: u64,
    /// Free pages still left.
    pub free_pages: u64,
    /// How long the step held the writer, in microseconds.
    pub elapsed_us: u64,
}

/// What a checkpoint did (`PRAGMA wal_checkpoint(TRUNCATE)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// A reader kept the log from being fully copied and truncated; try again later.
    pub busy: bool,
    /// Frames in the log, and how many were copied into the database.
    pub log_frames: u64,
    pub checkpointed_frames: u64,
}

/// The next step's page count: halved when a step overran the budget, doubled
/// when it used less than a quarter of it.
pub(super) fn next_step_pages(pages: u32, took: Duration, budget: Duration) -> u32 {
    if took > budget {
        (pages / 2).max(1)
    } else if took < budget / 4 {
        pages.saturating_mul(2).min(MAX_VACUUM_PAGES)
    } else {
        pages
    }
}

/// Checkpoint, `VACUUM`, checkpoint: rewrites the database without its free
/// pages and hands the space back. `Busy` if a reader keeps the log from being
/// emptied first, or another process holds the database.
pub(super) fn vacuum(
    conn: &Connection,
    op: &Operator,
    db_path: &Path,
    now: i64,
) -> LedgerResult<VacuumReport> {
    let started = Instant::now();
    authority::check_operator(&mut SqliteTx::new(conn), op, now)?;
    let bytes_before = stored_bytes(db_path);
    // VACUUM copies the database through the log: starting from an empty log
    // keeps the -wal file from holding the old pages and the new copy at once.
    if truncate_log(conn)?.busy {
        return Err(LedgerError::Busy);
    }
    with_temp_store_on_disk(conn, |conn| Ok(conn.execute_batch("VACUUM")?))?;
    // The new copy sits in the log until this checkpoint moves it into the
    // file and truncates both. A reader that started since may block that: the
    // vacuum is done all the same, and the next checkpoint finishes the job.
    if truncate_log(conn)?.busy {
        tracing::warn!("vacuum done, but a reader kept the log from being truncated afterwards");
    }
    Ok(VacuumReport {
        bytes_before,
        bytes_after: stored_bytes(db_path),
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}

/// Gives at most `max_pages` free pages back to the file system, inside the
/// writer's transaction. The file shrinks once that commits and, in WAL mode,
/// once a checkpoint copies the shorter database back.
pub(super) fn incremental_vacuum(
    conn: &Connection,
    max_pages: u32,
) -> LedgerResult<IncrementalVacuum> {
    let started = Instant::now();
    let before = free_pages(conn)?;
    // SQLite reads a limit of 0 as "the whole freelist", which is not a bounded step.
    if max_pages > 0 && before > 0 {
        let mut statement = conn.prepare(&format!("PRAGMA incremental_vacuum({max_pages})"))?;
        let mut freed = statement.query([])?;
        // The pragma frees one page per result row: it goes only as far as its rows are read.
        while freed.next()?.is_some() {}
    }
    let after = free_pages(conn)?;
    Ok(IncrementalVacuum {
        freed_pages: before.saturating_sub(after),
        free_pages: after,
        elapsed_us: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
    })
}

/// `wal_checkpoint(TRUNCATE)`, waiting for readers at most `max_wait`. A reader
/// still in the log after that is reported as `busy`, not as an error.
pub(super) fn checkpoint(conn: &Connection, max_wait: Duration) -> LedgerResult<Checkpoint> {
    conn.busy_timeout(max_wait)?;
    let checkpoint = truncate_log(conn);
    // Every later command must wait for locks as long as usual, whatever happened here.
    let restored = conn.busy_timeout(BUSY_TIMEOUT);
    let checkpoint = checkpoint?;
    restored?;
    Ok(checkpoint)
}

/// Copies the whole log into the database and truncates it to 0 bytes, unless
/// a reader still uses it once the busy timeout has passed.
pub(super) fn truncate_log(conn: &Connection) -> LedgerResult<Checkpoint> {
    let (busy, log_frames, checkpointed_frames): (i64, i64, i64) =
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?;
    Ok(Checkpoint {
        busy: busy != 0,
        // -1 when the database is not in WAL mode, which `open_writer` rules out.
        log_frames: u64::try_from(log_frames).unwrap_or(0),
        checkpointed_frames: u64::try_from(checkpointed_frames).unwrap_or(0),
    })
}

/// Runs `work` with temporary data on disk: VACUUM builds its whole new copy
/// in the temporary store, which the write connection otherwise keeps in memory.
fn with_temp_store_on_disk<T>(
    conn: &Connection,
    work: impl FnOnce(&Connection) -> LedgerResult<T>,
) -> LedgerResult<T> {
    conn.pragma_update(None, "temp_store", "FILE")?;
    let result = work(conn);
    let restored = conn.pragma_update(None, "temp_store", WRITER_TEMP_STORE);
    let value = result?;
    restored?;
    Ok(value)
}

fn free_pages(conn: &Connection) -> LedgerResult<u64> {
    let count: i64 = conn.pragma_query_value(None, "freelist_count", |r| r.get(0))?;
    Ok(u64::try_from(count).unwrap_or(0))
}

/// The database file plus its log (`<path>-wal`); a missing file counts as empty.
fn stored_bytes(db_path: &Path) -> u64 {
    file_size(db_path) + file_size(&wal_path(db_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vacuum_steps_shrink_when_over_budget_and_grow_when_well_under() {
        let budget = Duration::from_millis(20);
        assert_eq!(next_step_pages(64, Duration::from_millis(30), budget), 32);
        assert_eq!(next_step_pages(1, Duration::from_millis(30), budget), 1);
        assert_eq!(next_step_pages(64, Duration::from_millis(1), budget), 128);
        assert_eq!(
            next_step_pages(MAX_VACUUM_PAGES, Duration::ZERO, budget),
            MAX_VACUUM_PAGES
        );
        assert_eq!(next_step_pages(64, Duration::from_millis(10), budget), 64);
    }
}
