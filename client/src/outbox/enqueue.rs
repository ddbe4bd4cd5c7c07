//! Storing ops: checked, deduplicated by op id, durable before the call returns.

use capsync_shared::limits::{MAX_DEPENDS_ON, MAX_OP_ID_BYTES};
use capsync_shared::ops::OpSpec;
use rusqlite::{OptionalExtension, Transaction, TransactionBehavior, params};

use super::{Enqueued, Outbox, OutboxError, now};

/// Largest payload (as JSON text) the outbox accepts. The server's own limit is lower by
/// default (1 MiB, `tooLarge` per op, reported as a rejection); this one only keeps out ops
/// so big that their message would exceed the server's RPC message limit (16 MiB by
/// default), which closes the connection instead of answering, and would be retried forever.
pub const MAX_PAYLOAD_BYTES: usize = 8 << 20;

/// Bytes counted per op on top of its strings, for the framing around them on the wire.
const OP_OVERHEAD_BYTES: usize = 64;

/// An op checked and serialized, ready to insert.
pub(super) struct NewOp {
    op_id: String,
    kind: &'static str,
    payload: String,
    depends_on: Vec<String>,
    bytes: i64,
}

impl Outbox {
    /// Stores `op`; once this returns `Ok` the op is on disk (committed with
    /// `synchronous=FULL`) and will be sent until the server acks or rejects it.
    ///
    /// The same op id with the same kind, payload and `dependsOn` gives
    /// [`Enqueued::AlreadyQueued`] (safe to call again after a crash); with different content,
    /// [`OutboxError::Conflict`]. A bad op id (empty or over 128 bytes), too many or bad
    /// `dependsOn` entries, or an oversized payload give [`OutboxError::Invalid`].
    pub async fn enqueue(&self, op: OpSpec) -> Result<Enqueued, OutboxError> {
        let enqueued = self
            .blocking(move |conn| {
                let new = NewOp::check(&op)?;
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let enqueued = insert(&tx, &new)?;
                tx.commit()?;
                Ok(enqueued)
            })
            .await?;
        if enqueued == Enqueued::Queued {
            self.bump_generation();
        }
        Ok(enqueued)
    }

    /// Stores many ops in one transaction, in order (one fsync for all of them). All or
    /// nothing: one conflicting or invalid op fails the call and stores none. Returns how
    /// many were newly queued.
    pub async fn enqueue_all(&self, ops: Vec<OpSpec>) -> Result<usize, OutboxError> {
        if ops.is_empty() {
            return Ok(0);
        }
        let queued = self
            .blocking(move |conn| {
                let new = ops
                    .iter()
                    .map(NewOp::check)
                    .collect::<Result<Vec<_>, _>>()?;
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let mut queued = 0;
                for op in &new {
                    if insert(&tx, op)? == Enqueued::Queued {
                        queued += 1;
                    }
                }
                tx.commit()?;
                Ok(queued)
            })
            .await?;
        if queued > 0 {
            self.bump_generation();
        }
        Ok(queued)
    }
}

impl NewOp {
    /// Checks what the server would refuse for the whole batch (so one bad op cannot block
    /// the ops around it), and serializes the payload once.
    pub(super) fn check(op: &OpSpec) -> Result<NewOp, OutboxError> {
        check_id(&op.op_id, "op id")?;
        if op.depends_on.len() > MAX_DEPENDS_ON {
            return Err(OutboxError::invalid(format!(
                "op {} depends on {} ops; the limit is {MAX_DEPENDS_ON}",
                op.op_id,
                op.depends_on.len()
            )));
        }
        for dep in &op.depends_on {
            check_id(dep, "dependsOn entry")?;
            if *dep == op.op_id {
                return Err(OutboxError::invalid(format!(
                    "op {} depends on itself",
                    op.op_id
                )));
            }
        }
        let payload = serde_json::to_string(&op.payload)
            .map_err(|e| OutboxError::invalid(format!("op {}: payload: {e}", op.op_id)))?;
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(OutboxError::invalid(format!(
                "op {} has a {}-byte payload; the outbox takes at most {MAX_PAYLOAD_BYTES}",
                op.op_id,
                payload.len()
            )));
        }
        let bytes = OP_OVERHEAD_BYTES
            + op.op_id.len()
            + payload.len()
            + op.depends_on.iter().map(String::len).sum::<usize>();
        Ok(NewOp {
            op_id: op.op_id.clone(),
            kind: op.kind.as_str(),
            payload,
            depends_on: op.depends_on.clone(),
            bytes: i64::try_from(bytes).unwrap_or(i64::MAX),
        })
    }
}

fn check_id(id: &str, what: &str) -> Result<(), OutboxError> {
    if id.is_empty() || id.len() > MAX_OP_ID_BYTES {
        return Err(OutboxError::invalid(format!(
            "{what} must be 1 to {MAX_OP_ID_BYTES} bytes (got {} bytes: {:?})",
            id.len(),
            truncated(id)
        )));
    }
    Ok(())
}

/// The start of a long id, for a readable error.
fn truncated(id: &str) -> String {
    match id.char_indices().nth(40) {
        Some((end, _)) => format!("{}...", &id[..end]),
        None => id.to_owned(),
    }
}

/// Inserts `op` unless its op id is already there; then compares contents.
pub(super) fn insert(tx: &Transaction<'_>, op: &NewOp) -> Result<Enqueued, OutboxError> {
    let existing = tx
        .prepare_cached("SELECT seq, kind, payload FROM ops WHERE op_id = ?1")?
        .query_row([&op.op_id], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })
        .optional()?;
    if let Some((seq, kind, payload)) = existing {
        let deps = super::batching::depends_on(tx, seq)?;
        let same = kind == op.kind && deps == op.depends_on && same_json(&payload, &op.payload);
        return if same {
            Ok(Enqueued::AlreadyQueued)
        } else {
            Err(OutboxError::Conflict {
                op_id: op.op_id.clone(),
            })
        };
    }
    tx.prepare_cached(
        "INSERT INTO ops (op_id, kind, payload, bytes, enqueued_at) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![op.op_id, op.kind, op.payload, op.bytes, now()])?;
    let seq = tx.last_insert_rowid();
    let mut insert_dep =
        tx.prepare_cached("INSERT INTO op_deps (seq, position, dep_op_id) VALUES (?1, ?2, ?3)")?;
    for (position, dep) in op.depends_on.iter().enumerate() {
        insert_dep.execute(params![seq, position as i64, dep])?;
    }
    Ok(Enqueued::Queued)
}

/// Whether two payloads are the same JSON document (text first; values if the text differs,
/// so formatting alone never counts as a conflict).
fn same_json(stored: &str, new: &str) -> bool {
    stored == new
        || matches!(
            (
                serde_json::from_str::<serde_json::Value>(stored),
                serde_json::from_str::<serde_json::Value>(new),
            ),
            (Ok(a), Ok(b)) if a == b
        )
}
