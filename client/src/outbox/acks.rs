//! Settling a batch: the server's per-op outcomes, or a failed attempt.

use rusqlite::{TransactionBehavior, params};

use super::batching::{finish, in_flight_batch};
use super::{
    AckSummary, Outbox, OutboxBatch, OutboxError, batch_state, cursor_to_sql, now, op_state,
};
use crate::types::{Ack, OpOutcome, RejectReason};

impl Outbox {
    /// Records the server's ack of `batch`, in one transaction: applied and duplicate ops
    /// become `acked` with their cursor; `invalid` and `staleTransition` ones `rejected`
    /// (final; `staleTransition` is no fault of the caller's, just an older state of a
    /// finished message); `missingDependency` ones `waiting`, until an op they depend on is
    /// acked here (one that is not in this outbox at all keeps them waiting). Stores the
    /// share's cursor and ends the batch.
    ///
    /// Fails with [`OutboxError::Invalid`], changing nothing, if the batch is not in flight
    /// or the ack's results do not match its ops one for one.
    pub async fn record_ack(
        &self,
        batch: &OutboxBatch,
        ack: &Ack,
    ) -> Result<AckSummary, OutboxError> {
        let batch_id = batch.batch_id.clone();
        let ack = ack.clone();
        let (summary, released) = self
            .blocking(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let (id, members) = in_flight_batch(&tx, &batch_id)?;
                if members.len() != ack.results.len() {
                    return Err(OutboxError::invalid(format!(
                        "the ack of batch {batch_id} has {} results for {} ops",
                        ack.results.len(),
                        members.len()
                    )));
                }
                if let Some(((_, op_id), result)) = members
                    .iter()
                    .zip(&ack.results)
                    .find(|((_, op_id), result)| op_id.as_str() != result.op_id.as_str())
                {
                    return Err(OutboxError::invalid(format!(
                        "the ack of batch {batch_id} answers op {} where the batch has {op_id}",
                        result.op_id
                    )));
                }
                let at = now();
                let mut summary = AckSummary {
                    cursor: ack.cursor.0,
                    ..AckSummary::default()
                };
                let mut released = 0;
                let mut acked = tx.prepare_cached(
                    "UPDATE ops SET state = ?2, outcome = ?3, cursor = ?4, reason = NULL,
                     detail = NULL, settled_at = ?5 WHERE seq = ?1",
                )?;
                // In batch order, so an op waiting since an earlier batch is released by a
                // dependency acked here, but one refused in this batch is not released by an
                // op earlier in it (the server had that one already when it refused).
                let mut release = tx.prepare_cached(
                    "UPDATE ops SET state = ?1, reason = NULL, detail = NULL
                     WHERE state = ?2 AND seq IN (SELECT seq FROM op_deps WHERE dep_op_id = ?3)",
                )?;
                let mut settle = tx.prepare_cached(
                    "UPDATE ops SET state = ?2, reason = ?3, detail = ?4, settled_at = ?5
                     WHERE seq = ?1",
                )?;
                for ((seq, op_id), result) in members.iter().zip(&ack.results) {
                    match &result.outcome {
                        OpOutcome::Applied(cursor) | OpOutcome::Duplicate(cursor) => {
                            let outcome = if matches!(result.outcome, OpOutcome::Applied(_)) {
                                summary.applied += 1;
                                "applied"
                            } else {
                                summary.duplicates += 1;
                                "duplicate"
                            };
                            acked.execute(params![
                                seq,
                                op_state::ACKED,
                                outcome,
                                cursor_to_sql(cursor.0)?,
                                at
                            ])?;
                            released += release.execute(params![
                                op_state::PENDING,
                                op_state::WAITING,
                                op_id
                            ])?;
                        }
                        OpOutcome::Rejected {
                            reason: RejectReason::MissingDependency,
                            detail,
                        } => {
                            summary.waiting += 1;
                            // Not settled: no settled_at.
                            settle.execute(params![
                                seq,
                                op_state::WAITING,
                                RejectReason::MissingDependency.as_str(),
                                detail,
                                None::<i64>
                            ])?;
                        }
                        OpOutcome::Rejected { reason, detail } => {
                            summary.rejected += 1;
                            settle.execute(params![
                                seq,
                                op_state::REJECTED,
                                reason.as_str(),
                                detail,
                                at
                            ])?;
                        }
                    }
                }
                drop((acked, release, settle));
                finish(&tx, id, batch_state::DONE, "")?;
                tx.prepare_cached("UPDATE meta SET last_cursor = ?1, last_error = NULL")?
                    .execute([cursor_to_sql(ack.cursor.0)?])?;
                tx.commit()?;
                Ok((summary, released))
            })
            .await?;
        if released > 0 {
            self.notify_changed();
        }
        Ok(summary)
    }

    /// Records a failed attempt to send `batch` (no answer, a transport error, `overloaded`,
    /// ...): one more attempt, its error, and when to try again (Unix ms). The batch keeps its
    /// ops and order; [`Outbox::next_batch`] hands it out again from `retry_at` on.
    pub async fn record_failure(
        &self,
        batch: &OutboxBatch,
        error: &str,
        retry_at: i64,
    ) -> Result<(), OutboxError> {
        let batch_id = batch.batch_id.clone();
        let error = error.to_owned();
        self.blocking(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let (id, _) = in_flight_batch(&tx, &batch_id)?;
            tx.prepare_cached(
                "UPDATE batches SET attempts = attempts + 1, last_error = ?2, next_retry_at = ?3
                 WHERE id = ?1",
            )?
            .execute(params![id, error, retry_at])?;
            tx.prepare_cached("UPDATE meta SET last_error = ?1")?
                .execute([&error])?;
            tx.commit()?;
            Ok(())
        })
        .await
    }
}
