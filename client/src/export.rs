//! Turning an opencode-style session export into ops with content-addressed op ids.
//!
//! # Export format
//!
//! One JSON object, as `opencode export` writes it:
//!
//! ```json
//! {
//!   "info": {"id": "ses_1", "projectID": "prj_1", "parentID": "ses_0", "title": "...", ...},
//!   "messages": [
//!     {"info":  {"id": "msg_1", "sessionID": "ses_1", "role": "user", "time": {...}, ...},
//!      "parts": [{"id": "prt_1", "messageID": "msg_1", "sessionID": "ses_1", "type": "text", ...}]}
//!   ],
//!   "diffs":  [ ... ],
//!   "models": [{"id": "claude-sonnet", ...}]
//! }
//! ```
//!
//! - `info` (also accepted under the key `session`, as [`SessionDocument`] names it) is the
//!   session record and needs a string `id`. `parentID` is absent for a root session.
//! - `messages` lists each message record with its parts; every record needs a string `id`.
//!   A message's `sessionID` and a part's `messageID`/`sessionID` are filled in from the
//!   nesting when absent, and must match it when present.
//! - `diffs` (optional) is the session's whole list of file diffs; `models` (optional) the
//!   model records the session used, each with a string `id`.
//! - Other keys are ignored, so a `capsync snapshot --json` document reads as an export.
//!
//! # Ops and their ids
//!
//! Ops come in dependency order: `session.upsert`, each `model.upsert`, `diff.set` (when
//! `diffs` is present; payload `{"diffs": [...]}`), then per message its `message.upsert`
//! followed by a `part.upsert` per part. Payloads are the records as they are (plus the
//! ids filled in above).
//!
//! An op id is `<kind>:<record id>:<hash>`, where `hash` is the first 16 hex digits of the
//! SHA-256 of the payload's canonical JSON (object keys sorted, no whitespace); `diff.set`
//! uses the session id as its record id. So ids are deterministic and content-addressed:
//! reading an unchanged export again gives the same op ids (the server answers
//! `duplicate`), and only a changed record gets a new op id. A record id too long to fit the
//! 128-byte op-id limit is replaced by `#` and 32 hex digits of its own SHA-256.

use std::collections::HashSet;

use capsync_shared::limits::MAX_OP_ID_BYTES;
use capsync_shared::ops::{OpKind, OpSpec};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::document::{MessageDocument, SessionDocument};
use crate::error::ClientError;

/// A parsed, checked export: the records in the order they become ops.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionExport {
    /// The session record.
    pub session: Value,
    pub models: Vec<Value>,
    /// The diff list, when the export has one.
    pub diffs: Option<Value>,
    pub messages: Vec<MessageDocument>,
}

impl SessionExport {
    /// Parses export text.
    pub fn from_json(text: &str) -> Result<Self, ClientError> {
        let value: Value = serde_json::from_str(text).map_err(|e| {
            ClientError::invalid(format!(
                "export: not JSON (line {}, column {}): {}",
                e.line(),
                e.column(),
                serde_message(&e)
            ))
        })?;
        Self::from_value(&value)
    }

