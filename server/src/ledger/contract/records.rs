//! Contract cases of the stored records: what upserts, removals, deltas and
//! diff lists do, and how records that arrive out of order are kept or refused.

use capsync_shared::{Cursor, OpKind};
use serde_json::{Value, json};

use super::{
    Fixture, applied, batch, completed_message, message, op, outcomes, part, raw_op, rejection,
};
use crate::ledger::{OpOutcome, Record, RecordKind, RejectReason};

/// The record of `kind` with `id` ("" for the session and the diffs), parsed, as a snapshot shows it.
async fn stored(fx: &Fixture, kind: RecordKind, id: &str) -> Value {
    let (records, _) = fx.snapshot(1 << 20).await;
    let record = records
        .iter()
        .find(|r| r.kind == kind && r.id == id)
        .unwrap_or_else(|| panic!("no {kind:?} {id:?} in {records:?}"));
    serde_json::from_str(&record.json).unwrap()
}

/// The parts a snapshot shows, as (id, message id), by id.
async fn parts(fx: &Fixture) -> Vec<(String, String)> {
    let (records, _) = fx.snapshot(1 << 20).await;
    let mut parts: Vec<(String, String)> = records
        .into_iter()
        .filter(|r| r.kind == RecordKind::Part)
        .map(|r| (r.id, r.message_id))
        .collect();
    parts.sort();
    parts
}

fn tool(id: &str, status: &str) -> Value {
    json!({"id": id, "messageID": "msg_1", "type": "tool", "tool": "bash",
           "state": {"status": status, "input": {"command": "ls"}}})
}

fn text(id: &str, end: Option<i64>) -> Value {
    let mut time = json!({"start": 1});
    if let Some(end) = end {
        time["end"] = end.into();
    }
    json!({"id": id, "messageID": "msg_1", "type": "text", "text": "hi", "time": time})
}

fn session_at(updated: i64, title: &str) -> Value {
    json!({"id": "ses_1", "title": title, "time": {"created": 1, "updated": updated}})
}

pub(crate) async fn completed_or_errored_messages_do_not_move_back(fx: Fixture) {
    let ack = fx
        .append(vec![
            op("m1", OpKind::MessageUpsert, message("msg_1")),
            op("m2", OpKind::MessageUpsert, completed_message("msg_1")),
            op("m3", OpKind::MessageUpsert, message("msg_1")),
            // Terminal to terminal is fine.
            op(
                "m4",
                OpKind::MessageUpsert,
                json!({"id": "msg_1", "role": "assistant", "time": {"completed": 3}, "error": {"name": "Aborted"}}),
            ),
            op(
                "e1",
                OpKind::MessageUpsert,
                json!({"id": "msg_2", "role": "assistant", "error": {"name": "X"}}),
            ),
            op("e2", OpKind::MessageUpsert, message("msg_2")),
        ])
        .await;
    let results = outcomes(&ack);
    assert_eq!(results[..2], applied(&[1, 2]));
    rejection(&results[2], RejectReason::StaleTransition);
    assert_eq!(results[3], OpOutcome::Applied(Cursor(3)));
    assert_eq!(results[4], OpOutcome::Applied(Cursor(4)));
    let detail = rejection(&results[5], RejectReason::StaleTransition);
    assert!(detail.contains("msg_2"), "{detail}");
    let msg_1 = stored(&fx, RecordKind::Message, "msg_1").await;
    assert_eq!(msg_1["error"]["name"], "Aborted");
}

