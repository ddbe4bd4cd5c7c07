//! A session document as text for people: the title, then each message and its parts.
//! `capsync follow` prints live changes with the same pieces.

use std::fmt::Write as _;

use serde_json::Value;

use capsync_client::document::{MessageDocument, SessionDocument};
use capsync_client::expiry::format_time;

/// Part types that are bookkeeping, not content; left out of the readable view.
pub(super) const QUIET_PARTS: [&str; 4] = ["step-start", "step-finish", "snapshot", "patch"];

/// The whole document.
pub fn document_text(doc: &SessionDocument, share_id: &str) -> String {
    let mut text = String::new();
    let title = doc.title();
    let session_id = doc
        .session
        .as_ref()
        .and_then(|s| s.get("id"))
        .and_then(Value::as_str)
        .unwrap_or("?");
    let _ = writeln!(
        text,
        "{}",
        if title.is_empty() {
            "(untitled session)"
        } else {
            title
        }
    );
    let _ = writeln!(
        text,
        "session {session_id} · share {share_id} · cursor {}",
        doc.cursor
    );
    if !doc.models.is_empty() {
        let names: Vec<&str> = doc
            .models
            .iter()
            .map(|m| m.get("id").and_then(Value::as_str).unwrap_or("?"))
            .collect();
        let _ = writeln!(text, "models: {}", names.join(", "));
    }
    if let Some(Value::Array(diffs)) = &doc.diffs {
        let files: Vec<String> = diffs.iter().map(diff_text).collect();
        let _ = writeln!(
            text,
            "diffs: {} file{}{}",
            diffs.len(),
            if diffs.len() == 1 { "" } else { "s" },
            if files.is_empty() {
                String::new()
            } else {
                format!(" ({})", files.join(", "))
            }
        );
    }
    for message in &doc.messages {
        text.push('\n');
        message_text(&mut text, message);
    }
    if !doc.orphan_parts.is_empty() {
        let _ = writeln!(
            text,
            "\n({} parts of messages not in this snapshot)",
            doc.orphan_parts.len()
        );
    }
    if doc.messages.is_empty() {
        text.push_str("\n(no messages)\n");
    }
    text
}

pub(super) fn str_at<'a>(value: &'a Value, pointer: &str) -> Option<&'a str> {
    value.pointer(pointer).and_then(Value::as_str)
}

pub(super) fn diff_text(diff: &Value) -> String {
    let file = str_at(diff, "/file").unwrap_or("?");
    match (
        diff.get("additions").and_then(Value::as_i64),
        diff.get("deletions").and_then(Value::as_i64),
    ) {
        (Some(added), Some(deleted)) => format!("{file} +{added} -{deleted}"),
        _ => file.to_owned(),
    }
}

/// A message header (role, id, model, time) and its parts, indented.
fn message_text(text: &mut String, message: &MessageDocument) {
    message_header(text, &message.info);
    message_error(text, &message.info);
    for part in &message.parts {
        part_text(text, part);
    }
}

/// `── role · id · model · time`, one line.
pub(super) fn message_header(text: &mut String, info: &Value) {
    let role = str_at(info, "/role").unwrap_or("message");
    let id = str_at(info, "/id").unwrap_or("");
    let _ = write!(text, "── {role} · {id}");
    if let Some(model) = str_at(info, "/modelID") {
        let _ = write!(text, " · {model}");
    }
    if let Some(created) = info.pointer("/time/created").and_then(Value::as_i64) {
        let _ = write!(text, " · {}", format_time(created));
    }
    text.push('\n');
}

/// `  [error] name: detail` for a message that failed; nothing otherwise.
pub(super) fn message_error(text: &mut String, info: &Value) {
    if let Some(error) = info.get("error").filter(|e| !e.is_null()) {
        let name = str_at(error, "/name").unwrap_or("error");
        match str_at(error, "/data/message") {
            Some(detail) => {
                let _ = writeln!(text, "  [error] {name}: {detail}");
            }
            None => {
                let _ = writeln!(text, "  [error] {name}");
            }
        }
    }
}

