//! The syncer: a background task that drains an [`Outbox`] into its share.
//!
//! It connects, redeems the writer token (kept in memory only), binds the outbox to the
//! share and records the share's cursor; then it repeatedly takes the next batch, appends
//! it with a per-call timeout and records the ack. When nothing is ready it waits for an
//! enqueue (or the next retry time). After a transport failure, a timeout or a transient
//! server error (`overloaded`, `rateLimited`, `storageFull`, `internal`) it records the
//! failure, drops the connection, backs off (exponential with jitter, capped; never less
//! than the server's `retryAfterMs` hint, itself capped at 5 minutes), reconnects, redeems
//! again and resends the *same* batch. A revoked or refused token stops it for good: the status turns
//! [`SyncState::Stopped`], and [`Syncer::fatal`] (or [`Syncer::wait_idle`]) gives the
//! [`SyncError`], whose variant says what happened. It never retries a dead capability.
//!
//! capnp-rpc is single-threaded, so the syncer runs on a tokio `LocalSet`
//! ([`spawn_syncer`] uses `spawn_local`). Its SQLite work runs on the blocking pool.
//!
//! One syncer per outbox file at a time (it holds a lock file next to the outbox; a second
//! one stops with [`SyncError::Busy`]).
//!
//! Modules: `worker` (the loop), `classify` (what each failure means), `backoff`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use capsync_client::{OpKind, OpSpec, Outbox, SyncOptions, spawn_syncer};
//!
//! // Inside a tokio LocalSet:
//! let outbox = Outbox::open("agent-state/outbox.db")?;
//! outbox
//!     .enqueue(OpSpec::new("diffs-1", OpKind::DiffSet, serde_json::json!([])))
//!     .await?;
//! let syncer = spawn_syncer(outbox.clone(), SyncOptions::new("127.0.0.1:7420", "cswriter_..."));
//! let status = syncer.wait_idle().await?;
//! println!("{} acked, cursor {:?}", status.acked, status.last_acked_cursor);
//! syncer.stop().await;
//! # Ok(()) }
//! ```

pub mod backoff;
mod classify;
pub(crate) mod error;
mod pipeline;
mod worker;

use std::time::Duration;

use serde::Serialize;
use tokio::sync::{oneshot, watch};

use crate::connection::ClientOptions;
use crate::outbox::Outbox;
use crate::push::DEFAULT_BATCH_SIZE;
pub use error::SyncError;

/// Batches a syncer keeps in flight by default (see [`SyncOptions::max_in_flight`]).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 4;

/// How a syncer reaches its share, and how it paces itself.
#[derive(Clone)]
pub struct SyncOptions {
    /// `host:port` of the capsync server's RPC port (see [`crate::ServerAddr`]), or several
    /// separated by commas: the nodes of one deployment on PostgreSQL ([`crate::ServerList`]).
    /// The syncer uses the first that answers and, when the one it uses cannot be reached,
    /// the next; what was not acked is sent again there and deduplicated by op id. A text
    /// that is not one stops the syncer at once, with the reason.
    pub server: String,
    /// The share's writer sturdy ref. Kept in memory only (never written to the outbox),
    /// redeemed again after every reconnect.
    pub token: String,
    /// Most ops per batch (default 100; the server's default limit is 1000).
    pub batch_size: usize,
    /// Wait after the first failure; doubles with each further one (default 100 ms).
    pub backoff_initial: Duration,
    /// Longest wait between attempts (default 30 s).
    pub backoff_max: Duration,
    /// How the syncer connects: its `connect_timeout` (default 10 s) bounds each connect and
    /// each redeem of the token; past it the attempt counts as failed.
    pub connection: ClientOptions,
    /// How long one append may take before it counts as failed and the connection is
    /// dropped (default 30 s). A connect or redeem never gets longer than this either.
    pub call_timeout: Duration,
    /// How often an idle syncer looks at the outbox anyway, for ops another process
    /// enqueued into the same file (enqueues in this process wake it at once). Default 2 s.
    pub poll_interval: Duration,
    /// Most batches in flight at once on the connection (default 4). While one is on its
    /// way, another goes only when it is full (a backlog), so ops that trickle in still
    /// gather into one batch per round trip. With a server that does not say it keeps
    /// pipelined batches in order, 1.
    pub max_in_flight: usize,
}

