//! The HTTP gateway against a real server: the JSON API with bearer tokens,
//! uniform `401`s that leave no token in the logs, live events (backlog, live,
//! resume with `Last-Event-ID`, `revoked`), presence, `/healthz`, `/metrics`,
//! the page's security headers, and markdown with raw HTML escaped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use capsync_server::config::HttpListen;
use capsync_tests::client::{AgentClient, CreatedShare, OpKind, OpSpec, Scope};
use capsync_tests::{TestServer, admin, agent, run_local, sample_share};
use serde_json::{Value, json};

#[path = "http_opencode.rs"]
mod opencode;

/// How long any one wait for the server may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(20);

/// An HTTP client that returns error statuses as responses; `timeout` bounds a whole call.
fn client(timeout: Option<Duration>) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(timeout)
        .build()
        .into()
}

fn http() -> ureq::Agent {
    client(Some(PATIENCE))
}

/// GET `path` with an optional bearer token: the status, the headers, the body.
fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, ureq::http::HeaderMap, String) {
    let mut request = http().get(format!("http://{addr}{path}"));
    if let Some(token) = token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    let mut response = request.call().expect("HTTP request");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.body_mut().read_to_string().expect("body");
    (status, headers, body)
}

fn get_json(addr: SocketAddr, path: &str, token: &str) -> Value {
    let (status, headers, body) = get(addr, path, Some(token));
    assert_eq!(status, 200, "{path}: {body}");
    assert_eq!(headers["content-type"], "application/json", "{path}");
    serde_json::from_str(&body).expect("JSON body")
}

/// A share of the sample session (23 ops) on a running server.
struct Fixture {
    /// The HTTP gateway.
    addr: SocketAddr,
    share_id: String,
    viewer: String,
}

/// Starts a server, shares the sample session, then runs `body` with the
/// share's writer still connected (on the test's RPC connection).
fn with_sample<T>(
    adjust: impl FnOnce(&mut capsync_server::Config),
    body: impl AsyncFnOnce(&Fixture, &CreatedShare, &AgentClient) -> T,
) -> T {
    let server = TestServer::start_with(adjust);
    // The server outlives the client's connection: it stops only after this returns.
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let created = sample_share(&agent).await;
        let fixture = Fixture {
            addr: server.http_addr(),
            share_id: created.info.state.share_id.clone(),
            viewer: created.viewer_token.token.clone(),
        };
        body(&fixture, &created, &agent).await
    })
}

fn api(fixture: &Fixture, what: &str) -> String {
    format!("/api/shares/{}/{what}", fixture.share_id)
}

#[test]
fn snapshot_and_ops_with_a_viewer_token() {
    with_sample(
        |_| {},
        async |f, _, _| {
            let addr = f.addr;
            let doc = get_json(addr, &api(f, "snapshot"), &f.viewer);
            assert_eq!(doc["shareId"], f.share_id);
            assert_eq!(doc["cursor"], 23);
            assert_eq!(
                doc["session"]["title"],
                "Fix 500 on login with uppercase email"
            );
            assert_eq!(doc["models"][0]["id"], "anthropic/claude-sonnet-4");
            assert_eq!(doc["diffs"].as_array().unwrap().len(), 2);
            let messages = doc["messages"].as_array().unwrap();
            assert_eq!(messages.len(), 4);
            assert_eq!(messages[0]["info"]["role"], "user");
            // Every text part comes with its rendered markdown.
            let text_parts: Vec<&Value> = messages
                .iter()
                .flat_map(|m| m["parts"].as_array().unwrap())
                .filter(|p| p["type"] == "text")
                .collect();
            assert_eq!(text_parts.len(), 5);
            for part in text_parts {
                let id = part["id"].as_str().unwrap();
                assert!(html_of(&doc["html"][id]).starts_with("<p>"), "{id}");
            }
            assert!(
                html_of(&doc["html"]["prt_01JD4K7M2QX9A7TS00205"])
                    .contains("<code>find_user_by_email</code>")
            );
            assert_eq!(doc["presence"]["writerConnected"], true);
            assert_eq!(doc["presence"]["interrupted"], false);
            assert!(doc["presence"]["lastChange"].is_i64());

            let ops = get_json(addr, &format!("{}?after=20", api(f, "ops")), &f.viewer);
            assert_eq!(ops["cursor"], 23);
            let cursors: Vec<u64> = ops["ops"]
                .as_array()
                .unwrap()
                .iter()
                .map(|op| op["cursor"].as_u64().unwrap())
                .collect();
            assert_eq!(cursors, vec![21, 22, 23]);
            assert!(ops["ops"][0]["payload"].is_object());
            assert!(ops["ops"][0]["kind"].is_string());
            let limited = get_json(
                addr,
                &format!("{}?after=0&limit=2", api(f, "ops")),
                &f.viewer,
            );
            assert_eq!(limited["ops"].as_array().unwrap().len(), 2);
        },
    );
}

