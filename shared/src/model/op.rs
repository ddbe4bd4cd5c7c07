//! What an op means: parses an op's payload into the [`Effect`] it has on a share's
//! records, checking everything that does not depend on stored records.
//!
//! The server's ledger validates every op with [`parse`] before applying it; the
//! client's [`SessionDocument`](super::document::SessionDocument), the server's share
//! page data and live streams read applied ops through it too, so the op kinds'
//! fields (which id a record carries, the two spellings of a remove, a delta's default
//! field, a model's record key) are read in this one place.
//!
//! Reasons returned here go to the agent as `rejected(invalid, reason)`: short
//! sentences about its payload, never anything about the server.

use super::progress;
use crate::OpKind;
use crate::limits::MAX_RECORD_ID_BYTES;
use std::borrow::Cow;

use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// What an op does to a share's records, once the stored records agree (the
/// stale-transition rules of [`progress`]).
///
/// Serialized (without the record JSON, which is the op's payload) it is the
/// `effect` member of an op in the HTTP API and live stream: the page reads ids and
/// fields from there instead of knowing each kind's payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum Effect {
    /// Replaces the session record, unless the stored one was updated later.
    Session {
        /// `time.updated` (see [`progress`]).
        updated: Option<i64>,
        #[serde(skip)]
        json: String,
    },
    /// Replaces a message; a terminal message only accepts terminal replacements.
    MessageUpsert {
        id: String,
        terminal: bool,
        #[serde(skip)]
        json: String,
    },
    /// Removes a message and its parts.
    MessageRemove {
        id: String,
    },
    /// Replaces a part, unless the stored one is finished and this one is not
    /// (see [`progress`]). Its message may arrive later.
    PartUpsert {
        id: String,
        message_id: String,
        finished: bool,
        #[serde(skip)]
        json: String,
    },
    PartRemove {
        id: String,
    },
    /// Appends `delta` to the string `field` of a stored part.
    PartDelta {
        id: String,
        field: String,
        delta: String,
    },
    /// Replaces the whole diff list with this JSON array.
    DiffSet {
        /// The list as one JSON array (from either accepted form).
        #[serde(rename = "diffs", serialize_with = "json_text")]
        json: String,
    },
    /// Replaces a model; `id` is its record key (see [`crate::ops::model_record_id`]).
    ModelUpsert {
        id: String,
        #[serde(skip)]
        json: String,
    },
}

/// Writes JSON text as the value it holds (`null` if it holds none).
fn json_text<S: Serializer>(text: &str, serializer: S) -> Result<S::Ok, S::Error> {
    serde_json::from_str::<Value>(text)
        .unwrap_or(Value::Null)
        .serialize(serializer)
}

impl Effect {
    /// The record's JSON as it is stored: the payload for upserts, the normalized
    /// list for `diff.set`; `None` for removes and deltas.
    pub fn record_json(&self) -> Option<&str> {
        match self {
            Self::Session { json, .. }
            | Self::MessageUpsert { json, .. }
            | Self::PartUpsert { json, .. }
            | Self::DiffSet { json }
            | Self::ModelUpsert { json, .. } => Some(json),
            Self::MessageRemove { .. } | Self::PartRemove { .. } | Self::PartDelta { .. } => None,
        }
    }
}

/// Fields a delta may not touch: they are the part's identity, mirrored in its row.
const PROTECTED_PART_FIELDS: [&str; 4] = ["id", "messageID", "sessionID", "type"];

/// Parses `payload` for an op of `kind` in a share mirroring `session_id`
/// (`None`: any session, for reading ops a server already applied).
///
/// Upserts keep the agent's JSON text as it was sent, so viewers see exactly
/// what the agent wrote.
pub fn parse(kind: OpKind, payload: &str, session_id: Option<&str>) -> Result<Effect, String> {
    if let Some(effect) = fast_path(kind, payload, session_id) {
        return Ok(effect);
    }
    full_parse(kind, payload, session_id)
}

/// The precise verdict on any payload, building its whole `Value`: what
/// [`fast_path`] must agree with wherever it answers.
pub fn full_parse(kind: OpKind, payload: &str, session_id: Option<&str>) -> Result<Effect, String> {
    let value: Value =
        serde_json::from_str(payload).map_err(|_| "payload is not valid JSON".to_owned())?;
    parse_value(kind, payload, &value, session_id)
}

