//! Clearing output and attachments of tool parts marked compacted: on write
//! (`apply` stores such a part already cleared) and in a retroactive pass over
//! stored parts ([`step`]).
//!
//! An agent that compacts its context marks old tool parts with
//! `state.time.compacted` and sends them again. Their output is never shown
//! again, and it is most of a long session's bytes.

use std::borrow::Cow;
use std::ops::Range;

use rusqlite::{Connection, params};
use serde::Deserialize;
use serde::de::IgnoredAny;

use super::authority;
use crate::ledger::{LedgerResult, Operator, ReclaimStep};

/// Compacted tool parts in the parts after rowid `?1` up to rowid `?2`. The
/// `instr` test is a cheap filter before SQLite parses the JSON; the JSON
/// conditions are those of the `reclaimable_output_bytes` statistic.
const COMPACTED_TOOL_PARTS: &str = "
    SELECT rowid, json FROM parts
    WHERE rowid > ?1 AND rowid <= ?2
      AND instr(json, '\"compacted\"') > 0
      AND json_extract(json, '$.type') = 'tool'
      AND json_extract(json, '$.state.time.compacted') IS NOT NULL
    ORDER BY rowid";

/// One step of the retroactive pass: looks at the parts after rowid `after`,
/// at most `max_parts` of them, and clears the compacted tool parts among them
/// (or, in a dry run, only counts what it would clear).
///
/// Only the `parts` table is rewritten. The ledger ops that stored those parts
/// keep their payloads: dropping old payloads is ledger compaction's work, and
/// parts stored with `reclaim` on were cleared in their op as well.
///
/// Positions are rowids. A full `VACUUM` may renumber them, so a pass that
/// spans one may skip some parts; running the pass again finds them.
pub(super) fn step(
    conn: &Connection,
    op: &Operator,
    after: i64,
    max_parts: u32,
    dry_run: bool,
    now: i64,
) -> LedgerResult<ReclaimStep> {
    authority::check_operator(conn, op, now)?;
    let total: i64 = conn
        .prepare_cached("SELECT coalesce(max(rowid), 0) FROM parts")?
        .query_row([], |r| r.get(0))?;
    // At least one part, so every step moves the pass on.
    let window_end: Option<i64> = conn
        .prepare_cached(
            "SELECT max(rowid) FROM (SELECT rowid FROM parts WHERE rowid > ?1 ORDER BY rowid LIMIT ?2)",
        )?
        .query_row(params![after, max_parts.max(1)], |r| r.get(0))?;
    let Some(end) = window_end else {
        return Ok(ReclaimStep {
            next: None,
            position: total,
            total,
            ..ReclaimStep::default()
        });
    };

    let mut report = ReclaimStep {
        next: (end < total).then_some(end),
        position: end,
        total,
        ..ReclaimStep::default()
    };
    let mut updates = Vec::new();
    let mut parts = conn.prepare_cached(COMPACTED_TOOL_PARTS)?;
    let mut rows = parts.query(params![after, end])?;
    while let Some(row) = rows.next()? {
        report.scanned += 1;
        let json: String = row.get(1)?;
        if let Some(cleared) = clear_compacted_output(&json) {
            report.cleared += 1;
            // Clearing an output that was a bare number can add a byte; that part saves nothing.
            report.bytes += u64::try_from(json.len().saturating_sub(cleared.len())).unwrap_or(0);
            if !dry_run {
                updates.push((row.get::<_, i64>(0)?, cleared));
            }
        }
    }
    if !updates.is_empty() {
        let mut update = conn.prepare_cached("UPDATE parts SET json = ?2 WHERE rowid = ?1")?;
        for (rowid, json) in updates {
            update.execute(params![rowid, json])?;
        }
    }
    Ok(report)
}

