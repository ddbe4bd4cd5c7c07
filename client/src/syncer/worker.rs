//! The syncer's loop: connect and redeem, send the next batches (several in flight where
//! the server keeps them in order), record the answers, back off.

use std::convert::Infallible;
use std::fs::{File, TryLockError};
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use capsync_shared::now_millis;
use tokio::sync::futures::Notified;
use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};

use super::backoff::{Backoff, RETRY_AFTER_CAP};
use super::classify::{AppendFailure, ConnectFailure, append_failure, connect_failure};
use super::pipeline::{Answered, Pipeline};
use super::{Control, SyncError, SyncOptions, SyncState, SyncStatus};
use crate::connection::Connection;
use crate::outbox::{Outbox, OutboxBatch, OutboxStatus, Refusal};
use crate::server_addr::{ServerAddr, ServerList};
use crate::writer::WriterClient;

/// How long closing a dropped connection may take before it is abandoned.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Counting the outbox's rows by state is an index scan that grows with the acked rows
/// kept (about 30 ms for a million); while batches stream, counts are refreshed at most
/// this often. Every other state change refreshes them.
const RECOUNT_INTERVAL: Duration = Duration::from_millis(100);

/// Which counts a status update carries.
enum Counts {
    /// Just read by the caller.
    Given(OutboxStatus),
    /// Read them now.
    Read,
    /// Read them if the last read is older than [`RECOUNT_INTERVAL`], else keep them.
    IfStale,
}

/// A connection with the writer redeemed on it.
struct Live {
    /// Kept to close the connection cleanly when it is dropped after a failure.
    conn: Connection,
    /// The share's `ShareWriter`, redeemed from the token on this connection.
    writer: WriterClient,
    /// Which server it is connected to.
    server: ServerAddr,
}

/// The syncer task's state; lives on the `LocalSet` (the writer capability is `!Send`).
pub(super) struct Worker {
    /// What it drains.
    outbox: Outbox,
    /// Where to and how fast; holds the token, in memory only.
    options: SyncOptions,
    /// The public status ([`super::Syncer::watch`]).
    status: watch::Sender<SyncStatus>,
    /// Idle generation and fatal error, for [`super::Syncer::wait_idle`].
    control: watch::Sender<Control>,
    /// `None` after a failure: the next step reconnects and redeems again.
    live: Option<Live>,
    /// The share the outbox was bound to, once the token was first redeemed.
    share_id: Option<String>,
    /// Delays between failed attempts; reset by an ack.
    backoff: Backoff,
    /// Failed attempts so far, for the status.
    retries: u64,
    /// The latest failure, until an ack succeeds.
    last_error: Option<String>,
    /// When the published counts were read.
    counted_at: Option<tokio::time::Instant>,
    /// Held while this syncer runs, so no second one sends from the same outbox.
    lock: Option<File>,
    /// The servers to try, parsed when the run starts.
    servers: Option<ServerList>,
    /// The server used last, tried first by the next connect.
    server_index: usize,
    /// Whether a connection was ever made (to log a move to another server).
    live_before: bool,
    /// The batches sent on the live connection and not answered yet.
    pipeline: Pipeline,
}

impl Worker {
    pub(super) fn new(
        outbox: Outbox,
        options: SyncOptions,
        status: watch::Sender<SyncStatus>,
        control: watch::Sender<Control>,
    ) -> Self {
        let backoff = Backoff::new(options.backoff_initial, options.backoff_max);
        Self {
            outbox,
            options,
            status,
            control,
            live: None,
            share_id: None,
            backoff,
            retries: 0,
            last_error: None,
            counted_at: None,
            lock: None,
            servers: None,
            server_index: 0,
            live_before: false,
            pipeline: Pipeline::default(),
        }
    }

    /// Runs until `stop` fires (or its sender is dropped) or a fatal error.
    pub(super) async fn run_until_stopped(mut self, mut stop: oneshot::Receiver<()>) {
        let ended = {
            let run = self.run();
            tokio::pin!(run);
            tokio::select! {
                biased;
                _ = &mut stop => None,
                fatal = &mut run => Some(fatal),
            }
        };
        // Whatever step was cut short, the outbox holds what is needed to resume it.
        self.close_connection();
        match ended {
            None => {
                debug!("syncer stopped");
                let state = self.status.borrow().state.clone();
                self.publish(state, Counts::Read).await;
            }
            Some(Err(fatal)) => self.stop_on(fatal).await,
            Some(Ok(never)) => match never {},
        }
    }

