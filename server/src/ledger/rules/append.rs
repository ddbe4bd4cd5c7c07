//! Appending a batch exactly once: the writer's authority, the archive refusal,
//! the cursor fence, then per op dedupe by op id, dependencies, validation,
//! the records' rules and the next cursor, all in the caller's transaction.
//!
//! The share is locked by the authority check ([`Access::Write`]), so cursors
//! are given out gap-free however many transactions (or servers) append at once.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use capsync_shared::model::{Effect, op};
use capsync_shared::{Cursor, OpId, OpKind};
use sha2::{Digest, Sha256};

use super::authority::{self, Access};
use super::compacted_output::clear_compacted_output;
use super::records;
use super::store::{LedgerEntry, LedgerTx, Probe, ShareRow, Standing};
use crate::ledger::{
    Ack, AuditEvent, Authority, BatchIn, LedgerError, LedgerResult, LoggedOp, OpIn, OpOutcome,
    OpResult, RejectReason,
};

/// What an append on an archived share is told.
pub const ARCHIVED: &str = "share is archived; unarchive it to append";

/// What an append did: the ack, and the ops it applied as stored (which the
/// commit's announcement hands to the share's live feed, so it need not read them).
pub struct Appended {
    pub ack: Ack,
    pub ops: Arc<[LoggedOp]>,
}

/// Applies `batch` inside the caller's transaction.
///
/// With `reclaim_compacted`, a part upsert of a compacted tool part is stored
/// (in the ledger and in the parts) with its output and attachments cleared.
pub fn append(
    tx: &mut impl LedgerTx,
    writer: &Authority,
    batch: &BatchIn,
    reclaim_compacted: bool,
    now: i64,
) -> LedgerResult<Appended> {
    if let Some(before) = &batch.follows
        && !before.allows(tx.transaction())
    {
        return Err(LedgerError::OutOfOrder);
    }
    let share = authority::check_share(tx, writer, Access::Write, now)?;
    // Archived means read-only: a writer that still runs must not silently
    // revive a share an admin put away (checked in the same transaction as the
    // archive flag, so no append slips past an archive that committed first).
    if share.archived_at.is_some() {
        return Err(LedgerError::InvalidArgument(ARCHIVED.into()));
    }
    if let Some(expected) = batch.expected_cursor
        && expected != share.cursor
    {
        return Err(LedgerError::CursorConflict(share.cursor));
    }
    let mut run = BatchRun {
        tx,
        share: &share,
        writer,
        batch_id: &batch.batch_id,
        now,
        reclaim_compacted,
        cursor: share.cursor,
        applied_here: HashMap::new(),
        logged: Vec::new(),
    };
    let results = batch
        .ops
        .iter()
        .map(|op| {
            Ok(OpResult {
                op_id: op.op_id.clone(),
                outcome: run.op(op)?,
            })
        })
        .collect::<LedgerResult<Vec<_>>>()?;
    let (cursor, logged) = (run.cursor, run.logged);
    if cursor != share.cursor {
        tx.set_cursor(&share.id, cursor, now)?;
    }
    let ack = Ack { cursor, results };
    // The audit line commits with the batch: atomic with it, and no second
    // transaction (and fsync) per append.
    tx.audit(&append_audit(writer, batch, &ack), now)?;
    if let Some(link) = &batch.link {
        link.written(tx.transaction());
    }
    Ok(Appended {
        ack,
        ops: logged.into(),
    })
}

fn append_audit(writer: &Authority, batch: &BatchIn, ack: &Ack) -> AuditEvent {
    AuditEvent {
        action: "append",
        token_id: Some(writer.token_id.clone()),
        share_id: writer.share.as_ref().map(|(id, _)| id.clone()),
        outcome: "ok".into(),
        detail: format!(
            "batch={} cursor={} applied={} duplicate={} rejected={}",
            batch.batch_id,
            ack.cursor,
            ack.applied(),
            ack.duplicates(),
            ack.rejected()
        ),
    }
}

/// One batch being applied.
struct BatchRun<'a, T> {
    tx: &'a mut T,
    share: &'a ShareRow,
    /// Recorded on every ledger row it applies.
    writer: &'a Authority,
    batch_id: &'a str,
    now: i64,
    /// Whether compacted tool parts are stored without their output.
    reclaim_compacted: bool,
    /// The share's cursor after the ops applied so far.
    cursor: Cursor,
    /// Ops applied earlier in this batch, with their content digests: they
    /// count for dedupe and dependencies exactly like ledger rows (they are
    /// ledger rows already; this just saves the lookups).
    applied_here: HashMap<&'a str, (Cursor, OpDigest)>,
    /// The ops applied so far, as stored.
    logged: Vec<LoggedOp>,
}

