//! What `capsync sync` follows: a JSON Lines ops file that grows, or a whole document (an
//! ops array, a session export) that is rewritten, read again whenever it changes.
//!
//! A change is noticed from the file's length and modification time. A JSON Lines file is
//! read from where the last read stopped: the end of the last complete line. A last line
//! without its `\n` is still being written and waits for the next read (unless the read is
//! *final*, as for `--once`). A file that shrank or whose bytes before that point changed
//! was rewritten and is read again from the start; ops already queued are then recognised
//! by their ids, so reading a line twice is harmless. A whole document is parsed each time
//! its content hash changes; an export's op ids are content-addressed, so unchanged
//! records give the ids already queued.
//!
//! Reading is split in two so nothing is lost: [`Source::read`] returns the new ops and a
//! [`Mark`], and only [`Source::advance`], called once those ops are queued, moves past them.

use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::PathBuf;
use std::time::SystemTime;

use capsync_shared::limits::{MAX_DEPENDS_ON, MAX_OP_ID_BYTES};
use capsync_shared::ops::OpSpec;
use serde_json::Value;

use capsync_client::error::ClientError;
use capsync_client::export::{serde_message, sha256_hex};
use capsync_client::ops_file::{DetectedFormat, InputFormat, read_push_input};

/// How the source is read, decided from its first content and kept from then on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// JSON Lines, read incrementally.
    Lines,
    /// One document (ops array, single op, export), read whole with this format.
    Document(InputFormat),
}

/// Where a read got to; [`Source::advance`] makes it the starting point of the next read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    kind: Option<Kind>,
    /// Length and modification time seen: the same again means nothing changed.
    seen: Option<(u64, Option<SystemTime>)>,
    /// JSON Lines: bytes up to the end of the last complete line read.
    offset: u64,
    /// JSON Lines: lines in those bytes, to number the next ones in messages.
    lines: usize,
    /// Documents: hash of the text last turned into ops.
    hash: Option<String>,
    /// What the source turned out to be, for messages.
    format: Option<DetectedFormat>,
}

/// What one read found.
#[derive(Debug)]
pub struct Update {
    /// Ops to queue (for JSON Lines, only the lines added since the last advance).
    pub ops: Vec<OpSpec>,
    /// Why the read stopped short: the file is missing, a line or the document does not
    /// parse. The ops before the problem are still in `ops`.
    pub problem: Option<ClientError>,
    /// Pass to [`Source::advance`] once `ops` are queued.
    pub mark: Mark,
}

/// A followed source file.
#[derive(Debug, Clone)]
pub struct Source {
    path: PathBuf,
    /// What the user said the file is (`--format`).
    requested: InputFormat,
    /// Where the last accepted read stopped.
    mark: Mark,
}

impl Source {
    pub fn new(path: impl Into<PathBuf>, requested: InputFormat) -> Self {
        Self {
            path: path.into(),
            requested,
            mark: Mark {
                kind: None,
                seen: None,
                offset: 0,
                lines: 0,
                hash: None,
                format: None,
            },
        }
    }

    /// What the file turned out to be, once known.
    pub fn format(&self) -> Option<DetectedFormat> {
        self.mark.format
    }

    /// Makes a read's position the starting point of the next one.
    pub fn advance(&mut self, mark: Mark) {
        self.mark = mark;
    }

    /// Reads what changed since the last [`advance`](Self::advance). `last` marks the final
    /// read of a finished file (`--once`): a last line without `\n` then counts, and a file
    /// that cannot be read is an `Err` instead of a `problem` to wait out.
    pub fn read(&self, last: bool) -> Result<Update, ClientError> {
        let update = self.read_inner(last);
        match update.problem {
            Some(problem) if last => Err(problem),
            _ => Ok(update),
        }
    }

