//! Parity: a session pushed whole (an export, as `capsync push` sends it) and the same session
//! streamed op by op as an agent produces it live end in identical snapshots.

use capsync_client::{OpKind, OpSpec, SessionExport, Snapshot, WriterClient, push_ops};
use capsync_tests::model::{Model, assert_same_document};
use capsync_tests::workload::{AgentSession, seed};
use capsync_tests::{TestServer, admin, agent, run_local, sample_session_path, share};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};

/// The ops an agent streams while it produces `export`: the session, models and diffs (the
/// diffs first in part), then per message its record without the completion, each part
/// built up (text by deltas, tools pending → running → done), and the final message record.
fn streamed_ops(export: &SessionExport, rng: &mut StdRng) -> Vec<OpSpec> {
    let mut ops = Vec::new();
    let mut push = |kind: OpKind, payload: Value| {
        let id = format!("live:{:05}:{}", ops.len(), kind.as_str());
        ops.push(OpSpec::new(id, kind, payload));
    };
    // The session starts untitled, as an agent creates it before the first prompt.
    let mut early = export.session.clone();
    early["title"] = json!("");
    if let Some(time) = early["time"].as_object_mut() {
        time.remove("updated");
    }
    push(OpKind::SessionUpsert, early);
    for model in &export.models {
        push(OpKind::ModelUpsert, model.clone());
    }
    for message in &export.messages {
        let mut running = message.info.clone();
        if let Some(time) = running["time"].as_object_mut() {
            time.remove("completed");
        }
        if let Some(info) = running.as_object_mut() {
            info.remove("error");
            info.remove("tokens");
            info.remove("cost");
        }
        push(OpKind::MessageUpsert, running);
        for part in &message.parts {
            match part["type"].as_str() {
                Some("text" | "reasoning") => {
                    let text = part["text"].as_str().unwrap_or("");
                    let mut first = part.clone();
                    first["text"] = json!("");
                    let ends = first
                        .get_mut("time")
                        .and_then(Value::as_object_mut)
                        .and_then(|t| t.remove("end"));
                    push(OpKind::PartUpsert, first);
                    for delta in chunks(text, rng) {
                        push(
                            OpKind::PartDelta,
                            json!({"partID": part["id"], "delta": delta}),
                        );
                    }
                    if ends.is_some() {
                        // The agent closes the part with its end time, whole.
                        push(OpKind::PartUpsert, part.clone());
                    }
                }
                Some("tool") => {
                    let mut pending = part.clone();
                    pending["state"] = json!({"status": "pending", "input": {}});
                    push(OpKind::PartUpsert, pending);
                    let mut running = part.clone();
                    running["state"] = json!({
                        "status": "running",
                        "input": part["state"]["input"],
                        "time": {"start": part["state"]["time"]["start"]},
                    });
                    push(OpKind::PartUpsert, running);
                    push(OpKind::PartUpsert, part.clone());
                }
                _ => push(OpKind::PartUpsert, part.clone()),
            }
        }
        push(OpKind::MessageUpsert, message.info.clone());
        if let Some(Value::Array(diffs)) = &export.diffs {
            // The diff list grows as the agent edits files.
            let so_far = rng.random_range(0..=diffs.len());
            push(OpKind::DiffSet, json!({"diffs": diffs[..so_far]}));
        }
    }
    push(OpKind::SessionUpsert, export.session.clone());
    if let Some(diffs) = &export.diffs {
        push(OpKind::DiffSet, json!({ "diffs": diffs }));
    }
    ops
}

/// `text` cut into 1..=12-character pieces (on character boundaries).
fn chunks(text: &str, rng: &mut StdRng) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut pieces = Vec::new();
    let mut at = 0;
    while at < chars.len() {
        let len = rng.random_range(1..=12).min(chars.len() - at);
        pieces.push(chars[at..at + len].iter().collect());
        at += len;
    }
    pieces
}

