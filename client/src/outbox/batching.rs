//! Forming batches, deterministically and persistently, and handing the same batch out again
//! until it is acked.
//!
//! Rules, in order:
//! 1. The oldest in-flight batch (by its first op) is sent again, as persisted, once its
//!    retry time has come. Until then nothing else is sent: ops that declare no dependency
//!    (several `part.delta` on one part) still rely on reaching the server in enqueue order,
//!    so no new batch may overtake an unacked one.
//! 2. Otherwise a new batch takes pending ops in enqueue order, skipping an op while an op
//!    it depends on is still pending here (unless that op is earlier in this same batch), up
//!    to `max_ops` ops and [`MAX_BATCH_BYTES`] bytes (a single bigger op goes alone).
//!    Dependencies that are not in this outbox, or that are waiting or rejected here, do not
//!    hold an op back: the server judges them (`missingDependency` then holds it).
//! 3. If every pending op waits for another pending op (a dependency cycle), the oldest one
//!    is sent alone so the server can settle it, instead of stalling the outbox.
//!
//! Pipelining ([`Outbox::next_batch_alongside`]): batches already sent on the syncer's
//! connection and not answered yet are *outstanding*. The server applies each after the
//! one before it and refuses it if that one failed (`Batch.after`), so they count as sent
//! in order: rule 1 skips them, and an op whose dependency is in one of them is not held
//! back. A new batch goes alongside them only when it is full: while ops trickle in, they
//! gather into the next batch as the answers come back, as without pipelining.

use std::collections::HashSet;

use capsync_shared::ops::{OpKind, OpSpec};
use rusqlite::{OptionalExtension, Transaction, TransactionBehavior, params};

use super::{
    Outbox, OutboxBatch, OutboxError, Refusal, RejectedReason, batch_state, now as wall_now,
    op_state,
};

/// Most bytes of ops (payloads, ids, framing) in one batch. Keeps each `appendOps`
/// message far below the server's default 16 MiB message limit, and each commit short.
pub const MAX_BATCH_BYTES: usize = 4 << 20;

/// Pending ops read per query while forming a batch.
const SCAN_PAGE: i64 = 256;

impl Outbox {
    /// The next batch to send, or `None`.
    ///
    /// The oldest unacked batch once its retry time (`now`, Unix ms) has come, with exactly
    /// the batch id, ops and order it was first sent with; else, when no batch is in flight,
    /// a new batch of the oldest sendable pending ops, persisted (batch id, positions) and
    /// marked in flight in the same transaction; else `None`. `None` while an in-flight batch
    /// waits for its retry time: see the module docs for why nothing may overtake it.
    pub async fn next_batch(
        &self,
        max_ops: usize,
        now: i64,
    ) -> Result<Option<OutboxBatch>, OutboxError> {
        self.next_batch_alongside(max_ops, now, Vec::new()).await
    }

    /// [`Outbox::next_batch`] while the batches `outstanding` (ids, in the order sent) are
    /// in flight on the syncer's connection, unanswered: the oldest other in-flight batch
    /// once its retry time has come, else a new batch if it is full (see the module docs),
    /// else `None`.
    pub async fn next_batch_alongside(
        &self,
        max_ops: usize,
        now: i64,
        outstanding: Vec<String>,
    ) -> Result<Option<OutboxBatch>, OutboxError> {
        self.blocking(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let batch = next(&tx, max_ops.max(1), now, &outstanding)?;
            tx.commit()?;
            Ok(batch)
        })
        .await
    }

    /// The server refused `batch` whole as too large (or as an invalid argument, which with
    /// ids checked at enqueue means one op is malformed). Nothing of it was applied, so it may
    /// change: a batch of several ops is replaced by its two halves, sent in order; a single
    /// op is rejected for good with `reason` ([`RejectedReason::TooLarge`] or
    /// [`RejectedReason::Invalid`]) and the server's words.
    pub async fn record_refusal(
        &self,
        batch: &OutboxBatch,
        reason: RejectedReason,
        detail: &str,
    ) -> Result<Refusal, OutboxError> {
        let batch_id = batch.batch_id.clone();
        let (reason, detail) = (reason.as_str(), detail.to_owned());
        self.blocking(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let (id, members) = in_flight_batch(&tx, &batch_id)?;
            let at = wall_now();
            let refusal = if let [(seq, op_id)] = members.as_slice() {
                tx.prepare_cached(
                    "UPDATE ops SET state = ?2, reason = ?3, detail = ?4, settled_at = ?5 WHERE seq = ?1",
                )?
                .execute(params![seq, op_state::REJECTED, reason, detail, at])?;
                finish(&tx, id, batch_state::DONE, &format!("{reason}: {detail}"))?;
                Refusal::Rejected {
                    op_id: op_id.clone(),
                }
            } else {
                finish(&tx, id, batch_state::SPLIT, &format!("{reason}: {detail}"))?;
                let seqs: Vec<i64> = members.iter().map(|(seq, _)| *seq).collect();
                let (first, second) = seqs.split_at(seqs.len() / 2);
                Refusal::Split {
                    first: create(&tx, first)?.1,
                    second: create(&tx, second)?.1,
                }
            };
            tx.commit()?;
            Ok(refusal)
        })
        .await
    }
}

