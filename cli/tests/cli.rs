//! The `capsync` binary against the real server (started on 127.0.0.1:0 by
//! `support::TestServer`): output, exit codes, errors.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::process_output::{assert_ok, json_out, stderr, stdout};
use serde_json::{Value, json};
use support::TestServer;
use support::peers::HoldingRelay;

/// Runs `capsync` with a clean environment apart from the server and token given.
fn capsync(server: &TestServer, token: Option<&str>, args: &[&str]) -> Output {
    capsync_at(&server.addr().to_string(), token, args)
}

fn capsync_at(server: &str, token: Option<&str>, args: &[&str]) -> Output {
    command(server, token, args).output().expect("run capsync")
}

fn command(server: &str, token: Option<&str>, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_capsync"));
    command
        .args(args)
        .env_remove("CAPSYNC_TOKEN")
        .env_remove("CAPSYNC_TOKEN_FILE")
        .env_remove("CAPSYNC_CONNECT_TIMEOUT")
        .env_remove("CAPSYNC_CALL_TIMEOUT")
        .env("CAPSYNC_SERVER", server);
    if let Some(token) = token {
        command.env("CAPSYNC_TOKEN", token);
    }
    command
}

/// [`capsync_at`] for a run that might hang: killed (and the test failed) after 30 s.
fn capsync_guarded(server: &str, token: Option<&str>, args: &[&str]) -> Output {
    const GUARD: Duration = Duration::from_secs(30);
    let mut child = command(server, token, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run capsync");
    let started = Instant::now();
    // The outputs are a few lines, far below a pipe's buffer: read after the exit.
    while child.try_wait().expect("wait for capsync").is_none() {
        if started.elapsed() > GUARD {
            let _ = child.kill();
            panic!("capsync {args:?} still running after {GUARD:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("capsync output")
}

/// Asserts exit code 1 with exactly one line on stderr starting with `prefix`.
fn assert_error(output: &Output, prefix: &str) {
    let text = stderr(output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.starts_with(prefix), "{text}");
    assert_eq!(text.lines().count(), 1, "{text}");
}

fn write_export(dir: &Path) -> PathBuf {
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

/// Mints an agent token with the admin token, through the CLI.
fn mint_agent(server: &TestServer) -> String {
    let out = capsync(
        server,
        Some(&server.admin_token()),
        &["admin", "mint-agent"],
    );
    assert_ok(&out);
    stdout(&out).trim().to_owned()
}

/// Creates a share through the CLI; its `--json` output.
fn create_share(server: &TestServer, agent: &str, session_id: &str) -> Value {
    let out = capsync(
        server,
        Some(agent),
        &["share", "create", "--session-id", session_id, "--json"],
    );
    assert_ok(&out);
    json_out(&out)
}

#[test]
fn the_whole_flow_from_admin_to_viewer() {
    let server = TestServer::start();
    let admin_token = server.admin_token();
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
    assert_eq!(stdout(&out).lines().count(), 1);
    assert!(
        stderr(&out).starts_with("minted agent token"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains(&agent_token));

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
    assert_eq!(created["info"]["projectId"], "prj");
    assert_eq!(created["info"]["title"], "CLI session");
    assert!(created["viewerToken"]["expiresAt"].as_i64().unwrap() > 0);
    assert_eq!(created["writerToken"]["expiresAt"], Value::Null);
    let share_id = created["shareId"].as_str().unwrap().to_owned();
    let writer_token = created["writerToken"]["token"].as_str().unwrap().to_owned();
    let viewer_token = created["viewerToken"]["token"].as_str().unwrap().to_owned();

    // Push twice: the second push changes nothing.
    let out = capsync(&server, Some(&writer_token), &["push", export, "--json"]);
    assert_ok(&out);
    let first = json_out(&out);
    assert_eq!(first["shareId"], share_id.as_str());
    assert_eq!(first["format"], "export");
    assert_eq!(first["applied"], 7);
    assert_eq!(first["cursor"], 7);
    assert_eq!(first["rejected"], json!([]));
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
    assert!(
        text.contains(&format!("session ses_cli · share {share_id} · cursor 7")),
        "{text}"
    );
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
    assert_eq!(
        json_out(&out),
        json!({"shareId": share_id, "cursor": 7, "writerEpoch": 0, "viewerEpoch": 0})
    );
    let out = capsync(&server, Some(&viewer_token), &["state"]);
    assert_ok(&out);
    assert_eq!(
        stdout(&out).trim(),
        format!("share {share_id}: cursor 7, writer epoch 0, viewer epoch 0")
    );
    let out = capsync(
        &server,
        Some(&viewer_token),
        &["ops", "--all", "--limit", "4", "--json"],
    );
    assert_ok(&out);
    let ops = json_out(&out);
    let cursors: Vec<i64> = ops["ops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|op| op["cursor"].as_i64().unwrap())
        .collect();
    assert_eq!(cursors, vec![1, 2, 3, 4, 5, 6, 7]);
    let out = capsync(&server, Some(&viewer_token), &["ops", "--limit", "4"]);
    assert_ok(&out);
    assert!(
        stdout(&out)
            .trim_end()
            .ends_with("pass --after 4 (or --all)"),
        "{}",
        stdout(&out)
    );
    let out = capsync(
        &server,
        Some(&writer_token),
        &["mint-viewer", "--expires", "1h"],
    );
    assert_ok(&out);
    let link = stdout(&out).trim().to_owned();
    assert!(link.starts_with("csviewer_"));
    assert!(
        stderr(&out).contains(&format!("for share {share_id}")),
        "{}",
        stderr(&out)
    );
    let out = capsync(&server, Some(&link), &["state"]);
    assert_ok(&out);
    let out = capsync(&server, Some(&writer_token), &["save"]);
    assert_ok(&out);
    let saved = stdout(&out).trim().to_owned();
    assert!(saved.starts_with("cswriter_"));
    let out = capsync(&server, Some(&saved), &["push", export]);
    assert_ok(&out);

    // Listing and unsharing.
    let out = capsync(&server, Some(&agent_token), &["share", "list"]);
    assert_ok(&out);
    assert!(stdout(&out).contains(&share_id));
    assert!(stdout(&out).contains("CLI session"));
    let out = capsync(
        &server,
        Some(&agent_token),
        &["share", "revoke", &share_id, "--scope", "viewers"],
    );
    assert_ok(&out);
    assert_eq!(
        stdout(&out).trim(),
        format!("revoked viewers of share {share_id} (writer epoch 0, viewer epoch 1)")
    );

    // The revoked viewer links fail with one clear line and exit 1.
    for link in [&viewer_token, &link] {
        let out = capsync(&server, Some(link), &["snapshot"]);
        assert_error(&out, "error: permission denied: ");
        assert!(stdout(&out).is_empty());
    }
    // The writer still reads.
    let out = capsync(&server, Some(&writer_token), &["snapshot", "--json"]);
    assert_ok(&out);

    let out = capsync(
        &server,
        Some(&admin_token),
        &["admin", "list", "--all", "--json"],
    );
    assert_ok(&out);
    assert_eq!(json_out(&out)["shares"].as_array().unwrap().len(), 1);
}

#[test]
fn the_owner_mints_new_writer_and_viewer_tokens_after_revoking() {
    let server = TestServer::start();
    let agent = mint_agent(&server);
    let created = create_share(&server, &agent, "ses_m");
    let share_id = created["shareId"].as_str().unwrap();
    let old_writer = created["writerToken"]["token"].as_str().unwrap();
    let old_viewer = created["viewerToken"]["token"].as_str().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let ops = dir.path().join("ops.jsonl");
    std::fs::write(
        &ops,
        "{\"opId\": \"s\", \"kind\": \"session.upsert\", \"payload\": {\"id\": \"ses_m\"}}\n",
    )
    .unwrap();
    let ops = ops.to_str().unwrap();
    let out = capsync(&server, Some(old_writer), &["push", ops]);
    assert_ok(&out);

    let out = capsync(
        &server,
        Some(&agent),
        &["share", "revoke", share_id, "--scope", "writers"],
    );
    assert_ok(&out);
    assert!(stdout(&out).contains("writer epoch 1"), "{}", stdout(&out));

    // The old writer token is refused.
    let out = capsync(&server, Some(old_writer), &["push", ops]);
    assert_error(&out, "error: permission denied: ");
    assert!(stdout(&out).is_empty());

    // A freshly minted one pushes: the token alone on stdout, details on stderr.
    let out = capsync(
        &server,
        Some(&agent),
        &["share", "mint-writer", share_id, "--expires", "30d"],
    );
    assert_ok(&out);
    let new_writer = stdout(&out).trim().to_owned();
    assert!(new_writer.starts_with("cswriter_"), "{new_writer}");
    assert_eq!(stdout(&out).lines().count(), 1);
    let note = stderr(&out);
    assert!(
        note.starts_with("minted writer token ") && note.contains(&format!("for share {share_id}")),
        "{note}"
    );
    assert!(!note.contains("never"), "30d is not never: {note}");
    assert!(!note.contains(&new_writer));
    std::fs::write(
        dir.path().join("more.jsonl"),
        "{\"opId\": \"d\", \"kind\": \"diff.set\", \"payload\": {\"diffs\": []}}\n",
    )
    .unwrap();
    let more = dir.path().join("more.jsonl");
    let out = capsync(
        &server,
        Some(&new_writer),
        &["push", more.to_str().unwrap()],
    );
    assert_ok(&out);
    assert_eq!(
        stdout(&out).trim(),
        "1 ops in 1 batch: 1 applied, 0 duplicate, 0 rejected; cursor 2"
    );
    let out = capsync(&server, Some(&new_writer), &["state", "--json"]);
    assert_ok(&out);
    assert_eq!(json_out(&out)["writerEpoch"], 1);

    // The old viewer still works (only writers were revoked); after revoking viewers a
    // fresh link does, as JSON with its expiry.
    let out = capsync(&server, Some(old_viewer), &["state"]);
    assert_ok(&out);
    let out = capsync(
        &server,
        Some(&agent),
        &["share", "revoke", share_id, "--scope", "viewers"],
    );
    assert_ok(&out);
    let out = capsync(&server, Some(old_viewer), &["state"]);
    assert_error(&out, "error: permission denied: ");
    let out = capsync(
        &server,
        Some(&agent),
        &[
            "share",
            "mint-viewer",
            share_id,
            "--expires",
            "7d",
            "--json",
        ],
    );
    assert_ok(&out);
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
    let minted = json_out(&out);
    let new_viewer = minted["token"].as_str().unwrap();
    assert!(new_viewer.starts_with("csviewer_"), "{new_viewer}");
    assert!(new_viewer.contains(minted["tokenId"].as_str().unwrap()));
    let in_7d = capsync_shared::now_millis() + 7 * 86_400_000;
    let expires_at = minted["expiresAt"].as_i64().unwrap();
    assert!((in_7d - 60_000..=in_7d).contains(&expires_at), "{minted}");
    let out = capsync(&server, Some(new_viewer), &["state", "--json"]);
    assert_ok(&out);
    assert_eq!(
        json_out(&out),
        json!({"shareId": share_id, "cursor": 2, "writerEpoch": 1, "viewerEpoch": 1})
    );

    // Only for the agent's own shares, and only with an agent token.
    let other_agent = mint_agent(&server);
    let out = capsync(
        &server,
        Some(&other_agent),
        &["share", "mint-writer", share_id, "--json"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json_out(&out)["error"]["code"], "notFound");
    let out = capsync(
        &server,
        Some(&agent),
        &["share", "mint-viewer", "sh_does_not_exist"],
    );
    assert_error(&out, "error: not found");
    let out = capsync(
        &server,
        Some(&new_writer),
        &["share", "mint-viewer", share_id],
    );
    assert_eq!(
        stderr(&out),
        "error: this is a writer token, but this needs an agent token\n"
    );
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn rejected_ops_make_push_exit_3() {
    let server = TestServer::start();
    let agent = mint_agent(&server);
    let created = create_share(&server, &agent, "ses_x");
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
        text.contains(
            "rejected w (session.upsert): invalid: session id wrong is not this share's session ses_x"
        ),
        "{text}"
    );
    // Again, as JSON: still exit 3, the rejection in the document.
    let out = capsync(
        &server,
        Some(writer),
        &["push", ops.to_str().unwrap(), "--json"],
    );
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let report = json_out(&out);
    assert_eq!(report["duplicates"], 1);
    assert_eq!(report["rejected"][0]["opId"], "w");
    assert_eq!(report["rejected"][0]["reason"], "invalid");

    // A part before its message, with dependsOn: resent after it, so nothing is rejected.
    std::fs::write(
        &ops,
        "{\"opId\": \"p\", \"kind\": \"part.upsert\", \"payload\": {\"id\": \"p\", \"messageID\": \"m\", \"type\": \"text\"}, \"dependsOn\": [\"m\"]}\n\
         {\"opId\": \"m\", \"kind\": \"message.upsert\", \"payload\": {\"id\": \"m\", \"role\": \"user\"}}\n",
    )
    .unwrap();
    let out = capsync(&server, Some(writer), &["push", ops.to_str().unwrap()]);
    assert_ok(&out);
    assert_eq!(
        stdout(&out).trim(),
        "2 ops in 2 batches: 2 applied, 0 duplicate, 0 rejected; cursor 3"
    );

    // A stale transition (replaying an older state of a finished message) is reported
    // but is not an error.
    std::fs::write(
        &ops,
        "{\"opId\": \"m-done\", \"kind\": \"message.upsert\", \"payload\": {\"id\": \"m\", \"role\": \"user\", \"time\": {\"completed\": 9}}}\n\
         {\"opId\": \"m-old\", \"kind\": \"message.upsert\", \"payload\": {\"id\": \"m\", \"role\": \"user\"}}\n",
    )
    .unwrap();
    let out = capsync(&server, Some(writer), &["push", ops.to_str().unwrap()]);
    assert_ok(&out);
    assert!(
        stdout(&out).contains("rejected m-old (message.upsert): staleTransition"),
        "{}",
        stdout(&out)
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
    let server = TestServer::start();
    let admin_token = server.admin_token();

    let out = capsync(&server, None, &["state"]);
    assert_error(
        &out,
        "error: invalid input: this command needs a writer or viewer token",
    );

    let secret = "csviewer_zz_not-a-real-secret";
    let out = capsync(&server, Some(secret), &["snapshot", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!stderr(&out).contains("not-a-real-secret"));
    assert!(!stdout(&out).contains("not-a-real-secret"));
    assert_eq!(json_out(&out)["error"]["code"], "invalidInput");

    // The file is read before the token is even looked at.
    let out = capsync(&server, Some(&admin_token), &["push", "nonexistent.json"]);
    assert_error(&out, "error: invalid input: cannot read nonexistent.json");
    // The admin token is well-formed but the wrong kind: refused before sending.
    let out = capsync(&server, Some(&admin_token), &["snapshot"]);
    assert_eq!(
        stderr(&out),
        "error: this is an admin token, but this needs a viewer token\n"
    );
    assert!(!stderr(&out).contains(&admin_token));

    // A well-formed token the server does not know: its answer, without the token.
    let unknown = capsync_shared::SturdyRef::generate(capsync_shared::TokenKind::Admin).expose();
    let out = capsync(&server, Some(&unknown), &["admin", "list", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let error = json_out(&out);
    assert_eq!(error["error"]["code"], "permissionDenied");
    assert!(!stdout(&out).contains(&unknown) && !stderr(&out).contains(&unknown));
    assert_eq!(
        stderr(&out),
        format!("error: {}\n", error["error"]["message"].as_str().unwrap())
    );

    // From a token file too: its first line, and a missing file is named.
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{admin_token}\nignored\n")).unwrap();
    let out = capsync(
        &server,
        None,
        &[
            "--token-file",
            token_file.to_str().unwrap(),
            "admin",
            "list",
        ],
    );
    assert_ok(&out);
    assert_eq!(stdout(&out).trim(), "no shares");
    let out = capsync(
        &server,
        None,
        &["--token-file", "/nonexistent/token", "admin", "list"],
    );
    assert_error(
        &out,
        "error: invalid input: cannot read token file /nonexistent/token",
    );

    // Nothing listening.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = capsync_at(
        &format!("127.0.0.1:{port}"),
        Some(&admin_token),
        &["admin", "list"],
    );
    assert_error(
        &out,
        &format!("error: could not connect to 127.0.0.1:{port}"),
    );
    assert!(!stderr(&out).contains(&admin_token));
}

#[test]
fn the_command_line_runs_in_process_with_captured_output() {
    let server = TestServer::start();
    let addr = server.addr().to_string();
    let admin = server.admin_token();
    support::run_local(async {
        let run = |args: Vec<&str>| {
            let mut full = vec!["capsync", "--server", &addr];
            full.extend(args);
            let full: Vec<String> = full.into_iter().map(str::to_owned).collect();
            capsync_cli::run_args(full)
        };

        let minted = run(vec!["--token", &admin, "admin", "mint-agent"]).await;
        assert_eq!(minted.code, 0, "{minted:?}");
        assert!(minted.stdout.starts_with("csagent_"));
        assert!(minted.stderr.starts_with("minted agent token"));
        let agent = minted.stdout.trim().to_owned();

        let listed = run(vec!["--token", &admin, "admin", "list", "--json"]).await;
        assert_eq!(listed.code, 0);
        let list: Value = serde_json::from_str(&listed.stdout).unwrap();
        assert_eq!(list, json!({"shares": [], "nextAfter": null}));

        let created = run(vec![
            "--token",
            &agent,
            "share",
            "create",
            "--session-id",
            "ses_in",
            "--json",
        ])
        .await;
        assert_eq!(created.code, 0, "{created:?}");
        let created: Value = serde_json::from_str(&created.stdout).unwrap();
        let share_id = created["shareId"].as_str().unwrap();
        let minted = run(vec!["--token", &agent, "share", "mint-writer", share_id]).await;
        assert_eq!(minted.code, 0, "{minted:?}");
        assert!(minted.stdout.starts_with("cswriter_"), "{minted:?}");
        assert_eq!(
            minted.stderr,
            format!(
                "minted writer token {} for share {share_id} (expires never)\n",
                &minted.stdout.trim()["cswriter_".len()..][..16]
            )
        );

        // Usage errors: exit 2 and clap's message.
        let usage = run(vec!["admin", "frobnicate"]).await;
        assert_eq!(usage.code, 2);
        assert!(usage.stderr.contains("frobnicate"), "{usage:?}");
        let usage = run(vec!["--token", &agent, "share", "mint-writer"]).await;
        assert_eq!(usage.code, 2, "{usage:?}");
        assert!(usage.stderr.contains("<SHARE_ID>"), "{usage:?}");
        let usage = run(vec!["share", "mint-viewer", "sh_1", "--expires", "soon"]).await;
        assert_eq!(usage.code, 2, "{usage:?}");
        assert!(usage.stderr.contains("soon"), "{usage:?}");

        let help = run(vec!["push", "--help"]).await;
        assert_eq!(help.code, 0);
        assert!(help.stdout.contains("Examples:"), "{help:?}");
        for command in ["mint-writer", "mint-viewer"] {
            let help = run(vec!["share", command, "--help"]).await;
            assert_eq!(help.code, 0, "{help:?}");
            assert!(
                help.stdout
                    .contains(&format!("$(capsync share {command} sh_0123abcd --expires")),
                "{help:?}"
            );
            assert!(help.stdout.contains("--scope"), "{help:?}");
        }

        let wrong = run(vec!["--token", &admin, "--json", "state"]).await;
        assert_eq!(wrong.code, 1);
        let error: Value = serde_json::from_str(&wrong.stdout).unwrap();
        assert_eq!(error["error"]["code"], "wrongKind");
    });
}

#[test]
fn lifecycle_commands_explain_themselves_and_refuse_bad_ages() {
    // Nothing here reaches a server: help and usage errors come first.
    let nowhere = "127.0.0.1:1";
    let help = capsync_at(nowhere, None, &["admin", "prune", "--help"]);
    assert_ok(&help);
    let text = stdout(&help);
    for expected in [
        "--older-than <AGE>",
        "[default: 30d]",
        "--children",
        "--archived-only",
        "--dry-run",
        "--vacuum",
        "capsync admin prune --dry-run",
        "A root is a share whose parent session is held by no share",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from:\n{text}"
        );
    }
    for (command, expected) in [
        ("vacuum", "database busy; try again"),
        ("reclaim", "capsync admin reclaim --dry-run"),
        (
            "compact",
            "capsync admin compact --older-than 30d --dry-run",
        ),
    ] {
        let help = capsync_at(nowhere, None, &["admin", command, "--help"]);
        assert_ok(&help);
        assert!(stdout(&help).contains(expected), "{}", stdout(&help));
    }

    let bad = capsync_at(nowhere, None, &["admin", "prune", "--older-than", "soon"]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    let text = stderr(&bad);
    assert!(text.contains("'soon'"), "{text}");
    assert!(text.contains("like 30d, 12h or 90m"), "{text}");

    let missing = capsync_at(nowhere, None, &["admin", "compact"]);
    assert_eq!(missing.status.code(), Some(2), "{}", stderr(&missing));
    assert!(stderr(&missing).contains("--older-than <AGE>"));
}

#[test]
fn server_addresses_of_the_wrong_form_are_refused_with_the_right_form() {
    let viewer = capsync_shared::SturdyRef::generate(capsync_shared::TokenKind::Viewer).expose();
    // A share-page link pasted whole: explained, exit 2, and its token never echoed.
    let secret = "csviewer_0011223344556677_dontprintme";
    for link in [
        format!("http://127.0.0.1:7421/s/sh_0123#{secret}"),
        format!("https://sync.example.org/s/sh_0123#{secret}"),
    ] {
        let out = capsync_at(&link, Some(&viewer), &["state"]);
        let text = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{text}");
        assert!(
            !text.contains("dontprintme") && !text.contains(secret),
            "{text}"
        );
        assert!(text.contains("not a URL"), "{text}");
        assert!(
            text.contains(":7420 (the RPC port, 7420 by default"),
            "{text}"
        );
        assert!(text.contains("Share-page links are for browsers"), "{text}");
        assert!(text.contains("--token or CAPSYNC_TOKEN"), "{text}");
        assert_eq!(stdout(&out), "");
    }
    // A host without its port.
    let out = capsync_at("sync.example.org", Some(&viewer), &["state"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("needs a port: HOST:PORT, e.g. sync.example.org:7420"),
        "{}",
        stderr(&out)
    );
    // A port that is not a number: the flag is named, the right form given.
    let out = capsync_at(
        "127.0.0.1:7420",
        Some(&viewer),
        &["--server", "h:rpc", "state"],
    );
    assert_eq!(out.status.code(), Some(2));
    let text = stderr(&out);
    assert!(
        text.contains("invalid value for '--server <HOST:PORT>'")
            && text.contains("from 1 to 65535"),
        "{text}"
    );
}

#[test]
fn a_port_that_is_not_capsync_is_named_as_such() {
    let server = TestServer::start();
    let viewer = capsync_shared::SturdyRef::generate(capsync_shared::TokenKind::Viewer).expose();
    let http = server.http_addr();
    let out = capsync_guarded(&http.to_string(), Some(&viewer), &["state"]);
    assert_eq!(
        stderr(&out),
        format!(
            "error: {http} is not a capsync RPC port (it answered with HTTP: probably the share-page/HTTP port; the RPC port is 7420 by default)\n"
        )
    );
    assert_eq!(out.status.code(), Some(1));
    let out = capsync_guarded(&http.to_string(), Some(&viewer), &["snapshot", "--json"]);
    assert_eq!(json_out(&out)["error"]["code"], "notCapsync");
    assert!(!stdout(&out).contains(&viewer) && !stderr(&out).contains(&viewer));

    let smtp = support::peers::foreign_listener(b"220 mail.example.org ESMTP\r\n");
    let out = capsync_guarded(&smtp.to_string(), Some(&viewer), &["state"]);
    assert_error(
        &out,
        &format!(
            "error: {smtp} is not a capsync RPC port (it answered with bytes that are not Cap'n Proto: \"220 \")"
        ),
    );
}

#[test]
fn commands_give_up_on_a_server_that_does_not_answer() {
    // Takes connections into its listen queue and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let viewer = capsync_shared::SturdyRef::generate(capsync_shared::TokenKind::Viewer).expose();
    let out = capsync_guarded(
        &addr.to_string(),
        Some(&viewer),
        &["--connect-timeout", "300ms", "state"],
    );
    assert_error(
        &out,
        &format!(
            "error: timed out after 300ms connecting to {addr} (no answer from a capsync server"
        ),
    );
    // The environment variable works as the flag, and --json names the code.
    let mut env = command(&addr.to_string(), Some(&viewer), &["state", "--json"]);
    let out = env
        .env("CAPSYNC_CONNECT_TIMEOUT", "250ms")
        .output()
        .expect("run capsync");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json_out(&out)["error"]["code"], "timeout");
    assert!(stderr(&out).starts_with("error: timed out after 250ms connecting"));

    // A server that answers the handshake and the redeem, then falls silent.
    let server = TestServer::start();
    let agent = mint_agent(&server);
    let share = create_share(&server, &agent, "ses_silent");
    let viewer = share["viewerToken"]["token"].as_str().unwrap();
    let relay = HoldingRelay::start(server.addr(), 2);
    let relay_addr = relay.addr().to_string();
    let out = capsync_guarded(
        &relay_addr,
        Some(viewer),
        &["--call-timeout", "300ms", "state"],
    );
    assert_error(
        &out,
        &format!("error: timed out after 300ms waiting for the server at {relay_addr} to answer"),
    );
    // The same command straight to the server works with the same limit.
    let out = capsync(&server, Some(viewer), &["--call-timeout", "300ms", "state"]);
    assert_ok(&out);
}

#[test]
fn a_rate_limited_redeem_says_when_to_retry() {
    let server = TestServer::start_with(|config| config.redeem_failures = 1);
    let unknown = capsync_shared::SturdyRef::generate(capsync_shared::TokenKind::Viewer).expose();
    let out = capsync(&server, Some(&unknown), &["state"]);
    assert_error(&out, "error: permission denied");
    // This address has used up its failed redeems: refused unchecked, with a wait.
    let out = capsync(&server, Some(&unknown), &["state", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let error = &json_out(&out)["error"];
    assert_eq!(error["code"], "rateLimited", "{error}");
    let wait = error["retryAfterMs"].as_u64().expect("retryAfterMs");
    assert!(wait > 0 && wait <= 60_000, "{error}");
    let message = error["message"].as_str().unwrap();
    assert_eq!(message.matches("retry in").count(), 1, "{message}");
    assert_eq!(stderr(&out), format!("error: {message}\n"));
    assert!(!stderr(&out).contains(&unknown));
}

#[test]
fn opencode_install_writes_the_plugin_and_a_private_token_and_uninstall_removes_them() {
    use std::os::unix::fs::PermissionsExt as _;
    let server = TestServer::start();
    let agent = mint_agent(&server);
    let scratch = tempfile::tempdir().unwrap();
    let project = scratch.path().join("project");
    std::fs::create_dir(&project).unwrap();
    let project_arg = project.to_str().unwrap();
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;

    let out = capsync(
        &server,
        Some(&agent),
        &[
            "--json",
            "opencode",
            "install",
            "--project",
            project_arg,
            "--share",
            "auto",
        ],
    );
    assert_ok(&out);
    let report = json_out(&out);
    let dir = project.join(".opencode/capsync");
    let plugin = project.join(".opencode/plugin/capsync.js");
    assert_eq!(report["plugin"], plugin.to_str().unwrap());
    assert_eq!(report["dir"], dir.to_str().unwrap());
    assert_eq!(report["share"], "auto");
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("token")), 0o600);
    assert_eq!(
        std::fs::read_to_string(dir.join("token")).unwrap().trim(),
        agent
    );
    assert_eq!(
        std::fs::read_to_string(dir.join(".gitignore"))
            .unwrap()
            .lines()
            .last(),
        Some("*")
    );
    // The plugin carries its settings (the shipper's command line among them), never the token.
    let source = std::fs::read_to_string(&plugin).unwrap();
    assert!(!source.contains(&agent), "the token is in the plugin file");
    assert!(source.contains(r#""share":"auto""#), "{source}");
    assert!(
        source.contains(&format!(r#""--dir","{}""#, dir.display())),
        "{source}"
    );
    assert!(!stdout(&out).contains(&agent));

    // Nothing journaled yet.
    let out = capsync(
        &server,
        None,
        &["--json", "opencode", "status", "--project", project_arg],
    );
    assert_ok(&out);
    let status = json_out(&out);
    assert_eq!(status["shipperRunning"], false);
    assert_eq!(status["sessions"], json!([]));

    // A bad token writes nothing.
    let elsewhere = scratch.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let out = capsync(
        &server,
        Some("csagent_0000000000000000_0000"),
        &[
            "opencode",
            "install",
            "--project",
            elsewhere.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(!elsewhere.join(".opencode").exists());

    // Uninstall keeps the directory (the token, what was not sent) unless --purge.
    let out = capsync(
        &server,
        None,
        &["opencode", "uninstall", "--project", project_arg],
    );
    assert_ok(&out);
    assert!(!plugin.exists());
    assert!(dir.join("token").exists());
    assert!(stdout(&out).contains("--purge"), "{}", stdout(&out));
    let out = capsync(
        &server,
        None,
        &["opencode", "uninstall", "--project", project_arg, "--purge"],
    );
    assert_ok(&out);
    assert!(!dir.exists());
}

#[test]
fn opencode_install_global_uses_the_xdg_directories_opencode_uses() {
    let server = TestServer::start();
    let agent = mint_agent(&server);
    let home = tempfile::tempdir().unwrap();
    let out = command(
        &server.addr().to_string(),
        Some(&agent),
        &["--json", "opencode", "install", "--global"],
    )
    .env("HOME", home.path())
    .env_remove("XDG_CONFIG_HOME")
    .env_remove("XDG_STATE_HOME")
    .output()
    .unwrap();
    assert_ok(&out);
    let report = json_out(&out);
    assert_eq!(report["share"], "manual", "the default");
    let plugin = home.path().join(".config/opencode/plugin/capsync.js");
    let dir = home.path().join(".local/state/capsync/opencode");
    assert_eq!(report["plugin"], plugin.to_str().unwrap());
    assert_eq!(report["dir"], dir.to_str().unwrap());
    assert!(plugin.exists() && dir.join("token").exists());

    // XDG variables win, as they do for opencode.
    let config = home.path().join("cfg");
    let state = home.path().join("st");
    let out = command(
        &server.addr().to_string(),
        Some(&agent),
        &["--json", "opencode", "install", "--global"],
    )
    .env("HOME", home.path())
    .env("XDG_CONFIG_HOME", &config)
    .env("XDG_STATE_HOME", &state)
    .output()
    .unwrap();
    assert_ok(&out);
    assert!(config.join("opencode/plugin/capsync.js").exists());
    assert!(state.join("capsync/opencode/token").exists());
}
