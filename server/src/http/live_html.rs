//! The HTML of text parts as a live stream changes them, so the page never renders
//! markdown: an op that upserts a text part is sent with the HTML of its text in
//! segments (`"html": [...]`, `"htmlFrom": 0`), and a `part.delta` with the segments
//! that changed (`"htmlFrom": k`: the page keeps its first `k` segments and puts these
//! after them). The segments of a text depend only on the text (see
//! [`markdown_segments`](super::markdown_segments)), so they fit the ones a snapshot's
//! document gave, and a delta costs a segment's rendering however long the text is.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use capsync_shared::Cursor;
use capsync_shared::model::Effect;
use serde_json::Value;

use super::markdown_segments::Segments;
use super::page_data::{ReadOp, markdown_text};
use crate::follow::{Prepare, Preparer};
use crate::ledger::LoggedOp;

/// How many text parts one live stream remembers the text of. A part that
/// fell out is looked up again if it gets another delta.
const REMEMBERED_PARTS: usize = 64;

/// The current text of the markdown parts a live stream has seen.
#[derive(Default)]
pub struct LiveHtml {
    parts: HashMap<String, Remembered>,
    /// Bumped on every use, to drop the least recently used part first.
    clock: u64,
}

struct Remembered {
    message_id: String,
    /// `None`: not a markdown part (a delta to it gets no HTML).
    text: Option<Markdown>,
    /// The text already includes every op up to this cursor.
    as_of: Cursor,
    used: u64,
}

/// The text of a markdown part and where its segments start.
struct Markdown {
    text: String,
    segments: Segments,
}

impl Markdown {
    fn new(text: &str) -> Self {
        Self {
            segments: Segments::of(text),
            text: text.to_owned(),
        }
    }
}

/// The HTML an op is sent with: segments from index `from` on.
struct SegmentsHtml {
    from: usize,
    html: Vec<String>,
}

/// A part's stored record, with the cursor it reflects: what [`LiveHtml::learn`]
/// needs for a delta to a part the stream has not seen.
#[derive(Debug)]
pub struct Lookup {
    pub message_id: String,
    pub part: Value,
    pub as_of: Cursor,
}

impl LiveHtml {
    /// Part ids that `ops` append text to but that are not remembered, nor
    /// upserted by an earlier op in `ops`.
    pub fn unknown_parts(&self, ops: &[ReadOp]) -> Vec<String> {
        let mut upserted = HashSet::new();
        let mut unknown = Vec::new();
        for op in ops {
            match &op.effect {
                Some(Effect::PartUpsert { id, .. }) => {
                    upserted.insert(id.as_str());
                }
                Some(Effect::PartDelta { id, field, .. })
                    if field == "text"
                        && !self.parts.contains_key(id)
                        && !upserted.contains(id.as_str())
                        && !unknown.contains(id) =>
                {
                    unknown.push(id.clone());
                }
                _ => {}
            }
        }
        unknown
    }

    /// Remembers parts looked up for [`LiveHtml::unknown_parts`]; ids not
    /// found are remembered as having no text, so they are not looked up again.
    pub fn learn(&mut self, ids: Vec<String>, mut found: HashMap<String, Lookup>, as_of: Cursor) {
        for id in ids {
            let entry = match found.remove(&id) {
                Some(lookup) => Remembered {
                    message_id: lookup.message_id,
                    text: markdown_text(&lookup.part).map(Markdown::new),
                    as_of: lookup.as_of,
                    used: 0,
                },
                None => Remembered {
                    message_id: String::new(),
                    text: None,
                    as_of,
                    used: 0,
                },
            };
            self.remember(id, entry);
        }
    }

    /// Adds `"html"` and `"htmlFrom"` to each op of `ops` (read in one go, in cursor
    /// order) that upserts or appends to a text part: see [`LiveHtml::apply`].
    ///
    /// A delta that a looked-up text already holds (the lookup read the part at a later
    /// cursor) cannot be told from the ones after it: it is sent with the whole HTML.
    /// Of several such deltas to one part in `ops`, only the last is, since whoever gets
    /// `ops` from any of them on gets that one too; the earlier ones leave the page's
    /// segments as they are (`"html": []`). So a page learns a long text whole once per
    /// read, not once per delta.
    pub fn apply_all(&mut self, ops: &mut [ReadOp]) {
        let superseded = self.superseded_deltas(ops);
        for (op, superseded) in ops.iter_mut().zip(superseded) {
            self.apply(op, superseded);
        }
    }

