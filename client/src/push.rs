//! Sending a list of ops to a share in batches, as `capsync push` does, and totting up the acks.
//!
//! Batch ids are derived from the op ids they carry (`push-<16 hex of sha256>`), so pushing
//! the same file twice sends the same batches under the same ids; the server answers
//! `duplicate` for every op the second time. A batch the server refuses as `tooLarge` is
//! split in half and retried.
//!
//! Ops rejected as `missingDependency` (an op id in their `dependsOn` is not applied yet)
//! are sent again after the rest, for as long as that makes progress: an ops file may list
//! an op before one it declares in `dependsOn`. Only `dependsOn` works that way. The server
//! checks record references when an op applies and refuses a `part.upsert` whose message
//! does not exist (yet) as `invalid`, which is final: such an op is reported, not resent.
//! So a part listed before its message needs the message's op id in its `dependsOn`
//! (exports always list a message before its parts).

use capsync_shared::ErrorCode;
use capsync_shared::ops::{OpKind, OpSpec};
use serde::Serialize;

use crate::error::ClientError;
use crate::export::sha256_hex;
use crate::writer::{Batch, OpOutcome, RejectReason, WriterClient};

/// Default number of ops per batch.
pub const DEFAULT_BATCH_SIZE: usize = 100;

/// Most rounds of sending: the first sends every op, each later one only the ops rejected
/// for a missing `dependsOn` op.
const MAX_DEPENDENCY_ROUNDS: usize = 4;

/// One op the server did not apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RejectedOp {
    pub op_id: String,
    pub kind: OpKind,
    pub reason: RejectReason,
    pub detail: String,
}

/// What a push did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PushReport {
    /// Ops in the input.
    pub ops: usize,
    /// `appendOps` calls made (including splits and dependency retries).
    pub batches: usize,
    pub applied: usize,
    pub duplicates: usize,
    /// Ops finally not applied, in input order.
    pub rejected: Vec<RejectedOp>,
    /// The share's cursor after the last batch.
    pub cursor: u64,
}

impl PushReport {
    /// Whether some op can never apply as sent (`invalid`, `opIdReused`, `tooLarge`) or
    /// still misses a dependency: the input has a problem the caller must fix.
    /// `staleTransition` (an older state of a finished record, e.g. from replaying an old
    /// export) does not count.
    pub fn has_errors(&self) -> bool {
        self.rejected.iter().any(|r| {
            matches!(
                r.reason,
                RejectReason::Invalid
                    | RejectReason::MissingDependency
                    | RejectReason::OpIdReused
                    | RejectReason::TooLarge
            )
        })
    }
}

/// The deterministic id of a batch of ops: `push-` and 16 hex digits of the SHA-256 of
/// their op ids, one per line.
pub fn batch_id(ops: &[OpSpec]) -> String {
    let mut joined = String::new();
    for op in ops {
        joined.push_str(&op.op_id);
        joined.push('\n');
    }
    format!("push-{}", &sha256_hex(joined.as_bytes())[..16])
}

