//! A share's records as one structured JSON document: built from a snapshot, kept
//! current by applying logged ops, for display and for comparing states.
//!
//! Shape (also what `capsync snapshot --json` prints):
//! `{"cursor": 12, "session": {...}|null, "models": [...], "diffs": [...]|null,
//!   "messages": [{"info": {...}, "parts": [...]}]}`.
//! Apart from `cursor` and the key `session` (an export calls it `info`), this is the
//! export format of the client's `export` module, so a snapshot document can be pushed
//! back as an export. The server's share page data has this shape too (plus `html`).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::op::{self, Effect};
use super::types::{LoggedOp, Record, RecordKind};
use crate::Cursor;
use crate::ops::model_record_id_of;

/// A session with its models, diffs and messages (each with its parts, in order).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SessionDocument {
    /// The share's cursor the document reflects (0 when built from an export).
    pub cursor: Cursor,
    /// The session record; `None` before any `session.upsert`.
    pub session: Option<Value>,
    pub models: Vec<Value>,
    /// The whole diff list (a JSON array); `None` before any `diff.set`.
    pub diffs: Option<Value>,
    pub messages: Vec<MessageDocument>,
    /// Parts whose message is not in the records; a consistent snapshot has none.
    #[serde(default, rename = "orphanParts", skip_serializing_if = "Vec::is_empty")]
    pub orphan_parts: Vec<Value>,
}

/// One message and its parts.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct MessageDocument {
    pub info: Value,
    pub parts: Vec<Value>,
}

impl MessageDocument {
    /// The message's `id`, or "" if it has none.
    pub fn id(&self) -> &str {
        record_id(&self.info)
    }
}

/// The `"id"` field of a record, or "".
pub fn record_id(record: &Value) -> &str {
    record.get("id").and_then(Value::as_str).unwrap_or("")
}

impl SessionDocument {
    /// Builds the document from snapshot records (in the server's order). A record whose
    /// text is not JSON is kept as a JSON string rather than dropped.
    pub fn from_records(cursor: Cursor, records: &[Record]) -> Self {
        let mut doc = Self {
            cursor,
            ..Self::default()
        };
        // Message id -> index in `doc.messages`; the server sends parts after their
        // message, but this does not depend on it.
        let mut by_id: HashMap<&str, usize> = HashMap::new();
        let mut pending_parts: Vec<(&str, Value)> = Vec::new();
        for record in records {
            let json = serde_json::from_str(&record.json)
                .unwrap_or_else(|_| Value::String(record.json.clone()));
            match record.kind {
                RecordKind::Session => doc.session = Some(json),
                RecordKind::Model => doc.models.push(json),
                RecordKind::Diffs => doc.diffs = Some(json),
                RecordKind::Message => {
                    by_id.insert(record.id.as_str(), doc.messages.len());
                    doc.messages.push(MessageDocument {
                        info: json,
                        parts: Vec::new(),
                    });
                }
                RecordKind::Part => match by_id.get(record.message_id.as_str()) {
                    Some(&i) => doc.messages[i].parts.push(json),
                    None => pending_parts.push((record.message_id.as_str(), json)),
                },
            }
        }
        for (message_id, part) in pending_parts {
            match by_id.get(message_id) {
                Some(&i) => doc.messages[i].parts.push(part),
                None => doc.orphan_parts.push(part),
            }
        }
        doc
    }