fn next(
    tx: &Transaction<'_>,
    max_ops: usize,
    now: i64,
    outstanding: &[String],
) -> Result<Option<OutboxBatch>, OutboxError> {
    let in_flight = tx
        .prepare_cached(
            "SELECT id, batch_id, next_retry_at FROM batches WHERE state = 'inFlight'
             ORDER BY first_seq, id",
        )?
        .query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let oldest = in_flight
        .into_iter()
        .find(|(_, batch_id, _)| !outstanding.contains(batch_id));
    if let Some((id, _, next_retry_at)) = oldest {
        return if next_retry_at <= now {
            load(tx, id).map(Some)
        } else {
            Ok(None)
        };
    }
    let (chosen, full) = choose(tx, max_ops, MAX_BATCH_BYTES as i64, outstanding)?;
    if chosen.is_empty() || (!outstanding.is_empty() && !full) {
        return Ok(None);
    }
    let (id, _) = create(tx, &chosen)?;
    load(tx, id).map(Some)
}

/// The seqs of the ops a new batch should carry, in order (rules 2 and 3 of the module
/// docs), and whether the batch is full (it stopped at `max_ops` or `max_bytes`).
fn choose(
    tx: &Transaction<'_>,
    max_ops: usize,
    max_bytes: i64,
    outstanding: &[String],
) -> Result<(Vec<i64>, bool), OutboxError> {
    let mut page_query = tx.prepare_cached(
        "SELECT seq, op_id, bytes FROM ops WHERE state = 'pending' AND seq > ?1
         ORDER BY seq LIMIT ?2",
    )?;
    let mut chosen = Vec::new();
    let mut in_batch: HashSet<String> = HashSet::new();
    let mut bytes = 0i64;
    let mut after = 0i64;
    let mut full = false;
    'scan: loop {
        let page = page_query
            .query_map(params![after, SCAN_PAGE], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        if page.is_empty() {
            break;
        }
        for (seq, op_id, op_bytes) in page {
            after = seq;
            if held_back(tx, seq, &in_batch, outstanding)? {
                continue;
            }
            // Stop rather than skip to a smaller op further on: that would reorder ops.
            if !chosen.is_empty() && bytes.saturating_add(op_bytes) > max_bytes {
                full = true;
                break 'scan;
            }
            bytes = bytes.saturating_add(op_bytes);
            in_batch.insert(op_id);
            chosen.push(seq);
            if chosen.len() >= max_ops {
                full = true;
                break 'scan;
            }
        }
    }
    if chosen.is_empty() {
        // Rule 3: every pending op (if any) waits for another pending op.
        let oldest: Option<i64> = tx
            .prepare_cached("SELECT seq FROM ops WHERE state = 'pending' ORDER BY seq LIMIT 1")?
            .query_row([], |r| r.get(0))
            .optional()?;
        chosen.extend(oldest);
    }
    Ok((chosen, full))
}

