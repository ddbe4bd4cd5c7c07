//! The real, unmodified opencode (npm package `opencode-ai`, pinned in
//! `tests/opencode/package.json`) driven offline against a [`FakeLlm`]: `opencode serve` in
//! a temporary git project with its own HOME, sessions prompted through its HTTP API,
//! shared and unshared with the share server at `enterprise.url`, and the one-shot
//! commands (`export`, `import`, `run --share`) run with the same HOME and config.
//!
//! Offline means: the model is the fake on `127.0.0.1`; models.dev, auto-update and LSP
//! downloads are off (`OPENCODE_DISABLE_*`); npm runs offline (`npm_config_offline`), since
//! opencode otherwise installs `@opencode-ai/plugin` into its config directory from the
//! registry in the background; without an `enterprise.url` sharing is disabled, so no
//! share ever reaches opncd.ai. The environment is cleared first, so nothing of the
//! caller's own opencode or git setup leaks in.
//!
//! opencode's stdout and stderr (with its log, `--print-logs`) are kept; every failure here
//! panics with their tail, and so does dropping an [`OpenCode`] while a test panics.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fake_llm::{CODING_FILE, CODING_FILE_BEFORE, FakeLlm};

/// The opencode version `tests/opencode/package.json` pins (and `GET /global/health` reports).
pub const PINNED_VERSION: &str = "1.18.33";
/// How to install it, for skip and failure messages.
pub const INSTALL_HINT: &str = "npm install --prefix tests/opencode --no-save";
/// The provider and model ids the generated config gives the fake LLM.
pub const PROVIDER_ID: &str = "fake";
pub const MODEL_ID: &str = "fake-model";

/// Longest wait for opencode to start, answer a request or finish a command.
const PATIENCE: Duration = Duration::from_secs(60);
/// Longest wait for a prompt's whole agent loop (several model turns and tools).
const PROMPT_PATIENCE: Duration = Duration::from_secs(180);
/// Output lines kept per opencode process: enough for a failure's context.
const KEPT_LINES: usize = 4000;
/// Lines of output a failure message shows.
const TAIL_LINES: usize = 80;

/// The opencode binary: `CAPSYNC_OPENCODE_BIN`, else the pinned install in
/// `tests/opencode/node_modules`; `None` when neither is there.
pub fn binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CAPSYNC_OPENCODE_BIN") {
        let path = PathBuf::from(path);
        // Naming a binary that is not there is a mistake, not a reason to skip.
        assert!(
            path.exists(),
            "CAPSYNC_OPENCODE_BIN={} does not exist",
            path.display()
        );
        return Some(path);
    }
    let pinned = Path::new(env!("CARGO_MANIFEST_DIR")).join("opencode/node_modules/.bin/opencode");
    pinned.exists().then_some(pinned)
}

/// [`binary`] for a test: `None` after printing that the test skipped, unless
/// `REQUIRE_OPENCODE=1` (as in CI), where a missing opencode fails instead.
pub fn binary_or_skip() -> Option<PathBuf> {
    let found = binary();
    if found.is_none() {
        if std::env::var("REQUIRE_OPENCODE").as_deref() == Ok("1") {
            panic!("REQUIRE_OPENCODE=1 but opencode is not installed ({INSTALL_HINT})");
        }
        println!(
            "skipped: opencode not installed ({INSTALL_HINT}); set REQUIRE_OPENCODE=1 to fail"
        );
    }
    found
}

/// An HTTP answer from opencode's API that was not a success.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub body: String,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HTTP {}: {}", self.status, self.body)
    }
}

impl std::error::Error for ApiError {}

/// A finished one-shot opencode command.
#[derive(Debug, Clone)]
pub struct CommandOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// What `opencode run` did.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// The session it created (from its JSON events).
    pub session_id: Option<String>,
    /// The share link it printed (on stderr), when it shared.
    pub share_url: Option<String>,
    /// Its `--format json` events, one per stdout line (`step_start`, `text`, `tool_use`, …).
    pub events: Vec<Value>,
    pub output: CommandOutput,
}

/// A prompt sent with [`OpenCode::prompt_async`], to wait for with [`OpenCode::wait_reply`].
#[derive(Debug, Clone)]
pub struct PendingPrompt {
    pub session_id: String,
    /// Messages the session had before the prompt: the reply comes after them.
    messages_before: usize,
}

