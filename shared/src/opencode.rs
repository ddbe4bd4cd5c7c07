//! What an opencode record means as ops, in one place: the server's drop-in
//! share API maps opencode's sync items with it ([`map_item`]: each item a full
//! snapshot of one record, its op id derived from its content), and the events
//! capsync's opencode plugin journals go through the same mapping ([`map_event`]:
//! op ids from event ids, plus text deltas and removals, which only events carry).
//!
//! | item `type` | `data` | op |
//! |---|---|---|
//! | `session` | the session | `session.upsert` |
//! | `message` | a message's info | `message.upsert` |
//! | `part` | a part | `part.upsert` |
//! | `session_diff` | an array of file diffs | `diff.set` |
//! | `model` | an array of model records | one `model.upsert` each |
//!
//! An op id is `oc-` and 32 hex digits of the SHA-256 of the op kind and the
//! payload, so the same snapshot sent twice is a `duplicate` and costs
//! nothing, while any change is a new op. (A record that returns to exactly
//! an earlier state is a duplicate of that earlier op and is not applied
//! again: opencode's sessions and messages carry update times, so in practice
//! only a diff list that a revert brings back would be affected, and the
//! built-in client does not send reverts.)
//!
//! A `file` part whose inlined `data:` URL makes it larger than the per-op
//! limit is kept without the URL, marked `"capsyncOmitted": {"bytes", "reason"}`
//! for the page to show; any other record over the limit is refused alone.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{OpId, OpKind};

/// One op of an opencode record, its payload as the JSON text to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordOp {
    pub op_id: OpId,
    pub kind: OpKind,
    pub payload: String,
}

/// One item of a sync, as ops, or why it cannot be kept.
#[derive(Debug)]
pub enum Mapped {
    Ops(Vec<RecordOp>),
    Refused(String),
}

/// The ops of `item` (`{"type", "data"}`); `max_op_bytes` decides whether an
/// inlined attachment is left out.
pub fn map_item(item: &Value, max_op_bytes: usize) -> Mapped {
    let (Some(kind), Some(data)) = (item.get("type").and_then(Value::as_str), item.get("data"))
    else {
        return Mapped::Refused("an item needs a string \"type\" and \"data\"".to_owned());
    };
    let one = |kind: OpKind, payload: &Value| Mapped::Ops(vec![op(kind, payload)]);
    match kind {
        "session" => one(OpKind::SessionUpsert, data),
        "message" => one(OpKind::MessageUpsert, data),
        "part" => match without_large_attachment(data, max_op_bytes) {
            Some(kept) => one(OpKind::PartUpsert, &kept),
            None => one(OpKind::PartUpsert, data),
        },
        "session_diff" => one(OpKind::DiffSet, data),
        "model" => match data.as_array() {
            Some(models) => Mapped::Ops(
                models
                    .iter()
                    .map(|model| op(OpKind::ModelUpsert, model))
                    .collect(),
            ),
            None => Mapped::Refused("a model item's data must be an array".to_owned()),
        },
        other => Mapped::Refused(format!("unknown item type {other:?}")),
    }
}

/// The record's id, for reports: `id` of the data, else "".
pub fn item_record_id(item: &Value) -> &str {
    item.get("data")
        .and_then(|data| data.get("id"))
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn op(kind: OpKind, payload: &Value) -> RecordOp {
    let payload = payload.to_string();
    RecordOp {
        op_id: content_op_id(kind, &payload),
        kind,
        payload,
    }
}

/// `oc-` and 128 bits of the SHA-256 of the kind and the payload text.
fn content_op_id(kind: OpKind, payload: &str) -> OpId {
    let mut hash = Sha256::new();
    hash.update(kind.as_str().as_bytes());
    hash.update([0]);
    hash.update(payload.as_bytes());
    OpId(format!("oc-{}", hex::encode(&hash.finalize()[..16])))
}

/// A `file` part over `max_op_bytes` because of its `data:` URL, with the URL
/// replaced by the `capsyncOmitted` marker; `None` for anything else.
fn without_large_attachment(part: &Value, max_op_bytes: usize) -> Option<Value> {
    if part.get("type").and_then(Value::as_str) != Some("file") {
        return None;
    }
    let url = part.get("url").and_then(Value::as_str)?;
    if !url.starts_with("data:") || part.to_string().len() <= max_op_bytes {
        return None;
    }
    let mut kept = part.clone();
    let fields = kept.as_object_mut()?;
    fields.remove("url");
    fields.insert(
        "capsyncOmitted".to_owned(),
        json!({"bytes": url.len(), "reason": "too large"}),
    );
    Some(kept)
}

/// The ops of one opencode bus event, as its plugin journals it, for the share of
/// `session_id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventOps {
    pub session_id: String,
    pub ops: Vec<RecordOp>,
}

