//! The share page in a real browser: headless Chromium (Debian's package),
//! driven over the DevTools protocol.
//!
//! It opens a share link and sees the existing messages; ops appended over RPC
//! appear without a reload; when the writer leaves, its running tool call
//! shows as interrupted; after the viewers are revoked the open page says so,
//! and opening the link again shows a clear "no longer works" page.
//! Screenshots go to `target/test-screenshots/`.
//!
//! Without Chromium the test says it skipped; with `REQUIRE_BROWSER=1` (as in
//! CI) a missing browser is a failure instead.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use capsync_tests::client::{OpKind, OpSpec, Scope};
use capsync_tests::{TestServer, admin, agent, batch, run_local, sample_share};
use serde_json::{Value, json};
use tungstenite::{Message, WebSocket};

/// Longest wait for the page to reach a state.
const PATIENCE: Duration = Duration::from_secs(30);

fn find_chromium() -> Option<PathBuf> {
    let fixed = Path::new("/usr/bin/chromium");
    if fixed.exists() {
        return Some(fixed.to_owned());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
        .find(|candidate| candidate.exists())
}

/// A headless Chromium of our own, killed when dropped.
struct Browser {
    child: Child,
    /// The DevTools connection to the browser; pages are driven through sessions on it.
    devtools: WebSocket<TcpStream>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn launch(binary: &Path) -> Self {
        let profile = tempfile::tempdir().expect("profile dir");
        let mut child = Command::new(binary)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--no-first-run",
                "--no-default-browser-check",
                "--hide-scrollbars",
                "--window-size=1100,1400",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chromium");
        // Chromium prints its DevTools address on stderr once it listens.
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.split("DevTools listening on ").nth(1) {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let url = match rx.recv_timeout(PATIENCE) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                panic!("chromium did not report a DevTools address");
            }
        };
        let host = url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .expect("host:port")
            .to_owned();
        let stream = TcpStream::connect(&host).expect("connect to DevTools");
        stream
            .set_read_timeout(Some(PATIENCE))
            .expect("read timeout");
        let (devtools, _) = tungstenite::client(url.as_str(), stream).expect("DevTools handshake");
        Self {
            child,
            devtools,
            next_id: 0,
            _profile: profile,
        }
    }

    /// Sends a DevTools command (to a page when `session` is set) and returns its result.
    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            message["sessionId"] = session.into();
        }
        self.devtools
            .send(Message::Text(message.to_string().into()))
            .expect("send to DevTools");
        loop {
            let reply = self.devtools.read().expect("read from DevTools");
            let Message::Text(text) = reply else { continue };
            let reply: Value = serde_json::from_str(&text).expect("DevTools JSON");
            // Events (no id) and replies to others are not ours.
            if reply["id"] != id {
                continue;
            }
            if let Some(error) = reply.get("error") {
                panic!("{method} failed: {error}");
            }
            return reply["result"].clone();
        }
    }

    /// Opens a new tab at `url` and returns its session.
    fn open(&mut self, url: &str) -> Page {
        let target = self.call(None, "Target.createTarget", json!({"url": url}));
        let attached = self.call(
            None,
            "Target.attachToTarget",
            json!({"targetId": target["targetId"], "flatten": true}),
        );
        Page {
            session: attached["sessionId"].as_str().expect("session").to_owned(),
        }
    }

    /// The value of a JavaScript expression in `page`.
    fn eval(&mut self, page: &Page, expression: &str) -> Value {
        let result = self.call(
            Some(&page.session),
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true}),
        );
        result["result"]["value"].clone()
    }

    /// Saves a PNG of the whole page.
    fn screenshot(&mut self, page: &Page, name: &str) -> PathBuf {
        let metrics = self.call(Some(&page.session), "Page.getLayoutMetrics", json!({}));
        let size = &metrics["cssContentSize"];
        let clip = json!({
            "x": 0, "y": 0,
            "width": size["width"].as_f64().unwrap_or(1100.0),
            "height": size["height"].as_f64().unwrap_or(1400.0).min(6000.0),
            "scale": 1,
        });
        let shot = self.call(
            Some(&page.session),
            "Page.captureScreenshot",
            json!({"format": "png", "clip": clip, "captureBeyondViewport": true}),
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("image data"))
            .expect("base64 PNG");
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        let path = dir.join(name);
        std::fs::write(&path, png).expect("write screenshot");
        println!("screenshot: {}", path.display());
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Page {
    session: String,
}

fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent();
            workspace.expect("workspace root").join("target")
        });
    target.join("test-screenshots")
}

