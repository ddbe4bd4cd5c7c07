//! Ops over the per-op size limit are refused alone, before any storage engine sees the batch.
//!
//! A record too large to keep (a pasted image inlined in a part, say) must not
//! take the rest of its batch down with it: clients such as opencode's share
//! client never resend a refused batch. So each such op gets its own
//! `rejected(tooLarge)` and the others apply as if it had not been sent
//! (an op that depends on it is then a missing dependency).

use futures::future::{BoxFuture, FutureExt};

use super::{Ack, Authority, BatchIn, Ledger, LedgerResult, OpOutcome, OpResult, RejectReason};

/// Appends `batch`, refusing each op whose payload is over `max_op_bytes` on its own.
/// Like [`Ledger::append`], the batch is queued when this is called, not when the
/// future is first polled: a writer's pipelined batches reach the ledger in call order.
pub fn append_within_limit(
    ledger: &Ledger,
    writer: Authority,
    mut batch: BatchIn,
    max_op_bytes: usize,
) -> BoxFuture<'static, LedgerResult<Ack>> {
    if batch.ops.iter().all(|op| op.payload.len() <= max_op_bytes) {
        return ledger.append(writer, batch);
    }
    // Each op's place: `None` for one that goes to the ledger, else its refusal.
    let mut refused = Vec::with_capacity(batch.ops.len());
    let mut fitting = Vec::with_capacity(batch.ops.len());
    for op in std::mem::take(&mut batch.ops) {
        if op.payload.len() > max_op_bytes {
            refused.push(Some(OpResult {
                outcome: OpOutcome::Rejected {
                    reason: RejectReason::TooLarge,
                    detail: format!(
                        "the payload is {} bytes; the limit is {max_op_bytes} bytes per op",
                        op.payload.len()
                    ),
                },
                op_id: op.op_id,
            }));
        } else {
            refused.push(None);
            fitting.push(op);
        }
    }
    batch.ops = fitting;
    let appended = ledger.append(writer, batch);
    async move {
        let ack = appended.await?;
        let mut applied = ack.results.into_iter();
        let results = refused
            .into_iter()
            .map(|refusal| match refusal {
                Some(refusal) => Some(refusal),
                None => applied.next(),
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                super::LedgerError::Storage("an ack lacks results for its ops".into())
            })?;
        Ok(Ack {
            cursor: ack.cursor,
            results,
        })
    }
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::follow::test_share::TestShare;
    use capsync_shared::{Cursor, OpId, OpKind};

    fn op(id: &str, text: &str, depends_on: &[&str]) -> crate::ledger::OpIn {
        crate::ledger::OpIn {
            op_id: OpId(id.into()),
            kind: OpKind::ModelUpsert,
            payload: serde_json::json!({"id": id, "text": text}).to_string(),
            depends_on: depends_on.iter().map(|d| OpId((*d).into())).collect(),
        }
    }

    #[tokio::test]
    async fn only_the_oversized_op_is_refused_and_the_rest_applies_in_order() {
        let share = TestShare::new().await;
        let big = "x".repeat(200);
        let batch = BatchIn {
            batch_id: "b".into(),
            ops: vec![
                op("a", "small", &[]),
                op("big", &big, &[]),
                op("c", "small", &[]),
                op("after-big", "small", &["big"]),
            ],
            expected_cursor: None,
            follows: None,
            link: None,
        };
        let ack = append_within_limit(&share.ledger, share.writer.clone(), batch, 100)
            .await
            .unwrap();
        let outcomes: Vec<(&str, &OpOutcome)> = ack
            .results
            .iter()
            .map(|r| (r.op_id.0.as_str(), &r.outcome))
            .collect();
        assert_eq!(outcomes[0], ("a", &OpOutcome::Applied(Cursor(1))));
        match outcomes[1] {
            (
                "big",
                OpOutcome::Rejected {
                    reason: RejectReason::TooLarge,
                    detail,
                },
            ) => assert!(detail.contains("limit is 100 bytes"), "{detail}"),
            other => panic!("the big op was not refused alone: {other:?}"),
        }
        assert_eq!(outcomes[2], ("c", &OpOutcome::Applied(Cursor(2))));
        assert!(matches!(
            outcomes[3],
            (
                "after-big",
                OpOutcome::Rejected {
                    reason: RejectReason::MissingDependency,
                    ..
                }
            )
        ));
        assert_eq!(ack.cursor, Cursor(2));
    }
}