/// [`full_parse`] of a payload a reader has already parsed into `value` (from
/// the text `payload`), so an op read for display is parsed once.
pub fn parse_value(
    kind: OpKind,
    payload: &str,
    value: &Value,
    session_id: Option<&str>,
) -> Result<Effect, String> {
    match kind {
        OpKind::SessionUpsert => {
            let id = string_id(object(value)?, "id")?;
            if let Some(session_id) = session_id
                && id != session_id
            {
                return Err(format!(
                    "session id {id} is not this share's session {session_id}"
                ));
            }
            let time = value.get("time");
            Ok(Effect::Session {
                updated: progress::session_updated(time.and_then(|t| t.get("updated"))),
                json: payload.to_owned(),
            })
        }
        OpKind::MessageUpsert => {
            let obj = object(value)?;
            let id = string_id(obj, "id")?;
            if !matches!(obj.get("role"), Some(Value::String(_))) {
                return Err("message needs a string \"role\"".to_owned());
            }
            same_session(obj, session_id)?;
            Ok(Effect::MessageUpsert {
                id,
                terminal: is_terminal(obj),
                json: payload.to_owned(),
            })
        }
        OpKind::MessageRemove => Ok(Effect::MessageRemove {
            id: either_id(object(value)?, "id", "messageID")?,
        }),
        OpKind::PartUpsert => {
            let obj = object(value)?;
            let id = string_id(obj, "id")?;
            let message_id = string_id(obj, "messageID")?;
            let Some(Value::String(part_type)) = obj.get("type") else {
                return Err("part needs a string \"type\"".to_owned());
            };
            same_session(obj, session_id)?;
            let status = obj
                .get("state")
                .and_then(|state| state.get("status"))
                .and_then(Value::as_str);
            let time_end = obj.get("time").and_then(|time| time.get("end"));
            Ok(Effect::PartUpsert {
                id,
                message_id,
                finished: progress::part_finished(part_type, status, time_end),
                json: payload.to_owned(),
            })
        }
        OpKind::PartRemove => Ok(Effect::PartRemove {
            id: either_id(object(value)?, "partID", "id")?,
        }),
        OpKind::PartDelta => part_delta(object(value)?),
        OpKind::DiffSet => diff_set(value),
        OpKind::ModelUpsert => {
            let obj = object(value)?;
            let id = string_id(obj, "id")?;
            let provider = match obj.get("providerID") {
                None | Some(Value::Null) => None,
                Some(Value::String(provider)) => Some(provider.as_str()),
                Some(_) => return Err("\"providerID\" is not a string".to_owned()),
            };
            let key = crate::ops::model_record_id(&id, provider);
            if key.len() > MAX_RECORD_ID_BYTES {
                return Err(format!(
                    "\"providerID\" and \"id\" together are longer than {MAX_RECORD_ID_BYTES} bytes"
                ));
            }
            Ok(Effect::ModelUpsert {
                id: key,
                json: payload.to_owned(),
            })
        }
    }
}

/// The fields a message upsert needs, borrowed from the payload.
#[derive(Deserialize)]
struct MessageHead<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    /// Required to be a string; its value is not needed here.
    #[serde(rename = "role", borrow)]
    _role: Cow<'a, str>,
    #[serde(rename = "sessionID", borrow, default)]
    session_id: Option<Cow<'a, str>>,
    /// A map, not a struct: serde reads a struct from a JSON array too.
    #[serde(default)]
    time: Option<Map<String, Value>>,
    /// Small in practice (a name and a message), and `null` reads as `None`.
    #[serde(default)]
    error: Option<Value>,
}

/// The fields a part upsert needs, borrowed from the payload.
#[derive(Deserialize)]
struct PartHead<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(rename = "messageID", borrow)]
    message_id: Cow<'a, str>,
    #[serde(rename = "type", borrow)]
    part_type: Cow<'a, str>,
    #[serde(rename = "sessionID", borrow, default)]
    session_id: Option<Cow<'a, str>>,
    /// A tool call's `state.status`, without reading its output into a `Value`.
    #[serde(default)]
    state: Option<StateStatus>,
    #[serde(default)]
    time: Option<Map<String, Value>>,
}

/// The `status` member of a part's `state` object (read from objects only, as
/// the full parse reads it; the last of repeated members wins, as there).
struct StateStatus(Option<Value>);

impl<'de> Deserialize<'de> for StateStatus {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StatusVisitor;

