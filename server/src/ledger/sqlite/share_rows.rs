//! Share rows in SQLite: the columns every read of `shares` takes, in order.

use capsync_shared::{Epoch, ShareId, TokenId};
use rusqlite::{Connection, OptionalExtension, Row};

use super::convert::cursor_column;
use crate::ledger::LedgerResult;
use crate::ledger::rules::store::ShareRow;

/// Columns of `shares` in the order [`share_from_row`] reads them.
pub(super) const SHARE_COLUMNS: &str = "id, session_id, project_id, parent_session_id, title, \
     owner_token_id, cursor, writer_epoch, viewer_epoch, created_at, updated_at, archived_at, \
     compacted_through";

/// The condition every read of `shares` adds: a share whose deletion has begun is gone.
pub(super) const VISIBLE: &str = "deleting_at IS NULL";

/// A row selected with [`SHARE_COLUMNS`].
pub(super) fn share_from_row(row: &Row<'_>) -> rusqlite::Result<ShareRow> {
    Ok(ShareRow {
        id: ShareId(row.get(0)?),
        session_id: row.get(1)?,
        project_id: row.get(2)?,
        parent_session_id: row.get(3)?,
        title: row.get(4)?,
        owner_token_id: TokenId(row.get(5)?),
        cursor: cursor_column(row, 6)?,
        writer_epoch: Epoch(row.get(7)?),
        viewer_epoch: Epoch(row.get(8)?),
        created_at: row.get(9)?,
        updated_at: row.get(10)?,
        archived_at: row.get(11)?,
        compacted_through: cursor_column(row, 12)?,
    })
}

/// The share with this id, unless it does not exist or its deletion has begun.
pub(super) fn load_share(conn: &Connection, id: &ShareId) -> LedgerResult<Option<ShareRow>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {SHARE_COLUMNS} FROM shares WHERE id = ?1 AND {VISIBLE}"
    ))?;
    Ok(stmt.query_row([id.as_str()], share_from_row).optional()?)
}
