//! capsync's common crate: the wire contract and the vocabulary both ends share.
//!
//! - [`capsync_capnp`]: Rust generated from `schema/capsync.capnp`, checked in so
//!   that building needs no `capnp` compiler (`tests/schema_drift.rs` catches drift).
//! - [`ids`]: newtype ids and counters (`ShareId`, `TokenId`, `OpId`, `Cursor`, `Epoch`).
//! - [`token`]: the sturdy-ref string format (kind prefix, token id, secret).
//! - [`ops`]: op kinds and the JSON form of ops used by files and the CLI.
//! - [`model`]: what an op means and what it does to a share's records (the
//!   plain types, the parsed op, the "newer" rules, a document that applies ops).
//! - [`opencode`]: what an opencode record means as ops.
//! - [`error`]: the wire error codes, mirrored as a Rust enum.
//! - [`limits`]: protocol limits both sides must agree on.

// The generated code refers to itself as `crate::capsync_capnp::…`, so it must sit
// exactly at this path. It stays as capnpc wrote it (rustfmt would make it drift).
#[rustfmt::skip]
#[allow(clippy::all, unused, missing_docs)]
#[path = "generated/capsync_capnp.rs"]
pub mod capsync_capnp;

pub mod error;
pub mod ids;
pub mod limits;
pub mod model;
pub mod opencode;
pub mod ops;
pub mod token;

pub use error::ErrorCode;
pub use ids::{Cursor, Epoch, OpId, ShareId, TokenId};
pub use ops::OpKind;
pub use token::{SturdyRef, TokenKind};

/// Milliseconds since the Unix epoch, the time unit of the wire contract.
pub fn now_millis() -> i64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
