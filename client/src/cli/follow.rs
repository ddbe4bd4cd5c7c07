//! `capsync follow`: print a share as it happens (the snapshot, then each op as it
//! commits), reconnecting and resuming after a dropped connection without printing
//! anything twice or skipping anything.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::time::Duration;

use capsync_shared::{ErrorCode, TokenKind};
use serde_json::Value;

use super::output::Output;
use super::render::{self, QUIET_PARTS, str_at};
use super::{Global, finish};
use crate::connection::{Connection, connect};
use crate::document::SessionDocument;
use crate::error::ClientError;
use crate::subscribe::{EndReason, LiveEvent};
use crate::syncer::backoff::Backoff;
use crate::viewer::{LoggedOp, ViewerClient};

/// First wait after a failure; doubles up to [`BACKOFF_MAX`] (with jitter).
const BACKOFF_INITIAL: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Print a share as it happens, until interrupted (viewer or writer token)
///
/// First the current state, as `capsync snapshot` prints it, then each change as the
/// agent makes it: new messages, tool calls as their status changes, and text as it
/// streams in. When the connection drops, the server restarts or this viewer falls
/// behind, it reconnects (backing off up to 5s) and continues right after the last op it
/// printed: nothing is printed twice or skipped. A revoked link or a deleted share ends it
/// with exit code 1.
///
/// With --json: JSON Lines. The first line is the snapshot document (as `capsync snapshot
/// --json` prints it), then one line per op: {"cursor", "opId", "kind", "payload",
/// "appliedAt"}. With --after there is no snapshot line, and the output is an ops file
/// that `capsync push` accepts (into another share, say).
///
/// Examples:
///   CAPSYNC_TOKEN=$VIEWER capsync follow
///   capsync follow --token-file viewer.token --after 120 --json > ops.jsonl
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct FollowArgs {
    /// The viewer (or writer) token, if not given by --token, --token-file or
    /// CAPSYNC_TOKEN (those are safer: arguments show up in `ps`)
    #[arg(value_name = "TOKEN")]
    pub token: Option<String>,
    /// Skip the snapshot: print the ops after this cursor, then follow
    #[arg(long, value_name = "CURSOR")]
    pub after: Option<u64>,
    /// Exit (code 0) once the op at this cursor has been printed
    #[arg(long, value_name = "CURSOR")]
    pub until: Option<u64>,
}

pub async fn run(global: &Global, out: &Output, args: &FollowArgs) -> Result<u8, ClientError> {
    const KINDS: [TokenKind; 2] = [TokenKind::Viewer, TokenKind::Writer];
    let token = match &args.token {
        Some(token) => super::check_token(token.trim().to_owned(), &KINDS)?,
        None => global.token(&KINDS)?,
    };
    let mut follow = Follow {
        out,
        text: (!out.is_json()).then(LiveText::default),
        cursor: args.after,
        until: args.until,
        backoff: Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX),
    };
    loop {
        let stop = follow.connection(&global.server, &token).await;
        follow.end_line()?;
        let why = match stop {
            Stop::Done => return Ok(super::EXIT_OK),
            Stop::Fatal(error) => {
                // Reported here so that with --json it stays one line of the stream.
                out.error_line(&error);
                return Ok(super::EXIT_ERROR);
            }
            Stop::Lagged => LAGGED.to_owned(),
            Stop::Retry(why) => why,
        };
        let delay = follow.backoff.next_delay();
        out.note(format!(
            "{why}; reconnecting in {:.1}s",
            delay.as_secs_f64()
        ));
        tokio::time::sleep(delay).await;
    }
}

/// What is said when the server drops this viewer for falling behind.
const LAGGED: &str = "this viewer fell behind the share";

/// Why one connection's work ended.
#[derive(Debug)]
enum Stop {
    /// `--until` was reached.
    Done,
    /// Nothing will get better by retrying: report it, exit 1.
    Fatal(ClientError),
    /// The server dropped this viewer for falling behind: the connection is fine, so
    /// subscribe again on it (after a pause, in case this machine is the slow part).
    Lagged,
    /// Back off, reconnect and continue from the cursor.
    Retry(String),
}

impl From<ClientError> for Stop {
    fn from(error: ClientError) -> Self {
        let retry = match &error {
            ClientError::Remote { code, .. } => matches!(
                code,
                ErrorCode::Overloaded | ErrorCode::RateLimited | ErrorCode::Internal
            ),
            ClientError::Rpc(e) => e.kind != capnp::ErrorKind::Unimplemented,
            ClientError::Connect { .. }
            | ClientError::Io(_)
            | ClientError::SnapshotUnstable { .. } => true,
            _ => false,
        };
        if retry {
            Self::Retry(error.to_string())
        } else {
            Self::Fatal(error)
        }
    }
}

/// The state that survives reconnects.
struct Follow<'a> {
    out: &'a Output,
    /// Readable output; `None` with `--json`.
    text: Option<LiveText>,
    /// The last op printed (or the snapshot's cursor); `None` before the snapshot.
    cursor: Option<u64>,
    until: Option<u64>,
    backoff: Backoff,
}

