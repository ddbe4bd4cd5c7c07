//! Worker threads, each owning one connection to PostgreSQL, that run transactions.
//!
//! The rules are synchronous, so transactions run on these threads, never on the RPC
//! thread. A connection lives and dies on its worker, with a small runtime of its own
//! that drives it while a statement waits (the asynchronous client, so that statements
//! can be pipelined: see [`PgTx`]); it must not be dropped inside an async context. A
//! transaction that loses a race (a serialization failure or a deadlock) runs again; a
//! connection that breaks is dropped, and the worker opens a new one for its next work,
//! so the server recovers by itself once PostgreSQL is back.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use postgres::Row;
use postgres::types::ToSql;

use super::connect::Database;
use super::errors::{Failure, classify, to_ledger};
use super::group::{self, GroupWrite, WriteJob};
use super::lanes::{Lane, Lanes};
use super::tx::{Committing, PgTx, Statements};
use crate::clock::Clock;
use crate::ledger::{LedgerError, LedgerResult};

/// How often a transaction that lost a race runs again before the caller is told
/// to try again later.
const MAX_ATTEMPTS: u32 = 8;

/// How long opening a connection may take before the work is refused as busy.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a transaction may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Access {
    /// `READ COMMITTED`, with the rules' explicit locks.
    Write,
    /// `REPEATABLE READ READ ONLY`: every statement sees the same state.
    Read,
}

/// One connection, the runtime that drives it, and the statements prepared on it.
pub(super) struct Connection {
    pub(super) client: tokio_postgres::Client,
    pub(super) runtime: tokio::runtime::Runtime,
    pub(super) statements: Statements,
}

impl Connection {
    /// Opens a connection; one that cannot be opened is `Busy` (worth a retry), and
    /// why is logged.
    pub(super) fn open(database: &Database) -> LedgerResult<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| LedgerError::Storage(format!("a database worker's runtime: {e}")))?;
        match runtime.block_on(database.connect_async()) {
            Ok(client) => Ok(Self {
                client,
                runtime,
                statements: Statements::new(),
            }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot connect to the database");
                Err(LedgerError::Busy)
            }
        }
    }

    /// Runs `sql` (statements without parameters) outside any transaction.
    pub(super) fn batch_execute(&mut self, sql: &str) -> Result<(), postgres::Error> {
        self.runtime.block_on(self.client.batch_execute(sql))
    }

    /// The rows `sql` gives, outside any transaction.
    pub(super) fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, postgres::Error> {
        self.runtime.block_on(self.client.query(sql, params))
    }
}

/// Most work waiting for a worker, in commands and in payload bytes: beyond either,
/// new writes are refused with `QueueFull` rather than queued without end.
#[derive(Clone, Copy, Debug)]
pub(super) struct QueueLimits {
    pub commands: usize,
    pub bytes: usize,
}

/// Work for a worker: it gets the worker's connection, if one can be opened.
pub(super) enum Job {
    /// A write transaction, which may commit together with other writes (see [`group`]).
    Write(Box<dyn GroupWrite>),
    /// Anything else, with the worker itself.
    Other(Box<dyn FnOnce(&mut Worker) + Send>),
}

pub(super) struct Pool {
    /// The work waiting for a worker, in lanes by share.
    queue: Arc<Lanes<Job>>,
    limits: QueueLimits,
    /// Writes waiting or running, and their payload bytes.
    queued: Arc<AtomicUsize>,
    queued_bytes: Arc<AtomicUsize>,
    /// Closed (every sender gone) when the last worker has stopped.
    stopped: Mutex<Option<tokio::sync::mpsc::Receiver<()>>>,
}

/// A worker thread's state: its connection, opened when first needed.
pub(super) struct Worker {
    database: Database,
    connection: Option<Connection>,
    clock: Clock,
}

impl Worker {
    /// "Now", by the server's clock.
    pub(super) fn now_millis(&self) -> i64 {
        self.clock.now_millis()
    }

    /// Forgets the connection (it broke, or its state is unknown): the next work opens
    /// a new one.
    pub(super) fn drop_connection(&mut self) {
        self.connection = None;
    }

    /// The worker's connection, opened (again) if it has none or it closed.
    pub(super) fn connection(&mut self) -> LedgerResult<&mut Connection> {
        if self
            .connection
            .as_ref()
            .is_some_and(|c| c.client.is_closed())
        {
            self.connection = None;
        }
        if self.connection.is_none() {
            self.connection = Some(Connection::open(&self.database)?);
        }
        Ok(self.connection.as_mut().expect("just opened"))
    }