        impl<'de> Visitor<'de> for StatusVisitor {
            type Value = StateStatus;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut members: A) -> Result<StateStatus, A::Error> {
                let mut status = None;
                while let Some(key) = members.next_key::<Cow<'de, str>>()? {
                    if key == "status" {
                        status = Some(members.next_value::<Value>()?);
                    } else {
                        members.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(StateStatus(status))
            }
        }

        deserializer.deserialize_map(StatusVisitor)
    }
}

/// The common, valid case of the hottest kinds without building a whole `Value`
/// (a measurable share of the writer's time). `None` for anything unusual: the
/// full parse below then gives the precise verdict and message.
fn fast_path(kind: OpKind, payload: &str, session_id: Option<&str>) -> Option<Effect> {
    if !matches!(kind, OpKind::PartUpsert | OpKind::MessageUpsert)
        || serde_json::from_str::<CheckedObject>(payload).is_err()
    {
        return None;
    }
    let id_ok = |id: &str| !id.is_empty() && id.len() <= MAX_RECORD_ID_BYTES;
    let session_ok = |sid: &Option<Cow<'_, str>>| {
        sid.as_deref()
            .is_none_or(|sid| session_id.is_none_or(|session_id| sid == session_id))
    };
    match kind {
        OpKind::PartUpsert => {
            let head: PartHead<'_> = serde_json::from_str(payload).ok()?;
            if !(id_ok(&head.id) && id_ok(&head.message_id) && session_ok(&head.session_id)) {
                return None;
            }
            let status = head.state.as_ref().and_then(|s| s.0.as_ref());
            let time_end = head.time.as_ref().and_then(|time| time.get("end"));
            Some(Effect::PartUpsert {
                finished: progress::part_finished(
                    &head.part_type,
                    status.and_then(Value::as_str),
                    time_end,
                ),
                id: head.id.into_owned(),
                message_id: head.message_id.into_owned(),
                json: payload.to_owned(),
            })
        }
        OpKind::MessageUpsert => {
            let head: MessageHead<'_> = serde_json::from_str(payload).ok()?;
            (id_ok(&head.id) && session_ok(&head.session_id)).then(|| Effect::MessageUpsert {
                id: head.id.into_owned(),
                terminal: progress::message_finished(
                    head.time.as_ref().and_then(|time| time.get("completed")),
                    head.error.as_ref(),
                ),
                json: payload.to_owned(),
            })
        }
        _ => None,
    }
}

/// A JSON object that the full parse would read as well, checked without
/// building it. The heads above cannot tell on their own: serde reads a struct
/// from a JSON array, and the members they skip are skipped unchecked (a
/// number beyond f64, a lone surrogate escape).
struct CheckedObject;

impl<'de> Deserialize<'de> for CheckedObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(CheckedVisitor)?;
        Ok(Self)
    }
}

/// Any JSON value, read as a `Value` reads it, and dropped.
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(CheckedVisitor)?;
        Ok(Self)
    }
}

struct CheckedVisitor;

impl<'de> Visitor<'de> for CheckedVisitor {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
        while items.next_element::<Checked>()?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut members: A) -> Result<(), A::Error> {
        while members.next_entry::<Checked, Checked>()?.is_some() {}
        Ok(())
    }
}

fn object(value: &Value) -> Result<&Map<String, Value>, String> {
    value
        .as_object()
        .ok_or_else(|| "payload is not a JSON object".to_owned())
}

/// opencode marks a finished message with `time.completed`, a failed one with `error`.
fn is_terminal(message: &Map<String, Value>) -> bool {
    progress::message_finished(
        message.get("time").and_then(|time| time.get("completed")),
        message.get("error"),
    )
}

fn part_delta(obj: &Map<String, Value>) -> Result<Effect, String> {
    let id = either_id(obj, "partID", "id")?;
    let Some(Value::String(delta)) = obj.get("delta") else {
        return Err("part.delta needs a string \"delta\"".to_owned());
    };
    let field = match obj.get("field") {
        None | Some(Value::Null) => "text".to_owned(),
        Some(Value::String(field)) if !field.is_empty() => field.clone(),
        Some(_) => return Err("part.delta's \"field\" must be a non-empty string".to_owned()),
    };
    if PROTECTED_PART_FIELDS.contains(&field.as_str()) {
        return Err(format!("part.delta cannot change a part's \"{field}\""));
    }
    Ok(Effect::PartDelta {
        id,
        field,
        delta: delta.clone(),
    })
}

