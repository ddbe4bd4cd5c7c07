//! Deleting one share in bounded steps: hidden (and its tokens gone) in the
//! first step, its rows removed a chunk at a time after that.

use capsync_shared::{Cursor, ShareId};

use crate::ledger::{DeleteStep, Ledger, LedgerResult, Operator};

/// Rows one deletion step removes at most. A step of this size takes a few
/// milliseconds, so appends to other shares wait at most that long.
pub const DELETE_STEP_ROWS: u32 = 2000;

/// Deletes `share_id` completely. With `expect_cursor`, a share whose cursor
/// moved (it changed since it was chosen) is left alone and `Ok(false)` returned.
pub async fn delete_share(
    ledger: &Ledger,
    op: &Operator,
    share_id: &ShareId,
    expect_cursor: Option<Cursor>,
) -> LedgerResult<bool> {
    let mut expect = expect_cursor;
    loop {
        match ledger
            .delete_share_step(op.clone(), share_id.clone(), expect, DELETE_STEP_ROWS)
            .await?
        {
            DeleteStep::More => expect = None,
            DeleteStep::Done => return Ok(true),
            DeleteStep::Changed => return Ok(false),
        }
    }
}