pub(crate) async fn removed_messages_and_parts_stay_removed(fx: Fixture) {
    let ack = fx
        .append(vec![
            op("m1", OpKind::MessageUpsert, message("msg_1")),
            op("p1", OpKind::PartUpsert, part("prt_1", "msg_1")),
            op("p2", OpKind::PartUpsert, part("prt_2", "msg_1")),
            op("m2", OpKind::MessageUpsert, message("msg_2")),
            op("p3", OpKind::PartUpsert, part("prt_3", "msg_2")),
            op("r1", OpKind::MessageRemove, json!({"messageID": "msg_1"})),
            op("r2", OpKind::PartRemove, json!({"partID": "prt_3"})),
        ])
        .await;
    assert_eq!(outcomes(&ack), applied(&[1, 2, 3, 4, 5, 6, 7]));

    // Snapshots taken before the removals, arriving after them (even a terminal one):
    // the message, a part of it, a new part of it, and the removed part of a kept message.
    let ack = fx
        .append(vec![
            op("late1", OpKind::MessageUpsert, completed_message("msg_1")),
            op("late2", OpKind::PartUpsert, part("prt_1", "msg_1")),
            op("late3", OpKind::PartUpsert, part("prt_9", "msg_1")),
            op("late4", OpKind::PartUpsert, part("prt_3", "msg_2")),
            op(
                "late5",
                OpKind::PartDelta,
                json!({"partID": "prt_2", "delta": "more"}),
            ),
            // A part removed before it ever arrived stays out too.
            op("r3", OpKind::PartRemove, json!({"id": "prt_4"})),
            op("late6", OpKind::PartUpsert, part("prt_4", "msg_2")),
            // What was not removed still changes.
            op("p4", OpKind::PartUpsert, part("prt_5", "msg_2")),
        ])
        .await;
    let results = outcomes(&ack);
    for (i, removed) in [(0, "msg_1"), (1, "msg_1"), (2, "msg_1"), (3, "prt_3")] {
        let detail = rejection(&results[i], RejectReason::StaleTransition);
        assert!(
            detail.contains(removed) && detail.contains("removed"),
            "{i}: {detail}"
        );
    }
    rejection(&results[4], RejectReason::Invalid);
    assert_eq!(results[5], OpOutcome::Applied(Cursor(8)));
    rejection(&results[6], RejectReason::StaleTransition);
    assert_eq!(results[7], OpOutcome::Applied(Cursor(9)));

    let (records, _) = fx.snapshot(1 << 20).await;
    let held: Vec<(RecordKind, &str)> = records
        .iter()
        .filter(|r| matches!(r.kind, RecordKind::Message | RecordKind::Part))
        .map(|r| (r.kind, r.id.as_str()))
        .collect();
    assert_eq!(
        held,
        [(RecordKind::Message, "msg_2"), (RecordKind::Part, "prt_5")]
    );

    // Removal is per share: another share of the same session takes the same ids.
    let (other, _) = fx.new_share(&fx.agent, "sh_2").await;
    let ack = fx
        .backend
        .append(
            other,
            batch(vec![
                op("m1", OpKind::MessageUpsert, message("msg_1")),
                op("p1", OpKind::PartUpsert, part("prt_1", "msg_1")),
            ]),
        )
        .await
        .unwrap();
    assert_eq!(outcomes(&ack), applied(&[1, 2]));
}

pub(crate) async fn parts_follow_their_message_and_are_removed_with_it(fx: Fixture) {
    let ack = fx
        .append(vec![
            op("m1", OpKind::MessageUpsert, message("msg_1")),
            op("m2", OpKind::MessageUpsert, message("msg_2")),
            op("p1", OpKind::PartUpsert, part("prt_1", "msg_1")),
            op("p2", OpKind::PartUpsert, part("prt_2", "msg_1")),
            // prt_1 moves to msg_2.
            op("p3", OpKind::PartUpsert, part("prt_1", "msg_2")),
        ])
        .await;
    assert_eq!(outcomes(&ack), applied(&[1, 2, 3, 4, 5]));
    assert_eq!(
        parts(&fx).await,
        [
            ("prt_1".into(), "msg_2".into()),
            ("prt_2".into(), "msg_1".into())
        ]
    );
    assert_eq!(fx.stats().await.parts, 2);

    let ack = fx
        .append(vec![
            op("r1", OpKind::MessageRemove, json!({"id": "msg_2"})),
            op("r2", OpKind::PartRemove, json!({"partID": "prt_2"})),
            // Removing what is not there applies, and changes nothing.
            op("r3", OpKind::PartRemove, json!({"id": "prt_404"})),
            op("r4", OpKind::MessageRemove, json!({"messageID": "msg_404"})),
        ])
        .await;
    assert_eq!(outcomes(&ack), applied(&[6, 7, 8, 9]));
    assert!(parts(&fx).await.is_empty());
    let (records, _) = fx.snapshot(1 << 20).await;
    let messages: Vec<&str> = records
        .iter()
        .filter(|r| r.kind == RecordKind::Message)
        .map(|r| r.id.as_str())
        .collect();
    assert_eq!(messages, ["msg_1"]);
    let stats = fx.stats().await;
    assert_eq!((stats.messages, stats.parts), (1, 0));
}

