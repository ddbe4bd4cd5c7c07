//! Reads the journal capsync's opencode plugin (`opencode/capsync-journal.js`) writes: whole lines from a byte offset, leaving a partial last line for later.
//!
//! The plugin appends one JSON line `{"at", "event"}` per event and fsyncs it.
//! A process killed mid-write leaves at most a last line without its newline:
//! it is not read until it is complete, so a reader that resumes from
//! [`JournalRead::next`] sees every entry exactly once.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde_json::Value;

/// One journaled event and where its line ends (the offset to resume after it).
#[derive(Clone, Debug, PartialEq)]
pub struct JournalEntry {
    pub end: u64,
    pub event: Value,
}

/// What one read found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JournalRead {
    pub entries: Vec<JournalEntry>,
    /// Whole lines that are not a journal entry, by the offset they start at, with why:
    /// never written by the plugin, so reported rather than shipped.
    pub unreadable: Vec<(u64, String)>,
    /// Where the next read starts: after the last whole line.
    pub next: u64,
}

/// Reads whole lines of the journal at `path` from byte `from`, at most about
/// `max_bytes` of them (always at least one whole line, if there is one).
pub fn read_journal(path: &Path, from: u64, max_bytes: usize) -> std::io::Result<JournalRead> {
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    if len < from {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the journal is {len} bytes, shorter than the offset {from} read up to"),
        ));
    }
    file.seek(SeekFrom::Start(from))?;
    let mut bytes = Vec::new();
    file.take(len - from).read_to_end(&mut bytes)?;

    let mut read = JournalRead {
        next: from,
        ..JournalRead::default()
    };
    let mut start = 0;
    while let Some(newline) = bytes[start..].iter().position(|&b| b == b'\n') {
        let line = &bytes[start..start + newline];
        let line_start = from + start as u64;
        let end = line_start + newline as u64 + 1;
        match entry(line) {
            Ok(Some(event)) => read.entries.push(JournalEntry { end, event }),
            Ok(None) => {}
            Err(why) => read.unreadable.push((line_start, why)),
        }
        read.next = end;
        start += newline + 1;
        if start >= max_bytes {
            break;
        }
    }
    Ok(read)
}

/// The event of one line; `None` for a blank line.
fn entry(line: &[u8]) -> Result<Option<Value>, String> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let value: Value = serde_json::from_slice(line).map_err(|e| format!("not a JSON line: {e}"))?;
    match value.get("event") {
        Some(event) if event.is_object() => Ok(Some(event.clone())),
        _ => Err("a line without an \"event\" object".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::io::Write;

    fn line(id: &str) -> String {
        json!({"at": 1, "event": {"id": id, "type": "session.updated", "properties": {}}})
            .to_string()
            + "\n"
    }

    fn ids(read: &JournalRead) -> Vec<&str> {
        read.entries
            .iter()
            .map(|e| e.event["id"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn a_partial_last_line_waits_until_it_is_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        let (a, b) = (line("evt_a"), line("evt_b"));
        let mut file = std::fs::File::create(&path).unwrap();
        write!(file, "{a}{}", &b[..10]).unwrap();
        let first = read_journal(&path, 0, 1 << 20).unwrap();
        assert_eq!(ids(&first), ["evt_a"]);
        assert_eq!(first.next, a.len() as u64);
        assert_eq!(first.entries[0].end, first.next);

        write!(file, "{}\n{}", &b[10..b.len() - 1], line("evt_c")).unwrap();
        let second = read_journal(&path, first.next, 1 << 20).unwrap();
        assert_eq!(ids(&second), ["evt_b", "evt_c"]);
        let at_end = read_journal(&path, second.next, 1 << 20).unwrap();
        assert!(at_end.entries.is_empty());
        assert_eq!(at_end.next, second.next);
    }

    #[test]
    fn foreign_lines_are_reported_and_passed_over_and_reads_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        let text = format!(
            "{}not json\n\n{{\"at\":1}}\n{}",
            line("evt_a"),
            line("evt_b")
        );
        std::fs::write(&path, &text).unwrap();
        let read = read_journal(&path, 0, 1 << 20).unwrap();
        assert_eq!(ids(&read), ["evt_a", "evt_b"]);
        let at: Vec<u64> = read.unreadable.iter().map(|(at, _)| *at).collect();
        let first = line("evt_a").len() as u64;
        assert_eq!(at, [first, first + 9 + 1]);
        assert_eq!(read.next, text.len() as u64);

        // One line at a time when the budget is small, each read resuming the last.
        let one = read_journal(&path, 0, 1).unwrap();
        assert_eq!((ids(&one), one.next), (vec!["evt_a"], first));
        // A journal shorter than the offset (replaced or cut) is an error, not a silent restart.
        assert!(read_journal(&path, text.len() as u64 + 1, 1 << 20).is_err());
    }
}
