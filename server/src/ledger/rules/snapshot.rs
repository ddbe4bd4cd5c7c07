//! Snapshot paging: a share's records in a fixed order, cut into byte-bounded
//! pages with an opaque resume position, read through [`LedgerTx`] in batches.
//!
//! Order: the session, models by id, the diff list, each message (by id)
//! followed by its parts (by id), then parts whose message has not arrived
//! (by message id, then id; a viewer keeps them aside until it does). Every record has a sort key
//! `(stage, key, sub)`; a page position is the key of the next record to
//! emit, so resuming is a `>=` range query and records deleted between pages
//! simply do not show up.

use capsync_shared::ShareId;

use super::authority::{self, Access};
use super::part_text;
use super::store::{KeyFrom, LedgerTx};
use crate::ledger::{Authority, LedgerError, LedgerResult, Record, RecordKind, SnapshotPage};

/// Records read from storage at a time while filling a page.
const BATCH: u32 = 64;

/// Reads one page starting at `page` ("" for the first), in the caller's read transaction.
pub fn page(
    tx: &mut impl LedgerTx,
    who: &Authority,
    page: &str,
    max_bytes: u32,
    now: i64,
) -> LedgerResult<SnapshotPage> {
    let share = authority::check_share(tx, who, Access::Read, now)?;
    let start = Position::decode(page)?;
    let mut filler = Filler {
        records: Vec::new(),
        used: 0,
        max: usize::try_from(max_bytes).unwrap_or(usize::MAX),
    };
    let next = fill(tx, &share.id, &start, &mut filler)?;
    Ok(SnapshotPage {
        // Read in the same transaction as the records, so they match it.
        cursor: share.cursor,
        records: filler.records,
        next_page: next.map(|p| p.encode()).unwrap_or_default(),
    })
}

/// Which group of records a position is in, in snapshot order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Session = 0,
    Models = 1,
    Diffs = 2,
    Messages = 3,
    /// Parts whose message is not in the share (yet).
    Orphans = 4,
}

/// The sort key of the next record to emit.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Position {
    stage: Stage,
    /// Model id, or message id, to resume at (inclusive); "" from the stage's start.
    key: String,
    /// Within message `key`: the part id to resume at; "" means the message
    /// itself has not been sent yet (ids are never empty). Among orphans,
    /// the part id to resume at within message id `key`.
    sub: String,
}

/// Tells a page string this module wrote from anything else.
const PAGE_VERSION: &str = "1";

impl Position {
    fn at(stage: Stage, key: &str, sub: &str) -> Self {
        Self {
            stage,
            key: key.to_owned(),
            sub: sub.to_owned(),
        }
    }

    /// `1.<stage>.<hex key>.<hex sub>`: hex so ids may contain any character.
    fn encode(&self) -> String {
        format!(
            "{PAGE_VERSION}.{}.{}.{}",
            self.stage as u8,
            hex::encode(&self.key),
            hex::encode(&self.sub)
        )
    }

    fn decode(page: &str) -> LedgerResult<Self> {
        if page.is_empty() {
            return Ok(Self::at(Stage::Session, "", ""));
        }
        Self::parse(page)
            .ok_or_else(|| LedgerError::InvalidArgument("malformed snapshot page".into()))
    }

    fn parse(page: &str) -> Option<Self> {
        let mut fields = page.split('.');
        let (version, stage, key, sub) = (
            fields.next()?,
            fields.next()?,
            fields.next()?,
            fields.next()?,
        );
        if version != PAGE_VERSION || fields.next().is_some() {
            return None;
        }
        let stage = match stage {
            "0" => Stage::Session,
            "1" => Stage::Models,
            "2" => Stage::Diffs,
            "3" => Stage::Messages,
            "4" => Stage::Orphans,
            _ => return None,
        };
        let text = |hex_text: &str| String::from_utf8(hex::decode(hex_text).ok()?).ok();
        Some(Self {
            stage,
            key: text(key)?,
            sub: text(sub)?,
        })
    }
}

/// Collects records until the byte budget is spent.
struct Filler {
    records: Vec<Record>,
    /// Bytes of JSON and ids taken so far.
    used: usize,
    max: usize,
}

impl Filler {
    /// Takes the record if it fits; the first record of a page always fits, so
    /// a record larger than the budget still gets through, alone.
    fn offer(&mut self, kind: RecordKind, id: &str, message_id: &str, json: String) -> bool {
        let size = json.len() + id.len() + message_id.len();
        if !self.records.is_empty() && self.used.saturating_add(size) > self.max {
            return false;
        }
        self.used = self.used.saturating_add(size);
        self.records.push(Record {
            kind,
            id: id.to_owned(),
            message_id: message_id.to_owned(),
            json,
        });
        true
    }
}

