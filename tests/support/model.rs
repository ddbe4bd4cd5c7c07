//! A reference model of one share: applies ops with the server's semantics in memory, so a
//! test can compute what the server's snapshot must be and check the server's op log.
//!
//! Semantics (README "What the server guarantees", `schema/capsync.capnp` `OpKind`):
//! - an op id already applied is a `duplicate` (at the cursor it was applied at);
//! - an op that depends on itself is `invalid`; one whose `dependsOn` op is not applied is
//!   `missingDependency`;
//! - then the payload is checked and the stored records may refuse it: a delta to a missing
//!   part or to a field that is not a string, or an older snapshot of a record
//!   (`staleTransition`): a non-terminal upsert of a completed or errored message, a
//!   `pending`/`running` tool part over a completed or errored one, a text or reasoning part
//!   without `time.end` over one with it, a session with a smaller `time.updated`;
//! - an applied op advances the cursor by exactly one.
//!
//! Effects: `session.upsert`, `message.upsert`, `part.upsert` and `model.upsert` replace their
//! record (a part whose message is missing is kept aside until it arrives; models are keyed by
//! `providerID/id`); `message.remove` removes the message and its parts; `part.remove` removes a part
//! (both apply even if nothing is there, and are final: a later upsert of a removed message,
//! of a part of one, or of a removed part is `staleTransition`); `part.delta` appends to a string field of a part
//! (default `"text"`, created when absent); `diff.set` replaces the session's diff list.
//!
//! This file uses only `capsync_client`, `capsync_shared` and `serde_json`, so the server's
//! own tests can include it with `#[path]`.

use std::collections::{BTreeMap, HashMap, HashSet};

use capsync_client::{
    LoggedOp, MessageDocument, OpKind, OpOutcome, OpSpec, RejectReason, SessionDocument,
    ViewerClient,
};
use capsync_shared::limits::MAX_RECORD_ID_BYTES;
use serde_json::{Map, Value};

/// What the model says the server answers for one op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Applied now, at this cursor.
    Applied(u64),
    /// Already applied, at this cursor.
    Duplicate(u64),
    /// Refused; the cursor does not move.
    Rejected(RejectReason, String),
}

impl Outcome {
    /// Whether the server's outcome is this one (rejections compare by reason only).
    pub fn matches(&self, server: &OpOutcome) -> bool {
        match (self, server) {
            (Self::Applied(a), OpOutcome::Applied(b))
            | (Self::Duplicate(a), OpOutcome::Duplicate(b)) => *a == b.0,
            (Self::Rejected(a, _), OpOutcome::Rejected { reason: b, .. }) => a == b,
            _ => false,
        }
    }

    pub fn is_rejected(&self) -> bool {
        matches!(self, Self::Rejected(..))
    }
}

/// A stored message: its JSON and whether it is completed or errored.
#[derive(Debug, Clone, PartialEq)]
struct StoredMessage {
    json: Value,
    /// Completed (`time.completed` is a number) or errored (`error` is not null).
    terminal: bool,
}

/// A stored part and the message it belongs to.
#[derive(Debug, Clone, PartialEq)]
struct StoredPart {
    message_id: String,
    json: Value,
    /// A tool call completed or errored, or a text or reasoning part with `time.end`.
    finished: bool,
}

/// The in-memory share.
#[derive(Debug, Clone)]
pub struct Model {
    /// The share's session: `session.upsert` must name it, `sessionID`s must match it.
    session_id: String,
    session: Option<Value>,
    models: BTreeMap<String, Value>,
    /// The whole diff list (a JSON array).
    diffs: Option<Value>,
    messages: BTreeMap<String, StoredMessage>,
    parts: BTreeMap<String, StoredPart>,
    /// Ids of removed messages and parts: removal is final.
    removed_messages: HashSet<String>,
    removed_parts: HashSet<String>,
    /// Op id -> the cursor it was applied at: permanent dedupe, and dependencies.
    applied: HashMap<String, u64>,
    /// Applied op ids in cursor order (`log[i]` was applied at cursor `i + 1`).
    log: Vec<String>,
}

