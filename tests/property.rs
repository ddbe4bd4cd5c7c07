//! Property: whatever order batches arrive in, however often they are retried and over how
//! many connections, each op applies at most once, the cursor has no gaps, every ack agrees
//! with the log, and the snapshot is what the reference model computes from the log.
//!
//! Random op sequences for a session are cut into batches; the batches (each at least once,
//! some several times) are sent in a shuffled order, spread over 1–3 concurrent connections.
//! Then, as an outbox would, every op not yet acked as applied is resent in order until that
//! makes no more progress. Two flavours:
//! - with `dependsOn` chains (each op depends on the previous op touching the same message,
//!   or the same session-level record): every op must end up applied, and the result must
//!   equal the model of the ops in their original order;
//! - without: reordering makes some ops invalid when they arrive (a delta before its part,
//!   a part after its message was removed); the ops that never apply must be ones the final
//!   state refuses.
//!
//! One server for all cases, a new share per case. The proptest seed is printed and replays
//! with `CAPSYNC_FAULT_SEED`; `PROPTEST_CASES` changes the number of cases.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};

use capsync_client::{LoggedOp, OpKind, OpOutcome, OpSpec, Snapshot, WriterClient};
use capsync_shared::Cursor;
use capsync_tests::model::{Model, check_log, document_difference, model_from_log, read_log};
use capsync_tests::workload::seed;
use capsync_tests::{TestServer, admin, agent, batch, run_local, share};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde_json::json;

const SESSION: &str = "ses_prop";

/// One step of an agent's work; indexes pick among the records that exist at that point.
#[derive(Debug, Clone)]
enum Action {
    NewMessage {
        user: bool,
    },
    UpdateMessage {
        msg: usize,
        complete: bool,
    },
    NewPart {
        msg: usize,
        tool: bool,
    },
    RewritePart {
        part: usize,
    },
    Delta {
        part: usize,
        text: String,
        summary: bool,
    },
    RemovePart {
        part: usize,
    },
    RemoveMessage {
        msg: usize,
    },
    SetDiffs {
        files: usize,
    },
    UpsertModel {
        model: usize,
    },
    UpsertSession {
        title: usize,
    },
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        3 => any::<bool>().prop_map(|user| Action::NewMessage { user }),
        2 => (any::<usize>(), any::<bool>())
            .prop_map(|(msg, complete)| Action::UpdateMessage { msg, complete }),
        4 => (any::<usize>(), any::<bool>()).prop_map(|(msg, tool)| Action::NewPart { msg, tool }),
        2 => any::<usize>().prop_map(|part| Action::RewritePart { part }),
        8 => (any::<usize>(), "[a-z é→]{1,6}", any::<bool>())
            .prop_map(|(part, text, summary)| Action::Delta { part, text, summary }),
        1 => any::<usize>().prop_map(|part| Action::RemovePart { part }),
        1 => any::<usize>().prop_map(|msg| Action::RemoveMessage { msg }),
        1 => (0..3usize).prop_map(|files| Action::SetDiffs { files }),
        1 => (0..2usize).prop_map(|model| Action::UpsertModel { model }),
        1 => (0..3usize).prop_map(|title| Action::UpsertSession { title }),
    ]
}

/// Turns actions into ops that are valid in order, each tagged with the record family it
/// touches (a message with its parts, or one session-level record).
#[derive(Default)]
struct Builder {
    ops: Vec<(OpSpec, String)>,
    /// Live messages: id and whether completed.
    messages: Vec<(String, bool)>,
    /// Live parts: id, message id, whether a tool part.
    parts: Vec<(String, String, bool)>,
    /// Parts rewritten as finished (completed tool calls): a delta to them is stale.
    finished_parts: HashSet<String>,
    next: usize,
}

impl Builder {
    fn push(&mut self, family: &str, kind: OpKind, payload: serde_json::Value) {
        let id = format!("op{:04}:{}", self.ops.len(), kind.as_str());
        self.ops
            .push((OpSpec::new(id, kind, payload), family.to_owned()));
    }