/// Pushes `ops` through `writer` in batches of at most `batch_size` (0 means the default).
///
/// `on_batch` is called after each acked batch with the running report (for progress
/// output). A whole-batch failure (revoked, permission denied, disconnected, ...) stops
/// the push with that error; ops already acked stay applied, and pushing again is harmless.
pub async fn push_ops(
    writer: &WriterClient,
    ops: &[OpSpec],
    batch_size: usize,
    mut on_batch: impl FnMut(&PushReport),
) -> Result<PushReport, ClientError> {
    let batch_size = if batch_size == 0 {
        DEFAULT_BATCH_SIZE
    } else {
        batch_size
    };
    let mut report = PushReport {
        ops: ops.len(),
        ..PushReport::default()
    };
    if ops.is_empty() {
        report.cursor = writer.state().await?.cursor;
        return Ok(report);
    }

    let mut pending: Vec<OpSpec> = ops.to_vec();
    for round in 0..MAX_DEPENDENCY_ROUNDS {
        let mut waiting = Vec::new();
        let mut rejected = Vec::new();
        let applied_before = report.applied;
        // Batches still to send; a batch split for size goes back to the front.
        let mut queue: Vec<Vec<OpSpec>> = pending
            .chunks(batch_size)
            .rev()
            .map(<[OpSpec]>::to_vec)
            .collect();
        while let Some(ops) = queue.pop() {
            let batch = Batch::new(batch_id(&ops), ops);
            let ack = match writer.append(&batch).await {
                Ok(ack) => ack,
                Err(e) if e.code() == Some(ErrorCode::TooLarge) && batch.ops.len() > 1 => {
                    let mut ops = batch.ops;
                    let second = ops.split_off(ops.len() / 2);
                    queue.push(second);
                    queue.push(ops);
                    continue;
                }
                Err(e) => return Err(e),
            };
            if ack.results.len() != batch.ops.len() {
                return Err(ClientError::Rpc(capnp::Error::failed(format!(
                    "the server acked {} results for a batch of {} ops",
                    ack.results.len(),
                    batch.ops.len()
                ))));
            }
            report.batches += 1;
            report.cursor = ack.cursor.0;
            for (op, result) in batch.ops.iter().zip(&ack.results) {
                match &result.outcome {
                    OpOutcome::Applied(_) => report.applied += 1,
                    OpOutcome::Duplicate(_) => report.duplicates += 1,
                    OpOutcome::Rejected {
                        reason: RejectReason::MissingDependency,
                        detail,
                    } => waiting.push((op.clone(), detail.clone())),
                    OpOutcome::Rejected { reason, detail } => rejected.push(RejectedOp {
                        op_id: op.op_id.clone(),
                        kind: op.kind,
                        reason: *reason,
                        detail: detail.clone(),
                    }),
                }
            }
            on_batch(&report);
        }
        report.rejected.extend(rejected);
        let progressed = report.applied > applied_before;
        if waiting.is_empty() || !progressed || round + 1 == MAX_DEPENDENCY_ROUNDS {
            report
                .rejected
                .extend(waiting.into_iter().map(|(op, detail)| RejectedOp {
                    op_id: op.op_id,
                    kind: op.kind,
                    reason: RejectReason::MissingDependency,
                    detail,
                }));
            break;
        }
        pending = waiting.into_iter().map(|(op, _)| op).collect();
    }
    // Report rejections in input order, whatever round they came from.
    let position: std::collections::HashMap<&str, usize> = ops
        .iter()
        .enumerate()
        .map(|(i, op)| (op.op_id.as_str(), i))
        .collect();
    report.rejected.sort_by_key(|r| {
        position
            .get(r.op_id.as_str())
            .copied()
            .unwrap_or(usize::MAX)
    });
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn op(id: &str) -> OpSpec {
        OpSpec::new(id, OpKind::DiffSet, json!([]))
    }

    #[test]
    fn batch_ids_depend_only_on_the_op_ids() {
        let a = [op("a"), op("b")];
        let b = [op("a"), op("b")];
        assert_eq!(batch_id(&a), batch_id(&b));
        assert_ne!(batch_id(&a), batch_id(&[op("b"), op("a")]));
        assert_ne!(batch_id(&a), batch_id(&[op("a")]));
        // "a\nb" must not collide with "a" + "\nb"-style joins.
        assert_ne!(batch_id(&[op("ab")]), batch_id(&[op("a"), op("b")]));
        let id = batch_id(&a);
        assert!(id.starts_with("push-") && id.len() == 21, "{id}");
    }

    #[test]
    fn only_real_problems_count_as_errors() {
        let mut report = PushReport::default();
        assert!(!report.has_errors());
        report.rejected.push(RejectedOp {
            op_id: "x".into(),
            kind: OpKind::MessageUpsert,
            reason: RejectReason::StaleTransition,
            detail: String::new(),
        });
        assert!(!report.has_errors());
        report.rejected[0].reason = RejectReason::Invalid;
        assert!(report.has_errors());
    }
}
