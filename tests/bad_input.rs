//! Bad input gets a clear error and touches nothing else: the batch, the
//! connection and the server around it keep working.

use std::io::{Read, Write};
use std::time::Duration;

use capsync_client::{ErrorCode, OpKind, OpOutcome, OpSpec, RejectReason};
use capsync_shared::Cursor;
use capsync_tests::{TestServer, admin, agent, batch, run_local, session_ops, share, text_part_op};
use serde_json::json;

#[test]
fn malformed_payloads_are_rejected_per_op_and_the_rest_applies() {
    let server = TestServer::start();
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let writer = share(&agent, "ses_bad").await.writer;
        let mut ops = session_ops("ses_bad", "msg_1", 1);
        ops.push(OpSpec::new(
            "not-an-object",
            OpKind::PartUpsert,
            json!([1, 2, 3]),
        ));
        ops.push(OpSpec::new(
            "no-id",
            OpKind::MessageUpsert,
            json!({"role": "user"}),
        ));
        ops.push(OpSpec::new(
            "other-session",
            OpKind::SessionUpsert,
            json!({"id": "ses_someone_else"}),
        ));
        ops.push(OpSpec::new(
            "typeless-part",
            OpKind::PartUpsert,
            json!({"id": "prt_o", "messageID": "msg_1", "type": 5}),
        ));
        ops.push(text_part_op("ses_bad", "msg_1", "prt_ok"));
        let ack = writer.append(&batch("b", ops)).await.unwrap();
        for result in &ack.results[3..7] {
            match &result.outcome {
                OpOutcome::Rejected {
                    reason: RejectReason::Invalid,
                    detail,
                } => {
                    assert!(!detail.is_empty(), "{} has a reason", result.op_id);
                    assert!(
                        !detail.to_lowercase().contains("sqlite"),
                        "no internals: {detail}"
                    );
                }
                other => panic!("{} was not rejected as invalid: {other:?}", result.op_id),
            }
        }
        assert_eq!(ack.results[7].outcome, OpOutcome::Applied(Cursor(4)));
        assert_eq!(ack.cursor, 4);

        // JSON that does not even parse travels as text: send it raw.
        let mut request = writer.capability().append_ops_request();
        {
            let mut b = request.get().init_batch();
            b.set_batch_id("raw");
            let mut op = b.init_ops(1).get(0);
            op.set_op_id("broken-json");
            op.set_kind(capsync_shared::capsync_capnp::OpKind::PartUpsert);
            op.set_payload("{\"id\": \"prt_x\", ");
        }
        let response = request.send().promise.await.unwrap();
        let result = response.get().unwrap().get_result().unwrap();
        let ack = match result.which().unwrap() {
            capsync_shared::capsync_capnp::append_result::Ack(ack) => ack.unwrap(),
            _ => panic!("expected an ack"),
        };
        let op = ack.get_results().unwrap().get(0);
        assert!(matches!(
            op.which().unwrap(),
            capsync_shared::capsync_capnp::op_result::Rejected(_)
        ));
    });
}