    fn read_inner(&self, last: bool) -> Update {
        let mut mark = self.mark.clone();
        let stay = |mark: Mark, problem: ClientError| Update {
            ops: Vec::new(),
            problem: Some(problem),
            mark,
        };
        let metadata = match std::fs::metadata(&self.path) {
            Ok(metadata) => metadata,
            Err(e) => return stay(mark, self.unreadable(&e)),
        };
        let seen = (metadata.len(), metadata.modified().ok());
        if mark.seen == Some(seen) {
            return Update {
                ops: Vec::new(),
                problem: None,
                mark,
            };
        }
        let mut file = match std::fs::File::open(&self.path) {
            Ok(file) => file,
            Err(e) => return stay(mark, self.unreadable(&e)),
        };
        // A JSON Lines file that shrank, or whose last read line end moved, was rewritten.
        if mark.kind == Some(Kind::Lines)
            && mark.offset > 0
            && !ends_line_at(&mut file, mark.offset)
        {
            mark.offset = 0;
            mark.lines = 0;
        }
        let start = if mark.kind == Some(Kind::Lines) {
            mark.offset
        } else {
            0
        };
        let mut bytes = Vec::new();
        let read = file
            .seek(SeekFrom::Start(start))
            .and_then(|_| file.read_to_end(&mut bytes));
        if let Err(e) = read {
            return stay(mark, self.unreadable(&e));
        }
        let text = match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(_) => return stay(mark, self.invalid("is not UTF-8 text")),
        };
        mark.seen = Some(seen);

        let kind = match mark.kind {
            Some(kind) => kind,
            None => match detect(&text, self.requested, last) {
                Some(kind) => kind,
                None if last => {
                    return stay(mark, self.invalid("is empty"));
                }
                // Nothing (complete) yet: look again when it changes.
                None => {
                    mark.seen = None;
                    return Update {
                        ops: Vec::new(),
                        problem: None,
                        mark,
                    };
                }
            },
        };
        mark.kind = Some(kind);
        match kind {
            Kind::Lines => {
                mark.format = Some(DetectedFormat::OpsLines);
                self.read_lines(&text, mark, last)
            }
            Kind::Document(format) => self.read_document(&text, format, mark),
        }
    }

    /// New complete lines of a JSON Lines file (`text` starts at `mark.offset`).
    fn read_lines(&self, text: &str, mut mark: Mark, last: bool) -> Update {
        let mut ops = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let (line, len, complete) = match rest.find('\n') {
                Some(end) => (&rest[..end], end + 1, true),
                None => (rest, rest.len(), false),
            };
            if !complete && !last {
                // Still being written; it is read again next time from its start.
                mark.seen = None;
                break;
            }
            let number = mark.lines + 1;
            let line = if mark.offset == 0 {
                line.trim_start_matches('\u{feff}')
            } else {
                line
            };
            if !line.trim().is_empty() {
                match parse_line(line) {
                    Ok(op) => ops.push(op),
                    Err(message) => {
                        // Stop before the bad line; it is read again once the file changes.
                        let problem = self.invalid(&format!("line {number}, {message}"));
                        return Update {
                            ops,
                            problem: Some(problem),
                            mark,
                        };
                    }
                }
            }
            mark.offset += len as u64;
            if complete {
                mark.lines += 1;
            }
            rest = &rest[len..];
        }
        Update {
            ops,
            problem: None,
            mark,
        }
    }

    /// A whole document, when its content changed since the last one turned into ops.
    fn read_document(&self, text: &str, format: InputFormat, mut mark: Mark) -> Update {
        let hash = sha256_hex(text.as_bytes());
        if mark.hash.as_deref() == Some(hash.as_str()) {
            return Update {
                ops: Vec::new(),
                problem: None,
                mark,
            };
        }
        match read_push_input(text, format) {
            Ok(input) => {
                mark.hash = Some(hash);
                mark.format = Some(input.format);
                Update {
                    ops: input.ops,
                    problem: None,
                    mark,
                }
            }
            Err(e) => {
                let problem = self.invalid(&strip_invalid(&e));
                Update {
                    ops: Vec::new(),
                    problem: Some(problem),
                    mark,
                }
            }
        }
    }

    fn unreadable(&self, e: &std::io::Error) -> ClientError {
        ClientError::invalid(format!("cannot read {}: {e}", self.path.display()))
    }

    fn invalid(&self, what: &str) -> ClientError {
        ClientError::invalid(format!("{}: {what}", self.path.display()))
    }
}

