//! Text that `part.delta`s append to a part, kept apart from the part's snapshot so that
//! a delta costs the same however long the part has grown.
//!
//! A delta used to parse the stored part, append, and write the whole JSON back: a
//! 100 KB answer rewrote 100 KB per 10-byte delta. Now a delta extends the last chunk
//! of its field's appended text (or starts a new one once that chunk holds
//! [`CHUNK_BYTES`]), reading only whether the part exists, whether it is finished and
//! how big that chunk is. The part's next snapshot replaces it whole and drops its
//! chunks (the engine's [`LedgerTx::put_part`]); removing the part removes them.
//!
//! Every read of a part's record sees its whole text: [`Appended::fold`] puts the
//! chunks back into the snapshot's JSON where records are read (snapshot pages and part
//! lookups). Only a field's first delta after a snapshot parses the snapshot, to check
//! that the field is a string (or absent) before text is appended to it.

use std::collections::HashMap;

use capsync_shared::ShareId;
use serde_json::{Map, Value};

use super::records::{Refusal, corrupt};
use super::store::{ChunkWrite, LedgerTx, PartTextEnd};
use crate::ledger::LedgerResult;

/// How much appended text one chunk holds before the next delta starts another. Small
/// enough that extending a chunk rewrites well under a page (and stays inline, below
/// PostgreSQL's TOAST threshold), large enough that a 200 KB answer is 200 rows.
pub const CHUNK_BYTES: i64 = 1024;

/// Appends `delta` to string `field` of part `id`; `end` is the answer to
/// [`Probe::PartText`](super::store::Probe::PartText), read in this transaction.
pub fn append(
    tx: &mut impl LedgerTx,
    share: &ShareId,
    end: Option<PartTextEnd>,
    id: &str,
    field: &str,
    delta: &str,
) -> LedgerResult<Result<(), Refusal>> {
    let Some(end) = end else {
        return Ok(Err(Refusal::invalid(format!(
            "part {id} does not exist in this share"
        ))));
    };
    // A finished part's snapshot holds its whole text already: a delta sent before the
    // end (arriving late, from another writer of the share) would add it a second time.
    if end.finished {
        return Ok(Err(Refusal::stale(format!(
            "part {id} is finished; its stored snapshot has the whole text"
        ))));
    }
    let bytes = i64::try_from(delta.len()).unwrap_or(i64::MAX);
    match end.last_chunk {
        Some((seq, size)) if size.saturating_add(bytes) <= CHUNK_BYTES => {
            tx.write_part_chunk(share, id, field, ChunkWrite::Extend(seq), delta)?;
        }
        Some((seq, _)) => {
            tx.write_part_chunk(share, id, field, ChunkWrite::Start(seq + 1), delta)?
        }
        None => {
            // The field's first delta since the snapshot: the snapshot decides whether
            // the field can take text. Later deltas find this chunk and need not ask.
            let Some(stored) = tx.part(share, id)? else {
                return Err(corrupt(format!("part {id} has an end but no record")));
            };
            let part: Map<String, Value> =
                serde_json::from_str(&stored).map_err(|e| corrupt(format!("part {id}: {e}")))?;
            if part.get(field).is_some_and(|value| !value.is_string()) {
                return Ok(Err(Refusal::invalid(format!(
                    "part {id}'s field \"{field}\" is not a string"
                ))));
            }
            tx.write_part_chunk(share, id, field, ChunkWrite::Start(0), delta)?;
        }
    }
    Ok(Ok(()))
}

/// The text appended to some parts since their snapshots, as [`appended`] read it.
#[derive(Debug, Default)]
pub struct Appended {
    /// By part id: each field with text appended, and that text.
    by_part: HashMap<String, Vec<(String, String)>>,
}

/// The text appended to those of `ids` that have any.
pub fn appended(tx: &mut impl LedgerTx, share: &ShareId, ids: &[&str]) -> LedgerResult<Appended> {
    let mut by_part: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for chunk in tx.part_chunks(share, ids)? {
        let fields = by_part.entry(chunk.part_id).or_default();
        match fields.last_mut() {
            Some((field, text)) if *field == chunk.field => text.push_str(&chunk.text),
            _ => fields.push((chunk.field, chunk.text)),
        }
    }
    Ok(Appended { by_part })
}

impl Appended {
    /// Part `id`'s snapshot `json` with its appended text put back: the part's record as
    /// it stands. Object keys come back in sorted order when there was any.
    pub fn fold(&self, id: &str, json: String) -> LedgerResult<String> {
        let Some(fields) = self.by_part.get(id) else {
            return Ok(json);
        };
        let mut part: Map<String, Value> =
            serde_json::from_str(&json).map_err(|e| corrupt(format!("part {id}: {e}")))?;
        for (field, appended) in fields {
            match part.get_mut(field) {
                None => {
                    part.insert(field.clone(), Value::String(appended.clone()));
                }
                Some(Value::String(text)) => text.push_str(appended),
                // `append` checked the field before its first chunk.
                Some(_) => {
                    return Err(corrupt(format!(
                        "part {id}'s field \"{field}\" has appended text but is not a string"
                    )));
                }
            }
        }
        serde_json::to_string(&part).map_err(|e| corrupt(format!("part {id}: {e}")))
    }
}
