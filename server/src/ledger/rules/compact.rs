//! Ledger compaction: old ops keep their op id and lose their payload.
//!
//! A share's ops are compacted from its first op on, in cursor order, up to the
//! first one applied after the cutoff, so the compacted ops are always a prefix
//! of its ledger, named by one number: the share's compaction point
//! (`ShareRow::compacted_through`). The op ids stay, so a retried op is still
//! recognised as a duplicate.

use capsync_shared::{Cursor, ShareId};

use super::authority;
use super::store::{KeyFrom, LedgerTx, OpFootprint};
use crate::ledger::{CompactPosition, CompactStep, LedgerResult, Operator};

/// One step of a compaction pass, resuming at `from` (`None` to start): drops
/// the payloads of about `max_ops` ops applied before `applied_before`, in share
/// id then cursor order, or with `dry_run` only counts them.
///
/// Every share looked at counts as work even when it has nothing to drop, so a
/// step over many up-to-date shares still ends soon and lets other writes in.
pub fn step(
    tx: &mut impl LedgerTx,
    op: &Operator,
    applied_before: i64,
    from: Option<&CompactPosition>,
    max_ops: u32,
    dry_run: bool,
    now: i64,
) -> LedgerResult<CompactStep> {
    authority::check_operator(tx, op, now)?;
    let mut report = CompactStep {
        total_shares: tx.visible_share_count()?,
        ..CompactStep::default()
    };
    let mut budget = u64::from(max_ops.max(1));
    let (mut share, mut resume_after) = match from {
        None => (tx.next_share(&KeyFrom::AtLeast(String::new()))?, Cursor(0)),
        Some((id, after)) => {
            let share = tx.next_share(&KeyFrom::AtLeast(id.as_str().to_owned()))?;
            // The share the pass stopped in may be gone: the next one starts from its beginning.
            let after = match &share {
                Some((found, _)) if found == id => *after,
                _ => Cursor(0),
            };
            (share, after)
        }
    };
    while let Some((id, compacted_through)) = share {
        if budget == 0 {
            report.next = Some((id, resume_after));
            return Ok(report);
        }
        let after = compacted_through.max(resume_after);
        let run = old_run(tx, &id, after, applied_before, budget)?;
        if run.ops > 0 {
            if !dry_run {
                tx.drop_payloads(&id, after, run.last)?;
            }
            if resume_after == Cursor(0) {
                report.shares += 1;
            }
            report.ops += run.ops;
            report.bytes += run.bytes;
        }
        if !run.finished {
            report.next = Some((id, run.last));
            return Ok(report);
        }
        report.visited += 1;
        budget = budget.saturating_sub(run.ops.max(1));
        share = tx.next_share(&KeyFrom::After(id.as_str().to_owned()))?;
        resume_after = Cursor(0);
    }
    Ok(report)
}

/// The old ops right after `after` in one share: how many (at most `limit`),
/// their payload bytes, the cursor of the last, and whether the run ended
/// (the next op is not old, or there is none) rather than the limit.
struct OldRun {
    ops: u64,
    bytes: u64,
    last: Cursor,
    finished: bool,
}

/// Ops from `after` on, applied before `applied_before`, up to the first that
/// was not: compaction never skips an op, so what it drops stays a prefix.
fn old_run(
    tx: &mut impl LedgerTx,
    share: &ShareId,
    after: Cursor,
    applied_before: i64,
    limit: u64,
) -> LedgerResult<OldRun> {
    let lookahead = u32::try_from(limit.saturating_add(1)).unwrap_or(u32::MAX);
    let mut run = OldRun {
        ops: 0,
        bytes: 0,
        last: after,
        finished: true,
    };
    for OpFootprint {
        cursor,
        applied_at,
        payload_bytes,
    } in tx.op_footprints(share, after, lookahead)?
    {
        if applied_at >= applied_before {
            break;
        }
        if run.ops == limit {
            run.finished = false;
            break;
        }
        run.ops += 1;
        run.bytes += payload_bytes;
        run.last = cursor;
    }
    Ok(run)
}
