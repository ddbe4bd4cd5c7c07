//! The JSON the share page reads: a share's records as one document with the
//! rendered HTML of its text parts, and applied ops with what they mean.
//!
//! Document shape: [`SessionDocument`]'s (the same as `capsync snapshot --json`),
//! plus `html`: `{"cursor", "session", "models", "diffs", "messages": [{"info",
//! "parts"}], "orphanParts" (when there are any: parts whose message has not arrived
//! yet, not shown until it does), "html": {partId: ["<p>…</p>", …]}}`. Records are
//! passed through as the agent wrote them; only text parts get an `html` rendering, made
//! here so the page never has to turn untrusted text into markup itself. A rendering is
//! a list of segments to join (see `markdown_segments`): live deltas replace only its
//! last ones.
//!
//! Op shape: `{"cursor", "opId", "kind", "payload", "appliedAt", "effect"}`, where
//! `effect` is the op's [`Effect`] (`{"type": "partDelta", "id", "field", "delta"}`,
//! …; `null` for an op whose payload compaction dropped): the page applies it
//! without knowing each kind's payload fields.

use capsync_shared::Cursor;
use capsync_shared::model::{Effect, SessionDocument, op, record_id};
use serde_json::{Map, Value, json};

use super::markdown_segments::Segments;
use crate::ledger::{LoggedOp, Record};

/// The text of a part whose `text` is markdown to render (text parts); `None` for others.
pub fn markdown_text(part: &Value) -> Option<&str> {
    (part.get("type").and_then(Value::as_str) == Some("text"))
        .then(|| part.get("text").and_then(Value::as_str).unwrap_or(""))
}

/// The document of `records` (in snapshot order) at `cursor`.
pub fn document(cursor: Cursor, records: &[Record]) -> Value {
    let doc = SessionDocument::from_records(cursor, records);
    let mut html = Map::new();
    for part in doc
        .messages
        .iter()
        .flat_map(|message| &message.parts)
        .chain(&doc.orphan_parts)
    {
        if let Some(text) = markdown_text(part) {
            let segments = Segments::of(text).html(text, 0);
            html.insert(record_id(part).to_owned(), segments.into());
        }
    }
    let mut value = doc.to_json();
    if let Some(obj) = value.as_object_mut() {
        obj.insert("html".into(), Value::Object(html));
    }
    value
}

/// An applied op, read once: its payload as JSON and what it means.
pub struct ReadOp {
    pub cursor: Cursor,
    pub effect: Option<Effect>,
    /// The op as the page receives it (see the module's op shape).
    pub json: Value,
}

impl ReadOp {
    pub fn new(op: &LoggedOp) -> Self {
        // Parsed once: the payload as the page receives it, and what it means.
        let (payload, effect) = match serde_json::from_str::<Value>(&op.payload) {
            Ok(payload) => {
                let effect = op::parse_value(op.kind, &op.payload, &payload, None).ok();
                (payload, effect)
            }
            Err(_) => (Value::String(op.payload.clone()), None),
        };
        let json = json!({
            "cursor": op.cursor.0,
            "opId": op.op_id.as_str(),
            "kind": op.kind.as_str(),
            "payload": payload,
            "appliedAt": op.applied_at,
            "effect": effect,
        });
        Self {
            cursor: op.cursor,
            effect,
            json,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::RecordKind;
    use capsync_shared::{OpId, OpKind};

    fn record(kind: RecordKind, id: &str, message_id: &str, json: Value) -> Record {
        Record {
            kind,
            id: id.into(),
            message_id: message_id.into(),
            json: json.to_string(),
        }
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
                record(
                    RecordKind::Part,
                    "p3",
                    "later",
                    json!({"id": "p3", "messageID": "later", "type": "text", "text": "_w_"}),
                ),
            ],
        );
        assert_eq!(doc["cursor"], 7);
        assert_eq!(doc["session"]["title"], "T");
        assert_eq!(doc["diffs"], Value::Null);
        assert_eq!(doc["messages"][0]["parts"].as_array().unwrap().len(), 2);
        assert_eq!(
            doc["html"]["p1"],
            json!(["<p><strong>hi</strong> &lt;b&gt;x&lt;/b&gt;</p>\n"])
        );
        assert!(doc["html"].get("p2").is_none());
        assert_eq!(doc["orphanParts"][0]["id"], "p3");
        assert_eq!(doc["html"]["p3"], json!(["<p><em>w</em></p>\n"]));
    }

    #[test]
    fn an_op_carries_its_effect_with_ids_read_once() {
        let read = |kind: OpKind, payload: Value| {
            ReadOp::new(&LoggedOp {
                cursor: Cursor(3),
                op_id: OpId::from("op3"),
                kind,
                payload: payload.to_string(),
                applied_at: 1003,
            })
            .json
        };
        let delta = read(OpKind::PartDelta, json!({"id": "p", "delta": "x"}));
        assert_eq!(
            delta["effect"],
            json!({"type": "partDelta", "id": "p", "field": "text", "delta": "x"})
        );
        assert_eq!(delta["payload"]["delta"], "x");
        assert_eq!(delta["appliedAt"], 1003);
        let model = read(
            OpKind::ModelUpsert,
            json!({"id": "m", "providerID": "prov"}),
        );
        assert_eq!(
            model["effect"],
            json!({"type": "modelUpsert", "id": "prov/m"})
        );
        let diffs = read(OpKind::DiffSet, json!({"diffs": [{"file": "a"}]}));
        assert_eq!(
            diffs["effect"],
            json!({"type": "diffSet", "diffs": [{"file": "a"}]})
        );
        let removed = read(OpKind::MessageRemove, json!({"messageID": "m1"}));
        assert_eq!(
            removed["effect"],
            json!({"type": "messageRemove", "id": "m1"})
        );
        let part = read(
            OpKind::PartUpsert,
            json!({"id": "p", "messageID": "m", "type": "tool", "state": {"status": "completed"}}),
        );
        assert_eq!(
            part["effect"],
            json!({"type": "partUpsert", "id": "p", "messageId": "m", "finished": true})
        );
        // A payload that does not parse has no effect to apply; the op still moves the cursor.
        let compacted = ReadOp::new(&LoggedOp {
            cursor: Cursor(4),
            op_id: OpId::from("op4"),
            kind: OpKind::PartDelta,
            payload: String::new(),
            applied_at: 1004,
        });
        assert_eq!(compacted.json["effect"], Value::Null);
        assert_eq!(compacted.json["cursor"], 4);
    }
}
