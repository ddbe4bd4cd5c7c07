//! `capsync sync` and `capsync outbox` against the real server (started on 127.0.0.1:0 by
//! `support::TestServer`): following a growing ops file and a changing export, resuming,
//! stopping on SIGTERM, exit codes on rejected ops and a revoked token, and the outbox
//! status a script reads.

use crate::support;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::process_output::{assert_ok, json_out, stderr, stdout};
use capsync_client::{Scope, connect};
use serde_json::Value;
use support::{TestServer, run_local, session_op_lines, share_log, writer_share};

/// The `capsync` binary with a clean environment apart from the server and token given.
fn capsync_command(server: &TestServer, token: Option<&str>, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_capsync"));
    command
        .args(args)
        .env_remove("CAPSYNC_TOKEN")
        .env_remove("CAPSYNC_TOKEN_FILE")
        .env_remove("CAPSYNC_OUTBOX")
        .env("CAPSYNC_SERVER", server.addr().to_string());
    if let Some(token) = token {
        command.env("CAPSYNC_TOKEN", token);
    }
    command
}

fn capsync(server: &TestServer, token: Option<&str>, args: &[&str]) -> Output {
    capsync_command(server, token, args)
        .output()
        .expect("run capsync")
}

/// `capsync sync` following SOURCE (no --once), its output collected when it exits.
fn spawn_sync(server: &TestServer, token: &str, args: &[&str]) -> Child {
    capsync_command(server, Some(token), args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn capsync sync")
}

fn append(path: &Path, text: &str) {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    file.write_all(text.as_bytes()).unwrap();
}

fn lines_text(lines: &[String]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}

/// Polls the share's cursor until it is `expected` (bounded; panics on timeout).
fn wait_for_cursor(server: &TestServer, token: &str, expected: u64) {
    run_local(async {
        let conn = connect(server.addr()).await.unwrap();
        let writer = conn.redeem(token).await.unwrap().into_writer().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let cursor = writer.state().await.unwrap().cursor;
            if cursor == expected {
                break;
            }
            assert!(cursor < expected, "cursor {cursor} went past {expected}");
            assert!(
                Instant::now() < deadline,
                "cursor stuck at {cursor}, expected {expected}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        conn.disconnect().await.unwrap();
    });
}

/// Waits (bounded) for a child to exit on its own.
fn wait_exit(mut child: Child) -> Output {
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("capsync did not exit: {:?}", child.wait_with_output());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn sync_once_follows_a_growing_ops_file_between_runs() {
    let server = TestServer::start();
    let (share_id, writer, _) = run_local(writer_share(&server, "ses_grow"));
    let dir = tempfile::tempdir().unwrap();
    let ops = dir.path().join("ops.jsonl");
    let (lines, _) = session_op_lines("ses_grow", 10, 5);
    assert_eq!(lines.len(), 71);

    append(&ops, &lines_text(&lines[..30]));
    let out = capsync(&server, Some(&writer), &["sync", path_str(&ops), "--once"]);
    assert_ok(&out);
    assert_eq!(
        stdout(&out).trim(),
        format!(
            "synced {} into share {share_id}: 30 acked, 0 rejected, 0 still queued; cursor 30",
            ops.display()
        )
    );
    // The outbox sits next to the source by default.
    assert!(dir.path().join("ops.jsonl.capsync-outbox").exists());

    // The file grows; its last line has no newline yet, which --once reads too.
    append(&ops, lines_text(&lines[30..]).trim_end());
    let out = capsync(
        &server,
        Some(&writer),
        &[
            "sync",
            path_str(&ops),
            "--once",
            "--json",
            "--batch-size",
            "7",
        ],
    );
    assert_ok(&out);
    let summary = json_out(&out);
    assert_eq!(summary["shareId"], share_id.as_str());
    assert_eq!(summary["format"], "opsLines");
    assert_eq!(summary["ended"], "drained");
    assert_eq!(summary["queued"], 41);
    assert_eq!(summary["acked"], 71);
    assert_eq!(summary["pending"], 0);
    assert_eq!(summary["rejected"], 0);
    assert_eq!(summary["lastAckedCursor"], 71);

    let log = run_local(share_log(&server, &writer));
    let cursors: Vec<u64> = log.iter().map(|op| op.cursor.0).collect();
    assert_eq!(cursors, (1..=71).collect::<Vec<_>>());
    let ids: Vec<&str> = log.iter().map(|op| op.op_id.as_str()).collect();
    let expected: Vec<String> = lines
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["opId"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(ids, expected);

    // Nothing new: a third run sends nothing and the cursor stays.
    let out = capsync(
        &server,
        Some(&writer),
        &["sync", path_str(&ops), "--once", "--json"],
    );
    assert_ok(&out);
    assert_eq!(json_out(&out)["queued"], 0);
    assert_eq!(run_local(share_log(&server, &writer)).len(), 71);

    // The outbox status, for people and for scripts; it needs no token.
    let out = capsync(&server, None, &["outbox", "status", path_str(&ops)]);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(
        text.contains("0 pending, 0 in flight, 0 waiting, 71 acked, 0 rejected"),
        "{text}"
    );
    assert!(
        text.contains(&format!("share:       {share_id} on ")),
        "{text}"
    );
    assert!(text.contains("last cursor: 71"), "{text}");
    assert!(text.contains("last error:  none"), "{text}");
    let out = capsync(
        &server,
        None,
        &[
            "outbox",
            "status",
            "--outbox",
            path_str(&dir.path().join("ops.jsonl.capsync-outbox")),
            "--json",
        ],
    );
    assert_ok(&out);
    let status = json_out(&out);
    assert_eq!(status["shareId"], share_id.as_str());
    assert_eq!(status["acked"], 71);
    assert_eq!(status["pending"], 0);
    assert_eq!(status["inFlight"], 0);
    assert_eq!(status["lastCursor"], 71);
    assert_eq!(status["lastError"], Value::Null);

    // A mistyped outbox is an error, and is not created.
    let missing = dir.path().join("nope.jsonl");
    let out = capsync(&server, None, &["outbox", "status", path_str(&missing)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("error: invalid input: no outbox at"),
        "{}",
        stderr(&out)
    );
    assert!(!dir.path().join("nope.jsonl.capsync-outbox").exists());
}

#[test]
fn sync_once_sends_the_sample_export_and_then_only_what_changed() {
    let sample =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sessions/fix-login-bug.json");
    let mut export: Value =
        serde_json::from_str(&std::fs::read_to_string(sample).unwrap()).unwrap();
    let session_id = export["info"]["id"].as_str().unwrap().to_owned();
    let server = TestServer::start();
    let (_, writer, _) = run_local(writer_share(&server, &session_id));
    // A copy: the outbox is created next to the source.
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("session.json");
    std::fs::write(&path, serde_json::to_string_pretty(&export).unwrap()).unwrap();

    let out = capsync(
        &server,
        Some(&writer),
        &["sync", path_str(&path), "--once", "--json"],
    );
    assert_ok(&out);
    let summary = json_out(&out);
    assert_eq!(summary["format"], "export");
    assert_eq!(summary["queued"], 23);
    assert_eq!(summary["acked"], 23);
    assert_eq!(summary["lastAckedCursor"], 23);

    // The agent rewrites its export with a new title: one new op, the session's.
    export["info"]["title"] = "Fix 500 on login (uppercase emails)".into();
    std::fs::write(&path, serde_json::to_string_pretty(&export).unwrap()).unwrap();
    let out = capsync(
        &server,
        Some(&writer),
        &["sync", path_str(&path), "--once", "--json"],
    );
    assert_ok(&out);
    let summary = json_out(&out);
    assert_eq!(summary["queued"], 1);
    assert_eq!(summary["acked"], 24);
    assert_eq!(summary["lastAckedCursor"], 24);

    let out = capsync(&server, Some(&writer), &["snapshot", "--json"]);
    assert_ok(&out);
    assert_eq!(
        json_out(&out)["session"]["title"],
        "Fix 500 on login (uppercase emails)"
    );
}

#[test]
fn sync_follows_a_growing_file_until_sigterm_then_resumes() {
    let server = TestServer::start();
    let (share_id, writer, _) = run_local(writer_share(&server, "ses_follow"));
    let dir = tempfile::tempdir().unwrap();
    let ops = dir.path().join("agent.jsonl");
    let outbox = dir.path().join("state").join("agent.outbox");
    std::fs::create_dir_all(outbox.parent().unwrap()).unwrap();
    let (lines, texts) = session_op_lines("ses_follow", 6, 4);
    assert_eq!(lines.len(), 37);

    // The file does not exist yet: sync waits for it.
    let child = spawn_sync(
        &server,
        &writer,
        &[
            "sync",
            path_str(&ops),
            "--outbox",
            path_str(&outbox),
            "--poll",
            "10ms",
        ],
    );
    append(&ops, &lines_text(&lines[..10]));
    wait_for_cursor(&server, &writer, 10);
    // Half a line is left alone until it is complete.
    let (head, tail) = lines[10].split_at(20);
    append(&ops, head);
    append(&ops, &format!("{tail}\n{}", lines_text(&lines[11..20])));
    wait_for_cursor(&server, &writer, 20);

    sigterm(&child);
    let out = wait_exit(child);
    assert_ok(&out);
    assert_eq!(
        stdout(&out).trim(),
        format!(
            "stopped syncing {} into share {share_id}: 20 acked, 0 rejected, 0 still queued; cursor 20",
            ops.display()
        )
    );
    // A new outbox: the share is not known before the server is reached.
    assert!(
        stderr(&out).starts_with(&format!(
            "syncing {} (outbox {})",
            ops.display(),
            outbox.display()
        )),
        "{}",
        stderr(&out)
    );

    // More lines while nothing runs; the next run picks them up.
    append(&ops, &lines_text(&lines[20..]));
    let child = spawn_sync(
        &server,
        &writer,
        &[
            "sync",
            path_str(&ops),
            "--outbox",
            path_str(&outbox),
            "--poll",
            "10ms",
            "--json",
        ],
    );
    wait_for_cursor(&server, &writer, 37);
    sigterm(&child);
    let out = wait_exit(child);
    assert_ok(&out);
    let summary = json_out(&out);
    assert_eq!(summary["ended"], "signal");
    assert_eq!(summary["acked"], 37);

    // Every delta applied exactly once: the texts are exactly the deltas in order.
    let out = capsync(&server, Some(&writer), &["snapshot", "--json"]);
    assert_ok(&out);
    let document = json_out(&out);
    for (m, (part_id, text)) in texts.iter().enumerate() {
        let part = &document["messages"][m]["parts"][0];
        assert_eq!(part["id"], part_id.as_str());
        assert_eq!(part["text"], text.as_str());
    }
}

#[test]
fn rejected_ops_are_listed_and_make_sync_once_exit_3() {
    let server = TestServer::start();
    let (_, writer, _) = run_local(writer_share(&server, "ses_rej"));
    let dir = tempfile::tempdir().unwrap();
    let ops = dir.path().join("ops.jsonl");
    std::fs::write(
        &ops,
        "{\"opId\": \"s\", \"kind\": \"session.upsert\", \"payload\": {\"id\": \"ses_rej\"}}\n\
         {\"opId\": \"w\", \"kind\": \"session.upsert\", \"payload\": {\"id\": \"wrong\"}}\n",
    )
    .unwrap();
    let out = capsync(&server, Some(&writer), &["sync", path_str(&ops), "--once"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("1 acked, 1 rejected, 0 still queued; cursor 1"),
        "{text}"
    );
    assert!(
        text.contains("rejected w (invalid): session id wrong is not this share's session ses_rej"),
        "{text}"
    );

    let out = capsync(&server, None, &["outbox", "rejected", path_str(&ops)]);
    assert_ok(&out);
    assert!(
        stdout(&out).starts_with("w (invalid): session id wrong"),
        "{}",
        stdout(&out)
    );
    let out = capsync(
        &server,
        None,
        &["outbox", "rejected", path_str(&ops), "--json"],
    );
    assert_ok(&out);
    let rejected = json_out(&out);
    assert_eq!(rejected[0]["opId"], "w");
    assert_eq!(rejected[0]["reason"], "invalid");
    let out = capsync(
        &server,
        None,
        &["outbox", "status", path_str(&ops), "--json"],
    );
    assert_eq!(json_out(&out)["rejected"], 1);

    // A line that is not an op stops --once before anything is sent, naming the line.
    append(&ops, "{oops}\n");
    let out = capsync(&server, Some(&writer), &["sync", path_str(&ops), "--once"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("line 3, column"), "{}", stderr(&out));
}

#[test]
fn a_revoked_token_stops_sync_with_exit_1_and_keeps_the_queue() {
    let server = TestServer::start();
    let (share_id, writer, agent) = run_local(writer_share(&server, "ses_rev"));
    let dir = tempfile::tempdir().unwrap();
    let ops = dir.path().join("ops.jsonl");
    let (lines, _) = session_op_lines("ses_rev", 3, 2);
    append(&ops, &lines_text(&lines[..4]));
    assert_ok(&capsync(
        &server,
        Some(&writer),
        &["sync", path_str(&ops), "--once"],
    ));

    run_local(async {
        let conn = connect(server.addr()).await.unwrap();
        let agent = conn.redeem(&agent).await.unwrap().into_agent().unwrap();
        agent.revoke_share(&share_id, Scope::Writers).await.unwrap();
        conn.disconnect().await.unwrap();
    });
    append(&ops, &lines_text(&lines[4..]));

    // --once: exit 1 with the server's answer, as JSON too.
    let out = capsync(
        &server,
        Some(&writer),
        &["sync", path_str(&ops), "--once", "--json"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out)
            .lines()
            .last()
            .unwrap()
            .starts_with("error: permission denied"),
        "{}",
        stderr(&out)
    );
    assert_eq!(json_out(&out)["error"]["code"], "permissionDenied");

    // Following: it stops by itself, exit 1.
    let child = spawn_sync(
        &server,
        &writer,
        &["sync", path_str(&ops), "--poll", "10ms"],
    );
    let out = wait_exit(child);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("error: permission denied"),
        "{}",
        stderr(&out)
    );

    // Nothing was lost: the rest is still queued, for a new writer token.
    let out = capsync(
        &server,
        None,
        &["outbox", "status", path_str(&ops), "--json"],
    );
    assert_ok(&out);
    let status = json_out(&out);
    assert_eq!(status["acked"], 4);
    assert_eq!(
        status["pending"].as_u64().unwrap()
            + status["inFlight"].as_u64().unwrap()
            + status["waiting"].as_u64().unwrap(),
        (lines.len() - 4) as u64
    );
}

#[test]
fn an_outbox_bound_to_another_share_fails_with_its_own_code() {
    let server = TestServer::start();
    let (first_id, first, _) = run_local(writer_share(&server, "ses_first"));
    let (second_id, second, _) = run_local(writer_share(&server, "ses_second"));
    let dir = tempfile::tempdir().unwrap();
    let ops = dir.path().join("ops.jsonl");
    let (lines, _) = session_op_lines("ses_first", 1, 1);
    append(&ops, &lines_text(&lines));
    assert_ok(&capsync(
        &server,
        Some(&first),
        &["sync", path_str(&ops), "--once"],
    ));

    // The same outbox with the other share's writer token: refused before anything is sent.
    let out = capsync(
        &server,
        Some(&second),
        &["sync", path_str(&ops), "--once", "--json"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let error = json_out(&out);
    assert_eq!(error["error"]["code"], "wrongShare");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!(
            "outbox {}.capsync-outbox: this outbox feeds share {first_id}, not {second_id}",
            ops.display()
        )),
        "{message}"
    );
}

#[test]
fn the_new_commands_explain_themselves() {
    let server = TestServer::start();
    let out = capsync(&server, None, &["sync", "--help"]);
    assert_ok(&out);
    let help = stdout(&out);
    for needle in [
        "--once",
        "--outbox",
        "--poll",
        "--format",
        ".capsync-outbox",
        "Examples:",
    ] {
        assert!(help.contains(needle), "{needle} missing from:\n{help}");
    }
    for args in [
        &["outbox", "--help"][..],
        &["outbox", "status", "--help"],
        &["outbox", "rejected", "--help"],
    ] {
        let out = capsync(&server, None, args);
        assert_ok(&out);
        assert!(
            stdout(&out).contains("Examples:"),
            "{args:?}: {}",
            stdout(&out)
        );
    }
    // sync needs a file it can follow, and --timeout only goes with --once.
    let out = capsync(&server, Some("x"), &["sync", "-"]);
    assert_eq!(out.status.code(), Some(1));
    let out = capsync(&server, None, &["sync", "a.jsonl", "--timeout", "1s"]);
    assert_eq!(out.status.code(), Some(2));
}
