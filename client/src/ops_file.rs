//! Reading what `capsync push` is given: an ops file (JSON array or JSONL) or an export.
//!
//! An ops file holds [`OpSpec`]s in their JSON form,
//! `{"opId": "...", "kind": "part.upsert", "payload": {...}, "dependsOn": [...]}`, either as
//! one JSON array or as JSON Lines (one op per line; blank lines are skipped). Detection:
//! a file starting with `[` is an array; a file that is one JSON object is a single op when
//! it has `opId`, else an export (see [`crate::export`]); anything else is read as JSON Lines.
//! Errors name the line (and column) they were found at.

use std::collections::HashMap;

use capsync_shared::limits::{MAX_DEPENDS_ON, MAX_OP_ID_BYTES};
use capsync_shared::ops::OpSpec;
use serde::Serialize;
use serde_json::Value;

use crate::error::ClientError;
use crate::export::{SessionExport, serde_message};

/// What the caller says the file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InputFormat {
    /// Look at the content.
    #[default]
    Auto,
    /// An ops file (array or JSON Lines).
    Ops,
    /// An opencode-style session export.
    Export,
}

/// What the file turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum DetectedFormat {
    OpsArray,
    OpsLines,
    Export,
}

impl DetectedFormat {
    pub fn describe(self) -> &'static str {
        match self {
            Self::OpsArray => "ops file (JSON array)",
            Self::OpsLines => "ops file (JSON Lines)",
            Self::Export => "session export",
        }
    }
}

/// The ops to push and where they came from.
#[derive(Debug, Clone)]
pub struct PushInput {
    pub format: DetectedFormat,
    pub ops: Vec<OpSpec>,
    /// Set for an export: its session (for `share create --from-export`, or checks).
    pub export: Option<SessionExport>,
}

/// Reads a push input file's text; see the module docs for the detection rules.
pub fn read_push_input(text: &str, format: InputFormat) -> Result<PushInput, ClientError> {
    let trimmed = text.trim_start_matches('\u{feff}').trim_start();
    if trimmed.is_empty() {
        return Err(ClientError::invalid("the file is empty"));
    }
    let from_export = |export: SessionExport| PushInput {
        format: DetectedFormat::Export,
        ops: export.to_ops(),
        export: Some(export),
    };
    let ops = |format, ops| PushInput {
        format,
        ops,
        export: None,
    };
    match format {
        InputFormat::Export => Ok(from_export(SessionExport::from_json(text)?)),
        InputFormat::Ops if trimmed.starts_with('[') => {
            Ok(ops(DetectedFormat::OpsArray, parse_ops_array(text)?))
        }
        InputFormat::Ops => Ok(ops(DetectedFormat::OpsLines, parse_ops_lines_or_one(text)?)),
        InputFormat::Auto if trimmed.starts_with('[') => {
            Ok(ops(DetectedFormat::OpsArray, parse_ops_array(text)?))
        }
        InputFormat::Auto => match serde_json::from_str::<Value>(text) {
            // One JSON document: a single (maybe pretty-printed) op, or an export.
            Ok(Value::Object(map)) if map.contains_key("opId") => {
                Ok(ops(DetectedFormat::OpsLines, parse_ops_lines_or_one(text)?))
            }
            Ok(value @ Value::Object(_)) => Ok(from_export(SessionExport::from_value(&value)?)),
            Ok(_) => Err(ClientError::invalid(
                "expected an ops file (a JSON array or one op per line) or a session export (an object)",
            )),
            // Several documents: JSON Lines.
            Err(_) => Ok(ops(DetectedFormat::OpsLines, parse_ops_lines(text)?)),
        },
    }
}

/// Parses an ops file of either form (array or JSON Lines).
pub fn parse_ops(text: &str) -> Result<Vec<OpSpec>, ClientError> {
    if text
        .trim_start_matches('\u{feff}')
        .trim_start()
        .starts_with('[')
    {
        parse_ops_array(text)
    } else {
        parse_ops_lines_or_one(text)
    }
}

