//! Long storage work (deleting and pruning shares, reclaiming compacted tool
//! output, ledger compaction) driven as bounded ledger steps, for admin RPCs and
//! the server's scheduled maintenance alike.
//!
//! The backend offers steps that are each one short write transaction
//! (`crate::ledger::lifecycle_steps`); the loops, progress and logging live here, so
//! every backend gets them the same way.

mod compact;
mod delete;
mod progress;
mod prune;
mod reclaim;
pub mod scheduler;

pub use compact::{COMPACT_STEP_OPS, CompactReport, compact_ledger};
pub use delete::{DELETE_STEP_ROWS, delete_share};
pub use progress::{Progress, ProgressSink};
pub use prune::{PruneOptions, PruneReport, prune};
pub use reclaim::{RECLAIM_STEP_PARTS, ReclaimReport, reclaim};
pub use scheduler::Schedule;