    fn fresh(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}_{:04}", self.next)
    }

    fn build(actions: &[Action]) -> Vec<(OpSpec, String)> {
        let mut b = Self::default();
        b.push(
            "session",
            OpKind::SessionUpsert,
            json!({"id": SESSION, "title": "start"}),
        );
        for action in actions {
            b.act(action);
        }
        b.ops
    }

    fn act(&mut self, action: &Action) {
        match *action {
            Action::NewMessage { user } => {
                let id = self.fresh("msg");
                let role = if user { "user" } else { "assistant" };
                self.push(
                    &id,
                    OpKind::MessageUpsert,
                    json!({"id": id, "sessionID": SESSION, "role": role, "time": {"created": self.next}}),
                );
                self.messages.push((id, false));
            }
            Action::UpdateMessage { msg, complete } => {
                let Some(i) = pick(msg, self.messages.len()) else {
                    return;
                };
                let (id, done) = self.messages[i].clone();
                // A completed message only takes completed upserts.
                let complete = complete || done;
                let time = if complete {
                    json!({"created": 1, "completed": self.next})
                } else {
                    json!({"created": 1})
                };
                self.push(
                    &id,
                    OpKind::MessageUpsert,
                    json!({"id": id, "sessionID": SESSION, "role": "assistant", "time": time, "tokens": {"output": self.next}}),
                );
                self.next += 1;
                self.messages[i].1 = complete;
            }
            Action::NewPart { msg, tool } => {
                let Some(i) = pick(msg, self.messages.len()) else {
                    return;
                };
                let msg_id = self.messages[i].0.clone();
                let id = self.fresh("prt");
                let payload = if tool {
                    json!({"id": id, "messageID": msg_id, "sessionID": SESSION, "type": "tool", "tool": "bash", "state": {"status": "pending"}})
                } else {
                    json!({"id": id, "messageID": msg_id, "sessionID": SESSION, "type": "text", "text": ""})
                };
                self.push(&msg_id, OpKind::PartUpsert, payload);
                self.parts.push((id, msg_id, tool));
            }
            Action::RewritePart { part } => {
                let Some(i) = pick(part, self.parts.len()) else {
                    return;
                };
                let (id, msg_id, tool) = self.parts[i].clone();
                let payload = if tool {
                    json!({"id": id, "messageID": msg_id, "type": "tool", "tool": "bash", "state": {"status": "completed", "output": self.next}})
                } else {
                    json!({"id": id, "messageID": msg_id, "type": "text", "text": format!("rewritten {}", self.next)})
                };
                self.next += 1;
                if tool {
                    self.finished_parts.insert(id.clone());
                }
                self.push(&msg_id, OpKind::PartUpsert, payload);
            }
            Action::Delta {
                part,
                ref text,
                summary,
            } => {
                let Some(i) = pick(part, self.parts.len()) else {
                    return;
                };
                let (id, msg_id, _) = self.parts[i].clone();
                if self.finished_parts.contains(&id) {
                    return;
                }
                let payload = if summary {
                    json!({"partID": id, "delta": text, "field": "summary"})
                } else {
                    json!({"partID": id, "delta": text})
                };
                self.push(&msg_id, OpKind::PartDelta, payload);
            }
            Action::RemovePart { part } => {
                let Some(i) = pick(part, self.parts.len()) else {
                    return;
                };
                let (id, msg_id, _) = self.parts.remove(i);
                self.push(&msg_id, OpKind::PartRemove, json!({"partID": id}));
            }
            Action::RemoveMessage { msg } => {
                let Some(i) = pick(msg, self.messages.len()) else {
                    return;
                };
                let (id, _) = self.messages.remove(i);
                self.parts.retain(|(_, m, _)| *m != id);
                self.push(&id, OpKind::MessageRemove, json!({"messageID": id}));
            }
            Action::SetDiffs { files } => {
                let diffs: Vec<_> = (0..files)
                    .map(|f| json!({"file": format!("f{f}.rs"), "additions": self.next}))
                    .collect();
                self.next += 1;
                self.push("diffs", OpKind::DiffSet, json!({ "diffs": diffs }));
            }
            Action::UpsertModel { model } => {
                let id = format!("model-{model}");
                self.push(
                    &id,
                    OpKind::ModelUpsert,
                    json!({"id": id, "name": format!("v{}", self.next)}),
                );
                self.next += 1;
            }
            Action::UpsertSession { title } => {
                self.push(
                    "session",
                    OpKind::SessionUpsert,
                    json!({"id": SESSION, "title": format!("title {title}"), "version": self.next}),
                );
                self.next += 1;
            }
        }
    }
}

fn pick(index: usize, len: usize) -> Option<usize> {
    (len > 0).then(|| index % len)
}

/// The ops, optionally with each depending on the previous op of its family.
fn ops_for(actions: &[Action], chained: bool) -> Vec<OpSpec> {
    let mut last: HashMap<String, String> = HashMap::new();
    Builder::build(actions)
        .into_iter()
        .map(|(mut op, family)| {
            if chained {
                if let Some(previous) = last.get(&family) {
                    op.depends_on = vec![previous.clone()];
                }
                last.insert(family, op.op_id.clone());
            }
            op
        })
        .collect()
}

