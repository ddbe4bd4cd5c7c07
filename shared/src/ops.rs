//! Op kinds and the JSON form of an op, as files, the CLI and the client library use it.

use crate::capsync_capnp::OpKind as WireKind;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// What an op does to the share's records. Names match the schema's comments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OpKind {
    #[serde(rename = "session.upsert")]
    SessionUpsert,
    #[serde(rename = "message.upsert")]
    MessageUpsert,
    #[serde(rename = "message.remove")]
    MessageRemove,
    #[serde(rename = "part.upsert")]
    PartUpsert,
    #[serde(rename = "part.remove")]
    PartRemove,
    #[serde(rename = "part.delta")]
    PartDelta,
    #[serde(rename = "diff.set")]
    DiffSet,
    #[serde(rename = "model.upsert")]
    ModelUpsert,
}

impl OpKind {
    pub const ALL: [OpKind; 8] = [
        Self::SessionUpsert,
        Self::MessageUpsert,
        Self::MessageRemove,
        Self::PartUpsert,
        Self::PartRemove,
        Self::PartDelta,
        Self::DiffSet,
        Self::ModelUpsert,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::SessionUpsert => "session.upsert",
            Self::MessageUpsert => "message.upsert",
            Self::MessageRemove => "message.remove",
            Self::PartUpsert => "part.upsert",
            Self::PartRemove => "part.remove",
            Self::PartDelta => "part.delta",
            Self::DiffSet => "diff.set",
            Self::ModelUpsert => "model.upsert",
        }
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An op kind name that is not one of [`OpKind::ALL`].
#[derive(Debug, thiserror::Error)]
#[error(
    "unknown op kind {0:?} (expected one of session.upsert, message.upsert, message.remove, part.upsert, part.remove, part.delta, diff.set, model.upsert)"
)]
pub struct UnknownOpKind(pub String);

impl FromStr for OpKind {
    type Err = UnknownOpKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownOpKind(s.to_owned()))
    }
}

impl From<WireKind> for OpKind {
    fn from(kind: WireKind) -> Self {
        match kind {
            WireKind::SessionUpsert => Self::SessionUpsert,
            WireKind::MessageUpsert => Self::MessageUpsert,
            WireKind::MessageRemove => Self::MessageRemove,
            WireKind::PartUpsert => Self::PartUpsert,
            WireKind::PartRemove => Self::PartRemove,
            WireKind::PartDelta => Self::PartDelta,
            WireKind::DiffSet => Self::DiffSet,
            WireKind::ModelUpsert => Self::ModelUpsert,
        }
    }
}

impl From<OpKind> for WireKind {
    fn from(kind: OpKind) -> Self {
        match kind {
            OpKind::SessionUpsert => Self::SessionUpsert,
            OpKind::MessageUpsert => Self::MessageUpsert,
            OpKind::MessageRemove => Self::MessageRemove,
            OpKind::PartUpsert => Self::PartUpsert,
            OpKind::PartRemove => Self::PartRemove,
            OpKind::PartDelta => Self::PartDelta,
            OpKind::DiffSet => Self::DiffSet,
            OpKind::ModelUpsert => Self::ModelUpsert,
        }
    }
}

/// One op as JSON: `{"opId": "...", "kind": "part.upsert", "payload": {...}, "dependsOn": [...]}`.
///
/// This is the format of op files (`capsync push ops.json`) and of the client
/// library's API. On the wire the payload travels as JSON text.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpSpec {
    #[serde(rename = "opId")]
    pub op_id: String,
    pub kind: OpKind,
    pub payload: serde_json::Value,
    #[serde(rename = "dependsOn", default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
}

impl OpSpec {
    pub fn new(op_id: impl Into<String>, kind: OpKind, payload: serde_json::Value) -> Self {
        Self {
            op_id: op_id.into(),
            kind,
            payload,
            depends_on: Vec::new(),
        }
    }
}

/// The record id of a model: `providerID/id`, as opencode names models
/// (`anthropic/claude-sonnet-4`), so the same model id offered by two providers
/// is two records. Just `id` when the model names no provider.
pub fn model_record_id(id: &str, provider_id: Option<&str>) -> String {
    match provider_id {
        Some(provider) if !provider.is_empty() => format!("{provider}/{id}"),
        _ => id.to_owned(),
    }
}

/// [`model_record_id`] of a model record, `None` without a string `id`.
pub fn model_record_id_of(model: &serde_json::Value) -> Option<String> {
    let id = model.get("id")?.as_str()?;
    Some(model_record_id(
        id,
        model.get("providerID").and_then(serde_json::Value::as_str),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_are_keyed_by_provider_and_id() {
        let of = |v: serde_json::Value| model_record_id_of(&v);
        assert_eq!(
            of(serde_json::json!({"id": "x", "providerID": "openrouter"})).as_deref(),
            Some("openrouter/x")
        );
        assert_eq!(
            of(serde_json::json!({"id": "x", "providerID": "opencode"})).as_deref(),
            Some("opencode/x")
        );
        assert_eq!(of(serde_json::json!({"id": "x"})).as_deref(), Some("x"));
        assert_eq!(
            of(serde_json::json!({"id": "x", "providerID": ""})).as_deref(),
            Some("x")
        );
        assert_eq!(of(serde_json::json!({"id": 7})), None);
    }

    #[test]
    fn kind_names_round_trip_through_str_and_serde() {
        for kind in OpKind::ALL {
            assert_eq!(kind.as_str().parse::<OpKind>().unwrap(), kind);
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
            assert_eq!(OpKind::from(WireKind::from(kind)), kind);
        }
        assert!("part.upsertt".parse::<OpKind>().is_err());
    }

    #[test]
    fn op_spec_reads_the_documented_json_form() {
        let op: OpSpec = serde_json::from_str(
            r#"{"opId":"o1","kind":"part.delta","payload":{"partID":"p","delta":"x"},"dependsOn":["o0"]}"#,
        )
        .unwrap();
        assert_eq!(op.kind, OpKind::PartDelta);
        assert_eq!(op.depends_on, vec!["o0".to_string()]);
    }
}