/// Parses a JSON array of ops.
pub fn parse_ops_array(text: &str) -> Result<Vec<OpSpec>, ClientError> {
    let text = text.trim_start_matches('\u{feff}');
    let ops: Vec<OpSpec> = serde_json::from_str(text).map_err(|e| {
        ClientError::invalid(format!(
            "line {}, column {}: {}",
            e.line(),
            e.column(),
            serde_message(&e)
        ))
    })?;
    let lines = vec![None; ops.len()];
    validate(&ops, &lines)?;
    Ok(ops)
}

/// Parses JSON Lines: one op per non-blank line.
pub fn parse_ops_lines(text: &str) -> Result<Vec<OpSpec>, ClientError> {
    let text = text.trim_start_matches('\u{feff}');
    let mut ops = Vec::new();
    let mut lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let op: OpSpec = serde_json::from_str(line).map_err(|e| {
            ClientError::invalid(format!(
                "line {}, column {}: {}",
                i + 1,
                e.column(),
                serde_message(&e)
            ))
        })?;
        ops.push(op);
        lines.push(Some(i + 1));
    }
    validate(&ops, &lines)?;
    Ok(ops)
}

/// JSON Lines, or a file holding exactly one op (possibly spread over several lines).
fn parse_ops_lines_or_one(text: &str) -> Result<Vec<OpSpec>, ClientError> {
    let single = serde_json::from_str::<Value>(text)
        .ok()
        .filter(|v| v.get("opId").is_some());
    match single {
        Some(value) => {
            let op: OpSpec = serde_json::from_value(value)
                .map_err(|e| ClientError::invalid(format!("the op: {}", serde_message(&e))))?;
            validate(std::slice::from_ref(&op), &[Some(1)])?;
            Ok(vec![op])
        }
        None => parse_ops_lines(text),
    }
}