pub(crate) async fn part_deltas_append_durably(fx: Fixture) {
    let ack = fx
        .append(vec![
            op("m", OpKind::MessageUpsert, message("msg_1")),
            op("p", OpKind::PartUpsert, part("prt_1", "msg_1")),
            op(
                "d1",
                OpKind::PartDelta,
                json!({"partID": "prt_1", "delta": "lo"}),
            ),
            op(
                "d2",
                OpKind::PartDelta,
                json!({"id": "prt_1", "delta": ", wörld", "field": "text"}),
            ),
            op(
                "d3",
                OpKind::PartDelta,
                json!({"partID": "prt_1", "delta": "hmm", "field": "reasoning"}),
            ),
        ])
        .await;
    assert_eq!(outcomes(&ack), applied(&[1, 2, 3, 4, 5]));
    let fx = fx.reopen().await;
    let (records, _) = fx.snapshot(1 << 20).await;
    let part = records.iter().find(|r| r.kind == RecordKind::Part).unwrap();
    let value: Value = serde_json::from_str(&part.json).unwrap();
    assert_eq!(value["text"], "Hello, wörld");
    assert_eq!(value["reasoning"], "hmm");
    assert_eq!(value["type"], "text");
    assert_eq!(value["messageID"], "msg_1");
    // A retried delta is a duplicate: the text does not grow twice.
    let ack = fx
        .append(vec![op(
            "d1",
            OpKind::PartDelta,
            json!({"partID": "prt_1", "delta": "lo"}),
        )])
        .await;
    assert_eq!(outcomes(&ack), [OpOutcome::Duplicate(Cursor(3))]);
}

