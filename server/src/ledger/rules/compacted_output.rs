//! Clearing output and attachments of tool parts marked compacted: the one rule
//! for the write path (an append stores such a part already cleared) and for each
//! engine's retroactive reclaim pass.
//!
//! An agent that compacts its context marks old tool parts with
//! `state.time.compacted` and sends them again. Their output is never shown
//! again, and it is most of a long session's bytes.

use std::borrow::Cow;
use std::ops::Range;

use serde::Deserialize;
use serde::de::IgnoredAny;

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
pub fn clear_compacted_output(json: &str) -> Option<String> {
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