impl SyncOptions {
    /// Options with the defaults above.
    pub fn new(server: impl Into<String>, token: impl Into<String>) -> Self {
        Self {
            server: server.into(),
            token: token.into(),
            batch_size: DEFAULT_BATCH_SIZE,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            connection: ClientOptions::default(),
            call_timeout: Duration::from_secs(30),
            poll_interval: Duration::from_secs(2),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

impl std::fmt::Debug for SyncOptions {
    /// Hides the token, so it never lands in a log through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncOptions")
            .field("server", &self.server)
            .field("token", &"<redacted>")
            .field("batch_size", &self.batch_size)
            .field("backoff_initial", &self.backoff_initial)
            .field("backoff_max", &self.backoff_max)
            .field("connection", &self.connection)
            .field("call_timeout", &self.call_timeout)
            .field("poll_interval", &self.poll_interval)
            .field("max_in_flight", &self.max_in_flight)
            .finish()
    }
}

/// What the syncer is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(
    tag = "kind",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum SyncState {
    /// Connecting and redeeming the token.
    Connecting,
    /// Sending batches.
    Syncing,
    /// Nothing to send; waiting for ops.
    Idle,
    /// Waiting before the next attempt after a failure.
    Backoff { retry_in_ms: u64 },
    /// Gave up for good; the error says why and what to do. [`Syncer::fatal`] has it as a
    /// [`SyncError`].
    Stopped { error: String },
}

/// Progress, published after every step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncStatus {
    pub state: SyncState,
    /// The share the syncer sends to: `None` until it has first redeemed its token and bound
    /// the outbox to that token's share (see [`Outbox::bind`]).
    pub share_id: Option<String>,
    /// The outbox's counts (see [`crate::OutboxStatus`]).
    pub pending: u64,
    pub in_flight: u64,
    pub waiting: u64,
    pub acked: u64,
    pub rejected: u64,
    /// The share's cursor as the server last reported it.
    pub last_acked_cursor: Option<u64>,
    /// The most recent failure, cleared by the next ack.
    pub last_error: Option<String>,
    /// Failed attempts (connects, redeems, appends) since this syncer started.
    pub retries: u64,
    /// `appendOps` calls sent and not answered yet (at most
    /// [`SyncOptions::max_in_flight`]).
    pub calls_in_flight: usize,
}

impl SyncStatus {
    fn starting() -> Self {
        Self {
            state: SyncState::Connecting,
            share_id: None,
            pending: 0,
            in_flight: 0,
            waiting: 0,
            acked: 0,
            rejected: 0,
            last_acked_cursor: None,
            last_error: None,
            retries: 0,
            calls_in_flight: 0,
        }
    }
}

/// What `wait_idle` watches, besides the public status.
#[derive(Debug, Clone, Default)]
struct Control {
    /// The outbox's enqueue generation the syncer had seen when it last found nothing to
    /// send and nothing in flight.
    idle_at: Option<u64>,
    /// Set once, when the syncer stops on an error (just before the `Stopped` status).
    fatal: Option<SyncError>,
}

/// A running syncer. Dropping it stops the task (as [`Syncer::stop`] does, without waiting).
pub struct Syncer {
    status: watch::Receiver<SyncStatus>,
    control: watch::Receiver<Control>,
    /// Sending (or dropping) it stops the task.
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// For the enqueue generation `wait_idle` waits for.
    outbox: Outbox,
}

impl std::fmt::Debug for Syncer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Syncer")
            .field("status", &*self.status.borrow())
            .finish_non_exhaustive()
    }
}

/// Starts a syncer draining `outbox`. Must be called inside a tokio `LocalSet` (the
/// capnp-rpc client is `!Send`), like [`crate::connect`].
pub fn spawn_syncer(outbox: Outbox, options: SyncOptions) -> Syncer {
    let (status_tx, status) = watch::channel(SyncStatus::starting());
    let (control_tx, control) = watch::channel(Control::default());
    let (stop_tx, stop_rx) = oneshot::channel();
    let worker = worker::Worker::new(outbox.clone(), options, status_tx, control_tx);
    let task = tokio::task::spawn_local(worker.run_until_stopped(stop_rx));
    Syncer {
        status,
        control,
        stop: Some(stop_tx),
        task: Some(task),
        outbox,
    }
}

impl Syncer {
    /// The latest status.
    pub fn status(&self) -> SyncStatus {
        self.status.borrow().clone()
    }