impl Follow<'_> {
    /// Connects, redeems, and follows until something stops it.
    async fn connection(&mut self, server: &str, token: &str) -> Stop {
        let conn = match connect(server).await {
            Ok(conn) => conn,
            Err(error) => return error.into(),
        };
        let stop = self.follow_on(&conn, token).await;
        finish(conn).await;
        stop
    }

    async fn follow_on(&mut self, conn: &Connection, token: &str) -> Stop {
        let viewer = match conn.redeem(token).await.and_then(|r| r.into_reader()) {
            Ok(viewer) => viewer,
            Err(error) => return error.into(),
        };
        let cursor = match self.cursor {
            Some(cursor) => cursor,
            None => match self.snapshot(&viewer).await {
                Ok(cursor) => cursor,
                Err(stop) => return stop,
            },
        };
        if self.until.is_some_and(|until| cursor >= until) {
            return Stop::Done;
        }
        self.backoff.reset();
        loop {
            match self.subscription(&viewer).await {
                Stop::Lagged => {
                    let delay = self.backoff.next_delay();
                    self.end_line_quietly();
                    self.out.note(format!(
                        "{LAGGED}; resubscribing in {:.1}s",
                        delay.as_secs_f64()
                    ));
                    tokio::time::sleep(delay).await;
                }
                stop => return stop,
            }
        }
    }

    /// Reads and prints the snapshot; returns its cursor.
    async fn snapshot(&mut self, viewer: &ViewerClient) -> Result<u64, Stop> {
        let snapshot = viewer.snapshot().await?;
        let document = snapshot.to_document();
        let text = match &mut self.text {
            Some(live) => {
                let text = render::document_text(&document, viewer.share_id());
                *live = LiveText::from_snapshot(document);
                text
            }
            None => json_line(&document),
        };
        self.print(&text)?;
        self.cursor = Some(snapshot.cursor);
        Ok(snapshot.cursor)
    }

    /// One subscription from the cursor, until it ends.
    async fn subscription(&mut self, viewer: &ViewerClient) -> Stop {
        let from = self.cursor.unwrap_or(0);
        let mut live = match viewer.subscribe(from).await {
            Ok(live) => live,
            Err(error) => return error.into(),
        };
        while let Some(event) = live.next().await {
            match event {
                LiveEvent::Ops(ops) => {
                    self.backoff.reset();
                    for op in &ops {
                        match self.op(op) {
                            Ok(true) => return Stop::Done,
                            Ok(false) => {}
                            Err(stop) => return stop,
                        }
                    }
                }
                LiveEvent::Ended(ended) => {
                    return match ended.reason {
                        EndReason::Lagged => Stop::Lagged,
                        EndReason::Revoked => Stop::Fatal(ClientError::Remote {
                            code: ErrorCode::Revoked,
                            message: ended.message,
                            cursor: 0,
                        }),
                        EndReason::NotFound => Stop::Fatal(ClientError::Remote {
                            code: ErrorCode::NotFound,
                            message: ended.message,
                            cursor: 0,
                        }),
                        EndReason::Shutdown => Stop::Retry("the server is shutting down".into()),
                        EndReason::Disconnected => {
                            Stop::Retry("disconnected from the server".into())
                        }
                    };
                }
            }
        }
        Stop::Retry("the subscription ended".into())
    }

    /// Prints one op unless it was printed before; `Ok(true)` once `--until` is reached.
    fn op(&mut self, op: &LoggedOp) -> Result<bool, Stop> {
        let cursor = self.cursor.unwrap_or(0);
        if op.cursor <= cursor {
            return Ok(false);
        }
        if op.cursor != cursor + 1 {
            // Cursors have no gaps, so the server skipped something: ask again from here.
            return Err(Stop::Retry(format!(
                "expected the op at cursor {} but got {}",
                cursor + 1,
                op.cursor
            )));
        }
        let text = match &mut self.text {
            Some(live) => live.op(op),
            None => json_line(&op_json(op)),
        };
        self.print(&text)?;
        self.cursor = Some(op.cursor);
        Ok(self.until.is_some_and(|until| op.cursor >= until))
    }

    fn print(&self, text: &str) -> Result<(), Stop> {
        self.out
            .text(text)
            .map_err(|e| Stop::Fatal(ClientError::Io(e)))
    }

    /// [`Follow::end_line`] where a failure to print is noticed by the next print anyway.
    fn end_line_quietly(&mut self) {
        let _ = self.end_line();
    }

    /// Ends a line left open by streamed text, before anything else is said.
    fn end_line(&mut self) -> Result<(), ClientError> {
        if let Some(live) = &mut self.text {
            let mut text = String::new();
            live.close(&mut text);
            self.out.text(&text)?;
        }
        Ok(())
    }
}

fn json_line<T: serde::Serialize>(value: &T) -> String {
    let mut line = serde_json::to_string(value).unwrap_or_else(|e| {
        serde_json::json!({"error": {"code": "internal", "message": e.to_string()}}).to_string()
    });
    line.push('\n');
    line
}

