//! opencode's share protocol against a real server, as its built-in client
//! speaks it: create (twice at once), sync with snapshots out of order, the
//! share link and import data, unshare (and revocation) killing link and
//! secret, and no token in the logs. (The real opencode binary drives the same
//! routes in `tests/opencode.rs`.)

use std::net::SocketAddr;

use capsync_tests::{TestServer, admin, agent, run_local};
use serde_json::{Value, json};

use super::{PATIENCE, captured_logs, client, get};

/// opencode's base URL for an agent token, as `capsync opencode config` prints it.
fn base(addr: SocketAddr, agent_token: &str) -> String {
    format!("http://{addr}/opencode/{agent_token}")
}

fn send(method: &str, url: &str, body: &Value) -> (u16, Value) {
    let agent = client(Some(PATIENCE));
    let text = body.to_string();
    let mut response = match method {
        "POST" => agent
            .post(url)
            .header("Content-Type", "application/json")
            .send(&text),
        "DELETE" => agent
            .delete(url)
            .header("Content-Type", "application/json")
            .force_send_body()
            .send(&text),
        other => panic!("no {other}"),
    }
    .expect("HTTP request");
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_string().expect("body");
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

/// The share's merged items, as `opencode import` reads them from the link.
fn import_data(addr: SocketAddr, url: &str) -> (u16, Value) {
    let token = url.rsplit('/').next().unwrap();
    let (status, _, body) = get(addr, &format!("/api/share/{token}/data"), None);
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

fn create(base: &str, session: &str) -> Value {
    let (status, body) = send(
        "POST",
        &format!("{base}/api/share"),
        &json!({"sessionID": session}),
    );
    assert_eq!(status, 200, "{body}");
    body
}

fn sync(base: &str, share: &Value, secret: &str, items: Value) -> (u16, Value) {
    let id = share["id"].as_str().unwrap();
    send(
        "POST",
        &format!("{base}/api/share/{id}/sync"),
        &json!({"secret": secret, "data": items}),
    )
}

fn session(updated: i64, title: &str) -> Value {
    json!({"type": "session", "data": {"id": "ses_oc", "title": title,
           "time": {"created": 1, "updated": updated}}})
}

fn message(completed: bool) -> Value {
    let mut time = json!({"created": 2});
    if completed {
        time["completed"] = 9.into();
    }
    json!({"type": "message", "data": {"id": "msg_1", "sessionID": "ses_oc",
           "role": "assistant", "time": time}})
}

fn tool(status: &str) -> Value {
    json!({"type": "part", "data": {"id": "prt_bash", "messageID": "msg_1", "sessionID": "ses_oc",
           "type": "tool", "tool": "bash", "callID": "c1",
           "state": {"status": status, "input": {"command": "ls"}}}})
}

/// A server with an agent; runs `body` with the HTTP address and the agent token.
fn with_agent(body: impl FnOnce(SocketAddr, &str)) {
    let server = TestServer::start();
    let token = run_local(async {
        let (conn, admin) = admin(&server).await;
        agent(&conn, &admin).await.1
    });
    body(server.http_addr(), &token);
}

#[test]
fn creates_for_one_session_at_once_give_one_share_and_working_secrets() {
    with_agent(|addr, token| {
        let base = base(addr, token);
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| create(&base, "ses_oc"));
            let b = s.spawn(|| create(&base, "ses_oc"));
            (a.join().unwrap(), b.join().unwrap())
        });
        assert_eq!(a["id"], b["id"], "one share for the session");
        assert_ne!(a["secret"], b["secret"]);
        let link = a["url"].as_str().unwrap();
        let pattern_tail = link
            .strip_prefix(&format!("http://{addr}/share/"))
            .unwrap_or_else(|| panic!("{link} is not <origin>/share/<id>"));
        assert!(
            pattern_tail
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-'),
            "opencode import takes only [a-zA-Z0-9_-] after /share/: {link}"
        );
        // Whichever answer the client kept, its secret works; the id of one
        // with the secret of the other works too.
        for secret in [&a["secret"], &b["secret"]] {
            let (status, body) = sync(
                &base,
                &a,
                secret.as_str().unwrap(),
                json!([session(1, "t")]),
            );
            assert_eq!(status, 200, "{body}");
        }
        // Another session is another share.
        assert_ne!(create(&base, "ses_other")["id"], a["id"]);
        // Without a good agent token nothing is created.
        let bad = base.replace("csagent_", "csagent_0");
        let (status, _) = send(
            "POST",
            &format!("{bad}/api/share"),
            &json!({"sessionID": "s"}),
        );
        assert_eq!(status, 401);
    });
}