/// Decides how to read a source from its first content; `None` while there is nothing to
/// decide from (empty, or the first line of what may be JSON Lines is not complete).
fn detect(text: &str, requested: InputFormat, last: bool) -> Option<Kind> {
    let trimmed = text.trim_start_matches('\u{feff}').trim_start();
    if trimmed.is_empty() {
        return None;
    }
    match requested {
        InputFormat::Export => return Some(Kind::Document(InputFormat::Export)),
        _ if trimmed.starts_with('[') => return Some(Kind::Document(InputFormat::Ops)),
        InputFormat::Ops => return Some(Kind::Lines),
        InputFormat::Auto => {}
    }
    let first_line = match trimmed.find('\n') {
        Some(end) => &trimmed[..end],
        None if last => trimmed,
        // One line so far: a one-line export needs no newline, an op line waits for its own.
        None => {
            return match serde_json::from_str::<Value>(trimmed) {
                Ok(Value::Object(map)) if !map.contains_key("opId") => {
                    Some(Kind::Document(InputFormat::Auto))
                }
                _ => None,
            };
        }
    };
    match serde_json::from_str::<Value>(first_line) {
        Ok(Value::Object(map)) if map.contains_key("opId") => Some(Kind::Lines),
        // A one-line export, or a document spread over lines (a pretty-printed export):
        // `read_push_input` decides, and names the problem if it is neither.
        _ => Some(Kind::Document(InputFormat::Auto)),
    }
}

/// One JSON Lines op, checked as `capsync push` checks them; the error says where.
fn parse_line(line: &str) -> Result<OpSpec, String> {
    let op: OpSpec = serde_json::from_str(line)
        .map_err(|e| format!("column {}: {}", e.column(), serde_message(&e)))?;
    if op.op_id.is_empty() {
        return Err("empty opId".into());
    }
    if op.op_id.len() > MAX_OP_ID_BYTES {
        return Err(format!(
            "opId is {} bytes, the limit is {MAX_OP_ID_BYTES}",
            op.op_id.len()
        ));
    }
    if op.depends_on.len() > MAX_DEPENDS_ON {
        return Err(format!(
            "{} dependsOn entries, the limit is {MAX_DEPENDS_ON}",
            op.depends_on.len()
        ));
    }
    Ok(op)
}

/// Whether the byte before `offset` is still a line end (the file was not rewritten).
fn ends_line_at(file: &mut std::fs::File, offset: u64) -> bool {
    let mut byte = [0u8; 1];
    file.seek(SeekFrom::Start(offset - 1)).is_ok()
        && file.read_exact(&mut byte).is_ok()
        && byte[0] == b'\n'
}