    async fn run(&mut self) -> Result<Infallible, SyncError> {
        // A malformed address never gets better: say so rather than retry forever.
        self.servers = match self.options.server.parse::<ServerList>() {
            Ok(servers) => Some(servers),
            Err(e) => return Err(SyncError::Stopped(format!("the server address: {e}"))),
        };
        self.lock = Some(lock_outbox(self.outbox.path())?);
        loop {
            let Some(writer) = self.writer().await? else {
                continue;
            };
            // Register for wake-ups before looking, so an enqueue between the look and the
            // wait is not missed (and read the generation before the look, for wait_idle).
            let changed = self.outbox.changed();
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let generation = self.outbox.generation();
            // Several batches in flight only where the server keeps them in order.
            let limit = if writer.orders_pipelined_batches() {
                self.options.max_in_flight.max(1)
            } else {
                1
            };
            if self.pipeline.len() < limit {
                let next = self
                    .outbox
                    .next_batch_alongside(
                        self.options.batch_size,
                        now_millis(),
                        self.pipeline.batch_ids(),
                    )
                    .await?;
                if let Some(batch) = next {
                    let counts = if self.status.borrow().state == SyncState::Syncing {
                        Counts::IfStale
                    } else {
                        Counts::Read
                    };
                    self.pipeline
                        .send(&writer, batch, self.options.call_timeout);
                    self.publish(SyncState::Syncing, counts).await;
                    continue;
                }
            }
            if self.pipeline.is_empty() {
                self.wait_for_work(notified, generation).await?;
                continue;
            }
            // The oldest answer, or new ops that may fill a batch to send alongside.
            let room = self.pipeline.len() < limit;
            let answered = tokio::select! {
                biased;
                answered = self.pipeline.oldest_answer() => Some(answered),
                _ = notified, if room => None,
            };
            if let Some((batch, answered)) = answered {
                self.settle(batch, answered).await?;
            }
        }
    }

    /// The live writer, connecting and redeeming first if needed. `None` after a failed
    /// attempt (already backed off).
    async fn writer(&mut self) -> Result<Option<WriterClient>, SyncError> {
        if let Some(live) = &self.live {
            return Ok(Some(live.writer.clone()));
        }
        self.publish(SyncState::Connecting, Counts::Read).await;
        match self.connect().await {
            Ok(live) => {
                let writer = live.writer.clone();
                let state = writer.state_at_redeem().clone();
                let server = live.server.to_string();
                // Kept before binding, so a wrong share still closes the connection.
                self.live = Some(live);
                self.outbox.bind(&state.share_id, &server).await?;
                self.share_id = Some(state.share_id.clone());
                self.outbox.record_cursor(state.cursor).await?;
                info!(share = %state.share_id, cursor = state.cursor, %server, "syncer connected");
                Ok(Some(writer))
            }
            Err(ConnectFailure::Fatal(fatal)) => Err(fatal),
            Err(ConnectFailure::Retry {
                message,
                retry_after,
            }) => {
                self.back_off(message, None, retry_after).await?;
                Ok(None)
            }
        }
    }

    /// Connects to the server used last (or the next one that can be reached) and
    /// redeems the token there. A failed attempt moves on: the next one starts with the
    /// server after, since this one may be gone for good (a node that died).
    async fn connect(&mut self) -> Result<Live, ConnectFailure> {
        // Both steps are bounded by the connect timeout, and like any call never longer
        // than the call timeout.
        let mut connection = self.options.connection.clone();
        connection.connect_timeout = connection.connect_timeout.min(self.options.call_timeout);
        let servers = self
            .servers
            .clone()
            .expect("parsed when the syncer started");
        let count = servers.addrs().len();
        let (conn, index) = crate::connect_any(&servers, self.server_index, &connection)
            .await
            .map_err(|e| {
                self.server_index = (self.server_index + 1) % count;
                connect_failure(&e)
            })?;
        let server = servers.addrs()[index].clone();
        let redeemed = conn
            .redeem(&self.options.token)
            .await
            .and_then(|redeemed| redeemed.into_writer())
            .map_err(|e| connect_failure(&e));
        match redeemed {
            Ok(writer) => {
                if self.live_before && index != self.server_index {
                    info!(%server, "moved to another server");
                }
                self.server_index = index;
                self.live_before = true;
                Ok(Live {
                    conn,
                    writer,
                    server,
                })
            }
            Err(failure) => {
                close(conn);
                self.server_index = (index + 1) % count;
                Err(failure)
            }
        }
    }