/// Configures an [`OpenCode`] before it starts.
#[derive(Debug, Clone)]
pub struct OpenCodeBuilder {
    binary: PathBuf,
    llm_base_url: String,
    enterprise_url: Option<String>,
    /// Project files (relative path → contents), committed before opencode starts.
    files: BTreeMap<PathBuf, String>,
    /// Merged over the generated config, objects key by key.
    config: Value,
    /// More environment for every opencode process (and what they start).
    extra_env: Vec<(String, String)>,
    /// Commands run in the project, with opencode's environment, before it starts.
    setup: Vec<(PathBuf, Vec<String>)>,
}

impl OpenCodeBuilder {
    /// The share server (`enterprise.url`, e.g. `http://127.0.0.1:PORT`). Without one,
    /// sharing is disabled (`"share": "disabled"`).
    pub fn enterprise_url(mut self, url: impl Into<String>) -> Self {
        self.enterprise_url = Some(url.into());
        self
    }

    /// A file in the project (besides [`CODING_FILE`], which the default script edits).
    pub fn file(mut self, path: impl Into<PathBuf>, contents: impl Into<String>) -> Self {
        self.files.insert(path.into(), contents.into());
        self
    }

    /// Config merged over the generated `opencode.json` (objects merge key by key).
    pub fn config(mut self, extra: Value) -> Self {
        merge(&mut self.config, extra);
        self
    }

    /// An environment variable for every opencode process, and so for what they start.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra_env.push((key.into(), value.into()));
        self
    }

    /// Runs `program args` in the committed project, with opencode's environment, before
    /// opencode starts (`capsync opencode install --project .`); it must succeed.
    pub fn setup(mut self, program: impl Into<PathBuf>, args: &[&str]) -> Self {
        self.setup.push((
            program.into(),
            args.iter().map(|a| (*a).to_owned()).collect(),
        ));
        self
    }

    pub fn start(self) -> OpenCode {
        OpenCode::start_with(self)
    }
}

/// A running `opencode serve` with its own project and HOME. Dropping it kills opencode
/// (and whatever it started) and deletes both.
pub struct OpenCode {
    binary: PathBuf,
    /// `http://127.0.0.1:PORT`, where opencode said it listens.
    url: String,
    project: PathBuf,
    home: PathBuf,
    /// The environment every opencode process here gets (and nothing else).
    env: Vec<(String, String)>,
    child: Mutex<Child>,
    /// The server's stdout and stderr, interleaved, newest last.
    transcript: Transcript,
    http: ureq::Agent,
    /// Holds the project and HOME; deleted after opencode is killed.
    _root: tempfile::TempDir,
}

impl OpenCode {
    /// opencode with the fake LLM as its model, sharing disabled.
    pub fn start(binary: &Path, llm: &FakeLlm) -> Self {
        Self::builder(binary, llm).start()
    }

    pub fn builder(binary: &Path, llm: &FakeLlm) -> OpenCodeBuilder {
        OpenCodeBuilder {
            binary: binary.to_owned(),
            llm_base_url: llm.base_url(),
            enterprise_url: None,
            files: BTreeMap::from([(PathBuf::from(CODING_FILE), CODING_FILE_BEFORE.to_owned())]),
            config: json!({}),
            extra_env: Vec::new(),
            setup: Vec::new(),
        }
    }

    fn start_with(builder: OpenCodeBuilder) -> Self {
        let root = tempfile::Builder::new()
            .prefix("capsync-opencode-")
            .tempdir()
            .expect("temp dir");
        let home = root.path().join("home");
        let project = root.path().join("project");
        let tmp = root.path().join("tmp");
        for dir in [&home, &project, &tmp] {
            std::fs::create_dir_all(dir).expect("create dir");
        }
        let mut env = environment(&home, &tmp);
        env.extend(builder.extra_env.iter().cloned());
        write_config(&home, &builder);
        init_project(&project, &builder.files, &env);
        for (program, args) in &builder.setup {
            let out = Command::new(program)
                .args(args)
                .current_dir(&project)
                .env_clear()
                .envs(env.iter().map(|(k, v)| (k, v)))
                .output()
                .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
            assert!(
                out.status.success(),
                "{} {args:?}: {}\n{}",
                program.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }

        let mut command = Command::new(&builder.binary);
        // Port 0: opencode tries its default 4096, else takes a free one, and says which.
        command.args([
            "serve",
            "--hostname",
            "127.0.0.1",
            "--port",
            "0",
            "--print-logs",
            "--log-level",
            "INFO",
        ]);
        let transcript = Transcript::default();
        let (mut child, listening) = spawn(command, &project, &env, &transcript);
        let url = match listening.recv_timeout(PATIENCE) {
            Ok(url) => url,
            Err(e) => {
                let _ = kill_tree(&mut child);
                panic!(
                    "opencode serve did not say where it listens ({e}):\n{}",
                    transcript.tail(TAIL_LINES)
                );
            }
        };
        let http = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(PATIENCE))
            .build()
            .into();
        let opencode = Self {
            binary: builder.binary,
            url,
            project,
            home,
            env,
            child: Mutex::new(child),
            transcript,
            http,
            _root: root,
        };
        opencode.wait_ready();
        opencode
    }

