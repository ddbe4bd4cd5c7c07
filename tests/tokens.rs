//! Sturdy refs and capabilities: epoch revocation, attenuation, expiry, and
//! authentication failures that all look alike.

use capsync_client::{ClientError, ErrorCode, Scope};
use capsync_shared::capsync_capnp::share_writer;
use std::time::Duration;

use capsync_server::clock::Clock;
use capsync_tests::{TestServer, admin, agent, batch, run_local, session_ops, share, text_part_op};

fn code<T: std::fmt::Debug>(result: Result<T, ClientError>) -> Option<ErrorCode> {
    result.expect_err("expected a failure").code()
}

capsync_tests::on_each_engine!(
    revoking_writers_stops_old_capabilities_and_tokens_on_every_connection,
    revoking_viewers_leaves_writers_working,
    agents_see_and_revoke_only_their_own_shares,
    admin_revokes_tokens_and_deletes_shares,
);

fn revoking_writers_stops_old_capabilities_and_tokens_on_every_connection(server: TestServer) {
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let created = share(&agent, "ses_rw").await;
        created
            .writer
            .append(&batch("b1", session_ops("ses_rw", "msg_1", 1)))
            .await
            .unwrap();
        // A second connection redeemed the writer token before the revocation.
        let other = capsync_client::connect(server.addr()).await.unwrap();
        let redeemed = other
            .redeem(&created.writer_token.token)
            .await
            .unwrap()
            .into_writer()
            .unwrap();
        let viewer = conn
            .redeem(&created.viewer_token.token)
            .await
            .unwrap()
            .into_viewer()
            .unwrap();

        let state = agent
            .revoke_share(&created.info.state.share_id, Scope::Writers)
            .await
            .unwrap();
        assert_eq!((state.writer_epoch, state.viewer_epoch), (1, 0));

        let next = || batch("b2", vec![text_part_op("ses_rw", "msg_1", "prt_after")]);
        assert_eq!(
            code(created.writer.append(&next()).await),
            Some(ErrorCode::Revoked)
        );
        assert_eq!(
            code(redeemed.append(&next()).await),
            Some(ErrorCode::Revoked)
        );
        assert_eq!(code(redeemed.save().await), Some(ErrorCode::Revoked));
        assert_eq!(
            code(other.redeem(&created.writer_token.token).await),
            Some(ErrorCode::PermissionDenied)
        );

        let fresh = agent
            .mint_writer(&created.info.state.share_id, None)
            .await
            .unwrap();
        let writer = other
            .redeem(&fresh.token)
            .await
            .unwrap()
            .into_writer()
            .unwrap();
        let ack = writer.append(&next()).await.unwrap();
        assert_eq!(ack.cursor, 4, "the cursor continues for the new writer");
        assert_eq!(
            viewer.state().await.unwrap().cursor,
            4,
            "viewers were not revoked"
        );
    });
}

fn revoking_viewers_leaves_writers_working(server: TestServer) {
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let created = share(&agent, "ses_rv").await;
        let viewer = conn
            .redeem(&created.viewer_token.token)
            .await
            .unwrap()
            .into_viewer()
            .unwrap();
        let derived = created.writer.viewer();
        assert_eq!(viewer.state().await.unwrap().cursor, 0);
        assert_eq!(derived.state().await.unwrap().cursor, 0);

        admin
            .revoke_share(&created.info.state.share_id, Scope::Viewers)
            .await
            .unwrap();

        assert_eq!(code(viewer.snapshot().await), Some(ErrorCode::Revoked));
        assert_eq!(
            code(derived.ops_since(0, 0).await),
            Some(ErrorCode::Revoked)
        );
        assert_eq!(
            code(conn.redeem(&created.viewer_token.token).await),
            Some(ErrorCode::PermissionDenied)
        );
        let ack = created
            .writer
            .append(&batch("b1", session_ops("ses_rv", "msg_1", 0)))
            .await
            .unwrap();
        assert_eq!(ack.cursor, 2);
        let minted = created.writer.mint_viewer(None).await.unwrap();
        let new_viewer = conn
            .redeem(&minted.token)
            .await
            .unwrap()
            .into_viewer()
            .unwrap();
        assert_eq!(new_viewer.state().await.unwrap().cursor, 2);
        assert_eq!(created.writer.viewer().state().await.unwrap().cursor, 2);
    });
}

