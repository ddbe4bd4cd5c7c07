//! What capsync's opencode plugin (`opencode/capsync-journal.js`) costs opencode.
//!
//! - **Wall time**: the real opencode (pinned in `tests/opencode/`, offline, the fake model
//!   of the tests playing its coding script: reasoning, text, a bash call, an edit, an
//!   answer) answers the same prompt without the plugin, with the plugin journaling only,
//!   and installed (`capsync opencode install --share auto`: the plugin and the shipper it
//!   starts, shipping to a capsync server on the same machine, whose work a real setup
//!   does elsewhere), in rotating order, each in a fresh `opencode serve`. Printed: the
//!   median prompt time of each, and the median of the per-round ratios to no plugin
//!   (target: at most 1.05, under 5% added).
//! - **Per event**: the plugin's event handler alone, in Node.js, called on a typical
//!   part-delta event many times (one synchronous write and fsync each).
//!
//! ```text
//! cargo bench -p capsync-tests --bench opencode_plugin
//! cargo bench -p capsync-tests --bench opencode_plugin -- --rounds 10 --events 5000
//! ```
//!
//! Needs the pinned opencode (`npm install --prefix tests/opencode --no-save`, or
//! `CAPSYNC_OPENCODE_BIN`) and `node`. Results: `docs/BENCHMARKS.md`, "opencode plugin".

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use capsync_tests::fake_llm::FakeLlm;
use capsync_tests::opencode::{self, OpenCode};
use clap::Parser;
use serde_json::json;

#[derive(Debug, Parser)]
#[command(about = "What capsync's opencode plugin costs opencode (see docs/BENCHMARKS.md)")]
struct Args {
    /// Rounds, each one prompt without and one with the plugin.
    #[arg(long, default_value_t = 6)]
    rounds: usize,
    /// Events for the handler-alone measurement.
    #[arg(long, default_value_t = 2000)]
    events: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

const PROMPT: &str = "Please mark the task in notes.txt as done.";

fn plugin() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("opencode/capsync-journal.js")
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// What a round's opencode runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// No plugin.
    Bare,
    /// The plugin file, journaling only (no shipper).
    Journal,
    /// `capsync opencode install --share auto`: the plugin plus the shipper it starts,
    /// shipping to a capsync server on this machine.
    Installed,
}

/// A capsync server for the installed variant, and its agent token.
struct Server {
    server: capsync_tests::TestServer,
    agent_token: String,
}

/// One prompt in a fresh opencode: its wall time.
fn prompt_time(
    binary: &std::path::Path,
    llm: &FakeLlm,
    variant: Variant,
    server: &Server,
) -> Duration {
    let journal = tempfile::tempdir().expect("scratch");
    let mut builder = OpenCode::builder(binary, llm);
    match variant {
        Variant::Bare => {}
        Variant::Journal => {
            builder = builder.config(json!({"plugin": [[
                format!("file://{}", plugin().display()),
                {"journal": journal.path().join("journal").to_str().expect("UTF-8 path")}
            ]]}));
        }
        Variant::Installed => {
            let rpc = server.server.addr().to_string();
            let origin = format!("http://{}", server.server.http_addr());
            builder = builder.config(json!({"share": "manual"})).setup(
                env!("CARGO_BIN_EXE_capsync-under-test"),
                &[
                    "--server",
                    &rpc,
                    "--share-url",
                    &origin,
                    "--token",
                    &server.agent_token,
                    "opencode",
                    "install",
                    "--project",
                    ".",
                    "--share",
                    "auto",
                ],
            );
        }
    }
    let oc = builder.start();
    let session = oc.create_session();
    let started = Instant::now();
    oc.prompt(&session, PROMPT);
    let elapsed = started.elapsed();
    if variant == Variant::Installed {
        // Not timed: the shipper finishing after opencode, so the next round starts quiet.
        oc.stop_serve();
        wait_shipper_ended(oc.project_dir());
    }
    elapsed
}