    /// Polls until opencode answers, with its instance for the project booted.
    fn wait_ready(&self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            // Short per-request limits: a request that arrives while opencode is still
            // starting can go unanswered for good, so it is abandoned and sent again.
            let health = self.call("GET", "/global/health", None, Duration::from_secs(5));
            if let Ok((200, body)) = &health {
                let health: Value = serde_json::from_str(body).unwrap_or_default();
                if health["version"] != PINNED_VERSION {
                    let message = format!(
                        "{} is opencode {}, the tests pin {PINNED_VERSION} ({INSTALL_HINT})",
                        self.binary.display(),
                        health["version"]
                    );
                    // A binary of one's own choosing may be another version on purpose.
                    if std::env::var_os("CAPSYNC_OPENCODE_BIN").is_none() {
                        self.fail(message);
                    }
                    eprintln!("warning: {message}");
                }
                // The first project-scoped request boots the instance (config, git, plugins).
                if let Ok((200, _)) = self.call("GET", "/path", None, PATIENCE) {
                    return;
                }
            }
            if Instant::now() > deadline {
                self.fail(format!("opencode did not become ready: {health:?}"));
            }
            self.assert_running();
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Ends `opencode serve` (SIGKILL to its process group; what it started in a
    /// session of its own lives on). Its API answers nothing afterwards; one-shot commands
    /// still run.
    pub fn stop_serve(&self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let _ = kill_tree(&mut child);
    }

    /// Where opencode's HTTP API is: `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The git project opencode works in (its bash and edit tools act here).
    pub fn project_dir(&self) -> &Path {
        &self.project
    }

    /// opencode's HOME; its config is `.config/opencode/opencode.json`, its data (the
    /// SQLite database, snapshots) under `.local/share/opencode`.
    pub fn home_dir(&self) -> &Path {
        &self.home
    }

    /// The last `lines` lines opencode serve printed (its log included).
    pub fn transcript_tail(&self, lines: usize) -> String {
        self.transcript.tail(lines)
    }

    /// Any API call: the status and the JSON body (`Value::Null` when there is none, a
    /// string when it is not JSON).
    pub fn request(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        match self.call(method, path, body, PATIENCE) {
            Ok((status, text)) => (status, parse_body(&text)),
            Err(e) => self.fail(format!("{method} {path}: {e}")),
        }
    }

    /// A new session (`POST /session`); its id.
    pub fn create_session(&self) -> String {
        let session = self.ok("POST", "/session", Some(&json!({})), PATIENCE);
        session["id"].as_str().expect("session id").to_owned()
    }

    /// Sends `text` and waits for the agent to finish (`POST /session/{id}/message` answers
    /// only then): the last assistant message, `{"info", "parts"}`. Fails if it has an error.
    pub fn prompt(&self, session_id: &str, text: &str) -> Value {
        let reply = self.ok(
            "POST",
            &format!("/session/{session_id}/message"),
            Some(&prompt_body(text)),
            PROMPT_PATIENCE,
        );
        if let Some(error) = reply["info"].get("error") {
            self.fail(format!("the prompt ended with an error: {error}"));
        }
        reply
    }

    /// Sends `text` without waiting (`POST /session/{id}/prompt_async`, `204`).
    pub fn prompt_async(&self, session_id: &str, text: &str) -> PendingPrompt {
        let messages_before = self.messages(session_id).as_array().map_or(0, Vec::len);
        let path = format!("/session/{session_id}/prompt_async");
        match self.call("POST", &path, Some(&prompt_body(text)), PATIENCE) {
            Ok((204 | 200, _)) => {}
            other => self.fail(format!("POST {path}: {other:?}")),
        }
        PendingPrompt {
            session_id: session_id.to_owned(),
            messages_before,
        }
    }

    /// Waits until the agent has answered `pending` and stopped: the last assistant message.
    /// (`GET /session/status` alone cannot tell: right after `prompt_async` the session is
    /// not busy yet.)
    pub fn wait_reply(&self, pending: &PendingPrompt) -> Value {
        let id = &pending.session_id;
        self.wait_until(&format!("the reply in {id}"), PROMPT_PATIENCE, || {
            let (_, status) = self.request("GET", "/session/status", None);
            if status.get(id.as_str()).is_some() {
                return None; // busy or retrying
            }
            let messages = self.messages(id);
            let new = messages.as_array()?.get(pending.messages_before..)?;
            let last = new.last()?;
            // opencode's own loop stops on an assistant finish other than these.
            let done = last["info"]["role"] == "assistant"
                && last["info"]["time"]["completed"].is_number()
                && !matches!(
                    last["info"]["finish"].as_str(),
                    None | Some("tool-calls" | "unknown")
                );
            done.then(|| last.clone())
        })
    }

    /// `GET /session/{id}`.
    pub fn session(&self, session_id: &str) -> Value {
        self.ok("GET", &format!("/session/{session_id}"), None, PATIENCE)
    }

    /// `GET /session/{id}/message`: every message with its parts.
    pub fn messages(&self, session_id: &str) -> Value {
        self.ok(
            "GET",
            &format!("/session/{session_id}/message"),
            None,
            PATIENCE,
        )
    }

    /// Polls the session until `done` holds for it (at most a minute); the session then.
    pub fn wait_for_session(
        &self,
        session_id: &str,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        self.wait_until(what, PATIENCE, || {
            let session = self.session(session_id);
            done(&session).then_some(session)
        })
    }

    /// Shares the session (`POST /session/{id}/share`): the URL opencode got from the
    /// share server. Fails the test if opencode could not share.
    pub fn share(&self, session_id: &str) -> String {
        self.try_share(session_id)
            .unwrap_or_else(|e| self.fail(format!("sharing {session_id}: {e}")))
    }

    /// [`Self::share`], returning opencode's answer when it fails (it answers `500
    /// {"_tag":"InternalServerError"}` whatever went wrong with the share server).
    pub fn try_share(&self, session_id: &str) -> Result<String, ApiError> {
        let session = self.try_ok("POST", &format!("/session/{session_id}/share"), None)?;
        Ok(session["share"]["url"]
            .as_str()
            .unwrap_or_else(|| self.fail(format!("shared, but no share URL: {session}")))
            .to_owned())
    }

    /// Unshares the session (`DELETE /session/{id}/share`): the session as opencode then
    /// returns it.
    pub fn unshare(&self, session_id: &str) -> Value {
        self.try_unshare(session_id)
            .unwrap_or_else(|e| self.fail(format!("unsharing {session_id}: {e}")))
    }

    pub fn try_unshare(&self, session_id: &str) -> Result<Value, ApiError> {
        self.try_ok("DELETE", &format!("/session/{session_id}/share"), None)
    }

    /// `opencode export <id>`: the session as opencode holds it, `{"info", "messages":
    /// [{"info", "parts"}]}`.
    pub fn export(&self, session_id: &str) -> Value {
        let out = self.command(&["export", session_id]);
        if !out.status.success() {
            self.fail(format!("opencode export failed: {out:?}"));
        }
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
            self.fail(format!("opencode export printed no JSON ({e}): {out:?}"))
        })
    }

