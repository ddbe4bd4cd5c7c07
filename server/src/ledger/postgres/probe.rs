//! What the records rules read before they write ([`Probe`]), as columns that can
//! stand alone in a `SELECT` or ride along with the statement that claims an op, so
//! that an op costs PostgreSQL one round trip for "duplicate?" and "what is stored?".

use postgres::Row;

use super::errors::corrupt;
use super::tx::get;
use crate::ledger::LedgerResult;
use crate::ledger::rules::store::{MessageStanding, PartStanding, PartTextEnd, Probe, Standing};

/// The columns answering `probe`, for a statement whose `$1` is the share id and
/// whose next free parameter is `$first`; and the values of those parameters.
pub(super) fn columns<'p>(probe: Probe<'p>, first: usize) -> (String, Vec<&'p str>) {
    let (a, b) = (format!("${first}"), format!("${}", first + 1));
    match probe {
        Probe::Nothing => (String::new(), Vec::new()),
        Probe::Session => (
            "EXISTS (SELECT 1 FROM sessions WHERE share_id = $1), \
             (SELECT updated FROM sessions WHERE share_id = $1)"
                .to_owned(),
            Vec::new(),
        ),
        Probe::Message(id) => (
            format!(
                "EXISTS (SELECT 1 FROM removed WHERE share_id = $1 AND kind = 'message' AND id = {a}), \
                 (SELECT terminal FROM messages WHERE share_id = $1 AND id = {a})"
            ),
            vec![id],
        ),
        Probe::Part { id, message_id } => (
            format!(
                "EXISTS (SELECT 1 FROM removed WHERE share_id = $1 AND kind = 'part' AND id = {a}), \
                 EXISTS (SELECT 1 FROM removed WHERE share_id = $1 AND kind = 'message' AND id = {b}), \
                 (SELECT finished FROM parts WHERE share_id = $1 AND id = {a})"
            ),
            vec![id, message_id],
        ),
        Probe::PartText { id, field } => (
            format!(
                "(SELECT finished FROM parts WHERE share_id = $1 AND id = {a}), \
                 (SELECT ARRAY[seq, octet_length(text)] FROM part_chunks \
                  WHERE share_id = $1 AND part_id = {a} AND field = {b} \
                  ORDER BY seq DESC LIMIT 1)"
            ),
            vec![id, field],
        ),
    }
}

/// The answer to `probe` from the [`columns`] starting at column `at` of `row`.
pub(super) fn standing(row: &Row, at: usize, probe: Probe<'_>) -> LedgerResult<Standing> {
    Ok(match probe {
        Probe::Nothing => Standing::Nothing,
        Probe::Session => {
            let exists: bool = get(row, at)?;
            Standing::Session(exists.then(|| get(row, at + 1)).transpose()?)
        }
        Probe::Message(_) => Standing::Message(MessageStanding {
            removed: get(row, at)?,
            terminal: get(row, at + 1)?,
        }),
        Probe::Part { .. } => Standing::Part(PartStanding {
            removed: get(row, at)?,
            message_removed: get(row, at + 1)?,
            finished: get(row, at + 2)?,
        }),
        Probe::PartText { .. } => {
            let finished: Option<bool> = get(row, at)?;
            let last_chunk: Option<Vec<i64>> = get(row, at + 1)?;
            let last_chunk = match last_chunk.as_deref() {
                None => None,
                Some(&[seq, bytes]) => Some((seq, bytes)),
                Some(other) => return Err(corrupt(format!("a part's last chunk: {other:?}"))),
            };
            Standing::PartText(finished.map(|finished| PartTextEnd {
                finished,
                last_chunk,
            }))
        }
    })
}
