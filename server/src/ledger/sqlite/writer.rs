//! The one writer: a thread owning the write connection, running queued commands in group-commit transactions.
//!
//! The thread blocks for a first command, then takes whatever else is already
//! queued (up to `max_group`), and runs them all in one `BEGIN IMMEDIATE`
//! transaction, each inside its own savepoint. Replies go out only after
//! `COMMIT` returns, so an ack always means durable. While one group's commit
//! waits for the disk, new commands queue up and form the next group: the
//! slower the disk, the larger the groups.
//!
//! Exclusive commands (VACUUM, truncating checkpoints) cannot run inside a
//! transaction: the thread runs each alone, between groups, in queue order.
//!
//! The queue is bounded ([`QueueLimits`]): past so many commands, or so many
//! bytes of payload waiting, new work is refused with `QueueFull` at once
//! instead of piling up in memory. Audit lines have a bound of their own and
//! are dropped (with a warning) rather than refused. After each group the
//! thread tells its [`StorageWatch`] what happened, which notices a full disk
//! and its end.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot, watch};

use super::storage::StorageWatch;
use super::tx::SqliteTx;
use crate::ledger::rules::batch_order::TransactionId;
use crate::ledger::rules::store::LedgerTx;
use crate::ledger::{AuditEvent, LedgerError, LedgerResult};

/// Audit lines waiting at most; more are dropped until the writer catches up.
const MAX_QUEUED_AUDITS: usize = 10_000;

/// How much work may wait for the writer.
#[derive(Clone, Copy, Debug)]
pub(super) struct QueueLimits {
    /// Commands queued or running.
    pub commands: usize,
    /// Bytes of payload among them (a command alone is always let in).
    pub bytes: usize,
}

/// What is queued now, shared by the callers (who add) and the thread (which takes).
#[derive(Debug)]
struct QueueGauge {
    limits: QueueLimits,
    commands: AtomicUsize,
    bytes: AtomicUsize,
    audits: AtomicUsize,
    /// Set while audit lines are being dropped, so that is logged once per episode.
    dropping_audits: AtomicBool,
}

impl QueueGauge {
    /// Counts a command of `bytes` in, unless the queue is full.
    fn admit(self: &Arc<Self>, bytes: usize) -> Option<Ticket> {
        let commands = self.commands.fetch_add(1, Ordering::AcqRel);
        let before = self.bytes.fetch_add(bytes, Ordering::AcqRel);
        let ticket = Ticket {
            gauge: Arc::clone(self),
            bytes,
        };
        let too_many = commands >= self.limits.commands;
        let too_big = before > 0 && before + bytes > self.limits.bytes;
        // Dropping the ticket gives both counts back.
        (!too_many && !too_big).then_some(ticket)
    }
}

/// One admitted command's place in the queue; dropping it frees the place.
#[derive(Debug)]
struct Ticket {
    gauge: Arc<QueueGauge>,
    bytes: usize,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.gauge.commands.fetch_sub(1, Ordering::AcqRel);
        self.gauge.bytes.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// The caller-facing half of the writer thread. Dropping it lets the thread
/// finish what is queued and stop.
pub(super) struct Writer {
    /// Commands to the thread. Unbounded because `audit` may neither block nor
    /// fail; the RPC layer bounds the calls in flight, and so the queue.
    commands: mpsc::UnboundedSender<Command>,
    /// Set by `close`, so later calls fail at once instead of racing the shutdown.
    closing: AtomicBool,
    /// Turns true once the thread has committed its last group and closed the
    /// connection; `close` waits on it.
    stopped: watch::Receiver<bool>,
    /// What waits in the queue, against its limits.
    queue: Arc<QueueGauge>,
    /// What the thread has committed, so tests can see how commands were grouped.
    #[cfg(test)]
    stats: Arc<WriterStats>,
}

/// Counters kept by the writer thread.
#[derive(Debug, Default)]
pub(super) struct WriterStats {
    /// Transactions committed.
    transactions: AtomicU64,
    /// Commands (not counting audit lines) whose work was committed.
    commands: AtomicU64,
}

#[cfg(test)]
impl WriterStats {
    pub fn transactions(&self) -> u64 {
        self.transactions.load(Ordering::SeqCst)
    }

