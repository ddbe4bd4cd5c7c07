//! `capsync follow`'s readable output: ops turned into text as they arrive, each
//! change printed once, and the jump to a newer snapshot when ops were compacted.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use capsync_shared::model::{self, Effect};
use capsync_shared::ops::model_record_id_of;
use serde_json::Value;

use super::render::{self, QUIET_PARTS, str_at};
use capsync_client::document::{SessionDocument, record_id};
use capsync_client::viewer::LoggedOp;

/// Turns ops into text for people as they arrive, printing each change once: a new
/// message's header, a tool call when its status changes, text as it grows (deltas and
/// growing upserts continue the same line).
#[derive(Debug, Default)]
pub(super) struct LiveText {
    /// The session as of the last op, to know what a part is and which message it is in.
    doc: SessionDocument,
    /// The text part whose line is open (printed up to here, no newline yet).
    open: Option<String>,
    /// The message whose header was printed last: a part of another one gets its header.
    current_message: Option<String>,
    /// Text printed so far for each text or reasoning part.
    printed: HashMap<String, String>,
    /// What was printed for other parts: a tool call's status, or the type.
    shown: HashMap<String, String>,
    /// Messages with a header printed, and those whose error was printed.
    messages: HashSet<String>,
    errors: HashSet<String>,
    models: HashSet<String>,
    title: String,
}

impl LiveText {
    /// After printing this snapshot: everything in it counts as printed.
    pub(super) fn from_snapshot(doc: SessionDocument) -> Self {
        let mut live = Self {
            title: doc.title().to_owned(),
            ..Self::default()
        };
        live.models = doc.models.iter().filter_map(model_record_id_of).collect();
        for message in &doc.messages {
            let id = message.id().to_owned();
            if message.info.get("error").is_some_and(|e| !e.is_null()) {
                live.errors.insert(id.clone());
            }
            live.messages.insert(id.clone());
            live.current_message = Some(id);
            for part in &message.parts {
                live.remember_part(part);
            }
        }
        live.doc = doc;
        live
    }

    fn remember_part(&mut self, part: &Value) {
        let id = record_id(part).to_owned();
        match str_at(part, "/type").unwrap_or("") {
            "text" | "reasoning" => {
                let text = str_at(part, "/text").unwrap_or("").to_owned();
                self.printed.insert(id, text);
            }
            "tool" => {
                let status = str_at(part, "/state/status").unwrap_or("").to_owned();
                self.shown.insert(id, status);
            }
            other => {
                self.shown.insert(id, other.to_owned());
            }
        }
    }

    /// The text for one op (possibly empty, possibly ending mid-line).
    pub(super) fn op(&mut self, op: &LoggedOp) -> String {
        let mut out = String::new();
        self.doc.apply(op);
        // The ids an op names, as the server read them; the record is its payload.
        let Ok(record) = serde_json::from_str::<Value>(&op.payload) else {
            return out;
        };
        let Ok(effect) = model::op::parse_value(op.kind, &op.payload, &record, None) else {
            return out;
        };
        match effect {
            Effect::Session { .. } => {
                self.session(str_at(&record, "/title").unwrap_or(""), &mut out);
            }
            Effect::ModelUpsert { id, .. } => self.model(&id, &mut out),
            Effect::DiffSet { .. } => self.diffs(&mut out),
            Effect::MessageUpsert { .. } => self.message(&record, &mut out),
            Effect::MessageRemove { id } => self.removed("message", &id, &mut out),
            Effect::PartUpsert { .. } => self.part(&record, &mut out),
            Effect::PartRemove { id } => self.removed("part", &id, &mut out),
            Effect::PartDelta { id, field, delta } if field == "text" => {
                let part = self.doc.part(&id).cloned();
                let message = part.as_ref().map_or("", |p| part_message(p)).to_owned();
                let prefix = prefix(part.as_ref());
                self.stream(&id, &message, prefix, &delta, &mut out);
            }
            Effect::PartDelta { .. } => {}
        }
        out
    }

