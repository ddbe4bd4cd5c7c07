//! A fake OpenAI-compatible model server for driving a real coding agent (opencode) offline:
//! `POST /v1/chat/completions` answers with Server-Sent Events, chunk by chunk, as the real
//! API streams them (reasoning as `delta.reasoning_content`, text, tool calls with their
//! arguments in pieces, `finish_reason`, then `usage` in a chunk of its own, then `[DONE]`).
//!
//! What it answers is a [`Script`] of [`Turn`]s, chosen from the request alone, never from
//! counters: the number of assistant messages after the conversation's last user message is
//! the turn to play. So a tool result coming back moves the script on, a new prompt starts
//! it again, and any number of sessions can talk to one server at once. A request without
//! tools is the agent's side question for a session title, answered with
//! [`FakeLlmBuilder::title`].
//!
//! Like [`super::proxy`] it runs on its own thread with its own runtime, bound before it
//! starts, so it is ready when [`FakeLlm::start`] returns, whatever runtime the test uses.

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::sync::watch;

/// The file the default script edits, relative to the agent's project directory.
pub const CODING_FILE: &str = "notes.txt";
/// What [`CODING_FILE`] holds before the default script's edit (the project is seeded with it).
pub const CODING_FILE_BEFORE: &str = "# Notes\nstatus: todo\n";
/// What [`CODING_FILE`] holds after the default script's edit.
pub const CODING_FILE_AFTER: &str = "# Notes\nstatus: done\n";
/// The default script's shell command: the arithmetic and the `cat` only come out right if a
/// real shell ran it in the project directory.
pub const CODING_COMMAND: &str = "echo \"capsync $((6 * 7))\" && cat notes.txt";
/// What [`CODING_COMMAND`] prints.
pub const CODING_COMMAND_OUTPUT: &str = "capsync 42\n# Notes\nstatus: todo\n";
/// The default script's reasoning, text and final answer.
pub const CODING_REASONING: &str =
    "The notes say the task is still open. Let me look at them first, then mark it done.";
pub const CODING_TEXT: &str = "Let me check the notes first.";
pub const CODING_FINAL_TEXT: &str = "Done: `notes.txt` now says the task is done.";
/// The title the fake answers when asked for one, unless the builder sets another.
pub const DEFAULT_TITLE: &str = "Mark the notes as done";

/// Token counts a turn reports in its `usage` chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// `prompt_tokens`, cached ones included (as the real API counts them).
    pub prompt: u64,
    /// `completion_tokens`, reasoning included.
    pub completion: u64,
    /// `completion_tokens_details.reasoning_tokens`.
    pub reasoning: u64,
    /// `prompt_tokens_details.cached_tokens`.
    pub cached: u64,
}

impl Default for Usage {
    fn default() -> Self {
        Self {
            prompt: 1000,
            completion: 50,
            reasoning: 0,
            cached: 0,
        }
    }
}

/// One streamed answer: what it says and does, in order.
#[derive(Debug, Clone, Default)]
pub struct Turn {
    steps: Vec<Step>,
    usage: Usage,
}

#[derive(Debug, Clone)]
enum Step {
    Reasoning(String),
    Text(String),
    Tool { name: String, arguments: Value },
    Pause(Duration),
    Hold(Gate),
}

impl Turn {
    pub fn new() -> Self {
        Self::default()
    }

    /// Streams `text` as reasoning (`delta.reasoning_content`), a few words per chunk.
    pub fn reasoning(mut self, text: impl Into<String>) -> Self {
        self.steps.push(Step::Reasoning(text.into()));
        self
    }

    /// Streams `text` as the answer (`delta.content`), a few words per chunk.
    pub fn text(mut self, text: impl Into<String>) -> Self {
        self.steps.push(Step::Text(text.into()));
        self
    }

    /// Calls tool `name` with `arguments` (its JSON streamed in pieces). A turn with a tool
    /// call finishes with `tool_calls`, so the agent runs it and asks again.
    pub fn tool(mut self, name: impl Into<String>, arguments: Value) -> Self {
        self.steps.push(Step::Tool {
            name: name.into(),
            arguments,
        });
        self
    }

    /// opencode's `bash` tool running `command`.
    pub fn bash(self, command: &str, description: &str) -> Self {
        self.tool(
            "bash",
            json!({"command": command, "description": description}),
        )
    }

