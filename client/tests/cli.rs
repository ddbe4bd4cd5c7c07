//! The `capsync` binary against an in-memory fake server: output, exit codes, errors.

#[path = "support/fake_server.rs"]
mod fake_server;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::{Value, json};

/// Runs `capsync` with a clean environment apart from the server and token given.
fn capsync(server: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_capsync"));
    command
        .args(args)
        .env_remove("CAPSYNC_TOKEN")
        .env_remove("CAPSYNC_TOKEN_FILE")
        .env("CAPSYNC_SERVER", server);
    if let Some(token) = token {
        command.env("CAPSYNC_TOKEN", token);
    }
    command.output().expect("run capsync")
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

fn json_out(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", stdout(output)))
}

fn assert_ok(output: &Output) {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        stdout(output),
        stderr(output)
    );
}

fn write_export(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("session.json");
    let export = json!({
        "info": {"id": "ses_cli", "projectID": "prj", "title": "CLI session"},
        "models": [{"id": "model-a"}],
        "messages": [
            {"info": {"id": "msg_1", "role": "user"},
             "parts": [{"id": "prt_1", "type": "text", "text": "make it faster"}]},
            {"info": {"id": "msg_2", "role": "assistant", "modelID": "model-a"},
             "parts": [{"id": "prt_2", "type": "reasoning", "text": "profile first"},
                       {"id": "prt_3", "type": "tool", "tool": "bash", "state": {"status": "completed", "title": "cargo bench"}}]}
        ]
    });
    std::fs::write(&path, serde_json::to_string_pretty(&export).unwrap()).unwrap();
    path
}