fn diff_set(value: &Value) -> Result<Effect, String> {
    let diffs = match value {
        Value::Array(diffs) => diffs,
        Value::Object(obj) => match obj.get("diffs") {
            Some(Value::Array(diffs)) => diffs,
            _ => return Err("diff.set needs {\"diffs\": [...]} or an array".to_owned()),
        },
        _ => return Err("diff.set needs {\"diffs\": [...]} or an array".to_owned()),
    };
    if let Some(i) = diffs.iter().position(|d| !d.is_object()) {
        return Err(format!("diff {i} is not a JSON object"));
    }
    let json = serde_json::to_string(diffs)
        .map_err(|_| "diff list cannot be stored as JSON".to_owned())?;
    Ok(Effect::DiffSet { json })
}

/// A required record id in `field`.
fn string_id(obj: &Map<String, Value>, field: &str) -> Result<String, String> {
    match obj.get(field) {
        Some(Value::String(id)) => check_id(field, id),
        _ => Err(format!("payload needs a string \"{field}\"")),
    }
}

/// A record id in `first`, or else in `second` (removes accept both spellings).
fn either_id(obj: &Map<String, Value>, first: &str, second: &str) -> Result<String, String> {
    match (obj.get(first), obj.get(second)) {
        (Some(Value::String(id)), _) => check_id(first, id),
        (None, Some(Value::String(id))) => check_id(second, id),
        _ => Err(format!(
            "payload needs a string \"{first}\" or \"{second}\""
        )),
    }
}

fn check_id(field: &str, id: &str) -> Result<String, String> {
    if id.is_empty() {
        return Err(format!("\"{field}\" is empty"));
    }
    if id.len() > MAX_RECORD_ID_BYTES {
        return Err(format!(
            "\"{field}\" is longer than {MAX_RECORD_ID_BYTES} bytes"
        ));
    }
    Ok(id.to_owned())
}

