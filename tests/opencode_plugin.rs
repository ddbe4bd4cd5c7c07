//! capsync's opencode plugin as a user gets it: `capsync opencode install --project`,
//! then the real opencode, which journals every change and starts the shipper, which
//! sends the journal to a real capsync server. Each test is one of the guarantees the
//! plugin gives that opencode's built-in share client does not.

use std::path::Path;

use super::*;

/// The `capsync` command line (this package's copy of it).
const CAPSYNC: &str = env!("CARGO_BIN_EXE_capsync-under-test");

/// Longest wait for the shipper to send everything (its backoff reaches 30 s while the
/// server is away).
const SHIP_PATIENCE: Duration = Duration::from_secs(120);

/// opencode with capsync's plugin installed in its project by `capsync opencode install`.
fn opencode_with_plugin(
    binary: &Path,
    llm: &FakeLlm,
    capsync: &Capsync,
    share: &str,
) -> WithShipper {
    WithShipper(plugin_builder(binary, llm, capsync, capsync.rpc_addr, share).start())
}

/// opencode whose project's shipper is stopped (SIGTERM, as a user would) when the test
/// ends, before the project is deleted: a test that ends with the server gone must not
/// leave a shipper retrying for its `--linger`.
struct WithShipper(OpenCode);

impl std::ops::Deref for WithShipper {
    type Target = OpenCode;
    fn deref(&self) -> &OpenCode {
        &self.0
    }
}

