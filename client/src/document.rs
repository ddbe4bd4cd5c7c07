//! A share's records as one structured JSON document, for display and for comparing states.
//!
//! Shape (also what `capsync snapshot --json` prints):
//! `{"cursor": 12, "session": {...}|null, "models": [...], "diffs": [...]|null,
//!   "messages": [{"info": {...}, "parts": [...]}]}`.
//! Apart from `cursor` and the key `session` (an export calls it `info`), this is the
//! export format of [`crate::export`], so a snapshot document can be pushed back as an
//! export.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::viewer::{Record, RecordKind};

/// A session with its models, diffs and messages (each with its parts, in order).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SessionDocument {
    /// The share's cursor the document reflects (0 when built from an export).
    pub cursor: u64,
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
    pub fn from_records(cursor: u64, records: &[Record]) -> Self {
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
        self.models.sort_by(|a, b| record_id(a).cmp(record_id(b)));
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
        a.cursor = 0;
        b.cursor = 0;
        a == b
    }

    /// The document as a JSON value.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let doc = SessionDocument::from_records(9, &records);
        assert_eq!(doc.cursor, 9);
        assert_eq!(doc.title(), "T");
        assert_eq!(doc.models, vec![json!({"id": "m1"})]);
        assert_eq!(doc.diffs, Some(json!([{"file": "a"}])));
        assert_eq!(doc.messages.len(), 2);
        assert_eq!(doc.messages[0].parts.len(), 2);
        assert_eq!(doc.messages[1].parts.len(), 0);
        assert_eq!(doc.orphan_parts, vec![json!({"id": "p3"})]);
    }

    #[test]
    fn same_content_ignores_order_and_cursor() {
        let a = SessionDocument {
            cursor: 3,
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
        b.cursor = 5;
        assert!(a.same_content(&b));
        b.messages[0].info = json!({"id": "a", "x": 1});
        assert!(!a.same_content(&b));
    }
}
