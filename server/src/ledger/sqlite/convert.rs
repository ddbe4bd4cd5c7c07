//! Moves the ledger's unsigned cursors through SQLite's signed 64-bit integers.

use capsync_shared::Cursor;
use rusqlite::Row;

use crate::ledger::{LedgerError, LedgerResult};

/// A cursor as a statement parameter. Cursors count ops, so `i64::MAX` is out of reach.
pub(super) fn cursor_param(cursor: Cursor) -> LedgerResult<i64> {
    i64::try_from(cursor.0)
        .map_err(|_| LedgerError::Storage(format!("cursor {cursor} is out of range")))
}

/// A cursor column of `row`.
pub(super) fn cursor_column(row: &Row<'_>, index: usize) -> rusqlite::Result<Cursor> {
    let value: i64 = row.get(index)?;
    u64::try_from(value)
        .map(Cursor)
        .map_err(|_| rusqlite::Error::IntegralValueOutOfRange(index, value))
}