    pub fn commands(&self) -> u64 {
        self.commands.load(Ordering::SeqCst)
    }
}

enum Command {
    /// Runs in the next group transaction.
    Job(Box<dyn Job>),
    /// Runs alone, with no transaction open, once everything queued before it has committed.
    Exclusive(Box<dyn Job>),
    /// An audit line and the time it happened.
    Audit(AuditEvent, i64),
    /// Take nothing new; finish what is queued and stop.
    Close,
}

/// A queued piece of work with its reply channel, type-erased for the queue.
trait Job: Send {
    /// Runs the work (inside the job's savepoint, unless it is exclusive) as part of
    /// `transaction` and keeps its result. Returns false when its changes must be
    /// rolled back.
    fn run(&mut self, conn: &Connection, transaction: TransactionId) -> bool;

    /// Whether the work failed because the storage is full.
    fn hit_storage_full(&self) -> bool;

    /// Whether the work succeeded (its changes are kept if the group commits).
    fn succeeded(&self) -> bool;

    /// Bytes of payload it writes (appends); 0 for small bookkeeping writes.
    fn payload_bytes(&self) -> usize;

    /// Sends the kept result, or the commit's error if the group did not commit.
    fn finish(self: Box<Self>, commit: &Result<(), LedgerError>);
}

/// Called on the writer thread with a job's result once its group has committed.
pub(super) type OnCommit<T> = Box<dyn FnOnce(&T) + Send>;

struct Pending<T, F> {
    /// Taken when run.
    work: Option<F>,
    /// The work's result, held back until the commit is known.
    result: Option<LedgerResult<T>>,
    reply: oneshot::Sender<LedgerResult<T>>,
    /// Runs after the commit whether or not anyone still waits for the reply: what
    /// a commit announces must not depend on its caller staying around.
    on_commit: Option<OnCommit<T>>,
    /// Its place in the queue, freed when the job is done with.
    ticket: Ticket,
}

impl<T, F> Job for Pending<T, F>
where
    T: Send,
    F: FnOnce(&Connection, TransactionId) -> LedgerResult<T> + Send,
{
    fn run(&mut self, conn: &Connection, transaction: TransactionId) -> bool {
        let Some(work) = self.work.take() else {
            return false;
        };
        // A bug that panics inside one command must fail that command, not kill
        // the only writer thread (which would leave every later write `Closed`).
        // Its changes are undone with its savepoint (or the group's rollback;
        // an exclusive command's statements each commit or fail whole).
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(conn, transaction)))
                .unwrap_or_else(|_| {
                    tracing::error!("a ledger command panicked; it was rolled back");
                    Err(LedgerError::Storage("a ledger command panicked".into()))
                });
        let keep = result.is_ok();
        self.result = Some(result);
        keep
    }

    fn hit_storage_full(&self) -> bool {
        matches!(self.result, Some(Err(LedgerError::StorageFull)))
    }

    fn succeeded(&self) -> bool {
        matches!(self.result, Some(Ok(_)))
    }

    fn payload_bytes(&self) -> usize {
        self.ticket.bytes
    }

    fn finish(self: Box<Self>, commit: &Result<(), LedgerError>) {
        let result = match (commit, self.result) {
            (Err(e), _) => Err(e.clone()),
            (Ok(()), Some(result)) => result,
            (Ok(()), None) => Err(LedgerError::Storage("command was not run".into())),
        };
        if let (Ok(value), Some(on_commit)) = (&result, self.on_commit) {
            on_commit(value);
        }
        // The caller may have given up waiting; nothing to do then.
        let _ = self.reply.send(result);
    }
}

impl Writer {
    /// Starts the writer thread on `conn`.
    pub fn start(
        conn: Connection,
        max_group: usize,
        limits: QueueLimits,
        storage: StorageWatch,
    ) -> LedgerResult<Self> {
        let (commands, queue) = mpsc::unbounded_channel();
        let (stopped_tx, stopped) = watch::channel(false);
        let stats = Arc::new(WriterStats::default());
        let thread_stats = Arc::clone(&stats);
        let gauge = Arc::new(QueueGauge {
            limits: QueueLimits {
                commands: limits.commands.max(1),
                bytes: limits.bytes,
            },
            commands: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            audits: AtomicUsize::new(0),
            dropping_audits: AtomicBool::new(false),
        });
        let thread_gauge = Arc::clone(&gauge);
        std::thread::Builder::new()
            .name("capsync-ledger-writer".into())
            .spawn(move || {
                run(
                    conn,
                    queue,
                    max_group.max(1),
                    &thread_stats,
                    &thread_gauge,
                    storage,
                );
                stopped_tx.send_replace(true);
            })
            .map_err(|e| LedgerError::Storage(format!("cannot start the writer thread: {e}")))?;
        Ok(Self {
            commands,
            closing: AtomicBool::new(false),
            stopped,
            queue: gauge,
            #[cfg(test)]
            stats,
        })
    }

