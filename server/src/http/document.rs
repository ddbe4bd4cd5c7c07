//! The JSON the share page reads: a share's records as one document, applied
//! ops, and the rendered HTML of markdown parts that goes with them.
//!
//! Document shape (the same as `capsync snapshot --json`, plus `html`):
//! `{"cursor", "session", "models", "diffs", "messages": [{"info", "parts"}],
//!   "orphanParts": [...], "html": {partId: "<p>…</p>"}}` (`orphanParts`: parts
//! whose message has not arrived yet, not shown until it does). Records are passed through as the agent
//! wrote them; only text parts get an `html` rendering, made here so the page
//! never has to turn untrusted text into markup itself.

use std::collections::HashMap;

use capsync_shared::Cursor;
use serde_json::{Map, Value, json};

use super::markdown;
use crate::ledger::{LoggedOp, Record, RecordKind};

/// Part types whose `text` is markdown to render.
fn is_markdown_part(part: &Value) -> bool {
    part.get("type").and_then(Value::as_str) == Some("text")
}

/// A record's JSON, or the text as a JSON string if it is not JSON (it always
/// is: the ledger checked it; this only keeps a bad row from hiding the rest).
fn parse(json: &str) -> Value {
    serde_json::from_str(json).unwrap_or_else(|_| Value::String(json.to_owned()))
}

/// The document of `records` (in snapshot order) at `cursor`.
pub fn document(cursor: Cursor, records: &[Record]) -> Value {
    let mut session = Value::Null;
    let mut models = Vec::new();
    let mut diffs = Value::Null;
    let mut messages: Vec<(Value, Vec<Value>)> = Vec::new();
    let mut by_id: HashMap<&str, usize> = HashMap::new();
    let mut orphans = Vec::new();
    let mut html = Map::new();
    for record in records {
        let value = parse(&record.json);
        match record.kind {
            RecordKind::Session => session = value,
            RecordKind::Model => models.push(value),
            RecordKind::Diffs => diffs = value,
            RecordKind::Message => {
                by_id.insert(&record.id, messages.len());
                messages.push((value, Vec::new()));
            }
            RecordKind::Part => {
                if is_markdown_part(&value) {
                    let text = value.get("text").and_then(Value::as_str).unwrap_or("");
                    html.insert(record.id.clone(), markdown::render(text).into());
                }
                // The ledger sends a message's parts right after it, and
                // parts whose message has not arrived at the end: the page
                // keeps those aside until the message does.
                match by_id.get(record.message_id.as_str()) {
                    Some(&i) => messages[i].1.push(value),
                    None => orphans.push(value),
                }
            }
        }
    }
    let messages: Vec<Value> = messages
        .into_iter()
        .map(|(info, parts)| json!({"info": info, "parts": parts}))
        .collect();
    json!({
        "cursor": cursor.0,
        "session": session,
        "models": models,
        "diffs": diffs,
        "messages": messages,
        "orphanParts": orphans,
        "html": html,
    })
}

/// One applied op as JSON: `{"cursor", "opId", "kind", "payload", "appliedAt"}`.
pub fn op_json(op: &LoggedOp) -> Value {
    json!({
        "cursor": op.cursor.0,
        "opId": op.op_id.as_str(),
        "kind": op.kind.as_str(),
        "payload": parse(&op.payload),
        "appliedAt": op.applied_at,
    })
}

/// How many text parts one live stream remembers the text of. A part that
/// fell out is looked up again if it gets another delta.
const REMEMBERED_PARTS: usize = 64;

/// The current text of the markdown parts a live stream has seen, so that a
/// `part.delta` can be sent with the HTML of the whole text after it.
#[derive(Default)]
pub struct LiveText {
    parts: HashMap<String, Remembered>,
    /// Bumped on every use, to drop the least recently used part first.
    clock: u64,
}

struct Remembered {
    message_id: String,
    /// `None`: not a markdown part (a delta to it gets no HTML).
    text: Option<String>,
    /// The text already includes every op up to this cursor.
    as_of: Cursor,
    used: u64,
}

/// What [`LiveText::apply`] needs from outside: a part's stored record, with
/// the cursor it reflects, for a delta to a part the stream has not seen.
pub struct Lookup {
    pub message_id: String,
    pub part: Value,
    pub as_of: Cursor,
}