    /// The text for jumping to `doc`, a newer snapshot of the share taken because the
    /// ops in between were compacted: each change since the last op printed, once,
    /// the way those ops would have printed it (removals, a new title, models and
    /// diffs, new messages, text that grew, tool calls whose status changed).
    pub(super) fn rebase(&mut self, doc: SessionDocument) -> String {
        let mut out = String::new();
        let old = std::mem::replace(&mut self.doc, doc);
        let (messages, parts) = removed_since(&old, &self.doc);
        for id in &messages {
            self.removed("message", id, &mut out);
        }
        for id in &parts {
            self.removed("part", id, &mut out);
        }
        let title = self.doc.title().to_owned();
        self.session(&title, &mut out);
        let models: Vec<String> = self
            .doc
            .models
            .iter()
            .filter_map(model_record_id_of)
            .collect();
        for model in &models {
            self.model(model, &mut out);
        }
        if self.doc.diffs != old.diffs {
            self.diffs(&mut out);
        }
        // A copy, since printing updates what this remembers of the document.
        for message in self.doc.messages.clone() {
            self.message(&message.info, &mut out);
            for part in &message.parts {
                self.part(part, &mut out);
            }
        }
        out
    }

    /// A changed session title.
    fn session(&mut self, title: &str, out: &mut String) {
        if title != self.title {
            self.title = title.to_owned();
            self.close(out);
            let _ = writeln!(out, "── session · {title}");
        }
    }

    /// A model not seen before.
    fn model(&mut self, id: &str, out: &mut String) {
        if self.models.insert(id.to_owned()) {
            self.close(out);
            let _ = writeln!(out, "model: {id}");
        }
    }

    /// The diff list as it now is.
    fn diffs(&mut self, out: &mut String) {
        self.close(out);
        let diffs = match &self.doc.diffs {
            Some(Value::Array(diffs)) => diffs.as_slice(),
            _ => &[],
        };
        let files: Vec<String> = diffs.iter().map(render::diff_text).collect();
        let _ = writeln!(
            out,
            "diffs: {} file{}{}",
            files.len(),
            if files.len() == 1 { "" } else { "s" },
            if files.is_empty() {
                String::new()
            } else {
                format!(" ({})", files.join(", "))
            }
        );
    }

    /// A message's header the first time it is seen, and its error once it has one.
    fn message(&mut self, info: &Value, out: &mut String) {
        let id = str_at(info, "/id").unwrap_or("").to_owned();
        if !self.messages.contains(&id) {
            self.header(&id, out);
        }
        if info.get("error").is_some_and(|e| !e.is_null()) && self.errors.insert(id.clone()) {
            self.header(&id, out);
            render::message_error(out, info);
        }
    }

    /// `[message m1 removed]`, `[part p1 removed]`.
    fn removed(&mut self, what: &str, id: &str, out: &mut String) {
        self.close(out);
        let _ = writeln!(out, "  [{what} {id} removed]");
    }

    fn part(&mut self, part: &Value, out: &mut String) {
        let id = record_id(part).to_owned();
        let message = part_message(part).to_owned();
        match str_at(part, "/type").unwrap_or("") {
            "text" | "reasoning" => {
                let text = str_at(part, "/text").unwrap_or("");
                let printed = self.printed.get(&id).map_or("", String::as_str);
                match text.strip_prefix(printed) {
                    // Grew: print what is new, continuing the line.
                    Some(rest) => {
                        let rest = rest.to_owned();
                        self.stream(&id, &message, prefix(Some(part)), &rest, out);
                    }
                    // Rewritten: print it again, whole.
                    None => {
                        self.close(out);
                        self.printed.remove(&id);
                        self.stream(&id, &message, prefix(Some(part)), text, out);
                    }
                }
            }
            quiet if QUIET_PARTS.contains(&quiet) => {}
            kind => {
                let shown = match kind {
                    "tool" => str_at(part, "/state/status").unwrap_or(""),
                    other => other,
                };
                if self.shown.get(&id).map(String::as_str) != Some(shown) {
                    self.shown.insert(id, shown.to_owned());
                    self.header(&message, out);
                    render::part_text(out, part);
                }
            }
        }
    }

    /// Appends `chunk` of a text part: on its open line, or on a new one.
    fn stream(&mut self, id: &str, message: &str, prefix: &str, chunk: &str, out: &mut String) {
        if chunk.is_empty() {
            return;
        }
        if self.open.as_deref() != Some(id) {
            self.header(message, out);
            out.push_str("  ");
            out.push_str(prefix);
            self.open = Some(id.to_owned());
        }
        out.push_str(&chunk.replace('\n', "\n  "));
        self.printed
            .entry(id.to_owned())
            .or_default()
            .push_str(chunk);
    }

