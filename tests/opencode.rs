//! The real opencode (the npm package pinned in `tests/opencode/`) driven offline by the
//! harness (`capsync_tests::opencode`) against the fake model (`capsync_tests::fake_llm`):
//! a prompted session holds every kind of part the fake's script asks for; sharing,
//! unsharing, importing a share link and `run --share` work against a stand-in share server;
//! sessions prompted at once follow their own scripts, and a held stream waits.
//!
//! Without opencode installed the tests say they skipped; with `REQUIRE_OPENCODE=1` (as in
//! CI) a missing opencode is a failure instead. Install it with
//! `npm install --prefix tests/opencode --no-save`.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::routing::{delete, get, post};
use capsync_tests::fake_llm::*;
use capsync_tests::opencode::{self, MODEL_ID, OpenCode, PROVIDER_ID};
use serde_json::{Value, json};

/// Longest wait for the stand-in share server to receive something.
const PATIENCE: Duration = Duration::from_secs(30);

const PROMPT: &str = "Please mark the task in notes.txt as done.";

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
fn share_unshare_import_and_run_against_a_stand_in_share_server() {
    let Some(binary) = opencode::binary_or_skip() else {
        return;
    };
    let llm = FakeLlm::builder()
        .script_when(
            "[one-shot]",
            Script::new().turn(Turn::new().text("Nothing to do.")),
        )
        .start();
    let shares = ShareServer::start();
    let oc = OpenCode::builder(&binary, &llm)
        .enterprise_url(shares.url())
        .start();
    let session = oc.create_session();
    oc.prompt(&session, PROMPT);

    // Sharing asks the share server for a share, and the link is the one it answered.
    let url = oc.share(&session);
    let share_id = shares.share_of(&session).expect("share created");
    assert_eq!(url, format!("{}/share/{share_id}", shares.url()));
    assert_eq!(oc.session(&session)["share"]["url"], url);
    // Then the whole session goes to the share server, in batches (`POST …/sync`).
    let exported = oc.export(&session);
    let part_count: usize = exported["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| parts(m).len())
        .sum();
    shares.wait_for("every part synced", |shares| {
        shares[&share_id].parts().len() == part_count
    });

    // A share link imports into another opencode (`GET /api/share/<id>/data`) as the same
    // messages and parts.
    let other = OpenCode::start(&binary, &llm);
    assert_eq!(other.import(&url), session);
    let imported = other.export(&session);
    // Parts only, with their messages' ids: opencode updates the user message (its
    // `summary.diffs`) in the background after a step, maybe after the export was taken.
    let parts_by_message = |export: &Value| -> Vec<(Value, Value)> {
        export["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| (m["info"]["id"].clone(), m["parts"].clone()))
            .collect()
    };
    assert_eq!(parts_by_message(&imported), parts_by_message(&exported));

    // Unsharing deletes the share on the server, with its secret.
    oc.unshare(&session);
    let requests = shares.requests();
    let removal = requests
        .iter()
        .find(|r| r.0 == "DELETE")
        .expect("DELETE request");
    assert_eq!(removal.1, format!("/api/share/{share_id}"));
    assert_eq!(removal.2["secret"], secret_of(&share_id));

    // `run --share` shares its new session as it starts, and prints the link.
    let run = oc.run("Anything to do? [one-shot]", true);
    let run_session = run.session_id.expect("run's session");
    let run_share = shares.share_of(&run_session).expect("run's share");
    assert_eq!(
        run.share_url,
        Some(format!("{}/share/{run_share}", shares.url()))
    );
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

/// The stand-in's secret for a share (derived, so the test can check what opencode sends).
fn secret_of(share_id: &str) -> String {
    format!("secret-{share_id}")
}

/// A stand-in for the share server opencode 1.18.33 talks to at `enterprise.url`, speaking
/// its protocol as far as these tests need: `POST /api/share` `{sessionID}` →
/// `{id, secret, url}`; `POST /api/share/<id>/sync` `{secret, data: [{type, data}]}`;
/// `GET /api/share/<id>/data` → the synced items; `DELETE /api/share/<id>` `{secret}`.
struct ShareServer {
    addr: SocketAddr,
    state: Arc<ShareState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct ShareState {
    /// Every request: method, path, JSON body.
    requests: Mutex<Vec<(String, String, Value)>>,
    shares: Mutex<BTreeMap<String, StoredShare>>,
    /// Signalled whenever a request has been handled.
    changed: Condvar,
}

#[derive(Debug, Clone, Default)]
struct StoredShare {
    session_id: String,
    /// The synced items by opencode's own key (`session`, `message/<id>`,
    /// `part/<message>/<id>`, `session_diff`, `model`): a later item replaces an earlier one.
    items: BTreeMap<String, Value>,
}

impl StoredShare {
    fn parts(&self) -> Vec<&Value> {
        self.items
            .iter()
            .filter(|(key, _)| key.starts_with("part/"))
            .map(|(_, item)| item)
            .collect()
    }
}

impl ShareServer {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("address");
        let state = Arc::new(ShareState::default());
        let app = Router::new()
            .route("/api/share", post(create_share))
            .route("/api/share/{id}/sync", post(sync_share))
            .route("/api/share/{id}/data", get(share_data))
            .route("/api/share/{id}", delete(remove_share))
            .with_state((state.clone(), addr));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                tokio::select! {
                    _ = axum::serve(listener, app) => {}
                    _ = stopped => {}
                }
            });
        });
        Self {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> Vec<(String, String, Value)> {
        self.state.requests.lock().expect("lock").clone()
    }

    /// The share created for `session_id`, if any.
    fn share_of(&self, session_id: &str) -> Option<String> {
        let shares = self.state.shares.lock().expect("lock");
        shares
            .iter()
            .find(|(_, share)| share.session_id == session_id)
            .map(|(id, _)| id.clone())
    }

    /// Waits until `done` holds for the stored shares.
    fn wait_for(&self, what: &str, done: impl Fn(&BTreeMap<String, StoredShare>) -> bool) {
        let shares = self.state.shares.lock().expect("lock");
        let (shares, timeout) = self
            .state
            .changed
            .wait_timeout_while(shares, PATIENCE, |shares| !done(shares))
            .expect("lock");
        assert!(
            !timeout.timed_out(),
            "waited {PATIENCE:?} for {what}; stored: {shares:#?}"
        );
    }
}

impl Drop for ShareServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

type ShareApp = State<(Arc<ShareState>, SocketAddr)>;

/// Records a request and wakes [`ShareServer::wait_for`].
fn record(state: &ShareState, method: &str, path: String, body: &Bytes) -> Value {
    let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    state
        .requests
        .lock()
        .expect("lock")
        .push((method.to_owned(), path, body.clone()));
    body
}

async fn create_share(State((state, addr)): ShareApp, body: Bytes) -> axum::Json<Value> {
    let body = record(&state, "POST", "/api/share".into(), &body);
    let session_id = body["sessionID"].as_str().unwrap_or_default().to_owned();
    // Share ids from the session id's tail: unique enough here, and stable in messages.
    let id = format!("shr{}", &session_id[session_id.len().saturating_sub(10)..]);
    state.shares.lock().expect("lock").insert(
        id.clone(),
        StoredShare {
            session_id,
            items: BTreeMap::new(),
        },
    );
    state.changed.notify_all();
    axum::Json(
        json!({"id": id, "secret": secret_of(&id), "url": format!("http://{addr}/share/{id}")}),
    )
}

async fn sync_share(
    State((state, _)): ShareApp,
    Path(id): Path<String>,
    body: Bytes,
) -> axum::Json<Value> {
    let body = record(&state, "POST", format!("/api/share/{id}/sync"), &body);
    if body["secret"] == secret_of(&id) {
        let mut shares = state.shares.lock().expect("lock");
        if let Some(share) = shares.get_mut(&id) {
            for item in body["data"].as_array().into_iter().flatten() {
                let data = &item["data"];
                let key = match item["type"].as_str().unwrap_or_default() {
                    "message" => format!("message/{}", data["id"].as_str().unwrap_or_default()),
                    "part" => format!(
                        "part/{}/{}",
                        data["messageID"].as_str().unwrap_or_default(),
                        data["id"].as_str().unwrap_or_default()
                    ),
                    other => other.to_owned(),
                };
                share.items.insert(key, item.clone());
            }
        }
    }
    state.changed.notify_all();
    axum::Json(json!({}))
}

async fn share_data(State((state, _)): ShareApp, Path(id): Path<String>) -> axum::Json<Value> {
    record(
        &state,
        "GET",
        format!("/api/share/{id}/data"),
        &Bytes::new(),
    );
    let shares = state.shares.lock().expect("lock");
    let items: Vec<Value> = shares
        .get(&id)
        .map(|share| share.items.values().cloned().collect())
        .unwrap_or_default();
    axum::Json(Value::Array(items))
}

async fn remove_share(
    State((state, _)): ShareApp,
    Path(id): Path<String>,
    body: Bytes,
) -> axum::Json<Value> {
    record(&state, "DELETE", format!("/api/share/{id}"), &body);
    state.changed.notify_all();
    axum::Json(json!({}))
}
