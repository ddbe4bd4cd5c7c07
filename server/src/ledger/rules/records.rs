//! Materialized records: applies a parsed [`Effect`] to a share's stored session,
//! messages, parts, diffs and models, by the stale-transition rules of
//! [`progress`](capsync_shared::model::progress).
//!
//! Each effect first checks what it needs from the stored records and only
//! then writes, so a refused op leaves nothing behind. Removing a message or a part is
//! final: its id stays removed in the share (a later snapshot of it, or of a part of a
//! removed message, is a stale transition).

use capsync_shared::ShareId;
use capsync_shared::model::Effect;
use capsync_shared::model::progress::is_older;

use super::part_text;
use super::store::{LedgerTx, Probe, Removable, Standing};
use crate::ledger::{LedgerError, LedgerResult, RejectReason};

/// Why stored state refuses an otherwise well-formed op.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: RejectReason,
    /// A short sentence for the agent.
    pub detail: String,
}

impl Refusal {
    pub(super) fn invalid(detail: String) -> Self {
        Self {
            reason: RejectReason::Invalid,
            detail,
        }
    }

    pub(super) fn stale(detail: String) -> Self {
        Self {
            reason: RejectReason::StaleTransition,
            detail,
        }
    }
}

/// What [`apply`] needs to read about `effect`'s record before it writes.
pub fn probe(effect: &Effect) -> Probe<'_> {
    match effect {
        Effect::Session { .. } => Probe::Session,
        Effect::MessageUpsert { id, .. } => Probe::Message(id),
        Effect::PartUpsert { id, message_id, .. } => Probe::Part { id, message_id },
        Effect::PartDelta { id, field, .. } => Probe::PartText { id, field },
        Effect::MessageRemove { .. }
        | Effect::PartRemove { .. }
        | Effect::DiffSet { .. }
        | Effect::ModelUpsert { .. } => Probe::Nothing,
    }
}

/// Applies `effect` to the records of `share`, or says why the stored state refuses it.
/// `standing` is the answer to [`probe`] of `effect`, read in this transaction.
pub fn apply(
    tx: &mut impl LedgerTx,
    share: &ShareId,
    effect: &Effect,
    standing: Standing,
) -> LedgerResult<Result<(), Refusal>> {
    match (effect, standing) {
        (Effect::Session { updated, json }, Standing::Session(stored)) => {
            if is_older(*updated, stored.flatten()) {
                return Ok(Err(Refusal::stale(
                    "the session was already updated later (time.updated)".to_owned(),
                )));
            }
            tx.put_session(share, *updated, json)?;
        }
        (Effect::MessageUpsert { id, terminal, json }, Standing::Message(standing)) => {
            if standing.removed {
                return Ok(Err(removed("message", id)));
            }
            if is_older(Some(*terminal), standing.terminal) {
                return Ok(Err(Refusal::stale(format!(
                    "message {id} is already completed or errored and cannot move back"
                ))));
            }
            tx.put_message(share, id, *terminal, json)?;
        }
        // Its parts go with it, including any that arrived before it.
        (Effect::MessageRemove { id }, Standing::Nothing) => {
            tx.remove_message(share, id)?;
            tx.mark_removed(share, Removable::Message, id)?;
        }
        (
            Effect::PartUpsert {
                id,
                message_id,
                finished,
                json,
            },
            Standing::Part(standing),
        ) => {
            if standing.removed {
                return Ok(Err(removed("part", id)));
            }
            if standing.message_removed {
                return Ok(Err(removed("message", message_id)));
            }
            if is_older(Some(*finished), standing.finished) {
                return Ok(Err(Refusal::stale(format!(
                    "part {id} is already finished and cannot move back"
                ))));
            }
            // A part whose message has not arrived yet is kept: snapshots come
            // concurrently, and a client that never resends would lose it. It
            // shows once its message exists. A part that moved to another
            // message follows it: message_id is replaced along with the JSON.
            tx.put_part(share, id, message_id, *finished, json)?;
        }
        (Effect::PartRemove { id }, Standing::Nothing) => {
            tx.remove_part(share, id)?;
            tx.mark_removed(share, Removable::Part, id)?;
        }
        (Effect::PartDelta { id, field, delta }, Standing::PartText(end)) => {
            return part_text::append(tx, share, end, id, field, delta);
        }
        (Effect::DiffSet { json }, Standing::Nothing) => tx.put_diffs(share, json)?,
        (Effect::ModelUpsert { id, json }, Standing::Nothing) => tx.put_model(share, id, json)?,
        (effect, _) => {
            return Err(LedgerError::Storage(format!(
                "the stored state read is not the {:?} the op's rule asks for",
                probe(effect)
            )));
        }
    }
    Ok(Ok(()))
}

/// A snapshot of a record the share has removed. Removal is final: opencode never reuses
/// an id, and its own share client never sends removals but keeps each record's latest
/// snapshot for a second before sending it, so with a second writer on the share (the
/// plugin's shipper) a snapshot taken just before a removal can arrive after it and would
/// bring back what the session no longer has.
fn removed(kind: &str, id: &str) -> Refusal {
    Refusal::stale(format!(
        "{kind} {id} was removed from this share; a removed record does not come back"
    ))
}

/// A stored value that the rules' own writes could not have produced.
pub fn corrupt(what: impl std::fmt::Display) -> LedgerError {
    LedgerError::Storage(format!("unexpected stored data: {what}"))
}
