//! One agent's opencode-like op stream, on a clock: what the opencode plugin journals
//! while an assistant answers, at the rates of issue 14's fleet target.
//!
//! Three trains of ops, each at a fixed period from a random phase, so a thousand agents
//! started together do not tick together (and each starts part-way into its message,
//! its text part as long as that much streaming made it):
//!
//! - every 1/30 s a `part.delta` of 8-40 bytes to the current text part, as the plugin
//!   maps `message.part.delta` (`{"partID", "messageID", "field": "text", "delta"}`);
//! - every second one snapshot, in turn: the text part whole (its text so far), the
//!   assistant message with its running token counts, a tool part moving from pending to
//!   running to completed;
//! - every 20 s (`--message-seconds`) a new message: the current one completed, a new
//!   assistant message, its empty text part. The text part grows until then (about
//!   700 bytes a second), and the server rewrites it whole for each delta, so this
//!   period sets what a delta costs.
//!
//! Each train's next op is due a period after the previous one was *due*, not after it
//! was sent: a slow server leaves ops waiting (a backlog, older ops at the ack), it never
//! makes the agent produce fewer.

use std::time::{Duration, Instant};

use capsync_tests::client::{OpKind, OpSpec};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};

/// `part.delta` ops per second.
pub const DELTAS_PER_SEC: u32 = 30;
/// One snapshot (part or message) this often.
pub const SNAPSHOT_EVERY: Duration = Duration::from_secs(1);
/// Ops a new message takes: the old one completed, the new one, its text part.
const OPS_PER_MESSAGE: f64 = 3.0;

/// Ops per second one agent offers, on average, with a new message every
/// `message_every`.
pub fn ops_per_sec(message_every: Duration) -> f64 {
    f64::from(DELTAS_PER_SEC)
        + 1.0 / SNAPSHOT_EVERY.as_secs_f64()
        + OPS_PER_MESSAGE / message_every.as_secs_f64()
}

/// Words a delta is made of: what a model streams, with some multi-byte UTF-8.
const WORDS: &[&str] = &[
    "the ",
    "login ",
    "handler ",
    "fails ",
    "when ",
    "the ",
    "email ",
    "has ",
    "uppercase ",
    "letters, ",
    "so ",
    "`find_user_by_email` ",
    "should ",
    "normalise ",
    "it → ",
    "first. ",
    "✓ ",
    "\n\n",
    "```rust\n",
    "```\n",
];

/// An op that became due, and when.
#[derive(Debug)]
pub struct DueOp {
    pub due: Instant,
    pub op: OpSpec,
}

/// The three trains' next due times.
#[derive(Clone, Copy, Debug)]
struct Clock {
    delta: Instant,
    snapshot: Instant,
    message: Instant,
}

/// Where in its period each train starts, as a fraction of it (drawn once per agent).
#[derive(Clone, Copy, Debug)]
struct Phases {
    delta: f64,
    snapshot: f64,
    message: f64,
}

impl Phases {
    fn random(rng: &mut StdRng) -> Self {
        Self {
            delta: rng.random_range(0.0..1.0),
            snapshot: rng.random_range(0.0..1.0),
            message: rng.random_range(0.0..1.0),
        }
    }