/// A `sessionID`, when present, must name the share's session.
fn same_session(obj: &Map<String, Value>, session_id: Option<&str>) -> Result<(), String> {
    match (obj.get("sessionID"), session_id) {
        // Null reads as absent, as the fast path (and the client's export reader) read it.
        (None | Some(Value::Null), _) => Ok(()),
        (Some(Value::String(_)), None) => Ok(()),
        (Some(Value::String(id)), Some(session_id)) if id == session_id => Ok(()),
        (Some(Value::String(id)), Some(session_id)) => Err(format!(
            "sessionID {id} is not this share's session {session_id}"
        )),
        (Some(_), _) => Err("\"sessionID\" is not a string".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SES: Option<&str> = Some("ses_1");

    fn invalid(kind: OpKind, payload: &str) -> String {
        match parse(kind, payload, SES) {
            Err(reason) => reason,
            Ok(effect) => panic!("{kind} {payload} parsed as {effect:?}"),
        }
    }

    #[test]
    fn rejects_non_json_and_non_objects() {
        assert_eq!(
            invalid(OpKind::ModelUpsert, "{not json"),
            "payload is not valid JSON"
        );
        for kind in OpKind::ALL {
            if kind != OpKind::DiffSet {
                assert_eq!(invalid(kind, "[1]"), "payload is not a JSON object");
                assert_eq!(invalid(kind, "\"x\""), "payload is not a JSON object");
            }
        }
    }

    #[test]
    fn session_upsert_must_name_the_shares_session() {
        assert_eq!(
            invalid(OpKind::SessionUpsert, r#"{"id":"ses_2"}"#),
            "session id ses_2 is not this share's session ses_1"
        );
        assert_eq!(
            invalid(OpKind::SessionUpsert, r#"{"id":7}"#),
            "payload needs a string \"id\""
        );
        let text = r#"{"id": "ses_1", "title": "t"}"#;
        assert_eq!(
            parse(OpKind::SessionUpsert, text, SES),
            Ok(Effect::Session {
                updated: None,
                json: text.into()
            })
        );
    }

    #[test]
    fn message_upsert_needs_id_and_role_and_knows_terminal_states() {
        assert!(invalid(OpKind::MessageUpsert, r#"{"id":"m"}"#).contains("role"));
        assert!(invalid(OpKind::MessageUpsert, r#"{"role":"user"}"#).contains("\"id\""));
        assert!(
            invalid(
                OpKind::MessageUpsert,
                r#"{"id":"m","role":"user","sessionID":"other"}"#
            )
            .contains("sessionID other")
        );
        let terminal = |text: &str| match parse(OpKind::MessageUpsert, text, SES) {
            Ok(Effect::MessageUpsert { terminal, .. }) => terminal,
            other => panic!("{other:?}"),
        };
        assert!(!terminal(r#"{"id":"m","role":"a","time":{"created":1}}"#));
        assert!(!terminal(
            r#"{"id":"m","role":"a","time":{"completed":null},"error":null}"#
        ));
        assert!(terminal(r#"{"id":"m","role":"a","time":{"completed":5}}"#));
        assert!(terminal(
            r#"{"id":"m","role":"a","sessionID":"ses_1","error":{"name":"x"}}"#
        ));
    }

    #[test]
    fn ids_are_bounded_and_not_empty() {
        assert_eq!(
            invalid(OpKind::ModelUpsert, r#"{"id":""}"#),
            "\"id\" is empty"
        );
        let long = format!(r#"{{"id":"{}"}}"#, "x".repeat(MAX_RECORD_ID_BYTES + 1));
        assert!(invalid(OpKind::ModelUpsert, &long).contains("longer than"));
        let fits = format!(r#"{{"id":"{}"}}"#, "x".repeat(MAX_RECORD_ID_BYTES));
        assert!(parse(OpKind::ModelUpsert, &fits, SES).is_ok());
    }

    #[test]
    fn removes_accept_both_spellings() {
        assert_eq!(
            parse(OpKind::MessageRemove, r#"{"messageID":"m"}"#, SES),
            Ok(Effect::MessageRemove { id: "m".into() })
        );
        assert_eq!(
            parse(OpKind::PartRemove, r#"{"id":"p"}"#, SES),
            Ok(Effect::PartRemove { id: "p".into() })
        );
        assert_eq!(
            parse(OpKind::PartRemove, r#"{"partID":"p","messageID":"m"}"#, SES),
            Ok(Effect::PartRemove { id: "p".into() })
        );
        assert!(invalid(OpKind::PartRemove, r#"{"messageID":"m"}"#).contains("partID"));
    }

    #[test]
    fn part_upsert_needs_id_message_and_type() {
        assert!(invalid(OpKind::PartUpsert, r#"{"id":"p","type":"text"}"#).contains("messageID"));
        assert!(invalid(OpKind::PartUpsert, r#"{"id":"p","messageID":"m"}"#).contains("type"));
        assert!(
            invalid(
                OpKind::PartUpsert,
                r#"{"id":"p","messageID":"m","type":"text","sessionID":3}"#
            )
            .contains("sessionID")
        );
    }

    #[test]
    fn part_delta_defaults_to_text_and_protects_identity_fields() {
        assert_eq!(
            parse(OpKind::PartDelta, r#"{"partID":"p","delta":"hi"}"#, SES),
            Ok(Effect::PartDelta {
                id: "p".into(),
                field: "text".into(),
                delta: "hi".into()
            })
        );
        assert!(invalid(OpKind::PartDelta, r#"{"partID":"p"}"#).contains("delta"));
        assert!(
            invalid(OpKind::PartDelta, r#"{"partID":"p","delta":"x","field":1}"#).contains("field")
        );
        assert!(
            invalid(
                OpKind::PartDelta,
                r#"{"partID":"p","delta":"x","field":"messageID"}"#
            )
            .contains("cannot change")
        );
    }

    #[test]
    fn diff_set_takes_an_object_with_diffs_or_a_bare_array_of_objects() {
        let expected = Ok(Effect::DiffSet {
            json: r#"[{"file":"a"}]"#.into(),
        });
        assert_eq!(
            parse(OpKind::DiffSet, r#"{"diffs":[{"file":"a"}]}"#, SES),
            expected
        );
        assert_eq!(
            parse(OpKind::DiffSet, r#"[ {"file": "a"} ]"#, SES),
            expected
        );
        assert_eq!(
            invalid(OpKind::DiffSet, r#"[{"file":"a"}, 3]"#),
            "diff 1 is not a JSON object"
        );
        assert!(invalid(OpKind::DiffSet, r#"{"files":[]}"#).contains("diff.set needs"));
        assert!(invalid(OpKind::DiffSet, "7").contains("diff.set needs"));
    }
}