/// Client-side checks the server would refuse anyway, reported with a location:
/// op ids non-empty and within the limit, `dependsOn` within the limit, and one op id
/// not used for two different ops.
fn validate(ops: &[OpSpec], lines: &[Option<usize>]) -> Result<(), ClientError> {
    let at = |i: usize| match lines.get(i).copied().flatten() {
        Some(line) => format!("line {line}"),
        None => format!("op #{}", i + 1),
    };
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        if op.op_id.is_empty() {
            return Err(ClientError::invalid(format!("{}: empty opId", at(i))));
        }
        if op.op_id.len() > MAX_OP_ID_BYTES {
            return Err(ClientError::invalid(format!(
                "{}: opId is {} bytes, the limit is {MAX_OP_ID_BYTES}",
                at(i),
                op.op_id.len()
            )));
        }
        if let Some(dependency) = op
            .depends_on
            .iter()
            .find(|d| d.is_empty() || d.len() > MAX_OP_ID_BYTES)
        {
            return Err(ClientError::invalid(format!(
                "{}: dependsOn entry of {} bytes, op ids are 1 to {MAX_OP_ID_BYTES}",
                at(i),
                dependency.len()
            )));
        }
        if op.depends_on.len() > MAX_DEPENDS_ON {
            return Err(ClientError::invalid(format!(
                "{}: {} dependsOn entries, the limit is {MAX_DEPENDS_ON}",
                at(i),
                op.depends_on.len()
            )));
        }
        if let Some(&first) = seen.get(op.op_id.as_str()) {
            if ops[first] != *op {
                return Err(ClientError::invalid(format!(
                    "{}: opId {:?} was already used by a different op at {}",
                    at(i),
                    op.op_id,
                    at(first)
                )));
            }
        } else {
            seen.insert(&op.op_id, i);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsync_shared::ops::OpKind;

    const ARRAY: &str = r#"[
  {"opId": "o1", "kind": "session.upsert", "payload": {"id": "s"}},
  {"opId": "o2", "kind": "message.upsert", "payload": {"id": "m", "sessionID": "s"}, "dependsOn": ["o1"]}
]"#;

    const LINES: &str = "{\"opId\": \"o1\", \"kind\": \"session.upsert\", \"payload\": {\"id\": \"s\"}}\n\n{\"opId\": \"o2\", \"kind\": \"part.delta\", \"payload\": {\"partID\": \"p\", \"delta\": \"x\"}}\n";

    #[test]
    fn reads_an_array() {
        let ops = parse_ops(ARRAY).unwrap();
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[1].kind, OpKind::MessageUpsert);
        assert_eq!(ops[1].depends_on, vec!["o1".to_string()]);
        let input = read_push_input(ARRAY, InputFormat::Auto).unwrap();
        assert_eq!(input.format, DetectedFormat::OpsArray);
        assert_eq!(input.ops, ops);
    }

    #[test]
    fn reads_json_lines_skipping_blank_lines() {
        let ops = parse_ops(LINES).unwrap();
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[1].kind, OpKind::PartDelta);
        let input = read_push_input(LINES, InputFormat::Auto).unwrap();
        assert_eq!(input.format, DetectedFormat::OpsLines);
        assert_eq!(input.ops, ops);
        assert_eq!(read_push_input(LINES, InputFormat::Ops).unwrap().ops, ops);
    }

    #[test]
    fn one_pretty_printed_op_is_one_op() {
        let text = "{\n  \"opId\": \"o1\",\n  \"kind\": \"diff.set\",\n  \"payload\": []\n}\n";
        let input = read_push_input(text, InputFormat::Auto).unwrap();
        assert_eq!(input.ops.len(), 1);
        assert_eq!(parse_ops(text).unwrap().len(), 1);
    }

    #[test]
    fn an_object_without_op_id_is_an_export() {
        let text = r#"{"info": {"id": "s"}, "messages": [{"info": {"id": "m"}, "parts": []}]}"#;
        let input = read_push_input(text, InputFormat::Auto).unwrap();
        assert_eq!(input.format, DetectedFormat::Export);
        assert_eq!(input.ops.len(), 2);
        assert_eq!(input.export.unwrap().session_id(), "s");
        // Forcing the ops format on an export fails instead of guessing.
        assert!(read_push_input(text, InputFormat::Ops).is_err());
        // Forcing export on an ops array fails too.
        assert!(read_push_input(ARRAY, InputFormat::Export).is_err());
    }

    #[test]
    fn json_lines_errors_name_the_line() {
        let text =
            format!("{LINES}{{\"opId\": \"o3\", \"kind\": \"part.upsertt\", \"payload\": {{}}}}\n");
        let err = parse_ops(&text).unwrap_err().to_string();
        assert!(err.contains("line 4"), "{err}");
        assert!(err.contains("part.upsertt"), "{err}");
        assert!(!err.contains(" at line "), "no serde location tail: {err}");

        let err = parse_ops("{\"opId\": \"o1\", \"kind\": \"diff.set\"}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("payload"), "{err}");

        let err = read_push_input("{\"opId\": \"o1\"\nnot json\n", InputFormat::Auto)
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn array_errors_name_line_and_column() {
        let text = "[\n  {\"opId\": \"o1\", \"kind\": \"session.upsert\", \"payload\": {}},\n  {\"opId\": 5, \"kind\": \"session.upsert\", \"payload\": {}}\n]";
        let err = parse_ops(text).unwrap_err().to_string();
        assert!(err.contains("line 3, column"), "{err}");
    }

    #[test]
    fn checks_ids_and_repeats() {
        let long = "x".repeat(MAX_OP_ID_BYTES + 1);
        let text = format!("{{\"opId\": \"{long}\", \"kind\": \"diff.set\", \"payload\": []}}\n");
        let err = parse_ops_lines(&text).unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("limit"), "{err}");

        let err = parse_ops_lines("{\"opId\": \"\", \"kind\": \"diff.set\", \"payload\": []}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("empty opId"), "{err}");

        // The same op twice is harmless (the server answers duplicate) ...
        let same = "{\"opId\": \"a\", \"kind\": \"diff.set\", \"payload\": []}\n".repeat(2);
        assert_eq!(parse_ops_lines(&same).unwrap().len(), 2);
        // ... one id for two different ops is a mistake.
        let clash = "[{\"opId\": \"a\", \"kind\": \"diff.set\", \"payload\": []}, {\"opId\": \"a\", \"kind\": \"diff.set\", \"payload\": [1]}]";
        let err = parse_ops_array(clash).unwrap_err().to_string();
        assert!(err.contains("op #2") && err.contains("op #1"), "{err}");
    }

    #[test]
    fn empty_and_odd_files_are_refused() {
        assert!(read_push_input("  \n", InputFormat::Auto).is_err());
        assert!(read_push_input("42", InputFormat::Auto).is_err());
    }
}
