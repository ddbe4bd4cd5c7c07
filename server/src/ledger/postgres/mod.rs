//! The PostgreSQL engine of the ledger, for deployments of several server nodes on
//! one database.
//!
//! - [`schema`]: the tables and their versioned migrations.
//! - [`connect`]: the URL, and TLS for `sslmode=require`.
//! - [`pool`]: worker threads with a connection each (one pool for writes, one for
//!   reads), one transaction at a time, run again after a lost race, opened again after a
//!   lost connection; [`lanes`]: their queue, one share's writes in order, on whichever
//!   worker is free; [`group`]: writes waiting together commit together.
//! - [`tx`]: the rules' storage interface ([`LedgerTx`](crate::ledger::rules::store::LedgerTx))
//!   over a PostgreSQL transaction, with the row and advisory locks that stand in for
//!   SQLite's single writer.
//! - [`probe`] and [`tail`]: fewer statements per append, since each is a round trip.
//! - [`reads`]: token lookup, `stats`, and the reclaim pass.
//! - [`announce`] and [`notify`]: changes across nodes (each node's commits announced
//!   right after them on a connection of its own, one LISTEN per node).
//!
//! The rules themselves are the engine-neutral ones ([`crate::ledger::rules`]).

mod announce;
mod audit;
mod connect;
mod errors;
mod group;
mod lanes;
mod notify;
mod pool;
mod probe;
mod reads;
mod schema;
mod tail;
mod tx;

#[cfg(test)]
mod contract;
#[cfg(test)]
pub(crate) mod test_database;

use std::sync::Arc;
use std::time::{Duration, Instant};

use capsync_shared::{ShareId, TokenId};
use futures::FutureExt;
use futures::future::BoxFuture;

use self::pool::{Access, Pool, QueueLimits};
use self::tx::PgTx;
use super::engine::{Engine, RulesBackend};
use super::rules::authority;
use super::{
    AuditEvent, Authority, Changed, Ledger, LedgerError, LedgerResult, Operator, ReclaimStep,
    Stats, StoredToken, VacuumReport,
};
use crate::clock::Clock;
use crate::metrics::Metrics;

pub use self::connect::Database;

/// Settings of the PostgreSQL engine.
#[derive(Clone, Debug)]
pub struct PostgresOptions {
    /// Where the database is and how to connect (see [`Database`]).
    pub database: Database,
    /// Most connections this node opens at once.
    pub connections: u32,
    /// Clear output and attachments of tool parts stored with a compacted time
    /// (the server's `reclaim` setting).
    pub reclaim_compacted: bool,
    /// Most writes waiting for a connection; more are refused with `QueueFull`.
    pub write_queue: usize,
    /// Most bytes of payload waiting (one batch alone always fits).
    pub write_queue_bytes: usize,
    /// Where "now" comes from (token expiry, the time an op was applied).
    pub clock: Clock,
    /// Counts writes refused because PostgreSQL's disk is full.
    pub metrics: Metrics,
}

impl PostgresOptions {
    /// Defaults for the database at `url` (see [`Database::new`]).
    pub fn new(url: &str) -> LedgerResult<Self> {
        Database::new(url, None).map(Self::for_database)
    }

    /// Defaults for `database`: the server's default connections, reclaim on, its default
    /// queue limits.
    pub fn for_database(database: Database) -> Self {
        Self {
            database,
            connections: crate::config::DEFAULT_DATABASE_CONNECTIONS,
            reclaim_compacted: true,
            write_queue: crate::config::DEFAULT_WRITE_QUEUE,
            write_queue_bytes: crate::config::DEFAULT_WRITE_QUEUE_BYTES,
            clock: Clock::system(),
            metrics: Metrics::default(),
        }
    }
}

/// Connects, brings the schema up to date, and opens the pool. Blocking: call it
/// before serving, or from a blocking task.
pub fn open(options: PostgresOptions) -> LedgerResult<Ledger> {
    let clock = options.clock.clone();
    let reclaim = options.reclaim_compacted;
    PostgresEngine::open(options)
        .map(|engine| Ledger::new(RulesBackend::new(engine, reclaim), clock))
}

/// The [`Engine`] over one PostgreSQL database.
pub(crate) struct PostgresEngine {
    /// Writes (grouped when they queue), and upkeep.
    pool: Arc<Pool>,
    /// Reads, so that followers' and snapshots' reads never wait behind writes, and the
    /// writes' pool stays small enough for their groups to form.
    reads: Arc<Pool>,
    /// Announces committed changes to live subscribers of this node.
    changes: tokio::sync::broadcast::Sender<Changed>,
    /// Tells the other nodes what this node committed; stops when the engine is dropped.
    announcer: Arc<announce::Announcer>,
    /// Hears the other nodes' commits; stops when the engine is dropped.
    _listener: notify::Listener,
    /// Audit lines waiting to be written.
    audits: Arc<audit::AuditQueue>,
    clock: Clock,
    metrics: Metrics,
}

