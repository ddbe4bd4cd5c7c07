//! Ledger compaction: old ops keep their op id and lose their payload.
//!
//! A share's ops are compacted from its first op on, in cursor order, up to the
//! first one applied after the cutoff, so the compacted ops are always a prefix
//! of its ledger, named by one number: `shares.compacted_through`. The op ids
//! stay, so a retried op is still recognised as a duplicate.

use capsync_shared::{Cursor, ShareId};
use rusqlite::{Connection, OptionalExtension, params};

use super::convert::{cursor_column, cursor_param};
use super::tx::SqliteTx;
use crate::ledger::rules::authority;
use crate::ledger::{CompactPosition, CompactStep, LedgerResult, Operator};

/// One step of a compaction pass, resuming at `from` (`None` to start): drops
/// the payloads of about `max_ops` ops applied before `applied_before`, in share
/// id then cursor order, or with `dry_run` only counts them.
///
/// Every share looked at counts as work even when it has nothing to drop, so a
/// step over many up-to-date shares still ends soon and lets other writes in.
pub(super) fn step(
    conn: &Connection,
    op: &Operator,
    applied_before: i64,
    from: Option<&CompactPosition>,
    max_ops: u32,
    dry_run: bool,
    now: i64,
) -> LedgerResult<CompactStep> {
    authority::check_operator(&mut SqliteTx::new(conn), op, now)?;
    let mut report = CompactStep {
        total_shares: visible_shares(conn)?,
        ..CompactStep::default()
    };
    let mut budget = u64::from(max_ops.max(1));
    let (mut share, mut resume_after) = match from {
        None => (next_share(conn, "", false)?, Cursor(0)),
        Some((id, after)) => {
            let share = next_share(conn, id.as_str(), true)?;
            // The share the pass stopped in may be gone; its successor starts afresh.
            let after = match &share {
                Some(found) if found.id == *id => *after,
                _ => Cursor(0),
            };
            (share, after)
        }
    };
    while let Some(current) = share {
        if budget == 0 {
            report.next = Some((current.id, resume_after));
            return Ok(report);
        }
        // A dry run leaves the compaction point where it is, so the position
        // carries how far the pass got inside the share.
        let after = current.compacted_through.max(resume_after);
        let run = old_ops(conn, &current.id, after, applied_before, budget)?;
        if run.ops > 0 {
            if !dry_run {
                drop_payloads(conn, &current.id, after, run.last)?;
            }
            // A share split across steps counts once, in the step that entered it
            // (a resumed share had ops taken before, so its position is past 0).
            if resume_after == Cursor(0) {
                report.shares += 1;
            }
            report.ops += run.ops;
            report.bytes += run.bytes;
        }
        if !run.finished {
            report.next = Some((current.id, run.last));
            return Ok(report);
        }
        report.visited += 1;
        budget = budget.saturating_sub(run.ops.max(1));
        share = next_share(conn, current.id.as_str(), false)?;
        resume_after = Cursor(0);
    }
    Ok(report)
}

/// A share a pass visits.
struct VisitedShare {
    id: ShareId,
    /// Its ops up to this cursor have already lost their payload.
    compacted_through: Cursor,
}

/// The ops of one share a step takes.
struct OldOps {
    ops: u64,
    /// Payload bytes of those ops.
    bytes: u64,
    /// The cursor of the last op taken (where the share's range started if none).
    last: Cursor,
    /// Whether no older op is left after `last`: the share is done for this pass.
    finished: bool,
}

/// Shares a compaction pass goes through: all but those being deleted.
fn visible_shares(conn: &Connection) -> LedgerResult<u64> {
    let count: i64 = conn
        .prepare_cached("SELECT count(*) FROM shares WHERE deleting_at IS NULL")?
        .query_row([], |r| r.get(0))?;
    Ok(u64::try_from(count).unwrap_or(0))
}

/// The first visible share with an id after `after` (or equal to it, if `inclusive`).
fn next_share(
    conn: &Connection,
    after: &str,
    inclusive: bool,
) -> LedgerResult<Option<VisitedShare>> {
    let sql = if inclusive {
        "SELECT id, compacted_through FROM shares
         WHERE deleting_at IS NULL AND id >= ?1 ORDER BY id LIMIT 1"
    } else {
        "SELECT id, compacted_through FROM shares
         WHERE deleting_at IS NULL AND id > ?1 ORDER BY id LIMIT 1"
    };
    Ok(conn
        .prepare_cached(sql)?
        .query_row([after], |r| {
            Ok(VisitedShare {
                id: ShareId::from(r.get::<_, String>(0)?),
                compacted_through: cursor_column(r, 1)?,
            })
        })
        .optional()?)
}

/// Takes at most `limit` ops of `share` after cursor `after`, in cursor order,
/// up to the first one applied at or after `applied_before`.
fn old_ops(
    conn: &Connection,
    share: &ShareId,
    after: Cursor,
    applied_before: i64,
    limit: u64,
) -> LedgerResult<OldOps> {
    let mut statement = conn.prepare_cached(
        "SELECT cursor, applied_at < ?3, length(CAST(payload AS BLOB)) FROM ops
         WHERE share_id = ?1 AND cursor > ?2 ORDER BY cursor LIMIT ?4",
    )?;
    // One op past the limit tells whether the share has older ops left.
    let lookahead = i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX);
    let mut rows = statement.query(params![
        share.as_str(),
        cursor_param(after)?,
        applied_before,
        lookahead
    ])?;
    let mut taken = OldOps {
        ops: 0,
        bytes: 0,
        last: after,
        finished: true,
    };
    while let Some(row) = rows.next()? {
        let is_old: bool = row.get(1)?;
        if !is_old {
            break;
        }
        if taken.ops == limit {
            taken.finished = false;
            break;
        }
        taken.ops += 1;
        taken.bytes += u64::try_from(row.get::<_, i64>(2)?).unwrap_or(0);
        taken.last = cursor_column(row, 0)?;
    }
    Ok(taken)
}

/// Empties the payloads of `share`'s ops in `(after, through]` and moves its compaction point.
fn drop_payloads(
    conn: &Connection,
    share: &ShareId,
    after: Cursor,
    through: Cursor,
) -> LedgerResult<()> {
    let (after, through) = (cursor_param(after)?, cursor_param(through)?);
    conn.prepare_cached(
        "UPDATE ops SET payload = '' WHERE share_id = ?1 AND cursor > ?2 AND cursor <= ?3",
    )?
    .execute(params![share.as_str(), after, through])?;
    conn.prepare_cached("UPDATE shares SET compacted_through = ?2 WHERE id = ?1")?
        .execute(params![share.as_str(), through])?;
    Ok(())
}