/// Sends `ops` one small batch at a time, as a live agent does, and checks each applies.
async fn stream(writer: &WriterClient, ops: &[OpSpec]) {
    for (i, op) in ops.iter().enumerate() {
        let ack = writer
            .append(&capsync_tests::batch(
                &format!("live-{i}"),
                vec![op.clone()],
            ))
            .await
            .expect("append");
        assert_eq!(ack.applied(), 1, "op {} not applied: {ack:?}", op.op_id);
    }
}

async fn snapshot(writer: &WriterClient) -> Snapshot {
    writer.viewer().snapshot().await.expect("snapshot")
}

#[test]
fn an_export_pushed_at_once_and_the_same_session_streamed_live_end_identical() {
    let seed = seed("parity");
    let mut rng = StdRng::seed_from_u64(seed);
    let export = SessionExport::from_json(
        &std::fs::read_to_string(sample_session_path()).expect("sample export"),
    )
    .expect("sample export parses");
    let server = TestServer::start();
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let whole = share(&agent, export.session_id()).await.writer;
        let live = share(&agent, export.session_id()).await.writer;

        let export_ops = export.to_ops();
        let report = push_ops(&whole, &export_ops, 0, |_| {}).await.unwrap();
        assert_eq!(report.applied, export_ops.len());
        assert!(report.rejected.is_empty(), "{:?}", report.rejected);

        let live_ops = streamed_ops(&export, &mut rng);
        assert!(
            live_ops
                .iter()
                .filter(|op| op.kind == OpKind::PartDelta)
                .count()
                > 50,
            "the live stream builds text from many deltas"
        );
        stream(&live, &live_ops).await;

        let a = snapshot(&whole).await;
        let b = snapshot(&live).await;
        assert_eq!(a.cursor, export_ops.len() as u64);
        assert_eq!(b.cursor, live_ops.len() as u64);
        let (a, b) = (a.to_document(), b.to_document());
        assert!(
            a.same_content(&b),
            "whole and live differ: {}",
            capsync_tests::model::document_difference(&b, &a).unwrap_or_default()
        );
        // Both are the export itself, and what the reference model computes.
        assert_same_document(&a, &export.to_document());
        assert_same_document(
            &b,
            &Model::from_ops(export.session_id(), &live_ops).document(),
        );

        // The export pushed on top of the live share changes no record.
        let again = push_ops(&live, &export_ops, 0, |_| {}).await.unwrap();
        assert!(!again.has_errors(), "{:?}", again.rejected);
        let c = snapshot(&live).await.to_document();
        assert_same_document(&c, &a);
    });
}

#[test]
fn a_long_streamed_session_exported_and_pushed_whole_gives_the_same_snapshot() {
    let seed = seed("parity_generated");
    let session_id = "ses_parity_gen";
    let live_ops = AgentSession::generate(seed, session_id, 2_000);
    let server = TestServer::start();
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let live = share(&agent, session_id).await.writer;
        let whole = share(&agent, session_id).await.writer;

        // Live, in small batches of 1..=4 ops as an agent flushes them.
        let mut rng = StdRng::seed_from_u64(seed);
        let mut rest = &live_ops[..];
        let mut n = 0;
        while !rest.is_empty() {
            let take = rng.random_range(1..=4).min(rest.len());
            let ack = live
                .append(&capsync_tests::batch(
                    &format!("live-{n}"),
                    rest[..take].to_vec(),
                ))
                .await
                .unwrap();
            assert_eq!(ack.applied(), take, "{ack:?}");
            rest = &rest[take..];
            n += 1;
        }
        let streamed = snapshot(&live).await.to_document();
        assert_same_document(
            &streamed,
            &Model::from_ops(session_id, &live_ops).document(),
        );

        // The live share's snapshot, read back as an export and pushed at once.
        let export = SessionExport::from_value(&streamed.to_json()).expect("snapshot as export");
        let export_ops = export.to_ops();
        assert!(export_ops.len() < live_ops.len());
        let report = push_ops(&whole, &export_ops, 0, |_| {}).await.unwrap();
        assert_eq!(report.applied, export_ops.len(), "{:?}", report.rejected);
        let pushed = snapshot(&whole).await.to_document();
        assert_same_document(&pushed, &streamed);
    });
}