    /// Each train's first op at its phase of its first period after `start`.
    fn clock(&self, start: Instant, message_every: Duration) -> Clock {
        Clock {
            delta: start + delta_period().mul_f64(self.delta),
            snapshot: start + SNAPSHOT_EVERY.mul_f64(self.snapshot),
            message: start + message_every.mul_f64(self.message),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Train {
    Delta,
    Snapshot,
    Message,
}

/// One agent's session, as its ops build it.
#[derive(Debug)]
pub struct Traffic {
    rng: StdRng,
    index: usize,
    /// How often a new message starts.
    message_every: Duration,
    phases: Phases,
    clock: Clock,
    /// Ops made so far: op ids are `oce-evt_<agent>_<n>`, as the plugin names them.
    events: u64,
    /// Records (messages, parts) made so far, for their ids.
    records: u64,
    /// Snapshots made so far: which one comes next.
    snapshots: u64,
    /// The user message every assistant message answers.
    user: String,
    message: Message,
    /// The text part the deltas go to, and its text so far.
    part: String,
    text: String,
    /// The tool part of the snapshots, and how far along it is (0 pending, 1 running,
    /// 2 completed; then a new one).
    tool: String,
    tool_stage: u8,
}

/// The assistant message being written.
#[derive(Debug)]
struct Message {
    id: String,
    created: i64,
    output_tokens: u64,
}

impl Traffic {
    /// Agent `index`'s stream, with random phases.
    pub fn new(index: usize, seed: u64, message_every: Duration) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let phases = Phases::random(&mut rng);
        let mut traffic = Self {
            rng,
            index,
            message_every,
            phases,
            clock: phases.clock(Instant::now(), message_every),
            events: 0,
            records: 0,
            snapshots: 0,
            user: String::new(),
            message: Message {
                id: String::new(),
                created: 0,
                output_tokens: 0,
            },
            part: String::new(),
            text: String::new(),
            tool: String::new(),
            tool_stage: 0,
        };
        traffic.user = traffic.record_id("msg");
        traffic.message.id = traffic.record_id("msg");
        traffic.part = traffic.record_id("prt");
        traffic.tool = traffic.record_id("prt");
        traffic
    }

    /// Starts the trains at `start`: the stream begins when the agent starts
    /// streaming, not when it was set up.
    pub fn start(&mut self, start: Instant) {
        self.clock = self.phases.clock(start, self.message_every);
    }

    pub fn session_id(&self) -> String {
        session_id(self.index)
    }

    /// What a share holds before the stream starts: the session, a user message with its
    /// prompt, the assistant message and its text part. The message has been streaming
    /// for as long as its phase says (the rest of its period comes before the next one),
    /// so its part holds that much text already: the fleet starts with the part sizes
    /// of a fleet that has been streaming for a while, as deltas cost more on bigger
    /// parts.
    pub fn setup_ops(&mut self) -> Vec<OpSpec> {
        let streamed = self.message_every.mul_f64(1.0 - self.phases.message);
        for _ in 0..(streamed.as_secs_f64() * f64::from(DELTAS_PER_SEC)) as u64 {
            let delta = self.delta_text();
            self.text.push_str(&delta);
            self.message.output_tokens += 1;
        }
        let session = self.session_id();
        let user = self.user.clone();
        let prompt = self.record_id("prt");
        let mut ops = vec![
            self.op(
                OpKind::SessionUpsert,
                json!({"id": session, "projectID": "prj_fleet", "title": format!("fleet agent {}", self.index),
                       "time": {"created": 1_763_712_000_000_i64}}),
            ),
            self.op(
                OpKind::MessageUpsert,
                json!({"id": user, "sessionID": session, "role": "user",
                       "time": {"created": 1_763_712_000_000_i64}}),
            ),
            self.op(
                OpKind::PartUpsert,
                json!({"id": prompt, "messageID": user, "sessionID": session, "type": "text",
                       "text": "Why does the login fail for some users?"}),
            ),
        ];
        ops.extend(self.open_message());
        ops
    }

    /// When the next op is due.
    pub fn next_due(&self) -> Instant {
        self.clock
            .delta
            .min(self.clock.snapshot)
            .min(self.clock.message)
    }

    /// Appends every op due by `now` to `out`, in the order they fell due.
    pub fn take_due(&mut self, now: Instant, out: &mut Vec<DueOp>) {
        loop {
            let (train, due) = self.next_train();
            if due > now {
                return;
            }
            let ops = match train {
                Train::Delta => {
                    self.clock.delta += delta_period();
                    vec![self.delta()]
                }
                Train::Snapshot => {
                    self.clock.snapshot += SNAPSHOT_EVERY;
                    vec![self.snapshot()]
                }
                Train::Message => {
                    self.clock.message += self.message_every;
                    self.new_message()
                }
            };
            out.extend(ops.into_iter().map(|op| DueOp { due, op }));
        }
    }

    fn next_train(&self) -> (Train, Instant) {
        let Clock {
            delta,
            snapshot,
            message,
        } = self.clock;
        if message <= delta && message <= snapshot {
            (Train::Message, message)
        } else if snapshot <= delta {
            (Train::Snapshot, snapshot)
        } else {
            (Train::Delta, delta)
        }
    }

    /// 8 to 40 bytes of words.
    fn delta_text(&mut self) -> String {
        let target = self.rng.random_range(8..=40);
        let mut delta = String::new();
        while delta.len() < target {
            delta.push_str(WORDS[self.rng.random_range(0..WORDS.len())]);
        }
        delta
    }

    fn delta(&mut self) -> OpSpec {
        let delta = self.delta_text();
        self.text.push_str(&delta);
        self.message.output_tokens += 1;
        let payload = json!({"partID": self.part, "messageID": self.message.id,
                             "field": "text", "delta": delta});
        self.op(OpKind::PartDelta, payload)
    }

    /// The snapshots take turns: text part, message, tool part.
    fn snapshot(&mut self) -> OpSpec {
        self.snapshots += 1;
        match self.snapshots % 3 {
            0 => self.text_part_op(),
            1 => self.message_op(false),
            _ => self.tool_op(),
        }
    }

    /// The current message completed, then a new one with its text part.
    fn new_message(&mut self) -> Vec<OpSpec> {
        let done = self.message_op(true);
        self.message = Message {
            id: self.record_id("msg"),
            created: self.message.created + 20_000,
            output_tokens: 0,
        };
        self.part = self.record_id("prt");
        self.text.clear();
        let mut ops = vec![done];
        ops.extend(self.open_message());
        ops
    }

    /// The current (new) message and its empty text part.
    fn open_message(&mut self) -> Vec<OpSpec> {
        if self.message.created == 0 {
            self.message.created = 1_763_712_001_000;
        }
        vec![self.message_op(false), self.text_part_op()]
    }

    fn message_op(&mut self, completed: bool) -> OpSpec {
        let Message {
            id,
            created,
            output_tokens,
        } = &self.message;
        let mut time = json!({"created": created});
        if completed {
            time["completed"] = json!(created + 19_000);
        }
        let payload = json!({"id": id, "sessionID": self.session_id(), "role": "assistant",
                             "parentID": self.user, "modelID": "claude-sonnet-4",
                             "providerID": "anthropic", "time": time,
                             "tokens": {"input": 12_000, "output": output_tokens}});
        self.op(OpKind::MessageUpsert, payload)
    }

    fn text_part_op(&mut self) -> OpSpec {
        let payload = json!({"id": self.part, "messageID": self.message.id,
                             "sessionID": self.session_id(), "type": "text", "text": self.text,
                             "time": {"start": self.message.created}});
        self.op(OpKind::PartUpsert, payload)
    }

    /// A tool call's next state; after `completed`, a new call starts.
    fn tool_op(&mut self) -> OpSpec {
        if self.tool_stage == 3 {
            self.tool = self.record_id("prt");
            self.tool_stage = 0;
        }
        let input = json!({"filePath": format!("src/auth/module_{}.rs", self.records % 7)});
        let state = match self.tool_stage {
            0 => json!({"status": "pending", "input": {}}),
            1 => json!({"status": "running", "input": input, "time": {"start": 1}}),
            _ => json!({"status": "completed", "input": input, "title": "read",
                        "output": "fn find_user_by_email(email: &str) -> Option<User> { … }",
                        "metadata": {}, "time": {"start": 1, "end": 2}}),
        };
        self.tool_stage += 1;
        let payload = json!({"id": self.tool, "messageID": self.message.id,
                             "sessionID": self.session_id(), "type": "tool",
                             "callID": format!("call_{}", self.tool), "tool": "read", "state": state});
        self.op(OpKind::PartUpsert, payload)
    }

    fn op(&mut self, kind: OpKind, payload: Value) -> OpSpec {
        self.events += 1;
        OpSpec::new(
            format!("oce-evt_{:04}_{:08}", self.index, self.events),
            kind,
            payload,
        )
    }

    fn record_id(&mut self, prefix: &str) -> String {
        self.records += 1;
        format!("{prefix}_{:04}_{:06}", self.index, self.records)
    }
}

fn delta_period() -> Duration {
    Duration::from_secs(1) / DELTAS_PER_SEC
}

pub fn session_id(index: usize) -> String {
    format!("ses_fleet_{index:04}")
}
