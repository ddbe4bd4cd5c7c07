//! The README walkthrough, run through the `capsync` command line against a
//! real server: mint an agent, create a share, push the sample session, read
//! the snapshot, revoke the viewers, and see the viewer fail while the writer works.

use capsync_tests::{TestServer, capsync, json_of, run_local, sample_session_path};
use serde_json::json;

#[test]
fn readme_walkthrough() {
    let server = TestServer::start();
    run_local(async {
        let admin = server.admin_token();
        let minted = json_of(
            &capsync(
                &server,
                &admin,
                &["--json", "admin", "mint-agent", "--label", "laptop"],
            )
            .await,
        );
        let agent = minted["token"].as_str().unwrap().to_owned();

        let sample = sample_session_path();
        let sample = sample.to_str().unwrap();
        let created = json_of(
            &capsync(
                &server,
                &agent,
                &["--json", "share", "create", "--from-export", sample],
            )
            .await,
        );
        let share_id = created["shareId"].as_str().unwrap().to_owned();
        let writer = created["writerToken"]["token"].as_str().unwrap().to_owned();
        let viewer = created["viewerToken"]["token"].as_str().unwrap().to_owned();
        // The link: the --server host with the gateway's default port, the token in the fragment.
        assert_eq!(
            created["link"],
            format!("http://127.0.0.1:7421/s/{share_id}#{viewer}")
        );

        let pushed = json_of(&capsync(&server, &writer, &["--json", "push", sample]).await);
        let applied = pushed["applied"].as_u64().unwrap();
        assert!(
            applied > 15,
            "the sample has a session, messages and parts: {pushed}"
        );
        assert_eq!(pushed["rejected"].as_array().unwrap().len(), 0, "{pushed}");
        assert_eq!(pushed["cursor"].as_u64().unwrap(), applied);

        // Pushing again is harmless.
        let again = json_of(&capsync(&server, &writer, &["--json", "push", sample]).await);
        assert_eq!(again["applied"], 0);
        assert_eq!(again["duplicates"].as_u64().unwrap(), applied);

        let human = capsync(&server, &viewer, &["snapshot"]).await;
        assert_eq!(human.code, 0, "{}", human.stderr);
        assert!(
            human
                .stdout
                .contains("Fix 500 on login with uppercase email"),
            "{}",
            human.stdout
        );
        let snapshot = json_of(&capsync(&server, &viewer, &["--json", "snapshot"]).await);
        assert_eq!(snapshot["messages"].as_array().unwrap().len(), 4);
        assert_eq!(snapshot["cursor"].as_u64().unwrap(), applied);

        let revoked = json_of(
            &capsync(
                &server,
                &admin,
                &["--json", "admin", "revoke", &share_id, "--scope", "viewers"],
            )
            .await,
        );
        assert_eq!(revoked["viewerEpoch"], 1);

        let denied = capsync(&server, &viewer, &["snapshot"]).await;
        assert_ne!(denied.code, 0);
        assert!(
            denied.stderr.contains("permission denied"),
            "{}",
            denied.stderr
        );
        assert!(
            !denied.stderr.contains(&viewer),
            "the token is never echoed"
        );

        let state = json_of(&capsync(&server, &writer, &["--json", "state"]).await);
        assert_eq!(
            state["cursor"].as_u64().unwrap(),
            applied,
            "the writer keeps working"
        );
    });
}

#[test]
fn opencode_config_and_share_links_point_at_the_servers_pages() {
    let server = TestServer::start();
    let origin = format!("http://{}", server.http_addr());
    run_local(async {
        let admin = server.admin_token();
        let minted = json_of(&capsync(&server, &admin, &["--json", "admin", "mint-agent"]).await);
        let agent = minted["token"].as_str().unwrap().to_owned();

        let config = capsync(
            &server,
            &agent,
            &["--share-url", &origin, "opencode", "config"],
        )
        .await;
        let config = json_of(&config);
        let url = format!("{origin}/opencode/{agent}");
        assert_eq!(config["enterprise"], json!({"url": url}));
        // What opencode does with it: create a share there.
        let mut created = ureq::post(format!("{url}/api/share"))
            .header("Content-Type", "application/json")
            .send(json!({"sessionID": "ses_cli"}).to_string())
            .unwrap();
        let created: serde_json::Value =
            serde_json::from_str(&created.body_mut().read_to_string().unwrap()).unwrap();
        let share_id = created["id"].as_str().unwrap();
        assert!(
            created["url"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{origin}/share/"))
        );

        // Viewer tokens come with their link, on stderr and in --json.
        let args = ["--share-url", &origin, "share", "mint-viewer", share_id];
        let human = capsync(&server, &agent, &args).await;
        assert_eq!(human.code, 0, "{}", human.stderr);
        let token = human.stdout.trim();
        assert!(
            token.starts_with("csviewer_"),
            "the token alone: {}",
            human.stdout
        );
        let link = format!("{origin}/s/{share_id}#{token}");
        assert!(human.stderr.contains(&link), "{}", human.stderr);
        let json = json_of(&capsync(&server, &agent, &[&["--json"][..], &args].concat()).await);
        assert!(
            json["link"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{origin}/s/{share_id}#csviewer_"))
        );

        // Only an agent token configures opencode.
        let wrong = capsync(&server, &admin, &["opencode", "config"]).await;
        assert_ne!(wrong.code, 0);
        assert!(!wrong.stdout.contains("opencode/"), "{}", wrong.stdout);
    });
}
