//! The ledger's rules, above any storage engine: what an engine's transaction
//! must do, written once against the narrow interface of [`store`].
//!
//! - [`store`]: the rows the rules read and [`store::LedgerTx`], one transaction's
//!   reads and writes, which each engine implements.
//! - [`authority`]: who may do what, checked in the transaction that does it.
//! - [`append`]: applying a batch exactly once, with gap-free cursors.
//! - [`batch_order`]: a pipelined batch applies only if the batch before it did.
//! - [`records`]: what an op's effect does to the stored records.
//! - [`part_text`]: text appended to parts by deltas, kept in chunks apart from them.
//! - [`reads`]: reads under authority, and the catch-up cursor rules.
//! - [`snapshot`]: the snapshot order and its byte-bounded pages.
//! - [`prune`]: which shares a prune takes, bounded deletion steps, archiving.
//! - [`compact`]: ledger compaction, which keeps the compacted ops a prefix.
//! - [`tokens`], [`shares`]: minting along the attenuation chain, creating,
//!   joining, revoking and archiving shares.
//! - [`compacted_output`]: what reclaim clears from a compacted tool part.

pub mod append;
pub mod authority;
pub mod batch_order;
pub mod compact;
pub mod compacted_output;
pub mod part_text;
pub mod prune;
pub mod reads;
pub mod records;
pub mod shares;
pub mod snapshot;
pub mod store;
pub mod tokens;