    /// Queues `work` to run in the next group transaction. Resolves once that
    /// transaction has committed (or failed). The command is queued before
    /// this returns, so calls are applied in the order they were made.
    pub fn submit<T, F>(&self, work: F) -> impl Future<Output = LedgerResult<T>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> LedgerResult<T> + Send + 'static,
    {
        self.queue(move |conn, _| work(conn), Command::Job, 0, None)
    }

    /// [`submit`](Self::submit) for work that holds `bytes` of payload while it waits
    /// (counted against the queue's byte limit), is told the group transaction it runs
    /// in, and has `on_commit` run on the writer thread with the result once the
    /// transaction has committed (before the next group runs): also when the caller has
    /// stopped waiting (a cancelled call, a dropped connection).
    pub fn submit_then<T, F>(
        &self,
        bytes: usize,
        work: F,
        on_commit: OnCommit<T>,
    ) -> impl Future<Output = LedgerResult<T>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(&Connection, TransactionId) -> LedgerResult<T> + Send + 'static,
    {
        self.queue(work, Command::Job, bytes, Some(on_commit))
    }

    /// Queues `work` to run alone, in autocommit mode (VACUUM and truncating
    /// checkpoints cannot run inside a transaction). Everything queued before
    /// it is committed first; everything queued after it waits for it.
    pub fn exclusive<T, F>(&self, work: F) -> impl Future<Output = LedgerResult<T>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> LedgerResult<T> + Send + 'static,
    {
        self.queue(move |conn, _| work(conn), Command::Exclusive, 0, None)
    }

    /// Queues `work` as the command `kind` makes of it, and waits for its reply.
    fn queue<T, F>(
        &self,
        work: F,
        kind: fn(Box<dyn Job>) -> Command,
        bytes: usize,
        on_commit: Option<OnCommit<T>>,
    ) -> impl Future<Output = LedgerResult<T>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(&Connection, TransactionId) -> LedgerResult<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let queued = if self.closing.load(Ordering::Acquire) {
            Err(LedgerError::Closed)
        } else if let Some(ticket) = self.queue.admit(bytes) {
            let job = Pending {
                work: Some(work),
                result: None,
                reply,
                on_commit,
                ticket,
            };
            self.commands
                .send(kind(Box::new(job)))
                .map_err(|_| LedgerError::Closed)
        } else {
            Err(LedgerError::QueueFull)
        };
        async move {
            queued?;
            // A dropped reply means the thread is gone (it stopped or panicked).
            answer.await.unwrap_or(Err(LedgerError::Closed))
        }
    }

    /// Queues an audit line. Never blocks or fails the caller: when the writer
    /// is far behind (or closed), the line is dropped with a warning.
    pub fn audit(&self, event: AuditEvent, at: i64) {
        let gauge = &self.queue;
        if gauge.audits.fetch_add(1, Ordering::AcqRel) >= MAX_QUEUED_AUDITS {
            gauge.audits.fetch_sub(1, Ordering::AcqRel);
            if !gauge.dropping_audits.swap(true, Ordering::AcqRel) {
                tracing::warn!(
                    queued = MAX_QUEUED_AUDITS,
                    "audit lines are being dropped: the ledger's writer is far behind"
                );
            }
            return;
        }
        if self.closing.load(Ordering::Acquire)
            || self.commands.send(Command::Audit(event, at)).is_err()
        {
            gauge.audits.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!("audit line dropped: the ledger is closed");
        }
    }

    /// Refuses new work at once; resolves when everything accepted before has
    /// been committed and the thread has stopped.
    pub fn close(&self) -> impl Future<Output = ()> + Send + 'static {
        self.closing.store(true, Ordering::Release);
        // Fails only if the thread is already gone, which is what we wait for anyway.
        let _ = self.commands.send(Command::Close);
        let mut stopped = self.stopped.clone();
        async move {
            // An error means the thread dropped its sender: it has stopped too.
            let _ = stopped.wait_for(|stopped| *stopped).await;
        }
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    #[cfg(test)]
    pub fn stats(&self) -> &Arc<WriterStats> {
        &self.stats
    }

    #[cfg(test)]
    pub fn stopped(&self) -> watch::Receiver<bool> {
        self.stopped.clone()
    }
}

