//! Snapshots that arrive out of order, parts before their message, models of two providers, and the migration that made room for them.

use capsync_shared::{Cursor, OpKind};
use rusqlite::Connection;
use serde_json::{Value, json};

use super::SqliteBackend;
use super::schema::{MIGRATIONS, SCHEMA_VERSION};
use super::tests::{
    Fixture, applied, completed_message, message, op, options, outcomes, part, rejection,
};
use crate::ledger::{Backend, OpOutcome, RecordKind, RejectReason};

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

fn stored(fx: &Fixture, sql: &str) -> Value {
    let json: String = fx.raw().query_row(sql, [], |r| r.get(0)).unwrap();
    serde_json::from_str(&json).unwrap()
}

#[tokio::test]
async fn a_finished_tool_call_does_not_go_back_to_running() {
    let fx = Fixture::new().await;
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
    let part = stored(&fx, "SELECT json FROM parts WHERE id = 'prt_t'");
    assert_eq!(part["state"]["status"], "error");
}

#[tokio::test]
async fn an_ended_text_or_reasoning_part_keeps_its_end() {
    let fx = Fixture::new().await;
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
    let part = stored(&fx, "SELECT json FROM parts WHERE id = 'prt_a'");
    assert_eq!(part["time"]["end"], 9);
}

#[tokio::test]
async fn a_session_does_not_go_back_to_an_older_update() {
    let fx = Fixture::new().await;
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
    let session = stored(&fx, "SELECT json FROM sessions");
    assert_eq!(session["title"], "after no time");
}

#[tokio::test]
async fn a_part_before_its_message_is_kept_and_joins_it_when_it_arrives() {
    let fx = Fixture::new().await;
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
    assert_eq!(fx.count("SELECT count(*) FROM parts"), 0);
    // A finished message still takes its parts in any order.
    let ack = fx
        .append(vec![
            op("p3", OpKind::PartUpsert, part("prt_3", "msg_2")),
            op("m2", OpKind::MessageUpsert, completed_message("msg_2")),
        ])
        .await;
    assert_eq!(outcomes(&ack), applied(&[7, 8]));
}

#[tokio::test]
async fn the_same_model_id_from_two_providers_is_two_records() {
    let fx = Fixture::new().await;
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

#[tokio::test]
async fn a_version_4_database_gains_progress_columns_and_parts_without_their_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    {
        // A file as a version-4 build left it: one share with a session, a
        // finished and an unfinished part of each ordered type, and a model.
        let mut raw = Connection::open(&path).unwrap();
        let tx = raw.transaction().unwrap();
        for sql in &MIGRATIONS[..4] {
            tx.execute_batch(sql).unwrap();
        }
        tx.pragma_update(None, "user_version", 4).unwrap();
        tx.execute_batch(
            r#"
            INSERT INTO shares (id, session_id, project_id, parent_session_id, title,
                                owner_token_id, created_at, updated_at)
                VALUES ('sh_1', 'ses_1', 'prj', '', 't', 'agt', 1, 1);
            INSERT INTO sessions VALUES ('sh_1', '{"id":"ses_1","time":{"updated":42}}');
            INSERT INTO messages VALUES ('sh_1', 'msg_1', 0, '{"id":"msg_1","role":"user"}');
            INSERT INTO parts VALUES
                ('sh_1', 'p_done', 'msg_1', '{"id":"p_done","type":"tool","state":{"status":"completed"}}'),
                ('sh_1', 'p_run', 'msg_1', '{"id":"p_run","type":"tool","state":{"status":"running"}}'),
                ('sh_1', 'p_end', 'msg_1', '{"id":"p_end","type":"text","time":{"end":3}}'),
                ('sh_1', 'p_open', 'msg_1', '{"id":"p_open","type":"reasoning","time":{}}'),
                ('sh_1', 'p_step', 'msg_1', '{"id":"p_step","type":"step-finish","time":{"end":3}}');
            INSERT INTO models VALUES
                ('sh_1', 'x', '{"id":"x","providerID":"openrouter"}'),
                ('sh_1', 'y', '{"id":"y"}');
            "#,
        )
        .unwrap();
        tx.commit().unwrap();
    }
    let backend = SqliteBackend::open(&options(path.clone(), 8)).unwrap();
    backend.close().await;

    let raw = Connection::open(&path).unwrap();
    let version: i64 = raw
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION as i64);
    let finished: Vec<(String, bool)> = raw
        .prepare("SELECT id, finished FROM parts ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let expected = [
        ("p_done", true),
        ("p_end", true),
        ("p_open", false),
        ("p_run", false),
        ("p_step", false),
    ]
    .map(|(id, done)| (id.to_owned(), done));
    assert_eq!(finished, expected);
    let updated: Option<i64> = raw
        .query_row("SELECT updated FROM sessions", [], |r| r.get(0))
        .unwrap();
    assert_eq!(updated, Some(42));
    let models: Vec<String> = raw
        .prepare("SELECT id FROM models ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(models, ["openrouter/x", "y"]);

    // Parts now belong to their share: deleting it still takes them.
    raw.pragma_update(None, "foreign_keys", "ON").unwrap();
    raw.execute("DELETE FROM shares WHERE id = 'sh_1'", [])
        .unwrap();
    let left: i64 = raw
        .query_row("SELECT count(*) FROM parts", [], |r| r.get(0))
        .unwrap();
    assert_eq!(left, 0);
}