/// A generated case.
#[derive(Debug, Clone)]
struct Case {
    actions: Vec<Action>,
    batch_size: usize,
    /// Extra sends of random batches (retries of batches whose answer was "lost").
    duplicates: Vec<prop::sample::Index>,
    /// Shuffles the sends and spreads them over the connections.
    order_seed: u64,
    connections: usize,
    chained: bool,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(action(), 1..100),
        1..6usize,
        prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        any::<u64>(),
        1..=3usize,
        any::<bool>(),
    )
        .prop_map(
            |(actions, batch_size, duplicates, order_seed, connections, chained)| Case {
                actions,
                batch_size,
                duplicates,
                order_seed,
                connections,
                chained,
            },
        )
}

/// Every outcome the server reported for each op id, over all sends.
type Seen = HashMap<String, Vec<OpOutcome>>;

async fn send(writer: &WriterClient, id: &str, ops: Vec<OpSpec>, seen: &mut Seen) {
    let ack = writer
        .append(&batch(id, ops.clone()))
        .await
        .expect("append");
    assert_eq!(ack.results.len(), ops.len());
    for (op, result) in ops.iter().zip(ack.results) {
        assert_eq!(
            result.op_id.as_str(),
            op.op_id,
            "results come in batch order"
        );
        seen.entry(op.op_id.clone())
            .or_default()
            .push(result.outcome);
    }
}

fn acked(seen: &Seen, op_id: &str) -> bool {
    seen.get(op_id).is_some_and(|outcomes| {
        outcomes
            .iter()
            .any(|o| matches!(o, OpOutcome::Applied(_) | OpOutcome::Duplicate(_)))
    })
}

/// Totals over all cases, printed at the end to show what the property exercised.
#[derive(Default)]
struct Stats {
    cases: Cell<u64>,
    ops: Cell<u64>,
    applied: Cell<u64>,
    duplicates: Cell<u64>,
    rejected: Cell<u64>,
}

impl Stats {
    fn add(&self, seen: &Seen, ops: usize) {
        self.cases.set(self.cases.get() + 1);
        self.ops.set(self.ops.get() + ops as u64);
        for outcome in seen.values().flatten() {
            let counter = match outcome {
                OpOutcome::Applied(_) => &self.applied,
                OpOutcome::Duplicate(_) => &self.duplicates,
                OpOutcome::Rejected { .. } => &self.rejected,
            };
            counter.set(counter.get() + 1);
        }
    }
}

