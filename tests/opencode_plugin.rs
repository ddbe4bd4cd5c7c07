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
fn opencode_with_plugin(binary: &Path, llm: &FakeLlm, capsync: &Capsync, share: &str) -> OpenCode {
    let server = capsync.rpc_addr.to_string();
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
        .start()
}

/// `capsync opencode status --project DIR --json`.
fn plugin_status(project: &Path) -> Value {
    let out = std::process::Command::new(CAPSYNC)
        .args(["--json", "opencode", "status", "--project"])
        .arg(project)
        .output()
        .expect("run capsync");
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).expect("status JSON")
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
        let differing: Vec<&String> = expected
            .parts
            .keys()
            .chain(expected.messages.keys())
            .filter(|id| {
                held.parts.get(*id) != expected.parts.get(*id)
                    && held.messages.get(*id) != expected.messages.get(*id)
            })
            .collect();
        panic!(
            "the share is not the export: session equal: {}, records differing: {differing:?}\n\
             share: {held:#?}\nexport: {expected:#?}\n{}",
            held.session == expected.session,
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

    capsync
        .server
        .start_again_at(capsync.rpc_addr, capsync.http_addr);
    wait_shipper_ended(&oc);
    assert_share_is_the_export(&capsync, &oc, &session, &export);
    assert_nothing_left_behind(&oc);
}