#[test]
fn syncs_keep_every_item_they_can_and_report_the_rest() {
    with_agent(|addr, token| {
        let base = base(addr, token);
        let share = create(&base, "ses_oc");
        let secret = share["secret"].as_str().unwrap();

        // A part before its message, an unknown item, a model list.
        let (status, body) = sync(
            &base,
            &share,
            secret,
            json!([
                session(10, "first"),
                tool("running"),
                {"type": "revert", "data": {}},
                {"type": "model", "data": [
                    {"id": "x", "providerID": "openrouter", "name": "X via openrouter"},
                    {"id": "x", "providerID": "opencode", "name": "X via opencode"}
                ]},
            ]),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["applied"], 3, "{body}");
        assert_eq!(body["rejected"][0]["index"], 2, "{body}");
        assert_eq!(body["rejected"][0]["reason"], "invalid", "{body}");

        // Newer snapshots; then older ones arrive late and are refused alone.
        let (status, body) = sync(
            &base,
            &share,
            secret,
            json!([session(20, "second"), message(true), tool("completed")]),
        );
        assert_eq!((status, &body["applied"]), (200, &json!(3)), "{body}");
        // (A running snapshot seen before would be a plain duplicate: this one is new.)
        let mut running_with_output = tool("running");
        running_with_output["data"]["state"]["metadata"] = json!({"output": "a.rs"});
        let (status, body) = sync(
            &base,
            &share,
            secret,
            json!([session(15, "late"), message(false), running_with_output,
                   {"type": "session_diff", "data": [{"file": "a.rs", "patch": "@@", "additions": 1, "deletions": 0, "status": "modified"}]}]),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["applied"], 1, "only the diff: {body}");
        let reasons: Vec<&Value> = body["rejected"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| &r["reason"])
            .collect();
        assert_eq!(reasons, ["staleTransition"; 3], "{body}");

        // The same snapshot again is a duplicate and changes nothing.
        let (_, body) = sync(&base, &share, secret, json!([session(20, "second")]));
        assert_eq!(
            (&body["applied"], &body["duplicate"]),
            (&json!(0), &json!(1)),
            "{body}"
        );

        // The link's data holds the newest of everything, parts after their message.
        let (status, items) = import_data(addr, share["url"].as_str().unwrap());
        assert_eq!(status, 200, "{items}");
        let types: Vec<&str> = items
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["type"].as_str().unwrap())
            .collect();
        assert_eq!(
            types,
            ["session", "message", "part", "session_diff", "model"]
        );
        assert_eq!(items[0]["data"]["title"], "second");
        assert_eq!(items[2]["data"]["state"]["status"], "completed");
        assert_eq!(items[4]["data"].as_array().unwrap().len(), 2);

        // A wrong secret, or one of another share, is the same 401.
        let other = create(&base, "ses_other");
        for bad in [
            secret.replace("cswriter_", "cswriter_0"),
            other["secret"].as_str().unwrap().to_owned(),
        ] {
            let (status, _) = sync(&base, &share, &bad, json!([session(30, "x")]));
            assert_eq!(status, 401);
        }
    });
}

#[test]
fn a_large_attachment_is_left_out_and_a_large_record_refused_alone() {
    let server = TestServer::start_with(|config| config.max_op_bytes = 4096);
    let token = run_local(async {
        let (conn, admin) = admin(&server).await;
        agent(&conn, &admin).await.1
    });
    let addr = server.http_addr();
    let base = base(addr, &token);
    let share = create(&base, "ses_oc");
    let secret = share["secret"].as_str().unwrap();
    let url = format!("data:image/png;base64,{}", "A".repeat(8000));
    let (status, body) = sync(
        &base,
        &share,
        secret,
        json!([
            message(true),
            {"type": "part", "data": {"id": "prt_img", "messageID": "msg_1", "type": "file",
                                       "mime": "image/png", "filename": "shot.png", "url": url}},
            {"type": "part", "data": {"id": "prt_txt", "messageID": "msg_1", "type": "text",
                                       "text": "x".repeat(8000)}},
            {"type": "part", "data": {"id": "prt_ok", "messageID": "msg_1", "type": "text", "text": "ok"}},
        ]),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["applied"], 3, "{body}");
    assert_eq!(body["rejected"][0]["reason"], "tooLarge", "{body}");
    assert_eq!(body["rejected"][0]["id"], "prt_txt", "{body}");
    let (_, items) = import_data(addr, share["url"].as_str().unwrap());
    let image = items
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["data"]["id"] == "prt_img")
        .unwrap();
    assert_eq!(image["data"]["url"], Value::Null);
    assert_eq!(image["data"]["capsyncOmitted"]["bytes"], url.len());
}