fn run_case(
    server: &TestServer,
    agent_token: &str,
    case: &Case,
    stats: &Stats,
) -> Result<(), TestCaseError> {
    let ops = ops_for(&case.actions, case.chained);
    let batches: Vec<Vec<OpSpec>> = ops.chunks(case.batch_size).map(<[_]>::to_vec).collect();
    let mut sends: Vec<usize> = (0..batches.len()).collect();
    sends.extend(case.duplicates.iter().map(|i| i.index(batches.len())));
    let mut rng = StdRng::seed_from_u64(case.order_seed);
    sends.shuffle(&mut rng);

    let (log, snapshot, seen) = run_local(async {
        let conn = capsync_client::connect(server.addr()).await.unwrap();
        let agent = conn
            .redeem(agent_token)
            .await
            .unwrap()
            .into_agent()
            .unwrap();
        let created = share(&agent, SESSION).await;
        let token = created.writer_token.token.clone();

        // The shuffled sends, dealt round-robin to concurrent connections.
        let mut tasks = Vec::new();
        for c in 0..case.connections {
            let mine: Vec<(usize, Vec<OpSpec>)> = sends
                .iter()
                .enumerate()
                .filter(|(n, _)| n % case.connections == c)
                .map(|(n, &b)| (n, batches[b].clone()))
                .collect();
            let addr = server.addr();
            let token = token.clone();
            tasks.push(tokio::task::spawn_local(async move {
                let conn = capsync_client::connect(addr).await.unwrap();
                let writer = conn.redeem(&token).await.unwrap().into_writer().unwrap();
                let mut seen = Seen::new();
                for (n, ops) in mine {
                    send(&writer, &format!("send-{n}"), ops, &mut seen).await;
                    if n % 3 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                seen
            }));
        }
        let mut seen = Seen::new();
        for task in tasks {
            for (id, outcomes) in task.await.unwrap() {
                seen.entry(id).or_default().extend(outcomes);
            }
        }

        // The outbox's part: resend what is not acked yet, in order, while that helps.
        let writer = created.writer;
        for round in 0.. {
            let pending: Vec<OpSpec> = ops
                .iter()
                .filter(|op| !acked(&seen, &op.op_id))
                .cloned()
                .collect();
            if pending.is_empty() {
                break;
            }
            let before = pending.len();
            for (i, chunk) in pending.chunks(case.batch_size).enumerate() {
                send(
                    &writer,
                    &format!("retry-{round}-{i}"),
                    chunk.to_vec(),
                    &mut seen,
                )
                .await;
            }
            let after = ops.iter().filter(|op| !acked(&seen, &op.op_id)).count();
            if after == before {
                break;
            }
        }

        let viewer = writer.viewer();
        let log = read_log(&viewer).await;
        let snapshot = viewer.snapshot().await.unwrap();
        (log, snapshot, seen)
    });
    stats.add(&seen, ops.len());
    check(&ops, case.chained, &log, &snapshot, &seen)
}

/// Checks what one case left on the server against the acks and the model.
fn check(
    ops: &[OpSpec],
    chained: bool,
    log: &[LoggedOp],
    snapshot: &Snapshot,
    seen: &Seen,
) -> Result<(), TestCaseError> {
    // Cursors 1..=N without gaps, each op id at most once.
    let logged = check_log(log);
    prop_assert_eq!(snapshot.cursor, log.len() as u64, "snapshot cursor vs log");

    // Every ack agrees with the log, and no op was reported applied twice.
    for (op_id, outcomes) in seen {
        let mut applied = 0;
        for outcome in outcomes {
            let at = match outcome {
                OpOutcome::Applied(c) => {
                    applied += 1;
                    *c
                }
                OpOutcome::Duplicate(c) => *c,
                OpOutcome::Rejected { .. } => continue,
            };
            prop_assert!(
                at >= Cursor(1) && at.0 as usize <= logged.len(),
                "{op_id} acked at {at}"
            );
            prop_assert_eq!(
                &logged[at.0 as usize - 1],
                op_id,
                "the ack's cursor is the log's"
            );
        }
        prop_assert!(applied <= 1, "{} reported applied {} times", op_id, applied);
    }
    for op_id in &logged {
        prop_assert!(
            acked(seen, op_id),
            "{} is logged but was never acked",
            op_id
        );
    }

    // The snapshot is the model of the log, and the log is valid for the model.
    let by_id: HashMap<String, OpSpec> = ops
        .iter()
        .map(|op| (op.op_id.clone(), op.clone()))
        .collect();
    let model = model_from_log(SESSION, log, &by_id);
    if let Some(difference) = document_difference(&snapshot.to_document(), &model.document()) {
        return Err(TestCaseError::fail(format!(
            "the snapshot differs from the model of the log: {difference}"
        )));
    }

    let logged: HashSet<&str> = logged.iter().map(String::as_str).collect();
    if chained {
        // Dependencies fix the order within each family, so nothing is lost and the
        // result is the same as applying the ops in their original order.
        let missing: Vec<_> = ops
            .iter()
            .filter(|op| !logged.contains(op.op_id.as_str()))
            .map(|op| &op.op_id)
            .collect();
        prop_assert!(missing.is_empty(), "never applied: {:?}", missing);
        let expected = Model::from_ops(SESSION, ops);
        if let Some(difference) = document_difference(&snapshot.to_document(), &expected.document())
        {
            return Err(TestCaseError::fail(format!(
                "the snapshot differs from the ops in their original order: {difference}"
            )));
        }
    } else {
        // What never applied is what the final state refuses.
        for op in ops.iter().filter(|op| !logged.contains(op.op_id.as_str())) {
            let outcome = model.clone().apply(op);
            prop_assert!(
                outcome.is_rejected(),
                "{} was never applied, but the final state accepts it",
                op.op_id
            );
        }
    }
    Ok(())
}

#[test]
fn duplicated_and_reordered_batches_apply_each_op_once_and_match_the_model() {
    let seed = seed("property");
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(64);
    let config = Config {
        failure_persistence: None,
        ..Config::with_cases(cases)
    };
    let mut seed_bytes = [0u8; 32];
    for (i, chunk) in seed_bytes.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(
            &(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_le_bytes(),
        );
    }
    let mut runner = TestRunner::new_with_rng(
        config,
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );

    let server = TestServer::start();
    let agent_token = run_local(async {
        let (conn, admin) = admin(&server).await;
        agent(&conn, &admin).await.1
    });
    let stats = Stats::default();
    let result = runner.run(&case(), |case| {
        run_case(&server, &agent_token, &case, &stats)
    });
    eprintln!(
        "property: {} cases, {} ops; outcomes: {} applied, {} duplicate, {} rejected",
        stats.cases.get(),
        stats.ops.get(),
        stats.applied.get(),
        stats.duplicates.get(),
        stats.rejected.get()
    );
    if let Err(failure) = result {
        panic!("{failure}\nseed={seed}");
    }
}