    /// opencode's `edit` tool replacing `old` by `new` in `file` (relative to the project).
    pub fn edit(self, file: &str, old: &str, new: &str) -> Self {
        self.tool(
            "edit",
            json!({"filePath": file, "oldString": old, "newString": new}),
        )
    }

    /// Holds the stream for `delay` at this point: a slow model.
    pub fn pause(mut self, delay: Duration) -> Self {
        self.steps.push(Step::Pause(delay));
        self
    }

    /// Holds the stream at this point until `gate` is opened: the test decides when the
    /// model goes on, and can see the agent's state in between.
    pub fn hold(mut self, gate: &Gate) -> Self {
        self.steps.push(Step::Hold(gate.clone()));
        self
    }

    pub fn usage(mut self, usage: Usage) -> Self {
        self.usage = usage;
        self
    }

    fn calls_tools(&self) -> bool {
        self.steps.iter().any(|s| matches!(s, Step::Tool { .. }))
    }
}

/// The turns of one prompt, played in order: turn `i` answers the request that follows `i`
/// assistant messages since the last user message.
#[derive(Debug, Clone, Default)]
pub struct Script {
    turns: Vec<Turn>,
}

impl Script {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn turn(mut self, turn: Turn) -> Self {
        self.turns.push(turn);
        self
    }

    /// A small coding session: reasoning, text and a `bash` call ([`CODING_COMMAND`]); then
    /// an `edit` of [`CODING_FILE`] (to [`CODING_FILE_AFTER`]); then a plain answer.
    pub fn coding() -> Self {
        Self::new()
            .turn(
                Turn::new()
                    .reasoning(CODING_REASONING)
                    .text(CODING_TEXT)
                    .bash(CODING_COMMAND, "Show the notes")
                    .usage(Usage {
                        prompt: 1200,
                        completion: 80,
                        reasoning: 24,
                        cached: 600,
                    }),
            )
            .turn(
                Turn::new()
                    .edit(CODING_FILE, "status: todo", "status: done")
                    .usage(Usage {
                        prompt: 1400,
                        completion: 40,
                        reasoning: 0,
                        cached: 1200,
                    }),
            )
            .turn(Turn::new().text(CODING_FINAL_TEXT).usage(Usage {
                prompt: 1500,
                completion: 20,
                reasoning: 0,
                cached: 1400,
            }))
    }

    pub fn len(&self) -> usize {
        self.turns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.turns.is_empty()
    }
}

/// A point a streamed answer can be held at ([`Turn::hold`]) until the test opens it.
/// Opening before the stream gets there lets it pass straight through.
#[derive(Clone, Default)]
pub struct Gate {
    inner: Arc<GateInner>,
}

#[derive(Default)]
struct GateInner {
    /// `true` once opened; held streams wait for it.
    open: watch::Sender<bool>,
    /// How many streams have reached the gate (held or passed), for [`Gate::wait_reached`].
    reached: Mutex<u64>,
    reached_changed: Condvar,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("open", &*self.inner.open.borrow())
            .field("reached", &*self.inner.reached.lock().expect("gate lock"))
            .finish()
    }
}

impl Gate {
    pub fn new() -> Self {
        Self::default()
    }

    /// Lets every stream held here (and any that comes later) go on.
    pub fn open(&self) {
        self.inner.open.send_replace(true);
    }

    /// Blocks until a stream has reached the gate, for at most `patience`; whether one did.
    pub fn wait_reached(&self, patience: Duration) -> bool {
        let reached = self.inner.reached.lock().expect("gate lock");
        let (reached, _) = self
            .inner
            .reached_changed
            .wait_timeout_while(reached, patience, |n| *n == 0)
            .expect("gate lock");
        *reached > 0
    }

    async fn pass(&self) {
        let mut open = self.inner.open.subscribe();
        {
            *self.inner.reached.lock().expect("gate lock") += 1;
            self.inner.reached_changed.notify_all();
        }
        // A closed channel cannot happen (we hold the sender); either way, go on.
        let _ = open.wait_for(|open| *open).await;
    }
}

/// What a request was taken for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// A request without tools: the agent asking for a session title.
    Title,
    /// Turn `index` of the script chosen by `marker` (`None`: the default script). An index
    /// past the script's end is answered with a short final text.
    Turn {
        marker: Option<String>,
        index: usize,
    },
}

/// A request the fake received, in arrival order.
#[derive(Debug, Clone)]
pub struct LlmRequest {
    pub kind: RequestKind,
    /// The request's JSON body as sent (`model`, `messages`, `tools`, `stream_options`, …).
    pub body: Value,
}