#[test]
fn a_viewer_can_neither_append_nor_mint() {
    let server = TestServer::start();
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let created = share(&agent, "ses_ro").await;
        let redeemed = conn.redeem(&created.viewer_token.token).await.unwrap();
        assert!(matches!(
            redeemed.into_writer(),
            Err(ClientError::WrongKind { .. })
        ));

        // Call writer methods on the viewer capability itself: the server must refuse.
        let viewer = conn
            .redeem(&created.viewer_token.token)
            .await
            .unwrap()
            .into_viewer()
            .unwrap();
        let as_writer: share_writer::Client =
            capnp::capability::FromClientHook::new(viewer.capability().client.hook);
        let mut request = as_writer.append_ops_request();
        request.get().init_batch().set_batch_id("sneaky");
        let Err(err) = request.send().promise.await else {
            panic!("a viewer capability answered appendOps");
        };
        assert_eq!(err.kind, capnp::ErrorKind::Unimplemented);
        let Err(err) = as_writer.mint_viewer_request().send().promise.await else {
            panic!("a viewer capability answered mintViewer");
        };
        assert_eq!(err.kind, capnp::ErrorKind::Unimplemented);

        // Relabelling a viewer token as a writer token does not work either.
        let relabelled = created
            .viewer_token
            .token
            .replacen("csviewer_", "cswriter_", 1);
        assert_eq!(
            code(conn.redeem(&relabelled).await),
            Some(ErrorCode::PermissionDenied)
        );
        assert_eq!(
            viewer.state().await.unwrap().cursor,
            0,
            "nothing was appended"
        );
    });
}

#[test]
fn an_expired_token_fails_to_redeem_and_its_live_capability_stops() {
    // The server reads time from a clock the test moves: expiry without waiting.
    let clock = Clock::manual(capsync_shared::now_millis());
    let server = TestServer::start_with(|config| config.clock = clock.clone());
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let created = share(&agent, "ses_exp").await;
        let expires_at = clock.now_millis() + 60_000;
        let minted = created.writer.mint_viewer(Some(expires_at)).await.unwrap();
        assert_eq!(minted.expires_at, Some(expires_at));
        let viewer = conn
            .redeem(&minted.token)
            .await
            .unwrap()
            .into_viewer()
            .unwrap();
        assert_eq!(viewer.state().await.unwrap().cursor, 0);

        clock.advance(Duration::from_secs(59));
        assert_eq!(
            viewer.state().await.unwrap().cursor,
            0,
            "a second before its expiry the token still works"
        );
        clock.advance(Duration::from_secs(2));

        assert_eq!(
            code(conn.redeem(&minted.token).await),
            Some(ErrorCode::PermissionDenied)
        );
        assert_eq!(
            code(viewer.state().await),
            Some(ErrorCode::PermissionDenied)
        );
    });
}

#[test]
fn wrong_secret_and_unknown_id_look_the_same_but_the_audit_log_tells_them_apart() {
    let server = TestServer::start();
    let (wrong_secret, unknown_id) = run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let created = share(&agent, "ses_auth").await;
        let token = created.viewer_token.token.clone();
        // Same id, another secret; and another id with the right secret.
        let (prefix_and_id, secret) = token.rsplit_once('_').unwrap();
        let flipped: String = secret
            .chars()
            .map(|c| if c == '0' { '1' } else { '0' })
            .collect();
        let wrong_secret = format!("{prefix_and_id}_{flipped}");
        let unknown_id = format!("csviewer_0123456789abcdef_{secret}");
        let a = conn.redeem(&wrong_secret).await.unwrap_err();
        let b = conn.redeem(&unknown_id).await.unwrap_err();
        assert_eq!(a.code(), Some(ErrorCode::PermissionDenied));
        assert_eq!(
            a.to_string(),
            b.to_string(),
            "the caller cannot tell them apart"
        );
        (
            created.viewer_token.token_id.clone(),
            "0123456789abcdef".to_owned(),
        )
    });
    let mut server = server;
    server.stop();
    let db = rusqlite::Connection::open(server.database_path()).unwrap();
    let outcome = |token: &str| -> Vec<String> {
        let mut stmt = db
            .prepare("SELECT outcome FROM audit WHERE action = 'redeem' AND outcome != 'ok' AND detail LIKE 'peer=%' AND (token_id = ?1 OR (?1 = '0123456789abcdef' AND token_id IS NULL))")
            .unwrap();
        stmt.query_map([token], |row| row.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    assert_eq!(outcome(&wrong_secret), vec!["bad_secret".to_string()]);
    assert_eq!(outcome(&unknown_id), vec!["unknown_token".to_string()]);
}

#[test]
fn failed_redeems_are_limited_by_what_they_cost_not_by_address_alone() {
    let server = TestServer::start_with(|config| config.redeem_failures = 3);
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let bogus = format!("csagent_0123456789abcdef_{}", "ab".repeat(32));
        for _ in 0..3 {
            assert_eq!(
                code(conn.redeem(&bogus).await),
                Some(ErrorCode::PermissionDenied)
            );
        }
        // Unknown token ids from this address are now refused unchecked, with when to retry.
        let limited = conn.redeem(&bogus).await.unwrap_err();
        assert_eq!(limited.code(), Some(ErrorCode::RateLimited), "{limited}");
        assert!(limited.to_string().contains("retry in"), "{limited}");

        // A stale token (right secret, revoked) fails as often as it is tried,
        // and never counts: it proves knowledge of a real secret, it is no guess.
        let (agent, agent_token) = agent(&conn, &admin).await;
        let created = share(&agent, "ses_stale").await;
        agent
            .revoke_share(&created.info.state.share_id, Scope::Viewers)
            .await
            .unwrap();
        for _ in 0..10 {
            assert_eq!(
                code(conn.redeem(&created.viewer_token.token).await),
                Some(ErrorCode::PermissionDenied)
            );
        }
        // Valid tokens from the same address still work, old and new alike.
        conn.redeem(&agent_token)
            .await
            .unwrap()
            .into_agent()
            .unwrap();
        let fresh = agent
            .mint_viewer(&created.info.state.share_id, None)
            .await
            .unwrap();
        conn.redeem(&fresh.token)
            .await
            .unwrap()
            .into_viewer()
            .unwrap();

        // Wrong secrets for one known id are limited for that id, from anywhere...
        let agent_id = agent_token.split('_').nth(1).unwrap();
        let guess = |n: usize| format!("csagent_{agent_id}_{}", format!("{n:02}").repeat(32));
        for n in 0..3 {
            assert_eq!(
                code(conn.redeem(&guess(n)).await),
                Some(ErrorCode::PermissionDenied)
            );
        }
        let limited = conn.redeem(&guess(3)).await.unwrap_err();
        assert_eq!(limited.code(), Some(ErrorCode::RateLimited), "{limited}");
        assert!(limited.to_string().contains("for this token"), "{limited}");
        // ...while its holder, whose secret verified before, is let through.
        conn.redeem(&agent_token)
            .await
            .unwrap()
            .into_agent()
            .unwrap();
    });
}