impl PostgresEngine {
    fn open(options: PostgresOptions) -> LedgerResult<Self> {
        // The synchronous client runs a small runtime of its own: connect and migrate on
        // a thread of their own, whatever context the caller is in.
        let database = options.database.clone();
        let schema_name = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let mut client = database.connect().map_err(|e| {
                        LedgerError::Storage(format!("cannot connect to PostgreSQL: {e}"))
                    })?;
                    schema::migrate(&mut client)?;
                    warn_unless_durable(&mut client);
                    let row = client
                        .query_one("SELECT current_schema()::text", &[])
                        .map_err(|e| errors::storage("current schema", &e))?;
                    tx::get::<String>(&row, 0)
                })
                .join()
                .map_err(|_| LedgerError::Storage("the migration thread panicked".to_owned()))?
        })?;
        let limits = QueueLimits {
            commands: options.write_queue,
            bytes: options.write_queue_bytes,
        };
        let (writers, readers) = split_connections(options.connections);
        let pool = Pool::start(
            "capsync-pg-write",
            &options.database,
            writers,
            limits,
            &options.clock,
        )?;
        let reads = Pool::start(
            "capsync-pg-read",
            &options.database,
            readers,
            limits,
            &options.clock,
        )?;
        // Subscribers that fall this far behind get `Lagged` and recheck everything.
        let (changes, _) = tokio::sync::broadcast::channel(1024);
        let channel = notify::Channel::new(&schema_name, hex::encode(rand::random::<[u8; 8]>()));
        let announcer = announce::Announcer::start(options.database.clone(), channel.clone())
            .map_err(|e| LedgerError::Storage(format!("cannot start the announcer: {e}")))?;
        let listener = notify::Listener::start(options.database, channel, changes.clone())
            .map_err(|e| LedgerError::Storage(format!("cannot start the change listener: {e}")))?;
        Ok(Self {
            pool,
            reads,
            changes,
            announcer: Arc::new(announcer),
            _listener: listener,
            audits: Arc::default(),
            clock: options.clock,
            metrics: options.metrics,
        })
    }
}

impl Engine for PostgresEngine {
    type Tx<'t> = PgTx<'t>;

