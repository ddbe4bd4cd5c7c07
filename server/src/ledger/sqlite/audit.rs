//! Audit lines: written by the writer thread alongside whatever else its next transaction carries.

use rusqlite::{Connection, params};

use crate::ledger::{AuditEvent, LedgerResult};

pub(super) fn insert(conn: &Connection, event: &AuditEvent, now: i64) -> LedgerResult<()> {
    conn.prepare_cached(
        "INSERT INTO audit (at, action, token_id, share_id, outcome, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        now,
        event.action,
        event.token_id.as_ref().map(|t| t.as_str()),
        event.share_id.as_ref().map(|s| s.as_str()),
        event.outcome,
        event.detail,
    ])?;
    Ok(())
}
