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

use capsync_shared::{Cursor, ShareId, TokenId, TokenKind};
use futures::FutureExt;
use futures::future::BoxFuture;
use tracing::{debug, warn};

pub use self::maintenance::{Checkpoint, IncrementalVacuum};
use self::pool::ReadPool;
use self::storage::{Reserve, StorageWatch};
use self::tx::SqliteTx;
use self::writer::{QueueLimits, Writer};
use super::{
    Ack, AuditEvent, Authority, Backend, BatchIn, Changed, CompactPosition, CompactStep,
    DeleteStep, Ledger, LedgerError, LedgerResult, Minted, NewShare, NewToken, OpOutcome, Operator,
    OpsPage, PruneFilter, PrunePlan, ReclaimStep, RevokeScope, ShareInfo, ShareState, SnapshotPage,
    Stats, StoredToken, VacuumReport,
};
use crate::clock::Clock;
use crate::ledger::rules;
use crate::ledger::rules::store::LedgerTx;
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

/// The [`Backend`] over one SQLite file. Writes go to the writer thread, reads
/// to the pool; both check the caller's authority in their own transaction.
struct SqliteBackend {
    /// All writes, in call order, group-committed.
    writer: Arc<Writer>,
    /// Announces committed changes to live subscribers.
    changes: tokio::sync::broadcast::Sender<Changed>,
    /// All reads, concurrent with each other and with the writer (WAL).
    reads: Arc<ReadPool>,
    /// The database file, for `stats` (file sizes are not visible through SQL).
    path: Arc<PathBuf>,
    /// Whether appends store compacted tool parts without their output (`SqliteOptions::reclaim_compacted`).
    reclaim_compacted: bool,
    /// Pages per incremental-vacuum step, adapted so a step takes about the upkeep budget.
    vacuum_pages: Arc<AtomicU32>,
    clock: Clock,
}

impl SqliteBackend {
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
            reclaim_compacted: options.reclaim_compacted,
            vacuum_pages: Arc::new(AtomicU32::new(maintenance::FIRST_VACUUM_PAGES)),
            clock: options.clock.clone(),
        })
    }

    /// [`write`](Self::write) for work holding `bytes` of payload while queued that, once
    /// committed, announces what `change` says it changed. The writer thread announces
    /// right after the commit, so followers hear of it even when the caller no longer
    /// waits (a cancelled call, a dropped connection).
    fn write_announced<T, F>(
        &self,
        bytes: usize,
        write: F,
        change: impl FnOnce(&T) -> Option<Changed> + Send + 'static,
    ) -> BoxFuture<'static, LedgerResult<T>>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection, i64) -> LedgerResult<T> + Send + 'static,
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
            .submit_then(bytes, move |conn| write(conn, clock.now_millis()), announce)
            .boxed()
    }

    /// Runs `write` on the writer thread in the next group transaction.
    fn write<T, F>(&self, write: F) -> BoxFuture<'static, LedgerResult<T>>
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
        self.write(move |conn, _| maintenance::incremental_vacuum(conn, max_pages))
    }

    /// Runs `read` in one read transaction on a pooled connection.
    fn read<T, F>(&self, read: F) -> BoxFuture<'static, LedgerResult<T>>
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

