//! Materialized records: applies a parsed [`Effect`] to a share's stored session, messages, parts, diffs and models.
//!
//! Each effect first checks what it needs from the stored records and only
//! then writes, so a rejected op leaves nothing behind.

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;

use super::errors::corrupt;
use crate::ledger::{LedgerResult, RejectReason};
use capsync_shared::model::Effect;
use capsync_shared::model::progress::is_older;

/// Why stored state refuses an otherwise well-formed op.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Refusal {
    pub reason: RejectReason,
    /// A short sentence for the agent.
    pub detail: String,
}

impl Refusal {
    fn invalid(detail: String) -> Self {
        Self {
            reason: RejectReason::Invalid,
            detail,
        }
    }

    fn stale(detail: String) -> Self {
        Self {
            reason: RejectReason::StaleTransition,
            detail,
        }
    }
}

/// Applies `effect` to the records of `share_id`, or says why the stored state refuses it.
pub(super) fn apply(
    conn: &Connection,
    share_id: &str,
    effect: &Effect,
) -> LedgerResult<Result<(), Refusal>> {
    match effect {
        Effect::Session { updated, json } => {
            let stored: Option<Option<i64>> = conn
                .prepare_cached("SELECT updated FROM sessions WHERE share_id = ?1")?
                .query_row([share_id], |r| r.get(0))
                .optional()?;
            if is_older(*updated, stored.flatten()) {
                return Ok(Err(Refusal::stale(
                    "the session was already updated later (time.updated)".to_owned(),
                )));
            }
            conn.prepare_cached(
                "INSERT INTO sessions (share_id, updated, json) VALUES (?1, ?2, ?3)
                 ON CONFLICT (share_id) DO UPDATE
                 SET updated = excluded.updated, json = excluded.json",
            )?
            .execute(params![share_id, updated, json])?;
        }
        Effect::MessageUpsert { id, terminal, json } => {
            let stored_terminal: Option<bool> = conn
                .prepare_cached("SELECT terminal FROM messages WHERE share_id = ?1 AND id = ?2")?
                .query_row(params![share_id, id], |r| r.get(0))
                .optional()?;
            if is_older(Some(*terminal), stored_terminal) {
                return Ok(Err(Refusal::stale(format!(
                    "message {id} is already completed or errored and cannot move back"
                ))));
            }
            conn.prepare_cached(
                "INSERT INTO messages (share_id, id, terminal, json) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (share_id, id) DO UPDATE
                 SET terminal = excluded.terminal, json = excluded.json",
            )?
            .execute(params![share_id, id, terminal, json])?;
        }
        Effect::MessageRemove { id } => {
            // Its parts go with it, including any that arrived before it.
            conn.prepare_cached("DELETE FROM parts WHERE share_id = ?1 AND message_id = ?2")?
                .execute(params![share_id, id])?;
            conn.prepare_cached("DELETE FROM messages WHERE share_id = ?1 AND id = ?2")?
                .execute(params![share_id, id])?;
        }
        Effect::PartUpsert {
            id,
            message_id,
            finished,
            json,
        } => {
            let stored_finished: Option<bool> = conn
                .prepare_cached("SELECT finished FROM parts WHERE share_id = ?1 AND id = ?2")?
                .query_row(params![share_id, id], |r| r.get(0))
                .optional()?;
            if is_older(Some(*finished), stored_finished) {
                return Ok(Err(Refusal::stale(format!(
                    "part {id} is already finished and cannot move back"
                ))));
            }
            // A part whose message has not arrived yet is kept: snapshots come
            // concurrently, and a client that never resends would lose it. It
            // shows once its message exists. A part that moved to another
            // message follows it: message_id is replaced along with the JSON.
            conn.prepare_cached(
                "INSERT INTO parts (share_id, id, message_id, finished, json)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (share_id, id) DO UPDATE
                 SET message_id = excluded.message_id, finished = excluded.finished,
                     json = excluded.json",
            )?
            .execute(params![share_id, id, message_id, finished, json])?;
        }
        Effect::PartRemove { id } => {
            conn.prepare_cached("DELETE FROM parts WHERE share_id = ?1 AND id = ?2")?
                .execute(params![share_id, id])?;
        }
        Effect::PartDelta { id, field, delta } => {
            return part_delta(conn, share_id, id, field, delta);
        }
        Effect::DiffSet { json } => {
            conn.prepare_cached(
                "INSERT INTO diffs (share_id, json) VALUES (?1, ?2)
                 ON CONFLICT (share_id) DO UPDATE SET json = excluded.json",
            )?
            .execute(params![share_id, json])?;
        }
        Effect::ModelUpsert { id, json } => {
            conn.prepare_cached(
                "INSERT INTO models (share_id, id, json) VALUES (?1, ?2, ?3)
                 ON CONFLICT (share_id, id) DO UPDATE SET json = excluded.json",
            )?
            .execute(params![share_id, id, json])?;
        }
    }
    Ok(Ok(()))
}

/// Appends to a string field of a stored part.
///
/// The stored JSON is parsed and written back whole, so the cost grows with
/// the part's size; object keys come back in sorted order.
fn part_delta(
    conn: &Connection,
    share_id: &str,
    id: &str,
    field: &str,
    delta: &str,
) -> LedgerResult<Result<(), Refusal>> {
    let stored: Option<(String, bool)> = conn
        .prepare_cached("SELECT json, finished FROM parts WHERE share_id = ?1 AND id = ?2")?
        .query_row(params![share_id, id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((stored, finished)) = stored else {
        return Ok(Err(Refusal::invalid(format!(
            "part {id} does not exist in this share"
        ))));
    };
    // A finished part's snapshot holds its whole text already: a delta sent before the
    // end (arriving late, from another writer of the share) would add it a second time.
    if finished {
        return Ok(Err(Refusal::stale(format!(
            "part {id} is finished; its stored snapshot has the whole text"
        ))));
    }
    let mut part: Value =
        serde_json::from_str(&stored).map_err(|e| corrupt(format!("part {id}: {e}")))?;
    let Some(obj) = part.as_object_mut() else {
        return Err(corrupt(format!("part {id} is not a JSON object")));
    };
    match obj.get_mut(field) {
        None => {
            obj.insert(field.to_owned(), Value::String(delta.to_owned()));
        }
        Some(Value::String(text)) => text.push_str(delta),
        Some(_) => {
            return Ok(Err(Refusal::invalid(format!(
                "part {id}'s field \"{field}\" is not a string"
            ))));
        }
    }
    let json = serde_json::to_string(&part).map_err(|e| corrupt(format!("part {id}: {e}")))?;
    conn.prepare_cached("UPDATE parts SET json = ?3 WHERE share_id = ?1 AND id = ?2")?
        .execute(params![share_id, id, json])?;
    Ok(Ok(()))
}
