//! The share page in a real browser: headless Chromium (Debian's package),
//! driven over the DevTools protocol.
//!
//! It opens a share link and sees the existing messages; ops appended over RPC
//! appear without a reload (a part sent before its message too); when the
//! writer leaves, its running tool call shows as interrupted; after the viewers
//! are revoked the open page says so, and opening the link again shows a clear
//! "no longer works" page.
//!
//! A second test pushes a session holding every part type opencode 1.18
//! produces (`tests/fixtures/every-part.json`, through `capsync push`) and
//! checks each one's view, the totals, that the page opens at the top, and
//! that it follows new activity only for a reader at the end.
//! Screenshots go to `target/test-screenshots/`.
//!
//! Without Chromium the test says it skipped; with `REQUIRE_BROWSER=1` (as in
//! CI) a missing browser is a failure instead.

use std::path::{Path, PathBuf};
use std::time::Duration;

use capsync_tests::client::{OpKind, OpSpec, Scope};
use capsync_tests::{TestServer, admin, agent, batch, capsync, json_of, run_local, sample_share};
use serde_json::{Value, json};

use crate::browser_driver::{Browser, chromium_or_skip, wait_for};

fn body_has(text: &str) -> String {
    format!("document.body.innerText.includes({})", json!(text))
}

const SESSION: &str = "ses_01JD4K7M2QX9A7TS1";

