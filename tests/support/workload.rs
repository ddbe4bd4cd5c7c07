//! Seeded workloads: the ops an opencode-style agent streams while it works on a session,
//! valid when applied in order (so a correct server rejects none of them).
//!
//! Like [`super::model`] this file uses only `capsync_client`, `rand` and `serde_json`, so the
//! server's own tests can include it with `#[path]`.

use capsync_client::{OpKind, OpSpec};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};

/// The seed for a randomised test: `CAPSYNC_FAULT_SEED` when set (to replay a failure),
/// else a fresh one. Printed either way, so a failing run can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = match std::env::var("CAPSYNC_FAULT_SEED") {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("CAPSYNC_FAULT_SEED={text:?} is not a u64")),
        Err(_) => rand::random(),
    };
    eprintln!("{test}: seed={seed} (replay with CAPSYNC_FAULT_SEED={seed})");
    seed
}

/// Text fragments a delta is made of: ASCII, multi-byte UTF-8, escapes, so byte-level faults
/// cut through every kind of character.
const WORDS: &[&str] = &[
    "the ",
    "login ",
    "fails ",
    "with ",
    "a 500 ",
    "when ",
    "email ",
    "has ",
    "uppercase ",
    "letters. ",
    "`find_user_by_email` ",
    "normalisé ",
    "→ ",
    "✓ ",
    "🦀 ",
    "\"quoted\" ",
    "back\\slash ",
    "\n",
    "\t",
];

/// Builds a session's ops in the order an agent streams them.
pub struct AgentSession {
    rng: StdRng,
    session_id: String,
    ops: Vec<OpSpec>,
    /// Counter for op ids; each op id is `<session>:<n>:<kind>`.
    next_op: u64,
    /// Counter for message and part ids.
    next_record: u64,
    /// Fake clock for `time` fields, in Unix milliseconds.
    now: i64,
}

impl AgentSession {
    /// Ops for session `session_id`: its record, a model, then messages until there are at
    /// least `min_ops` ops. Deterministic for a given seed.
    pub fn generate(seed: u64, session_id: &str, min_ops: usize) -> Vec<OpSpec> {
        let mut session = Self {
            rng: StdRng::seed_from_u64(seed),
            session_id: session_id.to_owned(),
            ops: Vec::with_capacity(min_ops + 500),
            next_op: 0,
            next_record: 0,
            now: 1_763_712_000_000,
        };
        session.push(
            OpKind::SessionUpsert,
            json!({"id": session_id, "projectID": "prj_faults", "title": "fault run", "time": {"created": session.now}}),
        );
        session.push(
            OpKind::ModelUpsert,
            json!({"id": "claude-sonnet-4", "providerID": "anthropic", "name": "Claude Sonnet 4"}),
        );
        let mut turn = 0;
        while session.ops.len() < min_ops {
            session.turn(turn);
            turn += 1;
        }
        session.ops
    }

    fn push(&mut self, kind: OpKind, payload: Value) {
        self.next_op += 1;
        let id = format!("{}:{:06}:{}", self.session_id, self.next_op, kind.as_str());
        self.ops.push(OpSpec::new(id, kind, payload));
    }

    fn record_id(&mut self, prefix: &str) -> String {
        self.next_record += 1;
        format!("{prefix}_{:06}", self.next_record)
    }

    fn tick(&mut self) -> i64 {
        self.now += self.rng.random_range(1..500);
        self.now
    }

    fn words(&mut self, count: usize) -> String {
        (0..count)
            .map(|_| WORDS[self.rng.random_range(0..WORDS.len())])
            .collect()
    }