impl<'a, T: LedgerTx> BatchRun<'a, T> {
    fn op(&mut self, op: &'a OpIn) -> LedgerResult<OpOutcome> {
        let digest = OpDigest::of(op);
        if let Some((at, first)) = self.applied_here.get(op.op_id.as_str()) {
            return Ok(repeated(op, *at, Some(first.0.as_slice()), &digest));
        }
        if op.depends_on.contains(&op.op_id) {
            return Ok(rejected(
                RejectReason::Invalid,
                "op depends on itself".to_owned(),
            ));
        }
        let payload = self.stored_payload(op);
        // Parsed before the claim so that the claim can bring back what the op's
        // record rule reads; an invalid op is only refused after its dependencies,
        // and a resent one is a duplicate whatever it holds.
        let effect = op::parse(op.kind, &payload, Some(&self.share.session_id));
        let probe = effect.as_ref().map_or(Probe::Nothing, records::probe);
        // Claim the op id first: the unique index answers "duplicate?" in the
        // same probe that records the op, instead of a lookup before it. An op
        // refused below gives its claim back.
        let cursor = Cursor(self.cursor.0 + 1);
        let entry = LedgerEntry {
            cursor,
            op_id: &op.op_id,
            kind: op.kind,
            payload: &payload,
            token_id: &self.writer.token_id,
            batch_id: self.batch_id,
            applied_at: self.now,
            digest: &digest.0,
        };
        let Some(standing) = self.tx.claim_op_and_probe(&self.share.id, &entry, probe)? else {
            let (at, first) = self
                .tx
                .logged_op(&self.share.id, &op.op_id)?
                .ok_or_else(|| {
                    LedgerError::Storage(format!(
                        "op {} conflicted but is not in the ledger",
                        op.op_id
                    ))
                })?;
            return Ok(repeated(op, at, first.as_deref(), &digest));
        };
        match self.check_and_apply(op, effect, standing)? {
            Ok(()) => {
                self.cursor = cursor;
                self.applied_here
                    .insert(op.op_id.as_str(), (cursor, digest));
                self.logged.push(LoggedOp {
                    cursor,
                    op_id: op.op_id.clone(),
                    kind: op.kind,
                    payload: payload.into_owned(),
                    applied_at: self.now,
                });
                Ok(OpOutcome::Applied(cursor))
            }
            Err(outcome) => {
                self.tx.release_op(&self.share.id, cursor)?;
                Ok(outcome)
            }
        }
    }

    /// What is stored for `op`, in its ledger row and its record: the agent's
    /// payload, or with reclaim on, a compacted tool part without its output.
    /// Clearing before the ledger row is written means the output never
    /// reaches the disk, and viewers replaying ops see what a snapshot shows.
    fn stored_payload<'p>(&self, op: &'p OpIn) -> Cow<'p, str> {
        if self.reclaim_compacted
            && op.kind == OpKind::PartUpsert
            && let Some(cleared) = clear_compacted_output(&op.payload)
        {
            return Cow::Owned(cleared);
        }
        Cow::Borrowed(&op.payload)
    }

    /// Dependencies, payload and stored state, then the record write; or the rejection.
    fn check_and_apply(
        &mut self,
        op: &OpIn,
        effect: Result<Effect, String>,
        standing: Standing,
    ) -> LedgerResult<Result<(), OpOutcome>> {
        for dependency in &op.depends_on {
            if !self.is_applied(dependency)? {
                return Ok(Err(rejected(
                    RejectReason::MissingDependency,
                    format!("depends on op {dependency}, which is not applied in this share"),
                )));
            }
        }
        let effect = match effect {
            Ok(effect) => effect,
            Err(reason) => return Ok(Err(rejected(RejectReason::Invalid, reason))),
        };
        let refused = records::apply(self.tx, &self.share.id, &effect, standing)?;
        Ok(refused.map_err(|refusal| rejected(refusal.reason, refusal.detail)))
    }

    /// Whether `op_id` is applied in this share (in this batch or before).
    fn is_applied(&mut self, op_id: &OpId) -> LedgerResult<bool> {
        if self.applied_here.contains_key(op_id.as_str()) {
            return Ok(true);
        }
        Ok(self.tx.logged_op(&self.share.id, op_id)?.is_some())
    }
}

fn rejected(reason: RejectReason, detail: String) -> OpOutcome {
    OpOutcome::Rejected { reason, detail }
}

/// What an op id already applied (at `at`, with content digest `first`) means
/// for `op` carrying it again: the same content is a duplicate, other content
/// is refused (an op id names one change forever, like an idempotency key).
fn repeated(op: &OpIn, at: Cursor, first: Option<&[u8]>, digest: &OpDigest) -> OpOutcome {
    match first {
        Some(first) if first != digest.0.as_slice() => rejected(
            RejectReason::OpIdReused,
            format!(
                "op id {} was applied at cursor {at} with other content (kind, payload or \
                 dependsOn); an op id names one change forever: give this change a new id",
                op.op_id
            ),
        ),
        // Ops applied before digests were kept cannot be compared: as before, a duplicate.
        _ => OpOutcome::Duplicate(at),
    }
}

/// A digest of an op's content as the agent sent it: kind, payload and
/// dependencies. Stored with the op (and kept by compaction), so a later op
/// with the same id can be told apart from a true resend.
struct OpDigest([u8; 16]);

impl OpDigest {
    fn of(op: &OpIn) -> Self {
        let mut hasher = Sha256::new();
        // Each field is length-prefixed, so no two different ops hash the same input.
        for field in std::iter::once(op.kind.as_str())
            .chain(std::iter::once(op.payload.as_str()))
            .chain(op.depends_on.iter().map(OpId::as_str))
        {
            hasher.update((field.len() as u64).to_le_bytes());
            hasher.update(field.as_bytes());
        }
        let full = hasher.finalize();
        let mut digest = [0u8; 16];
        digest.copy_from_slice(&full[..16]);
        Self(digest)
    }
}
