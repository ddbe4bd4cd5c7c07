//! Session lifecycle (issue 5) through the client API and the command line:
//! archiving hides a share from listings and makes it read-only while viewers keep
//! reading it; stats count what the database holds.

use capsync_client::{ClientError, ErrorCode};
use capsync_tests::{
    Engine, TestServer, admin, agent, batch, capsync, json_of, run_local, session_ops, share,
    text_part_op,
};

fn code<T: std::fmt::Debug>(result: Result<T, ClientError>) -> Option<ErrorCode> {
    result.expect_err("expected a failure").code()
}

capsync_tests::on_each_engine!(an_archived_share_is_hidden_read_only_and_viewable_until_unarchived);

fn an_archived_share_is_hidden_read_only_and_viewable_until_unarchived(server: TestServer) {
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let kept = share(&agent, "ses_kept").await;
        let put_away = share(&agent, "ses_old").await;
        let id = put_away.info.state.share_id.clone();
        put_away
            .writer
            .append(&batch("b1", session_ops("ses_old", "msg_1", 2)))
            .await
            .unwrap();

        let info = admin.archive_share(&id).await.unwrap();
        assert!(info.archived_at.is_some());

        let ids = |list: capsync_client::ShareList| -> Vec<String> {
            list.shares.into_iter().map(|s| s.state.share_id).collect()
        };
        let visible = vec![kept.info.state.share_id.clone()];
        assert_eq!(ids(admin.list_shares("", 0, false).await.unwrap()), visible);
        assert_eq!(ids(agent.list_shares("", 0, false).await.unwrap()), visible);
        let all = admin.list_shares("", 0, true).await.unwrap();
        assert_eq!(all.shares.len(), 2);
        assert!(all.shares.iter().any(|s| s.archived_at.is_some()));
        assert_eq!(
            agent.list_shares("", 0, true).await.unwrap().shares.len(),
            2
        );

        // Read-only: appends fail with invalidArgument and a message that says why.
        let refused = put_away
            .writer
            .append(&batch(
                "b2",
                vec![text_part_op("ses_old", "msg_1", "p_late")],
            ))
            .await;
        match refused {
            Err(ClientError::Remote { code, message, .. }) => {
                assert_eq!(code, ErrorCode::InvalidArgument);
                assert_eq!(message, "share is archived; unarchive it to append");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }

        // Still viewable.
        let viewer = conn
            .redeem(&put_away.viewer_token.token)
            .await
            .unwrap()
            .into_viewer()
            .unwrap();
        assert_eq!(viewer.state().await.unwrap().cursor, 4);
        assert!(!viewer.snapshot().await.unwrap().records.is_empty());

        let stats = admin.stats().await.unwrap();
        assert_eq!((stats.root_shares, stats.child_shares), (2, 0));
        assert_eq!(stats.archived_shares, 1);
        assert_eq!((stats.messages, stats.parts, stats.ledger_ops), (1, 2, 4));
        assert!(stats.ledger_payload_bytes > 0);
        match server.engine() {
            Engine::Sqlite => {
                assert_eq!(stats.engine, "sqlite");
                assert!(stats.db_file_bytes > 0);
            }
            Engine::Postgres => {
                assert_eq!(stats.engine, "postgres");
                assert!(stats.database_bytes > 0 && stats.db_file_bytes == 0);
                let parts = stats.tables.iter().find(|t| t.name == "parts");
                assert!(
                    parts.is_some_and(|t| t.total_bytes > 0),
                    "{:?}",
                    stats.tables
                );
            }
        }

        assert_eq!(
            code(admin.archive_share("sh_missing").await),
            Some(ErrorCode::NotFound)
        );
        let info = admin.unarchive_share(&id).await.unwrap();
        assert_eq!(info.archived_at, None);
        put_away
            .writer
            .append(&batch(
                "b3",
                vec![text_part_op("ses_old", "msg_1", "p_late")],
            ))
            .await
            .unwrap();
        assert_eq!(
            admin.list_shares("", 0, false).await.unwrap().shares.len(),
            2
        );
    });
}

#[test]
fn the_cli_archives_unarchives_lists_and_shows_stats() {
    let server = TestServer::start();
    run_local(async {
        let admin_token = server.admin_token();
        let (conn, admin) = admin(&server).await;
        let (agent, agent_token) = agent(&conn, &admin).await;
        let created = share(&agent, "ses_cli").await;
        let id = created.info.state.share_id.clone();

        let archived =
            json_of(&capsync(&server, &admin_token, &["--json", "admin", "archive", &id]).await);
        assert!(archived["archivedAt"].as_i64().unwrap() > 0);
        let human = capsync(&server, &admin_token, &["admin", "list"]).await;
        assert_eq!(human.code, 0, "{}", human.stderr);
        assert!(!human.stdout.contains(&id), "{}", human.stdout);
        let listed = capsync(&server, &admin_token, &["admin", "list", "--archived"]).await;
        assert!(listed.stdout.contains("(archived)"), "{}", listed.stdout);
        let mine = json_of(
            &capsync(
                &server,
                &agent_token,
                &["--json", "share", "list", "--archived"],
            )
            .await,
        );
        assert_eq!(mine["shares"].as_array().unwrap().len(), 1);

        let stats = json_of(&capsync(&server, &admin_token, &["--json", "admin", "stats"]).await);
        assert_eq!(stats["archivedShares"], 1);
        assert_eq!(stats["rootShares"], 1);
        let table = capsync(&server, &admin_token, &["admin", "stats"]).await;
        assert_eq!(table.code, 0, "{}", table.stderr);
        assert!(table.stdout.contains("archived shares"), "{}", table.stdout);

        let unarchived = json_of(
            &capsync(
                &server,
                &admin_token,
                &["--json", "admin", "unarchive", &id],
            )
            .await,
        );
        assert!(unarchived["archivedAt"].is_null());
        let human = capsync(&server, &admin_token, &["admin", "list"]).await;
        assert!(human.stdout.contains(&id), "{}", human.stdout);
    });
}