#[test]
fn every_bad_token_gets_the_same_401() {
    // Nine failed redeems follow: keep the address from being rate limited.
    with_sample(
        |c| c.redeem_failures = 100,
        async |f, created, agent| {
            let addr = f.addr;
            // A good token of another share, used on this one.
            let other = sample_share(agent).await;
            let other_viewer = other.viewer_token.token.clone();
            let mut wrong_secret = f.viewer.clone();
            let last = wrong_secret.pop().unwrap();
            wrong_secret.push(if last == '0' { '1' } else { '0' });
            // A viewer id with the secret of another token.
            let (prefix, _) = f.viewer.rsplit_once('_').unwrap();
            let (_, writer_secret) = created.writer_token.token.rsplit_once('_').unwrap();
            let spliced = format!("{prefix}_{writer_secret}");
            let mut bodies = Vec::new();
            for token in [
                None,
                Some("garbage"),
                Some(wrong_secret.as_str()),
                Some(other_viewer.as_str()),
                Some(spliced.as_str()),
            ] {
                for what in ["snapshot", "ops", "events"] {
                    let (status, headers, body) = get(addr, &api(f, what), token);
                    assert_eq!(status, 401, "{what} with {token:?}: {body}");
                    assert_eq!(headers["www-authenticate"], "Bearer");
                    bodies.push(body);
                }
            }
            bodies.dedup();
            assert_eq!(bodies.len(), 1, "all failures look the same: {bodies:?}");
            let body: Value = serde_json::from_str(&bodies[0]).unwrap();
            assert_eq!(body["error"], "unauthorized");
            // The good token of the other share works on its own share.
            let path = format!("/api/shares/{}/snapshot", other.info.state.share_id);
            assert_eq!(get(addr, &path, Some(&other_viewer)).0, 200);
        },
    );
}

/// Everything the server side logs in this test binary (the server and the
/// HTTP stack under it), at every level. The test's own HTTP client is left
/// out: it traces the raw requests it sends, header and all.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("capsync_server=trace,axum=trace,hyper=trace,tower=trace")
            .with_ansi(false)
            .with_writer(move || LogSink(sink.clone()))
            .try_init();
        logs
    })
    .clone()
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn tokens_never_reach_the_logs() {
    let logs = captured_logs();
    with_sample(
        |_| {},
        async |f, _, _| {
            let addr = f.addr;
            let bad = f.viewer.replace("csviewer_", "csviewer_0");
            assert_eq!(get(addr, &api(f, "snapshot"), Some(&bad)).0, 401);
            assert_eq!(get(addr, &api(f, "snapshot"), Some(&f.viewer)).0, 200);
            assert_eq!(get(addr, &format!("/s/{}", f.share_id), None).0, 200);
        },
    );
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        text.contains("http request"),
        "requests are logged:\n{text}"
    );
    assert!(!text.contains("csviewer_"), "a token was logged:\n{text}");
    assert!(
        !text.to_lowercase().contains("bearer"),
        "a header was logged:\n{text}"
    );
}

