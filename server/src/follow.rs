//! Following a share: the ops after a cursor, then each commit as it lands,
//! pulled at the follower's own pace.
//!
//! Both live paths use this: RPC subscriptions (which push to a listener with a
//! bounded window) and the HTTP gateway's Server-Sent Events. Nothing is
//! buffered per follower beyond one page: a slow consumer simply pulls later,
//! so it can never hold up the writer or other followers.

use std::time::Duration;

use capsync_shared::Cursor;
use tokio::sync::broadcast::{self, error::RecvError};

use crate::ledger::{Authority, Changed, Ledger, LedgerError, LedgerResult, LoggedOp};

/// How often an idle follower re-checks its authority even without any
/// announcement, so an expired token stops a follower within this time.
pub const RECHECK_INTERVAL: Duration = Duration::from_secs(15);

/// A cursor into one share's ledger that advances as ops are pulled.
pub struct Follower {
    ledger: Ledger,
    auth: Authority,
    cursor: Cursor,
    /// Most ops per pull.
    page: u32,
    /// Subscribed before the first read, so a commit between a read that found
    /// nothing and the wait that follows it is never missed.
    changes: broadcast::Receiver<Changed>,
}

impl Follower {
    /// Follows the share of `auth` (a viewer or writer authority) from after `after`.
    pub fn new(ledger: Ledger, auth: Authority, after: Cursor, page: u32) -> Self {
        let changes = ledger.changes();
        Self {
            ledger,
            auth,
            cursor: after,
            page: page.max(1),
            changes,
        }
    }

    /// The cursor of the last op returned (or the starting cursor).
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// The next ops after the cursor, in cursor order; waits for a commit when
    /// there are none. Fails when the authority no longer holds (`Revoked`,
    /// `PermissionDenied` once expired, `NotFound` once deleted) or the ledger closes.
    pub async fn next(&mut self) -> LedgerResult<Vec<LoggedOp>> {
        loop {
            let page = self
                .ledger
                .ops_since(self.auth.clone(), self.cursor, self.page)
                .await?;
            if let Some(last) = page.ops.last() {
                self.cursor = last.cursor;
                return Ok(page.ops);
            }
            self.wait_for_change().await?;
        }
    }

    /// Returns once something may have changed for this share: a commit to it,
    /// a token revocation, missed announcements, or the periodic recheck.
    async fn wait_for_change(&mut self) -> LedgerResult<()> {
        let share = self.auth.share.as_ref().map(|(id, _)| id.clone());
        let wait = async {
            loop {
                match self.changes.recv().await {
                    Ok(Changed::Share(id)) if Some(&id) == share.as_ref() => return Ok(()),
                    Ok(Changed::Share(_)) => continue,
                    Ok(Changed::Tokens) | Err(RecvError::Lagged(_)) => return Ok(()),
                    Err(RecvError::Closed) => return Err(LedgerError::Closed),
                }
            }
        };
        match tokio::time::timeout(RECHECK_INTERVAL, wait).await {
            Ok(result) => result,
            Err(_) => Ok(()),
        }
    }
}