impl LiveText {
    /// Part ids that ops (as [`op_json`] made them) append text to but that
    /// are not remembered, nor upserted by an earlier op in `ops`.
    pub fn unknown_parts(&self, ops: &[Value]) -> Vec<String> {
        let mut upserted = std::collections::HashSet::new();
        let mut unknown = Vec::new();
        for op in ops {
            let payload = &op["payload"];
            match op["kind"].as_str() {
                Some("part.upsert") => {
                    if let Some(id) = payload.get("id").and_then(Value::as_str) {
                        upserted.insert(id);
                    }
                }
                Some("part.delta") if is_text_field(payload) => {
                    if let Some(id) = delta_part(payload)
                        && !self.parts.contains_key(id)
                        && !upserted.contains(id)
                        && !unknown.iter().any(|u| u == id)
                    {
                        unknown.push(id.to_owned());
                    }
                }
                _ => {}
            }
        }
        unknown
    }

    /// Remembers parts looked up for [`LiveText::unknown_parts`]; ids not
    /// found are remembered as having no text, so they are not looked up again.
    pub fn learn(&mut self, ids: Vec<String>, found: HashMap<String, Lookup>, as_of: Cursor) {
        let mut found = found;
        for id in ids {
            let entry = match found.remove(&id) {
                Some(lookup) => Remembered {
                    message_id: lookup.message_id,
                    text: markdown_text(&lookup.part),
                    as_of: lookup.as_of,
                    used: 0,
                },
                None => Remembered {
                    message_id: String::new(),
                    text: None,
                    as_of,
                    used: 0,
                },
            };
            self.remember(id, entry);
        }
    }

    /// Adds `"html"` to an op (as [`op_json`] made it) that upserts or appends
    /// to a text part: the HTML of the part's whole text after the op.
    pub fn apply(&mut self, op: &mut Value) {
        let cursor = Cursor(op["cursor"].as_u64().unwrap_or(0));
        let payload = &op["payload"];
        let html = match op["kind"].as_str().unwrap_or("") {
            "part.upsert" => {
                let id = str_field(payload, "id").to_owned();
                let entry = Remembered {
                    message_id: str_field(payload, "messageID").to_owned(),
                    text: markdown_text(payload),
                    as_of: cursor,
                    used: 0,
                };
                let html = entry.text.as_deref().map(markdown::render);
                self.remember(id, entry);
                html
            }
            "part.delta" if is_text_field(payload) => {
                let id = delta_part(payload).unwrap_or("");
                let delta = str_field(payload, "delta");
                self.clock += 1;
                let clock = self.clock;
                self.parts.get_mut(id).and_then(|entry| {
                    entry.used = clock;
                    let text = entry.text.as_mut()?;
                    // Already in a text read at a later cursor: don't add it twice.
                    if cursor > entry.as_of {
                        text.push_str(delta);
                        entry.as_of = cursor;
                    }
                    Some(markdown::render(text))
                })
            }
            "part.remove" => {
                if let Some(id) = delta_part(payload) {
                    self.parts.remove(id);
                }
                None
            }
            "message.remove" => {
                let id = payload
                    .get("id")
                    .or_else(|| payload.get("messageID"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                self.parts.retain(|_, p| p.message_id != id);
                None
            }
            _ => None,
        };
        if let (Some(html), Some(obj)) = (html, op.as_object_mut()) {
            obj.insert("html".into(), html.into());
        }
    }

    fn remember(&mut self, id: String, mut entry: Remembered) {
        self.clock += 1;
        entry.used = self.clock;
        self.parts.insert(id, entry);
        if self.parts.len() > REMEMBERED_PARTS
            && let Some(oldest) = self
                .parts
                .iter()
                .min_by_key(|(_, p)| p.used)
                .map(|(id, _)| id.clone())
        {
            self.parts.remove(&oldest);
        }
    }
}

fn str_field<'a>(value: &'a Value, field: &str) -> &'a str {
    value.get(field).and_then(Value::as_str).unwrap_or("")
}

/// The part a delta or remove names (`partID`, or `id`).
fn delta_part(payload: &Value) -> Option<&str> {
    payload
        .get("partID")
        .or_else(|| payload.get("id"))
        .and_then(Value::as_str)
}

/// Whether a delta appends to `text` (the default field).
fn is_text_field(payload: &Value) -> bool {
    match payload.get("field") {
        None | Some(Value::Null) => true,
        Some(field) => field.as_str() == Some("text"),
    }
}