#[test]
fn the_page_is_served_with_a_strict_policy() {
    with_sample(
        |_| {},
        async |f, _, _| {
            let addr = f.addr;
            let (status, headers, body) = get(addr, &format!("/s/{}", f.share_id), None);
            assert_eq!(status, 200);
            assert!(
                headers["content-type"]
                    .to_str()
                    .unwrap()
                    .starts_with("text/html")
            );
            assert!(body.contains("<script src=\"/assets/page.js\""), "{body}");
            let csp = headers["content-security-policy"].to_str().unwrap();
            assert!(
                csp.contains("script-src 'self'") && csp.contains("default-src 'none'"),
                "{csp}"
            );
            assert!(!csp.contains("unsafe-inline"));
            // Images only from data: URLs (attachments embedded in the session).
            assert!(csp.contains("img-src data:;"), "{csp}");
            assert_eq!(headers["referrer-policy"], "no-referrer");
            // The same page for any id: whether a share exists is for the API to say.
            assert_eq!(get(addr, "/s/sh_doesnotexist", None).2, body);
            let (status, headers, script) = get(addr, "/assets/page.js", None);
            assert_eq!(status, 200);
            assert!(
                headers["content-type"]
                    .to_str()
                    .unwrap()
                    .starts_with("text/javascript")
            );
            assert!(script.contains("location.hash"));
            assert_eq!(get(addr, "/assets/page.css", None).0, 200);
            assert_eq!(get(addr, "/nope", None).0, 404);
        },
    );
}

/// One event of a `text/event-stream`.
#[derive(Debug, Clone)]
struct Sse {
    event: String,
    id: Option<String>,
    data: Value,
}

/// Opens the events stream on a thread of its own and hands each event over.
fn events(
    addr: SocketAddr,
    path: &str,
    token: &str,
    last_event_id: Option<&str>,
) -> mpsc::Receiver<Sse> {
    // No overall timeout: the stream lasts as long as the test needs it.
    let mut request = client(None)
        .get(format!("http://{addr}{path}"))
        .header("Authorization", format!("Bearer {token}"));
    if let Some(id) = last_event_id {
        request = request.header("Last-Event-ID", id);
    }
    let response = request.call().expect("events request");
    assert_eq!(response.status().as_u16(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let reader = BufReader::new(response.into_body().into_reader());
        let (mut event, mut id, mut data) = (String::new(), None, String::new());
        for line in reader.lines() {
            let Ok(line) = line else { return };
            if line.is_empty() {
                if !data.is_empty() {
                    let parsed = serde_json::from_str(&data).expect("event data is JSON");
                    let sse = Sse {
                        event: std::mem::take(&mut event),
                        id: id.take(),
                        data: parsed,
                    };
                    if tx.send(sse).is_err() {
                        return;
                    }
                }
                data.clear();
                continue;
            }
            if let Some(value) = line.strip_prefix("event:") {
                event = value.trim().to_owned();
            } else if let Some(value) = line.strip_prefix("id:") {
                id = Some(value.trim().to_owned());
            } else if let Some(value) = line.strip_prefix("data:") {
                data.push_str(value.strip_prefix(' ').unwrap_or(value));
            }
        }
    });
    rx
}

fn next_event(rx: &mpsc::Receiver<Sse>) -> Sse {
    rx.recv_timeout(PATIENCE).expect("an event in time")
}

/// Events until one named `name`, returning it.
fn until(rx: &mpsc::Receiver<Sse>, name: &str) -> Sse {
    loop {
        let event = next_event(rx);
        if event.event == name {
            return event;
        }
    }
}

/// The cursors of the ops in `ops` events until `cursor` is reached.
fn ops_until(rx: &mpsc::Receiver<Sse>, cursor: u64) -> Vec<Value> {
    let mut ops = Vec::new();
    while ops.last().and_then(|op: &Value| op["cursor"].as_u64()) != Some(cursor) {
        let event = until(rx, "ops");
        let batch = event.data["ops"].as_array().unwrap().clone();
        assert_eq!(
            event.id.as_deref(),
            Some(batch.last().unwrap()["cursor"].to_string().as_str()),
            "an ops event's id is its last cursor"
        );
        ops.extend(batch);
    }
    ops
}

const SESSION: &str = "ses_01JD4K7M2QX9A7TS1";
const ASSISTANT: &str = "msg_01JD4K7M2QX9A7TS002";

fn new_text_part(id: &str, text: &str) -> OpSpec {
    OpSpec::new(
        format!("{id}:1"),
        OpKind::PartUpsert,
        json!({"id": id, "messageID": ASSISTANT, "sessionID": SESSION, "type": "text", "text": text}),
    )
}

fn delta(id: &str, n: u32, text: &str) -> OpSpec {
    OpSpec::new(
        format!("{id}:delta:{n}"),
        OpKind::PartDelta,
        json!({"partID": id, "messageID": ASSISTANT, "delta": text}),
    )
}