    /// Runs `work` in one transaction and commits it; again after a lost race.
    pub(super) fn transaction<T, F>(&mut self, access: Access, work: &F) -> LedgerResult<T>
    where
        F: for<'t> Fn(&mut PgTx<'t>, i64) -> LedgerResult<T>,
    {
        let clock = self.clock.clone();
        let mut attempt = 1;
        let mut reconnected = false;
        loop {
            let connection = self.connection()?;
            match attempt_once(connection, access, &clock, work) {
                Ok(done) => return Ok(done),
                Err(failed)
                    if failed.failure == Some(Failure::Conflict) && attempt < MAX_ATTEMPTS =>
                {
                    attempt += 1;
                }
                Err(failed) if failed.failure == Some(Failure::Connection) => {
                    self.connection = None;
                    // A connection that broke while idle (the database restarted) fails its
                    // next transaction before anything commits: run it once more on a new
                    // one. A commit whose answer was lost may have committed: the caller
                    // is told to try again, and the ledger dedupes what it sends.
                    if !reconnected && !failed.at_commit {
                        reconnected = true;
                        continue;
                    }
                    tracing::warn!(error = %failed.error, "lost the database connection");
                    return Err(failed.error);
                }
                Err(failed) => return Err(failed.error),
            }
        }
    }
}

/// Runs `job` on `worker`, with the writes queued right behind it if it is a write (they
/// commit together), and frees their lanes.
fn work_on(worker: &mut Worker, queue: &Lanes<Job>, job: Job, lane: Lane) {
    let first = match job {
        Job::Other(job) => {
            job(worker);
            queue.done(lane);
            return;
        }
        Job::Write(first) => first,
    };
    let mut writes = vec![first];
    let mut lanes = vec![lane];
    let more = queue.take_more(group::MAX_GROUP - 1, |job| matches!(job, Job::Write(_)));
    for (job, lane) in more {
        if let Job::Write(write) = job {
            writes.push(write);
        }
        lanes.push(lane);
    }
    group::run(worker, writes);
    lanes.into_iter().for_each(|lane| queue.done(lane));
}

impl Pool {
    /// Starts `workers` threads named `<name>-<n>`, each connecting when it first gets work.
    pub(super) fn start(
        name: &str,
        database: &Database,
        workers: u32,
        limits: QueueLimits,
        clock: &Clock,
    ) -> LedgerResult<Arc<Self>> {
        let (alive, stopped) = tokio::sync::mpsc::channel::<()>(1);
        let queue = Arc::new(Lanes::<Job>::new());
        for n in 0..workers.max(1) {
            let queue = Arc::clone(&queue);
            let alive = alive.clone();
            let mut worker = Worker {
                database: database.clone(),
                connection: None,
                clock: clock.clone(),
            };
            std::thread::Builder::new()
                .name(format!("{name}-{n}"))
                .spawn(move || {
                    let _alive = alive;
                    // Ends once the pool closed and the queue is drained.
                    while let Some((job, lane)) = queue.take() {
                        work_on(&mut worker, &queue, job, lane);
                    }
                })
                .map_err(|e| {
                    LedgerError::Storage(format!("cannot start a database worker: {e}"))
                })?;
        }
        Ok(Arc::new(Self {
            queue,
            limits,
            queued: Arc::new(AtomicUsize::new(0)),
            queued_bytes: Arc::new(AtomicUsize::new(0)),
            stopped: Mutex::new(Some(stopped)),
        }))
    }

