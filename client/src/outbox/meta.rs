//! The outbox's one `meta` row: which share it feeds, the share's cursor, the last error.

use rusqlite::{TransactionBehavior, params};

use super::{Outbox, OutboxError, cursor_to_sql};

impl Outbox {
    /// Records which share (and, for display, which server) this outbox feeds. The first
    /// call stores it; a later call with another share id fails with
    /// [`OutboxError::WrongShare`], so ops queued for one share never reach another. (A new
    /// server address for the same share is just stored.) No token is ever stored.
    pub async fn bind(&self, share_id: &str, server: &str) -> Result<(), OutboxError> {
        let (share_id, server) = (share_id.to_owned(), server.to_owned());
        self.blocking(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let bound: Option<String> =
                tx.query_row("SELECT share_id FROM meta", [], |r| r.get(0))?;
            if let Some(bound) = bound
                && bound != share_id
            {
                return Err(OutboxError::WrongShare {
                    bound,
                    requested: share_id,
                });
            }
            tx.execute(
                "UPDATE meta SET share_id = ?1, server = ?2",
                params![share_id, server],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Stores the share's cursor as learned outside an ack (a redeem, `state()` after a
    /// `cursorConflict`).
    pub async fn record_cursor(&self, cursor: u64) -> Result<(), OutboxError> {
        let cursor = cursor_to_sql(cursor)?;
        self.blocking(move |conn| {
            conn.execute("UPDATE meta SET last_cursor = ?1", [cursor])?;
            Ok(())
        })
        .await
    }

    /// Stores an error that belongs to no batch (the server unreachable, the token refused),
    /// so `status` shows it to a later process too. Cleared by the next ack.
    pub async fn record_error(&self, error: &str) -> Result<(), OutboxError> {
        let error = error.to_owned();
        self.blocking(move |conn| {
            conn.execute("UPDATE meta SET last_error = ?1", [error])?;
            Ok(())
        })
        .await
    }
}
