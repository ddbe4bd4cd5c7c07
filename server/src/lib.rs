//! capsync server: a capability-based Cap'n Proto RPC sync server for AI
//! coding-agent sessions, over a SQLite ledger.
//!
//! A tour of the crate:
//! - [`server`]: [`run`] / [`run_blocking`] / [`spawn`] — the accept loop, one `RpcSystem`
//!   per connection on a `LocalSet`, and graceful shutdown (drain, disconnect, flush).
//! - [`rpc`]: the capability objects (`Gateway`, `Admin`, `Agent`, `ShareWriter`,
//!   `ShareViewer`), thin: they read requests, call the ledger, fill results.
//! - [`ledger`]: the storage seam (`Ledger`, a `Send + Clone` handle) and its
//!   SQLite backend (one writer thread with group commit, read connections).
//! - [`net`]: what stands between the network and the server: connection
//!   slots per listener and per address, accepting with back-off, and reading
//!   RPC frames so memory follows bytes received (a small allowance before a
//!   token is redeemed, a shared budget for large frames).
//! - [`secret_hasher`]: argon2id hashing of token secrets, off the RPC thread, a bounded
//!   number at once; [`redeem`]: the token check both gateways use;
//!   [`rate_limit`]: what failed redeems may cost, per address and per token
//!   id; [`verified_secrets`]: secrets that verified recently, so they cost no
//!   argon2 again; [`admin_token`]: first-start bootstrap.
//! - [`http`]: the HTTP gateway on its own listener: share pages for browsers,
//!   a JSON API, live Server-Sent Events, `/healthz` and `/metrics`.
//! - [`presence`]: which shares have a writer connected; [`metrics`]: counters
//!   and gauges for `/metrics`; [`log_limit`]: summarises log events that
//!   peers can repeat, so no input chooses the log's volume.
//! - [`follow`]: a share's ops from a cursor, then live as they commit (for
//!   subscriptions and the HTTP gateway).
//! - [`lifecycle`]: deleting, pruning, reclaiming and compacting in bounded
//!   ledger steps, with progress; the scheduled maintenance.
//! - [`config`]: every setting, as flags and environment variables; [`error`]:
//!   what callers are told when something fails.

pub mod admin_token;
pub mod clock;
pub mod config;
pub mod data_dir;
pub mod error;
pub mod follow;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod ledger;
pub mod lifecycle;
pub mod log_limit;
pub mod metrics;
pub mod net;
pub mod node;
pub mod presence;
pub mod rate_limit;
pub mod redeem;
pub mod rpc;
pub mod secret_hasher;
pub mod server;
pub mod verified_secrets;

pub use config::Config;
pub use server::{ServerHandle, run, run_blocking, spawn};

use std::path::PathBuf;

/// Why the server could not start (or a maintenance command could not run).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("database: {0}")]
    Ledger(ledger::LedgerError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("data directory {} is in use by another capsync-server (stop it first)", .0.display())]
    DataDirInUse(PathBuf),
}