impl Model {
    /// An empty share mirroring `session_id`, at cursor 0.
    pub fn new(session_id: &str) -> Self {
        Self {
            session_id: session_id.to_owned(),
            session: None,
            models: BTreeMap::new(),
            diffs: None,
            messages: BTreeMap::new(),
            parts: BTreeMap::new(),
            removed_messages: HashSet::new(),
            removed_parts: HashSet::new(),
            applied: HashMap::new(),
            log: Vec::new(),
        }
    }

    /// A share after applying `ops` in order (rejected ops leave no trace).
    pub fn from_ops<'a>(session_id: &str, ops: impl IntoIterator<Item = &'a OpSpec>) -> Self {
        let mut model = Self::new(session_id);
        for op in ops {
            model.apply(op);
        }
        model
    }

    /// The share's cursor: the number of ops applied.
    pub fn cursor(&self) -> u64 {
        self.log.len() as u64
    }

    /// The cursor `op_id` was applied at, if it was.
    pub fn applied_at(&self, op_id: &str) -> Option<u64> {
        self.applied.get(op_id).copied()
    }

    /// Applied op ids in cursor order.
    pub fn log(&self) -> &[String] {
        &self.log
    }

    /// Applies one op as the server would, and says what the server answers.
    pub fn apply(&mut self, op: &OpSpec) -> Outcome {
        if let Some(at) = self.applied_at(&op.op_id) {
            return Outcome::Duplicate(at);
        }
        if op.depends_on.contains(&op.op_id) {
            return reject(RejectReason::Invalid, "op depends on itself");
        }
        if let Some(missing) = op
            .depends_on
            .iter()
            .find(|d| !self.applied.contains_key(d.as_str()))
        {
            return reject(
                RejectReason::MissingDependency,
                &format!("depends on {missing}"),
            );
        }
        // The server receives the payload as JSON text; parse what it would parse.
        let text = serde_json::to_string(&op.payload).expect("payload serializes");
        let payload: Value = serde_json::from_str(&text).expect("payload parses");
        if let Err(detail) = self.apply_effect(op.kind, payload) {
            return detail;
        }
        self.log.push(op.op_id.clone());
        let cursor = self.cursor();
        self.applied.insert(op.op_id.clone(), cursor);
        Outcome::Applied(cursor)
    }

    /// Checks the payload against the stored records and, if they accept it, applies it.
    fn apply_effect(&mut self, kind: OpKind, payload: Value) -> Result<(), Outcome> {
        let invalid = |why: &str| reject(RejectReason::Invalid, why);
        match kind {
            OpKind::SessionUpsert => {
                let id = string_id(object(&payload)?, "id")?;
                if id != self.session_id {
                    return Err(invalid("another session"));
                }
                let updated = |session: &Value| {
                    session
                        .get("time")
                        .and_then(|time| time.get("updated"))
                        .and_then(Value::as_i64)
                };
                if let (Some(new), Some(stored)) =
                    (updated(&payload), self.session.as_ref().and_then(updated))
                    && new < stored
                {
                    return Err(reject(RejectReason::StaleTransition, "older session"));
                }
                self.session = Some(payload);
            }
            OpKind::MessageUpsert => {
                let obj = object(&payload)?;
                let id = string_id(obj, "id")?;
                if !matches!(obj.get("role"), Some(Value::String(_))) {
                    return Err(invalid("message needs a role"));
                }
                self.same_session(obj)?;
                if self.removed_messages.contains(&id) {
                    return Err(reject(RejectReason::StaleTransition, "message was removed"));
                }
                let terminal = is_terminal(obj);
                if !terminal && self.messages.get(&id).is_some_and(|m| m.terminal) {
                    return Err(reject(RejectReason::StaleTransition, "message is final"));
                }
                self.messages.insert(
                    id,
                    StoredMessage {
                        json: payload,
                        terminal,
                    },
                );
            }
            OpKind::MessageRemove => {
                let id = either_id(object(&payload)?, "id", "messageID")?;
                self.messages.remove(&id);
                self.parts.retain(|_, part| part.message_id != id);
                self.removed_messages.insert(id);
            }
            OpKind::PartUpsert => {
                let obj = object(&payload)?;
                let id = string_id(obj, "id")?;
                let message_id = string_id(obj, "messageID")?;
                if !matches!(obj.get("type"), Some(Value::String(_))) {
                    return Err(invalid("part needs a type"));
                }
                self.same_session(obj)?;
                if self.removed_parts.contains(&id) || self.removed_messages.contains(&message_id) {
                    return Err(reject(RejectReason::StaleTransition, "part was removed"));
                }
                let finished = is_finished_part(obj);
                if !finished && self.parts.get(&id).is_some_and(|p| p.finished) {
                    return Err(reject(RejectReason::StaleTransition, "part is finished"));
                }
                self.parts.insert(
                    id,
                    StoredPart {
                        message_id,
                        json: payload,
                        finished,
                    },
                );
            }
            OpKind::PartRemove => {
                let id = either_id(object(&payload)?, "partID", "id")?;
                self.parts.remove(&id);
                self.removed_parts.insert(id);
            }
            OpKind::PartDelta => {
                let obj = object(&payload)?;
                let id = either_id(obj, "partID", "id")?;
                let Some(Value::String(delta)) = obj.get("delta") else {
                    return Err(invalid("delta needs a string delta"));
                };
                let field = match obj.get("field") {
                    None | Some(Value::Null) => "text",
                    Some(Value::String(field)) if !field.is_empty() => field.as_str(),
                    Some(_) => return Err(invalid("bad field")),
                };
                if ["id", "messageID", "sessionID", "type"].contains(&field) {
                    return Err(invalid("protected field"));
                }
                let Some(part) = self.parts.get_mut(&id) else {
                    return Err(invalid("part does not exist"));
                };
                if part.finished {
                    return Err(reject(RejectReason::StaleTransition, "part is finished"));
                }
                let stored = part.json.as_object_mut().expect("parts are objects");
                match stored.get_mut(field) {
                    None => {
                        stored.insert(field.to_owned(), Value::String(delta.clone()));
                    }
                    Some(Value::String(text)) => text.push_str(delta),
                    Some(_) => return Err(invalid("field is not a string")),
                }
            }
            OpKind::DiffSet => {
                let diffs = match payload {
                    Value::Array(diffs) => diffs,
                    Value::Object(mut obj) => match obj.remove("diffs") {
                        Some(Value::Array(diffs)) => diffs,
                        _ => return Err(invalid("diff.set needs diffs")),
                    },
                    _ => return Err(invalid("diff.set needs diffs")),
                };
                if !diffs.iter().all(Value::is_object) {
                    return Err(invalid("a diff is not an object"));
                }
                self.diffs = Some(Value::Array(diffs));
            }
            OpKind::ModelUpsert => {
                let obj = object(&payload)?;
                string_id(obj, "id")?;
                if obj
                    .get("providerID")
                    .is_some_and(|p| !p.is_string() && !p.is_null())
                {
                    return Err(invalid("providerID is not a string"));
                }
                let key = capsync_shared::ops::model_record_id_of(&payload).expect("has an id");
                self.models.insert(key, payload);
            }
        }
        Ok(())
    }

    fn same_session(&self, obj: &Map<String, Value>) -> Result<(), Outcome> {
        match obj.get("sessionID") {
            None => Ok(()),
            Some(Value::String(id)) if *id == self.session_id => Ok(()),
            Some(_) => Err(reject(RejectReason::Invalid, "another session")),
        }
    }

    /// The records as the document a snapshot of the server must equal (records by id).
    pub fn document(&self) -> SessionDocument {
        let mut messages: Vec<MessageDocument> = self
            .messages
            .values()
            .map(|m| MessageDocument {
                info: m.json.clone(),
                parts: Vec::new(),
            })
            .collect();
        let index: HashMap<String, usize> = self
            .messages
            .keys()
            .enumerate()
            .map(|(i, id)| (id.clone(), i))
            .collect();
        let mut orphan_parts = Vec::new();
        for part in self.parts.values() {
            match index.get(&part.message_id) {
                Some(&i) => messages[i].parts.push(part.json.clone()),
                None => orphan_parts.push(part.json.clone()),
            }
        }
        SessionDocument {
            cursor: capsync_shared::Cursor(self.cursor()),
            session: self.session.clone(),
            models: self.models.values().cloned().collect(),
            diffs: self.diffs.clone(),
            messages,
            orphan_parts,
        }
    }
}