#[test]
fn unsharing_kills_the_link_and_the_secret_at_once() {
    let logs = captured_logs();
    with_agent(|addr, token| {
        let base = base(addr, token);
        let share = create(&base, "ses_oc");
        let id = share["id"].as_str().unwrap();
        let secret = share["secret"].as_str().unwrap();
        let url = share["url"].as_str().unwrap();
        assert_eq!(sync(&base, &share, secret, json!([session(1, "t")])).0, 200);

        // The link leads to the page, with the token moved into the fragment.
        let link_path = url.strip_prefix(&format!("http://{addr}")).unwrap();
        let viewer = link_path.strip_prefix("/share/").unwrap();
        let no_redirects: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .build()
            .into();
        let response = no_redirects.get(url).call().unwrap();
        assert_eq!(response.status().as_u16(), 303);
        assert_eq!(
            response.headers()["location"].to_str().unwrap(),
            format!("/s/{id}#{viewer}")
        );
        assert_eq!(import_data(addr, url).0, 200);
        // opencode has no connection to watch: its syncs count as a writer there.
        let (status, _, body) = get(addr, &format!("/api/shares/{id}/snapshot"), Some(viewer));
        assert_eq!(status, 200, "{body}");
        let snapshot: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(snapshot["presence"]["writerConnected"], true, "{body}");

        let (status, _) = send(
            "DELETE",
            &format!("{base}/api/share/{id}"),
            &json!({"secret": secret}),
        );
        assert_eq!(status, 200);
        assert_eq!(import_data(addr, url).0, 401);
        assert_eq!(get(addr, link_path, None).0, 404);
        assert_eq!(sync(&base, &share, secret, json!([session(2, "t")])).0, 401);
        // Gone already: still 200, so the client can forget it.
        let (status, _) = send(
            "DELETE",
            &format!("{base}/api/share/{id}"),
            &json!({"secret": secret}),
        );
        assert_eq!(status, 200);
        // A new share of the session starts over.
        assert_ne!(create(&base, "ses_oc")["id"], share["id"]);
    });
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        text.contains("/opencode/<token>/api/share"),
        "paths are logged, redacted:\n{text}"
    );
    for prefix in ["csagent_", "cswriter_", "csviewer_"] {
        assert!(!text.contains(prefix), "a token was logged:\n{text}");
    }
}

#[test]
fn revoking_the_shares_viewers_or_writers_kills_the_link_or_the_secret() {
    let server = TestServer::start();
    let addr = server.http_addr();
    let agent_token = run_local(async {
        let (conn, admin) = admin(&server).await;
        agent(&conn, &admin).await.1
    });
    let base = base(addr, &agent_token);
    let share = create(&base, "ses_oc");
    let id = share["id"].as_str().unwrap().to_owned();
    let secret = share["secret"].as_str().unwrap();
    let url = share["url"].as_str().unwrap();
    assert_eq!(sync(&base, &share, secret, json!([session(1, "t")])).0, 200);
    assert_eq!(import_data(addr, url).0, 200);
    let revoke = |scope| {
        run_local(async {
            let conn = capsync_tests::client::connect(server.addr()).await.unwrap();
            let agent = conn
                .redeem(&agent_token)
                .await
                .unwrap()
                .into_agent()
                .unwrap();
            agent.revoke_share(&id, scope).await.unwrap();
        })
    };
    // The owner revokes the viewers: the link dies at once, the secret still syncs.
    revoke(capsync_tests::client::Scope::Viewers);
    assert_eq!(import_data(addr, url).0, 401);
    let link_path = url.strip_prefix(&format!("http://{addr}")).unwrap();
    assert_eq!(get(addr, link_path, None).0, 404);
    assert_eq!(sync(&base, &share, secret, json!([session(2, "t")])).0, 200);
    // Then the writers: the secret is refused.
    revoke(capsync_tests::client::Scope::Writers);
    assert_eq!(sync(&base, &share, secret, json!([session(3, "t")])).0, 401);
}
