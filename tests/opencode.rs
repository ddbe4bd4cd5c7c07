//! The real opencode (the npm package pinned in `tests/opencode/`) driven offline by the
//! harness (`capsync_tests::opencode`) against the fake model (`capsync_tests::fake_llm`):
//! a prompted session holds every kind of part the fake's script asks for; shared to a real
//! capsync server through opencode's built-in share client (its `enterprise.url` from
//! `capsync opencode config`), capsync holds every record as opencode exports it, the link
//! imports into another opencode, unsharing kills link and secret, auto-share's two creates
//! make one working share, a sync held back behind a newer one does not win, and the share
//! page shows the real session in headless Chromium (screenshots in
//! `target/test-screenshots/3*.png`); capsync's journal plugin (`opencode/`) records every
//! change as opencode publishes it; sessions prompted at once follow their own scripts, and
//! a held stream waits.
//!
//! Without opencode installed the tests say they skipped; with `REQUIRE_OPENCODE=1` (as in
//! CI) a missing opencode is a failure instead. Install it with
//! `npm install --prefix tests/opencode --no-save`.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use capsync_tests::fake_llm::*;
use capsync_tests::opencode::{self, MODEL_ID, OpenCode, PROVIDER_ID};
use capsync_tests::{TestServer, admin, agent, run_local};
use serde_json::{Value, json};

/// Longest wait for capsync to hold what opencode has.
const PATIENCE: Duration = Duration::from_secs(30);

const PROMPT: &str = "Please mark the task in notes.txt as done.";

mod opencode_plugin;