    /// For each op: whether it is a delta to a text part that a later op of `ops` sends
    /// whole (a delta the text already holds, an upsert) or removes.
    fn superseded_deltas(&self, ops: &[ReadOp]) -> Vec<bool> {
        let mut covered: HashSet<&str> = HashSet::new();
        let mut superseded = vec![false; ops.len()];
        for (i, op) in ops.iter().enumerate().rev() {
            match &op.effect {
                Some(Effect::PartDelta { id, field, .. }) if field == "text" => {
                    let held = self
                        .parts
                        .get(id)
                        .is_some_and(|entry| entry.text.is_some() && op.cursor <= entry.as_of);
                    superseded[i] = held && covered.contains(id.as_str());
                    if held {
                        covered.insert(id);
                    }
                }
                Some(Effect::PartUpsert { id, .. } | Effect::PartRemove { id }) => {
                    covered.insert(id);
                }
                _ => {}
            }
        }
        superseded
    }

    /// Adds `"html"` and `"htmlFrom"` to an op that upserts or appends to a text part:
    /// the segments of the part's text after the op that the op changed. A delta the
    /// text already holds gets every segment, or none when `superseded` (a later op of
    /// the same read sends them).
    fn apply(&mut self, op: &mut ReadOp, superseded: bool) {
        let html = match &op.effect {
            Some(Effect::PartUpsert { id, message_id, .. }) => {
                let entry = Remembered {
                    message_id: message_id.clone(),
                    text: markdown_text(&op.json["payload"]).map(Markdown::new),
                    as_of: op.cursor,
                    used: 0,
                };
                let html = entry.text.as_ref().map(|md| SegmentsHtml {
                    from: 0,
                    html: md.segments.html(&md.text, 0),
                });
                self.remember(id.clone(), entry);
                html
            }
            Some(Effect::PartDelta { id, field, delta }) if field == "text" => {
                self.clock += 1;
                let clock = self.clock;
                self.parts.get_mut(id).and_then(|entry| {
                    entry.used = clock;
                    let md = entry.text.as_mut()?;
                    // Already in a text read at a later cursor: don't add it twice, and
                    // send every segment (a page may have the text from before), unless
                    // a later op sends them: then keep the page's (none from their end).
                    let from = if op.cursor > entry.as_of {
                        md.text.push_str(delta);
                        entry.as_of = op.cursor;
                        md.segments.grow(&md.text)
                    } else if superseded {
                        md.segments.len()
                    } else {
                        0
                    };
                    Some(SegmentsHtml {
                        from,
                        html: md.segments.html(&md.text, from),
                    })
                })
            }
            Some(Effect::PartRemove { id }) => {
                self.parts.remove(id);
                None
            }
            Some(Effect::MessageRemove { id }) => {
                self.parts.retain(|_, p| &p.message_id != id);
                None
            }
            _ => None,
        };
        if let (Some(segments), Some(obj)) = (html, op.json.as_object_mut()) {
            obj.insert("html".into(), segments.html.into());
            obj.insert("htmlFrom".into(), segments.from.into());
        }
    }

    fn remember(&mut self, id: String, mut entry: Remembered) {
        self.clock += 1;
        entry.used = self.clock;
        self.parts.insert(id, entry);
        if self.parts.len() > REMEMBERED_PARTS
            && let Some(oldest) = self
                .parts
                .iter()
                .min_by_key(|(_, p)| p.used)
                .map(|(id, _)| id.clone())
        {
            self.parts.remove(&oldest);
        }
    }
}