/// Fills `filler` from `start`; returns where the next page starts, `None` at the end.
fn fill(
    tx: &mut impl LedgerTx,
    share: &ShareId,
    start: &Position,
    filler: &mut Filler,
) -> LedgerResult<Option<Position>> {
    // The resume key within `stage`, or "" if `start` is in an earlier stage.
    let from = |stage: Stage| -> (&str, &str) {
        if start.stage == stage {
            (&start.key, &start.sub)
        } else {
            ("", "")
        }
    };

    if start.stage <= Stage::Session
        && let Some(json) = tx.session_json(share)?
        && !filler.offer(RecordKind::Session, "", "", json)
    {
        return Ok(Some(Position::at(Stage::Session, "", "")));
    }

    if start.stage <= Stage::Models {
        let mut next = KeyFrom::AtLeast(from(Stage::Models).0.to_owned());
        loop {
            let models = tx.models_from(share, &next, BATCH)?;
            let more = models.len() == BATCH as usize;
            for (id, json) in models {
                if !filler.offer(RecordKind::Model, &id, "", json) {
                    return Ok(Some(Position::at(Stage::Models, &id, "")));
                }
                next = KeyFrom::After(id);
            }
            if !more {
                break;
            }
        }
    }

    if start.stage <= Stage::Diffs
        && let Some(json) = tx.diffs_json(share)?
        && !filler.offer(RecordKind::Diffs, "", "", json)
    {
        return Ok(Some(Position::at(Stage::Diffs, "", "")));
    }

    if start.stage <= Stage::Messages {
        let (from_message, from_part) = from(Stage::Messages);
        let mut next = KeyFrom::AtLeast(from_message.to_owned());
        loop {
            let messages = tx.messages_from(share, &next, BATCH)?;
            let more = messages.len() == BATCH as usize;
            for (message_id, json) in messages {
                // Resuming inside this message: it was sent already, continue with its parts.
                let first_part = if message_id == from_message {
                    from_part
                } else {
                    ""
                };
                if first_part.is_empty()
                    && !filler.offer(RecordKind::Message, &message_id, "", json)
                {
                    return Ok(Some(Position::at(Stage::Messages, &message_id, "")));
                }
                if let Some(part_id) = fill_parts(tx, share, &message_id, first_part, filler)? {
                    return Ok(Some(Position::at(Stage::Messages, &message_id, &part_id)));
                }
                next = KeyFrom::After(message_id);
            }
            if !more {
                break;
            }
        }
    }

    let (from_message, from_part) = from(Stage::Orphans);
    let mut next = KeyFrom::AtLeast((from_message.to_owned(), from_part.to_owned()));
    loop {
        let orphans = tx.orphan_parts_from(share, &next, BATCH)?;
        let more = orphans.len() == BATCH as usize;
        let ids: Vec<&str> = orphans.iter().map(|(_, id, _)| id.as_str()).collect();
        let appended = part_text::appended(tx, share, &ids)?;
        for (message_id, part_id, json) in orphans {
            let json = appended.fold(&part_id, json)?;
            if !filler.offer(RecordKind::Part, &part_id, &message_id, json) {
                return Ok(Some(Position::at(Stage::Orphans, &message_id, &part_id)));
            }
            next = KeyFrom::After((message_id, part_id));
        }
        if !more {
            return Ok(None);
        }
    }
}

/// The parts of one message from `first` on; the id to resume at if the page is full.
fn fill_parts(
    tx: &mut impl LedgerTx,
    share: &ShareId,
    message_id: &str,
    first: &str,
    filler: &mut Filler,
) -> LedgerResult<Option<String>> {
    let mut next = KeyFrom::AtLeast(first.to_owned());
    loop {
        let parts = tx.parts_from(share, message_id, &next, BATCH)?;
        let more = parts.len() == BATCH as usize;
        let ids: Vec<&str> = parts.iter().map(|(id, _)| id.as_str()).collect();
        let appended = part_text::appended(tx, share, &ids)?;
        for (part_id, json) in parts {
            let json = appended.fold(&part_id, json)?;
            if !filler.offer(RecordKind::Part, &part_id, message_id, json) {
                return Ok(Some(part_id));
            }
            next = KeyFrom::After(part_id);
        }
        if !more {
            return Ok(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_garbage_is_refused() {
        for position in [
            Position::at(Stage::Session, "", ""),
            Position::at(Stage::Models, "gpt.5", ""),
            Position::at(Stage::Diffs, "", ""),
            Position::at(Stage::Messages, "msg_1", "prt.2"),
            Position::at(Stage::Orphans, "msg_3", "prt.4"),
        ] {
            assert_eq!(Position::decode(&position.encode()).unwrap(), position);
        }
        assert_eq!(
            Position::decode("").unwrap(),
            Position::at(Stage::Session, "", "")
        );
        for garbage in [
            "x", "1.3.zz.", "2.1..", "1.9..", "1.5..", "1.1...", "1.1.ff.",
        ] {
            assert!(
                matches!(
                    Position::decode(garbage),
                    Err(LedgerError::InvalidArgument(_))
                ),
                "{garbage}"
            );
        }
    }
}