fn reject(reason: RejectReason, detail: &str) -> Outcome {
    Outcome::Rejected(reason, detail.to_owned())
}

fn object(value: &Value) -> Result<&Map<String, Value>, Outcome> {
    value
        .as_object()
        .ok_or_else(|| reject(RejectReason::Invalid, "payload is not an object"))
}

fn check_id(id: &str) -> Result<String, Outcome> {
    if id.is_empty() || id.len() > MAX_RECORD_ID_BYTES {
        return Err(reject(RejectReason::Invalid, "bad id"));
    }
    Ok(id.to_owned())
}

fn string_id(obj: &Map<String, Value>, field: &str) -> Result<String, Outcome> {
    match obj.get(field) {
        Some(Value::String(id)) => check_id(id),
        _ => Err(reject(RejectReason::Invalid, "missing id")),
    }
}

fn either_id(obj: &Map<String, Value>, first: &str, second: &str) -> Result<String, Outcome> {
    match (obj.get(first), obj.get(second)) {
        (Some(Value::String(id)), _) | (None, Some(Value::String(id))) => check_id(id),
        _ => Err(reject(RejectReason::Invalid, "missing id")),
    }
}

fn is_finished_part(part: &Map<String, Value>) -> bool {
    match part.get("type").and_then(Value::as_str) {
        Some("tool") => matches!(
            part.get("state")
                .and_then(|state| state.get("status"))
                .and_then(Value::as_str),
            Some("completed" | "error")
        ),
        Some("text" | "reasoning") => part
            .get("time")
            .and_then(|time| time.get("end"))
            .is_some_and(Value::is_number),
        _ => false,
    }
}