    /// The session as the running `opencode serve` answers it, in the shape of
    /// [`Self::export`] (`opencode export` reads the same two things: the session and its
    /// messages with their parts). Two HTTP calls where `export` starts a process that costs
    /// seconds of CPU: for checks that poll.
    pub fn export_live(&self, session_id: &str) -> Value {
        json!({
            "info": self.session(session_id),
            "messages": self.messages(session_id),
        })
    }

    /// `opencode import <url>` into this project: the id of the imported session.
    pub fn import(&self, url: &str) -> String {
        self.try_import(url)
            .unwrap_or_else(|out| self.fail(format!("opencode import {url} failed: {out:?}")))
    }

    /// [`Self::import`], with the command's output when it fails. opencode exits 0 on most
    /// failures (`Share not found or empty: …`, `Invalid URL format. …`, `Failed to fetch
    /// share data: …`), so success is its `Imported session: <id>` line.
    pub fn try_import(&self, url: &str) -> Result<String, CommandOutput> {
        let out = self.command(&["import", url]);
        let imported = out
            .stdout
            .lines()
            .find_map(|line| line.trim().strip_prefix("Imported session: "))
            .map(str::to_owned);
        match imported {
            Some(id) if out.status.success() => Ok(id),
            _ => Err(out),
        }
    }