/// A streamed answer longer than many chunks of appended text reads back whole, through
/// every read of a part's record, after a reopen too; the part's next snapshot replaces
/// it, and later deltas append to that snapshot.
pub(crate) async fn streamed_text_reads_whole_until_a_snapshot_replaces_it(fx: Fixture) {
    let mut ops = vec![
        op("m", OpKind::MessageUpsert, message("msg_1")),
        op("p", OpKind::PartUpsert, part("prt_1", "msg_1")),
        // An orphan (its message never arrives) streams too.
        op("o", OpKind::PartUpsert, part("prt_9", "msg_9")),
    ];
    let mut expected = String::from("Hel");
    for n in 0..300 {
        // 300 × 17 bytes: several chunks, and deltas that do not fill one evenly.
        let delta = format!("{n:>5} streamed. ");
        expected.push_str(&delta);
        ops.push(op(
            &format!("d{n}"),
            OpKind::PartDelta,
            json!({"partID": "prt_1", "delta": delta}),
        ));
        ops.push(op(
            &format!("o{n}"),
            OpKind::PartDelta,
            json!({"partID": "prt_9", "delta": "ö"}),
        ));
    }
    ops.push(op(
        "big",
        OpKind::PartDelta,
        json!({"partID": "prt_1", "delta": "x".repeat(3000)}),
    ));
    expected.push_str(&"x".repeat(3000));
    ops.push(op(
        "note",
        OpKind::PartDelta,
        json!({"partID": "prt_1", "field": "note", "delta": "a new field"}),
    ));
    let ack = fx.append(ops).await;
    assert!(
        ack.results
            .iter()
            .all(|r| matches!(r.outcome, OpOutcome::Applied(_))),
        "{ack:?}"
    );
    let fx = fx.reopen().await;
    let record = stored(&fx, RecordKind::Part, "prt_1").await;
    assert_eq!(record["text"], expected.as_str());
    assert_eq!(record["note"], "a new field");
    assert_eq!(record["messageID"], "msg_1");
    let orphan = stored(&fx, RecordKind::Part, "prt_9").await;
    assert_eq!(orphan["text"], format!("Hel{}", "ö".repeat(300)));
    // Small pages: a part's whole text is one record, on a page of its own.
    let (records, pages) = fx.snapshot(512).await;
    assert!(pages > 1);
    let paged: Value = serde_json::from_str(
        &records
            .iter()
            .find(|r| r.id == "prt_1")
            .expect("the part")
            .json,
    )
    .unwrap();
    assert_eq!(paged["text"], expected.as_str());
    // Looking parts up (live rendering does) gives the whole text too.
    let found = fx
        .backend
        .parts(
            fx.viewer.clone(),
            vec!["prt_1".into(), "prt_9".into(), "prt_none".into()],
        )
        .await
        .unwrap();
    let looked_up: Vec<(String, Value)> = found
        .parts
        .into_iter()
        .map(|(id, json)| (id, serde_json::from_str(&json).unwrap()))
        .collect();
    assert_eq!(looked_up.len(), 2);
    assert_eq!(looked_up[0].1["text"], expected.as_str());
    assert_eq!(looked_up[1].1["text"], orphan["text"]);
    let fed = fx
        .backend
        .feed_parts(fx.share.clone(), vec!["prt_1".into()])
        .await
        .unwrap();
    assert_eq!(fed.parts.len(), 1);
    let fed: Value = serde_json::from_str(&fed.parts[0].1).unwrap();
    assert_eq!(fed["text"], expected.as_str());

    // The next snapshot of the part holds its whole text: the appended text goes, and
    // deltas after it append to it.
    let replaced =
        json!({"id": "prt_1", "messageID": "msg_1", "type": "text", "text": "Rewritten"});
    let ack = fx
        .append(vec![
            op("p2", OpKind::PartUpsert, replaced),
            op(
                "after",
                OpKind::PartDelta,
                json!({"partID": "prt_1", "delta": " and on"}),
            ),
        ])
        .await;
    assert!(
        ack.results
            .iter()
            .all(|r| matches!(r.outcome, OpOutcome::Applied(_)))
    );
    let record = stored(&fx, RecordKind::Part, "prt_1").await;
    assert_eq!(record["text"], "Rewritten and on");
    assert!(record.get("note").is_none(), "{record}");
}

/// A delta appends to a string field or adds one; a field of another type refuses it.
pub(crate) async fn a_delta_to_a_field_that_is_not_a_string_is_refused(fx: Fixture) {
    let ack = fx
        .append(vec![
            op("m", OpKind::MessageUpsert, message("msg_1")),
            op("p", OpKind::PartUpsert, text("prt_1", None)),
            op(
                "ok",
                OpKind::PartDelta,
                json!({"partID": "prt_1", "delta": "!"}),
            ),
            op(
                "bad",
                OpKind::PartDelta,
                json!({"partID": "prt_1", "field": "time", "delta": "x"}),
            ),
            op(
                "missing",
                OpKind::PartDelta,
                json!({"partID": "prt_2", "delta": "x"}),
            ),
        ])
        .await;
    assert_eq!(outcomes(&ack)[..3], applied(&[1, 2, 3]));
    let detail = rejection(&ack.results[3].outcome, RejectReason::Invalid);
    assert!(detail.contains("not a string"), "{detail}");
    let detail = rejection(&ack.results[4].outcome, RejectReason::Invalid);
    assert!(detail.contains("does not exist"), "{detail}");
    let record = stored(&fx, RecordKind::Part, "prt_1").await;
    assert_eq!(record["text"], "hi!");
    assert_eq!(record["time"], json!({"start": 1}));
}