    /// Writes to one share run one at a time, in call order. What a write changed is
    /// announced right after the commit, on this node and (by [`announce`]) to the others.
    fn write<T, F, C>(
        &self,
        order: Option<&ShareId>,
        bytes: usize,
        work: F,
        change: C,
    ) -> BoxFuture<'static, LedgerResult<T>>
    where
        T: Send + 'static,
        F: for<'t> Fn(&mut PgTx<'t>, i64) -> LedgerResult<T> + Send + 'static,
        C: Fn(&T) -> Option<Changed> + Send + Sync + 'static,
    {
        let (changes, announcer) = (self.changes.clone(), Arc::clone(&self.announcer));
        let order = order.map(ShareId::as_str);
        let metrics = self.metrics.clone();
        self.pool
            .run(order, Access::Write, bytes, work, move |done: &T| {
                if let Some(changed) = change(done) {
                    announcer.announce(&changed);
                    // No receivers is fine: nobody is subscribed.
                    let _ = changes.send(changed);
                }
            })
            .inspect(move |result| {
                if matches!(result, Err(LedgerError::StorageFull)) {
                    metrics.storage_full_refusal();
                }
            })
            .boxed()
    }

    fn read<T, F>(&self, work: F) -> BoxFuture<'static, LedgerResult<T>>
    where
        T: Send + 'static,
        F: for<'t> Fn(&mut PgTx<'t>, i64) -> LedgerResult<T> + Send + 'static,
    {
        self.reads.run(None, Access::Read, 0, work, |_| {})
    }

    fn find_token(&self, id: TokenId) -> BoxFuture<'static, LedgerResult<Option<StoredToken>>> {
        self.read(move |tx, _| reads::find_token(tx, &id))
    }

    fn stats(&self, who: Authority) -> BoxFuture<'static, LedgerResult<Stats>> {
        self.read(move |tx, now| reads::stats(tx, &who, now))
    }

    fn reclaim_step(
        &self,
        op: Operator,
        after: i64,
        max_parts: u32,
        dry_run: bool,
    ) -> BoxFuture<'static, LedgerResult<ReclaimStep>> {
        let step = move |tx: &mut PgTx<'_>, now| {
            reads::reclaim_step(tx, &op, after, max_parts, dry_run, now)
        };
        if dry_run {
            self.read(step)
        } else {
            self.write(None, 0, step, |_| None)
        }
    }

    /// `VACUUM (ANALYZE)` of capsync's tables. PostgreSQL's autovacuum does the same
    /// on its own; this runs it now. The space of deleted rows becomes reusable by the
    /// tables, but is rarely given back to the file system (only `VACUUM FULL` does
    /// that, holding an exclusive lock on each table: not something to run under load).
    fn vacuum(&self, op: Operator) -> BoxFuture<'static, LedgerResult<VacuumReport>> {
        let allowed = self.read(move |tx, now| authority::check_operator(tx, &op, now));
        let pool = Arc::clone(&self.pool);
        async move {
            allowed.await?;
            pool.submit(None, |worker| {
                let started = Instant::now();
                // VACUUM cannot run in a transaction: the worker's connection, in autocommit.
                let connection = worker.connection()?;
                let (bytes_before, tables) = table_sizes(connection)?;
                for table in &tables {
                    // Names from the catalog, quoted as identifiers.
                    let quoted = format!("\"{}\"", table.replace('"', "\"\""));
                    connection
                        .batch_execute(&format!("VACUUM (ANALYZE) {quoted}"))
                        .map_err(|e| errors::storage("vacuum", &e))?;
                }
                let (bytes_after, _) = table_sizes(connection)?;
                Ok(VacuumReport {
                    bytes_before,
                    bytes_after,
                    duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                })
            })
            .await
        }
        .boxed()
    }

    /// Nothing: PostgreSQL's autovacuum and checkpointer do this engine's upkeep.
    fn upkeep(&self, _budget: Duration) -> BoxFuture<'static, LedgerResult<()>> {
        futures::future::ready(Ok(())).boxed()
    }

    fn changes(&self) -> tokio::sync::broadcast::Receiver<Changed> {
        self.changes.subscribe()
    }

    /// Queued and written in batches, in the background ([`audit`]).
    fn audit(&self, event: AuditEvent) {
        self.audits.push(&self.pool, event, self.clock.now_millis());
    }

    fn close(&self) -> BoxFuture<'static, ()> {
        let (writes, reads) = (self.pool.close(), self.reads.close());
        async move {
            futures::join!(writes, reads);
        }
        .boxed()
    }
}

/// How `connections` are shared: half for writes (at least one), the rest for reads (at
/// least one).
fn split_connections(connections: u32) -> (u32, u32) {
    let writers = (connections / 2).max(1);
    (writers, connections.saturating_sub(writers).max(1))
}

/// Says so when PostgreSQL's settings break the promise of an ack: with
/// `synchronous_commit` off a commit returns before it is written, and the last commits
/// before a crash of PostgreSQL are lost although capsync acked them.
fn warn_unless_durable(client: &mut postgres::Client) {
    for (setting, durable) in [("synchronous_commit", "on"), ("fsync", "on")] {
        let value = client
            .query_one(&format!("SHOW {setting}"), &[])
            .ok()
            .and_then(|row| row.try_get::<_, String>(0).ok());
        if let Some(value) = value
            && value != durable
            && !(setting == "synchronous_commit"
                && matches!(value.as_str(), "remote_write" | "remote_apply"))
        {
            tracing::warn!(
                setting,
                value,
                "PostgreSQL is not durable this way: acked ops can be lost if it crashes \
                 (fsync) or stops abruptly (synchronous_commit)"
            );
        }
    }
}

/// The total size of capsync's tables (with indexes and TOAST), and their names.
fn table_sizes(connection: &mut pool::Connection) -> LedgerResult<(u64, Vec<String>)> {
    let rows = connection
        .query(
            "SELECT relname::text, pg_total_relation_size(relid) FROM pg_stat_user_tables
             WHERE schemaname = current_schema() ORDER BY relname",
            &[],
        )
        .map_err(|e| errors::storage("table sizes", &e))?;
    let mut total = 0;
    let mut names = Vec::with_capacity(rows.len());
    for row in &rows {
        names.push(tx::get::<String>(row, 0)?);
        total += tx::count(tx::get(row, 1)?);
    }
    Ok((total, names))
}

#[cfg(test)]
mod tests {
    use super::split_connections;

    #[test]
    fn connections_are_shared_between_writes_and_reads_and_neither_is_left_without() {
        assert_eq!(split_connections(8), (4, 4));
        assert_eq!(split_connections(5), (2, 3));
        assert_eq!(split_connections(2), (1, 1));
        assert_eq!(split_connections(1), (1, 1));
    }
}