fn is_terminal(message: &Map<String, Value>) -> bool {
    let completed = message
        .get("time")
        .and_then(|time| time.get("completed"))
        .is_some_and(Value::is_number);
    completed || message.get("error").is_some_and(|e| !e.is_null())
}

/// Where two documents differ (ignoring record order and the cursor), or `None` when they
/// hold the same records. Names the first differing record with both versions.
pub fn document_difference(actual: &SessionDocument, expected: &SessionDocument) -> Option<String> {
    if actual.same_content(expected) {
        return None;
    }
    let a = actual.clone().sorted();
    let e = expected.clone().sorted();
    if a.session != e.session {
        return Some(format!(
            "session: server {:?}, model {:?}",
            a.session, e.session
        ));
    }
    if a.diffs != e.diffs {
        return Some(format!("diffs: server {:?}, model {:?}", a.diffs, e.diffs));
    }
    if a.models != e.models {
        return Some(format!(
            "models: server {:?}, model {:?}",
            a.models, e.models
        ));
    }
    if a.orphan_parts != e.orphan_parts {
        return Some(format!(
            "parts without their message: server {:?}, model {:?}",
            a.orphan_parts, e.orphan_parts
        ));
    }
    let ids = |d: &SessionDocument| -> Vec<String> {
        d.messages.iter().map(|m| m.id().to_owned()).collect()
    };
    if ids(&a) != ids(&e) {
        return Some(format!(
            "message ids: server {:?}, model {:?}",
            ids(&a),
            ids(&e)
        ));
    }
    for (am, em) in a.messages.iter().zip(&e.messages) {
        if am.info != em.info {
            return Some(format!(
                "message {}: server {}, model {}",
                am.id(),
                am.info,
                em.info
            ));
        }
        let part_ids = |m: &MessageDocument| -> Vec<String> {
            m.parts
                .iter()
                .map(|p| capsync_client::document::record_id(p).to_owned())
                .collect()
        };
        if part_ids(am) != part_ids(em) {
            return Some(format!(
                "parts of message {}: server {:?}, model {:?}",
                am.id(),
                part_ids(am),
                part_ids(em)
            ));
        }
        for (ap, ep) in am.parts.iter().zip(&em.parts) {
            if ap != ep {
                return Some(format!("part: server {ap}, model {ep}"));
            }
        }
    }
    Some("documents differ".to_owned())
}