    /// Checks an export document and fills in the ids its nesting implies.
    pub fn from_value(value: &Value) -> Result<Self, ClientError> {
        let root = value
            .as_object()
            .ok_or_else(|| invalid("export", "must be a JSON object"))?;
        let (key, session) = match (root.get("info"), root.get("session")) {
            (Some(info), _) if !info.is_null() => ("info", info),
            (_, Some(session)) if !session.is_null() => ("session", session),
            _ => return Err(invalid("export", "has no session record (\"info\")")),
        };
        let session_id = required_id(session, key)?.to_owned();

        // One record per model id, as the server keeps them (a second upsert replaces the first).
        let mut model_ids = HashSet::new();
        let models = optional_array(root, "models")?
            .iter()
            .enumerate()
            .map(|(i, model)| {
                let at = format!("models[{i}]");
                let id = required_id(model, &at)?;
                if !model_ids.insert(id) {
                    return Err(invalid(&at, &format!("repeats model id {id:?}")));
                }
                Ok(model.clone())
            })
            .collect::<Result<Vec<_>, ClientError>>()?;

        let diffs = match root.get("diffs") {
            None | Some(Value::Null) => None,
            Some(diffs @ Value::Array(_)) => Some(diffs.clone()),
            Some(_) => return Err(invalid("diffs", "must be an array")),
        };

        let mut message_ids = HashSet::new();
        let mut part_ids = HashSet::new();
        let mut messages = Vec::new();
        for (i, entry) in optional_array(root, "messages")?.iter().enumerate() {
            let at = format!("messages[{i}]");
            let info = entry
                .get("info")
                .ok_or_else(|| invalid(&at, "has no \"info\""))?;
            let info_at = format!("{at}.info");
            let message_id = required_id(info, &info_at)?.to_owned();
            if !message_ids.insert(message_id.clone()) {
                return Err(invalid(
                    &info_at,
                    &format!("repeats message id {message_id:?}"),
                ));
            }
            let info = with_parent(info, &info_at, "sessionID", &session_id)?;

            let parts = match entry.get("parts") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(parts)) => parts.clone(),
                Some(_) => return Err(invalid(&format!("{at}.parts"), "must be an array")),
            };
            let parts = parts
                .iter()
                .enumerate()
                .map(|(j, part)| {
                    let part_at = format!("{at}.parts[{j}]");
                    let part_id = required_id(part, &part_at)?;
                    if !part_ids.insert(part_id.to_owned()) {
                        return Err(invalid(&part_at, &format!("repeats part id {part_id:?}")));
                    }
                    let part = with_parent(part, &part_at, "messageID", &message_id)?;
                    with_parent(&part, &part_at, "sessionID", &session_id)
                })
                .collect::<Result<Vec<_>, ClientError>>()?;
            messages.push(MessageDocument { info, parts });
        }

        Ok(Self {
            session: session.clone(),
            models,
            diffs,
            messages,
        })
    }

    /// The session's id.
    pub fn session_id(&self) -> &str {
        str_field(&self.session, "id")
    }

    /// The session's `projectID`, or "".
    pub fn project_id(&self) -> &str {
        str_field(&self.session, "projectID")
    }

    /// The session's `parentID`, when it is a child session.
    pub fn parent_id(&self) -> Option<&str> {
        Some(str_field(&self.session, "parentID")).filter(|s| !s.is_empty())
    }

    /// The session's `title`, or "".
    pub fn title(&self) -> &str {
        str_field(&self.session, "title")
    }

    /// The ops that bring a share to this export's state, in dependency order.
    pub fn to_ops(&self) -> Vec<OpSpec> {
        let mut ops = Vec::with_capacity(
            2 + self.models.len()
                + self
                    .messages
                    .iter()
                    .map(|m| 1 + m.parts.len())
                    .sum::<usize>(),
        );
        ops.push(record_op(
            OpKind::SessionUpsert,
            self.session_id(),
            &self.session,
        ));
        for model in &self.models {
            ops.push(record_op(OpKind::ModelUpsert, id_of(model), model));
        }
        if let Some(diffs) = &self.diffs {
            let payload = serde_json::json!({ "diffs": diffs });
            ops.push(record_op(OpKind::DiffSet, self.session_id(), &payload));
        }
        for message in &self.messages {
            ops.push(record_op(
                OpKind::MessageUpsert,
                message.id(),
                &message.info,
            ));
            for part in &message.parts {
                ops.push(record_op(OpKind::PartUpsert, id_of(part), part));
            }
        }
        ops
    }

    /// The state a share should hold after this export's ops, as a document
    /// (cursor 0), e.g. to compare with a snapshot's [`SessionDocument`].
    pub fn to_document(&self) -> SessionDocument {
        SessionDocument {
            cursor: capsync_shared::Cursor(0),
            session: Some(self.session.clone()),
            models: self.models.clone(),
            diffs: self.diffs.clone(),
            messages: self.messages.clone(),
            orphan_parts: Vec::new(),
        }
    }
}

/// Shorthand: the ops for an export document.
pub fn ops_from_export(value: &Value) -> Result<Vec<OpSpec>, ClientError> {
    Ok(SessionExport::from_value(value)?.to_ops())
}

/// The content-addressed op id for a record: `<kind>:<record id>:<16 hex of sha256>`.
pub fn op_id(kind: OpKind, record_id: &str, payload: &Value) -> String {
    let hash = sha256_hex(canonical_json(payload).as_bytes());
    let fixed = kind.as_str().len() + 2 + 16;
    let record_id = if fixed + record_id.len() <= MAX_OP_ID_BYTES {
        record_id.to_owned()
    } else {
        format!("#{}", &sha256_hex(record_id.as_bytes())[..32])
    };
    format!("{}:{record_id}:{}", kind.as_str(), &hash[..16])
}

/// JSON text with object keys sorted and no whitespace, whatever order the value's maps
/// keep (serde_json's `preserve_order` feature could be turned on by any crate in a build).
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(value, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A serde_json error's message without its " at line L column C" tail (callers say where).
pub fn serde_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rsplit_once(" at line ") {
        Some((message, _)) => message.to_owned(),
        None => text,
    }
}

fn record_op(kind: OpKind, record_id: &str, payload: &Value) -> OpSpec {
    OpSpec::new(op_id(kind, record_id, payload), kind, payload.clone())
}

fn invalid(at: &str, what: &str) -> ClientError {
    ClientError::invalid(format!("export: {at} {what}"))
}

