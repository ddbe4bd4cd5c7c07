//! The retroactive reclaim pass over stored parts ([`step`]): clears output and
//! attachments of tool parts marked compacted, by the rule of
//! [`compacted_output`](crate::ledger::rules::compacted_output).

use rusqlite::{Connection, params};

use super::tx::SqliteTx;
use crate::ledger::rules::authority;
use crate::ledger::rules::compacted_output::clear_compacted_output;
use crate::ledger::{LedgerResult, Operator, ReclaimStep};

/// Compacted tool parts in the parts after rowid `?1` up to rowid `?2`. The
/// `instr` test is a cheap filter before SQLite parses the JSON; the JSON
/// conditions are those of the `reclaimable_output_bytes` statistic.
const COMPACTED_TOOL_PARTS: &str = "
    SELECT rowid, json FROM parts
    WHERE rowid > ?1 AND rowid <= ?2
      AND instr(json, '\"compacted\"') > 0
      AND json_extract(json, '$.type') = 'tool'
      AND json_extract(json, '$.state.time.compacted') IS NOT NULL
    ORDER BY rowid";

/// One step of the retroactive pass: looks at the parts after rowid `after`,
/// at most `max_parts` of them, and clears the compacted tool parts among them
/// (or, in a dry run, only counts what it would clear).
///
/// Only the `parts` table is rewritten. The ledger ops that stored those parts
/// keep their payloads: dropping old payloads is ledger compaction's work, and
/// parts stored with `reclaim` on were cleared in their op as well.
///
/// Positions are rowids. A full `VACUUM` may renumber them, so a pass that
/// spans one may skip some parts; running the pass again finds them.
pub(super) fn step(
    conn: &Connection,
    op: &Operator,
    after: i64,
    max_parts: u32,
    dry_run: bool,
    now: i64,
) -> LedgerResult<ReclaimStep> {
    authority::check_operator(&mut SqliteTx::new(conn), op, now)?;
    let total: i64 = conn
        .prepare_cached("SELECT coalesce(max(rowid), 0) FROM parts")?
        .query_row([], |r| r.get(0))?;
    // At least one part, so every step moves the pass on.
    let window_end: Option<i64> = conn
        .prepare_cached(
            "SELECT max(rowid) FROM (SELECT rowid FROM parts WHERE rowid > ?1 ORDER BY rowid LIMIT ?2)",
        )?
        .query_row(params![after, max_parts.max(1)], |r| r.get(0))?;
    let Some(end) = window_end else {
        return Ok(ReclaimStep {
            next: None,
            position: total,
            total,
            ..ReclaimStep::default()
        });
    };

    let mut report = ReclaimStep {
        next: (end < total).then_some(end),
        position: end,
        total,
        ..ReclaimStep::default()
    };
    let mut updates = Vec::new();
    let mut parts = conn.prepare_cached(COMPACTED_TOOL_PARTS)?;
    let mut rows = parts.query(params![after, end])?;
    while let Some(row) = rows.next()? {
        report.scanned += 1;
        let json: String = row.get(1)?;
        if let Some(cleared) = clear_compacted_output(&json) {
            report.cleared += 1;
            // Clearing an output that was a bare number can add a byte; that part saves nothing.
            report.bytes += u64::try_from(json.len().saturating_sub(cleared.len())).unwrap_or(0);
            if !dry_run {
                updates.push((row.get::<_, i64>(0)?, cleared));
            }
        }
    }
    if !updates.is_empty() {
        let mut update = conn.prepare_cached("UPDATE parts SET json = ?2 WHERE rowid = ?1")?;
        for (rowid, json) in updates {
            update.execute(params![rowid, json])?;
        }
    }
    Ok(report)
}