    /// A receiver that sees every status update (for progress output).
    pub fn watch(&self) -> watch::Receiver<SyncStatus> {
        self.status.clone()
    }

    /// Resolves once every op enqueued before the call (through the syncer's outbox handle
    /// or a clone of it; another process's enqueues are picked up by polling) is settled:
    /// nothing pending, nothing in flight, and nothing waiting that could be sent (ops
    /// waiting for a dependency that is not acked here may remain, counted in `waiting`).
    /// Fails once the syncer has stopped on an error (the error [`Syncer::fatal`] returns;
    /// [`Syncer::status`] then shows [`SyncState::Stopped`]). Waits through outages: put a
    /// timeout around it to bound that.
    pub async fn wait_idle(&self) -> Result<SyncStatus, SyncError> {
        // Every enqueue that returned before this line has a generation up to `target`.
        let target = self.outbox.generation();
        let mut control = self.control.clone();
        loop {
            let fatal = {
                let now = control.borrow_and_update();
                if now.fatal.is_none() && now.idle_at.is_some_and(|seen| seen >= target) {
                    return Ok(self.status());
                }
                now.fatal.clone()
            };
            if let Some(fatal) = fatal {
                // The `Stopped` status follows the error at once; wait for it, so the
                // caller's next `status()` shows it (an error means the task is gone).
                let _ = self
                    .status
                    .clone()
                    .wait_for(|status| matches!(status.state, SyncState::Stopped { .. }))
                    .await;
                return Err(fatal);
            }
            if control.changed().await.is_err() {
                // The task ended without saying why (it panicked, or its runtime is gone).
                return Err(control
                    .borrow()
                    .fatal
                    .clone()
                    .unwrap_or_else(ended_unexpectedly));
            }
        }
    }

    /// The error the syncer stopped on for good, or `None` while it runs. Set before the
    /// status turns [`SyncState::Stopped`], so a caller that sees that state (through
    /// [`Syncer::status`] or [`Syncer::watch`]) finds the error here, without waiting; and
    /// `Some` whenever the status channel has closed (then [`SyncError::Stopped`] if the
    /// task ended without an error: it panicked).
    pub fn fatal(&self) -> Option<SyncError> {
        // Read first: the task closes the channel only once done, after recording its error.
        let ended = self.status.has_changed().is_err();
        if let Some(fatal) = &self.control.borrow().fatal {
            return Some(fatal.clone());
        }
        ended.then(ended_unexpectedly)
    }

    /// Stops the task and returns the last status. The outbox is durable, so stopping at
    /// any point loses nothing: an unacked batch is sent again by the next syncer.
    pub async fn stop(mut self) -> SyncStatus {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.status()
    }
}

fn ended_unexpectedly() -> SyncError {
    SyncError::Stopped("the syncer task ended unexpectedly".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_serializes_for_json_output() {
        let mut status = SyncStatus::starting();
        status.state = SyncState::Backoff { retry_in_ms: 400 };
        status.pending = 3;
        status.last_acked_cursor = Some(9);
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "state": {"kind": "backoff", "retryInMs": 400}, "shareId": null,
                "pending": 3, "inFlight": 0, "waiting": 0, "acked": 0, "rejected": 0,
                "lastAckedCursor": 9, "lastError": null, "retries": 0, "callsInFlight": 0
            })
        );
        let stopped = SyncState::Stopped {
            error: "revoked".into(),
        };
        assert_eq!(
            serde_json::to_value(stopped).unwrap(),
            serde_json::json!({"kind": "stopped", "error": "revoked"})
        );
        assert_eq!(
            serde_json::to_value(SyncState::Idle).unwrap(),
            serde_json::json!({"kind": "idle"})
        );
    }

    #[test]
    fn options_never_show_the_token() {
        let options = SyncOptions::new("127.0.0.1:7420", "cswriter_0011_secretsecret");
        let shown = format!("{options:?}");
        assert!(!shown.contains("secretsecret"), "{shown}");
        assert_eq!(options.batch_size, 100);
        assert_eq!(options.backoff_initial, Duration::from_millis(100));
        assert_eq!(options.backoff_max, Duration::from_secs(30));
        assert_eq!(options.call_timeout, Duration::from_secs(30));
        assert_eq!(options.connection.connect_timeout, Duration::from_secs(10));
    }
}