/// A running fake model server. Dropping it stops it.
pub struct FakeLlm {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Configures a [`FakeLlm`] before it starts.
#[derive(Debug, Clone)]
pub struct FakeLlmBuilder {
    default: Script,
    by_marker: Vec<(String, Script)>,
    title: String,
}

struct Shared {
    default: Script,
    /// Scripts chosen when the prompt (the last user message) contains the marker, first match wins.
    by_marker: Vec<(String, Script)>,
    title: String,
    requests: Mutex<Vec<LlmRequest>>,
    /// Makes chunk and tool-call ids unique across the server's life (ids, not script choices).
    next_id: AtomicU64,
}

impl Default for FakeLlmBuilder {
    fn default() -> Self {
        Self {
            default: Script::coding(),
            by_marker: Vec::new(),
            title: DEFAULT_TITLE.to_owned(),
        }
    }
}

impl FakeLlmBuilder {
    /// The script for prompts no marker matches (default: [`Script::coding`]).
    pub fn script(mut self, script: Script) -> Self {
        self.default = script;
        self
    }

    /// Plays `script` for prompts containing `marker`, so concurrent sessions can follow
    /// different scripts.
    pub fn script_when(mut self, marker: impl Into<String>, script: Script) -> Self {
        self.by_marker.push((marker.into(), script));
        self
    }

    /// The answer to title requests (default: [`DEFAULT_TITLE`]).
    pub fn title(mut self, title: impl Into<String>) -> Self {
        self.title = title.into();
        self
    }

    pub fn start(self) -> FakeLlm {
        FakeLlm::start_with(self)
    }
}

impl FakeLlm {
    /// A fake playing [`Script::coding`] for every prompt.
    pub fn start() -> Self {
        Self::builder().start()
    }

    pub fn builder() -> FakeLlmBuilder {
        FakeLlmBuilder::default()
    }