#[test]
fn events_replay_the_backlog_follow_live_and_resume() {
    with_sample(
        |_| {},
        async |f, created, _| {
            let addr = f.addr;
            let path = format!("{}?after=0", api(f, "events"));
            let rx = events(addr, &path, &f.viewer, None);
            let hello = next_event(&rx);
            assert_eq!(hello.event, "hello");
            assert_eq!(hello.data["cursor"], 23);
            assert_eq!(hello.data["presence"]["writerConnected"], true);
            let backlog = ops_until(&rx, 23);
            let cursors: Vec<u64> = backlog
                .iter()
                .map(|op| op["cursor"].as_u64().unwrap())
                .collect();
            assert_eq!(cursors, (1..=23).collect::<Vec<_>>());
            // Text parts come with their HTML, others without.
            for op in &backlog {
                let is_text = op["kind"] == "part.upsert" && op["payload"]["type"] == "text";
                assert_eq!(op.get("html").is_some(), is_text, "{op}");
            }

            // Live: a new text part, then deltas; each delta carries the HTML of the
            // segments it changed (this short text is one segment).
            let ack = created
                .writer
                .append(&capsync_tests::batch(
                    "live-1",
                    vec![
                        new_text_part("prt_live", "Streaming"),
                        delta("prt_live", 1, " **now**"),
                    ],
                ))
                .await
                .unwrap();
            assert_eq!(ack.cursor.0, 25);
            let live = ops_until(&rx, 25);
            assert_eq!(live[0]["html"], json!(["<p>Streaming</p>\n"]));
            assert_eq!(live[0]["htmlFrom"], 0);
            assert_eq!(
                live[1]["html"],
                json!(["<p>Streaming <strong>now</strong></p>\n"])
            );
            assert_eq!(live[1]["htmlFrom"], 0);
            assert_eq!(live[1]["payload"]["delta"], " **now**");

            // Resume after 24 from another connection: 25 is the first op it gets,
            // and a delta to a part it never saw still comes with the whole text.
            let resumed = events(addr, &api(f, "events"), &f.viewer, Some("24"));
            assert_eq!(next_event(&resumed).event, "hello");
            let first = until(&resumed, "ops");
            assert_eq!(first.id.as_deref(), Some("25"));
            assert_eq!(first.data["ops"][0]["cursor"], 25);
            created
                .writer
                .append(&capsync_tests::batch(
                    "live-2",
                    vec![delta("prt_live", 2, " and more")],
                ))
                .await
                .unwrap();
            for rx in [&rx, &resumed] {
                let ops = ops_until(rx, 26);
                assert_eq!(
                    ops.last().unwrap()["html"],
                    json!(["<p>Streaming <strong>now</strong> and more</p>\n"])
                );
            }
            // `?after=` works as well as the header; a bad header is a 400.
            let from_query = events(
                addr,
                &format!("{}?after=25", api(f, "events")),
                &f.viewer,
                None,
            );
            assert_eq!(until(&from_query, "ops").id.as_deref(), Some("26"));
            let mut bad = http()
                .get(format!("http://{addr}{}", api(f, "events")))
                .header("Authorization", format!("Bearer {}", f.viewer))
                .header("Last-Event-ID", "soon")
                .call()
                .unwrap();
            assert_eq!(
                bad.status().as_u16(),
                400,
                "{}",
                bad.body_mut().read_to_string().unwrap()
            );
        },
    );
}

#[test]
fn revoking_viewers_ends_the_stream_with_revoked() {
    with_sample(
        |_| {},
        async |f, _, agent| {
            let addr = f.addr;
            let rx = events(addr, &api(f, "events"), &f.viewer, Some("23"));
            assert_eq!(next_event(&rx).event, "hello");
            agent
                .revoke_share(&f.share_id, Scope::Viewers)
                .await
                .unwrap();
            let revoked = until(&rx, "revoked");
            assert!(
                revoked.data["message"]
                    .as_str()
                    .unwrap()
                    .contains("revoked")
            );
            // The stream ends after it.
            assert!(matches!(
                rx.recv_timeout(PATIENCE),
                Err(mpsc::RecvTimeoutError::Disconnected)
            ));
            assert_eq!(get(addr, &api(f, "snapshot"), Some(&f.viewer)).0, 401);
            assert_eq!(get(addr, &api(f, "events"), Some(&f.viewer)).0, 401);
        },
    );
}