/// The thread's body: one group, or one exclusive command, per loop, until the
/// queue is closed and drained.
fn run(
    conn: Connection,
    mut queue: mpsc::UnboundedReceiver<Command>,
    max_group: usize,
    stats: &WriterStats,
    gauge: &QueueGauge,
    mut storage: StorageWatch,
) {
    let mut group = Vec::with_capacity(max_group);
    // An exclusive command that ended the gathering of a group: it runs right
    // after that group, before anything queued behind it.
    let mut exclusive = None;
    loop {
        if let Some(job) = exclusive.take() {
            run_exclusive(&conn, job, &mut storage);
            continue;
        }
        match queue.blocking_recv() {
            None => break,
            Some(Command::Exclusive(job)) => {
                run_exclusive(&conn, job, &mut storage);
                continue;
            }
            Some(first) => group.push(first),
        }
        exclusive = gather(&mut queue, &mut group, max_group);
        run_group(&conn, &mut queue, &mut group, stats, gauge, &mut storage);
    }
    tracing::debug!(
        transactions = stats.transactions.load(Ordering::Relaxed),
        commands = stats.commands.load(Ordering::Relaxed),
        "ledger writer stopped"
    );
    if let Err((_, e)) = conn.close() {
        tracing::warn!(error = %e, "closing the ledger's write connection failed");
    }
}

/// Adds what is already queued to `group`, up to `max_group` commands. Stops
/// at an exclusive command and returns it: it must not overtake the group.
fn gather(
    queue: &mut mpsc::UnboundedReceiver<Command>,
    group: &mut Vec<Command>,
    max_group: usize,
) -> Option<Box<dyn Job>> {
    while group.len() < max_group {
        match queue.try_recv() {
            Ok(Command::Exclusive(job)) => return Some(job),
            Ok(command) => group.push(command),
            Err(_) => break,
        }
    }
    None
}

/// Commits the commands of `group` (emptying it) in one transaction and replies to each.
fn run_group(
    conn: &Connection,
    queue: &mut mpsc::UnboundedReceiver<Command>,
    group: &mut Vec<Command>,
    stats: &WriterStats,
    gauge: &QueueGauge,
    storage: &mut StorageWatch,
) {
    let mut jobs: Vec<Box<dyn Job>> = Vec::with_capacity(group.len());
    let mut audits = Vec::new();
    for command in group.drain(..) {
        match command {
            Command::Job(job) => jobs.push(job),
            Command::Audit(event, at) => audits.push((event, at)),
            // Buffered commands are still received after this; new sends fail.
            Command::Close => queue.close(),
            Command::Exclusive(_) => {
                unreachable!("`gather` never puts an exclusive command in a group")
            }
        }
    }
    gauge.audits.fetch_sub(audits.len(), Ordering::AcqRel);
    if jobs.is_empty() && audits.is_empty() {
        return;
    }
    let bulk = jobs.iter().filter(|job| job.payload_bytes() > 0).count();
    if bulk > 0 && !storage.admit(bulk) {
        // Holding off after a full disk: payload writes are refused unread, so
        // they cannot eat the room kept for the database; bookkeeping goes on.
        let (refused, kept): (Vec<_>, Vec<_>) =
            jobs.into_iter().partition(|job| job.payload_bytes() > 0);
        for job in refused {
            job.finish(&Err(LedgerError::StorageFull));
        }
        jobs = kept;
        if jobs.is_empty() && audits.is_empty() {
            return;
        }
    }
    let outcome = commit_group(conn, &mut jobs, &audits);
    if outcome.is_ok() && !audits.is_empty() && gauge.dropping_audits.swap(false, Ordering::AcqRel)
    {
        tracing::info!("audit lines are written again");
    }
    let (full, written) = match &outcome {
        Ok(()) => {
            stats.transactions.fetch_add(1, Ordering::SeqCst);
            stats
                .commands
                .fetch_add(jobs.len() as u64, Ordering::SeqCst);
            (
                jobs.iter().filter(|job| job.hit_storage_full()).count(),
                jobs.iter().any(|job| job.succeeded()),
            )
        }
        Err(LedgerError::StorageFull) => (jobs.len().max(1), false),
        Err(e) => {
            tracing::error!(error = %e, commands = jobs.len(), "ledger group commit failed");
            (0, false)
        }
    };
    // Replies first: the storage watch may take a moment (a checkpoint).
    for job in jobs {
        job.finish(&outcome);
    }
    storage.after_write(conn, full, written);
}

