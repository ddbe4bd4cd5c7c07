//! Embedded SQLite backend of the ledger: one writer thread with group commit, plus read connections.
//!
//! - [`schema`]: connection pragmas and versioned migrations.
//! - [`writer`]: the writer thread and its group-commit loop.
//! - [`pool`]: read-only connections lent to blocking tasks.
//! - [`tx`]: the engine-neutral rules' storage interface
//!   ([`LedgerTx`](crate::ledger::rules::store::LedgerTx)) over a SQLite transaction;
//!   authority, appends and records are the rules' ([`crate::ledger::rules`]).
//! - [`share_rows`]: reading share rows.
//! - [`reads`]: token lookup and stats.
//! - [`prune`], [`reclaim`], [`compact`], [`maintenance`]: the lifecycle steps
//!   (plan and chunked deletion, clearing compacted tool output, dropping old
//!   ledger payloads) and vacuum, incremental vacuum and checkpoints.
//! - [`storage`]: a full disk (or `--max-database-bytes`): refusing, the
//!   reserve file, recovering by itself.

mod compact;
mod convert;
mod errors;
pub(crate) mod fuzz;
mod maintenance;
mod pool;
mod prune;
mod reads;
mod reclaim;
mod schema;
mod share_rows;
mod storage;
mod tx;
mod writer;

#[cfg(test)]
mod contract;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_maintenance;
#[cfg(test)]
mod tests_prune;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use capsync_shared::{ShareId, TokenId};
use futures::FutureExt;
use futures::future::BoxFuture;
use tracing::{debug, warn};

pub use self::maintenance::{Checkpoint, IncrementalVacuum};
use self::pool::ReadPool;
use self::storage::{Reserve, StorageWatch};
use self::tx::SqliteTx;
use self::writer::{QueueLimits, Writer};
use super::engine::{Engine, RulesBackend};
use super::{
    AuditEvent, Authority, Changed, Ledger, LedgerError, LedgerResult, Operator, ReclaimStep,
    Stats, StoredToken, VacuumReport,
};
use crate::clock::Clock;
use crate::metrics::Metrics;

/// How hard a commit waits for the disk before the ack is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Durability {
    /// `synchronous=FULL`: an acked batch survives power loss. The default,
    /// because the ack promises durability.
    #[default]
    Full,
    /// `synchronous=NORMAL`: in WAL mode an acked batch survives a process crash
    /// but the last commits may be lost on power loss or an OS crash.
    Normal,
}

/// Settings of the SQLite backend.
#[derive(Clone, Debug)]
pub struct SqliteOptions {
    /// The database file; created with its parent directory if missing.
    pub path: PathBuf,
    pub durability: Durability,
    /// Read connections for snapshots, catch-up and token lookups.
    pub read_connections: usize,
    /// Most commands one group-commit transaction takes.
    pub max_group_commit: usize,
    /// Clear output and attachments of tool parts stored with a compacted time
    /// (the server's `reclaim` setting).
    pub reclaim_compacted: bool,
    /// Most commands waiting for the writer; more are refused with `QueueFull`.
    pub write_queue: usize,
    /// Most bytes of payload waiting for the writer (one batch alone always fits).
    pub write_queue_bytes: usize,
    /// Largest the database file may grow (`max_page_count`); `None` for no limit.
    pub max_database_bytes: Option<u64>,
    /// Bytes of the reserve file kept beside the database (see [`storage`]); 0 for none.
    pub reserve_bytes: u64,
    /// Where write refusals and the storage-full state are counted.
    pub metrics: Metrics,
    /// Where "now" comes from (token expiry, the time an op was applied).
    pub clock: Clock,
}

impl SqliteOptions {
    /// Defaults for a database at `path`: full durability, 4 readers, groups of
    /// up to 256, reclaim on, the server's default queue limits, no size limit
    /// and no reserve file.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            durability: Durability::Full,
            read_connections: 4,
            max_group_commit: 256,
            reclaim_compacted: true,
            write_queue: crate::config::DEFAULT_WRITE_QUEUE,
            write_queue_bytes: crate::config::DEFAULT_WRITE_QUEUE_BYTES,
            max_database_bytes: None,
            reserve_bytes: 0,
            metrics: Metrics::default(),
            clock: Clock::system(),
        }
    }
}

/// Opens (creating and migrating if needed) the database and starts the writer thread.
pub fn open(options: SqliteOptions) -> Result<Ledger, LedgerError> {
    SqliteBackend::open(&options).map(|backend| Ledger::new(backend, options.clock.clone()))
}

/// The rules over SQLite.
pub(super) type SqliteBackend = RulesBackend<SqliteEngine>;

