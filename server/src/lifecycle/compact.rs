//! Ledger compaction: ops applied before the retention window keep their op id and lose their payload.

use std::time::Duration;

use super::ProgressSink;
use super::prune::cutoff;
use crate::ledger::{Ledger, LedgerResult, Operator};

/// Ops one compaction step handles at most: a few milliseconds of writer time.
pub const COMPACT_STEP_OPS: u32 = 2000;

/// What a compaction pass did (or, in a dry run, would do).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompactReport {
    pub dry_run: bool,
    /// Unix ms: ops applied before this lost their payload.
    pub cutoff: i64,
    /// Shares whose compaction point moved.
    pub shares: u64,
    /// Ops whose payload was dropped.
    pub ops: u64,
    /// Payload bytes dropped.
    pub bytes: u64,
}

/// Compacts every share's ledger up to ops applied `older_than` ago.
pub async fn compact_ledger(
    ledger: &Ledger,
    op: &Operator,
    older_than: Duration,
    dry_run: bool,
    progress: &ProgressSink,
) -> LedgerResult<CompactReport> {
    let mut report = CompactReport {
        dry_run,
        cutoff: cutoff(ledger, older_than),
        ..CompactReport::default()
    };
    let (mut from, mut visited) = (None, 0);
    loop {
        let step = ledger
            .compact_step(op.clone(), report.cutoff, from, COMPACT_STEP_OPS, dry_run)
            .await?;
        report.shares += step.shares;
        report.ops += step.ops;
        report.bytes += step.bytes;
        visited += step.visited;
        progress.report("compact", visited.min(step.total_shares), step.total_shares);
        match step.next {
            Some(next) => from = Some(next),
            None => return Ok(report),
        }
    }
}