#[test]
fn a_prompted_session_exports_every_kind_of_part() {
    let Some(binary) = opencode::binary_or_skip() else {
        return;
    };
    let llm = FakeLlm::start();
    let oc = OpenCode::start(&binary, &llm);
    let session = oc.create_session();

    let reply = oc.prompt(&session, PROMPT);
    // The prompt call answers once the agent has stopped, with its last message.
    assert_eq!(reply["info"]["role"], "assistant");
    assert_eq!(reply["info"]["finish"], "stop");
    assert_eq!(text_of(&reply["parts"]), [CODING_FINAL_TEXT]);
    // The edit tool really edited the project.
    let notes = std::fs::read_to_string(oc.project_dir().join(CODING_FILE)).expect("notes");
    assert_eq!(notes, CODING_FILE_AFTER);
    // The title comes from a request of its own that the agent does not wait for.
    oc.wait_for_session(&session, "the generated title", |s| {
        s["title"] == DEFAULT_TITLE
    });

    let export = oc.export(&session);
    assert_eq!(export["info"]["id"], session);
    assert_eq!(export["info"]["title"], DEFAULT_TITLE);
    assert_eq!(export["info"]["model"]["providerID"], PROVIDER_ID);
    let messages = export["messages"].as_array().expect("messages");
    let roles: Vec<&str> = messages
        .iter()
        .map(|m| m["info"]["role"].as_str().expect("role"))
        .collect();
    // One assistant message per model turn: bash, edit, the answer.
    assert_eq!(roles, ["user", "assistant", "assistant", "assistant"]);
    let user = &messages[0];
    assert_eq!(text_of(&user["parts"]), [PROMPT]);
    let user_id = &user["info"]["id"];
    for assistant in &messages[1..] {
        let info = &assistant["info"];
        assert_eq!(info["parentID"], *user_id);
        assert_eq!(info["providerID"], PROVIDER_ID);
        assert_eq!(info["modelID"], MODEL_ID);
        assert!(info["time"]["completed"].is_number(), "{info}");
        // Every turn is a step: it opens with step-start and closes with step-finish.
        let parts = parts(assistant);
        assert_eq!(parts[0]["type"], "step-start", "{parts:?}");
        let finish = parts
            .iter()
            .find(|p| p["type"] == "step-finish")
            .expect("step-finish");
        assert_eq!(finish["reason"], info["finish"]);
    }
    assert_eq!(
        messages[1..]
            .iter()
            .map(|m| m["info"]["finish"].as_str().expect("finish"))
            .collect::<Vec<_>>(),
        ["tool-calls", "tool-calls", "stop"]
    );

    // Turn 1: reasoning, text, then bash with the command's real output.
    let turn = parts(&messages[1]);
    assert_eq!(
        types_of(turn),
        ["step-start", "reasoning", "text", "tool", "step-finish"]
    );
    assert_eq!(turn[1]["text"], CODING_REASONING);
    assert_eq!(turn[2]["text"], CODING_TEXT);
    let bash = &turn[3];
    assert_eq!(bash["tool"], "bash");
    assert_eq!(bash["state"]["status"], "completed");
    assert_eq!(bash["state"]["input"]["command"], CODING_COMMAND);
    assert_eq!(bash["state"]["output"], CODING_COMMAND_OUTPUT);
    assert_eq!(bash["state"]["metadata"]["exit"], 0);
    // The fake's usage (prompt 1200 with 600 cached, completion 80 with 24 reasoning), as
    // opencode counts it: input without the cached tokens, output without the reasoning.
    assert_eq!(
        turn[4]["tokens"],
        json!({"total": 1280, "input": 600, "output": 56, "reasoning": 24,
               "cache": {"read": 600, "write": 0}})
    );

    // Turn 2: the edit, then opencode's patch part naming the changed file.
    let turn = parts(&messages[2]);
    assert_eq!(
        types_of(turn),
        ["step-start", "tool", "step-finish", "patch"]
    );
    let edit = &turn[1];
    assert_eq!(edit["tool"], "edit");
    assert_eq!(edit["state"]["status"], "completed");
    assert_eq!(edit["state"]["input"]["filePath"], CODING_FILE);
    let diff = &edit["state"]["metadata"]["filediff"];
    assert_eq!(
        (&diff["additions"], &diff["deletions"]),
        (&json!(1), &json!(1))
    );
    let notes_path = oc.project_dir().join(CODING_FILE);
    assert_eq!(
        turn[3]["files"],
        json!([notes_path.to_str().expect("path")])
    );

    // Turn 3: the answer.
    let turn = parts(&messages[3]);
    assert_eq!(types_of(turn), ["step-start", "text", "step-finish"]);
    assert_eq!(turn[1]["text"], CODING_FINAL_TEXT);

    // What reached the model: a title request (whenever the agent sent it) and the three
    // turns in order, the bash output going back as the tool result of turn 1.
    let requests = llm.requests();
    let titles = requests
        .iter()
        .filter(|r| r.kind == RequestKind::Title)
        .count();
    assert_eq!(titles, 1);
    let turns: Vec<&LlmRequest> = requests
        .iter()
        .filter(|r| r.kind != RequestKind::Title)
        .collect();
    let indices: Vec<RequestKind> = turns.iter().map(|r| r.kind.clone()).collect();
    assert_eq!(
        indices,
        (0..3)
            .map(|index| RequestKind::Turn {
                marker: None,
                index
            })
            .collect::<Vec<_>>()
    );
    let tool_results: Vec<&Value> = turns[1].body["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter(|m| m["role"] == "tool")
        .collect();
    assert_eq!(tool_results.len(), 1);
    assert_eq!(tool_results[0]["content"], CODING_COMMAND_OUTPUT);
}

#[test]
fn sharing_fails_when_the_share_server_is_unreachable() {
    let Some(binary) = opencode::binary_or_skip() else {
        return;
    };
    // A port nothing listens on any more.
    let closed = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let llm = FakeLlm::start();
    let oc = OpenCode::builder(&binary, &llm)
        .enterprise_url(format!("http://{closed}"))
        .start();
    let session = oc.create_session();
    let refused = oc.try_share(&session).expect_err("no share server");
    assert_eq!(refused.status, 500, "{refused}");
    assert!(oc.session(&session).get("share").is_none());
}

#[test]
fn concurrent_sessions_follow_their_own_scripts_while_a_stream_is_held() {
    let Some(binary) = opencode::binary_or_skip() else {
        return;
    };
    let gate = Gate::new();
    let llm = FakeLlm::builder()
        .script_when(
            "[slow]",
            Script::new().turn(
                Turn::new()
                    .text("Half of the answer,")
                    .hold(&gate)
                    .text(" and the rest."),
            ),
        )
        .script_when(
            "[quick]",
            Script::new()
                .turn(Turn::new().bash("echo quick", "Say quick"))
                .turn(Turn::new().text("Quick done.")),
        )
        .start();
    let oc = OpenCode::start(&binary, &llm);
    let slow = oc.create_session();
    let quick = oc.create_session();

    let pending = oc.prompt_async(&slow, "Take your time [slow]");
    assert!(
        gate.wait_reached(PATIENCE),
        "the slow stream never got to the gate"
    );
    // While that stream is held, the other session plays its whole script.
    let reply = oc.prompt(&quick, "Be quick [quick]");
    assert_eq!(text_of(&reply["parts"]), ["Quick done."]);
    let (_, status) = oc.request("GET", "/session/status", None);
    assert_eq!(status[&slow]["type"], "busy", "{status}");
    // Mid-stream the text part is there, unfinished, and still empty: opencode stores
    // streamed text when the part ends (the deltas only go out as events).
    let held = oc.messages(&slow);
    let answer = held.as_array().and_then(|m| m.last()).expect("messages");
    assert_eq!(answer["info"]["role"], "assistant");
    let text = parts(answer)
        .iter()
        .find(|p| p["type"] == "text")
        .expect("text part");
    assert!(text["time"]["start"].is_number() && text["time"].get("end").is_none());
    assert_eq!(text["text"], "");

    gate.open();
    let reply = oc.wait_reply(&pending);
    assert_eq!(
        text_of(&reply["parts"]),
        ["Half of the answer, and the rest."]
    );
    let markers: Vec<Option<String>> = llm
        .requests()
        .iter()
        .filter_map(|r| match &r.kind {
            RequestKind::Turn { marker, .. } => Some(marker.clone()),
            RequestKind::Title => None,
        })
        .collect();
    let slow_marker = Some("[slow]".to_owned());
    let quick_marker = Some("[quick]".to_owned());
    assert_eq!(markers, [slow_marker, quick_marker.clone(), quick_marker]);
}

fn parts(message: &Value) -> &[Value] {
    message["parts"].as_array().expect("parts")
}

fn types_of(parts: &[Value]) -> Vec<&str> {
    parts
        .iter()
        .map(|p| p["type"].as_str().expect("part type"))
        .collect()
}

fn text_of(parts: &Value) -> Vec<&str> {
    parts
        .as_array()
        .expect("parts")
        .iter()
        .filter(|p| p["type"] == "text")
        .map(|p| p["text"].as_str().expect("text"))
        .collect()
}

/// A capsync server with an agent, and the `enterprise.url` that points opencode at it
/// (as `capsync opencode config` prints it).
struct Capsync {
    server: TestServer,
    agent_token: String,
    /// Where the server first listened (kept by [`TestServer::start_again_at`]).
    rpc_addr: SocketAddr,
    http_addr: SocketAddr,
}

impl Capsync {
    fn start() -> Self {
        let server = TestServer::start();
        let agent_token = run_local(async {
            let (conn, admin) = admin(&server).await;
            agent(&conn, &admin).await.1
        });
        Self {
            rpc_addr: server.addr(),
            http_addr: server.http_addr(),
            server,
            agent_token,
        }
    }

    fn http(&self) -> SocketAddr {
        self.http_addr
    }

    fn enterprise_url(&self) -> String {
        format!("http://{}/opencode/{}", self.http(), self.agent_token)
    }

    /// `GET /api/share/<token>/data` for a share link: status and items.
    fn data(&self, link: &str) -> (u16, Value) {
        let token = link.rsplit('/').next().expect("a link");
        let mut response = http()
            .get(format!("http://{}/api/share/{token}/data", self.http()))
            .call()
            .expect("HTTP request");
        let status = response.status().as_u16();
        let body = response.body_mut().read_to_string().expect("body");
        (
            status,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        )
    }

    /// The agent on a connection of its own.
    async fn agent_client(
        &self,
    ) -> (
        capsync_tests::client::Connection,
        capsync_tests::client::AgentClient,
    ) {
        let conn = capsync_tests::client::connect(self.server.addr())
            .await
            .expect("connect");
        let agent = conn
            .redeem(&self.agent_token)
            .await
            .expect("redeem")
            .into_agent()
            .expect("agent");
        (conn, agent)
    }

    /// The agent's shares of `session`, as `capsync share list` lists them.
    fn shares_of(&self, session: &str) -> Vec<String> {
        run_local(async {
            let (_conn, agent) = self.agent_client().await;
            let shares = agent.list_shares("", 100, false).await.expect("list");
            shares
                .shares
                .into_iter()
                .filter(|s| s.session_id == session)
                .map(|s| s.state.share_id)
                .collect()
        })
    }

    /// The outcomes of the audit log's `action` lines, sorted.
    fn audit(&self, action: &str) -> Vec<String> {
        let db = rusqlite::Connection::open(self.server.data_dir().join("capsync.db"))
            .expect("open the database");
        let mut outcomes: Vec<String> = db
            .prepare("SELECT outcome FROM audit WHERE action = ?1")
            .expect("query")
            .query_map([action], |r| r.get(0))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("outcomes");
        outcomes.sort();
        outcomes
    }

    /// A viewer of the share (a token minted by its agent), on `conn`.
    async fn viewer(
        &self,
        conn: &capsync_tests::client::Connection,
        agent: &capsync_tests::client::AgentClient,
        share_id: &str,
    ) -> capsync_tests::client::ViewerClient {
        let minted = agent.mint_viewer(share_id, None).await.expect("mint");
        conn.redeem(&minted.token)
            .await
            .expect("redeem viewer")
            .into_viewer()
            .expect("viewer")
    }

    /// The share's records through the RPC API, as `capsync snapshot --json` prints them.
    fn snapshot(&self, share_id: &str) -> Value {
        run_local(async {
            let (conn, agent) = self.agent_client().await;
            let viewer = self.viewer(&conn, &agent, share_id).await;
            viewer
                .snapshot()
                .await
                .expect("snapshot")
                .to_document()
                .to_json()
        })
    }

    /// A counter of `/metrics` (the sum over its labels when `label` is empty).
    fn metric(&self, name: &str, label: &str) -> f64 {
        let mut response = http()
            .get(format!("http://{}/metrics", self.http()))
            .call()
            .expect("metrics");
        let text = response.body_mut().read_to_string().expect("body");
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(PATIENCE))
        .build()
        .into()
}

/// What the share protocol carries of a session, by record id: the session, every
/// message's info and every part. From `opencode export` or from capsync's import data.
#[derive(Debug, PartialEq)]
struct Carried {
    session: Value,
    messages: BTreeMap<String, Value>,
    parts: BTreeMap<String, Value>,
}

impl Carried {
    /// The ids of `expected`'s messages and parts that this holds otherwise (or not at all).
    fn differing<'a>(&self, expected: &'a Carried) -> Vec<&'a String> {
        expected
            .parts
            .keys()
            .chain(expected.messages.keys())
            .filter(|id| {
                self.parts.get(*id) != expected.parts.get(*id)
                    && self.messages.get(*id) != expected.messages.get(*id)
            })
            .collect()
    }
}