/// Polls `expression` in `page` until it is `true`, letting the test's RPC
/// connection run in between. Fails with what the page shows after `PATIENCE`.
async fn wait_for(browser: &mut Browser, page: &Page, what: &str, expression: &str) {
    let deadline = Instant::now() + PATIENCE;
    while browser.eval(page, expression) != Value::Bool(true) {
        if Instant::now() > deadline {
            let text = browser.eval(page, "document.body.innerText");
            panic!("the page never showed {what}; it shows:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn body_has(text: &str) -> String {
    format!("document.body.innerText.includes({})", json!(text))
}

const SESSION: &str = "ses_01JD4K7M2QX9A7TS1";

fn live_ops() -> Vec<OpSpec> {
    let user = "msg_01JD4K7M2QX9A7TS005";
    let assistant = "msg_01JD4K7M2QX9A7TS006";
    vec![
        OpSpec::new(
            "live:user",
            OpKind::MessageUpsert,
            json!({"id": user, "sessionID": SESSION, "role": "user", "time": {"created": 1763712100000_i64}}),
        ),
        OpSpec::new(
            "live:user:text",
            OpKind::PartUpsert,
            json!({"id": "prt_live_01", "messageID": user, "sessionID": SESSION, "type": "text",
                   "text": "Also add a regression test for mixed-case emails, please."}),
        ),
        OpSpec::new(
            "live:assistant",
            OpKind::MessageUpsert,
            json!({"id": assistant, "sessionID": SESSION, "role": "assistant", "modelID": "claude-sonnet-4",
                   "providerID": "anthropic", "time": {"created": 1763712101000_i64}}),
        ),
        OpSpec::new(
            "live:assistant:text",
            OpKind::PartUpsert,
            json!({"id": "prt_live_02", "messageID": assistant, "sessionID": SESSION, "type": "text",
                   "text": "Adding `test_login_mixed_case_email`"}),
        ),
        OpSpec::new(
            "live:assistant:delta",
            OpKind::PartDelta,
            json!({"partID": "prt_live_02", "messageID": assistant,
                   "delta": " and running the **whole suite** <script>window.pwned=1</script>."}),
        ),
        OpSpec::new(
            "live:assistant:tool",
            OpKind::PartUpsert,
            json!({"id": "prt_live_03", "messageID": assistant, "sessionID": SESSION, "type": "tool",
                   "tool": "bash", "callID": "call_live",
                   "state": {"status": "running", "input": {"command": "pytest -q", "description": "Run all tests"},
                             "title": "Run all tests"}}),
        ),
    ]
}

#[test]
fn the_share_page_in_a_real_browser() {
    let Some(chromium) = find_chromium() else {
        if std::env::var("REQUIRE_BROWSER").as_deref() == Ok("1") {
            panic!("REQUIRE_BROWSER=1 but no chromium is installed (Debian package: chromium)");
        }
        println!("skipped: no chromium; set REQUIRE_BROWSER=1 to fail");
        return;
    };
    let server = TestServer::start_with(|c| c.interrupted_after = Duration::from_secs(1));
    let http = server.http_addr();
    let mut browser = Browser::launch(&chromium);
    run_local(async {
        let (admin_conn, admin) = admin(&server).await;
        // The agent (and with it the share's writer) on a connection of its own,
        // so it can go away while the admin stays.
        let agent_conn = capsync_tests::client::connect(server.addr()).await.unwrap();
        let (agent, _) = agent(&agent_conn, &admin).await;
        let created = sample_share(&agent).await;
        let share = created.info.state.share_id.clone();
        let link = format!("http://{http}/s/{share}#{}", created.viewer_token.token);

        // 1. The link shows the session as it is.
        let page = browser.open(&link);
        wait_for(
            &mut browser,
            &page,
            "the sample session, live",
            "document.querySelectorAll('article.message').length === 4 && \
             document.getElementById('status').textContent === 'live'",
        )
        .await;
        for text in [
            "Fix 500 on login with uppercase email",
            "Login fails with a 500 when the email has uppercase letters",
            "Claude Sonnet 4",
            "2 files changed",
            "Agent connected",
        ] {
            assert_eq!(browser.eval(&page, &body_has(text)), true, "{text}");
        }
        // Markdown of text parts is rendered (inline code), tool calls show name and status.
        assert_eq!(
            browser.eval(&page, "[...document.querySelectorAll('.markdown code')].some(c => c.textContent === 'find_user_by_email')"),
            true
        );
        assert_eq!(
            browser.eval(
                &page,
                "[...document.querySelectorAll('.tool-name')].map(t => t.textContent).join(',')"
            ),
            "grep,read,edit,bash,edit,bash"
        );
        browser.screenshot(&page, "01-share-page.png");

        // 2. Ops appended over RPC appear without a reload.
        assert_eq!(browser.eval(&page, "window.__sameDocument = true"), true);
        let ack = created
            .writer
            .append(&batch("live", live_ops()))
            .await
            .unwrap();
        assert_eq!(ack.applied(), 6);
        wait_for(
            &mut browser,
            &page,
            "the appended messages",
            &format!(
                "{} && {}",
                body_has("Also add a regression test for mixed-case emails"),
                body_has("running the whole suite")
            ),
        )
        .await;
        assert_eq!(
            browser.eval(&page, "window.__sameDocument === true"),
            true,
            "no reload"
        );
        assert_eq!(
            browser.eval(&page, "document.querySelectorAll('article.message').length"),
            6
        );
        // The delta's markdown is rendered; its script is text, and never ran.
        assert_eq!(
            browser.eval(&page, "document.querySelector('[data-id=msg_01JD4K7M2QX9A7TS006] .markdown strong').textContent"),
            "whole suite"
        );
        assert_eq!(
            browser.eval(&page, &body_has("<script>window.pwned=1</script>")),
            true
        );
        assert_eq!(browser.eval(&page, "window.pwned === undefined"), true);
        assert_eq!(
            browser.eval(&page, "document.querySelector('.badge.running') !== null"),
            true
        );
        browser.screenshot(&page, "02-live-update.png");

        // 3. The writer goes away: its running tool call shows as interrupted.
        drop(created.writer);
        drop(agent);
        drop(agent_conn);
        wait_for(
            &mut browser,
            &page,
            "the writer gone and the tool call interrupted",
            &format!(
                "{} && document.querySelector('.badge.interrupted') !== null",
                body_has("Agent not connected")
            ),
        )
        .await;
        browser.screenshot(&page, "03-writer-gone.png");

        // 4. Revoked: the open page stops and says so.
        admin.revoke_share(&share, Scope::Viewers).await.unwrap();
        wait_for(
            &mut browser,
            &page,
            "the revoked state",
            "document.getElementById('status').textContent === 'link revoked' && \
             !document.getElementById('banner').hidden",
        )
        .await;
        assert_eq!(
            browser.eval(&page, &body_has("This link was revoked or has expired")),
            true
        );
        browser.screenshot(&page, "04-revoked-open-page.png");

        // 5. Opening the revoked link shows a clear page, not an error dump.
        let again = browser.open(&link);
        wait_for(
            &mut browser,
            &again,
            "the no-longer-works page",
            &body_has("This link no longer works"),
        )
        .await;
        browser.screenshot(&again, "05-revoked-link.png");
        drop(admin_conn);
    });
}
