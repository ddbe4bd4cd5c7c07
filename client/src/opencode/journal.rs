//! The journal capsync's opencode plugin (`opencode/capsync-journal.js`) writes: a
//! directory of segments, each read as whole lines from a byte offset.
//!
//! Each plugin instance appends to a segment of its own, named
//! `<start ms>-<pid>-<random>.jsonl`, one JSON line `{"at", "event"}` per event,
//! each fsynced. A segment is complete when it ends with the `{"sealed": true}`
//! line (the plugin moved on to a new one) or when its process has ended
//! ([`Segment::writer_running`]). A process killed mid-write leaves at most a last
//! line without its newline: it is never read, so a reader that resumes from
//! [`JournalRead::next`] sees every entry exactly once.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde_json::Value;

/// One segment file of a journal directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub path: PathBuf,
    /// The file name, which orders segments by when they began.
    pub name: String,
    /// The process that writes it.
    pub pid: u32,
}

impl Segment {
    /// Whether the process that writes this segment is still running. A process id
    /// reused by another process reads as running: the segment is then kept longer,
    /// never given up early.
    pub fn writer_running(&self) -> bool {
        let Some(pid) = i32::try_from(self.pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        else {
            return false;
        };
        match rustix::process::test_kill_process(pid) {
            Ok(()) => true,
            // Alive, but another user's: running as far as this reader knows.
            Err(e) => e != rustix::io::Errno::SRCH,
        }
    }
}

/// The segments in `dir`, oldest first. Files that are not segments are left alone.
/// A directory that does not exist yet has none.
pub fn segments(dir: &Path) -> std::io::Result<Vec<Segment>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if let Some(pid) = segment_pid(&name) {
            found.push(Segment {
                path: entry.path(),
                name,
                pid,
            });
        }
    }
    // Start times have the same number of digits for the next few centuries.
    found.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(found)
}

/// The pid in a segment name `<ms>-<pid>-<random>.jsonl`.
fn segment_pid(name: &str) -> Option<u32> {
    let stem = name.strip_suffix(".jsonl")?;
    let mut fields = stem.split('-');
    let (ms, pid, random) = (fields.next()?, fields.next()?, fields.next()?);
    if fields.next().is_some()
        || ms.is_empty()
        || !ms.bytes().all(|b| b.is_ascii_digit())
        || random.is_empty()
    {
        return None;
    }
    pid.parse().ok()
}

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
    /// The segment's `{"sealed": true}` line was read: nothing follows it.
    pub sealed: bool,
}

/// Reads whole lines of the segment at `path` from byte `from`, about `max_bytes` of
/// them at most (always at least one whole line, if there is one).
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
    let mut budget = max_bytes.max(1) as u64;
    let mut read = JournalRead {
        next: from,
        ..JournalRead::default()
    };
    let mut start = 0;
    loop {
        // Read on until the budget holds a whole line (or the file ends).
        let before = bytes.len();
        (&mut file)
            .take(budget.min(len - from - before as u64))
            .read_to_end(&mut bytes)?;
        while let Some(newline) = bytes[start..].iter().position(|&b| b == b'\n') {
            let line = &bytes[start..start + newline];
            let line_start = from + start as u64;
            let end = line_start + newline as u64 + 1;
            match entry(line) {
                Ok(Line::Event(event)) => read.entries.push(JournalEntry { end, event }),
                Ok(Line::Blank) => {}
                Ok(Line::Sealed) => read.sealed = true,
                Err(why) => read.unreadable.push((line_start, why)),
            }
            read.next = end;
            start += newline + 1;
            if read.sealed {
                return Ok(read);
            }
        }
        let at_end = from + bytes.len() as u64 >= len;
        if at_end || start > 0 {
            return Ok(read);
        }
        budget = budget.saturating_mul(2);
    }
}

/// What one line of a segment is.
enum Line {
    Event(Value),
    Blank,
    Sealed,
}

fn entry(line: &[u8]) -> Result<Line, String> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(Line::Blank);
    }
    let value: Value = serde_json::from_slice(line).map_err(|e| format!("not a JSON line: {e}"))?;
    if value.get("sealed") == Some(&Value::Bool(true)) {
        return Ok(Line::Sealed);
    }
    match value.get("event") {
        Some(event) if event.is_object() => Ok(Line::Event(event.clone())),
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

        // A small budget reads a few whole lines at a time, each read resuming the last.
        let one = read_journal(&path, 0, 1).unwrap();
        assert_eq!(ids(&one), ["evt_a"]);
        assert!(one.next < text.len() as u64);
        let (mut next, mut all) = (0, Vec::new());
        while next < text.len() as u64 {
            let read = read_journal(&path, next, 1).unwrap();
            assert!(read.next > next, "progress from {next}");
            all.extend(ids(&read).into_iter().map(str::to_owned));
            next = read.next;
        }
        assert_eq!(all, ["evt_a", "evt_b"]);
        // A journal shorter than the offset (replaced or cut) is an error, not a silent restart.
        assert!(read_journal(&path, text.len() as u64 + 1, 1 << 20).is_err());
    }

    #[test]
    fn a_sealed_line_ends_the_segment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("1-2-ab.jsonl");
        let text = format!("{}{{\"sealed\":true}}\n", line("evt_a"));
        std::fs::write(&path, &text).unwrap();
        let read = read_journal(&path, 0, 1 << 20).unwrap();
        assert_eq!(ids(&read), ["evt_a"]);
        assert!(read.sealed);
        assert_eq!(read.next, text.len() as u64);
        let tail = read_journal(&path, line("evt_a").len() as u64, 1).unwrap();
        assert!(tail.sealed && tail.entries.is_empty());
        assert_eq!(tail.next, text.len() as u64);
    }

    #[test]
    fn segments_are_listed_oldest_first_with_their_writers() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "1700000000200-42-aa.jsonl",
            "1700000000100-7-bb.jsonl",
            "notes.txt",
            "x-7-bb.jsonl",
            "1700000000300-7.jsonl",
        ] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let found = segments(dir.path()).unwrap();
        let names: Vec<(&str, u32)> = found.iter().map(|s| (s.name.as_str(), s.pid)).collect();
        assert_eq!(
            names,
            [
                ("1700000000100-7-bb.jsonl", 7),
                ("1700000000200-42-aa.jsonl", 42)
            ]
        );
        assert!(segments(&dir.path().join("missing")).unwrap().is_empty());
    }

    #[test]
    fn a_segment_of_this_process_has_a_running_writer_and_of_an_ended_one_not() {
        let ours = Segment {
            path: PathBuf::new(),
            name: String::new(),
            pid: std::process::id(),
        };
        assert!(ours.writer_running());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let ended = Segment { pid, ..ours };
        assert!(!ended.writer_running());
    }
}