    /// Ends an open line, and prints the message's header unless it was the last one.
    fn header(&mut self, message: &str, out: &mut String) {
        self.close(out);
        if message.is_empty() || self.current_message.as_deref() == Some(message) {
            return;
        }
        out.push('\n');
        match self.doc.messages.iter().find(|m| m.id() == message) {
            Some(doc) => render::message_header(out, &doc.info),
            None => {
                let _ = writeln!(out, "── message · {message}");
            }
        }
        self.messages.insert(message.to_owned());
        self.current_message = Some(message.to_owned());
    }

    /// Ends the open line, if any.
    pub(super) fn close(&mut self, out: &mut String) {
        if self.open.take().is_some() {
            out.push('\n');
        }
    }
}

/// Messages of `old` that `new` no longer has, and parts of the remaining messages
/// that are nowhere in `new` (a part of a removed message goes with it).
fn removed_since(old: &SessionDocument, new: &SessionDocument) -> (Vec<String>, Vec<String>) {
    let in_new = |id: &str| new.messages.iter().any(|m| m.id() == id);
    let part_in_new = |id: &str| {
        new.messages
            .iter()
            .flat_map(|m| &m.parts)
            .any(|p| record_id(p) == id)
    };
    let messages = old
        .messages
        .iter()
        .filter(|m| !in_new(m.id()))
        .map(|m| m.id().to_owned())
        .collect();
    let parts = old
        .messages
        .iter()
        .filter(|m| in_new(m.id()))
        .flat_map(|m| &m.parts)
        .map(record_id)
        .filter(|id| !part_in_new(id))
        .map(str::to_owned)
        .collect();
    (messages, parts)
}

fn part_message(part: &Value) -> &str {
    str_at(part, "/messageID").unwrap_or("")
}