#[test]
fn the_whole_flow_from_admin_to_viewer() {
    let (addr, admin_token) = fake_server::start_thread();
    let server = addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let export = write_export(dir.path());
    let export = export.to_str().unwrap();

    // mint-agent prints the token alone on stdout.
    let out = capsync(
        &server,
        Some(&admin_token),
        &["admin", "mint-agent", "--label", "ci"],
    );
    assert_ok(&out);
    let agent_token = stdout(&out).trim().to_owned();
    assert!(agent_token.starts_with("csagent_"), "{agent_token}");
    assert!(stderr(&out).contains("minted agent token"));

    // share create takes its details from the export.
    let out = capsync(
        &server,
        Some(&agent_token),
        &[
            "share",
            "create",
            "--from-export",
            export,
            "--viewer-expires",
            "7d",
            "--json",
        ],
    );
    assert_ok(&out);
    let created = json_out(&out);
    assert_eq!(created["info"]["sessionId"], "ses_cli");
    assert_eq!(created["info"]["title"], "CLI session");
    assert!(created["viewerToken"]["expiresAt"].as_i64().unwrap() > 0);
    let share_id = created["shareId"].as_str().unwrap().to_owned();
    let writer_token = created["writerToken"]["token"].as_str().unwrap().to_owned();
    let viewer_token = created["viewerToken"]["token"].as_str().unwrap().to_owned();

    // Push twice: the second push changes nothing.
    let out = capsync(&server, Some(&writer_token), &["push", export, "--json"]);
    assert_ok(&out);
    let first = json_out(&out);
    assert_eq!(first["format"], "export");
    assert_eq!(first["applied"], 7);
    assert_eq!(first["cursor"], 7);
    let out = capsync(&server, Some(&writer_token), &["push", export]);
    assert_ok(&out);
    assert_eq!(
        stdout(&out).trim(),
        "7 ops in 1 batch: 0 applied, 7 duplicate, 0 rejected; cursor 7"
    );

    // The viewer reads it, readable and as JSON.
    let out = capsync(&server, Some(&viewer_token), &["snapshot"]);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(text.starts_with("CLI session\n"), "{text}");
    assert!(text.contains("── assistant · msg_2 · model-a"), "{text}");
    assert!(
        text.contains("  [tool bash: completed] cargo bench"),
        "{text}"
    );
    let out = capsync(&server, Some(&viewer_token), &["snapshot", "--json"]);
    assert_ok(&out);
    let document = json_out(&out);
    assert_eq!(document["cursor"], 7);
    assert_eq!(document["session"]["id"], "ses_cli");
    assert_eq!(
        document["messages"][1]["parts"].as_array().unwrap().len(),
        2
    );

    // A snapshot document pushes back as an export: all duplicates.
    let snapshot_path = dir.path().join("snapshot.json");
    std::fs::write(&snapshot_path, stdout(&out)).unwrap();
    let out = capsync(
        &server,
        Some(&writer_token),
        &["push", snapshot_path.to_str().unwrap(), "--json"],
    );
    assert_ok(&out);
    assert_eq!(json_out(&out)["duplicates"], 7);

    // state, ops, mint-viewer, save.
    let out = capsync(&server, Some(&writer_token), &["state", "--json"]);
    assert_ok(&out);
    assert_eq!(json_out(&out)["shareId"], share_id.as_str());
    let out = capsync(
        &server,
        Some(&viewer_token),
        &["ops", "--all", "--limit", "4", "--json"],
    );
    assert_ok(&out);
    assert_eq!(json_out(&out)["ops"].as_array().unwrap().len(), 7);
    let out = capsync(
        &server,
        Some(&writer_token),
        &["mint-viewer", "--expires", "1h"],
    );
    assert_ok(&out);
    assert!(stdout(&out).trim().starts_with("csviewer_"));
    let out = capsync(&server, Some(&writer_token), &["save"]);
    assert_ok(&out);
    assert!(stdout(&out).trim().starts_with("cswriter_"));

    // Listing and unsharing.
    let out = capsync(&server, Some(&agent_token), &["share", "list"]);
    assert_ok(&out);
    assert!(stdout(&out).contains(&share_id));
    let out = capsync(
        &server,
        Some(&agent_token),
        &["share", "revoke", &share_id, "--scope", "viewers"],
    );
    assert_ok(&out);
    assert!(stdout(&out).contains("revoked viewers"), "{}", stdout(&out));

    // The revoked viewer link fails with one clear line and exit 1.
    let out = capsync(&server, Some(&viewer_token), &["snapshot"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "error: permission denied: token not accepted\n"
    );
    assert!(stdout(&out).is_empty());

    let out = capsync(
        &server,
        Some(&admin_token),
        &["admin", "list", "--all", "--json"],
    );
    assert_ok(&out);
    assert_eq!(json_out(&out)["shares"].as_array().unwrap().len(), 1);
}

#[test]
fn rejected_ops_make_push_exit_3() {
    let (addr, admin_token) = fake_server::start_thread();
    let server = addr.to_string();
    let agent = stdout(&capsync(
        &server,
        Some(&admin_token),
        &["admin", "mint-agent"],
    ))
    .trim()
    .to_owned();
    let created = json_out(&capsync(
        &server,
        Some(&agent),
        &["share", "create", "--session-id", "ses_x", "--json"],
    ));
    let writer = created["writerToken"]["token"].as_str().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let ops = dir.path().join("ops.jsonl");
    std::fs::write(
        &ops,
        "{\"opId\": \"s\", \"kind\": \"session.upsert\", \"payload\": {\"id\": \"ses_x\"}}\n\
         {\"opId\": \"w\", \"kind\": \"session.upsert\", \"payload\": {\"id\": \"wrong\"}}\n",
    )
    .unwrap();
    let out = capsync(&server, Some(writer), &["push", ops.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("1 applied, 0 duplicate, 1 rejected"),
        "{text}"
    );
    assert!(
        text.contains("rejected w (session.upsert): invalid: not this share's session"),
        "{text}"
    );

    // A malformed file fails before connecting, naming the line.
    std::fs::write(
        &ops,
        "{\"opId\": \"a\", \"kind\": \"diff.set\", \"payload\": []}\n{oops}\n",
    )
    .unwrap();
    let out = capsync(
        &server,
        Some(writer),
        &["push", ops.to_str().unwrap(), "--json"],
    );
    assert_eq!(out.status.code(), Some(1));
    let error = json_out(&out);
    assert_eq!(error["error"]["code"], "invalidInput");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("line 2"),
        "{error}"
    );
    assert!(stderr(&out).starts_with("error: invalid input: line 2"));
}

#[test]
fn token_problems_are_clear_and_never_echo_the_token() {
    let (addr, admin_token) = fake_server::start_thread();
    let server = addr.to_string();

    let out = capsync(&server, None, &["state"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("needs a writer or viewer token"),
        "{}",
        stderr(&out)
    );

    let secret = "csviewer_zz_not-a-real-secret";
    let out = capsync(&server, Some(secret), &["snapshot", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!stderr(&out).contains("not-a-real-secret"));
    assert!(!stdout(&out).contains("not-a-real-secret"));
    assert_eq!(json_out(&out)["error"]["code"], "invalidInput");

    // The admin token is well-formed but the wrong kind for `push`: refused before sending.
    let out = capsync(&server, Some(&admin_token), &["push", "nonexistent.json"]);
    assert_eq!(out.status.code(), Some(1));
    // (the file is read first)
    assert!(
        stderr(&out).contains("cannot read nonexistent.json"),
        "{}",
        stderr(&out)
    );
    let out = capsync(&server, Some(&admin_token), &["snapshot"]);
    assert_eq!(
        stderr(&out),
        "error: this is an admin token, but this needs a viewer token\n"
    );
    assert!(!stderr(&out).contains(&admin_token));

    // A well-formed token the server does not know.
    let unknown = capsync_shared::SturdyRef::generate(capsync_shared::TokenKind::Admin).expose();
    let out = capsync(&server, Some(&unknown), &["admin", "list", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json_out(&out)["error"]["code"], "permissionDenied");
    assert!(!stdout(&out).contains(&unknown) && !stderr(&out).contains(&unknown));

    // Nothing listening.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = capsync(
        &format!("127.0.0.1:{port}"),
        Some(&admin_token),
        &["admin", "list"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with(&format!("error: could not connect to 127.0.0.1:{port}")),
        "{}",
        stderr(&out)
    );
}

#[test]
fn the_command_line_runs_in_process_with_captured_output() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&runtime, async {
        let (addr, world) = fake_server::start_local().await;
        let server = addr.to_string();
        let admin = world.borrow().admin_token.clone();
        let run = |args: Vec<&str>| {
            let mut full = vec!["capsync", "--server", &server];
            full.extend(args);
            let full: Vec<String> = full.into_iter().map(str::to_owned).collect();
            capsync_client::cli::run_args(full)
        };

        let minted = run(vec!["--token", &admin, "admin", "mint-agent"]).await;
        assert_eq!(minted.code, 0, "{minted:?}");
        assert!(minted.stdout.starts_with("csagent_"));
        assert!(minted.stderr.starts_with("minted agent token"));

        let listed = run(vec!["--token", &admin, "admin", "list", "--json"]).await;
        assert_eq!(listed.code, 0);
        let list: Value = serde_json::from_str(&listed.stdout).unwrap();
        assert_eq!(list, json!({"shares": [], "nextAfter": null}));

        let usage = run(vec!["admin", "frobnicate"]).await;
        assert_eq!(usage.code, 2);
        assert!(usage.stderr.contains("frobnicate"), "{usage:?}");

        let help = run(vec!["push", "--help"]).await;
        assert_eq!(help.code, 0);
        assert!(help.stdout.contains("Examples:"), "{help:?}");

        let wrong = run(vec!["--token", &admin, "--json", "state"]).await;
        assert_eq!(wrong.code, 1);
        let error: Value = serde_json::from_str(&wrong.stdout).unwrap();
        assert_eq!(error["error"]["code"], "wrongKind");
    });
}