    /// `opencode run --format json [--share] <prompt>`: a one-shot agent run in this project,
    /// with its own in-process server (the `serve` one keeps running).
    pub fn run(&self, prompt: &str, share: bool) -> RunOutcome {
        let mut args = vec!["run", "--format", "json"];
        if share {
            args.push("--share");
        }
        args.push(prompt);
        let output = self.command_with(&args, PROMPT_PATIENCE);
        if !output.status.success() {
            self.fail(format!("opencode run failed: {output:?}"));
        }
        let events: Vec<Value> = output
            .stdout
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect();
        let session_id = events
            .iter()
            .find_map(|e| e["sessionID"].as_str())
            .map(str::to_owned);
        // The link goes to stderr, styled: `~  http://host/share/<slug>`.
        let share_url = strip_ansi(&output.stderr)
            .split_whitespace()
            .find(|word| word.starts_with("http") && word.contains("/share/"))
            .map(str::to_owned);
        RunOutcome {
            session_id,
            share_url,
            events,
            output,
        }
    }

    /// Runs `opencode <args>` in the project with this HOME and config, at most a minute.
    pub fn command(&self, args: &[&str]) -> CommandOutput {
        self.command_with(args, PATIENCE)
    }

    fn command_with(&self, args: &[&str], patience: Duration) -> CommandOutput {
        let mut command = Command::new(&self.binary);
        command.args(args);
        let transcript = Transcript::default();
        let (child, _) = spawn(command, &self.project, &self.env, &transcript);
        let pid = rustix::process::Pid::from_child(&child);
        let (done, finished) = mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let mut child = child;
            let _ = done.send(child.wait());
        });
        let status = match finished.recv_timeout(patience) {
            Ok(status) => status.expect("wait for opencode"),
            Err(_) => {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
                let _ = waiter.join();
                self.fail(format!(
                    "opencode {} took longer than {patience:?}:\n{}",
                    args.join(" "),
                    transcript.tail(TAIL_LINES)
                ));
            }
        };
        let _ = waiter.join();
        // Anything it left running would hold its pipes open.
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        transcript.wait_closed();
        CommandOutput {
            status,
            stdout: transcript.stream(Stream::Stdout),
            stderr: transcript.stream(Stream::Stderr),
        }
    }

    /// One HTTP call: the status and body text, or why there is none.
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        patience: Duration,
    ) -> Result<(u16, String), ureq::Error> {
        let url = format!("{}{path}", self.url);
        let mut response = match method {
            "GET" => self
                .http
                .get(&url)
                .config()
                .timeout_global(Some(patience))
                .build()
                .call()?,
            "DELETE" => self
                .http
                .delete(&url)
                .config()
                .timeout_global(Some(patience))
                .build()
                .call()?,
            _ => {
                let request = match method {
                    "POST" => self.http.post(&url),
                    "PATCH" => self.http.patch(&url),
                    "PUT" => self.http.put(&url),
                    other => panic!("unsupported method {other}"),
                };
                request
                    .config()
                    .timeout_global(Some(patience))
                    .build()
                    .header("content-type", "application/json")
                    .send(body.map_or_else(String::new, Value::to_string))?
            }
        };
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string()?;
        Ok((status, text))
    }

    /// A call that must answer `200` with JSON.
    fn ok(&self, method: &str, path: &str, body: Option<&Value>, patience: Duration) -> Value {
        match self.call(method, path, body, patience) {
            Ok((200, text)) => parse_body(&text),
            other => self.fail(format!("{method} {path}: {other:?}")),
        }
    }

    /// A call answering `200` with JSON, or its failure as opencode answered it.
    fn try_ok(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, ApiError> {
        match self.call(method, path, body, PATIENCE) {
            Ok((200, text)) => Ok(parse_body(&text)),
            Ok((status, body)) => Err(ApiError { status, body }),
            Err(e) => self.fail(format!("{method} {path}: {e}")),
        }
    }

    /// Polls `check` until it gives a value, for at most `patience`.
    fn wait_until<T>(&self, what: &str, patience: Duration, check: impl Fn() -> Option<T>) -> T {
        let deadline = Instant::now() + patience;
        loop {
            if let Some(value) = check() {
                return value;
            }
            if Instant::now() > deadline {
                self.fail(format!("waited {patience:?} for {what}"));
            }
            self.assert_running();
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn assert_running(&self) {
        let exited = self
            .child
            .lock()
            .expect("child lock")
            .try_wait()
            .expect("opencode status");
        if let Some(status) = exited {
            self.fail(format!("opencode serve exited ({status})"));
        }
    }

    /// Panics with `what` and the tail of opencode's output.
    fn fail(&self, what: impl fmt::Display) -> ! {
        panic!(
            "{what}\n--- opencode serve, last {TAIL_LINES} lines ---\n{}",
            self.transcript.tail(TAIL_LINES)
        )
    }
}

impl Drop for OpenCode {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- opencode serve at {}, last {TAIL_LINES} lines ---\n{}",
                self.url,
                self.transcript.tail(TAIL_LINES)
            );
        }
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = kill_tree(child);
    }
}

