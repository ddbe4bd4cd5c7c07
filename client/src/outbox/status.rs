//! Reading the outbox: counts (SQL aggregates over the state index), rejections, acks.

use rusqlite::OptionalExtension;

use super::{Outbox, OutboxError, OutboxStatus, RejectedEntry, RejectedReason, op_state};

impl Outbox {
    /// Counts by state, the bound share, the last cursor and error, and when the oldest
    /// in-flight batch may be retried. One read transaction, so the numbers agree.
    pub async fn status(&self) -> Result<OutboxStatus, OutboxError> {
        self.blocking(|conn| {
            let tx = conn.transaction()?;
            let mut status = tx.query_row(
                "SELECT share_id, server, last_cursor, last_error FROM meta",
                [],
                |r| {
                    Ok(OutboxStatus {
                        share_id: r.get(0)?,
                        server: r.get(1)?,
                        last_cursor: r.get::<_, Option<i64>>(2)?.map(|c| c.max(0) as u64),
                        last_error: r.get(3)?,
                        ..OutboxStatus::default()
                    })
                },
            )?;
            {
                let mut counts =
                    tx.prepare_cached("SELECT state, count(*) FROM ops GROUP BY state")?;
                let mut rows = counts.query([])?;
                while let Some(row) = rows.next()? {
                    let state: String = row.get(0)?;
                    let count = row.get::<_, i64>(1)?.max(0) as u64;
                    match state.as_str() {
                        op_state::PENDING => status.pending = count,
                        op_state::IN_FLIGHT => status.in_flight = count,
                        op_state::WAITING => status.waiting = count,
                        op_state::ACKED => status.acked = count,
                        op_state::REJECTED => status.rejected = count,
                        _ => {}
                    }
                }
            }
            // Only the oldest in-flight batch gates sending (nothing overtakes it), and
            // only a failed one has a retry time.
            status.next_retry_at = tx
                .prepare_cached(
                    "SELECT next_retry_at FROM batches WHERE state = 'inFlight' AND attempts > 0
                     AND id = (SELECT id FROM batches WHERE state = 'inFlight'
                               ORDER BY first_seq, id LIMIT 1)",
                )?
                .query_row([], |r| r.get(0))
                .optional()?;
            Ok(status)
        })
        .await
    }

    /// The ops the server refused for good, in enqueue order.
    pub async fn rejected(&self) -> Result<Vec<RejectedEntry>, OutboxError> {
        self.blocking(|conn| {
            let rows = conn
                .prepare_cached(
                    "SELECT op_id, coalesce(reason, ''), coalesce(detail, '') FROM ops
                     WHERE state = 'rejected' ORDER BY seq",
                )?
                .query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            rows.into_iter()
                .map(|(op_id, reason, detail)| {
                    let Some(reason) = RejectedReason::parse(&reason) else {
                        return Err(OutboxError::invalid(format!(
                            "the outbox holds op {op_id} rejected for an unknown reason {reason:?}"
                        )));
                    };
                    Ok(RejectedEntry {
                        op_id,
                        reason,
                        detail,
                    })
                })
                .collect()
        })
        .await
    }

    /// Every op id the server acked (applied or duplicate) with the cursor it was applied
    /// at, in cursor order: for tests and audits (it loads every acked row).
    pub async fn acked(&self) -> Result<Vec<(String, u64)>, OutboxError> {
        self.blocking(|conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT op_id, cursor FROM ops WHERE state = 'acked' ORDER BY cursor, seq",
                )?
                .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)?.max(0) as u64)))?
                .collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }
}