/// Whether an op it depends on is still on its way from this outbox: pending, or in a
/// batch in flight that is not `outstanding` (one that is reaches the server first), and
/// not already earlier in the batch being formed.
fn held_back(
    tx: &Transaction<'_>,
    seq: i64,
    in_batch: &HashSet<String>,
    outstanding: &[String],
) -> Result<bool, OutboxError> {
    let mut query = tx.prepare_cached(
        "SELECT d.dep_op_id, b.batch_id FROM op_deps d JOIN ops o ON o.op_id = d.dep_op_id
         LEFT JOIN batches b ON b.id = o.batch AND o.state = 'inFlight'
         WHERE d.seq = ?1 AND o.state IN ('pending', 'inFlight')",
    )?;
    let mut rows = query.query([seq])?;
    while let Some(row) = rows.next()? {
        let dep: String = row.get(0)?;
        let sent_before = row
            .get::<_, Option<String>>(1)?
            .is_some_and(|batch| outstanding.contains(&batch));
        if !in_batch.contains(&dep) && !sent_before {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Persists a new in-flight batch of `seqs` (in this order) and returns its row id and
/// batch id, `ob-<first seq>-<row id>`: deterministic for a given history, and unique.
fn create(tx: &Transaction<'_>, seqs: &[i64]) -> Result<(i64, String), OutboxError> {
    let first_seq = *seqs
        .first()
        .ok_or_else(|| OutboxError::invalid("a batch needs at least one op"))?;
    // The id is only known after the insert; `forming` is a placeholder within this
    // transaction (the UNIQUE index allows one at a time, and it is replaced before commit).
    tx.prepare_cached(
        "INSERT INTO batches (batch_id, first_seq, created_at) VALUES ('forming', ?1, ?2)",
    )?
    .execute(params![first_seq, wall_now()])?;
    let id = tx.last_insert_rowid();
    let batch_id = format!("ob-{first_seq}-{id}");
    tx.prepare_cached("UPDATE batches SET batch_id = ?2 WHERE id = ?1")?
        .execute(params![id, batch_id])?;
    let mut member =
        tx.prepare_cached("INSERT INTO batch_ops (batch, position, seq) VALUES (?1, ?2, ?3)")?;
    let mut mark = tx.prepare_cached(
        "UPDATE ops SET state = ?2, batch = ?3, reason = NULL, detail = NULL WHERE seq = ?1",
    )?;
    for (position, seq) in seqs.iter().enumerate() {
        member.execute(params![id, position as i64, seq])?;
        mark.execute(params![seq, op_state::IN_FLIGHT, id])?;
    }
    tracing::debug!(%batch_id, ops = seqs.len(), "outbox formed a batch");
    Ok((id, batch_id))
}

/// Ends a batch (`done` or `split`).
pub(super) fn finish(
    tx: &Transaction<'_>,
    id: i64,
    state: &str,
    last_error: &str,
) -> Result<(), OutboxError> {
    let last_error = (!last_error.is_empty()).then_some(last_error);
    tx.prepare_cached(
        "UPDATE batches SET state = ?2, done_at = ?3, last_error = ?4 WHERE id = ?1",
    )?
    .execute(params![id, state, wall_now(), last_error])?;
    Ok(())
}

/// A persisted batch as it goes on the wire.
fn load(tx: &Transaction<'_>, id: i64) -> Result<OutboxBatch, OutboxError> {
    let (batch_id, attempts) = tx
        .prepare_cached("SELECT batch_id, attempts FROM batches WHERE id = ?1")?
        .query_row([id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    let rows = tx
        .prepare_cached(
            "SELECT o.seq, o.op_id, o.kind, o.payload FROM batch_ops b JOIN ops o ON o.seq = b.seq
             WHERE b.batch = ?1 ORDER BY b.position",
        )?
        .query_map([id], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut ops = Vec::with_capacity(rows.len());
    for (seq, op_id, kind, payload) in rows {
        let corrupt = |what: String| {
            OutboxError::invalid(format!("the outbox holds a damaged op {op_id}: {what}"))
        };
        let kind: OpKind = kind.parse().map_err(|e| corrupt(format!("{e}")))?;
        let payload =
            serde_json::from_str(&payload).map_err(|e| corrupt(format!("payload: {e}")))?;
        ops.push(OpSpec {
            depends_on: depends_on(tx, seq)?,
            op_id,
            kind,
            payload,
        });
    }
    Ok(OutboxBatch {
        batch_id,
        ops,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
    })
}

/// The op's `dependsOn`, in order.
pub(super) fn depends_on(tx: &Transaction<'_>, seq: i64) -> Result<Vec<String>, OutboxError> {
    Ok(tx
        .prepare_cached("SELECT dep_op_id FROM op_deps WHERE seq = ?1 ORDER BY position")?
        .query_map([seq], |r| r.get(0))?
        .collect::<Result<Vec<_>, _>>()?)
}

/// The row id and members (seq, op id; in order) of the in-flight batch `batch_id`; an
/// error if there is no such batch or it is settled already.
pub(super) fn in_flight_batch(
    tx: &Transaction<'_>,
    batch_id: &str,
) -> Result<(i64, Vec<(i64, String)>), OutboxError> {
    let found = tx
        .prepare_cached("SELECT id, state FROM batches WHERE batch_id = ?1")?
        .query_row([batch_id], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })
        .optional()?;
    let id = match found {
        Some((id, state)) if state == batch_state::IN_FLIGHT => id,
        Some((_, state)) => {
            return Err(OutboxError::invalid(format!(
                "batch {batch_id} is not in flight any more ({state})"
            )));
        }
        None => {
            return Err(OutboxError::invalid(format!(
                "no batch {batch_id} in this outbox"
            )));
        }
    };
    let members = tx
        .prepare_cached(
            "SELECT o.seq, o.op_id FROM batch_ops b JOIN ops o ON o.seq = b.seq
             WHERE b.batch = ?1 ORDER BY b.position",
        )?
        .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok((id, members))
}