    /// The session's title, or "".
    pub fn title(&self) -> &str {
        self.session
            .as_ref()
            .and_then(|s| s.get("title"))
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    /// The same document with models, messages and each message's parts sorted by id,
    /// so two documents can be compared whatever order they were built in.
    pub fn sorted(mut self) -> Self {
        self.models.sort_by_key(model_record_id_of);
        self.messages.sort_by(|a, b| a.id().cmp(b.id()));
        for message in &mut self.messages {
            message.parts.sort_by(|a, b| record_id(a).cmp(record_id(b)));
        }
        self.orphan_parts
            .sort_by(|a, b| record_id(a).cmp(record_id(b)));
        self
    }

    /// Whether both documents hold the same records, ignoring order and cursor.
    pub fn same_content(&self, other: &Self) -> bool {
        let mut a = self.clone().sorted();
        let mut b = other.clone().sorted();
        a.cursor = Cursor(0);
        b.cursor = Cursor(0);
        a == b
    }

    /// The document as a JSON value.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// Applies one op of the share's log (as `opsSince` and subscriptions deliver them)
    /// with the server's effects ([`op::parse`]), and moves `cursor` to the op's. A
    /// snapshot at cursor C plus every op after C, applied in order, holds the same
    /// records as a snapshot taken then.
    ///
    /// Returns false, changing nothing, for an op at or below the document's cursor:
    /// it is already in the document. The log holds only ops the server applied, so
    /// the stored records' rules are not checked again; an op whose payload the server
    /// could not have applied (or whose payload compaction dropped) only moves the cursor.
    pub fn apply(&mut self, op: &LoggedOp) -> bool {
        if op.cursor <= self.cursor {
            return false;
        }
        self.cursor = op.cursor;
        // The payload is parsed once: for the effect, and as the record it stores.
        if let Ok(payload) = serde_json::from_str::<Value>(&op.payload)
            && let Ok(effect) = op::parse_value(op.kind, &op.payload, &payload, None)
        {
            self.apply_effect(effect, payload);
        }
        true
    }

    /// Applies `effect`, whose record (for upserts) is `payload`.
    fn apply_effect(&mut self, effect: Effect, payload: Value) {
        match effect {
            Effect::Session { .. } => self.session = Some(payload),
            Effect::ModelUpsert { id, .. } => {
                let model = payload;
                match self
                    .models
                    .iter_mut()
                    .find(|m| model_record_id_of(m).as_deref() == Some(id.as_str()))
                {
                    Some(stored) => *stored = model,
                    None => self.models.push(model),
                }
            }
            // The list as stored: the payload's array, from either accepted form.
            Effect::DiffSet { json } => {
                self.diffs = Some(serde_json::from_str(&json).unwrap_or(Value::Null));
            }
            Effect::MessageUpsert { id, .. } => {
                let info = payload;
                match self.messages.iter_mut().find(|m| m.id() == id) {
                    Some(message) => message.info = info,
                    None => {
                        // Parts that arrived before their message join it now.
                        let (parts, orphans) = std::mem::take(&mut self.orphan_parts)
                            .into_iter()
                            .partition(|p| part_message(p) == id);
                        self.orphan_parts = orphans;
                        self.messages.push(MessageDocument { info, parts });
                    }
                }
            }
            Effect::MessageRemove { id } => {
                // Parts waiting for it go too, as on the server.
                self.messages.retain(|m| m.id() != id);
                self.orphan_parts.retain(|p| part_message(p) != id);
            }
            Effect::PartUpsert { id, message_id, .. } => {
                let part = payload;
                // In place while it stays in its message, so the parts keep their order.
                if let Some(stored) = self
                    .messages
                    .iter_mut()
                    .find(|m| m.id() == message_id)
                    .and_then(|m| m.parts.iter_mut().find(|p| record_id(p) == id))
                {
                    *stored = part;
                    return;
                }
                self.remove_part(&id);
                match self.messages.iter_mut().find(|m| m.id() == message_id) {
                    Some(message) => message.parts.push(part),
                    None => self.orphan_parts.push(part),
                }
            }
            Effect::PartRemove { id } => self.remove_part(&id),
            Effect::PartDelta { id, field, delta } => {
                if let Some(Value::Object(part)) = self.part_mut(&id) {
                    match part.get_mut(&field) {
                        Some(Value::String(text)) => text.push_str(&delta),
                        None => {
                            part.insert(field, Value::String(delta));
                        }
                        Some(_) => {}
                    }
                }
            }
        }
    }

    /// The part with this id, wherever it is.
    pub fn part(&self, id: &str) -> Option<&Value> {
        self.messages
            .iter()
            .flat_map(|m| m.parts.iter())
            .chain(self.orphan_parts.iter())
            .find(|p| record_id(p) == id)
    }

    /// Removes the part with this id wherever it is.
    fn remove_part(&mut self, id: &str) {
        for message in &mut self.messages {
            message.parts.retain(|p| record_id(p) != id);
        }
        self.orphan_parts.retain(|p| record_id(p) != id);
    }

    fn part_mut(&mut self, id: &str) -> Option<&mut Value> {
        self.messages
            .iter_mut()
            .flat_map(|m| m.parts.iter_mut())
            .chain(self.orphan_parts.iter_mut())
            .find(|p| record_id(p) == id)
    }
}

/// The `"messageID"` of a part, or "".
fn part_message(part: &Value) -> &str {
    part.get("messageID").and_then(Value::as_str).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::OpKind;
    use serde_json::json;

    fn record(kind: RecordKind, id: &str, message_id: &str, json: Value) -> Record {
        Record {
            kind,
            id: id.into(),
            message_id: message_id.into(),
            json: json.to_string(),
        }
    }

    #[test]
    fn records_become_a_nested_document() {
        let records = vec![
            record(
                RecordKind::Session,
                "",
                "",
                json!({"id": "s", "title": "T"}),
            ),
            record(RecordKind::Model, "m1", "", json!({"id": "m1"})),
            record(RecordKind::Diffs, "", "", json!([{"file": "a"}])),
            record(RecordKind::Message, "msg1", "", json!({"id": "msg1"})),
            record(RecordKind::Part, "p1", "msg1", json!({"id": "p1"})),
            record(RecordKind::Part, "p2", "msg1", json!({"id": "p2"})),
            record(RecordKind::Message, "msg2", "", json!({"id": "msg2"})),
            record(RecordKind::Part, "p3", "gone", json!({"id": "p3"})),
        ];
        let doc = SessionDocument::from_records(Cursor(9), &records);
        assert_eq!(doc.cursor, Cursor(9));
        assert_eq!(doc.title(), "T");
        assert_eq!(doc.models, vec![json!({"id": "m1"})]);
        assert_eq!(doc.diffs, Some(json!([{"file": "a"}])));
        assert_eq!(doc.messages.len(), 2);
        assert_eq!(doc.messages[0].parts.len(), 2);
        assert_eq!(doc.messages[1].parts.len(), 0);
        assert_eq!(doc.orphan_parts, vec![json!({"id": "p3"})]);
    }

    #[test]
    fn applying_logged_ops_follows_the_servers_effects() {
        let mut doc = SessionDocument::default();
        let mut cursor = 0;
        let mut apply = |doc: &mut SessionDocument, kind: OpKind, payload: Value| {
            cursor += 1;
            doc.apply(&LoggedOp {
                cursor: Cursor(cursor),
                op_id: format!("op{cursor}").into(),
                kind,
                payload: payload.to_string(),
                applied_at: 0,
            })
        };
        apply(
            &mut doc,
            OpKind::SessionUpsert,
            json!({"id": "s", "title": "T"}),
        );
        apply(&mut doc, OpKind::ModelUpsert, json!({"id": "m", "v": 1}));
        apply(&mut doc, OpKind::ModelUpsert, json!({"id": "m", "v": 2}));
        apply(
            &mut doc,
            OpKind::ModelUpsert,
            json!({"id": "m", "providerID": "p", "v": 3}),
        );
        apply(&mut doc, OpKind::DiffSet, json!([{"file": "a"}]));
        apply(&mut doc, OpKind::DiffSet, json!({"diffs": [{"file": "b"}]}));
        apply(
            &mut doc,
            OpKind::MessageUpsert,
            json!({"id": "m1", "role": "user"}),
        );
        apply(
            &mut doc,
            OpKind::MessageUpsert,
            json!({"id": "m2", "role": "assistant"}),
        );
        apply(
            &mut doc,
            OpKind::PartUpsert,
            json!({"id": "p1", "messageID": "m1", "type": "text", "text": "a"}),
        );
        apply(
            &mut doc,
            OpKind::PartDelta,
            json!({"partID": "p1", "delta": "b"}),
        );
        apply(
            &mut doc,
            OpKind::PartDelta,
            json!({"id": "p1", "field": "note", "delta": "n"}),
        );
        apply(
            &mut doc,
            OpKind::PartUpsert,
            json!({"id": "p2", "messageID": "m1", "type": "text"}),
        );
        // A part that moves to another message leaves the first one.
        apply(
            &mut doc,
            OpKind::PartUpsert,
            json!({"id": "p2", "messageID": "m2", "type": "tool"}),
        );
        apply(
            &mut doc,
            OpKind::PartUpsert,
            json!({"id": "p3", "messageID": "m2", "type": "text"}),
        );
        apply(&mut doc, OpKind::PartRemove, json!({"partID": "p3"}));
        apply(
            &mut doc,
            OpKind::MessageUpsert,
            json!({"id": "m3", "role": "user"}),
        );
        apply(&mut doc, OpKind::MessageRemove, json!({"messageID": "m3"}));

        assert_eq!(doc.cursor, Cursor(17));
        assert_eq!(doc.title(), "T");
        assert_eq!(
            doc.models,
            vec![
                json!({"id": "m", "v": 2}),
                json!({"id": "m", "providerID": "p", "v": 3})
            ]
        );
        assert_eq!(doc.diffs, Some(json!([{"file": "b"}])));
        let ids: Vec<&str> = doc.messages.iter().map(MessageDocument::id).collect();
        assert_eq!(ids, ["m1", "m2"]);
        assert_eq!(
            doc.messages[0].parts,
            vec![json!({"id": "p1", "messageID": "m1", "type": "text", "text": "ab", "note": "n"})]
        );
        assert_eq!(
            doc.messages[1].parts,
            vec![json!({"id": "p2", "messageID": "m2", "type": "tool"})]
        );

        // An op the document already holds changes nothing.
        let before = doc.clone();
        let old = LoggedOp {
            cursor: Cursor(3),
            op_id: "op3".into(),
            kind: OpKind::SessionUpsert,
            payload: json!({"id": "s", "title": "old"}).to_string(),
            applied_at: 0,
        };
        assert!(!doc.apply(&old));
        assert_eq!(doc, before);
    }

    #[test]
    fn same_content_ignores_order_and_cursor() {
        let a = SessionDocument {
            cursor: Cursor(3),
            messages: vec![
                MessageDocument {
                    info: json!({"id": "b"}),
                    parts: vec![json!({"id": "2"}), json!({"id": "1"})],
                },
                MessageDocument {
                    info: json!({"id": "a"}),
                    parts: vec![],
                },
            ],
            ..Default::default()
        };
        let mut b = a.clone().sorted();
        b.cursor = Cursor(5);
        assert!(a.same_content(&b));
        b.messages[0].info = json!({"id": "a", "x": 1});
        assert!(!a.same_content(&b));
    }
}