    /// Records what came of the oldest batch on its way. Any answer but an ack drops the
    /// batches sent after it (the server refuses them, `outOfOrder`): the outbox sends
    /// them again after this one.
    async fn settle(&mut self, batch: OutboxBatch, answered: Answered) -> Result<(), SyncError> {
        let error = match answered {
            Answered::Ack(ack) => {
                let summary = self.outbox.record_ack(&batch, &ack).await?;
                debug!(batch = %batch.batch_id, applied = summary.applied, duplicates = summary.duplicates,
                    rejected = summary.rejected, waiting = summary.waiting, cursor = summary.cursor, "batch acked");
                self.backoff.reset();
                self.last_error = None;
                self.publish(SyncState::Syncing, Counts::IfStale).await;
                return Ok(());
            }
            Answered::Failed(error) => error,
            Answered::TimedOut => {
                let message = format!(
                    "timed out after {} waiting for the server at {} to answer batch {}",
                    humantime::format_duration(self.options.call_timeout),
                    self.options.server,
                    batch.batch_id,
                );
                return self.back_off(message, Some(&batch), None).await;
            }
        };
        self.pipeline.clear();
        match append_failure(&error) {
            AppendFailure::Retry { retry_after } => {
                self.back_off(error.to_string(), Some(&batch), retry_after)
                    .await
            }
            AppendFailure::Fatal(fatal) => {
                // On the batch too, so the outbox's status explains why it is stuck.
                let _ = self
                    .outbox
                    .record_failure(&batch, &fatal.to_string(), now_millis())
                    .await;
                Err(fatal)
            }
            AppendFailure::Refused(reason) => {
                let detail = match &error {
                    crate::ClientError::Remote { message, .. } => message.clone(),
                    other => other.to_string(),
                };
                match self.outbox.record_refusal(&batch, reason, &detail).await? {
                    Refusal::Split { first, second } => {
                        info!(batch = %batch.batch_id, %first, %second, %detail, "batch refused whole; split in two");
                    }
                    Refusal::Rejected { op_id } => {
                        warn!(%op_id, %reason, %detail, "op refused by the server; rejected for good");
                    }
                }
                Ok(())
            }
            AppendFailure::CursorConflict(cursor) => {
                // The outbox never fences, so this needs a server that disagrees with us
                // about the batch. Take its cursor and retry after a pause, never in a spin.
                self.outbox.record_cursor(cursor).await?;
                self.back_off(error.to_string(), Some(&batch), None).await
            }
        }
    }