/// What starts a part's text line.
fn prefix(part: Option<&Value>) -> &'static str {
    match part.and_then(|p| str_at(p, "/type")) {
        Some("reasoning") => "[reasoning] ",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsync_shared::ops::OpKind;
    use serde_json::json;

    struct Log {
        live: LiveText,
        cursor: u64,
        text: String,
    }

    impl Log {
        fn new() -> Self {
            Self {
                live: LiveText::default(),
                cursor: 0,
                text: String::new(),
            }
        }

        fn op(&mut self, kind: OpKind, payload: Value) -> &mut Self {
            self.cursor += 1;
            let op = LoggedOp {
                cursor: capsync_shared::Cursor(self.cursor),
                op_id: format!("op{}", self.cursor).into(),
                kind,
                payload: payload.to_string(),
                applied_at: 0,
            };
            let text = self.live.op(&op);
            self.text.push_str(&text);
            self
        }
    }

    #[test]
    fn streamed_text_continues_its_line_and_is_printed_once() {
        let mut log = Log::new();
        log.op(
            OpKind::MessageUpsert,
            json!({"id": "m1", "role": "assistant", "modelID": "mod"}),
        )
        .op(
            OpKind::PartUpsert,
            json!({"id": "t", "messageID": "m1", "type": "text", "text": ""}),
        )
        .op(OpKind::PartDelta, json!({"partID": "t", "delta": "Hello"}))
        .op(OpKind::PartDelta, json!({"partID": "t", "delta": ", wor"}))
        // The agent's final upsert repeats the whole text: only the new end is printed.
        .op(
            OpKind::PartUpsert,
            json!({"id": "t", "messageID": "m1", "type": "text", "text": "Hello, world\nbye"}),
        )
        .op(
            OpKind::PartUpsert,
            json!({"id": "c", "messageID": "m1", "type": "tool", "tool": "bash", "state": {"status": "running"}}),
        )
        .op(
            OpKind::PartUpsert,
            json!({"id": "c", "messageID": "m1", "type": "tool", "tool": "bash", "state": {"status": "running"}}),
        )
        .op(
            OpKind::PartUpsert,
            json!({"id": "c", "messageID": "m1", "type": "tool", "tool": "bash", "state": {"status": "completed", "title": "ls"}}),
        )
        .op(
            OpKind::PartUpsert,
            json!({"id": "r", "messageID": "m1", "type": "reasoning", "text": "hmm"}),
        );
        let mut end = String::new();
        log.live.close(&mut end);
        log.text.push_str(&end);
        assert_eq!(
            log.text,
            "\n── assistant · m1 · mod\n  Hello, world\n  bye\n  [tool bash: running]\n  [tool bash: completed] ls\n  [reasoning] hmm\n"
        );
    }

    #[test]
    fn a_snapshot_counts_as_printed() {
        let doc = SessionDocument {
            cursor: capsync_shared::Cursor(3),
            messages: vec![capsync_client::document::MessageDocument {
                info: json!({"id": "m1", "role": "user"}),
                parts: vec![json!({"id": "t", "messageID": "m1", "type": "text", "text": "hi"})],
            }],
            ..SessionDocument::default()
        };
        let mut log = Log::new();
        log.live = LiveText::from_snapshot(doc);
        log.cursor = 3;
        log.op(
            OpKind::PartUpsert,
            json!({"id": "t", "messageID": "m1", "type": "text", "text": "hi there"}),
        )
        .op(
            OpKind::MessageUpsert,
            json!({"id": "m2", "role": "assistant", "error": {"name": "Aborted"}}),
        );
        assert_eq!(
            log.text,
            "   there\n\n── assistant · m2\n  [error] Aborted\n"
        );
    }

    #[test]
    fn a_newer_snapshot_prints_only_what_changed_once() {
        let message = |info: Value, parts: Vec<Value>| capsync_client::document::MessageDocument {
            info,
            parts,
        };
        let before = SessionDocument {
            cursor: capsync_shared::Cursor(3),
            session: Some(json!({"id": "ses", "title": "Old"})),
            models: vec![json!({"id": "model-a"})],
            messages: vec![
                message(
                    json!({"id": "m1", "role": "assistant"}),
                    vec![
                        json!({"id": "t", "messageID": "m1", "type": "text", "text": "hi"}),
                        json!({"id": "c", "messageID": "m1", "type": "tool", "tool": "bash", "state": {"status": "running"}}),
                        json!({"id": "x", "messageID": "m1", "type": "text", "text": "gone soon"}),
                    ],
                ),
                message(
                    json!({"id": "m2", "role": "user"}),
                    vec![json!({"id": "u", "messageID": "m2", "type": "text", "text": "bye"})],
                ),
            ],
            ..SessionDocument::default()
        };
        let after = SessionDocument {
            cursor: capsync_shared::Cursor(9),
            session: Some(json!({"id": "ses", "title": "New"})),
            models: vec![json!({"id": "model-a"}), json!({"id": "model-b"})],
            messages: vec![
                message(
                    json!({"id": "m1", "role": "assistant"}),
                    vec![
                        json!({"id": "t", "messageID": "m1", "type": "text", "text": "hi there"}),
                        json!({"id": "c", "messageID": "m1", "type": "tool", "tool": "bash", "state": {"status": "completed", "title": "ls"}}),
                    ],
                ),
                message(
                    json!({"id": "m3", "role": "assistant"}),
                    vec![
                        json!({"id": "r", "messageID": "m3", "type": "reasoning", "text": "done"}),
                    ],
                ),
            ],
            ..SessionDocument::default()
        };
        let mut live = LiveText::from_snapshot(before);
        let mut text = live.rebase(after.clone());
        live.close(&mut text);
        assert_eq!(
            text,
            "  [message m2 removed]\n  [part x removed]\n── session · New\nmodel: model-b\n\
             \n── assistant · m1\n   there\n  [tool bash: completed] ls\n\
             \n── assistant · m3\n  [reasoning] done\n"
        );
        assert_eq!(
            live.rebase(after),
            "",
            "the same state again prints nothing"
        );
        let op = LoggedOp {
            cursor: capsync_shared::Cursor(10),
            op_id: "op10".into(),
            kind: OpKind::PartDelta,
            payload: json!({"partID": "r", "delta": " now"}).to_string(),
            applied_at: 0,
        };
        assert_eq!(
            live.op(&op),
            "  [reasoning]  now",
            "ops continue from the new snapshot"
        );
    }
}
