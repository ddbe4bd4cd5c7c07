//! Headless Chromium (Debian's package) driven over the DevTools protocol: what the
//! browser tests (`tests/browser.rs`, the real-opencode page in `tests/opencode.rs`) share.
//! Included into each with `#[path]`, as it needs the dev-dependencies.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use tungstenite::{Message, WebSocket};

/// Longest wait for the page to reach a state.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Chromium, or `None` when the test should skip (it panics instead under
/// `REQUIRE_BROWSER=1`).
pub fn chromium_or_skip() -> Option<PathBuf> {
    let found = find_chromium();
    if found.is_none() {
        if std::env::var("REQUIRE_BROWSER").as_deref() == Ok("1") {
            panic!("REQUIRE_BROWSER=1 but no chromium is installed (Debian package: chromium)");
        }
        println!("skipped: no chromium; set REQUIRE_BROWSER=1 to fail");
    }
    found
}

pub fn find_chromium() -> Option<PathBuf> {
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
pub struct Browser {
    child: Child,
    /// The DevTools connection to the browser; pages are driven through sessions on it.
    devtools: WebSocket<TcpStream>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub fn launch(binary: &Path) -> Self {
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
    pub fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
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
    pub fn open(&mut self, url: &str) -> Page {
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
    pub fn eval(&mut self, page: &Page, expression: &str) -> Value {
        let result = self.call(
            Some(&page.session),
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true}),
        );
        result["result"]["value"].clone()
    }

    /// Saves a PNG of the whole page.
    pub fn screenshot(&mut self, page: &Page, name: &str) -> PathBuf {
        let metrics = self.call(Some(&page.session), "Page.getLayoutMetrics", json!({}));
        let size = &metrics["cssContentSize"];
        let clip = json!({
            "x": 0, "y": 0,
            "width": size["width"].as_f64().unwrap_or(1100.0),
            "height": size["height"].as_f64().unwrap_or(1400.0).min(8000.0),
            "scale": 1,
        });
        self.capture(page, clip, name)
    }

    /// Saves a PNG of what the window shows, as the reader sees it.
    pub fn screenshot_of_window(&mut self, page: &Page, name: &str) -> PathBuf {
        let size = self.eval(
            page,
            "({width: innerWidth, height: innerHeight, y: scrollY})",
        );
        let clip = json!({
            "x": 0, "y": size["y"], "width": size["width"], "height": size["height"], "scale": 1,
        });
        self.capture(page, clip, name)
    }

    /// Saves a PNG of the first element matching `selector`, with a margin.
    pub fn screenshot_of(&mut self, page: &Page, selector: &str, name: &str) -> PathBuf {
        let rect = self.eval(
            page,
            &format!(
                "(() => {{ const r = document.querySelector({}).getBoundingClientRect(); \
                 return {{x: r.left + scrollX, y: r.top + scrollY, width: r.width, height: r.height}}; }})()",
                json!(selector)
            ),
        );
        let at = |key: &str| rect[key].as_f64().unwrap_or(0.0);
        let clip = json!({
            "x": (at("x") - 8.0).max(0.0), "y": (at("y") - 8.0).max(0.0),
            "width": at("width") + 16.0, "height": at("height") + 16.0, "scale": 1,
        });
        self.capture(page, clip, name)
    }

    pub fn capture(&mut self, page: &Page, clip: Value, name: &str) -> PathBuf {
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

pub struct Page {
    session: String,
}

pub fn screenshot_dir() -> PathBuf {
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
pub async fn wait_for(browser: &mut Browser, page: &Page, what: &str, expression: &str) {
    let deadline = Instant::now() + PATIENCE;
    while browser.eval(page, expression) != Value::Bool(true) {
        if Instant::now() > deadline {
            let text = browser.eval(page, "document.body.innerText");
            panic!("the page never showed {what}; it shows:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