fn str_field<'a>(value: &'a Value, key: &str) -> &'a str {
    value.get(key).and_then(Value::as_str).unwrap_or("")
}

/// The id of a record already checked by [`required_id`].
fn id_of(value: &Value) -> &str {
    str_field(value, "id")
}

/// The record's non-empty string `id`.
fn required_id<'a>(record: &'a Value, at: &str) -> Result<&'a str, ClientError> {
    if !record.is_object() {
        return Err(invalid(at, "must be a JSON object"));
    }
    match record.get("id").and_then(Value::as_str) {
        Some(id) if !id.is_empty() => Ok(id),
        _ => Err(invalid(at, "needs a non-empty string \"id\"")),
    }
}

/// An array under `key`, or none when absent or null.
fn optional_array<'a>(root: &'a Map<String, Value>, key: &str) -> Result<&'a [Value], ClientError> {
    match root.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(_) => Err(invalid(key, "must be an array")),
    }
}

/// The record with `field` set to `parent` when absent; an error when it names another parent.
fn with_parent(record: &Value, at: &str, field: &str, parent: &str) -> Result<Value, ClientError> {
    match record.get(field) {
        None | Some(Value::Null) => {
            let mut record = record.clone();
            if let Some(map) = record.as_object_mut() {
                map.insert(field.to_owned(), Value::String(parent.to_owned()));
            }
            Ok(record)
        }
        Some(Value::String(s)) if s == parent => Ok(record.clone()),
        Some(other) => Err(invalid(
            at,
            &format!("has {field} {other} but is nested under {parent:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Value {
        json!({
            "info": {"id": "ses_1", "projectID": "prj", "title": "Fix the build", "time": {"created": 1}},
            "messages": [
                {"info": {"id": "msg_1", "sessionID": "ses_1", "role": "user", "time": {"created": 2}},
                 "parts": [{"id": "prt_1", "messageID": "msg_1", "sessionID": "ses_1", "type": "text", "text": "hi"}]},
                {"info": {"id": "msg_2", "role": "assistant", "time": {"created": 3}},
                 "parts": [
                    {"id": "prt_2", "type": "reasoning", "text": "thinking"},
                    {"id": "prt_3", "type": "tool", "tool": "bash", "state": {"status": "completed"}}
                 ]}
            ],
            "diffs": [{"file": "a.rs", "additions": 1}],
            "models": [{"id": "model-a"}, {"id": "model-b"}]
        })
    }

    fn kinds(ops: &[OpSpec]) -> Vec<OpKind> {
        ops.iter().map(|op| op.kind).collect()
    }

    #[test]
    fn ops_come_in_dependency_order() {
        let ops = ops_from_export(&sample()).unwrap();
        use OpKind::*;
        assert_eq!(
            kinds(&ops),
            vec![
                SessionUpsert,
                ModelUpsert,
                ModelUpsert,
                DiffSet,
                MessageUpsert,
                PartUpsert,
                MessageUpsert,
                PartUpsert,
                PartUpsert,
            ]
        );
        assert_eq!(
            ops[3].payload,
            json!({"diffs": [{"file": "a.rs", "additions": 1}]})
        );
        assert!(ops[0].op_id.starts_with("session.upsert:ses_1:"));
        assert!(ops[3].op_id.starts_with("diff.set:ses_1:"));
        assert!(ops[6].op_id.starts_with("message.upsert:msg_2:"));
        assert!(ops.iter().all(|op| op.depends_on.is_empty()));
    }

    #[test]
    fn missing_parent_ids_are_filled_in_from_the_nesting() {
        let ops = ops_from_export(&sample()).unwrap();
        assert_eq!(ops[6].payload["sessionID"], "ses_1");
        assert_eq!(ops[7].payload["messageID"], "msg_2");
        assert_eq!(ops[7].payload["sessionID"], "ses_1");
    }

    #[test]
    fn op_ids_are_deterministic() {
        let a = ops_from_export(&sample()).unwrap();
        let b = ops_from_export(&sample()).unwrap();
        assert_eq!(a, b);
        let ids: HashSet<_> = a.iter().map(|op| op.op_id.as_str()).collect();
        assert_eq!(ids.len(), a.len(), "op ids are unique");
        for op in &a {
            let hash = op.op_id.rsplit(':').next().unwrap();
            assert_eq!(hash.len(), 16);
            assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()));
        }
    }

    #[test]
    fn key_order_does_not_change_op_ids() {
        let a = op_id(
            OpKind::PartUpsert,
            "p",
            &json!({"a": 1, "b": {"x": [1, 2], "y": null}}),
        );
        let b = op_id(
            OpKind::PartUpsert,
            "p",
            &serde_json::from_str(r#"{ "b": {"y": null, "x": [1,2]}, "a": 1 }"#).unwrap(),
        );
        assert_eq!(a, b);
        assert_eq!(
            canonical_json(&json!({"b": 1, "a": "é\n"})),
            r#"{"a":"é\n","b":1}"#
        );
    }

    #[test]
    fn a_changed_record_gets_a_new_op_id_and_the_others_keep_theirs() {
        let before = ops_from_export(&sample()).unwrap();
        let mut changed = sample();
        changed["messages"][1]["parts"][1]["state"]["status"] = json!("error");
        let after = ops_from_export(&changed).unwrap();
        assert_eq!(before.len(), after.len());
        let differing: Vec<usize> = (0..before.len())
            .filter(|&i| before[i].op_id != after[i].op_id)
            .collect();
        assert_eq!(differing, vec![8], "only the changed part's op id moves");
        assert!(after[8].op_id.starts_with("part.upsert:prt_3:"));

        // Only the new op is unknown to a server that saw the first export.
        let seen: HashSet<_> = before.iter().map(|op| op.op_id.clone()).collect();
        let new: Vec<_> = after
            .iter()
            .filter(|op| !seen.contains(&op.op_id))
            .collect();
        assert_eq!(new.len(), 1);
    }

    #[test]
    fn diffs_are_optional_and_models_too() {
        let mut export = sample();
        export.as_object_mut().unwrap().remove("diffs");
        export.as_object_mut().unwrap().remove("models");
        let ops = ops_from_export(&export).unwrap();
        assert!(!kinds(&ops).contains(&OpKind::DiffSet));
        assert!(!kinds(&ops).contains(&OpKind::ModelUpsert));
        assert_eq!(ops.len(), 6);
    }

    #[test]
    fn long_record_ids_still_fit_the_op_id_limit() {
        let long = "x".repeat(250);
        let id = op_id(OpKind::MessageUpsert, &long, &json!({"id": long}));
        assert!(id.len() <= MAX_OP_ID_BYTES, "{} bytes", id.len());
        assert!(id.starts_with("message.upsert:#"));
        let short = op_id(OpKind::MessageUpsert, "msg_1", &json!({}));
        assert!(short.starts_with("message.upsert:msg_1:"));
    }

    #[test]
    fn bad_exports_say_where() {
        let cases = [
            (json!([]), "export must be a JSON object"),
            (json!({"messages": []}), "no session record"),
            (
                json!({"info": {"title": "x"}}),
                "info needs a non-empty string \"id\"",
            ),
            (
                json!({"info": {"id": "s"}, "messages": [{"info": {"id": "m"}, "parts": [{"type": "text"}]}]}),
                "messages[0].parts[0] needs",
            ),
            (
                json!({"info": {"id": "s"}, "messages": [{"info": {"id": "m", "sessionID": "other"}}]}),
                "messages[0].info has sessionID \"other\"",
            ),
            (
                json!({"info": {"id": "s"}, "messages": [{"info": {"id": "m"}}, {"info": {"id": "m"}}]}),
                "repeats message id",
            ),
            (
                json!({"info": {"id": "s"}, "diffs": {}}),
                "diffs must be an array",
            ),
        ];
        for (export, expected) in cases {
            let err = ops_from_export(&export).unwrap_err().to_string();
            assert!(err.contains(expected), "{err:?} lacks {expected:?}");
        }
        let err = SessionExport::from_json("{\n  \"info\": ")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn the_repository_sample_export_reads() {
        // The sample lives outside this crate; skip quietly where it is not checked out.
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/sessions/fix-login-bug.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            eprintln!("skipped: {} not found", path.display());
            return;
        };
        let export = SessionExport::from_json(&text).unwrap();
        let ops = export.to_ops();
        assert_eq!(ops[0].kind, OpKind::SessionUpsert);
        assert_eq!(
            ops.len(),
            SessionExport::from_json(&text).unwrap().to_ops().len()
        );
        assert!(ops.iter().all(|op| op.op_id.len() <= MAX_OP_ID_BYTES));
        let records = 1
            + export.models.len()
            + usize::from(export.diffs.is_some())
            + export
                .messages
                .iter()
                .map(|m| 1 + m.parts.len())
                .sum::<usize>();
        assert_eq!(ops.len(), records);
    }

    #[test]
    fn a_snapshot_document_reads_back_as_the_same_export() {
        let export = SessionExport::from_value(&sample()).unwrap();
        let doc = export.to_document();
        let again = SessionExport::from_value(&doc.to_json()).unwrap();
        assert_eq!(again, export);
        assert_eq!(again.to_ops(), export.to_ops());
        assert_eq!(export.session_id(), "ses_1");
        assert_eq!(export.project_id(), "prj");
        assert_eq!(export.parent_id(), None);
        assert_eq!(export.title(), "Fix the build");
    }
}