fn agents_see_and_revoke_only_their_own_shares(server: TestServer) {
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (alice, _) = agent(&conn, &admin).await;
        let (bob, _) = agent(&conn, &admin).await;
        let a1 = share(&alice, "ses_a1").await;
        let _a2 = share(&alice, "ses_a2").await;
        let b1 = share(&bob, "ses_b1").await;

        let mine = alice.list_shares("", 0, false).await.unwrap();
        let sessions: Vec<_> = mine.shares.iter().map(|s| s.session_id.clone()).collect();
        assert_eq!(sessions.len(), 2);
        assert!(
            sessions.contains(&"ses_a1".to_string()) && sessions.contains(&"ses_a2".to_string())
        );
        assert_eq!(
            admin.list_shares("", 0, false).await.unwrap().shares.len(),
            3
        );

        assert_eq!(
            code(
                alice
                    .revoke_share(&b1.info.state.share_id, Scope::All)
                    .await
            ),
            Some(ErrorCode::NotFound),
            "another agent's share looks like no share at all"
        );
        assert_eq!(
            code(alice.mint_writer(&b1.info.state.share_id, None).await),
            Some(ErrorCode::NotFound)
        );

        // The owner unshares without the share's own secret.
        alice
            .revoke_share(&a1.info.state.share_id, Scope::All)
            .await
            .unwrap();
        assert_eq!(
            code(conn.redeem(&a1.viewer_token.token).await),
            Some(ErrorCode::PermissionDenied)
        );
        assert_eq!(code(a1.writer.state().await), Some(ErrorCode::Revoked));
        assert_eq!(
            b1.writer.state().await.unwrap().cursor,
            0,
            "bob's share is untouched"
        );
    });
}

fn admin_revokes_tokens_and_deletes_shares(server: TestServer) {
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, agent_token) = agent(&conn, &admin).await;
        let created = share(&agent, "ses_adm").await;
        let viewer = conn
            .redeem(&created.viewer_token.token)
            .await
            .unwrap()
            .into_viewer()
            .unwrap();

        admin
            .revoke_token(&created.viewer_token.token_id)
            .await
            .unwrap();
        assert_eq!(code(viewer.state().await), Some(ErrorCode::Revoked));
        assert_eq!(
            code(admin.revoke_token("ffffffffffffffff").await),
            Some(ErrorCode::NotFound)
        );

        // Revoking the agent's token stops the agent, not the shares it made.
        let agent_id = agent_token.split('_').nth(1).unwrap().to_owned();
        admin.revoke_token(&agent_id).await.unwrap();
        assert_eq!(
            code(agent.list_shares("", 0, false).await),
            Some(ErrorCode::Revoked)
        );
        assert_eq!(created.writer.state().await.unwrap().cursor, 0);

        admin
            .delete_share(&created.info.state.share_id)
            .await
            .unwrap();
        assert_eq!(
            code(created.writer.state().await),
            Some(ErrorCode::NotFound)
        );
        assert_eq!(
            code(conn.redeem(&created.writer_token.token).await),
            Some(ErrorCode::PermissionDenied)
        );
        assert!(
            admin
                .list_shares("", 0, false)
                .await
                .unwrap()
                .shares
                .is_empty()
        );
        assert_eq!(
            code(admin.delete_share(&created.info.state.share_id).await),
            Some(ErrorCode::NotFound)
        );
    });
}