#[test]
fn presence_shows_the_writer_leaving_and_running_tools_interrupted() {
    let server = TestServer::start_with(|c| c.interrupted_after = Duration::from_millis(300));
    let (share_id, viewer, addr) = run_local(async {
        let (conn, admin) = admin(&server).await;
        let (agent, _) = agent(&conn, &admin).await;
        let created = sample_share(&agent).await;
        // A tool call still running when the writer goes.
        created
            .writer
            .append(&capsync_tests::batch(
                "running",
                vec![OpSpec::new(
                    "tool:running",
                    OpKind::PartUpsert,
                    json!({"id": "prt_zz_running", "messageID": ASSISTANT, "sessionID": SESSION,
                           "type": "tool", "tool": "bash", "state": {"status": "running", "input": {"command": "sleep 600"}}}),
                )],
            ))
            .await
            .unwrap();
        (
            created.info.state.share_id.clone(),
            created.viewer_token.token.clone(),
            server.http_addr(),
        )
        // The connection, and with it the writer capability, drops here.
    });
    let path = format!("/api/shares/{share_id}/events");
    let rx = events(addr, &path, &viewer, Some("24"));
    let hello = next_event(&rx);
    let mut presence = hello.data["presence"].clone();
    // The disconnect may land just before or after the stream starts.
    while presence["writerConnected"] != false {
        presence = until(&rx, "presence").data;
    }
    assert!(presence["writerGoneSince"].is_i64());
    while presence["interrupted"] != true {
        presence = until(&rx, "presence").data;
    }
    assert_eq!(presence["interruptedAfterMs"], 300);
    let doc = get_json(addr, &format!("/api/shares/{share_id}/snapshot"), &viewer);
    assert_eq!(doc["presence"]["writerConnected"], false);
    assert_eq!(doc["presence"]["interrupted"], true);
    // Display only: the stored tool call is still running.
    let tool = doc["messages"][1]["parts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "prt_zz_running")
        .unwrap()
        .clone();
    assert_eq!(tool["state"]["status"], "running");
}

#[test]
fn healthz_and_metrics() {
    with_sample(
        |_| {},
        async |f, created, _| {
            let addr = f.addr;
            // On top of the 23 applied ops: one more applied, a duplicate, a rejection.
            for (id, ops) in [
                ("one", vec![new_text_part("prt_m", "x")]),
                (
                    "two",
                    vec![new_text_part("prt_m", "x"), delta("prt_missing", 1, "x")],
                ),
            ] {
                created
                    .writer
                    .append(&capsync_tests::batch(id, ops))
                    .await
                    .unwrap();
            }
            let _stream = events(addr, &api(f, "events"), &f.viewer, Some("24"));
            let (status, _, body) = get(addr, "/healthz", None);
            assert_eq!((status, body.as_str()), (200, "ok\n"));
            let (status, headers, text) = get(addr, "/metrics", None);
            assert_eq!(status, 200);
            assert!(
                headers["content-type"]
                    .to_str()
                    .unwrap()
                    .contains("openmetrics-text")
            );
            for line in [
                "capsync_ops_applied_total 24",
                "capsync_ops_duplicate_total 1",
                "capsync_ops_rejected_total 1",
                "capsync_commit_latency_seconds_count 3",
                "capsync_commit_latency_seconds_bucket{le=",
                "capsync_rpc_connections_total 1",
                "capsync_rpc_connections_open 1",
                "capsync_subscribers{via=\"sse\"} 1",
                "capsync_subscribers{via=\"rpc\"} 0",
                "capsync_http_requests_total",
                "# EOF",
            ] {
                assert!(text.contains(line), "{line} missing:\n{text}");
            }
        },
    );
}

/// A long answer streamed as deltas: each event carries only the segments of HTML the
/// delta changed, and a follower that splices them in as `htmlFrom` says (as the page
/// does) holds the snapshot's HTML of the whole text, segment for segment.
#[test]
fn a_long_streamed_answer_reaches_streams_as_segments_that_join_to_the_snapshots_html() {
    with_sample(
        |_| {},
        async |f, created, _| {
            let rx = events(
                f.addr,
                &format!("{}?after=23", api(f, "events")),
                &f.viewer,
                None,
            );
            assert_eq!(next_event(&rx).event, "hello");
            let mut ops = vec![new_text_part("prt_long", "# An answer\n\n")];
            for n in 0..1500u32 {
                let text = match n % 30 {
                    29 => "\n\n".to_owned(),
                    14 => "\n\n```\nlet code = 1;\n```\n\n".to_owned(),
                    _ => format!("word{n} "),
                };
                ops.push(delta("prt_long", n + 1, &text));
            }
            let last = 23 + ops.len() as u64;
            // The part first, and followed to the stream, so the share's feed renders the
            // deltas from the part it saw rather than from a lookup of the part as it
            // stands by then (which is sent whole: see the closing note of stop 22).
            let deltas = ops.split_off(1);
            created
                .writer
                .append(&capsync_tests::batch("long-part", ops))
                .await
                .unwrap();
            let mut received = ops_until(&rx, 24);
            for (n, chunk) in deltas.chunks(50).enumerate() {
                created
                    .writer
                    .append(&capsync_tests::batch(&format!("long-{n}"), chunk.to_vec()))
                    .await
                    .unwrap();
            }
            received.extend(ops_until(&rx, last));
            let mut page: Vec<String> = Vec::new();
            let mut largest = 0;
            for op in received {
                let from = op["htmlFrom"].as_u64().unwrap() as usize;
                let html: Vec<String> = serde_json::from_value(op["html"].clone()).unwrap();
                assert!(
                    from <= page.len(),
                    "htmlFrom {from} past {} segments",
                    page.len()
                );
                largest = largest.max(html.iter().map(String::len).sum::<usize>());
                page.truncate(from);
                page.extend(html);
            }
            let doc = get_json(f.addr, &api(f, "snapshot"), &f.viewer);
            let snapshot: Vec<String> =
                serde_json::from_value(doc["html"]["prt_long"].clone()).unwrap();
            assert!(snapshot.len() > 3, "{} segments", snapshot.len());
            assert_eq!(page, snapshot);
            let whole = snapshot.concat().len();
            assert!(
                largest < whole / 2,
                "an event carried {largest} of {whole} bytes"
            );
        },
    );
}

#[test]
fn markdown_is_rendered_and_raw_html_escaped() {
    with_sample(
        |_| {},
        async |f, created, _| {
            let hostile = "**Done.** <script>alert('x')</script> <img src=x onerror=alert(1)> [click](javascript:alert(2))\n\n<iframe src=\"https://evil\"></iframe>";
            created
                .writer
                .append(&capsync_tests::batch(
                    "md",
                    vec![new_text_part("prt_md", hostile)],
                ))
                .await
                .unwrap();
            let doc = get_json(f.addr, &api(f, "snapshot"), &f.viewer);
            let html = html_of(&doc["html"]["prt_md"]);
            assert!(html.contains("<strong>Done.</strong>"), "{html}");
            assert!(html.contains("&lt;script&gt;"), "{html}");
            for bad in [
                "<script",
                "<img",
                "<iframe",
                "javascript:",
                "onerror=alert(1)>",
            ] {
                assert!(!html.contains(bad), "{bad} in {html}");
            }
            // The record itself is untouched.
            let part = doc["messages"][1]["parts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["id"] == "prt_md")
                .unwrap()
                .clone();
            assert_eq!(part["text"], hostile);
        },
    );
}

#[test]
fn share_links_take_viewer_tokens_only() {
    with_sample(
        |_| {},
        async |f, created, _| {
            // A valid writer token of this very share is no link: it says so.
            let writer = &created.writer_token.token;
            for what in ["snapshot", "ops", "events"] {
                let (status, _, body) = get(f.addr, &api(f, what), Some(writer));
                assert_eq!(status, 401, "{what}: {body}");
                let body: Value = serde_json::from_str(&body).unwrap();
                assert_eq!(body["error"], "unauthorized");
                let message = body["message"].as_str().unwrap();
                assert!(
                    message.contains("writer token") && message.contains("viewer"),
                    "{message}"
                );
                assert!(!message.contains(writer.as_str()), "never echoes the token");
            }
            assert_eq!(get(f.addr, &api(f, "snapshot"), Some(&f.viewer)).0, 200);
        },
    );
}

#[test]
fn failed_redeems_over_http_count_for_rpc_too() {
    let server = TestServer::start_with(|c| c.redeem_failures = 3);
    let addr = server.http_addr();
    for _ in 0..3 {
        assert_eq!(
            get(addr, "/api/shares/sh_x/snapshot", Some("csviewer_00_00")).0,
            401
        );
    }
    let (status, headers, body) = get(addr, "/api/shares/sh_x/snapshot", Some("csviewer_00_00"));
    assert_eq!(status, 429, "{body}");
    // One failure drains in 60s / 3: the next try is let through within 20s.
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(
        (1..=20).contains(&retry_after),
        "Retry-After: {retry_after}"
    );
    // The same address is now limited over RPC as well for bad tokens, but a
    // good token still works: someone else's mistakes never lock it out.
    run_local(async {
        let conn = capsync_tests::client::connect(server.addr()).await.unwrap();
        let err = conn.redeem("csviewer_00_00").await.unwrap_err();
        assert!(err.to_string().to_lowercase().contains("too many"), "{err}");
        conn.redeem(&server.admin_token())
            .await
            .expect("a valid token is never rate limited by failures");
    });
}

#[test]
fn the_gateway_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = capsync_server::Config::for_tests(dir.path().join("data"));
    config.http_listen = HttpListen::Off;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let handle = capsync_server::spawn(listener, config).unwrap();
    assert_eq!(handle.http_addr(), None);
    handle.shutdown().unwrap();
    assert_eq!("off".parse::<HttpListen>().unwrap(), HttpListen::Off);
    assert!("nonsense".parse::<HttpListen>().is_err());
}

#[test]
fn a_shares_viewers_read_its_sub_agents_shares_and_nothing_else() {
    let server = TestServer::start();
    let addr = server.http_addr();
    run_local(async {
        let (conn, admin) = admin(&server).await;
        let (owner, _) = agent(&conn, &admin).await;
        let (stranger, _) = agent(&conn, &admin).await;
        let parent = capsync_tests::child_share(&owner, "ses_parent", "prj", None).await;
        let child =
            capsync_tests::child_share(&owner, "ses_child", "prj", Some("ses_parent")).await;
        let grandchild =
            capsync_tests::child_share(&owner, "ses_grandchild", "prj", Some("ses_child")).await;
        let foreign =
            capsync_tests::child_share(&stranger, "ses_foreign", "prj", Some("ses_parent")).await;
        let id = |s: &CreatedShare| s.info.state.share_id.clone();
        let token = parent.viewer_token.token.clone();
        let snapshot = |share: String, token: String| async move {
            tokio::task::spawn_blocking(move || {
                get(addr, &format!("/api/shares/{share}/snapshot"), Some(&token))
            })
            .await
            .unwrap()
        };

        // The parent's page lists its child, and its token reads it.
        let (status, _, body) = snapshot(id(&parent), token.clone()).await;
        assert_eq!(status, 200, "{body}");
        let doc: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(doc["children"], json!({"ses_child": id(&child)}));
        let (status, _, body) = snapshot(id(&child), token.clone()).await;
        assert_eq!(status, 200, "{body}");
        // The child's own page, read with the parent's token, offers no further children.
        let doc: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(doc["children"], json!({}));
        // Not a grandchild, not another agent's share, not the parent with the child's token.
        assert_eq!(snapshot(id(&grandchild), token.clone()).await.0, 401);
        assert_eq!(snapshot(id(&foreign), token.clone()).await.0, 401);
        let child_token = child.viewer_token.token.clone();
        assert_eq!(snapshot(id(&parent), child_token.clone()).await.0, 401);
        assert_eq!(snapshot(id(&child), child_token).await.0, 200);

        // Revoking the parent's viewers ends the child's reading through them too.
        owner
            .revoke_share(&id(&parent), Scope::Viewers)
            .await
            .unwrap();
        assert_eq!(snapshot(id(&child), token).await.0, 401);
    });
}

/// A text part's HTML as the snapshot document gives it: its segments, joined.
fn html_of(segments: &Value) -> String {
    segments
        .as_array()
        .unwrap_or_else(|| panic!("segments, not {segments}"))
        .iter()
        .map(|segment| segment.as_str().unwrap())
        .collect()
}
