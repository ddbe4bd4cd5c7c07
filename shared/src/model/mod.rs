//! The op and record model, defined once for the server and its clients.
//!
//! - [`types`]: the plain data (records, logged ops, append outcomes).
//! - [`op`]: what an op means: its payload parsed and validated into an [`Effect`].
//! - [`progress`]: what "newer" and "finished" mean for a record, so an older
//!   snapshot cannot replace a newer one.
//! - [`document`]: a pure document of a share's records that applies logged ops.
//!
//! The server's ledger validates with [`op::parse`] and refuses by [`progress`];
//! the share page data, the live streams and the client's documents read ops through
//! [`op::parse`] too. The property tests keep an independent model of their own
//! (`tests/support/model.rs`) on purpose: it checks this one.

pub mod document;
pub mod op;
pub mod progress;
pub mod types;
mod wire_enums;

pub use document::{MessageDocument, SessionDocument, record_id};
pub use op::Effect;
pub use types::{Ack, LoggedOp, OpOutcome, OpResult, Record, RecordKind, RejectReason};