    fn start_with(config: FakeLlmBuilder) -> Self {
        let listener = StdListener::bind("127.0.0.1:0").expect("bind the fake LLM");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("fake LLM address");
        let shared = Arc::new(Shared {
            default: config.default,
            by_marker: config.by_marker,
            title: config.title,
            requests: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .fallback(|| async {
                (
                    StatusCode::NOT_FOUND,
                    axum::Json(json!({"error": {"message": "the fake LLM serves only POST /v1/chat/completions"}})),
                )
            })
            .with_state(shared.clone());
        let thread = std::thread::Builder::new()
            .name("fake-llm".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("fake LLM runtime");
                runtime.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    tokio::select! {
                        _ = axum::serve(listener, app) => {}
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime drops every connection task, streams held at a gate
                // included (a graceful shutdown would wait for those forever).
            })
            .expect("spawn the fake LLM thread");
        Self {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The OpenAI-style base URL, as opencode's `@ai-sdk/openai-compatible` provider takes it
    /// (`options.baseURL`): `http://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<LlmRequest> {
        self.shared.requests.lock().expect("requests lock").clone()
    }
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Shared {
    /// The turn a request asks for, decided from its messages alone.
    fn choose(&self, request: &Value) -> (RequestKind, Turn) {
        let has_tools = request["tools"].as_array().is_some_and(|t| !t.is_empty());
        if !has_tools {
            let turn = Turn::new().text(self.title.clone()).usage(Usage {
                prompt: 300,
                completion: 8,
                reasoning: 0,
                cached: 0,
            });
            return (RequestKind::Title, turn);
        }
        let messages = request["messages"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let last_user = messages.iter().rposition(|m| m["role"] == "user");
        let prompt = last_user
            .map(|i| message_text(&messages[i]))
            .unwrap_or_default();
        let index = messages[last_user.map_or(0, |i| i + 1)..]
            .iter()
            .filter(|m| m["role"] == "assistant")
            .count();
        let (marker, script) = self
            .by_marker
            .iter()
            .find(|(marker, _)| prompt.contains(marker.as_str()))
            .map_or((None, &self.default), |(marker, script)| {
                (Some(marker.clone()), script)
            });
        let turn = script
            .turns
            .get(index)
            .cloned()
            .unwrap_or_else(|| Turn::new().text("(the fake LLM's script has ended)"));
        (RequestKind::Turn { marker, index }, turn)
    }
}

/// The text of a chat message, whether its content is a string or a list of parts.
fn message_text(message: &Value) -> String {
    match &message["content"] {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

async fn chat_completions(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let request: Value = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, format!("not JSON: {e}")).into_response();
        }
    };
    if request["stream"] != true {
        // opencode always streams; a non-streaming caller is a harness bug worth a clear answer.
        return (
            StatusCode::BAD_REQUEST,
            "the fake LLM only streams (set \"stream\": true)",
        )
            .into_response();
    }
    let (kind, turn) = shared.choose(&request);
    let model = request["model"].as_str().unwrap_or("fake").to_owned();
    let with_usage = request["stream_options"]["include_usage"] == true;
    shared
        .requests
        .lock()
        .expect("requests lock")
        .push(LlmRequest {
            kind,
            body: request,
        });
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let events = stream_events(&turn, &model, id, with_usage);
    let stream = futures::stream::unfold(events.into_iter(), |mut rest| async move {
        loop {
            match rest.next()? {
                Event::Data(data) => return Some((Ok::<_, Infallible>(Bytes::from(data)), rest)),
                Event::Pause(delay) => tokio::time::sleep(delay).await,
                Event::Hold(gate) => gate.pass().await,
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .expect("SSE response")
}

enum Event {
    /// An SSE frame, `data: …\n\n`.
    Data(String),
    Pause(Duration),
    Hold(Gate),
}

/// The SSE frames of `turn`, with its pauses and gates in place.
fn stream_events(turn: &Turn, model: &str, id: u64, with_usage: bool) -> Vec<Event> {
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let chunk_id = format!("chatcmpl-fake{id}");
    let frame = |choices: Value, usage: Option<Value>| {
        let mut chunk = json!({
            "id": chunk_id, "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": choices,
        });
        if let Some(usage) = usage {
            chunk["usage"] = usage;
        }
        Event::Data(format!("data: {chunk}\n\n"))
    };
    // The real API names the role once, in the first delta.
    let mut role = Some("assistant");
    let mut delta = |mut delta: Value| {
        if let Some(role) = role.take() {
            delta["role"] = role.into();
        }
        frame(
            json!([{"index": 0, "delta": delta, "finish_reason": null}]),
            None,
        )
    };
    let mut events = Vec::new();
    let mut tool_index = 0;
    for step in &turn.steps {
        match step {
            Step::Reasoning(text) => events.extend(
                pieces(text)
                    .into_iter()
                    .map(|piece| delta(json!({"reasoning_content": piece}))),
            ),
            Step::Text(text) => {
                events.extend(
                    pieces(text)
                        .into_iter()
                        .map(|piece| delta(json!({"content": piece}))),
                );
            }
            Step::Tool { name, arguments } => {
                let call_id = format!("call_fake{id}_{tool_index}");
                events.push(delta(json!({"tool_calls": [{
                    "index": tool_index, "id": call_id, "type": "function",
                    "function": {"name": name, "arguments": ""},
                }]})));
                let arguments = arguments.to_string();
                let (first, second) =
                    arguments.split_at(char_boundary(&arguments, arguments.len() / 2));
                for part in [first, second] {
                    events.push(delta(json!({"tool_calls": [{
                        "index": tool_index, "function": {"arguments": part},
                    }]})));
                }
                tool_index += 1;
            }
            Step::Pause(delay) => events.push(Event::Pause(*delay)),
            Step::Hold(gate) => events.push(Event::Hold(gate.clone())),
        }
    }
    let finish = if turn.calls_tools() {
        "tool_calls"
    } else {
        "stop"
    };
    events.push(frame(
        json!([{"index": 0, "delta": {}, "finish_reason": finish}]),
        None,
    ));
    if with_usage {
        let usage = turn.usage;
        events.push(frame(
            json!([]),
            Some(json!({
                "prompt_tokens": usage.prompt,
                "completion_tokens": usage.completion,
                "total_tokens": usage.prompt + usage.completion,
                "prompt_tokens_details": {"cached_tokens": usage.cached},
                "completion_tokens_details": {"reasoning_tokens": usage.reasoning},
            })),
        ));
    }
    events.push(Event::Data("data: [DONE]\n\n".to_owned()));
    events
}

/// `text` in chunks of about three words, as a model streams it.
fn pieces(text: &str) -> Vec<String> {
    let words: Vec<&str> = text.split_inclusive(' ').collect();
    words.chunks(3).map(|c| c.concat()).collect()
}

/// The largest char boundary of `s` at or below `at`.
fn char_boundary(s: &str, mut at: usize) -> usize {
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}
