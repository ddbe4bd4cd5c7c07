//! Append semantics: authority, cursor fence, then per op dedupe, dependencies, validation and application.

use std::borrow::Cow;
use std::collections::HashMap;

use capsync_shared::{Cursor, OpId, OpKind};
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

use super::authority::{self, Access, ShareRow};
use super::convert::{cursor_column, cursor_param};
use super::{audit, records};
use crate::ledger::rules::compacted_output::clear_compacted_output;
use crate::ledger::{
    Ack, AuditEvent, Authority, BatchIn, LedgerError, LedgerResult, OpIn, OpOutcome, OpResult,
    RejectReason,
};
use capsync_shared::model;

/// What an append on an archived share is told.
pub(super) const ARCHIVED: &str = "share is archived; unarchive it to append";

/// Applies `batch` inside the caller's transaction (see ARCHITECTURE.md, "appendOps").
///
/// With `reclaim_compacted`, a part upsert of a compacted tool part is stored
/// (in the ledger and in the parts) with its output and attachments cleared.
pub(super) fn append(
    conn: &Connection,
    writer: &Authority,
    batch: &BatchIn,
    reclaim_compacted: bool,
    now: i64,
) -> LedgerResult<Ack> {
    let share = authority::check_share(conn, writer, Access::Write, now)?;
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
        conn,
        share: &share,
        writer,
        batch_id: &batch.batch_id,
        now,
        reclaim_compacted,
        cursor: share.cursor,
        applied_here: HashMap::new(),
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
    let cursor = run.cursor;
    if cursor != share.cursor {
        conn.prepare_cached("UPDATE shares SET cursor = ?2, updated_at = ?3 WHERE id = ?1")?
            .execute(params![share.id.as_str(), cursor_param(cursor)?, now])?;
    }
    let ack = Ack { cursor, results };
    // The audit line commits with the batch: atomic with it, and no second
    // transaction (and fsync) per append.
    audit::insert(conn, &append_audit(writer, batch, &ack), now)?;
    Ok(ack)
}

fn append_audit(writer: &Authority, batch: &BatchIn, ack: &Ack) -> AuditEvent {
    let (mut applied, mut duplicate, mut rejected) = (0, 0, 0);
    for result in &ack.results {
        match result.outcome {
            OpOutcome::Applied(_) => applied += 1,
            OpOutcome::Duplicate(_) => duplicate += 1,
            OpOutcome::Rejected { .. } => rejected += 1,
        }
    }
    AuditEvent {
        action: "append",
        token_id: Some(writer.token_id.clone()),
        share_id: writer.share.as_ref().map(|(id, _)| id.clone()),
        outcome: "ok".into(),
        detail: format!(
            "batch={} cursor={} applied={applied} duplicate={duplicate} rejected={rejected}",
            batch.batch_id, ack.cursor
        ),
    }
}

/// One batch being applied.
struct BatchRun<'a> {
    conn: &'a Connection,
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
}

impl<'a> BatchRun<'a> {
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
        // Claim the op id first: the unique index answers "duplicate?" in the
        // same probe that records the op, instead of a lookup before it. An op
        // refused below gives its claim back.
        let cursor = Cursor(self.cursor.0 + 1);
        let claimed = self
            .conn
            .prepare_cached(
                "INSERT INTO ops (share_id, cursor, op_id, kind, payload, token_id, batch_id, applied_at, digest)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (share_id, op_id) DO NOTHING",
            )?
            .execute(params![
                self.share.id.as_str(),
                cursor_param(cursor)?,
                op.op_id.as_str(),
                op.kind.as_str(),
                payload.as_ref(),
                self.writer.token_id.as_str(),
                self.batch_id,
                self.now,
                digest.0.as_slice(),
            ])?
            == 1;
        if !claimed {
            let (at, first) = self.applied_with_digest(&op.op_id)?;
            return Ok(repeated(op, at, first.as_deref(), &digest));
        }
        match self.check_and_apply(op, &payload)? {
            Ok(()) => {
                self.cursor = cursor;
                self.applied_here
                    .insert(op.op_id.as_str(), (cursor, digest));
                Ok(OpOutcome::Applied(cursor))
            }
            Err(outcome) => {
                self.conn
                    .prepare_cached("DELETE FROM ops WHERE share_id = ?1 AND cursor = ?2")?
                    .execute(params![self.share.id.as_str(), cursor_param(cursor)?])?;
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
    fn check_and_apply(&mut self, op: &OpIn, payload: &str) -> LedgerResult<Result<(), OpOutcome>> {
        for dependency in &op.depends_on {
            if self.applied_at(dependency)?.is_none() {
                return Ok(Err(rejected(
                    RejectReason::MissingDependency,
                    format!("depends on op {dependency}, which is not applied in this share"),
                )));
            }
        }
        let effect = match model::op::parse(op.kind, payload, Some(&self.share.session_id)) {
            Ok(effect) => effect,
            Err(reason) => return Ok(Err(rejected(RejectReason::Invalid, reason))),
        };
        let refused = records::apply(self.conn, self.share.id.as_str(), &effect)?;
        Ok(refused.map_err(|refusal| rejected(refusal.reason, refusal.detail)))
    }

    /// The cursor and content digest of an op id already in the ledger
    /// (the digest is `None` for ops applied before digests were kept).
    fn applied_with_digest(&self, op_id: &OpId) -> LedgerResult<(Cursor, Option<Vec<u8>>)> {
        self.conn
            .prepare_cached("SELECT cursor, digest FROM ops WHERE share_id = ?1 AND op_id = ?2")?
            .query_row(params![self.share.id.as_str(), op_id.as_str()], |r| {
                Ok((cursor_column(r, 0)?, r.get(1)?))
            })
            .optional()?
            .ok_or_else(|| {
                LedgerError::Storage(format!("op {op_id} conflicted but is not in the ledger"))
            })
    }

    /// The cursor `op_id` was applied at in this share, if it was.
    fn applied_at(&self, op_id: &OpId) -> LedgerResult<Option<Cursor>> {
        if let Some((cursor, _)) = self.applied_here.get(op_id.as_str()) {
            return Ok(Some(*cursor));
        }
        let cursor = self
            .conn
            .prepare_cached("SELECT cursor FROM ops WHERE share_id = ?1 AND op_id = ?2")?
            .query_row(params![self.share.id.as_str(), op_id.as_str()], |r| {
                cursor_column(r, 0)
            })
            .optional()?;
        Ok(cursor)
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