/// The whole environment of an opencode process (see the module doc).
fn environment(home: &Path, tmp: &Path) -> Vec<(String, String)> {
    let path = |p: &Path| p.to_str().expect("UTF-8 temp path").to_owned();
    let mut env = vec![
        ("HOME", path(home)),
        ("XDG_CONFIG_HOME", path(&home.join(".config"))),
        ("XDG_DATA_HOME", path(&home.join(".local/share"))),
        ("XDG_CACHE_HOME", path(&home.join(".cache"))),
        ("XDG_STATE_HOME", path(&home.join(".local/state"))),
        ("TMPDIR", path(tmp)),
        ("LANG", "C.UTF-8".to_owned()),
        ("OPENCODE_DISABLE_AUTOUPDATE", "1".to_owned()),
        ("OPENCODE_DISABLE_MODELS_FETCH", "1".to_owned()),
        ("OPENCODE_DISABLE_LSP_DOWNLOAD", "1".to_owned()),
        ("npm_config_offline", "true".to_owned()),
        ("NO_COLOR", "1".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect::<Vec<_>>();
    // The bash tool needs a shell and the usual commands; opencode needs git.
    env.push((
        "PATH".to_owned(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".to_owned()),
    ));
    env
}

/// Writes `$XDG_CONFIG_HOME/opencode/opencode.json`, outside the project so the agent's
/// tools and `git status` do not see it.
fn write_config(home: &Path, builder: &OpenCodeBuilder) {
    let mut config = json!({
        "$schema": "https://opencode.ai/config.json",
        "model": format!("{PROVIDER_ID}/{MODEL_ID}"),
        "provider": {
            PROVIDER_ID: {
                "npm": "@ai-sdk/openai-compatible",
                "name": "Fake LLM",
                "options": {"baseURL": builder.llm_base_url, "apiKey": "fake-key"},
                "models": {MODEL_ID: {"name": "Fake model"}},
            },
        },
        // The tools run without asking: nobody is there to answer.
        "permission": {"bash": "allow", "edit": "allow"},
    });
    match &builder.enterprise_url {
        Some(url) => config["enterprise"] = json!({"url": url}),
        None => config["share"] = json!("disabled"),
    }
    merge(&mut config, builder.config.clone());
    let dir = home.join(".config/opencode");
    std::fs::create_dir_all(&dir).expect("config dir");
    std::fs::write(
        dir.join("opencode.json"),
        serde_json::to_string_pretty(&config).expect("config JSON"),
    )
    .expect("write opencode.json");
}

/// A git repository with `files` committed: opencode keys its project by the first commit
/// and snapshots changes (patch parts, diffs) with git.
fn init_project(project: &Path, files: &BTreeMap<PathBuf, String>, env: &[(String, String)]) {
    for (path, contents) in files {
        let path = project.join(path);
        std::fs::create_dir_all(path.parent().expect("file in the project")).expect("mkdir");
        std::fs::write(path, contents).expect("write project file");
    }
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args([
                "-c",
                "user.name=capsync tests",
                "-c",
                "user.email=tests@capsync.invalid",
                "-c",
                "init.defaultBranch=main",
                "-c",
                "commit.gpgsign=false",
            ])
            .args(args)
            .current_dir(project)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("git is needed (opencode needs it too)");
        assert!(out.status.success(), "git {args:?}: {out:?}");
    };
    git(&["init", "--quiet"]);
    git(&["add", "--all"]);
    git(&["commit", "--quiet", "--allow-empty", "-m", "initial"]);
}

/// Starts `command` in its own process group with `env` only, its output going to
/// `transcript`; the receiver gets the URL of a "listening on" line.
fn spawn(
    mut command: Command,
    dir: &Path,
    env: &[(String, String)],
    transcript: &Transcript,
) -> (Child, mpsc::Receiver<String>) {
    command
        .current_dir(dir)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, so killing it also ends the shells and git it started.
        .process_group(0);
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("start {command:?}: {e}"));
    let (listening, url) = mpsc::channel();
    transcript.read(
        child.stdout.take().expect("stdout"),
        Stream::Stdout,
        Some(listening),
    );
    transcript.read(child.stderr.take().expect("stderr"), Stream::Stderr, None);
    (child, url)
}

/// Kills the process group of `child`, then reaps it.
fn kill_tree(child: &mut Child) -> std::io::Result<ExitStatus> {
    // Reaped already: its process group id may belong to someone else by now.
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    let pid = rustix::process::Pid::from_child(child);
    if rustix::process::kill_process_group(pid, rustix::process::Signal::KILL).is_err() {
        let _ = child.kill();
    }
    child.wait()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

/// A process's output lines, both streams, in the order they were read.
#[derive(Clone, Default)]
struct Transcript {
    lines: Arc<Mutex<VecDeque<(Stream, String)>>>,
    /// Reader threads, joined by [`Transcript::wait_closed`].
    readers: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>>,
}

impl Transcript {
    fn read(
        &self,
        pipe: impl Read + Send + 'static,
        stream: Stream,
        listening: Option<mpsc::Sender<String>>,
    ) {
        let lines = self.lines.clone();
        let reader = std::thread::spawn(move || {
            let mut listening = listening;
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Some(url) = line.split("listening on ").nth(1)
                    && let Some(tx) = listening.take()
                {
                    let _ = tx.send(url.trim().to_owned());
                }
                let mut lines = lines.lock().expect("transcript lock");
                if lines.len() == KEPT_LINES {
                    lines.pop_front();
                }
                lines.push_back((stream, line));
            }
        });
        self.readers.lock().expect("readers lock").push(reader);
    }

    /// Waits until both pipes are closed, so the transcript is complete.
    fn wait_closed(&self) {
        let readers = std::mem::take(&mut *self.readers.lock().expect("readers lock"));
        for reader in readers {
            let _ = reader.join();
        }
    }

    fn stream(&self, stream: Stream) -> String {
        let lines = self.lines.lock().expect("transcript lock");
        let mut text = String::new();
        for (_, line) in lines.iter().filter(|(s, _)| *s == stream) {
            text.push_str(line);
            text.push('\n');
        }
        text
    }

    fn tail(&self, n: usize) -> String {
        let lines = self.lines.lock().expect("transcript lock");
        let skip = lines.len().saturating_sub(n);
        lines
            .iter()
            .skip(skip)
            .map(|(_, line)| line.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn prompt_body(text: &str) -> Value {
    json!({"parts": [{"type": "text", "text": text}]})
}

fn parse_body(text: &str) -> Value {
    if text.is_empty() {
        return Value::Null;
    }
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

/// Merges `extra` into `base`: objects key by key, anything else replaced.
fn merge(base: &mut Value, extra: Value) {
    match (base, extra) {
        (Value::Object(base), Value::Object(extra)) => {
            for (key, value) in extra {
                merge(base.entry(key).or_insert(Value::Null), value);
            }
        }
        (base, extra) => *base = extra,
    }
}

/// `text` without terminal escape sequences (`ESC [ … letter`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // Skip the `[`, the parameters and the final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