fn id_of(record: &Value) -> String {
    record["id"].as_str().expect("record id").to_owned()
}

fn carried_by_export(export: &Value) -> Carried {
    let mut messages = BTreeMap::new();
    let mut parts = BTreeMap::new();
    for message in export["messages"].as_array().expect("messages") {
        messages.insert(id_of(&message["info"]), message["info"].clone());
        for part in message["parts"].as_array().expect("parts") {
            parts.insert(id_of(part), part.clone());
        }
    }
    Carried {
        session: export["info"].clone(),
        messages,
        parts,
    }
}

fn carried_by_items(items: &Value) -> Carried {
    let mut carried = Carried {
        session: Value::Null,
        messages: BTreeMap::new(),
        parts: BTreeMap::new(),
    };
    for item in items.as_array().expect("items") {
        let data = &item["data"];
        match item["type"].as_str() {
            Some("session") => carried.session = data.clone(),
            Some("message") => {
                carried.messages.insert(id_of(data), data.clone());
            }
            Some("part") => {
                carried.parts.insert(id_of(data), data.clone());
            }
            _ => {}
        }
    }
    carried
}

/// Waits until capsync holds every record of `session` exactly as opencode exports it
/// (opencode syncs in one-second windows, and writes some records after a prompt returns).
fn assert_capsync_holds_the_export(capsync: &Capsync, oc: &OpenCode, session: &str, link: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let expected = carried_by_export(&oc.export_live(session));
        let (status, items) = capsync.data(link);
        assert_eq!(status, 200, "{items}");
        let held = carried_by_items(&items);
        if held == expected {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "capsync does not hold the export after {PATIENCE:?}: session equal: {}, \
                 records differing: {:?}\ncapsync: {held:#?}\nexport: {expected:#?}\n{}",
                held.session == expected.session,
                held.differing(&expected),
                oc.transcript_tail(40)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_session_shared_to_capsync_is_held_as_exported_imports_back_and_unshares() {
    let Some(binary) = opencode::binary_or_skip() else {
        return;
    };
    let capsync = Capsync::start();
    let llm = FakeLlm::start();
    let oc = OpenCode::builder(&binary, &llm)
        .enterprise_url(capsync.enterprise_url())
        .start();
    let session = oc.create_session();
    oc.prompt(&session, PROMPT);

    let link = oc.share(&session);
    let origin = format!("http://{}", capsync.http());
    assert!(
        link.starts_with(&format!("{origin}/share/csviewer_")),
        "{link}"
    );
    assert_eq!(capsync.shares_of(&session).len(), 1);
    // Text, reasoning, the bash and edit calls, steps and the patch: every record as opencode has it.
    assert_capsync_holds_the_export(&capsync, &oc, &session, &link);
    let export = oc.export(&session);
    let types: std::collections::BTreeSet<&str> = export["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .flat_map(|m| types_of(parts(m)))
        .collect();
    for kind in [
        "text",
        "reasoning",
        "tool",
        "step-start",
        "step-finish",
        "patch",
    ] {
        assert!(
            types.contains(kind),
            "the session has no {kind} part: {types:?}"
        );
    }
    assert_eq!(
        capsync.metric("capsync_opencode_items_total", "rejected"),
        0.0
    );

    // The link imports into another opencode as the same messages and parts.
    let other = OpenCode::start(&binary, &llm);
    assert_eq!(other.import(&link), session);
    let imported = carried_by_export(&other.export(&session));
    let expected = carried_by_export(&export);
    assert_eq!(
        imported.messages.keys().collect::<Vec<_>>(),
        expected.messages.keys().collect::<Vec<_>>()
    );
    assert_eq!(imported.parts, expected.parts);

    // Unsharing deletes the share: the link and every token of it stop at once.
    oc.unshare(&session);
    assert_eq!(capsync.data(&link).0, 401);
    assert!(capsync.shares_of(&session).is_empty());
    let mut page = http().get(&link).call().expect("link");
    assert_eq!(page.status().as_u16(), 404);
    assert!(
        page.body_mut()
            .read_to_string()
            .unwrap()
            .contains("no longer works")
    );
    // Sharing again makes a new, working share.
    let again = oc.share(&session);
    assert_ne!(again, link);
    assert_capsync_holds_the_export(&capsync, &oc, &session, &again);
}

#[test]
fn auto_share_sends_two_creates_and_every_sync_still_applies() {
    let Some(binary) = opencode::binary_or_skip() else {
        return;
    };
    let capsync = Capsync::start();
    let llm = FakeLlm::start();
    let oc = OpenCode::builder(&binary, &llm)
        .enterprise_url(capsync.enterprise_url())
        .config(json!({"share": "auto"}))
        .start();
    // `opencode run` with auto-share creates the share twice at once.
    let run = oc.run(PROMPT, false);
    let session = run.session_id.expect("run's session");
    assert_eq!(
        capsync.shares_of(&session).len(),
        1,
        "one share for the session"
    );
    let deadline = Instant::now() + PATIENCE;
    // (Audit lines are written with the next write; the syncs are such writes.)
    while capsync.audit("create_share").len() < 2 {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            capsync.audit("create_share")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(capsync.audit("create_share"), ["joined", "ok"]);
    // Whichever answer opencode kept, its secret worked: every sync was taken, none
    // refused, and what reached capsync is opencode's session (the run may exit before
    // its last second is sent, so only the first records are sure to be there).
    assert!(capsync.metric("capsync_opencode_syncs_total", "") >= 1.0);
    let failed: Vec<String> = capsync
        .audit("redeem")
        .into_iter()
        .filter(|outcome| outcome != "ok")
        .collect();
    assert!(failed.is_empty(), "failed redeems: {failed:?}");
    assert_eq!(
        capsync.metric("capsync_opencode_items_total", "rejected"),
        0.0
    );
    let share_id = &capsync.shares_of(&session)[0];
    let held = capsync.snapshot(share_id);
    assert_eq!(held["session"]["id"], session);
    assert!(!held["messages"].as_array().expect("messages").is_empty());
}

/// An HTTP relay in front of capsync that holds back the first sync whose body matches,
/// so the next sync overtakes it, as when the server is slow for one call. It only
/// delays: capsync answers everything.
struct SlowRelay {
    addr: SocketAddr,
    /// The held sync's answer, once capsync gave it.
    held_answer: Arc<Mutex<Option<Value>>>,
    _runtime: tokio::runtime::Runtime,
}

#[derive(Clone)]
struct Relay {
    target: SocketAddr,
    hold_if: &'static str,
    hold_for: Duration,
    held: Arc<Mutex<bool>>,
    held_answer: Arc<Mutex<Option<Value>>>,
}

impl SlowRelay {
    fn start(target: SocketAddr, hold_if: &'static str, hold_for: Duration) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let held_answer = Arc::new(Mutex::new(None));
        let relay = Relay {
            target,
            hold_if,
            hold_for,
            held: Arc::default(),
            held_answer: held_answer.clone(),
        };
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let app = Router::new().fallback(forward).with_state(relay);
            axum::serve(listener, app).await.expect("relay");
        });
        Self {
            addr,
            held_answer,
            _runtime: runtime,
        }
    }
}

async fn forward(
    State(relay): State<Relay>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> (StatusCode, String) {
    let text = String::from_utf8_lossy(&body).into_owned();
    let hold = uri.path().ends_with("/sync") && text.contains(relay.hold_if) && {
        let mut held = relay.held.lock().expect("lock");
        !std::mem::replace(&mut *held, true)
    };
    if hold {
        tokio::time::sleep(relay.hold_for).await;
    }
    let url = format!("http://{}{}", relay.target, uri);
    let (status, answer) = tokio::task::spawn_blocking(move || {
        let request = ureq::http::Request::builder()
            .method(method.as_str())
            .uri(&url)
            .header("Content-Type", "application/json")
            .body(text)
            .expect("request");
        let mut response = http().run(request).expect("capsync answers");
        let status = response.status().as_u16();
        (status, response.body_mut().read_to_string().expect("body"))
    })
    .await
    .expect("relay call");
    if hold {
        *relay.held_answer.lock().expect("lock") = serde_json::from_str(&answer).ok();
    }
    (StatusCode::from_u16(status).expect("status"), answer)
}

#[test]
fn a_sync_held_back_behind_a_newer_one_does_not_win() {
    let Some(binary) = opencode::binary_or_skip() else {
        return;
    };
    let capsync = Capsync::start();
    // A command that runs long enough for opencode to sync the call while it runs.
    let script = Script::new()
        .turn(Turn::new().bash("sleep 2 && echo slow done", "Waits"))
        .turn(Turn::new().text("Done waiting."));
    let llm = FakeLlm::builder().script(script).start();
    let relay = SlowRelay::start(
        capsync.http(),
        "\"status\":\"running\"",
        Duration::from_secs(4),
    );
    let oc = OpenCode::builder(&binary, &llm)
        .enterprise_url(format!(
            "http://{}/opencode/{}",
            relay.addr, capsync.agent_token
        ))
        .start();
    let session = oc.create_session();
    let link = oc.share(&session);
    oc.prompt(&session, "Wait for the slow command.");
    // The running snapshot reached capsync after the completed one, and was refused alone.
    let deadline = Instant::now() + PATIENCE;
    let answer = loop {
        if let Some(answer) = relay.held_answer.lock().expect("lock").clone() {
            break answer;
        }
        assert!(
            Instant::now() < deadline,
            "no sync with a running tool call was held"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let stale: Vec<&Value> = answer["rejected"]
        .as_array()
        .expect("rejected")
        .iter()
        .filter(|r| r["reason"] == "staleTransition" && r["type"] == "part")
        .collect();
    assert!(
        !stale.is_empty(),
        "the held running snapshot was refused: {answer}"
    );
    // The link is the relay's; capsync's own pages hold the same token.
    let link = link.replace(&relay.addr.to_string(), &capsync.http().to_string());
    assert_capsync_holds_the_export(&capsync, &oc, &session, &link);
    let export = oc.export(&session);
    let bash = export["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .flat_map(|m| parts(m).iter())
        .find(|p| p["tool"] == "bash")
        .expect("the bash call");
    assert_eq!(bash["state"]["status"], "completed");
}

/// The text of the first element matching `selector`, or `null`.
fn text_at(selector: &str) -> String {
    format!(
        "((document.querySelector({}) || {{}}).textContent ?? null)",
        json!(selector)
    )
}

#[test]
fn a_real_opencode_session_on_the_share_page() {
    let Some(binary) = opencode::binary_or_skip() else {
        return;
    };
    let Some(chromium) = crate::browser_driver::chromium_or_skip() else {
        return;
    };
    let capsync = Capsync::start();
    let llm = FakeLlm::start();
    let oc = OpenCode::builder(&binary, &llm)
        .enterprise_url(capsync.enterprise_url())
        .start();
    let session = oc.create_session();
    oc.prompt(&session, PROMPT);
    oc.wait_for_session(&session, "the generated title", |s| {
        s["title"] == DEFAULT_TITLE
    });
    let link = oc.share(&session);
    assert_capsync_holds_the_export(&capsync, &oc, &session, &link);

    let mut browser = crate::browser_driver::Browser::launch(&chromium);
    // The link as opencode printed it: on to the page, the token into the fragment.
    let page = browser.open(&link);
    run_local(async {
        crate::browser_driver::wait_for(
            &mut browser,
            &page,
            "the session",
            &format!(
                "document.body.innerText.includes({}) && document.querySelector('[data-tool=edit]') !== null",
                // (Its markdown is rendered: the backticks are gone.)
                json!("now says the task is done")
            ),
        )
        .await;
    });
    let checks: Vec<(&str, String, Value)> = vec![
        ("opens at the top", "window.scrollY".into(), json!(0)),
        ("the title", text_at("#title"), json!(DEFAULT_TITLE)),
        (
            "the prompt",
            format!("document.body.innerText.includes({})", json!(PROMPT)),
            json!(true),
        ),
        (
            "reasoning",
            format!(
                "{}.includes({})",
                text_at(".part-reasoning"),
                json!(CODING_REASONING)
            ),
            json!(true),
        ),
        (
            "text",
            format!("document.body.innerText.includes({})", json!(CODING_TEXT)),
            json!(true),
        ),
        (
            "bash: command",
            text_at("[data-tool=bash] .bash-command"),
            json!(format!("$ {CODING_COMMAND}")),
        ),
        (
            "bash: output",
            format!(
                "{}.includes({})",
                text_at("[data-tool=bash] .tool-output"),
                json!(CODING_COMMAND_OUTPUT.trim())
            ),
            json!(true),
        ),
        (
            "edit: the changed line",
            "document.querySelectorAll('[data-tool=edit] pre.diff .line.add').length > 0".into(),
            json!(true),
        ),
        (
            "steps",
            "document.querySelectorAll('.part-step-finish').length > 0".into(),
            json!(true),
        ),
        (
            "patch: files touched",
            format!(
                "{}.includes({})",
                text_at(".part-patch"),
                json!(CODING_FILE)
            ),
            json!(true),
        ),
    ];
    let mut wrong = Vec::new();
    for (what, expression, expected) in &checks {
        let got = browser.eval(&page, expression);
        if &got != expected {
            wrong.push(format!("{what}: {got} (expected {expected})"));
        }
    }
    browser.screenshot(&page, "30-real-opencode-session.png");
    browser.screenshot_of_window(&page, "31-real-opencode-session-top.png");
    assert!(
        wrong.is_empty(),
        "the page of a real opencode session:\n{}\nit shows:\n{}",
        wrong.join("\n"),
        browser.eval(&page, "document.body.innerText")
    );
}

/// The plugin in `opencode/` (the first step of shipping sessions durably).
fn journal_plugin() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("opencode/capsync-journal.js")
}

#[test]
fn the_journal_plugin_records_every_change_as_opencode_publishes_it() {
    let Some(binary) = opencode::binary_or_skip() else {
        return;
    };
    let scratch = tempfile::tempdir().expect("scratch");
    let journal = scratch.path().join("journal");
    let llm = FakeLlm::start();
    let started = Instant::now();
    let oc = OpenCode::builder(&binary, &llm)
        .config(json!({"plugin": [[
            format!("file://{}", journal_plugin().display()),
            {"journal": journal.to_str().expect("UTF-8 path")}
        ]]}))
        .start();
    println!(
        "opencode with the plugin started in {:?}",
        started.elapsed()
    );
    let session = oc.create_session();
    oc.prompt(&session, PROMPT);
    oc.wait_for_session(&session, "the generated title", |s| {
        s["title"] == DEFAULT_TITLE
    });
    let export = oc.export(&session);

    // One segment per plugin instance (`opencode export` ran one more).
    let segments = capsync_tests::client::opencode::journal::segments(&journal).expect("segments");
    assert!(!segments.is_empty());
    let mut events: Vec<Value> = Vec::new();
    for segment in &segments {
        let read =
            capsync_tests::client::opencode::journal::read_journal(&segment.path, 0, usize::MAX)
                .expect("the journal");
        assert!(read.unreadable.is_empty(), "{:?}", read.unreadable);
        assert_eq!(
            read.next,
            std::fs::metadata(&segment.path).expect("segment").len()
        );
        events.extend(read.entries.into_iter().map(|e| e.event));
    }
    assert!(
        events
            .iter()
            .all(|e| e["id"].as_str().is_some_and(|id| !id.is_empty()))
    );
    let types: std::collections::BTreeSet<&str> =
        events.iter().filter_map(|e| e["type"].as_str()).collect();
    for kind in [
        "session.created",
        "session.updated",
        "message.updated",
        "message.part.updated",
        "message.part.delta",
    ] {
        assert!(types.contains(kind), "no {kind} in the journal: {types:?}");
    }
    // The streamed text is there as deltas, which the built-in share client never sends.
    let streamed: String = events
        .iter()
        .filter(|e| e["type"] == "message.part.delta" && e["properties"]["field"] == "text")
        .filter_map(|e| e["properties"]["delta"].as_str())
        .collect();
    assert!(streamed.contains(CODING_TEXT), "{streamed}");
    // The last journaled version of each part is the one opencode exports.
    let mut last: BTreeMap<String, Value> = BTreeMap::new();
    for event in events
        .iter()
        .filter(|e| e["type"] == "message.part.updated")
    {
        let part = &event["properties"]["part"];
        last.insert(id_of(part), part.clone());
    }
    let exported = carried_by_export(&export).parts;
    assert_eq!(
        last.keys().collect::<Vec<_>>(),
        exported.keys().collect::<Vec<_>>()
    );
    for (id, part) in &exported {
        assert_eq!(&last[id], part, "part {id}");
    }
    // Mapped to ops (`capsync_shared::opencode::map_event`) and applied in journal
    // order, the session's events build exactly what opencode exports.
    let mut doc = capsync_tests::client::SessionDocument::default();
    let mut op_ids = std::collections::HashSet::new();
    for event in &events {
        let Some(mapped) = capsync_shared::opencode::map_event(event, 1 << 20) else {
            continue;
        };
        let mapped = mapped.unwrap_or_else(|why| panic!("{event} not mapped: {why}"));
        if mapped.session_id != session {
            continue;
        }
        for op in mapped.ops {
            assert!(
                op_ids.insert(op.op_id.0.clone()),
                "op id {} twice",
                op.op_id.0
            );
            let cursor = doc.cursor.0 + 1;
            doc.apply(&capsync_tests::client::LoggedOp {
                cursor: capsync_shared::Cursor(cursor),
                op_id: op.op_id,
                kind: op.kind,
                payload: op.payload,
                applied_at: 0,
            });
        }
    }
    let built: BTreeMap<String, Value> = doc
        .messages
        .iter()
        .flat_map(|m| m.parts.iter())
        .map(|p| (id_of(p), p.clone()))
        .collect();
    assert_eq!(
        built, exported,
        "the journal, shipped, gives the export's parts"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        for path in std::iter::once(journal.clone()).chain(segments.iter().map(|s| s.path.clone()))
        {
            let mode = std::fs::metadata(&path)
                .expect("journal")
                .permissions()
                .mode();
            assert_eq!(
                mode & 0o077,
                0,
                "{} is the user's only: {mode:o}",
                path.display()
            );
        }
    }
}
