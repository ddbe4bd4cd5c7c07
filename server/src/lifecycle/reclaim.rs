//! Reclaim: a pass over stored parts clearing output and attachments of compacted tool parts.

use super::ProgressSink;
use crate::ledger::{Ledger, LedgerResult, Operator};

/// Parts one reclaim step scans at most: a few milliseconds of writer time.
pub const RECLAIM_STEP_PARTS: u32 = 500;

/// What a reclaim pass found and cleared (or, in a dry run, would clear).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReclaimReport {
    pub dry_run: bool,
    /// Tool parts marked compacted.
    pub parts_scanned: u64,
    /// Of those, parts that still held output or attachments.
    pub parts_cleared: u64,
    /// Stored JSON bytes saved.
    pub bytes_reclaimed: u64,
}

/// Runs a whole reclaim pass, step by step.
pub async fn reclaim(
    ledger: &Ledger,
    op: &Operator,
    dry_run: bool,
    progress: &ProgressSink,
) -> LedgerResult<ReclaimReport> {
    let mut report = ReclaimReport {
        dry_run,
        ..ReclaimReport::default()
    };
    let mut after = 0;
    loop {
        let step = ledger
            .reclaim_step(op.clone(), after, RECLAIM_STEP_PARTS, dry_run)
            .await?;
        report.parts_scanned += step.scanned;
        report.parts_cleared += step.cleared;
        report.bytes_reclaimed += step.bytes;
        let total = u64::try_from(step.total).unwrap_or(0);
        let position = u64::try_from(step.position).unwrap_or(0);
        match step.next {
            Some(next) => {
                progress.report("reclaim", position, total);
                after = next;
            }
            None => {
                progress.report("reclaim", total, total);
                return Ok(report);
            }
        }
    }
}