/// Panics, naming the first difference, unless the server's document holds the model's records.
#[track_caller]
pub fn assert_same_document(server: &SessionDocument, model: &SessionDocument) {
    if let Some(difference) = document_difference(server, model) {
        panic!("the server's snapshot differs from the model: {difference}");
    }
}

/// The share's whole op log, page by page, in cursor order.
pub async fn read_log(viewer: &ViewerClient) -> Vec<LoggedOp> {
    let mut log = Vec::new();
    let mut after = 0;
    loop {
        let page = viewer.ops_since(after, 0).await.expect("opsSince");
        if let Some(last) = page.ops.last() {
            after = last.cursor.0;
        }
        let more = page.has_more();
        log.extend(page.ops);
        if !more {
            return log;
        }
    }
}

/// Checks the op log's shape: cursors 1..=N without gaps and every op id at most once.
/// Returns the op ids in cursor order.
#[track_caller]
pub fn check_log(log: &[LoggedOp]) -> Vec<String> {
    let mut seen = HashSet::new();
    for (i, op) in log.iter().enumerate() {
        assert_eq!(
            op.cursor.0,
            i as u64 + 1,
            "the log has a gap or is out of order before op {}",
            op.op_id
        );
        assert!(
            seen.insert(op.op_id.as_str()),
            "op {} is in the log twice (applied twice)",
            op.op_id
        );
    }
    log.iter().map(|op| op.op_id.0.clone()).collect()
}

/// Checks that the log holds exactly `expected` (each once, any order) and nothing else.
#[track_caller]
pub fn assert_log_holds_exactly<'a>(log: &[LoggedOp], expected: impl IntoIterator<Item = &'a str>) {
    let logged: HashSet<String> = check_log(log).into_iter().collect();
    let expected: HashSet<&str> = expected.into_iter().collect();
    let missing: Vec<&&str> = expected
        .iter()
        .filter(|id| !logged.contains(**id))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "ops lost (not in the server's log): {missing:?}…"
    );
    let unexpected: Vec<&String> = logged
        .iter()
        .filter(|id| !expected.contains(id.as_str()))
        .take(5)
        .collect();
    assert!(
        unexpected.is_empty(),
        "ops in the log that were never sent: {unexpected:?}"
    );
    assert_eq!(logged.len(), expected.len());
}