#[test]
fn oversized_batches_are_refused_whole_and_oversized_ops_alone() {
    let server = TestServer::start_with(|config| {
        config.max_ops_per_batch = 10;
        config.max_op_bytes = 1024;
    });
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let writer = share(&agent, "ses_big").await.writer;
        let too_many = session_ops("ses_big", "msg_1", 9);
        let err = writer.append(&batch("many", too_many)).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::TooLarge));
        assert!(err.to_string().contains("10"), "names the limit: {err}");

        let mut ops = session_ops("ses_big", "msg_1", 0);
        ops.push(OpSpec::new(
            "huge",
            OpKind::PartUpsert,
            json!({"id": "p", "messageID": "msg_1", "type": "text", "text": "x".repeat(2000)}),
        ));
        ops.push(OpSpec::new(
            "after-huge",
            OpKind::PartUpsert,
            json!({"id": "q", "messageID": "msg_1", "type": "text", "text": "small"}),
        ));
        let ack = writer.append(&batch("huge", ops)).await.unwrap();
        let huge = ack.results.iter().find(|r| r.op_id == "huge").unwrap();
        match &huge.outcome {
            OpOutcome::Rejected {
                reason: RejectReason::TooLarge,
                detail,
            } => assert!(detail.contains("1024"), "names the limit: {detail}"),
            other => panic!("the huge op was not refused alone: {other:?}"),
        }
        let after = ack.results.last().unwrap();
        assert!(
            matches!(after.outcome, OpOutcome::Applied(_)),
            "the rest of the batch applies: {after:?}"
        );

        let long_id = OpSpec::new(
            "o".repeat(129),
            OpKind::SessionUpsert,
            json!({"id": "ses_big"}),
        );
        let err = writer
            .append(&batch("long-id", vec![long_id]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::InvalidArgument));

        // The session, its message and the small part after the huge one.
        assert_eq!(writer.state().await.unwrap().cursor, 3);
        let ack = writer
            .append(&batch("ok", session_ops("ses_big", "msg_2", 1)))
            .await
            .unwrap();
        assert_eq!(ack.cursor, 5);
    });
}

#[test]
fn garbage_bytes_close_only_that_connection() {
    let server = TestServer::start();
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let writer = share(&agent, "ses_garbage").await.writer;

        let addr = server.addr();
        let closed = tokio::task::spawn_blocking(move || {
            let mut raw = std::net::TcpStream::connect(addr).unwrap();
            raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            // A segment table claiming an absurd size, then noise.
            let mut garbage = vec![0u8, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f];
            garbage.extend((0..4096u32).map(|i| (i * 7919 % 251) as u8));
            raw.write_all(&garbage).ok();
            let mut buf = [0u8; 1024];
            // The server closes this connection: EOF or a reset, not a hang.
            loop {
                match raw.read(&mut buf) {
                    Ok(0) | Err(_) => return true,
                    Ok(_) => continue,
                }
            }
        })
        .await
        .unwrap();
        assert!(closed);

        // The existing connection and new ones keep working.
        let ack = writer
            .append(&batch("after", session_ops("ses_garbage", "msg_1", 0)))
            .await
            .unwrap();
        assert_eq!(ack.cursor, 2);
        let (_conn2, admin2) = capsync_tests::admin(&server).await;
        assert_eq!(
            admin2.list_shares("", 0, false).await.unwrap().shares.len(),
            1
        );
    });
}

#[test]
fn a_message_over_the_size_limit_closes_that_connection_only() {
    let server = TestServer::start_with(|config| {
        config.max_message_bytes = 256 * 1024;
        config.max_op_bytes = 4 << 20;
    });
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let created = share(&agent, "ses_msg").await;

        let big = capsync_client::connect(server.addr()).await.unwrap();
        let writer = big
            .redeem(&created.writer_token.token)
            .await
            .unwrap()
            .into_writer()
            .unwrap();
        let mut ops = session_ops("ses_msg", "msg_1", 0);
        ops.push(OpSpec::new(
            "big",
            OpKind::PartUpsert,
            json!({"id": "p", "messageID": "msg_1", "type": "text", "text": "x".repeat(512 * 1024)}),
        ));
        let err = writer.append(&batch("big", ops)).await.unwrap_err();
        assert!(
            err.code().is_none(),
            "a transport failure, not an application error: {err}"
        );

        let ack = created
            .writer
            .append(&batch("small", session_ops("ses_msg", "msg_1", 0)))
            .await
            .unwrap();
        assert_eq!(ack.cursor, 2, "the other connection is unaffected");
    });
}

#[test]
fn connections_over_the_limit_are_closed_and_the_rest_keep_working() {
    let server = TestServer::start_with(|config| config.max_connections = 2);
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let _second = capsync_client::connect(server.addr()).await.unwrap();
        let third = capsync_client::connect(server.addr()).await.unwrap();
        let err = third.redeem(&server.admin_token()).await.unwrap_err();
        assert!(err.is_disconnected(), "{err}");
        assert!(admin.list_shares("", 0, false).await.is_ok());
        drop(conn);
    });
}