impl SqliteBackend {
    pub(super) fn open(options: &SqliteOptions) -> LedgerResult<Self> {
        SqliteEngine::open(options).map(|engine| Self::new(engine, options.reclaim_compacted))
    }
}

/// The [`Engine`] over one SQLite file. Writes go to the writer thread, reads
/// to the pool; both check the caller's authority in their own transaction.
pub(super) struct SqliteEngine {
    /// All writes, in call order, group-committed.
    writer: Arc<Writer>,
    /// Announces committed changes to live subscribers.
    changes: tokio::sync::broadcast::Sender<Changed>,
    /// All reads, concurrent with each other and with the writer (WAL).
    reads: Arc<ReadPool>,
    /// The database file, for `stats` (file sizes are not visible through SQL).
    path: Arc<PathBuf>,
    /// Pages per incremental-vacuum step, adapted so a step takes about the upkeep budget.
    vacuum_pages: Arc<AtomicU32>,
    clock: Clock,
}

impl SqliteEngine {
    fn open(options: &SqliteOptions) -> LedgerResult<Self> {
        let conn = schema::open_writer(&options.path, options.durability)?;
        if let Some(bytes) = options.max_database_bytes {
            schema::limit_size(&conn, bytes)?;
        }
        // Readers open after the writer has created and migrated the file.
        let reads = ReadPool::open(&options.path, options.read_connections)?;
        let reserve = (options.reserve_bytes > 0).then(|| {
            Reserve::new(
                options.path.with_file_name("reserve"),
                options.reserve_bytes,
            )
        });
        let dir = match options.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let storage = StorageWatch::new(
            reserve,
            options.max_database_bytes.is_some(),
            dir,
            options.metrics.clone(),
        );
        let limits = QueueLimits {
            commands: options.write_queue,
            bytes: options.write_queue_bytes,
        };
        let writer = Writer::start(conn, options.max_group_commit, limits, storage)?;
        // Subscribers that fall this far behind get `Lagged` and recheck everything.
        let (changes, _) = tokio::sync::broadcast::channel(1024);
        Ok(Self {
            writer: Arc::new(writer),
            changes,
            reads,
            path: Arc::new(options.path.clone()),
            vacuum_pages: Arc::new(AtomicU32::new(maintenance::FIRST_VACUUM_PAGES)),
            clock: options.clock.clone(),
        })
    }

    /// Runs `write` on the writer thread in the next group transaction, on the connection.
    fn write_raw<T, F>(&self, write: F) -> BoxFuture<'static, LedgerResult<T>>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection, i64) -> LedgerResult<T> + Send + 'static,
    {
        // The clock is read when the command runs, so expiry is judged at the
        // moment the work happens, not when it was queued.
        let clock = self.clock.clone();
        self.writer
            .submit(move |conn| write(conn, clock.now_millis()))
            .boxed()
    }

    /// Runs `read` in one read transaction on a pooled connection.
    fn read_raw<T, F>(&self, read: F) -> BoxFuture<'static, LedgerResult<T>>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection, i64) -> LedgerResult<T> + Send + 'static,
    {
        if self.writer.is_closing() {
            return futures::future::ready(Err(LedgerError::Closed)).boxed();
        }
        self.reads
            .read({
                let clock = self.clock.clone();
                move |conn| read(conn, clock.now_millis())
            })
            .boxed()
    }

    /// `wal_checkpoint(TRUNCATE)`, waiting for readers no longer than `max_wait`.
    #[cfg(test)]
    pub(super) fn checkpoint(
        &self,
        max_wait: Duration,
    ) -> BoxFuture<'static, LedgerResult<Checkpoint>> {
        self.writer
            .exclusive(move |conn| maintenance::checkpoint(conn, max_wait))
            .boxed()
    }

    /// Gives at most `max_pages` free pages back to the file system, in one short write.
    #[cfg(test)]
    pub(super) fn incremental_vacuum(
        &self,
        max_pages: u32,
    ) -> BoxFuture<'static, LedgerResult<IncrementalVacuum>> {
        self.write_raw(move |conn, _| maintenance::incremental_vacuum(conn, max_pages))
    }
}

/// Incremental-vacuum steps until no free pages are left or the round's time
/// is up, each step sized to take about `budget`.
async fn give_back_free_pages(
    writer: &Writer,
    pages: &AtomicU32,
    budget: Duration,
) -> LedgerResult<()> {
    let started = Instant::now();
    let mut freed = 0;
    loop {
        let max_pages = pages.load(Ordering::Relaxed);
        let step = writer
            .submit(move |conn| maintenance::incremental_vacuum(conn, max_pages))
            .await?;
        freed += step.freed_pages;
        pages.store(
            maintenance::next_step_pages(max_pages, Duration::from_micros(step.elapsed_us), budget),
            Ordering::Relaxed,
        );
        if step.free_pages == 0
            || step.freed_pages == 0
            || started.elapsed() > maintenance::UPKEEP_ROUND
        {
            if freed > 0 {
                debug!(
                    freed_pages = freed,
                    free_pages = step.free_pages,
                    "incremental vacuum"
                );
            }
            return Ok(());
        }
    }
}