/// Replays the server's log on a fresh model, checking that each logged op applies there at
/// its logged cursor (so the server applied nothing the model would refuse), and returns the
/// model. `ops` maps op ids to what was sent.
#[track_caller]
pub fn model_from_log(session_id: &str, log: &[LoggedOp], ops: &HashMap<String, OpSpec>) -> Model {
    let mut model = Model::new(session_id);
    for logged in log {
        let op = ops
            .get(logged.op_id.as_str())
            .unwrap_or_else(|| panic!("logged op {} was never sent", logged.op_id));
        assert_eq!(
            logged.kind, op.kind,
            "op {} logged with another kind",
            op.op_id
        );
        let sent: Value = op.payload.clone();
        let stored: Value = serde_json::from_str(&logged.payload).expect("logged payload is JSON");
        assert_eq!(stored, sent, "op {} logged with another payload", op.op_id);
        let outcome = model.apply(op);
        assert_eq!(
            outcome,
            Outcome::Applied(logged.cursor.0),
            "the server applied op {} at cursor {} but the model says {outcome:?}",
            op.op_id,
            logged.cursor
        );
    }
    model
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn op(id: &str, kind: OpKind, payload: Value) -> OpSpec {
        OpSpec::new(id, kind, payload)
    }

    #[test]
    fn the_model_follows_the_documented_semantics() {
        let mut m = Model::new("s");
        assert_eq!(
            m.apply(&op("1", OpKind::SessionUpsert, json!({"id": "s"}))),
            Outcome::Applied(1)
        );
        assert!(
            m.apply(&op("x", OpKind::SessionUpsert, json!({"id": "t"})))
                .is_rejected()
        );
        let part = json!({"id": "p", "messageID": "m", "type": "text"});
        assert_eq!(
            m.apply(&op("2", OpKind::PartUpsert, part.clone())),
            Outcome::Applied(2),
            "kept before its message"
        );
        assert_eq!(m.document().orphan_parts, [part]);
        m.apply(&op(
            "3",
            OpKind::MessageUpsert,
            json!({"id": "m", "role": "assistant"}),
        ));
        assert!(m.document().orphan_parts.is_empty());
        assert_eq!(
            m.document().messages[0].parts.len(),
            1,
            "joined its message"
        );
        let delta = op("d", OpKind::PartDelta, json!({"partID": "q", "delta": "x"}));
        assert!(m.apply(&delta).is_rejected(), "no part q yet");
        m.apply(&op(
            "q",
            OpKind::PartUpsert,
            json!({"id": "q", "messageID": "m", "type": "text"}),
        ));
        assert_eq!(
            m.apply(&delta),
            Outcome::Applied(5),
            "a rejected op id can apply later"
        );
        m.apply(&op(
            "4",
            OpKind::PartDelta,
            json!({"partID": "p", "delta": "ab"}),
        ));
        m.apply(&op(
            "5",
            OpKind::PartDelta,
            json!({"partID": "p", "delta": "c"}),
        ));
        assert_eq!(
            m.apply(&op(
                "4",
                OpKind::PartDelta,
                json!({"partID": "p", "delta": "ab"})
            )),
            Outcome::Duplicate(6)
        );
        assert_eq!(m.document().messages[0].parts[0]["text"], "abc");
        m.apply(&op(
            "6",
            OpKind::MessageUpsert,
            json!({"id": "m", "role": "assistant", "time": {"completed": 5}}),
        ));
        assert!(matches!(
            m.apply(&op(
                "7",
                OpKind::MessageUpsert,
                json!({"id": "m", "role": "assistant"})
            )),
            Outcome::Rejected(RejectReason::StaleTransition, _)
        ));
        m.apply(&op("8", OpKind::DiffSet, json!({"diffs": [{"file": "a"}]})));
        assert_eq!(m.document().diffs, Some(json!([{"file": "a"}])));
        m.apply(&op("9", OpKind::MessageRemove, json!({"messageID": "m"})));
        let doc = m.document();
        assert!(doc.messages.is_empty());
        assert_eq!(doc.cursor.0, 10);
        // Removed is final, for the message and for its parts.
        for (id, kind, payload) in [
            (
                "12",
                OpKind::MessageUpsert,
                json!({"id": "m", "role": "user"}),
            ),
            (
                "13",
                OpKind::PartUpsert,
                json!({"id": "p", "messageID": "m", "type": "text"}),
            ),
        ] {
            assert!(matches!(
                m.apply(&op(id, kind, payload)),
                Outcome::Rejected(RejectReason::StaleTransition, _)
            ));
        }
        let mut dep = op("10", OpKind::ModelUpsert, json!({"id": "gpt"}));
        dep.depends_on = vec!["11".into()];
        assert!(matches!(
            m.apply(&dep),
            Outcome::Rejected(RejectReason::MissingDependency, _)
        ));
    }
}