    /// One user message and the assistant's answer to it.
    fn turn(&mut self, turn: usize) {
        let sid = self.session_id.clone();
        let user = self.record_id("msg");
        let created = self.tick();
        self.push(
            OpKind::MessageUpsert,
            json!({"id": user, "sessionID": sid, "role": "user", "time": {"created": created, "completed": created}}),
        );
        let prompt = self.words(8);
        let part = self.record_id("prt");
        self.push(
            OpKind::PartUpsert,
            json!({"id": part, "messageID": user, "sessionID": sid, "type": "text", "text": prompt}),
        );

        let msg = self.record_id("msg");
        let started = self.tick();
        let info = json!({"id": msg, "sessionID": sid, "role": "assistant", "parentID": user,
                          "modelID": "claude-sonnet-4", "providerID": "anthropic",
                          "time": {"created": started}});
        self.push(OpKind::MessageUpsert, info.clone());
        let steps = self.rng.random_range(2..6);
        let mut output_tokens = 0;
        for step in 0..steps {
            let start = self.record_id("prt");
            self.push(
                OpKind::PartUpsert,
                json!({"id": start, "messageID": msg, "sessionID": sid, "type": "step-start"}),
            );
            match self.rng.random_range(0..3) {
                0 => self.reasoning(&msg),
                1 => self.tool(&msg, step),
                _ => {}
            }
            output_tokens += self.streamed_text(&msg);
            // Progress: the message's token counts change while it is still running.
            let mut running = info.clone();
            running["tokens"] = json!({"input": 1000 + step, "output": output_tokens});
            self.push(OpKind::MessageUpsert, running);
            if self.rng.random_bool(0.2) {
                // The agent dropped a step marker it no longer wants shown.
                self.push(OpKind::PartRemove, json!({"partID": start}));
            }
        }
        if self.rng.random_bool(0.3) {
            let files = self.rng.random_range(1..4);
            let diffs: Vec<Value> = (0..files)
                .map(|f| json!({"file": format!("src/file_{turn}_{f}.py"), "additions": f + 1, "deletions": 0, "before": "", "after": "x"}))
                .collect();
            self.push(OpKind::DiffSet, json!({ "diffs": diffs }));
        }
        let mut done = info;
        done["time"]["completed"] = json!(self.tick());
        done["tokens"] = json!({"input": 1000, "output": output_tokens});
        if self.rng.random_bool(0.05) {
            done["error"] = json!({"name": "MessageAbortedError", "data": {}});
        }
        self.push(OpKind::MessageUpsert, done);
        if turn > 2 && self.rng.random_bool(0.04) {
            // A revert: an earlier exchange disappears with its parts.
            self.push(OpKind::MessageRemove, json!({"id": msg}));
        }
    }

    /// A text part: created empty, grown by deltas, sometimes rewritten whole at the end.
    /// Returns the number of deltas, as a stand-in for output tokens.
    fn streamed_text(&mut self, msg: &str) -> usize {
        let sid = self.session_id.clone();
        let part = self.record_id("prt");
        self.push(
            OpKind::PartUpsert,
            json!({"id": part, "messageID": msg, "sessionID": sid, "type": "text", "text": ""}),
        );
        let deltas = self.rng.random_range(10..60);
        let mut text = String::new();
        for _ in 0..deltas {
            let count = self.rng.random_range(1..4);
            let delta = self.words(count);
            text.push_str(&delta);
            self.push(OpKind::PartDelta, json!({"partID": part, "delta": delta}));
        }
        if self.rng.random_bool(0.3) {
            let end = self.tick();
            self.push(
                OpKind::PartUpsert,
                json!({"id": part, "messageID": msg, "sessionID": sid, "type": "text", "text": text, "time": {"end": end}}),
            );
        }
        deltas
    }

    /// A reasoning part streamed into a field other than `text` first (a delta may name its
    /// field), then into `text`.
    fn reasoning(&mut self, msg: &str) {
        let sid = self.session_id.clone();
        let part = self.record_id("prt");
        self.push(
            OpKind::PartUpsert,
            json!({"id": part, "messageID": msg, "sessionID": sid, "type": "reasoning", "text": ""}),
        );
        for i in 0..self.rng.random_range(3..15) {
            let field = if i % 4 == 0 { "summary" } else { "text" };
            let delta = self.words(2);
            self.push(
                OpKind::PartDelta,
                json!({"partID": part, "delta": delta, "field": field}),
            );
        }
    }

    /// A tool call: pending, running, then completed (or error), each a whole-part upsert.
    fn tool(&mut self, msg: &str, step: usize) {
        let sid = self.session_id.clone();
        let part = self.record_id("prt");
        let call = format!("call_{part}");
        let input = json!({"filePath": format!("src/module_{step}.py")});
        let base = json!({"id": part, "messageID": msg, "sessionID": sid, "type": "tool", "callID": call, "tool": "read"});
        let mut pending = base.clone();
        pending["state"] = json!({"status": "pending", "input": {}});
        self.push(OpKind::PartUpsert, pending);
        let start = self.tick();
        let mut running = base.clone();
        running["state"] = json!({"status": "running", "input": input, "time": {"start": start}});
        self.push(OpKind::PartUpsert, running);
        let end = self.tick();
        let mut done = base;
        done["state"] = if self.rng.random_bool(0.1) {
            json!({"status": "error", "input": input, "error": "file not found", "time": {"start": start, "end": end}})
        } else {
            let output = self.words(20);
            json!({"status": "completed", "input": input, "output": output, "title": "read", "metadata": {}, "time": {"start": start, "end": end}})
        };
        self.push(OpKind::PartUpsert, done);
    }
}