    /// Runs `work` in one transaction on a worker and resolves to its result once
    /// committed; `after_commit` runs on the worker right after the commit, whether or
    /// not anyone still waits. The work is queued now: dropping the future cancels nothing.
    /// Work with the same `order` key runs one at a time, in the order it was queued.
    pub(super) fn run<T, F, A>(
        &self,
        order: Option<&str>,
        access: Access,
        bytes: usize,
        work: F,
        after_commit: A,
    ) -> BoxFuture<'static, LedgerResult<T>>
    where
        T: Send + 'static,
        F: for<'t> Fn(&mut PgTx<'t>, i64) -> LedgerResult<T> + Send + 'static,
        A: FnOnce(&T) + Send + 'static,
    {
        if access == Access::Read {
            return self.submit(order, move |worker| {
                let done = worker.transaction(access, &work)?;
                after_commit(&done);
                Ok(done)
            });
        }
        let admitted = match self.admit(bytes) {
            Ok(admitted) => admitted,
            Err(e) => return futures::future::ready(Err(e)).boxed(),
        };
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job = Job::Write(Box::new(WriteJob::new(
            work,
            after_commit,
            answer,
            admitted,
        )));
        self.queued_answer(order, job, answered)
    }

    /// Runs `job` on a worker, with the worker itself (for work outside a transaction):
    /// the first free one, after the earlier work of its `order` key.
    pub(super) fn submit<T, J>(
        &self,
        order: Option<&str>,
        job: J,
    ) -> BoxFuture<'static, LedgerResult<T>>
    where
        T: Send + 'static,
        J: FnOnce(&mut Worker) -> LedgerResult<T> + Send + 'static,
    {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job = Job::Other(Box::new(move |worker| {
            let _ = answer.send(job(worker));
        }));
        self.queued_answer(order, job, answered)
    }

    /// Queues `job`; resolves to what it answers on `answered`.
    fn queued_answer<T: Send + 'static>(
        &self,
        order: Option<&str>,
        job: Job,
        answered: tokio::sync::oneshot::Receiver<LedgerResult<T>>,
    ) -> BoxFuture<'static, LedgerResult<T>> {
        if self.queue.push(order, job).is_err() {
            return futures::future::ready(Err(LedgerError::Closed)).boxed();
        }
        async move { answered.await.map_err(|_| LedgerError::Closed)? }.boxed()
    }

    /// Counts a write in, or refuses it when too much is already waiting.
    fn admit(&self, bytes: usize) -> LedgerResult<Admitted> {
        let commands = self.queued.fetch_add(1, Ordering::AcqRel) + 1;
        let total = self.queued_bytes.fetch_add(bytes, Ordering::AcqRel) + bytes;
        let admitted = Admitted {
            queued: Arc::clone(&self.queued),
            queued_bytes: Arc::clone(&self.queued_bytes),
            bytes,
        };
        // One write alone always fits, however large.
        if commands > self.limits.commands || (commands > 1 && total > self.limits.bytes) {
            return Err(LedgerError::QueueFull);
        }
        Ok(admitted)
    }

    /// Takes no more work from now on; the returned future resolves once the workers
    /// have finished what was queued and stopped (closing their connections).
    pub(super) fn close(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.queue.close();
        let stopped = self
            .stopped
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        async move {
            if let Some(mut stopped) = stopped {
                // `None` once every worker dropped its sender.
                stopped.recv().await;
            }
        }
    }
}

/// A write counted in the queue until it finishes.
pub(super) struct Admitted {
    queued: Arc<AtomicUsize>,
    queued_bytes: Arc<AtomicUsize>,
    bytes: usize,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.queued.fetch_sub(1, Ordering::AcqRel);
        self.queued_bytes.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Why one run of a transaction failed.
struct Failed {
    error: LedgerError,
    /// What the failed statement said about the transaction and the connection.
    failure: Option<Failure>,
    /// It was the commit that failed: the transaction may have committed.
    at_commit: bool,
}

/// Runs `work` once in a transaction and commits it.
fn attempt_once<T, F>(
    connection: &mut Connection,
    access: Access,
    clock: &Clock,
    work: &F,
) -> Result<T, Failed>
where
    F: for<'t> Fn(&mut PgTx<'t>, i64) -> LedgerResult<T>,
{
    let failed = |e: postgres::Error| Failed {
        error: to_ledger(&e),
        failure: Some(classify(&e)),
        at_commit: false,
    };
    let begin = match access {
        Access::Write => group::BEGIN_WRITE,
        Access::Read => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
    };
    let mut pg = PgTx::new(connection, begin);
    match work(&mut pg, clock.now_millis()) {
        Ok(done) => match pg.commit() {
            Ok(()) => Ok(done),
            Err(Committing::Before(e)) => Err(failed(e)),
            Err(Committing::At(e)) => Err(Failed {
                at_commit: true,
                ..failed(e)
            }),
        },
        Err(error) => {
            let failure = pg.failure();
            pg.rollback();
            Err(Failed {
                error,
                failure,
                at_commit: false,
            })
        }
    }
}