/// The ops of a bus event `{id, type, properties}`: full snapshots as [`map_item`]
/// maps them, plus what only the event stream carries (text deltas, removals).
/// Op ids come from the event id (`oce-<id>`), so an event journaled twice, or a
/// journal read again, is a duplicate. `None` for an event that changes no share.
pub fn map_event(event: &Value, max_op_bytes: usize) -> Option<Result<EventOps, String>> {
    let kind = event.get("type")?.as_str()?;
    let props = event.get("properties").unwrap_or(&Value::Null);
    let field = |name: &str| props.get(name).and_then(Value::as_str).unwrap_or("");
    // A record snapshot under `key`, of the session its `session_key` names.
    let record = |key: &str, item_type: &str, session_key: &str| {
        let data = props.get(key)?;
        let session = data
            .get(session_key)
            .and_then(Value::as_str)
            .unwrap_or(field("sessionID"));
        Some((session, json!({"type": item_type, "data": data})))
    };
    let (session_id, item) = match kind {
        "session.created" | "session.updated" => record("info", "session", "id")?,
        "message.updated" => record("info", "message", "sessionID")?,
        "message.part.updated" => record("part", "part", "sessionID")?,
        "session.diff" => (
            field("sessionID"),
            json!({"type": "session_diff", "data": props.get("diff")?}),
        ),
        "message.part.delta" => (
            field("sessionID"),
            json!({"type": "delta", "data": {"partID": field("partID"), "messageID": field("messageID"),
                   "field": props.get("field").cloned().unwrap_or(Value::Null), "delta": field("delta")}}),
        ),
        "message.removed" => (
            field("sessionID"),
            json!({"type": "message.removed", "data": {"messageID": field("messageID")}}),
        ),
        "message.part.removed" => (
            field("sessionID"),
            json!({"type": "part.removed", "data": {"partID": field("partID")}}),
        ),
        _ => return None,
    };
    Some(event_ops(event, session_id, &item, max_op_bytes))
}