/// Stored parts `(id, JSON)` read at `as_of`, as [`LiveHtml::learn`] takes them.
pub fn lookups(found: Vec<(String, String)>, as_of: Cursor) -> HashMap<String, Lookup> {
    found
        .into_iter()
        .map(|(id, json)| {
            let part: Value = serde_json::from_str(&json).unwrap_or(Value::Null);
            let message_id = part["messageID"].as_str().unwrap_or_default().to_owned();
            let lookup = Lookup {
                message_id,
                part,
                as_of,
            };
            (id, lookup)
        })
        .collect()
}

/// Each op as event streams send it, prepared once per share by the share's feed
/// for all of its streams (see [`Prepare`]).
#[derive(Default)]
pub struct PreparedOps {
    text: LiveHtml,
}

impl PreparedOps {
    pub fn preparer() -> Preparer {
        Arc::new(|| Box::new(Self::default()))
    }
}

impl Prepare for PreparedOps {
    fn prepare(&mut self, ops: &[LoggedOp]) -> Result<Vec<Arc<str>>, Vec<String>> {
        let mut ops: Vec<ReadOp> = ops.iter().map(ReadOp::new).collect();
        let unknown = self.text.unknown_parts(&ops);
        if !unknown.is_empty() {
            return Err(unknown);
        }
        self.text.apply_all(&mut ops);
        Ok(ops
            .iter()
            .map(|op| Arc::from(op.json.to_string()))
            .collect())
    }

