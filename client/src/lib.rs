//! capsync client library: connect to a capsync server, redeem sturdy refs, and drive the
//! capabilities they give.
//!
//! A tour:
//! - [`connection`]: [`connect`] (must run on a tokio `LocalSet`), [`Connection::redeem`],
//!   [`Redeemed`]; the connect timeout ([`ClientOptions`]) and call timeouts
//!   ([`Connection::with_call_timeout`]).
//! - [`server_addr`]: [`ServerAddr`], a server's RPC address, and the answers for what
//!   people give instead (a share-page link, a host without a port).
//! - `peer_watch`: watching the server's bytes, to recognise a peer that is not a capsync
//!   RPC port ([`ForeignReply`]) and to time calls out.
//! - [`admin`], [`agent`], [`writer`], [`viewer`]: one wrapper per capability
//!   ([`AdminClient`], [`AgentClient`], [`WriterClient`], [`ViewerClient`]).
//! - [`progress_listener`]: the `ProgressListener` long admin calls (prune, reclaim,
//!   ledger compaction) report to; the caller passes a callback ([`ProgressFn`]).
//! - [`subscribe`]: following a share live ([`ViewerClient::subscribe`] gives [`LiveOps`]):
//!   the ops after a cursor, then each commit, in cursor order with no gap or repeat.
//! - [`resume`]: [`ViewerClient::resume`], subscribing from a cursor across ledger
//!   compaction: when the ops after it were compacted, a fresh snapshot to continue from.
//! - [`types`]: plain, serializable mirrors of the schema's structs.
//! - [`error`]: [`ClientError`], with the wire `ErrorCode` for remote failures, and the
//!   outbox's and syncer's errors (`From<OutboxError>`, `From<SyncError>`).
//! - [`document`]: a snapshot as one structured JSON document.
//! - [`export`]: an opencode-style session export as ops with content-addressed ids.
//! - [`ops_file`]: reading ops files (JSON array or JSON Lines) and detecting exports.
//! - [`opencode`]: the journal capsync's opencode plugin writes, and the shipper that sends
//!   it to the server exactly once.
//! - [`push`]: sending ops in deterministic batches and summing up the acks.
//! - [`outbox`]: the agent's durable outbox ([`Outbox`]), a SQLite file of its own: ops wait
//!   there until acked; batches are persisted, so a retry (even after a crash) carries the
//!   same ops in the same order.
//! - [`syncer`]: [`spawn_syncer`], the background task that drains an outbox, with backoff,
//!   reconnect and re-redeem, stopping for good on a revoked or refused token ([`Syncer`];
//!   [`Syncer::fatal`] says why, as a [`SyncError`]).
//! - [`expiry`]: `--expires 30d` style arguments.
//!
//! The `capsync` command line is the `capsync-cli` crate (`cli/`), built on this library.
//!
//! ```no_run
//! # async fn demo() -> Result<(), capsync_client::ClientError> {
//! // Inside a tokio LocalSet:
//! let conn = capsync_client::connect("127.0.0.1:7420").await?;
//! let viewer = conn.redeem("csviewer_...").await?.into_viewer()?;
//! let snapshot = viewer.snapshot().await?;
//! println!("{}", snapshot.to_document().to_json());
//! conn.disconnect().await?;
//! # Ok(()) }
//! ```

pub mod admin;
pub mod agent;
pub mod connection;
/// A snapshot as one structured JSON document (defined in `capsync_shared::model`).
pub mod document {
    pub use capsync_shared::model::document::*;
}
pub mod error;
pub mod expiry;
pub mod export;
#[doc(hidden)]
pub mod fuzzing;
pub mod opencode;
pub mod ops_file;
pub mod outbox;
mod peer_watch;
pub mod progress_listener;
pub mod push;
pub mod resume;
pub mod server_addr;
pub mod subscribe;
pub mod syncer;
pub mod types;
pub mod viewer;
mod wire;
pub mod writer;

pub use admin::AdminClient;
pub use agent::{AgentClient, CreatedShare, NewShare};
pub use capsync_shared::ops::{OpKind, OpSpec};
pub use capsync_shared::{ErrorCode, TokenKind};
pub use connection::{
    ClientOptions, Connection, DEFAULT_CONNECT_TIMEOUT, Redeemed, connect, connect_any,
    connect_with,
};
pub use document::{MessageDocument, SessionDocument};
pub use error::{ClientError, TimeoutStage};
pub use export::{SessionExport, ops_from_export};
pub use ops_file::{InputFormat, parse_ops, read_push_input};
pub use outbox::{
    AckSummary, Enqueued, Outbox, OutboxBatch, OutboxError, OutboxStatus, Refusal, RejectedEntry,
    RejectedReason,
};
pub use peer_watch::ForeignReply;
pub use progress_listener::ProgressFn;
pub use push::{PushReport, push_ops};
pub use resume::{Rebased, Resumed};
pub use server_addr::{ServerAddr, ServerList};
pub use subscribe::{EndReason, Ended, LiveEvent, LiveOps};
pub use syncer::{SyncError, SyncOptions, SyncState, SyncStatus, Syncer, spawn_syncer};
pub use types::{
    CompactReport, MintedToken, ProgressUpdate, PruneOptions, PruneReason, PruneReport,
    PruneTotals, PrunedShare, ReclaimReport, Scope, ShareInfo, ShareList, ShareState, Stats,
    TableStats, VacuumReport,
};
pub use viewer::{
    LoggedOp, OpsPage, Presence, Record, RecordKind, Snapshot, SnapshotPage, ViewerClient,
};
pub use writer::{Ack, Batch, OpOutcome, OpResult, RejectReason, WriterClient};