impl Drop for WithShipper {
    fn drop(&mut self) {
        let deadline = Instant::now() + PATIENCE;
        while let Some(pid) = try_plugin_status(self.0.project_dir())
            .ok()
            .and_then(|status| status["shipperPid"].as_i64())
        {
            if let Some(pid) = i32::try_from(pid)
                .ok()
                .and_then(rustix::process::Pid::from_raw)
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            if Instant::now() > deadline {
                eprintln!("the shipper (pid {pid}) did not stop on SIGTERM");
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// [`opencode_with_plugin`] to be started, the shipper reaching the server at `server`.
fn plugin_builder(
    binary: &Path,
    llm: &FakeLlm,
    capsync: &Capsync,
    server: SocketAddr,
    share: &str,
) -> opencode::OpenCodeBuilder {
    let server = server.to_string();
    let origin = format!("http://{}", capsync.http_addr);
    OpenCode::builder(binary, llm)
        // The harness turns sharing off unless told otherwise; the plugin decides here.
        .config(json!({"share": "manual"}))
        // A failing test must not leave a shipper behind for a day.
        .env("CAPSYNC_OPENCODE_LINGER", "3m")
        .setup(
            CAPSYNC,
            &[
                "--server",
                &server,
                "--share-url",
                &origin,
                "--token",
                &capsync.agent_token,
                "opencode",
                "install",
                "--project",
                ".",
                "--share",
                share,
            ],
        )
}

/// `capsync opencode status --project DIR --json`.
fn plugin_status(project: &Path) -> Value {
    try_plugin_status(project).unwrap_or_else(|why| panic!("capsync opencode status: {why}"))
}

/// [`plugin_status`] without panicking (for `Drop`, which may run while a test panics).
fn try_plugin_status(project: &Path) -> Result<Value, String> {
    let out = std::process::Command::new(CAPSYNC)
        .args(["--json", "opencode", "status", "--project"])
        .arg(project)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("{out:?}"));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

/// Waits until no shipper runs for `project` (everything sent, or given up).
fn wait_shipper_ended(oc: &OpenCode) -> Value {
    let deadline = Instant::now() + SHIP_PATIENCE;
    loop {
        let status = plugin_status(oc.project_dir());
        if status["shipperRunning"] == false {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the shipper still runs after {SHIP_PATIENCE:?}: {status:#}\n{}",
            shipper_log(oc)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn shipper_log(oc: &OpenCode) -> String {
    let log = oc.project_dir().join(".opencode/capsync/shipper.log");
    format!(
        "--- shipper log ---\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    )
}

/// What a share's snapshot document carries, as [`Carried`].
fn carried_by_document(doc: &Value) -> Carried {
    let mut carried = Carried {
        session: doc["session"].clone(),
        messages: BTreeMap::new(),
        parts: BTreeMap::new(),
    };
    for message in doc["messages"].as_array().expect("messages") {
        carried
            .messages
            .insert(id_of(&message["info"]), message["info"].clone());
        for part in message["parts"].as_array().expect("parts") {
            carried.parts.insert(id_of(part), part.clone());
        }
    }
    carried
}

/// The one share of `session`, which must hold exactly what opencode exports.
fn assert_share_is_the_export(
    capsync: &Capsync,
    oc: &OpenCode,
    session: &str,
    export: &Value,
) -> String {
    let shares = capsync.shares_of(session);
    assert_eq!(
        shares.len(),
        1,
        "one share per session: {shares:?}\n{}",
        shipper_log(oc)
    );
    let held = carried_by_document(&capsync.snapshot(&shares[0]));
    let expected = carried_by_export(export);
    if held != expected {
        panic!(
            "the share is not the export: session equal: {}, records differing: {:?}\n\
             share: {held:#?}\nexport: {expected:#?}\n{}",
            held.session == expected.session,
            held.differing(&expected),
            shipper_log(oc)
        );
    }
    shares[0].clone()
}

/// The journal and the outboxes are empty once everything is sent: nothing piles up.
fn assert_nothing_left_behind(oc: &OpenCode) {
    let dir = oc.project_dir().join(".opencode/capsync");
    for sub in ["journal", "outbox"] {
        let left: Vec<_> = std::fs::read_dir(dir.join(sub))
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.file_name())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "{sub} still holds {left:?}\n{}",
            shipper_log(oc)
        );
    }
}

#[test]
fn opencode_run_arrives_whole_even_though_it_exits_right_after_the_answer() {
    let Some(binary) = opencode::binary_or_skip() else {
        return;
    };
    let capsync = Capsync::start();
    let llm = FakeLlm::start();
    let oc = opencode_with_plugin(&binary, &llm, &capsync, "auto");
    let run = oc.run(PROMPT, false);
    let session = run.session_id.expect("the run's session");
    let export = oc.export(&session);
    oc.stop_serve();
    wait_shipper_ended(&oc);

    let share = assert_share_is_the_export(&capsync, &oc, &session, &export);
    // What the built-in client loses at exit: the last message's text, completion time
    // and step-finish.
    let doc = capsync.snapshot(&share);
    let last = doc["messages"]
        .as_array()
        .and_then(|m| m.last())
        .expect("messages");
    assert!(last["info"]["time"]["completed"].is_number(), "{last:#}");
    assert_eq!(text_of(&last["parts"]), [CODING_FINAL_TEXT]);
    assert!(
        parts(last).iter().any(|p| p["type"] == "step-finish"),
        "{last:#}"
    );
    assert_nothing_left_behind(&oc);
}

#[test]
fn a_session_while_the_server_is_down_arrives_once_it_is_up_with_no_opencode_running() {
    let Some(binary) = opencode::binary_or_skip() else {
        return;
    };
    let mut capsync = Capsync::start();
    let llm = FakeLlm::start();
    let oc = opencode_with_plugin(&binary, &llm, &capsync, "auto");
    capsync.server.stop();

    let run = oc.run(PROMPT, false);
    let session = run.session_id.expect("the run's session");
    let export = oc.export(&session);
    oc.stop_serve();
    // opencode has exited; the shipper has everything and keeps trying.
    let status = plugin_status(oc.project_dir());
    assert_eq!(
        status["shipperRunning"],
        true,
        "{status:#}\n{}",
        shipper_log(&oc)
    );
    let row = status["sessions"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["sessionId"] == session.as_str()))
        .cloned()
        .unwrap_or_else(|| panic!("{status:#}\n{}", shipper_log(&oc)));
    assert_eq!(row["state"], "waiting", "{status:#}");

    capsync
        .server
        .start_again_at(capsync.rpc_addr, capsync.http_addr);
    wait_shipper_ended(&oc);
    assert_share_is_the_export(&capsync, &oc, &session, &export);
    assert_nothing_left_behind(&oc);
}

/// The session as opencode serves it now, shaped as `opencode export` prints it.
fn live_export(oc: &OpenCode, session: &str) -> Value {
    json!({"info": oc.session(session), "messages": oc.messages(session)})
}

/// Waits until `session` has one share holding exactly what opencode holds now.
fn wait_share_matches(capsync: &Capsync, oc: &OpenCode, session: &str) -> String {
    let deadline = Instant::now() + SHIP_PATIENCE;
    loop {
        let expected = carried_by_export(&live_export(oc, session));
        let shares = capsync.shares_of(session);
        if shares.len() == 1 && carried_by_document(&capsync.snapshot(&shares[0])) == expected {
            return shares[0].clone();
        }
        if Instant::now() > deadline {
            // What each writer sent, for the failure's story (deltas left out).
            if shares.len() == 1 {
                eprintln!("--- the share's log, without deltas ---");
                for op in share_log(capsync, &shares[0]) {
                    if op.kind != capsync_shared::OpKind::PartDelta {
                        let head: String = op.payload.chars().take(160).collect();
                        eprintln!("{} {} {} {head}", op.cursor, op.op_id, op.kind);
                    }
                }
            }
            assert_share_is_the_export(capsync, oc, session, &live_export(oc, session));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every op of the share, in cursor order, through a viewer.
fn share_log(capsync: &Capsync, share_id: &str) -> Vec<capsync_tests::client::LoggedOp> {
    run_local(async {
        let (conn, agent) = capsync.agent_client().await;
        capsync_tests::model::read_log(&capsync.viewer(&conn, &agent, share_id).await).await
    })
}

#[test]
fn a_viewer_sees_the_text_as_it_streams_before_the_part_ends() {
    let Some(binary) = opencode::binary_or_skip() else {
        return;
    };
    const FIRST: &str = "The first half of a slow answer, ";
    const SECOND: &str = "and the second half.";
    let gate = Gate::new();
    let llm = FakeLlm::builder()
        .script(Script::new().turn(Turn::new().text(FIRST).hold(&gate).text(SECOND)))
        .start();
    let capsync = Capsync::start();
    let oc = opencode_with_plugin(&binary, &llm, &capsync, "auto");
    let session = oc.create_session();
    let pending = oc.prompt_async(&session, "Answer slowly.");
    assert!(gate.wait_reached(PATIENCE), "the stream reached the gate");

    // A live RPC viewer of the session's share gets the first half as deltas while the
    // model still holds the rest.
    let share = {
        let deadline = Instant::now() + SHIP_PATIENCE;
        loop {
            if let Some(share) = capsync.shares_of(&session).pop() {
                break share;
            }
            assert!(Instant::now() < deadline, "no share\n{}", shipper_log(&oc));
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let streamed = run_local(async {
        let (conn, agent) = capsync.agent_client().await;
        let viewer = capsync.viewer(&conn, &agent, &share).await;
        let mut live = viewer.subscribe(0).await.expect("subscribe");
        let mut streamed = String::new();
        let deadline = tokio::time::Instant::now() + SHIP_PATIENCE;
        while !streamed.contains(FIRST.trim_end()) {
            let event = tokio::time::timeout_at(deadline, live.next())
                .await
                .expect("the first half as deltas in time")
                .expect("the subscription goes on");
            let capsync_tests::client::LiveEvent::Ops(ops) = event else {
                panic!("the subscription ended: {event:?}");
            };
            for op in ops {
                if op.kind == capsync_tests::client::OpKind::PartDelta {
                    let delta: Value = serde_json::from_str(&op.payload).expect("delta");
                    streamed.push_str(delta["delta"].as_str().unwrap_or(""));
                }
            }
        }
        streamed
    });
    assert!(!streamed.contains("second"), "{streamed}");
    // The part is still streaming: opencode holds it without an end time.
    let messages = oc.messages(&session);
    let text = messages
        .as_array()
        .and_then(|m| m.last())
        .map(|m| parts(m).iter().find(|p| p["type"] == "text").cloned())
        .expect("the reply")
        .expect("its text part");
    assert!(text["time"]["end"].is_null(), "{text}");

    gate.open();
    oc.wait_reply(&pending);
    wait_share_matches(&capsync, &oc, &session);
}

#[test]
fn a_sub_agent_session_is_shared_as_a_child_of_its_parent() {
    let Some(binary) = opencode::binary_or_skip() else {
        return;
    };
    const SUBTASK: &str = "SUBTASK: read notes.txt and report.";
    let llm = FakeLlm::builder()
        .script(
            Script::new()
                .turn(Turn::new().tool(
                    "task",
                    json!({"description": "Read the notes", "prompt": SUBTASK, "subagent_type": "general"}),
                ))
                .turn(Turn::new().text("The sub-agent read the notes.")),
        )
        .script_when(
            "SUBTASK",
            Script::new().turn(Turn::new().text("The notes say the task is open.")),
        )
        .start();
    let capsync = Capsync::start();
    let oc = opencode_with_plugin(&binary, &llm, &capsync, "auto");
    let session = oc.create_session();
    oc.prompt(&session, "Delegate reading the notes.");
    let (_, children) = oc.request("GET", &format!("/session/{session}/children"), None);
    let child = children
        .as_array()
        .and_then(|c| c.first())
        .and_then(|c| c["id"].as_str())
        .unwrap_or_else(|| panic!("a sub-agent session: {children}"))
        .to_owned();

    let parent_share = wait_share_matches(&capsync, &oc, &session);
    let child_share = wait_share_matches(&capsync, &oc, &child);
    let listed = run_local(async {
        let (_conn, agent) = capsync.agent_client().await;
        agent
            .list_shares("", 100, false)
            .await
            .expect("list")
            .shares
    });
    let child_info = listed
        .iter()
        .find(|s| s.state.share_id.as_str() == child_share)
        .expect("the child's share");
    assert_eq!(
        child_info.parent_session_id.as_deref(),
        Some(session.as_str())
    );

    // The parent's page data names the child's share (the page links the task call
    // there), read with the parent's link from `capsync opencode status`.
    let status = plugin_status(oc.project_dir());
    let link = status["sessions"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["sessionId"] == session.as_str()))
        .and_then(|s| s["link"].as_str())
        .expect("the parent's link")
        .to_owned();
    let token = link.rsplit('#').next().expect("a token in the link");
    let mut response = http()
        .get(format!(
            "http://{}/api/shares/{parent_share}/snapshot",
            capsync.http_addr
        ))
        .header("Authorization", format!("Bearer {token}"))
        .call()
        .expect("snapshot");
    let doc: Value =
        serde_json::from_str(&response.body_mut().read_to_string().expect("body")).expect("JSON");
    assert_eq!(
        doc["children"][&child],
        child_share.as_str(),
        "{:#}",
        doc["children"]
    );
}

#[test]
fn opencode_killed_mid_stream_loses_nothing_journaled_and_the_session_continues() {
    let Some(binary) = opencode::binary_or_skip() else {
        return;
    };
    const STREAMED: &str = "This answer is cut off ";
    let gate = Gate::new();
    let llm = FakeLlm::builder()
        .script(Script::new().turn(Turn::new().text(STREAMED).hold(&gate).text("never sent")))
        .script_when(
            "CONTINUE",
            Script::new().turn(Turn::new().text("Picking up where we stopped.")),
        )
        .start();
    let capsync = Capsync::start();
    let oc = opencode_with_plugin(&binary, &llm, &capsync, "auto");
    let session = oc.create_session();
    oc.prompt_async(&session, "Answer at length.");
    assert!(gate.wait_reached(PATIENCE), "the stream reached the gate");
    // Everything up to the held point is journaled once the deltas are in the share.
    let share = {
        let deadline = Instant::now() + SHIP_PATIENCE;
        loop {
            let shares = capsync.shares_of(&session);
            if let Some(share) = shares.first()
                && capsync
                    .snapshot(share)
                    .to_string()
                    .contains(STREAMED.trim_end())
            {
                break share.clone();
            }
            assert!(
                Instant::now() < deadline,
                "the streamed text never arrived\n{}",
                shipper_log(&oc)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    oc.stop_serve(); // SIGKILL, mid-stream
    gate.open();

    // Later, the session goes on in a new opencode process.
    let out = oc.command(&[
        "run",
        "--session",
        &session,
        "--format",
        "json",
        "CONTINUE please.",
    ]);
    assert!(out.status.success(), "{out:?}");
    let export = oc.export(&session);
    wait_shipper_ended(&oc);
    let held = carried_by_document(&capsync.snapshot(&share));
    let expected = carried_by_export(&export);
    // Every message and every part the continued session has is in the share as opencode
    // has it, but the part the kill cut off: opencode keeps what it had stored, the share
    // also the text streamed (and journaled) before the kill.
    assert_eq!(held.session, expected.session, "{}", shipper_log(&oc));
    assert_eq!(
        held.messages.keys().collect::<Vec<_>>(),
        expected.messages.keys().collect::<Vec<_>>()
    );
    for (id, part) in &expected.parts {
        let got = held
            .parts
            .get(id)
            .unwrap_or_else(|| panic!("part {id} missing"));
        if got != part {
            let (got_text, text) = (
                got["text"].as_str().unwrap_or(""),
                part["text"].as_str().unwrap_or(""),
            );
            assert!(
                got_text.starts_with(text) && got_text.contains(STREAMED.trim_end()),
                "part {id}: share {got:#} export {part:#}"
            );
        }
    }
    assert!(
        text_of_all(&held)
            .iter()
            .any(|t| t.contains("Picking up where we stopped."))
    );
    capsync_tests::model::check_log(&share_log(&capsync, &share));
}

fn text_of_all(carried: &Carried) -> Vec<String> {
    carried
        .parts
        .values()
        .filter(|p| p["type"] == "text")
        .filter_map(|p| p["text"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn a_revert_and_an_unrevert_leave_the_share_as_opencode_has_the_session() {
    let Some(binary) = opencode::binary_or_skip() else {
        return;
    };
    let llm = FakeLlm::start();
    let capsync = Capsync::start();
    let oc = opencode_with_plugin(&binary, &llm, &capsync, "auto");
    let session = oc.create_session();
    oc.prompt(&session, PROMPT);
    wait_share_matches(&capsync, &oc, &session);
    let messages = oc.messages(&session);
    let first_reply = messages[1]["info"]["id"]
        .as_str()
        .expect("a reply")
        .to_owned();

    // Revert to before the first reply: the session says so; the messages stay until
    // the next prompt.
    let (status, body) = oc.request(
        "POST",
        &format!("/session/{session}/revert"),
        Some(&json!({"messageID": first_reply})),
    );
    assert_eq!(status, 200, "{body}");
    assert!(oc.session(&session)["revert"].is_object());
    wait_share_matches(&capsync, &oc, &session);

    let (status, body) = oc.request("POST", &format!("/session/{session}/unrevert"), None);
    assert_eq!(status, 200, "{body}");
    assert!(oc.session(&session)["revert"].is_null());
    wait_share_matches(&capsync, &oc, &session);

    // Revert again and prompt: opencode removes the reverted messages, and so does the share.
    let (status, body) = oc.request(
        "POST",
        &format!("/session/{session}/revert"),
        Some(&json!({"messageID": first_reply})),
    );
    assert_eq!(status, 200, "{body}");
    oc.prompt(&session, PROMPT);
    assert!(
        oc.messages(&session)
            .as_array()
            .is_some_and(|m| m.iter().all(|m| m["info"]["id"] != first_reply.as_str())),
        "the reverted reply is gone"
    );
    let share = wait_share_matches(&capsync, &oc, &session);
    capsync_tests::model::check_log(&share_log(&capsync, &share));
}

#[test]
fn cut_and_delayed_connections_lose_and_duplicate_nothing() {
    let Some(binary) = opencode::binary_or_skip() else {
        return;
    };
    let capsync = Capsync::start();
    let proxy = capsync_tests::proxy::FaultProxy::start(capsync.rpc_addr, 11);
    let control = proxy.control();
    let llm = FakeLlm::start();
    let oc = WithShipper(plugin_builder(&binary, &llm, &capsync, proxy.addr(), "auto").start());
    let session = oc.create_session();
    let pending = oc.prompt_async(&session, PROMPT);
    // Faults while the session runs: cut connections, cut requests and responses,
    // dropped responses, and delays, one after another.
    let faults = std::thread::spawn(move || {
        for round in 0..24u32 {
            match round % 5 {
                0 => drop(control.cut_all()),
                1 => control.cut_next_request(),
                2 => control.cut_next_response(),
                3 => control.drop_next_response(),
                _ => control.delay(Duration::from_millis(150)),
            }
            std::thread::sleep(Duration::from_millis(250));
            control.delay(Duration::ZERO);
        }
        control.heal();
        control.counts()
    });
    oc.wait_reply(&pending);
    let counts = faults.join().expect("fault thread");
    let share = wait_share_matches(&capsync, &oc, &session);
    assert!(counts.disruptive() > 0, "faults happened: {counts:?}");
    capsync_tests::model::check_log(&share_log(&capsync, &share));
    println!("faults: {counts:?}");
}

#[test]
fn manual_shares_only_what_is_shared_in_opencode_and_stops_at_unshare() {
    let Some(binary) = opencode::binary_or_skip() else {
        return;
    };
    let llm = FakeLlm::start();
    let capsync = Capsync::start();
    let oc = opencode_with_plugin(&binary, &llm, &capsync, "manual");
    let private = oc.create_session();
    oc.prompt(&private, PROMPT);
    let shared = oc.create_session();
    oc.prompt(&shared, PROMPT);

    // /share goes to capsync (the plugin points opencode's share client there), and the
    // shipper joins that share and sends the whole session, journaled before the share.
    let url = oc.share(&shared);
    assert!(
        url.starts_with(&format!("http://{}/share/", capsync.http_addr)),
        "{url}"
    );
    let share = wait_share_matches(&capsync, &oc, &shared);
    assert!(
        capsync.shares_of(&private).is_empty(),
        "an unshared session stays home"
    );

    // Unsharing deletes the share; the shipper stops sending the session, and does not
    // bring the share back for the changes after it (opencode's events keep the old
    // link for a while).
    oc.unshare(&shared);
    assert!(capsync.shares_of(&shared).is_empty());
    oc.prompt(&shared, PROMPT);
    let state_of = |status: &Value| {
        status["sessions"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["sessionId"] == shared.as_str()))
            .map(|s| s["state"].clone())
    };
    let deadline = Instant::now() + SHIP_PATIENCE;
    loop {
        let status = plugin_status(oc.project_dir());
        if status["unreadBytes"] == 0 && state_of(&status) == Some(json!("stopped")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{status:#}\n{}",
            shipper_log(&oc)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        capsync.shares_of(&shared).is_empty(),
        "{}",
        shipper_log(&oc)
    );

    // Shared again: a new share, with the whole session.
    oc.share(&shared);
    let again = wait_share_matches(&capsync, &oc, &shared);
    assert_ne!(again, share);
    assert!(capsync.shares_of(&private).is_empty());
}

/// Runs `script` (an ES module) with node; its stdout. `None` (skipped) without node,
/// unless opencode is required, which brings node along.
fn node(script: &str) -> Option<String> {
    let output = match std::process::Command::new("node")
        .args(["--input-type=module", "-e", script])
        .output()
    {
        Ok(output) => output,
        Err(e) if std::env::var_os("REQUIRE_OPENCODE").is_none() => {
            eprintln!("skipped: node is not available ({e})");
            return None;
        }
        Err(e) => panic!("node: {e}"),
    };
    assert!(output.status.success(), "node: {output:?}");
    Some(String::from_utf8(output.stdout).expect("UTF-8"))
}

#[test]
fn the_plugin_seals_full_segments_starts_the_shipper_and_points_opencode_here() {
    let scratch = tempfile::tempdir().expect("scratch");
    let journal = scratch.path().join("journal");
    let token_file = scratch.path().join("token");
    std::fs::write(&token_file, "csagent_1_secret\n").expect("token");
    let marker = scratch.path().join("shipper-ran");
    let log = scratch.path().join("shipper.log");
    // 1-byte segments: each event seals its segment, so several begin within one ms,
    // and their names must still order them (the shipper reads them in name order).
    let settings = json!({
        "journal": journal, "segmentBytes": 1, "log": log, "tokenFile": token_file,
        "shareOrigin": "http://share.example:7421/", "share": "auto",
        "shipper": ["/bin/sh", "-c", format!("echo started > {}", marker.display())],
    });
    let script = |settings: &Value| {
        format!(
            r#"const {{ CapsyncJournal }} = await import({plugin});
const hooks = await CapsyncJournal({{ directory: "/nowhere" }}, {settings});
for (let i = 0; i < 10; i++) {{
  hooks.event({{ event: {{ id: "evt_" + i, type: "message.part.delta", properties: {{ sessionID: "ses_1",
    messageID: "msg_1", partID: "prt_1", field: "text", delta: "word " + i }} }} }});
  hooks.event({{ event: {{ id: "noise_" + i, type: "session.idle", properties: {{}} }} }});
}}
const config = {{ share: "manual" }};
if (hooks.config) await hooks.config(config);
console.log(JSON.stringify(config));"#,
            plugin = json!(format!("file://{}", journal_plugin().display())),
        )
    };
    let Some(stdout) = node(&script(&settings)) else {
        return;
    };
    // opencode's own share client goes to capsync's drop-in API, with the token from
    // the file; `share: auto` turns opencode's auto-sharing on.
    let config: Value = serde_json::from_str(stdout.trim()).expect("config JSON");
    assert_eq!(
        config,
        json!({"share": "auto", "enterprise": {"url": "http://share.example:7421/opencode/csagent_1_secret"}})
    );
    // The shipper was started (detached; it may finish after node has exited).
    let deadline = Instant::now() + PATIENCE;
    while !marker.exists() {
        assert!(Instant::now() < deadline, "the shipper never ran");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Every share event, in order, across segments; every full segment sealed.
    let segments = capsync_tests::client::opencode::journal::segments(&journal).expect("segments");
    assert!(
        segments.len() > 1,
        "the 1-byte segments rolled over: {segments:?}"
    );
    let mut ids = Vec::new();
    for (i, segment) in segments.iter().enumerate() {
        assert_eq!(segment.pid, segments[0].pid);
        let read =
            capsync_tests::client::opencode::journal::read_journal(&segment.path, 0, 1 << 20)
                .expect("read");
        assert_eq!(read.sealed, i + 1 < segments.len(), "{}", segment.name);
        ids.extend(
            read.entries
                .iter()
                .map(|e| e.event["id"].as_str().expect("id").to_owned()),
        );
    }
    assert_eq!(ids, (0..10).map(|i| format!("evt_{i}")).collect::<Vec<_>>());

    // A shipper that cannot start is written to the log; opencode carries on.
    let mut broken = settings.clone();
    broken["shipper"] = json!(["/nonexistent/capsync"]);
    broken["journal"] = json!(scratch.path().join("journal-2"));
    node(&script(&broken)).expect("node ran before");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("cannot start the shipper /nonexistent/capsync") {
            break;
        }
        assert!(Instant::now() < deadline, "log: {text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
