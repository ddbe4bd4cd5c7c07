//! Materialized records: applies a parsed [`Effect`] to a share's stored session, messages, parts, diffs and models.
//!
//! Each effect first checks what it needs from the stored records and only
//! then writes, so a rejected op leaves nothing behind.

use std::collections::HashSet;

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;

use super::errors::corrupt;
use super::payload::Effect;
use crate::ledger::{LedgerResult, RejectReason};

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
}

/// Messages known to exist in the share while one batch is applied, so a batch
/// of parts looks its message up once instead of once per part.
#[derive(Debug, Default)]
pub(super) struct KnownMessages(HashSet<String>);

/// Applies `effect` to the records of `share_id`, or says why the stored state refuses it.
pub(super) fn apply(
    conn: &Connection,
    share_id: &str,
    effect: &Effect,
    known: &mut KnownMessages,
) -> LedgerResult<Result<(), Refusal>> {
    match effect {
        Effect::Session { json } => {
            conn.prepare_cached(
                "INSERT INTO sessions (share_id, json) VALUES (?1, ?2)
                 ON CONFLICT (share_id) DO UPDATE SET json = excluded.json",
            )?
            .execute(params![share_id, json])?;
        }
        Effect::MessageUpsert { id, terminal, json } => {
            let stored_terminal: Option<bool> = conn
                .prepare_cached("SELECT terminal FROM messages WHERE share_id = ?1 AND id = ?2")?
                .query_row(params![share_id, id], |r| r.get(0))
                .optional()?;
            if stored_terminal == Some(true) && !terminal {
                return Ok(Err(Refusal {
                    reason: RejectReason::StaleTransition,
                    detail: format!(
                        "message {id} is already completed or errored and cannot move back"
                    ),
                }));
            }
            conn.prepare_cached(
                "INSERT INTO messages (share_id, id, terminal, json) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (share_id, id) DO UPDATE
                 SET terminal = excluded.terminal, json = excluded.json",
            )?
            .execute(params![share_id, id, terminal, json])?;
            known.0.insert(id.clone());
        }
        Effect::MessageRemove { id } => {
            // Its parts go with it (ON DELETE CASCADE).
            conn.prepare_cached("DELETE FROM messages WHERE share_id = ?1 AND id = ?2")?
                .execute(params![share_id, id])?;
            known.0.remove(id.as_str());
        }
        Effect::PartUpsert {
            id,
            message_id,
            json,
        } => {
            let message_exists = known.0.contains(message_id.as_str())
                || conn
                    .prepare_cached("SELECT 1 FROM messages WHERE share_id = ?1 AND id = ?2")?
                    .exists(params![share_id, message_id])?;
            if message_exists {
                known.0.insert(message_id.clone());
            } else {
                return Ok(Err(Refusal::invalid(format!(
                    "part's message {message_id} does not exist in this share"
                ))));
            }
            // A part that moved to another message follows it: message_id is
            // replaced along with the JSON.
            conn.prepare_cached(
                "INSERT INTO parts (share_id, id, message_id, json) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (share_id, id) DO UPDATE
                 SET message_id = excluded.message_id, json = excluded.json",
            )?
            .execute(params![share_id, id, message_id, json])?;
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
    let stored: Option<String> = conn
        .prepare_cached("SELECT json FROM parts WHERE share_id = ?1 AND id = ?2")?
        .query_row(params![share_id, id], |r| r.get(0))
        .optional()?;
    let Some(stored) = stored else {
        return Ok(Err(Refusal::invalid(format!(
            "part {id} does not exist in this share"
        ))));
    };
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