    fn learn(&mut self, asked: Vec<String>, found: Vec<(String, String)>, as_of: Cursor) {
        self.text.learn(asked, lookups(found, as_of), as_of);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::LoggedOp;
    use capsync_shared::{OpId, OpKind};
    use serde_json::json;

    fn op(cursor: u64, kind: OpKind, payload: Value) -> ReadOp {
        ReadOp::new(&LoggedOp {
            cursor: Cursor(cursor),
            op_id: OpId::from(format!("op{cursor}")),
            kind,
            payload: payload.to_string(),
            applied_at: 1000 + cursor as i64,
        })
    }

    /// `op` as the live stream sends it.
    fn applied(live: &mut LiveHtml, mut op: ReadOp) -> Value {
        live.apply(&mut op, false);
        op.json
    }

    #[test]
    fn deltas_get_the_html_of_the_segments_they_changed() {
        let mut live = LiveHtml::default();
        let upsert = op(
            1,
            OpKind::PartUpsert,
            json!({"id": "p", "messageID": "m", "type": "text", "text": "a"}),
        );
        let out = applied(&mut live, upsert);
        assert_eq!(out["html"], json!(["<p>a</p>\n"]));
        assert_eq!(out["htmlFrom"], 0);
        let delta = || {
            op(
                2,
                OpKind::PartDelta,
                json!({"partID": "p", "delta": " *b*"}),
            )
        };
        assert!(live.unknown_parts(&[delta()]).is_empty());
        let out = applied(&mut live, delta());
        assert_eq!(out["html"], json!(["<p>a <em>b</em></p>\n"]));
        assert_eq!(out["htmlFrom"], 0);
        assert_eq!(out["payload"]["delta"], " *b*");
        let other_field = op(
            3,
            OpKind::PartDelta,
            json!({"partID": "p", "delta": "x", "field": "note"}),
        );
        assert!(applied(&mut live, other_field).get("html").is_none());
    }

    #[test]
    fn a_looked_up_part_is_not_appended_to_twice() {
        let mut live = LiveHtml::default();
        let read = || {
            vec![
                op(5, OpKind::PartDelta, json!({"partID": "p", "delta": "b"})),
                op(6, OpKind::PartDelta, json!({"partID": "p", "delta": "c"})),
                op(7, OpKind::PartDelta, json!({"partID": "q", "delta": "z"})),
            ]
        };
        let unknown = live.unknown_parts(&read());
        assert_eq!(unknown, vec!["p".to_owned(), "q".to_owned()]);
        // The lookup read the part at cursor 5: "a" + "b".
        let found = HashMap::from([(
            "p".to_owned(),
            Lookup {
                message_id: "m".into(),
                part: json!({"id": "p", "type": "text", "text": "ab"}),
                as_of: Cursor(5),
            },
        )]);
        live.learn(unknown, found, Cursor(7));
        let mut ops = read().into_iter();
        assert_eq!(
            applied(&mut live, ops.next().unwrap())["html"],
            json!(["<p>ab</p>\n"])
        );
        assert_eq!(
            applied(&mut live, ops.next().unwrap())["html"],
            json!(["<p>abc</p>\n"])
        );
        assert!(
            applied(&mut live, ops.next().unwrap())
                .get("html")
                .is_none()
        );
        assert!(
            live.unknown_parts(&read()).is_empty(),
            "not looked up twice"
        );
    }

    #[test]
    fn of_the_deltas_a_looked_up_text_holds_only_the_last_is_sent_whole() {
        let mut live = LiveHtml::default();
        let mut ops = vec![
            op(5, OpKind::PartDelta, json!({"partID": "p", "delta": "b"})),
            op(6, OpKind::PartDelta, json!({"partID": "p", "delta": "c"})),
            op(7, OpKind::PartDelta, json!({"partID": "q", "delta": "z"})),
            op(8, OpKind::PartDelta, json!({"partID": "p", "delta": "d"})),
            op(9, OpKind::PartDelta, json!({"partID": "r", "delta": "y"})),
            op(
                10,
                OpKind::PartUpsert,
                json!({"id": "r", "messageID": "m", "type": "text", "text": "new"}),
            ),
        ];
        assert_eq!(live.unknown_parts(&ops), ["p", "q", "r"]);
        // Read at cursor 7: "a" + "b" + "c", and "x" + "y" for r.
        let found = HashMap::from([
            (
                "p".to_owned(),
                Lookup {
                    message_id: "m".into(),
                    part: json!({"id": "p", "type": "text", "text": "abc"}),
                    as_of: Cursor(7),
                },
            ),
            (
                "r".to_owned(),
                Lookup {
                    message_id: "m".into(),
                    part: json!({"id": "r", "type": "text", "text": "xy"}),
                    as_of: Cursor(9),
                },
            ),
        ]);
        live.learn(vec!["p".into(), "q".into(), "r".into()], found, Cursor(9));
        live.apply_all(&mut ops);
        let html = |i: usize| (ops[i].json["html"].clone(), ops[i].json["htmlFrom"].clone());
        assert_eq!(html(0), (json!([]), json!(1)), "held, and sent whole below");
        assert_eq!(
            html(1),
            (json!(["<p>abc</p>\n"]), json!(0)),
            "the last held: whole"
        );
        assert!(ops[2].json.get("html").is_none(), "q has no text");
        assert_eq!(
            html(3),
            (json!(["<p>abcd</p>\n"]), json!(0)),
            "appended once"
        );
        assert_eq!(
            html(4),
            (json!([]), json!(1)),
            "held, and the upsert sends r whole"
        );
        assert_eq!(html(5), (json!(["<p>new</p>\n"]), json!(0)));
    }

    /// A read after the lookup can hold a snapshot of the part older than the lookup:
    /// the deltas after it are appended, none is passed over as held.
    #[test]
    fn deltas_after_an_upsert_in_the_same_read_are_appended() {
        let mut live = LiveHtml::default();
        let found = HashMap::from([(
            "p".to_owned(),
            Lookup {
                message_id: "m".into(),
                part: json!({"id": "p", "type": "text", "text": "abc"}),
                as_of: Cursor(10),
            },
        )]);
        live.learn(vec!["p".into()], found, Cursor(10));
        let mut ops = vec![
            op(
                5,
                OpKind::PartUpsert,
                json!({"id": "p", "messageID": "m", "type": "text", "text": "a"}),
            ),
            op(6, OpKind::PartDelta, json!({"partID": "p", "delta": "b"})),
            op(7, OpKind::PartDelta, json!({"partID": "p", "delta": "c"})),
        ];
        live.apply_all(&mut ops);
        assert_eq!(ops[1].json["html"], json!(["<p>ab</p>\n"]));
        assert_eq!(ops[2].json["html"], json!(["<p>abc</p>\n"]));
    }

    #[test]
    fn remembers_a_bounded_number_of_parts() {
        let mut live = LiveHtml::default();
        for i in 0..(REMEMBERED_PARTS as u64 + 10) {
            applied(
                &mut live,
                op(
                    i + 1,
                    OpKind::PartUpsert,
                    json!({"id": format!("p{i}"), "messageID": "m", "type": "text", "text": ""}),
                ),
            );
        }
        assert_eq!(live.parts.len(), REMEMBERED_PARTS);
        assert!(!live.parts.contains_key("p0"));
        applied(
            &mut live,
            op(1000, OpKind::MessageRemove, json!({"id": "m"})),
        );
        assert!(live.parts.is_empty());
    }

    fn logged(cursor: u64, kind: OpKind, payload: Value) -> LoggedOp {
        LoggedOp {
            cursor: Cursor(cursor),
            op_id: OpId::from(format!("op{cursor}")),
            kind,
            payload: payload.to_string(),
            applied_at: 1000 + cursor as i64,
        }
    }

    #[test]
    fn prepared_ops_are_what_a_stream_renders_itself_and_unknown_parts_are_asked_for() {
        let ops = [
            logged(
                8,
                OpKind::PartDelta,
                json!({"partID": "p", "delta": " *b*"}),
            ),
            logged(
                9,
                OpKind::PartUpsert,
                json!({"id": "q", "messageID": "m", "type": "text", "text": "q"}),
            ),
        ];
        let mut prepared = PreparedOps::default();
        assert_eq!(prepared.prepare(&ops).unwrap_err(), vec!["p".to_owned()]);
        let stored = json!({"id": "p", "messageID": "m", "type": "text", "text": "a"});
        prepared.learn(
            vec!["p".into()],
            vec![("p".into(), stored.to_string())],
            Cursor(7),
        );
        let out = prepared.prepare(&ops).unwrap();

        // The same ops through a stream's own rendering, told the same about `p`.
        let mut own = LiveHtml::default();
        let found = HashMap::from([(
            "p".to_owned(),
            Lookup {
                message_id: "m".into(),
                part: stored,
                as_of: Cursor(7),
            },
        )]);
        own.learn(vec!["p".into()], found, Cursor(7));
        for (op, prepared) in ops.iter().zip(&out) {
            let expected = applied(&mut own, ReadOp::new(op));
            assert_eq!(serde_json::from_str::<Value>(prepared).unwrap(), expected);
        }
        let first: Value = serde_json::from_str(&out[0]).unwrap();
        assert_eq!(first["html"], json!(["<p>a <em>b</em></p>\n"]));
    }

    #[test]
    fn a_long_streamed_text_sends_only_its_last_segments() {
        let mut live = LiveHtml::default();
        let upsert = op(
            1,
            OpKind::PartUpsert,
            json!({"id": "p", "messageID": "m", "type": "text", "text": ""}),
        );
        applied(&mut live, upsert);
        // What a page holds: the segments it was sent, spliced in as `htmlFrom` says.
        let mut page: Vec<String> = Vec::new();
        let mut text = String::new();
        let mut largest_event = 0;
        for n in 0..2000u64 {
            let delta = if n % 25 == 24 {
                "\n\n".to_owned()
            } else {
                format!("word{n} ")
            };
            text.push_str(&delta);
            let out = applied(
                &mut live,
                op(
                    n + 2,
                    OpKind::PartDelta,
                    json!({"partID": "p", "delta": delta}),
                ),
            );
            let from = out["htmlFrom"].as_u64().unwrap() as usize;
            let html: Vec<String> = serde_json::from_value(out["html"].clone()).unwrap();
            assert!(from <= page.len(), "{from} > {}", page.len());
            page.truncate(from);
            page.extend(html);
            largest_event = largest_event.max(out.to_string().len());
        }
        assert_eq!(page.concat(), super::super::markdown::render(&text));
        assert!(page.len() > 5, "{} segments", page.len());
        assert!(
            largest_event < text.len() / 4,
            "{largest_event} bytes of {}",
            text.len()
        );
    }
}