/// One part as its lines under a message (nothing for bookkeeping parts).
pub(super) fn part_text(text: &mut String, part: &Value) {
    let kind = str_at(part, "/type").unwrap_or("part");
    match kind {
        "text" => indented(text, "", str_at(part, "/text").unwrap_or("")),
        "reasoning" => indented(text, "[reasoning] ", str_at(part, "/text").unwrap_or("")),
        "tool" => {
            let tool = str_at(part, "/tool").unwrap_or("?");
            let status = str_at(part, "/state/status").unwrap_or("?");
            let _ = write!(text, "  [tool {tool}: {status}]");
            let detail = match status {
                "error" => str_at(part, "/state/error"),
                _ => str_at(part, "/state/title"),
            };
            if let Some(detail) = detail.filter(|d| !d.is_empty()) {
                let _ = write!(text, " {}", first_line(detail));
            }
            text.push('\n');
        }
        "file" => {
            let name = str_at(part, "/filename")
                .or_else(|| str_at(part, "/url"))
                .unwrap_or("?");
            let _ = writeln!(text, "  [file {name}]");
        }
        quiet if QUIET_PARTS.contains(&quiet) => {}
        other => {
            let _ = writeln!(text, "  [{other}]");
        }
    }
}

/// Text under a message, every line indented, the first one prefixed.
fn indented(text: &mut String, prefix: &str, body: &str) {
    let body = body.trim_end();
    if body.is_empty() && prefix.is_empty() {
        return;
    }
    for (i, line) in body.lines().enumerate() {
        let prefix = if i == 0 { prefix } else { "" };
        // Blank lines stay blank: no trailing indentation.
        let _ = writeln!(text, "{}", format!("  {prefix}{line}").trim_end());
    }
    if body.is_empty() {
        let _ = writeln!(text, "  {}", prefix.trim_end());
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_messages_with_their_parts() {
        let doc = SessionDocument {
            cursor: capsync_shared::Cursor(5),
            session: Some(json!({"id": "ses_1", "title": "Fix the build"})),
            models: vec![json!({"id": "model-a"})],
            diffs: Some(json!([{"file": "a.rs", "additions": 2, "deletions": 1}])),
            messages: vec![
                MessageDocument {
                    info: json!({"id": "msg_1", "role": "user"}),
                    parts: vec![json!({"id": "p1", "type": "text", "text": "please\n\nfix it"})],
                },
                MessageDocument {
                    info: json!({"id": "msg_2", "role": "assistant", "modelID": "model-a"}),
                    parts: vec![
                        json!({"id": "p2", "type": "step-start"}),
                        json!({"id": "p3", "type": "reasoning", "text": "look at the log"}),
                        json!({"id": "p4", "type": "tool", "tool": "bash", "state": {"status": "completed", "title": "cargo build"}}),
                        json!({"id": "p5", "type": "tool", "tool": "edit", "state": {"status": "error", "error": "no such file"}}),
                        json!({"id": "p6", "type": "file", "filename": "log.txt"}),
                        json!({"id": "p7", "type": "agent"}),
                    ],
                },
            ],
            orphan_parts: vec![],
        };
        let text = document_text(&doc, "sh_1");
        let expected = "\
Fix the build
session ses_1 · share sh_1 · cursor 5
models: model-a
diffs: 1 file (a.rs +2 -1)

── user · msg_1
  please

  fix it

── assistant · msg_2 · model-a
  [reasoning] look at the log
  [tool bash: completed] cargo build
  [tool edit: error] no such file
  [file log.txt]
  [agent]
";
        assert_eq!(text, expected);
    }

    #[test]
    fn an_empty_share_says_so() {
        let text = document_text(&SessionDocument::default(), "sh_1");
        assert!(text.starts_with("(untitled session)\nsession ? · share sh_1 · cursor 0\n"));
        assert!(text.ends_with("(no messages)\n"));
    }
}