fn markdown_text(part: &Value) -> Option<String> {
    is_markdown_part(part).then(|| str_field(part, "text").to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsync_shared::{OpId, OpKind};

    fn record(kind: RecordKind, id: &str, message_id: &str, json: Value) -> Record {
        Record {
            kind,
            id: id.into(),
            message_id: message_id.into(),
            json: json.to_string(),
        }
    }

    fn op(cursor: u64, kind: OpKind, payload: Value) -> Value {
        op_json(&LoggedOp {
            cursor: Cursor(cursor),
            op_id: OpId::from(format!("op{cursor}")),
            kind,
            payload: payload.to_string(),
            applied_at: 1000 + cursor as i64,
        })
    }

    /// `op` as the live stream sends it.
    fn applied(live: &mut LiveText, op: &Value) -> Value {
        let mut op = op.clone();
        live.apply(&mut op);
        op
    }

    #[test]
    fn a_document_nests_parts_and_renders_text_parts() {
        let doc = document(
            Cursor(7),
            &[
                record(
                    RecordKind::Session,
                    "",
                    "",
                    json!({"id": "s", "title": "T"}),
                ),
                record(RecordKind::Model, "m", "", json!({"id": "m"})),
                record(
                    RecordKind::Message,
                    "msg1",
                    "",
                    json!({"id": "msg1", "role": "user"}),
                ),
                record(
                    RecordKind::Part,
                    "p1",
                    "msg1",
                    json!({"id": "p1", "type": "text", "text": "**hi** <b>x</b>"}),
                ),
                record(
                    RecordKind::Part,
                    "p2",
                    "msg1",
                    json!({"id": "p2", "type": "reasoning", "text": "**no**"}),
                ),
            ],
        );
        assert_eq!(doc["cursor"], 7);
        assert_eq!(doc["session"]["title"], "T");
        assert_eq!(doc["diffs"], Value::Null);
        assert_eq!(doc["messages"][0]["parts"].as_array().unwrap().len(), 2);
        assert_eq!(
            doc["html"]["p1"],
            "<p><strong>hi</strong> &lt;b&gt;x&lt;/b&gt;</p>\n"
        );
        assert!(doc["html"].get("p2").is_none());
    }

    #[test]
    fn deltas_get_the_html_of_the_whole_text() {
        let mut live = LiveText::default();
        let upsert = op(
            1,
            OpKind::PartUpsert,
            json!({"id": "p", "messageID": "m", "type": "text", "text": "a"}),
        );
        assert_eq!(applied(&mut live, &upsert)["html"], "<p>a</p>\n");
        let delta = op(
            2,
            OpKind::PartDelta,
            json!({"partID": "p", "delta": " *b*"}),
        );
        assert!(live.unknown_parts(std::slice::from_ref(&delta)).is_empty());
        let out = applied(&mut live, &delta);
        assert_eq!(out["html"], "<p>a <em>b</em></p>\n");
        assert_eq!(out["payload"]["delta"], " *b*");
        let other_field = op(
            3,
            OpKind::PartDelta,
            json!({"partID": "p", "delta": "x", "field": "note"}),
        );
        assert!(applied(&mut live, &other_field).get("html").is_none());
    }

    #[test]
    fn a_looked_up_part_is_not_appended_to_twice() {
        let mut live = LiveText::default();
        let ops = vec![
            op(5, OpKind::PartDelta, json!({"partID": "p", "delta": "b"})),
            op(6, OpKind::PartDelta, json!({"partID": "p", "delta": "c"})),
            op(7, OpKind::PartDelta, json!({"partID": "q", "delta": "z"})),
        ];
        let unknown = live.unknown_parts(&ops);
        assert_eq!(unknown, vec!["p".to_owned(), "q".to_owned()]);
        // The lookup read the part at cursor 5: "a" + "b".
        let found = HashMap::from([(
            "p".to_owned(),
            Lookup {
                message_id: "m".into(),
                part: json!({"id": "p", "type": "text", "text": "ab"}),
                as_of: Cursor(5),
            },
        )]);
        live.learn(unknown, found, Cursor(7));
        assert_eq!(applied(&mut live, &ops[0])["html"], "<p>ab</p>\n");
        assert_eq!(applied(&mut live, &ops[1])["html"], "<p>abc</p>\n");
        assert!(applied(&mut live, &ops[2]).get("html").is_none());
        assert!(live.unknown_parts(&ops).is_empty(), "not looked up twice");
    }

    #[test]
    fn remembers_a_bounded_number_of_parts() {
        let mut live = LiveText::default();
        for i in 0..(REMEMBERED_PARTS as u64 + 10) {
            applied(
                &mut live,
                &op(
                    i + 1,
                    OpKind::PartUpsert,
                    json!({"id": format!("p{i}"), "messageID": "m", "type": "text", "text": ""}),
                ),
            );
        }
        assert_eq!(live.parts.len(), REMEMBERED_PARTS);
        assert!(!live.parts.contains_key("p0"));
        applied(
            &mut live,
            &op(1000, OpKind::MessageRemove, json!({"id": "m"})),
        );
        assert!(live.parts.is_empty());
    }
}