/// Waits (a minute at most) until no shipper holds the project's lock.
fn wait_shipper_ended(project: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let out = Command::new(env!("CARGO_BIN_EXE_capsync-under-test"))
            .args(["--json", "opencode", "status", "--project"])
            .arg(project)
            .output()
            .expect("capsync status");
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if status["shipperRunning"] == false {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("warning: the shipper of {} still runs", project.display());
}

fn main() {
    let args = Args::parse();
    let Some(binary) = opencode::binary() else {
        eprintln!("opencode is not installed: {}", opencode::INSTALL_HINT);
        std::process::exit(1);
    };
    println!("opencode plugin benchmark ({} rounds)", args.rounds);
    let llm = FakeLlm::start();
    let server = {
        let server = capsync_tests::TestServer::start();
        let agent_token = capsync_tests::run_local(async {
            let (conn, admin) = capsync_tests::admin(&server).await;
            capsync_tests::agent(&conn, &admin).await.1
        });
        Server {
            server,
            agent_token,
        }
    };
    let variants = [Variant::Bare, Variant::Journal, Variant::Installed];
    // One round of each first, not counted: caches, the plugin's first load.
    for variant in variants {
        prompt_time(&binary, &llm, variant, &server);
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for round in 0..args.rounds {
        // Rotate which goes first, so a slow stretch of the machine hits each.
        let mut this_round = [0.0; 3];
        for k in 0..variants.len() {
            let i = (round + k) % variants.len();
            this_round[i] = prompt_time(&binary, &llm, variants[i], &server).as_secs_f64() * 1000.0;
        }
        for i in 0..variants.len() {
            times[i].push(this_round[i]);
            ratios[i].push(this_round[i] / this_round[0]);
        }
    }
    println!("| opencode | prompt, median ms | median ratio to no plugin | target |");
    println!("|---|---:|---:|---|");
    for (i, variant) in variants.iter().enumerate() {
        let name = match variant {
            Variant::Bare => "without the plugin",
            Variant::Journal => "the plugin, journaling only",
            Variant::Installed => "installed: the plugin and its shipper, shipping",
        };
        let ratio = median(ratios[i].clone());
        let verdict = match variant {
            Variant::Bare => String::new(),
            _ if ratio <= 1.05 => "met (≤ 1.05)".to_owned(),
            _ => "not met (≤ 1.05)".to_owned(),
        };
        println!(
            "| {name} | {:.0} | {ratio:.3} | {verdict} |",
            median(times[i].clone())
        );
    }

    // The handler alone: import the plugin and call its event hook in a loop.
    let scratch = tempfile::tempdir().expect("scratch");
    let script = format!(
        r#"const {{ CapsyncJournal }} = await import({plugin});
const hooks = await CapsyncJournal({{ directory: {dir} }}, {{ journal: {journal} }});
const event = {{ id: "evt_0", type: "message.part.delta", properties: {{ sessionID: "ses_1",
  messageID: "msg_1", partID: "prt_1", field: "text", delta: "a few words of streamed text " }} }};
const started = process.hrtime.bigint();
for (let i = 0; i < {events}; i++) {{ event.id = "evt_" + i; hooks.event({{ event }}); }}
const ns = Number(process.hrtime.bigint() - started);
console.log((ns / {events} / 1000).toFixed(1));"#,
        plugin = json!(format!("file://{}", plugin().display())),
        dir = json!(scratch.path().to_str().expect("UTF-8 path")),
        journal = json!(scratch.path().join("journal").to_str().expect("UTF-8 path")),
        events = args.events,
    );
    let output = Command::new("node")
        .args(["--input-type=module", "-e", &script])
        .output()
        .expect("run node");
    assert!(
        output.status.success(),
        "node failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    println!(
        "\nthe event handler alone: {} µs per event (the mean of {} calls, a write and an fsync each)",
        String::from_utf8_lossy(&output.stdout).trim(),
        args.events
    );
}