/// The JSON of a part with its compacted tool output cleared, or `None` when
/// `json` is not a compacted tool part or holds nothing to clear.
///
/// A part is a compacted tool part when its `type` is `"tool"` and its
/// `state.time.compacted` is set and not null. Then a `state.output` other than
/// `""` or null becomes `""`, and a non-empty `state.attachments` array becomes
/// `[]`. Every other byte stays as the agent sent it: the values are replaced
/// in the text, because re-serializing with serde_json (built without
/// `preserve_order`) would sort the keys.
///
/// The one rule for both the write path and the retroactive pass. A part that
/// spells `"compacted"` with escapes is not recognised, like the SQL filter.
pub(super) fn clear_compacted_output(json: &str) -> Option<String> {
    // Most parts never mention it: skip the parse on the write path.
    if !json.contains("\"compacted\"") {
        return None;
    }
    let head: ToolPartHead<'_> = serde_json::from_str(json).ok()?;
    if head.kind != "tool" || head.state?.time?.compacted.is_none() {
        return None;
    }
    // serde_json has just read the whole text, so it is valid JSON: the scan relies on that.
    let edits = clearable_values(json)?;
    if edits.is_empty() {
        return None;
    }
    let mut cleared = String::with_capacity(json.len());
    let mut copied = 0;
    for (value, replacement) in edits {
        cleared.push_str(&json[copied..value.start]);
        cleared.push_str(replacement);
        copied = value.end;
    }
    cleared.push_str(&json[copied..]);
    Some(cleared)
}

/// What decides whether a part is a compacted tool part; the rest is skipped unread.
#[derive(Deserialize)]
struct ToolPartHead<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    state: Option<StateHead>,
}

#[derive(Deserialize)]
struct StateHead {
    time: Option<TimeHead>,
}

#[derive(Deserialize)]
struct TimeHead {
    /// `None` when missing or null.
    compacted: Option<IgnoredAny>,
}

/// The values of `state.output` and `state.attachments` that hold something
/// to clear, in text order, each with the JSON that replaces it. `None` if
/// `json` is not an object.
fn clearable_values(json: &str) -> Option<Vec<(Range<usize>, &'static str)>> {
    let text = json.as_bytes();
    let mut edits = Vec::new();
    for (key, state) in members(text, skip_space(text, 0))? {
        if !key_is(json, key, "state") || text.get(state.start) != Some(&b'{') {
            continue;
        }
        for (key, value) in members(text, state.start)? {
            let raw = &json[value.clone()];
            if key_is(json, key.clone(), "output") {
                if raw != "\"\"" && raw != "null" {
                    edits.push((value, "\"\""));
                }
            } else if key_is(json, key, "attachments") && is_non_empty_array(raw) {
                edits.push((value, "[]"));
            }
        }
    }
    Some(edits)
}

/// Whether the member key `key` (a JSON string, quotes included) is `name`.
fn key_is(json: &str, key: Range<usize>, name: &str) -> bool {
    let raw = &json[key.start + 1..key.end - 1];
    if raw.contains('\\') {
        serde_json::from_str::<Cow<'_, str>>(&json[key]).is_ok_and(|key| key == name)
    } else {
        raw == name
    }
}

fn is_non_empty_array(raw: &str) -> bool {
    raw.strip_prefix('[').is_some_and(|items| {
        !items
            .trim_start_matches([' ', '\t', '\n', '\r'])
            .starts_with(']')
    })
}

// A minimal scanner over JSON text already known to be valid: it finds where
// values are without building them. JSON's structural characters are ASCII,
// and bytes of multi-byte UTF-8 characters never equal them, so every position
// it returns is a character boundary.

/// The members of the object opening at `open`: each key (a JSON string,
/// quotes included) and its value.
fn members(text: &[u8], open: usize) -> Option<Vec<(Range<usize>, Range<usize>)>> {
    if text.get(open) != Some(&b'{') {
        return None;
    }
    let mut members = Vec::new();
    let mut at = skip_space(text, open + 1);
    if text.get(at) == Some(&b'}') {
        return Some(members);
    }
    loop {
        let key = string_at(text, at)?;
        at = skip_space(text, key.end);
        if text.get(at) != Some(&b':') {
            return None;
        }
        let start = skip_space(text, at + 1);
        let value = start..value_end(text, start)?;
        at = skip_space(text, value.end);
        members.push((key, value));
        match text.get(at)? {
            b',' => at = skip_space(text, at + 1),
            b'}' => return Some(members),
            _ => return None,
        }
    }
}