impl Engine for SqliteEngine {
    type Tx<'t> = SqliteTx<'t>;

    /// The writer thread announces right after the commit, so followers hear of it
    /// even when the caller no longer waits (a cancelled call, a dropped connection).
    /// One writer thread runs every write in call order: `order` needs nothing more.
    fn write<T, F, C>(
        &self,
        _order: Option<&ShareId>,
        bytes: usize,
        work: F,
        change: C,
    ) -> BoxFuture<'static, LedgerResult<T>>
    where
        T: Send + 'static,
        F: for<'t> Fn(&mut SqliteTx<'t>, i64) -> LedgerResult<T> + Send + 'static,
        C: Fn(&T) -> Option<Changed> + Send + Sync + 'static,
    {
        let changes = self.changes.clone();
        let announce = Box::new(move |done: &T| {
            if let Some(changed) = change(done) {
                // No receivers is fine: nobody is subscribed.
                let _ = changes.send(changed);
            }
        });
        let clock = self.clock.clone();
        self.writer
            .submit_then(
                bytes,
                move |conn, transaction| {
                    work(
                        &mut SqliteTx::in_transaction(conn, transaction),
                        clock.now_millis(),
                    )
                },
                announce,
            )
            .boxed()
    }

    fn read<T, F>(&self, work: F) -> BoxFuture<'static, LedgerResult<T>>
    where
        T: Send + 'static,
        F: for<'t> Fn(&mut SqliteTx<'t>, i64) -> LedgerResult<T> + Send + 'static,
    {
        self.read_raw(move |conn, now| work(&mut SqliteTx::new(conn), now))
    }

    fn find_token(&self, id: TokenId) -> BoxFuture<'static, LedgerResult<Option<StoredToken>>> {
        self.read_raw(move |conn, _| reads::find_token(conn, &id))
    }

    fn stats(&self, who: Authority) -> BoxFuture<'static, LedgerResult<Stats>> {
        let path = Arc::clone(&self.path);
        self.read_raw(move |conn, now| reads::stats(conn, &who, &path, now))
    }

    fn reclaim_step(
        &self,
        op: Operator,
        after: i64,
        max_parts: u32,
        dry_run: bool,
    ) -> BoxFuture<'static, LedgerResult<ReclaimStep>> {
        // A dry run only reads: it need not wait for the writer.
        if dry_run {
            self.read_raw(move |conn, now| reclaim::step(conn, &op, after, max_parts, true, now))
        } else {
            self.write_raw(move |conn, now| reclaim::step(conn, &op, after, max_parts, false, now))
        }
    }

    fn vacuum(&self, op: Operator) -> BoxFuture<'static, LedgerResult<VacuumReport>> {
        let path = Arc::clone(&self.path);
        self.writer
            .exclusive({
                let clock = self.clock.clone();
                move |conn| maintenance::vacuum(conn, &op, &path, clock.now_millis())
            })
            .boxed()
    }

    fn upkeep(&self, budget: Duration) -> BoxFuture<'static, LedgerResult<()>> {
        // The writer is owned by the future, so the round outlives no borrow of the backend.
        let (writer, vacuum_pages) = (Arc::clone(&self.writer), Arc::clone(&self.vacuum_pages));
        async move {
            let checkpoint = writer
                .exclusive(move |conn| maintenance::checkpoint(conn, budget))
                .await;
            match checkpoint {
                Ok(done) if done.busy => {
                    debug!(
                        frames = done.log_frames,
                        "checkpoint could not finish: readers active"
                    )
                }
                Ok(done) => debug!(frames = done.checkpointed_frames, "checkpointed the log"),
                Err(err) => warn!(error = %err, "checkpoint failed"),
            }
            give_back_free_pages(&writer, &vacuum_pages, budget).await
        }
        .boxed()
    }

    fn changes(&self) -> tokio::sync::broadcast::Receiver<Changed> {
        self.changes.subscribe()
    }

    fn audit(&self, event: AuditEvent) {
        self.writer.audit(event, self.clock.now_millis());
    }

    fn close(&self) -> BoxFuture<'static, ()> {
        let stopped = self.writer.close();
        let reads = Arc::clone(&self.reads);
        async move {
            stopped.await;
            reads.close();
        }
        .boxed()
    }
}