impl Backend for SqliteBackend {
    fn find_token(&self, id: TokenId) -> BoxFuture<'static, LedgerResult<Option<StoredToken>>> {
        self.read(move |conn, _| reads::find_token(conn, &id))
    }

    fn mint_token(
        &self,
        issuer: Authority,
        kind: TokenKind,
        token: NewToken,
    ) -> BoxFuture<'static, LedgerResult<Minted>> {
        self.write(move |conn, now| {
            rules::tokens::mint(&mut SqliteTx::new(conn), &issuer, kind, &token, now)
        })
    }

    fn mint_for_share(
        &self,
        issuer: Authority,
        share_id: ShareId,
        kind: TokenKind,
        token: NewToken,
    ) -> BoxFuture<'static, LedgerResult<Minted>> {
        self.write(move |conn, now| {
            rules::tokens::mint_for_share(
                &mut SqliteTx::new(conn),
                &issuer,
                &share_id,
                kind,
                &token,
                now,
            )
        })
    }

    fn replace_admin_token(&self, token: NewToken) -> BoxFuture<'static, LedgerResult<()>> {
        self.write(move |conn, now| {
            rules::tokens::replace_admin(&mut SqliteTx::new(conn), &token, now)
        })
    }

    fn has_admin_token(&self) -> BoxFuture<'static, LedgerResult<bool>> {
        self.read(|conn, now| SqliteTx::new(conn).has_live_admin_token(now))
    }

    fn create_first_admin_token(&self, token: NewToken) -> BoxFuture<'static, LedgerResult<bool>> {
        self.write(move |conn, now| {
            rules::tokens::create_first_admin(&mut SqliteTx::new(conn), &token, now)
        })
    }

    fn create_share(
        &self,
        issuer: Authority,
        share: NewShare,
        writer: NewToken,
        viewer: NewToken,
    ) -> BoxFuture<'static, LedgerResult<ShareInfo>> {
        self.write(move |conn, now| {
            rules::shares::create(
                &mut SqliteTx::new(conn),
                &issuer,
                &share,
                &writer,
                &viewer,
                now,
            )
        })
    }

    fn create_or_join_share(
        &self,
        issuer: Authority,
        share: NewShare,
        writer: NewToken,
        viewer: NewToken,
    ) -> BoxFuture<'static, LedgerResult<(ShareInfo, bool)>> {
        self.write(move |conn, now| {
            rules::shares::create_or_join(
                &mut SqliteTx::new(conn),
                &issuer,
                &share,
                &writer,
                &viewer,
                now,
            )
        })
    }

    fn append(&self, writer: Authority, batch: BatchIn) -> BoxFuture<'static, LedgerResult<Ack>> {
        let share = writer.share.as_ref().map(|(id, _)| id.clone());
        let reclaim_compacted = self.reclaim_compacted;
        let bytes = batch.ops.iter().map(|op| op.payload.len()).sum();
        self.write_announced(
            bytes,
            move |conn, now| {
                rules::append::append(
                    &mut SqliteTx::new(conn),
                    &writer,
                    &batch,
                    reclaim_compacted,
                    now,
                )
            },
            move |ack| {
                let applied = ack
                    .results
                    .iter()
                    .any(|r| matches!(r.outcome, OpOutcome::Applied(_)));
                share.filter(|_| applied).map(Changed::Share)
            },
        )
    }

    fn share_state(&self, who: Authority) -> BoxFuture<'static, LedgerResult<ShareState>> {
        self.read(move |conn, now| rules::reads::share_state(&mut SqliteTx::new(conn), &who, now))
    }

    fn child_shares(&self, who: Authority) -> BoxFuture<'static, LedgerResult<Vec<ShareInfo>>> {
        self.read(move |conn, now| rules::reads::child_shares(&mut SqliteTx::new(conn), &who, now))
    }

    fn list_shares(
        &self,
        who: Authority,
        after: String,
        limit: u32,
        include_archived: bool,
    ) -> BoxFuture<'static, LedgerResult<Vec<ShareInfo>>> {
        self.read(move |conn, now| {
            rules::reads::list_shares(
                &mut SqliteTx::new(conn),
                &who,
                &after,
                limit,
                include_archived,
                now,
            )
        })
    }

    fn set_archived(
        &self,
        who: Authority,
        share_id: ShareId,
        archived: bool,
    ) -> BoxFuture<'static, LedgerResult<ShareInfo>> {
        self.write(move |conn, now| {
            rules::shares::set_archived(&mut SqliteTx::new(conn), &who, &share_id, archived, now)
        })
    }

    fn stats(&self, who: Authority) -> BoxFuture<'static, LedgerResult<Stats>> {
        let path = Arc::clone(&self.path);
        self.read(move |conn, now| reads::stats(conn, &who, &path, now))
    }

    fn revoke_share(
        &self,
        who: Authority,
        share_id: ShareId,
        scope: RevokeScope,
    ) -> BoxFuture<'static, LedgerResult<ShareState>> {
        let changed = Changed::Share(share_id.clone());
        self.write_announced(
            0,
            move |conn, now| {
                rules::shares::revoke(&mut SqliteTx::new(conn), &who, &share_id, scope, now)
            },
            move |_| Some(changed),
        )
    }

    fn revoke_token(
        &self,
        who: Authority,
        token_id: TokenId,
    ) -> BoxFuture<'static, LedgerResult<()>> {
        self.write_announced(
            0,
            move |conn, now| rules::tokens::revoke(&mut SqliteTx::new(conn), &who, &token_id, now),
            |_| Some(Changed::Tokens),
        )
    }

    fn snapshot_page(
        &self,
        who: Authority,
        page: String,
        max_bytes: u32,
    ) -> BoxFuture<'static, LedgerResult<SnapshotPage>> {
        self.read(move |conn, now| {
            rules::snapshot::page(&mut SqliteTx::new(conn), &who, &page, max_bytes, now)
        })
    }

    fn ops_since(
        &self,
        who: Authority,
        after: Cursor,
        limit: u32,
    ) -> BoxFuture<'static, LedgerResult<OpsPage>> {
        self.read(move |conn, now| {
            rules::reads::ops_since(&mut SqliteTx::new(conn), &who, after, limit, now)
        })
    }

    fn plan_prune(
        &self,
        op: Operator,
        filter: PruneFilter,
    ) -> BoxFuture<'static, LedgerResult<PrunePlan>> {
        self.read(move |conn, now| rules::prune::plan(&mut SqliteTx::new(conn), &op, &filter, now))
    }

    fn delete_share_step(
        &self,
        op: Operator,
        share_id: ShareId,
        expect_cursor: Option<Cursor>,
        max_rows: u32,
    ) -> BoxFuture<'static, LedgerResult<DeleteStep>> {
        let changed = Changed::Share(share_id.clone());
        // Every step announces: the first one hid the share, and its followers
        // must learn it is gone; later announcements cost a recheck at most.
        self.write_announced(
            0,
            move |conn, now| {
                rules::prune::delete_step(
                    &mut SqliteTx::new(conn),
                    &op,
                    &share_id,
                    expect_cursor,
                    max_rows,
                    now,
                )
            },
            move |step| (*step != DeleteStep::Changed).then_some(changed),
        )
    }

    fn unfinished_deletions(&self) -> BoxFuture<'static, LedgerResult<Vec<ShareId>>> {
        self.read(|conn, _| SqliteTx::new(conn).hidden_shares())
    }

    fn archive_inactive(
        &self,
        op: Operator,
        inactive_before: i64,
        limit: u32,
    ) -> BoxFuture<'static, LedgerResult<Vec<ShareId>>> {
        self.write(move |conn, now| {
            rules::prune::archive_inactive(
                &mut SqliteTx::new(conn),
                &op,
                inactive_before,
                limit,
                now,
            )
        })
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
            self.read(move |conn, now| reclaim::step(conn, &op, after, max_parts, true, now))
        } else {
            self.write(move |conn, now| reclaim::step(conn, &op, after, max_parts, false, now))
        }
    }

    fn compact_step(
        &self,
        op: Operator,
        applied_before: i64,
        from: Option<CompactPosition>,
        max_ops: u32,
        dry_run: bool,
    ) -> BoxFuture<'static, LedgerResult<CompactStep>> {
        let step = move |conn: &rusqlite::Connection, now| {
            rules::compact::step(
                &mut SqliteTx::new(conn),
                &op,
                applied_before,
                from.as_ref(),
                max_ops,
                dry_run,
                now,
            )
        };
        if dry_run {
            self.read(step)
        } else {
            self.write(step)
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