/// Runs one exclusive command in autocommit mode and replies at once: each of
/// its statements committed as it ran.
fn run_exclusive(conn: &Connection, mut job: Box<dyn Job>, storage: &mut StorageWatch) {
    let succeeded = job.run(conn, TransactionId::next());
    if conn.is_autocommit() {
        let full = usize::from(job.hit_storage_full());
        job.finish(&Ok(()));
        storage.after_write(conn, full, false);
        return;
    }
    // A transaction left open would make every later group's BEGIN fail.
    tracing::error!("an exclusive ledger command left a transaction open; rolling it back");
    if let Err(e) = conn.execute_batch("ROLLBACK") {
        tracing::error!(error = %e, "rolling back after an exclusive command failed");
    }
    // A failed command keeps its own error; a "successful" one lost its work.
    let outcome = if succeeded {
        Err(LedgerError::Storage(
            "an exclusive command left a transaction open".into(),
        ))
    } else {
        Ok(())
    };
    job.finish(&outcome);
}

/// Runs one group in one transaction. On error nothing of the group is committed.
fn commit_group(
    conn: &Connection,
    jobs: &mut [Box<dyn Job>],
    audits: &[(AuditEvent, i64)],
) -> Result<(), LedgerError> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let transaction = TransactionId::next();
    let result = (|| {
        if let ([job], []) = (&mut *jobs, audits) {
            // Alone in its transaction, a command needs no savepoint (whose page
            // journal is a measurable cost on large batches): if it fails,
            // rolling back the transaction undoes exactly its own changes.
            // (After some errors, a full disk among them, the engine has rolled
            // it back already.)
            if !job.run(conn, transaction) {
                if !conn.is_autocommit() {
                    conn.execute_batch("ROLLBACK")?;
                }
                return Ok(());
            }
        } else {
            for job in jobs.iter_mut() {
                let full = in_savepoint(conn, |conn| job.run(conn, transaction))?;
                if full {
                    return Err(engine_rollback(job.hit_storage_full()));
                }
            }
            for (event, at) in audits {
                let full = in_savepoint(conn, |conn| {
                    match SqliteTx::in_transaction(conn, transaction).audit(event, *at) {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::warn!(error = %e, action = event.action, "audit line not written");
                            false
                        }
                    }
                })?;
                if full {
                    return Err(engine_rollback(false));
                }
            }
        }
        conn.execute_batch("COMMIT")?;
        Ok(())
    })();
    if result.is_err()
        && !conn.is_autocommit()
        && let Err(e) = conn.execute_batch("ROLLBACK")
    {
        tracing::error!(error = %e, "rolling back a failed group failed");
    }
    result
}

/// The group's error when the engine rolled back its whole transaction from
/// inside one command: storage full if that command ran out of space.
fn engine_rollback(storage_full: bool) -> LedgerError {
    if storage_full {
        LedgerError::StorageFull
    } else {
        LedgerError::Storage("the engine rolled back the group transaction".into())
    }
}

/// Runs `work` so that, when it reports failure, only its own changes are
/// undone. Returns true if the engine rolled back the whole transaction instead
/// (some errors, a full disk among them, do): the rest of the group must not
/// run, since it would run in autocommit mode, outside any group.
fn in_savepoint(
    conn: &Connection,
    work: impl FnOnce(&Connection) -> bool,
) -> Result<bool, LedgerError> {
    conn.execute_batch("SAVEPOINT command")?;
    let kept = work(conn);
    if conn.is_autocommit() {
        return Ok(true);
    }
    if kept {
        conn.execute_batch("RELEASE command")?;
    } else {
        conn.execute_batch("ROLLBACK TO command; RELEASE command")?;
    }
    Ok(false)
}