/// An op as a JSON line: the ops-file form (payload as JSON) plus its cursor and time.
fn op_json(op: &LoggedOp) -> Value {
    let payload =
        serde_json::from_str(&op.payload).unwrap_or_else(|_| Value::String(op.payload.clone()));
    serde_json::json!({
        "cursor": op.cursor,
        "opId": op.op_id,
        "kind": op.kind,
        "payload": payload,
        "appliedAt": op.applied_at,
    })
}

/// Turns ops into text for people as they arrive, printing each change once: a new
/// message's header, a tool call when its status changes, text as it grows (deltas and
/// growing upserts continue the same line).
#[derive(Debug, Default)]
struct LiveText {
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
    fn from_snapshot(doc: SessionDocument) -> Self {
        let mut live = Self {
            title: doc.title().to_owned(),
            ..Self::default()
        };
        live.models = doc
            .models
            .iter()
            .map(|m| crate::document::record_id(m).to_owned())
            .collect();
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
        let id = crate::document::record_id(part).to_owned();
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
    fn op(&mut self, op: &LoggedOp) -> String {
        let mut out = String::new();
        let payload: Value = serde_json::from_str(&op.payload).unwrap_or(Value::Null);
        self.doc.apply(op);
        use capsync_shared::ops::OpKind;
        match op.kind {
            OpKind::SessionUpsert => {
                let title = str_at(&payload, "/title").unwrap_or("");
                if title != self.title {
                    self.title = title.to_owned();
                    self.close(&mut out);
                    let _ = writeln!(out, "── session · {title}");
                }
            }
            OpKind::ModelUpsert => {
                let id = str_at(&payload, "/id").unwrap_or("?");
                if self.models.insert(id.to_owned()) {
                    self.close(&mut out);
                    let _ = writeln!(out, "model: {id}");
                }
            }
            OpKind::DiffSet => {
                self.close(&mut out);
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
            OpKind::MessageUpsert => {
                let id = str_at(&payload, "/id").unwrap_or("").to_owned();
                if !self.messages.contains(&id) {
                    self.header(&id, &mut out);
                }
                if payload.get("error").is_some_and(|e| !e.is_null())
                    && self.errors.insert(id.clone())
                {
                    self.header(&id, &mut out);
                    render::message_error(&mut out, &payload);
                }
            }
            OpKind::MessageRemove => {
                let id = str_at(&payload, "/id")
                    .or_else(|| str_at(&payload, "/messageID"))
                    .unwrap_or("?");
                self.close(&mut out);
                let _ = writeln!(out, "  [message {id} removed]");
            }
            OpKind::PartUpsert => self.part(&payload, &mut out),
            OpKind::PartRemove => {
                let id = str_at(&payload, "/partID")
                    .or_else(|| str_at(&payload, "/id"))
                    .unwrap_or("?");
                self.close(&mut out);
                let _ = writeln!(out, "  [part {id} removed]");
            }
            OpKind::PartDelta => {
                let field = str_at(&payload, "/field").unwrap_or("text");
                let id = str_at(&payload, "/partID").or_else(|| str_at(&payload, "/id"));
                if let (Some(id), Some(delta), "text") = (id, str_at(&payload, "/delta"), field) {
                    let part = self.find_part(id);
                    let message = part.as_ref().map_or("", |p| part_message(p)).to_owned();
                    let prefix = prefix(part.as_ref());
                    self.stream(id, &message, prefix, delta, &mut out);
                }
            }
        }
        out
    }

    fn part(&mut self, part: &Value, out: &mut String) {
        let id = crate::document::record_id(part).to_owned();
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
    fn close(&mut self, out: &mut String) {
        if self.open.take().is_some() {
            out.push('\n');
        }
    }

    fn find_part(&self, id: &str) -> Option<Value> {
        self.doc
            .messages
            .iter()
            .flat_map(|m| &m.parts)
            .find(|p| crate::document::record_id(p) == id)
            .cloned()
    }
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
                cursor: self.cursor,
                op_id: format!("op{}", self.cursor),
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
    fn json_op_lines_are_an_ops_file() {
        let op = LoggedOp {
            cursor: 7,
            op_id: "o7".into(),
            kind: OpKind::PartDelta,
            payload: json!({"partID": "p", "delta": "x"}).to_string(),
            applied_at: 5,
        };
        let line = json_line(&op_json(&op));
        assert_eq!(
            serde_json::from_str::<Value>(&line).unwrap(),
            json!({"cursor": 7, "opId": "o7", "kind": "part.delta", "payload": {"partID": "p", "delta": "x"}, "appliedAt": 5})
        );
        let ops = crate::parse_ops(&format!("{line}{line}")).unwrap();
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[0].op_id, "o7");
        assert_eq!(ops[0].kind, OpKind::PartDelta);
    }

    #[test]
    fn a_snapshot_counts_as_printed() {
        let doc = SessionDocument {
            cursor: 3,
            messages: vec![crate::document::MessageDocument {
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
}
