//! The `capsync-server` binary as an operator runs it: structured logs, SIGTERM
//! draining batches in flight, restart on the same data, admin token rotation.

mod support;

#[path = "process/hardening.rs"]
mod hardening;

use std::process::Command;

use capsync_client::{Batch, ErrorCode, OpKind, OpSpec};
use serde_json::json;
use support::{BIN, ServerProcess, admin_token, run_local};

fn part(i: usize, batch: usize) -> OpSpec {
    OpSpec::new(
        format!("op-{batch}-{i}"),
        OpKind::PartUpsert,
        json!({"id": format!("prt_{batch}_{i}"), "messageID": "msg_1", "type": "text", "text": "x"}),
    )
}

#[test]
fn sigterm_drains_batches_in_flight_and_every_acked_op_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut server = ServerProcess::start(&data_dir);
    let (writer_token, acked) = run_local(async {
        let (_conn, agent) = support::agent(server.addr, &data_dir, "drain test").await;
        let created = support::share(&agent, "ses_drain").await;
        let setup = vec![
            OpSpec::new("session", OpKind::SessionUpsert, json!({"id": "ses_drain"})),
            OpSpec::new(
                "message",
                OpKind::MessageUpsert,
                json!({"id": "msg_1", "role": "assistant"}),
            ),
        ];
        created
            .writer
            .append(&Batch::new("setup", setup))
            .await
            .unwrap();

        // Four writers append continuously; SIGTERM arrives while they do.
        let mut tasks = Vec::new();
        for w in 0..4 {
            let conn = capsync_client::connect(server.addr).await.unwrap();
            let writer = conn
                .redeem(&created.writer_token.token)
                .await
                .unwrap()
                .into_writer()
                .unwrap();
            tasks.push(tokio::task::spawn_local(async move {
                let _conn = conn;
                let mut acked = Vec::new();
                for b in 0.. {
                    let id = w * 1_000_000 + b;
                    let ops: Vec<_> = (0..10).map(|i| part(i, id)).collect();
                    match writer
                        .append(&Batch::new(format!("b{id}"), ops.clone()))
                        .await
                    {
                        Ok(ack) => {
                            assert_eq!(ack.applied(), 10);
                            acked.extend(ops.into_iter().map(|op| op.op_id));
                        }
                        Err(err) => {
                            // Refused while draining, or cut when the server closed:
                            // both are retryable, neither may be anything else.
                            assert!(
                                err.code() == Some(ErrorCode::Overloaded) || err.is_disconnected(),
                                "unexpected error during shutdown: {err}"
                            );
                            return acked;
                        }
                    }
                }
                unreachable!()
            }));
        }
        // Let some batches through, then stop the server under load.
        while created.writer.state().await.map(|s| s.cursor).unwrap_or(0) < 200 {
            tokio::task::yield_now().await;
        }
        let pid = server.child.id().to_string();
        tokio::task::spawn_blocking(move || Command::new("kill").args(["-TERM", &pid]).status())
            .await
            .unwrap()
            .unwrap();
        let mut acked = Vec::new();
        for task in tasks {
            acked.extend(task.await.unwrap());
        }
        (created.writer_token.token, acked)
    });
    let status = server.child.wait().unwrap();
    assert!(status.success(), "clean exit after SIGTERM: {status:?}");
    server.wait_for_log("shutdown complete");
    assert!(
        acked.len() >= 190,
        "some batches were acked before the signal"
    );
    drop(server);

    let server = ServerProcess::start(&data_dir);
    run_local(async {
        let conn = capsync_client::connect(server.addr).await.unwrap();
        let viewer = conn
            .redeem(&writer_token)
            .await
            .unwrap()
            .into_writer()
            .unwrap()
            .viewer();
        let mut logged = std::collections::HashSet::new();
        let mut after = 0;
        loop {
            let page = viewer.ops_since(after, 5000).await.unwrap();
            for op in &page.ops {
                after = op.cursor.0;
                logged.insert(op.op_id.0.clone());
            }
            if !page.has_more() {
                break;
            }
        }
        for op_id in &acked {
            assert!(
                logged.contains(op_id),
                "acked op {op_id} is missing after restart"
            );
        }
    });
}

#[test]
fn admin_token_rotation_needs_the_server_stopped_and_replaces_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut server = ServerProcess::start(&data_dir);
    let old = admin_token(&data_dir);

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data_dir.join("admin.token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the admin token file is owner-only");
    }

    let refused = Command::new(BIN)
        .args(["admin-token", "--rotate", "--data-dir"])
        .arg(&data_dir)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("in use"));
    assert_eq!(
        admin_token(&data_dir),
        old,
        "nothing changed while the server ran"
    );

    assert!(server.terminate().success());
    drop(server);
    let rotated = Command::new(BIN)
        .args(["admin-token", "--rotate", "--data-dir"])
        .arg(&data_dir)
        .output()
        .unwrap();
    assert!(
        rotated.status.success(),
        "{}",
        String::from_utf8_lossy(&rotated.stderr)
    );
    let new = admin_token(&data_dir);
    assert_ne!(new, old);
    assert!(
        !String::from_utf8_lossy(&rotated.stdout).contains(&new),
        "the token is not printed"
    );

    let server = ServerProcess::start(&data_dir);
    run_local(async {
        let conn = capsync_client::connect(server.addr).await.unwrap();
        let err = conn.redeem(&old).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::PermissionDenied));
        let admin = conn.redeem(&new).await.unwrap().into_admin().unwrap();
        assert!(
            admin
                .list_shares("", 0, false)
                .await
                .unwrap()
                .shares
                .is_empty()
        );
    });
}

#[test]
fn help_documents_every_setting_with_its_environment_variable() {
    let help = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--listen",
        "--data-dir",
        "--durability",
        "--max-ops-per-batch",
        "--max-op-bytes",
        "--max-message-bytes",
        "--max-connections",
        "--redeem-failures",
        "--drain-timeout",
        "--http-listen",
        "--interrupted-after",
        "--max-connections-per-address",
        "--handshake-timeout",
        "--handshake-bytes",
        "--read-budget-bytes",
        "--message-timeout",
        "--tcp-keepalive",
        "--http-header-timeout",
        "--http-max-body-bytes",
        "--argon2-concurrency",
        "--write-queue",
        "--write-queue-bytes",
        "--max-database-bytes",
        "--storage-reserve-bytes",
        "--log-summary-interval",
    ] {
        assert!(text.contains(flag), "serve --help lacks {flag}");
    }
    assert!(text.contains("CAPSYNC_LISTEN") && text.contains("CAPSYNC_DATA_DIR"));
    assert!(
        text.contains("CAPSYNC_HANDSHAKE_TIMEOUT")
            && text.contains("CAPSYNC_STORAGE_RESERVE_BYTES")
    );
    assert!(text.contains("127.0.0.1:7420") && text.contains("capsync-data"));
}
