//! The ledger's rules, above any storage engine: what an engine's transaction
//! must do, written once against the narrow interface of [`store`].
//!
//! - [`store`]: the rows the rules read and [`store::LedgerTx`], one transaction's
//!   reads and writes, which each engine implements.
//! - [`compacted_output`]: what reclaim clears from a compacted tool part.

pub mod compacted_output;
pub mod store;