/// An input error's message without the "invalid input: " its display adds.
fn strip_invalid(e: &ClientError) -> String {
    match e {
        ClientError::InvalidInput(message) => message.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::path::Path;

    fn op_line(id: &str) -> String {
        format!("{{\"opId\": \"{id}\", \"kind\": \"diff.set\", \"payload\": []}}\n")
    }

    fn ids(ops: &[OpSpec]) -> Vec<&str> {
        ops.iter().map(|op| op.op_id.as_str()).collect()
    }

    fn append(path: &Path, text: &str) {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        file.write_all(text.as_bytes()).unwrap();
    }

    /// Reads and advances, like `capsync sync` does after queueing.
    fn step(source: &mut Source) -> (Vec<String>, Option<String>) {
        let update = source.read(false).unwrap();
        source.advance(update.mark);
        (
            update.ops.iter().map(|op| op.op_id.clone()).collect(),
            update.problem.map(|p| p.to_string()),
        )
    }

    #[test]
    fn a_growing_json_lines_file_is_read_line_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ops.jsonl");
        let mut source = Source::new(&path, InputFormat::Auto);
        // Missing: a problem to wait out, not an error.
        let (ops, problem) = step(&mut source);
        assert!(ops.is_empty());
        assert!(problem.unwrap().contains("cannot read"));
        assert!(source.read(true).is_err());

        append(&path, &format!("{}{}", op_line("a"), op_line("b")));
        // Half a line: not read yet.
        append(&path, "{\"opId\": \"c\", \"kind\"");
        assert_eq!(step(&mut source), (vec!["a".into(), "b".into()], None));
        assert_eq!(source.format(), Some(DetectedFormat::OpsLines));
        assert_eq!(step(&mut source), (vec![], None));
        append(&path, ": \"diff.set\", \"payload\": []}\n\n");
        assert_eq!(step(&mut source), (vec!["c".into()], None));
        // Unchanged: nothing.
        assert_eq!(step(&mut source), (vec![], None));
    }

    #[test]
    fn bad_lines_stop_the_read_until_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ops.jsonl");
        std::fs::write(&path, format!("{}{{oops}}\n{}", op_line("a"), op_line("b"))).unwrap();
        let mut source = Source::new(&path, InputFormat::Ops);
        let (ops, problem) = step(&mut source);
        assert_eq!(ops, vec!["a".to_string()]);
        assert!(problem.unwrap().contains("line 2, column"));
        // --once turns the problem into an error.
        let err = Source::new(&path, InputFormat::Ops).read(true).unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        // Fixed: read on from the bad line ("a" is not read twice).
        std::fs::write(&path, format!("{}{}", op_line("a"), op_line("b"))).unwrap();
        assert_eq!(step(&mut source), (vec!["b".into()], None));
    }

    #[test]
    fn a_rewritten_file_is_read_from_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ops.jsonl");
        std::fs::write(&path, format!("{}{}", op_line("a"), op_line("bb"))).unwrap();
        let mut source = Source::new(&path, InputFormat::Auto);
        assert_eq!(step(&mut source).0.len(), 2);
        std::fs::write(&path, op_line("x")).unwrap();
        assert_eq!(step(&mut source), (vec!["x".into()], None));
    }

    #[test]
    fn the_last_line_counts_on_a_final_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ops.jsonl");
        std::fs::write(
            &path,
            format!("{}{}", op_line("a"), op_line("b").trim_end()),
        )
        .unwrap();
        let source = Source::new(&path, InputFormat::Auto);
        assert_eq!(ids(&source.read(false).unwrap().ops), ["a"]);
        assert_eq!(ids(&source.read(true).unwrap().ops), ["a", "b"]);
    }

    #[test]
    fn an_export_is_read_again_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("session.json");
        let export = |title: &str| {
            serde_json::to_string_pretty(&serde_json::json!({
                "info": {"id": "ses_1", "title": title},
                "messages": [{"info": {"id": "m1", "role": "user"}, "parts": []}]
            }))
            .unwrap()
        };
        // Half written: waits (a problem, reported once by the caller).
        std::fs::write(&path, &export("one")[..20]).unwrap();
        let mut source = Source::new(&path, InputFormat::Auto);
        let (ops, problem) = step(&mut source);
        assert!(ops.is_empty() && problem.is_some());
        std::fs::write(&path, export("one")).unwrap();
        let (first, problem) = step(&mut source);
        assert_eq!((first.len(), problem), (2, None));
        assert_eq!(source.format(), Some(DetectedFormat::Export));
        assert_eq!(step(&mut source), (vec![], None));
        // Only the session record changed: same message op id, new session op id.
        std::fs::write(&path, export("two")).unwrap();
        let (second, _) = step(&mut source);
        assert_eq!(second.len(), 2);
        assert_ne!(first[0], second[0]);
        assert_eq!(first[1], second[1]);
    }

    #[test]
    fn detection_waits_for_a_complete_first_line() {
        assert_eq!(detect("", InputFormat::Auto, false), None);
        assert_eq!(detect("{\"opId\": \"a\"", InputFormat::Auto, false), None);
        assert_eq!(
            detect(&op_line("a"), InputFormat::Auto, false),
            Some(Kind::Lines)
        );
        assert_eq!(
            detect("[{", InputFormat::Auto, false),
            Some(Kind::Document(InputFormat::Ops))
        );
        assert_eq!(
            detect("{\"info\": {\"id\": \"s\"}}", InputFormat::Auto, false),
            Some(Kind::Document(InputFormat::Auto))
        );
        assert_eq!(
            detect("{\n  \"info\"", InputFormat::Auto, false),
            Some(Kind::Document(InputFormat::Auto))
        );
        assert_eq!(
            detect("{", InputFormat::Export, false),
            Some(Kind::Document(InputFormat::Export))
        );
    }
}