pub(crate) async fn a_delta_to_a_finished_part_is_stale_and_adds_nothing(fx: Fixture) {
    let finished = json!({"id": "prt_1", "messageID": "msg_1", "type": "text",
                          "text": "Hello", "time": {"start": 1, "end": 2}});
    let ack = fx
        .append(vec![
            op("m", OpKind::MessageUpsert, message("msg_1")),
            op("p", OpKind::PartUpsert, finished),
            op(
                "late",
                OpKind::PartDelta,
                json!({"partID": "prt_1", "delta": "lo"}),
            ),
        ])
        .await;
    assert_eq!(outcomes(&ack)[..2], applied(&[1, 2]));
    let detail = rejection(&ack.results[2].outcome, RejectReason::StaleTransition);
    assert!(detail.contains("finished"), "{detail}");
    let (records, _) = fx.snapshot(1 << 20).await;
    let part = records.iter().find(|r| r.kind == RecordKind::Part).unwrap();
    let value: Value = serde_json::from_str(&part.json).unwrap();
    assert_eq!(value["text"], "Hello");
}

pub(crate) async fn diff_set_replaces_the_whole_list(fx: Fixture) {
    fx.append(vec![op(
        "d1",
        OpKind::DiffSet,
        json!({"diffs": [{"file": "a.rs"}, {"file": "b.rs"}]}),
    )])
    .await;
    fx.append(vec![op("d2", OpKind::DiffSet, json!([{"file": "c.rs"}]))])
        .await;
    let (records, _) = fx.snapshot(1 << 20).await;
    let diffs: Vec<&Record> = records
        .iter()
        .filter(|r| r.kind == RecordKind::Diffs)
        .collect();
    assert_eq!(diffs.len(), 1);
    assert_eq!(diffs[0].json, r#"[{"file":"c.rs"}]"#);
    fx.append(vec![op("d3", OpKind::DiffSet, json!({"diffs": []}))])
        .await;
    let (records, _) = fx.snapshot(1 << 20).await;
    let diffs: Vec<&str> = records
        .iter()
        .filter(|r| r.kind == RecordKind::Diffs)
        .map(|r| r.json.as_str())
        .collect();
    assert_eq!(diffs, ["[]"]);
}

pub(crate) async fn upserts_replace_their_record_and_keep_the_agents_text(fx: Fixture) {
    let first = r#"{"id": "ses_1",  "title": "first"}"#;
    let second = r#"{"id":"ses_1","title":"second"}"#;
    fx.append(vec![
        raw_op("s1", OpKind::SessionUpsert, first),
        raw_op("md1", OpKind::ModelUpsert, r#"{"id":"gpt","v":1}"#),
        raw_op("md2", OpKind::ModelUpsert, r#"{"id":"gpt","v":2}"#),
    ])
    .await;
    let (records, _) = fx.snapshot(1 << 20).await;
    assert_eq!(records[0].json, first);
    assert_eq!(records[1].json, r#"{"id":"gpt","v":2}"#);
    fx.append(vec![raw_op("s2", OpKind::SessionUpsert, second)])
        .await;
    let (records, _) = fx.snapshot(1 << 20).await;
    assert_eq!(records[0].kind, RecordKind::Session);
    assert_eq!(records[0].json, second);
    assert_eq!(records.len(), 2);
}

pub(crate) async fn a_finished_tool_call_does_not_go_back_to_running(fx: Fixture) {
    let ack = fx
        .append(vec![
            op("m", OpKind::MessageUpsert, message("msg_1")),
            op("t1", OpKind::PartUpsert, tool("prt_t", "pending")),
            op("t2", OpKind::PartUpsert, tool("prt_t", "completed")),
            op("t3", OpKind::PartUpsert, tool("prt_t", "running")),
            op("t4", OpKind::PartUpsert, tool("prt_t", "pending")),
            // Finished to finished replaces (an error after a completion, say).
            op("t5", OpKind::PartUpsert, tool("prt_t", "error")),
            op("u1", OpKind::PartUpsert, tool("prt_u", "error")),
            op("u2", OpKind::PartUpsert, tool("prt_u", "running")),
        ])
        .await;
    let results = outcomes(&ack);
    assert_eq!(results[..3], applied(&[1, 2, 3]));
    let detail = rejection(&results[3], RejectReason::StaleTransition);
    assert!(detail.contains("prt_t"), "{detail}");
    rejection(&results[4], RejectReason::StaleTransition);
    assert_eq!(results[5..7], applied(&[4, 5]));
    rejection(&results[7], RejectReason::StaleTransition);
    let part = stored(&fx, RecordKind::Part, "prt_t").await;
    assert_eq!(part["state"]["status"], "error");
}

pub(crate) async fn an_ended_text_or_reasoning_part_keeps_its_end(fx: Fixture) {
    let mut reasoning = text("prt_r", Some(5));
    reasoning["type"] = "reasoning".into();
    let mut reasoning_open = text("prt_r", None);
    reasoning_open["type"] = "reasoning".into();
    let ack = fx
        .append(vec![
            op("m", OpKind::MessageUpsert, message("msg_1")),
            op("a", OpKind::PartUpsert, text("prt_a", None)),
            op("b", OpKind::PartUpsert, text("prt_a", Some(9))),
            op("c", OpKind::PartUpsert, text("prt_a", None)),
            op("d", OpKind::PartUpsert, reasoning),
            op("e", OpKind::PartUpsert, reasoning_open),
            // Unfinished to unfinished, and types without an order, replace freely.
            op("f", OpKind::PartUpsert, text("prt_b", None)),
            op("g", OpKind::PartUpsert, text("prt_b", None)),
            op(
                "h",
                OpKind::PartUpsert,
                json!({"id": "prt_s", "messageID": "msg_1", "type": "step-finish", "time": {"end": 3}}),
            ),
            op(
                "i",
                OpKind::PartUpsert,
                json!({"id": "prt_s", "messageID": "msg_1", "type": "step-finish"}),
            ),
        ])
        .await;
    let results = outcomes(&ack);
    assert_eq!(results[..3], applied(&[1, 2, 3]));
    rejection(&results[3], RejectReason::StaleTransition);
    assert_eq!(results[4], OpOutcome::Applied(Cursor(4)));
    rejection(&results[5], RejectReason::StaleTransition);
    assert_eq!(results[6..], applied(&[5, 6, 7, 8]));
    let part = stored(&fx, RecordKind::Part, "prt_a").await;
    assert_eq!(part["time"]["end"], 9);
}

pub(crate) async fn a_session_does_not_go_back_to_an_older_update(fx: Fixture) {
    let ack = fx
        .append(vec![
            op("s1", OpKind::SessionUpsert, session_at(20, "newer")),
            op("s2", OpKind::SessionUpsert, session_at(10, "older")),
            op("s3", OpKind::SessionUpsert, session_at(20, "same time")),
            op(
                "s4",
                OpKind::SessionUpsert,
                json!({"id": "ses_1", "title": "no time"}),
            ),
            op("s5", OpKind::SessionUpsert, session_at(5, "after no time")),
        ])
        .await;
    let results = outcomes(&ack);
    assert_eq!(results[0], OpOutcome::Applied(Cursor(1)));
    let detail = rejection(&results[1], RejectReason::StaleTransition);
    assert!(detail.contains("time.updated"), "{detail}");
    // Equal times replace; a session without the field orders nothing.
    assert_eq!(results[2..], applied(&[2, 3, 4]));
    let session = stored(&fx, RecordKind::Session, "").await;
    assert_eq!(session["title"], "after no time");
}

pub(crate) async fn a_part_before_its_message_is_kept_and_joins_it_when_it_arrives(fx: Fixture) {
    let ack = fx
        .append(vec![
            op("p1", OpKind::PartUpsert, part("prt_1", "msg_1")),
            op("p2", OpKind::PartUpsert, part("prt_2", "msg_1")),
            op("q1", OpKind::PartUpsert, part("prt_9", "msg_9")),
        ])
        .await;
    assert_eq!(outcomes(&ack), applied(&[1, 2, 3]));

    // Before the message: the snapshot carries them after everything else.
    let (records, _) = fx.snapshot(1 << 20).await;
    let kinds: Vec<(RecordKind, &str, &str)> = records
        .iter()
        .map(|r| (r.kind, r.id.as_str(), r.message_id.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            (RecordKind::Part, "prt_1", "msg_1"),
            (RecordKind::Part, "prt_2", "msg_1"),
            (RecordKind::Part, "prt_9", "msg_9"),
        ]
    );
    // Paged one record at a time, still each once, in the same order.
    let (paged, pages) = fx.snapshot(1).await;
    assert_eq!(paged, records);
    assert_eq!(pages, 3);

    let ack = fx
        .append(vec![op("m1", OpKind::MessageUpsert, message("msg_1"))])
        .await;
    assert_eq!(outcomes(&ack), applied(&[4]));
    let (records, _) = fx.snapshot(1 << 20).await;
    let kinds: Vec<(RecordKind, &str)> = records.iter().map(|r| (r.kind, r.id.as_str())).collect();
    assert_eq!(
        kinds,
        [
            (RecordKind::Message, "msg_1"),
            (RecordKind::Part, "prt_1"),
            (RecordKind::Part, "prt_2"),
            (RecordKind::Part, "prt_9"),
        ]
    );

    // Removing a message takes the parts waiting for it, too.
    let ack = fx
        .append(vec![
            op("r1", OpKind::MessageRemove, json!({"id": "msg_9"})),
            op("r2", OpKind::MessageRemove, json!({"id": "msg_1"})),
        ])
        .await;
    assert_eq!(outcomes(&ack), applied(&[5, 6]));
    assert_eq!(fx.stats().await.parts, 0);
    let (records, _) = fx.snapshot(1 << 20).await;
    assert!(records.is_empty(), "{records:?}");
    // A finished message still takes its parts in any order.
    let ack = fx
        .append(vec![
            op("p3", OpKind::PartUpsert, part("prt_3", "msg_2")),
            op("m2", OpKind::MessageUpsert, completed_message("msg_2")),
        ])
        .await;
    assert_eq!(outcomes(&ack), applied(&[7, 8]));
}

pub(crate) async fn the_same_model_id_from_two_providers_is_two_records(fx: Fixture) {
    let model =
        |provider: &str, name: &str| json!({"id": "x", "providerID": provider, "name": name});
    let ack = fx
        .append(vec![
            op(
                "a",
                OpKind::ModelUpsert,
                model("openrouter", "via openrouter"),
            ),
            op("b", OpKind::ModelUpsert, model("opencode", "via opencode")),
            op("c", OpKind::ModelUpsert, model("opencode", "renamed")),
            op("d", OpKind::ModelUpsert, json!({"id": "x"})),
            op(
                "e",
                OpKind::ModelUpsert,
                json!({"id": "x", "providerID": 3}),
            ),
        ])
        .await;
    let results = outcomes(&ack);
    assert_eq!(results[..4], applied(&[1, 2, 3, 4]));
    rejection(&results[4], RejectReason::Invalid);
    let (records, _) = fx.snapshot(1 << 20).await;
    let models: Vec<(&str, Value)> = records
        .iter()
        .map(|r| (r.id.as_str(), serde_json::from_str(&r.json).unwrap()))
        .collect();
    assert_eq!(
        models,
        [
            ("opencode/x", model("opencode", "renamed")),
            ("openrouter/x", model("openrouter", "via openrouter")),
            ("x", json!({"id": "x"})),
        ]
    );
}