fn live_ops() -> Vec<OpSpec> {
    let user = "msg_01JD4K7M2QX9A7TS005";
    let assistant = "msg_01JD4K7M2QX9A7TS006";
    vec![
        // The part before its message, as concurrent snapshots may arrive: the
        // server keeps it and the page shows it once the message is there.
        OpSpec::new(
            "live:user:text",
            OpKind::PartUpsert,
            json!({"id": "prt_live_01", "messageID": user, "sessionID": SESSION, "type": "text",
                   "text": "Also add a regression test for mixed-case emails, please."}),
        ),
        OpSpec::new(
            "live:user",
            OpKind::MessageUpsert,
            json!({"id": user, "sessionID": SESSION, "role": "user", "time": {"created": 1763712100000_i64}}),
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
    let Some(chromium) = chromium_or_skip() else {
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

        // A long answer streamed word by word arrives as segments of HTML (each delta
        // sends only the last ones): the page splices them into every paragraph once.
        let paragraphs = 12;
        let words = 60;
        let mut stream = Vec::new();
        for p in 0..paragraphs {
            stream.push("\n\n".to_owned());
            stream.extend((0..words).map(|w| format!("paragraph{p}word{w} ")));
        }
        let deltas: Vec<OpSpec> = stream
            .iter()
            .enumerate()
            .map(|(n, text)| {
                OpSpec::new(
                    format!("long:{n}"),
                    OpKind::PartDelta,
                    json!({"partID": "prt_live_02", "messageID": "msg_01JD4K7M2QX9A7TS006", "delta": text}),
                )
            })
            .collect();
        for (n, chunk) in deltas.chunks(100).enumerate() {
            created
                .writer
                .append(&batch(&format!("long-{n}"), chunk.to_vec()))
                .await
                .unwrap();
        }
        let box_paragraphs =
            "[...document.querySelectorAll('[data-id=msg_01JD4K7M2QX9A7TS006] .markdown p')]";
        wait_for(
            &mut browser,
            &page,
            "the streamed answer",
            &format!(
                "{box_paragraphs}.length === {} && {box_paragraphs}.at(-1).textContent.trim().endsWith('paragraph{}word{}')",
                paragraphs + 1,
                paragraphs - 1,
                words - 1
            ),
        )
        .await;
        for p in 0..paragraphs {
            let expected: Vec<String> =
                (0..words).map(|w| format!("paragraph{p}word{w}")).collect();
            assert_eq!(
                browser.eval(
                    &page,
                    &format!("{box_paragraphs}[{}].textContent.trim()", p + 1)
                ),
                expected.join(" "),
                "paragraph {p}"
            );
        }

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

/// The session export with every part type and tool state opencode 1.18 produces.
fn every_part_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/every-part.json")
}

/// The fixture reads as an export (what `capsync push` does with it), and
/// still holds every part type and tool state the browser test looks for.
/// Runs without a browser.
#[test]
fn the_every_part_fixture_is_an_export_with_every_part_type() {
    let text = std::fs::read_to_string(every_part_fixture()).expect("fixture");
    let export =
        capsync_tests::client::SessionExport::from_json(&text).expect("reads as an export");
    let parts: Vec<&Value> = export.messages.iter().flat_map(|m| &m.parts).collect();
    assert_eq!(
        export.to_ops().len(),
        2 + export.messages.len() + parts.len(),
        "the session, the diffs, each message and part"
    );
    let types: std::collections::BTreeSet<&str> =
        parts.iter().filter_map(|p| p["type"].as_str()).collect();
    let every = [
        "agent",
        "compaction",
        "file",
        "patch",
        "reasoning",
        "retry",
        "snapshot",
        "step-finish",
        "step-start",
        "subtask",
        "text",
        "tool",
    ];
    assert_eq!(types, every.into_iter().collect());
    let states: std::collections::BTreeSet<&str> = parts
        .iter()
        .filter_map(|p| p["state"]["status"].as_str())
        .collect();
    assert_eq!(
        states,
        ["completed", "error", "pending", "running"]
            .into_iter()
            .collect()
    );
    let tools: std::collections::BTreeSet<&str> =
        parts.iter().filter_map(|p| p["tool"].as_str()).collect();
    for tool in [
        "apply_patch",
        "bash",
        "edit",
        "glob",
        "grep",
        "read",
        "task",
        "todowrite",
        "write",
    ] {
        assert!(tools.contains(tool), "{tool}");
    }
    assert!(parts.iter().any(|p| p["synthetic"] == true));
    assert!(parts.iter().any(|p| p["capsyncOmitted"]["bytes"].is_u64()));
}

/// `n` with thousands separators, as the page writes counts.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The header's totals for an export: cost and tokens summed over its assistant messages.
fn expected_totals(export: &Value) -> (String, String) {
    let (mut cost, mut input, mut output, mut reasoning, mut read, mut write) =
        (0.0, 0, 0, 0, 0, 0);
    for message in export["messages"].as_array().expect("messages") {
        let info = &message["info"];
        if info["role"] != "assistant" {
            continue;
        }
        let tokens = &info["tokens"];
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        cost += info["cost"].as_f64().unwrap_or(0.0);
        input += n(&tokens["input"]);
        output += n(&tokens["output"]);
        reasoning += n(&tokens["reasoning"]);
        read += n(&tokens["cache"]["read"]);
        write += n(&tokens["cache"]["write"]);
    }
    let all = input + output + reasoning + read + write;
    let bar = format!("${cost:.4} · {} tokens", grouped(all));
    let breakdown = format!(
        "Tokens: {} in · {} out · {} reasoning · {} cache read · {} cache write",
        grouped(input),
        grouped(output),
        grouped(reasoning),
        grouped(read),
        grouped(write)
    );
    (bar, breakdown)
}

/// The text of the first element matching `selector` (null when there is none).
fn text_of(selector: &str) -> String {
    format!(
        "((document.querySelector({0}) || {{}}).textContent ?? null)",
        json!(selector)
    )
}

/// Whether the page is scrolled to its end (within the page's own margin).
const AT_END: &str =
    "window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 2";

#[test]
fn the_share_page_shows_every_part_type() {
    let Some(chromium) = chromium_or_skip() else {
        return;
    };
    // Running and pending calls in the fixture must stay so: the writer (the
    // CLI's push) leaves at once, and must not count as gone for this test.
    let server = TestServer::start_with(|c| c.interrupted_after = Duration::from_secs(3600));
    let http = server.http_addr();
    let fixture = every_part_fixture();
    let export: Value =
        serde_json::from_str(&std::fs::read_to_string(&fixture).expect("fixture")).expect("JSON");
    let session = export["info"]["id"]
        .as_str()
        .expect("session id")
        .to_owned();
    let mut browser = Browser::launch(&chromium);
    run_local(async {
        // The fixture goes in as an agent would send it: `capsync share create`
        // and `capsync push` read it with the export reader.
        let (conn, admin) = admin(&server).await;
        let (_agent, agent_token) = agent(&conn, &admin).await;
        let path = fixture.to_str().expect("UTF-8 path");
        let created = json_of(
            &capsync(
                &server,
                &agent_token,
                &["--json", "share", "create", "--from-export", path],
            )
            .await,
        );
        let share = created["shareId"].as_str().unwrap().to_owned();
        let writer_token = created["writerToken"]["token"].as_str().unwrap().to_owned();
        let viewer_token = created["viewerToken"]["token"].as_str().unwrap().to_owned();
        let pushed = json_of(&capsync(&server, &writer_token, &["--json", "push", path]).await);
        assert_eq!(pushed["rejected"].as_array().unwrap().len(), 0, "{pushed}");
        let parts: usize = export["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| 1 + m["parts"].as_array().unwrap().len())
            .sum();
        // The session, the diffs, and every message and part.
        assert_eq!(
            pushed["applied"].as_u64(),
            Some(2 + parts as u64),
            "{pushed}"
        );

        // The sub-agent's session of the fixture's task call, shared too: the
        // task links to it, and this page's token opens it.
        let child = json_of(
            &capsync(
                &server,
                &agent_token,
                &[
                    "--json",
                    "share",
                    "create",
                    "--session-id",
                    "ses_1f0c3b41effeTz9wA6nHk3Uq2c",
                    "--parent-session-id",
                    &session,
                ],
            )
            .await,
        );
        let child = child["shareId"].as_str().unwrap().to_owned();

        let page = browser.open(&format!("http://{http}/s/{share}#{viewer_token}"));
        wait_for(
            &mut browser,
            &page,
            "the fixture session, live",
            "document.querySelectorAll('article.message').length === 7 && \
             document.getElementById('status').textContent === 'live'",
        )
        .await;

        // It opens at the top: the title and the first prompt in sight.
        assert_eq!(browser.eval(&page, "window.scrollY"), 0);
        assert_eq!(
            browser.eval(
                &page,
                "(() => { const r = document.getElementById('title').getBoundingClientRect(); \
                 return r.top >= 0 && r.bottom <= innerHeight; })()"
            ),
            true,
            "the title is in view"
        );
        assert_eq!(
            browser.eval(&page, &text_of("#title")),
            "Rate-limit failed logins on POST /login"
        );

        // Totals in the header: cost and tokens of all assistant messages.
        let (bar, breakdown) = expected_totals(&export);
        assert_eq!(browser.eval(&page, &text_of("#totals")), bar.as_str());
        assert_eq!(
            browser.eval(&page, &body_has(&breakdown)),
            true,
            "{breakdown}"
        );

        // Each part type's view, with its key content: (what, expression, expected).
        let checks: Vec<(&str, String, Value)> = vec![
            ("user text as markdown", text_of(".role-user .part-text.markdown strong"), json!("5 failed attempts")),
            ("synthetic text, set apart", text_of(".text-aside .aside-label"), json!("added automatically")),
            ("synthetic text's content", format!("{}.includes('Called the Read tool')", text_of(".text-aside .text")), json!(true)),
            ("the small PNG, decoded", "document.querySelector('.part-file img.attachment-image').naturalWidth".into(), json!(96)),
            ("the image's name", text_of(".part-file .file-name"), json!("blocked-page.png")),
            ("the omitted attachment", text_of(".part-file .omitted"), json!("attachment omitted (403 KB)")),
            ("a mentioned file: name and mime", "[...document.querySelectorAll('.part-file')].map(f => f.textContent).some(t => t.includes('src/auth/login.py') && t.includes('text/plain'))".into(), json!(true)),
            ("the agent mention", text_of(".part-agent .agent-chip"), json!("@explore")),
            ("the turn's diffs", format!("{}.startsWith('Changes in this turn · 2 files')", text_of(".role-user .turn-diffs summary")), json!(true)),
            ("the turn's diff files", "[...document.querySelectorAll('.turn-diffs .file-line .file')].map(f => f.textContent).join(',')".into(), json!("src/auth/login.py,src/auth/ratelimit.py")),
            ("reasoning", format!("{}.includes('sliding window')", text_of(".part-reasoning")), json!(true)),
            ("grep: pattern", text_of("[data-tool=grep] .tool-title"), json!("def login")),
            ("grep: matches", format!("{0}.includes('2 matches') && {1}.includes('src/auth/login.py:')", text_of("[data-tool=grep] .chips"), text_of("[data-tool=grep] .tool-output")), json!(true)),
            ("glob: pattern", text_of("[data-tool=glob] .tool-title"), json!("**/*limit*.py")),
            ("glob: files", format!("{0}.includes('1 file') && {1}.trim()", text_of("[data-tool=glob] .chips"), text_of("[data-tool=glob] .tool-output")), json!("src/api/throttle_limits.py")),
            ("read: path", text_of("[data-tool=read] .tool-title"), json!("src/auth/login.py")),
            ("read: excerpt", format!("{}.includes('def login():')", text_of("[data-tool=read] .excerpt")), json!(true)),
            ("todowrite: checklist", "[...document.querySelectorAll('[data-tool=todowrite] .todo-list li')].map(li => li.dataset.status + ':' + li.querySelector('.todo-content').textContent).join('|')".into(),
                json!("completed:Find where failed logins are handled|in_progress:Add a sliding-window limiter per client address|pending:Cover the limit with a test|cancelled:Make the limit configurable per deployment")),
            ("todowrite: title", text_of("[data-tool=todowrite] .tool-title"), json!("Plan · 1 of 4 done")),
            ("write: path", text_of("[data-tool=write] .tool-title"), json!("src/auth/ratelimit.py")),
            ("write: content", format!("{0}.includes('new file') && {1}.includes('class FailedLogins:')", text_of("[data-tool=write] .chips"), text_of("[data-tool=write] .excerpt")), json!(true)),
            ("edit: path", text_of("[data-tool=edit] .tool-title"), json!("src/auth/login.py")),
            ("edit: added lines", "[...document.querySelectorAll('[data-tool=edit] pre.diff .line.add')].map(l => l.textContent).includes('+failed = FailedLogins(limit=5, window_s=60)\\n')".into(), json!(true)),
            ("edit: removed lines", "[...document.querySelectorAll('[data-tool=edit] pre.diff .line.del')].map(l => l.textContent.trim())".into(), json!(["-        return jsonify(error=\"invalid credentials\"), 401"])),
            ("edit: counts", text_of("[data-tool=edit] summary .stats"), json!("+7 −1")),
            ("bash: command", text_of("[data-tool=bash].status-completed .bash-command"), json!("$ pytest -q tests/test_login.py")),
            ("bash: output", format!("{}.includes('1 failed, 4 passed')", text_of("[data-tool=bash].status-completed .tool-output")), json!(true)),
            ("bash: exit code", text_of("[data-tool=bash].status-completed .exit-nonzero"), json!("exit 1")),
            ("bash: error state", text_of("[data-tool=bash].status-error .tool-error"), json!("Error: ruff: command not found")),
            ("pending: badge and raw input", format!("{0} + ' ' + {1}", text_of(".tool.status-pending .badge"), text_of(".tool.status-pending .tool-raw")), json!("pending {\"command\": \"pytest -q\", \"descri")),
            ("running: badge", text_of("[data-tool=webfetch] .badge"), json!("running")),
            ("running: its url", "document.querySelector('[data-tool=webfetch] a.tool-title').href".into(), json!("https://www.rfc-editor.org/rfc/rfc6585#section-4")),
            ("task: description", text_of("[data-tool=task] .tool-title"), json!("Check the limiter for races")),
            ("task: agent and child session", format!("{0}.includes('@explore') && {0}.includes('session ses_1f0c3b41effeTz9wA6nHk3Uq2c')", text_of("[data-tool=task] .chips")), json!(true)),
            ("task: link to the child share, with this page's token", "document.querySelector('[data-tool=task] a.child-link').getAttribute('href')".into(), json!(format!("/s/{child}#{viewer_token}"))),
            ("task: result", format!("{}.startsWith('No races')", text_of("[data-tool=task] .task-result")), json!(true)),
            ("apply_patch: files", "[...document.querySelectorAll('[data-tool=apply_patch] .file-line')].map(l => l.querySelector('.file-op').textContent + ' ' + l.querySelector('.file').textContent).join(',')".into(), json!("M tests/test_login.py,A tests/conftest.py")),
            ("step-start: one per step", "document.querySelectorAll('.part-step-start').length".into(), json!(4)),
            ("step-finish: tokens and cost", text_of(".part-step-finish"), json!("step called tools · 8,120 in · 1,290 out · 220 reasoning · 6,144 cache read · 512 cache write · $0.0311")),
            ("patch: files touched", text_of(".part-patch"), json!("Files touched: src/auth/login.py, src/auth/ratelimit.py")),
            ("snapshot: nothing to show", "document.querySelectorAll('.part-snapshot').length".into(), json!(0)),
            ("retry", text_of(".part-retry"), json!("Retry 1 · APIError 529: Overloaded")),
            ("compaction", text_of(".part-compaction"), json!("Context compacted automatically")),
            ("the summary it produced", "[...document.querySelectorAll('.role-assistant .tag')].map(t => t.textContent).join(',')".into(), json!("summary,compaction")),
            ("subtask", "(() => { const t = document.querySelector('.part-subtask').textContent; return t.includes('@general') && t.includes('/review') && t.includes('review changes') && t.includes('Review the uncommitted changes'); })()".into(), json!(true)),
            ("an aborted answer", text_of(".message-error"), json!("MessageAbortedError: The operation was aborted.")),
            ("the session's diffs", text_of("#diffs-summary"), json!("4 files changed · +42 −1")),
            ("images only from data: URLs", "[...document.images].every(i => i.src.startsWith('data:image/png;base64,'))".into(), json!(true)),
        ];
        let mut failed = Vec::new();
        for (what, expression, expected) in &checks {
            let got = browser.eval(&page, expression);
            if &got != expected {
                failed.push(format!("{what}: expected {expected}, got {got}"));
            }
        }
        assert!(failed.is_empty(), "{}", failed.join("\n"));

        browser.screenshot(&page, "10-every-part.png");
        for (selector, name) in [
            ("header.top", "11-header.png"),
            (".role-user", "12-user-prompt.png"),
            ("[data-tool=edit]", "13-edit-diff.png"),
            ("[data-tool=todowrite]", "14-todowrite.png"),
            ("[data-tool=bash].status-completed", "15-bash.png"),
            ("[data-tool=apply_patch]", "16-apply-patch.png"),
            (".part-compaction", "17-compaction.png"),
        ] {
            browser.screenshot_of(&page, selector, name);
        }

        // A reader at the end keeps following. Redeemed again here: the CLI's writer has left.
        let writer = conn
            .redeem(&writer_token)
            .await
            .expect("redeem writer")
            .into_writer()
            .expect("writer capability");
        browser.eval(
            &page,
            "window.scrollTo(0, document.documentElement.scrollHeight)",
        );
        assert_eq!(browser.eval(&page, AT_END), true);
        let user = "msg_1f0c3a9b0008Wq2eR4tY6uI8oP0a";
        let ack = writer
            .append(&batch(
                "follow",
                vec![
                    OpSpec::new(
                        "follow:user",
                        OpKind::MessageUpsert,
                        json!({"id": user, "sessionID": session, "role": "user", "time": {"created": 1767225800000_i64},
                               "agent": "build", "model": {"providerID": "anthropic", "modelID": "claude-sonnet-4-5"}}),
                    ),
                    OpSpec::new(
                        "follow:text",
                        OpKind::PartUpsert,
                        json!({"id": "prt_1f0c3a9c0100Ab3dE5fG7hJ9kLmN", "messageID": user, "sessionID": session, "type": "text",
                               "text": "Keep going.\n\n".repeat(40)}),
                    ),
                    // Neither shown: only small data: URLs of raster images are.
                    OpSpec::new(
                        "follow:remote-image",
                        OpKind::PartUpsert,
                        json!({"id": "prt_1f0c3a9c0101Ab3dE5fG7hJ9kLmN", "messageID": user, "sessionID": session, "type": "file",
                               "mime": "image/png", "filename": "tracker.png", "url": "https://example.com/tracker.png"}),
                    ),
                    OpSpec::new(
                        "follow:svg",
                        OpKind::PartUpsert,
                        json!({"id": "prt_1f0c3a9c0102Ab3dE5fG7hJ9kLmN", "messageID": user, "sessionID": session, "type": "file",
                               "mime": "image/svg+xml", "filename": "logo.svg",
                               "url": "data:image/svg+xml;base64,PHN2ZyB4bWxucz0iaHR0cDovL3d3dy53My5vcmcvMjAwMC9zdmciLz4="}),
                    ),
                ],
            ))
            .await
            .expect("append");
        assert_eq!(ack.applied(), 4);
        wait_for(
            &mut browser,
            &page,
            "the appended message",
            &format!("document.querySelectorAll('[data-id={user}] .part').length === 3"),
        )
        .await;
        assert_eq!(browser.eval(&page, AT_END), true, "still at the end");
        assert_eq!(browser.eval(&page, "document.images.length"), 1);
        assert_eq!(
            browser.eval(
                &page,
                &text_of(&format!(
                    "[data-id={user}] .part-file:last-child .file-note"
                ))
            ),
            "SVG images are not shown"
        );

        // A reader scrolled up stays where they are, and is told there is more.
        browser.eval(&page, "window.scrollTo(0, 400)");
        assert_eq!(browser.eval(&page, "window.scrollY"), 400);
        let answer = "msg_1f0c3a9b0009Wq2eR4tY6uI8oP0a";
        let ack = writer
            .append(&batch(
                "stay",
                vec![
                    OpSpec::new(
                        "stay:assistant",
                        OpKind::MessageUpsert,
                        json!({"id": answer, "sessionID": session, "role": "assistant", "time": {"created": 1767225801000_i64},
                               "parentID": user, "modelID": "claude-sonnet-4-5", "providerID": "anthropic", "mode": "build",
                               "agent": "build", "path": {"cwd": "/home/dev/webapp", "root": "/home/dev/webapp"},
                               "cost": 0.5, "tokens": {"input": 1000, "output": 10, "reasoning": 0, "cache": {"read": 0, "write": 0}}}),
                    ),
                    OpSpec::new(
                        "stay:text",
                        OpKind::PartUpsert,
                        json!({"id": "prt_1f0c3a9c0110Ab3dE5fG7hJ9kLmN", "messageID": answer, "sessionID": session, "type": "text",
                               "text": "Going on with **the tests**."}),
                    ),
                ],
            ))
            .await
            .expect("append");
        assert_eq!(ack.applied(), 2);
        wait_for(
            &mut browser,
            &page,
            "the answer, with its part",
            &format!(
                "{} === 'the tests'",
                text_of(&format!("[data-id={answer}] strong"))
            ),
        )
        .await;
        assert_eq!(browser.eval(&page, "window.scrollY"), 400, "not moved");
        assert_eq!(
            browser.eval(&page, "document.getElementById('jump').hidden"),
            false
        );
        assert_eq!(
            browser.eval(&page, &text_of("#totals")),
            format!("$0.5615 · {} tokens", grouped(48_510 + 1010)).as_str()
        );
        // The header stays in sight at the top.
        assert_eq!(
            browser.eval(
                &page,
                "document.querySelector('header.top').getBoundingClientRect().top"
            ),
            0
        );
        assert_eq!(browser.eval(&page, &text_of("#status")), "live");
        browser.screenshot_of_window(&page, "18-scrolled-up.png");
        browser.eval(&page, "document.getElementById('jump').click()");
        assert_eq!(
            browser.eval(&page, AT_END),
            true,
            "the button goes to the end"
        );
        assert_eq!(
            browser.eval(&page, "document.getElementById('jump').hidden"),
            true
        );
        drop(conn);
    });
}