fn skip_space(text: &[u8], mut at: usize) -> usize {
    while text
        .get(at)
        .is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
    {
        at += 1;
    }
    at
}

/// The string whose opening quote is at `at`, quotes included.
fn string_at(text: &[u8], at: usize) -> Option<Range<usize>> {
    if text.get(at) != Some(&b'"') {
        return None;
    }
    let mut i = at + 1;
    loop {
        match text.get(i)? {
            // An escape is a backslash and one more character (a `\u` escape's
            // four hex digits are ordinary characters after that).
            b'\\' => i += 2,
            b'"' => return Some(at..i + 1),
            _ => i += 1,
        }
    }
}

/// Where the value that starts at `at` ends (exclusive).
fn value_end(text: &[u8], at: usize) -> Option<usize> {
    match text.get(at)? {
        b'"' => string_at(text, at).map(|string| string.end),
        b'{' | b'[' => {
            let mut depth = 0_usize;
            let mut i = at;
            loop {
                match text.get(i)? {
                    b'"' => {
                        i = string_at(text, i)?.end;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        // A number, true, false or null.
        _ => {
            let mut i = at;
            while text
                .get(i)
                .is_some_and(|b| !matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
            {
                i += 1;
            }
            Some(i)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn clears_output_and_attachments_and_keeps_every_other_byte() {
        let sent = concat!(
            r#"{"id":"prt_1", "type" : "tool","callID":"c","tool":"bash","state":{"status":"completed","#,
            r#""input":{"command":"ls \"}{\"","output":"x"},"output" : "line\n \"quoted\" }]","#,
            r#""title":"ls","metadata":{"output":"kept"},"time":{"start":1,"end":2,"compacted":3},"#,
            r#""attachments":[ {"type":"file","url":"data:é"} ]},"zz":[1,{"a":null}]}"#
        );
        let expected = concat!(
            r#"{"id":"prt_1", "type" : "tool","callID":"c","tool":"bash","state":{"status":"completed","#,
            r#""input":{"command":"ls \"}{\"","output":"x"},"output" : "","#,
            r#""title":"ls","metadata":{"output":"kept"},"time":{"start":1,"end":2,"compacted":3},"#,
            r#""attachments":[]},"zz":[1,{"a":null}]}"#
        );
        assert_eq!(clear_compacted_output(sent).as_deref(), Some(expected));
    }

    #[test]
    fn leaves_parts_that_are_not_compacted_tool_parts() {
        let uncompacted = json!({"type": "tool", "state": {"output": "o", "time": {"start": 1}}});
        let null_compacted =
            json!({"type": "tool", "state": {"output": "o", "time": {"compacted": null}}});
        let text = json!({"type": "text", "text": "o", "state": {"output": "o", "time": {"compacted": 1}}});
        for part in [uncompacted, null_compacted, text] {
            assert_eq!(clear_compacted_output(&part.to_string()), None, "{part}");
        }
        assert_eq!(clear_compacted_output("{\"compacted\": "), None);
    }

    #[test]
    fn a_part_with_nothing_left_to_clear_is_unchanged() {
        let cleared = json!({"type": "tool", "state": {"output": "", "attachments": [],
            "time": {"compacted": 1}}});
        let absent = json!({"type": "tool", "state": {"status": "error", "error": "e",
            "time": {"compacted": 1}}});
        let null_output = json!({"type": "tool", "state": {"output": null, "attachments": [ ],
            "time": {"compacted": 1}}});
        for part in [cleared, absent, null_output] {
            assert_eq!(clear_compacted_output(&part.to_string()), None, "{part}");
        }
    }

    #[test]
    fn escaped_keys_are_understood() {
        let sent = r#"{"type":"tool","state":{"\u006futput":"big","time":{"compacted":1}}}"#;
        let cleared: Value = serde_json::from_str(&clear_compacted_output(sent).unwrap()).unwrap();
        assert_eq!(cleared["state"]["output"], "");
    }
}