    /// Nothing to send now: wait for the next retry time, or for ops.
    async fn wait_for_work(
        &mut self,
        notified: Pin<&mut Notified<'_>>,
        generation: u64,
    ) -> Result<(), SyncError> {
        let status = self.outbox.status().await?;
        if status.in_flight > 0 {
            // The oldest batch waits for a retry time set before (by an earlier run, or
            // another process; a server's hint may have set it past the backoff's cap).
            // Capped, in case the clock jumped back since.
            let cap = self.options.backoff_max.max(RETRY_AFTER_CAP);
            let wait = status
                .next_retry_at
                .map_or(0, |at| at.saturating_sub(now_millis()))
                .clamp(1, cap.as_millis().max(1) as i64) as u64;
            self.publish(
                SyncState::Backoff { retry_in_ms: wait },
                Counts::Given(status),
            )
            .await;
            tokio::time::sleep(Duration::from_millis(wait)).await;
            return Ok(());
        }
        self.publish(SyncState::Idle, Counts::Given(status)).await;
        self.control.send_modify(|control| {
            control.idle_at = Some(control.idle_at.map_or(generation, |g| g.max(generation)));
        });
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep(self.options.poll_interval) => {}
        }
        Ok(())
    }

    /// A failed attempt: record it, drop the connection, wait (at least `retry_after`,
    /// the server's hint, when it gave one).
    async fn back_off(
        &mut self,
        message: String,
        batch: Option<&OutboxBatch>,
        retry_after: Option<Duration>,
    ) -> Result<(), SyncError> {
        self.retries += 1;
        self.close_connection();
        let delay = self.backoff.next_delay(retry_after);
        warn!(error = %message, retry_in = ?delay, "sync attempt failed");
        let retry_at = now_millis().saturating_add(delay.as_millis() as i64);
        match batch {
            Some(batch) => {
                self.outbox
                    .record_failure(batch, &message, retry_at)
                    .await?
            }
            None => self.outbox.record_error(&message).await?,
        }
        self.last_error = Some(message);
        let retry_in_ms = delay.as_millis() as u64;
        self.publish(SyncState::Backoff { retry_in_ms }, Counts::Read)
            .await;
        tokio::time::sleep(delay).await;
        Ok(())
    }

    async fn stop_on(&mut self, fatal: SyncError) {
        let message = fatal.to_string();
        warn!(error = %message, "syncer stopped");
        // For a later `status` of the outbox, from any process (best effort: the outbox
        // itself may be what failed).
        let _ = self.outbox.record_error(&message).await;
        self.last_error = Some(message.clone());
        // Before the status, so whoever sees `Stopped` finds the error in `Syncer::fatal`
        // (`wait_idle` waits for the status in turn).
        self.control
            .send_modify(|control| control.fatal = Some(fatal));
        self.publish(SyncState::Stopped { error: message }, Counts::Read)
            .await;
    }

    /// Publishes `state`, with the counts `counts` asks for.
    async fn publish(&mut self, state: SyncState, counts: Counts) {
        let counts = match counts {
            Counts::Given(counts) => Some(counts),
            Counts::IfStale
                if self
                    .counted_at
                    .is_some_and(|at| at.elapsed() < RECOUNT_INTERVAL) =>
            {
                None
            }
            // If the outbox cannot be read, the next step fails on it and says so.
            Counts::Read | Counts::IfStale => self.outbox.status().await.ok(),
        };
        if counts.is_some() {
            self.counted_at = Some(tokio::time::Instant::now());
        }
        let (retries, last_error) = (self.retries, self.last_error.clone());
        let share_id = self.share_id.clone();
        let calls_in_flight = self.pipeline.len();
        self.status.send_modify(|status| {
            status.state = state;
            status.share_id = share_id;
            if let Some(counts) = counts {
                status.pending = counts.pending;
                status.in_flight = counts.in_flight;
                status.waiting = counts.waiting;
                status.acked = counts.acked;
                status.rejected = counts.rejected;
                status.last_acked_cursor = counts.last_cursor;
            }
            status.retries = retries;
            status.last_error = last_error;
            status.calls_in_flight = calls_in_flight;
        });
    }

    fn close_connection(&mut self) {
        self.pipeline.clear();
        if let Some(live) = self.live.take() {
            drop(live.writer);
            close(live.conn);
        }
    }
}

/// Takes the lock that makes a syncer the only one sending from `outbox_path` (in this
/// process or any other). Two would both send the oldest in-flight batch, and the slower
/// one's ack would then be refused locally; harmless to the share (the server dedupes),
/// but a needless stop. The OS releases the lock when the process dies.
fn lock_outbox(outbox_path: &Path) -> Result<File, SyncError> {
    let mut path = outbox_path.as_os_str().to_owned();
    path.push(".sync-lock");
    let io = |e: std::io::Error| SyncError::Outbox(e.into());
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(SyncError::Busy(format!(
            "another syncer is already sending from the outbox {}; run one at a time",
            outbox_path.display()
        ))),
        Err(TryLockError::Error(e)) => Err(io(e)),
    }
}

/// Closes a connection in the background: its `RpcSystem` would otherwise keep the socket
/// open for as long as the `LocalSet` runs.
fn close(conn: Connection) {
    tokio::task::spawn_local(async move {
        let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, conn.disconnect()).await;
    });
}