fn event_ops(
    event: &Value,
    session_id: &str,
    item: &Value,
    max_op_bytes: usize,
) -> Result<EventOps, String> {
    let event_id = event.get("id").and_then(Value::as_str).unwrap_or("");
    // `oce-` plus the id must fit an op id.
    if event_id.is_empty() || event_id.len() > crate::limits::MAX_OP_ID_BYTES - 8 {
        return Err("an event needs an id of at most 120 bytes".to_owned());
    }
    if session_id.is_empty() {
        return Err("the event names no session".to_owned());
    }
    let single = |kind: OpKind| {
        vec![RecordOp {
            op_id: OpId(String::new()),
            kind,
            payload: item["data"].to_string(),
        }]
    };
    let mut ops = match item["type"].as_str() {
        Some("delta") => single(OpKind::PartDelta),
        Some("message.removed") => single(OpKind::MessageRemove),
        Some("part.removed") => single(OpKind::PartRemove),
        _ => match map_item(item, max_op_bytes) {
            Mapped::Ops(ops) => ops,
            Mapped::Refused(why) => return Err(why),
        },
    };
    let many = ops.len() > 1;
    for (i, op) in ops.iter_mut().enumerate() {
        op.op_id = OpId(if many {
            format!("oce-{event_id}.{i}")
        } else {
            format!("oce-{event_id}")
        });
    }
    Ok(EventOps {
        session_id: session_id.to_owned(),
        ops,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(item: Value) -> Vec<RecordOp> {
        match map_item(&item, 1000) {
            Mapped::Ops(ops) => ops,
            Mapped::Refused(why) => panic!("{item} refused: {why}"),
        }
    }

    fn event_ops(event: Value) -> EventOps {
        map_event(&event, 1000)
            .expect("a share event")
            .unwrap_or_else(|why| panic!("{event} refused: {why}"))
    }

    #[test]
    fn bus_events_map_to_ops_named_by_their_event_ids() {
        let part = json!({"id": "prt_1", "messageID": "msg_1", "sessionID": "ses_1", "type": "text", "text": ""});
        let upsert = event_ops(json!({"id": "evt_1", "type": "message.part.updated",
                                      "properties": {"sessionID": "ses_1", "part": part}}));
        assert_eq!(upsert.session_id, "ses_1");
        assert_eq!(upsert.ops.len(), 1);
        assert_eq!(upsert.ops[0].op_id.as_str(), "oce-evt_1");
        assert_eq!(upsert.ops[0].kind, OpKind::PartUpsert);
        assert_eq!(
            serde_json::from_str::<Value>(&upsert.ops[0].payload).unwrap(),
            part
        );

        let delta = event_ops(json!({"id": "evt_2", "type": "message.part.delta",
            "properties": {"sessionID": "ses_1", "messageID": "msg_1", "partID": "prt_1", "field": "text", "delta": "Hel"}}));
        assert_eq!(delta.ops[0].kind, OpKind::PartDelta);
        assert_eq!(
            serde_json::from_str::<Value>(&delta.ops[0].payload).unwrap(),
            json!({"partID": "prt_1", "messageID": "msg_1", "field": "text", "delta": "Hel"})
        );
        let removed = event_ops(json!({"id": "evt_3", "type": "message.part.removed",
            "properties": {"sessionID": "ses_1", "messageID": "msg_1", "partID": "prt_1"}}));
        assert_eq!(removed.ops[0].kind, OpKind::PartRemove);
        let message_gone = event_ops(json!({"id": "evt_4", "type": "message.removed",
            "properties": {"sessionID": "ses_1", "messageID": "msg_1"}}));
        assert_eq!(message_gone.ops[0].kind, OpKind::MessageRemove);
        let session = event_ops(json!({"id": "evt_5", "type": "session.updated",
            "properties": {"sessionID": "ses_1", "info": {"id": "ses_1", "title": "t"}}}));
        assert_eq!(
            (session.session_id.as_str(), session.ops[0].kind),
            ("ses_1", OpKind::SessionUpsert)
        );
        let diff = event_ops(json!({"id": "evt_6", "type": "session.diff",
            "properties": {"sessionID": "ses_1", "diff": []}}));
        assert_eq!(diff.ops[0].kind, OpKind::DiffSet);

        // Events that change no share, and events that cannot be shipped.
        assert!(
            map_event(
                &json!({"id": "evt_7", "type": "session.idle", "properties": {}}),
                1000
            )
            .is_none()
        );
        assert!(map_event(&json!({"type": "message.updated", "properties": {"info": {"id": "m", "sessionID": "s"}}}), 1000)
            .expect("a share event")
            .is_err(), "no event id");
        assert!(
            map_event(
                &json!({"id": "e", "type": "message.part.delta", "properties": {"partID": "p"}}),
                1000
            )
            .expect("a share event")
            .is_err(),
            "no session"
        );
    }

    #[test]
    fn each_item_type_maps_to_its_op() {
        let kinds = |item| ops(item).iter().map(|op| op.kind).collect::<Vec<_>>();
        assert_eq!(
            kinds(json!({"type": "session", "data": {"id": "s"}})),
            [OpKind::SessionUpsert]
        );
        assert_eq!(
            kinds(json!({"type": "message", "data": {"id": "m"}})),
            [OpKind::MessageUpsert]
        );
        assert_eq!(
            kinds(json!({"type": "part", "data": {"id": "p"}})),
            [OpKind::PartUpsert]
        );
        let diff =
            json!({"file": "a", "patch": "", "additions": 1, "deletions": 0, "status": "modified"});
        let diffs = ops(json!({"type": "session_diff", "data": [diff]}));
        assert_eq!(diffs[0].kind, OpKind::DiffSet);
        assert_eq!(
            serde_json::from_str::<Value>(&diffs[0].payload).unwrap(),
            json!([diff])
        );
        assert_eq!(
            kinds(json!({"type": "model", "data": [{"id": "a"}, {"id": "b"}]})),
            [OpKind::ModelUpsert, OpKind::ModelUpsert]
        );
    }

    #[test]
    fn op_ids_follow_content_only() {
        let a = ops(json!({"type": "part", "data": {"id": "p", "text": "x"}}));
        let again = ops(json!({"type": "part", "data": {"id": "p", "text": "x"}}));
        let changed = ops(json!({"type": "part", "data": {"id": "p", "text": "y"}}));
        let as_message = ops(json!({"type": "message", "data": {"id": "p", "text": "x"}}));
        assert_eq!(a[0].op_id, again[0].op_id);
        assert_ne!(a[0].op_id, changed[0].op_id);
        assert_ne!(a[0].op_id, as_message[0].op_id);
        assert!(a[0].op_id.as_str().starts_with("oc-"));
        assert_eq!(a[0].op_id.as_str().len(), 3 + 32);
    }

    #[test]
    fn unknown_or_malformed_items_are_refused() {
        for item in [
            json!({"type": "revert", "data": {}}),
            json!({"type": "model", "data": {"id": "a"}}),
            json!({"data": {}}),
            json!({"type": "part"}),
            json!("part"),
        ] {
            assert!(
                matches!(map_item(&item, 1000), Mapped::Refused(_)),
                "{item}"
            );
        }
    }

    #[test]
    fn a_file_part_too_large_for_its_data_url_is_kept_without_it() {
        let url = format!("data:image/png;base64,{}", "A".repeat(2000));
        let part = json!({"id": "p", "messageID": "m", "type": "file", "mime": "image/png",
                          "filename": "shot.png", "url": url});
        let kept = ops(json!({"type": "part", "data": part}));
        let stored: Value = serde_json::from_str(&kept[0].payload).unwrap();
        assert_eq!(stored.get("url"), None);
        assert_eq!(stored["filename"], "shot.png");
        assert_eq!(
            stored["capsyncOmitted"],
            json!({"bytes": url.len(), "reason": "too large"})
        );
        // Small enough: untouched. Large but not for a data URL: refused later, alone.
        let small =
            json!({"id": "p", "messageID": "m", "type": "file", "url": "data:image/png;base64,AA"});
        let kept = ops(json!({"type": "part", "data": small}));
        assert_eq!(
            serde_json::from_str::<Value>(&kept[0].payload).unwrap(),
            small
        );
        let text = json!({"id": "p", "messageID": "m", "type": "text", "text": "x".repeat(2000)});
        let kept = ops(json!({"type": "part", "data": text}));
        assert!(kept[0].payload.len() > 1000);
    }
}
